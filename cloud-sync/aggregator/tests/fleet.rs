//! Fleet identity as an operator runs it, through the real `dai-cloud`
//! binary: `fleet init`, `devices add|list|revoke`, and the bundle it
//! writes verified against the fleet CA with `dai_trust`.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

fn dai_cloud(args: &[&str], fleet_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
        .args(args)
        .env("DAI_FLEET_DIR", fleet_dir)
        .output()
        .expect("run dai-cloud")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_enrol_list_revoke() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet = tmp.path().join("fleet");
    let f = fleet.to_str().expect("utf-8 path");
    ok(dai_cloud(
        &["fleet", "init", "--dir", f, "--fleet", "lab"],
        &fleet,
    ));
    for file in [
        "ca.pem",
        "ca.key.pem",
        "aggregator.key",
        "aggregator.pub",
        "aggregator.pem",
    ] {
        assert!(fleet.join(file).is_file(), "{file}");
    }

    let again = dai_cloud(&["fleet", "init", "--dir", f, "--fleet", "lab"], &fleet);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    let bad = dai_cloud(
        &["fleet", "init", "--dir", f, "--fleet", "a/b", "--force"],
        &fleet,
    );
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("fleet name \"a/b\""),
        "{}",
        stderr(&bad)
    );

    // The aggregator's and the broker's certificate names are not device
    // names (a broker that knows clients by CN would give such a device
    // the aggregator's rights).
    for reserved in ["dai-cloud", "broker"] {
        let out = tmp.path().join(reserved);
        let refused = dai_cloud(
            &[
                "devices",
                "add",
                reserved,
                "--out",
                out.to_str().expect("path"),
            ],
            &fleet,
        );
        assert_eq!(refused.status.code(), Some(64), "{}", stderr(&refused));
        assert!(
            stderr(&refused).contains("reserved"),
            "{}",
            stderr(&refused)
        );
        assert!(!out.exists());
    }
    for name in ["cam-1", "cam-2"] {
        let out = tmp.path().join(name);
        let text = ok(dai_cloud(
            &["devices", "add", name, "--out", out.to_str().expect("path")],
            &fleet,
        ));
        assert!(text.contains(&format!("enrolled {name}")), "{text}");
    }

    let list: Value =
        serde_json::from_str(&ok(dai_cloud(&["devices", "list", "--json"], &fleet))).expect("json");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["cam-1", "cam-2"]);
    assert!(list[0]["revoked_at"].is_null());
    assert_eq!(list[0]["public_key"].as_str().map(str::len), Some(64));

    let text = ok(dai_cloud(&["devices", "revoke", "cam-2"], &fleet));
    assert!(text.contains("revoked cam-2"), "{text}");
    let list: Value =
        serde_json::from_str(&ok(dai_cloud(&["devices", "list", "--json"], &fleet))).expect("json");
    assert!(list[0]["revoked_at"].is_null());
    assert!(list[1]["revoked_at"].as_i64().is_some(), "{list}");
    let table = ok(dai_cloud(&["devices", "list"], &fleet));
    let row = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(n))
            .expect("row")
            .to_string()
    };
    assert!(row("cam-1").ends_with("active"), "{table}");
    assert!(row("cam-2").contains("revoked 20"), "{table}");
    let revs = std::fs::read(fleet.join("revocations.json")).expect("revocations");
    let revs = dai_trust::Revocations::from_json(&revs, "revocations.json").expect("parse");
    assert_eq!(revs.revoked.len(), 1);
    assert_eq!(revs.revoked[0].name.as_str(), "cam-2");
    assert_eq!(
        revs.revoked[0].serial.to_string(),
        list[1]["serial"].as_str().expect("serial")
    );

    let dup_out = tmp.path().join("dup");
    let dup = dai_cloud(
        &[
            "devices",
            "add",
            "cam-1",
            "--out",
            dup_out.to_str().expect("path"),
        ],
        &fleet,
    );
    assert_eq!(dup.status.code(), Some(1), "{}", stderr(&dup));
    assert!(
        stderr(&dup).contains("device \"cam-1\" is already enrolled"),
        "{}",
        stderr(&dup)
    );
    assert!(!dup_out.exists(), "no bundle for a refused device");

    let bad = dai_cloud(&["devices", "add", "cam/3", "--out", "x"], &fleet);
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("device name \"cam/3\""),
        "{}",
        stderr(&bad)
    );
    let unknown = dai_cloud(&["devices", "revoke", "cam-9"], &fleet);
    assert_eq!(unknown.status.code(), Some(1), "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("device \"cam-9\" is not enrolled"));
    let no_dir = Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
        .args(["devices", "list"])
        .env_remove("DAI_FLEET_DIR")
        .output()
        .expect("run");
    assert_eq!(no_dir.status.code(), Some(64), "{}", stderr(&no_dir));
    let flag = dai_cloud(&["devices", "add"], &fleet);
    assert_eq!(
        flag.status.code(),
        Some(64),
        "clap refusals are usage errors too"
    );

    // The bundle verifies against the fleet CA, names its device, and its
    // key is the one the certificate and the registry hold.
    let bundle = dai_trust::DeviceBundle::read_from(&tmp.path().join("cam-1")).expect("bundle");
    let ca = std::fs::read_to_string(fleet.join("ca.pem")).expect("ca");
    let name =
        dai_trust::verify_device_cert(&ca, &bundle.cert_pem, SystemTime::now()).expect("verifies");
    assert_eq!(name.as_str(), "cam-1");
    assert_eq!(bundle.fleet.as_str(), "lab");
    bundle.verify(SystemTime::now()).expect("key matches");
    assert_eq!(
        list[0]["public_key"].as_str(),
        Some(hex::encode(bundle.key.public_bytes()).as_str())
    );
    let aggregator = std::fs::read_to_string(fleet.join("aggregator.pub")).expect("pub");
    assert_eq!(
        dai_protocol::global::verifying_key_from_hex(&aggregator).expect("hex"),
        bundle.aggregator_public_key
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            tmp.path().join("cam-1/device.key.pem"),
            fleet.join("ca.key.pem"),
            fleet.join("aggregator.key"),
        ] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
    }
}

