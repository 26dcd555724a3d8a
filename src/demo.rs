//! `dai demo`: a small federated fleet on loopback, end to end.
//!
//! What runs: the aggregator (`dai-cloud`'s service) with its embedded MQTT
//! broker and status page, in this process; N federated edge daemons and N
//! "alone" edge daemons (cloud sync off), each a separate `dai edge`
//! process with its own HTTP port, SQLite file and MQTT session. Every
//! device gets a non-IID shard of the digits training rows (`dai-models
//! shard`'s splitter). Each round, each device receives the next slice of
//! its shard through `POST /v1/models/digits/samples`, fine-tunes through
//! `POST /v1/models/digits/train`; federated devices uplink their deltas
//! and adopt the new global. Accuracy is measured on the held-out test rows
//! (never seen by the backbone's training either) through `/v1/infer`.
//!
//! The fleet starts from a freshly initialised head (a copy of the digits
//! bundle with a random head), so what the table shows is learnt by the
//! fleet, not shipped.

use anyhow::{Context, bail};
use dai_cloud::monitor::{ModelLabel, Monitor};
use dai_cloud::service::{BrokerAddr, ServiceConfig, run_monitored, start_embedded_broker};
use dai_cloud::state::{Settings, Strategy};
use dai_cloud::{Aggregation, Robust};
use dai_models::shard::Scheme;
use serde_json::{Value, json};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

type Row = ([f32; 64], u32);

/// Demo settings (the CLI's flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    pub rounds: usize,
    pub scheme: Scheme,
    pub encoding: String,
    pub epochs: u32,
    pub seed: u64,
    pub data: PathBuf,
    pub bundle: PathBuf,
    /// Working directory; a temporary one (removed at the end) when None.
    pub dir: Option<PathBuf>,
    /// Preferred status page address of the aggregator (a free port if taken).
    pub http: SocketAddr,
    /// Keep everything running after the last round until Ctrl-C.
    pub stay: bool,
    pub round_timeout: Duration,
}

/// One line of the per-round table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundRow {
    pub round: usize,
    pub updates: u64,
    pub global_version: i64,
    pub global_accuracy: f64,
    pub alone_accuracy: f64,
    pub bytes: u64,
    pub wall_s: f64,
}

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub rounds: Vec<RoundRow>,
    pub test_rows: usize,
    pub global_accuracy: f64,
    /// Final accuracy of each device trained alone.
    pub alone_accuracy: Vec<f64>,
}

/// A child `dai edge` process and its HTTP address.
struct Edge {
    name: String,
    url: String,
    child: Child,
    log: PathBuf,
}

impl Edge {
    /// SIGTERM, wait up to 5 s, then SIGKILL.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// SIGINT, SIGTERM or SIGHUP: the name of the first that arrives.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut streams = Vec::new();
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ] {
        match signal(kind) {
            Ok(s) => streams.push((s, name)),
            Err(e) => tracing::error!(error = %e, "cannot listen for {name}"),
        }
    }
    let waits: Vec<_> = streams
        .iter_mut()
        .map(|(s, name)| {
            Box::pin(async move {
                s.recv().await;
                *name
            })
        })
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

fn free_port(preferred: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(preferred)
        .or_else(|_| std::net::TcpListener::bind(SocketAddr::new(preferred.ip(), 0)))
}

