//! The WGSL kernels as pipelines: their entry points, the one bind-group
//! layout they share (uniforms + five storage buffers), the uniform block,
//! and [`Kernels::dispatch`], which records one kernel over a grid.

/// One entry point of `kernels.wgsl`; the discriminant indexes the
/// pipelines, so the order of [`Kernel::ALL`] must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    LinearFwd,
    ActBwd,
    GradW,
    GradB,
    GradX,
    SoftmaxCe,
    Mse,
    Sgd,
    Adam,
}

impl Kernel {
    const ALL: [Kernel; 9] = [
        Kernel::LinearFwd,
        Kernel::ActBwd,
        Kernel::GradW,
        Kernel::GradB,
        Kernel::GradX,
        Kernel::SoftmaxCe,
        Kernel::Mse,
        Kernel::Sgd,
        Kernel::Adam,
    ];

    fn entry(self) -> &'static str {
        match self {
            Kernel::LinearFwd => "linear_fwd",
            Kernel::ActBwd => "act_bwd",
            Kernel::GradW => "grad_w",
            Kernel::GradB => "grad_b",
            Kernel::GradX => "grad_x",
            Kernel::SoftmaxCe => "softmax_ce",
            Kernel::Mse => "mse",
            Kernel::Sgd => "sgd",
            Kernel::Adam => "adam",
        }
    }
}

/// The uniform block every kernel reads (layout shared with the WGSL).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Uniforms {
    pub m: u32,
    pub k: u32,
    pub n: u32,
    pub act: u32,
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub c1: f32,
    pub c2: f32,
    pub pad: [f32; 2],
}

impl Uniforms {
    /// Dimensions only; activation "none" and neutral optimiser terms.
    pub fn dims(m: usize, k: usize, n: usize) -> Uniforms {
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

/// The compiled kernels and what a dispatch binds.
pub(super) struct Kernels {
    layout: wgpu::BindGroupLayout,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// Bound where a kernel takes fewer than five buffers: every binding of
    /// the shared layout must be filled.
    dummy: wgpu::Buffer,
}

impl Kernels {
    /// Compile `kernels.wgsl` and build one pipeline per entry point.
    pub fn new(device: &wgpu::Device) -> Kernels {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("dai-train kernels"),
            source: wgpu::ShaderSource::Wgsl(include_str!("kernels.wgsl").into()),
        });
        let layout = bind_group_layout(device);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("dai-train"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipelines = Kernel::ALL
            .iter()
            .map(|k| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.entry()),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(k.entry()),
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
        Kernels {
            layout,
            pipelines,
            dummy,
        }
    }

    /// Record one dispatch of kernel `k` with uniforms `u` over `groups`.
    pub fn dispatch(
        &self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        k: Kernel,
        u: Uniforms,
        bufs: [Option<&wgpu::Buffer>; 5],
        groups: (u32, u32),
    ) {
        use wgpu::util::DeviceExt;
        let ub = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
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
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.entry()),
            layout: &self.layout,
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(k.entry()),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipelines[k as usize]);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0.max(1), groups.1.max(1), 1);
    }
}

/// Binding 0 the uniforms, 1-5 read-write storage buffers.
fn bind_group_layout(device: &wgpu::Device) -> wgpu::BindGroupLayout {
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
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_order_matches_the_discriminants() {
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{}", k.entry());
        }
    }

    #[test]
    fn uniforms_are_a_16_byte_multiple() {
        // WGSL uniform blocks are 16-byte aligned.
        assert_eq!(std::mem::size_of::<Uniforms>() % 16, 0);
    }
}
