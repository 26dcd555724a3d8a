//! The aggregator over MQTT: an embedded broker (rumqttd) or an external one,
//! one task owning the rumqttc event loop.
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
use crate::intake::{Intake, IntakeConfig, Output, strategy_label};
use crate::monitor::Monitor;
use crate::state::{Settings, State};
use ed25519_dalek::SigningKey;
use futures::FutureExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        },
    )?;
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(false);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 256);
    // Publishing goes through a task of its own: `AsyncClient::publish`
    // waits while rumqttc's request queue is full, and only polling the
    // event loop (this task) drains it. Awaiting it here deadlocked under
    // a burst of updates (found by the ingest benchmark).
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outgoing>();
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
    let io = Io {
        client: &client,
        out: &out_tx,
        monitor: &monitor,
    };
    io.apply(intake.take_outputs());
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => intake.tick(Instant::now())?,
            ev = events.poll() => {
                // Take every event that is already there (up to the
                // intake's batch bound), so a burst of updates is ingested
                // in one transaction.
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = Duration::from_millis(100);
                            intake.connected();
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => intake.publish(&p.topic, &p.payload),
                        Ok(_) => {}
                        Err(e) => {
                            intake.disconnected();
                            io.apply(intake.take_outputs());
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connection lost");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            break;
                        }
                    }
                    io.apply(intake.take_outputs());
                    if !intake.batch_full() {
                        next = events.poll().now_or_never();
                    }
                }
                intake.flush(Instant::now())?;
            }
        }
        io.apply(intake.take_outputs());
    }
    drop(out_tx);
    publish_task.abort();
    Ok(intake.stats().clone())
}

/// A message for the publishing task.
struct Outgoing {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

/// Where the intake's outputs go.
struct Io<'a> {
    client: &'a AsyncClient,
    out: &'a tokio::sync::mpsc::UnboundedSender<Outgoing>,
    monitor: &'a Monitor,
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
                Output::Ack { topic, ack } => self.send(topic, false, ack.to_bytes()),
                Output::Global { topic, payload, .. } => self.send(topic, true, payload),
                Output::Monitor(event) => self.monitor.apply(event),
            }
        }
    }

    fn send(&self, topic: String, retain: bool, payload: Vec<u8>) {
        // Fails only once the publishing task is gone, at shutdown.
        let _ = self.out.send(Outgoing {
            topic,
            retain,
            payload,
        });
    }
}
