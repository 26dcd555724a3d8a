//! The CPU backend: dense layers on `matrixmultiply::sgemm` (blocked, SIMD,
//! runtime-detected AVX/FMA/NEON), strides standing in for transposes so no
//! matrix is ever copied. Single-threaded: small heads gain nothing from more
//! threads (measured in docs/benchmarks.md), which also keeps the trainer
//! within `cpu_limit` next to the inference workers.

use crate::optim::{Optimizer, update};
use crate::{Backend, Loss, Targets, TrainError, check_batch};
use dai_head::forward::{Tape, forward_tape, gemm};
use dai_head::{Head, HeadSpec, Params};

/// The CPU backend.
#[derive(Debug, Default)]
pub struct CpuBackend {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    spec: HeadSpec,
    params: Params,
    opt: Optimizer,
    s1: Params,
    s2: Params,
    t: u32,
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend { state: None }
    }
}

/// Mean loss and d loss / d output for the last layer's output `out`.
pub(crate) fn loss_and_grad(
    loss: Loss,
    out: &[f32],
    y: Targets<'_>,
    n: usize,
    k: usize,
) -> (f32, Vec<f32>) {
    let mut grad = vec![0.0f32; n * k];
    let mut total = 0.0f64;
    match (loss, y) {
        (Loss::SoftmaxCrossEntropy, Targets::Classes(c)) => {
            for r in 0..n {
                let row = &out[r * k..(r + 1) * k];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                let lse = max + sum.ln();
                let y = c[r] as usize;
                total += (lse - row[y]) as f64;
                for j in 0..k {
                    let p = (row[j] - lse).exp();
                    grad[r * k + j] = (p - if j == y { 1.0 } else { 0.0 }) / n as f32;
                }
            }
            ((total / n as f64) as f32, grad)
        }
        (Loss::Mse, Targets::Values(t)) => {
            let m = (n * k) as f32;
            for i in 0..n * k {
                let d = out[i] - t[i];
                total += (d * d) as f64;
                grad[i] = 2.0 * d / m;
            }
            ((total / m as f64) as f32, grad)
        }
        // check_batch refuses mismatched loss and targets before this.
        _ => (f32::NAN, grad),
    }
}

fn backward(
    spec: &HeadSpec,
    p: &Params,
    x: &[f32],
    tape: &Tape,
    mut d_out: Vec<f32>,
    n: usize,
) -> Params {
    let mut g = Params::zeros_like(spec);
    for l in (0..spec.layers.len()).rev() {
        let layer = spec.layers[l];
        let (i, o) = (layer.inputs, layer.outputs);
        // dZ = dA * act'(Z)
        for (d, &zv) in d_out.iter_mut().zip(&tape.z[l]) {
            *d *= layer.activation.derivative(zv);
        }
        let input: &[f32] = if l == 0 { x } else { &tape.a[l - 1] };
        // dW (o x i) = dZ^T (o x n) . X (n x i)
        gemm(
            o,
            n,
            i,
            &d_out,
            (1, o as isize),
            input,
            (i as isize, 1),
            0.0,
            &mut g.weights[l],
        );
        for r in 0..n {
            for j in 0..o {
                g.biases[l][j] += d_out[r * o + j];
            }
        }
        if l > 0 {
            // dX (n x i) = dZ (n x o) . W (o x i)
            let mut dx = vec![0.0f32; n * i];
            gemm(
                n,
                o,
                i,
                &d_out,
                (o as isize, 1),
                &p.weights[l],
                (i as isize, 1),
                0.0,
                &mut dx,
            );
            d_out = dx;
        }
    }
    g
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn load(&mut self, head: &Head, opt: &Optimizer) -> Result<(), TrainError> {
        self.state = Some(State {
            spec: head.spec.clone(),
            params: head.params.clone(),
            opt: *opt,
            s1: Params::zeros_like(&head.spec),
            s2: Params::zeros_like(&head.spec),
            t: 0,
        });
        Ok(())
    }

    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError> {
        let s = self.state.as_ref().ok_or(TrainError::NotLoaded)?;
        if x.len() != n * s.spec.inputs() {
            return Err(TrainError::Data(format!(
                "{} values for {n} rows of {}",
                x.len(),
                s.spec.inputs()
            )));
        }
        let mut tape = forward_tape(&s.spec, &s.params, x, n);
        Ok(tape.a.pop().unwrap_or_default())
    }

    fn gradients(
        &mut self,
        x: &[f32],
        y: Targets<'_>,
        n: usize,
    ) -> Result<(f32, Params), TrainError> {
        let s = self.state.as_ref().ok_or(TrainError::NotLoaded)?;
        check_batch(&s.spec, x, y, n)?;
        let tape = forward_tape(&s.spec, &s.params, x, n);
        let out = tape.a.last().map(Vec::as_slice).unwrap_or_default();
        let (loss, d) = loss_and_grad(s.spec.loss, out, y, n, s.spec.outputs());
        Ok((loss, backward(&s.spec, &s.params, x, &tape, d, n)))
    }

    fn step(&mut self, x: &[f32], y: Targets<'_>, n: usize) -> Result<f32, TrainError> {
        let (loss, g) = self.gradients(x, y, n)?;
        let s = self.state.as_mut().ok_or(TrainError::NotLoaded)?;
        s.t += 1;
        for l in 0..s.spec.layers.len() {
            update(
                &s.opt,
                s.t,
                &mut s.params.weights[l],
                &g.weights[l],
                &mut s.s1.weights[l],
                &mut s.s2.weights[l],
            );
            update(
                &s.opt,
                s.t,
                &mut s.params.biases[l],
                &g.biases[l],
                &mut s.s1.biases[l],
                &mut s.s2.biases[l],
            );
        }
        Ok(loss)
    }

    fn params(&mut self) -> Result<Params, TrainError> {
        Ok(self
            .state
            .as_ref()
            .ok_or(TrainError::NotLoaded)?
            .params
            .clone())
    }
}
