//! The JSON messages and names that cross MQTT: acks (edge side), status
//! heartbeats and wants (aggregator side), topics and base labels, and the
//! bundle messages: offers and chunks (edge side), fetches and reports
//! (aggregator side).
#![no_main]

use dai_protocol::messages::{Ack, MAX_WANT_BYTES, Status, Want};
use dai_protocol::bundle::{Chunk, Fetch, Offer, Report};
use dai_protocol::{base, topics};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ack) = Ack::from_bytes(data) {
        assert_eq!(Ack::from_bytes(&ack.to_bytes()).ok(), Some(ack));
    }
    if data.len() <= MAX_WANT_BYTES
        && let Ok(want) = Want::from_bytes(data)
    {
        assert_eq!(Want::from_bytes(&want.to_bytes()).ok(), Some(want));
    }
    let _ = serde_json::from_slice::<Status>(data);
    if let Ok(offer) = Offer::from_bytes(data, "m") {
        // Every chunk index the offer admits has a length; no other does.
        let n = offer.chunks.len() as u32;
        assert!(offer.chunk_len(n.saturating_sub(1)).is_some());
        assert!(offer.chunk_len(n).is_none());
        let _ = offer.check_chunk(0, data);
    }
    if let Ok(f) = Fetch::from_bytes(data) {
        assert_eq!(Fetch::from_bytes(&f.to_bytes()).ok(), Some(f));
    }
    if let Ok(c) = Chunk::decode(data) {
        assert_eq!(Chunk::encode(&c.sha256, c.index, c.data), data);
    }
    if let Ok(r) = Report::from_bytes(data) {
        assert!(Report::from_bytes(&r.to_bytes()).is_ok());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = topics::Topic::parse(text) {
            // A parsed topic builds back to the same string.
            assert_eq!(t.build().ok().as_deref(), Some(text));
        }
        if let Some(b) = base::parse(text) {
            let _ = b;
        }
    }
});
