//! Federated sync benchmarks, side by side, written to docs/benchmarks.md:
//!
//! (a) update size per encoding (f32 / f16 / int8, raw safetensors and
//!     zstd) and the global accuracy after 20 FedAvg rounds with each, on
//!     10 non-IID (Dirichlet 0.3) digits devices: the real encoder, the
//!     real aggregator state (SQLite) and validation;
//! (b) aggregator ingest rate: M simulated devices publishing real int8
//!     updates through an MQTT broker to the running aggregator service,
//!     through the embedded broker (rumqttd) and through Mosquitto;
//! (c) one 100-client FedAvg round, ours (local training on 2 threads,
//!     int8 + zstd updates over MQTT, aggregation, signed global back) vs
//!     Flower's simulation (bench/flower_round.py: PyTorch clients on Ray)
//!     on the same MLP head, data and hyper-parameters; and peak memory.
//!
//! `cargo bench --bench federated`. Env: DAI_BENCH_ROUNDS (20),
//! DAI_BENCH_INGEST_DEVICES (20), DAI_BENCH_INGEST_UPDATES (25 per device),
//! DAI_BENCH_FL_ROUNDS (3).

mod common;
use common::ingest::{aggregator_config, device_client, ingest, settings};
use common::{env_usize, median, repo};

use dai_cloud::monitor::{ModelLabel, Monitor};
use dai_cloud::service::{base_of, run_monitored, start_embedded_broker};
use dai_cloud::state::{State, Strategy};
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use dai_train::cpu::CpuBackend;
use dai_train::{Dataset, Head, Optimizer, TrainConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EPOCHS: usize = 5;
const BATCH: usize = 16;
const LR: f32 = 0.003;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Peak RSS (VmHWM) of a process, MiB.
fn peak_rss_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The digits rows as the devices see them: 64-d backbone embeddings
/// (the real backbone.onnx through tract), labels; train/test split as
/// `dai-models train digits` made it.
struct Digits {
    train: Vec<(Vec<f32>, u32)>,
    test: Dataset,
    base: Head,
}

fn digits() -> Digits {
    let rows = dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits");
    let bundle =
        dai_infer::bundle::Bundle::open(&repo().join("models/zoo/digits")).expect("bundle");
    let model = dai_infer::model::LoadedModel::load(bundle, 64).expect("backbone");
    let mut emb = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(64) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let input = dai_infer::tensor::TensorData::new(
            vec![chunk.len(), 64],
            dai_infer::tensor::Data::F32(px),
        )
        .expect("tensor");
        let out = model.run(&[&input], chunk.len()).expect("run");
        let dai_infer::tensor::Data::F32(e) = &out[0].data else {
            panic!("embedding is not f32")
        };
        let width = e.len() / chunk.len();
        emb.extend(e.chunks(width).map(|c| c.to_vec()));
    }
    let (train_idx, test_idx) = dai_models::digits::split(&rows, 0.2, 7);
    let train = train_idx
        .iter()
        .map(|&i| (emb[i].clone(), rows[i].1))
        .collect();
    let test = dataset(test_idx.iter().map(|&i| (&emb[i], rows[i].1)));
    let shipped = std::fs::read(repo().join("models/zoo/digits/head.safetensors")).expect("head");
    let (head, _) = Head::from_bytes(&shipped).expect("head");
    // A fresh head of the same shape: what the fleet learns is measured.
    let base = Head::init(head.spec.clone(), 7);
    Digits { train, test, base }
}

fn dataset<'a>(rows: impl Iterator<Item = (&'a Vec<f32>, u32)>) -> Dataset {
    let mut x = Vec::new();
    let mut classes = Vec::new();
    let mut features = 0;
    for (e, l) in rows {
        features = e.len();
        x.extend_from_slice(e);
        classes.push(l);
    }
    Dataset {
        x,
        features,
        classes,
        values: vec![],
        outputs: 10,
    }
}

fn shards(d: &Digits, devices: usize, scheme: dai_models::shard::Scheme) -> Vec<Dataset> {
    let labels: Vec<u32> = d.train.iter().map(|r| r.1).collect();
    dai_models::shard::shard(&labels, devices, scheme, 7)
        .into_iter()
        .map(|idx| dataset(idx.iter().map(|&i| (&d.train[i].0, d.train[i].1))))
        .collect()
}

