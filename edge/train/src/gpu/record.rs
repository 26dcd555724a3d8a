//! Recording work into command encoders: the forward pass, the loss and
//! its gradient, the backward pass and the optimiser step, plus the batch
//! loss read back. Nothing here submits except through the callers in
//! `mod.rs`, so a training step is one submission.

use super::GpuBackend;
use super::buffers::{Layer, Loaded};
use super::kernels::{Kernel, Uniforms};
use crate::head::Activation;
use crate::optim::OptimizerKind;
use crate::{Loss, Targets, TrainError, check_batch};

/// The activation as the kernels number it.
fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::None => 2,
    }
}

/// Workgroups for `len` elements at 64 per group (1-D kernels).
fn groups_1d(len: usize) -> (u32, u32) {
    ((len as u32).div_ceil(64), 1)
}

/// Workgroups for an `a x b` grid of 8x8 tiles (2-D kernels).
fn groups_2d(a: usize, b: usize) -> (u32, u32) {
    ((a as u32).div_ceil(8), (b as u32).div_ceil(8))
}

/// The input of layer `i`: the batch for the first, else the previous
/// layer's activation.
fn layer_input(l: &Loaded, i: usize) -> &wgpu::Buffer {
    if i == 0 { &l.x } else { &l.layers[i - 1].a }
}

