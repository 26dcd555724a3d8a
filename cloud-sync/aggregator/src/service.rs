//! The aggregator over MQTT: an embedded broker (rumqttd) or an external one,
//! one task owning the rumqttc event loop.
//!
//! Updates on `dai/v1/{fleet}/dev/{device}/update`: every message already
//! received is taken in one go (up to [`MAX_BATCH`]), decoded (size-bounded)
//! and recorded by [`crate::state::State::ingest_batch`] in one transaction
//! (group commit); then each gets its ack on `.../dev/{device}/ack`, and
//! the models touched aggregate if the strategy says so (or the round timed
//! out): the new global is signed and published, retained, on
//! `dai/v1/{fleet}/model/{model}/global`. Device heartbeats
//! (`.../dev/{device}/status`) feed the [`Monitor`]. Publishing runs in a
//! task of its own (see `run_monitored`).

use crate::FedAdam;
use crate::monitor::{DeviceView, Monitor, RecentUpdate};
use crate::state::{NewGlobal, Settings, State, Strategy};
use dai_protocol::messages::{Ack, AckStatus, Status};
use dai_protocol::topics::{self, Topic};
use dai_protocol::update::Update;
use ed25519_dalek::SigningKey;
use futures::FutureExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The reason a redelivered update's ack carries (see [`State::ingest`]).
pub const DUPLICATE: &str = crate::state::DUPLICATE_REASON;

/// Service errors.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("broker: {0}")]
    Broker(String),
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
}

/// Figures of a finished run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub accepted: u64,
    pub rejected: u64,
    /// Redeliveries of an id already recorded (acked again, counted once).
    pub duplicates: u64,
    pub globals_published: u64,
}

/// Start rumqttd on `addr` in its own thread (MQTT 3.1.1). Keeps nothing
/// on disk: durability is the aggregator's SQLite and the edges' outboxes.
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
                max_payload_size: 16 << 20,
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
            max_segment_size: 100 << 20,
            max_segment_count: 10,
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

/// `"1.0.0"` (a bundle version: the shipped head) is global 0;
/// `"1.0.0+g7"` is global 7.
pub fn base_of(base_version: &str) -> Option<u64> {
    match base_version.rsplit_once("+g") {
        Some((_, g)) => g.parse().ok(),
        None => (!base_version.is_empty()).then_some(0),
    }
}