/// One device's local round: train from `global`, return the delta as
/// protocol tensors, the sample count and the final loss.
fn local_update(global: &Head, data: &Dataset, seed: u64) -> (Vec<Tensor>, u64, f32) {
    let mut head = global.clone();
    let cfg = TrainConfig {
        optimizer: Optimizer::adam(LR),
        batch_size: BATCH,
        epochs: EPOCHS,
        seed,
    };
    let report =
        dai_train::train(&mut CpuBackend::new(), &mut head, data, &cfg, |_| true).expect("train");
    let delta = head.params.minus(&global.params);
    let tensors = dai_protocol::update::head_tensors(&head.spec, &delta);
    (
        tensors,
        data.classes.len() as u64,
        report.final_loss().unwrap_or(0.0),
    )
}

fn base_label(version: u64) -> String {
    if version == 0 {
        "1.0.0".into()
    } else {
        format!("1.0.0+g{version}")
    }
}

struct EncodingRow {
    encoding: &'static str,
    raw: f64,
    zstd: f64,
    accuracy: f64,
    /// The final global head's parameters, to compare encodings.
    params: Vec<f32>,
}

/// (a): 20 FedAvg rounds through encoder, validation and SQLite state.
fn encodings(d: &Digits, rounds: usize) -> Vec<EncodingRow> {
    let devices = shards(d, 10, dai_models::shard::Scheme::Dirichlet { alpha: 0.3 });
    let mut out = Vec::new();
    for enc in [
        Encoding::F32,
        Encoding::F16,
        Encoding::Int8,
        Encoding::Topk8,
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut state = State::open(&dir.path().join("agg.sqlite")).expect("state");
        state
            .register(
                "digits",
                &d.base.to_bytes(&Default::default()).expect("bytes"),
            )
            .expect("register");
        let s = settings(Strategy::FedAvg { min_updates: 10 });
        let (mut raw, mut zst, mut n) = (0usize, 0usize, 0usize);
        // Error feedback, as the edge keeps it: what a lossy encoding did
        // not send is added to the device's next delta.
        let mut residual: Vec<Option<Vec<Tensor>>> = vec![None; devices.len()];
        for round in 0..rounds {
            let (version, head) = state.current("digits").expect("current");
            let (global, _) = Head::from_bytes(&head).expect("head");
            for (k, data) in devices.iter().enumerate() {
                if data.classes.is_empty() {
                    continue;
                }
                let (mut tensors, samples, loss) =
                    local_update(&global, data, (round * 100 + k) as u64);
                if let Some(r) = &residual[k] {
                    dai_protocol::update::add_into(&mut tensors, r);
                }
                let wire = Update {
                    meta: UpdateMeta {
                        device: format!("d{k}"),
                        model: "digits".into(),
                        base_version: base_label(version),
                        update_id: format!("d{k}-r{round}"),
                        sample_count: samples,
                        loss,
                        encoding: enc,
                    },
                    tensors: tensors.clone(),
                }
                .encode()
                .expect("encode");
                zst += wire.len();
                raw += zstd::decode_all(wire.as_slice()).expect("zstd").len();
                n += 1;
                let u = Update::decode(&wire).expect("decode");
                residual[k] = Some(dai_protocol::update::residual(&tensors, &u.tensors));
                let ack = state.ingest(&u, &s, base_of).expect("ingest");
                assert!(ack.reason.is_none(), "{ack:?}");
            }
            state
                .aggregate("digits", &s, true, &mut None)
                .expect("aggregate")
                .expect("a new global");
        }
        let (_, head) = state.current("digits").expect("current");
        let (global, _) = Head::from_bytes(&head).expect("head");
        out.push(EncodingRow {
            encoding: enc.as_str(),
            raw: raw as f64 / n as f64,
            zstd: zst as f64 / n as f64,
            accuracy: dai_train::accuracy(&global, &d.test).expect("accuracy"),
            params: global
                .params
                .weights
                .iter()
                .chain(&global.params.biases)
                .flatten()
                .copied()
                .collect(),
        });
    }
    out
}

