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

use crate::AppState;
use crate::metrics::{SensorKind, SensorLabel};
use dai_infer::tensor::{Data, TensorData};
use dai_sensors::config::SensorConfig;
use dai_sensors::supervise::{Attempt, Backoff, SensorStatus, Supervised};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Every sensor's live view, and the events for the uplink.
#[derive(Debug, Default)]
pub struct SensorsState {
    pub live: Mutex<Vec<SensorLive>>,
    pub events: Mutex<VecDeque<Vec<u8>>>,
}

impl SensorsState {
    fn with<R>(&self, name: &str, f: impl FnOnce(&mut SensorLive) -> R) -> Option<R> {
        self.live.lock().iter_mut().find(|s| s.name == name).map(f)
    }

    /// The status document's `sensors` array.
    pub fn snapshot(&self) -> Value {
        serde_json::to_value(&*self.live.lock()).unwrap_or(Value::Null)
    }
}

/// Start every configured sensor. A sensor whose configuration cannot be
/// built (e.g. its bus cannot be opened) is shown as failed with the
/// reason; the others run.
pub fn spawn(
    state: &Arc<AppState>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for cfg in state.config.sensors.clone() {
        let live = SensorLive {
            name: cfg.name.clone(),
            part: match cfg.part {
                dai_sensors::config::Part::Mpu6050 => "mpu6050",
                dai_sensors::config::Part::Bme280 => "bme280",
            },
            simulated: cfg.source == dai_sensors::config::Source::Simulated,
            source: match cfg.source {
                dai_sensors::config::Source::Simulated => format!("simulated (seed {})", cfg.seed),
                dai_sensors::config::Source::Spi => format!("{} (SPI)", cfg.bus),
                dai_sensors::config::Source::I2c => format!(
                    "{} @ {:#04x}",
                    cfg.bus,
                    cfg.address.unwrap_or(match cfg.part {
                        dai_sensors::config::Part::Mpu6050 => dai_sensors::mpu6050::ADDRESS_AD0_LOW,
                        dai_sensors::config::Part::Bme280 => dai_sensors::bme280::ADDRESS_SDO_LOW,
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
        };
        state.sensors.live.lock().push(live);
        let sensor = match cfg.build() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(sensor = %cfg.name, error = %e, "sensor not started");
                state.sensors.with(&cfg.name, |l| {
                    l.model_error = Some(format!("not started: {e}"));
                });
                state
                    .metrics
                    .sensor_faults
                    .get_or_create(&SensorKind {
                        sensor: cfg.name.clone(),
                        kind: e.kind().into(),
                    })
                    .inc();
                // So the "sensor degraded" alert fires for it too.
                state
                    .metrics
                    .sensor_healthy
                    .get_or_create(&SensorLabel {
                        sensor: cfg.name.clone(),
                        simulated: (cfg.source == dai_sensors::config::Source::Simulated)
                            .to_string(),
                    })
                    .set(0);
                continue;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Window>(WINDOW_QUEUE);
        let st = state.clone();
        let c = cfg.clone();
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sensor-{}", cfg.name))
            .spawn(move || sample_loop(st, c, sensor, tx, thread_stop));
        if let Err(e) = spawned {
            tracing::error!(sensor = %cfg.name, error = %e, "cannot start the sampling thread");
            continue;
        }
        tasks.push(tokio::spawn(pipeline(state.clone(), cfg, rx)));
    }
    tasks
}

fn sample_loop(
    state: Arc<AppState>,
    cfg: SensorConfig,
    sensor: Box<dyn dai_sensors::Sensor>,
    tx: tokio::sync::mpsc::Sender<Window>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(sensor = %cfg.name, error = %e, "no runtime for the sampling thread");
            return;
        }
    };
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
    let hop = cfg.hop();
    let decimate = ((cfg.rate_hz / 50.0).round() as u64).max(1);
    rt.block_on(async move {
        let mut iv = tokio::time::interval(period);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut buf: VecDeque<Vec<f32>> = VecDeque::with_capacity(cfg.window);
        let mut since_window = 0usize;
        let mut n_windows = 0u64;
        let mut samples = 0u64;
        let mut last_publish = Instant::now();
        let mut published_samples = 0u64;
        let mut overruns = 0u64;
        let mut was_failing = false;
        let samples_metric = state.metrics.sensor_samples.get_or_create(&labels).clone();
        loop {
            let tick = tokio::select! {
                t = iv.tick() => t,
                _ = stop.changed() => break,
            };
            if tick.elapsed() > period {
                overruns += 1;
            }
            match sup.attempt(Instant::now()) {
                Attempt::Sample(v) => {
                    if was_failing {
                        tracing::info!(sensor = %cfg.name, "sensor recovered");
                        was_failing = false;
                    }
                    samples += 1;
                    samples_metric.inc();
                    if samples.is_multiple_of(decimate) {
                        let t = started.elapsed().as_secs_f64();
                        state.sensors.with(&cfg.name, |l| {
                            if l.recent.len() >= CHART_POINTS {
                                l.recent.pop_front();
                            }
                            l.recent.push_back((t, v.clone()));
                        });
                    }
                    if buf.len() == cfg.window {
                        buf.pop_front();
                    }
                    buf.push_back(v);
                    since_window += 1;
                    if buf.len() == cfg.window && since_window >= hop {
                        since_window = 0;
                        n_windows += 1;
                        let w = Window {
                            id: format!("{:x}-{}-{n_windows:x}", state.boot_id, cfg.name),
                            samples: buf.iter().cloned().collect(),
                            last_sample: Instant::now(),
                        };
                        if tx.try_send(w).is_err() {
                            state.sensors.with(&cfg.name, |l| l.windows_dropped += 1);
                        }
                    }
                }
                Attempt::Skipped => {}
                Attempt::Failed(e) => {
                    state
                        .metrics
                        .sensor_faults
                        .get_or_create(&SensorKind {
                            sensor: cfg.name.clone(),
                            kind: e.kind().into(),
                        })
                        .inc();
                    if !was_failing {
                        tracing::warn!(sensor = %cfg.name, error = %e, "sensor fault; retrying with backoff");
                        was_failing = true;
                    }
                    // A window must not straddle a gap.
                    buf.clear();
                    since_window = 0;
                }
            }
            if last_publish.elapsed() >= Duration::from_millis(250) {
                let dt = last_publish.elapsed().as_secs_f64();
                let status = sup.status();
                let healthy = status.health == dai_sensors::supervise::Health::Ok;
                state
                    .metrics
                    .sensor_healthy
                    .get_or_create(&labels)
                    .set(i64::from(healthy));
                state.sensors.with(&cfg.name, |l| {
                    l.measured_hz = (samples - published_samples) as f64 / dt;
                    l.samples = samples;
                    l.overruns = overruns;
                    l.status = Some(status);
                });
                published_samples = samples;
                last_publish = Instant::now();
            }
        }
    });
}

fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
}

async fn pipeline(
    state: Arc<AppState>,
    cfg: SensorConfig,
    mut rx: tokio::sync::mpsc::Receiver<Window>,
) {
    let Some(model) = cfg.model.clone() else {
        // Sampling and charting only: drain.
        while rx.recv().await.is_some() {}
        return;
    };
    // An IMU model sees the six motion channels; the die temperature is
    // charted but says nothing about vibration.
    let channels: Vec<usize> = (0..cfg.channels().len())
        .filter(|&c| !(cfg.features && cfg.channels()[c] == "temp_c" && cfg.channels().len() > 3))
        .collect();
    let rule_channels: Vec<(usize, f32, u32)> = cfg
        .label_rules
        .iter()
        .filter_map(|r| {
            cfg.channels()
                .iter()
                .position(|c| *c == r.channel)
                .map(|i| (i, r.above, r.label))
        })
        .collect();
    let mut last_event: Option<Instant> = None;
    let latency = state
        .metrics
        .sensor_latency
        .get_or_create(&SensorLabel {
            sensor: cfg.name.clone(),
            simulated: (cfg.source == dai_sensors::config::Source::Simulated).to_string(),
        })
        .clone();
    while let Some(w) = rx.recv().await {
        state.sensors.with(&cfg.name, |l| l.windows += 1);
        let input: Vec<f32> = if cfg.features {
            // O(window^2) DFT: off the async workers that serve HTTP.
            let (samples, ch, rate) = (w.samples.clone(), channels.clone(), cfg.rate_hz);
            match tokio::task::spawn_blocking(move || {
                dai_sensors::features::window_features(&samples, &ch, rate)
            })
            .await
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(sensor = %cfg.name, error = %e, "feature task failed");
                    continue;
                }
            }
        } else {
            w.samples.iter().flatten().copied().collect()
        };
        let manifest = match state.runtime.manifest(&model) {
            Ok(m) => m,
            Err(e) => {
                state
                    .sensors
                    .with(&cfg.name, |l| l.model_error = Some(e.to_string()));
                continue;
            }
        };
        let Some(spec) = manifest.inputs.first() else {
            continue;
        };
        let n = input.len();
        let tensor = match TensorData::new(vec![1, n], Data::F32(input)) {
            Ok(t) => t,
            Err(e) => {
                state
                    .sensors
                    .with(&cfg.name, |l| l.model_error = Some(e.0.clone()));
                continue;
            }
        };
        let inputs = HashMap::from([(spec.name.clone(), tensor)]);
        let out = match state.runtime.infer(&model, inputs, None).await {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("{model}: {e}");
                state.sensors.with(&cfg.name, |l| {
                    if l.model_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(sensor = %cfg.name, error = %msg, "window not classified");
                    }
                    l.model_error = Some(msg);
                });
                continue;
            }
        };
        let took = w.last_sample.elapsed();
        latency.observe(took.as_secs_f64());
        let probs: Vec<f32> = match out.outputs.first().map(|t| &t.data) {
            Some(Data::F32(p)) if !p.is_empty() => p.clone(),
            _ => {
                let msg = format!("{model}: its first output is not a non-empty f32 tensor");
                state.sensors.with(&cfg.name, |l| l.model_error = Some(msg));
                continue;
            }
        };
        let (best, p) = argmax(&probs);
        let label = manifest
            .labels
            .get(best)
            .cloned()
            .unwrap_or_else(|| best.to_string());
        let ts = crate::unix_now();
        // Feedback on this window id becomes a sample without a rerun.
        if let Some(emb) = &out.head_input
            && let Data::F32(features) = &emb.data
        {
            state.training.feedback.lock().put(
                w.id.clone(),
                out.model.clone(),
                out.version.clone(),
                features.clone(),
                1,
            );
            for &(c, above, rule_label) in &rule_channels {
                let peak = w
                    .samples
                    .iter()
                    .map(|s| s.get(c).copied().unwrap_or(0.0).abs())
                    .fold(0.0f32, f32::max);
                if peak > above {
                    let st = state.clone();
                    let (m, f) = (model.clone(), features.clone());
                    let stored = tokio::task::spawn_blocking(move || {
                        crate::training::store_sample(&st, &m, &f, 1, &[rule_label as i64], "rule")
                    })
                    .await;
                    match stored {
                        Ok(Ok(_)) => {
                            state.sensors.with(&cfg.name, |l| l.rule_samples += 1);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(sensor = %cfg.name, error = %e, "rule sample not stored")
                        }
                        Err(e) => {
                            tracing::warn!(sensor = %cfg.name, error = %e, "rule sample task")
                        }
                    }
                }
            }
        }
        state
            .metrics
            .sensor_windows
            .get_or_create(&SensorKind {
                sensor: cfg.name.clone(),
                kind: label.clone(),
            })
            .inc();
        let prediction = Prediction {
            id: w.id.clone(),
            ts,
            label: label.clone(),
            probability: p,
            latency_ms: took.as_secs_f64() * 1e3,
        };
        let due = last_event
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(cfg.event_min_interval_ms));
        state.sensors.with(&cfg.name, |l| {
            l.model_error = None;
            if l.predictions.len() >= PREDICTIONS {
                l.predictions.pop_front();
            }
            l.predictions.push_back(prediction.clone());
            if due && state.config.cloud.enabled {
                l.events += 1;
            } else if state.config.cloud.enabled {
                l.events_suppressed += 1;
            }
        });
        if due && state.config.cloud.enabled {
            last_event = Some(Instant::now());
            let event = json!({
                "sensor": cfg.name,
                "window_id": w.id,
                "ts": ts,
                "model": model,
                "version": out.version,
                "label": label,
                "probability": p,
                "probs": probs,
                "simulated": cfg.source == dai_sensors::config::Source::Simulated,
            });
            let mut q = state.sensors.events.lock();
            if q.len() >= EVENT_QUEUE {
                q.pop_front();
                state.metrics.sensor_events_dropped.inc();
            }
            q.push_back(event.to_string().into_bytes());
            state
                .metrics
                .sensor_events
                .get_or_create(&SensorKind {
                    sensor: cfg.name.clone(),
                    kind: label,
                })
                .inc();
        }
    }
}
