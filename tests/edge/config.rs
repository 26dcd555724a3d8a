//! Configuration: every key parsed, every bad value refused with its key.

use dai_config::{Config, ConfigError, EvictionPolicy, LoadBalancingStrategy};

const ALL_KEYS: &str = "
gpu_enabled: true
gpu_memory_allocation: 0.25
cpu_limit: 1.5
memory_limit_mb: 512
max_parallel_agents: 3
batch_size: 16
num_epochs: 7
load_balancing_strategy: ip_hash
caching_enabled: false
cache_size_mb: 8
cache_eviction_policy: LFU
connection_timeout_sec: 30
retry_delay_sec: 4
profiling_enabled: false
profiling_interval_sec: 20
latency_threshold_ms: 42.5
throughput_target_rps: 120
training:
  enabled: false
  min_new_samples: 3
  max_cpu_percent: 55.5
  check_interval_sec: 9
  optimizer: sgd
  learning_rate: 0.5
  momentum: 0.5
  max_samples_per_model: 77
  holdout_every: 4
cloud:
  enabled: true
  broker: broker.local:8883
  fleet: lab-2
  device_id: cam.7
  aggregator_public_key: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
  heartbeat_sec: 12
  update_encoding: f16
  max_outbox_rows: 5
  bundle_dir: /etc/dai/identity
  tls:
    enabled: false
daemon:
  listen_addr: 0.0.0.0:9000
  data_dir: /var/lib/dai
  models_dir: /opt/dai/models
  models: [a, b]
  fetch_missing_models: false
  prefer_model_variant: int8
  max_batch_wait_ms: 7
  queue_capacity: 9
  max_body_mb: 3
  hot_reload_interval_sec: 0
  resource_interval_sec: 11
  snapshot_interval_sec: 13
  shutdown_grace_sec: 17
http:
  allow_unauthenticated: true
sensors:
  - name: imu0
    part: mpu6050
    source: i2c
    bus: /dev/i2c-3
    address: 0x69
    rate_hz: 500
    accel_range: 8g
    gyro_range: 1000dps
    read_deadline_ms: 20
    window: 128
    hop: 64
    features: false
    model: imu-anomaly
    event_min_interval_ms: 250
    label_rules: [{channel: az, above: 30.5, label: 2}]
  - {name: env0, part: bme280, source: simulated, seed: 9, rate_hz: 2, bme280_mode: normal}
";

