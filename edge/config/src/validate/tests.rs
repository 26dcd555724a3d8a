//! Every problem of a file in one run; `cpu_limit` bounded by the machine.

use super::{check, parse_and_validate};
use crate::{Config, ConfigError};

/// Parse and check `yaml` as if the machine had `cores` cores.
fn load(yaml: &str, cores: Option<usize>) -> Result<Config, ConfigError> {
    let tree = serde_yaml_ng::from_str(yaml).expect("yaml");
    parse_and_validate(tree, "t.yaml", cores)
}

fn keys(e: &ConfigError) -> Vec<&str> {
    e.problems().iter().filter_map(ConfigError::key).collect()
}

const THREE_RANGES: &str = "cpu_limit: 99\nmemory_limit_mb: 1\nbatch_size: 0\n";

#[test]
fn every_value_out_of_range_is_named_each_on_its_own_line() {
    let err = load(THREE_RANGES, Some(2)).expect_err("three bad values");
    assert!(
        matches!(&err, ConfigError::Many(all) if all.len() == 3),
        "{err:?}"
    );
    assert_eq!(keys(&err), ["cpu_limit", "memory_limit_mb", "batch_size"]);
    assert_eq!(err.key(), Some("cpu_limit"), "the first problem's key");
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "3 invalid keys:",
            "  t.yaml: key `cpu_limit` = 99: expected CPU cores in (0, 2]: at most this machine's core count",
            "  t.yaml: key `memory_limit_mb` = 1: expected MiB in 16..=16777216",
            "  t.yaml: key `batch_size` = 0: expected 1..=1024",
        ],
        "{text}"
    );
    // Each line is the single-problem format.
    for (line, one) in lines[1..].iter().zip(err.problems()) {
        assert_eq!(line.trim_start(), one.to_string());
    }
}

#[test]
fn an_unknown_enum_value_does_not_hide_the_values_out_of_range() {
    let yaml = format!("{THREE_RANGES}cache_eviction_policy: MRU\n");
    let err = load(&yaml, Some(2)).expect_err("four bad keys");
    assert_eq!(
        keys(&err),
        [
            "cache_eviction_policy",
            "cpu_limit",
            "memory_limit_mb",
            "batch_size"
        ]
    );
    assert!(matches!(err.problems()[0], ConfigError::Parse { .. }));
    let text = err.to_string();
    for word in [
        "MRU",
        "LRU",
        "99",
        "memory_limit_mb` = 1",
        "batch_size` = 0",
    ] {
        assert!(text.contains(word), "{text:?} lacks {word:?}");
    }
    assert_eq!(text.lines().count(), 5, "{text}");
}

#[test]
fn keys_that_do_not_parse_are_taken_out_one_by_one() {
    let yaml = "cache_size: 10\ngpu_enabled: maybe\nbatch_size: 0\n\
                daemon:\n  port: 80\n  queue_capacity: 0\n  listen_addr: nowhere\n\
                cloud: 5\n";
    let err = load(yaml, Some(2)).expect_err("bad keys");
    let text = err.to_string();
    for word in [
        "unknown field `cache_size`",
        "unknown field `port`",
        "gpu_enabled",
        "nowhere",
        "`cloud`",
        "batch_size` = 0",
        "daemon.queue_capacity` = 0",
    ] {
        assert!(text.contains(word), "{text:?} lacks {word:?}");
    }
    assert_eq!(err.problems().len(), 7, "{text}");
}

#[test]
fn a_sensor_entry_that_does_not_parse_leaves_the_rest_checked() {
    let yaml = "sensors:\n  - {name: a, part: nope, source: simulated}\nbatch_size: 0\n";
    let err = load(yaml, Some(2)).expect_err("bad");
    let k = keys(&err);
    assert_eq!(k.len(), 2, "{err}");
    assert!(k[0].starts_with("sensors[0]"), "{err}");
    assert_eq!(k[1], "batch_size");
}

#[test]
fn defaults_of_keys_taken_out_are_not_reported() {
    // The default cpu_limit (2) exceeds one core, but the file's own value
    // is what is wrong, and it is reported once, as a parse error.
    let err = load("cpu_limit: lots\n", Some(1)).expect_err("bad");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    assert_eq!(err.key(), Some("cpu_limit"));
}

#[test]
fn yaml_that_is_not_a_mapping_stops_at_the_parse_error() {
    let err = load("[1, 2]\n", Some(2)).expect_err("not a mapping");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
}

#[test]
fn cpu_limit_is_at_most_the_machine_core_count() {
    let c = Config {
        cpu_limit: 2.0,
        ..Config::default()
    };
    assert!(check(&c, "t", Some(2)).is_empty());
    let c = Config {
        cpu_limit: 2.5,
        ..Config::default()
    };
    let found = check(&c, "t", Some(2));
    assert_eq!(found.len(), 1);
    let text = found[0].to_string();
    assert!(
        text.contains("cpu_limit` = 2.5") && text.contains("(0, 2]"),
        "{text}"
    );
    assert!(check(&c, "t", None).is_empty(), "unknown core count");
    // Out of the fixed range is reported with that range, once.
    let c = Config {
        cpu_limit: 0.0,
        ..Config::default()
    };
    let found = check(&c, "t", Some(2));
    assert_eq!(found.len(), 1);
    assert!(found[0].to_string().contains("(0, 1024]"), "{}", found[0]);
}

#[test]
fn cpu_limit_above_this_machine_is_refused_on_load() {
    let Some(cores) = super::machine_cores().filter(|&n| n < 1024) else {
        return;
    };
    let yaml = format!("cpu_limit: {}\n", cores + 1);
    let err = Config::from_yaml_str(&yaml, "t").expect_err("more cores than the machine");
    assert_eq!(err.key(), Some("cpu_limit"));
    assert!(err.to_string().contains(&format!("(0, {cores}]")), "{err}");
}

#[test]
fn a_config_file_that_cannot_be_read_names_the_file_and_keeps_the_cause_as_source() {
    let dir = std::env::temp_dir().join("dai-config-no-such-dir-for-this-test");
    let path = dir.join("missing.yaml");
    let err = Config::from_file(&path).expect_err("missing");
    let text = err.to_string();
    assert!(text.contains("missing.yaml"), "{text}");
    let source = std::error::Error::source(&err).expect("source").to_string();
    assert!(
        !text.contains(&source),
        "the cause is the source, not part of the message: {text:?}"
    );
}

#[test]
fn cloud_sync_needs_an_identity_unless_plain_tcp_is_chosen_explicitly() {
    let on = "cloud: {enabled: true, aggregator_public_key: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff}";
    let e = load(on, None).expect_err("no bundle with TLS on");
    assert_eq!(keys(&e), vec!["cloud.bundle_dir"]);
    assert!(e.to_string().contains("dai-cloud devices add"), "{e}");
    // Plain TCP written out, or a bundle (which carries the aggregator key).
    load(
        "cloud: {enabled: true, tls: {enabled: false}, aggregator_public_key: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff}",
        None,
    )
    .expect("plain TCP");
    load(
        "cloud: {enabled: true, bundle_dir: /etc/dai/identity}",
        None,
    )
    .expect("bundle");
    // Without a bundle the key is still required.
    let e = load("cloud: {enabled: true, tls: {enabled: false}}", None).expect_err("no key");
    assert_eq!(keys(&e), vec!["cloud.aggregator_public_key"]);
}