fn any_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Copy the digits bundle into `dir/models/digits` with a freshly
/// initialised head; returns that head file (the aggregator's version 0).
fn fresh_bundle(bundle: &Path, dir: &Path, seed: u64) -> anyhow::Result<Vec<u8>> {
    let out = dir.join("models/digits");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let manifest_path = bundle.join("manifest.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let shipped_path = bundle.join("head.safetensors");
    let shipped = std::fs::read(&shipped_path)
        .with_context(|| format!("reading {}", shipped_path.display()))?;
    let (head, meta) = dai_train::Head::from_bytes(&shipped)
        .with_context(|| format!("{} is not a head file", shipped_path.display()))?;
    let fresh = dai_train::Head::init(head.spec.clone(), seed);
    let bytes = fresh.to_bytes(&meta)?;
    let old = sha256_hex(&shipped);
    if !manifest.contains(&old) {
        bail!(
            "{}: the [head] sha256 does not match head.safetensors",
            manifest_path.display()
        );
    }
    std::fs::write(
        out.join("manifest.toml"),
        manifest.replace(&old, &sha256_hex(&bytes)),
    )?;
    std::fs::write(out.join("head.safetensors"), &bytes)?;
    std::fs::copy(bundle.join("backbone.onnx"), out.join("backbone.onnx"))
        .context("copying backbone.onnx")?;
    Ok(bytes)
}

struct EdgeSpec<'a> {
    name: String,
    dir: &'a Path,
    port: u16,
    /// (broker port, public key hex) for a federated edge.
    cloud: Option<(u16, &'a str)>,
    encoding: &'a str,
    epochs: u32,
}

fn edge_config(s: &EdgeSpec<'_>) -> String {
    let data = s.dir.join(&s.name).join("data");
    let models = s.dir.join("models");
    let cloud = match s.cloud {
        Some((broker, public)) => format!(
            "cloud:\n  enabled: true\n  broker: 127.0.0.1:{broker}\n  fleet: demo\n  device_id: {}\n  \
             aggregator_public_key: {public}\n  heartbeat_sec: 2\n  update_encoding: {}\n",
            s.name, s.encoding
        ),
        None => "cloud:\n  enabled: false\n".into(),
    };
    format!(
        "# Written by `dai demo` for device {name}.\n\
         cpu_limit: 1.0\nmax_parallel_agents: 1\nbatch_size: 16\nnum_epochs: {epochs}\n\
         caching_enabled: false\nprofiling_enabled: false\nretry_delay_sec: 1\n\
         daemon:\n  listen_addr: 127.0.0.1:{port}\n  data_dir: {data}\n  models_dir: {models}\n  \
         models: [digits]\n  fetch_missing_models: false\n\
         training:\n  enabled: false\n  holdout_every: 5\n{cloud}",
        name = s.name,
        epochs = s.epochs,
        port = s.port,
        data = data.display(),
        models = models.display(),
    )
}

async fn spawn_edge(spec: EdgeSpec<'_>) -> anyhow::Result<Edge> {
    let config = spec.dir.join(format!("{}.yaml", spec.name));
    std::fs::write(&config, edge_config(&spec))?;
    let log = spec.dir.join(format!("{}.log", spec.name));
    let out = std::fs::File::create(&log)?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let child = Command::new(exe)
        .args(["edge", "--config"])
        .arg(&config)
        .env("DAI_LOG", std::env::var("DAI_LOG").unwrap_or("warn".into()))
        .env("DAI_EXIT_WITH_PARENT", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("starting an edge process")?;
    Ok(Edge {
        name: spec.name,
        url: format!("http://127.0.0.1:{}", spec.port),
        child,
        log,
    })
}

async fn wait_ready(http: &reqwest::Client, edge: &mut Edge) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", edge.url)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(status) = edge.child.try_wait()? {
            let log = std::fs::read_to_string(&edge.log).unwrap_or_default();
            bail!(
                "{} exited ({status}) before it was ready; its log:\n{log}",
                edge.name
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after 60 s (log: {})",
                edge.name,
                edge.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_json(http: &reqwest::Client, url: String, body: &Value) -> anyhow::Result<Value> {
    let r = http
        .post(&url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = r.status();
    let v: Value = r
        .json()
        .await
        .with_context(|| format!("POST {url}: body"))?;
    if !status.is_success() {
        bail!("POST {url}: {status}: {v}");
    }
    Ok(v)
}

async fn post_samples(http: &reqwest::Client, edge: &Edge, rows: &[&Row]) -> anyhow::Result<()> {
    for chunk in rows.chunks(16) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let labels: Vec<u32> = chunk.iter().map(|r| r.1).collect();
        post_json(
            http,
            format!("{}/v1/models/digits/samples", edge.url),
            &json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}, "labels": labels}),
        )
        .await?;
    }
    Ok(())
}

/// Fraction of `rows` the edge classifies right (through `/v1/infer`).
async fn accuracy(http: &reqwest::Client, edge: &Edge, rows: &[Row]) -> anyhow::Result<f64> {
    let mut correct = 0usize;
    for chunk in rows.chunks(16) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let v = post_json(
            http,
            format!("{}/v1/models/digits/infer", edge.url),
            &json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}}),
        )
        .await?;
        let probs: Vec<f64> = v["outputs"]["probs"]["data"]
            .as_array()
            .context("infer answer without outputs.probs.data")?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect();
        for (i, r) in chunk.iter().enumerate() {
            let row = probs.get(i * 10..(i + 1) * 10).context("short probs")?;
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k);
            correct += usize::from(best as u32 == r.1);
        }
    }
    Ok(correct as f64 / rows.len().max(1) as f64)
}

async fn training_status(http: &reqwest::Client, edge: &Edge) -> anyhow::Result<Value> {
    let v: Value = http
        .get(format!("{}/v1/status", edge.url))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["training"]["models"][0].clone())
}

