//! Typed configuration of the DAI edge daemon.
//!
//! The source of truth is `configs/performance_config.yaml`, embedded here as
//! [`DEFAULT_CONFIG_YAML`]: every knob of the performance guide plus the
//! daemon's own settings, each documented in that file with its default.
//!
//! Loading happens in three steps, once, before anything binds or loads:
//! 1. *parse*: YAML -> [`Config`] with `deny_unknown_fields`; the error names
//!    the key path (via `serde_path_to_error`) and what was expected;
//! 2. *validate* (module `validate`, a file per section): ranges and
//!    cross-field rules, [`ConfigError::Invalid`] names the key, the value and
//!    what is allowed;
//! 3. *tokens*: the bearer token files of the `http:` section are read
//!    (size-capped, trimmed) into [`HttpTokens`], so a missing or short
//!    token is refused like a bad value, naming its key and path.
//!
//! One run names every problem of a file ([`ConfigError::Many`] when there is
//! more than one): a key that does not parse is taken out of the tree and the
//! rest parsed again, and every rule runs on what parsed.
//!
//! Environment overrides ([`ENV_OVERRIDES`]) are merged into the YAML tree
//! before step 1, so they are validated by exactly the same code.

mod validate;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The embedded default configuration (the documented file itself).
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../../../configs/performance_config.yaml");

/// Environment variable -> key path overrides, applied on top of the file.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("DAI_LISTEN_ADDR", "daemon.listen_addr"),
    ("DAI_DATA_DIR", "daemon.data_dir"),
    ("DAI_MODELS_DIR", "daemon.models_dir"),
    ("DAI_PREFER_MODEL_VARIANT", "daemon.prefer_model_variant"),
    ("DAI_GPU_ENABLED", "gpu_enabled"),
    ("DAI_CPU_LIMIT", "cpu_limit"),
    ("DAI_MEMORY_LIMIT_MB", "memory_limit_mb"),
    ("DAI_MAX_PARALLEL_AGENTS", "max_parallel_agents"),
    ("DAI_BATCH_SIZE", "batch_size"),
    ("DAI_NUM_EPOCHS", "num_epochs"),
    ("DAI_LOAD_BALANCING_STRATEGY", "load_balancing_strategy"),
    ("DAI_CACHING_ENABLED", "caching_enabled"),
    ("DAI_CACHE_SIZE_MB", "cache_size_mb"),
    ("DAI_CACHE_EVICTION_POLICY", "cache_eviction_policy"),
    ("DAI_PROFILING_ENABLED", "profiling_enabled"),
    ("DAI_LATENCY_THRESHOLD_MS", "latency_threshold_ms"),
    ("DAI_THROUGHPUT_TARGET_RPS", "throughput_target_rps"),
    ("DAI_TRAINING_ENABLED", "training.enabled"),
    ("DAI_HTTP_AUTH_TOKEN_FILE", "http.auth_token_file"),
];

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax, unknown key, or a value of the wrong type / enum variant.
    #[error("{origin}: key `{key}`: {message}")]
    Parse {
        origin: String,
        key: String,
        message: String,
    },
    /// Well-formed but out of range or inconsistent.
    #[error("{origin}: key `{key}` = {value}: {allowed}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        allowed: String,
    },
    /// More than one problem in one file: each a `Parse` or an `Invalid`,
    /// shown on its own line in that variant's format.
    #[error("{} invalid keys:{}", .0.len(), validate::lines(.0))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// The offending key path (e.g. `daemon.listen_addr`), when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Many(all) => all.first().and_then(ConfigError::key),
        }
    }

    /// Each problem on its own: the entries of [`ConfigError::Many`], else
    /// this error.
    pub fn problems(&self) -> &[ConfigError] {
        match self {
            ConfigError::Many(all) => all,
            one => std::slice::from_ref(one),
        }
    }
}

// The runtime owns its policy enums; the YAML names are theirs.
pub use dai_infer::{EvictionPolicy, LoadBalancingStrategy};

