//! The pipeline task of one sensor: window -> features or the raw window
//! -> the model -> prediction (live view, latency), feedback cache, label
//! rule samples, and a rate-limited event for the uplink.

use super::{PREDICTIONS, Prediction, Sensors, Window, sensor_label};
use crate::metrics::SensorKind;
use crate::training::feedback::Answer;
use dai_infer::tensor::{Data, TensorData};
use dai_sensors::config::{SensorConfig, Source};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
}

/// A classified window.
struct Classified {
    outcome: dai_infer::InferOutcome,
    probs: Vec<f32>,
    label: String,
    probability: f32,
    took: Duration,
}

/// One sensor's pipeline task: window -> model -> prediction, samples, event.
pub(super) struct Pipeline {
    sensors: Sensors,
    cfg: SensorConfig,
    model: String,
    /// The channels the model sees.
    channels: Vec<usize>,
    /// (channel, threshold, label) of each label rule.
    rules: Vec<(usize, f32, u32)>,
    latency: prometheus_client::metrics::histogram::Histogram,
    last_event: Option<Instant>,
}

impl Pipeline {
    pub(super) fn new(sensors: Sensors, cfg: SensorConfig, model: String) -> Pipeline {
        let names = cfg.channels();
        // An IMU model sees the six motion channels; the die temperature is
        // charted but says nothing about vibration.
        let channels = (0..names.len())
            .filter(|&c| !(cfg.features && names[c] == "temp_c" && names.len() > 3))
            .collect();
        let rules = cfg
            .label_rules
            .iter()
            .filter_map(|r| {
                names
                    .iter()
                    .position(|c| *c == r.channel)
                    .map(|i| (i, r.above, r.label))
            })
            .collect();
        let latency = sensors
            .inference
            .metrics
            .sensor_latency
            .get_or_create(&sensor_label(&cfg))
            .clone();
        Pipeline {
            sensors,
            cfg,
            model,
            channels,
            rules,
            latency,
            last_event: None,
        }
    }

    fn set_error(&self, msg: String) {
        self.sensors
            .live
            .with(&self.cfg.name, |l| l.model_error = Some(msg));
    }

    pub(super) async fn window(&mut self, w: Window) {
        self.sensors.live.with(&self.cfg.name, |l| l.windows += 1);
        let Some(input) = self.input(&w).await else {
            return;
        };
        let Some(c) = self.classify(&w, input).await else {
            return;
        };
        let ts = crate::unix_now();
        self.learn(&w, &c.outcome).await;
        self.sensors
            .inference
            .metrics
            .sensor_windows
            .get_or_create(&SensorKind {
                sensor: self.cfg.name.clone(),
                kind: c.label.clone(),
            })
            .inc();
        self.show_and_emit(&w, &c, ts);
    }

