//! Sensor pipelines: `sensors:` entries of the configuration, each sampled
//! on a thread of its own and fed to the runtime window by window.
//!
//! ```text
//! sampling thread (one per sensor, a current-thread tokio runtime):
//!   interval(1 / rate_hz), drift-free (ticks at start + n * period; a tick
//!   that fires late is counted as an overrun, and the ticks it overlapped
//!   are skipped rather than bunched)
//!   -> Supervised::attempt (faults classified, counted, backoff, re-init)
//!   -> ring buffer; every `hop` samples once `window` are there: a window
//!   -> bounded channel (full: the window is dropped and counted)
//! pipeline task (the daemon's runtime):
//!   window -> features (dai_sensors::features) or the raw window
//!   -> Runtime::infer(model) -> prediction (live view, metrics, latency
//!      from the window's last sample to the prediction)
//!   -> feedback cache under the window id (POST /v1/feedback {id, label})
//!   -> label rules -> training samples
//!   -> an MQTT event (rate-limited) queued for the uplink
//! ```
//!
//! A sensor that fails while running is marked degraded on the page and in
//! metrics and keeps being retried; one whose configuration cannot be built
//! (e.g. its bus does not exist) is shown failed with `healthy` 0 until the
//! daemon is restarted. The daemon and the other sensors keep running.
//!
//! The [`Sensors`] handle holds what the pipelines need (the inference
//! handle, the training handle for feedback and rule samples, the live
//! views) and is spawned by `tasks`; the status document reads
//! [`Sensors::snapshot`], and the uplink drains the [`EventQueue`].

mod pipeline;
mod sampling;

use crate::handles::Inference;
use crate::metrics::{SensorKind, SensorLabel};
use crate::training::Training;
use dai_sensors::config::{Part, SensorConfig, Source};
use dai_sensors::supervise::SensorStatus;
use parking_lot::Mutex;
use pipeline::Pipeline;
use sampling::Sampling;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Chart points kept per sensor (decimated to about 50 per second).
const CHART_POINTS: usize = 250;
/// Predictions kept per sensor for the page.
const PREDICTIONS: usize = 30;
/// Events waiting for the uplink; the oldest are dropped beyond this.
pub const EVENT_QUEUE: usize = 1000;
/// Windows waiting for inference per sensor.
const WINDOW_QUEUE: usize = 8;

/// One window on its way to the model.
struct Window {
    id: String,
    samples: Vec<Vec<f32>>,
    last_sample: Instant,
}

/// A prediction, for the page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub id: String,
    pub ts: f64,
    pub label: String,
    pub probability: f32,
    pub latency_ms: f64,
}

/// What the page shows about one sensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SensorLive {
    pub name: String,
    pub part: &'static str,
    pub simulated: bool,
    pub source: String,
    pub rate_hz: f64,
    pub channels: Vec<&'static str>,
    pub model: Option<String>,
    pub status: Option<SensorStatus>,
    pub samples: u64,
    pub overruns: u64,
    pub windows: u64,
    pub windows_dropped: u64,
    pub events: u64,
    pub events_suppressed: u64,
    pub rule_samples: u64,
    pub model_error: Option<String>,
    /// (seconds since start, values) for the chart.
    pub recent: VecDeque<(f64, Vec<f32>)>,
    pub predictions: VecDeque<Prediction>,
    /// Measured sampling rate over the last second.
    pub measured_hz: f64,
}

/// Events for the uplink (JSON), oldest first, at most [`EVENT_QUEUE`]:
/// beyond that the oldest are dropped and counted. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct EventQueue(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl EventQueue {
    /// Queue one event; true when an older one was dropped for it.
    fn push(&self, event: Vec<u8>) -> bool {
        let mut q = self.0.lock();
        let dropped = q.len() >= EVENT_QUEUE;
        if dropped {
            q.pop_front();
        }
        q.push_back(event);
        dropped
    }

    /// Take up to `max` of the oldest events.
    pub fn drain(&self, max: usize) -> Vec<Vec<u8>> {
        let mut q = self.0.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }
}

/// Every sensor's live view: written by its sampling thread and its
/// pipeline, read by the status document.
#[derive(Debug, Default)]
struct LiveViews(Mutex<Vec<SensorLive>>);

impl LiveViews {
    fn with<R>(&self, name: &str, f: impl FnOnce(&mut SensorLive) -> R) -> Option<R> {
        self.0.lock().iter_mut().find(|s| s.name == name).map(f)
    }
}

/// The sensor side of the daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sensors {
    configs: Arc<Vec<SensorConfig>>,
    /// `cloud.enabled`: only then are events made for the uplink.
    cloud_enabled: bool,
    boot_id: u64,
    inference: Inference,
    training: Training,
    live: Arc<LiveViews>,
    events: EventQueue,
}