/// The daemon's configuration; field docs live in the YAML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Train on a wgpu adapter when one exists.
    pub gpu_enabled: bool,
    /// Fraction of adapter memory the trainer may allocate, (0, 1].
    pub gpu_memory_allocation: f64,
    /// CPU cores the daemon may use.
    pub cpu_limit: f64,
    /// Memory budget for loaded models, MiB.
    pub memory_limit_mb: u64,
    /// Upper bound of inference workers.
    pub max_parallel_agents: usize,
    /// Largest inference batch and the training mini-batch.
    pub batch_size: usize,
    /// Training epochs per run.
    pub num_epochs: u32,
    /// Dispatch of requests to workers.
    pub load_balancing_strategy: LoadBalancingStrategy,
    /// Whether inference results are cached.
    pub caching_enabled: bool,
    /// Result cache budget, MiB.
    pub cache_size_mb: u64,
    /// Result cache eviction policy.
    pub cache_eviction_policy: EvictionPolicy,
    /// Network connection timeout, seconds.
    pub connection_timeout_sec: u64,
    /// Retry backoff base, seconds.
    pub retry_delay_sec: u64,
    /// Sample per-stage timings periodically.
    pub profiling_enabled: bool,
    /// Profiling sample period, seconds.
    pub profiling_interval_sec: u64,
    /// p95 latency alert threshold, milliseconds.
    pub latency_threshold_ms: f64,
    /// Expected sustained request rate, requests per second.
    pub throughput_target_rps: f64,
    /// On-device training.
    pub training: TrainingConfig,
    /// Cloud sync.
    pub cloud: CloudConfig,
    /// The daemon's own settings.
    pub daemon: DaemonConfig,
    /// Who may use the HTTP API (bearer tokens).
    pub http: HttpConfig,
    /// Sensors and their pipelines (`dai_sensors::config::SensorConfig`).
    pub sensors: Vec<dai_sensors::config::SensorConfig>,
}

/// Cloud sync settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Sync with a dai-cloud aggregator.
    pub enabled: bool,
    /// MQTT broker, host:port.
    pub broker: String,
    /// Fleet topic segment.
    pub fleet: String,
    /// Device topic segment; empty = host name.
    pub device_id: String,
    /// The aggregator's ed25519 public key, hex.
    pub aggregator_public_key: String,
    /// Heartbeat period, seconds.
    pub heartbeat_sec: u64,
    /// f32 | f16 | int8 | topk8.
    pub update_encoding: UpdateEncoding,
    /// Outbox bound while offline.
    pub max_outbox_rows: u64,
    /// The device bundle directory (`dai-cloud devices add --out`): its
    /// certificate and key (mutual TLS, signed updates), the fleet CA and
    /// the aggregator's key. Empty: no identity (only an aggregator run
    /// with `--insecure-plaintext` takes this device's updates).
    pub bundle_dir: String,
    /// Groups this device belongs to: `dai-cloud models publish --group`
    /// sends a bundle to the devices of one group.
    pub groups: Vec<String>,
    /// Transport security of the MQTT connection.
    pub tls: CloudTlsConfig,
    /// Local differential privacy on each uploaded update.
    pub local_dp: LocalDpConfig,
}

/// `cloud.local_dp`: every uploaded delta is clipped to `clip_norm` and
/// Gaussian noise of standard deviation `noise_multiplier x clip_norm`
/// added before it leaves the device (the device's own head is not
/// noised); epsilon at `delta` over every noised upload is reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalDpConfig {
    /// 0: off.
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    pub delta: f64,
}

impl Default for LocalDpConfig {
    fn default() -> Self {
        LocalDpConfig {
            noise_multiplier: 0.0,
            clip_norm: 1.0,
            delta: 1e-5,
        }
    }
}

/// `cloud.tls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudTlsConfig {
    /// Mutual TLS with the bundle's certificate (needs `cloud.bundle_dir`);
    /// false is plain TCP, which logs a warning at start.
    pub enabled: bool,
}

