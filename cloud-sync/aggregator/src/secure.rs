//! A secure aggregator from a fleet directory (`dai-cloud fleet init`):
//! what `dai-cloud run --fleet-dir`, `dai demo` and the fleet tests share.
//!
//! [`SecureFleet::open`] reads the CA certificate (not its key: that can
//! stay offline), the aggregator's key and certificate and the registry; [`SecureFleet::start_broker`] starts the
//! embedded broker behind its mutual-TLS gate; [`SecureFleet::apply`] makes
//! a [`ServiceConfig`] check every update against the enrolled devices,
//! sign with the fleet's aggregator key and follow the registry.

use crate::auth::{DeviceAuth, DeviceKeys};
use crate::gate::GateStats;
use crate::service::{BrokerAddr, FleetWatch, ServiceConfig, ServiceError, start_secure_broker};
use dai_trust::fs::{BROKER_CERT, BROKER_KEY, FleetDir, MAX_PEM_BYTES, ServiceIdentity};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A fleet directory, loaded.
#[derive(Debug)]
pub struct SecureFleet {
    pub identity: ServiceIdentity,
    pub watch: FleetWatch,
    keys: DeviceKeys,
}

impl SecureFleet {
    pub fn open(dir: &Path) -> Result<SecureFleet, ServiceError> {
        let fd = FleetDir::new(dir);
        let identity = fd.load_service()?;
        let registry = fd.load_registry()?;
        if registry.fleet != identity.fleet {
            return Err(dai_trust::TrustError::InFile {
                path: fd.path(dai_trust::fs::FLEET_DEVICES),
                source: Box::new(dai_trust::TrustError::WrongFleet {
                    expected: identity.fleet.to_string(),
                    found: registry.fleet.to_string(),
                }),
            }
            .into());
        }
        let (watch, keys) = FleetWatch::open(fd)?;
        Ok(SecureFleet {
            identity,
            watch,
            keys,
        })
    }

    pub fn fleet_name(&self) -> &str {
        self.identity.fleet.as_str()
    }

    /// The aggregator's mutual-TLS client (for a broker we do not run).
    pub fn client_tls(&self) -> Result<dai_trust::tls::ClientConfig, ServiceError> {
        let a = &self.identity.aggregator;
        Ok(dai_trust::tls::client_config(
            &self.identity.ca_pem,
            a.cert_pem(),
            a.key(),
        )?)
    }

    /// The embedded broker's TLS server: broker.pem and broker.key.pem of
    /// the fleet directory.
    pub fn broker_tls(&self) -> Result<dai_trust::tls::ServerConfig, ServiceError> {
        let fd = &self.watch.dir;
        let text = |name: &str| -> Result<String, ServiceError> {
            let path = fd.path(name);
            String::from_utf8(dai_trust::fs::read_capped(&path, MAX_PEM_BYTES)?).map_err(|_| {
                ServiceError::Broker(format!("{} is not a PEM text file", path.display()))
            })
        };
        let key = dai_trust::SecretKey::from_pkcs8_pem(&text(BROKER_KEY)?, "broker key").map_err(
            |source| dai_trust::TrustError::InFile {
                path: fd.path(BROKER_KEY),
                source: Box::new(source),
            },
        )?;
        Ok(dai_trust::tls::server_config(
            &self.identity.ca_pem,
            &text(BROKER_CERT)?,
            &key,
        )?)
    }

    /// The embedded broker on `listen` behind the gate; returns the
    /// loopback address the aggregator itself connects to.
    pub async fn start_broker(
        &self,
        listen: SocketAddr,
    ) -> Result<(BrokerAddr, Arc<GateStats>), ServiceError> {
        let (upstream, stats) = start_secure_broker(
            listen,
            self.fleet_name(),
            self.identity.ca_pem.clone(),
            Arc::new(self.broker_tls()?),
            self.watch.revocations.clone(),
        )
        .await?;
        Ok((
            BrokerAddr {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            },
            stats,
        ))
    }

    /// `cfg` checks updates against this fleet's devices, signs with its
    /// aggregator key and re-reads the registry as it changes.
    pub fn apply(self, cfg: &mut ServiceConfig) {
        cfg.fleet = self.fleet_name().to_string();
        cfg.signing_key = self.identity.aggregator.signing_key().clone();
        cfg.devices = DeviceAuth::Signed(self.keys);
        cfg.fleet_dir = Some(self.watch);
    }
}