/// Run the demo; the table goes to `out` as rounds finish.
pub async fn run(opts: Options, out: &mut (impl Write + Send)) -> anyhow::Result<Report> {
    if opts.devices == 0 || opts.rounds == 0 {
        bail!("--devices and --rounds must be at least 1");
    }
    let (dir, _temp) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("dai-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let rows = dai_models::digits::load(&opts.data)
        .with_context(|| format!("reading {}", opts.data.display()))?;
    // The same split `dai-models train digits` used: the test rows were
    // never seen by the backbone either.
    let (train_idx, test_idx) = dai_models::digits::split(&rows, 0.2, 7);
    let test: Vec<Row> = test_idx.iter().map(|&i| rows[i]).collect();
    let labels: Vec<u32> = train_idx.iter().map(|&i| rows[i].1).collect();
    let shards: Vec<Vec<&Row>> =
        dai_models::shard::shard(&labels, opts.devices, opts.scheme, opts.seed)
            .into_iter()
            .map(|s| s.into_iter().map(|k| &rows[train_idx[k]]).collect())
            .collect();
    let base = fresh_bundle(&opts.bundle, &dir, opts.seed)?;

    // Aggregator: embedded broker, status page, FedAvg over all devices.
    let broker_port = any_port()?;
    start_embedded_broker(SocketAddr::from(([127, 0, 0, 1], broker_port)))?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public = hex::encode(key.verifying_key().to_bytes());
    let monitor = Arc::new(Monitor::new());
    let state_path = dir.join("dai-cloud.sqlite");
    let listener = free_port(opts.http)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let page = format!("http://{}/", listener.local_addr()?);
    let app = dai_cloud::http::router(monitor.clone(), state_path.clone(), "demo".into());
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let aggregator = tokio::spawn(run_monitored(
        ServiceConfig {
            fleet: "demo".into(),
            broker: BrokerAddr {
                host: "127.0.0.1".into(),
                port: broker_port,
            },
            client_id: "dai-cloud".into(),
            state_path,
            models: vec![("digits".into(), base)],
            settings: Settings {
                strategy: Strategy::FedAvg {
                    min_updates: opts.devices,
                },
                aggregation: Aggregation {
                    clip_norm: None,
                    robust: Robust::Mean,
                },
                max_staleness: 3,
                reject_norm: 1e4,
            },
            round_timeout: opts.round_timeout,
            signing_key: key,
            server_optimizer: None,
        },
        monitor.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut fed = Vec::new();
    let mut alone = Vec::new();
    // A signal at any moment (Ctrl-C, `kill -TERM`, a closed terminal) ends
    // the run here, so the children below are always stopped; they also
    // watch their stdin pipe, so they exit even if this process is SIGKILLed.
    let finished = std::sync::Mutex::new(None);
    let work = async {
        for i in 0..opts.devices {
            for (federated, list) in [(true, &mut fed), (false, &mut alone)] {
                let name = format!("{}-{i}", if federated { "edge" } else { "alone" });
                list.push(
                    spawn_edge(EdgeSpec {
                        name,
                        dir: &dir,
                        port: any_port()?,
                        cloud: federated.then_some((broker_port, public.as_str())),
                        encoding: &opts.encoding,
                        epochs: opts.epochs,
                    })
                    .await?,
                );
            }
        }
        for e in fed.iter_mut().chain(alone.iter_mut()) {
            wait_ready(&http, e).await?;
        }
        writeln!(
            out,
            "dai demo: {} federated devices + {} trained alone, shards {:?}, {} held-out test digits",
            opts.devices,
            opts.devices,
            opts.scheme,
            test.len()
        )?;
        writeln!(
            out,
            "  aggregator status page: {page}  (metrics: {page}metrics)"
        )?;
        for e in &fed {
            writeln!(out, "  {} status page: {}/", e.name, e.url)?;
        }
        writeln!(out, "  working directory: {}", dir.display())?;
        for (i, s) in shards.iter().enumerate() {
            let mut classes: Vec<u32> = s.iter().map(|r| r.1).collect();
            classes.sort_unstable();
            classes.dedup();
            writeln!(
                out,
                "  device {i}: {} training rows, classes {classes:?}",
                s.len()
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:>5} {:>8} {:>7} {:>11} {:>14} {:>10} {:>7}",
            "round", "updates", "global", "global acc", "alone acc avg", "bytes up", "wall s"
        )?;
        out.flush()?;
        let mut table = Vec::new();
        let version_of = |m: &Monitor| {
            m.global_version
                .get_or_create(&ModelLabel {
                    model: "digits".into(),
                })
                .get()
        };
        for round in 1..=opts.rounds {
            let started = Instant::now();
            let bytes_before = monitor.update_bytes.get();
            let version_before = version_of(&monitor);
            // Each device's next slice of its shard, to both arms.
            let mut jobs = Vec::new();
            for (i, (f, a)) in fed.iter().zip(&alone).enumerate() {
                let s = &shards[i];
                let from = s.len() * (round - 1) / opts.rounds;
                let to = s.len() * round / opts.rounds;
                let slice = &s[from..to];
                let http = &http;
                jobs.push(async move {
                    post_samples(http, f, slice).await?;
                    post_samples(http, a, slice).await?;
                    let fr = post_json(
                        http,
                        format!("{}/v1/models/digits/train", f.url),
                        &json!({}),
                    )
                    .await;
                    let ar = post_json(
                        http,
                        format!("{}/v1/models/digits/train", a.url),
                        &json!({}),
                    )
                    .await;
                    anyhow::Ok((fr, ar))
                });
            }
            let mut updates = 0u64;
            for r in futures::future::join_all(jobs).await {
                let (fr, _ar) = r?;
                // A run refused on a device (e.g. too few hold-out rows yet,
                // or no gain on its hold-out) sends nothing this round.
                if let Ok(v) = fr
                    && v["run"]["outcome"] == "accepted"
                {
                    updates += 1;
                }
            }
            // Wait for the aggregator's new global and every edge adopting it.
            let mut version = version_before;
            if updates > 0 {
                let deadline = Instant::now() + opts.round_timeout + Duration::from_secs(30);
                loop {
                    version = version_of(&monitor);
                    let mut adopted = version > version_before;
                    if adopted {
                        for e in &fed {
                            let t = training_status(&http, e).await?;
                            adopted &= t["global_version"].as_i64() == Some(version)
                                && t["outbox_pending"] == 0;
                        }
                    }
                    if adopted {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "round {round}: no global adopted by every edge within {} s (aggregator at version {version})",
                            deadline.duration_since(started).as_secs()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let wall = started.elapsed().as_secs_f64();
            let global = accuracy(&http, &fed[0], &test).await?;
            let mut alone_acc = Vec::new();
            for a in &alone {
                alone_acc.push(accuracy(&http, a, &test).await?);
            }
            let row = RoundRow {
                round,
                updates,
                global_version: version,
                global_accuracy: global,
                alone_accuracy: alone_acc.iter().sum::<f64>() / alone_acc.len() as f64,
                bytes: monitor.update_bytes.get() - bytes_before,
                wall_s: wall,
            };
            writeln!(
                out,
                "{:>5} {:>8} {:>7} {:>11.3} {:>14.3} {:>10} {:>7.2}",
                row.round,
                row.updates,
                format!("v{}", row.global_version),
                row.global_accuracy,
                row.alone_accuracy,
                row.bytes,
                row.wall_s
            )?;
            out.flush()?;
            table.push((row, alone_acc));
        }
        let (last, alone_final) = table.last().cloned().context("no rounds")?;
        let report = Report {
            rounds: table.into_iter().map(|(r, _)| r).collect(),
            test_rows: test.len(),
            global_accuracy: last.global_accuracy,
            alone_accuracy: alone_final.clone(),
        };
        let mean = last.alone_accuracy;
        let (lo, hi) = alone_final
            .iter()
            .fold((1.0f64, 0.0f64), |(l, h), &a| (l.min(a), h.max(a)));
        writeln!(out)?;
        writeln!(
            out,
            "global model (v{}) on {} held-out digits: {:.3}",
            last.global_version,
            test.len(),
            last.global_accuracy
        )?;
        writeln!(
            out,
            "devices trained alone on the same shards:  {mean:.3} on average (min {lo:.3}, max {hi:.3})"
        )?;
        writeln!(
            out,
            "federation gain: {:+.1} points",
            (last.global_accuracy - mean) * 100.0
        )?;
        out.flush()?;
        if opts.stay {
            writeln!(
                out,
                "\nstill serving the status pages above; Ctrl-C to stop"
            )?;
            out.flush()?;
            *finished
                .lock()
                .map_err(|_| anyhow::anyhow!("report lock poisoned"))? = Some(report);
            // Until a signal: the select below holds the stop branch.
            return std::future::pending::<anyhow::Result<Report>>().await;
        }
        anyhow::Ok(report)
    };
    let result = tokio::select! {
        r = work => r,
        signal = stop_signal() => finished
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .ok_or_else(|| anyhow::anyhow!("stopped by {signal} before the last round")),
    };
    for e in fed.into_iter().chain(alone) {
        e.stop().await;
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), aggregator).await {
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %dai_cloud::error_chain(&e), "aggregator stopped with an error")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "aggregator task failed"),
        _ => {}
    }
    http_task.abort();
    result
}
