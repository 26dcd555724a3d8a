//! Cloud sync wiring: the daemon side of `dai_sync::Edge`.
//!
//! Outbox rows come from the store and leave it on the aggregator's ack; a
//! verified newer global head is stored and adopted (one transaction) and
//! swapped into the runtime; local training then starts from it and sends
//! deltas against it (`base_version = "{bundle}+g{N}"`).

use crate::AppState;
use dai_protocol::global::GlobalModel;
use dai_protocol::messages::{Ack, AckStatus, Status};
use std::sync::Arc;

/// The daemon as seen by the uplink.
pub struct DaemonEdge(pub Arc<AppState>);

impl dai_sync::Edge for DaemonEdge {
    fn outbox(&self, limit: usize) -> Vec<(String, Vec<u8>)> {
        match self.0.store.outbox(limit) {
            Ok(rows) => rows.into_iter().map(|r| (r.update_id, r.payload)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    fn acked(&self, ack: &Ack) {
        match self.0.store.delete_outbox(&ack.update_id) {
            Ok(true) => {
                let status = if ack.status == AckStatus::Accepted {
                    "accepted"
                } else {
                    "rejected"
                };
                self.0
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
                tracing::warn!(update = %ack.update_id, error = %e, "ack not recorded; the update will be sent again")
            }
        }
    }

    fn models(&self) -> Vec<String> {
        self.0
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
        self.0
            .store
            .latest_global(model)
            .ok()
            .flatten()
            .map_or(0, |(v, _)| v as u64)
    }

    fn apply_global(&self, g: GlobalModel) -> Result<(), String> {
        let state = &self.0;
        let m = state.runtime.model(&g.model).map_err(|e| e.to_string())?;
        let slot = m.head.as_ref().ok_or("model has no trainable head")?;
        let (head, _) = dai_train::Head::from_bytes(&g.head_file).map_err(|e| e.to_string())?;
        if head.spec != slot.load().head.spec {
            return Err(format!(
                "global {} of {} has a different head architecture",
                g.version, g.model
            ));
        }
        let version = state
            .store
            .adopt_global(
                &g.model,
                m.version(),
                g.version as i64,
                &g.head_file,
                &g.sha256,
            )
            .map_err(|e| e.to_string())?;
        state
            .runtime
            .set_head_if_current(&m, head, version)
            .map_err(|e| e.to_string())?;
        state.metrics.sync_globals.inc();
        tracing::info!(model = %g.model, global = g.version, head_version = version, "global model adopted");
        Ok(())
    }

    fn global_refused(&self, model: &str, reason: &'static str) {
        self.0
            .metrics
            .sync_globals_refused
            .get_or_create(&crate::metrics::ModelOutcome {
                model: model.to_string(),
                outcome: reason.to_string(),
            })
            .inc();
    }

    fn events(&self, max: usize) -> Vec<Vec<u8>> {
        let mut q = self.0.sensors.events.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    fn status(&self) -> Status {
        let models = self.models().into_iter().map(|m| {
            let v = self.global_version(&m);
            (m, v)
        });
        Status {
            device: self.0.device.clone(),
            state: "online".into(),
            ts: crate::unix_now(),
            models: models.collect(),
            outbox_pending: self.0.store.outbox(100_000).map_or(0, |o| o.len() as u64),
        }
    }
}

/// Start the uplink task when `cloud.enabled`.
pub fn spawn(
    state: &Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let c = &state.config.cloud;
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
    let (host, port) = c.broker.rsplit_once(':')?;
    let cfg = dai_sync::UplinkConfig {
        fleet: c.fleet.clone(),
        device: if c.device_id.is_empty() {
            state.device.clone()
        } else {
            c.device_id.clone()
        },
        host: host.to_string(),
        port: port.parse().ok()?,
        aggregator_key: key,
        retry_delay: std::time::Duration::from_secs(state.config.retry_delay_sec.max(1)),
        connection_timeout: std::time::Duration::from_secs(state.config.connection_timeout_sec),
        heartbeat: std::time::Duration::from_secs(c.heartbeat_sec),
    };
    let edge: Arc<dyn dai_sync::Edge> = Arc::new(DaemonEdge(state.clone()));
    Some(tokio::spawn(async move {
        let stats = dai_sync::run(cfg, edge, async move {
            let _ = stop.changed().await;
        })
        .await;
        tracing::info!(?stats, "cloud uplink stopped");
    }))
}
