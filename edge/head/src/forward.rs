//! The forward pass of a head on the CPU: dense layers on
//! `matrixmultiply::sgemm` (blocked, SIMD, runtime-detected AVX/FMA/NEON),
//! strides standing in for transposes so no matrix is ever copied. Serving
//! calls [`predict`]; the trainer's CPU backend reuses [`gemm`] and
//! [`forward_tape`] for its backward pass.

use crate::{Head, HeadError, HeadSpec, Params};

/// `C (m x n) = alpha * A (m x k) . B (k x n) + beta * C`, row-major C,
/// A and B given by (row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_s: (isize, isize),
    b: &[f32],
    b_s: (isize, isize),
    beta: f32,
    c: &mut [f32],
) {
    // Shapes come from the head spec, never from request input; a mismatch
    // here is a bug, and the slices must cover what the strides address.
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm shapes"
    );
    ffi::sgemm(m, k, n, 1.0, a, a_s, b, b_s, beta, c, (n as isize, 1));
}

mod ffi {
    // The workspace forbids unsafe code; this one call into matrixmultiply
    // is the exception, with every slice length asserted by the caller.
    #[allow(unsafe_code)]
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &[f32],
        (rsa, csa): (isize, isize),
        b: &[f32],
        (rsb, csb): (isize, isize),
        beta: f32,
        c: &mut [f32],
        (rsc, csc): (isize, isize),
    ) {
        // SAFETY: slices are at least m*k, k*n and m*n long (asserted by the
        // caller) and the strides address only those elements.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                beta,
                c.as_mut_ptr(),
                rsc,
                csc,
            );
        }
    }
}

/// Per-layer pre-activations and activations of one forward pass.
pub struct Tape {
    pub z: Vec<Vec<f32>>,
    pub a: Vec<Vec<f32>>,
}

/// Every layer of `spec` on `n` rows of `x`; shapes must already match.
pub fn forward_tape(spec: &HeadSpec, p: &Params, x: &[f32], n: usize) -> Tape {
    let mut z = Vec::with_capacity(spec.layers.len());
    let mut a: Vec<Vec<f32>> = Vec::with_capacity(spec.layers.len());
    for (l, layer) in spec.layers.iter().enumerate() {
        let input: &[f32] = if l == 0 { x } else { &a[l - 1] };
        let (i, o) = (layer.inputs, layer.outputs);
        // Z = X . W^T + b: start C with the bias broadcast, beta = 1.
        let mut zl = Vec::with_capacity(n * o);
        for _ in 0..n {
            zl.extend_from_slice(&p.biases[l]);
        }
        gemm(
            n,
            i,
            o,
            input,
            (i as isize, 1),
            &p.weights[l],
            (1, i as isize),
            1.0,
            &mut zl,
        );
        let al: Vec<f32> = zl.iter().map(|&v| layer.activation.apply(v)).collect();
        z.push(zl);
        a.push(al);
    }
    Tape { z, a }
}

/// Outputs of `head` for every row of `x` (`n x outputs`).
pub fn predict(head: &Head, x: &[f32], n: usize) -> Result<Vec<f32>, HeadError> {
    if x.len() != n * head.spec.inputs() {
        return Err(HeadError::Data(format!(
            "{} values for {n} rows of {}",
            x.len(),
            head.spec.inputs()
        )));
    }
    let mut tape = forward_tape(&head.spec, &head.params, x, n);
    Ok(tape.a.pop().unwrap_or_default())
}
