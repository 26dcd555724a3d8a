//! What the aggregator shows: Prometheus metrics (`/metrics`) and the live
//! view behind the status page (`/api/status`).
//!
//! The service loop is the only writer: it applies the [`MonitorEvent`]s
//! the sans-IO intake ([`crate::intake`]) emits; HTTP handlers read. Durable facts
//! (the version registry, seen ids) are read from SQLite by the handlers,
//! so the page is right even for versions made by `dai-cloud models
//! promote` in another process.

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// How many recent update outcomes the status page lists.
const RECENT: usize = 50;

/// One update's outcome, for the page.
#[derive(Debug, Clone, Serialize)]
pub struct RecentUpdate {
    pub ts: f64,
    pub device: String,
    pub update_id: String,
    pub bytes: usize,
    pub status: String,
    pub reason: Option<String>,
}

/// A device as its retained heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub state: String,
    pub models: BTreeMap<String, u64>,
    pub outbox_pending: u64,
    /// The heartbeat's own timestamp (Unix seconds).
    pub ts: f64,
}

/// How one update ended, the `outcome` label of `dai_cloud_updates_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// A redelivered id: acked again, counted once.
    Duplicate,
    Rejected,
    /// Its base is not of this version line: acked `rebase`.
    Rebase,
    /// The payload was not an update at all.
    Undecodable,
    /// Not authenticated (signature, unknown or revoked device, fleet):
    /// dropped without an ack.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
            Outcome::Rebase => "rebase",
            Outcome::Undecodable => "undecodable",
            Outcome::Refused => "refused",
        }
    }
}

/// What the intake reports; [`Monitor::apply`] turns it into metrics and
/// the live view. Wall-clock timestamps are taken when applied, so the
/// intake itself reads no clock.
#[derive(Debug, Clone, PartialEq)]
pub enum MonitorEvent {
    BrokerConnected,
    /// A state transaction failed (`Some`: what SQLite said), or one
    /// succeeded again after failures (`None`).
    StateError(Option<String>),
    /// The connection failed; `was_connected` counts it as a disconnect
    /// (a failed reconnect attempt does not count again).
    BrokerLost {
        was_connected: bool,
    },
    /// Compressed bytes received on an update topic.
    UpdateBytes(u64),
    /// A retained heartbeat; `None` (an empty retained message) clears the device.
    Heartbeat {
        device: String,
        view: Option<DeviceView>,
    },
    /// One update's outcome (its ack is published right after).
    Update {
        device: String,
        update_id: String,
        bytes: usize,
        outcome: Outcome,
        reason: Option<String>,
    },
    /// On a tier: partial aggregates waiting for the root's ack.
    Outbox(u64),
    /// Updates of `model` waiting for the next aggregation.
    Pending {
        model: String,
        count: usize,
    },
    /// `model` is served at `version`; `aggregated`: this process made it
    /// (counted in `dai_cloud_globals_published_total`).
    Global {
        model: String,
        version: u64,
        aggregated: bool,
    },
    /// Time an aggregation that produced a version took.
    AggregationSeconds(f64),
    /// Central DP: the epsilon a model's versions spent so far (infinite
    /// when a version was made without noise).
    Privacy {
        model: String,
        epsilon: f64,
    },
}

/// The live part of the status page.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LiveView {
    pub broker: String,
    pub broker_connected: bool,
    /// Subscriptions acknowledged on the current broker session (updates
    /// published before this are not delivered to the aggregator).
    pub subscriptions: u64,
    pub strategy: String,
    pub devices: BTreeMap<String, DeviceView>,
    pub recent: VecDeque<RecentUpdate>,
    /// Model -> Unix seconds of the last new global.
    pub last_global: BTreeMap<String, f64>,
    /// Model -> updates waiting for the next aggregation.
    pub pending: BTreeMap<String, usize>,
    /// Model -> epsilon spent (central DP on; `null` when infinite).
    pub dp_epsilon: BTreeMap<String, Option<f64>>,
    /// The state file's last write error while writes are failing (disk
    /// full, I/O): nothing is acked until a write succeeds again.
    pub state_error: Option<String>,
    /// Devices whose latest heartbeat says online, and the sum of their
    /// reported outboxes (kept with `devices`; wrapping, so a hostile
    /// report cannot overflow it, only make the figure wrong).
    pub online: usize,
    pub outbox: u64,
    /// On a tier: partial aggregates not yet acked upstream (`None` on a
    /// root).
    pub tier_outbox: Option<u64>,
}

/// Devices the live view holds (the status page's table; metrics count
/// the same map). At 10,000 devices a fleet uses a tenth of it.
pub const MAX_DEVICES: usize = 100_000;