impl Sensors {
    pub fn new(
        configs: Vec<SensorConfig>,
        cloud_enabled: bool,
        boot_id: u64,
        inference: Inference,
        training: Training,
    ) -> Sensors {
        Sensors {
            configs: Arc::new(configs),
            cloud_enabled,
            boot_id,
            inference,
            training,
            live: Arc::default(),
            events: EventQueue::default(),
        }
    }

    /// The queue the uplink drains.
    pub fn events(&self) -> EventQueue {
        self.events.clone()
    }

    /// The status document's `sensors` array.
    pub fn snapshot(&self) -> Value {
        serde_json::to_value(&*self.live.0.lock()).unwrap_or(Value::Null)
    }

    /// Start every configured sensor. A sensor whose configuration cannot be
    /// built (e.g. its bus cannot be opened) is shown as failed with the
    /// reason; the others run.
    pub fn spawn(
        &self,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.configs
            .iter()
            .filter_map(|cfg| self.start(cfg.clone(), stop.clone()))
            .collect()
    }

    fn start(
        &self,
        cfg: SensorConfig,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.live.0.lock().push(live_view(&cfg));
        let sensor = match cfg.build() {
            Ok(s) => s,
            Err(e) => {
                self.not_started(&cfg, &e);
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Window>(WINDOW_QUEUE);
        let sampling = Sampling {
            cfg: cfg.clone(),
            live: self.live.clone(),
            metrics: self.inference.metrics.clone(),
            boot_id: self.boot_id,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("sensor-{}", cfg.name))
            .spawn(move || sampling.thread(sensor, tx, stop));
        if let Err(e) = spawned {
            tracing::error!(sensor = %cfg.name, error = %e, "cannot start the sampling thread");
            return None;
        }
        Some(tokio::spawn(self.clone().pipeline(cfg, rx)))
    }

    fn not_started(&self, cfg: &SensorConfig, e: &dai_sensors::SensorError) {
        tracing::error!(sensor = %cfg.name, error = %crate::error::chain(e), "sensor not started");
        self.live.with(&cfg.name, |l| {
            l.model_error = Some(format!("not started: {e}"));
        });
        let metrics = &self.inference.metrics;
        metrics
            .sensor_faults
            .get_or_create(&SensorKind {
                sensor: cfg.name.clone(),
                kind: e.kind().into(),
            })
            .inc();
        // So the "sensor degraded" alert fires for it too.
        metrics
            .sensor_healthy
            .get_or_create(&sensor_label(cfg))
            .set(0);
    }

    async fn pipeline(self, cfg: SensorConfig, mut rx: tokio::sync::mpsc::Receiver<Window>) {
        let Some(model) = cfg.model.clone() else {
            // Sampling and charting only: drain.
            while rx.recv().await.is_some() {}
            return;
        };
        let mut p = Pipeline::new(self, cfg, model);
        while let Some(w) = rx.recv().await {
            p.window(w).await;
        }
    }
}

fn sensor_label(cfg: &SensorConfig) -> SensorLabel {
    SensorLabel {
        sensor: cfg.name.clone(),
        simulated: (cfg.source == Source::Simulated).to_string(),
    }
}

/// A sensor's view before its first sample.
fn live_view(cfg: &SensorConfig) -> SensorLive {
    SensorLive {
        name: cfg.name.clone(),
        part: match cfg.part {
            Part::Mpu6050 => "mpu6050",
            Part::Bme280 => "bme280",
        },
        simulated: cfg.source == Source::Simulated,
        source: match cfg.source {
            Source::Simulated => format!("simulated (seed {})", cfg.seed),
            Source::Spi => format!("{} (SPI)", cfg.bus),
            Source::I2c => format!(
                "{} @ {:#04x}",
                cfg.bus,
                cfg.address.unwrap_or(match cfg.part {
                    Part::Mpu6050 => dai_sensors::mpu6050::ADDRESS_AD0_LOW,
                    Part::Bme280 => dai_sensors::bme280::ADDRESS_SDO_LOW,
                })
            ),
        },
        rate_hz: cfg.rate_hz,
        channels: cfg.channels().to_vec(),
        model: cfg.model.clone(),
        status: None,
        samples: 0,
        overruns: 0,
        windows: 0,
        windows_dropped: 0,
        events: 0,
        events_suppressed: 0,
        rule_samples: 0,
        model_error: None,
        recent: VecDeque::new(),
        predictions: VecDeque::new(),
        measured_hz: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_queue_is_bounded_oldest_out() {
        let q = EventQueue::default();
        for i in 0..EVENT_QUEUE {
            assert!(!q.push(vec![i as u8]));
        }
        assert!(q.push(vec![0xff]), "full: the oldest goes");
        let first = q.drain(2);
        assert_eq!(first, vec![vec![1u8], vec![2u8]]);
        assert_eq!(q.drain(usize::MAX).len(), EVENT_QUEUE - 2);
        assert!(q.drain(5).is_empty());
    }
}
