//! The load and soak run (`cargo bench --bench soak`), its table written to
//! docs/reliability.md: DAI_SOAK_DEVICES (10,000) simulated devices, each
//! an enrolled identity of a real fleet directory with its own mutual-TLS
//! MQTT connection (rumqttc, persistent session, subscribed to its acks
//! and the globals as an edge is), each sending one real signed int8
//! update every DAI_SOAK_INTERVAL_SECS (60) and sending it again, same id,
//! if no ack came within 30 s (what an edge's outbox does), and after a
//! failed connection waiting as an edge does (doubling from 2 s to 10 s,
//! jittered). Halfway
//! through, every device drops its connection and reconnects at once (the
//! reconnect storm). After DAI_SOAK_SECS (600) the devices stop and wait
//! up to 120 s for their last acks.
//!
//! Once against Mosquitto on the shipped config (`deploy/mosquitto`) and
//! once against the embedded broker behind its gate; the aggregator is a
//! child process (this binary, `DAI_SOAK_ROLE=aggregator`) so its RSS,
//! sampled every second, is its own. Reported: updates sent, acked, still
//! unacked when the run ends (and how many devices were still trying to
//! connect), lost (sent, never acked, and not in the aggregator's store),
//! counted twice (an id the aggregator stored more
//! than once: its `seen` table is keyed by id, so this reads the versions'
//! contributors), p50/p99 ack latency, how long the storm took to
//! reconnect everyone, and peak RSS of the aggregator and the broker.

mod common;
use common::{env_usize, repo};

use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const FLEET: &str = "soak";
const SIZES: [usize; 2] = [64, 10];

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The aggregator child: `dai_cloud::service::run` on the spec in
/// DAI_SOAK_SPEC (fleet dir, state dir, broker port, embedded or not).
fn aggregator(spec: &str) {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec).expect("spec")).expect("spec json");
    let fleet_dir = PathBuf::from(v["fleet_dir"].as_str().expect("fleet_dir"));
    let state_dir = PathBuf::from(v["state_dir"].as_str().expect("state_dir"));
    let port = v["port"].as_u64().expect("port") as u16;
    let embedded = v["embedded"].as_bool().expect("embedded");
    let min_updates = v["min_updates"].as_u64().expect("min_updates") as usize;
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
        let upstream = if embedded {
            let (up, _) = secure
                .start_broker(([127, 0, 0, 1], port).into())
                .await
                .expect("embedded broker");
            up.port
        } else {
            port
        };
        let mut cfg = dai_testkit::service_config(upstream, &state_dir, [("m", base)]);
        if !embedded {
            cfg.tls = Some(Arc::new(secure.client_tls().expect("tls")));
        }
        secure.apply(&mut cfg);
        cfg.settings = dai_cloud::state::Settings {
            max_updates_per_minute: 30,
            max_staleness: 1_000_000,
            ..dai_testkit::fedavg(min_updates)
        };
        cfg.round_timeout = Duration::from_secs(60);
        let stats = dai_cloud::service::run(cfg, std::future::pending::<()>()).await;
        eprintln!("the aggregator stopped: {stats:?}");
    });
}

/// What the devices measured.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    acked: AtomicUsize,
    resent: AtomicUsize,
    connected: AtomicUsize,
    latencies: std::sync::Mutex<Vec<f64>>,
    /// Devices back after the storm, and the slowest one's time.
    storm_back: AtomicUsize,
    storm_slowest_ms: AtomicUsize,
    /// Ids sent and not yet acked (an id leaves at its ack): at the end,
    /// what a device still holds, whether or not its task finished.
    unacked: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One simulated device until `stop`: connect, subscribe, an update every
