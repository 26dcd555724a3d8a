//! `dai-sensors`: what the edge reads its sensors through.
//!
//! - [`Sensor`]: one sample at a time, as named channels in SI units; the
//!   small trait the daemon's pipeline drives;
//! - drivers generic over `embedded_hal::i2c::I2c` (embedded-hal 1.0; the
//!   BME280 also over `embedded_hal::spi::SpiDevice`),
//!   written from the datasheets: [`mpu6050::Mpu6050`] (InvenSense 6-axis
//!   IMU) and [`bme280::Bme280`] (Bosch temperature, pressure, humidity,
//!   with the datasheet's integer compensation);
//! - [`sim`]: deterministic, seedable simulated sources for both parts
//!   (vibration with injected anomalies; temperature drift), always
//!   reported as simulated;
//! - [`supervise::Supervised`]: wraps any sensor; classifies bus faults
//!   (NACK, timeout, wrong chip id, other), counts them, marks the sensor
//!   degraded, backs off exponentially and re-initialises, never panics;
//! - [`features::window_features`]: mean, std, RMS and band energies of a
//!   window, shared by the daemon and the model trainer;
//! - [`config::SensorConfig`]: the `sensors:` configuration entry and
//!   [`config::SensorConfig::build`], which opens `/dev/i2c-N` through
//!   `linux-embedded-hal` on Linux or builds a simulated source — never
//!   silently one in place of the other.
//!
//! Why our own drivers: `mpu6050` 0.1.6 (the ecosystem crate) is built on
//! embedded-hal 0.2 and pulls nalgebra; `bme280` 0.5.1 supports
//! embedded-hal 1.0 but compensates in `f32`, not with the datasheet's
//! integer formulas, and hides the raw bus error we classify faults by.
//! Both parts need a handful of registers, which the tests pin against
//! the datasheets with `embedded-hal-mock` transactions.

pub mod bme280;
pub mod config;
pub mod features;
pub mod mpu6050;
pub mod sim;
pub mod supervise;

/// Why a read or an initialisation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SensorError {
    /// The device did not acknowledge (absent, unplugged, wrong address).
    #[error("no acknowledge from the device at {address:#04x} ({detail})")]
    Nack { address: u8, detail: String },
    /// The bus or the read took too long.
    #[error("bus timeout after {ms} ms")]
    Timeout { ms: u64 },
    /// Something answered, but not the part we expect.
    #[error(
        "wrong chip id at {address:#04x}: read {found:#04x}, expected {expected:#04x} ({part})"
    )]
    WrongChip {
        part: &'static str,
        address: u8,
        expected: u8,
        found: u8,
    },
    /// Any other bus error (arbitration loss, overrun, I/O).
    #[error("bus error at {address:#04x}: {detail}")]
    Bus { address: u8, detail: String },
    /// The configuration cannot be built.
    #[error("sensor {name:?}: {reason}")]
    Config { name: String, reason: String },
}

impl SensorError {
    /// Short label for metrics: nack, timeout, wrong_chip, bus, config.
    pub fn kind(&self) -> &'static str {
        match self {
            SensorError::Nack { .. } => "nack",
            SensorError::Timeout { .. } => "timeout",
            SensorError::WrongChip { .. } => "wrong_chip",
            SensorError::Bus { .. } => "bus",
            SensorError::Config { .. } => "config",
        }
    }

    /// Map an embedded-hal I2C error.
    pub fn from_i2c<E: embedded_hal::i2c::Error>(address: u8, e: E) -> SensorError {
        use embedded_hal::i2c::ErrorKind;
        let detail = format!("{e:?}");
        match e.kind() {
            ErrorKind::NoAcknowledge(_) => SensorError::Nack { address, detail },
            // Linux i2c-dev reports a bus timeout as ETIMEDOUT (errno 110),
            // which embedded-hal can only call `Other`.
            ErrorKind::Other
                if detail.contains("TimedOut")
                    || detail.contains("ETIMEDOUT")
                    || detail.contains("timed out") =>
            {
                SensorError::Timeout { ms: 0 }
            }
            _ => SensorError::Bus { address, detail },
        }
    }
}

/// A sensor the pipeline can sample.
pub trait Sensor: Send {
    /// The part: `mpu6050`, `bme280`.
    fn part(&self) -> &'static str;
    /// Channel names, in the order [`Sensor::read`] returns them.
    fn channels(&self) -> &'static [&'static str];
    /// True for a simulated source (shown as such on the page and in metrics).
    fn simulated(&self) -> bool;
    /// (Re)initialise: identity check, configuration. Called before the
    /// first read and after faults.
    fn init(&mut self) -> Result<(), SensorError>;
    /// One sample, in SI units, one value per channel.
    fn read(&mut self) -> Result<Vec<f32>, SensorError>;
}

/// The simulated sources' noise: the workspace's one seeded generator.
pub use dai_head::Rng;
