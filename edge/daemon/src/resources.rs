//! The resource manager: watches CPU, memory and queues, and adapts.
//!
//! Every `resource_interval_sec` it samples the machine (sysinfo) and the
//! inference pool, then applies a few rules within the configured limits:
//! - backlog (queue deeper than twice the active workers) and CPU headroom:
//!   one more active worker, up to the workers `cpu_limit` allows;
//! - machine CPU above 90 % with an empty queue: one fewer worker, so the
//!   daemon yields to whatever else the device runs;
//! - p95 above `latency_threshold_ms`: halve the batch size (smaller
//!   batches finish sooner); p95 under half the threshold with a backlog:
//!   double it, never above `batch_size`.
//!
//! With `daemon.adaptive_workers: false` the worker rules are off (every
//! worker stays active) and only the batch size adapts.
//!
//! Each change is a [`Decision`] shown on the status page and logged.
//! Alerts (latency, failed models, memory pressure) are recomputed each tick.
//! The rules are pure functions of an [`Observation`]; the task that
//! samples and applies them is `tasks::resource_task`, and what it last saw
//! and did is kept in [`Machine`] for the status document and the training
//! scheduler.

use crate::handles::Inference;
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Machine CPU above which the daemon yields a worker, and below which it
/// may add one, percent.
const BUSY_CPU_PERCENT: f64 = 90.0;

/// The latest profiling sample.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProfileSample {
    pub ts: Option<f64>,
    pub models: BTreeMap<String, BTreeMap<&'static str, f64>>,
}

/// What the resource manager last saw and did: written by its task, read
/// by the status document and the training scheduler (machine CPU).
#[derive(Debug, Default)]
pub struct Machine {
    pub sample: Mutex<Sample>,
    pub decisions: DecisionLog,
    pub alerts: Mutex<Vec<Alert>>,
    pub profile: Mutex<ProfileSample>,
}

impl Machine {
    /// Machine CPU of the latest sample, percent (0 when unknown).
    pub fn cpu_percent(&self) -> f64 {
        self.sample.lock().cpu_percent.unwrap_or(0.0)
    }
}

/// One change the resource manager made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub ts: f64,
    pub message: String,
}

/// An operator-facing alert.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    pub level: &'static str,
    pub message: String,
}

/// The latest machine sample.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    pub cpu_percent: Option<f64>,
    pub process_cpu_percent: Option<f64>,
    pub memory_used_mb: Option<f64>,
    pub memory_total_mb: Option<f64>,
    pub memory_available_mb: Option<f64>,
    pub rss_mb: Option<f64>,
}