/// `interval` from `phase`, resend after 30 s, reconnect when `storm`
/// flips. What it sent and did not see acked is left in `tally.unacked`.
#[allow(clippy::too_many_arguments)]
async fn device(
    port: u16,
    bundle: PathBuf,
    phase: Duration,
    interval: Duration,
    agg: ed25519_dalek::VerifyingKey,
    tally: Arc<Tally>,
    storm: Arc<std::sync::OnceLock<Instant>>,
    stop: Arc<AtomicBool>,
) {
    let b = dai_trust::DeviceBundle::read_from(&bundle).expect("bundle");
    let name = b.device.to_string();
    let tls = Arc::new(dai_trust::tls::client_config(&b.ca_pem, &b.cert_pem, &b.key).expect("tls"));
    let key = b.key.signing_key().clone();
    let up = format!("dai/v1/{FLEET}/dev/{name}/update");
    let ack_topic = format!("dai/v1/{FLEET}/dev/{name}/ack");
    let connect = || {
        let mut o = MqttOptions::new(&name, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
        let (c, mut e) = AsyncClient::new(o, 8);
        // As dai-sync sets it: the shipped connection_timeout_sec (10 s)
        // for the whole connect, not rumqttc's 5 s.
        e.network_options.set_connection_timeout(10);
        (c, e)
    };
    let seed = phase.as_nanos() as u64;
    let (mut client, e) = connect();
    let (mut events, mut pumping) = pump(e, ack_topic.clone(), seed);
    let mut stormed = false;
    let mut back_after_storm = false;
    let mut up_now = false;
    let mut n = 0u64;
    // (id, wire, first sent, last sent)
    let mut pending: Option<(String, Vec<u8>, Instant, Instant)> = None;
    let mut next = Instant::now() + phase;
    loop {
        if storm.get().is_some() && !stormed {
            stormed = true;
            back_after_storm = false;
            let _ = client.try_disconnect();
            pumping.abort();
            if up_now {
                tally.connected.fetch_sub(1, Ordering::Relaxed);
                up_now = false;
            }
            let (c, e) = connect();
            client = c;
            (events, pumping) = pump(e, ack_topic.clone(), seed);
        }
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && pending.is_none() {
            break;
        }
        let now = Instant::now();
        if up_now {
            if pending.is_none() && !stopping && now >= next {
                n += 1;
                let id = format!("{name}:m:{n}");
                let body = dai_testkit::update(&id)
                    .device(&name)
                    .model("m")
                    .samples(10)
                    .sizes(&SIZES)
                    .encoding(dai_protocol::update::Encoding::Int8)
                    .value(0.001)
                    .encode();
                let wire = signed::seal(Kind::Update, &key, FLEET, &up, &body);
                if client
                    .try_publish(&up, QoS::AtLeastOnce, false, wire.clone())
                    .is_ok()
                {
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut u) = tally.unacked.lock() {
                        u.insert(id.clone());
                    }
                    pending = Some((id, wire, now, now));
                }
                next += interval;
            } else if let Some((_, wire, _, last)) = &mut pending
                && now.duration_since(*last) > Duration::from_secs(30)
                && client
                    .try_publish(&up, QoS::AtLeastOnce, false, wire.clone())
                    .is_ok()
            {
                *last = now;
                tally.resent.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The channel's recv is cancel-safe; rumqttc's poll is not while
        // it connects (see `pump`).
        match tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
            Err(_) => {}
            Ok(None) => break,
            Ok(Some(Seen::ConnAck)) => {
                if !up_now {
                    up_now = true;
                    tally.connected.fetch_add(1, Ordering::Relaxed);
                }
                if stormed
                    && !back_after_storm
                    && let Some(t) = storm.get()
                {
                    back_after_storm = true;
                    let ms = t.elapsed().as_millis() as usize;
                    tally.storm_slowest_ms.fetch_max(ms, Ordering::Relaxed);
                    tally.storm_back.fetch_add(1, Ordering::Relaxed);
                }
                let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                let _ = client
                    .try_subscribe(format!("dai/v1/{FLEET}/model/+/global"), QoS::AtLeastOnce);
            }
            Ok(Some(Seen::Ack(payload))) => {
                let Ok(body) = signed::open(Kind::Ack, &agg, FLEET, &ack_topic, &payload) else {
                    continue;
                };
                let Ok(ack) = Ack::from_bytes(body) else {
                    continue;
                };
                if let Some((id, _, first, _)) = &pending
                    && *id == ack.update_id
                    && ack.status == AckStatus::Accepted
                {
                    if let Ok(mut l) = tally.latencies.lock() {
                        l.push(first.elapsed().as_secs_f64() * 1e3);
                    }
                    tally.acked.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut u) = tally.unacked.lock() {
                        u.remove(id);
                    }
                    pending = None;
                }
            }
            Ok(Some(Seen::Lost)) => {
                if up_now {
                    up_now = false;
                    tally.connected.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
    pumping.abort();
    let _ = client.try_disconnect();
}

/// What a device's event loop saw that the device acts on.
enum Seen {
    ConnAck,
    Ack(Vec<u8>),
    /// The connection failed or dropped; the pump waits out the backoff.
    Lost,
}

/// A device's rumqttc event loop, polled in a task of its own. `poll` is
/// not cancel-safe while it connects (TCP, TLS and the CONNACK happen
/// inside one poll): the first version of this generator polled it under a
/// 500 ms timeout, so every handshake slower than that began again, and
/// under 10,000 connections about 3,600 ever got through. The edge's
/// reconnect policy is here (dai-sync's backoff with the shipped
/// retry_delay_sec 2 and connection_timeout_sec 10): doubling from 2 s,
/// capped at 10 s, jittered to 50-100 %.
fn pump(
    mut events: rumqttc::EventLoop,
    ack_topic: String,
    seed: u64,
) -> (
    tokio::sync::mpsc::Receiver<Seen>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut attempt = 0u32;
        let mut jitter = seed | 1;
        loop {
            let seen = match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    attempt = 0;
                    Seen::ConnAck
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    Seen::Ack(p.payload.to_vec())
                }
                Ok(_) => continue,
                Err(_) => Seen::Lost,
            };
            let lost = matches!(seen, Seen::Lost);
            if tx.send(seen).await.is_err() {
                break;
            }
            if lost {
                jitter ^= jitter << 13;
                jitter ^= jitter >> 7;
                jitter ^= jitter << 17;
                let wait = Duration::from_secs(2)
                    .saturating_mul(1 << attempt.min(4))
                    .min(Duration::from_secs(10))
                    .mul_f64(0.5 + (jitter % 1000) as f64 / 2000.0);
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
        }
    });
    (rx, task)
}

/// One broker's run; a table row.
fn run(embedded: bool, devices: usize, secs: u64, interval: u64, dir: &Path) -> String {
    let fleet_dir = dir.join("fleet");
    let state_dir = dir.join(if embedded {
        "state-embedded"
    } else {
        "state-mosquitto"
    });
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let agg = dai_trust::fs::FleetDir::new(&fleet_dir)
        .load()
        .expect("fleet")
        .aggregator
        .public();
    let mut mosquitto = None;
    let port = if embedded {
        dai_testkit::free_port()
    } else {
        let m = dai_testkit::SecureMosquitto::start(&fleet_dir, FLEET).expect("mosquitto binary");
        let p = m.port;
        mosquitto = Some(m);
        p
    };
    let spec = dir.join("spec.json");
    let min_updates = (devices / 4).max(2);
    std::fs::write(
        &spec,
        serde_json::json!({"fleet_dir": fleet_dir, "state_dir": state_dir, "port": port,
            "embedded": embedded, "min_updates": min_updates})
        .to_string(),
    )
    .expect("spec");
    let log = std::fs::File::create(state_dir.join("aggregator.log")).expect("log");
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("DAI_SOAK_ROLE", "aggregator")
        .env("DAI_SOAK_SPEC", &spec)
        .stderr(log)
        .spawn()
        .expect("aggregator");
    let pid = child.id();
    let broker_pid = mosquitto.as_ref().map_or(pid, |m| m.pid());
    std::thread::sleep(Duration::from_secs(3));
    if embedded {
        dai_testkit::wait_for_port(port, Duration::from_secs(30), "the gate");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let storm = Arc::new(std::sync::OnceLock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let interval_d = Duration::from_secs(interval);
    let (mut agg_peak, mut broker_peak) = (0u64, 0u64);
    let began = Instant::now();
    let (stuck, connected): (usize, usize) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(devices);
        for i in 0..devices {
            // Connections ramp up over the first tenth of an interval;
            // updates are spread over the interval.
            let phase = interval_d.mul_f64(i as f64 / devices as f64);
            tasks.push(tokio::spawn(device(
                port,
                dir.join(format!("devices/d-{i}")),
                phase,
                interval_d,
                agg,
                tally.clone(),
                storm.clone(),
                stop.clone(),
            )));
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while began.elapsed() < Duration::from_secs(secs) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            agg_peak = agg_peak.max(rss_kib(pid));
            broker_peak = broker_peak.max(rss_kib(broker_pid));
            if storm.get().is_none() && began.elapsed() >= Duration::from_secs(secs / 2) {
                let _ = storm.set(Instant::now());
            }
        }
        let connected = tally.connected.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let drain = Instant::now();
        let mut stuck = 0;
        for t in tasks {
            let left = Duration::from_secs(120).saturating_sub(drain.elapsed());
            if !matches!(tokio::time::timeout(left, t).await, Ok(Ok(()))) {
                stuck += 1;
            }
        }
        (stuck, connected)
    });
    agg_peak = agg_peak.max(rss_kib(pid));
    let _ = child.kill();
    let _ = child.wait();
    drop(mosquitto);
    // Counted twice: an id in two versions' contributors.
    let db = rusqlite::Connection::open(state_dir.join("agg.sqlite")).expect("state");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut q = db
        .prepare("SELECT contributors FROM versions")
        .expect("query");
    for c in q.query_map([], |r| r.get::<_, String>(0)).expect("rows") {
        let ids: Vec<String> = serde_json::from_str(&c.expect("row")).expect("json");
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice = seen.values().filter(|n| **n > 1).count();
    let stored: i64 = db
        .query_row("SELECT COUNT(*) FROM seen", [], |r| r.get(0))
        .expect("seen");
    // Lost: sent, never acked, and not in the aggregator's store either (an
    // unacked id that was stored only had its ack still on the way).
    let unacked: Vec<String> = tally
        .unacked
        .lock()
        .map(|u| u.iter().cloned().collect())
        .unwrap_or_default();
    let mut is_stored = db
        .prepare("SELECT 1 FROM seen WHERE update_id = ?1")
        .expect("query");
    let lost: Vec<&String> = unacked
        .iter()
        .filter(|id| !is_stored.exists([id.as_str()]).unwrap_or(false))
        .collect();
    let mut l = tally
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if l.is_empty() {
            f64::NAN
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    let sent = tally.sent.load(Ordering::Relaxed);
    let acked = tally.acked.load(Ordering::Relaxed);
    let row = format!(
        "| {} | {devices} | {connected} | {secs} s | {sent} | {acked} ({stored} stored) | {} ({stuck} devices still connecting) | {} | {twice} | {} | {:.0} / {:.0} ms | {} | {} MiB | {} |\n",
        if embedded {
            "embedded (rumqttd behind the gate)"
        } else {
            "Mosquitto (shipped config)"
        },
        unacked.len(),
        lost.len(),
        tally.resent.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
        {
            let back = tally.storm_back.load(Ordering::Relaxed);
            let slowest = tally.storm_slowest_ms.load(Ordering::Relaxed) as f64 / 1e3;
            if back == devices {
                format!("{slowest:.1} s")
            } else {
                format!("{back} of {devices} back, slowest {slowest:.1} s")
            }
        },
        agg_peak >> 10,
        if embedded {
            "(in the aggregator)".to_string()
        } else {
            format!("{} MiB", broker_peak >> 10)
        },
    );
    eprint!("{row}");
    if !lost.is_empty() {
        eprintln!("lost (first 10): {:?}", &lost[..lost.len().min(10)]);
    }
    row
}

fn main() {
    if let Ok(spec) = std::env::var("DAI_SOAK_SPEC")
        && std::env::var("DAI_SOAK_ROLE").as_deref() == Ok("aggregator")
    {
        aggregator(&spec);
        return;
    }
    if std::env::args().any(|a| a == "--bench") && std::env::var("DAI_SOAK").is_err() {
        println!(
            "SKIPPED soak: 2 x {} min at full load; set DAI_SOAK=1 to run it",
            env_usize("DAI_SOAK_SECS", 600) / 60
        );
        return;
    }
    let devices = env_usize("DAI_SOAK_DEVICES", 10_000);
    let secs = env_usize("DAI_SOAK_SECS", 600) as u64;
    let interval = env_usize("DAI_SOAK_INTERVAL_SECS", 60) as u64;
    // Three descriptors a device in the embedded run (gate, its upstream,
    // rumqttd), one in the load: raise the limit for us and our children.
    // Capped at the hard limit: without CAP_SYS_RESOURCE (a container)
    // asking for more fails and would leave the soft limit where it was.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let want = ((devices as u64) * 4 + 1024).min(hard.unwrap_or(u64::MAX));
    if let Err(e) = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: Some(want),
        },
    ) {
        eprintln!("could not raise the open-file limit to {want}: {e}");
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let began = Instant::now();
    let fleet_dir = dir.join("fleet");
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
    let batch: Vec<(dai_trust::DeviceName, PathBuf)> = (0..devices)
        .map(|i| {
            (
                dai_trust::DeviceName::parse(&format!("d-{i}")).expect("name"),
                dir.join(format!("devices/d-{i}")),
            )
        })
        .collect();
    std::fs::create_dir_all(dir.join("devices")).expect("devices dir");
    fd.enroll_many(&batch, 30, now).expect("enrol");
    eprintln!(
        "soak: {devices} devices enrolled in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let mut md = format!(
        "Up to {devices} devices (the table's `devices` column), one signed int8 update ({}x{} head) each every {interval} s, resent after 30 s without an ack; a reconnect storm (every device at once) at {} s; FedAvg rounds of a quarter of the devices' updates. Machine: the 2-core CI kind; load, broker and aggregator share it.\n\n\
         | broker | devices | connected at the end | run | updates sent | acked | unacked at the stop (+120 s) | lost (sent, never stored) | counted twice | resent | p50 / p99 ack latency | storm: all reconnected after | aggregator peak RSS | broker peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        SIZES[0],
        SIZES[1],
        secs / 2,
    );
    // DAI_SOAK_BROKERS (mosquitto, embedded, or both) to look at one.
    let which = std::env::var("DAI_SOAK_BROKERS").unwrap_or_else(|_| "both".into());
    for embedded in [false, true] {
        if which != "both" && (which == "embedded") != embedded {
            continue;
        }
        // The embedded broker holds three descriptors a device in the
        // aggregator's process (the device's socket at the gate, the gate's
        // loopback connection to rumqttd and rumqttd's side of it); where
        // the hard limit cannot be raised (a container without
        // CAP_SYS_RESOURCE), it runs the most devices the limit allows, and
        // the row says so.
        let n = if embedded {
            let cap = hard.map_or(devices, |h| {
                (h.saturating_sub(2048) / 3 / 100 * 100) as usize
            });
            if cap < devices {
                eprintln!(
                    "soak: the embedded run holds {cap} devices (open-file hard limit {hard:?})"
                );
            }
            devices.min(cap)
        } else {
            devices
        };
        md.push_str(&run(embedded, n, secs, interval, dir));
    }
    md.push_str(&format!(
        "\nCommand: `DAI_SOAK=1 DAI_SOAK_DEVICES={devices} DAI_SOAK_SECS={secs} cargo bench --bench soak`.\n"
    ));
    if std::env::var("DAI_SOAK_NO_WRITE").is_err() {
        let doc = repo().join("docs/reliability.md");
        common::write_doc_section(&doc, "soak", &md);
    } else {
        print!("{md}");
    }
}
