//! Accuracy against privacy (`cargo bench --bench privacy`, written to
//! docs/benchmarks.md): the digits fleet of the robustness benchmark (20
//! devices, Dirichlet 0.3, DAI_BENCH_ROUNDS = 30 rounds, every device in
//! every round), central DP at epsilon 1, 3 and 8 (delta 1e-5, after all
//! rounds, by our RDP accountant: the noise multiplier is solved for) and
//! without DP. Rows: ours (`--dp-noise Z --dp-clip C`, end to end through
//! the intake: clip, equal-weight mean, Gaussian noise) and Flower's
//! DifferentialPrivacyServerSideFixedClipping around FedAvg with the same
//! noise multiplier, clipping norm and client updates
//! (bench/flower_strategies.py). Medians of DAI_BENCH_REPEATS (3) runs:
//! the noise differs from run to run.

mod common;
use common::flower::Flower;
use common::poison::{self, Attack, Ours};
use common::{env_usize, median, repo, write_section};
use dai_cloud::dp::Accountant;
use dai_cloud::state::DpSettings;

const DEVICES: usize = 20;
const DELTA: f64 = 1e-5;

/// The noise multiplier that spends `epsilon` in `rounds` full-fleet rounds.
fn noise_for(epsilon: f64, rounds: u64) -> f64 {
    let eps = |z: f64| {
        let mut a = Accountant::default();
        a.compose(1.0, z, rounds);
        a.epsilon(DELTA).0
    };
    let (mut lo, mut hi) = (0.05, 500.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if eps(mid) > epsilon {
            lo = mid
        } else {
            hi = mid
        }
    }
    hi
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("privacy: bench");
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 30);
    let repeats = env_usize("DAI_BENCH_REPEATS", 3);
    let fleet = poison::fleet(&repo(), DEVICES, 0.3);
    // The clipping norm: the median norm of the first round's honest
    // updates (a public choice made before the run, as DP-FedAvg tunes it).
    let first = poison::submissions(&fleet, &fleet.base, Attack::None, 0, 0, 100.0);
    let mut norms: Vec<f64> = first
        .iter()
        .map(|s| {
            s.tensors
                .iter()
                .flat_map(|t| &t.values)
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    norms.sort_by(f64::total_cmp);
    let clip = norms[norms.len() / 2];
    let mut flower = Flower::start();
    let mut md = format!(
        "Accuracy against privacy: digits, {DEVICES} devices (Dirichlet 0.3), {rounds} rounds, every device in every round; \
         central DP with clipping norm {clip:.3} (the median first-round update norm), delta {DELTA}; epsilon after all rounds \
         by our RDP accountant (sampling rate 1: no amplification claimed), the noise multiplier solved for it. Test accuracy (%), \
         median of {repeats} runs. Command: `cargo bench --bench privacy` (needs `pip install flwr`).\n\n\
         | epsilon | noise multiplier | ours (clip, equal-weight mean, noise) | Flower DifferentialPrivacyServerSideFixedClipping(FedAvg) |\n|---|---|---|---|\n"
    );
    for target in [Some(1.0), Some(3.0), Some(8.0), None] {
        let z = target.map(|e| noise_for(e, rounds as u64));
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for rep in 0..repeats {
            let mut settings = poison::our_defaults(DEVICES);
            settings.dp = z.map(|z| DpSettings {
                noise_multiplier: z,
                clip_norm: clip,
                delta: DELTA,
                target_epsilon: None,
            });
            let mut agg = Ours::new(&fleet.base, settings);
            ours.push(poison::run(
                &fleet,
                Attack::None,
                0,
                rounds,
                100.0,
                |g, s| agg.round(g, s),
            ));
            if let Some(fl) = flower.as_mut() {
                let mut global = fleet.base.clone();
                let mut ok = true;
                for round in 0..rounds {
                    let subs = poison::submissions(&fleet, &global, Attack::None, 0, round, 100.0);
                    let (name, extra) = match z {
                        Some(z) => ("DPFixed", serde_json::json!({"noise": z, "clip": clip})),
                        None => ("FedAvg", serde_json::json!({})),
                    };
                    match fl.round(name, 0, &global, &subs, extra) {
                        Ok(h) => global = h,
                        Err(e) => {
                            eprintln!("flower: {e}");
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    theirs.push(dai_train::accuracy(&global, &fleet.test).expect("accuracy"));
                }
            }
            eprintln!(
                "epsilon {target:?} run {rep}: ours {:?} flower {:?}",
                ours.last(),
                theirs.last()
            );
        }
        let cell = |v: Vec<f64>| {
            if v.is_empty() {
                "not run (flwr missing)".to_string()
            } else {
                format!("{:.1}", median(v) * 100.0)
            }
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            target.map_or("inf (no DP)".into(), |e| format!("{e}")),
            z.map_or("-".into(), |z| format!("{z:.2}")),
            cell(ours),
            cell(theirs)
        ));
    }
    md.push_str("\nWithout DP the rows are our defaults (robust combiner) and Flower's plain FedAvg; with DP ours averages with equal weights (the sensitivity the accountant assumes) and Flower's wrapper weighs by sample count.\n\n");
    print!("{md}");
    write_section("privacy", &md);
}
