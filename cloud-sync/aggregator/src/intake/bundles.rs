//! The intake's part in sending bundles to devices ([`dai_protocol::bundle`]):
//! the newest offer of each model name in the state file (added by
//! `dai-cloud models publish`, possibly from another process) is signed
//! and published retained on the next tick (and again after each
//! reconnect); fetches are answered with chunks from the state file, at
//! most [`CHUNKS_PER_TICK`] per tick across all devices (a device asks
//! again when its window stalls), so no device can make this process
//! queue more than that; reports are recorded.

use super::{Intake, Output};
use dai_protocol::bundle::{Chunk, Fetch, Report};
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::Topic;

/// Chunks (at most 1 MiB each, 256 KiB as published) sent per 250 ms tick.
pub const CHUNKS_PER_TICK: u32 = 16;

impl Intake {
    /// Publish offers not yet published by this session.
    pub(super) fn publish_offers(&mut self) {
        let offers = match self.state.offers() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the bundles on offer");
                return;
            }
        };
        for offer in offers {
            if self.offered_sha.get(&offer.name) == Some(&offer.sha256) {
                continue;
            }
            let topic = Topic::Bundle {
                fleet: self.cfg.fleet.clone(),
                model: offer.name.clone(),
            };
            let Ok(topic) = topic.build() else {
                tracing::error!(name = %offer.name, "a bundle name that is not a topic segment; not offered");
                continue;
            };
            let payload = signed::seal(
                Kind::Offer,
                &self.cfg.signing_key,
                &self.cfg.fleet,
                &topic,
                &offer.to_bytes(),
            );
            tracing::info!(bundle = %offer.name, version = %offer.version, sha256 = %offer.sha256, bytes = offer.size, chunks = offer.chunks.len(), "bundle offered");
            self.offered_sha
                .insert(offer.name.clone(), offer.sha256.clone());
            self.offered.insert(offer.name.clone(), payload.clone());
            self.outputs.push(Output::Send {
                topic,
                retain: true,
                payload,
            });
        }
    }

    /// A retained offer as the broker holds it: one that is not the offer
    /// this session signed (cleared, or replaced by someone who could
    /// write the topic) is published again on the next tick. Devices
    /// verify the signature anyway; this keeps late joiners served.
    pub(super) fn retained_offer(&mut self, model: &str, payload: &[u8]) {
        if let Some(ours) = self.offered.get(model)
            && ours.as_slice() != payload
        {
            tracing::warn!(%model, bytes = payload.len(), "the retained bundle offer is not ours; publishing it again");
            self.offered_sha.remove(model);
        }
    }

    /// A device's fetch: the chunks asked for, within this tick's budget.
    pub(super) fn fetch(&mut self, device: &str, payload: &[u8]) {
        let f = match Fetch::from_bytes(payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%device, error = %e, "bundle fetch refused");
                return;
            }
        };
        let Ok(topic) = (Topic::Chunk {
            fleet: self.cfg.fleet.clone(),
            device: device.to_string(),
        })
        .build() else {
            return;
        };
        for idx in f.from..f.from.saturating_add(f.count) {
            if self.chunks_sent >= CHUNKS_PER_TICK {
                tracing::debug!(%device, "chunk budget of this tick spent; the device asks again");
                return;
            }
            match self.state.bundle_chunk(&f.sha256, idx) {
                Ok(Some(data)) => {
                    self.chunks_sent += 1;
                    self.outputs.push(Output::Send {
                        topic: topic.clone(),
                        retain: false,
                        payload: Chunk::encode(&f.sha256, idx, &data),
                    });
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "cannot read a bundle chunk");
                    return;
                }
            }
        }
    }

    /// A device's report on a bundle.
    pub(super) fn bundle_report(&mut self, device: &str, payload: &[u8]) {
        let r = match Report::from_bytes(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%device, error = %e, "bundle report refused");
                return;
            }
        };
        match self.state.record_bundle_report(device, &r) {
            Ok(true) => {
                tracing::info!(%device, bundle = %r.name, version = %r.version, state = r.state.as_str(), received = r.received, total = r.total, detail = %r.detail, "bundle report")
            }
            Ok(false) => {
                tracing::warn!(%device, bundle = %r.name, detail = %r.detail, "a report on a bundle not on offer")
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot record a bundle report")
            }
        }
    }
}
