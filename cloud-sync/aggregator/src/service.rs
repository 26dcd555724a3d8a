//! The aggregator over MQTT: an embedded broker (rumqttd) or an external one,
//! one service loop owning the intake, fed by a task that polls the rumqttc
//! event loop (see [`spawn_event_pump`]: its poll must never be cancelled).
//!
//! This is the I/O half; the decisions are in [`crate::intake`] (sans-IO).
//! The loop feeds the intake what happens — the broker session coming and
//! going, incoming publishes, a 250 ms tick — and carries out its outputs:
//! subscriptions, acks and signed retained globals (through a publishing
//! task of its own, see [`run_monitored`]) and [`Monitor`] updates.
//!
//! Updates on `dai/v1/{fleet}/dev/{device}/update`: every message already
//! received is taken in one go (up to [`crate::intake::MAX_BATCH`]),
//! decoded (size-bounded) and recorded by
//! [`crate::state::State::ingest_batch`] in one transaction (group
//! commit); then each gets its ack on `.../dev/{device}/ack`, and the
//! models touched aggregate if the strategy says so (or the round timed
//! out): the new global is signed and published, retained, on
//! `dai/v1/{fleet}/model/{model}/global`. Device heartbeats
//! (`.../dev/{device}/status`) feed the [`Monitor`].

use crate::FedAdam;
use crate::auth::{DeviceAuth, DeviceKeys};
use crate::gate::{GateConfig, GateStats};
use crate::intake::{Intake, IntakeConfig, Output, strategy_label};
use crate::monitor::{Monitor, MonitorEvent};
use crate::state::{Settings, State};
use dai_trust::Revocations;
use dai_trust::fs::FleetDir;
use ed25519_dalek::SigningKey;
use parking_lot::RwLock;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use crate::intake::{ServiceStats, base_of};

/// The reason a redelivered update's ack carries (see [`State::ingest`]).
pub const DUPLICATE: &str = crate::state::DUPLICATE_REASON;

/// Service errors.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("broker: {0}")]
    Broker(String),
    #[error("fleet directory")]
    Fleet(#[from] dai_trust::TrustError),
}

/// Where the broker is.
#[derive(Debug, Clone)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub fleet: String,
    pub broker: BrokerAddr,
    pub client_id: String,
    pub state_path: PathBuf,
    /// (model, base head file) registered as version 0.
    pub models: Vec<(String, Vec<u8>)>,
    pub settings: Settings,
    pub round_timeout: Duration,
    pub signing_key: SigningKey,
    /// Server optimiser (FedAdam); `None` adds the aggregated delta as is.
    pub server_optimizer: Option<FedAdam>,
    /// How updates are authenticated ([`DeviceAuth::Signed`] unless
    /// `--insecure-plaintext`).
    pub devices: DeviceAuth,
    /// Re-read for enrolments and revocations (every [`FLEET_POLL`]).
    pub fleet_dir: Option<FleetWatch>,
    /// Mutual TLS to the broker (an external one); `None` is plain TCP
    /// (the embedded broker's loopback side, or `--insecure-plaintext`).
    pub tls: Option<Arc<dai_trust::tls::ClientConfig>>,
    /// Enrolled names whose partial aggregates are counted (`--tier`).
    pub tiers: Vec<String>,
    /// Run as a tier: partial aggregates go up this link, globals come
    /// down it (`--role site|intake --upstream`); `None`: a root.
    pub upstream: Option<crate::upstream::UpstreamConfig>,
    /// Updates through this MQTT shared-subscription group (`--share-group`).
    pub share_group: Option<String>,
}

/// How long a stopping tier waits for the root to ack what it folded.
pub const TIER_DRAIN: Duration = Duration::from_secs(20);

/// How often the fleet directory is checked for a changed registry.
pub const FLEET_POLL: Duration = Duration::from_secs(1);

