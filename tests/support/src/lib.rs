//! `dai-testkit`: the setup code the workspace's tests share, so that each
//! test says only what it checks. Dev-only (`publish = false`); used by the
//! integration tests of `dai-cloud` (`cloud-sync/aggregator/tests`),
//! `dai-sync` (`cloud-sync/client/tests`) and the root package's end-to-end
//! tests (`tests/edge`). Unit tests inside `dai-cloud` cannot use it (a
//! dev-dependency cycle builds a second `dai-cloud` whose types differ) and
//! keep their fixtures in `state::fixtures`.
//!
//! - ports: [`free_port`], [`wait_for_port`];
//! - heads: [`head`], [`zero_head`], [`head_bytes`];
//! - updates: [`update`] -> [`UpdateBuilder`] (device, model, base, id,
//!   samples, loss, value, encoding, layer sizes) -> an [`Update`] or its
//!   wire bytes;
//! - the aggregator: [`service_config`] (test defaults, override fields
//!   with `ServiceConfig { field, ..service_config(..) }`), [`fedavg`]
//!   settings, [`signing_key`], [`public_key_hex`];
//! - MQTT: [`start_embedded_broker`] (rumqttd on a free loopback port,
//!   listening when it returns) and [`MqttProbe`], a client that is
//!   subscribed when it returns and waits for messages with a deadline;
//! - identities: [`make_fleet`] (a real fleet directory with devices
//!   enrolled, as `dai-cloud fleet init` + `devices add` make it),
//!   [`bundle_tls`] / [`aggregator_tls`] (mutual-TLS client configs) and
//!   [`start_secure`] (a secure aggregator behind the gated broker).

use dai_cloud::service::{BrokerAddr, ServiceConfig};
use dai_cloud::state::{Settings, Strategy};
use dai_cloud::{Aggregation, Robust};
use dai_head::{Activation, Head, HeadSpec, Loss};
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use ed25519_dalek::SigningKey;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use std::path::Path;
use std::time::{Duration, Instant};

/// A loopback port nothing listens on (the OS's pick, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Wait until something accepts connections on loopback `port`; panics
/// with "{what} never listened" after `within`.
pub fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dense head of `sizes` ([in, hidden..., out]; ReLU between layers,
/// none on the output, softmax cross-entropy), initialised from `seed`.
pub fn head(sizes: &[usize], seed: u64) -> Head {
    let layers = sizes.len().saturating_sub(1);
    let activations: Vec<Activation> = (0..layers)
        .map(|i| {
            if i + 1 == layers {
                Activation::None
            } else {
                Activation::Relu
            }
        })
        .collect();
    Head::init(
        HeadSpec::new(sizes, &activations, Loss::SoftmaxCrossEntropy).expect("head spec"),
        seed,
    )
}

/// [`head`] with every weight and bias zero.
pub fn zero_head(sizes: &[usize]) -> Head {
    let mut h = head(sizes, 1);
    for t in h
        .params
        .weights
        .iter_mut()
        .chain(h.params.biases.iter_mut())
    {
        t.iter_mut().for_each(|x| *x = 0.0);
    }
    h
}

/// `head` as a `head.safetensors` file (no extra metadata).
pub fn head_bytes(head: &Head) -> Vec<u8> {
    head.to_bytes(&Default::default()).expect("head bytes")
}

/// An update under construction; see [`update`].
#[derive(Debug, Clone)]
pub struct UpdateBuilder {
    meta: UpdateMeta,
    sizes: Vec<usize>,
    value: f32,
}

/// An update with id `id`: from device `edge-1` for model `m`, base
/// version `1.0.0`, 1 sample, loss 0.1, f32, the tensors of a 3 -> 2 head
/// (`layers.0.weight` [2, 3], `layers.0.bias` [2]), every value 0.
pub fn update(id: &str) -> UpdateBuilder {
    UpdateBuilder {
        meta: UpdateMeta {
            device: "edge-1".into(),
            model: "m".into(),
            base_version: "1.0.0".into(),
            update_id: id.into(),
            sample_count: 1,
            loss: 0.1,
            encoding: Encoding::F32,
        },
        sizes: vec![3, 2],
        value: 0.0,
    }
}

impl UpdateBuilder {
    pub fn device(mut self, device: &str) -> Self {
        self.meta.device = device.into();
        self
    }

    pub fn model(mut self, model: &str) -> Self {
        self.meta.model = model.into();
        self
    }

    pub fn base(mut self, base_version: &str) -> Self {
        self.meta.base_version = base_version.into();
        self
    }

    pub fn samples(mut self, sample_count: u64) -> Self {
        self.meta.sample_count = sample_count;
        self
    }

    pub fn loss(mut self, loss: f32) -> Self {
        self.meta.loss = loss;
        self
    }

    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.meta.encoding = encoding;
        self
    }

    /// Every value of every tensor.
    pub fn value(mut self, value: f32) -> Self {
        self.value = value;
        self
    }

    /// The head's layer sizes ([in, hidden..., out]) the tensors fit.
    pub fn sizes(mut self, sizes: &[usize]) -> Self {
        self.sizes = sizes.to_vec();
        self
    }

    /// The update: per layer `layers.{i}.weight` [out, in], then
    /// `layers.{i}.bias` [out].
    pub fn build(&self) -> Update {
        let mut tensors = Vec::new();
        for (i, w) in self.sizes.windows(2).enumerate() {
            let (inputs, outputs) = (w[0], w[1]);
            tensors.push(Tensor {
                name: dai_head::layout::weight_name(i),
                shape: vec![outputs, inputs],
                values: vec![self.value; outputs * inputs],
            });
            tensors.push(Tensor {
                name: dai_head::layout::bias_name(i),
                shape: vec![outputs],
                values: vec![self.value; outputs],
            });
        }
        Update {
            meta: self.meta.clone(),
            tensors,
        }
    }

    /// The update's wire bytes (compressed in its encoding).
    pub fn encode(&self) -> Vec<u8> {
        self.build().encode().expect("encode update")
    }
}

