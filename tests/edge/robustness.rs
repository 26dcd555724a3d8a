//! The poisoning benchmark's short form (`cargo bench --bench robustness`
//! is the long one): with `dai-cloud run`'s default flags, 20 digits
//! devices (Dirichlet 0.3) and 4 of them (20 %) hostile, each attack keeps
//! the global's test accuracy within the margin of the clean run after
//! ROUNDS rounds, end to end through the aggregator's intake and SQLite
//! state. Plain FedAvg on the same updates is the control: the attacks
//! are strong enough to hurt it.

#[path = "../../benches/common/poison.rs"]
mod poison;

use crate::support::*;
use poison::{Attack, Ours};

const DEVICES: usize = 20;
const ATTACKERS: usize = 4;
const ROUNDS: usize = 30;
/// Points of accuracy the defaults may lose to 20 % attackers.
const MARGIN: f64 = 0.02;

#[test]
fn the_default_flags_hold_every_attack_at_20_percent() {
    ensure_zoo();
    let fleet = poison::fleet(&repo(), DEVICES, 0.3);
    let run = |attack: Attack, attackers: usize, plain: bool| {
        let settings = if plain {
            poison::plain_fedavg(DEVICES)
        } else {
            poison::our_defaults(DEVICES)
        };
        let reject = settings.reject_norm;
        let mut ours = Ours::new(&fleet.base, settings);
        poison::run(&fleet, attack, attackers, ROUNDS, reject, |g, s| {
            ours.round(g, s)
        })
    };
    let clean = run(Attack::None, 0, false);
    let plain_clean = run(Attack::None, 0, true);
    eprintln!("clean: defaults {clean:.3}, plain FedAvg {plain_clean:.3}");
    let mut failures = Vec::new();
    let mut worst_plain = plain_clean;
    for attack in Attack::ALL {
        let ours = run(attack, ATTACKERS, false);
        let plain = run(attack, ATTACKERS, true);
        eprintln!(
            "{}: defaults {ours:.3}, plain FedAvg {plain:.3}",
            attack.name()
        );
        worst_plain = worst_plain.min(plain);
        if ours < clean - MARGIN {
            failures.push(format!("{}: {ours:.3} vs clean {clean:.3}", attack.name()));
        }
    }
    assert!(
        failures.is_empty(),
        "defaults lost more than {MARGIN}: {failures:?}"
    );
    // The control: these attacks break plain FedAvg.
    assert!(
        worst_plain < plain_clean - 0.10,
        "the attacks did not hurt plain FedAvg ({worst_plain:.3} vs {plain_clean:.3}): the test proves nothing"
    );
}
