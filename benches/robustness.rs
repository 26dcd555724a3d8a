//! Poisoning resistance, side by side (`cargo bench --bench robustness`,
//! written to docs/benchmarks.md): digits, 20 devices, Dirichlet 0.3,
//! DAI_BENCH_ROUNDS (30) rounds; attackers at 0/10/20/30 % doing each of
//! sign flip, scaling (just under `--reject-norm`), label flip, sample
//! inflation (label flip claiming 10^15 samples) and "little is enough".
//! Rows: our defaults and our plain FedAvg, both end to end through the
//! aggregator's intake and SQLite state, and Flower's FedAvg, FedMedian,
//! FedTrimmedAvg (beta 0.2), Krum, MultiKrum and Bulyan
//! (bench/flower_strategies.py, PyPI `flwr`) combining the very same
//! client updates each round. Everyone's local training is ours
//! (dai-train, same seeds), so only the aggregation differs.

mod common;
use common::flower::Flower;
use common::poison::{self, Attack, Fleet, Ours};
use common::{env_usize, repo, write_section};

const DEVICES: usize = 20;
const REJECT_NORM: f64 = 100.0;
const FRACTIONS: [usize; 4] = [0, 10, 20, 30];
const FLOWER: [&str; 6] = [
    "FedAvg",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "Bulyan",
];

#[derive(Clone, Copy)]
enum Row {
    OursDefault,
    OursPlain,
    Flower(&'static str),
}

impl Row {
    fn name(self) -> String {
        match self {
            Row::OursDefault => "**ours, defaults**".into(),
            Row::OursPlain => "ours, plain FedAvg".into(),
            Row::Flower(s) => format!("Flower {s}"),
        }
    }
}

/// Accuracy (or why there is none) for one trajectory.
fn trajectory(
    fleet: &Fleet,
    flower: &mut Option<Flower>,
    row: Row,
    attack: Attack,
    attackers: usize,
    rounds: usize,
) -> Result<f64, String> {
    match row {
        Row::OursDefault | Row::OursPlain => {
            let settings = match row {
                Row::OursDefault => poison::our_defaults(DEVICES),
                _ => poison::plain_fedavg(DEVICES),
            };
            let mut ours = Ours::new(&fleet.base, settings);
            Ok(poison::run(
                fleet,
                attack,
                attackers,
                rounds,
                REJECT_NORM,
                |g, s| ours.round(g, s),
            ))
        }
        Row::Flower(strategy) => {
            let fl = flower.as_mut().ok_or("flwr not installed")?;
            let mut global = fleet.base.clone();
            for round in 0..rounds {
                let subs =
                    poison::submissions(fleet, &global, attack, attackers, round, REJECT_NORM);
                global = fl.round(strategy, attackers, &global, &subs, serde_json::json!({}))?;
            }
            Ok(dai_train::accuracy(&global, &fleet.test).expect("accuracy"))
        }
    }
}

fn cell(r: &Result<f64, String>) -> String {
    match r {
        Ok(a) => format!("{:.1}", a * 100.0),
        Err(e) if e.contains("4 * num_malicious") => "n/a (needs n >= 4f+3)".into(),
        Err(e) => format!("error: {}", e.chars().take(40).collect::<String>()),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("robustness: bench");
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 30);
    let fleet = poison::fleet(&repo(), DEVICES, 0.3);
    let mut flower = Flower::start();
    let mut rows = vec![Row::OursDefault, Row::OursPlain];
    rows.extend(FLOWER.iter().map(|s| Row::Flower(s)));
    // clean[row] and results[attack][row][fraction index]
    let mut clean = Vec::new();
    for &row in &rows {
        let r = trajectory(&fleet, &mut flower, row, Attack::None, 0, rounds);
        eprintln!("{}: clean {}", row.name(), cell(&r));
        clean.push(r);
    }
    let mut md = format!(
        "Poisoning resistance: digits, {DEVICES} devices, Dirichlet 0.3, {rounds} rounds of {} local epochs \
         (batch {}, Adam {}); test accuracy (%) of the final global. Attackers are the first devices; \
         the same client updates go to every combiner each round. Command: `cargo bench --bench robustness` \
         (DAI_BENCH_ROUNDS={rounds}; needs `pip install flwr`).\n\n",
        poison::EPOCHS,
        poison::BATCH,
        poison::LR
    );
    let mut summary = Vec::new();
    for attack in Attack::ALL {
        md.push_str(&format!(
            "**{}**\n\n| combiner | 0 % | 10 % | 20 % | 30 % |\n|---|---|---|---|---|\n",
            attack.name()
        ));
        let mut at30: Vec<(Row, Result<f64, String>)> = Vec::new();
        for (i, &row) in rows.iter().enumerate() {
            let mut cells = vec![cell(&clean[i])];
            for pct in &FRACTIONS[1..] {
                let attackers = DEVICES * pct / 100;
                let r = trajectory(&fleet, &mut flower, row, attack, attackers, rounds);
                eprintln!(
                    "{}: {} at {pct} % -> {}",
                    row.name(),
                    attack.name(),
                    cell(&r)
                );
                if *pct == 20
                    && matches!(row, Row::OursDefault)
                    && let (Ok(a), Ok(c)) = (&r, &clean[i])
                {
                    summary.push((attack, (c - a) * 100.0));
                }
                cells.push(cell(&r));
                if *pct == 30 {
                    at30.push((row, r));
                }
            }
            md.push_str(&format!("| {} | {} |\n", row.name(), cells.join(" | ")));
        }
        let ours30 = at30[0].1.as_ref().ok().copied().unwrap_or(f64::NAN);
        let beaten: Vec<String> = at30
            .iter()
            .filter(|(r, _)| matches!(r, Row::Flower(_)))
            .filter(|(_, a)| a.as_ref().is_ok_and(|a| *a >= ours30))
            .map(|(r, _)| r.name())
            .collect();
        md.push_str(&format!(
            "\nAt 30 %: {}.\n\n",
            if beaten.is_empty() {
                "our defaults beat every Flower strategy that runs".to_string()
            } else {
                format!("NOT MET, at or above our defaults: {}", beaten.join(", "))
            }
        ));
    }
    md.push_str("Target: our defaults within 2 points of the clean run at 20 % attackers for every attack.\n\n| attack | drop at 20 % (points) | met |\n|---|---|---|\n");
    for (attack, drop) in summary {
        md.push_str(&format!(
            "| {} | {drop:.1} | {} |\n",
            attack.name(),
            if drop <= 2.0 { "yes" } else { "**no**" }
        ));
    }
    md.push('\n');
    print!("{md}");
    write_section("robustness", &md);
}