/// The key `[byte; 32]` (hex: `byte` 32 times, as `dai-cloud keygen` writes).
pub fn signing_key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32])
}

/// The public half of `key` in hex, as the edge config's
/// `aggregator_public_key` takes it.
pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// FedAvg after `min_updates`, plain mean, no clipping, max staleness 3,
/// updates with a norm above 1e6 rejected.
pub fn fedavg(min_updates: usize) -> Settings {
    Settings {
        strategy: Strategy::FedAvg { min_updates },
        aggregation: Aggregation {
            clip: dai_cloud::Clip::Off,
            robust: Robust::Mean,
        },
        max_staleness: 3,
        reject_norm: 1e6,
        sample_cap: dai_cloud::state::SampleCap::Auto,
        max_updates_per_minute: 0,
        dp: None,
        validation: None,
    }
}

/// An aggregator on the broker at `127.0.0.1:{port}` serving `models`
/// (name, base head file): fleet `lab`, a [`unique_client_id`], state in
/// `dir/agg.sqlite`, [`fedavg`]`(2)`, a 60 s round timeout, the key
/// [`signing_key`]`(9)`, no server optimiser; plain TCP and unsigned
/// updates (`DeviceAuth::Unchecked`, what `--insecure-plaintext` runs):
/// a test about identities uses [`secure`] instead.
pub fn service_config<'a>(
    port: u16,
    dir: &Path,
    models: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
) -> ServiceConfig {
    ServiceConfig {
        fleet: "lab".into(),
        broker: BrokerAddr {
            host: "127.0.0.1".into(),
            port,
        },
        client_id: unique_client_id(),
        state_path: dir.join("agg.sqlite"),
        models: models
            .into_iter()
            .map(|(name, file)| (name.to_string(), file))
            .collect(),
        settings: fedavg(2),
        round_timeout: Duration::from_secs(60),
        signing_key: signing_key(9),
        server_optimizer: None,
        devices: dai_cloud::auth::DeviceAuth::Unchecked,
        fleet_dir: None,
        tls: None,
        tiers: Vec::new(),
        upstream: None,
        share_group: None,
    }
}

/// `dai-cloud-{pid}-{n}`: unique per aggregator, as `dai-cloud run` makes
/// its own. Tests share one Mosquitto; two aggregators with one id would
/// take the session from each other in a loop.
pub fn unique_client_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("dai-cloud-{}-{n}", std::process::id())
}

/// Start the aggregator's embedded broker (rumqttd) on a free loopback
/// port; returns the port once it accepts connections.
pub fn start_embedded_broker() -> u16 {
    let port = free_port();
    start_embedded_broker_on(port);
    port
}

