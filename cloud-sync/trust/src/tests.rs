//! Real certificates end to end: issue, verify, refuse, write, read, and
//! what rustls (ring provider) makes of them.

use crate::fs::{BUNDLE_KEY, FleetDir};
use crate::*;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const DAY: Duration = Duration::from_secs(86_400);

fn fleet(name: &str) -> FleetCa {
    FleetCa::generate(
        FleetName::parse(name).expect("fleet name"),
        Validity::days_from(SystemTime::now(), 3650),
    )
    .expect("CA")
}

fn device(ca: &FleetCa, name: &str, validity: Validity) -> (SecretKey, IssuedCert) {
    let key = SecretKey::generate().expect("key");
    let name = DeviceName::parse(name).expect("name");
    let cert = ca
        .issue_device(&name, &key.public(), validity)
        .expect("issue");
    (key, cert)
}

fn now_for(days: u32) -> Validity {
    Validity::days_from(SystemTime::now(), days)
}

#[test]
fn a_device_cert_from_the_fleet_ca_verifies_and_names_its_device() {
    let ca = fleet("lab");
    let (key, cert) = device(&ca, "cam-1", now_for(365));
    let name = verify_device_cert(ca.cert_pem(), &cert.cert_pem, SystemTime::now()).expect("ok");
    assert_eq!(name.as_str(), "cam-1");
    let peer = verify_peer_cert(
        ca.cert_pem(),
        &cert.cert_pem,
        SystemTime::now(),
        Role::Device,
    )
    .expect("peer");
    assert_eq!(peer.fleet.as_str(), "lab");
    assert_eq!(peer.serial, cert.serial);
    assert_eq!(peer.public_key, key.public_bytes());
    assert!(peer.not_after - peer.not_before >= 365 * 86_400);

    // The device certificate's authority key identifier is the CA's
    // subject key identifier (what OpenSSL-based brokers chain by).
    use x509_parser::extensions::ParsedExtension;
    let ext = |pem: &str, want_ski: bool| -> Vec<u8> {
        let der: rustls_pki_types::CertificateDer<'_> =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("der");
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        x.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) if want_ski => Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) if !want_ski => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .expect("key identifier")
    };
    let ski = ext(ca.cert_pem(), true);
    assert_eq!(ski.len(), 20);
    assert_eq!(ext(&cert.cert_pem, false), ski);
}

