//! The demo's edge daemons: child `dai edge` processes (their config, start,
//! readiness, stop) and the HTTP calls the driver makes to them.

use super::Row;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A child `dai edge` process and its HTTP address.
pub(super) struct Edge {
    pub(super) name: String,
    pub(super) url: String,
    child: Child,
    log: PathBuf,
}

impl Edge {
    /// SIGTERM, wait up to 5 s, then SIGKILL.
    pub(super) async fn stop(mut self) {
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

pub(super) struct EdgeSpec<'a> {
    pub(super) name: String,
    pub(super) dir: &'a Path,
    pub(super) port: u16,
    /// The broker port for a federated edge (its bundle, written at
    /// enrolment, is `dir/{name}/bundle`).
    pub(super) cloud: Option<u16>,
    pub(super) encoding: &'a str,
    pub(super) epochs: u32,
}

fn edge_config(s: &EdgeSpec<'_>) -> String {
    let data = s.dir.join(&s.name).join("data");
    let models = s.dir.join("models");
    let cloud = match s.cloud {
        Some(broker) => format!(
            "cloud:\n  enabled: true\n  broker: 127.0.0.1:{broker}\n  fleet: demo\n  device_id: {}\n  \
             bundle_dir: {}\n  heartbeat_sec: 2\n  update_encoding: {}\n",
            s.name,
            s.dir.join(&s.name).join("bundle").display(),
            s.encoding
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

pub(super) async fn spawn_edge(spec: EdgeSpec<'_>) -> anyhow::Result<Edge> {
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

pub(super) async fn wait_ready(http: &reqwest::Client, edge: &mut Edge) -> anyhow::Result<()> {
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

pub(super) async fn post_json(
    http: &reqwest::Client,
    url: String,
    body: &Value,
) -> anyhow::Result<Value> {
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

pub(super) async fn post_samples(
    http: &reqwest::Client,
    edge: &Edge,
    rows: &[Row],
) -> anyhow::Result<()> {
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
pub(super) async fn accuracy(
    http: &reqwest::Client,
    edge: &Edge,
    rows: &[Row],
) -> anyhow::Result<f64> {
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

pub(super) async fn training_status(http: &reqwest::Client, edge: &Edge) -> anyhow::Result<Value> {
    let v: Value = http
        .get(format!("{}/v1/status", edge.url))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["training"]["models"][0].clone())
}

/// SIGINT, SIGTERM or SIGHUP: the name of the first that arrives.
pub(super) async fn stop_signal() -> &'static str {
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
