//! The shipped Mosquitto setup (`deploy/mosquitto/mosquitto.conf` and the
//! ACL `render.sh` makes of `deploy/mosquitto/acl`) against a real fleet:
//! a CA and its CRL, a broker certificate for 127.0.0.1, the enrolled
//! devices `dev-a` and `dev-b`, the aggregator's identity and a second
//! CA's `dev-a`, all made by `dai-trust`. Each test starts its own Mosquitto on a free loopback
//! port and talks to it with `mosquitto_pub` / `mosquitto_sub`.
//!
//! Every refusal is paired with a delivery through the same subscriber or
//! from the same publisher, ordered so that the refused message would
//! have arrived before it: a subscriber is first proven subscribed by a
//! ping it may read, and a QoS 1 publish has been routed by the broker
//! before `mosquitto_pub` exits, so a message a subscriber sees after the
//! refused one was routed after it, on the same in-order session.
//!
//! Needs `mosquitto`, `mosquitto_pub` and `mosquitto_sub` (Debian
//! `mosquitto`, `mosquitto-clients`); skipped unless DAI_MOSQUITTO_PORT is
//! set (.ci/run sets it).

use crate::support::repo;
use dai_testkit::free_port;
use dai_trust::fs::{
    BROKER_CERT, BROKER_KEY, BUNDLE_CERT, BUNDLE_KEY, FLEET_AGGREGATOR_CERT, FLEET_CA_CERT,
    FLEET_CRL, FleetDir,
};
use dai_trust::{DeviceBundle, DeviceName, FleetCa, FleetName, Validity};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

const FLEET: &str = "acl";
/// The longest any single client process may run.
const CLIENT_LIMIT: Duration = Duration::from_secs(20);

fn enabled(test: &str) -> bool {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED {test}: needs mosquitto, mosquitto_pub and mosquitto_sub; set DAI_MOSQUITTO_PORT (.ci/run does)"
        );
        return false;
    }
    true
}

fn topic(rest: &str) -> String {
    format!("dai/v1/{FLEET}/{rest}")
}

/// A client identity: its certificate and key files, or none (anonymous).
struct Id {
    cert: Option<(PathBuf, PathBuf)>,
}

impl Id {
    fn files(dir: &Path, cert: &str, key: &str) -> Id {
        Id {
            cert: Some((dir.join(cert), dir.join(key))),
        }
    }
}

/// The fleet's files and a Mosquitto running the shipped configuration;
/// the broker is killed on drop (its log is printed if the test failed).
struct Broker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    fleet_dir: FleetDir,
    log: PathBuf,
    dev_a: Id,
    dev_b: Id,
    aggregator: Id,
    broker_as_client: Id,
    other_ca_dev_a: Id,
    anonymous: Id,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("mosquitto log ({}):\n{log}", self.log.display());
        }
    }
}

fn issue_device(ca: &FleetCa, fleet: &dai_trust::fs::Fleet, name: &str, dir: &Path) -> Id {
    let name = DeviceName::parse(name).expect("device name");
    let validity = Validity::days_from(SystemTime::now(), 1);
    let (bundle, _) =
        DeviceBundle::issue(ca, fleet.aggregator.public(), &name, validity).expect("issue device");
    bundle.write_to(dir).expect("write bundle");
    Id::files(dir, BUNDLE_CERT, BUNDLE_KEY)
}

