//! `dai demo`, the README's main job, as a user runs it: the real binary,
//! real child edge processes, the aggregator's status page while it runs
//! (in Chromium when DAI_BROWSER_TESTS=1), then Ctrl-C (SIGTERM).

use crate::support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_fleet_beats_devices_alone_and_serves_its_pages() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut child, rx) = spawn_demo(
        &[
            "--devices",
            "3",
            "--rounds",
            "4",
            "--http",
            "127.0.0.1:0",
            "--stay",
        ],
        dir.path(),
        Stdio::piped(),
    );
    // Read lines until the demo says it is holding the pages open.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !lines.iter().any(|l: &String| l.contains("still serving")) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => lines.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => {
                let err = child
                    .wait_with_output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).to_string());
                panic!("demo ended early:\n{}\n{err:?}", lines.join("\n"));
            }
        }
        assert!(
            Instant::now() < deadline,
            "demo too slow:\n{}",
            lines.join("\n")
        );
    }
    let text = lines.join("\n");
    eprintln!("{text}");
    let url_after = |prefix: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
            .to_string()
    };
    let page = url_after("aggregator status page:");
    let edge0 = url_after("edge-0 status page:");

    // The table: 4 rounds, each with 1..=3 updates and bytes > 0.
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 7 && w[0].parse::<usize>().is_ok() && w[2].starts_with('v'))
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    for r in &rows {
        let updates: usize = r[1].parse().expect("updates");
        assert!((1..=3).contains(&updates), "{r:?}");
        assert!(r[5].parse::<u64>().expect("bytes") > 0, "{r:?}");
    }
    let acc = |prefix: &str| -> f64 {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.parse::<f64>().ok().filter(|v| (0.0..=1.0).contains(v)))
            })
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
    };
    let global = acc("global model");
    let alone = acc("devices trained alone");
    assert!(
        global >= alone + 0.1,
        "the federated global ({global}) must beat devices alone ({alone}) clearly"
    );
    let last_version: i64 = rows[3][2][1..].parse().expect("version");

    // While it runs: the aggregator's page data, metrics and an edge's status.
    let status: Value = reqwest::get(format!("{page}api/status"))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(
        status["models"]["digits"]["current"], last_version,
        "{status}"
    );
    for d in ["edge-0", "edge-1", "edge-2"] {
        assert_eq!(status["devices"][d]["state"], "online", "{status}");
    }
    let metrics = reqwest::get(format!("{page}metrics"))
        .await
        .expect("GET")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains(&format!(
        "dai_cloud_global_version{{model=\"digits\"}} {last_version}"
    )));
    let edge: Value = reqwest::get(format!("{edge0}v1/status"))
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(
        edge["training"]["models"][0]["global_version"], last_version,
        "{edge}"
    );

    let args = [
        "--url",
        &page,
        "--model",
        "digits",
        "--version",
        &last_version.to_string(),
        "--devices",
        "edge-0,edge-1,edge-2",
    ];
    browser_check(
        "demo_fleet_beats_devices_alone_and_serves_its_pages",
        "cloud_page.mjs",
        args.iter().map(|a| a.to_string()).collect(),
        "cloud-page.png",
    )
    .await;

    // Ctrl-C: the demo stops its edges and exits cleanly.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "demo ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let port = edge0
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("edge port");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "edge-0 still listening after the demo stopped"
    );
}

/// `dai demo ARGS --dir DIR`, its stdout lines arriving on a channel.
fn spawn_demo(
    args: &[&str],
    dir: &std::path::Path,
    stderr: Stdio,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dai"))
        .current_dir(repo())
        .arg("demo")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("dai demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Pids of live (not zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        // "pid (comm) S ...": a zombie has exited and only waits to be reaped.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if !matches!(state, Some("Z") | Some("X") | None) {
            pids.push(pid);
        }
    }
    pids
}

/// `kill -TERM`, `kill -HUP` (a closed terminal) and `kill -KILL` of a demo
/// in the middle of its rounds: none of its `dai edge` children outlives it.
#[test]
fn demo_children_never_outlive_it() {
    for signal in ["TERM", "HUP", "KILL"] {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut child, rx) = spawn_demo(
            &["--devices", "2", "--rounds", "200", "--http", "127.0.0.1:0"],
            dir.path(),
            Stdio::null(),
        );
        // The first table row: every child is up and a round has run.
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut lines = Vec::new();
        while !lines
            .iter()
            .any(|l: &String| l.trim_start().starts_with("1 "))
        {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => lines.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => panic!("demo ended early:\n{}", lines.join("\n")),
            }
            assert!(
                Instant::now() < deadline,
                "demo too slow:\n{}",
                lines.join("\n")
            );
        }
        let needle = dir.path().to_string_lossy().to_string();
        let demo_pid = child.id();
        let children: Vec<u32> = processes_mentioning(&needle)
            .into_iter()
            .filter(|&p| p != demo_pid)
            .collect();
        assert_eq!(
            children.len(),
            4,
            "2 federated + 2 alone edges: {children:?}"
        );

        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "demo ignored SIG{signal}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left: Vec<u32> = processes_mentioning(&needle)
                .into_iter()
                .filter(|p| children.contains(p))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after SIG{signal} of the demo, its edges {left:?} still run"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
