//! The `daemon:` section: directories, the bundles to load, the HTTP API's
//! limits and the periods of the daemon's background tasks.

use super::Problems;
use crate::DaemonConfig;

pub(super) fn check(p: &mut Problems<'_>, d: &DaemonConfig) {
    for (key, dir) in [
        ("daemon.data_dir", &d.data_dir),
        ("daemon.models_dir", &d.models_dir),
    ] {
        p.check(
            !dir.as_os_str().is_empty(),
            key,
            "\"\"",
            "expected a directory path",
        );
    }
    for name in &d.models {
        p.check(
            !(name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.')),
            "daemon.models",
            format_args!("{name:?}"),
            "expected bundle directory names inside models_dir",
        );
    }
    let v = &d.prefer_model_variant;
    p.check(
        v.len() <= 64
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
        "daemon.prefer_model_variant",
        format_args!("{v:?}"),
        "expected empty or a variant kind such as int8, int8w or f16",
    );
    p.check(
        d.max_batch_wait_ms <= 1000,
        "daemon.max_batch_wait_ms",
        d.max_batch_wait_ms,
        "expected milliseconds in 0..=1000",
    );
    p.check(
        (1..=100_000).contains(&d.queue_capacity),
        "daemon.queue_capacity",
        d.queue_capacity,
        "expected 1..=100000",
    );
    p.check(
        (1..=1024).contains(&d.max_body_mb),
        "daemon.max_body_mb",
        d.max_body_mb,
        "expected MiB in 1..=1024",
    );
    p.check(
        (1..=4096).contains(&d.max_upload_mb),
        "daemon.max_upload_mb",
        d.max_upload_mb,
        "expected MiB in 1..=4096",
    );
    p.check(
        (1..=64).contains(&d.max_concurrent_bodies),
        "daemon.max_concurrent_bodies",
        d.max_concurrent_bodies,
        "expected 1..=64",
    );
    p.check(
        d.hot_reload_interval_sec <= 86_400,
        "daemon.hot_reload_interval_sec",
        d.hot_reload_interval_sec,
        "expected seconds in 0..=86400 (0 disables)",
    );
    for (key, v) in [
        ("daemon.resource_interval_sec", d.resource_interval_sec),
        ("daemon.snapshot_interval_sec", d.snapshot_interval_sec),
    ] {
        p.check(
            (1..=86_400).contains(&v),
            key,
            v,
            "expected seconds in 1..=86400",
        );
    }
    p.check(
        d.shutdown_grace_sec <= 3600,
        "daemon.shutdown_grace_sec",
        d.shutdown_grace_sec,
        "expected seconds in 0..=3600",
    );
}
