//! `fleet init|broker-cert|crl` and `devices add|list|revoke`: the fleet
//! directory (`dai_trust::fs::FleetDir`) as an operator uses it.

use super::*;

pub(super) fn fleet_init(
    dir: &Path,
    fleet: &str,
    force: bool,
    hosts: &[String],
) -> anyhow::Result<()> {
    let fleet = FleetName::parse(fleet).map_err(|e| usage(format!("--fleet: {e}")))?;
    check_hosts(hosts)?;
    let fd = FleetDir::new(dir);
    let made = match fd.init(fleet, SystemTime::now(), force) {
        Err(dai_trust::TrustError::Exists { path }) => bail!(
            "{} already holds a fleet ({} exists); pass --force to replace it \
             (certificates of its devices stop verifying)",
            dir.display(),
            path.display()
        ),
        r => r.with_context(|| format!("creating the fleet in {}", dir.display()))?,
    };
    FleetDir::issue_broker(&made.ca, hosts, SystemTime::now(), dir)
        .context("issuing the embedded broker's certificate")?;
    println!(
        "fleet {} in {}: CA ca.pem (key ca.key.pem, secret), aggregator.key (secret, \
         `dai-cloud run --key`), aggregator.pub, aggregator.pem, broker.pem (for {}; \
         key broker.key.pem, secret)",
        made.ca.fleet(),
        dir.display(),
        hosts.join(", ")
    );
    println!(
        "next: dai-cloud devices add NAME --fleet-dir {} --out DIR",
        dir.display()
    );
    Ok(())
}

/// Every broker host must be a DNS name or an IP address (exit 64).
fn check_hosts(hosts: &[String]) -> Result<(), UsageError> {
    for h in hosts {
        let dns = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !dns && h.parse::<std::net::IpAddr>().is_err() {
            return Err(usage(format!(
                "broker host {h:?}: expected a DNS name or an IP address"
            )));
        }
    }
    Ok(())
}

pub(super) fn broker_cert(fd: &FleetDir, hosts: &[String], out: &Path) -> anyhow::Result<()> {
    check_hosts(hosts)?;
    let fleet = fd
        .load()
        .with_context(|| format!("reading the fleet in {}", fd.root().display()))?;
    let issued = FleetDir::issue_broker(&fleet.ca, hosts, SystemTime::now(), out)?;
    println!(
        "broker certificate for {} (fleet {}, serial {}, valid until {}): {}/broker.pem, \
         key broker.key.pem",
        hosts.join(", "),
        fleet.ca.fleet(),
        issued.serial,
        dai_trust::utc(issued.not_after),
        out.display()
    );
    Ok(())
}

pub(super) fn fleet_crl(fd: &FleetDir) -> anyhow::Result<()> {
    let _lock = fd.lock()?;
    let fleet = fd
        .load()
        .with_context(|| format!("reading the fleet in {}", fd.root().display()))?;
    fd.write_crl(&fleet.ca, &fleet.registry, SystemTime::now())?;
    println!(
        "{} lists {} revoked certificate(s), valid for {} days; a running Mosquitto \
         reads it again on SIGHUP (`systemctl reload mosquitto`, or `kill -HUP` its pid)",
        fd.path(dai_trust::fs::FLEET_CRL).display(),
        fleet.registry.revocations().revoked.len(),
        dai_trust::crl::CRL_DAYS
    );
    Ok(())
}

pub(super) fn devices(fd: &FleetDir, action: DevicesAction) -> anyhow::Result<()> {
    if !fd.path(dai_trust::fs::FLEET_CA_CERT).is_file() {
        bail!(
            "{}: no fleet here (no {}; make one with `dai-cloud fleet init --dir {0}`)",
            fd.root().display(),
            dai_trust::fs::FLEET_CA_CERT
        );
    }
    let load = |fd: &FleetDir| {
        fd.load().with_context(|| {
            format!(
                "reading the fleet in {} (made by `dai-cloud fleet init`)",
                fd.root().display()
            )
        })
    };
    match action {
        DevicesAction::Add { name, out, days } => {
            let name = DeviceName::parse(&name).map_err(|e| usage(e.to_string()))?;
            if dai_trust::ca::RESERVED_NAMES.contains(&name.as_str()) {
                return Err(usage(
                    dai_trust::TrustError::ReservedName {
                        name: name.to_string(),
                    }
                    .to_string(),
                )
                .into());
            }
            if days == 0 {
                return Err(usage("--days must be at least 1").into());
            }
            let issued = fd
                .enroll(&name, &out, days, SystemTime::now())
                .with_context(|| format!("enrolling {name}"))?;
            let fleet = load(fd)?;
            println!(
                "enrolled {name} in fleet {} (serial {}, valid until {}); bundle in {}",
                fleet.ca.fleet(),
                issued.serial,
                dai_trust::utc(issued.not_after),
                out.display()
            );
        }
        DevicesAction::List { json } => {
            let fleet = load(fd)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet.registry.devices)?);
            } else {
                println!(
                    "{:<24} {:<32} {:<20} {:<20}  status",
                    "device", "serial", "created (UTC)", "expires (UTC)"
                );
                for d in &fleet.registry.devices {
                    let status = d.revoked_at.map_or("active".into(), |t| {
                        format!("revoked {}", dai_trust::utc(t))
                    });
                    println!(
                        "{:<24} {:<32} {:<20} {:<20}  {status}",
                        d.name,
                        d.serial,
                        dai_trust::utc(d.created_at),
                        dai_trust::utc(d.not_after),
                    );
                }
            }
        }
        DevicesAction::Revoke { name } => {
            let _lock = fd.lock()?;
            let mut fleet = load(fd)?;
            let now = dai_trust::unix_secs(SystemTime::now());
            if fleet.registry.revoke(&name, now)? {
                fd.save_registry(&fleet.registry)?;
                fd.write_crl(&fleet.ca, &fleet.registry, SystemTime::now())?;
                println!(
                    "revoked {name}; {} and {} list {} certificate(s); a Mosquitto \
                     broker refuses it once it has the new crl.pem and reloads it \
                     (`systemctl reload mosquitto`, or `kill -HUP` its pid)",
                    fd.path(dai_trust::fs::FLEET_REVOCATIONS).display(),
                    fd.path(dai_trust::fs::FLEET_CRL).display(),
                    fleet.registry.revocations().revoked.len()
                );
            } else {
                println!("{name} was already revoked");
            }
        }
    }
    Ok(())
}
