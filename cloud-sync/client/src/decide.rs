//! The uplink's decisions on what arrives and what is due, without a
//! socket or a clock: the session (`session.rs`) measures elapsed times and
//! does the I/O, these functions say what to do, so the rules are tested
//! without a broker.

use dai_protocol::base::GlobalId;
use dai_protocol::bundle::{Fetch, Offer};
use dai_protocol::messages::Ack;
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::Topic;
use ed25519_dalek::VerifyingKey;
use std::time::{Duration, Instant};

/// Longest backoff factor between resends of one update (`2^6` = 64x the
/// ack timeout).
const MAX_RESEND_DOUBLINGS: u32 = 6;

/// Whether an outbox row is published on this tick.
///
/// `last` is the row's in-flight record on this connection: how long ago
/// it was last published and how many times it was already published again
/// without an ack. Returns `None` when it is not due yet, otherwise the
/// resend count to record: `Some(0)` for a first publish, `Some(n + 1)` for
/// a republish.
pub(crate) fn resend_due(last: Option<(Duration, u32)>, ack_timeout: Duration) -> Option<u32> {
    let Some((since, n)) = last else {
        return Some(0);
    };
    // Each resend waits twice as long (up to 64x), so an aggregator that is
    // down for hours does not get a backlog of copies queued in its session.
    // Saturating: a huge configured timeout means "never", not a panic.
    let wait = ack_timeout.saturating_mul(1u32 << n.min(MAX_RESEND_DOUBLINGS));
    (since >= wait).then_some(n + 1)
}

/// Whether the heartbeat is due; `None` means none was sent on this
/// connection yet.
pub(crate) fn heartbeat_due(since_last: Option<Duration>, every: Duration) -> bool {
    since_last.is_none_or(|d| d >= every)
}

/// What a verified global model is, against the one served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GlobalVerdict {
    /// Newer (a larger version, or a newer epoch): store and serve it.
    Apply,
    /// The retained copy of what is served (arrives on every (re)connect).
    AlreadyServed,
    /// Below the one served (an older version, or any version of an older
    /// epoch: a replayed global of a retired version line): refused.
    Older,
}

pub(crate) fn global_verdict(global: GlobalId, current: GlobalId) -> GlobalVerdict {
    use std::cmp::Ordering::*;
    match global.cmp(&current) {
        Greater => GlobalVerdict::Apply,
        Equal => GlobalVerdict::AlreadyServed,
        Less => GlobalVerdict::Older,
    }
}

/// An incoming publish, sorted by topic.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// On the device's own ack topic: the verified, decoded ack, or why it
    /// was refused (unsigned, not the aggregator's signature for this
    /// topic, unreadable). A refused ack deletes nothing.
    Ack(Result<Ack, String>),
    /// On a model's global topic; the payload is verified by the session
    /// (it needs the key and the version served).
    Global { model: String },
    /// A bundle offer on `model`'s topic: verified (the aggregator's
    /// signature for that topic) and parsed, or why not.
    Offer {
        model: String,
        offer: Result<Offer, String>,
    },
    /// On the device's own chunk topic (checked against its offer by the
    /// session).
    Chunk,
    /// Anything else (a topic we did not subscribe to, or unparsable).
    Ignored,
}

/// Who the uplink is and whom it trusts, for [`classify`].
pub(crate) struct Trust<'a> {
    pub fleet: &'a str,
    /// This device's ack topic; an ack on any other is ignored.
    pub ack_topic: &'a str,
    /// This device's chunk topic.
    pub chunk_topic: &'a str,
    pub aggregator: &'a VerifyingKey,
}

pub(crate) fn classify(topic: &str, payload: &[u8], trust: &Trust<'_>) -> Incoming {
    match Topic::parse(topic) {
        Ok(Topic::Ack { .. }) if topic == trust.ack_topic => Incoming::Ack(
            signed::open(Kind::Ack, trust.aggregator, trust.fleet, topic, payload)
                .and_then(Ack::from_bytes)
                .map_err(|e| e.to_string()),
        ),
        Ok(Topic::Global { fleet, model }) if fleet == trust.fleet => Incoming::Global { model },
        Ok(Topic::Bundle { fleet, model }) if fleet == trust.fleet => {
            let offer = signed::open(Kind::Offer, trust.aggregator, trust.fleet, topic, payload)
                .and_then(|body| Offer::from_bytes(body, &model))
                .map_err(|e| e.to_string());
            Incoming::Offer { model, offer }
        }
        Ok(Topic::Chunk { .. }) if topic == trust.chunk_topic => Incoming::Chunk,
        _ => Incoming::Ignored,
    }
}

/// Chunks asked for at a time (each is at most 1 MiB).
pub(crate) const WINDOW: u32 = 4;

