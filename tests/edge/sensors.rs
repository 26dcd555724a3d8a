//! Sensors end to end: a simulated IMU sampled by the daemon, windows
//! classified by the zoo's imu-anomaly model, events on the embedded MQTT
//! broker, a labelled window (feedback and a threshold rule) becoming a
//! training sample; a sensor whose bus cannot be opened is shown failed
//! while the others run.

use crate::support::*;
use dai_testkit::{MqttProbe, public_key_hex, signing_key, start_embedded_broker};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn sensor(yaml: &str) -> dai_sensors::config::SensorConfig {
    serde_yaml_ng::from_str(yaml).expect("sensor yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_imu_to_inference_to_mqtt_event_and_samples() {
    let port = start_embedded_broker();
    let mut watcher = MqttProbe::connect(port, "watcher", &["dai/v1/sens/dev/+/event"]).await;
    let public = public_key_hex(&signing_key(0x11));
    let d = TestDaemon::start(move |c| {
        c.training.enabled = false;
        c.cloud.enabled = true;
        c.cloud.broker = format!("127.0.0.1:{port}");
        c.cloud.fleet = "sens".into();
        c.cloud.device_id = "edge-s".into();
        c.cloud.aggregator_public_key = public;
        c.sensors = vec![
            sensor(
                "name: imu0\npart: mpu6050\nsource: simulated\nseed: 7\nscenario: impact\nrate_hz: 1000\n\
                 window: 256\nhop: 128\nmodel: imu-anomaly\nevent_min_interval_ms: 200\n\
                 label_rules: [{channel: az, above: 25.0, label: 2}]\n",
            ),
            sensor("name: env0\npart: bme280\nsource: simulated\nrate_hz: 20\n"),
            sensor("name: imu-bus\npart: mpu6050\nsource: i2c\nbus: /dev/i2c-dai-missing\n"),
            // The raw window (16 x 7 values) is not what imu-anomaly takes:
            // the pipeline says so and keeps sampling.
            sensor(
                "name: raw0\npart: mpu6050\nsource: simulated\nrate_hz: 200\nwindow: 16\nfeatures: false\nmodel: imu-anomaly\n",
            ),
        ];
    })
    .await;

    // An MQTT event arrives: the impact scenario, classified as such.
    let deadline = Instant::now() + Duration::from_secs(20);
    let event: Value = loop {
        assert!(Instant::now() < deadline, "no sensor event");
        if let Ok(Some(p)) = watcher.next_publish(Duration::from_millis(200)).await {
            break serde_json::from_slice(&p.payload).expect("event json");
        }
    };
    assert_eq!(event["sensor"], "imu0", "{event}");
    assert_eq!(event["label"], "impact", "{event}");
    assert_eq!(event["simulated"], true);
    assert_eq!(event["model"], "imu-anomaly");

    // The status document: live sensors, predictions, the failed bus.
    let deadline = Instant::now() + Duration::from_secs(20);
    let sensors = loop {
        let s = d.get_json("/v1/status").await["sensors"].clone();
        let imu = &s[0];
        if imu["predictions"].as_array().is_some_and(|p| p.len() >= 2)
            && imu["rule_samples"].as_u64().unwrap_or(0) >= 1
            && s[1]["samples"].as_u64().unwrap_or(0) >= 5
        {
            break s;
        }
        assert!(Instant::now() < deadline, "sensors not live: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let imu = &sensors[0];
    assert_eq!(imu["simulated"], true);
    assert_eq!(imu["status"]["health"], "ok", "{imu}");
    assert!(imu["recent"].as_array().is_some_and(|r| !r.is_empty()));
    assert!(imu["measured_hz"].as_f64().unwrap_or(0.0) > 200.0, "{imu}");
    let latest = imu["predictions"]
        .as_array()
        .and_then(|p| p.last())
        .cloned()
        .expect("a prediction");
    assert_eq!(latest["label"], "impact");
    assert_eq!(sensors[1]["part"], "bme280");
    let bus = &sensors[2];
    let err = bus["model_error"].as_str().unwrap_or("");
    assert!(err.contains("/dev/i2c-dai-missing"), "{bus}");
    assert_eq!(bus["samples"], 0);
    let raw = &sensors[3];
    let err = raw["model_error"].as_str().unwrap_or("");
    assert!(err.contains("imu-anomaly") && err.contains("112"), "{raw}");
    assert!(raw["samples"].as_u64().unwrap_or(0) > 0, "{raw}");

    // The status page's sensors card, in Chromium.
    let args = [
        "--url",
        &d.url("/"),
        "--sensor",
        "imu0",
        "--label",
        "impact",
    ];
    browser_check(
        "simulated_imu_to_inference_to_mqtt_event_and_samples",
        "sensors_page.mjs",
        args.iter().map(|a| a.to_string()).collect(),
        "sensors-page.png",
    )
    .await;

    // Feedback on a window id: a training sample, no rerun.
    let r = d
        .client
        .post(d.url("/v1/feedback"))
        .json(&json!({"id": latest["id"], "label": 1}))
        .send()
        .await
        .expect("feedback");
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stored"], 1);
    assert_eq!(body["model"], "imu-anomaly");

    let m = d.get_text("/metrics").await;
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in metrics"))
    };
    assert!(value("dai_edge_sensor_samples_total{sensor=\"imu0\",simulated=\"true\"}") > 100.0);
    assert_eq!(
        value("dai_edge_sensor_faults_total{sensor=\"imu-bus\",kind=\"config\"}"),
        1.0
    );
    assert_eq!(
        value("dai_edge_sensor_healthy{sensor=\"imu0\",simulated=\"true\"}"),
        1.0
    );
    assert!(value("dai_edge_sensor_windows_total{sensor=\"imu0\",kind=\"impact\"}") >= 2.0);
    d.stop().await;
}
