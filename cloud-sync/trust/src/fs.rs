//! File layouts, the only I/O of the crate. Every read is capped before
//! anything is allocated ([`MAX_PEM_BYTES`], [`MAX_JSON_BYTES`]); every
//! file is written to a temporary name and renamed into place, private
//! keys with mode 0600 from the moment they exist.
//!
//! A device bundle directory ([`DeviceBundle::write_to`] / `read_from`):
//!
//! | file | contents |
//! |---|---|
//! | `device.pem` | the device certificate (PEM) |
//! | `device.key.pem` | the device's Ed25519 key, PKCS#8 PEM, mode 0600 |
//! | `ca.pem` | the fleet CA certificate |
//! | `aggregator.pub` | the aggregator's Ed25519 public key, 64 hex digits |
//! | `bundle.json` | `{"version": 1, "fleet": …, "device": …}` |
//!
//! A fleet directory ([`FleetDir`], `dai-cloud fleet init`):
//!
//! | file | contents |
//! |---|---|
//! | `ca.pem`, `ca.key.pem` | the fleet CA certificate and key (0600) |
//! | `aggregator.key` | the aggregator's secret, 64 hex digits (0600; `dai-cloud run --key`) |
//! | `aggregator.pub` | its public key, 64 hex digits (the edges' `cloud.aggregator_public_key`) |
//! | `aggregator.pem` | its certificate (CN `dai-cloud`) |
//! | `devices.json` | the [`Registry`] |
//! | `revocations.json` | the [`Revocations`] the registry implies |
//! | `broker.pem`, `broker.key.pem` | the broker's TLS server certificate and key (0600) |
//! | `crl.pem` | the CA's CRL of the revoked serials ([`FleetDir::write_crl`], Mosquitto's `crlfile`) |

use crate::ca::{AggregatorKey, FleetCa, Validity};
use crate::keys::{SecretKey, public_from_hex, public_to_hex};
use crate::name::{DeviceName, FleetName};
use crate::registry::{Registry, Revocations};
use crate::{DeviceBundle, TrustError};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The largest PEM (or hex key) file read.
pub const MAX_PEM_BYTES: u64 = 64 * 1024;
/// The largest registry or revocation file read (some 200k devices).
pub const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;

pub const BUNDLE_CERT: &str = "device.pem";
pub const BUNDLE_KEY: &str = "device.key.pem";
pub const BUNDLE_CA: &str = "ca.pem";
pub const BUNDLE_AGGREGATOR_PUB: &str = "aggregator.pub";
pub const BUNDLE_META: &str = "bundle.json";

pub const FLEET_CA_CERT: &str = "ca.pem";
pub const FLEET_CA_KEY: &str = "ca.key.pem";
pub const FLEET_AGGREGATOR_KEY: &str = "aggregator.key";
pub const FLEET_AGGREGATOR_PUB: &str = "aggregator.pub";
pub const FLEET_AGGREGATOR_CERT: &str = "aggregator.pem";
pub const FLEET_DEVICES: &str = "devices.json";
pub const FLEET_REVOCATIONS: &str = "revocations.json";
pub const FLEET_CRL: &str = "crl.pem";
pub const BROKER_CERT: &str = "broker.pem";
pub const BROKER_KEY: &str = "broker.key.pem";

/// The broker certificate's lifetime, days.
pub const BROKER_DAYS: u32 = 2 * 365;

/// The CA's lifetime at `fleet init`, days.
pub const CA_DAYS: u32 = 20 * 365;
/// The aggregator certificate's lifetime, days.
pub const AGGREGATOR_DAYS: u32 = 5 * 365;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleMeta {
    version: u32,
    fleet: FleetName,
    device: DeviceName,
}

/// Reads `path`, refusing more than `limit` bytes before reading them.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, TrustError> {
    let read_err = |source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = |size| TrustError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A capped UTF-8 text file.
