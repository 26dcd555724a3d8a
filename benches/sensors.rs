//! Sensor pipeline benchmark: a `dai edge` process pinned to one core
//! (taskset) samples a simulated MPU-6050 at 1 kHz (windows of 256, hop
//! 128, the imu-anomaly model on every window) plus a BME280 at 10 Hz.
//! Measured from outside the process: the sustained sampling rate (the
//! daemon's own sample counter over the run), the latency from a window's
//! last sample to its prediction (every prediction, from /v1/status), and
//! the process's CPU time and RSS (/proc). Run next to the same daemon
//! without sensors, so the pipeline's own cost shows. Writes its table to
//! docs/benchmarks.md. `cargo bench --bench sensors`; DAI_BENCH_SECONDS
//! (20) per run, 3 runs.

mod common;
use common::{median, repo};

use serde_json::Value;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the ')' split.
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn start(dir: &std::path::Path, sensors: bool) -> (Child, String) {
    let p = port();
    let sensors_yaml = if sensors {
        "sensors:\n\
         - {name: imu0, part: mpu6050, source: simulated, seed: 7, scenario: mixed, rate_hz: 1000,\n\
            window: 256, hop: 128, model: imu-anomaly}\n\
         - {name: env0, part: bme280, source: simulated, rate_hz: 10}\n"
    } else {
        "sensors: []\n"
    };
    let cfg = format!(
        "cpu_limit: 1.0\nmax_parallel_agents: 1\ncaching_enabled: false\nprofiling_enabled: false\n\
         daemon:\n  listen_addr: 127.0.0.1:{p}\n  data_dir: {}\n  models_dir: {}\n  models: [imu-anomaly]\n  \
         fetch_missing_models: false\ntraining:\n  enabled: false\n{sensors_yaml}",
        dir.join(if sensors { "with" } else { "without" }).display(),
        repo().join("models/zoo").display()
    );
    let path = dir.join(format!("cfg-{sensors}.yaml"));
    std::fs::write(&path, cfg).expect("config");
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(env!("CARGO_BIN_EXE_dai"))
        .args(["edge", "--config"])
        .arg(&path)
        .env("DAI_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dai edge under taskset");
    (child, format!("http://127.0.0.1:{p}"))
}

struct Run {
    rate: f64,
    latencies: Vec<f64>,
    cpu: f64,
    rss_mb: f64,
    hwm_mb: f64,
}

fn measure(sensors: bool, seconds: u64, dir: &std::path::Path) -> Run {
    let (mut child, url) = start(dir, sensors);
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{url}/readyz"))
        .send()
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "daemon not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2)); // warm-up
    let samples = |v: &Value| v["sensors"][0]["samples"].as_f64().unwrap_or(0.0);
    let status = || -> Value {
        http.get(format!("{url}/v1/status"))
            .send()
            .and_then(|r| r.json())
            .unwrap_or(Value::Null)
    };
    let pid = child.id();
    let (s0, c0, t0) = (samples(&status()), cpu_seconds(pid), Instant::now());
    let mut latencies: HashMap<String, f64> = HashMap::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(1000));
        let s = status();
        for p in s["sensors"][0]["predictions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(id), Some(ms)) = (p["id"].as_str(), p["latency_ms"].as_f64()) {
                latencies.insert(id.to_string(), ms);
            }
        }
    }
    let s = status();
    let dt = t0.elapsed().as_secs_f64();
    let run = Run {
        rate: (samples(&s) - s0) / dt,
        latencies: latencies.into_values().collect(),
        cpu: (cpu_seconds(pid) - c0) / dt,
        rss_mb: status_kb(pid, "VmRSS:") / 1024.0,
        hwm_mb: status_kb(pid, "VmHWM:") / 1024.0,
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    run
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = std::env::var("DAI_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("tmp");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..3 {
        eprintln!("run {}: with sensors, then without", i + 1);
        with.push(measure(true, seconds, dir.path()));
        without.push(measure(false, seconds, dir.path()));
    }
    let mut lat: Vec<f64> = with.iter().flat_map(|r| r.latencies.clone()).collect();
    let n_lat = lat.len();
    let (p50, p95, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.95), pct(&mut lat, 0.99));
    let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let md = format!(
        "## Sensor pipeline: 1 kHz IMU on one core\n\n\
         Command: `cargo bench --bench sensors` ({seconds} s per run, 3 runs, medians). A `dai edge` process pinned \
         to core 0 with `taskset -c 0` (`cpu_limit: 1.0`, one inference worker) samples a simulated MPU-6050 at \
         1000 Hz (mixed scenario), classifies windows of 256 samples every 128 (about 7.8 windows/s) with the \
         imu-anomaly bundle, and samples a simulated BME280 at 10 Hz. The same daemon without sensors runs \
         next to it, to show the pipeline's own cost. The rate is the daemon's sample counter over the run. \
         Latency runs from a window's last sample to its prediction: features (direct DFT), the runtime, and the \
         head, for every window the run produced ({n_lat} windows). CPU is the process's utime + stime per \
         wall second; RSS is from /proc.\n\n\
         | | sustained rate (Hz) | latency p50 / p95 / p99 (ms) | CPU (cores) | RSS (MiB) | peak RSS (MiB) |\n\
         |---|---:|---:|---:|---:|---:|\n\
         | with the 1 kHz IMU pipeline | {:.1} | {p50:.2} / {p95:.2} / {p99:.2} | {:.3} | {:.1} | {:.1} |\n\
         | same daemon, no sensors | n/a | n/a | {:.3} | {:.1} | {:.1} |\n\n\
         Pipeline cost: {:+.3} cores, {:+.1} MiB RSS. Runs (rate Hz): {}.\n",
        m(&with, |r| r.rate),
        m(&with, |r| r.cpu),
        m(&with, |r| r.rss_mb),
        m(&with, |r| r.hwm_mb),
        m(&without, |r| r.cpu),
        m(&without, |r| r.rss_mb),
        m(&without, |r| r.hwm_mb),
        m(&with, |r| r.cpu) - m(&without, |r| r.cpu),
        m(&with, |r| r.rss_mb) - m(&without, |r| r.rss_mb),
        with.iter()
            .map(|r| format!("{:.1}", r.rate))
            .collect::<Vec<_>>()
            .join(", "),
    );
    println!("{md}");
    common::write_section("sensors", &md);
}
