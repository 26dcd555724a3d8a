//! The aggregator's sans-IO core: everything the service does between
//! receiving an MQTT message and publishing one, without a socket, a
//! timer or a task (after rumqttc's `state.rs`; [`crate::service`] is the
//! `eventloop.rs` around it).
//!
//! In: [`Intake::connected`] / [`Intake::disconnected`] (the broker
//! session), [`Intake::publish`] (an incoming publish: topic and payload
//! bytes), [`Intake::flush`] (the batch so far is complete),
//! [`Intake::tick`] (the periodic timer) and [`Intake::set_devices`] (the
//! enrolled devices changed). Time comes in as an `Instant`
//! argument, so a test can jump past a round timeout.
//!
//! Out: [`Output`]s, taken with [`Intake::take_outputs`] in the order they
//! must happen: topics to subscribe, acks, signed globals to publish
//! retained, and [`MonitorEvent`]s for metrics and the status page.
//! There is no "published" confirmation input: acks and globals go out
//! QoS 1 and rumqttc redelivers them itself, so nothing here waits on one.
//!
//! The intake drives the SQLite [`State`] directly. It is synchronous and
//! local (not network I/O), and ingest and aggregation are transactions
//! whose results decide the acks, so returning "ingest this" commands
//! would only make the loop hand the answers back. An ack is emitted only
//! after its update's transaction committed. Log lines go to `tracing`
//! directly: they need no ordering with the outputs.
//!
//! Every update is authenticated first ([`crate::auth`]): an update that
//! is not signed by the enrolled, unrevoked device its topic names is
//! refused, counted by reason and not acked; a signed update whose
//! payload names another device is rejected with an ack. Acks are signed
//! for their topic ([`dai_protocol::signed`]); globals are signed over
//! fleet, model, version and the state's epoch. A want (a device's
//! request for a newer global) or a retained global that is not the one
//! last signed (cleared or overwritten) publishes the current global again
//! on the next tick.
//!
//! Updates are batched: [`Intake::publish`] decodes and buffers them until
//! [`Intake::batch_full`] or [`Intake::flush`]; the flush records the whole
//! batch in one transaction (group commit), acks each update, and
//! aggregates the models it touched when their strategy says so.

use crate::FedAdam;
use crate::auth::{DeviceAuth, DeviceKeys, Refusal};
use crate::monitor::{DeviceView, MonitorEvent, Outcome};
use crate::state::{DUPLICATE_REASON, NewGlobal, Settings, State, StateError};
use dai_protocol::messages::{Ack, AckStatus, Status, Want};
use dai_protocol::partial::Partial;
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::{self, Topic};
use dai_protocol::update::MAX_WIRE_BYTES;
use dai_protocol::update::{Undecodable, Update};
use ed25519_dalek::SigningKey;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Filters subscribed on each broker session ([`Intake::connected`]).
pub const SUBSCRIPTIONS: u64 = 8;

/// Most updates ingested in one transaction.
pub const MAX_BATCH: usize = 256;
/// Most decoded f32 values held for one batch (64 MiB).
pub const MAX_BATCH_VALUES: usize = 16 << 20;

/// What the intake needs of the service configuration.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    pub fleet: String,
    /// (model, base head file) registered as version 0.
    pub models: Vec<(String, Vec<u8>)>,
    pub settings: Settings,
    /// A FedAvg round with at least one update closes after this long.
    pub round_timeout: Duration,
    pub signing_key: SigningKey,
    /// Server optimiser (FedAdam); `None` adds the aggregated delta as is.
    pub server_optimizer: Option<FedAdam>,
    /// Which devices may submit, and how that is checked.
    pub devices: DeviceAuth,
}

/// Something the I/O loop must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Subscribe to this filter (QoS 1).
    Subscribe(String),
    /// Publish `ack` on `topic` (QoS 1, not retained); `payload` is the
    /// ack signed with the aggregator's key for that topic.
    Ack {
        topic: String,
        ack: Ack,
        payload: Vec<u8>,
    },
    /// Publish a signed global model on `topic` (QoS 1, retained).
    Global {
        topic: String,
        model: String,
        version: u64,
        /// `dai_protocol::global::sign` of the version's head file (fleet,
        /// model, version and epoch signed).
        payload: Vec<u8>,
    },
    /// Publish `payload` on `topic` (QoS 1): bundle offers (retained) and
    /// chunks ([`bundles`]).
    Send {
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    },
    Monitor(MonitorEvent),
    /// For the upstream broker (a tier only, [`tier`]).
    Upstream(tier::Upstream),
}

