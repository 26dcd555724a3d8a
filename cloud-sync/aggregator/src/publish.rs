//! Bundles for the fleet (`dai-cloud models publish`): a bundle directory
//! (checked the way a device will: manifest and checksums; loading it in
//! tract is the device's part) packed as a tar, or an archive sent as it
//! is after its manifest is read from it, described as an
//! [`Offer`] and stored with its chunks in the state file
//! ([`State::add_bundle`]), which a running aggregator signs and serves
//! ([`crate::intake`]).

use crate::state::{State, StateError};
use dai_protocol::bundle::{CHUNK_BYTES, MAX_CHUNKS, Offer, Targets};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest bundle: what an offer can describe.
pub const MAX_BUNDLE: u64 = (MAX_CHUNKS * CHUNK_BYTES) as u64;

/// Why a bundle was not offered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checking the bundle")]
    Bundle(#[from] dai_infer::BundleError),
    #[error("archive: {0}")]
    Archive(String),
    #[error("{size} bytes; a published bundle is at most {MAX_BUNDLE}")]
    TooLarge { size: u64 },
    #[error("{0:?} is not 1-64 characters of [A-Za-z0-9._-]")]
    Name(String),
    #[error("state")]
    State(#[from] StateError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Offer the bundle at `path` (directory or archive) to `targets`.
pub fn publish(state: &mut State, path: &Path, targets: Targets) -> Result<Offer, PublishError> {
    for d in targets.devices.iter().chain(&targets.group) {
        if !dai_protocol::topics::valid_segment(d) {
            return Err(PublishError::Name(d.clone()));
        }
    }
    let (manifest, archive) = if path.is_dir() {
        let b = dai_infer::bundle::Bundle::open(path)?;
        (b.manifest, pack(path)?)
    } else {
        let archive = std::fs::read(path).map_err(io(path))?;
        (manifest_in(&archive)?, archive)
    };
    if archive.len() as u64 > MAX_BUNDLE {
        return Err(PublishError::TooLarge {
            size: archive.len() as u64,
        });
    }
    if !dai_protocol::topics::valid_segment(&manifest.name) {
        return Err(PublishError::Name(manifest.name));
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let offer = Offer::describe(
        &manifest.name,
        &manifest.version,
        &archive,
        targets,
        created,
    );
    state.add_bundle(&offer, &archive)?;
    Ok(offer)
}

/// The files of a bundle directory as a tar (sorted, no owners or times:
/// the same directory packs to the same bytes).
pub fn pack(dir: &Path) -> Result<Vec<u8>, PublishError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut t = tar::Builder::new(Vec::new());
    for p in names {
        let data = std::fs::read(&p).map_err(io(&p))?;
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        t.append_data(&mut h, &name, data.as_slice())
            .map_err(io(&p))?;
    }
    t.into_inner().map_err(io(dir))
}

/// The manifest inside a tar or tar.gz archive (at its top level or in its
/// one top-level directory).
fn manifest_in(archive: &[u8]) -> Result<dai_infer::Manifest, PublishError> {
    let bad = |e: String| PublishError::Archive(e);
    let reader: Box<dyn Read + '_> = if archive.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(archive))
    } else {
        Box::new(archive)
    };
    let mut t = tar::Archive::new(reader);
    for entry in t
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("damaged: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("an unreadable path: {e}")))?
            .into_owned();
        let depth = path
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count();
        if path.file_name().is_some_and(|n| n == "manifest.toml") && depth <= 2 {
            let mut text = String::new();
            (&mut entry)
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("manifest.toml: {e}")))?;
            return dai_infer::bundle::parse_manifest(&text)
                .map_err(|e| bad(format!("manifest.toml: {e}")));
        }
    }
    Err(bad("no manifest.toml in it".into()))
}
