//! Prometheus metrics and the rolling per-model figures of the status page.
//!
//! Two views of the same events: [`Metrics`] holds the Prometheus families
//! (`/metrics`, scraped), [`ModelStats`] keeps a short window of recent
//! latencies per model for live percentiles and throughput (status page,
//! resource manager, alerts).

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStage {
    pub model: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelSource {
    pub model: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelWhen {
    pub model: String,
    pub when: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelVersion {
    pub model: String,
    pub version: String,
    pub state: String,
}

type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SensorLabel {
    pub sensor: String,
    /// "true" for a simulated source.
    pub simulated: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SensorKind {
    pub sensor: String,
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

fn batch_histogram() -> Histogram {
    Histogram::new([
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ])
}

/// The Prometheus families.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<ModelOutcome, Counter>,
    pub request_duration: Family<ModelLabel, Histogram, fn() -> Histogram>,
    pub stage_duration: Family<ModelStage, Histogram, fn() -> Histogram>,
    pub batch_rows: Family<ModelLabel, Histogram, fn() -> Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    pub queue_depth: Gauge,
    pub queue_capacity: Gauge,
    pub active_workers: Gauge,
    pub max_workers: Gauge,
    pub batch_size: Gauge,
    pub cpu_percent: FGauge,
    pub process_cpu_percent: FGauge,
    pub memory_used_bytes: Gauge,
    pub memory_total_bytes: Gauge,
    pub rss_bytes: Gauge,
    pub model_info: Family<ModelVersion, Gauge>,
    pub profile_stage_seconds: Family<ModelStage, FGauge>,
    pub latency_p95_seconds: Family<ModelLabel, FGauge>,
    /// tract plans a model holds (batch sizes x dynamic-axis sizes, bounded).
    pub model_plans: Family<ModelLabel, Gauge>,
    /// Plans built since load (a new size, or one evicted and needed again).
    pub model_plan_builds: Family<ModelLabel, Gauge>,
    pub model_plan_evictions: Family<ModelLabel, Gauge>,
    pub overloaded: Counter,
    pub samples: Family<ModelSource, Counter>,
    pub training_runs: Family<ModelOutcome, Counter>,
    pub training_loss: Family<ModelLabel, FGauge>,
    pub training_val_accuracy: Family<ModelWhen, FGauge>,
    pub training_diverged: Counter,
    /// Local DP: epsilon spent by the noised uploads, per model.
    pub local_dp_epsilon: Family<ModelLabel, FGauge>,
    pub sync_acks: Family<Outcome, Counter>,
    /// Uplink failures by kind: `identity` (the bundle cannot be used),
    /// `connection` (broker unreachable, TLS refused), `ack_refused` (an
    /// ack that is not the aggregator's).
    pub sync_errors: Family<Outcome, Counter>,
    pub sync_globals: Counter,
    /// Globals refused, by model and reason (invalid, older, apply).
    pub sync_globals_refused: Family<ModelOutcome, Counter>,
    pub sensor_samples: Family<SensorLabel, Counter>,
    pub sensor_faults: Family<SensorKind, Counter>,
    pub sensor_healthy: Family<SensorLabel, Gauge>,
    /// Windows classified, by predicted label.
    pub sensor_windows: Family<SensorKind, Counter>,
    pub sensor_events: Family<SensorKind, Counter>,
    pub sensor_events_dropped: Counter,
    pub sensor_latency: Family<SensorLabel, Histogram, fn() -> Histogram>,
    pub outbox_evicted: Counter,
    /// Outbox updates on a retired aggregator epoch, dropped.
    pub outbox_rebased: Counter,
    /// Bundle chunks received from the aggregator and kept.
    pub bundle_chunks: Counter,
    /// Bundles from the aggregator by outcome (`loaded`, `failed`).
    pub bundle_outcomes: Family<Outcome, Counter>,
    /// Corrupt store files moved aside (`dai.sqlite.corrupt-*` in the data
    /// dir, the newest kept).
    pub store_quarantined_files: Gauge,
    /// Evictions already copied from the cache's own counter.
    pub evictions_seen: Mutex<u64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dai_edge");
        let requests = Family::<ModelOutcome, Counter>::default();
        registry.register(
            "requests",
            "Inference requests by model and outcome (ok, cached, bad_request, unknown_model, unavailable, overloaded, error)",
            requests.clone(),
        );
        let request_duration =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "request_duration_seconds",
            "End-to-end inference latency inside the daemon (body received to answer encoded)",
            request_duration.clone(),
        );
        let stage_duration =
            Family::<ModelStage, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "stage_duration_seconds",
            "Per-stage latency (preprocess, queue, infer, postprocess); recorded when profiling_enabled",
            stage_duration.clone(),
        );
        let batch_rows = Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            batch_histogram,
        );
        registry.register(
            "batch_rows",
            "Rows in the batch each request ran in (dynamic batching)",
            batch_rows.clone(),
        );
        let m = Metrics {
            requests,
            request_duration,
            stage_duration,
            batch_rows,
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            active_workers: Gauge::default(),
            max_workers: Gauge::default(),
            batch_size: Gauge::default(),
            cpu_percent: FGauge::default(),
            process_cpu_percent: FGauge::default(),
            memory_used_bytes: Gauge::default(),
            memory_total_bytes: Gauge::default(),
            rss_bytes: Gauge::default(),
            model_info: Family::default(),
            model_plans: Family::default(),
            model_plan_builds: Family::default(),
            model_plan_evictions: Family::default(),
            profile_stage_seconds: Family::default(),
            latency_p95_seconds: Family::default(),
            overloaded: Counter::default(),
            samples: Family::default(),
            training_runs: Family::default(),
            training_loss: Family::default(),
            training_val_accuracy: Family::default(),
            training_diverged: Counter::default(),
            local_dp_epsilon: Family::default(),
            sync_acks: Family::default(),
            sync_errors: Family::default(),
            sync_globals: Counter::default(),
            sync_globals_refused: Family::default(),
            sensor_samples: Family::default(),
            sensor_faults: Family::default(),
            sensor_healthy: Family::default(),
            sensor_windows: Family::default(),
            sensor_events: Family::default(),
            sensor_events_dropped: Counter::default(),
            sensor_latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                ])
            }),
            outbox_evicted: Counter::default(),
            outbox_rebased: Counter::default(),
            bundle_chunks: Counter::default(),
            bundle_outcomes: Family::default(),
            store_quarantined_files: Gauge::default(),
            evictions_seen: Mutex::new(0),
            registry: Registry::default(),
        };
        m.register_pool(&mut registry);
        m.register_machine(&mut registry);
        m.register_models(&mut registry);
        m.register_training(&mut registry);
        m.register_links(&mut registry);
        Metrics { registry, ..m }
    }

    /// Result cache, queues and workers.
    fn register_pool(&self, r: &mut Registry) {
        r.register("cache_hits", "Result cache hits", self.cache_hits.clone());
        r.register(
            "cache_misses",
            "Result cache misses",
            self.cache_misses.clone(),
        );
        r.register(
            "cache_evictions",
            "Result cache evictions",
            self.cache_evictions.clone(),
        );
        r.register(
            "cache_used_bytes",
            "Bytes held by the result cache",
            self.cache_bytes.clone(),
        );
        r.register(
            "cache_entries",
            "Entries in the result cache",
            self.cache_entries.clone(),
        );
        r.register(
            "queue_depth",
            "Requests queued or running on inference workers",
            self.queue_depth.clone(),
        );
        r.register(
            "queue_capacity",
            "Total queue capacity of the inference workers",
            self.queue_capacity.clone(),
        );
        r.register(
            "active_workers",
            "Inference workers currently receiving requests",
            self.active_workers.clone(),
        );
        r.register(
            "max_workers",
            "Inference worker threads started",
            self.max_workers.clone(),
        );
        r.register(
            "batch_size_current",
            "Largest batch the resource manager currently allows",
            self.batch_size.clone(),
        );
    }

    /// Machine and process figures (resource manager).
    fn register_machine(&self, r: &mut Registry) {
        r.register(
            "cpu_usage_percent",
            "Whole-system CPU use, percent of all cores",
            self.cpu_percent.clone(),
        );
        r.register(
            "process_cpu_usage_percent",
            "This daemon's CPU use, percent of one core",
            self.process_cpu_percent.clone(),
        );
        r.register(
            "memory_used_bytes",
            "System memory in use",
            self.memory_used_bytes.clone(),
        );
        r.register(
            "memory_total_bytes",
            "System memory",
            self.memory_total_bytes.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "This daemon's resident set size",
            self.rss_bytes.clone(),
        );
    }

    /// Models: registry, profiling, latency, overload.
    fn register_models(&self, r: &mut Registry) {
        r.register(
            "model_info",
            "Models in the registry (1 per name, version, state)",
            self.model_info.clone(),
        );
        r.register(
            "model_plans",
            "tract plans held per model (batch and dynamic-axis sizes; at most dai_infer::model::MAX_PLANS)",
            self.model_plans.clone(),
        );
        r.register(
            "model_plan_builds",
            "tract plans built per model since it loaded",
            self.model_plan_builds.clone(),
        );
        r.register(
            "model_plan_evictions",
            "tract plans dropped per model (least recently used, over the bound)",
            self.model_plan_evictions.clone(),
        );
        r.register(
            "profile_stage_seconds",
            "Mean stage time over the last profiling interval (profiling_enabled)",
            self.profile_stage_seconds.clone(),
        );
        r.register(
            "latency_p95_seconds",
            "p95 end-to-end latency over the recent window",
            self.latency_p95_seconds.clone(),
        );
        r.register(
            "overloaded",
            "Requests refused with 503 because a queue was full or no large-body permit came free (daemon.max_concurrent_bodies)",
            self.overloaded.clone(),
        );
    }

    /// On-device training.
    fn register_training(&self, r: &mut Registry) {
        r.register(
            "samples",
            "Training samples stored, by model and source (api, feedback)",
            self.samples.clone(),
        );
        r.register(
            "training_runs",
            "Training runs by model and outcome (accepted, rejected, aborted, diverged, failed)",
            self.training_runs.clone(),
        );
        r.register(
            "training_epoch_loss",
            "Mean training loss of the latest epoch",
            self.training_loss.clone(),
        );
        r.register(
            "training_validation_accuracy",
            "Hold-out accuracy before and after the latest completed run",
            self.training_val_accuracy.clone(),
        );
        r.register(
            "training_diverged",
            "Training runs aborted because the loss became NaN or infinite",
            self.training_diverged.clone(),
        );
        r.register(
            "local_dp_epsilon",
            "Local differential privacy: epsilon spent by the noised updates of a model (cloud.local_dp, at its delta)",
            self.local_dp_epsilon.clone(),
        );
    }

    /// Cloud sync and sensors.
    fn register_links(&self, r: &mut Registry) {
        r.register(
            "sync_acks",
            "Outbox updates answered by the aggregator (accepted, rejected, rebase)",
            self.sync_acks.clone(),
        );
        r.register(
            "store_quarantined_files",
            "Corrupt store files moved aside at start (dai.sqlite.corrupt-* kept in the data dir); nonzero means a fresh store was started once",
            self.store_quarantined_files.clone(),
        );
        r.register(
            "bundle_chunks",
            "Chunks of bundles published by the aggregator, received, checked against the signed offer and kept (a resumed download does not fetch its chunks again)",
            self.bundle_chunks.clone(),
        );
        r.register(
            "bundle_outcomes",
            "Bundles published by the aggregator, by outcome: loaded (serving) or failed (refused with a reason, the serving version unchanged)",
            self.bundle_outcomes.clone(),
        );
        r.register(
            "outbox_rebased",
            "Outbox updates dropped because their base is of a retired aggregator epoch (a rebase ack, or a global of a new epoch); their samples stay and train again",
            self.outbox_rebased.clone(),
        );
        r.register(
            "sync_errors",
            "Uplink failures: identity (bundle unusable), connection (broker or TLS), ack_refused",
            self.sync_errors.clone(),
        );
        r.register(
            "sync_globals_adopted",
            "Verified global models adopted",
            self.sync_globals.clone(),
        );
        r.register(
            "sensor_samples",
            "Samples read, per sensor (simulated=\"true\" for simulated sources)",
            self.sensor_samples.clone(),
        );
        r.register(
            "sensor_faults",
            "Sensor faults by kind: nack, timeout, wrong_chip, bus, config",
            self.sensor_faults.clone(),
        );
        r.register(
            "sensor_healthy",
            "1 while the sensor reads normally, 0 while degraded",
            self.sensor_healthy.clone(),
        );
        r.register(
            "sensor_windows",
            "Sensor windows classified, by predicted label",
            self.sensor_windows.clone(),
        );
        r.register(
            "sensor_events",
            "Sensor events queued for MQTT, by label",
            self.sensor_events.clone(),
        );
        r.register(
            "sensor_events_dropped",
            "Sensor events dropped because the uplink queue was full",
            self.sensor_events_dropped.clone(),
        );
        r.register(
            "sensor_latency_seconds",
            "From a window's last sample to its prediction",
            self.sensor_latency.clone(),
        );
        r.register(
            "sync_globals_refused",
            "Global models refused, by reason: invalid (signature, checksum, model), older, apply",
            self.sync_globals_refused.clone(),
        );
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

const WINDOW: Duration = Duration::from_secs(60);
const WINDOW_MAX: usize = 4096;
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Per-stage accumulator for profiling samples.
#[derive(Debug, Default, Clone)]
struct StageAcc {
    sum: BTreeMap<&'static str, f64>,
    count: u64,
}

#[derive(Debug, Default)]
struct One {
    requests: u64,
    errors: u64,
    recent: VecDeque<(Instant, f64)>,
    stages: StageAcc,
    stage_last_ms: BTreeMap<&'static str, f64>,
}

/// Rolling per-model figures.
#[derive(Debug, Default)]
pub struct ModelStats {
    inner: Mutex<HashMap<String, One>>,
}

/// A snapshot for the status page.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ModelFigures {
    pub requests: u64,
    pub errors: u64,
    pub latency_ms: Percentiles,
    pub throughput_rps: f64,
    pub stages_ms: BTreeMap<&'static str, f64>,
}