/// Figures of a finished run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub accepted: u64,
    pub rejected: u64,
    /// Redeliveries of an id already recorded (acked again, counted once).
    pub duplicates: u64,
    pub globals_published: u64,
    /// Updates refused before decoding (no ack), by
    /// [`Refusal::label`]: bad or missing signature, unknown or revoked
    /// device, another fleet; and `rate_limited` (over the device's
    /// updates a minute).
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// Pending updates replaced by a newer one of the same device and base.
    pub superseded: u64,
    /// Updates on a base this state does not have (another epoch, or a
    /// version it never made): acked `rebase`, the current global
    /// published again.
    pub rebased: u64,
    /// Tiers' partial aggregates counted, and the updates they folded.
    pub partials: u64,
    pub partial_votes: u64,
    /// Partial aggregates refused with an ack (already counted
    /// contributors, a base or norm refused, undecodable).
    pub partials_rejected: u64,
}

/// `"1.0.0"` (a bundle version: the shipped head) is global 0;
/// `"1.0.0+g7@e<epoch>"` (or `"1.0.0+g7"` from an older edge) is global 7
/// ([`dai_protocol::base`]; the epoch is checked by [`crate::validate`]).
pub fn base_of(base_version: &str) -> Option<u64> {
    dai_protocol::base::parse(base_version).map(|b| b.version)
}

/// The strategy as the status page names it.
pub fn strategy_label(settings: &Settings, server_optimizer: Option<&FedAdam>) -> String {
    use crate::state::Strategy;
    let base = match settings.strategy {
        Strategy::FedAvg { min_updates } => {
            format!("fedavg (min {min_updates} updates per round)")
        }
        Strategy::FedBuff { k } => format!("fedbuff (K = {k})"),
    };
    let combiner = format!(
        ", {}{}",
        if settings.dp.is_some() {
            "DP equal-weight mean".to_string()
        } else {
            settings.aggregation.label()
        },
        if server_optimizer.is_some() {
            ", FedAdam"
        } else {
            ""
        }
    );
    let rate = match settings.max_updates_per_minute {
        0 => String::new(),
        n => format!(", at most {n} updates a minute per device"),
    };
    let rate = match settings.dp {
        None => rate,
        Some(dp) => format!(
            "{rate}, central DP (noise {} x clip {}, delta {}{})",
            dp.noise_multiplier,
            dp.clip_norm,
            dp.delta,
            dp.target_epsilon
                .map_or(String::new(), |t| format!(", epsilon at most {t}"))
        ),
    };
    let cap = match settings.sample_cap {
        crate::state::SampleCap::Equal => {
            ", one device one vote (claimed sample counts not weighed)".to_string()
        }
        crate::state::SampleCap::Auto => format!(
            ", sample weight at most {}x the round's median",
            crate::state::SAMPLE_CAP_MEDIAN_MULTIPLE
        ),
        crate::state::SampleCap::Fixed(n) => format!(", sample weight at most {n}"),
        crate::state::SampleCap::Off => String::new(),
    };
    base + &combiner + &cap + &rate
}

/// An update as it arrived, decoded or not. `refusal`: authenticated
/// and decoded, but refused before ingest (its payload names another
/// device than its topic); it gets a rejected ack.
#[derive(Debug)]
struct Incoming {
    device: String,
    bytes: usize,
    update: Result<Update, Undecodable>,
    refusal: Option<String>,
}

/// The sans-IO aggregator (see the module doc).
#[derive(Debug)]
pub struct Intake {
    cfg: IntakeConfig,
    state: State,
    adam: Option<FedAdam>,
    /// What was last published per model; a newer version in the state
    /// file (made by `dai-cloud models promote|rollback` in another
    /// process) is published on the next tick.
    published: HashMap<String, u64>,
    /// When the first update of the open round was accepted.
    round_started: Option<Instant>,
    connected: bool,
    /// A session existed before: the next CONNACK is a reconnect.
    ever_connected: bool,
    batch: Vec<Incoming>,
    batch_values: usize,
    stats: ServiceStats,
    outputs: Vec<Output>,
    /// The aggregator epoch globals are signed in (the state file's).
    epoch: u64,
    /// The signed global last published per model: a retained message on
    /// its topic that differs (cleared or overwritten by someone else) is
    /// healed by publishing this again.
    signed: HashMap<String, Vec<u8>>,
    /// Models whose global must be published again on the next tick (a
    /// want or a damaged retained message); at most once per tick.
    heal: Vec<String>,
    rate: rate::RateLimit,
    /// Each model's tensor layout (fixed for a model), which bounds how far
    /// an update may decompress and is checked before values are decoded.
    layouts: HashMap<String, Vec<(String, Vec<usize>)>>,
    /// Bundle offers published by this session (name -> the signed offer):
    /// a retained message that differs is healed like a global's.
    offered: HashMap<String, Vec<u8>>,
    /// The archive sha256 of each offer in `offered`; removed to publish
    /// the offer again.
    offered_sha: HashMap<String, String>,
    /// Bundle chunks sent since the last tick ([`bundles::CHUNKS_PER_TICK`]).
    chunks_sent: u32,
    /// Enrolled names whose partial aggregates count ([`Intake::set_tiers`]).
    tiers: Vec<String>,
    /// Partial aggregates held for the next flush.
    partials: Vec<IncomingPartial>,
    /// Set when this intake is a tier ([`tier`]).
    tier: Option<tier::TierLink>,
    /// The MQTT shared-subscription group updates are taken in
    /// ([`Intake::set_share_group`]).
    share_group: Option<String>,
}

