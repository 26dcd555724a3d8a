//! The int8 arithmetic the rewrite uses: symmetric weights with per-channel
//! (or per-tensor) scales, the scale axis of a 2-D weight, and the u8 scale
//! and zero point of a calibrated activation range.

/// Symmetric int8 values of `w` with one scale per index of `axis` (or one
/// for all when `per_channel` is off). Returns (values, scales).
pub(super) fn quantize_weights(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    per_channel: bool,
) -> (Vec<i8>, Vec<f32>) {
    let channels = if per_channel { dims[axis] } else { 1 };
    let inner: usize = dims[axis + 1..].iter().product();
    let chan = |i: usize| {
        if per_channel {
            (i / inner) % dims[axis]
        } else {
            0
        }
    };
    let mut max = vec![0.0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = chan(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[chan(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scales)
}

/// For a 2-D weight, the scale axis (rows or columns) whose int8 copy has
/// the smaller error relative to each value's row and column magnitude.
/// Output channels are the usual choice, but a first layer with input
/// standardisation folded in (imu-anomaly: W / sd) has columns of very
/// different magnitude, and per-row scales zero its small columns.
pub(super) fn best_axis_2d(w: &[f32], dims: &[usize], preferred: usize) -> usize {
    let (r, c) = (dims[0], dims[1]);
    let mut row_max = vec![0.0f32; r];
    let mut col_max = vec![0.0f32; c];
    for i in 0..r {
        for j in 0..c {
            let v = w[i * c + j].abs();
            row_max[i] = row_max[i].max(v);
            col_max[j] = col_max[j].max(v);
        }
    }
    let error = |axis: usize| -> f64 {
        let (q, s) = quantize_weights(w, dims, axis, true);
        let mut e = 0.0f64;
        for i in 0..r {
            for j in 0..c {
                let scale = if axis == 0 { s[i] } else { s[j] };
                let d = (w[i * c + j] - q[i * c + j] as f32 * scale) as f64;
                let (rm, cm) = (row_max[i].max(1e-12) as f64, col_max[j].max(1e-12) as f64);
                e += (d / rm).powi(2) + (d / cm).powi(2);
            }
        }
        e
    };
    let other = 1 - preferred;
    if error(other) < error(preferred) * 0.5 {
        other
    } else {
        preferred
    }
}

/// u8 scale and zero point covering [lo, hi] (which contains 0).
pub(super) fn activation_params(lo: f32, hi: f32) -> (f32, u8) {
    let scale = ((hi - lo) / 255.0).max(1e-8);
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}