fn mosquitto(port: u16) -> Option<std::process::Child> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .and_then(|bin| {
            std::process::Command::new(bin)
                .args(["-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        })
        .inspect(|_| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
}

/// (c): wall time of each of `rounds` 100-client FedAvg rounds, through
/// the embedded broker and the aggregator service.
async fn our_rounds(
    port: u16,
    base: &Head,
    clients: &[Dataset],
    rounds: usize,
) -> (Vec<f64>, Head) {
    let dir = tempfile::tempdir().expect("tmp");
    let monitor = Arc::new(Monitor::new());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let n = clients.iter().filter(|c| !c.classes.is_empty()).count();
    let service = tokio::spawn(run_monitored(
        aggregator_config(port, dir.path(), base, Strategy::FedAvg { min_updates: n }),
        monitor.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // The signed global comes back on the model topic, like on an edge.
    let mut opts = MqttOptions::new("watcher", "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (watcher, mut globals) = AsyncClient::new(opts, 64);
    watcher
        .subscribe("dai/v1/bench/model/digits/global", QoS::AtLeastOnce)
        .await
        .expect("sub");
    let key = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]).verifying_key();
    let mut conns = Vec::new();
    for k in 0..clients.len() {
        let (c, mut ev) = device_client(port, &format!("c{k}")).await;
        // Keep each client's event loop running (acks, keep-alives).
        tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut global = base.clone();
    let mut times = Vec::new();
    for round in 0..rounds {
        let version = monitor
            .global_version
            .get_or_create(&ModelLabel {
                model: "digits".into(),
            })
            .get() as u64;
        let started = Instant::now();
        // Local training on 2 threads (the machine's cores), like Flower's
        // two Ray workers.
        let g = &global;
        let payloads: Vec<(usize, Vec<u8>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    s.spawn(move || {
                        clients
                            .iter()
                            .enumerate()
                            .filter(|(k, c)| k % 2 == t && !c.classes.is_empty())
                            .map(|(k, data)| {
                                let (tensors, samples, loss) =
                                    local_update(g, data, (round * 1000 + k) as u64);
                                let wire = Update {
                                    meta: UpdateMeta {
                                        device: format!("c{k}"),
                                        model: "digits".into(),
                                        base_version: base_label(version),
                                        update_id: format!("c{k}-r{round}"),
                                        sample_count: samples,
                                        loss,
                                        encoding: Encoding::Int8,
                                    },
                                    tensors,
                                }
                                .encode()
                                .expect("encode");
                                (k, wire)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let trained = started.elapsed().as_secs_f64();
        for (k, wire) in payloads {
            conns[k]
                .publish(
                    format!("dai/v1/bench/dev/c{k}/update"),
                    QoS::AtLeastOnce,
                    false,
                    wire,
                )
                .await
                .expect("publish");
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "round {round}: no global");
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(500), globals.poll()).await
            {
                let gm = dai_protocol::global::verify(&p.payload, &key, "bench", "digits")
                    .expect("signed");
                if gm.version == version + 1 {
                    global = Head::from_bytes(&gm.head_file).expect("head").0;
                    break;
                }
            }
        }
        times.push(started.elapsed().as_secs_f64());
        eprintln!(
            "  ours round {}: {:.3} s, of which local training {trained:.3} s",
            round + 1,
            times[round]
        );
    }
    let _ = stop.send(());
    let _ = service.await;
    (times, global)
}

/// The Flower input file: the same client rows and initial head.
fn flower_file(path: &std::path::Path, base: &Head, clients: &[Dataset]) {
    use safetensors::tensor::{Dtype, TensorView};
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut client = Vec::new();
    for (k, c) in clients.iter().enumerate() {
        x.extend(c.x.iter().flat_map(|v| v.to_le_bytes()));
        for &l in &c.classes {
            y.extend((l as i64).to_le_bytes());
            client.extend((k as i64).to_le_bytes());
        }
    }
    let n = y.len() / 8;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("x".into(), Dtype::F32, vec![n, 64], x),
        ("y".into(), Dtype::I64, vec![n], y),
        ("client".into(), Dtype::I64, vec![n], client),
    ];
    for t in dai_head::layout::named(&base.spec, &base.params) {
        owned.push((
            t.name(),
            Dtype::F32,
            t.dims(),
            t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dt, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dt, shape.clone(), bytes).expect("view"),
            )
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = [
        ("epochs", EPOCHS.to_string()),
        ("batch_size", BATCH.to_string()),
        ("lr", LR.to_string()),
        ("clients", clients.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize_to_file(views, Some(meta), path).expect("write flower input");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 20);
    let m = env_usize("DAI_BENCH_INGEST_DEVICES", 20);
    let per = env_usize("DAI_BENCH_INGEST_UPDATES", 25);
    let fl_rounds = env_usize("DAI_BENCH_FL_ROUNDS", 3).max(2);
    let d = digits();
    let mut md = String::new();
    md.push_str(&format!(
        "## Federated sync\n\nCommand: `cargo bench --bench federated` (this machine, 2 cores; \
         local training: head 64-32-10, Adam lr {LR}, batch {BATCH}, {EPOCHS} epochs per round; \
         digits embeddings from the real backbone.onnx through tract).\n\n"
    ));

    // (a)
    eprintln!("(a) encodings, {rounds} rounds each");
    let enc = encodings(&d, rounds);
    let f32_raw = enc[0].raw;
    let f32_acc = enc[0].accuracy;
    md.push_str(&format!(
        "### (a) Update size per encoding, and accuracy after {rounds} FedAvg rounds\n\n\
         10 devices, Dirichlet(0.3) shards of the 1,438 training rows, accuracy of the global head on the 359 \
         held-out rows. Bytes are per update (mean), measured on the real wire payloads; \"raw\" is the \
         uncompressed safetensors, \"zstd\" what is sent (level 3). Every lossy encoding runs with error feedback, as \
         the edge does: what a device's update did not carry is added to its next one. topk8 sends the largest 1/8 of \
         each tensor's entries (int8, bitmap of positions). Target: >= 10x fewer bytes than raw f32 at <= 0.5 point \
         accuracy cost.\n\n\
         | encoding | raw bytes | zstd bytes | raw f32 / this (raw) | raw f32 / this (zstd) | accuracy | vs f32 | max abs diff of the final global's parameters vs f32 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    ));
    for r in &enc {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.4} | {:+.2} pt | {:.2e} |\n",
            r.encoding,
            r.raw,
            r.zstd,
            f32_raw / r.raw,
            f32_raw / r.zstd,
            r.accuracy,
            (r.accuracy - f32_acc) * 100.0,
            r.params
                .iter()
                .zip(&enc[0].params)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
        ));
    }
    for r in &enc[2..] {
        let ratio = f32_raw / r.zstd;
        let cost = (f32_acc - r.accuracy) * 100.0;
        md.push_str(&format!(
            "\n{} + zstd: {ratio:.2}x fewer bytes than raw f32, accuracy {:+.2} points: {}.",
            r.encoding,
            (r.accuracy - f32_acc) * 100.0,
            if ratio >= 10.0 && cost <= 0.5 {
                "target met"
            } else {
                "**target NOT met**"
            }
        ));
    }
    md.push_str("\n\n");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // A real int8 update of the digits head.
    let (tensors, samples, loss) = local_update(
        &d.base,
        &shards(&d, 10, dai_models::shard::Scheme::Iid)[0],
        1,
    );
    let payload = Update {
        meta: UpdateMeta {
            device: "x".into(),
            model: "digits".into(),
            base_version: "1.0.0".into(),
            update_id: "x".into(),
            sample_count: samples,
            loss,
            encoding: Encoding::Int8,
        },
        tensors,
    };
    let wire_len = payload.encode().expect("encode").len();

    // (b)
    eprintln!("(b) ingest, {m} devices x {per} updates");
    let embedded_port = free_port();
    start_embedded_broker(format!("127.0.0.1:{embedded_port}").parse().expect("addr"))
        .expect("broker");
    let mut emb = Vec::new();
    let mut emb_signed = Vec::new();
    let mut mos = Vec::new();
    let mut mos_rss = f64::NAN;
    let mosq_port = free_port();
    let mut broker = mosquitto(mosq_port);
    for _ in 0..3 {
        emb.push(rt.block_on(ingest(embedded_port, &d.base, m, per, &payload, false)));
        emb_signed.push(rt.block_on(ingest(embedded_port, &d.base, m, per, &payload, true)));
        if broker.is_some() {
            mos.push(rt.block_on(ingest(mosq_port, &d.base, m, per, &payload, false)));
        }
    }
    if let Some(b) = broker.as_mut() {
        mos_rss = peak_rss_mb(&b.id().to_string());
        let _ = b.kill();
        let _ = b.wait();
    }
    let bench_rss = peak_rss_mb("self");
    md.push_str(&format!(
        "### (b) Aggregator ingest rate\n\n{m} simulated devices (one MQTT connection each) publish {per} real int8 \
         updates each ({wire_len} bytes on the wire) as fast as QoS 1 allows; the rate is acked updates per second \
         from the first publish to the last ack. Every update is decoded, validated, recorded (one SQLite \
         transaction) and acked; FedBuff aggregates every 10. Median of 3 runs.\n\n\
         | broker | updates/s (median) | runs |\n|---|---:|---|\n\
         | embedded (rumqttd, in the aggregator process) | {:.0} | {} |\n\
         | embedded, every update signed and its signature verified | {:.0} | {} |\n",
        median(emb.clone()),
        emb.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        median(emb_signed.clone()),
        emb_signed.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
    ));
    if mos.is_empty() {
        md.push_str("| Mosquitto | not run: no mosquitto binary on this machine | |\n");
    } else {
        md.push_str(&format!(
            "| Mosquitto (separate process) | {:.0} | {} |\n\nembedded / Mosquitto: {:.2}. Mosquitto peak RSS {mos_rss:.1} MiB.\n",
            median(mos.clone()),
            mos.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
            median(emb.clone()) / median(mos.clone())
        ));
    }
    md.push_str(&format!(
        "\nSignature checks: signed / unsigned ingest {:.2} (each update's Ed25519 signature over fleet, topic \
         and payload is verified against the enrolled key before it is decoded).\n",
        median(emb_signed.clone()) / median(emb.clone())
    ));
    md.push_str(&format!(
        "Bench process peak RSS after (a) and (b): {bench_rss:.1} MiB (aggregator, embedded broker and all simulated devices in one process).\n\n"
    ));

    // (c)
    eprintln!("(c) 100-client rounds");
    let clients = shards(&d, 100, dai_models::shard::Scheme::Iid);
    // The same embedded broker (rumqttd runs once per process).
    let (ours, our_global) = rt.block_on(our_rounds(embedded_port, &d.base, &clients, fl_rounds));
    let all_train = dataset(d.train.iter().map(|(e, l)| (e, *l)));
    let our_acc = dai_train::accuracy(&our_global, &all_train).expect("accuracy");
    let ours_rss = peak_rss_mb("self");
    let input = std::env::temp_dir().join(format!("dai-flower-{}.safetensors", std::process::id()));
    flower_file(&input, &d.base, &clients);
    let flower = std::process::Command::new("python3")
        .arg(repo().join("bench/flower_round.py"))
        .arg("--data")
        .arg(&input)
        .args(["--rounds", &fl_rounds.to_string(), "--json"])
        .output();
    let _ = std::fs::remove_file(&input);
    let ours_steady = median(ours[1..].to_vec());
    md.push_str(&format!(
        "### (c) One 100-client FedAvg round: ours vs Flower\n\n100 clients, IID shards of the digits training rows \
         (~14 rows each), the same initial head, {EPOCHS} local epochs of Adam({LR}) in batches of {BATCH}. \
         Ours: local training on 2 threads, int8 + zstd updates over MQTT (embedded broker, one connection per \
         client) to the aggregator service, FedAvg, a signed global back to a subscriber. Flower: \
         `bench/flower_round.py` (flwr simulation, PyTorch clients on 2 Ray workers, Flower's FedAvg). A round is \
         timed from the start of client training to the aggregated model; round 1 includes warm-up on both sides, \
         so the ratio uses the median of rounds 2..{fl_rounds}. Target: ours <= 0.2 of Flower's.\n\n"
    ));
    match flower {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .expect("flower JSON line");
            let rounds: Vec<f64> = v["round_wall_s"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            let fl_steady = median(rounds.get(1..).unwrap_or(&[]).to_vec());
            md.push_str(&format!(
                "| | round 1 (s) | later rounds, median (s) | whole run incl. start-up (s) | peak memory (MiB) | final accuracy (train rows) |\n\
                 |---|---:|---:|---:|---:|---:|\n\
                 | ours | {:.3} | {ours_steady:.3} | n/a (in-process) | {ours_rss:.0} (RSS of the bench process) | {our_acc:.4} |\n\
                 | Flower {} | {:.3} | {fl_steady:.3} | {:.1} | {} (PSS of the process tree) | {} |\n\n\
                 **ours / Flower (later rounds): {:.3}** ({}).\n\n",
                ours[0],
                v["flwr_version"].as_str().unwrap_or("?"),
                rounds.first().copied().unwrap_or(f64::NAN),
                v["total_wall_s"].as_f64().unwrap_or(f64::NAN),
                v["peak_pss_tree_mb"],
                v["accuracy"],
                ours_steady / fl_steady,
                if ours_steady / fl_steady <= 0.2 { "target met" } else { "**target NOT met**" }
            ));
        }
        Ok(out) => md.push_str(&format!(
            "Flower did not run (`pip install 'flwr[simulation]==1.42.0' psutil` first): {}\n\nours: round 1 {:.3} s, later rounds {ours_steady:.3} s.\n\n",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""),
            ours[0]
        )),
        Err(e) => md.push_str(&format!("Flower did not run: {e}\n\n")),
    }
    println!("{md}");
    common::write_section("federated", &md);
}