/// A tier's partial aggregate as it arrived.
#[derive(Debug)]
struct IncomingPartial {
    tier: String,
    bytes: usize,
    partial: Result<Partial, Undecodable>,
}

impl Intake {
    /// Register the configured models in `state` and queue what a start
    /// publishes: each model's current version and pending count for the
    /// monitor, and the current global (retained, for late joiners) of
    /// every model past its base.
    pub fn new(state: State, cfg: IntakeConfig) -> Result<Intake, StateError> {
        for (model, head) in &cfg.models {
            state.register(model, head)?;
        }
        let epoch = state.epoch()?;
        let mut intake = Intake {
            rate: rate::RateLimit::new(cfg.settings.max_updates_per_minute),
            adam: cfg.server_optimizer.clone(),
            cfg,
            state,
            published: HashMap::new(),
            round_started: None,
            connected: false,
            ever_connected: false,
            batch: Vec::new(),
            batch_values: 0,
            stats: ServiceStats::default(),
            outputs: Vec::new(),
            epoch,
            signed: HashMap::new(),
            heal: Vec::new(),
            layouts: HashMap::new(),
            offered: HashMap::new(),
            offered_sha: HashMap::new(),
            chunks_sent: 0,
            tiers: Vec::new(),
            partials: Vec::new(),
            tier: None,
            share_group: None,
        };
        for model in intake.model_names() {
            let layout = intake.state.model_layout(&model)?;
            intake.layouts.insert(model.clone(), layout.tensors);
            let (version, head) = intake.state.current(&model)?;
            intake.monitor(MonitorEvent::Global {
                model: model.clone(),
                version,
                aggregated: false,
            });
            let count = intake.state.pending_count(&model)?;
            intake.monitor(MonitorEvent::Pending {
                model: model.clone(),
                count,
            });
            if version > 0 {
                intake.push_global(&model, version, &head);
            }
            intake.push_privacy(&model);
            intake.published.insert(model, version);
        }
        Ok(intake)
    }

    /// The broker accepted the session (CONNACK): subscribe to updates and
    /// heartbeats of the fleet.
    pub fn connected(&mut self) {
        self.connected = true;
        self.monitor(MonitorEvent::BrokerConnected);
        let updates = match &self.share_group {
            Some(g) => format!("$share/{g}/{}", topics::all_updates(&self.cfg.fleet)),
            None => topics::all_updates(&self.cfg.fleet),
        };
        // An intake replica takes its share of the updates and nothing
        // else: heartbeats, wants, bundles and partials are the root's.
        if self.tier.as_ref().is_some_and(|t| !t.cfg.forward_globals) {
            self.outputs.push(Output::Subscribe(updates));
            return;
        }
        for filter in [
            updates,
            topics::all_status(&self.cfg.fleet),
            topics::all_wants(&self.cfg.fleet),
            topics::all_globals(&self.cfg.fleet),
            topics::all_fetches(&self.cfg.fleet),
            topics::all_reports(&self.cfg.fleet),
            topics::all_bundles(&self.cfg.fleet),
            topics::all_partials(&self.cfg.fleet),
        ] {
            self.outputs.push(Output::Subscribe(filter));
        }
        // A broker that restarted without persistence has lost the
        // retained globals, and edges that connect to it later would never
        // get one: publish the current global of every model again on each
        // reconnect (edges apply only newer versions, so a repeat costs
        // bytes, never a second adoption). The first session's globals were
        // queued by `new`.
        if std::mem::replace(&mut self.ever_connected, true) {
            self.republish_current();
        }
        // Offers too, retained for devices that connect later.
        self.offered_sha.clear();
        self.publish_offers();
    }