impl ModelStats {
    pub fn record_ok(&self, model: &str, total: Duration, stages: &[(&'static str, Duration)]) {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let one = map.entry(model.to_string()).or_default();
        one.requests += 1;
        one.recent.push_back((now, total.as_secs_f64() * 1e3));
        while one.recent.len() > WINDOW_MAX
            || one
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            one.recent.pop_front();
        }
        for (stage, d) in stages {
            *one.stages.sum.entry(stage).or_default() += d.as_secs_f64() * 1e3;
        }
        one.stages.count += 1;
    }

    pub fn record_error(&self, model: &str) {
        let mut map = self.inner.lock();
        let one = map.entry(model.to_string()).or_default();
        one.requests += 1;
        one.errors += 1;
    }

    /// Mean stage times since the last call, per model (profiling sample).
    pub fn take_stage_sample(&self) -> BTreeMap<String, BTreeMap<&'static str, f64>> {
        let mut map = self.inner.lock();
        let mut out = BTreeMap::new();
        for (name, one) in map.iter_mut() {
            let acc = std::mem::take(&mut one.stages);
            if acc.count == 0 {
                continue;
            }
            let means: BTreeMap<&'static str, f64> = acc
                .sum
                .iter()
                .map(|(k, v)| (*k, v / acc.count as f64))
                .collect();
            one.stage_last_ms = means.clone();
            out.insert(name.clone(), means);
        }
        out
    }

