//! On-device fine-tuning through the HTTP API on the digits bundle.

use crate::support::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A personalised user: writes 1/7 and 3/8 with each other's labels.
fn personal(label: u32) -> u32 {
    match label {
        1 => 7,
        7 => 1,
        3 => 8,
        8 => 3,
        l => l,
    }
}

fn digits() -> Vec<([f32; 64], u32)> {
    dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits data")
}

fn config(c: &mut dai_config::Config) {
    c.daemon.models = vec!["digits".into()];
    c.training.enabled = false; // runs are started explicitly below
    c.num_epochs = 40;
    c.batch_size = 16;
    c.training.learning_rate = 0.003;
    c.caching_enabled = false;
}

/// Requests carry at most batch_size (16) rows.
async fn accuracy(d: &TestDaemon, rows: &[([f32; 64], u32)]) -> f64 {
    let mut probs = Vec::new();
    for chunk in rows.chunks(16) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let body = json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}});
        let (s, b) = d.infer("digits", &body).await;
        assert_eq!(s, 200, "{b}");
        probs.extend(floats(&b["outputs"]["probs"]["data"]));
    }
    let correct = rows
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            let row = &probs[i * 10..(i + 1) * 10];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k);
            best as u32 == personal(r.1)
        })
        .count();
    correct as f64 / rows.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_tuning_on_personal_labels_raises_held_out_accuracy_and_survives_restart() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut c = test_config(data.path());
    config(&mut c);
    let rows = digits();
    let (train_rows, eval_rows) = (&rows[..400], &rows[1200..1500]);

    let d = TestDaemon::start_with(c.clone(), tempfile::tempdir().expect("unused")).await;
    let before = accuracy(&d, eval_rows).await;

    // 350 samples through /samples (in batches), 50 through inference + /feedback.
    post_digit_samples(&d, &train_rows[..350], personal).await;
    for r in &train_rows[350..] {
        let (s, b) = d
            .infer(
                "digits",
                &json!({"inputs": {"pixels": {"shape": [1, 64], "data": r.0.to_vec()}}}),
            )
            .await;
        assert_eq!(s, 200);
        let id = b["id"].as_str().expect("id").to_string();
        let fb = d
            .client
            .post(d.url("/v1/feedback"))
            .json(&json!({"id": id, "label": personal(r.1)}))
            .send()
            .await
            .expect("feedback");
        assert_eq!(fb.status(), 200, "{}", fb.text().await.unwrap_or_default());
    }
    let (train_n, holdout_n, _) = d.state.store.sample_counts("digits").expect("counts");
    assert_eq!(train_n + holdout_n, 400);
    assert!(holdout_n >= 60, "a hold-out split is kept: {holdout_n}");

    let r = d
        .client
        .post(d.url("/v1/models/digits/train"))
        .send()
        .await
        .expect("train");
    assert_eq!(r.status(), 200);
    let run: Value = r.json().await.expect("json");
    assert_eq!(run["run"]["outcome"], "accepted", "{run}");
    let epochs = run["run"]["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 40);
    assert!(
        run["run"]["val_acc_after"].as_f64() > run["run"]["val_acc_before"].as_f64(),
        "{run}"
    );

    let after = accuracy(&d, eval_rows).await;
    eprintln!("held-out personal accuracy {before:.3} -> {after:.3}");
    assert!(
        after >= before + 0.15,
        "held-out personal accuracy {before:.3} -> {after:.3}"
    );
    let status = d.get_json("/v1/status").await;
    let t = &status["training"]["models"][0];
    assert_eq!(t["model"], "digits");
    assert_eq!(t["head_version"], 1);
    assert_eq!(t["outbox_pending"], 1);

    // The outbox row is a wire-format update (zstd safetensors) with its metadata.
    let outbox = d.state.store.outbox(10).expect("outbox");
    assert_eq!(outbox.len(), 1);
    let update = dai_protocol::update::Update::decode(&outbox[0].payload).expect("wire update");
    assert_eq!(update.meta.model, "digits");
    assert_eq!(update.meta.base_version, "1.0.0");
    assert_eq!(update.meta.sample_count, train_n as u64);
    assert_eq!(update.meta.update_id, outbox[0].update_id);
    assert!(update.norm() > 0.0, "a trained head differs from its base");
    d.stop().await;

    // Restart on the same data dir: the trained head is served again.
    let d = TestDaemon::start_with(c, tempfile::tempdir().expect("unused")).await;
    let (_, b) = d
        .infer(
            "digits",
            &json!({"inputs": {"pixels": {"shape": [1, 64], "data": eval_rows[0].0.to_vec()}}}),
        )
        .await;
    assert_eq!(b["head_version"], 1);
    let again = accuracy(&d, eval_rows).await;
    assert!(
        (again - after).abs() < 1e-9,
        "restored head answers differently: {after} vs {again}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_mid_training_keeps_samples_and_the_last_good_head() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut c = test_config(data.path());
    config(&mut c);
    c.num_epochs = 100_000; // far longer than the test waits
    let rows = digits();
    let d = TestDaemon::start_with(c.clone(), tempfile::tempdir().expect("unused")).await;
    post_digit_samples(&d, &rows[..200], |l| l).await;
    let client = d.client.clone();
    let url = d.url("/v1/models/digits/train");
    let run =
        tokio::spawn(async move { client.post(url).send().await.map(|r| r.status().as_u16()) });
    // Wait until the run is under way, then stop the daemon.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.get_json("/v1/status").await;
        if s["training"]["models"][0]["state"] == "training" {
            break;
        }
        assert!(Instant::now() < deadline, "run never started: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store_path = data.path().to_path_buf();
    d.stop().await;
    let _ = run.await;

    let store = dai_store::Store::open_in(&store_path).expect("store");
    let (t, h, _) = store.sample_counts("digits").expect("counts");
    assert_eq!(t + h, 200, "samples survive");
    assert_eq!(
        store.active_head("digits", "1.0.0").expect("q"),
        None,
        "no half-trained head became active"
    );
    assert!(
        store.outbox(10).expect("outbox").is_empty(),
        "no outbox row for an unfinished run"
    );
    let runs = store.runs("digits", 5).expect("runs");
    assert!(
        matches!(runs[0].outcome.as_str(), "aborted" | "interrupted"),
        "{runs:?}"
    );
    drop(store);

    // And it restarts cleanly, serving the shipped head.
    let d = TestDaemon::start_with(c, tempfile::tempdir().expect("unused")).await;
    let (s, b) = d
        .infer(
            "digits",
            &json!({"inputs": {"pixels": {"shape": [1, 64], "data": rows[0].0.to_vec()}}}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["head_version"], 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_samples_are_refused() {
    let d = TestDaemon::start(config).await;
    let px = vec![1.0f32; 64];
    let post = |body: Value, path: &'static str| {
        let client = d.client.clone();
        let url = d.url(path);
        async move {
            let r = client.post(url).json(&body).send().await.expect("post");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, b) = post(
        json!({"inputs": {"pixels": {"shape": [1, 64], "data": px}}, "label": 12}),
        "/v1/models/digits/samples",
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("label 12 out of range 0..10"),
        "{b}"
    );
    let (s, b) = post(
        json!({"inputs": {"pixels": {"shape": [1, 64], "data": px}}}),
        "/v1/models/digits/samples",
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = post(json!({"id": "nope", "label": 1}), "/v1/feedback").await;
    assert_eq!(s, 404, "{b}");
    let (s, _) = post(
        json!({"inputs": {"input": {"shape": [1, 576], "data": vec![0.0; 576]}}, "label": 0}),
        "/v1/models/silero-vad/samples",
    )
    .await;
    assert_eq!(s, 404, "silero-vad is not loaded in this daemon");
    let (t, h, _) = d.state.store.sample_counts("digits").expect("counts");
    assert_eq!(t + h, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_refuses_new_samples_and_loses_none() {
    let d = TestDaemon::start(config).await;
    let rows = digits();
    let post = |r: &([f32; 64], u32)| {
        let body =
            json!({"inputs": {"pixels": {"shape": [1, 64], "data": r.0.to_vec()}}, "label": r.1});
        let (client, url) = (d.client.clone(), d.url("/v1/models/digits/samples"));
        async move {
            let resp = client.post(url).json(&body).send().await.expect("post");
            let s = resp.status().as_u16();
            (s, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for r in &rows[..5] {
        assert_eq!(post(r).await.0, 200);
    }
    // Another process-like writer holds the database exclusively for longer
    // than the store's busy timeout.
    let path = d.state.store.path().to_path_buf();
    let locker = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        std::thread::sleep(Duration::from_secs(7));
        conn.execute_batch("COMMIT").expect("unlock");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, b) = post(&rows[5]).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["error"]["code"], "store_unavailable");
    locker.join().expect("locker");
    let (s, _) = post(&rows[6]).await;
    assert_eq!(s, 200, "the store recovers once the lock is gone");
    let (t, h, _) = d.state.store.sample_counts("digits").expect("counts");
    assert_eq!(
        t + h,
        6,
        "the five earlier samples and the one after the lock are all there"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_trains_by_itself_and_a_reload_keeps_the_trained_head() {
    let models = tempfile::tempdir().expect("tmp");
    let bundle = copy_bundle("digits", models.path());
    let dir = models.path().to_path_buf();
    let d = TestDaemon::start(move |c| {
        config(c);
        c.daemon.models_dir = dir;
        c.daemon.hot_reload_interval_sec = 1;
        c.training.enabled = true;
        c.training.check_interval_sec = 1;
        c.training.min_new_samples = 20;
        c.training.max_cpu_percent = 100.0;
        c.num_epochs = 10;
    })
    .await;
    let rows = digits();
    post_digit_samples(&d, &rows[..96], personal).await;
    let head_version = |s: &Value| {
        s["training"]["models"][0]["head_version"]
            .as_i64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = d.get_json("/v1/status").await;
        let last = &s["training"]["models"][0]["last_run"];
        if last["outcome"].is_string() && last["outcome"] != "running" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler never ran: {}",
            s["training"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let trained = head_version(&status);
    assert_eq!(
        status["training"]["models"][0]["last_run"]["outcome"], "accepted",
        "{}",
        status["training"]
    );
    assert_eq!(trained, 1);
    assert_eq!(
        status["training"]["models"][0]["samples"]["new_since_last_run"],
        0
    );

    // Touch the bundle: it is reloaded, and the trained head is served again.
    let loaded_at = d.get_json("/v1/models/digits").await["loaded_at"]
        .as_f64()
        .expect("loaded_at");
    let manifest = std::fs::read(bundle.join("manifest.toml")).expect("read");
    std::fs::write(
        bundle.join("manifest.toml"),
        [manifest.as_slice(), b"\n"].concat(),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = d.get_json("/v1/models/digits").await;
        if m["loaded_at"].as_f64().expect("loaded_at") > loaded_at {
            break;
        }
        assert!(Instant::now() < deadline, "bundle never reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, b) = d
        .infer(
            "digits",
            &json!({"inputs": {"pixels": {"shape": [1, 64], "data": rows[0].0.to_vec()}}}),
        )
        .await;
    assert_eq!(
        b["head_version"], trained,
        "a reload must not fall back to the shipped head"
    );
    // An answer can be labelled once.
    let id = b["id"].as_str().expect("id").to_string();
    for expect in [200, 404] {
        let r = d
            .client
            .post(d.url("/v1/feedback"))
            .json(&json!({"id": id, "label": 1}))
            .send()
            .await
            .expect("feedback");
        assert_eq!(r.status().as_u16(), expect);
    }
    d.stop().await;
}

/// Label-flipped posts shape the posted hold-out too, so it approves the
/// run; the bundle's own validation rows do not move, and the run is
/// rejected with the reason. A personal convention (four classes
/// relabelled) stays within `training.max_validation_drop` and is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_flipped_posts_cannot_pass_the_bundles_validation_rows() {
    let d = TestDaemon::start(config).await;
    let rows = digits();
    post_digit_samples(&d, &rows[..300], |l| 9 - l).await;
    let r = d
        .client
        .post(d.url("/v1/models/digits/train"))
        .send()
        .await
        .expect("train");
    let run: Value = r.json().await.expect("json");
    let run = &run["run"];
    assert_eq!(run["outcome"], "rejected", "{run}");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the bundle's validation accuracy would fall"),
        "{run}"
    );
    assert!(
        run["val_acc_after"].as_f64() > run["val_acc_before"].as_f64(),
        "the flipped hold-out alone would have approved it: {run}"
    );
    let d2 = TestDaemon::start(config).await;
    post_digit_samples(&d2, &rows[..300], personal).await;
    let r = d2
        .client
        .post(d2.url("/v1/models/digits/train"))
        .send()
        .await
        .expect("train");
    let run: Value = r.json().await.expect("json");
    assert_eq!(run["run"]["outcome"], "accepted", "{run}");
    d.stop().await;
    d2.stop().await;
}

/// Local DP: the uploaded delta is clipped and noised on the device (its
/// norm is the noise's, far above the clip), the device keeps serving its
/// own trained head, and the release is accounted: /v1/status and
/// /metrics say the epsilon one Gaussian release with that noise costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dp_noises_the_upload_and_accounts_for_it() {
    let d = TestDaemon::start(|c| {
        config(c);
        c.cloud.local_dp.noise_multiplier = 2.0;
        c.cloud.local_dp.clip_norm = 0.5;
    })
    .await;
    let rows = digits();
    post_digit_samples(&d, &rows[..300], personal).await;
    let r = d
        .client
        .post(d.url("/v1/models/digits/train"))
        .send()
        .await
        .expect("train");
    let run: Value = r.json().await.expect("json");
    assert_eq!(run["run"]["outcome"], "accepted", "{run}");
    let out = d.state.store.outbox(10).expect("outbox");
    assert_eq!(out.len(), 1);
    let u = dai_protocol::update::Update::decode(&out[0].payload).expect("update");
    let values: usize = u.tensors.iter().map(|t| t.values.len()).sum();
    // Noise of std 2 x 0.5 = 1 per value: the norm is about sqrt(values).
    let norm = u.norm();
    assert!(
        norm > 0.5 * (values as f64).sqrt(),
        "norm {norm} of {values} values: not noised"
    );
    let t = d.get_json("/v1/status").await["training"]["models"][0].clone();
    let dp = &t["local_dp"];
    let mut a = dai_protocol::dp::Accountant::default();
    a.compose(1.0, 2.0, 1);
    let want = a.epsilon(1e-5).0;
    assert_eq!(dp["releases"], 1, "{t}");
    assert!(
        (dp["epsilon"].as_f64().expect("epsilon") - want).abs() < 1e-9,
        "{dp}"
    );
    let m = d.get_text("/metrics").await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("dai_edge_local_dp_epsilon{model=\"digits\"}")),
        "{m}"
    );
    d.stop().await;
}
