//! Installing bundles into a running daemon: what `POST /v1/models` (and a
//! bundle published over MQTT) ends in.
//!
//! Layout under `data_dir/models` (writable even where `models_dir` is a
//! read-only image):
//! - `.incoming/`: uploads being received and unpacked; emptied at start;
//! - `.versions/NAME/ID/`: each installed version's files (ID is the
//!   install time and the model's sha256 prefix);
//! - `NAME`: a symlink to the version served, swapped by `rename(2)`, so a
//!   power cut leaves either the old or the new version linked, never a
//!   half-written one.
//!
//! [`Installer::install`] unpacks ([`archive`]), verifies everything the
//! loader checks (manifest, checksums, a real tract load within the memory
//! budget, through [`Runtime::prepare`]) in the version's own directory,
//! and only then switches the link and the registry. A refused bundle is
//! deleted; the version that was serving keeps serving. The current and the
//! previous version are kept, older ones deleted. At start the daemon
//! loads [`Installer::bundle_dirs`] after `models_dir`, so an installed
//! bundle replaces a shipped one of the same name and survives restarts.

pub mod archive;
pub mod download;

use dai_infer::bundle::{Bundle, BundleError};
use dai_infer::{LoadEvent, Runtime};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Why an install did not happen.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("bad bundle archive: {reason}")]
    Archive { reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("bundle name {name:?} cannot name a directory (1-64 characters of [A-Za-z0-9._-])")]
    Name { name: String },
    #[error("bundle {name} version {version} refused (the serving version is unchanged): {reason}")]
    Refused {
        name: String,
        version: String,
        reason: String,
    },
}

impl InstallError {
    /// Whether the bundle itself is at fault (400), not the device (500).
    pub fn is_bad_bundle(&self) -> bool {
        !matches!(self, InstallError::Io { .. })
    }
}

/// A version now serving.
#[derive(Debug, Clone)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub load_ms: f64,
    /// The (version, sha256) it replaced, if one was serving.
    pub replaced: Option<(String, String)>,
    pub event: LoadEvent,
}

/// Installs bundles under one root, one at a time.
#[derive(Debug)]
pub struct Installer {
    root: PathBuf,
    max_bytes: u64,
    lock: parking_lot::Mutex<()>,
    seq: AtomicU64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Installer {
    /// Installs under `data_dir/models`, archives and their files bounded
    /// by `max_bytes` each.
    pub fn new(data_dir: &Path, max_bytes: u64) -> Installer {
        Installer {
            root: data_dir.join("models"),
            max_bytes,
            lock: parking_lot::Mutex::new(()),
            seq: AtomicU64::new(0),
        }
    }

    /// `data_dir/models`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn incoming(&self) -> PathBuf {
        self.root.join(".incoming")
    }

    /// A fresh path under `.incoming/` for an archive being received.
    pub fn incoming_path(&self, what: &str) -> Result<PathBuf, InstallError> {
        let dir = self.incoming();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir.join(format!("{}.{what}", self.unique())))
    }

    fn unique(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{nanos:x}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Delete what an interrupted upload or install left (at start).
    pub fn clean_incoming(&self) {
        let dir = self.incoming();
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot clean interrupted uploads");
        }
    }

    /// The installed bundles (their links), sorted by name.
    pub fn bundle_dirs(&self) -> Vec<PathBuf> {
        if !self.root.is_dir() {
            return Vec::new();
        }
        let mut dirs = dai_infer::bundle::discover(&self.root).unwrap_or_default();
        // `.NAME.link` is a swap a power cut interrupted, never served.
        dirs.retain(|d| {
            d.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        });
        dirs
    }

    /// Unpack, verify and serve the bundle archive in `file` (consumed).
    /// Blocking.
    pub fn install(&self, runtime: &Runtime, file: &Path) -> Result<Installed, InstallError> {
        let _one = self.lock.lock();
        let staging = self.incoming().join(self.unique());
        let result = self.install_locked(runtime, file, &staging);
        let _ = std::fs::remove_file(file);
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    fn install_locked(
        &self,
        runtime: &Runtime,
        file: &Path,
        staging: &Path,
    ) -> Result<Installed, InstallError> {
        let started = Instant::now();
        let root = archive::unpack(file, staging, self.max_bytes)?;
        let manifest = Bundle::read_manifest(&root)?;
        let (name, version) = (manifest.name.clone(), manifest.version.clone());
        if !dai_protocol::topics::valid_segment(&name) || name.starts_with('.') {
            return Err(InstallError::Name { name });
        }
        let refused = |reason: String| InstallError::Refused {
            name: name.clone(),
            version: version.clone(),
            reason,
        };
        // Checksums first: a tampered file is named before tract runs.
        let bundle = Bundle::open(&root).map_err(|e| refused(e.to_string()))?;
        let versions = self.root.join(".versions").join(&name);
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let id = format!(
            "{}-{}",
            self.unique(),
            &bundle.model_sha256[..12.min(bundle.model_sha256.len())]
        );
        let home = versions.join(&id);
        std::fs::rename(&root, &home).map_err(io(&home))?;
        sync_dir(&versions);
        let model = match runtime.prepare(&home) {
            Ok(m) => m,
            Err(reason) => {
                let _ = std::fs::remove_dir_all(&home);
                return Err(refused(reason));
            }
        };
        let replaced = runtime
            .model(&name)
            .ok()
            .map(|m| (m.version().to_string(), m.bundle.model_sha256.clone()));
        let link = self.root.join(&name);
        let previous = std::fs::read_link(&link).ok();
        if let Err(e) = swap_link(&self.root, &name, &id) {
            let _ = std::fs::remove_dir_all(&home);
            return Err(e);
        }
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let event = runtime.install(&link, model.clone(), load_ms);
        self.prune(&versions, &id, previous.as_deref());
        Ok(Installed {
            name,
            version,
            sha256: model.bundle.model_sha256.clone(),
            load_ms,
            replaced,
            event,
        })
    }

    /// Keep `current` and the previously linked version; delete the rest.
    fn prune(&self, versions: &Path, current: &str, previous: Option<&Path>) {
        let keep_prev = previous.and_then(|p| p.file_name()).map(|n| n.to_owned());
        let Ok(entries) = std::fs::read_dir(versions) else {
            return;
        };
        for e in entries.flatten() {
            let n = e.file_name();
            if n == current || Some(&n) == keep_prev.as_ref() {
                continue;
            }
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(dir = %e.path().display(), error = %err, "cannot delete an old bundle version");
            }
        }
    }
}

/// Point `root/name` at `.versions/name/id` atomically: a new link under a
/// temporary name, renamed over the old one.
fn swap_link(root: &Path, name: &str, id: &str) -> Result<(), InstallError> {
    let target = Path::new(".versions").join(name).join(id);
    let tmp = root.join(format!(".{name}.link"));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, &tmp).map_err(io(&tmp))?;
    #[cfg(not(unix))]
    return Err(InstallError::Io {
        path: tmp,
        source: std::io::Error::other("installing bundles needs symbolic links (Unix)"),
    });
    let link = root.join(name);
    if link.exists() && std::fs::symlink_metadata(&link).is_ok_and(|m| !m.file_type().is_symlink())
    {
        return Err(InstallError::Io {
            path: link,
            source: std::io::Error::other("not a link to an installed version; move it away"),
        });
    }
    std::fs::rename(&tmp, &link).map_err(io(&link))?;
    sync_dir(root);
    Ok(())
}

/// fsync a directory so a rename in it survives a power cut.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
