//! `run`: every flag checked and turned into the service configuration,
//! the embedded broker (plain or behind its mutual-TLS gate) started, then
//! the status page and the service until SIGINT/SIGTERM.

use super::*;

pub(super) fn run(args: RunArgs) -> anyhow::Result<()> {
    let listen: SocketAddr = args
        .http
        .parse()
        .map_err(|_| usage(format!("--http {:?}: expected ip:port", args.http)))?;
    let access = dai_cloud::http::Access::for_listener(
        listen,
        args.auth_token_file.as_deref(),
        args.allow_unauthenticated_http,
    )
    .map_err(|e| usage(e.to_string()))?;
    let (mut cfg, http, embedded) = service_config(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = rt.block_on(async move {
        let monitor = std::sync::Arc::new(Monitor::new());
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("--http: binding {http}"))?;
        tracing::info!(
            "status page on http://{}",
            listener.local_addr().unwrap_or(http)
        );
        start_broker(embedded, &mut cfg).await?;
        let app = dai_cloud::http::router_with(
            monitor.clone(),
            cfg.state_path.clone(),
            cfg.fleet.clone(),
            access,
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        anyhow::Ok(run_monitored(cfg, monitor, shutdown_signal()).await?)
    })?;
    tracing::info!(?stats, "dai-cloud stopped");
    Ok(())
}

/// The embedded broker to start (inside the runtime: its gate is a task).
enum Embedded {
    /// `--broker`: an external one.
    No,
    /// `--insecure-plaintext`: rumqttd alone on `--listen`.
    Plain(SocketAddr),
    /// rumqttd on loopback behind the mutual-TLS gate on `--listen`.
    Secure {
        listen: SocketAddr,
        ca_pem: String,
        tls: std::sync::Arc<dai_trust::tls::ServerConfig>,
    },
}

/// Start what `embedded` says; a secure broker's aggregator connection goes
/// to rumqttd's loopback side directly (same process).
async fn start_broker(embedded: Embedded, cfg: &mut ServiceConfig) -> anyhow::Result<()> {
    match embedded {
        Embedded::No => {}
        Embedded::Plain(addr) => {
            start_embedded_broker(addr)?;
            tracing::warn!(%addr, "embedded MQTT broker on plain TCP (--insecure-plaintext): anyone who reaches it can join");
        }
        Embedded::Secure {
            listen,
            ca_pem,
            tls,
        } => {
            let revocations = match &cfg.fleet_dir {
                Some(w) => w.revocations.clone(),
                None => bail!("a secure broker needs the fleet directory"),
            };
            let (upstream, _) =
                start_secure_broker(listen, &cfg.fleet, ca_pem, tls, revocations).await?;
            tracing::info!(%listen, "embedded MQTT broker started (mutual TLS, fleet CA, topic ACL)");
            cfg.broker = BrokerAddr {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            };
            cfg.tls = None;
        }
    }
    Ok(())
}

fn open_fleet(dir: &Path, fleet_flag: &str) -> anyhow::Result<SecureFleet> {
    let secure = SecureFleet::open(dir).with_context(|| {
        format!(
            "--fleet-dir {}: reading the fleet (made by `dai-cloud fleet init`)",
            dir.display()
        )
    })?;
    if secure.fleet_name() != fleet_flag {
        return Err(usage(format!(
            "--fleet {fleet_flag:?} differs from the fleet directory's fleet {:?}",
            secure.fleet_name()
        ))
        .into());
    }
    Ok(secure)
}

/// A client id unique to this process.
fn unique_client_id() -> anyhow::Result<String> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!(
        "{}-{}",
        dai_trust::ca::AGGREGATOR_NAME,
        hex::encode(b)
    ))
}

