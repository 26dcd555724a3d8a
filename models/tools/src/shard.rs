//! `dai-models shard`: split a labelled data set across simulated devices.
//!
//! - IID: a seeded shuffle dealt round-robin;
//! - Dirichlet(alpha): per class, proportions per device drawn from a
//!   symmetric Dirichlet (small alpha = skewed, non-IID);
//! - N labels per device: each device gets samples of only N classes.

use dai_train::Rng;

/// How to split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    Iid,
    Dirichlet { alpha: f64 },
    LabelsPerDevice { n: usize },
}

impl std::str::FromStr for Scheme {
    type Err = String;

    /// `iid`, `dirichlet:ALPHA` (ALPHA > 0) or `labels:N` (N >= 1).
    fn from_str(s: &str) -> Result<Scheme, String> {
        let bad = || {
            format!("scheme {s:?}: expected iid, dirichlet:ALPHA (ALPHA > 0) or labels:N (N >= 1)")
        };
        match s.split_once(':') {
            None if s == "iid" => Ok(Scheme::Iid),
            Some(("dirichlet", a)) => match a.parse::<f64>() {
                Ok(alpha) if alpha > 0.0 && alpha.is_finite() => Ok(Scheme::Dirichlet { alpha }),
                _ => Err(bad()),
            },
            Some(("labels", n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Scheme::LabelsPerDevice { n }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// Gamma(shape, 1) sample (Marsaglia-Tsang; boosted for shape < 1).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = rng.uniform().max(f32::MIN_POSITIVE) as f64;
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // Box-Muller normal.
        let u1 = (rng.uniform() as f64).max(1e-12);
        let u2 = rng.uniform() as f64;
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = (rng.uniform() as f64).max(1e-12);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Indices of `labels` per device (every sample assigned exactly once,
/// except with `LabelsPerDevice`, where classes no device drew are left out).
pub fn shard(labels: &[u32], devices: usize, scheme: Scheme, seed: u64) -> Vec<Vec<usize>> {
    let devices = devices.max(1);
    let mut rng = Rng::new(seed);
    let mut out = vec![Vec::new(); devices];
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    for idx in by_class.iter_mut() {
        rng.shuffle(idx);
    }
    match scheme {
        Scheme::Iid => {
            let mut all: Vec<usize> = (0..labels.len()).collect();
            rng.shuffle(&mut all);
            for (k, i) in all.into_iter().enumerate() {
                out[k % devices].push(i);
            }
        }
        Scheme::Dirichlet { alpha } => {
            for idx in &by_class {
                let g: Vec<f64> = (0..devices)
                    .map(|_| gamma(&mut rng, alpha.max(1e-3)))
                    .collect();
                let total: f64 = g.iter().sum::<f64>().max(1e-12);
                let mut start = 0usize;
                let mut acc = 0.0;
                for (d, w) in g.iter().enumerate() {
                    acc += w / total;
                    let end = if d + 1 == devices {
                        idx.len()
                    } else {
                        ((acc * idx.len() as f64).round() as usize).min(idx.len())
                    };
                    out[d].extend_from_slice(&idx[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
        Scheme::LabelsPerDevice { n } => {
            // Device d takes classes d*n .. d*n+n (mod classes); a class
            // shared by several devices is split evenly among them.
            let mut holders: Vec<Vec<usize>> = vec![Vec::new(); classes];
            for d in 0..devices {
                for j in 0..n.min(classes) {
                    holders[(d * n + j) % classes.max(1)].push(d);
                }
            }
            for (c, idx) in by_class.iter().enumerate() {
                let h = &holders[c];
                if h.is_empty() {
                    continue;
                }
                for (k, &i) in idx.iter().enumerate() {
                    out[h[k % h.len()]].push(i);
                }
            }
        }
    }
    for d in out.iter_mut() {
        rng.shuffle(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        (0..1000).map(|i| (i % 10) as u32).collect()
    }

    fn classes_of(l: &[u32], idx: &[usize]) -> std::collections::BTreeSet<u32> {
        idx.iter().map(|&i| l[i]).collect()
    }

    #[test]
    fn iid_covers_everything_evenly() {
        let l = labels();
        let s = shard(&l, 4, Scheme::Iid, 1);
        assert!(s.iter().all(|d| d.len() == 250));
        let mut all: Vec<usize> = s.concat();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn labels_per_device_limits_classes() {
        let l = labels();
        let s = shard(&l, 5, Scheme::LabelsPerDevice { n: 2 }, 1);
        for d in &s {
            assert_eq!(classes_of(&l, d).len(), 2);
        }
        assert_eq!(s.iter().map(Vec::len).sum::<usize>(), 1000);
    }

    #[test]
    fn small_alpha_dirichlet_is_skewed_and_complete() {
        let l = labels();
        let skewed = shard(&l, 5, Scheme::Dirichlet { alpha: 0.1 }, 3);
        let even = shard(&l, 5, Scheme::Dirichlet { alpha: 100.0 }, 3);
        assert_eq!(skewed.iter().map(Vec::len).sum::<usize>(), 1000);
        assert_eq!(even.iter().map(Vec::len).sum::<usize>(), 1000);
        let mean_classes = |s: &Vec<Vec<usize>>| {
            s.iter().map(|d| classes_of(&l, d).len()).sum::<usize>() as f64 / 5.0
        };
        assert!(
            mean_classes(&skewed) < mean_classes(&even),
            "{} vs {}",
            mean_classes(&skewed),
            mean_classes(&even)
        );
    }
}
