//! One round of the demo (each device's next slice of samples to both arms,
//! training, waiting for the new global on every federated edge, accuracy)
//! and the summary after the last.

use super::edges::{Edge, accuracy, post_json, post_samples, training_status};
use super::{Report, RoundRow, Row};
use anyhow::{Context, bail};
use dai_cloud::monitor::{ModelLabel, Monitor};
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};

/// What a round needs: the fleet, its data and the aggregator's counters.
pub(super) struct Ctx<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) fed: &'a [Edge],
    pub(super) alone: &'a [Edge],
    pub(super) shards: &'a [Vec<Row>],
    pub(super) test: &'a [Row],
    pub(super) monitor: &'a Monitor,
    pub(super) rounds: usize,
    pub(super) round_timeout: Duration,
}

fn version_of(m: &Monitor) -> i64 {
    m.global_version
        .get_or_create(&ModelLabel {
            model: "digits".into(),
        })
        .get()
}

/// Round `round`: the table row and each alone device's accuracy.
pub(super) async fn run_round(c: &Ctx<'_>, round: usize) -> anyhow::Result<(RoundRow, Vec<f64>)> {
    let started = Instant::now();
    let bytes_before = c.monitor.update_bytes.get();
    let version_before = version_of(c.monitor);
    let updates = post_and_train(c, round).await?;
    let version = if updates > 0 {
        wait_for_global(c, round, version_before, started).await?
    } else {
        version_before
    };
    let wall = started.elapsed().as_secs_f64();
    let first = c.fed.first().context("no federated device")?;
    let global = accuracy(c.http, first, c.test).await?;
    let mut alone_acc = Vec::new();
    for a in c.alone {
        alone_acc.push(accuracy(c.http, a, c.test).await?);
    }
    let row = RoundRow {
        round,
        updates,
        global_version: version,
        global_accuracy: global,
        alone_accuracy: alone_acc.iter().sum::<f64>() / alone_acc.len() as f64,
        bytes: c.monitor.update_bytes.get() - bytes_before,
        wall_s: wall,
    };
    Ok((row, alone_acc))
}

/// Each device's next slice of its shard to both arms, then a training run
/// on each; returns how many federated runs were accepted (and so uplinked).
async fn post_and_train(c: &Ctx<'_>, round: usize) -> anyhow::Result<u64> {
    let mut jobs = Vec::new();
    for (i, (f, a)) in c.fed.iter().zip(c.alone).enumerate() {
        let s = &c.shards[i];
        let from = s.len() * (round - 1) / c.rounds;
        let to = s.len() * round / c.rounds;
        let slice = &s[from..to];
        let http = c.http;
        jobs.push(async move {
            post_samples(http, f, slice).await?;
            post_samples(http, a, slice).await?;
            let train = |e: &Edge| format!("{}/v1/models/digits/train", e.url);
            let fr = post_json(http, train(f), &json!({})).await;
            let ar = post_json(http, train(a), &json!({})).await;
            anyhow::Ok((fr, ar))
        });
    }
    let mut updates = 0u64;
    for r in futures::future::join_all(jobs).await {
        let (fr, _ar) = r?;
        // A run refused on a device (e.g. too few hold-out rows yet, or no
        // gain on its hold-out) sends nothing this round.
        if let Ok(v) = fr
            && v["run"]["outcome"] == "accepted"
        {
            updates += 1;
        }
    }
    Ok(updates)
}

/// Wait for the aggregator's new global and every edge adopting it.
async fn wait_for_global(
    c: &Ctx<'_>,
    round: usize,
    version_before: i64,
    started: Instant,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + c.round_timeout + Duration::from_secs(30);
    loop {
        let version = version_of(c.monitor);
        let mut adopted = version > version_before;
        if adopted {
            for e in c.fed {
                let t = training_status(c.http, e).await?;
                adopted &=
                    t["global_version"].as_i64() == Some(version) && t["outbox_pending"] == 0;
            }
        }
        if adopted {
            return Ok(version);
        }
        if Instant::now() > deadline {
            bail!(
                "round {round}: no global adopted by every edge within {} s (aggregator at version {version})",
                deadline.duration_since(started).as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) fn print_row(out: &mut impl Write, row: &RoundRow) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:>5} {:>8} {:>7} {:>11.3} {:>14.3} {:>10} {:>7.2}",
        row.round,
        row.updates,
        format!("v{}", row.global_version),
        row.global_accuracy,
        row.alone_accuracy,
        row.bytes,
        row.wall_s
    )?;
    out.flush()?;
    Ok(())
}

/// The closing lines and the report.
pub(super) fn summary(
    out: &mut impl Write,
    table: Vec<(RoundRow, Vec<f64>)>,
    test_rows: usize,
) -> anyhow::Result<Report> {
    let (last, alone_final) = table.last().cloned().context("no rounds")?;
    let report = Report {
        rounds: table.into_iter().map(|(r, _)| r).collect(),
        test_rows,
        global_accuracy: last.global_accuracy,
        alone_accuracy: alone_final.clone(),
    };
    let mean = last.alone_accuracy;
    let (lo, hi) = alone_final
        .iter()
        .fold((1.0f64, 0.0f64), |(l, h), &a| (l.min(a), h.max(a)));
    writeln!(out)?;
    writeln!(
        out,
        "global model (v{}) on {} held-out digits: {:.3}",
        last.global_version, test_rows, last.global_accuracy
    )?;
    writeln!(
        out,
        "devices trained alone on the same shards:  {mean:.3} on average (min {lo:.3}, max {hi:.3})"
    )?;
    writeln!(
        out,
        "federation gain: {:+.1} points",
        (last.global_accuracy - mean) * 100.0
    )?;
    out.flush()?;
    Ok(report)
}
