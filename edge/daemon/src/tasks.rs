//! The background tasks, all started here by [`spawn_all`] when the daemon
//! starts serving, and all stopped by one watch channel at shutdown:
//! - hot reload: bundle fingerprints every `hot_reload_interval_sec`; a
//!   reloaded bundle gets its stored trained head back;
//! - resource manager: machine and pool figures every
//!   `resource_interval_sec`, the [`resources`](crate::resources) rules
//!   applied to the pool, alerts recomputed; profiling samples every
//!   `profiling_interval_sec` on the same loop;
//! - store snapshots of the status document every `snapshot_interval_sec`,
//!   and the store's retention ([`dai_store::Retention`]) on the same beat;
//! - the training scheduler ([`crate::training::scheduler`]);
//! - the sensors' sampling threads and pipelines ([`crate::sensors`]);
//! - the cloud uplink ([`crate::uplink`]) when `cloud.enabled`.

use crate::handles::{Inference, StoreHandle};
use crate::http::App;
use crate::resources::{self, Machine};
use crate::training::Training;
use dai_config::Config;
use dai_infer::LoadEvent;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Snapshots kept in the store (the oldest are deleted): a day at the
/// default 60 s period. A snapshot is the status document (a few KiB), so
/// this bounds the table to a few MiB.
pub const SNAPSHOTS_KEPT: usize = 1_440;

/// Start every background task; each ends when `stop` turns true.
pub fn spawn_all(
    app: &Arc<App>,
    uplink: crate::uplink::Uplink,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(hot_reload_task(
            app.config.daemon.hot_reload_interval_sec,
            app.inference.clone(),
            app.store.clone(),
            app.training.clone(),
            stop.clone(),
        )),
        tokio::spawn(resource_task(
            app.config.clone(),
            app.inference.clone(),
            app.machine.clone(),
            stop.clone(),
        )),
        tokio::spawn(snapshot_task(app.clone(), stop.clone())),
        tokio::spawn(crate::training::scheduler::scheduler_task(
            app.training.clone(),
            app.machine.clone(),
            stop.clone(),
        )),
    ];
    tasks.extend(uplink.spawn(stop.clone()));
    tasks.extend(app.sensors.spawn(stop));
    tasks
}

/// Sleep `period`; false when `stop` changed first.
async fn ticker(period: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = stop.changed() => false,
    }
}

async fn hot_reload_task(
    secs: u64,
    inference: Inference,
    store: StoreHandle,
    training: Training,
    mut stop: watch::Receiver<bool>,
) {
    if secs == 0 {
        return;
    }
    while ticker(Duration::from_secs(secs), &mut stop).await {
        let (inf, store, training) = (inference.clone(), store.clone(), training.clone());
        let changed = tokio::task::spawn_blocking(move || {
            let events = inf.runtime.reload_changed();
            for e in &events {
                store.record_load(e);
                // A reloaded bundle starts from its shipped head: serve the
                // store's active trained head for that version again.
                if let LoadEvent::Loaded { name, .. } = e {
                    training.restore_head(name);
                }
            }
            !events.is_empty()
        })
        .await
        .unwrap_or(false);
        if changed {
            inference.refresh_model_info();
        }
    }
}

async fn resource_task(
    config: Arc<Config>,
    inference: Inference,
    machine: Arc<Machine>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sampler = resources::Sampler::new();
    let period = Duration::from_secs(config.daemon.resource_interval_sec);
    let profile_period = Duration::from_secs(config.profiling_interval_sec);
    let mut last_profile = Instant::now();
    // First CPU reading needs a baseline.
    sampler.sample();
    loop {
        let s = sampler.sample();
        *machine.sample.lock() = s;
        record_sample(&inference, &s);
        adapt(&config, &inference, &machine, s);
        *machine.alerts.lock() = resources::alerts(&inference, config.latency_threshold_ms, &s);
        if config.profiling_enabled && last_profile.elapsed() >= profile_period {
            last_profile = Instant::now();
            profile(&inference, &machine);
        }
        if !ticker(period.min(profile_period), &mut stop).await {
            break;
        }
    }
}

/// Machine figures into their gauges.
fn record_sample(inference: &Inference, s: &resources::Sample) {
    let m = &inference.metrics;
    let bytes = |mb: f64| (mb * 1048576.0) as i64;
    if let Some(v) = s.cpu_percent {
        m.cpu_percent.set(v);
    }
    if let Some(v) = s.process_cpu_percent {
        m.process_cpu_percent.set(v);
    }
    if let Some(v) = s.memory_used_mb {
        m.memory_used_bytes.set(bytes(v));
    }
    if let Some(v) = s.memory_total_mb {
        m.memory_total_bytes.set(bytes(v));
    }
    if let Some(v) = s.rss_mb {
        m.rss_bytes.set(bytes(v));
    }
}

/// Apply the resource rules to the pool; each change is a decision.
fn adapt(config: &Config, inference: &Inference, machine: &Machine, sample: resources::Sample) {
    let pool = inference.runtime.pool();
    let obs = resources::Observation {
        sample,
        queue_depth: pool.queue_depth(),
        active_workers: pool.active(),
        max_workers: pool.max_workers(),
        batch_size: pool.batch_size(),
        max_batch_size: config.batch_size,
        p95_ms: inference.stats.overall_p95(),
        latency_threshold_ms: config.latency_threshold_ms,
    };
    let plan = resources::decide_with(&obs, config.daemon.adaptive_workers);
    if let Some(n) = plan.workers {
        pool.set_active(n);
    }
    if let Some(n) = plan.batch_size {
        pool.set_batch_size(n);
    }
    for r in plan.reasons {
        machine.decisions.push(r);
    }
}

/// Mean stage times since the last sample, into gauges and the page.
fn profile(inference: &Inference, machine: &Machine) {
    let models = inference.stats.take_stage_sample();
    for (model, stages) in &models {
        for (stage, ms) in stages {
            inference
                .metrics
                .profile_stage_seconds
                .get_or_create(&crate::metrics::ModelStage {
                    model: model.clone(),
                    stage: stage.to_string(),
                })
                .set(ms / 1e3);
        }
    }
    let mut p = machine.profile.lock();
    p.ts = Some(crate::unix_now());
    if !models.is_empty() {
        p.models = models;
    }
}

/// The status document covers every part, so this task holds the [`App`].
async fn snapshot_task(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(app.config.daemon.snapshot_interval_sec);
    while ticker(period, &mut stop).await {
        let a = app.clone();
        let r = tokio::task::spawn_blocking(move || {
            store_snapshot(&a)?;
            a.store.prune(&dai_store::Retention::default())
        })
        .await;
        match r {
            Ok(Ok(p)) if p.total() > 0 => tracing::debug!(?p, "store pruned"),
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), "metrics snapshot or retention not stored")
            }
            _ => {}
        }
    }
}

/// Store the status document (also at shutdown, after the tasks stopped).
pub fn store_snapshot(app: &App) -> Result<(), dai_store::StoreError> {
    app.store
        .insert_snapshot(&crate::http::status::snapshot(app), SNAPSHOTS_KEPT)
}