/// Every `run` flag checked and turned into the service's configuration,
/// the status page address and the broker to start.
fn service_config(a: RunArgs) -> anyhow::Result<(ServiceConfig, SocketAddr, Embedded)> {
    let secure = match (&a.fleet_dir, a.insecure_plaintext) {
        (Some(_), true) => {
            return Err(usage("--fleet-dir and --insecure-plaintext exclude each other").into());
        }
        (None, false) => {
            return Err(usage(
                "--fleet-dir (or DAI_FLEET_DIR) is required: `dai-cloud fleet init` makes one; \
                 --insecure-plaintext runs without identities",
            )
            .into());
        }
        (Some(dir), false) => Some(open_fleet(dir, &a.fleet)?),
        (None, true) => None,
    };
    let signing_key = match (&a.key, &secure) {
        (Some(path), _) => {
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            dai_protocol::global::signing_key_from_hex(&secret).context("the key file")?
        }
        (None, Some(s)) => s.identity.aggregator.signing_key().clone(),
        (None, None) => return Err(usage("--key is required with --insecure-plaintext").into()),
    };
    if let Some(s) = &secure
        && signing_key.verifying_key() != s.identity.aggregator.public()
    {
        return Err(usage(
            "--key is not the fleet's aggregator key: edges verify globals and acks with \
             aggregator.pub",
        )
        .into());
    }
    let client_id = match a.client_id.clone() {
        Some(id) => id,
        None => unique_client_id()?,
    };
    let heads = read_models(&a.models)?;
    let validation = read_validation(&a.validation, a.validation_margin, &heads)?;
    let strategy = match a.strategy.as_str() {
        "fedavg" => Strategy::FedAvg {
            min_updates: a.min_updates,
        },
        "fedbuff" => Strategy::FedBuff { k: a.min_updates },
        other => bail!("--strategy {other:?}: expected fedavg or fedbuff"),
    };
    let robust = parse_robust(&a.robust)?;
    let server_optimizer = parse_server_opt(&a.server_opt, a.server_lr, a.server_tau)?;
    let http: SocketAddr = a.http.parse().context("--http: expected ip:port")?;
    let (host, port, embedded) = match &a.broker {
        Some(b) => {
            let (h, p) = b.rsplit_once(':').context("--broker: expected host:port")?;
            (
                h.to_string(),
                p.parse::<u16>().context("--broker port")?,
                Embedded::No,
            )
        }
        None => {
            let addr: SocketAddr = a.listen.parse().context("--listen: expected ip:port")?;
            let embedded = match &secure {
                None => Embedded::Plain(addr),
                Some(s) => Embedded::Secure {
                    listen: addr,
                    ca_pem: s.identity.ca_pem.clone(),
                    tls: std::sync::Arc::new(s.broker_tls().with_context(|| {
                        format!(
                            "the embedded broker's certificate in {} (`dai-cloud fleet \
                             broker-cert` makes a new one)",
                            s.watch.dir.root().display()
                        )
                    })?),
                },
            };
            (addr.ip().to_string(), addr.port(), embedded)
        }
    };
    if a.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: plain TCP MQTT, unsigned updates accepted; anyone who reaches the broker can join the fleet"
        );
    }
    let tls = match &secure {
        Some(s) => Some(std::sync::Arc::new(
            s.client_tls().context("the aggregator's TLS identity")?,
        )),
        None => None,
    };
    let sample_cap = SampleCap::parse(&a.max_sample_weight).ok_or_else(|| {
        usage(format!(
            "--max-sample-weight {:?}: expected equal, auto, off or a positive number of samples",
            a.max_sample_weight
        ))
    })?;
    let upstream = super::tier::upstream_config(super::tier::TierFlags {
        role: a.role,
        upstream: a.upstream.as_deref(),
        identity: a.identity.as_deref(),
        fleet: &a.fleet,
        tiers: &a.tier,
        server_optimizer: server_optimizer.is_some(),
        validation: !a.validation.is_empty(),
        share_group: a.share_group.as_deref(),
        upstream_client_id: a.upstream_client_id.as_deref(),
        embedded: a.broker.is_none(),
    })?;
    let mut cfg = ServiceConfig {
        fleet: a.fleet,
        broker: BrokerAddr { host, port },
        client_id,
        state_path: a.state,
        models: heads,
        settings: Settings {
            strategy,
            aggregation: Aggregation {
                clip: parse_clip(&a.clip_norm)?,
                robust,
            },
            max_staleness: a.max_staleness,
            reject_norm: a.reject_norm,
            sample_cap,
            max_updates_per_minute: a.max_updates_per_minute,
            dp: parse_dp(a.dp_noise, a.dp_clip, a.dp_delta, a.dp_target_epsilon)?,
            validation,
        },
        round_timeout: Duration::from_secs(a.round_timeout_sec),
        signing_key: signing_key.clone(),
        server_optimizer,
        devices: DeviceAuth::Unchecked,
        fleet_dir: None,
        tls,
        tiers: a.tier,
        upstream,
        share_group: a.share_group,
    };
    if let Some(s) = secure {
        s.apply(&mut cfg);
        // --key, when given, was checked to be the fleet's.
        cfg.signing_key = signing_key;
    }
    Ok((cfg, http, embedded))
}

