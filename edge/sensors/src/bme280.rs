//! Bosch BME280 (temperature, pressure, humidity) over I2C, from the
//! datasheet BST-BME280-DS002 (rev 1.6 and later).
//!
//! Init: chip id (0xD0) must read 0x60; soft reset (0xE0 = 0xB6), wait
//! 2 ms and until the NVM copy is done (status 0xF3 bit 0); read the trim
//! parameters (0x88..0xA1 and 0xE1..0xE7, section 4.2.2); write ctrl_hum
//! (0xF2), config (0xF5: standby, IIR filter) and ctrl_meas (0xF4:
//! oversampling and mode; ctrl_hum only takes effect after it).
//! Read: in forced mode write ctrl_meas with mode 01, wait the maximum
//! measurement time (section 9.1) and until status bit 3 clears; then one
//! 8-byte burst from 0xF7 (press, temp: 20 bit; hum: 16 bit).
//! Compensation: the datasheet's integer formulas (section 4.2.3:
//! `BME280_compensate_T_int32`, `BME280_compensate_P_int64`,
//! `bme280_compensate_H_int32`).
//!
//! Transports: I2C ([`Bme280::new`], address 0x76/0x77) or SPI
//! ([`Bme280::new_spi`], any `SpiDevice`, mode 0 or 3): per datasheet 6.3
//! the control byte is the register address with bit 7 set for a read
//! (auto-incrementing) and clear for a write.

use crate::{Sensor, SensorError};
use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;
use embedded_hal::spi::{Operation, SpiDevice};

/// Register access over one transport.
pub trait RegisterBus {
    fn write_reg(&mut self, reg: u8, value: u8) -> Result<(), SensorError>;
    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), SensorError>;
    /// The I2C address, or 0 for SPI (shown in errors).
    fn address(&self) -> u8;
}

/// I2C transport.
pub struct I2cRegs<I2C> {
    pub i2c: I2C,
    pub address: u8,
}

impl<I2C: I2c> RegisterBus for I2cRegs<I2C> {
    fn write_reg(&mut self, reg: u8, value: u8) -> Result<(), SensorError> {
        let a = self.address;
        self.i2c
            .write(a, &[reg, value])
            .map_err(|e| SensorError::from_i2c(a, e))
    }

    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), SensorError> {
        let a = self.address;
        self.i2c
            .write_read(a, &[reg], buf)
            .map_err(|e| SensorError::from_i2c(a, e))
    }

    fn address(&self) -> u8 {
        self.address
    }
}

/// SPI transport (chip select handled by the `SpiDevice`).
pub struct SpiRegs<SPI> {
    pub spi: SPI,
}

fn spi_error<E: embedded_hal::spi::Error>(e: E) -> SensorError {
    SensorError::Bus {
        address: 0,
        detail: format!("SPI {:?}: {e:?}", e.kind()),
    }
}

impl<SPI: SpiDevice> RegisterBus for SpiRegs<SPI> {
    fn write_reg(&mut self, reg: u8, value: u8) -> Result<(), SensorError> {
        self.spi.write(&[reg & 0x7F, value]).map_err(spi_error)
    }

    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), SensorError> {
        self.spi
            .transaction(&mut [Operation::Write(&[reg | 0x80]), Operation::Read(buf)])
            .map_err(spi_error)
    }

    fn address(&self) -> u8 {
        0
    }
}

pub const ADDRESS_SDO_LOW: u8 = 0x76;
pub const ADDRESS_SDO_HIGH: u8 = 0x77;
pub const CHIP_ID: u8 = 0x60;

pub mod reg {
    pub const CALIB_00: u8 = 0x88;
    pub const CHIP_ID: u8 = 0xD0;
    pub const RESET: u8 = 0xE0;
    pub const CALIB_26: u8 = 0xE1;
    pub const CTRL_HUM: u8 = 0xF2;
    pub const STATUS: u8 = 0xF3;
    pub const CTRL_MEAS: u8 = 0xF4;
    pub const CONFIG: u8 = 0xF5;
    pub const PRESS_MSB: u8 = 0xF7;
}

/// Soft-reset command word.
pub const RESET_WORD: u8 = 0xB6;

/// Oversampling setting: 0 = skipped, 1..=5 = x1, x2, x4, x8, x16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversampling(pub u8);

impl Oversampling {
    pub const X1: Oversampling = Oversampling(1);

    fn factor(self) -> f32 {
        match self.0 {
            0 => 0.0,
            n => (1u32 << (n.min(5) - 1)) as f32,
        }
    }
}

/// Forced (one measurement per read, sleeps between) or normal (cycling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Forced,
    Normal,
}

/// Driver settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub address: u8,
    pub mode: Mode,
    pub osrs_t: Oversampling,
    pub osrs_p: Oversampling,
    pub osrs_h: Oversampling,
    /// IIR filter coefficient code 0..=4 (off, 2, 4, 8, 16).
    pub filter: u8,
    /// Normal-mode standby code 0..=7 (0.5 ms .. 20 ms).
    pub standby: u8,
}