/// Sampler over sysinfo (absent when the platform gives nothing).
pub struct Sampler {
    sys: Option<System>,
    pid: Option<Pid>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("pid", &self.pid).finish()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        let sys = System::new()
            .map_err(|e| tracing::warn!(error = %e, "sysinfo unavailable: no resource figures"))
            .ok();
        Sampler {
            sys,
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    pub fn sample(&mut self) -> Sample {
        let Some(sys) = self.sys.as_mut() else {
            return Sample::default();
        };
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = Sample {
            cpu_percent: Some(sys.global_cpu_usage() as f64),
            memory_used_mb: Some(mb(sys.used_memory())),
            memory_total_mb: Some(mb(sys.total_memory())),
            memory_available_mb: Some(mb(sys.available_memory())),
            ..Default::default()
        };
        if let Some(pid) = self.pid {
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            if let Some(p) = sys.process(pid) {
                s.rss_mb = Some(mb(p.memory()));
                s.process_cpu_percent = Some(p.cpu_usage() as f64);
            }
        }
        s
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

/// What the manager looks at each tick.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub sample: Sample,
    pub queue_depth: usize,
    pub active_workers: usize,
    pub max_workers: usize,
    pub batch_size: usize,
    pub max_batch_size: usize,
    pub p95_ms: Option<f64>,
    pub latency_threshold_ms: f64,
}

/// What to change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub reasons: Vec<String>,
}

/// The rules, as a pure function of one observation (workers adaptive).
pub fn decide(o: &Observation) -> Plan {
    decide_with(o, true)
}

/// The rules; `adaptive_workers` false (`daemon.adaptive_workers`) leaves
/// the worker count alone.
pub fn decide_with(o: &Observation, adaptive_workers: bool) -> Plan {
    let mut plan = Plan::default();
    if adaptive_workers && let Some((n, reason)) = worker_rule(o) {
        plan.workers = Some(n);
        plan.reasons.push(reason);
    }
    if let Some((n, reason)) = batch_rule(o) {
        plan.batch_size = Some(n);
        plan.reasons.push(reason);
    }
    plan
}

/// The worker count rule: one more under a backlog with CPU headroom, one
/// fewer (yield) when the machine is busy and nothing is queued. Returns
/// the new count and why.
pub fn worker_rule(o: &Observation) -> Option<(usize, String)> {
    let cpu = o.sample.cpu_percent.unwrap_or(0.0);
    if o.queue_depth > 2 * o.active_workers
        && o.active_workers < o.max_workers
        && cpu < BUSY_CPU_PERCENT
    {
        let n = o.active_workers + 1;
        Some((
            n,
            format!(
                "workers {} -> {n}: queue depth {} > 2 x active workers, CPU {cpu:.0} %",
                o.active_workers, o.queue_depth
            ),
        ))
    } else if cpu > BUSY_CPU_PERCENT && o.queue_depth == 0 && o.active_workers > 1 {
        let n = o.active_workers - 1;
        Some((
            n,
            format!(
                "workers {} -> {n}: machine CPU {cpu:.0} % > 90 % and no queue; yielding CPU",
                o.active_workers
            ),
        ))
    } else {
        None
    }
}

/// The batch size rule: halve it while p95 is over the threshold, double it
/// (up to `max_batch_size`) under a backlog while p95 is well under it.
pub fn batch_rule(o: &Observation) -> Option<(usize, String)> {
    let p95 = o.p95_ms?;
    if p95 > o.latency_threshold_ms && o.batch_size > 1 {
        let n = (o.batch_size / 2).max(1);
        Some((
            n,
            format!(
                "batch size {} -> {n}: p95 {p95:.1} ms over latency_threshold_ms {}",
                o.batch_size, o.latency_threshold_ms
            ),
        ))
    } else if p95 < o.latency_threshold_ms / 2.0
        && o.queue_depth > o.active_workers
        && o.batch_size < o.max_batch_size
    {
        let n = (o.batch_size * 2).min(o.max_batch_size);
        Some((
            n,
            format!(
                "batch size {} -> {n}: backlog of {} with p95 {p95:.1} ms well under {} ms",
                o.batch_size, o.queue_depth, o.latency_threshold_ms
            ),
        ))
    } else {
        None
    }
}

/// Operator alerts: failed or stale models, p95 over the threshold, memory
/// pressure. Recomputed by the resource manager each tick.
pub fn alerts(inference: &Inference, latency_threshold_ms: f64, sample: &Sample) -> Vec<Alert> {
    let mut out = Vec::new();
    let threshold = latency_threshold_ms;
    for m in inference.runtime.models() {
        if m.model.is_none() {
            out.push(Alert {
                level: "error",
                message: format!(
                    "{} failed to load: {}",
                    m.name,
                    m.error.clone().unwrap_or_default()
                ),
            });
            continue;
        }
        if let Some(e) = &m.error {
            out.push(Alert {
                level: "warning",
                message: format!(
                    "{}: reload failed, previous version still serving: {e}",
                    m.name
                ),
            });
        }
        if let Some(p95) = inference.stats.figures(&m.name).latency_ms.p95
            && p95 > threshold
        {
            out.push(Alert {
                level: "warning",
                message: format!(
                    "{} p95 {p95:.1} ms exceeds latency_threshold_ms {threshold}",
                    m.name
                ),
            });
        }
    }
    if let (Some(avail), Some(total)) = (sample.memory_available_mb, sample.memory_total_mb)
        && total > 0.0
        && avail / total < 0.1
    {
        out.push(Alert {
            level: "warning",
            message: format!("memory pressure: {avail:.0} of {total:.0} MiB available"),
        });
    }
    out
}

/// Recent decisions, newest last, bounded.
#[derive(Debug, Default)]
pub struct DecisionLog {
    items: Mutex<VecDeque<Decision>>,
}

impl DecisionLog {
    const KEEP: usize = 50;