    pub fn figures(&self, model: &str) -> ModelFigures {
        let now = Instant::now();
        let map = self.inner.lock();
        let Some(one) = map.get(model) else {
            return ModelFigures::default();
        };
        let recent: Vec<f64> = one
            .recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WINDOW)
            .map(|(_, v)| *v)
            .collect();
        let in_rate = one
            .recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .count();
        ModelFigures {
            requests: one.requests,
            errors: one.errors,
            latency_ms: percentiles(recent),
            throughput_rps: in_rate as f64 / RATE_WINDOW.as_secs_f64(),
            stages_ms: one.stage_last_ms.clone(),
        }
    }

    /// p95 over all models' recent requests, milliseconds.
    pub fn overall_p95(&self) -> Option<f64> {
        let now = Instant::now();
        let map = self.inner.lock();
        let all: Vec<f64> = map
            .values()
            .flat_map(|o| o.recent.iter())
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, v)| *v)
            .collect();
        percentiles(all).p95
    }

    pub fn overall_rps(&self) -> f64 {
        let now = Instant::now();
        let map = self.inner.lock();
        let n = map
            .values()
            .flat_map(|o| o.recent.iter())
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .count();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// Nearest-rank percentiles.
pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99), (Some(50.0), Some(95.0), Some(99.0)));
        assert!(percentiles(vec![]).p50.is_none());
    }
}
