//! Where the edge daemon's memory goes (`cargo bench --bench footprint`),
//! its table written to docs/benchmarks.md: `dai edge` (the daemon's code,
//! `dai_edge::run_until_signal`) started fresh per row, warmed with
//! requests, then its `/proc/PID/smaps` summed by kind: the binary's code
//! and read-only data (file pages: clean, shared with the page cache,
//! reclaimable), the libraries, and anonymous memory (heap, model plans
//! and buffers, thread stacks: what the daemon itself costs). Rows: a tiny
//! model (digits), one CNN (pp-ocr-cls) with and without federated sync
//! (mutual TLS to an aggregator on loopback), and two knobs on the CNN
//! row: one inference worker, and glibc's arenas capped at one.

mod common;
use common::repo;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// (name, kB) sums of one process's resident memory by kind.
struct Smaps {
    code: u64,
    rodata: u64,
    libs: u64,
    anon: u64,
    largest_anon: u64,
    threads: usize,
    rss: u64,
}

fn smaps(pid: u32) -> Smaps {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let exe = exe.to_string_lossy().into_owned();
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut s = Smaps {
        code: 0,
        rodata: 0,
        libs: 0,
        anon: 0,
        largest_anon: 0,
        threads: std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()),
        rss: 0,
    };
    let (mut perms, mut name) = (String::new(), String::new());
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            perms = parts.next().unwrap_or_default().to_string();
            name = parts.nth(3).unwrap_or_default().to_string();
        } else if first == "Rss:" {
            let kb: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            s.rss += kb;
            if name == exe {
                if perms.contains('x') {
                    s.code += kb;
                } else {
                    s.rodata += kb;
                }
            } else if name.starts_with('/') {
                s.libs += kb;
            } else {
                s.anon += kb;
                s.largest_anon = s.largest_anon.max(kb);
            }
        }
    }
    s
}

struct Row {
    label: &'static str,
    yaml: String,
    env: Vec<(&'static str, &'static str)>,
    model: &'static str,
}

fn port() -> u16 {
    dai_testkit::free_port()
}

/// Start `row`'s daemon, wait for readiness, send 20 requests, measure.
fn measure(row: &Row, dir: &std::path::Path) -> Smaps {
    let p = port();
    let data = dir.join(format!("data-{p}"));
    let cfg = format!(
        "daemon:\n  listen_addr: 127.0.0.1:{p}\n  data_dir: {}\n  models_dir: {}\n  models: [{}]\n  fetch_missing_models: false\n{}",
        data.display(),
        repo().join("models/zoo").display(),
        row.model,
        row.yaml
    );
    let path = dir.join(format!("cfg-{p}.yaml"));
    std::fs::write(&path, cfg).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dai"));
    cmd.args(["edge", "--config"])
        .arg(&path)
        .env("DAI_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &row.env {
        cmd.env(k, v);
    }
    let mut child: Child = cmd.spawn().expect("dai edge");
    let url = format!("http://127.0.0.1:{p}");
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{url}/readyz"))
        .send()
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "{}: daemon not ready", row.label);
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = match row.model {
        "digits" => {
            serde_json::json!({"inputs": {"pixels": {"shape": [1, 64], "data": vec![4.0f32; 64]}}})
        }
        _ => {
            serde_json::json!({"inputs": {"x": {"shape": [1, 3, 48, 192], "data": vec![0.5f32; 3 * 48 * 192]}}})
        }
    };
    for _ in 0..20 {
        let r = http
            .post(format!("{url}/v1/models/{}/infer", row.model))
            .json(&body)
            .send()
            .expect("infer");
        assert!(
            r.status().is_success(),
            "{}: infer {}",
            row.label,
            r.status()
        );
    }
    // Settle: the sync session connects, the heartbeat goes out.
    std::thread::sleep(Duration::from_secs(3));
    let s = smaps(child.id());
    let _ = child.kill();
    let _ = child.wait();
    s
}

fn main() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    // Sync on: a secure aggregator on loopback and an enrolled device.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let fleet = dai_testkit::make_fleet(dir, "fp", &["edge-1"]);
    let broker = port();
    let head = std::fs::read(repo().join("models/zoo/digits/head.safetensors")).expect("head");
    let (_service, _stop) = rt.block_on(dai_testkit::start_secure(
        broker,
        dir,
        &fleet,
        [("digits", head)],
        |_| {},
    ));
    let sync = format!(
        "cloud:\n  enabled: true\n  broker: 127.0.0.1:{broker}\n  fleet: fp\n  bundle_dir: {}\n",
        dir.join("edge-1").display()
    );
    let quiet = "training:\n  enabled: false\n".to_string();
    let rows = [
        Row {
            label: "digits (64-32-10 MLP), sync off",
            yaml: quiet.clone(),
            env: vec![],
            model: "digits",
        },
        Row {
            label: "pp-ocr-cls (CNN), sync off",
            yaml: quiet.clone(),
            env: vec![],
            model: "pp-ocr-cls",
        },
        Row {
            label: "pp-ocr-cls, sync on (mutual TLS, MQTT)",
            yaml: format!("{quiet}{sync}"),
            env: vec![],
            model: "pp-ocr-cls",
        },
        Row {
            label: "pp-ocr-cls, sync on, one inference worker",
            yaml: format!("{quiet}{sync}max_parallel_agents: 1\n"),
            env: vec![],
            model: "pp-ocr-cls",
        },
        Row {
            label: "pp-ocr-cls, sync on, MALLOC_ARENA_MAX=1",
            yaml: format!("{quiet}{sync}"),
            env: vec![("MALLOC_ARENA_MAX", "1")],
            model: "pp-ocr-cls",
        },
    ];
    let mib = |kb: u64| kb as f64 / 1024.0;
    let mut md = String::from(
        "`dai edge` after 20 inferences (the median of 3 runs by RSS), resident memory from `/proc/PID/smaps` by kind (MiB). Code and read-only data are pages of the `dai` binary (file-backed, clean: shared with the page cache and reclaimable under pressure); anonymous is the daemon's own (heap, model plans and buffers, stacks).\n\n\
         | configuration | RSS | binary code | binary read-only data | libraries | anonymous | of which the largest region | threads |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        // The median run by RSS of three (a run differs by about 1 MiB).
        let mut runs: Vec<Smaps> = (0..3).map(|_| measure(row, dir)).collect();
        runs.sort_by_key(|s| s.rss);
        let s = runs.swap_remove(1);
        let line = format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            row.label,
            mib(s.rss),
            mib(s.code),
            mib(s.rodata),
            mib(s.libs),
            mib(s.anon),
            mib(s.largest_anon),
            s.threads
        );
        eprint!("{line}");
        md.push_str(&line);
    }
    md.push_str("\nCommand: `cargo bench --bench footprint`.\n");
    if std::env::var("DAI_FOOTPRINT_NO_WRITE").is_err() {
        common::write_section("footprint", &md);
    } else {
        print!("{md}");
    }
}