/// `--model NAME=PATH` entries: each file read and checked to be a head.
fn read_models(models: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut heads = Vec::new();
    for m in models {
        let Some((name, path)) = m.split_once('=') else {
            bail!("--model {m:?}: expected NAME=PATH")
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        dai_head::Head::from_bytes(&bytes).with_context(|| format!("{path} is not a head file"))?;
        heads.push((name.to_string(), bytes));
    }
    Ok(heads)
}

/// `--validation MODEL=FILE` entries: each set read and checked against
/// its model's head.
fn read_validation(
    entries: &[String],
    margin: f64,
    heads: &[(String, Vec<u8>)],
) -> anyhow::Result<Option<std::sync::Arc<dai_cloud::validation::Validation>>> {
    if entries.is_empty() {
        return Ok(None);
    }
    if !(0.0..=1.0).contains(&margin) {
        return Err(usage(format!(
            "--validation-margin {margin}: expected a number in [0, 1]"
        ))
        .into());
    }
    let mut sets = std::collections::HashMap::new();
    for e in entries {
        let Some((model, path)) = e.split_once('=') else {
            return Err(usage(format!("--validation {e:?}: expected MODEL=FILE")).into());
        };
        let Some((_, head)) = heads.iter().find(|(m, _)| m == model) else {
            return Err(usage(format!("--validation {e:?}: no --model named {model:?}")).into());
        };
        let set = dai_cloud::validation::read(Path::new(path))
            .with_context(|| format!("--validation {e}"))?;
        let (h, _) = dai_head::Head::from_bytes(head).context("the model's head")?;
        if set.features != h.spec.inputs() {
            return Err(usage(format!(
                "--validation {e}: rows of {} features, but {model}'s head takes {}",
                set.features,
                h.spec.inputs()
            ))
            .into());
        }
        sets.insert(model.to_string(), set);
    }
    Ok(Some(std::sync::Arc::new(
        dai_cloud::validation::Validation { sets, margin },
    )))
}

fn parse_dp(
    noise: Option<f64>,
    clip: Option<f64>,
    delta: f64,
    target: Option<f64>,
) -> anyhow::Result<Option<dai_cloud::state::DpSettings>> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let Some(noise) = noise else {
        if clip.is_some() || target.is_some() {
            return Err(usage("--dp-clip and --dp-target-epsilon need --dp-noise").into());
        }
        return Ok(None);
    };
    let Some(clip) = clip else {
        return Err(
            usage("--dp-noise needs --dp-clip (the L2 norm each update is clipped to)").into(),
        );
    };
    if !positive(noise) || !positive(clip) {
        return Err(usage(format!(
            "--dp-noise {noise} and --dp-clip {clip}: expected positive numbers"
        ))
        .into());
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(usage(format!("--dp-delta {delta}: expected a number in (0, 1)")).into());
    }
    if let Some(t) = target
        && !positive(t)
    {
        return Err(usage(format!(
            "--dp-target-epsilon {t}: expected a positive number"
        ))
        .into());
    }
    Ok(Some(dai_cloud::state::DpSettings {
        noise_multiplier: noise,
        clip_norm: clip,
        delta,
        target_epsilon: target,
    }))
}

fn parse_clip(s: &str) -> anyhow::Result<dai_cloud::Clip> {
    use dai_cloud::Clip;
    let bad = || {
        usage(format!(
            "--clip-norm {s:?}: expected auto, auto:MULTIPLE, off or a positive L2 norm"
        ))
    };
    let positive = |v: &str| v.parse::<f64>().ok().filter(|v| *v > 0.0 && v.is_finite());
    Ok(match s {
        "off" => Clip::Off,
        "auto" => Clip::Adaptive {
            multiple: dai_cloud::combine::DEFAULT_CLIP_MULTIPLE,
        },
        _ => match s.strip_prefix("auto:") {
            Some(m) => Clip::Adaptive {
                multiple: positive(m).ok_or_else(bad)?,
            },
            None => Clip::Fixed(positive(s).ok_or_else(bad)?),
        },
    })
}

