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

mod cloud;
mod edges;
mod rounds;

use anyhow::{Context, bail};
use cloud::{Cloud, fresh_bundle};
use dai_models::shard::Scheme;
use edges::{Edge, EdgeSpec, spawn_edge, stop_signal, wait_ready};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

fn free_port(preferred: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(preferred)
        .or_else(|_| std::net::TcpListener::bind(SocketAddr::new(preferred.ip(), 0)))
}

fn any_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The digits rows the demo uses: the held-out test rows and each device's
/// shard of the training rows.
struct Data {
    test: Vec<Row>,
    shards: Vec<Vec<Row>>,
}

impl Data {
    fn load(opts: &Options) -> anyhow::Result<Data> {
        let rows = dai_models::digits::load(&opts.data)
            .with_context(|| format!("reading {}", opts.data.display()))?;
        // The same split `dai-models train digits` used: the test rows were
        // never seen by the backbone either.
        let (train_idx, test_idx) = dai_models::digits::split(&rows, 0.2, 7);
        let test: Vec<Row> = test_idx.iter().map(|&i| rows[i]).collect();
        let labels: Vec<u32> = train_idx.iter().map(|&i| rows[i].1).collect();
        let shards = dai_models::shard::shard(&labels, opts.devices, opts.scheme, opts.seed)
            .into_iter()
            .map(|s| s.into_iter().map(|k| rows[train_idx[k]]).collect())
            .collect();
        Ok(Data { test, shards })
    }
}

/// The working directory: `--dir`, or a temporary one removed at the end.
fn workdir(opts: &Options) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("dai-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    })
}

/// The federated edges and the ones trained alone.
#[derive(Default)]
struct Fleet {
    fed: Vec<Edge>,
    alone: Vec<Edge>,
}

impl Fleet {
    async fn start(
        &mut self,
        opts: &Options,
        dir: &Path,
        cloud: &Cloud,
        http: &reqwest::Client,
    ) -> anyhow::Result<()> {
        for i in 0..opts.devices {
            for federated in [true, false] {
                let name = format!("{}-{i}", if federated { "edge" } else { "alone" });
                let edge = spawn_edge(EdgeSpec {
                    name,
                    dir,
                    port: any_port()?,
                    cloud: federated.then_some(cloud.broker_port),
                    encoding: &opts.encoding,
                    epochs: opts.epochs,
                })
                .await?;
                if federated {
                    self.fed.push(edge);
                } else {
                    self.alone.push(edge);
                }
            }
        }
        for e in self.fed.iter_mut().chain(self.alone.iter_mut()) {
            wait_ready(http, e).await?;
        }
        Ok(())
    }

    async fn stop(self) {
        for e in self.fed.into_iter().chain(self.alone) {
            e.stop().await;
        }
    }
}

fn print_header(
    out: &mut impl Write,
    opts: &Options,
    data: &Data,
    cloud: &Cloud,
    fleet: &Fleet,
    dir: &Path,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "dai demo: {} federated devices + {} trained alone, shards {:?}, {} held-out test digits",
        opts.devices,
        opts.devices,
        opts.scheme,
        data.test.len()
    )?;
    let page = &cloud.page;
    writeln!(
        out,
        "  aggregator status page: {page}  (metrics: {page}metrics)"
    )?;
    for e in &fleet.fed {
        writeln!(out, "  {} status page: {}/", e.name, e.url)?;
    }
    writeln!(
        out,
        "  fleet \"demo\": CA and registry in {}; mutual TLS on 127.0.0.1:{}, every update \
         signed by its device",
        cloud.fleet_dir.display(),
        cloud.broker_port
    )?;
    writeln!(out, "  working directory: {}", dir.display())?;
    for (i, s) in data.shards.iter().enumerate() {
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
    Ok(())
}

/// Run the demo; the table goes to `out` as rounds finish.
pub async fn run(opts: Options, out: &mut (impl Write + Send)) -> anyhow::Result<Report> {
    if opts.devices == 0 || opts.rounds == 0 {
        bail!("--devices and --rounds must be at least 1");
    }
    let (dir, _temp) = workdir(&opts)?;
    let data = Data::load(&opts)?;
    let base = fresh_bundle(&opts.bundle, &dir, opts.seed)?;
    let federated: Vec<String> = (0..opts.devices).map(|i| format!("edge-{i}")).collect();
    let cloud = Cloud::start(&opts, &dir, base, &federated).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut fleet = Fleet::default();
    // A signal at any moment (Ctrl-C, `kill -TERM`, a closed terminal) ends
    // the run here, so the children below are always stopped; they also
    // watch their stdin pipe, so they exit even if this process is SIGKILLed.
    let finished = std::sync::Mutex::new(None);
    let work = async {
        fleet.start(&opts, &dir, &cloud, &http).await?;
        print_header(out, &opts, &data, &cloud, &fleet, &dir)?;
        let ctx = rounds::Ctx {
            http: &http,
            fed: &fleet.fed,
            alone: &fleet.alone,
            shards: &data.shards,
            test: &data.test,
            monitor: &cloud.monitor,
            rounds: opts.rounds,
            round_timeout: opts.round_timeout,
        };
        let mut table = Vec::new();
        for round in 1..=opts.rounds {
            let r = rounds::run_round(&ctx, round).await?;
            rounds::print_row(out, &r.0)?;
            table.push(r);
        }
        let report = rounds::summary(out, table, data.test.len())?;
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
    fleet.stop().await;
    cloud.stop().await;
    result
}