/// The shipped config with this test's paths and port. Each replaced line
/// must be there, so a change to the file cannot leave the test running
/// something else.
fn render_config(shipped: &str, files: &Path, data: &Path, port: u16) -> String {
    let mut conf = shipped.to_string();
    for (from, to) in [
        (
            "\nlistener 8883\n",
            format!("\nlistener {port} 127.0.0.1\n"),
        ),
        ("/etc/mosquitto/dai/", format!("{}/", files.display())),
        ("/var/lib/mosquitto/", format!("{}/", data.display())),
    ] {
        assert!(conf.contains(from), "mosquitto.conf no longer has {from:?}");
        conf = conf.replace(from, &to);
    }
    // Run as root (CI), Mosquitto drops to the user "mosquitto" before it
    // reads the key, which cannot read this test's 0600 files in a 0700
    // temp dir. As another user this line has no effect.
    conf + "user root\n"
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        let now = SystemTime::now();
        let fleet_dir = FleetDir::new(root.join("fleet"));
        let fleet = fleet_dir
            .init(FleetName::parse(FLEET).expect("fleet name"), now, false)
            .expect("fleet init");
        let files = root.join("mosquitto");
        FleetDir::issue_broker(&fleet.ca, &["127.0.0.1".to_string()], now, &files)
            .expect("broker cert");
        std::fs::write(files.join(FLEET_CA_CERT), fleet.ca.cert_pem()).expect("ca.pem");
        std::fs::copy(fleet_dir.path(FLEET_CRL), files.join(FLEET_CRL)).expect("crl.pem");
        let acl = Command::new("sh")
            .arg(repo().join("deploy/mosquitto/render.sh"))
            .arg(FLEET)
            .output()
            .expect("render.sh runs");
        assert!(acl.status.success(), "render.sh: {acl:?}");
        std::fs::write(files.join("acl"), &acl.stdout).expect("acl");

        // The aggregator's certificate as `fleet init` wrote it; its key
        // there is hex, mosquitto_pub wants PKCS#8 PEM.
        let agg_key = root.join("aggregator.key.pem");
        std::fs::write(&agg_key, fleet.aggregator.key().to_pkcs8_pem().as_bytes()).expect("key");
        let enrol = |name: &str| {
            let dir = root.join(name);
            let name = DeviceName::parse(name).expect("device name");
            fleet_dir.enroll(&name, &dir, 1, now).expect("enrol");
            Id::files(&dir, BUNDLE_CERT, BUNDLE_KEY)
        };
        let (dev_a, dev_b) = (enrol("dev-a"), enrol("dev-b"));
        // Another CA of the same fleet name: only its key differs.
        let other = FleetCa::generate(
            FleetName::parse(FLEET).expect("fleet name"),
            Validity::days_from(now, 1),
        )
        .expect("other CA");
        let other_ca_dev_a = issue_device(&other, &fleet, "dev-a", &root.join("other-dev-a"));

        let shipped = std::fs::read_to_string(repo().join("deploy/mosquitto/mosquitto.conf"))
            .expect("deploy/mosquitto/mosquitto.conf");
        let data = root.join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let port = free_port();
        let conf = root.join("mosquitto.conf");
        std::fs::write(&conf, render_config(&shipped, &files, &data, port)).expect("conf");
        let log = root.join("mosquitto.log");
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let bin = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| Path::new(b).exists() || *b == "mosquitto")
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("mosquitto starts (CI installs it)");
        let mut broker = Broker {
            child,
            port,
            dir,
            log,
            aggregator: Id {
                cert: Some((fleet_dir.path(FLEET_AGGREGATOR_CERT), agg_key)),
            },
            broker_as_client: Id::files(&files, BROKER_CERT, BROKER_KEY),
            dev_a,
            dev_b,
            other_ca_dev_a,
            anonymous: Id { cert: None },
            fleet_dir,
        };
        broker.wait_listening();
        broker
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("mosquitto exited ({status}) instead of listening");
            }
            assert!(Instant::now() < deadline, "mosquitto never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self, program: &str, id: &Id, client_id: &str) -> Command {
        let mut c = Command::new(program);
        c.arg("--cafile")
            .arg(self.dir.path().join("mosquitto").join(FLEET_CA_CERT))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-i",
                client_id,
            ]);
        if let Some((cert, key)) = &id.cert {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c
    }

    /// One QoS 1 publish over MQTT 5 (so a refusal comes back in the
    /// PUBACK and `mosquitto_pub` names it on stderr).
    fn publish(&self, id: &Id, client_id: &str, topic: &str, payload: Payload) -> Published {
        let mut c = self.client("mosquitto_pub", id, client_id);
        c.args(["-V", "5", "-q", "1", "-t", topic]);
        match payload {
            Payload::Message(m) => c.args(["-m", m]),
            Payload::Retained(m) => c.args(["-r", "-m", m]),
            Payload::ClearRetained => c.args(["-r", "-n"]),
        };
        let out = bounded(c, CLIENT_LIMIT);
        Published {
            connected: out.status.success(),
            refused: String::from_utf8_lossy(&out.stderr).contains("Not authorized"),
            output: format!("{out:?}"),
        }
    }

    /// A publish the broker must accept and route.
    fn publish_ok(&self, id: &Id, client_id: &str, topic: &str, payload: Payload) {
        let p = self.publish(id, client_id, topic, payload);
        assert!(
            p.connected && !p.refused,
            "{client_id} on {topic}: {}",
            p.output
        );
    }

    /// A publish the broker must take (the client is connected) and drop
    /// for its ACL.
    fn publish_refused(&self, id: &Id, client_id: &str, topic: &str, payload: Payload) {
        let p = self.publish(id, client_id, topic, payload);
        assert!(
            p.connected && p.refused,
            "{client_id} on {topic} should be refused by the ACL: {}",
            p.output
        );
    }

    fn subscribe(&self, id: &Id, client_id: &str, filters: &[&str]) -> Sub {
        self.subscribe_with(id, client_id, &[], filters)
    }

    /// `mosquitto_sub -v` with `extra` arguments, QoS 1, bounded by `-W`.
    fn subscribe_with(&self, id: &Id, client_id: &str, extra: &[&str], filters: &[&str]) -> Sub {
        let mut c = self.client("mosquitto_sub", id, client_id);
        c.args(["-v", "-q", "1", "-W", &CLIENT_LIMIT.as_secs().to_string()]);
        c.args(extra);
        for f in filters {
            c.args(["-t", f]);
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs (CI installs mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sub {
            name: client_id.to_string(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Pings `sub` through `ping` (a publish it may receive, on `topic`)
    /// until one arrives: from then on it is connected and subscribed.
    fn ready(&self, sub: &mut Sub, topic: &str, ping: impl Fn(&str)) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0.. {
            let payload = format!("ping-{i}");
            ping(&payload);
            if sub.wait_quiet(&format!("{topic} {payload}"), Duration::from_millis(500)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never received a ping on {topic}; saw {:?}",
                sub.name,
                sub.seen
            );
        }
    }

    /// Makes `sub` ready on its own ack topic `dev/{device}/ack`, pinged
    /// by the aggregator.
    fn ready_on_ack(&self, sub: &mut Sub, device: &str) {
        let t = topic(&format!("dev/{device}/ack"));
        self.ready(sub, &t, |p| {
            self.publish_ok(&self.aggregator, "dai-cloud-ping", &t, Payload::Message(p))
        });
    }
}

#[derive(Clone, Copy)]
enum Payload<'a> {
    Message(&'a str),
    Retained(&'a str),
    ClearRetained,
}

struct Published {
    connected: bool,
    refused: bool,
    output: String,
}

/// A running `mosquitto_sub -v`: its lines ("topic payload"), killed on drop.
struct Sub {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sub {
    /// Waits for `line`; false after `within`. Every line read is kept.
    fn wait_quiet(&mut self, line: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        if self.seen.iter().any(|l| l == line) {
            return true;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l == line;
                    self.seen.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits for `line` (panics after 10 s with what arrived and the
    /// client's stderr if it exited).
    fn expect(&mut self, line: &str) {
        if !self.wait_quiet(line, Duration::from_secs(10)) {
            let mut err = String::new();
            if let Ok(Some(_)) = self.child.try_wait()
                && let Some(mut e) = self.child.stderr.take()
            {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "{} never received {line:?}; saw {:?}; stderr {err:?}",
                self.name, self.seen
            );
        }
    }

    /// No line received so far is on `topic` (after a later message proved
    /// the earlier one would have arrived).
    fn assert_none_on(&self, topic: &str) {
        let on = format!("{topic} ");
        assert!(
            !self.seen.iter().any(|l| l.starts_with(&on)),
            "{} received on {topic}: {:?}",
            self.name,
            self.seen
        );
    }
}

/// Runs `c` to completion within `limit` (killed and failed after it).
fn bounded(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub runs (CI installs mosquitto-clients)");
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!("{c:?} ran past {limit:?}: {out:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A client without a certificate, with one from another CA, and with the
/// broker's own (serverAuth) certificate cannot connect at all; dev-a with
/// its fleet certificate can, over TLS 1.3 and over TLS 1.2 (Ed25519 both).
#[test]
fn only_fleet_client_certificates_connect() {
    if !enabled("only_fleet_client_certificates_connect") {
        return;
    }
    let b = Broker::start();
    let own = topic("dev/dev-a/status");
    b.publish_ok(&b.dev_a, "dev-a", &own, Payload::Message("online"));
    // mosquitto_pub's --tls-version is a minimum (it negotiates 1.3), so
    // TLS 1.2 is pinned with openssl s_client.
    let mut s_client = Command::new("openssl");
    s_client
        .args(["s_client", "-tls1_2", "-brief", "-verify_return_error"])
        .args(["-verify_ip", "127.0.0.1", "-connect"])
        .arg(format!("127.0.0.1:{}", b.port))
        .arg("-CAfile")
        .arg(b.dir.path().join("mosquitto").join(FLEET_CA_CERT));
    if let Some((cert, key)) = &b.dev_a.cert {
        s_client.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let out = bounded(s_client, CLIENT_LIMIT);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && text.contains("Protocol version: TLSv1.2")
            && text.contains("Signature type: ed25519")
            && text.contains("Verification: OK"),
        "TLS 1.2 with the Ed25519 broker certificate: {out:?}"
    );

    for (who, id) in [
        ("no client certificate", &b.anonymous),
        ("another CA's dev-a", &b.other_ca_dev_a),
        ("the broker's server certificate", &b.broker_as_client),
    ] {
        let p = b.publish(id, "intruder", &own, Payload::Message("x"));
        assert!(!p.connected, "{who} connected: {}", p.output);
    }
}

/// dev-a, subscribed to dev-b's update topic, to all updates and to `#`
/// (also under the username dai-cloud, which the certificate overrides),
/// receives none of dev-b's updates; the aggregator's subscriber receives
/// it, and dev-a's subscribers do receive their own ack sent after it.
#[test]
fn a_device_cannot_read_another_devices_updates() {
    if !enabled("a_device_cannot_read_another_devices_updates") {
        return;
    }
    let b = Broker::start();
    let update_b = topic("dev/dev-b/update");
    let all_updates = topic("dev/+/update");
    let ack_a = topic("dev/dev-a/ack");
    let mut agg = b.subscribe(&b.aggregator, "dai-cloud", &[&all_updates]);
    let mut spy = b.subscribe(&b.dev_a, "dev-a", &[&update_b, &all_updates, "#", &ack_a]);
    let mut impostor = b.subscribe_with(
        &b.dev_a,
        "dev-a-as-cloud",
        &["-u", "dai-cloud"],
        &[&all_updates, &ack_a],
    );
    b.ready_on_ack(&mut spy, "dev-a");
    b.ready_on_ack(&mut impostor, "dev-a");
    b.ready(&mut agg, &update_b, |p| {
        b.publish_ok(&b.dev_b, "dev-b", &update_b, Payload::Message(p))
    });

    b.publish_ok(&b.dev_b, "dev-b", &update_b, Payload::Message("secret"));
    agg.expect(&format!("{update_b} secret"));
    b.publish_ok(
        &b.aggregator,
        "dai-cloud-ack",
        &ack_a,
        Payload::Message("done"),
    );
    for s in [&mut spy, &mut impostor] {
        s.expect(&format!("{ack_a} done"));
        s.assert_none_on(&update_b);
    }
}

/// dev-a's publishes on dev-b's update, status, event and want topics are
/// refused and never reach the aggregator; its publishes on its own are
/// delivered, and so is dev-b's own message sent after the forgeries.
#[test]
fn a_device_cannot_publish_as_another_device() {
    if !enabled("a_device_cannot_publish_as_another_device") {
        return;
    }
    let b = Broker::start();
    let kinds = ["update", "status", "event", "want"];
    let filters: Vec<String> = kinds.iter().map(|k| topic(&format!("dev/+/{k}"))).collect();
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    let mut agg = b.subscribe(&b.aggregator, "dai-cloud", &filters);
    let update_b = topic("dev/dev-b/update");
    b.ready(&mut agg, &update_b, |p| {
        b.publish_ok(&b.dev_b, "dev-b", &update_b, Payload::Message(p))
    });
    for k in kinds {
        let theirs = topic(&format!("dev/dev-b/{k}"));
        let own = topic(&format!("dev/dev-a/{k}"));
        b.publish_refused(&b.dev_a, "dev-a", &theirs, Payload::Message("forged"));
        b.publish_ok(&b.dev_a, "dev-a", &own, Payload::Message("own"));
        agg.expect(&format!("{own} own"));
    }
    b.publish_ok(&b.dev_b, "dev-b", &update_b, Payload::Message("done"));
    agg.expect(&format!("{update_b} done"));
    assert!(
        !agg.seen.iter().any(|l| l.ends_with(" forged")),
        "a forged message reached the aggregator: {:?}",
        agg.seen
    );
}

/// The aggregator's retained global reaches dev-a; dev-a can neither
/// replace it (`-r`), clear it (`-r -n`) nor retain one for another model:
/// a fresh subscriber (dev-b) finds exactly the aggregator's global. The
/// aggregator's ack to dev-a reaches dev-a; dev-b, subscribed to it and to
/// every ack, gets only its own ack, and not one dev-a forged for it.
#[test]
fn only_the_aggregator_writes_globals_and_acks() {
    if !enabled("only_the_aggregator_writes_globals_and_acks") {
        return;
    }
    let b = Broker::start();
    let digits = topic("model/digits/global");
    let other_model = topic("model/other/global");
    let globals = topic("model/+/global");
    let ack_a = topic("dev/dev-a/ack");
    let ack_b = topic("dev/dev-b/ack");

    b.publish_ok(&b.aggregator, "dai-cloud", &digits, Payload::Retained("G1"));
    let mut a = b.subscribe(&b.dev_a, "dev-a", &[&globals, &ack_a]);
    a.expect(&format!("{digits} G1"));
    let all_acks = topic("dev/+/ack");
    let mut spy = b.subscribe(&b.dev_b, "dev-b", &[&ack_a, &all_acks, &ack_b]);
    b.ready_on_ack(&mut spy, "dev-b");

    b.publish_refused(&b.dev_a, "dev-a-pub", &digits, Payload::Retained("evil"));
    b.publish_refused(&b.dev_a, "dev-a-pub", &digits, Payload::ClearRetained);
    b.publish_refused(
        &b.dev_a,
        "dev-a-pub",
        &other_model,
        Payload::Retained("evil"),
    );
    b.publish_refused(&b.dev_a, "dev-a-pub", &ack_b, Payload::Message("forged"));
    // Bundle offers and chunks are the aggregator's too.
    b.publish_refused(
        &b.dev_a,
        "dev-a-pub",
        &topic("model/digits/bundle"),
        Payload::Retained("evil"),
    );
    b.publish_refused(
        &b.dev_a,
        "dev-a-pub",
        &topic("dev/dev-b/chunk"),
        Payload::Message("forged"),
    );

    b.publish_ok(
        &b.aggregator,
        "dai-cloud",
        &ack_a,
        Payload::Message("ack-1"),
    );
    b.publish_ok(&b.aggregator, "dai-cloud", &ack_b, Payload::Message("done"));
    a.expect(&format!("{ack_a} ack-1"));
    assert_eq!(
        a.seen,
        [format!("{digits} G1"), format!("{ack_a} ack-1")],
        "dev-a's subscriber saw a refused publish"
    );
    spy.expect(&format!("{ack_b} done"));
    spy.assert_none_on(&ack_a);
    assert!(
        !spy.seen.iter().any(|l| l.ends_with(" forged")),
        "dev-b received the ack dev-a forged: {:?}",
        spy.seen
    );

    let mut late = b.subscribe(&b.dev_b, "dev-b-late", &[&globals, &ack_b]);
    b.ready_on_ack(&mut late, "dev-b");
    let retained: Vec<&String> = late
        .seen
        .iter()
        .filter(|l| !l.starts_with(&ack_b))
        .collect();
    assert_eq!(
        retained,
        [&format!("{digits} G1")],
        "the retained globals a new subscriber finds"
    );
}

/// dev-a connects; once it is revoked (the registry, then the CRL the
/// fleet directory writes, copied to the broker as an operator would) and
/// Mosquitto has reloaded (SIGHUP), its connection is refused in the TLS
/// handshake, while dev-b, not revoked, still connects.
#[test]
fn a_revoked_device_is_refused_at_connect() {
    if !enabled("a_revoked_device_is_refused_at_connect") {
        return;
    }
    let b = Broker::start();
    let own_a = topic("dev/dev-a/status");
    let own_b = topic("dev/dev-b/status");
    b.publish_ok(&b.dev_a, "dev-a", &own_a, Payload::Message("online"));

    let _lock = b.fleet_dir.lock().expect("lock");
    let mut fleet = b.fleet_dir.load().expect("fleet");
    let now = SystemTime::now();
    assert!(
        fleet
            .registry
            .revoke("dev-a", dai_trust::unix_secs(now))
            .expect("dev-a is enrolled")
    );
    b.fleet_dir.save_registry(&fleet.registry).expect("save");
    b.fleet_dir
        .write_crl(&fleet.ca, &fleet.registry, now)
        .expect("crl.pem");
    std::fs::copy(
        b.fleet_dir.path(FLEET_CRL),
        b.dir.path().join("mosquitto").join(FLEET_CRL),
    )
    .expect("copy crl.pem");
    let hup = Command::new("kill")
        .args(["-HUP", &b.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(hup.success(), "kill -HUP mosquitto: {hup}");

    // The reload happens in Mosquitto's main loop, some time after the
    // signal: retry until it refuses.
    let mut last = String::new();
    let refused = (0..20).any(|i| {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(250));
        }
        let p = b.publish(&b.dev_a, "dev-a", &own_a, Payload::Message("revoked"));
        last = p.output;
        !p.connected
    });
    assert!(
        refused,
        "revoked dev-a still connects after the reload: {last}"
    );
    b.publish_ok(&b.dev_b, "dev-b", &own_b, Payload::Message("online"));
}
