//! `run --role site|intake --upstream HOST:PORT --identity DIR`: the
//! flags that make this aggregator a tier, checked into its
//! [`UpstreamConfig`]. The tier's identity is a device bundle (`dai-cloud
//! devices add NAME --out DIR` on the root's fleet): its certificate and
//! key authenticate the upstream session and sign its partials, and the
//! bundle's aggregator key is the root's, which globals and acks from
//! upstream must carry.

use super::usage;
use anyhow::Context;
use dai_cloud::intake::tier::TierConfig;
use dai_cloud::service::BrokerAddr;
use dai_cloud::upstream::UpstreamConfig;
use std::path::Path;

/// What `--role` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The top of the fleet: makes and signs the globals.
    Root,
    /// A site gateway's aggregator: folds its devices' updates into
    /// partials for the root, and serves the root's globals on its own
    /// broker.
    Site,
    /// An intake replica on the root's broker (shared subscriptions):
    /// folds the updates it receives into partials for the root.
    Intake,
}

/// The flags that only mean something on a tier, for the checks.
pub struct TierFlags<'a> {
    pub role: Role,
    pub upstream: Option<&'a str>,
    pub identity: Option<&'a Path>,
    pub fleet: &'a str,
    pub tiers: &'a [String],
    pub server_optimizer: bool,
    pub validation: bool,
    pub share_group: Option<&'a str>,
    pub upstream_client_id: Option<&'a str>,
    /// The embedded broker (no `--broker`).
    pub embedded: bool,
}

/// `None` for a root; the upstream link of a site or intake tier.
pub fn upstream_config(f: TierFlags<'_>) -> anyhow::Result<Option<UpstreamConfig>> {
    if let Some(g) = f.share_group {
        if !dai_protocol::topics::valid_segment(g) {
            return Err(usage(format!(
                "--share-group {g:?}: expected 1-64 characters of [A-Za-z0-9._-]"
            ))
            .into());
        }
        if f.embedded {
            return Err(usage(
                "--share-group needs --broker: the embedded broker (rumqttd) has no shared \
                 subscriptions; run Mosquitto (deploy/mosquitto) or EMQX",
            )
            .into());
        }
    }
    if f.role == Role::Intake && f.share_group.is_none() {
        return Err(usage(
            "--role intake needs --share-group GROUP (the same on the root and every replica): \
             without it each replica and the root would all receive every update",
        )
        .into());
    }
    if f.role == Role::Root {
        if f.upstream.is_some() || f.identity.is_some() {
            return Err(usage("--upstream and --identity are for --role site or intake").into());
        }
        return Ok(None);
    }
    let role = if f.role == Role::Site {
        "site"
    } else {
        "intake"
    };
    // What a tier cannot do (yet), refused rather than silently dropped.
    for (on, flag, why) in [
        (
            !f.tiers.is_empty(),
            "--tier",
            "a tier folding other tiers' partials is not supported: list every tier on the root",
        ),
        (
            f.server_optimizer,
            "--server-opt",
            "the server optimiser belongs to the root, which applies the combined delta",
        ),
        (
            f.validation,
            "--validation",
            "validation sets score candidate globals, which only the root makes",
        ),
    ] {
        if on {
            return Err(usage(format!("{flag} with --role {role}: {why}")).into());
        }
    }
    let (Some(upstream), Some(identity)) = (f.upstream, f.identity) else {
        return Err(usage(format!(
            "--role {role} needs --upstream HOST:PORT (the root's broker) and --identity DIR \
             (this tier's bundle from `dai-cloud devices add NAME --out DIR` on the root's fleet)"
        ))
        .into());
    };
    let (host, port) = upstream
        .rsplit_once(':')
        .context("--upstream: expected host:port")?;
    let port = port.parse::<u16>().context("--upstream port")?;
    let bundle = dai_trust::DeviceBundle::read_from(identity)
        .with_context(|| format!("--identity {}", identity.display()))?;
    bundle
        .verify(std::time::SystemTime::now())
        .with_context(|| {
            format!(
                "--identity {}: the bundle does not verify",
                identity.display()
            )
        })?;
    if bundle.fleet.as_str() != f.fleet {
        return Err(usage(format!(
            "--identity {} is of fleet {:?}, but this aggregator's fleet is {:?}",
            identity.display(),
            bundle.fleet.as_str(),
            f.fleet
        ))
        .into());
    }
    let tls = dai_trust::tls::client_config(&bundle.ca_pem, &bundle.cert_pem, &bundle.key)
        .with_context(|| format!("--identity {}: its TLS identity", identity.display()))?;
    let name = bundle.device.to_string();
    Ok(Some(UpstreamConfig {
        broker: BrokerAddr {
            host: host.to_string(),
            port,
        },
        tls: Some(std::sync::Arc::new(tls)),
        // The gate takes a device certificate only with its own name as
        // the client id.
        client_id: f.upstream_client_id.unwrap_or(&name).to_string(),
        tier: TierConfig {
            key: bundle.key.signing_key().clone(),
            root: bundle.aggregator_public_key,
            forward_globals: f.role == Role::Site,
            name,
        },
    }))
}
