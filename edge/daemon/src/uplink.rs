//! Cloud sync wiring: the daemon side of `dai_sync::Edge`.
//!
//! Outbox rows come from the store and leave it on the aggregator's ack; a
//! verified newer global head is stored and adopted (one transaction) and
//! swapped into the runtime; local training then starts from it and sends
//! deltas against it (`base_version = "{bundle}+g{N}"`). Sensor events go
//! out from the sensors' [`EventQueue`].
//!
//! [`Uplink`] holds what that needs (the inference and store handles, the
//! event queue, the cloud settings); `tasks` starts it when `cloud.enabled`.

use crate::handles::{Inference, StoreHandle};
use crate::sensors::EventQueue;
use dai_config::Config;
use dai_protocol::global::GlobalModel;
use dai_protocol::messages::{Ack, AckStatus, Status};
use std::sync::Arc;
use std::time::Duration;

/// The daemon as seen by the uplink task.
#[derive(Debug, Clone)]
pub struct DaemonEdge {
    /// Host name, as the heartbeat names this device.
    host: String,
    inference: Inference,
    store: StoreHandle,
    events: EventQueue,
}

/// The uplink, ready to start.
#[derive(Debug, Clone)]
pub struct Uplink {
    config: Arc<Config>,
    /// The device name in topics (`cloud.device_id`, else the host's).
    device: String,
    edge: DaemonEdge,
}

impl Uplink {
    pub fn new(
        config: Arc<Config>,
        host: String,
        device: String,
        inference: Inference,
        store: StoreHandle,
        events: EventQueue,
    ) -> Uplink {
        Uplink {
            config,
            device,
            edge: DaemonEdge {
                host,
                inference,
                store,
                events,
            },
        }
    }

    /// Start the uplink task when `cloud.enabled` (and its settings are
    /// usable; otherwise say why and run without it).
    pub fn spawn(
        self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let c = &self.config.cloud;
        if !c.enabled {
            return None;
        }
        let key = match dai_protocol::global::verifying_key_from_hex(&c.aggregator_public_key) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cloud sync disabled: bad aggregator_public_key");
                return None;
            }
        };
        // Validated as host:port when the config was loaded.
        let (host, port) = c.broker.rsplit_once(':')?;
        let cfg = dai_sync::UplinkConfig {
            fleet: c.fleet.clone(),
            device: self.device.clone(),
            host: host.to_string(),
            port: port.parse().ok()?,
            aggregator_key: key,
            retry_delay: Duration::from_secs(self.config.retry_delay_sec.max(1)),
            connection_timeout: Duration::from_secs(self.config.connection_timeout_sec),
            heartbeat: Duration::from_secs(c.heartbeat_sec),
        };
        let edge: Arc<dyn dai_sync::Edge> = Arc::new(self.edge);
        Some(tokio::spawn(async move {
            let stats = dai_sync::run(cfg, edge, async move {
                let _ = stop.changed().await;
            })
            .await;
            tracing::info!(?stats, "cloud uplink stopped");
        }))
    }
}

impl dai_sync::Edge for DaemonEdge {
    fn outbox(&self, limit: usize) -> Vec<(String, Vec<u8>)> {
        match self.store.outbox(limit) {
            Ok(rows) => rows.into_iter().map(|r| (r.update_id, r.payload)).collect(),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot read the outbox");
                Vec::new()
            }
        }
    }

    fn acked(&self, ack: &Ack) {
        match self.store.delete_outbox(&ack.update_id) {
            Ok(true) => {
                let status = if ack.status == AckStatus::Accepted {
                    "accepted"
                } else {
                    "rejected"
                };
                self.inference
                    .metrics
                    .sync_acks
                    .get_or_create(&crate::metrics::Outcome {
                        outcome: status.into(),
                    })
                    .inc();
            }
            Ok(false) => {
                tracing::debug!(update = %ack.update_id, "ack for an update no longer in the outbox")
            }
            Err(e) => {
                tracing::warn!(update = %ack.update_id, error = %crate::error::chain(&e), "ack not recorded; the update will be sent again")
            }
        }
    }

    fn models(&self) -> Vec<String> {
        self.inference
            .runtime
            .models()
            .into_iter()
            .filter_map(|m| {
                m.model
                    .filter(|lm| lm.head.is_some())
                    .map(|lm| lm.name().to_string())
            })
            .collect()
    }

    fn global_version(&self, model: &str) -> u64 {
        self.store
            .latest_global(model)
            .ok()
            .flatten()
            .map_or(0, |(v, _)| v as u64)
    }

    fn apply_global(&self, g: GlobalModel) -> Result<(), String> {
        let runtime = &self.inference.runtime;
        let m = runtime.model(&g.model).map_err(|e| e.to_string())?;
        let slot = m.head.as_ref().ok_or("model has no trainable head")?;
        let (head, _) = dai_train::Head::from_bytes(&g.head_file).map_err(|e| e.to_string())?;
        if head.spec != slot.load().head.spec {
            return Err(format!(
                "global {} of {} has a different head architecture",
                g.version, g.model
            ));
        }
        let version = self
            .store
            .adopt_global(
                &g.model,
                m.version(),
                g.version as i64,
                &g.head_file,
                &g.sha256,
            )
            .map_err(|e| crate::error::chain(&e).to_string())?;
        runtime
            .set_head_if_current(&m, head, version)
            .map_err(|e| e.to_string())?;
        self.inference.metrics.sync_globals.inc();
        tracing::info!(model = %g.model, global = g.version, head_version = version, "global model adopted");
        Ok(())
    }

    fn global_refused(&self, model: &str, reason: &'static str) {
        self.inference
            .metrics
            .sync_globals_refused
            .get_or_create(&crate::metrics::ModelOutcome {
                model: model.to_string(),
                outcome: reason.to_string(),
            })
            .inc();
    }

    fn events(&self, max: usize) -> Vec<Vec<u8>> {
        self.events.drain(max)
    }

    fn status(&self) -> Status {
        let models = self.models().into_iter().map(|m| {
            let v = self.global_version(&m);
            (m, v)
        });
        Status {
            device: self.host.clone(),
            state: "online".into(),
            ts: crate::unix_now(),
            models: models.collect(),
            outbox_pending: self.store.outbox(100_000).map_or(0, |o| o.len() as u64),
        }
    }
}
