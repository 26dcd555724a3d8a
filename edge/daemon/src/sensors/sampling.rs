//! The sampling thread of one sensor: a drift-free interval, supervised
//! reads, the chart points and the sliding window, windows sent to the
//! sensor's pipeline over a bounded channel (full: dropped and counted).

use super::{CHART_POINTS, LiveViews, Window};
use crate::metrics::{Metrics, SensorKind, SensorLabel};
use dai_sensors::config::SensorConfig;
use dai_sensors::supervise::{Attempt, Backoff, Supervised};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sliding window over a sensor's samples: a window of `window`
/// samples every `hop` samples once it is full.
#[derive(Debug)]
struct Ring {
    window: usize,
    hop: usize,
    buf: VecDeque<Vec<f32>>,
    since_window: usize,
}

impl Ring {
    fn new(window: usize, hop: usize) -> Ring {
        Ring {
            window,
            hop,
            buf: VecDeque::with_capacity(window),
            since_window: 0,
        }
    }

    /// Add one sample; returns a window when one is due.
    fn push(&mut self, v: Vec<f32>) -> Option<Vec<Vec<f32>>> {
        if self.buf.len() == self.window {
            self.buf.pop_front();
        }
        self.buf.push_back(v);
        self.since_window += 1;
        if self.buf.len() == self.window && self.since_window >= self.hop {
            self.since_window = 0;
            Some(self.buf.iter().cloned().collect())
        } else {
            None
        }
    }

    /// A window must not straddle a gap: start over after a fault.
    fn clear(&mut self) {
        self.buf.clear();
        self.since_window = 0;
    }
}

/// What a sampling thread needs.
pub(super) struct Sampling {
    pub(super) cfg: SensorConfig,
    pub(super) live: Arc<LiveViews>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) boot_id: u64,
}

/// A sampling thread's running counts.
struct Counts {
    samples: u64,
    windows: u64,
    overruns: u64,
    published_samples: u64,
    last_publish: Instant,
    failing: bool,
}

impl Sampling {
    pub(super) fn thread(
        self,
        sensor: Box<dyn dai_sensors::Sensor>,
        tx: tokio::sync::mpsc::Sender<Window>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt.block_on(self.run(sensor, tx, stop)),
            Err(e) => {
                tracing::error!(sensor = %self.cfg.name, error = %e, "no runtime for the sampling thread")
            }
        }
    }

    async fn run(
        self,
        sensor: Box<dyn dai_sensors::Sensor>,
        tx: tokio::sync::mpsc::Sender<Window>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let cfg = &self.cfg;
        let labels = SensorLabel {
            sensor: cfg.name.clone(),
            simulated: sensor.simulated().to_string(),
        };
        let mut sup = Supervised::new(
            sensor,
            Backoff::default(),
            Duration::from_millis(cfg.read_deadline_ms),
        );
        let period = Duration::from_secs_f64(1.0 / cfg.rate_hz);
        let decimate = ((cfg.rate_hz / 50.0).round() as u64).max(1);
        let mut iv = tokio::time::interval(period);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut ring = Ring::new(cfg.window, cfg.hop());
        let mut n = Counts {
            samples: 0,
            windows: 0,
            overruns: 0,
            published_samples: 0,
            last_publish: Instant::now(),
            failing: false,
        };
        let samples_metric = self.metrics.sensor_samples.get_or_create(&labels).clone();
        loop {
            let tick = tokio::select! {
                t = iv.tick() => t,
                _ = stop.changed() => break,
            };
            if tick.elapsed() > period {
                n.overruns += 1;
            }
            match sup.attempt(Instant::now()) {
                Attempt::Sample(v) => {
                    if n.failing {
                        tracing::info!(sensor = %cfg.name, "sensor recovered");
                        n.failing = false;
                    }
                    n.samples += 1;
                    samples_metric.inc();
                    if n.samples.is_multiple_of(decimate) {
                        self.chart(started.elapsed().as_secs_f64(), &v);
                    }
                    if let Some(samples) = ring.push(v) {
                        n.windows += 1;
                        self.send(&tx, samples, n.windows);
                    }
                }
                Attempt::Skipped => {}
                Attempt::Failed(e) => {
                    self.fault(&e, &mut n.failing);
                    ring.clear();
                }
            }
            if n.last_publish.elapsed() >= Duration::from_millis(250) {
                self.publish(&sup, &labels, &mut n);
            }
        }
    }

    fn chart(&self, t: f64, v: &[f32]) {
        self.live.with(&self.cfg.name, |l| {
            if l.recent.len() >= CHART_POINTS {
                l.recent.pop_front();
            }
            l.recent.push_back((t, v.to_vec()));
        });
    }

    fn send(&self, tx: &tokio::sync::mpsc::Sender<Window>, samples: Vec<Vec<f32>>, n: u64) {
        let w = Window {
            id: format!("{:x}-{}-{n:x}", self.boot_id, self.cfg.name),
            samples,
            last_sample: Instant::now(),
        };
        if tx.try_send(w).is_err() {
            self.live.with(&self.cfg.name, |l| l.windows_dropped += 1);
        }
    }

    fn fault(&self, e: &dai_sensors::SensorError, failing: &mut bool) {
        self.metrics
            .sensor_faults
            .get_or_create(&SensorKind {
                sensor: self.cfg.name.clone(),
                kind: e.kind().into(),
            })
            .inc();
        if !*failing {
            tracing::warn!(sensor = %self.cfg.name, error = %crate::error::chain(e), "sensor fault; retrying with backoff");
            *failing = true;
        }
    }

    /// Health, rate and counts to the live view and metrics (4 times a second).
    fn publish(&self, sup: &Supervised, labels: &SensorLabel, n: &mut Counts) {
        let dt = n.last_publish.elapsed().as_secs_f64();
        let status = sup.status();
        let healthy = status.health == dai_sensors::supervise::Health::Ok;
        self.metrics
            .sensor_healthy
            .get_or_create(labels)
            .set(i64::from(healthy));
        self.live.with(&self.cfg.name, |l| {
            l.measured_hz = (n.samples - n.published_samples) as f64 / dt;
            l.samples = n.samples;
            l.overruns = n.overruns;
            l.status = Some(status);
        });
        n.published_samples = n.samples;
        n.last_publish = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_windows_every_hop_once_full_and_restarts_after_a_gap() {
        let mut r = Ring::new(4, 2);
        let due: Vec<bool> = (0..8).map(|i| r.push(vec![i as f32]).is_some()).collect();
        assert_eq!(due, [false, false, false, true, false, true, false, true]);
        let mut r = Ring::new(3, 3);
        for i in 0..2 {
            assert!(r.push(vec![i as f32]).is_none());
        }
        assert_eq!(
            r.push(vec![2.0]),
            Some(vec![vec![0.0], vec![1.0], vec![2.0]])
        );
        r.clear();
        assert!(r.push(vec![3.0]).is_none() && r.push(vec![4.0]).is_none());
        assert_eq!(
            r.push(vec![5.0]),
            Some(vec![vec![3.0], vec![4.0], vec![5.0]])
        );
    }
}