/// The fleet directory as the running service follows it: a changed
/// `devices.json` gives the intake new keys and the gate new revocations
/// (a revoked device is refused within [`FLEET_POLL`]).
#[derive(Debug, Clone)]
pub struct FleetWatch {
    pub dir: FleetDir,
    /// Shared with the gate of the embedded broker.
    pub revocations: Arc<RwLock<Revocations>>,
    seen: Option<(SystemTime, u64)>,
}

impl FleetWatch {
    /// Reads the registry now (it must be readable at start).
    pub fn open(dir: FleetDir) -> Result<(FleetWatch, DeviceKeys), ServiceError> {
        let registry = dir.load_registry()?;
        let keys = DeviceKeys::from_registry(&registry)?;
        let mut w = FleetWatch {
            revocations: Arc::new(RwLock::new(registry.revocations())),
            seen: None,
            dir,
        };
        w.seen = w.stamp();
        Ok((w, keys))
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(self.dir.path(dai_trust::fs::FLEET_DEVICES)).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// New keys if `devices.json` changed since the last look. A registry
    /// that cannot be read is logged and the old one kept (a half-written
    /// file is never seen: the CLI writes by rename).
    pub fn poll(&mut self) -> Option<DeviceKeys> {
        let stamp = self.stamp();
        if stamp == self.seen {
            return None;
        }
        self.seen = stamp;
        let loaded = self
            .dir
            .load_registry()
            .and_then(|r| Ok((DeviceKeys::from_registry(&r)?, r.revocations())));
        match loaded {
            Ok((keys, revocations)) => {
                *self.revocations.write() = revocations;
                Some(keys)
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "the device registry changed but cannot be read; keeping the previous one");
                None
            }
        }
    }
}

/// Start the embedded broker behind its mutual-TLS gate: rumqttd on a free
/// loopback port, and the gate ([`crate::gate`]) on `listen`. Returns
/// rumqttd's loopback address (the aggregator's own connection, in the
/// same process) and the gate's counters.
pub async fn start_secure_broker(
    listen: SocketAddr,
    fleet: &str,
    ca_pem: String,
    tls: Arc<dai_trust::tls::ServerConfig>,
    revocations: Arc<RwLock<Revocations>>,
) -> Result<(SocketAddr, Arc<GateStats>), ServiceError> {
    let broker_err = |e: std::io::Error| ServiceError::Broker(e.to_string());
    let upstream = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(broker_err)?;
    start_embedded_broker(upstream)?;
    // rumqttd binds in its own thread: wait until it listens.
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(upstream).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !up {
        return Err(ServiceError::Broker(format!(
            "the embedded broker did not start on {upstream}"
        )));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServiceError::Broker(format!("binding {listen}: {e}")))?;
    let stats = Arc::new(GateStats::default());
    let cfg = GateConfig {
        fleet: fleet.to_string(),
        ca_pem,
        tls,
        upstream,
        revocations,
    };
    tokio::spawn(crate::gate::serve(listener, cfg, stats.clone()));
    Ok((upstream, stats))
}

/// The embedded broker's log segment size and how many it keeps per
/// filter beside the active one (it used to keep 10 of 100 MiB).
pub const BROKER_SEGMENT_BYTES: usize = 4 << 20;
pub const BROKER_SEGMENTS: usize = 3;