    /// The current signed global of every model that has one (version > 0).
    fn republish_current(&mut self) {
        for model in self.model_names() {
            match self.state.current(&model) {
                Ok((version, head)) if version > 0 => self.push_global(&model, version, &head),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(%model, error = %crate::error_chain(&e), "cannot read the current global to publish it again")
                }
            }
        }
    }

    /// The connection failed (the loop backs off and reconnects).
    pub fn disconnected(&mut self) {
        let was_connected = std::mem::replace(&mut self.connected, false);
        self.monitor(MonitorEvent::BrokerLost { was_connected });
    }

    /// Take updates through the MQTT shared subscription
    /// `$share/{group}/dai/v1/{fleet}/dev/+/update`: the broker gives each
    /// update to one member of the group (the root and its intake
    /// replicas), never to all. Needs a broker that has them (Mosquitto,
    /// EMQX; not the embedded rumqttd).
    pub fn set_share_group(&mut self, group: Option<String>) {
        self.share_group = group;
    }

    /// The enrolled names (tiers: intermediate aggregators) whose partial
    /// aggregates this aggregator counts; a partial from anyone else is
    /// refused unacked.
    pub fn set_tiers(&mut self, tiers: Vec<String>) {
        self.tiers = tiers;
    }

    /// The enrolled devices changed (an enrolment or a revocation in the
    /// fleet directory): from now on updates are checked against `keys`.
    pub fn set_devices(&mut self, keys: DeviceKeys) {
        tracing::info!(devices = keys.len(), "device registry loaded");
        self.cfg.devices = DeviceAuth::Signed(keys);
    }

    /// An incoming publish. Updates are authenticated, decoded and held
    /// for the next [`Intake::flush`]; heartbeats go to the monitor at
    /// once; wants and retained globals may schedule a global again.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        match Topic::parse(topic) {
            Ok(Topic::Update { fleet, device }) => self.update(&fleet, device, topic, payload),
            Ok(Topic::Status { fleet, device }) if fleet == self.cfg.fleet => {
                self.heartbeat(device, payload)
            }
            Ok(Topic::Want { fleet, device }) if fleet == self.cfg.fleet => {
                self.want(&device, payload)
            }
            Ok(Topic::Global { fleet, model }) if fleet == self.cfg.fleet => {
                self.retained_global(model, payload)
            }
            Ok(Topic::Fetch { fleet, device }) if fleet == self.cfg.fleet => {
                self.fetch(&device, payload)
            }
            Ok(Topic::Report { fleet, device }) if fleet == self.cfg.fleet => {
                self.bundle_report(&device, payload)
            }
            Ok(Topic::Bundle { fleet, model }) if fleet == self.cfg.fleet => {
                self.retained_offer(&model, payload)
            }
            Ok(Topic::Partial { fleet, device }) => self.partial(&fleet, device, topic, payload),
            _ => tracing::warn!(%topic, "ignoring a message on an unexpected topic"),
        }
    }

    fn update(&mut self, fleet: &str, device: String, topic: &str, payload: &[u8]) {
        self.monitor(MonitorEvent::UpdateBytes(payload.len() as u64));
        let body =
            match self
                .cfg
                .devices
                .authenticate(&self.cfg.fleet, fleet, &device, topic, payload)
            {
                Ok(body) => body,
                Err(refusal) => return self.refuse(device, payload.len(), &refusal),
            };
        if !self.rate.allow(&device) {
            *self.stats.refused.entry("rate_limited").or_insert(0) += 1;
            tracing::warn!(%device, limit = self.cfg.settings.max_updates_per_minute, "update over the device's rate limit; not recorded, not acked (the edge sends it again later)");
            self.monitor(MonitorEvent::Update {
                device,
                update_id: String::new(),
                bytes: payload.len(),
                outcome: Outcome::Refused,
                reason: Some(format!(
                    "over the rate limit of {} updates a minute",
                    self.cfg.settings.max_updates_per_minute
                )),
            });
            return;
        }
        let layouts = &self.layouts;
        let update = Update::decode_for_layout(body, MAX_WIRE_BYTES, |model| {
            layouts.get(model).map(Vec::as_slice)
        });
        // Signed by the topic's device, so this is that device's claim:
        // refused with an ack, and never counted for the device it names.
        let refusal = match &update {
            Ok(u) if u.meta.device != device => Some(format!(
                "the update names device {:?}, but was sent by {device:?}",
                u.meta.device
            )),
            _ => None,
        };
        if refusal.is_none() {
            self.batch_values += update
                .as_ref()
                .map_or(0, |u| u.tensors.iter().map(|t| t.values.len()).sum());
        }
        self.batch.push(Incoming {
            device,
            bytes: payload.len(),
            update,
            refusal,
        });
    }

    /// A tier's partial aggregate: only from a listed tier, signed by its
    /// enrolled key for this topic, decoded against the model's layout and
    /// held for the next flush.
    fn partial(&mut self, fleet: &str, tier: String, topic: &str, payload: &[u8]) {
        self.monitor(MonitorEvent::UpdateBytes(payload.len() as u64));
        if fleet == self.cfg.fleet && !self.tiers.contains(&tier) {
            return self.refuse(tier.clone(), payload.len(), &Refusal::NotATier(tier));
        }
        let body = match self.cfg.devices.authenticate_kind(
            Kind::Partial,
            &self.cfg.fleet,
            fleet,
            &tier,
            topic,
            payload,
        ) {
            Ok(body) => body,
            Err(refusal) => return self.refuse(tier, payload.len(), &refusal),
        };
        let layouts = &self.layouts;
        let mut partial =
            Partial::decode_for_layout(body, |model| layouts.get(model).map(Vec::as_slice));
        // Signed by the topic's tier, so the tier it names is its claim.
        if let Ok(p) = &partial
            && p.sum.meta.device != tier
        {
            partial = Err(Undecodable {
                error: dai_protocol::ProtocolError::Metadata(format!(
                    "the partial aggregate names tier {:?}, but was sent by {tier:?}",
                    p.sum.meta.device
                )),
                meta: Some(Box::new(p.sum.meta.clone())),
            });
        }
        if let Ok(p) = &partial {
            self.batch_values += p.sum.tensors.iter().map(|t| t.values.len()).sum::<usize>();
        }
        self.partials.push(IncomingPartial {
            tier,
            bytes: payload.len(),
            partial,
        });
    }

    /// Record the held partial aggregates (one transaction each: a partial
    /// weighs as much as many updates), ack each after its commit, and
    /// return the models they added to.
    fn flush_partials(&mut self, now: Instant) -> Result<Vec<String>, StateError> {
        let mut touched = Vec::new();
        for held in std::mem::take(&mut self.partials) {
            let (ack, outcome) = match &held.partial {
                Ok(p) => {
                    let ack = self.state.ingest_partial(p, &self.cfg.settings, base_of)?;
                    let outcome = if ack.reason.as_deref() == Some(DUPLICATE_REASON) {
                        self.stats.duplicates += 1;
                        Outcome::Duplicate
                    } else if ack.status == AckStatus::Accepted {
                        self.stats.partials += 1;
                        self.stats.partial_votes += p.votes;
                        tracing::info!(tier = %held.tier, partial = %ack.update_id, updates = p.votes, weight = p.weight, "partial aggregate counted");
                        self.round_started.get_or_insert(now);
                        if !touched.contains(&p.sum.meta.model) {
                            touched.push(p.sum.meta.model.clone());
                        }
                        Outcome::Accepted
                    } else {
                        self.stats.partials_rejected += 1;
                        if ack.status == AckStatus::Rebase {
                            self.schedule_heal(p.sum.meta.model.clone());
                        }
                        tracing::warn!(tier = %held.tier, partial = %ack.update_id, reason = ?ack.reason, "partial aggregate refused");
                        Outcome::Rejected
                    };
                    (ack, outcome)
                }
                Err(e) => {
                    self.stats.partials_rejected += 1;
                    let id = e.meta.as_ref().map(|m| m.update_id.clone());
                    tracing::warn!(tier = %held.tier, bytes = held.bytes, partial = ?id, error = %e, "undecodable partial aggregate");
                    let ack = Ack {
                        update_id: id.unwrap_or_default(),
                        status: AckStatus::Rejected,
                        reason: Some(format!("undecodable partial aggregate: {e}")),
                        round: None,
                    };
                    (ack, Outcome::Undecodable)
                }
            };
            self.monitor(MonitorEvent::Update {
                device: held.tier.clone(),
                update_id: ack.update_id.clone(),
                bytes: held.bytes,
                outcome,
                reason: ack.reason.clone(),
            });
            self.push_ack(&held.tier, ack);
        }
        Ok(touched)
    }

    /// Count, log and report an update refused before decoding (no ack).
    fn refuse(&mut self, device: String, bytes: usize, refusal: &Refusal) {
        *self.stats.refused.entry(refusal.label()).or_insert(0) += 1;
        tracing::warn!(%device, bytes, reason = refusal.label(), error = %refusal, "update refused");
        self.monitor(MonitorEvent::Update {
            device,
            update_id: String::new(),
            bytes,
            outcome: Outcome::Refused,
            reason: Some(refusal.to_string()),
        });
    }

    /// A device asks for a model's global: scheduled if it holds an older
    /// version than the current one (so asking cannot make the aggregator
    /// flood the broker with what devices already have).
    fn want(&mut self, device: &str, payload: &[u8]) {
        let w = match Want::from_bytes(payload) {
            Ok(w) => w,
            Err(e) => return tracing::warn!(%device, error = %e, "unreadable global request"),
        };
        match self.published.get(&w.model) {
            // The device holds a global of a retired version line (this
            // state was made after it): it adopts ours whatever the version.
            Some(_) if w.epoch != 0 && w.epoch < self.epoch => self.schedule_heal(w.model),
            Some(_) if w.epoch > self.epoch => {
                tracing::warn!(%device, model = %w.model, device_epoch = w.epoch, epoch = self.epoch, "the device holds a global of a newer epoch than this state file (an old state restored?); it will refuse our globals")
            }
            Some(&current) if current > w.version => self.schedule_heal(w.model),
            Some(_) => {}
            None => {
                tracing::debug!(%device, model = %w.model, "global request for an unknown model")
            }
        }
    }

    /// A retained global on a model topic (our own publish comes back, and
    /// the broker sends the retained one on subscribe): anything but what
    /// we last signed means it was cleared or overwritten, so publish ours
    /// again.
    /// With none of ours yet (a new state at version 0), a retained global
    /// is another version line's (the state before this one was lost): it
    /// would keep steering late joiners to a base this state cannot take,
    /// so ours (version 0 of this epoch) replaces it.
    fn retained_global(&mut self, model: String, payload: &[u8]) {
        // An intake replica's broker is the root's: its globals are the
        // root's business.
        if self.tier.is_some() && self.forwarded(&model).is_none() {
            return;
        }
        let replace = match self.signed.get(&model) {
            Some(ours) => ours.as_slice() != payload,
            None => !payload.is_empty() && self.published.contains_key(&model),
        };
        if replace {
            tracing::warn!(%model, bytes = payload.len(), "the retained global was cleared or is not this epoch's current one; publishing the current one again");
            self.schedule_heal(model);
        }
    }

    fn schedule_heal(&mut self, model: String) {
        if !self.heal.contains(&model) {
            self.heal.push(model);
        }
    }

    /// Whether the held batch reached its bound (by count and by decoded
    /// size, so a burst of large updates is ingested in several
    /// transactions instead of being held in memory at once).
    pub fn batch_full(&self) -> bool {
        self.batch.len() + self.partials.len() >= MAX_BATCH || self.batch_values >= MAX_BATCH_VALUES
    }

    /// Record the held updates in one transaction, ack each (only after the
    /// commit: an acked update is on disk), and aggregate the models they
    /// touched if their strategy says so. A failed transaction drops the
    /// batch unacked; the edges send it again.
    pub fn flush(&mut self, now: Instant) -> Result<(), StateError> {
        if self.batch.is_empty() && self.partials.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_values = 0;
        let decoded: Vec<&Update> = batch
            .iter()
            .filter(|b| b.refusal.is_none())
            .filter_map(|b| b.update.as_ref().ok())
            .collect();
        let (acks, superseded) = if decoded.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.state
                .ingest_batch_superseding(&decoded, &self.cfg.settings, base_of)?
        };
        // The batch is committed; none of its acks is out yet.
        dai_protocol::crashpoint::hit("cloud-ingested");
        let mut acks = acks.into_iter();
        let mut touched: Vec<String> = Vec::new();
        for b in &batch {
            let (ack, outcome) = match &b.update {
                Ok(update) if b.refusal.is_some() => {
                    self.stats.rejected += 1;
                    tracing::warn!(device = %b.device, update = %update.meta.update_id, reason = ?b.refusal, "update rejected");
                    let ack = Ack {
                        update_id: update.meta.update_id.clone(),
                        status: AckStatus::Rejected,
                        reason: b.refusal.clone(),
                        round: None,
                    };
                    (ack, Outcome::Rejected)
                }
                Ok(update) => {
                    let Some(ack) = acks.next() else { break };
                    let outcome = self.count(b, &ack);
                    if ack.status == AckStatus::Rebase {
                        self.schedule_heal(update.meta.model.clone());
                    }
                    if outcome == Outcome::Accepted {
                        self.round_started.get_or_insert(now);
                        if !touched.contains(&update.meta.model) {
                            touched.push(update.meta.model.clone());
                        }
                    }
                    (ack, outcome)
                }
                Err(e) => {
                    self.stats.rejected += 1;
                    let update_id = e.meta.as_ref().map(|m| m.update_id.clone());
                    tracing::warn!(device = %b.device, bytes = b.bytes, update = ?update_id, error = %e, "undecodable update");
                    // Acked by id when the metadata was readable, so the
                    // edge drops it as rejected instead of resending it.
                    let ack = Ack {
                        update_id: update_id.unwrap_or_default(),
                        status: AckStatus::Rejected,
                        reason: Some(format!("undecodable update: {e}")),
                        round: None,
                    };
                    (ack, Outcome::Undecodable)
                }
            };
            self.monitor(MonitorEvent::Update {
                device: b.device.clone(),
                update_id: ack.update_id.clone(),
                bytes: b.bytes,
                outcome,
                reason: ack.reason.clone(),
            });
            self.push_ack(&b.device, ack);
        }
        // The replaced update's id is acked again, as superseded: it was
        // counted, then replaced, never silently dropped.
        for s in superseded {
            self.stats.superseded += 1;
            tracing::info!(device = %s.device, update = %s.update_id, by = %s.by, "update superseded");
            let ack = Ack {
                update_id: s.update_id,
                status: AckStatus::Accepted,
                reason: Some(s.reason),
                round: None,
            };
            self.push_ack(&s.device, ack);
        }
        for model in self.flush_partials(now)? {
            if !touched.contains(&model) {
                touched.push(model);
            }
        }
        for model in touched {
            if let Some(g) = self.aggregate(&model, false)? {
                tracing::info!(model = %g.model, version = g.version, updates = g.contributors.len(), "global published");
                self.push_new(&g);
                self.round_started = None;
            }
            self.push_pending(&model)?;
        }
        Ok(())
    }

    /// The periodic timer: close a round that timed out (aggregating
    /// whatever arrived), then publish versions made outside this process
    /// (promote, rollback).
    pub fn tick(&mut self, now: Instant) -> Result<(), StateError> {
        self.rate.refill(now);
        self.chunks_sent = 0;
        self.resend_unacked(now)?;
        if self.connected {
            self.publish_offers();
        }
        if let Some(started) = self.round_started
            && now.saturating_duration_since(started) >= self.cfg.round_timeout
        {
            for model in self.model_names() {
                if let Some(g) = self.aggregate(&model, true)? {
                    tracing::info!(model = %g.model, version = g.version, updates = g.contributors.len(), "round timed out; global published");
                    self.push_new(&g);
                }
                self.push_pending(&model)?;
            }
            self.round_started = None;
        }
        // Healing publishes version 0 too: it is how edges of a retired
        // epoch learn the new one when no version was made yet.
        for model in std::mem::take(&mut self.heal) {
            let (version, head) = self.state.current(&model)?;
            self.push_global(&model, version, &head);
        }
        for model in self.model_names() {
            let (version, head) = self.state.current(&model)?;
            if self.published.get(&model).is_none_or(|&p| p < version) {
                tracing::info!(%model, version, "publishing a version made outside this process (promote or rollback)");
                self.push_global(&model, version, &head);
                self.monitor(MonitorEvent::Global {
                    model: model.clone(),
                    version,
                    aggregated: false,
                });
                self.published.insert(model, version);
            }
        }
        Ok(())
    }

    /// What to do next, in order; the queue is empty afterwards.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// The epoch globals are signed in (the state file's).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn model_names(&self) -> Vec<String> {
        self.cfg.models.iter().map(|(m, _)| m.clone()).collect()
    }

    fn monitor(&mut self, event: MonitorEvent) {
        self.outputs.push(Output::Monitor(event));
    }

    fn heartbeat(&mut self, device: String, payload: &[u8]) {
        // Mosquitto has no per-topic size rule (the gate has): refused
        // here before parsing.
        if payload.len() > dai_protocol::limits::MAX_STATUS_BYTES {
            tracing::warn!(%device, bytes = payload.len(), limit = dai_protocol::limits::MAX_STATUS_BYTES, "heartbeat over its bound; ignored");
            return;
        }
        if payload.is_empty() {
            self.monitor(MonitorEvent::Heartbeat { device, view: None });
            return;
        }
        match serde_json::from_slice::<Status>(payload) {
            Ok(s) => self.monitor(MonitorEvent::Heartbeat {
                device,
                view: Some(DeviceView {
                    state: s.state,
                    models: s.models,
                    outbox_pending: s.outbox_pending,
                    ts: s.ts,
                }),
            }),
            Err(e) => tracing::warn!(%device, error = %e, "unreadable heartbeat"),
        }
    }

    /// Classify a decoded update's ack and count it.
    fn count(&mut self, b: &Incoming, ack: &Ack) -> Outcome {
        if ack.status == AckStatus::Rebase && ack.reason.as_deref() != Some(DUPLICATE_REASON) {
            self.stats.rebased += 1;
            tracing::warn!(device = %b.device, update = %ack.update_id, reason = ?ack.reason, "update on a base of another version line; acked rebase, current global follows");
            Outcome::Rebase
        } else if ack.status == AckStatus::Accepted && ack.reason.is_none() {
            self.stats.accepted += 1;
            Outcome::Accepted
        } else if ack.status != AckStatus::Accepted
            && ack.reason.as_deref() != Some(DUPLICATE_REASON)
        {
            self.stats.rejected += 1;
            tracing::warn!(device = %b.device, update = %ack.update_id, reason = ?ack.reason, "update rejected");
            Outcome::Rejected
        } else {
            self.stats.duplicates += 1;
            tracing::info!(device = %b.device, update = %ack.update_id, "duplicate delivery acked again; counted once");
            Outcome::Duplicate
        }
    }

    fn aggregate(&mut self, model: &str, force: bool) -> Result<Option<NewGlobal>, StateError> {
        if self.tier.is_some() {
            self.fold(model, force)?;
            return Ok(None);
        }
        // Only the duration is measured here; it is not an input to any
        // decision, so it does not need to come in from outside.
        let t = Instant::now();
        let g = self
            .state
            .aggregate(model, &self.cfg.settings, force, &mut self.adam)?;
        if g.is_some() {
            // The new version is committed; it is not published yet.
            dai_protocol::crashpoint::hit("cloud-aggregated");
            self.monitor(MonitorEvent::AggregationSeconds(t.elapsed().as_secs_f64()));
            // Each new version moves the staleness horizon: what can never
            // be accepted again is forgotten (bounded state, see
            // `state::retention`).
            let p = self.state.prune(model, self.cfg.settings.max_staleness)?;
            if p.seen + p.heads > 0 {
                tracing::debug!(%model, seen = p.seen, heads = p.heads, "state pruned");
            }
        }
        Ok(g)
    }

    /// `ack`, signed for `device`'s ack topic.
    fn push_ack(&mut self, device: &str, ack: Ack) {
        let topic = Topic::Ack {
            fleet: self.cfg.fleet.clone(),
            device: device.to_string(),
        };
        // The device came from a parsed topic, so its ack topic builds.
        if let Ok(topic) = topic.build() {
            let payload = signed::seal(
                Kind::Ack,
                &self.cfg.signing_key,
                &self.cfg.fleet,
                &topic,
                &ack.to_bytes(),
            );
            self.outputs.push(Output::Ack {
                topic,
                ack,
                payload,
            });
        }
    }

    fn push_pending(&mut self, model: &str) -> Result<(), StateError> {
        let count = self.state.pending_count(model)?;
        self.monitor(MonitorEvent::Pending {
            model: model.to_string(),
            count,
        });
        Ok(())
    }

    /// Central DP: what `model`'s versions spent so far, for the monitor.
    fn push_privacy(&mut self, model: &str) {
        let Some(dp) = self.cfg.settings.dp else {
            return;
        };
        match self.state.privacy_spent(model) {
            Ok(spent) => self.monitor(MonitorEvent::Privacy {
                model: model.to_string(),
                epsilon: spent.epsilon(dp.delta),
            }),
            Err(e) => {
                tracing::error!(%model, error = %crate::error_chain(&e), "cannot read the privacy spent")
            }
        }
    }

    /// A version this process aggregated.
    fn push_new(&mut self, g: &NewGlobal) {
        self.push_privacy(&g.model);
        self.push_global(&g.model, g.version, &g.head_file);
        self.monitor(MonitorEvent::Global {
            model: g.model.clone(),
            version: g.version,
            aggregated: true,
        });
        self.published.insert(g.model.clone(), g.version);
        self.stats.globals_published += 1;
    }

    fn push_global(&mut self, model: &str, version: u64, head_file: &[u8]) {
        let topic = Topic::Global {
            fleet: self.cfg.fleet.clone(),
            model: model.to_string(),
        };
        // A tier never signs a global: a site publishes the root's as it
        // came, an intake replica nothing (the root publishes its own).
        if self.tier.is_some() {
            if let (Some(payload), Ok(topic)) = (self.forwarded(model), topic.build()) {
                self.signed.insert(model.to_string(), payload.clone());
                self.outputs.push(Output::Global {
                    topic,
                    model: model.to_string(),
                    version,
                    payload,
                });
            }
            return;
        }
        let head_file = match crate::state::signable_head(head_file, model, version) {
            Ok(h) => h,
            Err(e) => {
                return tracing::error!(%model, version, error = %crate::error_chain(&e), "global not signed");
            }
        };
        let signed = topic.build().and_then(|topic| {
            dai_protocol::global::sign(
                &head_file,
                &self.cfg.signing_key,
                &self.cfg.fleet,
                self.epoch,
            )
            .map(|payload| (topic, payload))
        });
        match signed {
            Ok((topic, payload)) => {
                self.signed.insert(model.to_string(), payload.clone());
                self.outputs.push(Output::Global {
                    topic,
                    model: model.to_string(),
                    version,
                    payload,
                });
            }
            Err(e) => tracing::error!(%model, version, error = %e, "global not signed"),
        }
    }
}

mod bundles;
mod rate;
#[cfg(test)]
mod tests;
pub mod tier;
#[cfg(test)]
mod tier_tests;
#[cfg(test)]
mod trust_tests;
