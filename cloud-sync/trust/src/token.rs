//! Bearer tokens for the HTTP APIs of `dai-edge` and `dai-cloud`, read from
//! a file: capped before reading, trimmed, visible ASCII only (what an
//! `Authorization` header can carry), at least [`BearerToken::MIN_LEN`]
//! characters; the file's permission bits are reported when others (or a
//! group this process is not in) may read it. `Debug` never shows a token.
//! Comparison in constant time is the caller's (`subtle`).

use std::path::Path;

/// A bearer token as read from its file: trimmed, 16 to 4096 visible
/// ASCII characters. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    token: String,
    /// The file's permission bits when others, or a group this process is
    /// not in, may read it.
    loose_mode: Option<u32>,
}

impl BearerToken {
    /// Shortest token accepted.
    pub const MIN_LEN: usize = 16;
    /// Largest token file read.
    pub const MAX_FILE_BYTES: u64 = 4096;

    /// A token from its text (trimmed), as if read from a private file.
    pub fn new(text: &str) -> Result<BearerToken, String> {
        let token = text.trim();
        if token.is_empty() {
            return Err("is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "holds a space, a control or a non-ASCII character, which an \
                        `Authorization` header cannot carry"
                    .into(),
            );
        }
        if token.len() < Self::MIN_LEN {
            return Err(format!(
                "holds {} characters, fewer than {}",
                token.len(),
                Self::MIN_LEN
            ));
        }
        Ok(BearerToken {
            token: token.to_string(),
            loose_mode: None,
        })
    }

    /// Read a token file: at most [`Self::MAX_FILE_BYTES`], one token of
    /// at least [`Self::MIN_LEN`] characters; the message says what is wrong.
    pub fn read(path: &Path) -> Result<BearerToken, String> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|e| format!("cannot be opened ({e})"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot be read ({e})"))?;
        if !meta.is_file() {
            return Err("is not a regular file".into());
        }
        let mut bytes = Vec::new();
        file.take(Self::MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot be read ({e})"))?;
        if bytes.len() as u64 > Self::MAX_FILE_BYTES {
            return Err(format!("is larger than {} bytes", Self::MAX_FILE_BYTES));
        }
        let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
        let mut token = Self::new(&text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let mode = meta.permissions().mode() & 0o777;
            // Group-readable is the usual way to hand a secret to a service
            // (root:dai 0640, a Kubernetes Secret with fsGroup): only a
            // group this process is not in counts as loose.
            let foreign_group =
                mode & 0o040 != 0 && !own_groups().is_some_and(|g| g.contains(&meta.gid()));
            token.loose_mode = (mode & 0o004 != 0 || foreign_group).then_some(mode);
        }
        Ok(token)
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.token
    }

    /// The file's permission bits (e.g. `0o644`) when others, or a group
    /// this process is not in, may read it: worth a warning.
    pub fn loose_mode(&self) -> Option<u32> {
        self.loose_mode
    }
}

/// The group ids of this process (Linux, `/proc/self/status`); `None`
/// where that is not known.
#[cfg(unix)]
fn own_groups() -> Option<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ids = status
        .lines()
        .filter_map(|l| l.strip_prefix("Gid:").or_else(|| l.strip_prefix("Groups:")))
        .flat_map(|rest| {
            rest.split_whitespace()
                .filter_map(|n| n.parse::<u32>().ok())
        })
        .collect();
    Some(ids)
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BearerToken(<{} characters, redacted>)",
            self.token.len()
        )
    }
}
