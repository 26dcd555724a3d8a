//! Beyond one aggregator (`cargo bench --bench scale`), its tables written
//! to docs/benchmarks.md: intake replicas (`--role intake`) on Mosquitto's
//! shared subscription `$share/agg/...` in front of one root, every
//! process real (the aggregators are children of this binary,
//! `DAI_SCALE_ROLE=aggregator`, so their CPU time and RSS are their own),
//! every device an enrolled identity with its own mutual-TLS connection
//! signing its updates, on the shipped Mosquitto config.
//!
//! - ingest: DAI_SCALE_DEVICES (200) devices send DAI_SCALE_UPDATES (10)
//!   updates each as fast as QoS 1 allows, through the root alone and
//!   through 1, 2 and 4 replicas plus the root; updates/s from the first
//!   publish to the last ack, and the CPU seconds each process spent;
//! - fleet: DAI_SCALE_FLEET (10,000) devices, one update each, through 4
//!   replicas into a root whose round closes on all of them: the time from
//!   the last ack to the root's new global, and each process's peak RSS.
//!
//! Needs the mosquitto binary (`SKIPPED` without it).

mod common;
use common::env_usize;

use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FLEET: &str = "scale";
const SIZES: [usize; 2] = [64, 10];
/// The identity every replica shares (as deploy/k8s runs them).
const INTAKE: &str = "intake";
const GROUP: &str = "agg";

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:")
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_secs(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / ticks
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The aggregator child: the spec in DAI_SCALE_SPEC (JSON: fleet_dir,
/// state_dir, port, role root|intake, min_updates, round_ms, client).
/// Writes `state_dir/ready` once every subscription is acknowledged.
fn aggregator(spec: &str) {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec).expect("spec")).expect("spec json");
    let path = |k: &str| PathBuf::from(v[k].as_str().expect(k));
    let (fleet_dir, state_dir) = (path("fleet_dir"), path("state_dir"));
    let port = v["port"].as_u64().expect("port") as u16;
    let intake = v["role"] == "intake";
    let min_updates = v["min_updates"].as_u64().expect("min_updates") as usize;
    let round = Duration::from_millis(v["round_ms"].as_u64().expect("round_ms"));
    let share = v["share"].as_bool().unwrap_or(false);
    let client = v["client"].as_str().expect("client").to_string();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let secure = dai_cloud::secure::SecureFleet::open(&fleet_dir).expect("fleet");
        let base = dai_testkit::head_bytes(&dai_testkit::zero_head(&SIZES));
        let mut cfg = dai_testkit::service_config(port, &state_dir, [("m", base)]);
        cfg.tls = Some(Arc::new(secure.client_tls().expect("tls")));
        cfg.client_id = client.clone();
        secure.apply(&mut cfg);
        cfg.settings = dai_cloud::state::Settings {
            max_updates_per_minute: 0,
            max_staleness: 1_000_000,
            ..dai_testkit::fedavg(min_updates)
        };
        cfg.round_timeout = round;
        cfg.share_group = share.then(|| GROUP.to_string());
        let expected = if intake {
            let b = dai_trust::DeviceBundle::read_from(&fleet_dir.join("..").join(INTAKE))
                .expect("intake bundle");
            cfg.upstream = Some(dai_cloud::upstream::UpstreamConfig {
                broker: cfg.broker.clone(),
                tls: Some(Arc::new(
                    dai_trust::tls::client_config(&b.ca_pem, &b.cert_pem, &b.key).expect("tls"),
                )),
                client_id: format!("{client}-up"),
                tier: dai_cloud::intake::tier::TierConfig {
                    name: INTAKE.into(),
                    key: b.key.signing_key().clone(),
                    root: b.aggregator_public_key,
                    forward_globals: false,
                },
            });
            1
        } else {
            cfg.tiers = vec![INTAKE.into()];
            dai_cloud::intake::SUBSCRIPTIONS
        };
        let monitor = Arc::new(dai_cloud::monitor::Monitor::new());
        let ready = state_dir.join("ready");
        let m = monitor.clone();
        tokio::spawn(async move {
            while m.live.lock().subscriptions < expected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            std::fs::write(ready, b"ready").expect("ready file");
        });
        let stats =
            dai_cloud::service::run_monitored(cfg, monitor, std::future::pending::<()>()).await;
        eprintln!("the aggregator stopped: {stats:?}");
    });
}

