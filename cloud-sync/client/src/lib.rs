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
//! - each update is signed with the device's key for its topic and fleet
//!   (`dai_protocol::signed`) when the uplink has one (a device bundle);
//! - acks arrive on `.../dev/{device}/ack` and count only if the
//!   aggregator signed them for that topic: a forged ack deletes nothing;
//! - globals arrive retained on `.../model/{model}/global` and are verified
//!   (ed25519 signature over fleet, model, version and epoch, checksum) and
//!   applied only if newer in (epoch, version) order, so a new epoch's
//!   version 1 replaces an old epoch's version 50; after each connect the device asks for newer
//!   ones on `.../dev/{device}/want` (a cleared retained message heals);
//! - bundle offers arrive retained on `.../model/{model}/bundle`, count
//!   only if the aggregator signed them for that topic and target this
//!   device; the chunks are fetched a few at a time on `.../dev/{d}/fetch`
//!   (from what the edge already holds: resumable), arrive on
//!   `.../dev/{d}/chunk`, are checked against the offer's chunk hashes and
//!   handed to the edge, which reports on `.../dev/{d}/report`;
//! - with [`UplinkConfig::tls`], the connection is mutual TLS (rustls,
//!   ring; configs from `dai_trust::tls`);
//! - a retained status heartbeat, with a last will saying "offline";
//! - on connection loss: exponential backoff from `retry_delay` up to
//!   `connection_timeout`, with jitter.
//!
//! Modules: `session` holds one connection's state and does the I/O of each
//! event-loop step; `decide` is the sans-IO part (resend and heartbeat
//! timing, the verdict on a global, sorting incoming messages), unit-tested.

mod decide;
mod session;

use dai_protocol::base::GlobalId;
use dai_protocol::bundle::{Offer, Report};
use dai_protocol::global::GlobalModel;
use dai_protocol::messages::{Ack, Status};
use ed25519_dalek::VerifyingKey;
use rumqttc::{AsyncClient, Event, Packet};
use session::{Session, Topics, mqtt_options};
use std::sync::Arc;
use std::time::Duration;

/// What the uplink needs from the daemon.
pub trait Edge: Send + Sync + 'static {
    /// Pending updates, oldest first: (update id, wire payload).
    fn outbox(&self, limit: usize) -> Vec<(String, Vec<u8>)>;
    /// The aggregator answered for `update_id` (accepted or rejected): the
    /// row may go.
    fn acked(&self, ack: &Ack);
    /// Models to receive globals for.
    fn models(&self) -> Vec<String>;
    /// The global currently served for `model`: its aggregator epoch and
    /// version (`GlobalId::default()`: none yet, the shipped head).
    fn served_global(&self, model: &str) -> GlobalId;
    /// Store and serve a verified global model that is newer: a larger
    /// version of the same epoch, or any version of a newer epoch (the
    /// aggregator started a new version line; pending updates on the old
    /// one can never count and are the daemon's to drop, counted).
    fn apply_global(&self, global: GlobalModel) -> Result<(), String>;
    /// The heartbeat's content.
    fn status(&self) -> Status;
    /// A global model was refused: `reason` is `invalid` (signature,
    /// checksum, model name or format), `older` (a version below the one
    /// served) or `apply` (verified, but it could not be stored or served).
    fn global_refused(&self, _model: &str, _reason: &'static str) {}
    /// A failure the daemon counts: `connection` (the broker is
    /// unreachable or refused the TLS handshake) or `ack_refused` (an ack
    /// that is not the aggregator's signature for this device).
    fn uplink_error(&self, _kind: &'static str) {}
    /// Sensor events waiting to be published (drained; at most `max`).
    fn events(&self, _max: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// Groups this device belongs to (bundle offers may target a group).
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }
    /// A bundle offer signed by the aggregator and targeted at this
    /// device: how many chunks the device already holds (the download
    /// resumes there), or `None` when it wants none (done before).
    fn bundle_offered(&self, _offer: &Offer) -> Option<u32> {
        None
    }
    /// Chunk `index` of `offer`, already checked against the offer's list.
    fn bundle_chunk(&self, _offer: &Offer, _index: u32, _data: &[u8]) -> Result<(), String> {
        Err("this edge takes no bundles".into())
    }
    /// Every chunk of `offer` is held: verify and install it.
    fn bundle_complete(&self, _offer: &Offer) {}
    /// An offer on `model`'s topic was refused (`reason`: its signature
    /// or contents).
    fn bundle_refused(&self, _model: &str, _reason: &str) {}
    /// Bundle reports waiting to be published (drained; at most `max`).
    fn bundle_reports(&self, _max: usize) -> Vec<Report> {
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
    /// Signs every update (the device bundle's key); `None` sends them
    /// unsigned, which only an `--insecure-plaintext` aggregator takes.
    pub device_key: Option<ed25519_dalek::SigningKey>,
    /// Mutual TLS to the broker; `None` is plain TCP.
    pub tls: Option<Arc<dai_trust::tls::ClientConfig>>,
    pub retry_delay: Duration,
    pub connection_timeout: Duration,
    pub heartbeat: Duration,
}

/// Counters of a run (also useful to tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStats {
    pub published: u64,
    pub acked: u64,
    /// Acks saying `rebase`: the update's base is not of the aggregator's
    /// epoch (counted in `acked` too).
    pub rebased: u64,
    /// Acks refused: unsigned, not the aggregator's, or unreadable.
    pub acks_refused: u64,
    pub globals_applied: u64,
    pub globals_refused: u64,
    pub reconnects: u64,
    /// Updates published again because no ack came within the timeout.
    pub republished: u64,
    /// Sensor events published.
    pub events: u64,
    /// Bundle chunks received and taken.
    pub bundle_chunks: u64,
    /// Bundle offers refused (signature or contents) and chunks that did
    /// not match their offer.
    pub bundle_refused: u64,
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
    let Some(topics) = Topics::new(&cfg) else {
        tracing::error!(fleet = %cfg.fleet, device = %cfg.device, "invalid fleet or device name; uplink not started");
        return UplinkStats::default();
    };
    let (client, mut events) = AsyncClient::new(mqtt_options(&cfg, &topics.status), 256);
    // rumqttc gives a connect (TCP, TLS and CONNACK) 5 s by default; a
    // broker working through a reconnect storm's handshakes answers later
    // than that, and a device that gives up and retries only adds to the
    // queue (the soak's Mosquitto run collapsed this way). Whole seconds,
    // at least 1.
    events
        .network_options
        .set_connection_timeout(cfg.connection_timeout.as_secs().max(1));
    let mut session = Session::new(cfg, edge, client, topics);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick(), if session.connected => session.on_tick(),
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => session.on_connack(),
                Ok(Event::Incoming(Packet::Publish(p))) => session.on_publish(&p.topic, &p.payload),
                // The broker holds an update (its PUBACK); no ack of ours yet.
                Ok(Event::Incoming(Packet::PubAck(_))) if session.awaiting_acks() => {
                    dai_protocol::crashpoint::hit("edge-update-delivered");
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = session.on_connection_error(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut shutdown => break,
                    }
                }
            }
        }
    }
    session.stats
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
            device_key: None,
            tls: None,
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
