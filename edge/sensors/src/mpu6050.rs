//! InvenSense MPU-6050 6-axis IMU over I2C, from the "MPU-6000/MPU-6050
//! Register Map and Descriptions" (RM-MPU-6000A-00, rev 4.2) and the
//! product specification (PS-MPU-6000A-00, rev 3.4).
//!
//! Init: WHO_AM_I (0x75) must read 0x68; PWR_MGMT_1 (0x6B) = 0x01 (wake
//! from sleep, clock from the X gyro PLL, as the spec recommends);
//! SMPLRT_DIV (0x19), CONFIG (0x1A, DLPF), GYRO_CONFIG (0x1B, FS_SEL in
//! bits 4:3), ACCEL_CONFIG (0x1C, AFS_SEL in bits 4:3). A sample is one
//! 14-byte burst from ACCEL_XOUT_H (0x3B): accel x, y, z, temperature,
//! gyro x, y, z, each a big-endian i16.

use crate::{Sensor, SensorError};
use embedded_hal::i2c::I2c;

pub const ADDRESS_AD0_LOW: u8 = 0x68;
pub const ADDRESS_AD0_HIGH: u8 = 0x69;

pub mod reg {
    pub const SMPLRT_DIV: u8 = 0x19;
    pub const CONFIG: u8 = 0x1A;
    pub const GYRO_CONFIG: u8 = 0x1B;
    pub const ACCEL_CONFIG: u8 = 0x1C;
    pub const ACCEL_XOUT_H: u8 = 0x3B;
    pub const PWR_MGMT_1: u8 = 0x6B;
    pub const WHO_AM_I: u8 = 0x75;
}

/// WHO_AM_I of an MPU-6050 (the address's upper six bits).
pub const CHIP_ID: u8 = 0x68;
/// Standard gravity, m/s^2, to scale g to SI.
pub const G: f32 = 9.806_65;

/// Accelerometer full scale (AFS_SEL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AccelRange {
    #[serde(rename = "2g")]
    G2,
    #[serde(rename = "4g")]
    G4,
    #[serde(rename = "8g")]
    G8,
    #[serde(rename = "16g")]
    G16,
}

impl AccelRange {
    pub fn afs_sel(self) -> u8 {
        self as u8
    }

    /// LSB per g (register map, ACCEL_CONFIG).
    pub fn lsb_per_g(self) -> f32 {
        16384.0 / (1 << self.afs_sel()) as f32
    }
}

/// Gyroscope full scale (FS_SEL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GyroRange {
    #[serde(rename = "250dps")]
    Dps250,
    #[serde(rename = "500dps")]
    Dps500,
    #[serde(rename = "1000dps")]
    Dps1000,
    #[serde(rename = "2000dps")]
    Dps2000,
}

impl GyroRange {
    pub fn fs_sel(self) -> u8 {
        self as u8
    }

    /// LSB per degree/s (register map, GYRO_CONFIG): 131, 65.5, 32.8, 16.4.
    pub fn lsb_per_dps(self) -> f32 {
        [131.0, 65.5, 32.8, 16.4][self.fs_sel() as usize]
    }
}

/// Driver settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub address: u8,
    pub accel: AccelRange,
    pub gyro: GyroRange,
    /// DLPF_CFG 0..=6 (0 = 260 Hz accel bandwidth, gyro output 8 kHz).
    pub dlpf: u8,
    /// Sample rate = gyro output rate / (1 + divider).
    pub sample_rate_divider: u8,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            address: ADDRESS_AD0_LOW,
            accel: AccelRange::G4,
            gyro: GyroRange::Dps500,
            // 44 Hz bandwidth, gyro output 1 kHz: a 1 kHz sample rate.
            dlpf: 3,
            sample_rate_divider: 0,
        }
    }
}

/// The driver.
pub struct Mpu6050<I2C> {
    i2c: I2C,
    settings: Settings,
}

/// Channel names: acceleration in m/s^2, angular rate in rad/s, die
/// temperature in degrees C.
pub const CHANNELS: &[&str] = &["ax", "ay", "az", "gx", "gy", "gz", "temp_c"];

impl<I2C: I2c> Mpu6050<I2C> {
    pub fn new(i2c: I2C, settings: Settings) -> Self {
        Mpu6050 { i2c, settings }
    }

    /// Give the bus back (tests check the mock's expectations).
    pub fn release(self) -> I2C {
        self.i2c
    }

    fn write(&mut self, reg: u8, value: u8) -> Result<(), SensorError> {
        let a = self.settings.address;
        self.i2c
            .write(a, &[reg, value])
            .map_err(|e| SensorError::from_i2c(a, e))
    }

    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), SensorError> {
        let a = self.settings.address;
        self.i2c
            .write_read(a, &[reg], buf)
            .map_err(|e| SensorError::from_i2c(a, e))
    }

    /// Convert one 14-byte burst to SI units (see [`CHANNELS`]).
    pub fn convert(&self, raw: &[u8; 14]) -> Vec<f32> {
        let word = |i: usize| i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]) as f32;
        let a = G / self.settings.accel.lsb_per_g();
        let g = std::f32::consts::PI / 180.0 / self.settings.gyro.lsb_per_dps();
        vec![
            word(0) * a,
            word(1) * a,
            word(2) * a,
            word(4) * g,
            word(5) * g,
            word(6) * g,
            // Register map, TEMP_OUT: degrees C = raw / 340 + 36.53.
            word(3) / 340.0 + 36.53,
        ]
    }
}

impl<I2C: I2c + Send> Sensor for Mpu6050<I2C> {
    fn part(&self) -> &'static str {
        "mpu6050"
    }

    fn channels(&self) -> &'static [&'static str] {
        CHANNELS
    }

    fn simulated(&self) -> bool {
        false
    }

    fn init(&mut self) -> Result<(), SensorError> {
        let mut id = [0u8; 1];
        self.read_regs(reg::WHO_AM_I, &mut id)?;
        if id[0] != CHIP_ID {
            return Err(SensorError::WrongChip {
                part: "mpu6050",
                address: self.settings.address,
                expected: CHIP_ID,
                found: id[0],
            });
        }
        let s = self.settings;
        self.write(reg::PWR_MGMT_1, 0x01)?;
        self.write(reg::SMPLRT_DIV, s.sample_rate_divider)?;
        self.write(reg::CONFIG, s.dlpf.min(6))?;
        self.write(reg::GYRO_CONFIG, s.gyro.fs_sel() << 3)?;
        self.write(reg::ACCEL_CONFIG, s.accel.afs_sel() << 3)?;
        Ok(())
    }

    fn read(&mut self) -> Result<Vec<f32>, SensorError> {
        let mut raw = [0u8; 14];
        self.read_regs(reg::ACCEL_XOUT_H, &mut raw)?;
        Ok(self.convert(&raw))
    }
}