impl Default for CloudTlsConfig {
    fn default() -> Self {
        CloudTlsConfig { enabled: true }
    }
}

/// Encoding of uplinked head deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateEncoding {
    F32,
    F16,
    Int8,
    /// Sparse: the top 1/8 of each tensor's entries by magnitude, int8.
    Topk8,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            enabled: false,
            broker: "127.0.0.1:1883".into(),
            fleet: "default".into(),
            device_id: String::new(),
            aggregator_public_key: String::new(),
            heartbeat_sec: 30,
            update_encoding: UpdateEncoding::Int8,
            max_outbox_rows: 1000,
            bundle_dir: String::new(),
            groups: Vec::new(),
            tls: CloudTlsConfig::default(),
            local_dp: LocalDpConfig::default(),
        }
    }
}

/// Optimiser for on-device training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerChoice {
    Sgd,
    Adam,
}

/// On-device training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Fine-tune models with a trainable head.
    pub enabled: bool,
    /// New samples needed before a run.
    pub min_new_samples: u64,
    /// Train only while machine CPU use is below this, percent.
    pub max_cpu_percent: f64,
    /// Scheduler period, seconds.
    pub check_interval_sec: u64,
    /// sgd | adam.
    pub optimizer: OptimizerChoice,
    /// Learning rate.
    pub learning_rate: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Samples kept per model.
    pub max_samples_per_model: u64,
    /// Every n-th sample is held out for validation.
    pub holdout_every: u64,
    /// A run that loses more than this accuracy on the bundle's own
    /// validation rows (`[head.validation]`) is rejected; 1 turns the
    /// check off.
    pub max_validation_drop: f64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            enabled: true,
            min_new_samples: 20,
            max_cpu_percent: 80.0,
            check_interval_sec: 5,
            optimizer: OptimizerChoice::Adam,
            learning_rate: 0.003,
            momentum: 0.9,
            max_samples_per_model: 10_000,
            holdout_every: 5,
            max_validation_drop: 0.5,
        }
    }
}

// The values of configs/performance_config.yaml; a unit test keeps the two equal.
impl Default for Config {
    fn default() -> Self {
        Config {
            gpu_enabled: false,
            gpu_memory_allocation: 0.5,
            cpu_limit: 2.0,
            memory_limit_mb: 1024,
            max_parallel_agents: 2,
            batch_size: 8,
            num_epochs: 5,
            load_balancing_strategy: LoadBalancingStrategy::RoundRobin,
            caching_enabled: true,
            cache_size_mb: 64,
            cache_eviction_policy: EvictionPolicy::Lru,
            connection_timeout_sec: 10,
            retry_delay_sec: 2,
            profiling_enabled: true,
            profiling_interval_sec: 5,
            latency_threshold_ms: 100.0,
            throughput_target_rps: 50.0,
            training: TrainingConfig::default(),
            cloud: CloudConfig::default(),
            daemon: DaemonConfig::default(),
            http: HttpConfig::default(),
            sensors: Vec::new(),
        }
    }
}

