//! `dai-sync`: the edge uplink to `dai-cloud` over MQTT (rumqttc).
//!
//! One task ([`run`]) owns the rumqttc event loop; the daemon plugs in
//! through the small [`Edge`] trait (outbox, acks, global models), so this
//! crate knows nothing of SQLite or the runtime.
//! - outbox rows are published QoS 1 on `.../dev/{device}/update` with a
//!   persistent session; a row leaves the outbox only when the aggregator's
//!   ack for its update id arrives (a PUBACK is not enough), and everything
//!   not acked is published again after a reconnect, or when no ack came
//!   within `connection_timeout` (a broker restarted without persistence
//!   drops messages nobody was subscribed for); the aggregator dedups;
//! - acks arrive on `.../dev/{device}/ack`;
//! - globals arrive retained on `.../model/{model}/global` and are verified
//!   (ed25519 signature, checksum, model name) and applied only if newer;
//! - a retained status heartbeat, with a last will saying "offline";
//! - on connection loss: exponential backoff from `retry_delay` up to
//!   `connection_timeout`, with jitter.

use dai_protocol::global::GlobalModel;
use dai_protocol::messages::{Ack, AckStatus, Status};
use dai_protocol::topics::Topic;
use ed25519_dalek::VerifyingKey;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the uplink needs from the daemon.
pub trait Edge: Send + Sync + 'static {
    /// Pending updates, oldest first: (update id, wire payload).
    fn outbox(&self, limit: usize) -> Vec<(String, Vec<u8>)>;
    /// The aggregator answered for `update_id` (accepted or rejected): the
    /// row may go.
    fn acked(&self, ack: &Ack);
    /// Models to receive globals for.
    fn models(&self) -> Vec<String>;
    /// Global version currently served for `model` (0 = none yet).
    fn global_version(&self, model: &str) -> u64;
    /// Store and serve a verified, newer global model.
    fn apply_global(&self, global: GlobalModel) -> Result<(), String>;
    /// The heartbeat's content.
    fn status(&self) -> Status;
    /// A global model was refused: `reason` is `invalid` (signature,
    /// checksum, model name or format), `older` (a version below the one
    /// served) or `apply` (verified, but it could not be stored or served).
    fn global_refused(&self, _model: &str, _reason: &'static str) {}
    /// Sensor events waiting to be published (drained; at most `max`).
    fn events(&self, _max: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub fleet: String,
    pub device: String,
    pub host: String,
    pub port: u16,
    pub aggregator_key: VerifyingKey,
    pub retry_delay: Duration,
    pub connection_timeout: Duration,
    pub heartbeat: Duration,
}

/// Counters of a run (also useful to tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStats {
    pub published: u64,
    pub acked: u64,
    pub globals_applied: u64,
    pub globals_refused: u64,
    pub reconnects: u64,
    /// Updates published again because no ack came within the timeout.
    pub republished: u64,
    /// Sensor events published.
    pub events: u64,
}

fn backoff(cfg: &UplinkConfig, attempt: u32) -> Duration {
    let base = cfg.retry_delay.max(Duration::from_millis(50));
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(cfg.connection_timeout.max(base));
    // Jitter in [50 %, 100 %] from the clock: no RNG needed, and devices
    // that lost the broker together do not come back in lockstep.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    capped.mul_f64(0.5 + (nanos % 1000) as f64 / 2000.0)
}

