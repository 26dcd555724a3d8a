//! The `cloud:` section: the broker address, the topic segments and the
//! aggregator's key, which must be usable before the uplink starts.

use super::Problems;
use crate::CloudConfig;

pub(super) fn check(p: &mut Problems<'_>, k: &CloudConfig) {
    let port_ok = k
        .broker
        .rsplit_once(':')
        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
    p.check(
        port_ok,
        "cloud.broker",
        format_args!("{:?}", k.broker),
        "expected host:port",
    );
    p.check(
        topic_segment(&k.fleet),
        "cloud.fleet",
        format_args!("{:?}", k.fleet),
        "expected 1-64 characters of [A-Za-z0-9._-]",
    );
    p.check(
        k.device_id.is_empty() || topic_segment(&k.device_id),
        "cloud.device_id",
        format_args!("{:?}", k.device_id),
        "expected empty (host name) or 1-64 characters of [A-Za-z0-9._-]",
    );
    for (i, g) in k.groups.iter().enumerate() {
        p.check(
            topic_segment(g),
            &format!("cloud.groups[{i}]"),
            format_args!("{g:?}"),
            "expected 1-64 characters of [A-Za-z0-9._-]",
        );
    }
    p.check(
        k.groups.len() <= 64,
        "cloud.groups",
        k.groups.len(),
        "expected at most 64 groups",
    );
    let key_ok = k.aggregator_public_key.len() == 64
        && k.aggregator_public_key
            .chars()
            .all(|c| c.is_ascii_hexdigit());
    // A bundle carries the aggregator's key (aggregator.pub).
    let key_optional = !k.enabled || !k.bundle_dir.is_empty();
    p.check(
        key_ok || (key_optional && k.aggregator_public_key.is_empty()),
        "cloud.aggregator_public_key",
        format_args!("{:?}", k.aggregator_public_key),
        "expected 64 hex digits (dai-cloud keygen writes it); required when cloud.enabled \
         without cloud.bundle_dir",
    );
    p.check(
        !(k.enabled && k.tls.enabled && k.bundle_dir.is_empty()),
        "cloud.bundle_dir",
        format_args!("{:?}", k.bundle_dir),
        "expected a device bundle directory (dai-cloud devices add NAME --out DIR) when \
         cloud.enabled with cloud.tls.enabled; set cloud.tls.enabled: false for plain TCP",
    );
    p.check(
        (1..=1_000_000).contains(&k.max_outbox_rows),
        "cloud.max_outbox_rows",
        k.max_outbox_rows,
        "expected 1..=1000000",
    );
    p.check(
        (1..=3600).contains(&k.heartbeat_sec),
        "cloud.heartbeat_sec",
        k.heartbeat_sec,
        "expected seconds in 1..=3600",
    );
    let dp = &k.local_dp;
    p.check(
        dp.noise_multiplier.is_finite() && (0.0..=1000.0).contains(&dp.noise_multiplier),
        "cloud.local_dp.noise_multiplier",
        dp.noise_multiplier,
        "expected 0 (off) ..= 1000",
    );
    p.check(
        dp.clip_norm.is_finite() && dp.clip_norm > 0.0,
        "cloud.local_dp.clip_norm",
        dp.clip_norm,
        "expected a positive L2 norm",
    );
    p.check(
        dp.delta > 0.0 && dp.delta < 1.0,
        "cloud.local_dp.delta",
        dp.delta,
        "expected (0, 1)",
    );
}

/// A topic segment the aggregator accepts: no MQTT wildcards or separators.
fn topic_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
