//! A secure aggregator from a fleet directory (`dai-cloud fleet init`):
//! what `dai-cloud run --fleet-dir`, `dai demo` and the fleet tests share.
//!
//! [`SecureFleet::open`] reads the CA, the aggregator's key and
//! certificate and the registry; [`SecureFleet::start_broker`] starts the
//! embedded broker behind its mutual-TLS gate; [`SecureFleet::apply`] makes
//! a [`ServiceConfig`] check every update against the enrolled devices,
//! sign with the fleet's aggregator key and follow the registry.

use crate::auth::{DeviceAuth, DeviceKeys};
use crate::gate::GateStats;
use crate::service::{BrokerAddr, FleetWatch, ServiceConfig, ServiceError, start_secure_broker};
use dai_trust::fs::{BROKER_CERT, BROKER_KEY, FLEET_CA_CERT, Fleet, FleetDir, MAX_PEM_BYTES};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A fleet directory, loaded.
#[derive(Debug)]
pub struct SecureFleet {
    pub fleet: Fleet,
    pub watch: FleetWatch,
    keys: DeviceKeys,
}

impl SecureFleet {
    pub fn open(dir: &Path) -> Result<SecureFleet, ServiceError> {
        let fd = FleetDir::new(dir);
        let fleet = fd.load()?;
        let (watch, keys) = FleetWatch::open(fd)?;
        Ok(SecureFleet { fleet, watch, keys })
    }

    pub fn fleet_name(&self) -> &str {
        self.fleet.ca.fleet().as_str()
    }

    /// The aggregator's mutual-TLS client (for a broker we do not run).
    pub fn client_tls(&self) -> Result<dai_trust::tls::ClientConfig, ServiceError> {
        Ok(dai_trust::tls::client_config(
            self.fleet.ca.cert_pem(),
            self.fleet.aggregator.cert_pem(),
            self.fleet.aggregator.key(),
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
            &text(FLEET_CA_CERT)?,
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
            self.fleet.ca.cert_pem().to_string(),
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
        cfg.signing_key = self.fleet.aggregator.signing_key().clone();
        cfg.devices = DeviceAuth::Signed(self.keys);
        cfg.fleet_dir = Some(self.watch);
    }
}
