//! Window features: what a sensor model sees. The daemon's pipeline and
//! `dai-models train imu` call the same function, so training and serving
//! cannot drift apart.
//!
//! Per channel: mean, standard deviation, RMS and the log energy in four
//! frequency bands (a direct DFT over the window: O(n^2), a few hundred
//! thousand multiply-adds for the usual 256 samples; the configuration caps
//! windows with features at 8192, and the daemon runs it off the HTTP
//! workers).

/// Band edges in Hz: [1, 40), [40, 100), [100, 250), [250, Nyquist].
pub const BANDS_HZ: [f64; 4] = [1.0, 40.0, 100.0, 250.0];
/// Features per channel.
pub const PER_CHANNEL: usize = 3 + BANDS_HZ.len();

/// Features of `window` (samples x channels, row-major: `window[i][c]`)
/// for the channels `channels`, sampled at `rate_hz`.
pub fn window_features(window: &[Vec<f32>], channels: &[usize], rate_hz: f64) -> Vec<f32> {
    let n = window.len();
    let mut out = Vec::with_capacity(channels.len() * PER_CHANNEL);
    for &c in channels {
        let x: Vec<f64> = window
            .iter()
            .map(|s| s.get(c).copied().unwrap_or(0.0) as f64)
            .collect();
        let nf = n.max(1) as f64;
        let mean = x.iter().sum::<f64>() / nf;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / nf;
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / nf).sqrt();
        out.extend([mean as f32, var.sqrt() as f32, rms as f32]);
        // Band energies of the mean-removed signal.
        let mut bands = [0.0f64; BANDS_HZ.len()];
        for k in 1..=n / 2 {
            let f = k as f64 * rate_hz / nf;
            let Some(b) = BANDS_HZ.iter().rposition(|&edge| f >= edge) else {
                continue;
            };
            let w = -2.0 * std::f64::consts::PI * k as f64 / nf;
            let (mut re, mut im) = (0.0, 0.0);
            for (i, v) in x.iter().enumerate() {
                let a = w * i as f64;
                re += (v - mean) * a.cos();
                im += (v - mean) * a.sin();
            }
            bands[b] += (re * re + im * im) / (nf * nf);
        }
        out.extend(bands.iter().map(|e| (e + 1e-6).ln() as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sine_lands_in_its_band_and_moments_are_exact() {
        let rate = 1000.0;
        // 60 Hz sine, amplitude 2, offset 1, on channel 1; channel 0 is zero.
        let w: Vec<Vec<f32>> = (0..250)
            .map(|i| {
                let t = i as f64 / rate;
                vec![
                    0.0,
                    (1.0 + 2.0 * (2.0 * std::f64::consts::PI * 60.0 * t).sin()) as f32,
                ]
            })
            .collect();
        let f = window_features(&w, &[1], rate);
        assert_eq!(f.len(), PER_CHANNEL);
        assert!((f[0] - 1.0).abs() < 1e-3, "mean {}", f[0]);
        assert!((f[1] - 2.0f32.sqrt()).abs() < 1e-3, "std {}", f[1]);
        assert!((f[2] - 3.0f32.sqrt()).abs() < 1e-3, "rms {}", f[2]);
        // Energy: the 40-100 Hz band holds (almost) all of it.
        let e: Vec<f32> = f[3..].to_vec();
        let best = e
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(9, |(i, _)| i);
        assert_eq!(best, 1, "{e:?}");
        assert!(e[1] - e[0] > 5.0 && e[1] - e[2] > 5.0, "{e:?}");
    }
}
