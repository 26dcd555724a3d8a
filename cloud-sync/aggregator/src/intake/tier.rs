//! The intake as a tier (`dai-cloud run --role site|intake --upstream`):
//! its devices' updates are validated, acked and combined here as on a
//! root, but a closed round becomes a signed partial aggregate for the
//! upstream aggregator instead of a global ([`crate::state::tier`]), and
//! the globals are the root's, verified with the root's key, adopted
//! into this state and (on a site, whose devices see only its broker)
//! forwarded verbatim: a tier never signs a global.
//!
//! In: [`Intake::upstream_connected`], [`Intake::upstream_disconnected`]
//! and [`Intake::upstream_publish`] (the upstream broker's session and
//! messages: the root's acks of our partials, the root's globals). Out:
//! [`Output::Upstream`].

use super::{Intake, Output};
use crate::monitor::MonitorEvent;
use crate::state::StateError;
use crate::state::tier::Outgoing;
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::{self, Topic};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Who this tier is upstream.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// Its enrolled name (the root lists it with `--tier`).
    pub name: String,
    /// Its enrolled key: partials are signed with it.
    pub key: SigningKey,
    /// The root aggregator's key: globals and acks from upstream must be
    /// signed with it.
    pub root: VerifyingKey,
    /// Publish the root's globals on this tier's broker (a site, whose
    /// devices do not reach the root's broker); an intake replica shares
    /// the root's broker and forwards nothing.
    pub forward_globals: bool,
}

/// What goes to the upstream broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    Subscribe(String),
    /// A signed partial aggregate (QoS 1, not retained).
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
}

/// The tier's link state, inside the intake.
#[derive(Debug)]
pub(super) struct TierLink {
    pub cfg: TierConfig,
    pub connected: bool,
    /// The root's signed global last adopted, per model (what a site
    /// forwards and heals its retained message with).
    pub root_signed: std::collections::HashMap<String, Vec<u8>>,
    /// When each outbox partial was last sent ([`RESEND_AFTER`]).
    pub sent: std::collections::HashMap<String, std::time::Instant>,
}

