//! Model bundles sent to a running fleet (`dai-cloud models publish`):
//! the messages, their bounds and their checks. No I/O.
//!
//! 1. The aggregator publishes an [`Offer`], retained, on
//!    `.../model/{name}/bundle`, sealed with its key ([`crate::signed`],
//!    kind `Offer`: domain, fleet and topic covered). The offer names the
//!    archive's size and sha256, the chunk size, each chunk's sha256 and
//!    the targets (all devices, a list, or a group a device is configured
//!    into).
//! 2. A targeted device asks for chunks on its own `.../dev/{d}/fetch`
//!    ([`Fetch`]: from which chunk, how many), a few at a time; it resumes
//!    from what it already holds (a restart, a reconnect, a chunk that did
//!    not come).
//! 3. The aggregator answers on `.../dev/{d}/chunk` ([`Chunk`]: binary,
//!    the archive's sha256, the index, the bytes). The chunk need not be
//!    signed: [`Offer::check_chunk`] compares it with the signed list, so a
//!    broker that alters one is caught at that chunk, not after the whole
//!    download.
//! 4. The device reports on `.../dev/{d}/report` ([`Report`]:
//!    downloading, verified, loaded, failed with the reason).

use crate::ProtocolError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes per chunk the aggregator uses.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Largest chunk size an offer may name.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Most chunks in one bundle (with [`CHUNK_BYTES`]: 1 GiB).
pub const MAX_CHUNKS: usize = 4096;
/// Largest offer body: the chunk list (65 bytes each as JSON) and room.
pub const MAX_OFFER_BYTES: usize = MAX_CHUNKS * 68 + (16 << 10);
/// Largest fetch.
pub const MAX_FETCH_BYTES: usize = 1024;
/// Most chunks one fetch may ask for.
pub const MAX_FETCH_CHUNKS: u32 = 8;
/// A chunk's header: magic, archive sha256, index.
pub const CHUNK_HEADER: usize = 5 + 32 + 4;
/// Largest chunk message.
pub const MAX_CHUNK_WIRE_BYTES: usize = CHUNK_HEADER + MAX_CHUNK_BYTES;
/// Largest report.
pub const MAX_REPORT_BYTES: usize = 4096;
/// Longest detail in a report (cut on a character boundary).
pub const MAX_DETAIL_BYTES: usize = 1024;
/// Most devices an offer may list.
pub const MAX_TARGETS: usize = 1024;

const CHUNK_MAGIC: &[u8; 5] = b"DAIC1";

/// Who an offer is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Devices by name; empty with no group: every device of the fleet.
    #[serde(default)]
    pub devices: Vec<String>,
    /// A group name (`cloud.groups` in a device's config).
    #[serde(default)]
    pub group: Option<String>,
}

impl Targets {
    /// Is the device `name`, in `groups`, targeted?
    pub fn includes(&self, name: &str, groups: &[String]) -> bool {
        let listed = self.devices.iter().any(|d| d == name);
        let grouped = self.group.as_ref().is_some_and(|g| groups.contains(g));
        (self.devices.is_empty() && self.group.is_none()) || listed || grouped
    }
}