fn parse_robust(s: &str) -> anyhow::Result<Robust> {
    Ok(match s {
        "mean" => Robust::Mean,
        "median" => Robust::Median,
        t => match t
            .strip_prefix("trimmed:")
            .and_then(|f| f.parse::<f64>().ok())
        {
            Some(fraction) if (0.0..0.5).contains(&fraction) => Robust::TrimmedMean { fraction },
            _ => bail!(
                "--robust {t:?}: expected mean, median or trimmed:FRACTION with FRACTION in [0, 0.5)"
            ),
        },
    })
}

fn parse_server_opt(s: &str, lr: f32, tau: f32) -> anyhow::Result<Option<FedAdam>> {
    match s {
        "none" => Ok(None),
        "fedadam" => {
            let positive = |x: f32| x.is_finite() && x > 0.0;
            if !positive(lr) || !positive(tau) {
                bail!("--server-lr and --server-tau must be positive");
            }
            Ok(Some(FedAdam::new(lr, 0.9, 0.99, tau)))
        }
        other => bail!("--server-opt {other:?}: expected none or fedadam"),
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_refused_with_their_name() {
        let err = |r: anyhow::Result<Robust>| format!("{:#}", r.expect_err("refused"));
        assert!(err(parse_robust("trimmed:0.5")).contains("--robust \"trimmed:0.5\""));
        assert!(err(parse_robust("avg")).contains("--robust"));
        assert_eq!(
            parse_robust("trimmed:0.2").expect("ok"),
            Robust::TrimmedMean { fraction: 0.2 }
        );
        assert!(parse_server_opt("none", 0.0, 0.0).expect("none").is_none());
        assert!(
            parse_server_opt("fedadam", 0.01, 1e-3)
                .expect("adam")
                .is_some()
        );
        let e = parse_server_opt("fedadam", -1.0, 1e-3).expect_err("negative lr");
        assert!(e.to_string().contains("must be positive"), "{e:#}");
        assert!(parse_server_opt("sgd", 0.1, 0.1).is_err());
        let e = read_models(&["digits".into()]).expect_err("no path");
        assert!(e.to_string().contains("expected NAME=PATH"), "{e:#}");
        for bad in ["", "auto:0", "auto:x", "-1", "nan", "none"] {
            let e = parse_clip(bad).expect_err("refused");
            assert!(e.to_string().contains("--clip-norm"), "{e:#}");
        }
        assert_eq!(parse_clip("3").expect("fixed"), dai_cloud::Clip::Fixed(3.0));
        assert!(parse_dp(None, None, 1e-5, None).expect("off").is_none());
        let heads = vec![("m".to_string(), Vec::new())];
        for (entry, says) in [
            ("m", "expected MODEL=FILE"),
            ("other=x", "no --model named \"other\""),
            (
                "m=/nonexistent/v.safetensors",
                "reading /nonexistent/v.safetensors",
            ),
        ] {
            let e = read_validation(&[entry.to_string()], 0.05, &heads).expect_err("refused");
            assert!(format!("{e:#}").contains(says), "{entry}: {e:#}");
        }
        let e = read_validation(&["m=x".into()], 2.0, &heads).expect_err("margin");
        assert!(e.to_string().contains("--validation-margin"), "{e:#}");
        for (noise, clip, delta, target, flag) in [
            (Some(1.0), None, 1e-5, None, "--dp-clip"),
            (None, Some(1.0), 1e-5, None, "--dp-noise"),
            (Some(-1.0), Some(1.0), 1e-5, None, "--dp-noise"),
            (Some(1.0), Some(1.0), 2.0, None, "--dp-delta"),
            (Some(1.0), Some(1.0), 1e-5, Some(0.0), "--dp-target-epsilon"),
        ] {
            let e = parse_dp(noise, clip, delta, target).expect_err("refused");
            assert!(e.to_string().contains(flag), "{flag}: {e:#}");
        }
    }

    /// What `dai-cloud run` uses without flags is the library's robust
    /// default, the one the attack tests check.
    #[test]
    fn the_flag_defaults_are_the_robust_defaults() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["dai-cloud", "run", "--model", "m=h"]).expect("parse");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let agg = Aggregation {
            clip: parse_clip(&a.clip_norm).expect("clip"),
            robust: parse_robust(&a.robust).expect("robust"),
        };
        assert_eq!(agg, Aggregation::default());
        assert_eq!(
            a.max_updates_per_minute,
            dai_cloud::state::DEFAULT_MAX_UPDATES_PER_MINUTE
        );
        assert_eq!(
            SampleCap::parse(&a.max_sample_weight),
            Some(SampleCap::Equal)
        );
    }
}