/// Start rumqttd on `addr` in its own thread (MQTT 3.1.1). Keeps nothing
/// on disk: durability is the aggregator's SQLite and the edges' outboxes.
///
/// Memory: rumqttd keeps one log per subscribed filter (the aggregator's
/// four device wildcards and the globals, one ack topic per device) of at
/// most `(BROKER_SEGMENTS + 1) × (BROKER_SEGMENT_BYTES + the largest
/// message on it)`, and one retained message per topic. In secure mode the
/// gate bounds both: a device publishes only on its four topics, within
/// [`dai_protocol::limits`], and retains only its status. So one device
/// can pin at most about 4 × 12 MiB in the update log, and the retained
/// store is 16 KiB a device plus the globals. A message dropped when a log
/// rolls before a slow subscriber read it is not lost: updates are acked
/// end to end, so the edge sends it again. Sized for about 1,000 devices;
/// large fleets use Mosquitto or a broker cluster (`deploy/`).
pub fn start_embedded_broker(addr: SocketAddr) -> Result<(), ServiceError> {
    let mut v4 = std::collections::HashMap::new();
    v4.insert(
        "v4".to_string(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: dai_protocol::limits::MAX_MESSAGE_BYTES + 1024,
                max_inflight_count: 200,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: BROKER_SEGMENT_BYTES,
            max_segment_count: BROKER_SEGMENTS,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("dai-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| ServiceError::Broker(e.to_string()))?;
    Ok(())
}

/// Run until `shutdown` resolves, with a private [`Monitor`].
pub async fn run(
    cfg: ServiceConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ServiceStats, ServiceError> {
    run_monitored(cfg, Arc::new(Monitor::new()), shutdown).await
}

/// Run until `shutdown` resolves, reporting to `monitor` (metrics and the
/// status page).
pub async fn run_monitored(
    cfg: ServiceConfig,
    monitor: Arc<Monitor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ServiceStats, ServiceError> {
    let state = State::open(&cfg.state_path)?;
    {
        let mut live = monitor.live.lock();
        live.broker = format!("{}:{}", cfg.broker.host, cfg.broker.port);
        live.strategy = strategy_label(&cfg.settings, cfg.server_optimizer.as_ref());
    }
    let mut intake = Intake::new(
        state,
        IntakeConfig {
            fleet: cfg.fleet.clone(),
            models: cfg.models.clone(),
            settings: cfg.settings.clone(),
            round_timeout: cfg.round_timeout,
            signing_key: cfg.signing_key.clone(),
            server_optimizer: cfg.server_optimizer.clone(),
            devices: cfg.devices.clone(),
        },
    )?;
    intake.set_tiers(cfg.tiers.clone());
    intake.set_share_group(cfg.share_group.clone());
    if let Some(up) = &cfg.upstream {
        intake.set_tier(up.tier.clone());
    }
    let mut link = cfg.upstream.as_ref().map(crate::upstream::Link::start);
    let mut fleet_dir = cfg.fleet_dir.clone();
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_keep_alive(Duration::from_secs(10));
    // A clean session: the id is unique per process (nobody can take over
    // a queued session by reusing a well-known id), and what is published
    // while no aggregator is connected stays in the edges' outboxes, which
    // send it again when no ack comes.
    opts.set_clean_session(true);
    if let Some(tls) = &cfg.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, events) = AsyncClient::new(opts, 256);
    let (mut events, pump) = spawn_event_pump(events);
    // Publishing goes through a task of its own: `AsyncClient::publish`
    // waits while rumqttc's request queue is full, and only polling the
    // event loop (this task) drains it. Awaiting it here deadlocked under
    // a burst of updates (found by the ingest benchmark).
    // Bounded: a broker that stops taking publishes must not grow this
    // process without limit. What does not fit is dropped and counted;
    // both kinds recover by themselves (an edge resends an unacked update
    // and gets its ack again from `seen`; a lost global is published again
    // on the next want or retained-message check).
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Outgoing>(OUTGOING_CAPACITY);
    let publisher = client.clone();
    let publish_task = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            if let Err(e) = publisher
                .publish(o.topic, QoS::AtLeastOnce, o.retain, o.payload)
                .await
            {
                tracing::error!(error = %e, "message not queued");
            }
        }
    });
    let up = link.as_ref().map(|l| (l.client.clone(), l.out.clone()));
    let io = Io {
        client: &client,
        out: &out_tx,
        monitor: &monitor,
        up: up.as_ref(),
    };
    io.apply(intake.take_outputs());
    tokio::pin!(shutdown);
    let every =
        |period: Duration| tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut tick = every(Duration::from_millis(250));
    let mut fleet_poll = every(FLEET_POLL);
    let mut failing = false;
    let mut drain_until: Option<Instant> = None;
    loop {
        if let Some(until) = drain_until {
            let left = intake.outbox_len().unwrap_or(0);
            if left == 0 || Instant::now() >= until {
                if left > 0 {
                    tracing::warn!(
                        outbox = left,
                        "stopping with partials not acked upstream: they stay in the state file for the next start"
                    );
                }
                break;
            }
        }
        tokio::select! {
            // A tier does not leave with updates it acked: it folds its
            // open rounds and waits (bounded) for the root's acks.
            _ = &mut shutdown, if drain_until.is_none() => {
                if !intake.is_tier() {
                    break;
                }
                let r = intake.drain(Instant::now());
                state_health(&monitor, r, &mut failing);
                tracing::info!(outbox = intake.outbox_len().unwrap_or(0), "stopping: sending the open rounds upstream first");
                drain_until = Some(Instant::now() + TIER_DRAIN);
            }
            _ = tick.tick() => {
                let r = intake.tick(Instant::now());
                state_health(&monitor, r, &mut failing);
            }
            _ = fleet_poll.tick(), if fleet_dir.is_some() => {
                if let Some(keys) = fleet_dir.as_mut().and_then(FleetWatch::poll) {
                    intake.set_devices(keys);
                }
            }
            ev = crate::upstream::next(&mut link) => {
                let Some((ev, _permit)) = ev else { break };
                let r = match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("upstream broker session up");
                        intake.upstream_connected()
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => intake.upstream_publish(&p.topic, &p.payload),
                    Ok(_) => Ok(()),
                    Err(_) => {
                        intake.upstream_disconnected();
                        Ok(())
                    }
                };
                state_health(&monitor, r, &mut failing);
            }
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                // Take every event that is already there (up to the
                // intake's batch bound), so a burst of updates is ingested
                // in one transaction.
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    match ev.0 {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => intake.connected(),
                        Ok(Event::Incoming(Packet::Publish(p))) => intake.publish(&p.topic, &p.payload),
                        Ok(Event::Incoming(Packet::SubAck(_))) => monitor.live.lock().subscriptions += 1,
                        Ok(_) => {}
                        Err(_) => {
                            intake.disconnected();
                            io.apply(intake.take_outputs());
                            break;
                        }
                    }
                    io.apply(intake.take_outputs());
                    if !intake.batch_full() {
                        next = events.try_recv().ok();
                    }
                }
                let r = intake.flush(Instant::now());
                state_health(&monitor, r, &mut failing);
            }
        }
        io.apply(intake.take_outputs());
    }
    drop(out_tx);
    drop(link);
    publish_task.abort();
    // Dropping the event loop closes the broker connection.
    pump.abort();
    Ok(intake.stats().clone())
}