/// `openssl crl -text` of `crl`, its signature verified against `ca`
/// (`None`, the caller prints SKIPPED, without an openssl binary).
fn openssl_crl(crl: &Path, ca: &Path) -> Option<String> {
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(crl)
        .arg("-CAfile")
        .arg(ca)
        .output()
        .ok()?;
    assert!(
        out.status.success() && stderr(&out).contains("verify OK"),
        "openssl crl: {}",
        stderr(&out)
    );
    Some(String::from_utf8(out.stdout).expect("utf-8"))
}

/// `fleet init` writes an empty CRL signed by the fleet CA, `devices
/// revoke` rewrites it with the revoked serial, and `fleet crl` writes it
/// again where it is missing.
#[test]
fn the_crl_lists_revoked_devices() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet = tmp.path().join("fleet");
    let f = fleet.to_str().expect("utf-8 path");
    ok(dai_cloud(
        &["fleet", "init", "--dir", f, "--fleet", "lab"],
        &fleet,
    ));
    let (crl, ca) = (fleet.join("crl.pem"), fleet.join("ca.pem"));
    let pem = std::fs::read_to_string(&crl).expect("fleet init writes crl.pem");
    assert!(pem.starts_with("-----BEGIN X509 CRL-----\n"), "{pem}");
    let Some(text) = openssl_crl(&crl, &ca) else {
        eprintln!("SKIPPED the_crl_lists_revoked_devices: no openssl binary");
        return;
    };
    assert!(text.contains("No Revoked Certificates"), "{text}");
    assert!(
        text.contains("Issuer: O = lab, CN = dai fleet CA"),
        "{text}"
    );

    for name in ["cam-1", "cam-2"] {
        let out = tmp.path().join(name);
        ok(dai_cloud(
            &["devices", "add", name, "--out", out.to_str().expect("path")],
            &fleet,
        ));
    }
    let said = ok(dai_cloud(&["devices", "revoke", "cam-2"], &fleet));
    assert!(said.contains("crl.pem") && said.contains("HUP"), "{said}");
    let list: Value =
        serde_json::from_str(&ok(dai_cloud(&["devices", "list", "--json"], &fleet))).expect("json");
    let serial = |i: usize| {
        list[i]["serial"]
            .as_str()
            .expect("serial")
            .to_ascii_uppercase()
    };
    let listed = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Serial Number: "))
            .map(str::to_string)
            .collect()
    };
    let text = openssl_crl(&crl, &ca).expect("openssl");
    assert_eq!(listed(&text), [serial(1)], "{text}");

    std::fs::remove_file(&crl).expect("rm crl.pem");
    let said = ok(dai_cloud(&["fleet", "crl", "--dir", f], &fleet));
    assert!(said.contains("1 revoked"), "{said}");
    let text = openssl_crl(&crl, &ca).expect("openssl");
    assert_eq!(listed(&text), [serial(1)], "{text}");
    assert_ne!(serial(0), serial(1));
}
