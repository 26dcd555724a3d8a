//! What identity costs, side by side in one run, written to
//! docs/benchmarks.md (`cargo bench --bench trust`):
//!
//! (a) connect time per device: a rumqttc client from TCP connect to
//!     CONNACK, through the embedded broker's mutual-TLS gate (TLS 1.3,
//!     Ed25519 certificates, the ACL) and straight to plain rumqttd on
//!     loopback; DAI_BENCH_CONNECTS (200) sequential connections each,
//!     median and p95 of 3 runs;
//! (b) the cost of one update's end-to-end check: Ed25519 signature
//!     verification (`verify_strict`, what the aggregator runs per update)
//!     against decoding the same int8 update, per second on one core;
//! (c) aggregator ingest with every signature verified, side by side with
//!     the same run unsigned (`common::ingest`, also row 2 of the federated
//!     benchmark's table (b)); DAI_BENCH_INGEST_DEVICES (20) x
//!     DAI_BENCH_INGEST_UPDATES (25), median of 3.

mod common;
use common::ingest::ingest;
use common::{env_usize, median};

use dai_protocol::signed::{self, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Seconds from the first poll (TCP connect) to CONNACK.
async fn connect_once(port: u16, id: &str, tls: Option<Arc<dai_trust::tls::ClientConfig>>) -> f64 {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut events) = AsyncClient::new(opts, 8);
    let started = Instant::now();
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    let t = started.elapsed().as_secs_f64();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(50), events.poll()).await;
    t
}

/// Seconds for a TCP connect plus the TLS handshake alone (what the gate
/// adds before the first MQTT byte), and for the TCP connect alone.
async fn handshake_once(port: u16, tls: Arc<dai_trust::tls::ClientConfig>) -> (f64, f64) {
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let tcp_s = started.elapsed().as_secs_f64();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let t = started.elapsed().as_secs_f64();
    drop(stream);
    (t, tcp_s)
}

