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

use crate::head::{Activation, Head, HeadSpec, Params};
use crate::optim::{Optimizer, OptimizerKind};
use crate::{Backend, Loss, Targets, TrainError, check_batch};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use wgpu::util::DeviceExt;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Uniforms {
    m: u32,
    k: u32,
    n: u32,
    act: u32,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    c1: f32,
    c2: f32,
    pad: [f32; 2],
}

impl Uniforms {
    fn dims(m: usize, k: usize, n: usize) -> Uniforms {
        Uniforms {
            m: m as u32,
            k: k as u32,
            n: n as u32,
            act: 2,
            lr: 0.0,
            b1: 0.0,
            b2: 0.0,
            eps: 0.0,
            c1: 1.0,
            c2: 1.0,
            pad: [0.0; 2],
        }
    }
}

const KERNELS: &[&str] = &[
    "linear_fwd",
    "act_bwd",
    "grad_w",
    "grad_b",
    "grad_x",
    "softmax_ce",
    "mse",
    "sgd",
    "adam",
];

struct Layer {
    w: wgpu::Buffer,
    b: wgpu::Buffer,
    gw: wgpu::Buffer,
    gb: wgpu::Buffer,
    s1w: wgpu::Buffer,
    s2w: wgpu::Buffer,
    s1b: wgpu::Buffer,
    s2b: wgpu::Buffer,
    z: wgpu::Buffer,
    a: wgpu::Buffer,
    /// Gradient w.r.t. this layer's activation, then its pre-activation.
    d: wgpu::Buffer,
}

struct Loaded {
    spec: HeadSpec,
    opt: Optimizer,
    t: u32,
    layers: Vec<Layer>,
    x: wgpu::Buffer,
    targets: wgpu::Buffer,
    dout: wgpu::Buffer,
    loss: wgpu::Buffer,
    staging: wgpu::Buffer,
    staging_bytes: u64,
}

/// The GPU backend.
pub struct GpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    layout: wgpu::BindGroupLayout,
    pipelines: Vec<wgpu::ComputePipeline>,
    dummy: wgpu::Buffer,
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

fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::None => 2,
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
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| TrainError::NoGpu(format!("no adapter: {e}")))?;
        let info = adapter.get_info();
        let down = adapter.get_downlevel_capabilities();
        if !down.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
            return Err(TrainError::NoGpu(format!(
                "adapter {} has no compute shaders",
                info.name
            )));
        }
        let limits = adapter.limits();
        let budget_bytes = (limits.max_buffer_size as f64 * memory_fraction) as u64;
        let needed = required_bytes(spec, max_batch);
        if needed > budget_bytes {
            return Err(TrainError::NoGpu(format!(
                "head needs {needed} bytes on the device, over gpu_memory_allocation {memory_fraction} x max_buffer_size {} = {budget_bytes}",
                limits.max_buffer_size
            )));
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("dai-train"),
            // The adapter's own limits: the downlevel defaults allow only
            // four storage buffers per stage and the kernels bind five.
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| TrainError::NoGpu(format!("{}: {e}", info.name)))?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            tracing::error!(?reason, %msg, "GPU device lost");
            flag.store(true, Ordering::SeqCst);
        });
        // wgpu's default handler panics on validation errors; a daemon must
        // not. Record the error; every later call then fails cleanly.
        let flag = lost.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!(error = %e, "GPU error; backend disabled");
            flag.store(true, Ordering::SeqCst);
        }));
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("dai-train kernels"),
            source: wgpu::ShaderSource::Wgsl(include_str!("kernels.wgsl").into()),
        });
        let storage = |binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: false },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("dai-train"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                storage(1),
                storage(2),
                storage(3),
                storage(4),
                storage(5),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("dai-train"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipelines = KERNELS
            .iter()
            .map(|entry| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .collect();
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let adapter_name = format!(
            "wgpu ({}, {:?}, {:?})",
            info.name, info.backend, info.device_type
        );
        tracing::info!(adapter = %adapter_name, "GPU training backend ready");
        Ok(GpuBackend {
            device,
            queue,
            layout,
            pipelines,
            dummy,
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

    fn storage(&self, label: &str, data: &[f32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            })
    }

    fn zeros(&self, label: &str, len: usize) -> wgpu::Buffer {
        self.storage(label, &vec![0.0f32; len.max(4)])
    }

    /// Record one dispatch of kernel `k` with uniforms `u` over `groups`.
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        k: usize,
        u: Uniforms,
        bufs: [Option<&wgpu::Buffer>; 5],
        groups: (u32, u32),
    ) {
        let ub = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("uniforms"),
                contents: bytemuck::bytes_of(&u),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: ub.as_entire_binding(),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.unwrap_or(&self.dummy).as_entire_binding(),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(KERNELS[k]),
            layout: &self.layout,
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(KERNELS[k]),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipelines[k]);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0.max(1), groups.1.max(1), 1);
    }

    fn read(&self, src: &wgpu::Buffer, floats: usize) -> Result<Vec<f32>, TrainError> {
        self.check_alive()?;
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
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

    /// Record the forward pass of `n <= max_batch` rows already in `x`.
    fn record_forward(&self, enc: &mut wgpu::CommandEncoder, n: usize) -> Result<(), TrainError> {
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
        for (i, (layer, spec)) in l.layers.iter().zip(&l.spec.layers).enumerate() {
            let input = if i == 0 { &l.x } else { &l.layers[i - 1].a };
            let mut u = Uniforms::dims(n, spec.inputs, spec.outputs);
            u.act = act_code(spec.activation);
            self.dispatch(
                enc,
                0,
                u,
                [
                    Some(input),
                    Some(&layer.w),
                    Some(&layer.b),
                    Some(&layer.z),
                    Some(&layer.a),
                ],
                ((spec.outputs as u32).div_ceil(8), (n as u32).div_ceil(8)),
            );
        }
        Ok(())
    }

    /// Upload the batch, record forward + loss + backward; returns the encoder.
    fn record_gradients(
        &self,
        x: &[f32],
        y: Targets<'_>,
        n: usize,
    ) -> Result<wgpu::CommandEncoder, TrainError> {
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
        check_batch(&l.spec, x, y, n)?;
        if n > self.max_batch {
            return Err(TrainError::Data(format!(
                "batch of {n} over the GPU backend's {}",
                self.max_batch
            )));
        }
        self.queue.write_buffer(&l.x, 0, bytemuck::cast_slice(x));
        let k = l.spec.outputs();
        match y {
            Targets::Classes(c) => {
                let f: Vec<f32> = c.iter().map(|&c| c as f32).collect();
                self.queue
                    .write_buffer(&l.targets, 0, bytemuck::cast_slice(&f));
            }
            Targets::Values(v) => self
                .queue
                .write_buffer(&l.targets, 0, bytemuck::cast_slice(v)),
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        self.record_forward(&mut enc, n)?;
        let last = l.layers.last().ok_or(TrainError::NotLoaded)?;
        match l.spec.loss {
            Loss::SoftmaxCrossEntropy => self.dispatch(
                &mut enc,
                5,
                Uniforms::dims(n, 0, k),
                [
                    Some(&last.a),
                    Some(&l.targets),
                    Some(&last.d),
                    Some(&l.loss),
                    None,
                ],
                ((n as u32).div_ceil(64), 1),
            ),
            Loss::Mse => self.dispatch(
                &mut enc,
                6,
                Uniforms::dims(n * k, 0, 0),
                [
                    Some(&last.a),
                    Some(&l.targets),
                    Some(&last.d),
                    Some(&l.loss),
                    None,
                ],
                (((n * k) as u32).div_ceil(64), 1),
            ),
        }
        for i in (0..l.layers.len()).rev() {
            let spec = l.spec.layers[i];
            let layer = &l.layers[i];
            let mut u = Uniforms::dims(n * spec.outputs, 0, 0);
            u.act = act_code(spec.activation);
            self.dispatch(
                &mut enc,
                1,
                u,
                [Some(&layer.d), Some(&layer.z), None, None, None],
                (((n * spec.outputs) as u32).div_ceil(64), 1),
            );
            let input = if i == 0 { &l.x } else { &l.layers[i - 1].a };
            let dims = Uniforms::dims(n, spec.inputs, spec.outputs);
            self.dispatch(
                &mut enc,
                2,
                dims,
                [Some(&layer.d), Some(input), Some(&layer.gw), None, None],
                (
                    (spec.inputs as u32).div_ceil(8),
                    (spec.outputs as u32).div_ceil(8),
                ),
            );
            self.dispatch(
                &mut enc,
                3,
                dims,
                [Some(&layer.d), None, Some(&layer.gb), None, None],
                ((spec.outputs as u32).div_ceil(64), 1),
            );
            if i > 0 {
                self.dispatch(
                    &mut enc,
                    4,
                    dims,
                    [
                        Some(&layer.d),
                        Some(&layer.w),
                        Some(&l.layers[i - 1].d),
                        None,
                        None,
                    ],
                    ((spec.inputs as u32).div_ceil(8), (n as u32).div_ceil(8)),
                );
            }
        }
        let _ = &l.dout;
        Ok(enc)
    }

    fn batch_loss(&self, n: usize) -> Result<f32, TrainError> {
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
        let count = match l.spec.loss {
            Loss::SoftmaxCrossEntropy => n,
            Loss::Mse => n * l.spec.outputs(),
        };
        let v = self.read(&l.loss, count)?;
        Ok((v.iter().map(|&x| x as f64).sum::<f64>() / count as f64) as f32)
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
        let mb = self.max_batch;
        let layers = head
            .spec
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
            .collect::<Vec<_>>();
        let k = head.spec.outputs();
        let largest_param = head
            .spec
            .layers
            .iter()
            .map(|l| l.inputs * l.outputs)
            .max()
            .unwrap_or(0);
        let staging_floats = largest_param.max(mb * k).max(mb);
        let staging_bytes = (staging_floats.max(4) * 4) as u64;
        self.loaded = Some(Loaded {
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
        });
        Ok(())
    }

    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError> {
        self.check_alive()?;
        let (inputs, outputs) = {
            let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
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
        while start < n {
            let rows = (n - start).min(self.max_batch);
            let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
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
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
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
        let (t, opt) = (l.t, l.opt);
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
        for (layer, s) in l.layers.iter().zip(&l.spec.layers) {
            for (w, g, s1, s2, count) in [
                (
                    &layer.w,
                    &layer.gw,
                    &layer.s1w,
                    &layer.s2w,
                    s.inputs * s.outputs,
                ),
                (&layer.b, &layer.gb, &layer.s1b, &layer.s2b, s.outputs),
            ] {
                let mut u = Uniforms::dims(count, 0, 0);
                u.lr = opt.lr;
                let groups = ((count as u32).div_ceil(64), 1);
                match opt.kind {
                    OptimizerKind::Sgd { momentum } => {
                        u.b1 = momentum;
                        self.dispatch(
                            &mut enc,
                            7,
                            u,
                            [Some(w), Some(g), Some(s1), None, None],
                            groups,
                        );
                    }
                    OptimizerKind::Adam { beta1, beta2, eps } => {
                        u.b1 = beta1;
                        u.b2 = beta2;
                        u.eps = eps;
                        u.c1 = 1.0 - beta1.powi(t as i32);
                        u.c2 = 1.0 - beta2.powi(t as i32);
                        self.dispatch(
                            &mut enc,
                            8,
                            u,
                            [Some(w), Some(g), Some(s1), Some(s2), None],
                            groups,
                        );
                    }
                }
            }
        }
        self.queue.submit([enc.finish()]);
        self.batch_loss(n)
    }

    fn params(&mut self) -> Result<Params, TrainError> {
        let l = self.loaded.as_ref().ok_or(TrainError::NotLoaded)?;
        let mut p = Params::zeros_like(&l.spec);
        for (i, (layer, s)) in l.layers.iter().zip(&l.spec.layers).enumerate() {
            p.weights[i] = self.read(&layer.w, s.inputs * s.outputs)?;
            p.biases[i] = self.read(&layer.b, s.outputs)?;
        }
        Ok(p)
    }
}
