//! Cloud sync wiring: the daemon side of `dai_sync::Edge`.
//!
//! Outbox rows come from the store and leave it on the aggregator's ack; a
//! verified newer global head is stored and adopted (one transaction) and
//! swapped into the runtime; local training then starts from it and sends
//! deltas against it (`base_version = "{bundle}+g{N}@e{epoch}"`). A global
//! of a new aggregator epoch also drops the outbox rows against the old
//! epoch's globals (in the same transaction), as does a `rebase` ack for
//! one row: both are counted in `dai_edge_outbox_rebased_total` and
//! logged, never taken for accepted. Sensor events go out from the
//! sensors' [`EventQueue`].
//!
//! [`Uplink`] holds what that needs (the inference and store handles, the
//! event queue, the cloud settings); `tasks` starts it when `cloud.enabled`.

use crate::handles::{Inference, StoreHandle};
use crate::sensors::EventQueue;
use dai_config::Config;
use dai_protocol::base::GlobalId;
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
    /// Bundles published to the fleet ([`crate::install::download`]).
    downloads: crate::install::download::Downloads,
    /// `cloud.groups`: offers may target a group.
    groups: Vec<String>,
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
        downloads: crate::install::download::Downloads,
    ) -> Uplink {
        let groups = config.cloud.groups.clone();
        Uplink {
            config,
            device,
            edge: DaemonEdge {
                host,
                inference,
                store,
                events,
                downloads,
                groups,
            },
        }
    }

    /// Start the uplink task when `cloud.enabled`. Its identity (the
    /// device bundle) is loaded in the task: a missing, unreadable, expired
    /// or foreign bundle is one error line and a counted failure, retried
    /// every `retry_delay_sec`, while the daemon goes on serving.
    pub fn spawn(
        self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.config.cloud.enabled {
            return None;
        }
        if !self.config.cloud.tls.enabled {
            tracing::warn!(broker = %self.config.cloud.broker, "cloud.tls.enabled is false: MQTT over plain TCP; anyone on the path can read and inject traffic");
        }
        let retry = Duration::from_secs(self.config.retry_delay_sec.max(1));
        Some(tokio::spawn(async move {
            let cfg = loop {
                match self.uplink_config() {
                    Ok(cfg) => break cfg,
                    Err(e) => {
                        self.edge
                            .inference
                            .metrics
                            .sync_errors
                            .get_or_create(&crate::metrics::Outcome {
                                outcome: "identity".into(),
                            })
                            .inc();
                        tracing::error!(error = %format!("{e:#}"), retry_in_s = retry.as_secs(), "cloud uplink not started");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.changed() => return,
                }
            };
            let edge: Arc<dyn dai_sync::Edge> = Arc::new(self.edge);
            let stats = dai_sync::run(cfg, edge, async move {
                let _ = stop.changed().await;
            })
            .await;
            tracing::info!(?stats, "cloud uplink stopped");
        }))
    }

    fn uplink_config(&self) -> anyhow::Result<dai_sync::UplinkConfig> {
        uplink_config(&self.config, &self.device, std::time::SystemTime::now())
    }
}

