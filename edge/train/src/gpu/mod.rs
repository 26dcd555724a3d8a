//! The wgpu backend: WGSL compute kernels (`kernels.wgsl`) for the forward
//! pass, backward pass, loss and optimiser step. Weights, gradients and
//! optimiser state stay on the device between steps; only the batch goes
//! up and the per-row losses come back.
//!
//! Memory: wgpu cannot report device memory, so the budget is
//! `gpu_memory_allocation x max_buffer_size` of the adapter; a head whose
//! buffers (weights, gradients, optimiser state, activations for the
//! largest batch) exceed it is refused, and the caller trains on the CPU.
//! A lost device turns every later call into [`TrainError::Gpu`].
//!
//! Modules: `setup` (adapter, device, error hooks: the steps of
//! [`GpuBackend::new`]), `kernels` (pipelines, bind-group layout, uniforms,
//! one dispatch), `buffers` (allocation at load, readback), `record`
//! (forward, loss, backward and optimiser passes into an encoder); this
//! file holds the backend and its [`Backend`] implementation.

mod buffers;
mod kernels;
mod record;
mod setup;

use crate::head::{Head, HeadSpec, Params};
use crate::optim::Optimizer;
use crate::{Backend, Targets, TrainError};
use buffers::Loaded;
use kernels::Kernels;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The GPU backend.
pub struct GpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernels: Kernels,
    adapter_name: String,
    budget_bytes: u64,
    max_batch: usize,
    lost: Arc<AtomicBool>,
    loaded: Option<Loaded>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("adapter", &self.adapter_name)
            .finish()
    }
}

/// Bytes the backend needs on the device for `spec` at `max_batch` rows.
pub fn required_bytes(spec: &HeadSpec, max_batch: usize) -> u64 {
    let params = spec.parameter_count() as u64;
    let acts: u64 = spec
        .layers
        .iter()
        .map(|l| 3 * (max_batch * l.outputs) as u64)
        .sum();
    let io = (max_batch * (spec.inputs() + 3 * spec.outputs() + 1)) as u64;
    4 * (4 * params + acts + io)
}

impl GpuBackend {
    /// Find an adapter with compute shaders and build the pipelines.
    pub fn new(
        memory_fraction: f64,
        spec: &HeadSpec,
        max_batch: usize,
    ) -> Result<GpuBackend, TrainError> {
        let adapter = setup::request_adapter()?;
        let budget_bytes = setup::check_adapter(&adapter, memory_fraction, spec, max_batch)?;
        let (device, queue) = setup::request_device(&adapter)?;
        let lost = setup::watch_device(&device);
        let kernels = Kernels::new(&device);
        let adapter_name = setup::adapter_name(&adapter);
        tracing::info!(adapter = %adapter_name, "GPU training backend ready");
        Ok(GpuBackend {
            device,
            queue,
            kernels,
            adapter_name,
            budget_bytes,
            max_batch: max_batch.max(1),
            lost,
            loaded: None,
        })
    }

    fn check_alive(&self) -> Result<(), TrainError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(TrainError::Gpu("device lost".into()));
        }
        Ok(())
    }

    fn loaded(&self) -> Result<&Loaded, TrainError> {
        self.loaded.as_ref().ok_or(TrainError::NotLoaded)
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        self.adapter_name.clone()
    }

    fn load(&mut self, head: &Head, opt: &Optimizer) -> Result<(), TrainError> {
        self.check_alive()?;
        let needed = required_bytes(&head.spec, self.max_batch);
        if needed > self.budget_bytes {
            return Err(TrainError::Gpu(format!(
                "head needs {needed} bytes, budget {}",
                self.budget_bytes
            )));
        }
        self.loaded = Some(self.allocate(head, opt));
        Ok(())
    }

    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError> {
        self.check_alive()?;
        let (inputs, outputs) = {
            let l = self.loaded()?;
            (l.spec.inputs(), l.spec.outputs())
        };
        if x.len() != n * inputs {
            return Err(TrainError::Data(format!(
                "{} values for {n} rows of {inputs}",
                x.len()
            )));
        }
        let mut out = Vec::with_capacity(n * outputs);
        let mut start = 0;
        // In chunks of `max_batch` rows: the activation buffers hold no more.
        while start < n {
            let rows = (n - start).min(self.max_batch);
            let l = self.loaded()?;
            self.queue.write_buffer(
                &l.x,
                0,
                bytemuck::cast_slice(&x[start * inputs..(start + rows) * inputs]),
            );
            let mut enc = self.device.create_command_encoder(&Default::default());
            self.record_forward(&mut enc, rows)?;
            self.queue.submit([enc.finish()]);
            let last = &l.layers.last().ok_or(TrainError::NotLoaded)?.a;
            out.extend(self.read(last, rows * outputs)?);
            start += rows;
        }
        Ok(out)
    }

    fn gradients(
        &mut self,
        x: &[f32],
        y: Targets<'_>,
        n: usize,
    ) -> Result<(f32, Params), TrainError> {
        self.check_alive()?;
        let enc = self.record_gradients(x, y, n)?;
        self.queue.submit([enc.finish()]);
        let loss = self.batch_loss(n)?;
        let l = self.loaded()?;
        let mut g = Params::zeros_like(&l.spec);
        for (i, (layer, s)) in l.layers.iter().zip(&l.spec.layers).enumerate() {
            g.weights[i] = self.read(&layer.gw, s.inputs * s.outputs)?;
            g.biases[i] = self.read(&layer.gb, s.outputs)?;
        }
        Ok((loss, g))
    }

    fn step(&mut self, x: &[f32], y: Targets<'_>, n: usize) -> Result<f32, TrainError> {
        self.check_alive()?;
        let mut enc = self.record_gradients(x, y, n)?;
        let l = self.loaded.as_mut().ok_or(TrainError::NotLoaded)?;
        l.t += 1;
        let t = l.t;
        // Gradients and update in one submission.
        self.record_step(&mut enc, t)?;
        self.queue.submit([enc.finish()]);
        self.batch_loss(n)
    }

    fn params(&mut self) -> Result<Params, TrainError> {
        let l = self.loaded()?;
        let mut p = Params::zeros_like(&l.spec);
        for (i, (layer, s)) in l.layers.iter().zip(&l.spec.layers).enumerate() {
            p.weights[i] = self.read(&layer.w, s.inputs * s.outputs)?;
            p.biases[i] = self.read(&layer.b, s.outputs)?;
        }
        Ok(p)
    }
}
