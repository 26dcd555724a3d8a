//! Differential privacy maths (pure): the Rényi-DP accountant of the
//! (sampled) Gaussian mechanism and the conversion to (epsilon, delta),
//! shared by central DP at the aggregator and local DP on the edge.
//!
//! Central DP (dai-cloud's `state/privacy.rs`, when `--dp-noise` is set,
//! as DP-FedAvg and Flower's `DifferentialPrivacyServerSideFixedClipping`
//! do): every update is clipped to the L2 norm `C`, the round's updates
//! are averaged with equal weights, and Gaussian noise of standard
//! deviation `z * C / n` is added to each coordinate of the average (`n`
//! updates, `z` the noise multiplier). One device changes the sum by at
//! most `C` (add/remove-one adjacency, the round size public), so each
//! round is the Gaussian mechanism with noise multiplier `z`.
//!
//! The accountant composes rounds by adding their RDP at a fixed set of
//! orders and converts with the bound of Canonne, Kamath and Steinke
//! (2020), Proposition 12 — the same orders, formulas and conversion as
//! the `dp-accounting` package (Google), which a test compares against.
//! Devices are not sampled by the aggregator (they send when they have
//! trained), so the rounds are accounted with sampling rate 1: no
//! amplification by sampling is claimed. [`rdp_sampled_gaussian`] takes
//! any rate for when a caller does sample.

/// The orders `dp-accounting` uses by default.
pub fn orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    o.extend((11..64).map(f64::from));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `log(erfc(x))`, accurate where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 {
        return r.ln();
    }
    // The asymptotic series at infinity (as dp-accounting falls back to).
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    for i in 0..=alpha {
        let (i, a) = (i as f64, alpha as f64);
        let coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// Mironov, Talwar and Zhang (2019), section 3.3.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..1000 {
        let i = f64::from(i);
        let coef = log_comb(alpha, i);
        let j = alpha - i;
        let t0 = coef + i * q.ln() + j * log1mq;
        let t1 = coef + j * q.ln() + i * log1mq;
        let e0 = 0.5f64.ln() + log_erfc((i - z0) / s2);
        let e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let s0 = t0 + (i * i - i) / (2.0 * sigma * sigma) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * sigma * sigma) + e1;
        log_a0 = log_add(log_a0, s0);
        log_a1 = log_add(log_a1, s1);
        let total = log_add(log_a0, log_a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        last0 = s0;
        last1 = s1;
    }
    // Did not converge: the order is left out (infinite RDP).
    f64::INFINITY
}

/// RDP at order `alpha` of one step of the Gaussian mechanism with noise
/// multiplier `sigma` on a Poisson sample of rate `q`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The smallest epsilon over `orders` for RDP values `rdp` at `delta`,
/// and the order that gives it.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// RDP composed over rounds, at [`orders`].
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Accountant {
        let orders = orders();
        let rdp = vec![0.0; orders.len()];
        Accountant { orders, rdp }
    }
}

impl Accountant {
    /// Add `steps` rounds of the Gaussian mechanism (noise multiplier
    /// `sigma`, sampling rate `q`).
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_sampled_gaussian(q, sigma, a);
        }
    }

    /// (epsilon, optimal order) at `delta`.
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon(&self.orders, &self.rdp, delta)
    }
}

/// `n` standard normal samples for DP noise: two uniforms in (0, 1] per
/// sample from the OS's CSPRNG (53 random bits each, never 0, so the
/// logarithm stays finite), through [`gaussian`].
pub fn standard_normals(n: usize) -> Result<Vec<f64>, getrandom::Error> {
    let mut bytes = vec![0u8; n * 16];
    getrandom::fill(&mut bytes)?;
    let uniform = |c: &[u8]| {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        ((u64::from_le_bytes(b) >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    Ok(bytes
        .chunks_exact(16)
        .map(|c| gaussian(uniform(&c[..8]), uniform(&c[8..])))
        .collect())
}

/// A standard normal sample (Box-Muller) from two uniforms in (0, 1].
pub fn gaussian(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_batch_gaussian_is_alpha_over_two_sigma_squared() {
        assert_eq!(rdp_sampled_gaussian(1.0, 2.0, 4.0), 0.5);
        assert_eq!(rdp_sampled_gaussian(0.0, 2.0, 4.0), 0.0);
        assert!(rdp_sampled_gaussian(0.5, 0.0, 4.0).is_infinite());
        // Sampling only helps, and the integer and fractional paths agree
        // around an integer order.
        let int = rdp_sampled_gaussian(0.01, 1.0, 8.0);
        let frac = rdp_sampled_gaussian(0.01, 1.0, 8.0 + 1e-9);
        assert!(int < 8.0 / 2.0, "{int}");
        assert!((int - frac).abs() / int < 1e-5, "{int} vs {frac}");
    }

    #[test]
    fn more_rounds_and_less_noise_cost_more_privacy() {
        let eps = |sigma: f64, rounds: u64| {
            let mut a = Accountant::default();
            a.compose(1.0, sigma, rounds);
            a.epsilon(1e-5).0
        };
        assert!(eps(1.0, 10) < eps(1.0, 20));
        assert!(eps(2.0, 10) < eps(1.0, 10));
        assert_eq!(Accountant::default().epsilon(1e-5).0, 0.0);
        // A closed form to check the conversion: for one order alpha the
        // bound is r + log(1 - 1/alpha) - log(delta alpha) / (alpha - 1).
        let (e, a) = epsilon(&[3.0], &[0.5], 1e-5);
        let expect = 0.5 + (1.0f64 - 1.0 / 3.0).ln() - (1e-5f64 * 3.0).ln() / 2.0;
        assert_eq!(a, 3.0);
        assert!((e - expect).abs() < 1e-12);
    }

    #[test]
    fn gaussian_samples_have_unit_variance() {
        // A deterministic grid of uniforms (no RNG in a unit test).
        let n = 400;
        let mut sum = 0.0;
        let mut sq = 0.0;
        for i in 1..=n {
            for j in 0..n {
                let g = gaussian(i as f64 / n as f64, (j as f64 + 0.5) / n as f64);
                sum += g;
                sq += g * g;
            }
        }
        let m = (n * n) as f64;
        assert!((sum / m).abs() < 1e-2, "{}", sum / m);
        assert!((sq / m - 1.0).abs() < 2e-2, "{}", sq / m);
    }
}