/// A bundle on offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The bundle's model name (its manifest's), also in the topic.
    pub name: String,
    pub version: String,
    /// sha256 of the whole archive, hex.
    pub sha256: String,
    pub size: u64,
    pub chunk_bytes: u32,
    /// sha256 of each chunk, hex, in order.
    pub chunks: Vec<String>,
    #[serde(default)]
    pub targets: Targets,
    /// When the operator published it (Unix seconds).
    pub created: f64,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl Offer {
    /// The offer for `archive` (chunks of [`CHUNK_BYTES`]).
    pub fn describe(
        name: &str,
        version: &str,
        archive: &[u8],
        targets: Targets,
        created: f64,
    ) -> Offer {
        Offer {
            name: name.into(),
            version: version.into(),
            sha256: hex::encode(Sha256::digest(archive)),
            size: archive.len() as u64,
            chunk_bytes: CHUNK_BYTES as u32,
            chunks: archive
                .chunks(CHUNK_BYTES)
                .map(|c| hex::encode(Sha256::digest(c)))
                .collect(),
            targets,
            created,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse and check an offer's body (already verified as signed for
    /// `model`'s topic).
    pub fn from_bytes(body: &[u8], model: &str) -> Result<Offer, ProtocolError> {
        if body.len() > MAX_OFFER_BYTES {
            return Err(ProtocolError::TooLarge {
                size: body.len(),
                limit: MAX_OFFER_BYTES,
            });
        }
        let o: Offer = serde_json::from_slice(body)
            .map_err(|e| ProtocolError::Metadata(format!("bundle offer: {e}")))?;
        let bad = |r: String| Err(ProtocolError::Metadata(format!("bundle offer: {r}")));
        if o.name != model {
            return bad(format!("names {:?}, published for {model:?}", o.name));
        }
        if o.chunk_bytes == 0 || o.chunk_bytes as usize > MAX_CHUNK_BYTES {
            return bad(format!(
                "chunk size {} outside 1..={MAX_CHUNK_BYTES}",
                o.chunk_bytes
            ));
        }
        let expected = o.size.div_ceil(u64::from(o.chunk_bytes));
        if o.size == 0 || o.chunks.len() as u64 != expected || o.chunks.len() > MAX_CHUNKS {
            return bad(format!(
                "{} chunk hashes for {} bytes in chunks of {} (expected {expected}, at most {MAX_CHUNKS})",
                o.chunks.len(),
                o.size,
                o.chunk_bytes
            ));
        }
        if hex32(&o.sha256).is_none() || o.chunks.iter().any(|c| hex32(c).is_none()) {
            return bad("a sha256 is not 64 hex digits".into());
        }
        if o.targets.devices.len() > MAX_TARGETS || o.version.len() > 128 {
            return bad(format!(
                "more than {MAX_TARGETS} targets or a version over 128 bytes"
            ));
        }
        Ok(o)
    }

    /// Bytes of chunk `index` (the last may be short).
    pub fn chunk_len(&self, index: u32) -> Option<usize> {
        let start = u64::from(index) * u64::from(self.chunk_bytes);
        (start < self.size).then(|| (self.size - start).min(u64::from(self.chunk_bytes)) as usize)
    }

    /// Is `data` chunk `index` of this offer?
    pub fn check_chunk(&self, index: u32, data: &[u8]) -> Result<(), ProtocolError> {
        let want = self.chunk_len(index).ok_or_else(|| {
            ProtocolError::Checksum(format!(
                "chunk {index} of {} does not exist",
                self.chunks.len()
            ))
        })?;
        if data.len() != want {
            return Err(ProtocolError::Checksum(format!(
                "chunk {index} holds {} bytes, the offer says {want}",
                data.len()
            )));
        }
        let actual = hex::encode(Sha256::digest(data));
        if !self.chunks[index as usize].eq_ignore_ascii_case(&actual) {
            return Err(ProtocolError::Checksum(format!(
                "chunk {index}: sha256 {actual} is not the offer's {}",
                self.chunks[index as usize]
            )));
        }
        Ok(())
    }
}

/// A device's request for chunks `from..from+count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    pub sha256: String,
    pub from: u32,
    pub count: u32,
}

impl Fetch {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Fetch, ProtocolError> {
        if b.len() > MAX_FETCH_BYTES {
            return Err(ProtocolError::TooLarge {
                size: b.len(),
                limit: MAX_FETCH_BYTES,
            });
        }
        let f: Fetch = serde_json::from_slice(b)
            .map_err(|e| ProtocolError::Metadata(format!("fetch: {e}")))?;
        if hex32(&f.sha256).is_none() || f.count == 0 || f.count > MAX_FETCH_CHUNKS {
            return Err(ProtocolError::Metadata(format!(
                "fetch: expected a 64-hex sha256 and 1..={MAX_FETCH_CHUNKS} chunks"
            )));
        }
        Ok(f)
    }
}

/// One chunk of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// The archive's sha256, hex.
    pub sha256: String,
    pub index: u32,
    pub data: &'a [u8],
}

impl Chunk<'_> {
    /// `DAIC1` | sha256 (32 bytes) | index (u32 LE) | data.
    pub fn encode(sha256_hex: &str, index: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHUNK_HEADER + data.len());
        out.extend_from_slice(CHUNK_MAGIC);
        out.extend_from_slice(&hex32(sha256_hex).unwrap_or([0; 32]));
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    pub fn decode(wire: &[u8]) -> Result<Chunk<'_>, ProtocolError> {
        if wire.len() > MAX_CHUNK_WIRE_BYTES {
            return Err(ProtocolError::TooLarge {
                size: wire.len(),
                limit: MAX_CHUNK_WIRE_BYTES,
            });
        }
        if wire.len() < CHUNK_HEADER || &wire[..5] != CHUNK_MAGIC {
            return Err(ProtocolError::Format(
                "not a bundle chunk (expected the DAIC1 header)".into(),
            ));
        }
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&wire[37..41]);
        Ok(Chunk {
            sha256: hex::encode(&wire[5..37]),
            index: u32::from_le_bytes(idx),
            data: &wire[CHUNK_HEADER..],
        })
    }
}

