//! One connection's worth of uplink state and the I/O steps of the event
//! loop in [`crate::run`]: connect (subscribe, forget what was in flight),
//! incoming acks and globals, the 200 ms tick (outbox, sensor events,
//! heartbeat) and connection loss. The decisions themselves are in
//! [`crate::decide`]; this module only measures time and talks to rumqttc.

use crate::decide::{self, ChunkVerdict, Download, GlobalVerdict, Incoming, Trust};
use crate::{Edge, UplinkConfig, UplinkStats, backoff};
use dai_protocol::base::GlobalId;
use dai_protocol::messages::{Ack, AckStatus, Status, Want};
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::Topic;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows and events taken from the edge per tick: bounded so one tick never
/// floods the request queue (256 deep).
const PER_TICK: usize = 64;

/// The device's own topics, built once (a fleet or device name the topic
/// grammar refuses stops the uplink before it connects).
pub(crate) struct Topics {
    pub status: String,
    pub update: String,
    pub ack: String,
    pub event: String,
    pub want: String,
    pub fetch: String,
    pub chunk: String,
    pub report: String,
}

impl Topics {
    pub fn new(cfg: &UplinkConfig) -> Option<Topics> {
        let (fleet, device) = (cfg.fleet.clone(), cfg.device.clone());
        let status = Topic::Status {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let update = Topic::Update {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let ack = Topic::Ack {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let event = Topic::Event {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let fetch = Topic::Fetch {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let chunk = Topic::Chunk {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let report = Topic::Report {
            fleet: fleet.clone(),
            device: device.clone(),
        };
        let want = Topic::Want { fleet, device };
        Some(Topics {
            fetch: fetch.build().ok()?,
            chunk: chunk.build().ok()?,
            report: report.build().ok()?,
            status: status.build().ok()?,
            update: update.build().ok()?,
            ack: ack.build().ok()?,
            event: event.build().ok()?,
            want: want.build().ok()?,
        })
    }
}

/// Broker options: the device name as client id (a TLS broker requires it
/// to equal the certificate's name), a persistent session (QoS 1 updates
/// survive a reconnect), a retained "offline" last will on the status
/// topic, and mutual TLS when configured.
pub(crate) fn mqtt_options(cfg: &UplinkConfig, status_topic: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(&cfg.device, &cfg.host, cfg.port);
    if let Some(tls) = &cfg.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
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
        status_topic,
        serde_json::to_vec(&offline).unwrap_or_default(),
        QoS::AtLeastOnce,
        true,
    ));
    opts
}

/// Everything the event loop keeps between events.
pub(crate) struct Session {
    cfg: UplinkConfig,
    edge: Arc<dyn Edge>,
    client: AsyncClient,
    topics: Topics,
    /// Update id -> (when it was last published on this connection, how
    /// many times it was published again without an ack).
    inflight: HashMap<String, (Instant, u32)>,
    /// An update published while nobody was subscribed (a broker restarted
    /// without persistence, the aggregator not yet back) gets no ack: it is
    /// published again after this long. The aggregator counts it once.
    ack_timeout: Duration,
    pub connected: bool,
    attempt: u32,
    /// `None`: no heartbeat on this connection yet, so one is due.
    last_heartbeat: Option<Instant>,
    /// Bundles being fetched, by model name (a newer offer replaces one).
    downloads: HashMap<String, Download>,
    pub stats: UplinkStats,
}

impl Session {
    pub fn new(
        cfg: UplinkConfig,
        edge: Arc<dyn Edge>,
        client: AsyncClient,
        topics: Topics,
    ) -> Self {
        let ack_timeout = cfg.connection_timeout.max(Duration::from_secs(1));
        Session {
            cfg,
            edge,
            client,
            topics,
            inflight: HashMap::new(),
            ack_timeout,
            connected: false,
            attempt: 0,
            last_heartbeat: None,
            downloads: HashMap::new(),
            stats: UplinkStats::default(),
        }
    }

    /// ConnAck: (re)subscribe, and treat nothing as in flight, so anything
    /// not acked goes out again on this connection.
    pub fn on_connack(&mut self) {
        self.connected = true;
        self.attempt = 0;
        self.inflight.clear();
        self.last_heartbeat = None;
        let _ = self
            .client
            .try_subscribe(&self.topics.ack, QoS::AtLeastOnce);
        // Chunks first: the retained offers that follow start fetches.
        let _ = self
            .client
            .try_subscribe(&self.topics.chunk, QoS::AtLeastOnce);
        let _ = self.client.try_subscribe(
            dai_protocol::topics::all_bundles(&self.cfg.fleet),
            QoS::AtLeastOnce,
        );
        for d in self.downloads.values_mut() {
            d.reset();
        }
        for model in self.edge.models() {
            let topic = Topic::Global {
                fleet: self.cfg.fleet.clone(),
                model,
            };
            if let Ok(t) = topic.build() {
                let _ = self.client.try_subscribe(t, QoS::AtLeastOnce);
            }
        }
        // Ask for anything newer than what is served: if the retained
        // global was lost or cleared, the aggregator publishes it again.
        for model in self.edge.models() {
            let served = self.edge.served_global(&model);
            let want = Want {
                version: served.version,
                epoch: served.epoch,
                model,
            };
            let _ = self.client.try_publish(
                &self.topics.want,
                QoS::AtLeastOnce,
                false,
                want.to_bytes(),
            );
        }
        tracing::info!(host = %self.cfg.host, port = self.cfg.port, tls = self.cfg.tls.is_some(), "connected to the broker");
    }

    /// An incoming publish: an ack or a global model.
    pub fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let trust = Trust {
            fleet: &self.cfg.fleet,
            ack_topic: &self.topics.ack,
            chunk_topic: &self.topics.chunk,
            aggregator: &self.cfg.aggregator_key,
        };
        match decide::classify(topic, payload, &trust) {
            Incoming::Ack(Ok(ack)) => self.on_ack(&ack),
            Incoming::Ack(Err(e)) => {
                self.stats.acks_refused += 1;
                self.edge.uplink_error("ack_refused");
                tracing::warn!(error = %e, "ack refused; nothing deleted");
            }
            Incoming::Global { model } => self.on_global(&model, payload),
            Incoming::Offer { model, offer } => self.on_offer(&model, offer),
            Incoming::Chunk => self.on_chunk(payload),
            Incoming::Ignored => tracing::debug!(%topic, "ignored message"),
        }
    }

    /// Updates published and not acked by the aggregator yet.
    pub fn awaiting_acks(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// The aggregator answered (accepted or rejected): the row may go.
    fn on_ack(&mut self, ack: &Ack) {
        // The ack arrived; the outbox row is not deleted yet.
        dai_protocol::crashpoint::hit("edge-ack-received");
        match ack.status {
            AckStatus::Rejected => {
                tracing::warn!(update = %ack.update_id, reason = ?ack.reason, "update rejected by the aggregator")
            }
            AckStatus::Rebase => {
                self.stats.rebased += 1;
                tracing::warn!(update = %ack.update_id, reason = ?ack.reason, "update on a base the aggregator does not have (a new epoch); dropped, the current global follows")
            }
            AckStatus::Accepted => {}
        }
        self.inflight.remove(&ack.update_id);
        self.edge.acked(ack);
        self.stats.acked += 1;
    }

    /// A global model: verified (signature, checksum, model name), then
    /// applied only if newer than the version served.
    fn on_global(&mut self, model: &str, payload: &[u8]) {
        let current = self.edge.served_global(model);
        let g = match dai_protocol::global::verify(
            payload,
            &self.cfg.aggregator_key,
            &self.cfg.fleet,
            model,
        ) {
            Ok(g) => g,
            Err(e) => {
                self.refuse_global(model, "invalid");
                tracing::warn!(%model, bytes = payload.len(), error = %e, "global model refused");
                return;
            }
        };
        let id = GlobalId {
            epoch: g.epoch,
            version: g.version,
        };
        if id.epoch != current.epoch && id > current && current != GlobalId::default() {
            tracing::warn!(%model, epoch = id.epoch, version = id.version, served_epoch = current.epoch, served_version = current.version, "a global of a new aggregator epoch: adopting it and dropping updates on the old one");
        }
        match decide::global_verdict(id, current) {
            GlobalVerdict::Apply => match self.edge.apply_global(g) {
                Ok(()) => self.stats.globals_applied += 1,
                Err(e) => {
                    self.refuse_global(model, "apply");
                    tracing::error!(%model, error = %e, "global model not applied");
                }
            },
            GlobalVerdict::AlreadyServed => {
                tracing::debug!(%model, version = g.version, "global already served");
            }
            GlobalVerdict::Older => {
                self.refuse_global(model, "older");
                tracing::warn!(%model, epoch = id.epoch, version = id.version, served_epoch = current.epoch, served_version = current.version, "global model refused: older than the one served");
            }
        }
    }

    /// A bundle offer: refused unless the aggregator signed it; ignored
    /// unless it targets this device; else fetched from what the edge
    /// already holds.
    fn on_offer(&mut self, model: &str, offer: Result<dai_protocol::bundle::Offer, String>) {
        let offer = match offer {
            Ok(o) => o,
            Err(e) => {
                self.stats.bundle_refused += 1;
                tracing::warn!(%model, error = %e, "bundle offer refused");
                self.edge.bundle_refused(model, &e);
                return;
            }
        };
        if !offer
            .targets
            .includes(&self.cfg.device, &self.edge.groups())
        {
            tracing::debug!(%model, "bundle offer for other devices");
            return;
        }
        if self
            .downloads
            .get(model)
            .is_some_and(|d| d.offer.sha256 == offer.sha256)
        {
            return;
        }
        let Some(held) = self.edge.bundle_offered(&offer) else {
            self.downloads.remove(model);
            return;
        };
        let d = Download::new(offer, held);
        if d.complete() {
            self.edge.bundle_complete(&d.offer);
            return;
        }
        self.downloads.insert(model.to_string(), d);
        self.fetch_due();
    }

    /// A chunk on this device's topic: taken if it is the next one of a
    /// download and matches the offer's hash for it.
    fn on_chunk(&mut self, payload: &[u8]) {
        let chunk = match dai_protocol::bundle::Chunk::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                self.stats.bundle_refused += 1;
                tracing::warn!(error = %e, "bundle chunk refused");
                return;
            }
        };
        let Some((model, d)) = self
            .downloads
            .iter_mut()
            .find(|(_, d)| d.offer.sha256 == chunk.sha256)
        else {
            return;
        };
        if d.verdict(chunk.index) == ChunkVerdict::Ignore {
            return;
        }
        if let Err(e) = d.offer.check_chunk(chunk.index, chunk.data) {
            // Asked again when the window stalls.
            self.stats.bundle_refused += 1;
            tracing::warn!(%model, error = %e, "bundle chunk refused");
            return;
        }
        if let Err(e) = self.edge.bundle_chunk(&d.offer, chunk.index, chunk.data) {
            tracing::error!(%model, error = %e, "bundle chunk not kept; asking again later");
            return;
        }
        self.stats.bundle_chunks += 1;
        d.advanced(Instant::now());
        if d.complete() {
            let model = model.clone();
            if let Some(d) = self.downloads.remove(&model) {
                self.edge.bundle_complete(&d.offer);
            }
        } else {
            self.fetch_due();
        }
    }

    /// Fetches of every download that is due one.
    fn fetch_due(&mut self) {
        let now = Instant::now();
        for d in self.downloads.values_mut() {
            if let Some(f) = d.fetch_due(now, self.ack_timeout) {
                let _ = self.client.try_publish(
                    &self.topics.fetch,
                    QoS::AtLeastOnce,
                    false,
                    f.to_bytes(),
                );
            }
        }
    }

    fn refuse_global(&mut self, model: &str, reason: &'static str) {
        self.stats.globals_refused += 1;
        self.edge.global_refused(model, reason);
    }

    /// The 200 ms tick while connected.
    pub fn on_tick(&mut self) {
        self.drain_outbox();
        self.publish_events();
        self.heartbeat();
        self.fetch_due();
        for r in self.edge.bundle_reports(PER_TICK) {
            let _ =
                self.client
                    .try_publish(&self.topics.report, QoS::AtLeastOnce, false, r.to_bytes());
        }
    }

    /// Publish outbox rows not in flight, and those whose ack is overdue.
    fn drain_outbox(&mut self) {
        for (id, payload) in self.edge.outbox(PER_TICK) {
            let last = self.inflight.get(&id).map(|&(sent, n)| (sent.elapsed(), n));
            let Some(resends) = decide::resend_due(last, self.ack_timeout) else {
                continue;
            };
            if resends > 0 {
                tracing::info!(update = %id, resends, "no ack yet; publishing again");
                self.stats.republished += 1;
            }
            let payload = match &self.cfg.device_key {
                Some(key) => signed::seal(
                    Kind::Update,
                    key,
                    &self.cfg.fleet,
                    &self.topics.update,
                    &payload,
                ),
                None => payload,
            };
            let sent =
                self.client
                    .try_publish(&self.topics.update, QoS::AtLeastOnce, false, payload);
            if sent.is_err() {
                break; // request queue full: next tick
            }
            self.inflight.insert(id, (Instant::now(), resends));
            self.stats.published += 1;
        }
    }

    /// Sensor events are best effort: dropped when the queue is full.
    fn publish_events(&mut self) {
        for payload in self.edge.events(PER_TICK) {
            let sent =
                self.client
                    .try_publish(&self.topics.event, QoS::AtLeastOnce, false, payload);
            if sent.is_err() {
                tracing::warn!("request queue full: a sensor event was dropped");
                break;
            }
            self.stats.events += 1;
        }
    }

    /// The retained status, every `heartbeat` (and at once after connecting).
    fn heartbeat(&mut self) {
        let since = self.last_heartbeat.map(|t| t.elapsed());
        if !decide::heartbeat_due(since, self.cfg.heartbeat) {
            return;
        }
        self.last_heartbeat = Some(Instant::now());
        let s = self.edge.status();
        let _ = self.client.try_publish(
            &self.topics.status,
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&s).unwrap_or_default(),
        );
    }

    /// The connection failed (or never came up): count a reconnect if it
    /// was up, and return how long to wait before polling again.
    pub fn on_connection_error(&mut self, e: &rumqttc::ConnectionError) -> Duration {
        if self.connected {
            self.stats.reconnects += 1;
        }
        self.connected = false;
        self.edge.uplink_error("connection");
        let wait = backoff(&self.cfg, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unreachable");
        wait
    }
}