#[test]
fn a_cert_from_another_ca_is_refused() {
    let ours = fleet("lab");
    let theirs = fleet("lab");
    let (_, cert) = device(&theirs, "cam-1", now_for(365));
    let e = verify_device_cert(ours.cert_pem(), &cert.cert_pem, SystemTime::now())
        .expect_err("foreign CA");
    assert!(matches!(e, TrustError::Untrusted { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the certificate does not chain to the fleet CA"
    );
}

#[test]
fn expired_and_not_yet_valid_certs_are_refused() {
    let ca = fleet("lab");
    let now = SystemTime::now();
    let past = Validity {
        not_before: now - 30 * DAY,
        not_after: now - DAY,
    };
    let (_, old) = device(&ca, "cam-old", past);
    let e = verify_device_cert(ca.cert_pem(), &old.cert_pem, now).expect_err("expired");
    assert!(matches!(e, TrustError::Expired { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("the certificate expired at 20"),
        "{e}"
    );
    let future = Validity {
        not_before: now + DAY,
        not_after: now + 30 * DAY,
    };
    let (_, early) = device(&ca, "cam-early", future);
    let e = verify_device_cert(ca.cert_pem(), &early.cert_pem, now).expect_err("early");
    assert!(matches!(e, TrustError::NotYetValid { .. }), "{e:?}");
    let empty = Validity {
        not_before: now,
        not_after: now,
    };
    let key = SecretKey::generate().expect("key");
    let name = DeviceName::parse("x").expect("name");
    assert!(matches!(
        ca.issue_device(&name, &key.public(), empty),
        Err(TrustError::Validity)
    ));
}

#[test]
fn a_tampered_cert_is_refused() {
    let ca = fleet("lab");
    let (_, cert) = device(&ca, "cam-1", now_for(365));
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateDer<'_>| d.to_vec())
        .expect("der");
    // Rename the device inside the signed part: the CN bytes "cam-1" -> "cam-2".
    let at = der
        .windows(5)
        .position(|w| w == b"cam-1")
        .expect("name in the DER");
    let mut renamed = der.clone();
    renamed[at + 4] = b'2';
    // And flip one bit of the signature (the last byte).
    let mut bad_sig = der.clone();
    *bad_sig.last_mut().expect("bytes") ^= 1;
    for tampered in [renamed, bad_sig] {
        let pem = keys::pem_encode("CERTIFICATE", &tampered);
        let e = verify_device_cert(ca.cert_pem(), &pem, SystemTime::now()).expect_err("tampered");
        assert!(matches!(e, TrustError::Untrusted { .. }), "{e:?}");
    }
    let e = verify_device_cert(ca.cert_pem(), "not a certificate", SystemTime::now())
        .expect_err("junk");
    assert_eq!(
        e.to_string(),
        "certificate: expected exactly one PEM block labelled CERTIFICATE, found 0 blocks"
    );
    let e = verify_device_cert(ca.cert_pem(), &ca.key_pem(), SystemTime::now()).expect_err("a key");
    assert!(
        e.to_string()
            .starts_with("certificate: expected a PEM block labelled CERTIFICATE, found a"),
        "{e}"
    );
}

#[test]
fn invalid_names_are_refused_and_roles_kept_apart() {
    let ca = fleet("lab");
    let key = SecretKey::generate().expect("key");
    for bad in ["a/b", "dev+", "#", "", "with space"] {
        assert!(DeviceName::parse(bad).is_err(), "{bad:?}");
        let e = ca
            .issue(Role::Device, bad, &key.public(), now_for(1))
            .expect_err(bad);
        assert!(matches!(e, TrustError::InvalidName { .. }), "{e:?}");
    }
    let agg = AggregatorKey::generate(&ca, now_for(365)).expect("aggregator");
    assert_eq!(agg.cert().name, ca::AGGREGATOR_NAME);
    let e = verify_device_cert(ca.cert_pem(), agg.cert_pem(), SystemTime::now())
        .expect_err("aggregator is no device");
    assert_eq!(
        e.to_string(),
        "the certificate's role is aggregator, expected device"
    );
    let peer = verify_peer_cert(
        ca.cert_pem(),
        agg.cert_pem(),
        SystemTime::now(),
        Role::Aggregator,
    )
    .expect("aggregator cert");
    assert_eq!(peer.public_key, agg.public().to_bytes());
}

#[test]
fn the_ca_reads_back_and_keeps_issuing() {
    let ca = fleet("lab");
    let back = FleetCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("read back");
    assert_eq!(back.fleet().as_str(), "lab");
    let (_, cert) = device(&back, "cam-9", now_for(30));
    verify_device_cert(ca.cert_pem(), &cert.cert_pem, SystemTime::now()).expect("same CA");
    let other = fleet("lab");
    let e = FleetCa::from_pem(ca.cert_pem(), &other.key_pem()).expect_err("wrong key");
    assert!(matches!(e, TrustError::KeyMismatch { .. }), "{e:?}");
}

#[test]
fn bundle_write_read_round_trip_with_private_key_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = fleet("lab");
    let agg = AggregatorKey::generate(&ca, now_for(365)).expect("aggregator");
    let name = DeviceName::parse("cam-1").expect("name");
    let (bundle, issued) =
        DeviceBundle::issue(&ca, agg.public(), &name, now_for(365)).expect("bundle");
    let out = dir.path().join("cam-1");
    bundle.write_to(&out).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join(BUNDLE_KEY))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let back = DeviceBundle::read_from(&out).expect("read");
    assert_eq!(back.device, name);
    assert_eq!(back.fleet.as_str(), "lab");
    assert_eq!(back.cert_pem, issued.cert_pem);
    assert_eq!(back.ca_pem, ca.cert_pem());
    assert_eq!(back.aggregator_public_key, agg.public());
    assert_eq!(back.key.public_bytes(), bundle.key.public_bytes());
    assert_eq!(
        back.verify(SystemTime::now()).expect("whole").serial,
        issued.serial
    );
    let e = bundle.write_to(&out).expect_err("no overwrite");
    assert!(matches!(e, TrustError::Exists { .. }), "{e:?}");

    std::fs::write(out.join(BUNDLE_KEY), "junk").expect("spoil");
    let e = DeviceBundle::read_from(&out).expect_err("bad key");
    let msg = format!("{}: {}", e, std::error::Error::source(&e).expect("cause"));
    assert!(
        msg.ends_with(&format!(
            "{}: device key: expected exactly one PEM block labelled PRIVATE KEY, found 0 blocks",
            BUNDLE_KEY
        )),
        "{msg}"
    );
    std::fs::write(out.join(BUNDLE_KEY), vec![b'A'; 70_000]).expect("big");
    let e = DeviceBundle::read_from(&out).expect_err("too big");
    assert!(
        matches!(e, TrustError::TooLarge { size: 70_000, .. }),
        "{e:?}"
    );
}

#[test]
fn a_bundle_with_someone_elses_key_is_refused() {
    let ca = fleet("lab");
    let name = DeviceName::parse("cam-1").expect("name");
    let agg = SecretKey::generate().expect("agg").public();
    let (mut bundle, _) = DeviceBundle::issue(&ca, agg, &name, now_for(30)).expect("bundle");
    bundle.key = SecretKey::generate().expect("other");
    let e = bundle.verify(SystemTime::now()).expect_err("key swapped");
    assert!(matches!(e, TrustError::KeyMismatch { .. }), "{e:?}");
}

#[test]
fn registry_and_revocations_round_trip() {
    let ca = fleet("lab");
    let mut reg = Registry::new(ca.fleet().clone());
    let mut serials = Vec::new();
    for n in ["cam-1", "cam-2"] {
        let (key, cert) = device(&ca, n, now_for(30));
        serials.push(cert.serial.clone());
        reg.add(DeviceRecord {
            name: DeviceName::parse(n).expect("name"),
            serial: cert.serial,
            public_key: keys::public_to_hex(&key.public()),
            created_at: 1_796_000_000,
            not_after: cert.not_after,
            revoked_at: None,
        })
        .expect("add");
    }
    let dup = reg.devices[0].clone();
    let e = reg.add(dup).expect_err("duplicate");
    assert!(
        e.to_string()
            .starts_with("device \"cam-1\" is already enrolled"),
        "{e}"
    );
    assert!(reg.revoke("cam-2", 1_796_100_000).expect("revoke"));
    assert!(!reg.revoke("cam-2", 1_796_200_000).expect("again"));
    assert!(matches!(
        reg.revoke("cam-3", 0),
        Err(TrustError::UnknownDevice { .. })
    ));
    let back = Registry::from_json(reg.to_json().as_bytes(), "devices.json").expect("json");
    assert_eq!(back, reg);

    let revs = reg.revocations();
    let text = revs.to_json();
    let revs = Revocations::from_json(text.as_bytes(), "revocations.json").expect("read");
    assert_eq!(revs.revoked.len(), 1);
    assert_eq!(revs.revoked[0].revoked_at, 1_796_100_000);
    assert!(revs.is_revoked("cam-2", &serials[1]));
    assert!(
        revs.is_revoked("cam-2", &serials[0]),
        "a revoked name stays revoked"
    );
    assert!(revs.is_revoked("other", &serials[1]), "so does its serial");
    assert!(!revs.is_revoked("cam-1", &serials[0]));

    let e = Revocations::from_json(
        br#"{"version": 2, "fleet": "lab", "revoked": []}"#,
        "r.json",
    )
    .expect_err("version");
    assert_eq!(e.to_string(), "r.json: version 2, expected 1");
    let e = Registry::from_json(
        br#"{"version": 1, "fleet": "a/b", "devices": []}"#,
        "d.json",
    )
    .expect_err("bad fleet");
    assert_eq!(e.to_string(), "d.json: not the expected JSON document");
}

#[test]
fn fleet_dir_init_load_and_refuse_overwrite() {
    let dir = tempfile::tempdir().expect("tmp");
    let fd = FleetDir::new(dir.path().join("fleet"));
    let now = SystemTime::now();
    let made = fd
        .init(FleetName::parse("lab").expect("fleet"), now, false)
        .expect("init");
    let back = fd.load().expect("load");
    assert_eq!(back.ca.cert_pem(), made.ca.cert_pem());
    assert_eq!(back.aggregator.public(), made.aggregator.public());
    assert!(back.registry.devices.is_empty());
    assert!(
        fd.load_revocations()
            .expect("revocations")
            .revoked
            .is_empty()
    );
    // `dai-cloud run --key` reads the aggregator key as before.
    let hex = std::fs::read_to_string(fd.path(fs::FLEET_AGGREGATOR_KEY)).expect("key");
    let sk = dai_protocol::global::signing_key_from_hex(&hex).expect("hex key");
    assert_eq!(sk.verifying_key(), made.aggregator.public());
    let e = fd
        .init(FleetName::parse("lab").expect("fleet"), now, false)
        .expect_err("exists");
    assert!(matches!(e, TrustError::Exists { .. }), "{e:?}");
    let again = fd
        .init(FleetName::parse("lab2").expect("fleet"), now, true)
        .expect("forced");
    assert_ne!(again.ca.cert_pem(), made.ca.cert_pem());
}

/// rustls 0.23 with the ring provider, as the broker side of mTLS will be:
/// a `WebPkiClientVerifier` built from the fleet CA accepts a device's
/// Ed25519 certificate, refuses one from another CA, and the device's
/// PKCS#8 key loads as a rustls signing key that offers Ed25519.
#[test]
fn rustls_accepts_the_device_chain_for_client_auth() {
    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = fleet("lab");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der"))
        .expect("root");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    assert!(
        verifier
            .supported_verify_schemes()
            .contains(&rustls::SignatureScheme::ED25519)
    );

    let (key, cert) = device(&ca, "cam-1", now_for(30));
    let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).expect("der");
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .expect("rustls accepts the device certificate");

    let (_, foreign) = device(&fleet("lab"), "cam-1", now_for(30));
    let foreign = CertificateDer::from_pem_slice(foreign.cert_pem.as_bytes()).expect("der");
    assert!(
        verifier
            .verify_client_cert(&foreign, &[], UnixTime::now())
            .is_err()
    );

    let key_der = PrivateKeyDer::from_pem_slice(key.to_pkcs8_pem().as_bytes()).expect("key");
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .expect("ring loads the Ed25519 PKCS#8 key");
    assert_eq!(signing.algorithm(), rustls::SignatureAlgorithm::ED25519);
    assert!(
        signing
            .choose_scheme(&[rustls::SignatureScheme::ED25519])
            .is_some()
    );
}

#[test]
fn enroll_many_writes_every_bundle_with_one_registry_or_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let fd = FleetDir::new(dir.path().join("fleet"));
    let now = SystemTime::now();
    fd.init(FleetName::parse("lab").expect("fleet"), now, false)
        .expect("init");
    let batch = |names: &[&str]| -> Vec<(DeviceName, std::path::PathBuf)> {
        names
            .iter()
            .map(|n| (DeviceName::parse(n).expect("name"), dir.path().join(n)))
            .collect()
    };
    let issued = fd
        .enroll_many(&batch(&["d-1", "d-2", "d-3"]), 30, now)
        .expect("enrol");
    assert_eq!(issued.len(), 3);
    let reg = fd.load_registry().expect("registry");
    assert_eq!(reg.devices.len(), 3);
    for n in ["d-1", "d-2", "d-3"] {
        let b = crate::DeviceBundle::read_from(&dir.path().join(n)).expect("bundle");
        b.verify(now).expect("a valid bundle");
    }
    // One taken name: nothing of the batch is written.
    let e = fd
        .enroll_many(&batch(&["d-4", "d-2"]), 30, now)
        .expect_err("d-2 is taken");
    assert!(e.to_string().contains("d-2"), "{e}");
    assert_eq!(fd.load_registry().expect("registry").devices.len(), 3);
    assert!(!dir.path().join("d-4").exists());
}