/// An outbox partial without an ack this long after it was sent goes
/// again, as an edge's outbox does: a bridge or a broker restart on the
/// way may have dropped it while this session stayed up.
pub const RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Intake {
    /// Run as a tier from now on (before the first message).
    pub fn set_tier(&mut self, cfg: TierConfig) {
        self.tier = Some(TierLink {
            cfg,
            connected: false,
            root_signed: Default::default(),
            sent: Default::default(),
        });
    }

    /// The upstream broker accepted the session: subscribe to our acks and
    /// the root's globals, and send the whole outbox again (the root
    /// counts a partial once, whatever the number of copies).
    pub fn upstream_connected(&mut self) -> Result<(), StateError> {
        let Some(t) = self.tier.as_mut() else {
            return Ok(());
        };
        t.connected = true;
        let ack = Topic::Ack {
            fleet: self.cfg.fleet.clone(),
            device: t.cfg.name.clone(),
        }
        .build();
        if let Ok(ack) = ack {
            self.outputs
                .push(Output::Upstream(Upstream::Subscribe(ack)));
        }
        self.outputs
            .push(Output::Upstream(Upstream::Subscribe(topics::all_globals(
                &self.cfg.fleet,
            ))));
        for out in self.state.outbox()? {
            self.send_partial(&out);
        }
        Ok(())
    }

    pub fn upstream_disconnected(&mut self) {
        if let Some(t) = self.tier.as_mut() {
            t.connected = false;
        }
    }

    /// A message from the upstream broker: an ack of one of our partials,
    /// or a root global.
    pub fn upstream_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), StateError> {
        let Some(t) = self.tier.as_ref() else {
            return Ok(());
        };
        let root = t.cfg.root;
        let name = t.cfg.name.clone();
        match Topic::parse(topic) {
            Ok(Topic::Ack { fleet, device }) if fleet == self.cfg.fleet && device == name => {
                let ack = signed::open(Kind::Ack, &root, &fleet, topic, payload)
                    .map_err(|e| e.to_string())
                    .and_then(|body| Ack::from_bytes(body).map_err(|e| e.to_string()));
                match ack {
                    Ok(ack) => self.partial_acked(&ack)?,
                    Err(e) => {
                        tracing::warn!(%topic, error = %e, "upstream ack not signed by the root or unreadable; ignored")
                    }
                }
            }
            Ok(Topic::Global { fleet, model }) if fleet == self.cfg.fleet => {
                if payload.is_empty() || !self.layouts.contains_key(&model) {
                    return Ok(());
                }
                match dai_protocol::global::verify(payload, &root, &fleet, &model) {
                    Ok(g) => self.adopt(&model, &g, payload)?,
                    Err(e) => {
                        tracing::warn!(%model, error = %e, "upstream global not signed by the root; ignored")
                    }
                }
            }
            _ => tracing::warn!(%topic, "ignoring an upstream message on an unexpected topic"),
        }
        Ok(())
    }

    /// Whether this intake is a tier.
    pub fn is_tier(&self) -> bool {
        self.tier.is_some()
    }

    /// Stopping (a scale-down, a drain): close every open round now, so
    /// what this tier acked goes up before it exits; the service then
    /// waits, bounded, for [`Intake::outbox_len`] to reach 0.
    pub fn drain(&mut self, now: std::time::Instant) -> Result<(), StateError> {
        self.flush(now)?;
        for model in self.model_names() {
            self.fold(&model, true)?;
        }
        Ok(())
    }

    /// Partials the root has not acked yet.
    pub fn outbox_len(&self) -> Result<usize, StateError> {
        Ok(self.state.outbox()?.len())
    }

    fn partial_acked(&mut self, ack: &Ack) -> Result<(), StateError> {
        let known = self.state.partial_acked(&ack.update_id)?;
        match (ack.status, known) {
            (_, false) => {
                tracing::debug!(partial = %ack.update_id, "ack of a partial no longer in the outbox")
            }
            (AckStatus::Accepted, true) => {
                tracing::info!(partial = %ack.update_id, "partial aggregate counted upstream")
            }
            // Refused for good: sending it again would get the same
            // answer. Its updates are lost to the root; the log says why.
            (_, true) => {
                tracing::error!(partial = %ack.update_id, status = ?ack.status, reason = ?ack.reason, "partial aggregate refused upstream; dropped from the outbox")
            }
        }
        if known {
            let pending = self.state.outbox()?.len() as u64;
            self.monitor(MonitorEvent::Outbox(pending));
        }
        Ok(())
    }

    fn adopt(
        &mut self,
        model: &str,
        g: &dai_protocol::global::GlobalModel,
        payload: &[u8],
    ) -> Result<(), StateError> {
        let changed = self.state.adopt_global(g)?;
        let forward = self.tier.as_ref().is_some_and(|t| t.cfg.forward_globals);
        if let Some(t) = self.tier.as_mut() {
            t.root_signed.insert(model.to_string(), payload.to_vec());
        }
        if changed {
            tracing::info!(%model, version = g.version, epoch = g.epoch, "root global adopted");
            self.epoch = g.epoch;
            self.published.insert(model.to_string(), g.version);
            self.monitor(MonitorEvent::Global {
                model: model.to_string(),
                version: g.version,
                aggregated: false,
            });
        }
        if forward && (changed || self.signed.get(model).is_none_or(|s| s != payload)) {
            self.push_global(model, g.version, &[]);
        }
        Ok(())
    }

    /// On a tier, close the round of `model` into a partial (sent at once
    /// when the upstream session is up, else on the next one).
    pub(super) fn fold(&mut self, model: &str, force: bool) -> Result<(), StateError> {
        let Some(name) = self.tier.as_ref().map(|t| t.cfg.name.clone()) else {
            return Ok(());
        };
        if let Some(out) = self
            .state
            .fold_partial(model, &self.cfg.settings, force, &name)?
        {
            tracing::info!(%model, partial = %out.partial_id, updates = out.votes, "round folded into a partial aggregate for upstream");
            self.stats.partials += 1;
            self.stats.partial_votes += out.votes;
            self.round_started = None;
            self.push_privacy(model);
            if self.tier.as_ref().is_some_and(|t| t.connected) {
                self.send_partial(&out);
            }
            let pending = self.state.outbox()?.len() as u64;
            self.monitor(MonitorEvent::Outbox(pending));
        }
        Ok(())
    }

    /// The periodic timer, on a tier: send again what waited too long.
    pub(super) fn resend_unacked(&mut self, now: std::time::Instant) -> Result<(), StateError> {
        if !self.tier.as_ref().is_some_and(|t| t.connected) {
            return Ok(());
        }
        let outbox = self.state.outbox()?;
        if let Some(t) = self.tier.as_mut() {
            t.sent
                .retain(|id, _| outbox.iter().any(|o| &o.partial_id == id));
        }
        for out in outbox {
            let due = self
                .tier
                .as_ref()
                .and_then(|t| t.sent.get(&out.partial_id))
                .is_none_or(|at| now.saturating_duration_since(*at) >= RESEND_AFTER);
            if due {
                tracing::info!(partial = %out.partial_id, "no ack from upstream yet; sending the partial again");
                self.send_partial(&out);
                if let Some(t) = self.tier.as_mut() {
                    t.sent.insert(out.partial_id.clone(), now);
                }
            }
        }
        Ok(())
    }

    fn send_partial(&mut self, out: &Outgoing) {
        let Some(t) = self.tier.as_mut() else { return };
        // The send time only paces [`Intake::resend_unacked`] (which
        // stamps its own `now`); it decides nothing else.
        t.sent
            .insert(out.partial_id.clone(), std::time::Instant::now());
        let t = &*t;
        let topic = Topic::Partial {
            fleet: self.cfg.fleet.clone(),
            device: t.cfg.name.clone(),
        };
        if let Ok(topic) = topic.build() {
            let payload = signed::seal(
                Kind::Partial,
                &t.cfg.key,
                &self.cfg.fleet,
                &topic,
                &out.body,
            );
            self.outputs
                .push(Output::Upstream(Upstream::Publish { topic, payload }));
        }
    }

    /// A site's copy of the root's global for `model` (what `push_global`
    /// publishes on a tier), if it forwards globals and has one.
    pub(super) fn forwarded(&self, model: &str) -> Option<Vec<u8>> {
        let t = self.tier.as_ref()?;
        if !t.cfg.forward_globals {
            return None;
        }
        t.root_signed.get(model).cloned()
    }
}