impl GpuBackend {
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        k: Kernel,
        u: Uniforms,
        bufs: [Option<&wgpu::Buffer>; 5],
        groups: (u32, u32),
    ) {
        self.kernels.dispatch(&self.device, enc, k, u, bufs, groups);
    }

    /// Record the forward pass of `n <= max_batch` rows already in `x`.
    pub(super) fn record_forward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        n: usize,
    ) -> Result<(), TrainError> {
        let l = self.loaded()?;
        for (i, (layer, spec)) in l.layers.iter().zip(&l.spec.layers).enumerate() {
            let mut u = Uniforms::dims(n, spec.inputs, spec.outputs);
            u.act = act_code(spec.activation);
            self.dispatch(
                enc,
                Kernel::LinearFwd,
                u,
                [
                    Some(layer_input(l, i)),
                    Some(&layer.w),
                    Some(&layer.b),
                    Some(&layer.z),
                    Some(&layer.a),
                ],
                groups_2d(spec.outputs, n),
            );
        }
        Ok(())
    }

    /// Write the batch and its targets (classes as f32) to the device.
    fn upload_batch(&self, l: &Loaded, x: &[f32], y: Targets<'_>) {
        self.queue.write_buffer(&l.x, 0, bytemuck::cast_slice(x));
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
    }

    /// Per-row losses into `loss`, their gradient into the last layer's `d`.
    fn record_loss(&self, enc: &mut wgpu::CommandEncoder, l: &Loaded, last: &Layer, n: usize) {
        let k = l.spec.outputs();
        let bufs = [
            Some(&last.a),
            Some(&l.targets),
            Some(&last.d),
            Some(&l.loss),
            None,
        ];
        match l.spec.loss {
            Loss::SoftmaxCrossEntropy => self.dispatch(
                enc,
                Kernel::SoftmaxCe,
                Uniforms::dims(n, 0, k),
                bufs,
                groups_1d(n),
            ),
            Loss::Mse => self.dispatch(
                enc,
                Kernel::Mse,
                Uniforms::dims(n * k, 0, 0),
                bufs,
                groups_1d(n * k),
            ),
        }
    }

    /// From the last layer down: through the activation, then weight and
    /// bias gradients, then (but for the first layer) the gradient of the
    /// layer's input into the previous layer's `d`.
    fn record_backward(&self, enc: &mut wgpu::CommandEncoder, l: &Loaded, n: usize) {
        for i in (0..l.layers.len()).rev() {
            let spec = l.spec.layers[i];
            let layer = &l.layers[i];
            let mut u = Uniforms::dims(n * spec.outputs, 0, 0);
            u.act = act_code(spec.activation);
            self.dispatch(
                enc,
                Kernel::ActBwd,
                u,
                [Some(&layer.d), Some(&layer.z), None, None, None],
                groups_1d(n * spec.outputs),
            );
            let dims = Uniforms::dims(n, spec.inputs, spec.outputs);
            self.dispatch(
                enc,
                Kernel::GradW,
                dims,
                [
                    Some(&layer.d),
                    Some(layer_input(l, i)),
                    Some(&layer.gw),
                    None,
                    None,
                ],
                groups_2d(spec.inputs, spec.outputs),
            );
            self.dispatch(
                enc,
                Kernel::GradB,
                dims,
                [Some(&layer.d), None, Some(&layer.gb), None, None],
                groups_1d(spec.outputs),
            );
            if i > 0 {
                self.dispatch(
                    enc,
                    Kernel::GradX,
                    dims,
                    [
                        Some(&layer.d),
                        Some(&layer.w),
                        Some(&l.layers[i - 1].d),
                        None,
                        None,
                    ],
                    groups_2d(spec.inputs, n),
                );
            }
        }
    }

    /// Upload the batch, record forward + loss + backward; returns the encoder.
    pub(super) fn record_gradients(
        &self,
        x: &[f32],
        y: Targets<'_>,
        n: usize,
    ) -> Result<wgpu::CommandEncoder, TrainError> {
        let l = self.loaded()?;
        check_batch(&l.spec, x, y, n)?;
        if n > self.max_batch {
            return Err(TrainError::Data(format!(
                "batch of {n} over the GPU backend's {}",
                self.max_batch
            )));
        }
        self.upload_batch(l, x, y);
        let mut enc = self.device.create_command_encoder(&Default::default());
        self.record_forward(&mut enc, n)?;
        let last = l.layers.last().ok_or(TrainError::NotLoaded)?;
        self.record_loss(&mut enc, l, last, n);
        self.record_backward(&mut enc, l, n);
        let _ = &l.dout;
        Ok(enc)
    }

    /// Record the optimiser update of every weight and bias, at step `t`
    /// (1-based, for Adam's bias correction).
    pub(super) fn record_step(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: u32,
    ) -> Result<(), TrainError> {
        let l = self.loaded()?;
        let opt = l.opt;
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
                let groups = groups_1d(count);
                match opt.kind {
                    OptimizerKind::Sgd { momentum } => {
                        u.b1 = momentum;
                        let bufs = [Some(w), Some(g), Some(s1), None, None];
                        self.dispatch(enc, Kernel::Sgd, u, bufs, groups);
                    }
                    OptimizerKind::Adam { beta1, beta2, eps } => {
                        u.b1 = beta1;
                        u.b2 = beta2;
                        u.eps = eps;
                        u.c1 = 1.0 - beta1.powi(t as i32);
                        u.c2 = 1.0 - beta2.powi(t as i32);
                        let bufs = [Some(w), Some(g), Some(s1), Some(s2), None];
                        self.dispatch(enc, Kernel::Adam, u, bufs, groups);
                    }
                }
            }
        }
        Ok(())
    }

    /// Mean of the per-row (or per-value, for MSE) losses of the last batch.
    pub(super) fn batch_loss(&self, n: usize) -> Result<f32, TrainError> {
        let l = self.loaded()?;
        let count = match l.spec.loss {
            Loss::SoftmaxCrossEntropy => n,
            Loss::Mse => n * l.spec.outputs(),
        };
        let v = self.read(&l.loss, count)?;
        Ok((v.iter().map(|&x| x as f64).sum::<f64>() / count as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workgroups_round_up() {
        assert_eq!(groups_1d(0), (0, 1));
        assert_eq!(groups_1d(64), (1, 1));
        assert_eq!(groups_1d(65), (2, 1));
        assert_eq!(groups_2d(8, 9), (1, 2));
        assert_eq!(groups_2d(17, 1), (3, 1));
    }

    #[test]
    fn activation_codes_match_the_kernels() {
        assert_eq!(act_code(Activation::Relu), 0);
        assert_eq!(act_code(Activation::Gelu), 1);
        assert_eq!(act_code(Activation::None), 2);
    }
}