/// Run until `shutdown` resolves, with a private [`Monitor`].
pub async fn run(
    cfg: ServiceConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ServiceStats, ServiceError> {
    run_monitored(cfg, Arc::new(Monitor::new()), shutdown).await
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Run until `shutdown` resolves, reporting to `monitor` (metrics and the
/// status page).
pub async fn run_monitored(
    cfg: ServiceConfig,
    monitor: Arc<Monitor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ServiceStats, ServiceError> {
    let mut state = State::open(&cfg.state_path)?;
    for (model, head) in &cfg.models {
        state.register(model, head)?;
    }
    {
        let mut live = monitor.live.lock();
        live.broker = format!("{}:{}", cfg.broker.host, cfg.broker.port);
        live.strategy = match cfg.settings.strategy {
            Strategy::FedAvg { min_updates } => {
                format!("fedavg (min {min_updates} updates per round)")
            }
            Strategy::FedBuff { k } => format!("fedbuff (K = {k})"),
        } + match (&cfg.server_optimizer, cfg.settings.aggregation.robust) {
            (Some(_), _) => ", FedAdam",
            (None, crate::Robust::Median) => ", median",
            (None, crate::Robust::TrimmedMean { .. }) => ", trimmed mean",
            (None, crate::Robust::Mean) => "",
        };
    }
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(false);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 256);
    // Publishing goes through a task of its own: `AsyncClient::publish`
    // waits while rumqttc's request queue is full, and only polling the
    // event loop (this task) drains it. Awaiting it here deadlocked under
    // a burst of updates (found by the ingest benchmark).
    let (out, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outgoing>();
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
    let mut stats = ServiceStats::default();
    let mut round_started: Option<Instant> = None;
    let mut adam = cfg.server_optimizer.clone();
    // What was last published per model; a newer version in the state file
    // (made by `dai-cloud models promote|rollback` in another process) is
    // published on the next tick.
    let mut published: HashMap<String, u64> = HashMap::new();
    for (model, _) in &cfg.models {
        let (version, head) = state.current(model)?;
        monitor.global(model, version, now());
        monitor.pending(model, state.pending_count(model)?);
        // The current global (retained) for late joiners.
        if version > 0 {
            publish_global(&out, &cfg, model, &head);
        }
        published.insert(model.clone(), version);
    }
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut backoff = Duration::from_millis(100);
    let aggregate = |state: &mut State, model: &str, force: bool, adam: &mut Option<FedAdam>| {
        let t = Instant::now();
        let g = state.aggregate(model, &cfg.settings, force, adam)?;
        if g.is_some() {
            monitor
                .aggregation_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        Ok::<_, ServiceError>(g)
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                if let Some(started) = round_started
                    && started.elapsed() >= cfg.round_timeout
                {
                    for (model, _) in &cfg.models {
                        if let Some(g) = aggregate(&mut state, model, true, &mut adam)? {
                            tracing::info!(model = %g.model, version = g.version, updates = g.contributors.len(), "round timed out; global published");
                            publish_new(&out, &cfg, &monitor, &g);
                            published.insert(g.model.clone(), g.version);
                            stats.globals_published += 1;
                        }
                        monitor.pending(model, state.pending_count(model)?);
                    }
                    round_started = None;
                }
                for (model, _) in &cfg.models {
                    let (version, head) = state.current(model)?;
                    if published.get(model).is_none_or(|&p| p < version) {
                        tracing::info!(%model, version, "publishing a version made outside this process (promote or rollback)");
                        publish_global(&out, &cfg, model, &head);
                        monitor.global(model, version, now());
                        published.insert(model.clone(), version);
                    }
                }
            }
            ev = events.poll() => {
                // Take every event that is already there (up to a bound),
                // so a burst of updates is ingested in one transaction.
                let mut batch: Vec<Incoming> = Vec::new();
                let mut batch_values = 0usize;
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = Duration::from_millis(100);
                            monitor.broker_connected.set(1);
                            monitor.live.lock().broker_connected = true;
                            for filter in [topics::all_updates(&cfg.fleet), topics::all_status(&cfg.fleet)] {
                                if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                                    tracing::error!(error = %e, "subscribe failed");
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => match Topic::parse(&p.topic) {
                            Ok(Topic::Update { device, .. }) => {
                                monitor.update_bytes.inc_by(p.payload.len() as u64);
                                let update = Update::decode(&p.payload);
                                batch_values += update.as_ref().map_or(0, |u| u.tensors.iter().map(|t| t.values.len()).sum());
                                batch.push(Incoming { device, bytes: p.payload.len(), update });
                            }
                            Ok(Topic::Status { device, .. }) => {
                                if p.payload.is_empty() {
                                    monitor.heartbeat(device, None);
                                } else {
                                    match serde_json::from_slice::<Status>(&p.payload) {
                                        Ok(s) => monitor.heartbeat(device, Some(DeviceView { state: s.state, models: s.models, outbox_pending: s.outbox_pending, ts: s.ts })),
                                        Err(e) => tracing::warn!(%device, error = %e, "unreadable heartbeat"),
                                    }
                                }
                            }
                            _ => tracing::warn!(topic = %p.topic, "ignoring a message on an unexpected topic"),
                        },
                        Ok(_) => {}
                        Err(e) => {
                            if monitor.live.lock().broker_connected {
                                monitor.broker_disconnects.inc();
                            }
                            monitor.broker_connected.set(0);
                            monitor.live.lock().broker_connected = false;
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connection lost");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            break;
                        }
                    }
                    // Bounded by count and by decoded size, so a burst of
                    // large updates is ingested in several transactions
                    // instead of being held in memory at once.
                    if batch.len() < MAX_BATCH && batch_values < MAX_BATCH_VALUES {
                        next = events.poll().now_or_never();
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let decoded: Vec<&Update> = batch.iter().filter_map(|b| b.update.as_ref().ok()).collect();
                let mut acks = state.ingest_batch(&decoded, &cfg.settings, base_of)?.into_iter();
                let mut touched: Vec<String> = Vec::new();
                for b in &batch {
                    let (ack, outcome) = match &b.update {
                        Ok(update) => {
                            let Some(ack) = acks.next() else { break };
                            let outcome = if ack.status == AckStatus::Accepted && ack.reason.is_none() {
                                stats.accepted += 1;
                                round_started.get_or_insert_with(Instant::now);
                                if !touched.contains(&update.meta.model) {
                                    touched.push(update.meta.model.clone());
                                }
                                "accepted"
                            } else if ack.status == AckStatus::Rejected && ack.reason.as_deref() != Some(DUPLICATE) {
                                stats.rejected += 1;
                                tracing::warn!(device = %b.device, update = %ack.update_id, reason = ?ack.reason, "update rejected");
                                "rejected"
                            } else {
                                stats.duplicates += 1;
                                tracing::info!(device = %b.device, update = %ack.update_id, "duplicate delivery acked again; counted once");
                                "duplicate"
                            };
                            (ack, outcome)
                        }
                        Err(e) => {
                            stats.rejected += 1;
                            tracing::warn!(device = %b.device, bytes = b.bytes, error = %e, "undecodable update");
                            (Ack { update_id: String::new(), status: AckStatus::Rejected, reason: Some(format!("undecodable update: {e}")), round: None }, "undecodable")
                        }
                    };
                    monitor.count(outcome);
                    monitor.record(RecentUpdate {
                        ts: now(),
                        device: b.device.clone(),
                        update_id: ack.update_id.clone(),
                        bytes: b.bytes,
                        status: outcome.into(),
                        reason: ack.reason.clone(),
                    });
                    // Acks only after the commit above: an acked update is on disk.
                    if let Ok(topic) = (Topic::Ack { fleet: cfg.fleet.clone(), device: b.device.clone() }).build() {
                        let _ = out.send(Outgoing { topic, retain: false, payload: ack.to_bytes() });
                    }
                }
                for model in touched {
                    if let Some(g) = aggregate(&mut state, &model, false, &mut adam)? {
                        tracing::info!(model = %g.model, version = g.version, updates = g.contributors.len(), "global published");
                        publish_new(&out, &cfg, &monitor, &g);
                        published.insert(g.model.clone(), g.version);
                        stats.globals_published += 1;
                        round_started = None;
                    }
                    monitor.pending(&model, state.pending_count(&model)?);
                }
            }
        }
    }
    drop(out);
    publish_task.abort();
    Ok(stats)
}

/// Most updates ingested in one transaction.
const MAX_BATCH: usize = 256;
/// Most decoded f32 values held for one batch (64 MiB).
const MAX_BATCH_VALUES: usize = 16 << 20;

/// An update as it arrived, decoded or not.
struct Incoming {
    device: String,
    bytes: usize,
    update: Result<Update, dai_protocol::ProtocolError>,
}

/// A message for the publishing task.
struct Outgoing {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

type Out = tokio::sync::mpsc::UnboundedSender<Outgoing>;

fn publish_new(out: &Out, cfg: &ServiceConfig, monitor: &Monitor, g: &NewGlobal) {
    publish_global(out, cfg, &g.model, &g.head_file);
    monitor
        .globals_published
        .get_or_create(&crate::monitor::ModelLabel {
            model: g.model.clone(),
        })
        .inc();
    monitor.global(&g.model, g.version, now());
}

fn publish_global(out: &Out, cfg: &ServiceConfig, model: &str, head_file: &[u8]) {
    let wire = dai_protocol::global::sign(head_file, &cfg.signing_key);
    match (Topic::Global {
        fleet: cfg.fleet.clone(),
        model: model.to_string(),
    })
    .build()
    {
        Ok(topic) => {
            let _ = out.send(Outgoing {
                topic,
                retain: true,
                payload: wire,
            });
        }
        Err(e) => tracing::error!(error = %e, "bad global topic"),
    }
}