/// Where a device stands with a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportState {
    Downloading,
    Verified,
    Loaded,
    Failed,
}

impl ReportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Downloading => "downloading",
            ReportState::Verified => "verified",
            ReportState::Loaded => "loaded",
            ReportState::Failed => "failed",
        }
    }
}

/// A device's report about one offered bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub state: ReportState,
    /// Chunks held so far.
    pub received: u32,
    pub total: u32,
    /// The reason of a failure; empty otherwise.
    #[serde(default)]
    pub detail: String,
}

impl Report {
    /// JSON, the detail cut to [`MAX_DETAIL_BYTES`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut r = self.clone();
        if r.detail.len() > MAX_DETAIL_BYTES {
            let mut cut = MAX_DETAIL_BYTES;
            while !r.detail.is_char_boundary(cut) {
                cut -= 1;
            }
            r.detail.truncate(cut);
        }
        serde_json::to_vec(&r).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Report, ProtocolError> {
        if b.len() > MAX_REPORT_BYTES {
            return Err(ProtocolError::TooLarge {
                size: b.len(),
                limit: MAX_REPORT_BYTES,
            });
        }
        serde_json::from_slice(b).map_err(|e| ProtocolError::Metadata(format!("report: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_checks_every_chunk_against_its_list() {
        let archive: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let o = Offer::describe("m", "2", &archive, Targets::default(), 1.0);
        let back = Offer::from_bytes(&o.to_bytes(), "m").expect("parses");
        assert_eq!(back, o);
        assert_eq!(o.chunks.len(), 3);
        assert_eq!(o.chunk_len(2), Some(10));
        assert_eq!(o.chunk_len(3), None);
        for (i, c) in archive.chunks(CHUNK_BYTES).enumerate() {
            o.check_chunk(i as u32, c).expect("own chunk");
        }
        let mut bad = archive[..CHUNK_BYTES].to_vec();
        bad[7] ^= 1;
        let e = o.check_chunk(0, &bad).expect_err("altered chunk");
        assert!(e.to_string().contains("chunk 0: sha256"), "{e}");
        assert!(o.check_chunk(2, &archive[..9]).is_err(), "short chunk");
        assert!(o.check_chunk(9, &archive[..10]).is_err(), "no such chunk");
        assert!(
            Offer::from_bytes(&o.to_bytes(), "other").is_err(),
            "another model's topic"
        );
        let mut wrong = o.clone();
        wrong.chunks.pop();
        assert!(
            Offer::from_bytes(&wrong.to_bytes(), "m").is_err(),
            "chunk count"
        );
    }

    #[test]
    fn chunks_fetches_reports_and_targets_round_trip() {
        let sha = "ab".repeat(32);
        let wire = Chunk::encode(&sha, 7, b"hello");
        let c = Chunk::decode(&wire).expect("decode");
        assert_eq!(
            (c.sha256.as_str(), c.index, c.data),
            (sha.as_str(), 7, &b"hello"[..])
        );
        assert!(Chunk::decode(b"DAIC1short").is_err());
        let f = Fetch {
            sha256: sha.clone(),
            from: 3,
            count: 4,
        };
        assert_eq!(Fetch::from_bytes(&f.to_bytes()).expect("fetch"), f);
        let greedy = Fetch {
            count: MAX_FETCH_CHUNKS + 1,
            ..f
        };
        assert!(Fetch::from_bytes(&greedy.to_bytes()).is_err());
        let r = Report {
            name: "m".into(),
            version: "2".into(),
            sha256: sha,
            state: ReportState::Failed,
            received: 1,
            total: 2,
            detail: "\u{1F600}".repeat(600),
        };
        let wire = r.to_bytes();
        assert!(wire.len() <= MAX_REPORT_BYTES);
        assert_eq!(
            Report::from_bytes(&wire).expect("report").state,
            ReportState::Failed
        );
        let all = Targets::default();
        assert!(all.includes("a", &[]));
        let listed = Targets {
            devices: vec!["a".into()],
            group: None,
        };
        assert!(listed.includes("a", &[]) && !listed.includes("b", &[]));
        let group = Targets {
            devices: vec![],
            group: Some("cams".into()),
        };
        assert!(group.includes("b", &["cams".into()]) && !group.includes("b", &[]));
    }
}
