//! Tiers through the real `dai-cloud` binary: a site aggregator
//! (`--role site`) with its own broker folds its devices' updates into a
//! signed partial aggregate, keeps it in its SQLite outbox while the root
//! is away (across a SIGKILL), and sends it when the root comes; the root
//! (`--tier site-1`) counts the devices once each, and the site forwards
//! the root's signed global to its devices byte for byte.

use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use dai_testkit::{
    MqttProbe, aggregator_public, bundle_key, bundle_tls, free_port, head_bytes, make_fleet,
    wait_for_port, zero_head,
};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const FLEET: &str = "lab";

struct Proc {
    child: Child,
    http: u16,
}

impl Proc {
    fn start(args: &[String], broker: u16) -> Proc {
        let http = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
            .arg("run")
            .args(args)
            .args(["--http", &format!("127.0.0.1:{http}")])
            .env(
                "DAI_LOG",
                std::env::var("DAI_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("dai-cloud run");
        wait_for_port(http, Duration::from_secs(30), "dai-cloud http");
        wait_for_port(broker, Duration::from_secs(30), "dai-cloud broker");
        Proc { child, http }
    }

    fn kill9(mut self) {
        let ok = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status within 30 s.
    fn term(mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.http))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Poll `name` until it equals `want` (bounded).
    async fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.metric(name).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {got:?}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn common(fleet_dir: &Path, head: &Path, state: &Path, listen: u16) -> Vec<String> {
    [
        "--fleet",
        FLEET,
        "--fleet-dir",
        &fleet_dir.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--state",
        &state.display().to_string(),
        "--model",
        &format!("m={}", head.display()),
        "--min-updates",
        "3",
        // Exact arithmetic: plain mean, one device one vote.
        "--robust",
        "mean",
        "--clip-norm",
        "off",
        "--round-timeout-sec",
        "600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Send `device`'s update (every value `v`) to the site until its ack
/// comes, as an edge resends an unacked update; returns the ack.
async fn deliver(site: u16, bundles: &Path, device: &str, id: &str, v: f32) -> Ack {
    let dir = bundles.join(device);
    let ack_topic = format!("dai/v1/{FLEET}/dev/{device}/ack");
    let mut probe = MqttProbe::connect_tls(site, device, &[&ack_topic], bundle_tls(&dir)).await;
    let topic = format!("dai/v1/{FLEET}/dev/{device}/update");
    let body = dai_testkit::update(id)
        .device(device)
        .model("m")
        .sizes(&[3, 2])
        .samples(10)
        .value(v)
        .encode();
    let wire = signed::seal(Kind::Update, &bundle_key(&dir), FLEET, &topic, &body);
    let agg = aggregator_public(&bundles.join("fleet"));
    for _ in 0..20 {
        probe.publish(&topic, wire.clone()).await;
        if let Some(p) = probe.wait_for(&ack_topic, Duration::from_secs(2)).await {
            let ack =
                signed::open(Kind::Ack, &agg, FLEET, &p.topic, &p.payload).expect("a signed ack");
            return Ack::from_bytes(ack).expect("ack");
        }
    }
    panic!("{device}: no ack from the site");
}

/// The retained global of `m` on the broker at `port`, as `device` sees it.
async fn global(port: u16, bundles: &Path, device: &str, version: u64) -> Vec<u8> {
    let filter = format!("dai/v1/{FLEET}/model/m/global");
    let agg = aggregator_public(&bundles.join("fleet"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut probe =
            MqttProbe::connect_tls(port, device, &[&filter], bundle_tls(&bundles.join(device)))
                .await;
        if let Some(p) = probe.wait_for(&filter, Duration::from_secs(3)).await {
            let g = dai_protocol::global::verify(&p.payload, &agg, FLEET, "m").expect("signed");
            if g.version == version {
                return p.payload.to_vec();
            }
        }
    }
    panic!("no global {version} on port {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_folds_its_devices_into_one_partial_the_root_counts_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet = make_fleet(tmp.path(), FLEET, &["dev-a", "dev-b", "dev-c", "site-1"]);
    let head = tmp.path().join("m.safetensors");
    std::fs::write(&head, head_bytes(&zero_head(&[3, 2]))).expect("head");
    let (root_port, site_port) = (free_port(), free_port());
    let mut site_args = common(&fleet, &head, &tmp.path().join("site.sqlite"), site_port);
    site_args.extend(
        [
            "--role",
            "site",
            "--upstream",
            &format!("127.0.0.1:{root_port}"),
            "--identity",
            &tmp.path().join("site-1").display().to_string(),
        ]
        .map(String::from),
    );
    // The root is not there yet: the site takes its devices' updates
    // anyway, and folds the round into its outbox.
    let site = Proc::start(&site_args, site_port);
    for (device, id, v) in [
        ("dev-a", "ua", 1.0),
        ("dev-b", "ub", 2.0),
        ("dev-c", "uc", 6.0),
    ] {
        let ack = deliver(site_port, tmp.path(), device, id, v).await;
        assert_eq!(
            (ack.update_id.as_str(), ack.status),
            (id, AckStatus::Accepted)
        );
    }
    site.wait_metric("dai_cloud_tier_outbox", 1.0, Duration::from_secs(30))
        .await;
    // A power cut on the site: the partial is on disk.
    site.kill9();
    let site = Proc::start(&site_args, site_port);
    // A redelivered update is still a duplicate there (its id was kept).
    let again = deliver(site_port, tmp.path(), "dev-a", "ua", 1.0).await;
    assert_eq!(
        again.reason.as_deref(),
        Some("duplicate delivery; counted once")
    );

    let mut root_args = common(&fleet, &head, &tmp.path().join("root.sqlite"), root_port);
    root_args.extend(["--tier", "site-1"].map(String::from));
    let root = Proc::start(&root_args, root_port);
    // Three votes from one partial close the root's round of 3.
    root.wait_metric(
        "dai_cloud_global_version{model=\"m\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    site.wait_metric("dai_cloud_tier_outbox", 0.0, Duration::from_secs(30))
        .await;
    // The site's devices get the root's global, forwarded byte for byte.
    let from_root = global(root_port, tmp.path(), "dev-a", 1).await;
    let from_site = global(site_port, tmp.path(), "dev-b", 1).await;
    assert_eq!(
        from_root, from_site,
        "the site forwards the root's global verbatim"
    );
    let agg = aggregator_public(&fleet);
    let g = dai_protocol::global::verify(&from_site, &agg, FLEET, "m").expect("signed");
    let (h, _) = dai_head::Head::from_bytes(&g.head_file).expect("head");
    // (1 + 2 + 6) / 3: each device one vote, counted once.
    for w in h.params.weights.iter().flatten() {
        assert!((w - 3.0).abs() < 1e-5, "{w}");
    }
    // Two updates of the next round (of 3), then the site is stopped (a
    // scale-down, a maintenance): it sends the open round up before it
    // exits, so nothing it acked stays behind.
    for (device, id) in [("dev-a", "ua2"), ("dev-b", "ub2")] {
        let ack = deliver(site_port, tmp.path(), device, id, 1.0).await;
        assert_eq!(
            (ack.update_id.as_str(), ack.status),
            (id, AckStatus::Accepted)
        );
    }
    assert!(site.term().success(), "the site stops cleanly");
    root.wait_metric(
        "dai_cloud_pending_updates{model=\"m\"}",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    drop(root);
    let out = Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
        .args(["models", "list", "--json", "--state"])
        .arg(tmp.path().join("root.sqlite"))
        .output()
        .expect("models list");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[1]["metrics"]["updates"], 3, "{v}");
    assert_eq!(v[1]["metrics"]["partials"], 1, "{v}");
}

/// `/api/status` of `p`.
async fn status(p: &Proc) -> serde_json::Value {
    match reqwest::get(format!("http://127.0.0.1:{}/api/status", p.http)).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// Wait until `p` has `n` subscriptions acknowledged (bounded).
async fn subscribed(p: &Proc, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(p).await["subscriptions"].as_u64().unwrap_or(0) < n {
        assert!(
            Instant::now() < deadline,
            "never subscribed: {}",
            status(p).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_replicas_share_the_updates_through_mosquitto() {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED intake_replicas_share_the_updates_through_mosquitto: needs the mosquitto binary; set DAI_MOSQUITTO_PORT (.ci/run installs it)"
        );
        return;
    }
    let devices = ["d1", "d2", "d3", "d4", "d5", "d6"];
    let tmp = tempfile::tempdir().expect("tmp");
    let mut names: Vec<&str> = devices.to_vec();
    names.extend(["intake-1", "intake-2"]);
    let fleet = make_fleet(tmp.path(), FLEET, &names);
    let mosquitto = dai_testkit::SecureMosquitto::start(&fleet, FLEET).expect("mosquitto");
    let broker = format!("127.0.0.1:{}", mosquitto.port);
    let head = tmp.path().join("m.safetensors");
    std::fs::write(&head, head_bytes(&zero_head(&[3, 2]))).expect("head");
    let args = |state: &str, extra: &[&str]| {
        let mut a = common(&fleet, &head, &tmp.path().join(state), free_port());
        a.extend(["--broker", &broker, "--share-group", "agg"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // The root takes its share too, and six votes close its round.
    let mut root_args = args("root.sqlite", &["--tier", "intake-1", "--tier", "intake-2"]);
    let at = root_args
        .iter()
        .position(|a| a == "--min-updates")
        .expect("flag");
    root_args[at + 1] = "6".into();
    let root = Proc::start(&root_args, mosquitto.port);
    let mut replicas = Vec::new();
    for name in ["intake-1", "intake-2"] {
        let mut a = args(
            &format!("{name}.sqlite"),
            &["--role", "intake", "--upstream", &broker],
        );
        a.extend([
            "--identity".to_string(),
            tmp.path().join(name).display().to_string(),
        ]);
        // Each update is its own round on a replica.
        let at = a.iter().position(|x| x == "--min-updates").expect("flag");
        a[at + 1] = "1".into();
        replicas.push(Proc::start(&a, mosquitto.port));
    }
    subscribed(&root, dai_cloud::intake::SUBSCRIPTIONS).await;
    for r in &replicas {
        subscribed(r, 1).await;
    }
    for (n, device) in devices.iter().enumerate() {
        let ack = deliver(
            mosquitto.port,
            tmp.path(),
            device,
            &format!("u{n}"),
            n as f32,
        )
        .await;
        assert_eq!(ack.status, AckStatus::Accepted, "{device}: {ack:?}");
    }
    root.wait_metric(
        "dai_cloud_global_version{model=\"m\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    for r in &replicas {
        r.wait_metric("dai_cloud_tier_outbox", 0.0, Duration::from_secs(30))
            .await;
    }
    let g = global(mosquitto.port, tmp.path(), "d1", 1).await;
    let agg = aggregator_public(&fleet);
    let g = dai_protocol::global::verify(&g, &agg, FLEET, "m").expect("signed by the root");
    let (h, _) = dai_head::Head::from_bytes(&g.head_file).expect("head");
    // (0 + 1 + ... + 5) / 6, each device once, whoever took its update.
    for w in h.params.weights.iter().flatten() {
        assert!((w - 2.5).abs() < 1e-5, "{w}");
    }
    drop(replicas);
    drop(root);
    let out = Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
        .args(["models", "list", "--json", "--state"])
        .arg(tmp.path().join("root.sqlite"))
        .output()
        .expect("models list");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[1]["metrics"]["updates"], 6, "{v}");
    // Mosquitto hands a shared subscription's messages out in turn: the
    // replicas took some of the six (the root alone would make no
    // partial).
    assert!(
        v[1]["metrics"]["partials"].as_u64().unwrap_or(0) >= 1,
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_behind_a_bridge_keeps_working_through_an_uplink_cut() {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED a_site_behind_a_bridge_keeps_working_through_an_uplink_cut: needs the mosquitto binary; set DAI_MOSQUITTO_PORT (.ci/run installs it)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet = make_fleet(tmp.path(), FLEET, &["dev-a", "dev-b", "dev-c", "site-1"]);
    let mut cloud = dai_testkit::SecureMosquitto::start(&fleet, FLEET).expect("mosquitto");
    // The shipped bridge, rendered for this site, its files where the
    // test keeps the site's bundle.
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mosquitto/render-bridge.sh");
    let out = Command::new("sh")
        .arg(&script)
        .args([FLEET, "site-1", &format!("127.0.0.1:{}", cloud.port)])
        .output()
        .expect("render-bridge.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bridge = String::from_utf8(out.stdout).expect("utf-8").replace(
        "/etc/mosquitto/dai/site/",
        &format!("{}/", tmp.path().join("site-1").display()),
    );
    let site_broker =
        dai_testkit::SecureMosquitto::start_with(&fleet, FLEET, &bridge).expect("site mosquitto");
    let head = tmp.path().join("m.safetensors");
    std::fs::write(&head, head_bytes(&zero_head(&[3, 2]))).expect("head");
    let mut root_args = common(&fleet, &head, &tmp.path().join("root.sqlite"), free_port());
    root_args.extend(
        [
            "--broker",
            &format!("127.0.0.1:{}", cloud.port),
            "--tier",
            "site-1",
        ]
        .map(String::from),
    );
    let root = Proc::start(&root_args, cloud.port);
    let local = format!("127.0.0.1:{}", site_broker.port);
    let mut site_args = common(&fleet, &head, &tmp.path().join("site.sqlite"), free_port());
    site_args.extend(
        [
            "--role",
            "site",
            "--broker",
            &local,
            "--upstream",
            &local,
            "--identity",
            &tmp.path().join("site-1").display().to_string(),
        ]
        .map(String::from),
    );
    let site = Proc::start(&site_args, site_broker.port);
    let round = |ids: [&'static str; 3], v: f32| {
        let (dir, port) = (tmp.path().to_path_buf(), site_broker.port);
        async move {
            for (device, id) in ["dev-a", "dev-b", "dev-c"].into_iter().zip(ids) {
                let ack = deliver(port, &dir, device, id, v).await;
                assert_eq!(
                    (ack.update_id.as_str(), ack.status),
                    (id, AckStatus::Accepted)
                );
            }
        }
    };
    round(["a1", "b1", "c1"], 1.0).await;
    root.wait_metric(
        "dai_cloud_global_version{model=\"m\"}",
        1.0,
        Duration::from_secs(90),
    )
    .await;
    // The site's devices see the root's global through the bridge.
    global(site_broker.port, tmp.path(), "dev-a", 1).await;

    // The uplink is cut: the site keeps taking and acking updates, and
    // folds the round into its outbox.
    cloud.kill();
    round(["a2", "b2", "c2"], 2.0).await;
    site.wait_metric("dai_cloud_tier_outbox", 1.0, Duration::from_secs(30))
        .await;
    // Back: the partial crosses (the bridge's queue, or the site's resend),
    // the root counts it, and its global comes down to the site.
    cloud.restart();
    root.wait_metric(
        "dai_cloud_global_version{model=\"m\"}",
        2.0,
        Duration::from_secs(120),
    )
    .await;
    site.wait_metric("dai_cloud_tier_outbox", 0.0, Duration::from_secs(60))
        .await;
    let g = global(site_broker.port, tmp.path(), "dev-b", 2).await;
    let agg = aggregator_public(&fleet);
    let g = dai_protocol::global::verify(&g, &agg, FLEET, "m").expect("the root's signature");
    let (h, _) = dai_head::Head::from_bytes(&g.head_file).expect("head");
    // v1 = 1.0, then + 2.0: each round's three devices once.
    for w in h.params.weights.iter().flatten() {
        assert!((w - 3.0).abs() < 1e-5, "{w}");
    }
}
