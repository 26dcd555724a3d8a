//! Simulated sources for machines without the hardware: deterministic
//! functions of (seed, sample index), so a test or a demo sees the same
//! signal every run. They say so: [`crate::Sensor::simulated`] is true and
//! the daemon labels them on its page and in metrics. They are only ever
//! built from an explicit `source: simulated` in the configuration.

use crate::{Rng, Sensor, SensorError};
use std::f64::consts::PI;

/// What the simulated machine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Healthy: running-speed vibration and noise.
    Normal,
    /// Rotor imbalance: a strong once-per-revolution component.
    Imbalance,
    /// Impacts: decaying ringing bursts four times a second.
    Impact,
    /// Segments of the three, in a seeded order (for demos and training).
    Mixed,
}

/// Classes of the IMU signal, in the order the zoo's sensor model uses.
pub const CLASSES: &[&str] = &["normal", "imbalance", "impact"];

/// Rotation frequency of the simulated machine, Hz.
const ROTATION_HZ: f64 = 25.0;
/// Seconds per segment in [`Scenario::Mixed`].
const SEGMENT_S: f64 = 2.0;

/// A simulated MPU-6050: the same channels and units as the driver.
#[derive(Debug, Clone)]
pub struct SimImu {
    seed: u64,
    rate_hz: f64,
    scenario: Scenario,
    index: u64,
    noise: Rng,
}

impl SimImu {
    pub fn new(seed: u64, rate_hz: f64, scenario: Scenario) -> SimImu {
        SimImu {
            seed,
            rate_hz: rate_hz.max(1.0),
            scenario,
            index: 0,
            noise: Rng::new(seed),
        }
    }

    /// The class actually simulated at sample `index` (ground truth).
    pub fn class_at(&self, index: u64) -> Scenario {
        match self.scenario {
            Scenario::Mixed => {
                let segment = (index as f64 / self.rate_hz / SEGMENT_S) as u64;
                // Seeded order, normal twice as often as each fault.
                let mut r = Rng::new(self.seed.wrapping_mul(31).wrapping_add(segment));
                match r.next_u64() % 4 {
                    0 | 1 => Scenario::Normal,
                    2 => Scenario::Imbalance,
                    _ => Scenario::Impact,
                }
            }
            s => s,
        }
    }

    /// Sample `index` of the signal (ax, ay, az, gx, gy, gz, temp_c).
    pub fn sample(&mut self, index: u64) -> Vec<f32> {
        let t = index as f64 / self.rate_hz;
        let g = crate::mpu6050::G as f64;
        let w = 2.0 * PI * ROTATION_HZ * t;
        let class = self.class_at(index);
        let n = &mut self.noise;
        let mut ax = 0.03 * g * (2.0 * w).sin() + 0.02 * g * n.normal();
        let mut ay = 0.03 * g * (2.0 * w).cos() + 0.02 * g * n.normal();
        let mut az = g + 0.05 * g * w.sin() + 0.02 * g * n.normal();
        let mut gz = 0.02 * n.normal();
        match class {
            Scenario::Imbalance => {
                ax += 0.4 * g * w.sin();
                ay += 0.4 * g * w.cos();
                gz += 0.3 * w.sin();
            }
            Scenario::Impact => {
                // An impact every 0.25 s, ringing at 180 Hz, decaying in ~20 ms.
                let since = t % 0.25;
                let ring = (-since / 0.02).exp() * (2.0 * PI * 180.0 * since).sin();
                az += 3.0 * g * ring;
                ax += 1.0 * g * ring;
            }
            _ => {}
        }
        let gx = 0.02 * n.normal();
        let gy = 0.02 * n.normal();
        let temp = 31.0 + 0.5 * (t / 60.0).sin() + 0.05 * n.normal();
        vec![
            ax as f32,
            ay as f32,
            az as f32,
            gx as f32,
            gy as f32,
            gz as f32,
            temp as f32,
        ]
    }

    pub fn index(&self) -> u64 {
        self.index
    }
}

impl Sensor for SimImu {
    fn part(&self) -> &'static str {
        "mpu6050"
    }

    fn channels(&self) -> &'static [&'static str] {
        crate::mpu6050::CHANNELS
    }

    fn simulated(&self) -> bool {
        true
    }

    fn init(&mut self) -> Result<(), SensorError> {
        Ok(())
    }

    fn read(&mut self) -> Result<Vec<f32>, SensorError> {
        let s = self.sample(self.index);
        self.index += 1;
        Ok(s)
    }
}

/// A simulated BME280: a daily-like temperature swing with a slow drift,
/// pressure and humidity around typical indoor values.
#[derive(Debug, Clone)]
pub struct SimEnv {
    rate_hz: f64,
    index: u64,
    noise: Rng,
}

impl SimEnv {
    pub fn new(seed: u64, rate_hz: f64) -> SimEnv {
        SimEnv {
            rate_hz: rate_hz.max(0.001),
            index: 0,
            noise: Rng::new(seed),
        }
    }
}

impl Sensor for SimEnv {
    fn part(&self) -> &'static str {
        "bme280"
    }

    fn channels(&self) -> &'static [&'static str] {
        crate::bme280::CHANNELS
    }

    fn simulated(&self) -> bool {
        true
    }

    fn init(&mut self) -> Result<(), SensorError> {
        Ok(())
    }

    fn read(&mut self) -> Result<Vec<f32>, SensorError> {
        let t = self.index as f64 / self.rate_hz;
        self.index += 1;
        let n = &mut self.noise;
        let temp = 21.0 + 3.0 * (2.0 * PI * t / 600.0).sin() + 0.001 * t + 0.05 * n.normal();
        let pressure = 101_325.0 + 50.0 * (2.0 * PI * t / 900.0).sin() + 2.0 * n.normal();
        let humidity =
            (45.0 - 5.0 * (2.0 * PI * t / 600.0).sin() + 0.3 * n.normal()).clamp(0.0, 100.0);
        Ok(vec![temp as f32, pressure as f32, humidity as f32])
    }
}
