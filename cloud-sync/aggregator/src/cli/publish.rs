//! `models publish` and `models bundles`: bundles for the fleet, through
//! the state file a running aggregator reads ([`dai_cloud::publish`]).

use super::*;
use dai_protocol::bundle::Targets;

pub(super) fn publish(
    state: &Path,
    bundle: &Path,
    devices: Vec<String>,
    group: Option<String>,
    wait: u64,
) -> anyhow::Result<()> {
    for d in devices.iter().chain(&group) {
        if !dai_protocol::topics::valid_segment(d) {
            bail!(UsageError(format!(
                "{d:?}: a device or group name is 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
    }
    let mut s = open_state(state)?;
    let targets = Targets {
        devices: devices.clone(),
        group: group.clone(),
    };
    let offer = dai_cloud::publish::publish(&mut s, bundle, targets)
        .with_context(|| format!("publishing {}", bundle.display()))?;
    let to = match (&group, devices.is_empty()) {
        (Some(g), true) => format!("group {g}"),
        (Some(g), false) => format!("group {g} and {}", devices.join(", ")),
        (None, false) => devices.join(", "),
        (None, true) => "the whole fleet".into(),
    };
    println!(
        "{} {} ({} bytes, {} chunks, sha256 {}) offered to {to}; a running aggregator on {} signs and publishes it within a second",
        offer.name,
        offer.version,
        offer.size,
        offer.chunks.len(),
        offer.sha256,
        state.display()
    );
    if wait == 0 || devices.is_empty() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let rows: Vec<_> = s
            .bundle_reports()?
            .into_iter()
            .filter(|r| r.sha256 == offer.sha256)
            .collect();
        let state_of = |d: &str| {
            rows.iter()
                .find(|r| r.device == d)
                .map(|r| r.state.as_str())
        };
        let settled = devices
            .iter()
            .all(|d| matches!(state_of(d), Some("loaded" | "failed")));
        if settled || std::time::Instant::now() >= deadline {
            let mut failed = Vec::new();
            for d in &devices {
                let row = rows.iter().find(|r| &r.device == d);
                let (st, detail) =
                    row.map_or(("no report", ""), |r| (r.state.as_str(), r.detail.as_str()));
                if detail.is_empty() {
                    println!("{d}: {st}");
                } else {
                    println!("{d}: {st} ({detail})");
                }
                if st != "loaded" {
                    failed.push(d.clone());
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            bail!("not loaded on {}", failed.join(", "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(super) fn bundles(state: &Path, json: bool) -> anyhow::Result<()> {
    let s = open_state(state)?;
    let rows = s.bundle_reports()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>10} {:<12} {:<12} {:>11}  detail",
        "bundle", "version", "sha256", "device", "state"
    );
    for r in rows {
        let state = if r.state == "downloading" {
            format!("{}/{}", r.received, r.total)
        } else {
            r.state
        };
        println!(
            "{:<16} {:>10} {:<12} {:<12} {:>11}  {}",
            r.name,
            r.version,
            &r.sha256[..12.min(r.sha256.len())],
            r.device,
            state,
            r.detail
        );
    }
    Ok(())
}

fn open_state(state: &Path) -> anyhow::Result<State> {
    if !state.is_file() {
        bail!(
            "{}: no such state file (pass --state, the file `dai-cloud run` writes)",
            state.display()
        );
    }
    State::open(state).with_context(|| format!("opening {}", state.display()))
}
