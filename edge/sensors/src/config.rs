//! One `sensors:` entry of the daemon's configuration, and how it becomes a
//! [`Sensor`]. A configured I2C bus that cannot be opened is an error with
//! the path and the reason, never a silent switch to a simulated source.

use crate::sim::{Scenario, SimEnv, SimImu};
use crate::{Sensor, SensorError, bme280, mpu6050};
use serde::{Deserialize, Serialize};

/// Which part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Mpu6050,
    Bme280,
}

/// Where samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A Linux I2C bus (`bus`, `address`).
    I2c,
    /// A Linux spidev device (`bus`, e.g. `/dev/spidev0.0`); BME280 only.
    Spi,
    /// A seeded simulated source (`seed`, `scenario`).
    Simulated,
}

fn default_rate() -> f64 {
    100.0
}
fn default_bus() -> String {
    "/dev/i2c-1".into()
}
fn default_scenario() -> Scenario {
    Scenario::Normal
}
fn default_deadline() -> u64 {
    50
}
fn default_window() -> usize {
    256
}
fn default_true() -> bool {
    true
}
fn default_event_interval() -> u64 {
    1000
}

/// A threshold rule: a window whose peak |value| of `channel` exceeds
/// `above` becomes a training sample with class `label` (an index into
/// the model's labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    pub channel: String,
    pub above: f32,
    pub label: u32,
}

/// A sensor entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// Unique name (letters, digits, `_`, `-`): metrics label, MQTT event
    /// field, page row.
    pub name: String,
    pub part: Part,
    pub source: Source,
    /// Samples per second (0.01..=1000).
    #[serde(default = "default_rate")]
    pub rate_hz: f64,
    /// I2C or spidev device file (source i2c / spi).
    #[serde(default = "default_bus")]
    pub bus: String,
    /// 7-bit I2C address; default: the part's usual one (0x68, 0x76).
    #[serde(default)]
    pub address: Option<u8>,
    /// Seed of a simulated source.
    #[serde(default)]
    pub seed: u64,
    /// What a simulated IMU simulates.
    #[serde(default = "default_scenario")]
    pub scenario: Scenario,
    /// MPU-6050 accelerometer range (2g, 4g, 8g, 16g).
    #[serde(default)]
    pub accel_range: Option<mpu6050::AccelRange>,
    /// MPU-6050 gyroscope range (250dps .. 2000dps).
    #[serde(default)]
    pub gyro_range: Option<mpu6050::GyroRange>,
    /// BME280 mode (forced, normal).
    #[serde(default)]
    pub bme280_mode: Option<bme280::Mode>,
    /// A read slower than this (ms) counts as a bus timeout.
    #[serde(default = "default_deadline")]
    pub read_deadline_ms: u64,
    /// Samples per window (2..=65536).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Samples between window starts (1..=window); default: the window.
    #[serde(default)]
    pub hop: Option<usize>,
    /// Model input: window features (`dai_sensors::features`) when true,
    /// else the raw window (samples x channels, flattened).
    #[serde(default = "default_true")]
    pub features: bool,
    /// Bundle run on every window; none: sample and chart only.
    #[serde(default)]
    pub model: Option<String>,
    /// At most one MQTT event per this many milliseconds (0..=3600000).
    #[serde(default = "default_event_interval")]
    pub event_min_interval_ms: u64,
    /// Windows that become training samples without feedback.
    #[serde(default)]
    pub label_rules: Vec<LabelRule>,
}

