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
//! Each change is a [`Decision`] shown on the status page and logged.
//! Alerts (latency, failed models, memory pressure) are recomputed each tick.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

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

/// The rules, as a pure function of one observation.
pub fn decide(o: &Observation) -> Plan {
    let mut plan = Plan::default();
    let cpu = o.sample.cpu_percent.unwrap_or(0.0);
    if o.queue_depth > 2 * o.active_workers && o.active_workers < o.max_workers && cpu < 90.0 {
        let n = o.active_workers + 1;
        plan.workers = Some(n);
        plan.reasons.push(format!(
            "workers {} -> {n}: queue depth {} > 2 x active workers, CPU {cpu:.0} %",
            o.active_workers, o.queue_depth
        ));
    } else if cpu > 90.0 && o.queue_depth == 0 && o.active_workers > 1 {
        let n = o.active_workers - 1;
        plan.workers = Some(n);
        plan.reasons.push(format!(
            "workers {} -> {n}: machine CPU {cpu:.0} % > 90 % and no queue; yielding CPU",
            o.active_workers
        ));
    }
    if let Some(p95) = o.p95_ms {
        if p95 > o.latency_threshold_ms && o.batch_size > 1 {
            let n = (o.batch_size / 2).max(1);
            plan.batch_size = Some(n);
            plan.reasons.push(format!(
                "batch size {} -> {n}: p95 {p95:.1} ms over latency_threshold_ms {}",
                o.batch_size, o.latency_threshold_ms
            ));
        } else if p95 < o.latency_threshold_ms / 2.0
            && o.queue_depth > o.active_workers
            && o.batch_size < o.max_batch_size
        {
            let n = (o.batch_size * 2).min(o.max_batch_size);
            plan.batch_size = Some(n);
            plan.reasons.push(format!(
                "batch size {} -> {n}: backlog of {} with p95 {p95:.1} ms well under {} ms",
                o.batch_size, o.queue_depth, o.latency_threshold_ms
            ));
        }
    }
    plan
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