/// One bundle being fetched: which chunk comes next, how far the last
/// fetch asked, when a chunk last came.
#[derive(Debug, Clone)]
pub(crate) struct Download {
    pub offer: Offer,
    pub next: u32,
    asked_until: u32,
    last_progress: Option<Instant>,
}

/// What to do with an arriving chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkVerdict {
    /// The one expected next: check and take it.
    Take,
    /// A repeat or out of order (a fetch asked again): drop it.
    Ignore,
}

impl Download {
    pub fn new(offer: Offer, held: u32) -> Download {
        Download {
            offer,
            next: held,
            asked_until: held,
            last_progress: None,
        }
    }

    pub fn total(&self) -> u32 {
        self.offer.chunks.len() as u32
    }

    pub fn complete(&self) -> bool {
        self.next >= self.total()
    }

    /// The fetch to send now, if any: the next window once the last one
    /// arrived, or the same window again when nothing came for `timeout`.
    pub fn fetch_due(&mut self, now: Instant, timeout: Duration) -> Option<Fetch> {
        if self.complete() {
            return None;
        }
        let stalled = self
            .last_progress
            .is_none_or(|t| now.saturating_duration_since(t) >= timeout);
        if self.next < self.asked_until && !stalled {
            return None;
        }
        let count = WINDOW.min(self.total() - self.next);
        self.asked_until = self.next + count;
        self.last_progress = Some(now);
        Some(Fetch {
            sha256: self.offer.sha256.clone(),
            from: self.next,
            count,
        })
    }

    pub fn verdict(&self, index: u32) -> ChunkVerdict {
        if index == self.next && !self.complete() {
            ChunkVerdict::Take
        } else {
            ChunkVerdict::Ignore
        }
    }

    /// The expected chunk was taken.
    pub fn advanced(&mut self, now: Instant) {
        self.next += 1;
        self.last_progress = Some(now);
    }