/// A failed state transaction does not end the service (a full disk or an
/// I/O error is usually temporary): the batch it held was not acked, so
/// the edges send it again; it is logged, counted and shown until a later
/// transaction succeeds.
fn state_health(monitor: &Monitor, r: Result<(), crate::state::StateError>, failing: &mut bool) {
    match r {
        Ok(()) if *failing => {
            *failing = false;
            tracing::info!("state writes succeed again");
            monitor.apply(MonitorEvent::StateError(None));
        }
        Ok(()) => {}
        Err(e) => {
            let msg = crate::error_chain(&e);
            if !std::mem::replace(failing, true) {
                tracing::error!(error = %msg, "a state transaction failed: nothing it held was acked; retrying with the next updates");
            }
            monitor.apply(MonitorEvent::StateError(Some(msg)));
        }
    }
}

/// Bytes of received payloads waiting for the service loop (the pump stops
/// reading the broker beyond it, so TCP pushes back).
pub const INCOMING_BYTES: usize = 64 << 20;
/// Events waiting for the service loop: a whole batch.
const INCOMING_EVENTS: usize = crate::intake::MAX_BATCH;

/// An event with its share of [`INCOMING_BYTES`], given back when dropped.
pub(crate) type Pumped = (
    Result<Event, rumqttc::ConnectionError>,
    tokio::sync::OwnedSemaphorePermit,
);