/// The uplink's settings: the bundle's identity when `cloud.bundle_dir` is
/// set (checked against its CA at `now`, and against the config), else the
/// configured names and aggregator key. A refusal is one error chain that
/// names the bundle directory and what is wrong with it.
fn uplink_config(
    config: &Config,
    device: &str,
    now: std::time::SystemTime,
) -> anyhow::Result<dai_sync::UplinkConfig> {
    {
        use anyhow::{Context, bail};
        let c = &config.cloud;
        // Validated as host:port when the config was loaded.
        let (host, port) = c
            .broker
            .rsplit_once(':')
            .context("cloud.broker: expected host:port")?;
        let port: u16 = port.parse().context("cloud.broker: the port")?;
        let mut cfg = dai_sync::UplinkConfig {
            fleet: c.fleet.clone(),
            device: device.to_string(),
            host: host.to_string(),
            port,
            aggregator_key: ed25519_dalek::VerifyingKey::default(),
            device_key: None,
            tls: None,
            retry_delay: Duration::from_secs(config.retry_delay_sec.max(1)),
            connection_timeout: Duration::from_secs(config.connection_timeout_sec),
            heartbeat: Duration::from_secs(c.heartbeat_sec),
        };
        let configured_key = (!c.aggregator_public_key.is_empty())
            .then(|| dai_protocol::global::verifying_key_from_hex(&c.aggregator_public_key))
            .transpose()
            .context("cloud.aggregator_public_key")?;
        if c.bundle_dir.is_empty() {
            cfg.aggregator_key = configured_key
                .context("cloud.aggregator_public_key is required without cloud.bundle_dir")?;
            return Ok(cfg);
        }
        let dir = std::path::Path::new(&c.bundle_dir);
        let bundle = dai_trust::DeviceBundle::read_from(dir)
            .with_context(|| format!("cloud.bundle_dir {}", dir.display()))?;
        bundle.verify(now).with_context(|| {
            format!("cloud.bundle_dir {}: the device certificate", dir.display())
        })?;
        if bundle.device.as_str() != device {
            bail!(
                "cloud.bundle_dir {}: the bundle is device {:?}, but cloud.device_id says {:?}",
                dir.display(),
                bundle.device.as_str(),
                device
            );
        }
        if c.fleet != bundle.fleet.as_str() {
            bail!(
                "cloud.bundle_dir {}: the bundle is for fleet {:?}, but cloud.fleet is {:?}",
                dir.display(),
                bundle.fleet.as_str(),
                c.fleet
            );
        }
        if configured_key.is_some_and(|k| k != bundle.aggregator_public_key) {
            bail!(
                "cloud.aggregator_public_key differs from the bundle's aggregator.pub in {}",
                dir.display()
            );
        }
        cfg.aggregator_key = bundle.aggregator_public_key;
        cfg.device_key = Some(bundle.key.signing_key().clone());
        if c.tls.enabled {
            let tls = dai_trust::tls::client_config(&bundle.ca_pem, &bundle.cert_pem, &bundle.key)
                .with_context(|| format!("cloud.bundle_dir {}: the TLS identity", dir.display()))?;
            cfg.tls = Some(Arc::new(tls));
        }
        Ok(cfg)
    }
}

/// The device name a bundle in `cloud.bundle_dir` carries, if it can be
/// read now (the uplink reports a bundle it cannot use).
pub fn bundle_device(config: &Config) -> Option<String> {
    let c = &config.cloud;
    if !c.enabled || c.bundle_dir.is_empty() {
        return None;
    }
    dai_trust::DeviceBundle::read_from(std::path::Path::new(&c.bundle_dir))
        .ok()
        .map(|b| b.device.to_string())
}

impl dai_sync::Edge for DaemonEdge {
    fn groups(&self) -> Vec<String> {
        self.groups.clone()
    }

    fn bundle_offered(&self, offer: &dai_protocol::bundle::Offer) -> Option<u32> {
        self.downloads.offered(offer)
    }

    fn bundle_chunk(
        &self,
        offer: &dai_protocol::bundle::Offer,
        index: u32,
        data: &[u8],
    ) -> Result<(), String> {
        self.inference.metrics.bundle_chunks.inc();
        self.downloads.chunk(offer, index, data)
    }

    fn bundle_complete(&self, offer: &dai_protocol::bundle::Offer) {
        self.downloads.complete(offer);
    }

    fn bundle_refused(&self, model: &str, reason: &str) {
        self.uplink_error("bundle_refused");
        self.downloads.refused(model, reason);
    }

    fn bundle_reports(&self, max: usize) -> Vec<dai_protocol::bundle::Report> {
        self.downloads.take_reports(max)
    }

    fn uplink_error(&self, kind: &'static str) {
        self.inference
            .metrics
            .sync_errors
            .get_or_create(&crate::metrics::Outcome {
                outcome: kind.into(),
            })
            .inc();
    }

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
                let status = match ack.status {
                    AckStatus::Accepted => "accepted",
                    AckStatus::Rejected => "rejected",
                    AckStatus::Rebase => {
                        self.inference.metrics.outbox_rebased.inc();
                        tracing::warn!(update = %ack.update_id, reason = ?ack.reason, "update dropped: its base is not of the aggregator's epoch; its samples train again from the current global");
                        "rebase"
                    }
                };
                self.inference
                    .metrics
                    .sync_acks
                    .get_or_create(&crate::metrics::Outcome {
                        outcome: status.into(),
                    })
                    .inc();
                tracing::info!(update = %ack.update_id, status, "update acked; removed from the outbox");
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