/// [`start_embedded_broker`] on a given `port` (a test that starts a
/// client before its broker picks the port first).
pub fn start_embedded_broker_on(port: u16) {
    dai_cloud::service::start_embedded_broker(([127, 0, 0, 1], port).into())
        .expect("embedded broker");
    wait_for_port(port, Duration::from_secs(10), "the embedded broker");
}

/// A fleet `fleet` in `dir/fleet` (CA, aggregator identity, a broker
/// certificate for 127.0.0.1 and localhost) with `devices` enrolled, each
/// bundle in `dir/{name}`; returns the fleet directory.
pub fn make_fleet(dir: &Path, fleet: &str, devices: &[&str]) -> std::path::PathBuf {
    make_fleet_for(dir, fleet, devices, &["127.0.0.1", "localhost"])
}

/// [`make_fleet`] with a broker certificate for `broker_hosts` (names or
/// addresses: a broker in a test's network namespace).
pub fn make_fleet_for(
    dir: &Path,
    fleet: &str,
    devices: &[&str],
    broker_hosts: &[&str],
) -> std::path::PathBuf {
    use dai_trust::fs::FleetDir;
    let root = dir.join("fleet");
    let now = std::time::SystemTime::now();
    let fd = FleetDir::new(&root);
    let made = fd
        .init(
            dai_trust::FleetName::parse(fleet).expect("fleet name"),
            now,
            false,
        )
        .expect("fleet init");
    let hosts: Vec<String> = broker_hosts.iter().map(|h| h.to_string()).collect();
    FleetDir::issue_broker(&made.ca, &hosts, now, &root).expect("broker certificate");
    for name in devices {
        fd.enroll(
            &dai_trust::DeviceName::parse(name).expect("device name"),
            &dir.join(name),
            30,
            now,
        )
        .expect("enrol");
    }
    root
}

/// The signing key of the device bundle in `bundle_dir` (what signs its
/// updates).
pub fn bundle_key(bundle_dir: &Path) -> SigningKey {
    dai_trust::DeviceBundle::read_from(bundle_dir)
        .expect("bundle")
        .key
        .signing_key()
        .clone()
}

/// The aggregator's public key in a fleet directory (what verifies its
/// acks and globals).
pub fn aggregator_public(fleet_dir: &Path) -> ed25519_dalek::VerifyingKey {
    dai_trust::fs::FleetDir::new(fleet_dir)
        .load()
        .expect("fleet")
        .aggregator
        .public()
}

/// The mutual-TLS client config of the bundle in `bundle_dir`.
pub fn bundle_tls(bundle_dir: &Path) -> std::sync::Arc<dai_trust::tls::ClientConfig> {
    let b = dai_trust::DeviceBundle::read_from(bundle_dir).expect("bundle");
    std::sync::Arc::new(
        dai_trust::tls::client_config(&b.ca_pem, &b.cert_pem, &b.key).expect("tls config"),
    )
}

/// The aggregator identity's mutual-TLS client config (an operator's
/// client, or an attacker who stole it).
pub fn aggregator_tls(fleet_dir: &Path) -> std::sync::Arc<dai_trust::tls::ClientConfig> {
    let f = dai_trust::fs::FleetDir::new(fleet_dir)
        .load()
        .expect("fleet");
    std::sync::Arc::new(
        dai_trust::tls::client_config(f.ca.cert_pem(), f.aggregator.cert_pem(), f.aggregator.key())
            .expect("tls config"),
    )
}