    /// The connection was lost: ask again on the next one.
    pub fn reset(&mut self) {
        self.asked_until = self.next;
        self.last_progress = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_protocol::messages::AckStatus;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_download_asks_window_by_window_and_again_when_stalled() {
        let archive = vec![7u8; dai_protocol::bundle::CHUNK_BYTES * 5 + 1];
        let offer = Offer::describe("m", "1", &archive, Default::default(), 0.0);
        let mut d = Download::new(offer, 1);
        let t0 = Instant::now();
        let f = d.fetch_due(t0, T).expect("first fetch");
        assert_eq!((f.from, f.count), (1, WINDOW));
        assert!(d.fetch_due(t0, T).is_none(), "window outstanding");
        assert_eq!(d.verdict(2), ChunkVerdict::Ignore, "out of order");
        assert_eq!(d.verdict(1), ChunkVerdict::Take);
        d.advanced(t0);
        let again = d.fetch_due(t0 + T, T).expect("stalled: ask again");
        assert_eq!((again.from, again.count), (2, WINDOW));
        for i in 2..6 {
            assert_eq!(d.verdict(i), ChunkVerdict::Take);
            d.advanced(t0 + T);
        }
        assert!(d.complete());
        assert!(d.fetch_due(t0 + T * 3, T).is_none());
        assert_eq!(d.verdict(6), ChunkVerdict::Ignore);
    }

    #[test]
    fn first_publish_is_always_due() {
        assert_eq!(resend_due(None, T), Some(0));
    }

    #[test]
    fn resends_wait_for_the_timeout_doubling_each_time() {
        assert_eq!(resend_due(Some((Duration::from_secs(9), 0)), T), None);
        assert_eq!(resend_due(Some((T, 0)), T), Some(1));
        assert_eq!(resend_due(Some((Duration::from_secs(19), 1)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(20), 1)), T), Some(2));
        assert_eq!(resend_due(Some((Duration::from_secs(40), 3)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(80), 3)), T), Some(4));
    }

    #[test]
    fn resend_wait_is_capped_at_64x() {
        assert_eq!(resend_due(Some((Duration::from_secs(639), 6)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(640), 6)), T), Some(7));
        assert_eq!(
            resend_due(Some((Duration::from_secs(640), 40)), T),
            Some(41)
        );
    }

    #[test]
    fn a_huge_timeout_does_not_overflow() {
        assert_eq!(
            resend_due(Some((Duration::from_secs(1), 6)), Duration::MAX),
            None
        );
    }

    #[test]
    fn heartbeat_is_due_first_and_then_every_period() {
        assert!(heartbeat_due(None, T));
        assert!(!heartbeat_due(Some(Duration::from_secs(9)), T));
        assert!(heartbeat_due(Some(T), T));
    }

    #[test]
    fn globals_apply_only_when_newer() {
        let g = |epoch, version| GlobalId { epoch, version };
        assert_eq!(global_verdict(g(1, 3), g(1, 2)), GlobalVerdict::Apply);
        assert_eq!(global_verdict(g(1, 1), g(0, 0)), GlobalVerdict::Apply);
        assert_eq!(
            global_verdict(g(1, 2), g(1, 2)),
            GlobalVerdict::AlreadyServed
        );
        assert_eq!(global_verdict(g(1, 1), g(1, 2)), GlobalVerdict::Older);
        // A new epoch (the aggregator lost its state and started again)
        // wins whatever the version; a replayed old epoch never does.
        assert_eq!(global_verdict(g(2, 0), g(1, 50)), GlobalVerdict::Apply);
        assert_eq!(global_verdict(g(1, 99), g(2, 0)), GlobalVerdict::Older);
    }

    fn topic(t: Topic) -> String {
        match t.build() {
            Ok(s) => s,
            Err(e) => panic!("topic: {e}"),
        }
    }

    #[test]
    fn incoming_messages_are_sorted_by_topic() {
        let ack_topic = topic(Topic::Ack {
            fleet: "f".into(),
            device: "d".into(),
        });
        let global_topic = topic(Topic::Global {
            fleet: "f".into(),
            model: "m".into(),
        });
        let ack = Ack {
            update_id: "u1".into(),
            status: AckStatus::Accepted,
            reason: None,
            round: None,
        };
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let forger = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let public = key.verifying_key();
        let chunk_topic = topic(Topic::Chunk {
            fleet: "f".into(),
            device: "d".into(),
        });
        let trust = Trust {
            fleet: "f",
            ack_topic: &ack_topic,
            chunk_topic: &chunk_topic,
            aggregator: &public,
        };
        let bytes = ack.to_bytes();
        let signed = signed::seal(Kind::Ack, &key, "f", &ack_topic, &bytes);
        match classify(&ack_topic, &signed, &trust) {
            Incoming::Ack(Ok(a)) => assert_eq!(a.update_id, "u1"),
            other => panic!("{other:?}"),
        }
        // Forged acks: unsigned, another key, signed for another device's
        // topic, garbage under a good signature.
        let other_topic = topic(Topic::Ack {
            fleet: "f".into(),
            device: "e".into(),
        });
        for forged in [
            bytes.clone(),
            signed::seal(Kind::Ack, &forger, "f", &ack_topic, &bytes),
            signed::seal(Kind::Ack, &key, "f", &other_topic, &bytes),
            signed::seal(Kind::Update, &key, "f", &ack_topic, &bytes),
            signed::seal(Kind::Ack, &key, "f", &ack_topic, b"{"),
        ] {
            assert!(
                matches!(classify(&ack_topic, &forged, &trust), Incoming::Ack(Err(_))),
                "forged ack accepted"
            );
        }
        // Another device's genuine ack is not ours.
        let theirs = signed::seal(Kind::Ack, &key, "f", &other_topic, &bytes);
        assert!(matches!(
            classify(&other_topic, &theirs, &trust),
            Incoming::Ignored
        ));
        match classify(&global_topic, b"anything", &trust) {
            Incoming::Global { model } => assert_eq!(model, "m"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("not/ours", b"", &trust),
            Incoming::Ignored
        ));
        let status = topic(Topic::Status {
            fleet: "f".into(),
            device: "d".into(),
        });
        assert!(matches!(classify(&status, b"", &trust), Incoming::Ignored));
        // Bundle offers count only under the aggregator's signature for
        // their own topic; chunks only on this device's topic.
        let offer_topic = topic(Topic::Bundle {
            fleet: "f".into(),
            model: "m".into(),
        });
        let offer = Offer::describe("m", "2", b"archive", Default::default(), 0.0).to_bytes();
        let good = signed::seal(Kind::Offer, &key, "f", &offer_topic, &offer);
        match classify(&offer_topic, &good, &trust) {
            Incoming::Offer { offer: Ok(o), .. } => assert_eq!(o.version, "2"),
            other => panic!("{other:?}"),
        }
        for forged in [
            offer.clone(),
            signed::seal(Kind::Offer, &forger, "f", &offer_topic, &offer),
            signed::seal(Kind::Ack, &key, "f", &offer_topic, &offer),
            signed::seal(Kind::Offer, &key, "f", &global_topic, &offer),
        ] {
            assert!(
                matches!(
                    classify(&offer_topic, &forged, &trust),
                    Incoming::Offer { offer: Err(_), .. }
                ),
                "forged offer accepted"
            );
        }
        assert!(matches!(
            classify(&chunk_topic, b"", &trust),
            Incoming::Chunk
        ));
        let their_chunks = topic(Topic::Chunk {
            fleet: "f".into(),
            device: "e".into(),
        });
        assert!(matches!(
            classify(&their_chunks, b"", &trust),
            Incoming::Ignored
        ));
    }
}