    /// The model input: window features, or the raw window.
    async fn input(&self, w: &Window) -> Option<Vec<f32>> {
        if !self.cfg.features {
            return Some(w.samples.iter().flatten().copied().collect());
        }
        // O(window^2) DFT: off the async workers that serve HTTP.
        let (samples, ch, rate) = (w.samples.clone(), self.channels.clone(), self.cfg.rate_hz);
        match tokio::task::spawn_blocking(move || {
            dai_sensors::features::window_features(&samples, &ch, rate)
        })
        .await
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(sensor = %self.cfg.name, error = %e, "feature task failed");
                None
            }
        }
    }

    /// Run the model; a failure is shown on the sensor's view.
    async fn classify(&self, w: &Window, input: Vec<f32>) -> Option<Classified> {
        let model = &self.model;
        let runtime = &self.sensors.inference.runtime;
        let manifest = match runtime.manifest(model) {
            Ok(m) => m,
            Err(e) => {
                self.set_error(e.to_string());
                return None;
            }
        };
        let spec = manifest.inputs.first()?;
        let n = input.len();
        let tensor = match TensorData::new(vec![1, n], Data::F32(input)) {
            Ok(t) => t,
            Err(e) => {
                self.set_error(e.0.clone());
                return None;
            }
        };
        let inputs = HashMap::from([(spec.name.clone(), tensor)]);
        let outcome = match runtime.infer(model, inputs, None).await {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("{model}: {e}");
                self.sensors.live.with(&self.cfg.name, |l| {
                    if l.model_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(sensor = %self.cfg.name, error = %msg, "window not classified");
                    }
                    l.model_error = Some(msg);
                });
                return None;
            }
        };
        let took = w.last_sample.elapsed();
        self.latency.observe(took.as_secs_f64());
        let probs: Vec<f32> = match outcome.outputs.first().map(|t| &t.data) {
            Some(Data::F32(p)) if !p.is_empty() => p.clone(),
            _ => {
                self.set_error(format!(
                    "{model}: its first output is not a non-empty f32 tensor"
                ));
                return None;
            }
        };
        let (best, probability) = argmax(&probs);
        let label = manifest
            .labels
            .get(best)
            .cloned()
            .unwrap_or_else(|| best.to_string());
        Some(Classified {
            outcome,
            probs,
            label,
            probability,
            took,
        })
    }

    /// Feedback on this window id becomes a sample without a rerun; label
    /// rules store samples directly.
    async fn learn(&self, w: &Window, out: &dai_infer::InferOutcome) {
        let Some(emb) = &out.head_input else { return };
        let Data::F32(features) = &emb.data else {
            return;
        };
        self.sensors.training.remember(
            w.id.clone(),
            Answer {
                model: out.model.clone(),
                version: out.version.clone(),
                features: features.clone(),
                rows: 1,
            },
        );
        for &(c, above, rule_label) in &self.rules {
            let peak = w
                .samples
                .iter()
                .map(|s| s.get(c).copied().unwrap_or(0.0).abs())
                .fold(0.0f32, f32::max);
            if peak > above {
                self.rule_sample(features, rule_label).await;
            }
        }
    }

    async fn rule_sample(&self, features: &[f32], label: u32) {
        let (tr, m, f) = (
            self.sensors.training.clone(),
            self.model.clone(),
            features.to_vec(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            tr.store_sample(&m, &f, 1, &[label as i64], "rule")
        })
        .await;
        let sensor = &self.cfg.name;
        match stored {
            Ok(Ok(_)) => {
                self.sensors.live.with(sensor, |l| l.rule_samples += 1);
            }
            Ok(Err(e)) => {
                tracing::warn!(%sensor, error = %crate::error::chain(&e), "rule sample not stored")
            }
            Err(e) => tracing::warn!(%sensor, error = %e, "rule sample task"),
        }
    }

    /// The prediction on the page; an event for the uplink when one is due
    /// (`event_min_interval_ms`) and cloud sync is on.
    fn show_and_emit(&mut self, w: &Window, c: &Classified, ts: f64) {
        let prediction = Prediction {
            id: w.id.clone(),
            ts,
            label: c.label.clone(),
            probability: c.probability,
            latency_ms: c.took.as_secs_f64() * 1e3,
        };
        let cloud = self.sensors.cloud_enabled;
        let due = self
            .last_event
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(self.cfg.event_min_interval_ms));
        self.sensors.live.with(&self.cfg.name, |l| {
            l.model_error = None;
            if l.predictions.len() >= PREDICTIONS {
                l.predictions.pop_front();
            }
            l.predictions.push_back(prediction);
            if due && cloud {
                l.events += 1;
            } else if cloud {
                l.events_suppressed += 1;
            }
        });
        if !(due && cloud) {
            return;
        }
        self.last_event = Some(Instant::now());
        let event = json!({
            "sensor": self.cfg.name,
            "window_id": w.id,
            "ts": ts,
            "model": self.model,
            "version": c.outcome.version,
            "label": c.label,
            "probability": c.probability,
            "probs": c.probs,
            "simulated": self.cfg.source == Source::Simulated,
        });
        let metrics = &self.sensors.inference.metrics;
        if self.sensors.events.push(event.to_string().into_bytes()) {
            metrics.sensor_events_dropped.inc();
        }
        metrics
            .sensor_events
            .get_or_create(&SensorKind {
                sensor: self.cfg.name.clone(),
                kind: c.label.clone(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_picks_the_first_largest() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), (1, 0.7));
    }
}
