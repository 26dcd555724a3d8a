//! Bad disks: a corrupt store file at start is quarantined (the daemon
//! serves, says so on the status document and in /metrics, and the next
//! start is clean); a full data dir (a real tmpfs of a few MiB) answers new
//! samples 507 while inference goes on, corrupts nothing, and takes samples
//! again once space returns.

use crate::support::*;
use serde_json::{Value, json};
use std::path::Path;

fn digits_rows(n: usize) -> Vec<([f32; 64], u32)> {
    (0..n)
        .map(|i| {
            let mut px = [0.0f32; 64];
            for (j, p) in px.iter_mut().enumerate() {
                *p = ((i * 7 + j * 3) % 17) as f32;
            }
            (px, (i % 10) as u32)
        })
        .collect()
}

/// POST `rows` as samples, 8 a request (the default batch_size); the
/// first answer that is not 200, or the last.
async fn post_samples(d: &TestDaemon, rows: &[([f32; 64], u32)]) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for chunk in rows.chunks(8) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let labels: Vec<u32> = chunk.iter().map(|r| r.1).collect();
        let r = d
            .client
            .post(d.url("/v1/models/digits/samples"))
            .json(&json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}, "labels": labels}))
            .send()
            .await
            .expect("samples");
        let s = r.status().as_u16();
        last = (s, r.json().await.unwrap_or(Value::Null));
        if s != 200 {
            break;
        }
    }
    last
}

async fn infer_ok(d: &TestDaemon) -> bool {
    let (s, _) = d
        .infer(
            "digits",
            &json!({"inputs": {"pixels": {"shape": [1, 64], "data": vec![3.0; 64]}}}),
        )
        .await;
    s == 200
}

fn sample_count(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open the store");
    let check: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .expect("quick_check");
    assert_eq!(check, "ok", "the store file is damaged");
    c.query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_store_is_quarantined_and_the_daemon_serves() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let garbage: Vec<u8> = (0..16384u32).map(|i| (i * 31 + 7) as u8).collect();
    std::fs::write(data.path().join("dai.sqlite"), &garbage).expect("garbage");
    let mut config = test_config(data.path());
    config.daemon.models = vec!["digits".into()];
    let dir = data.path().to_path_buf();
    // The test keeps the data dir (a TestDaemon removes the one it holds).
    let d = TestDaemon::start_with(config.clone(), tempfile::tempdir().expect("tmp")).await;
    assert!(infer_ok(&d).await, "inference serves after the quarantine");
    let status = d.get_json("/v1/status").await;
    let q = &status["store"]["quarantined"];
    assert!(
        q["file"]
            .as_str()
            .is_some_and(|f| f.contains("dai.sqlite.corrupt-")),
        "{status}"
    );
    assert!(
        q["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not a database")),
        "{q}"
    );
    assert!(
        status["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["message"]
                .as_str()
                .is_some_and(|m| m.contains("store file was corrupt")))),
        "{}",
        status["alerts"]
    );
    let metrics = d.get_text("/metrics").await;
    assert!(
        metrics.contains("dai_edge_store_quarantined_files 1"),
        "{metrics}"
    );
    // The quarantined file is kept as it was; the fresh store takes samples.
    let file = q["file"].as_str().expect("file").to_string();
    assert_eq!(std::fs::read(&file).expect("kept"), garbage);
    let (s, b) = post_samples(&d, &digits_rows(4)).await;
    assert_eq!(s, 200, "{b}");
    d.stop().await;
    // No crash loop: the next start finds a sound store and moves nothing.
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("tmp")).await;
    let status = d.get_json("/v1/status").await;
    assert!(status["store"]["quarantined"].is_null(), "{status}");
    assert_eq!(
        status["store"]["quarantined_files"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(sample_count(&dir.join("dai.sqlite")), 4);
    d.stop().await;
    drop(data);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("dai-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_samples_with_507_and_recovers() {
    if std::env::var("DAI_TMPFS_TESTS").as_deref() != Ok("1") {
        println!(
            "SKIPPED a_full_disk_refuses_samples_with_507_and_recovers: set DAI_TMPFS_TESTS=1 (mounts a tmpfs: needs root; .ci/run sets it where mount works)"
        );
        return;
    }
    ensure_zoo();
    let fs = Tmpfs::mount(4);
    let data_dir = fs.0.join("data");
    let mut config = test_config(&data_dir);
    config.daemon.models = vec!["digits".into()];
    config.training.enabled = false;
    let holder = tempfile::tempdir().expect("tmp");
    let d = TestDaemon::start_with(config, holder).await;
    let (s, b) = post_samples(&d, &digits_rows(16)).await;
    assert_eq!(s, 200, "{b}");
    let db = data_dir.join("dai.sqlite");
    let before = sample_count(&db);
    // Fill what is left of the tmpfs.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0xAAu8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = None;
    for _ in 0..400 {
        let (s, b) = post_samples(&d, &digits_rows(8)).await;
        if s != 200 {
            refused = Some((s, b));
            break;
        }
    }
    let (s, b) = refused.expect("a full disk must refuse samples");
    assert_eq!(s, 507, "{b}");
    assert_eq!(b["error"]["code"], "insufficient_storage", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("data dir is full")),
        "{b}"
    );
    assert!(infer_ok(&d).await, "inference goes on with a full disk");
    let during = sample_count(&db);
    assert!(
        during >= before,
        "stored samples were lost: {during} < {before}"
    );
    // Space returns: samples are taken again, and everything stored is there.
    std::fs::remove_file(&filler).expect("free space");
    let (s, b) = post_samples(&d, &digits_rows(16)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(sample_count(&db), during + 16);
    d.stop().await;
}