#[test]
fn every_key_is_parsed() {
    let c = Config::from_yaml_str(ALL_KEYS, "test").expect("valid");
    assert!(c.gpu_enabled);
    assert_eq!(c.gpu_memory_allocation, 0.25);
    let imu = &c.sensors[0];
    assert_eq!(
        (
            imu.name.as_str(),
            imu.bus.as_str(),
            imu.address,
            imu.rate_hz
        ),
        ("imu0", "/dev/i2c-3", Some(0x69), 500.0)
    );
    assert_eq!(
        (imu.window, imu.hop(), imu.features, imu.model.as_deref()),
        (128, 64, false, Some("imu-anomaly"))
    );
    assert_eq!((imu.read_deadline_ms, imu.event_min_interval_ms), (20, 250));
    assert_eq!(imu.label_rules[0].above, 30.5);
    assert_eq!(imu.accel_range, Some(dai_sensors::mpu6050::AccelRange::G8));
    assert_eq!(c.sensors[1].seed, 9);
    assert_eq!(
        c.sensors[1].bme280_mode,
        Some(dai_sensors::bme280::Mode::Normal)
    );
    assert_eq!(c.cpu_limit, 1.5);
    assert_eq!(c.memory_limit_mb, 512);
    assert_eq!(c.max_parallel_agents, 3);
    assert_eq!(c.batch_size, 16);
    assert_eq!(c.num_epochs, 7);
    assert_eq!(c.load_balancing_strategy, LoadBalancingStrategy::IpHash);
    assert!(!c.caching_enabled);
    assert_eq!(c.cache_size_mb, 8);
    assert_eq!(c.cache_eviction_policy, EvictionPolicy::Lfu);
    assert_eq!(c.connection_timeout_sec, 30);
    assert_eq!(c.retry_delay_sec, 4);
    assert!(!c.profiling_enabled);
    assert_eq!(c.profiling_interval_sec, 20);
    assert_eq!(c.latency_threshold_ms, 42.5);
    assert_eq!(c.throughput_target_rps, 120.0);
    let t = &c.training;
    assert!(!t.enabled);
    assert_eq!(t.min_new_samples, 3);
    assert_eq!(t.max_cpu_percent, 55.5);
    assert_eq!(t.check_interval_sec, 9);
    assert_eq!(t.optimizer, dai_config::OptimizerChoice::Sgd);
    assert_eq!(t.learning_rate, 0.5);
    assert_eq!(t.momentum, 0.5);
    assert_eq!(t.max_samples_per_model, 77);
    assert_eq!(t.holdout_every, 4);
    let k = &c.cloud;
    assert!(k.enabled);
    assert_eq!(k.broker, "broker.local:8883");
    assert_eq!(k.fleet, "lab-2");
    assert_eq!(k.device_id, "cam.7");
    assert!(k.aggregator_public_key.starts_with("0011"));
    assert_eq!(k.bundle_dir, "/etc/dai/identity");
    assert!(!k.tls.enabled);
    assert_eq!(k.heartbeat_sec, 12);
    assert_eq!(k.update_encoding, dai_config::UpdateEncoding::F16);
    assert_eq!(k.max_outbox_rows, 5);
    let d = &c.daemon;
    assert_eq!(d.listen_addr.to_string(), "0.0.0.0:9000");
    assert_eq!(d.data_dir.to_str(), Some("/var/lib/dai"));
    assert_eq!(d.models_dir.to_str(), Some("/opt/dai/models"));
    assert_eq!(d.models, vec!["a", "b"]);
    assert!(!d.fetch_missing_models);
    assert_eq!(d.prefer_model_variant, "int8");
    assert_eq!(d.max_batch_wait_ms, 7);
    assert_eq!(d.queue_capacity, 9);
    assert_eq!(d.max_body_mb, 3);
    assert_eq!(d.hot_reload_interval_sec, 0);
    assert_eq!(d.resource_interval_sec, 11);
    assert_eq!(d.snapshot_interval_sec, 13);
    assert_eq!(d.shutdown_grace_sec, 17);
    // 0.0.0.0 without a token: only because the file says so.
    assert!(c.http.allow_unauthenticated);
    // cpu_limit 1.5 bounds the 3 agents to one worker thread.
    assert_eq!(c.worker_threads(), 1);
}

/// (key path, bad YAML value, words the error must contain)
const BAD: &[(&str, &str, &str)] = &[
    ("gpu_enabled", "maybe", "invalid type"),
    ("gpu_memory_allocation", "1.5", "(0, 1]"),
    ("cpu_limit", "0", "(0, 1024]"),
    ("memory_limit_mb", "8", "16..="),
    ("max_parallel_agents", "0", "1..=64"),
    ("batch_size", "2000", "1..=1024"),
    ("num_epochs", "-1", "invalid value"),
    ("load_balancing_strategy", "random", "round_robin"),
    ("caching_enabled", "7", "invalid type"),
    ("cache_size_mb", "100000", "0..=65536"),
    ("cache_eviction_policy", "MRU", "LRU"),
    ("connection_timeout_sec", "0", "1..=3600"),
    ("retry_delay_sec", "5000", "0..=3600"),
    ("profiling_enabled", "sometimes", "invalid type"),
    ("profiling_interval_sec", "0", "1..=86400"),
    ("latency_threshold_ms", "-5", "> 0"),
    ("throughput_target_rps", "0", "> 0"),
    ("training.enabled", "yes please", "invalid type"),
    ("training.min_new_samples", "0", "1..=1000000"),
    ("training.max_cpu_percent", "150", "(0, 100]"),
    ("training.check_interval_sec", "0", "1..=86400"),
    ("training.optimizer", "rmsprop", "adam"),
    ("training.learning_rate", "0", "(0, 10]"),
    ("training.momentum", "1.5", "[0, 1)"),
    ("training.max_samples_per_model", "0", "1..=10000000"),
    ("training.holdout_every", "1", "2..=100"),
    ("cloud.enabled", "perhaps", "invalid type"),
    ("cloud.broker", "nohost", "host:port"),
    ("cloud.fleet", "a/b", "[A-Za-z0-9._-]"),
    ("cloud.device_id", "x+y", "[A-Za-z0-9._-]"),
    ("cloud.aggregator_public_key", "abc", "64 hex digits"),
    ("cloud.heartbeat_sec", "0", "1..=3600"),
    ("cloud.update_encoding", "bf16", "int8"),
    ("cloud.max_outbox_rows", "0", "1..=1000000"),
    ("daemon.listen_addr", "nowhere", "socket address"),
    ("daemon.data_dir", "''", "directory path"),
    ("daemon.models_dir", "''", "directory path"),
    ("daemon.models", "['../etc']", "bundle directory names"),
    ("daemon.fetch_missing_models", "3", "invalid type"),
    ("daemon.prefer_model_variant", "'../int8'", "variant kind"),
    ("daemon.max_batch_wait_ms", "5000", "0..=1000"),
    ("daemon.queue_capacity", "0", "1..=100000"),
    ("daemon.max_body_mb", "0", "1..=1024"),
    ("daemon.hot_reload_interval_sec", "100000", "0..=86400"),
    ("daemon.resource_interval_sec", "0", "1..=86400"),
    ("daemon.snapshot_interval_sec", "0", "1..=86400"),
    ("daemon.shutdown_grace_sec", "9999", "0..=3600"),
];