/// Polls rumqttc's event loop in a task of its own and hands the events
/// over a bounded channel. `EventLoop::poll` is not cancel-safe while it
/// connects (TCP, TLS and the CONNACK happen inside one poll): polled in a
/// `select!` next to the 250 ms tick, every connect that took longer than
/// a tick was dropped and begun again, so an aggregator whose broker was
/// slow to answer (a reconnect storm's handshakes, a loaded host) never
/// got back (found by the soak's load generator, which had the same
/// pattern). A channel's `recv` is cancel-safe. The backoff after a
/// connection error is here, where the retries happen.
pub(crate) fn spawn_event_pump(
    mut events: rumqttc::EventLoop,
) -> (
    tokio::sync::mpsc::Receiver<Pumped>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Pumped>(INCOMING_EVENTS);
    let budget = Arc::new(tokio::sync::Semaphore::new(INCOMING_BYTES));
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let ev = events.poll().await;
            let bytes = match &ev {
                Ok(Event::Incoming(Packet::Publish(p))) => p.payload.len().min(INCOMING_BYTES),
                _ => 0,
            };
            let Ok(permit) = budget
                .clone()
                .acquire_many_owned(u32::try_from(bytes).unwrap_or(u32::MAX))
                .await
            else {
                break;
            };
            let wait = match &ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connection lost");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    Some(w)
                }
                Ok(_) => None,
            };
            if tx.send((ev, permit)).await.is_err() {
                break;
            }
            if let Some(w) = wait {
                tokio::time::sleep(w).await;
            }
        }
    });
    (rx, task)
}

/// Messages waiting for the publishing task.
pub const OUTGOING_CAPACITY: usize = 4096;

/// A message for the publishing task.
pub(crate) struct Outgoing {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
}

/// Where the intake's outputs go.
struct Io<'a> {
    client: &'a AsyncClient,
    out: &'a tokio::sync::mpsc::Sender<Outgoing>,
    monitor: &'a Monitor,
    /// The upstream link's client and publishing queue (a tier).
    up: Option<&'a (AsyncClient, tokio::sync::mpsc::Sender<Outgoing>)>,
}

impl Io<'_> {
    fn apply(&self, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Subscribe(filter) => {
                    if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "subscribe failed");
                    }
                }
                Output::Ack { topic, payload, .. } => self.send(topic, false, payload),
                Output::Global { topic, payload, .. } => self.send(topic, true, payload),
                Output::Send {
                    topic,
                    retain,
                    payload,
                } => self.send(topic, retain, payload),
                Output::Monitor(event) => self.monitor.apply(event),
                Output::Upstream(u) => self.upstream(u),
            }
        }
    }

    fn upstream(&self, u: crate::intake::tier::Upstream) {
        use crate::intake::tier::Upstream;
        let Some((client, out)) = self.up else { return };
        match u {
            Upstream::Subscribe(filter) => {
                if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "upstream subscribe failed");
                }
            }
            // Dropped when full: it stays in the outbox and goes again on
            // the next upstream session.
            Upstream::Publish { topic, payload } => {
                if out
                    .try_send(Outgoing {
                        topic,
                        retain: false,
                        payload,
                    })
                    .is_err()
                {
                    tracing::warn!(
                        "upstream queue full: partial stays in the outbox for the next session"
                    );
                }
            }
        }
    }

    fn send(&self, topic: String, retain: bool, payload: Vec<u8>) {
        let msg = Outgoing {
            topic,
            retain,
            payload,
        };
        match self.out.try_send(msg) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(m)) => {
                self.monitor.publish_dropped.inc();
                tracing::warn!(topic = %m.topic, "publish queue full: message dropped (an ack is sent again when the edge resends; a global on the next want)");
            }
            // The publishing task is gone: shutdown.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}
