//! `keygen` and `models list|promote|rollback`: keys for the
//! `--insecure-plaintext` mode and the version registry of a state file.

use super::*;

pub(super) fn keygen(dir: &Path) -> anyhow::Result<()> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sk = dir.join("aggregator.key");
    std::fs::write(&sk, hex::encode(key.to_bytes()))
        .with_context(|| format!("writing {}", sk.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o600))?;
    }
    let pk = dir.join("aggregator.pub");
    std::fs::write(&pk, hex::encode(key.verifying_key().to_bytes()))?;
    println!(
        "wrote {} (secret) and {} (give this to the edges)",
        sk.display(),
        pk.display()
    );
    Ok(())
}

pub(super) fn models(state: &Path, action: ModelsAction) -> anyhow::Result<()> {
    match action {
        ModelsAction::Publish {
            bundle,
            devices,
            group,
            wait,
        } => return super::publish::publish(state, &bundle, devices, group, wait),
        ModelsAction::Bundles { json } => return super::publish::bundles(state, json),
        _ => {}
    }
    if !state.is_file() {
        bail!(
            "{}: no such state file (pass --state, the file `dai-cloud run` writes)",
            state.display()
        );
    }
    let mut s = State::open(state).with_context(|| format!("opening {}", state.display()))?;
    match action {
        ModelsAction::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&s.versions()?)?);
        }
        ModelsAction::List { json: false } => print_versions(&s)?,
        ModelsAction::Promote {
            model,
            version,
            reason,
        } => {
            let g = s.promote(&model, version, &reason)?;
            println!(
                "{model}: version {} now carries the weights of version {version} (parent {})",
                g.version, g.parent
            );
        }
        ModelsAction::Rollback { model } => {
            let g = s.rollback(&model)?;
            println!(
                "{model}: rolled back; version {} carries the weights of version {}",
                g.version, g.metrics["promoted_from"]
            );
        }
        ModelsAction::Publish { .. } | ModelsAction::Bundles { .. } => {}
    }
    Ok(())
}

/// The registry as a table.
fn print_versions(s: &State) -> anyhow::Result<()> {
    println!(
        "{:<16} {:>8} {:>8} {:>20} {:>8} {:>8} {:>9}  note",
        "model", "version", "parent", "created (UTC)", "updates", "samples", "loss"
    );
    for v in s.versions()? {
        let m = &v.metrics;
        let note = match m.get("promoted_from") {
            Some(from) => format!("weights of v{from}: {}", m["reason"].as_str().unwrap_or("")),
            None if v.parent.is_none() => "base".into(),
            None => String::new(),
        };
        println!(
            "{:<16} {:>8} {:>8} {:>20} {:>8} {:>8} {:>9}  {note}",
            v.model,
            v.version,
            v.parent.map_or("-".into(), |p| p.to_string()),
            utc(v.created_at),
            v.updates(),
            m.get("samples").map_or("-".into(), |x| x.to_string()),
            m.get("mean_loss")
                .and_then(|x| x.as_f64())
                .map_or("-".into(), |x| format!("{x:.4}")),
        );
    }
    Ok(())
}

/// `2026-11-27 04:28:00` from Unix seconds (UTC, no time-zone database).
fn utc(ts: f64) -> String {
    let secs = ts.max(0.0) as i64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(utc(1_798_345_680.0), "2026-12-27 04:28:00");
        assert_eq!(utc(-5.0), "1970-01-01 00:00:00");
    }
}
