//! The `http:` section: who may use the HTTP API. A non-loopback
//! `daemon.listen_addr` needs a token file unless `allow_unauthenticated`
//! says otherwise; [`read_tokens`] reads the token files (the one part of
//! validation that touches the file system besides the config file).

use super::Problems;
use crate::{BearerToken, DaemonConfig, HttpConfig};
use std::path::Path;

pub(super) fn check(p: &mut Problems<'_>, h: &HttpConfig, d: &DaemonConfig) {
    let no_token = h.auth_token_file.as_os_str().is_empty();
    let ip = d.listen_addr.ip().to_canonical();
    p.check(
        !no_token || ip.is_loopback() || h.allow_unauthenticated,
        "http.auth_token_file",
        "\"\"",
        &format!(
            "required because daemon.listen_addr {} is not a loopback address: expected a \
             token file (or http.allow_unauthenticated: true to serve without one)",
            d.listen_addr
        ),
    );
    p.check(
        no_token || !h.allow_unauthenticated,
        "http.allow_unauthenticated",
        h.allow_unauthenticated,
        "expected false when http.auth_token_file is set",
    );
}

/// Read the token files named in `h` into `h.tokens`, recording each file
/// that cannot serve as one.
pub(super) fn read_tokens(p: &mut Problems<'_>, h: &mut HttpConfig) {
    h.tokens.api = read(p, "http.auth_token_file", &h.auth_token_file);
    h.tokens.metrics = read(p, "http.metrics_token_file", &h.metrics_token_file);
}

fn read(p: &mut Problems<'_>, key: &str, path: &Path) -> Option<BearerToken> {
    if path.as_os_str().is_empty() {
        return None;
    }
    BearerToken::read(path)
        .map_err(|why| {
            p.invalid(
                key,
                format!("{:?}", path.display().to_string()),
                &format!(
                    "the file {why}: expected a file of at most {} bytes holding one token \
                     of at least {} visible ASCII characters",
                    BearerToken::MAX_FILE_BYTES,
                    BearerToken::MIN_LEN
                ),
            )
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use crate::{BearerToken, Config, ConfigError};
    use std::path::Path;

    const TOKEN: &str = "0123456789abcdef-test-token";

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str(yaml, "t.yaml")
    }

    fn token_file(dir: &Path, text: &str, mode: u32) -> String {
        let path = dir.join("token");
        std::fs::write(&path, text).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let _ = mode;
        path.display().to_string()
    }

    #[test]
    fn off_loopback_without_a_token_is_refused_naming_the_key() {
        for addr in ["0.0.0.0:8080", "192.168.1.5:8080", "[::]:8080"] {
            let err = load(&format!("daemon:\n  listen_addr: \"{addr}\"\n")).expect_err(addr);
            assert_eq!(err.key(), Some("http.auth_token_file"), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(addr) && text.contains("allow_unauthenticated"),
                "{text}"
            );
        }
        for addr in [
            "127.0.0.1:8080",
            "127.3.4.5:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            load(&format!("daemon:\n  listen_addr: \"{addr}\"\n")).expect(addr);
        }
        let c =
            load("daemon:\n  listen_addr: 0.0.0.0:8080\nhttp:\n  allow_unauthenticated: true\n")
                .expect("explicitly open");
        assert!(c.http.allow_unauthenticated && c.http.tokens.api.is_none());
    }

    #[test]
    fn the_environment_can_name_the_token_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = token_file(dir.path(), &format!("  {TOKEN}\n"), 0o600);
        let env = [
            ("DAI_LISTEN_ADDR".to_string(), "0.0.0.0:9000".to_string()),
            ("DAI_HTTP_AUTH_TOKEN_FILE".to_string(), path),
        ];
        let c = Config::load("", "t", &env).expect("valid");
        let token = c.http.tokens.api.as_ref().expect("token read");
        assert_eq!(token.expose(), TOKEN, "trimmed");
        assert_eq!(token.loose_mode(), None);
        assert!(c.http.tokens.metrics.is_none());
        assert!(!format!("{c:?}").contains(TOKEN), "Debug shows the token");
        let yaml = serde_yaml_ng::to_string(&c).expect("yaml");
        assert!(!yaml.contains(TOKEN), "the token is serialized");
    }

    #[test]
    fn a_file_that_is_no_token_is_refused_with_its_path_and_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let big = "x".repeat(5000);
        let cases = [
            ("", "is empty"),
            ("   \n\t\n", "is empty"),
            ("short-token", "holds 11 characters, fewer than 16"),
            ("two words in this token file", "a space"),
            (big.as_str(), "larger than 4096 bytes"),
        ];
        for (text, why) in cases {
            let path = token_file(dir.path(), text, 0o600);
            let err = load(&format!("http:\n  auth_token_file: {path}\n")).expect_err(why);
            assert_eq!(err.key(), Some("http.auth_token_file"), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path) && msg.contains(why), "{msg}");
            assert!(msg.contains("at least 16"), "{msg}");
        }
        let missing = dir.path().join("nope").display().to_string();
        let err = load(&format!("http:\n  metrics_token_file: {missing}\n")).expect_err("missing");
        assert_eq!(err.key(), Some("http.metrics_token_file"));
        assert!(err.to_string().contains("cannot be opened"), "{err}");
        let err = load(&format!(
            "http:\n  metrics_token_file: {}\n",
            dir.path().display()
        ))
        .expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn both_token_files_are_read_and_loose_permissions_are_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let api = token_file(dir.path(), TOKEN, 0o644);
        let metrics = dir.path().join("metrics");
        std::fs::write(&metrics, "metrics-scraper-token-0001\n").expect("write");
        let c = load(&format!(
            "daemon:\n  listen_addr: 0.0.0.0:80\nhttp:\n  auth_token_file: {api}\n  metrics_token_file: {}\n",
            metrics.display()
        ))
        .expect("valid");
        let t = &c.http.tokens;
        assert_eq!(t.api.as_ref().map(BearerToken::expose), Some(TOKEN));
        assert_eq!(
            t.metrics.as_ref().map(BearerToken::expose),
            Some("metrics-scraper-token-0001")
        );
        #[cfg(unix)]
        assert_eq!(
            t.api.as_ref().and_then(BearerToken::loose_mode),
            Some(0o644)
        );
    }

    #[test]
    fn a_token_and_allow_unauthenticated_contradict_each_other() {
        let dir = tempfile::tempdir().expect("tmp");
        let api = token_file(dir.path(), TOKEN, 0o600);
        let err = load(&format!(
            "http:\n  auth_token_file: {api}\n  allow_unauthenticated: true\n"
        ))
        .expect_err("contradiction");
        assert_eq!(err.key(), Some("http.allow_unauthenticated"), "{err}");
    }
}