/// Run the uplink until `shutdown` resolves.
pub async fn run(
    cfg: UplinkConfig,
    edge: Arc<dyn Edge>,
    shutdown: impl std::future::Future<Output = ()>,
) -> UplinkStats {
    let mut stats = UplinkStats::default();
    let status_topic = Topic::Status {
        fleet: cfg.fleet.clone(),
        device: cfg.device.clone(),
    }
    .build();
    let update_topic = Topic::Update {
        fleet: cfg.fleet.clone(),
        device: cfg.device.clone(),
    }
    .build();
    let ack_topic = Topic::Ack {
        fleet: cfg.fleet.clone(),
        device: cfg.device.clone(),
    }
    .build();
    let event_topic = Topic::Event {
        fleet: cfg.fleet.clone(),
        device: cfg.device.clone(),
    }
    .build();
    let (Ok(status_topic), Ok(update_topic), Ok(ack_topic), Ok(event_topic)) =
        (status_topic, update_topic, ack_topic, event_topic)
    else {
        tracing::error!(fleet = %cfg.fleet, device = %cfg.device, "invalid fleet or device name; uplink not started");
        return stats;
    };
    let mut opts = MqttOptions::new(&cfg.device, &cfg.host, cfg.port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(false);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let offline = Status {
        device: cfg.device.clone(),
        state: "offline".into(),
        ts: 0.0,
        models: Default::default(),
        outbox_pending: 0,
    };
    opts.set_last_will(LastWill::new(
        &status_topic,
        serde_json::to_vec(&offline).unwrap_or_default(),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut events) = AsyncClient::new(opts, 256);
    // Update id -> (when it was last published on this connection, how
    // many times it was published again without an ack).
    let mut inflight: HashMap<String, (Instant, u32)> = HashMap::new();
    // An update published while nobody was subscribed (a broker restarted
    // without persistence, the aggregator not yet back) gets no ack: it is
    // published again after this long. The aggregator counts it once.
    let ack_timeout = cfg.connection_timeout.max(Duration::from_secs(1));
    let mut connected = false;
    let mut attempt = 0u32;
    let mut last_heartbeat = Instant::now() - cfg.heartbeat;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick(), if connected => {
                for (id, payload) in edge.outbox(64) {
                    let mut resends = 0;
                    if let Some(&(sent, n)) = inflight.get(&id) {
                        // Each resend waits twice as long (up to 64x), so an
                        // aggregator that is down for hours does not get a
                        // backlog of copies queued in its session.
                        if sent.elapsed() < ack_timeout * (1u32 << n.min(6)) {
                            continue;
                        }
                        tracing::info!(update = %id, resends = n + 1, "no ack yet; publishing again");
                        stats.republished += 1;
                        resends = n + 1;
                    }
                    match client.try_publish(&update_topic, QoS::AtLeastOnce, false, payload) {
                        Ok(()) => {
                            inflight.insert(id, (Instant::now(), resends));
                            stats.published += 1;
                        }
                        Err(_) => break, // request queue full: next tick
                    }
                }
                for payload in edge.events(64) {
                    if client.try_publish(&event_topic, QoS::AtLeastOnce, false, payload).is_err() {
                        tracing::warn!("request queue full: a sensor event was dropped");
                        break;
                    }
                    stats.events += 1;
                }
                if last_heartbeat.elapsed() >= cfg.heartbeat {
                    last_heartbeat = Instant::now();
                    let s = edge.status();
                    let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, serde_json::to_vec(&s).unwrap_or_default());
                }
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    attempt = 0;
                    // Anything not acked goes out again on this connection.
                    inflight.clear();
                    last_heartbeat = Instant::now() - cfg.heartbeat;
                    let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                    for model in edge.models() {
                        if let Ok(t) = (Topic::Global { fleet: cfg.fleet.clone(), model }).build() {
                            let _ = client.try_subscribe(t, QoS::AtLeastOnce);
                        }
                    }
                    tracing::info!(host = %cfg.host, port = cfg.port, "connected to the broker");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => match Topic::parse(&p.topic) {
                    Ok(Topic::Ack { .. }) => match Ack::from_bytes(&p.payload) {
                        Ok(ack) => {
                            if ack.status == AckStatus::Rejected {
                                tracing::warn!(update = %ack.update_id, reason = ?ack.reason, "update rejected by the aggregator");
                            }
                            inflight.remove(&ack.update_id);
                            edge.acked(&ack);
                            stats.acked += 1;
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable ack"),
                    },
                    Ok(Topic::Global { model, .. }) => {
                        let current = edge.global_version(&model);
                        match dai_protocol::global::verify(&p.payload, &cfg.aggregator_key, &model) {
                            Ok(g) if g.version > current => match edge.apply_global(g) {
                                Ok(()) => stats.globals_applied += 1,
                                Err(e) => {
                                    stats.globals_refused += 1;
                                    edge.global_refused(&model, "apply");
                                    tracing::error!(%model, error = %e, "global model not applied");
                                }
                            },
                            // The retained copy of what is served arrives on every (re)connect.
                            Ok(g) if g.version == current => tracing::debug!(%model, version = g.version, "global already served"),
                            Ok(g) => {
                                stats.globals_refused += 1;
                                edge.global_refused(&model, "older");
                                tracing::warn!(%model, version = g.version, current, "global model refused: older than the one served");
                            }
                            Err(e) => {
                                stats.globals_refused += 1;
                                edge.global_refused(&model, "invalid");
                                tracing::warn!(%model, bytes = p.payload.len(), error = %e, "global model refused");
                            }
                        }
                    }
                    _ => tracing::debug!(topic = %p.topic, "ignored message"),
                },
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        stats.reconnects += 1;
                    }
                    connected = false;
                    let wait = backoff(&cfg, attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unreachable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut shutdown => break,
                    }
                }
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let cfg = UplinkConfig {
            fleet: "f".into(),
            device: "d".into(),
            host: "h".into(),
            port: 1,
            aggregator_key: ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
            retry_delay: Duration::from_millis(100),
            connection_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(30),
        };
        assert!(backoff(&cfg, 0) <= Duration::from_millis(100));
        assert!(backoff(&cfg, 0) >= Duration::from_millis(50));
        assert!(backoff(&cfg, 20) <= Duration::from_secs(2));
        assert!(backoff(&cfg, 20) >= Duration::from_secs(1));
    }
}
