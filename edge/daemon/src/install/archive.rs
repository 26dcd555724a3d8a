//! Bundle archives: a tar file (optionally gzip-compressed) of a bundle's
//! files, as `tar -C BUNDLE_DIR -czf bundle.tgz .` or `tar -czf
//! bundle.tgz BUNDLE_DIR` writes it. [`unpack`] writes its regular files
//! under a fresh directory and refuses anything else: absolute paths,
//! `..`, links, devices, more than [`MAX_ENTRIES`] entries or more than
//! the configured bytes in all (counted from the headers before a byte is
//! written, so a gzip bomb stops at the bound). [`entry_path`] is the pure
//! path rule.

use super::InstallError;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Most entries (files and directories) an archive may hold.
pub const MAX_ENTRIES: usize = 256;
/// Deepest path inside an archive, in components.
const MAX_DEPTH: usize = 4;

/// The relative path an archive entry names, or why it is refused; `None`
/// for the archive's own root (`.`).
pub fn entry_path(raw: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("it climbs out with `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("it is an absolute path".into());
            }
        }
    }
    if out.components().count() > MAX_DEPTH {
        return Err(format!("it is deeper than {MAX_DEPTH} directories"));
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Unpack the archive in `file` into `dest` (created; must not exist),
/// with at most `max_bytes` of file contents. Returns the bundle's root:
/// `dest`, or its one top-level directory when the manifest is there.
pub fn unpack(file: &Path, dest: &Path, max_bytes: u64) -> Result<PathBuf, InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    let mut f = std::fs::File::open(file).map_err(io(file))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io(file))?;
    drop(f);
    let f = std::fs::File::open(file).map_err(io(file))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    std::fs::create_dir(dest).map_err(io(dest))?;
    let bad = |reason: String| InstallError::Archive { reason };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let (mut count, mut total, mut files) = (0usize, 0u64, 0usize);
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            bad(format!(
                "cannot read entry {} (a truncated or corrupt archive?): {e}",
                count + 1
            ))
        })?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let raw = entry
            .path()
            .map_err(|e| bad(format!("entry {count} has an unreadable path: {e}")))?
            .into_owned();
        let shown = raw.display().to_string();
        let rel = entry_path(&raw).map_err(|why| bad(format!("entry {shown} refused: {why}")))?;
        let kind = entry.header().entry_type();
        let Some(rel) = rel else { continue };
        let target = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(io(&target))?;
            continue;
        }
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(format!(
                "entry {shown} is a {kind:?}; a bundle archive holds only files and directories"
            )));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| bad(format!("entry {shown} has a bad size field: {e}")))?;
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(bad(format!(
                "its files add up to more than daemon.max_upload_mb ({} MiB)",
                max_bytes >> 20
            )));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => bad(format!("entry {shown} appears twice")),
                _ => InstallError::Io {
                    path: target.clone(),
                    source: e,
                },
            })?;
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut out).map_err(|e| {
            bad(format!(
                "archive ends inside {shown} (a truncated upload?): {e}"
            ))
        })?;
        if copied != size {
            return Err(bad(format!(
                "archive ends inside {shown}: {copied} of {size} bytes (a truncated upload?)"
            )));
        }
        out.sync_all().map_err(io(&target))?;
        files += 1;
    }
    if files == 0 {
        return Err(bad(
            "it holds no files (an empty or truncated upload?)".into()
        ));
    }
    let manifest = dai_infer::bundle::Bundle::manifest_path(dest);
    if manifest.is_file() {
        return Ok(dest.to_path_buf());
    }
    // `tar -czf b.tgz mybundle/`: one directory holding the bundle.
    let subdirs: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(io(dest))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match subdirs.as_slice() {
        [one] if dai_infer::bundle::Bundle::manifest_path(one).is_file() => Ok(one.clone()),
        _ => Err(bad(
            "no manifest.toml at its top level or in its one top-level directory".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_inside() {
        let ok = |p: &str| entry_path(Path::new(p)).expect(p);
        assert_eq!(ok("./manifest.toml"), Some(PathBuf::from("manifest.toml")));
        assert_eq!(ok("b/heads/h.bin"), Some(PathBuf::from("b/heads/h.bin")));
        assert_eq!(ok("."), None);
        for bad in ["../x", "a/../../x", "/etc/passwd", "a/b/c/d/e"] {
            assert!(entry_path(Path::new(bad)).is_err(), "{bad} accepted");
        }
    }
}