impl Default for Settings {
    fn default() -> Self {
        // The datasheet's "weather monitoring" recommendation (3.5.1):
        // forced mode, x1 everywhere, filter off.
        Settings {
            address: ADDRESS_SDO_LOW,
            mode: Mode::Forced,
            osrs_t: Oversampling::X1,
            osrs_p: Oversampling::X1,
            osrs_h: Oversampling::X1,
            filter: 0,
            standby: 0,
        }
    }
}

impl Settings {
    /// Maximum measurement time in microseconds (datasheet 9.1).
    pub fn max_measurement_us(&self) -> u32 {
        let t = 1.25 + 2.3 * self.osrs_t.factor();
        let p = if self.osrs_p.0 > 0 {
            2.3 * self.osrs_p.factor() + 0.575
        } else {
            0.0
        };
        let h = if self.osrs_h.0 > 0 {
            2.3 * self.osrs_h.factor() + 0.575
        } else {
            0.0
        };
        ((t + p + h) * 1000.0).ceil() as u32
    }

    fn ctrl_meas(&self, mode_bits: u8) -> u8 {
        (self.osrs_t.0.min(5) << 5) | (self.osrs_p.0.min(5) << 2) | mode_bits
    }
}

/// Trim parameters (datasheet table 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

impl Calibration {
    /// From 0x88..=0xA1 (26 bytes) and 0xE1..=0xE7 (7 bytes).
    pub fn parse(a: &[u8; 26], b: &[u8; 7]) -> Calibration {
        let u = |i: usize| u16::from_le_bytes([a[i], a[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([a[i], a[i + 1]]);
        Calibration {
            t1: u(0),
            t2: s(2),
            t3: s(4),
            p1: u(6),
            p2: s(8),
            p3: s(10),
            p4: s(12),
            p5: s(14),
            p6: s(16),
            p7: s(18),
            p8: s(20),
            p9: s(22),
            // 0xA0 (a[24]) is not used; dig_H1 is 0xA1.
            h1: a[25],
            h2: i16::from_le_bytes([b[0], b[1]]),
            h3: b[2],
            // dig_H4 = 0xE4[7:0] << 4 | 0xE5[3:0]; dig_H5 = 0xE6 << 4 | 0xE5[7:4] (signed 12 bit).
            h4: ((b[3] as i8 as i16) << 4) | (b[4] & 0x0F) as i16,
            h5: ((b[5] as i8 as i16) << 4) | (b[4] >> 4) as i16,
            h6: b[6] as i8,
        }
    }

    /// `BME280_compensate_T_int32`: (temperature in 0.01 degC, t_fine).
    pub fn compensate_t(&self, adc_t: i32) -> (i32, i32) {
        let t1 = self.t1 as i32;
        let var1 = (((adc_t >> 3) - (t1 << 1)) * self.t2 as i32) >> 11;
        let var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * self.t3 as i32) >> 14;
        let t_fine = var1 + var2;
        ((t_fine * 5 + 128) >> 8, t_fine)
    }

    /// `BME280_compensate_P_int64`: pressure in Pa as Q24.8 (0 if the
    /// trim would divide by zero, as in the datasheet).
    pub fn compensate_p(&self, adc_p: i32, t_fine: i32) -> u32 {
        let mut var1 = t_fine as i64 - 128_000;
        let mut var2 = var1 * var1 * self.p6 as i64;
        var2 += (var1 * self.p5 as i64) << 17;
        var2 += (self.p4 as i64) << 35;
        var1 = ((var1 * var1 * self.p3 as i64) >> 8) + ((var1 * self.p2 as i64) << 12);
        var1 = (((1i64 << 47) + var1) * self.p1 as i64) >> 33;
        if var1 == 0 {
            return 0;
        }
        let mut p: i64 = 1_048_576 - adc_p as i64;
        p = (((p << 31) - var2) * 3125) / var1;
        var1 = (self.p9 as i64 * (p >> 13) * (p >> 13)) >> 25;
        var2 = (self.p8 as i64 * p) >> 19;
        p = ((p + var1 + var2) >> 8) + ((self.p7 as i64) << 4);
        p as u32
    }

    /// `bme280_compensate_H_int32`: relative humidity in % as Q22.10.
    pub fn compensate_h(&self, adc_h: i32, t_fine: i32) -> u32 {
        let mut v = t_fine - 76_800;
        v = ((((adc_h << 14) - ((self.h4 as i32) << 20) - (self.h5 as i32 * v)) + 16_384) >> 15)
            * (((((((v * self.h6 as i32) >> 10) * (((v * self.h3 as i32) >> 11) + 32_768))
                >> 10)
                + 2_097_152)
                * self.h2 as i32
                + 8192)
                >> 14);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * self.h1 as i32) >> 4;
        v = v.clamp(0, 419_430_400);
        (v >> 12) as u32
    }

    /// One 8-byte burst from 0xF7 -> (temp degC, pressure Pa, humidity %).
    pub fn convert(&self, raw: &[u8; 8]) -> (f32, f32, f32) {
        let adc_p = ((raw[0] as i32) << 12) | ((raw[1] as i32) << 4) | ((raw[2] as i32) >> 4);
        let adc_t = ((raw[3] as i32) << 12) | ((raw[4] as i32) << 4) | ((raw[5] as i32) >> 4);
        let adc_h = ((raw[6] as i32) << 8) | raw[7] as i32;
        let (t, t_fine) = self.compensate_t(adc_t);
        (
            t as f32 / 100.0,
            self.compensate_p(adc_p, t_fine) as f32 / 256.0,
            self.compensate_h(adc_h, t_fine) as f32 / 1024.0,
        )
    }
}

/// Channel names: degrees C, pascal, percent relative humidity.
pub const CHANNELS: &[&str] = &["temp_c", "pressure_pa", "humidity_pct"];

/// How many 1 ms status polls a forced measurement may take beyond its
/// maximum time before the read is a timeout.
const STATUS_POLLS: usize = 10;

/// The driver.
pub struct Bme280<B, D> {
    bus: B,
    delay: D,
    settings: Settings,
    calibration: Option<Calibration>,
}

impl<I2C: I2c, D: DelayNs> Bme280<I2cRegs<I2C>, D> {
    /// Over I2C at `settings.address`.
    pub fn new(i2c: I2C, delay: D, settings: Settings) -> Self {
        Bme280 {
            bus: I2cRegs {
                i2c,
                address: settings.address,
            },
            delay,
            settings,
            calibration: None,
        }
    }