/// A secure aggregator from `fleet_dir` serving `models`: its embedded
/// broker's gate on `127.0.0.1:{port}` (mutual TLS, ACL), signed updates
/// only, the registry followed; state in `dir/agg.sqlite`. `edit` adjusts
/// the config (strategy, timeouts) before it starts. Returns the service
/// task and a sender that stops it.
pub async fn start_secure<'a>(
    port: u16,
    dir: &Path,
    fleet_dir: &Path,
    models: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
    edit: impl FnOnce(&mut ServiceConfig),
) -> (
    tokio::task::JoinHandle<
        Result<dai_cloud::service::ServiceStats, dai_cloud::service::ServiceError>,
    >,
    tokio::sync::oneshot::Sender<()>,
) {
    let secure = dai_cloud::secure::SecureFleet::open(fleet_dir).expect("fleet");
    let (upstream, _) = secure
        .start_broker(([127, 0, 0, 1], port).into())
        .await
        .expect("secure broker");
    let mut cfg = service_config(upstream.port, dir, models);
    secure.apply(&mut cfg);
    edit(&mut cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let monitor = std::sync::Arc::new(dai_cloud::monitor::Monitor::new());
    let task = tokio::spawn(dai_cloud::service::run_monitored(
        cfg,
        monitor.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Ready once every subscription of the intake is acknowledged: an
    // update published earlier would find no subscriber.
    let deadline = Instant::now() + Duration::from_secs(20);
    while monitor.live.lock().subscriptions < dai_cloud::intake::SUBSCRIPTIONS {
        assert!(Instant::now() < deadline, "the aggregator never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (task, stop_tx)
}

/// An MQTT client for tests on the broker at `127.0.0.1:{port}`; the test
/// drives its event loop through [`MqttProbe::next_publish`].
pub struct MqttProbe {
    pub client: AsyncClient,
    pub events: EventLoop,
}

impl MqttProbe {
    /// Connect as `client_id` and subscribe to `topics` (QoS 1); returns
    /// once every subscription is acknowledged (panics after 10 s).
    pub async fn connect(port: u16, client_id: &str, topics: &[&str]) -> MqttProbe {
        Self::connect_with(port, client_id, topics, None)
            .await
            .expect("connect")
    }

    /// [`MqttProbe::connect`] over mutual TLS with `tls`.
    pub async fn connect_tls(
        port: u16,
        client_id: &str,
        topics: &[&str],
        tls: std::sync::Arc<dai_trust::tls::ClientConfig>,
    ) -> MqttProbe {
        Self::connect_with(port, client_id, topics, Some(tls))
            .await
            .expect("connect")
    }

    /// The options a probe connects with (for a test that drives its own
    /// event loop, e.g. to see a refusal).
    pub fn options(
        port: u16,
        client_id: &str,
        tls: Option<std::sync::Arc<dai_trust::tls::ClientConfig>>,
    ) -> MqttOptions {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        opts
    }

    /// Connect and subscribe, or the first connection error (a refused
    /// handshake, a closed connection) within 10 s.
    pub async fn connect_with(
        port: u16,
        client_id: &str,
        topics: &[&str],
        tls: Option<std::sync::Arc<dai_trust::tls::ClientConfig>>,
    ) -> Result<MqttProbe, String> {
        let (client, mut events) = AsyncClient::new(Self::options(port, client_id, tls), 64);
        // Wait for the CONNACK first: a refusal shows here.
        // One deadline for the whole wait, never a short timeout around
        // `poll`: rumqttc connects (TCP, TLS, CONNACK) inside one poll, and
        // a poll cancelled mid-connect starts the connect again, so a
        // handshake slower than the timeout (a loaded machine) never ended.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => return Err("no CONNACK within 10 s".into()),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(_)) => {}
            }
        }
        for topic in topics {
            client
                .subscribe(*topic, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut subacks = 0;
        while subacks < topics.len() {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => return Err("no SUBACK within 10 s".into()),
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(_)) => {}
            }
        }
        Ok(MqttProbe { client, events })
    }

    /// Queue `payload` on `topic` (QoS 1, not retained); it leaves while
    /// the event loop is polled.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Poll the event loop until a message arrives (any subscribed topic)
    /// or `within` passes (`Ok(None)`); a connection error is returned
    /// as it happens.
    pub async fn next_publish(
        &mut self,
        within: Duration,
    ) -> Result<Option<Publish>, ConnectionError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Ok(Some(p)),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The first message on a topic matching `filter` (MQTT wildcards)
    /// within `within`; others are passed over, connection errors retried.
    pub async fn wait_for(&mut self, filter: &str, within: Duration) -> Option<Publish> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next_publish(left).await {
                Ok(Some(p)) if rumqttc::matches(&p.topic, filter) => return Some(p),
                Ok(None) => return None,
                Ok(Some(_)) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        None
    }
}

/// A Mosquitto running the shipped `deploy/mosquitto` configuration
/// (mutual TLS, the fleet ACL) for the fleet in a fleet directory, on a
/// free loopback port; killed on drop (its log printed if the test failed).
pub struct SecureMosquitto {
    pub port: u16,
    child: std::process::Child,
    log: std::path::PathBuf,
    conf: std::path::PathBuf,
    bin: &'static str,
    /// The network namespace it runs in (`ip netns exec`), if not this one.
    netns: Option<String>,
    host: String,
    _dir: tempfile::TempDir,
}

impl SecureMosquitto {
    /// `None` (the caller prints SKIPPED) when there is no mosquitto binary.
    pub fn start(fleet_dir: &Path, fleet: &str) -> Option<SecureMosquitto> {
        Self::start_at(fleet_dir, fleet, "127.0.0.1", free_port(), None)
    }

    /// [`SecureMosquitto::start`] with `extra` appended to its config (a
    /// site's bridge to a cloud broker).
    pub fn start_with(fleet_dir: &Path, fleet: &str, extra: &str) -> Option<SecureMosquitto> {
        Self::start_full(fleet_dir, fleet, "127.0.0.1", free_port(), None, extra)
    }

    /// Listening on `host:port`, inside the network namespace `netns`
    /// when given (ready once its log says it runs: the port is not
    /// reachable from here).
    pub fn start_at(
        fleet_dir: &Path,
        fleet: &str,
        host: &str,
        port: u16,
        netns: Option<&str>,
    ) -> Option<SecureMosquitto> {
        Self::start_full(fleet_dir, fleet, host, port, netns, "")
    }

    fn start_full(
        fleet_dir: &Path,
        fleet: &str,
        host: &str,
        port: u16,
        netns: Option<&str>,
        extra: &str,
    ) -> Option<SecureMosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|b| Path::new(b).exists())?;
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mosquitto");
        let dir = tempfile::tempdir().expect("tmp");
        let files = dir.path().join("dai");
        std::fs::create_dir_all(&files).expect("mkdir");
        for f in ["ca.pem", "broker.pem", "broker.key.pem", "crl.pem"] {
            std::fs::copy(fleet_dir.join(f), files.join(f)).expect("copy fleet file");
        }
        let acl = std::fs::read_to_string(shipped.join("acl")).expect("shipped acl");
        std::fs::write(files.join("acl"), acl.replace("@FLEET@", fleet)).expect("acl");
        let log = dir.path().join("mosquitto.log");
        let mut conf = std::fs::read_to_string(shipped.join("mosquitto.conf")).expect("conf");
        for (from, to) in [
            ("\nlistener 8883\n", format!("\nlistener {port} {host}\n")),
            ("/etc/mosquitto/dai/", format!("{}/", files.display())),
            ("/var/lib/mosquitto/", format!("{}/", dir.path().display())),
            (
                "log_dest stdout",
                format!("log_dest file {}", log.display()),
            ),
        ] {
            assert!(conf.contains(from), "mosquitto.conf no longer has {from:?}");
            conf = conf.replace(from, &to);
        }
        // As root (CI) Mosquitto would drop to the user "mosquitto", which
        // cannot read the 0600 key in a 0700 temp dir; as anyone else this
        // line has no effect.
        conf.push_str("user root\n");
        conf.push_str(extra);
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        let mut m = SecureMosquitto {
            port,
            child: Self::spawn(bin, &conf_path, netns),
            log,
            conf: conf_path,
            bin,
            netns: netns.map(str::to_string),
            host: host.to_string(),
            _dir: dir,
        };
        m.wait_ready("mosquitto");
        Some(m)
    }

    fn spawn(bin: &str, conf: &Path, netns: Option<&str>) -> std::process::Child {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => std::process::Command::new(bin),
        };
        cmd.arg("-c")
            .arg(conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts")
    }

    /// Ready: its port answers (from inside its namespace, if it has one).
    fn wait_ready(&mut self, what: &str) {
        let Some(ns) = self.netns.clone() else {
            wait_for_port(self.port, Duration::from_secs(10), what);
            return;
        };
        // Probed from inside the namespace (bash's /dev/tcp: a connect).
        let probe = format!("exec 3<>/dev/tcp/{}/{}", self.host, self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut up = false;
        while !up && Instant::now() < deadline {
            up = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c", &probe])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !up {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let addr = format!("{}:{}", self.host, self.port);
        assert!(up, "{what} did not listen on {addr} within 10 s");
    }

    /// The broker's process id (its memory, for the soak run).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL the broker (what it had not saved is lost, as in a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the broker process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Start it again on the same port with the same files.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.bin, &self.conf, self.netns.as_deref());
        self.wait_ready("mosquitto (restarted)");
    }
}

impl Drop for SecureMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("mosquitto log ({}):\n{log}", self.log.display());
        }
    }
}