/// Settings of the daemon process itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// HTTP API and status page address.
    pub listen_addr: SocketAddr,
    /// Directory for the SQLite store and runtime state.
    pub data_dir: PathBuf,
    /// Directory of model bundles.
    pub models_dir: PathBuf,
    /// Bundles to load (directory names); empty loads all.
    pub models: Vec<String>,
    /// Fetch missing model files from their pinned source at start.
    pub fetch_missing_models: bool,
    /// Load this variant of each bundle (e.g. `int8`, `f16`: the kinds
    /// `dai-models quantize` lists in a manifest) when the bundle has one;
    /// empty loads the f32 model file.
    pub prefer_model_variant: String,
    /// Longest wait for a batch to fill, milliseconds.
    pub max_batch_wait_ms: u64,
    /// Queued requests per worker before 503.
    pub queue_capacity: usize,
    /// Largest request body, MiB.
    pub max_body_mb: u64,
    /// Largest bundle archive `POST /v1/models` accepts, MiB; also the most
    /// its files may unpack to.
    pub max_upload_mb: u64,
    /// Requests with bodies over 1 MiB that may be read and run at once;
    /// more wait (up to 30 s, then 503). Bounds the memory of concurrent
    /// large requests under the unit's `MemoryMax=`.
    pub max_concurrent_bodies: usize,
    /// Bundle change check period (hot reload), seconds; 0 disables.
    pub hot_reload_interval_sec: u64,
    /// Resource manager sampling period, seconds.
    pub resource_interval_sec: u64,
    /// Let the resource manager change the active worker count (more under
    /// a backlog, fewer when the machine is busy); false keeps every worker
    /// `cpu_limit` allows active, e.g. for measurements and tests.
    pub adaptive_workers: bool,
    /// Metrics snapshot period, seconds.
    pub snapshot_interval_sec: u64,
    /// Grace period for in-flight requests at shutdown, seconds.
    pub shutdown_grace_sec: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            models_dir: PathBuf::from("models/zoo"),
            models: Vec::new(),
            fetch_missing_models: true,
            prefer_model_variant: String::new(),
            max_batch_wait_ms: 2,
            queue_capacity: 64,
            max_body_mb: 16,
            max_upload_mb: 512,
            max_concurrent_bodies: 2,
            hot_reload_interval_sec: 2,
            resource_interval_sec: 2,
            adaptive_workers: true,
            snapshot_interval_sec: 60,
            shutdown_grace_sec: 10,
        }
    }
}

/// Who may use the HTTP API. Without `auth_token_file` the API is open,
/// which is allowed on a loopback `daemon.listen_addr` only, unless
/// `allow_unauthenticated` says so.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// File holding the bearer token every endpoint but `/`, `/healthz`,
    /// `/readyz` and `/metrics` requires; empty: no token.
    pub auth_token_file: PathBuf,
    /// File holding a token `/metrics` requires (the API token works too);
    /// empty leaves `/metrics` open.
    pub metrics_token_file: PathBuf,
    /// Serve a non-loopback `daemon.listen_addr` without a token.
    pub allow_unauthenticated: bool,
    /// The tokens read from the files above while loading; never
    /// serialized, redacted in `Debug`.
    #[serde(skip)]
    pub tokens: HttpTokens,
}

/// The tokens of [`HttpConfig`], read once at load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpTokens {
    /// From `http.auth_token_file`.
    pub api: Option<BearerToken>,
    /// From `http.metrics_token_file`.
    pub metrics: Option<BearerToken>,
}

/// A bearer token (moved to `dai-trust`, shared with `dai-cloud`).
pub use dai_trust::token::BearerToken;