fn read_text(path: &Path, limit: u64) -> Result<String, TrustError> {
    String::from_utf8(read_capped(path, limit)?).map_err(|_| TrustError::Contents {
        what: path.display().to_string(),
        reason: "not UTF-8 text".into(),
    })
}

/// `f(text of path)`, its error tagged with the file.
fn parse_file<T>(
    path: &Path,
    limit: u64,
    f: impl FnOnce(&str) -> Result<T, TrustError>,
) -> Result<T, TrustError> {
    let text = zeroize::Zeroizing::new(read_text(path, limit)?);
    f(&text).map_err(|e| in_file(path, e))
}

fn in_file(path: &Path, e: TrustError) -> TrustError {
    TrustError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory: created with `mode` (0600 for keys), synced, renamed.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    let write_err = |source| TrustError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    if let Err(e) = std::fs::remove_file(&tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(write_err(e));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(write_err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(write_err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(write_err)
}

fn create_dir(dir: &Path) -> Result<(), TrustError> {
    std::fs::create_dir_all(dir).map_err(|source| TrustError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

const PRIVATE: u32 = 0o600;
const PUBLIC: u32 = 0o644;

impl DeviceBundle {
    /// Refuses a directory that already holds a bundle file (the check
    /// [`DeviceBundle::write_to`] makes, for callers that record the
    /// device before writing).
    pub fn check_target(dir: &Path) -> Result<(), TrustError> {
        let files = [
            BUNDLE_CERT,
            BUNDLE_KEY,
            BUNDLE_CA,
            BUNDLE_AGGREGATOR_PUB,
            BUNDLE_META,
        ];
        match files.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
            Some(path) => Err(TrustError::Exists { path }),
            None => Ok(()),
        }
    }

    /// Writes the bundle files into `dir` (created if missing); refuses a
    /// directory that already holds any of them.
    pub fn write_to(&self, dir: &Path) -> Result<(), TrustError> {
        DeviceBundle::check_target(dir)?;
        create_dir(dir)?;
        let meta = BundleMeta {
            version: 1,
            fleet: self.fleet.clone(),
            device: self.device.clone(),
        };
        let meta = serde_json::to_string_pretty(&meta).expect("plain struct serialises") + "\n";
        write_file(
            &dir.join(BUNDLE_KEY),
            self.key.to_pkcs8_pem().as_bytes(),
            PRIVATE,
        )?;
        write_file(&dir.join(BUNDLE_CERT), self.cert_pem.as_bytes(), PUBLIC)?;
        write_file(&dir.join(BUNDLE_CA), self.ca_pem.as_bytes(), PUBLIC)?;
        let public = public_to_hex(&self.aggregator_public_key) + "\n";
        write_file(&dir.join(BUNDLE_AGGREGATOR_PUB), public.as_bytes(), PUBLIC)?;
        write_file(&dir.join(BUNDLE_META), meta.as_bytes(), PUBLIC)
    }

    /// Reads a bundle directory (not verified: call [`DeviceBundle::verify`]).
    pub fn read_from(dir: &Path) -> Result<DeviceBundle, TrustError> {
        let meta_path = dir.join(BUNDLE_META);
        let meta: BundleMeta = parse_file(&meta_path, MAX_PEM_BYTES, |t| {
            serde_json::from_str(t).map_err(|source| TrustError::Json {
                what: "bundle metadata".into(),
                source,
            })
        })?;
        if meta.version != 1 {
            return Err(in_file(
                &meta_path,
                TrustError::Contents {
                    what: "bundle metadata".into(),
                    reason: format!("version {}, expected 1", meta.version),
                },
            ));
        }
        let pem = |name: &str| read_text(&dir.join(name), MAX_PEM_BYTES);
        Ok(DeviceBundle {
            fleet: meta.fleet,
            device: meta.device,
            key: parse_file(&dir.join(BUNDLE_KEY), MAX_PEM_BYTES, |t| {
                SecretKey::from_pkcs8_pem(t, "device key")
            })?,
            cert_pem: pem(BUNDLE_CERT)?,
            ca_pem: pem(BUNDLE_CA)?,
            aggregator_public_key: parse_file(
                &dir.join(BUNDLE_AGGREGATOR_PUB),
                MAX_PEM_BYTES,
                |t| public_from_hex(t, "aggregator public key"),
            )?,
        })
    }
}

/// A fleet's files: the CA, the aggregator's identity, the registry.
#[derive(Debug)]
pub struct Fleet {
    pub ca: FleetCa,
    pub aggregator: AggregatorKey,
    pub registry: Registry,
}

/// A running aggregator's view of its fleet ([`FleetDir::load_service`]).
#[derive(Debug)]
pub struct ServiceIdentity {
    pub fleet: FleetName,
    pub ca_pem: String,
    pub aggregator: AggregatorKey,
}

/// A fleet directory (see the module docs for its files).
#[derive(Debug, Clone)]
pub struct FleetDir {
    root: PathBuf,
}

impl FleetDir {
    pub fn new(root: impl Into<PathBuf>) -> FleetDir {
        FleetDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    /// The first fleet file present, if any.
    pub fn existing_file(&self) -> Option<PathBuf> {
        [
            FLEET_CA_CERT,
            FLEET_CA_KEY,
            FLEET_AGGREGATOR_KEY,
            FLEET_AGGREGATOR_CERT,
            FLEET_DEVICES,
        ]
        .iter()
        .map(|f| self.path(f))
        .find(|p| p.exists())
    }

    /// A new CA, aggregator key and certificate, and an empty registry.
    /// Refuses a directory holding a fleet unless `force` (which replaces
    /// it: certificates of the old CA stop verifying).
    pub fn init(
        &self,
        fleet: FleetName,
        now: SystemTime,
        force: bool,
    ) -> Result<Fleet, TrustError> {
        if !force && let Some(path) = self.existing_file() {
            return Err(TrustError::Exists { path });
        }
        create_dir(&self.root)?;
        let ca = FleetCa::generate(fleet.clone(), Validity::days_from(now, CA_DAYS))?;
        let aggregator = AggregatorKey::generate(&ca, Validity::days_from(now, AGGREGATOR_DAYS))?;
        let registry = Registry::new(fleet);
        write_file(&self.path(FLEET_CA_KEY), ca.key_pem().as_bytes(), PRIVATE)?;
        write_file(&self.path(FLEET_CA_CERT), ca.cert_pem().as_bytes(), PUBLIC)?;
        write_file(
            &self.path(FLEET_AGGREGATOR_KEY),
            aggregator.key().to_hex().as_bytes(),
            PRIVATE,
        )?;
        write_file(
            &self.path(FLEET_AGGREGATOR_PUB),
            (aggregator.public_hex() + "\n").as_bytes(),
            PUBLIC,
        )?;
        write_file(
            &self.path(FLEET_AGGREGATOR_CERT),
            aggregator.cert_pem().as_bytes(),
            PUBLIC,
        )?;
        self.save_registry(&registry)?;
        self.write_crl(&ca, &registry, now)?;
        Ok(Fleet {
            ca,
            aggregator,
            registry,
        })
    }

    /// Reads the fleet back; the keys must match their certificates and
    /// the registry must be this CA's fleet.
    pub fn load(&self) -> Result<Fleet, TrustError> {
        let ca_cert = self.path(FLEET_CA_CERT);
        let ca_pem = read_text(&ca_cert, MAX_PEM_BYTES)?;
        let ca = parse_file(&self.path(FLEET_CA_KEY), MAX_PEM_BYTES, |key| {
            FleetCa::from_pem(&ca_pem, key)
        })?;
        let key = parse_file(&self.path(FLEET_AGGREGATOR_KEY), MAX_PEM_BYTES, |t| {
            SecretKey::from_hex(t, "aggregator key")
        })?;
        let cert_path = self.path(FLEET_AGGREGATOR_CERT);
        let aggregator = parse_file(&cert_path, MAX_PEM_BYTES, |cert| {
            AggregatorKey::from_parts(key, cert.to_string())
        })?;
        let devices = self.path(FLEET_DEVICES);
        let registry = Registry::from_json(
            &read_capped(&devices, MAX_JSON_BYTES)?,
            &devices.display().to_string(),
        )?;
        if registry.fleet != *ca.fleet() {
            return Err(in_file(
                &devices,
                TrustError::WrongFleet {
                    expected: ca.fleet().to_string(),
                    found: registry.fleet.to_string(),
                },
            ));
        }
        Ok(Fleet {
            ca,
            aggregator,
            registry,
        })
    }

    /// What a running aggregator needs, without the CA's key (which can
    /// stay offline: a Kubernetes Secret need not hold it): the CA
    /// certificate, the aggregator's key and certificate.
    pub fn load_service(&self) -> Result<ServiceIdentity, TrustError> {
        let ca_cert = self.path(FLEET_CA_CERT);
        let ca_pem = read_text(&ca_cert, MAX_PEM_BYTES)?;
        let der: rustls_pki_types::CertificateDer<'static> =
            crate::keys::one_pem(ca_pem.as_bytes(), "fleet CA certificate", "CERTIFICATE")
                .map_err(|e| in_file(&ca_cert, e))?;
        let ca = crate::verify::inspect_ca(&der).map_err(|e| in_file(&ca_cert, e))?;
        let key = parse_file(&self.path(FLEET_AGGREGATOR_KEY), MAX_PEM_BYTES, |t| {
            SecretKey::from_hex(t, "aggregator key")
        })?;
        let cert_path = self.path(FLEET_AGGREGATOR_CERT);
        let aggregator = parse_file(&cert_path, MAX_PEM_BYTES, |cert| {
            AggregatorKey::from_parts(key, cert.to_string())
        })?;
        if aggregator.cert().fleet != ca.fleet {
            return Err(in_file(
                &cert_path,
                TrustError::WrongFleet {
                    expected: ca.fleet.to_string(),
                    found: aggregator.cert().fleet.to_string(),
                },
            ));
        }
        Ok(ServiceIdentity {
            fleet: ca.fleet,
            ca_pem,
            aggregator,
        })
    }

    /// Writes `devices.json` and the `revocations.json` it implies.
    pub fn save_registry(&self, registry: &Registry) -> Result<(), TrustError> {
        write_file(
            &self.path(FLEET_REVOCATIONS),
            registry.revocations().to_json().as_bytes(),
            PUBLIC,
        )?;
        write_file(
            &self.path(FLEET_DEVICES),
            registry.to_json().as_bytes(),
            PUBLIC,
        )
    }

    /// Writes [`FLEET_CRL`]: the CA's CRL of every revoked device in
    /// `registry` (empty at `fleet init`, so a broker can have its
    /// `crlfile` from the start). Its CRL number is the Unix time of `now`,
    /// which grows from one CRL to the next as long as the clock does.
    pub fn write_crl(
        &self,
        ca: &FleetCa,
        registry: &Registry,
        now: SystemTime,
    ) -> Result<(), TrustError> {
        let revoked: Vec<_> = registry
            .revocations()
            .revoked
            .into_iter()
            .map(|r| (r.serial, r.revoked_at))
            .collect();
        let number = u64::try_from(crate::unix_secs(now)).unwrap_or(0);
        let crl = ca.crl(&revoked, now, number)?;
        write_file(&self.path(FLEET_CRL), crl.as_bytes(), PUBLIC)
    }

    /// An exclusive lock on `FLEET_DIR/.lock` (released on drop), held
    /// across a read-modify-write of the registry so two enrolments at
    /// once cannot lose one.
    pub fn lock(&self) -> Result<std::fs::File, TrustError> {
        let path = self.path(".lock");
        let write_err = |source| TrustError::Write {
            path: path.clone(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(write_err)?;
        f.lock().map_err(write_err)?;
        Ok(f)
    }

    /// A broker server certificate for `hosts` with a fresh key, written
    /// as [`BROKER_CERT`] and [`BROKER_KEY`] (0600) into `out` (the fleet
    /// directory itself for the embedded broker, or a Mosquitto host's).
    pub fn issue_broker(
        ca: &FleetCa,
        hosts: &[String],
        now: SystemTime,
        out: &Path,
    ) -> Result<crate::IssuedCert, TrustError> {
        let key = SecretKey::generate()?;
        let issued =
            ca.issue_broker(hosts, &key.public(), Validity::days_from(now, BROKER_DAYS))?;
        create_dir(out)?;
        write_file(
            &out.join(BROKER_KEY),
            key.to_pkcs8_pem().as_bytes(),
            PRIVATE,
        )?;
        write_file(&out.join(BROKER_CERT), issued.cert_pem.as_bytes(), PUBLIC)?;
        Ok(issued)
    }

    /// Enrol `name`: a new key and certificate valid for `days`, recorded
    /// in the registry (under the directory lock, before the key is
    /// written: a failed write leaves a device that can be revoked, never a
    /// key the registry lacks), then written as a device bundle to `out`.
    pub fn enroll(
        &self,
        name: &DeviceName,
        out: &Path,
        days: u32,
        now: SystemTime,
    ) -> Result<crate::IssuedCert, TrustError> {
        let mut issued = self.enroll_many(&[(name.clone(), out.to_path_buf())], days, now)?;
        issued.pop().ok_or_else(|| TrustError::Contents {
            what: format!("enrolling {name}"),
            reason: "no certificate was issued".into(),
        })
    }

    /// [`FleetDir::enroll`] for many devices under one lock and one
    /// registry write (provisioning a fleet in bulk: one write per device
    /// would reread and rewrite the whole registry each time). Nothing is
    /// written if any name is taken or any target exists.
    pub fn enroll_many(
        &self,
        devices: &[(DeviceName, std::path::PathBuf)],
        days: u32,
        now: SystemTime,
    ) -> Result<Vec<crate::IssuedCert>, TrustError> {
        let _lock = self.lock()?;
        let mut fleet = self.load()?;
        let mut made = Vec::with_capacity(devices.len());
        for (name, out) in devices {
            fleet.registry.check_new(name)?;
            DeviceBundle::check_target(out)?;
            let (bundle, issued) = DeviceBundle::issue(
                &fleet.ca,
                fleet.aggregator.public(),
                name,
                Validity::days_from(now, days),
            )?;
            fleet.registry.add(crate::DeviceRecord {
                name: name.clone(),
                serial: issued.serial.clone(),
                public_key: public_to_hex(&bundle.key.public()),
                created_at: crate::unix_secs(now),
                not_after: issued.not_after,
                revoked_at: None,
            })?;
            made.push((bundle, out, issued));
        }
        self.save_registry(&fleet.registry)?;
        let mut issued = Vec::with_capacity(made.len());
        for (bundle, out, cert) in made {
            bundle.write_to(out)?;
            issued.push(cert);
        }
        Ok(issued)
    }

    /// `devices.json` alone (what a running aggregator re-reads to learn of
    /// enrolments and revocations; no secret is read).
    pub fn load_registry(&self) -> Result<Registry, TrustError> {
        let path = self.path(FLEET_DEVICES);
        Registry::from_json(
            &read_capped(&path, MAX_JSON_BYTES)?,
            &path.display().to_string(),
        )
    }

    pub fn load_revocations(&self) -> Result<Revocations, TrustError> {
        let path = self.path(FLEET_REVOCATIONS);
        Revocations::from_json(
            &read_capped(&path, MAX_JSON_BYTES)?,
            &path.display().to_string(),
        )
    }
}