fn yaml_with(key: &str, value: &str) -> String {
    match key.split_once('.') {
        Some((outer, inner)) => format!("{outer}:\n  {inner}: {value}\n"),
        None => format!("{key}: {value}\n"),
    }
}

#[test]
fn every_key_refuses_a_bad_value_naming_key_and_value() {
    // `sensors` (a list) has its own test below.
    assert_eq!(BAD.len(), 47, "one case per key");
    for (key, value, expect) in BAD {
        let err = Config::from_yaml_str(&yaml_with(key, value), "test.yaml").expect_err(key);
        let text = err.to_string();
        assert_eq!(
            err.key(),
            Some(*key),
            "{key}: error names another key: {text}"
        );
        assert!(text.contains(expect), "{key}: {text:?} lacks {expect:?}");
        let shown = value.trim_matches(|c| c == '\'' || c == '[' || c == ']');
        if !shown.is_empty() {
            assert!(
                text.contains(shown.trim_matches('\'')),
                "{key}: {text:?} does not show the value {value}"
            );
        }
    }
}

#[test]
fn sensor_entries_are_checked_as_a_list() {
    let two = "sensors:\n  - {name: a, part: bme280, source: simulated}\n  - {name: a, part: bme280, source: simulated}\n";
    let err = Config::from_yaml_str(two, "t").expect_err("duplicate");
    assert_eq!(err.key(), Some("sensors[1].name"));
    assert!(err.to_string().contains("unique"), "{err}");
    let bad = "sensors:\n  - {name: a, part: bme280, source: simulated, label_rules: [{channel: az, above: 1, label: 0}]}\n";
    let err = Config::from_yaml_str(bad, "t").expect_err("rule channel");
    assert_eq!(err.key(), Some("sensors[0]"));
    assert!(
        err.to_string().contains("channel \"az\" is not one of"),
        "{err}"
    );
}

#[test]
fn unknown_keys_are_refused() {
    let err = Config::from_yaml_str("cache_size: 10\n", "t").expect_err("unknown");
    assert!(
        err.to_string().contains("unknown field `cache_size`"),
        "{err}"
    );
    let err = Config::from_yaml_str("daemon:\n  port: 80\n", "t").expect_err("unknown nested");
    assert!(err.to_string().contains("unknown field `port`"), "{err}");
}

#[test]
fn environment_overrides_are_validated_like_the_file() {
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let c = Config::load("", "t", &env("DAI_BATCH_SIZE", "32")).expect("ok");
    assert_eq!(c.batch_size, 32);
    let c = Config::load("", "t", &env("DAI_CACHE_EVICTION_POLICY", "FIFO")).expect("ok");
    assert_eq!(c.cache_eviction_policy, EvictionPolicy::Fifo);
    let c = Config::load("", "t", &env("DAI_LISTEN_ADDR", "127.0.0.1:9999")).expect("ok");
    assert_eq!(c.daemon.listen_addr.port(), 9999);
    let err = Config::load("", "t", &env("DAI_CPU_LIMIT", "lots")).expect_err("bad");
    assert_eq!(err.key(), Some("cpu_limit"));
    assert!(err.to_string().contains("DAI_CPU_LIMIT=lots"), "{err}");
    let err = Config::load("", "t", &env("DAI_MAX_PARALLEL_AGENTS", "500")).expect_err("bad");
    assert!(matches!(err, ConfigError::Invalid { .. }));
    assert!(
        err.to_string().contains("max_parallel_agents") && err.to_string().contains("500"),
        "{err}"
    );
}

#[test]
fn the_shipped_config_file_is_the_default() {
    let path = crate::support::repo().join("configs/performance_config.yaml");
    assert_eq!(Config::from_file(&path).expect("valid"), Config::default());
}