/// Metrics and the live view, shared by the service loop and HTTP.
pub struct Monitor {
    pub registry: Registry,
    /// Updates received, by outcome: accepted, duplicate, rejected, undecodable.
    pub updates: Family<OutcomeLabel, Counter>,
    /// Compressed payload bytes received on update topics.
    pub update_bytes: Counter,
    pub globals_published: Family<ModelLabel, Counter>,
    pub global_version: Family<ModelLabel, Gauge>,
    pub pending_updates: Family<ModelLabel, Gauge>,
    /// Unix seconds of the last new global, per model (alert: aggregation stalled).
    pub last_aggregation: Family<ModelLabel, FGauge>,
    pub aggregation_seconds: Histogram,
    /// Central DP: epsilon spent per model (+Inf: a version without noise).
    pub dp_epsilon: Family<ModelLabel, FGauge>,
    pub devices_online: Gauge,
    pub devices_known: Gauge,
    /// Sum of the outbox backlogs the devices report in their heartbeats.
    pub devices_outbox: Gauge,
    pub broker_connected: Gauge,
    pub broker_disconnects: Counter,
    /// Failed state transactions (batches left unacked, aggregations not
    /// made); the service keeps running and retries.
    pub state_errors: Counter,
    /// Acks and globals dropped because the publish queue was full.
    pub publish_dropped: Counter,
    /// On a tier: partial aggregates not yet acked upstream.
    pub tier_outbox: Gauge,
    pub live: Mutex<LiveView>,
    pub started: Instant,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    pub fn new() -> Monitor {
        let mut registry = Registry::with_prefix("dai_cloud");
        let m = Monitor {
            registry: Registry::default(),
            updates: Family::default(),
            update_bytes: Counter::default(),
            globals_published: Family::default(),
            global_version: Family::default(),
            pending_updates: Family::default(),
            last_aggregation: Family::default(),
            aggregation_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            dp_epsilon: Family::default(),
            devices_online: Gauge::default(),
            devices_known: Gauge::default(),
            devices_outbox: Gauge::default(),
            broker_connected: Gauge::default(),
            broker_disconnects: Counter::default(),
            state_errors: Counter::default(),
            publish_dropped: Counter::default(),
            tier_outbox: Gauge::default(),
            live: Mutex::new(LiveView::default()),
            started: Instant::now(),
        };
        let r = &mut registry;
        r.register(
            "updates",
            "Updates received, by outcome (accepted, duplicate, rejected, undecodable)",
            m.updates.clone(),
        );
        r.register(
            "update_bytes",
            "Compressed update payload bytes received",
            m.update_bytes.clone(),
        );
        r.register(
            "globals_published",
            "New global versions signed and published",
            m.globals_published.clone(),
        );
        r.register(
            "dp_epsilon",
            "Central differential privacy: epsilon spent by the model's versions (at the configured delta)",
            m.dp_epsilon.clone(),
        );
        r.register(
            "global_version",
            "Newest global version per model",
            m.global_version.clone(),
        );
        r.register(
            "pending_updates",
            "Accepted updates waiting for the next aggregation",
            m.pending_updates.clone(),
        );
        r.register(
            "last_aggregation_timestamp_seconds",
            "Unix time of the newest global version per model",
            m.last_aggregation.clone(),
        );
        r.register(
            "aggregation_seconds",
            "Time to fold the pending buffer into a new global",
            m.aggregation_seconds.clone(),
        );
        r.register(
            "devices_online",
            "Devices whose retained heartbeat says online",
            m.devices_online.clone(),
        );
        r.register(
            "devices_known",
            "Devices that ever sent a heartbeat",
            m.devices_known.clone(),
        );
        r.register(
            "devices_outbox_pending",
            "Updates waiting in the devices' outboxes, as their heartbeats report",
            m.devices_outbox.clone(),
        );
        r.register(
            "broker_connected",
            "1 while the aggregator is connected to its MQTT broker",
            m.broker_connected.clone(),
        );
        r.register(
            "broker_disconnects",
            "Lost broker connections",
            m.broker_disconnects.clone(),
        );
        r.register(
            "publish_dropped",
            "Acks and globals dropped because the publish queue was full (acks come again when edges resend; globals on the next want)",
            m.publish_dropped.clone(),
        );
        r.register(
            "tier_outbox",
            "On a site or intake tier: partial aggregates sent upstream and not yet acked by the root",
            m.tier_outbox.clone(),
        );
        r.register(
            "state_errors",
            "State file transactions that failed (disk full, I/O): their updates were not acked and are sent again by the edges",
            m.state_errors.clone(),
        );
        Monitor { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }

    /// Apply one event of the intake.
    pub fn apply(&self, event: MonitorEvent) {
        match event {
            MonitorEvent::StateError(Some(e)) => {
                self.state_errors.inc();
                self.live.lock().state_error = Some(e);
            }
            MonitorEvent::StateError(None) => self.live.lock().state_error = None,
            MonitorEvent::BrokerConnected => {
                self.broker_connected.set(1);
                self.live.lock().broker_connected = true;
            }
            MonitorEvent::BrokerLost { was_connected } => {
                if was_connected {
                    self.broker_disconnects.inc();
                }
                self.broker_connected.set(0);
                let mut live = self.live.lock();
                live.broker_connected = false;
                live.subscriptions = 0;
            }
            MonitorEvent::UpdateBytes(n) => {
                self.update_bytes.inc_by(n);
            }
            MonitorEvent::Heartbeat { device, view } => self.heartbeat(device, view),
            MonitorEvent::Update {
                device,
                update_id,
                bytes,
                outcome,
                reason,
            } => {
                self.count(outcome.as_str());
                self.record(RecentUpdate {
                    ts: unix_now(),
                    device,
                    update_id,
                    bytes,
                    status: outcome.as_str().into(),
                    reason,
                });
            }
            MonitorEvent::Pending { model, count } => self.pending(&model, count),
            MonitorEvent::Outbox(n) => {
                self.tier_outbox.set(i64::try_from(n).unwrap_or(i64::MAX));
                self.live.lock().tier_outbox = Some(n);
            }
            MonitorEvent::Global {
                model,
                version,
                aggregated,
            } => {
                if aggregated {
                    self.globals_published
                        .get_or_create(&ModelLabel {
                            model: model.clone(),
                        })
                        .inc();
                }
                self.global(&model, version, unix_now());
            }
            MonitorEvent::AggregationSeconds(s) => self.aggregation_seconds.observe(s),
            MonitorEvent::Privacy { model, epsilon } => {
                self.dp_epsilon
                    .get_or_create(&ModelLabel {
                        model: model.clone(),
                    })
                    .set(epsilon);
                self.live
                    .lock()
                    .dp_epsilon
                    .insert(model, epsilon.is_finite().then_some(epsilon));
            }
        }
    }

    pub(crate) fn count(&self, outcome: &str) {
        self.updates
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub(crate) fn record(&self, update: RecentUpdate) {
        let mut live = self.live.lock();
        if live.recent.len() >= RECENT {
            live.recent.pop_back();
        }
        live.recent.push_front(update);
    }

    /// A heartbeat in: the map and its totals are kept incrementally (a
    /// heartbeat costs the same with 10 or 100,000 devices), and the map is
    /// bounded by [`MAX_DEVICES`]: a new device over the bound evicts the
    /// one heard from longest ago.
    pub(crate) fn heartbeat(&self, device: String, view: Option<DeviceView>) {
        let mut live = self.live.lock();
        let old = match view {
            Some(v) => {
                live.online += usize::from(v.state == "online");
                live.outbox = live.outbox.wrapping_add(v.outbox_pending);
                let old = live.devices.insert(device, v);
                if old.is_none() && live.devices.len() > MAX_DEVICES {
                    let oldest = live
                        .devices
                        .iter()
                        .min_by(|a, b| a.1.ts.total_cmp(&b.1.ts))
                        .map(|(k, _)| k.clone());
                    if let Some(evicted) = oldest.and_then(|k| live.devices.remove(&k)) {
                        live.online -= usize::from(evicted.state == "online");
                        live.outbox = live.outbox.wrapping_sub(evicted.outbox_pending);
                    }
                }
                old
            }
            // An empty retained message clears the device.
            None => live.devices.remove(&device),
        };
        if let Some(o) = old {
            live.online -= usize::from(o.state == "online");
            live.outbox = live.outbox.wrapping_sub(o.outbox_pending);
        }
        self.devices_online.set(live.online as i64);
        self.devices_known.set(live.devices.len() as i64);
        self.devices_outbox.set(live.outbox as i64);
    }

    pub(crate) fn pending(&self, model: &str, n: usize) {
        self.pending_updates
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .set(n as i64);
        self.live.lock().pending.insert(model.into(), n);
    }

    pub(crate) fn global(&self, model: &str, version: u64, ts: f64) {
        let label = ModelLabel {
            model: model.into(),
        };
        self.global_version
            .get_or_create(&label)
            .set(version as i64);
        self.last_aggregation.get_or_create(&label).set(ts);
        self.live.lock().last_global.insert(model.into(), ts);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