    pub fn release(self) -> I2C {
        self.bus.i2c
    }
}

impl<SPI: SpiDevice, D: DelayNs> Bme280<SpiRegs<SPI>, D> {
    /// Over SPI (`settings.address` is not used).
    pub fn new_spi(spi: SPI, delay: D, settings: Settings) -> Self {
        Bme280 {
            bus: SpiRegs { spi },
            delay,
            settings,
            calibration: None,
        }
    }

    pub fn release_spi(self) -> SPI {
        self.bus.spi
    }
}

impl<B: RegisterBus, D: DelayNs> Bme280<B, D> {
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    fn write(&mut self, reg: u8, value: u8) -> Result<(), SensorError> {
        self.bus.write_reg(reg, value)
    }

    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), SensorError> {
        self.bus.read_regs(reg, buf)
    }

    /// Poll status until `mask` clears (bounded).
    fn wait_status(&mut self, mask: u8) -> Result<(), SensorError> {
        for _ in 0..STATUS_POLLS {
            let mut st = [0u8; 1];
            self.read_regs(reg::STATUS, &mut st)?;
            if st[0] & mask == 0 {
                return Ok(());
            }
            self.delay.delay_ms(1);
        }
        Err(SensorError::Timeout {
            ms: STATUS_POLLS as u64,
        })
    }
}

impl<B: RegisterBus + Send, D: DelayNs + Send> Sensor for Bme280<B, D> {
    fn part(&self) -> &'static str {
        "bme280"
    }

    fn channels(&self) -> &'static [&'static str] {
        CHANNELS
    }

    fn simulated(&self) -> bool {
        false
    }

    fn init(&mut self) -> Result<(), SensorError> {
        self.calibration = None;
        let mut id = [0u8; 1];
        self.read_regs(reg::CHIP_ID, &mut id)?;
        if id[0] != CHIP_ID {
            return Err(SensorError::WrongChip {
                part: "bme280",
                address: self.bus.address(),
                expected: CHIP_ID,
                found: id[0],
            });
        }
        self.write(reg::RESET, RESET_WORD)?;
        // Start-up time after reset: 2 ms (datasheet table 1).
        self.delay.delay_ms(2);
        // im_update: NVM data being copied to image registers.
        self.wait_status(0x01)?;
        let mut a = [0u8; 26];
        let mut b = [0u8; 7];
        self.read_regs(reg::CALIB_00, &mut a)?;
        self.read_regs(reg::CALIB_26, &mut b)?;
        let s = self.settings;
        self.write(reg::CTRL_HUM, s.osrs_h.0.min(5))?;
        self.write(
            reg::CONFIG,
            (s.standby.min(7) << 5) | (s.filter.min(4) << 2),
        )?;
        let mode = match s.mode {
            Mode::Forced => 0b00, // sleep until a read forces a measurement
            Mode::Normal => 0b11,
        };
        self.write(reg::CTRL_MEAS, s.ctrl_meas(mode))?;
        self.calibration = Some(Calibration::parse(&a, &b));
        Ok(())
    }

    fn read(&mut self) -> Result<Vec<f32>, SensorError> {
        let Some(cal) = self.calibration else {
            return Err(SensorError::Bus {
                address: self.bus.address(),
                detail: "read before a successful init".into(),
            });
        };
        if self.settings.mode == Mode::Forced {
            let v = self.settings.ctrl_meas(0b01);
            self.write(reg::CTRL_MEAS, v)?;
            self.delay.delay_us(self.settings.max_measurement_us());
            // measuring: set while a conversion runs.
            self.wait_status(0x08)?;
        }
        let mut raw = [0u8; 8];
        self.read_regs(reg::PRESS_MSB, &mut raw)?;
        let (t, p, h) = cal.convert(&raw);
        Ok(vec![t, p, h])
    }
}