    fn served_global(&self, model: &str) -> GlobalId {
        self.store
            .latest_global(model)
            .ok()
            .flatten()
            .map_or(GlobalId::default(), |g| GlobalId {
                epoch: g.epoch,
                version: g.version as u64,
            })
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
        let adopted = self
            .store
            .adopt_global(
                &g.model,
                m.version(),
                g.version as i64,
                g.epoch,
                &g.head_file,
                &g.sha256,
            )
            .map_err(|e| crate::error::chain(&e).to_string())?;
        if !adopted.rebased.is_empty() {
            self.inference
                .metrics
                .outbox_rebased
                .inc_by(adopted.rebased.len() as u64);
            tracing::warn!(model = %g.model, epoch = g.epoch, dropped = adopted.rebased.len(), updates = ?adopted.rebased, "a new aggregator epoch: pending updates on the old one dropped; their samples train again");
        }
        let version = adopted.head_version;
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
            let v = self.served_global(&m).version;
            (m, v)
        });
        Status {
            device: self.host.clone(),
            state: "online".into(),
            ts: crate::unix_now(),
            models: models.collect(),
            outbox_pending: self.store.outbox_len().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_trust::fs::FleetDir;
    use dai_trust::{DeviceBundle, DeviceName, FleetName};
    use std::time::{Duration, SystemTime};

    /// A fleet `f` in `dir/fleet` with `cam-1` enrolled in `dir/cam-1`.
    fn fleet(dir: &std::path::Path) -> std::path::PathBuf {
        let fd = FleetDir::new(dir.join("fleet"));
        fd.init(
            FleetName::parse("f").expect("fleet"),
            SystemTime::now(),
            false,
        )
        .expect("init");
        let out = dir.join("cam-1");
        fd.enroll(
            &DeviceName::parse("cam-1").expect("name"),
            &out,
            30,
            SystemTime::now(),
        )
        .expect("enrol");
        out
    }

    fn config(bundle: &std::path::Path) -> Config {
        let mut c = Config::default();
        c.cloud.enabled = true;
        c.cloud.fleet = "f".into();
        c.cloud.bundle_dir = bundle.display().to_string();
        c
    }

    fn refusal(c: &Config, now: SystemTime) -> String {
        match uplink_config(c, "cam-1", now) {
            Ok(_) => panic!("a bad identity was accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_good_bundle_gives_tls_and_a_signing_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let bundle = fleet(tmp.path());
        let cfg = uplink_config(&config(&bundle), "cam-1", SystemTime::now()).expect("usable");
        assert!(cfg.tls.is_some() && cfg.device_key.is_some());
    }

    #[test]
    fn each_unusable_identity_gets_one_precise_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let bundle = fleet(tmp.path());
        let c = config(&bundle);
        let now = SystemTime::now();
        // Missing.
        let e = refusal(&config(&tmp.path().join("nowhere")), now);
        assert!(e.contains("nowhere") && e.contains("reading"), "{e}");
        // Expired: the clock past the certificate's 30 days.
        let e = refusal(&c, now + Duration::from_secs(40 * 86_400));
        assert!(e.contains("expired"), "{e}");
        // The fleet in the config is not the bundle's.
        let mut elsewhere = c.clone();
        elsewhere.cloud.fleet = "g".into();
        let e = refusal(&elsewhere, now);
        assert!(e.contains("fleet \"f\"") && e.contains("\"g\""), "{e}");
        // A certificate from another CA.
        let other = tempfile::tempdir().expect("tmp");
        let foreign = fleet(other.path());
        let ours_ca = std::fs::read(bundle.join("ca.pem")).expect("ca");
        std::fs::copy(foreign.join("ca.pem"), bundle.join("ca.pem")).expect("copy");
        let e = refusal(&c, now);
        assert!(e.contains("does not chain to the fleet CA"), "{e}");
        std::fs::write(bundle.join("ca.pem"), ours_ca).expect("restore");
        // A key that is not the certificate's.
        let wrong = DeviceBundle::read_from(&foreign).expect("bundle");
        std::fs::write(
            bundle.join("device.key.pem"),
            wrong.key.to_pkcs8_pem().as_bytes(),
        )
        .expect("write");
        let e = refusal(&c, now);
        assert!(e.contains("does not belong to the certificate"), "{e}");
    }
}