impl Config {
    /// Parse and validate YAML text; `origin` names the source in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::load(text, origin, &[])
    }

    /// Read, parse and validate a file, without environment overrides.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Self::from_yaml_str(&text, &path.display().to_string())
    }

    /// The configuration the daemon runs with: `path` (or the embedded
    /// default) plus the `DAI_*` environment overrides.
    pub fn load_with_env(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (
                DEFAULT_CONFIG_YAML.to_string(),
                "embedded default config".into(),
            ),
        };
        let env: Vec<(String, String)> = ENV_OVERRIDES
            .iter()
            .filter_map(|(var, _)| std::env::var(var).ok().map(|v| (var.to_string(), v)))
            .collect();
        Self::load(&text, &origin, &env)
    }

    /// Parse `text`, apply `(ENV_VAR, value)` overrides, validate.
    pub fn load(text: &str, origin: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut tree: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                key: ".".into(),
                message: e.to_string(),
            })?;
        // A file of comments only is an empty mapping: all defaults.
        if tree.is_null() {
            tree = serde_yaml_ng::Value::Mapping(Default::default());
        }
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some((_, key)) = ENV_OVERRIDES.iter().find(|(v, _)| v == var) else {
                continue;
            };
            set_path(&mut tree, key, yaml_scalar(value)).map_err(|message| ConfigError::Parse {
                origin: origin.to_string(),
                key: key.to_string(),
                message,
            })?;
            overridden.push(format!("{var}={value}"));
        }
        let origin = if overridden.is_empty() {
            origin.to_string()
        } else {
            format!("{origin} + environment ({})", overridden.join(", "))
        };
        validate::parse_and_validate(tree, &origin, validate::machine_cores())
    }

    /// Worker threads the daemon may run for inference: bounded by
    /// `max_parallel_agents`, `cpu_limit` and the cores the machine has.
    pub fn worker_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let by_cpu = (self.cpu_limit.floor() as usize).max(1);
        self.max_parallel_agents.min(by_cpu).min(cores.max(1))
    }

    /// The inference runtime's share of this configuration.
    pub fn runtime_options(&self) -> dai_infer::RuntimeOptions {
        dai_infer::RuntimeOptions {
            workers: self.worker_threads(),
            queue_capacity: self.daemon.queue_capacity,
            load_balancing: self.load_balancing_strategy,
            max_batch: self.batch_size,
            max_batch_wait: std::time::Duration::from_millis(self.daemon.max_batch_wait_ms),
            cache: self.caching_enabled.then_some(dai_infer::CacheOptions {
                policy: self.cache_eviction_policy,
                capacity_bytes: self.cache_size_mb * 1024 * 1024,
            }),
            memory_limit_bytes: self.memory_limit_mb * 1024 * 1024,
            prefer_variant: Some(self.daemon.prefer_model_variant.clone())
                .filter(|v| !v.is_empty()),
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_error<E: std::fmt::Display>(
    origin: &str,
    e: serde_path_to_error::Error<E>,
    tree: &serde_yaml_ng::Value,
) -> ConfigError {
    let key = e.path().to_string();
    let mut message = e.inner().to_string();
    // serde does not always quote the offending value; show it.
    let mut node = Some(tree);
    for part in key.split('.').filter(|p| !p.is_empty()) {
        node = node.and_then(|n| n.get(part));
    }
    if let Some(Ok(text)) = node
        .filter(|v| !v.is_mapping())
        .map(serde_yaml_ng::to_string)
    {
        message = format!("{message} (got `{}`)", text.trim());
    }
    ConfigError::Parse {
        origin: origin.to_string(),
        key: if key.is_empty() { ".".into() } else { key },
        message,
    }
}

/// An environment value is a YAML scalar: `true`, `4`, `0.5`, `LRU`.
fn yaml_scalar(value: &str) -> serde_yaml_ng::Value {
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(value) {
        Ok(v @ (serde_yaml_ng::Value::Bool(_) | serde_yaml_ng::Value::Number(_))) => v,
        _ => serde_yaml_ng::Value::String(value.to_string()),
    }
}

fn set_path(
    tree: &mut serde_yaml_ng::Value,
    path: &str,
    value: serde_yaml_ng::Value,
) -> Result<(), String> {
    let mut node = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("expected a mapping above `{part}`"))?;
        let key = serde_yaml_ng::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_complete() {
        let c = Config::from_yaml_str(DEFAULT_CONFIG_YAML, "default").expect("valid default");
        assert_eq!(c, Config::default());
        // Every key of the struct is written in the documented file.
        let tree: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(DEFAULT_CONFIG_YAML).expect("yaml");
        let written = serde_yaml_ng::to_value(&c).expect("to value");
        for (k, v) in written.as_mapping().expect("map") {
            assert!(
                tree.get(k).is_some(),
                "key {k:?} missing from the default file"
            );
            if let Some(inner) = v.as_mapping() {
                for (k2, _) in inner {
                    assert!(tree[k].get(k2).is_some(), "key {k2:?} missing under {k:?}");
                }
            }
        }
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(
            Config::from_yaml_str("", "t").expect("ok"),
            Config::default()
        );
    }
}