/// A child aggregator process.
struct Child {
    child: std::process::Child,
    state: PathBuf,
}

impl Child {
    fn start(
        dir: &Path,
        name: &str,
        port: u16,
        role: &str,
        min_updates: usize,
        round_ms: u64,
        share: bool,
    ) -> Child {
        let state = dir.join(name);
        std::fs::create_dir_all(&state).expect("state dir");
        let spec = state.join("spec.json");
        std::fs::write(
            &spec,
            serde_json::json!({"fleet_dir": dir.join("fleet"), "state_dir": state, "port": port,
                "role": role, "min_updates": min_updates, "round_ms": round_ms, "share": share,
                "client": format!("dai-cloud-{name}")})
            .to_string(),
        )
        .expect("spec");
        let log = std::fs::File::create(state.join("log")).expect("log");
        let child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .env("DAI_SCALE_ROLE", "aggregator")
            .env("DAI_SCALE_SPEC", &spec)
            .stderr(log)
            .spawn()
            .expect("aggregator");
        Child { child, state }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.state.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "{} never subscribed (see its log)",
                self.state.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connected device (TLS, subscribed to its acks), its key and topics.
struct Device {
    name: String,
    client: AsyncClient,
    events: rumqttc::EventLoop,
    key: ed25519_dalek::SigningKey,
}

async fn connect(port: u16, bundle: &Path, topics: &[String]) -> Device {
    let b = dai_trust::DeviceBundle::read_from(bundle).expect("bundle");
    let name = b.device.to_string();
    let tls = Arc::new(dai_trust::tls::client_config(&b.ca_pem, &b.cert_pem, &b.key).expect("tls"));
    let mut o = MqttOptions::new(&name, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(120));
    o.set_max_packet_size(16 << 20, 16 << 20);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut events) = AsyncClient::new(o, 64);
    events.network_options.set_connection_timeout(60);
    for t in topics {
        client
            .subscribe(t, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let mut subacks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while subacks < topics.len() {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => panic!("{name}: not subscribed within 120 s"),
        }
    }
    Device {
        name,
        client,
        events,
        key: b.key.signing_key().clone(),
    }
}

/// Publish `n` updates from `d` (ids `{name}:{i}`), and wait until every
/// one is acked accepted; returns when the last ack came.
async fn send_all(mut d: Device, n: usize, agg: ed25519_dalek::VerifyingKey) -> Instant {
    let up = format!("dai/v1/{FLEET}/dev/{}/update", d.name);
    let ack_topic = format!("dai/v1/{FLEET}/dev/{}/ack", d.name);
    let wire = |i: usize| {
        let body = dai_testkit::update(&format!("{}:{i}", d.name))
            .device(&d.name)
            .model("m")
            .samples(10)
            .sizes(&SIZES)
            .encoding(dai_protocol::update::Encoding::Int8)
            .value(0.001 * (1 + i % 7) as f32)
            .encode();
        signed::seal(Kind::Update, &d.key, FLEET, &up, &body)
    };
    for i in 0..n {
        d.client
            .publish(&up, QoS::AtLeastOnce, false, wire(i))
            .await
            .expect("publish");
    }
    let mut acked = std::collections::HashSet::new();
    let mut last_sent = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.len() < n {
        assert!(
            Instant::now() < deadline,
            "{}: {} of {n} acked",
            d.name,
            acked.len()
        );
        match tokio::time::timeout(Duration::from_secs(1), d.events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == ack_topic => {
                if let Ok(body) = signed::open(Kind::Ack, &agg, FLEET, &ack_topic, &p.payload)
                    && let Ok(a) = Ack::from_bytes(body)
                    && a.status == AckStatus::Accepted
                {
                    acked.insert(a.update_id);
                }
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => {}
        }
        // What an edge's outbox does: unacked updates go again.
        if last_sent.elapsed() > Duration::from_secs(30) {
            last_sent = Instant::now();
            for i in 0..n {
                if !acked.contains(&format!("{}:{i}", d.name)) {
                    let _ = d.client.try_publish(&up, QoS::AtLeastOnce, false, wire(i));
                }
            }
        }
    }
    Instant::now()
}

struct Fleet {
    dir: tempfile::TempDir,
    mosquitto: dai_testkit::SecureMosquitto,
    agg: ed25519_dalek::VerifyingKey,
}

fn fleet(devices: usize) -> Fleet {
    let dir = tempfile::tempdir().expect("tmp");
    let fleet_dir = dir.path().join("fleet");
    let fd = dai_trust::fs::FleetDir::new(&fleet_dir);
    let now = std::time::SystemTime::now();
    let made = fd
        .init(
            dai_trust::FleetName::parse(FLEET).expect("fleet"),
            now,
            false,
        )
        .expect("fleet init");
    dai_trust::fs::FleetDir::issue_broker(
        &made.ca,
        &["127.0.0.1".to_string(), "localhost".to_string()],
        now,
        &fleet_dir,
    )
    .expect("broker certificate");
    let mut batch: Vec<(dai_trust::DeviceName, PathBuf)> = (0..devices)
        .map(|i| {
            (
                dai_trust::DeviceName::parse(&format!("d-{i}")).expect("name"),
                dir.path().join(format!("devices/d-{i}")),
            )
        })
        .collect();
    for extra in [INTAKE, "watch"] {
        batch.push((
            dai_trust::DeviceName::parse(extra).expect("name"),
            dir.path().join(extra),
        ));
    }
    std::fs::create_dir_all(dir.path().join("devices")).expect("devices dir");
    fd.enroll_many(&batch, 30, now).expect("enrol");
    let agg = fd.load().expect("fleet").aggregator.public();
    let mosquitto = dai_testkit::SecureMosquitto::start(&fleet_dir, FLEET).expect("mosquitto");
    Fleet {
        dir,
        mosquitto,
        agg,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Connect devices `0..n` (in waves, so the handshakes do not all time out
/// at once).
async fn connect_all(f: &Fleet, n: usize) -> Vec<Device> {
    let mut out = Vec::with_capacity(n);
    let port = f.mosquitto.port;
    for wave in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut tasks = Vec::new();
        for &i in wave {
            let bundle = f.dir.path().join(format!("devices/d-{i}"));
            tasks.push(tokio::spawn(async move {
                let ack = format!("dai/v1/{FLEET}/dev/d-{i}/ack");
                connect(port, &bundle, &[ack]).await
            }));
        }
        for t in tasks {
            out.push(t.await.expect("device"));
        }
    }
    out
}

/// One ingest run: `replicas` intake replicas (0: the root alone, not in
/// a share group) and the root; updates/s and each process's CPU seconds
/// (root, replicas, Mosquitto, this load generator).
fn ingest_run(replicas: usize, devices: usize, per: usize, ticks: f64) -> (f64, Vec<f64>) {
    let f = fleet(devices);
    let port = f.mosquitto.port;
    let shared = replicas > 0;
    // The root's round never closes here: this measures intake.
    let root = Child::start(
        f.dir.path(),
        "root",
        port,
        "root",
        1_000_000,
        600_000,
        shared,
    );
    let reps: Vec<Child> = (0..replicas)
        .map(|k| {
            Child::start(
                f.dir.path(),
                &format!("intake-{k}"),
                port,
                "intake",
                32,
                1000,
                true,
            )
        })
        .collect();
    root.wait_ready();
    for r in &reps {
        r.wait_ready();
    }
    let rt = runtime();
    let (rate, cpu) = rt.block_on(async {
        let devs = connect_all(&f, devices).await;
        let pids: Vec<u32> = std::iter::once(root.pid())
            .chain(reps.iter().map(Child::pid))
            .chain([f.mosquitto.pid(), std::process::id()])
            .collect();
        let before: Vec<f64> = pids.iter().map(|&p| cpu_secs(p, ticks)).collect();
        let started = Instant::now();
        let tasks: Vec<_> = devs
            .into_iter()
            .map(|d| tokio::spawn(send_all(d, per, f.agg)))
            .collect();
        let mut last = started;
        for t in tasks {
            last = last.max(t.await.expect("device"));
        }
        let secs = last.duration_since(started).as_secs_f64();
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(&p, b)| cpu_secs(p, ticks) - b)
            .collect();
        ((devices * per) as f64 / secs, cpu)
    });
    (rate, cpu)
}

/// The row of `runs` ingest runs: the median run by rate.
fn ingest_row(
    replicas: usize,
    devices: usize,
    per: usize,
    runs: usize,
    ticks: f64,
) -> (String, f64) {
    let mut all: Vec<(f64, Vec<f64>)> = (0..runs)
        .map(|_| ingest_run(replicas, devices, per, ticks))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rates: Vec<String> = all.iter().map(|(r, _)| format!("{r:.0}")).collect();
    let (rate, cpu) = all.swap_remove(all.len() / 2);
    let n = cpu.len();
    let reps_cpu: Vec<String> = cpu[1..n - 2].iter().map(|c| format!("{c:.2}")).collect();
    let aggregators: f64 = cpu[..n - 2].iter().sum();
    let row = format!(
        "| {} | {devices} x {per} | {rate:.0} ({}) | {:.3} | {:.2} | {} | {:.2} | {:.2} |\n",
        if replicas == 0 {
            "root alone".to_string()
        } else {
            format!("{replicas} + root")
        },
        rates.join(", "),
        aggregators * 1e3 / (devices * per) as f64,
        cpu[0],
        if reps_cpu.is_empty() {
            "-".to_string()
        } else {
            reps_cpu.join(" / ")
        },
        cpu[n - 2],
        cpu[n - 1],
    );
    eprint!("{row}");
    (row, rate)
}

/// The fleet row: `devices` devices, one update each, 4 replicas, the
/// root's round closing on all of them.
fn fleet_row(devices: usize, replicas: usize) -> String {
    let f = fleet(devices);
    let port = f.mosquitto.port;
    let root = Child::start(f.dir.path(), "root", port, "root", devices, 600_000, true);
    let per_replica = (devices / replicas / 4).max(1);
    let reps: Vec<Child> = (0..replicas)
        .map(|k| {
            Child::start(
                f.dir.path(),
                &format!("intake-{k}"),
                port,
                "intake",
                per_replica,
                2000,
                true,
            )
        })
        .collect();
    root.wait_ready();
    for r in &reps {
        r.wait_ready();
    }
    let rt = runtime();
    let connected_at = Instant::now();
    let (connect_s, last_to_global, peaks) = rt.block_on(async {
        let devs = connect_all(&f, devices).await;
        let connect_s = connected_at.elapsed().as_secs_f64();
        let global = format!("dai/v1/{FLEET}/model/m/global");
        let mut watch = connect(
            port,
            &f.dir.path().join("watch"),
            std::slice::from_ref(&global),
        )
        .await;
        let pids: Vec<u32> = std::iter::once(root.pid())
            .chain(reps.iter().map(Child::pid))
            .chain([f.mosquitto.pid()])
            .collect();
        let peaks = Arc::new(std::sync::Mutex::new(vec![0u64; pids.len()]));
        let sampler = {
            let (pids, peaks) = (pids.clone(), peaks.clone());
            tokio::spawn(async move {
                loop {
                    if let Ok(mut p) = peaks.lock() {
                        for (k, &pid) in pids.iter().enumerate() {
                            p[k] = p[k].max(rss_kib(pid));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        let tasks: Vec<_> = devs
            .into_iter()
            .map(|d| tokio::spawn(send_all(d, 1, f.agg)))
            .collect();
        let mut last = Instant::now();
        for t in tasks {
            last = last.max(t.await.expect("device"));
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        let got = loop {
            assert!(
                Instant::now() < deadline,
                "no global within 300 s of the last ack"
            );
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_secs(1), watch.events.poll()).await
                && p.topic == global
                && let Ok(g) = dai_protocol::global::verify(&p.payload, &f.agg, FLEET, "m")
                && g.version == 1
            {
                break Instant::now();
            }
        };
        sampler.abort();
        let peaks = peaks.lock().map(|p| p.clone()).unwrap_or_default();
        (
            connect_s,
            got.saturating_duration_since(last).as_secs_f64(),
            peaks,
        )
    });
    let mib = |k: u64| k as f64 / 1024.0;
    let n = peaks.len();
    let reps_rss: Vec<String> = peaks[1..n - 1]
        .iter()
        .map(|&k| format!("{:.0}", mib(k)))
        .collect();
    let row = format!(
        "| {devices} | {replicas} + root | {connect_s:.0} s | {last_to_global:.2} s | {:.0} | {} | {:.0} |\n",
        mib(peaks[0]),
        reps_rss.join(" / "),
        mib(peaks[n - 1]),
    );
    eprint!("{row}");
    row
}

fn raise_fd_limit(devices: usize) {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let want = ((devices as u64) * 2 + 2048).min(hard.unwrap_or(u64::MAX));
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: Some(want),
        },
    );
}

fn main() {
    if let Ok(spec) = std::env::var("DAI_SCALE_SPEC")
        && std::env::var("DAI_SCALE_ROLE").as_deref() == Ok("aggregator")
    {
        aggregator(&spec);
        return;
    }
    if !["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .any(|b| Path::new(b).exists())
    {
        println!("SKIPPED scale: needs the mosquitto binary (Debian package mosquitto)");
        return;
    }
    let devices = env_usize("DAI_SCALE_DEVICES", 200);
    let per = env_usize("DAI_SCALE_UPDATES", 10);
    let big = env_usize("DAI_SCALE_FLEET", 10_000);
    let runs = env_usize("DAI_SCALE_RUNS", 3).max(1);
    raise_fd_limit(big.max(devices));
    let ticks = clock_ticks();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = format!(
        "Intake replicas on Mosquitto's shared subscription, one root; every process real, every device its own mutual-TLS identity signing int8 updates of a {}x{} head; the load generator, Mosquitto and the aggregators share this machine's {cpus} cores.\n\n\
         **Ingest** ({devices} devices x {per} updates as fast as QoS 1 allows; updates/s of the median of {runs} runs (all runs in brackets), and the CPU seconds each process spent in that run):\n\n\
         | aggregators | updates | updates/s | aggregators' CPU ms / update | root CPU s | replica CPU s | Mosquitto CPU s | load generator CPU s |\n|---|---|---|---|---|---|---|---|\n",
        SIZES[0], SIZES[1]
    );
    let mut rates = Vec::new();
    for replicas in [0, 1, 2, 4] {
        let (row, rate) = ingest_row(replicas, devices, per, runs, ticks);
        md.push_str(&row);
        rates.push((replicas, rate));
    }
    let one = rates
        .iter()
        .find(|(r, _)| *r == 1)
        .map_or(f64::NAN, |r| r.1);
    let ratios: Vec<String> = rates
        .iter()
        .filter(|(r, _)| *r > 1)
        .map(|(r, x)| format!("{r} replicas {:.2}x", x / one))
        .collect();
    md.push_str(&format!(
        "\nScaling against 1 replica: {}.\n",
        ratios.join(", ")
    ));
    md.push_str(&format!(
        "\n**Fleet** ({big} devices, one update each, through 4 replicas; the root's round closes on all {big}):\n\n\
         | devices | aggregators | all connected after | last ack to the new global | root peak RSS MiB | replica peak RSS MiB | Mosquitto peak RSS MiB |\n|---|---|---|---|---|---|---|\n"
    ));
    md.push_str(&fleet_row(big, 4));
    md.push_str(&format!(
        "\nCommand: `DAI_SCALE_DEVICES={devices} DAI_SCALE_UPDATES={per} DAI_SCALE_FLEET={big} DAI_SCALE_RUNS={runs} cargo bench --bench scale`.\n"
    ));
    if std::env::var("DAI_SCALE_NO_WRITE").is_err() {
        common::write_section("scale", &md);
    } else {
        print!("{md}");
    }
}
