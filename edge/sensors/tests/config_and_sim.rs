//! `sensors:` entries as YAML, their validation, and the simulated sources.

use dai_sensors::config::SensorConfig;
use dai_sensors::sim::{Scenario, SimImu};

fn parse(yaml: &str) -> SensorConfig {
    serde_yaml_ng::from_str(yaml).expect("yaml")
}

#[test]
fn simulated_sources_are_built_labelled_and_deterministic() {
    let c = parse(
        "name: imu0\npart: mpu6050\nsource: simulated\nrate_hz: 1000\nseed: 7\nscenario: mixed\n",
    );
    let mut a = c.build().expect("build");
    let mut b = c.build().expect("build");
    assert!(a.simulated());
    assert_eq!(a.part(), "mpu6050");
    assert_eq!(a.channels().len(), 7);
    for _ in 0..500 {
        assert_eq!(
            a.read().expect("a"),
            b.read().expect("b"),
            "same seed, same signal"
        );
    }
    let env = parse("name: env0\npart: bme280\nsource: simulated\nrate_hz: 1\n")
        .build()
        .expect("env");
    assert!(env.simulated());
    assert_eq!(env.channels(), ["temp_c", "pressure_pa", "humidity_pct"]);
}

#[test]
fn mixed_scenario_covers_every_class_and_the_classes_differ() {
    let imu = SimImu::new(7, 1000.0, Scenario::Mixed);
    let classes: std::collections::BTreeSet<String> = (0..60_000u64)
        .step_by(1000)
        .map(|i| format!("{:?}", imu.class_at(i)))
        .collect();
    assert_eq!(classes.len(), 3, "{classes:?}");
    // Imbalance shows as lateral RMS; impacts as vertical peaks.
    let rms = |scenario| {
        let mut s = SimImu::new(1, 1000.0, scenario);
        let v: Vec<Vec<f32>> = (0..1000).map(|i| s.sample(i)).collect();
        let lateral = (v.iter().map(|x| x[0] * x[0]).sum::<f32>() / 1000.0).sqrt();
        let peak = v
            .iter()
            .map(|x| (x[2] - 9.806_65).abs())
            .fold(0.0f32, f32::max);
        (lateral, peak)
    };
    let (n_lat, n_peak) = rms(Scenario::Normal);
    let (i_lat, _) = rms(Scenario::Imbalance);
    let (_, k_peak) = rms(Scenario::Impact);
    assert!(i_lat > 3.0 * n_lat, "{i_lat} vs {n_lat}");
    assert!(k_peak > 3.0 * n_peak, "{k_peak} vs {n_peak}");
}

#[test]
fn a_configured_bus_that_cannot_be_opened_is_an_error_not_a_simulation() {
    let c = parse(
        "name: imu1\npart: mpu6050\nsource: i2c\nbus: /dev/i2c-nonexistent-99\naddress: 0x69\n",
    );
    let e = c.build().err().expect("no such bus");
    let msg = e.to_string();
    assert_eq!(e.kind(), "config");
    assert!(msg.contains("/dev/i2c-nonexistent-99"), "{msg}");
    assert!(msg.contains("imu1"), "{msg}");
    let c = parse("name: env9\npart: bme280\nsource: spi\nbus: /dev/spidev-dai-missing\n");
    let msg = c.build().err().expect("no such device").to_string();
    assert!(
        msg.contains("cannot open SPI device /dev/spidev-dai-missing"),
        "{msg}"
    );
}

#[test]
fn bad_entries_name_the_key_and_what_is_allowed() {
    for (yaml, want) in [
        (
            "name: a b\npart: mpu6050\nsource: simulated\n",
            "name: 1-64 characters",
        ),
        (
            "name: x\npart: mpu6050\nsource: simulated\nrate_hz: 0\n",
            "rate_hz 0: expected 0.01..=1000",
        ),
        (
            "name: x\npart: mpu6050\nsource: i2c\naddress: 0x80\n",
            "address 0x80",
        ),
        (
            "name: x\npart: bme280\nsource: simulated\naccel_range: 4g\n",
            "mpu6050 only",
        ),
        (
            "name: x\npart: mpu6050\nsource: simulated\nbme280_mode: normal\n",
            "bme280 only",
        ),
        (
            "name: x\npart: mpu6050\nsource: simulated\nread_deadline_ms: 0\n",
            "read_deadline_ms 0",
        ),
        ("name: x\npart: mpu6050\nsource: spi\n", "no SPI interface"),
        (
            "name: x\npart: bme280\nsource: spi\naddress: 0x76\n",
            "i2c only",
        ),
    ] {
        let e = parse(yaml).validate().expect_err(yaml).to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
    for (yaml, want) in [
        (
            "name: x\npart: mpu9250\nsource: simulated\n",
            "unknown variant `mpu9250`",
        ),
        (
            "name: x\npart: mpu6050\nsource: simulated\nspeed: 3\n",
            "unknown field `speed`",
        ),
        (
            "name: x\npart: mpu6050\nsource: simulated\naccel_range: 3g\n",
            "unknown variant `3g`",
        ),
    ] {
        let e = serde_yaml_ng::from_str::<SensorConfig>(yaml)
            .expect_err(yaml)
            .to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
}