    pub fn push(&self, message: String) {
        tracing::info!(target: "dai_edge::resources", "{message}");
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut items = self.items.lock();
        items.push_back(Decision { ts, message });
        while items.len() > Self::KEEP {
            items.pop_front();
        }
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Decision> {
        self.items.lock().iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs() -> Observation {
        Observation {
            sample: Sample {
                cpu_percent: Some(30.0),
                ..Default::default()
            },
            queue_depth: 0,
            active_workers: 1,
            max_workers: 2,
            batch_size: 8,
            max_batch_size: 8,
            p95_ms: Some(5.0),
            latency_threshold_ms: 100.0,
        }
    }

    #[test]
    fn steady_state_changes_nothing() {
        assert_eq!(decide(&obs()), Plan::default());
    }

    #[test]
    fn backlog_adds_a_worker_within_limits() {
        let p = decide(&Observation {
            queue_depth: 5,
            ..obs()
        });
        assert_eq!(p.workers, Some(2));
        let p = decide(&Observation {
            queue_depth: 5,
            active_workers: 2,
            ..obs()
        });
        assert_eq!(p.workers, None, "already at max_workers");
    }

    #[test]
    fn busy_machine_sheds_a_worker() {
        let mut o = obs();
        o.active_workers = 2;
        o.sample.cpu_percent = Some(97.0);
        assert_eq!(decide(&o).workers, Some(1));
    }

    #[test]
    fn worker_rule_yields_only_on_a_busy_machine_with_no_queue() {
        let busy = |cpu: f64, queue: usize, active: usize| {
            let mut o = obs();
            o.sample.cpu_percent = Some(cpu);
            o.queue_depth = queue;
            o.active_workers = active;
            worker_rule(&o).map(|(n, _)| n)
        };
        assert_eq!(busy(95.0, 0, 2), Some(1), "busy, nothing queued: yield");
        assert_eq!(busy(95.0, 1, 2), None, "requests queued: keep serving");
        assert_eq!(busy(95.0, 0, 1), None, "never below one worker");
        assert_eq!(busy(90.0, 0, 2), None, "90 % is not above 90 %");
        assert_eq!(busy(50.0, 5, 1), Some(2), "backlog with headroom: add");
        assert_eq!(busy(95.0, 5, 1), None, "backlog on a busy machine: no add");
        assert_eq!(busy(50.0, 0, 2), None, "steady");
    }

    #[test]
    fn fixed_workers_keep_the_count_and_still_adapt_the_batch() {
        let o = Observation {
            sample: Sample {
                cpu_percent: Some(99.0),
                ..Default::default()
            },
            active_workers: 2,
            p95_ms: Some(150.0),
            ..obs()
        };
        assert_eq!(decide_with(&o, true).workers, Some(1));
        let fixed = decide_with(&o, false);
        assert_eq!(fixed.workers, None);
        assert_eq!(fixed.batch_size, Some(4));
        assert_eq!(fixed.reasons.len(), 1, "{:?}", fixed.reasons);
        let backlog = Observation {
            queue_depth: 9,
            sample: Sample {
                cpu_percent: Some(10.0),
                ..Default::default()
            },
            active_workers: 1,
            ..obs()
        };
        assert_eq!(decide_with(&backlog, false).workers, None);
    }

    #[test]
    fn slow_p95_halves_batch_and_fast_backlog_doubles_it() {
        let p = decide(&Observation {
            p95_ms: Some(150.0),
            ..obs()
        });
        assert_eq!(p.batch_size, Some(4));
        let p = decide(&Observation {
            batch_size: 2,
            queue_depth: 3,
            active_workers: 2,
            ..obs()
        });
        assert_eq!(p.batch_size, Some(4));
        assert!(p.reasons.iter().any(|r| r.contains("batch size 2 -> 4")));
    }
}