fn main() {
    let n = env_usize("DAI_BENCH_CONNECTS", 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet_dir = dai_testkit::make_fleet(tmp.path(), "bench", &["dev-1"]);
    let tls = dai_testkit::bundle_tls(&tmp.path().join("dev-1"));
    let gate_port = dai_testkit::free_port();
    let secure = dai_cloud::secure::SecureFleet::open(&fleet_dir).expect("fleet");
    let (upstream, _) = rt
        .block_on(secure.start_broker(([127, 0, 0, 1], gate_port).into()))
        .expect("gated broker");
    eprintln!("(a) {n} connects, TLS gate vs plain rumqttd");
    let (mut tls_runs, mut plain_runs, mut tls_p95, mut plain_p95) =
        (vec![], vec![], vec![], vec![]);
    let (mut hs_runs, mut tcp_runs) = (vec![], vec![]);
    for _ in 0..3 {
        let (hs, tcp): (Vec<f64>, Vec<f64>) = (0..n)
            .map(|_| rt.block_on(handshake_once(gate_port, tls.clone())))
            .unzip();
        hs_runs.push(median(hs) * 1e3);
        tcp_runs.push(median(tcp) * 1e3);
        let mut t: Vec<f64> = (0..n)
            .map(|_| rt.block_on(connect_once(gate_port, "dev-1", Some(tls.clone()))))
            .collect();
        let mut p: Vec<f64> = (0..n)
            .map(|i| rt.block_on(connect_once(upstream.port, &format!("p{i}"), None)))
            .collect();
        tls_p95.push(pct(&mut t, 0.95) * 1e3);
        plain_p95.push(pct(&mut p, 0.95) * 1e3);
        tls_runs.push(median(t) * 1e3);
        plain_runs.push(median(p) * 1e3);
    }

    eprintln!("(b) signature check vs decode, one core");
    let body = dai_testkit::update("u1")
        .device("dev-1")
        .model("digits")
        .sizes(&[64, 32, 10])
        .value(0.01)
        .encoding(dai_protocol::update::Encoding::Int8)
        .encode();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public = key.verifying_key();
    let topic = "dai/v1/bench/dev/dev-1/update";
    let wire = signed::seal(Kind::Update, &key, "bench", topic, &body);
    let per_sec = |f: &dyn Fn()| {
        let mut runs = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let mut k = 0u64;
            while started.elapsed() < Duration::from_millis(700) {
                f();
                k += 1;
            }
            runs.push(k as f64 / started.elapsed().as_secs_f64());
        }
        median(runs)
    };
    let verify = per_sec(&|| {
        signed::open(Kind::Update, &public, "bench", topic, &wire).expect("verifies");
    });
    let decode = per_sec(&|| {
        dai_protocol::update::Update::decode(&body).expect("decodes");
    });

    eprintln!("(c) ingest, signed vs unsigned");
    let (m, per) = (
        env_usize("DAI_BENCH_INGEST_DEVICES", 20),
        env_usize("DAI_BENCH_INGEST_UPDATES", 25),
    );
    let base = dai_testkit::head(&[64, 32, 10], 1);
    let payload = dai_testkit::update("x")
        .model("digits")
        .sizes(&[64, 32, 10])
        .value(0.01)
        .encoding(dai_protocol::update::Encoding::Int8)
        .build();
    let (mut unsigned, mut signed_runs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        // rumqttd runs once per process: the gate's loopback side.
        unsigned.push(rt.block_on(ingest(upstream.port, &base, m, per, &payload, false)));
        signed_runs.push(rt.block_on(ingest(upstream.port, &base, m, per, &payload, true)));
    }
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let md = format!(
        "### Identity costs\n\n\
         Command: `cargo bench --bench trust` (this machine, 2 cores; loopback).\n\n\
         (a) One device connecting, from TCP connect to CONNACK (rumqttc), {n} sequential connections per run, \
         median of 3 runs:\n\n\
         | path | median ms | p95 ms | runs (median ms) |\n|---|---:|---:|---|\n\
         | mutual TLS through the gate (TLS 1.3, Ed25519, ACL) | {:.2} | {:.2} | {} |\n\
         | plain TCP to rumqttd | {:.2} | {:.2} | {} |\n\n\
         The TLS 1.3 handshake itself (tokio-rustls client, TCP connect included; the gate's server side, client \
         certificate verified): median {:.2} ms against {:.3} ms for the TCP connect alone (runs: {}). A whole \
         gated connect is {:.2}x the plain one here: the plain path to rumqttd is not faster on loopback (rumqttd's \
         own CONNACK path dominates both).\n\n\
         (b) Per update, one core: Ed25519 signature check (`verify_strict` over domain, fleet, topic and the \
         {} byte int8 update of a 64-32-10 head) {:.0}/s against decoding the update {:.0}/s: the check costs {:.0} % \
         of a decode.\n\n\
         (c) Aggregator ingest, {m} devices x {per} int8 updates (64-32-10 head), plain rumqttd, median of 3:\n\n\
         | updates | updates/s (median) | runs |\n|---|---:|---|\n\
         | unsigned (`--insecure-plaintext`) | {:.0} | {} |\n\
         | signed, every signature verified | {:.0} | {} |\n\n\
         signed / unsigned: {:.2}.\n\n",
        median(tls_runs.clone()),
        median(tls_p95),
        tls_runs
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(plain_runs.clone()),
        median(plain_p95),
        plain_runs
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(hs_runs.clone()),
        median(tcp_runs),
        hs_runs
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(tls_runs) / median(plain_runs),
        body.len(),
        verify,
        decode,
        100.0 * decode / verify,
        median(unsigned.clone()),
        runs(&unsigned),
        median(signed_runs.clone()),
        runs(&signed_runs),
        median(signed_runs.clone()) / median(unsigned.clone()),
    );
    print!("{md}");
    common::write_section("trust", &md);
}