impl SensorConfig {
    /// Range and consistency checks, each naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), SensorError> {
        let bad = |reason: String| {
            Err(SensorError::Config {
                name: self.name.clone(),
                reason,
            })
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("name: 1-64 characters from [A-Za-z0-9_-]".into());
        }
        // The sampling schedule is a tokio interval (1 ms timer
        // resolution): 1 kHz is the most it keeps exactly.
        if !(0.01..=1000.0).contains(&self.rate_hz) {
            return bad(format!("rate_hz {}: expected 0.01..=1000", self.rate_hz));
        }
        if let Some(a) = self.address
            && !(0x03..=0x77).contains(&a)
        {
            return bad(format!(
                "address {a:#04x}: expected a 7-bit address 0x03..=0x77"
            ));
        }
        if !(1..=10_000).contains(&self.read_deadline_ms) {
            return bad(format!(
                "read_deadline_ms {}: expected 1..=10000",
                self.read_deadline_ms
            ));
        }
        if self.part == Part::Bme280 && (self.accel_range.is_some() || self.gyro_range.is_some()) {
            return bad("accel_range/gyro_range apply to an mpu6050 only".into());
        }
        if self.part == Part::Mpu6050 && self.source == Source::Spi {
            return bad(
                "source spi: the MPU-6050 has no SPI interface (its sibling MPU-6000 has); use i2c"
                    .into(),
            );
        }
        if self.source == Source::Spi && self.address.is_some() {
            return bad("address applies to source i2c only".into());
        }
        if self.part == Part::Mpu6050 && self.bme280_mode.is_some() {
            return bad("bme280_mode applies to a bme280 only".into());
        }
        if !(2..=65_536).contains(&self.window) {
            return bad(format!(
                "window {}: expected 2..=65536 samples",
                self.window
            ));
        }
        if self.features && self.window > 8192 {
            return bad(format!(
                "window {}: at most 8192 samples when features is true (the band energies cost window^2)",
                self.window
            ));
        }
        if let Some(h) = self.hop
            && !(1..=self.window).contains(&h)
        {
            return bad(format!("hop {h}: expected 1..=window ({})", self.window));
        }
        if self.event_min_interval_ms > 3_600_000 {
            return bad(format!(
                "event_min_interval_ms {}: expected 0..=3600000",
                self.event_min_interval_ms
            ));
        }
        let channels = self.channels();
        for r in &self.label_rules {
            if !channels.contains(&r.channel.as_str()) {
                return bad(format!(
                    "label_rules: channel {:?} is not one of {channels:?}",
                    r.channel
                ));
            }
            if !r.above.is_finite() {
                return bad("label_rules: `above` must be a finite number".into());
            }
        }
        if !self.label_rules.is_empty() && self.model.is_none() {
            return bad("label_rules need a model (its head receives the samples)".into());
        }
        Ok(())
    }

    /// The part's channel names.
    pub fn channels(&self) -> &'static [&'static str] {
        match self.part {
            Part::Mpu6050 => mpu6050::CHANNELS,
            Part::Bme280 => bme280::CHANNELS,
        }
    }

    /// Samples between windows.
    pub fn hop(&self) -> usize {
        self.hop.unwrap_or(self.window)
    }

    /// Build the sensor: open the bus, or create the simulated source.
    pub fn build(&self) -> Result<Box<dyn Sensor>, SensorError> {
        self.validate()?;
        match self.source {
            Source::Simulated => Ok(match self.part {
                Part::Mpu6050 => Box::new(SimImu::new(self.seed, self.rate_hz, self.scenario)),
                Part::Bme280 => Box::new(SimEnv::new(self.seed, self.rate_hz)),
            }),
            Source::I2c => self.build_i2c(),
            Source::Spi => self.build_spi(),
        }
    }

    #[cfg(target_os = "linux")]
    fn build_spi(&self) -> Result<Box<dyn Sensor>, SensorError> {
        use linux_embedded_hal::spidev::{SpiModeFlags, SpidevOptions};
        let fail = |e: String| SensorError::Config {
            name: self.name.clone(),
            reason: format!("cannot open SPI device {}: {e}", self.bus),
        };
        let mut dev =
            linux_embedded_hal::SpidevDevice::open(&self.bus).map_err(|e| fail(e.to_string()))?;
        // Datasheet 6.3: SPI mode 0 (or 3), up to 10 MHz; 1 MHz is safe on long wires.
        let opts = SpidevOptions::new()
            .bits_per_word(8)
            .max_speed_hz(1_000_000)
            .mode(SpiModeFlags::SPI_MODE_0)
            .build();
        dev.configure(&opts).map_err(|e| fail(e.to_string()))?;
        let d = bme280::Settings::default();
        Ok(Box::new(bme280::Bme280::new_spi(
            dev,
            linux_embedded_hal::Delay,
            bme280::Settings {
                mode: self.bme280_mode.unwrap_or(d.mode),
                ..d
            },
        )))
    }

    #[cfg(not(target_os = "linux"))]
    fn build_spi(&self) -> Result<Box<dyn Sensor>, SensorError> {
        Err(SensorError::Config {
            name: self.name.clone(),
            reason: "SPI devices are supported on Linux only".into(),
        })
    }

    #[cfg(target_os = "linux")]
    fn build_i2c(&self) -> Result<Box<dyn Sensor>, SensorError> {
        let bus = linux_embedded_hal::I2cdev::new(&self.bus).map_err(|e| SensorError::Config {
            name: self.name.clone(),
            reason: format!("cannot open I2C bus {}: {e}", self.bus),
        })?;
        Ok(match self.part {
            Part::Mpu6050 => {
                let d = mpu6050::Settings::default();
                Box::new(mpu6050::Mpu6050::new(
                    bus,
                    mpu6050::Settings {
                        address: self.address.unwrap_or(mpu6050::ADDRESS_AD0_LOW),
                        accel: self.accel_range.unwrap_or(d.accel),
                        gyro: self.gyro_range.unwrap_or(d.gyro),
                        ..d
                    },
                ))
            }
            Part::Bme280 => {
                let d = bme280::Settings::default();
                Box::new(bme280::Bme280::new(
                    bus,
                    linux_embedded_hal::Delay,
                    bme280::Settings {
                        address: self.address.unwrap_or(bme280::ADDRESS_SDO_LOW),
                        mode: self.bme280_mode.unwrap_or(d.mode),
                        ..d
                    },
                ))
            }
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn build_i2c(&self) -> Result<Box<dyn Sensor>, SensorError> {
        Err(SensorError::Config {
            name: self.name.clone(),
            reason: "I2C buses are supported on Linux only".into(),
        })
    }
}
