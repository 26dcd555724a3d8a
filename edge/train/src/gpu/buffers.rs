//! Device buffers: a layer's weights, gradients, optimiser state and
//! activations, the batch and loss buffers of a loaded head, and the
//! staging buffer that reads results back. All are sized for `max_batch`
//! rows once, at [`crate::Backend::load`], so a step allocates nothing but
//! its uniforms.

use super::GpuBackend;
use crate::TrainError;
use crate::head::{Head, HeadSpec};
use crate::optim::Optimizer;
use wgpu::util::DeviceExt;

pub(super) struct Layer {
    pub w: wgpu::Buffer,
    pub b: wgpu::Buffer,
    pub gw: wgpu::Buffer,
    pub gb: wgpu::Buffer,
    pub s1w: wgpu::Buffer,
    pub s2w: wgpu::Buffer,
    pub s1b: wgpu::Buffer,
    pub s2b: wgpu::Buffer,
    pub z: wgpu::Buffer,
    pub a: wgpu::Buffer,
    /// Gradient w.r.t. this layer's activation, then its pre-activation.
    pub d: wgpu::Buffer,
}

pub(super) struct Loaded {
    pub spec: HeadSpec,
    pub opt: Optimizer,
    /// Optimiser steps taken (Adam's bias correction).
    pub t: u32,
    pub layers: Vec<Layer>,
    pub x: wgpu::Buffer,
    pub targets: wgpu::Buffer,
    /// Not bound by any kernel today (the loss kernels write into the last
    /// layer's `d`); allocated so the device footprint stays as budgeted.
    pub dout: wgpu::Buffer,
    pub loss: wgpu::Buffer,
    pub staging: wgpu::Buffer,
    pub staging_bytes: u64,
}

impl GpuBackend {
    pub(super) fn storage(&self, label: &str, data: &[f32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            })
    }

    /// At least 4 floats: wgpu refuses zero-sized bindings.
    pub(super) fn zeros(&self, label: &str, len: usize) -> wgpu::Buffer {
        self.storage(label, &vec![0.0f32; len.max(4)])
    }

    fn layer_buffers(&self, head: &Head) -> Vec<Layer> {
        let mb = self.max_batch;
        head.spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, s)| Layer {
                w: self.storage("w", &head.params.weights[i]),
                b: self.storage("b", &head.params.biases[i]),
                gw: self.zeros("gw", s.inputs * s.outputs),
                gb: self.zeros("gb", s.outputs),
                s1w: self.zeros("s1w", s.inputs * s.outputs),
                s2w: self.zeros("s2w", s.inputs * s.outputs),
                s1b: self.zeros("s1b", s.outputs),
                s2b: self.zeros("s2b", s.outputs),
                z: self.zeros("z", mb * s.outputs),
                a: self.zeros("a", mb * s.outputs),
                d: self.zeros("d", mb * s.outputs),
            })
            .collect()
    }

    /// Every buffer of `head` with `opt`, its weights uploaded.
    pub(super) fn allocate(&self, head: &Head, opt: &Optimizer) -> Loaded {
        let mb = self.max_batch;
        let layers = self.layer_buffers(head);
        let k = head.spec.outputs();
        // The staging buffer must hold the largest readback: a weight
        // matrix, a batch of outputs or a batch of losses.
        let largest_param = head
            .spec
            .layers
            .iter()
            .map(|l| l.inputs * l.outputs)
            .max()
            .unwrap_or(0);
        let staging_floats = largest_param.max(mb * k).max(mb);
        let staging_bytes = (staging_floats.max(4) * 4) as u64;
        Loaded {
            spec: head.spec.clone(),
            opt: *opt,
            t: 0,
            layers,
            x: self.zeros("x", mb * head.spec.inputs()),
            targets: self.zeros("targets", mb * k),
            dout: self.zeros("dout", 4),
            loss: self.zeros("loss", mb * k),
            staging: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("staging"),
                size: staging_bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            staging_bytes,
        }
    }

    /// Copy `floats` values of `src` back through the staging buffer
    /// (waits for the queue).
    pub(super) fn read(&self, src: &wgpu::Buffer, floats: usize) -> Result<Vec<f32>, TrainError> {
        self.check_alive()?;
        let l = self.loaded()?;
        let bytes = (floats * 4) as u64;
        if bytes > l.staging_bytes {
            return Err(TrainError::Gpu(format!(
                "readback of {bytes} bytes over staging {}",
                l.staging_bytes
            )));
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, &l.staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        l.staging
            .map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
                let _ = tx.send(r);
            });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| TrainError::Gpu(format!("poll: {e}")))?;
        rx.recv()
            .map_err(|_| TrainError::Gpu("map callback dropped".into()))?
            .map_err(|e| TrainError::Gpu(format!("map: {e}")))?;
        let out = {
            let view = l
                .staging
                .get_mapped_range(0..bytes)
                .map_err(|e| TrainError::Gpu(format!("mapped range: {e}")))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        l.staging.unmap();
        self.check_alive()?;
        Ok(out)
    }
}
