//! The drivers against `embedded-hal-mock` transactions: the exact register
//! writes and reads of the datasheets, and the compensation formulas
//! against the datasheet's worked values.

use dai_sensors::bme280::{self, Bme280, Calibration};
use dai_sensors::mpu6050::{self, AccelRange, GyroRange, Mpu6050};
use dai_sensors::{Sensor, SensorError};
use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::delay::NoopDelay;
use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

const IMU: u8 = 0x68;
const ENV: u8 = 0x76;

/// MPU-6050 init per the register map, for ±4 g / ±500 °/s / DLPF 3.
fn imu_init() -> Vec<T> {
    vec![
        T::write_read(IMU, vec![0x75], vec![0x68]), // WHO_AM_I
        T::write(IMU, vec![0x6B, 0x01]),            // PWR_MGMT_1: wake, PLL X gyro
        T::write(IMU, vec![0x19, 0x00]),            // SMPLRT_DIV
        T::write(IMU, vec![0x1A, 0x03]),            // CONFIG: DLPF_CFG 3
        T::write(IMU, vec![0x1B, 0x08]),            // GYRO_CONFIG: FS_SEL 1 (±500 °/s)
        T::write(IMU, vec![0x1C, 0x08]),            // ACCEL_CONFIG: AFS_SEL 1 (±4 g)
    ]
}

fn be(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}

#[test]
fn mpu6050_init_and_burst_read_scale_to_si() {
    // ax = 8192 LSB = 1 g at ±4 g; ay = -4096 = -0.5 g; az = 0;
    // temp = -521 -> -521/340 + 36.53 = 34.998 °C; gx = 655 LSB = 10 °/s
    // at 65.5 LSB/(°/s); gy = -131 = -2 °/s; gz = 0.
    let mut burst = Vec::new();
    for v in [8192i16, -4096, 0, -521, 655, -131, 0] {
        burst.extend(be(v));
    }
    let mut expect = imu_init();
    expect.push(T::write_read(IMU, vec![0x3B], burst));
    let mut imu = Mpu6050::new(Mock::new(&expect), mpu6050::Settings::default());
    imu.init().expect("init");
    let s = imu.read().expect("read");
    let g = 9.806_65f32;
    let rad = std::f32::consts::PI / 180.0;
    let want = [g, -0.5 * g, 0.0, 10.0 * rad, -2.0 * rad, 0.0, 34.997_65];
    for (i, (a, b)) in s.iter().zip(want).enumerate() {
        assert!((a - b).abs() < 1e-4, "{}: {a} vs {b}", mpu6050::CHANNELS[i]);
    }
    imu.release().done();
}

#[test]
fn mpu6050_ranges_follow_the_register_map() {
    assert_eq!(
        [
            AccelRange::G2,
            AccelRange::G4,
            AccelRange::G8,
            AccelRange::G16
        ]
        .map(|r| r.lsb_per_g()),
        [16384.0, 8192.0, 4096.0, 2048.0]
    );
    assert_eq!(
        [
            GyroRange::Dps250,
            GyroRange::Dps500,
            GyroRange::Dps1000,
            GyroRange::Dps2000
        ]
        .map(|r| r.lsb_per_dps()),
        [131.0, 65.5, 32.8, 16.4]
    );
    // ±16 g and ±2000 °/s at the other address: AFS_SEL 3, FS_SEL 3.
    let expect = vec![
        T::write_read(0x69, vec![0x75], vec![0x68]),
        T::write(0x69, vec![0x6B, 0x01]),
        T::write(0x69, vec![0x19, 0x07]),
        T::write(0x69, vec![0x1A, 0x00]),
        T::write(0x69, vec![0x1B, 0x18]),
        T::write(0x69, vec![0x1C, 0x18]),
    ];
    let mut imu = Mpu6050::new(
        Mock::new(&expect),
        mpu6050::Settings {
            address: mpu6050::ADDRESS_AD0_HIGH,
            accel: AccelRange::G16,
            gyro: GyroRange::Dps2000,
            dlpf: 0,
            sample_rate_divider: 7,
        },
    );
    imu.init().expect("init");
    imu.release().done();
}

#[test]
fn mpu6050_wrong_chip_and_nack_are_typed() {
    let expect = vec![T::write_read(IMU, vec![0x75], vec![0x70])];
    let mut imu = Mpu6050::new(Mock::new(&expect), mpu6050::Settings::default());
    let e = imu.init().expect_err("an MPU-6500 answers 0x70");
    assert_eq!(
        e,
        SensorError::WrongChip {
            part: "mpu6050",
            address: IMU,
            expected: 0x68,
            found: 0x70
        }
    );
    assert!(e.to_string().contains("read 0x70, expected 0x68"), "{e}");
    imu.release().done();

    let expect = vec![
        T::write_read(IMU, vec![0x75], vec![0])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
    ];
    let mut imu = Mpu6050::new(Mock::new(&expect), mpu6050::Settings::default());
    let e = imu.init().expect_err("nobody home");
    assert_eq!(e.kind(), "nack", "{e}");
    imu.release().done();
}

/// The BMP280/BME280 datasheets' worked example trims (identical T and P
/// formulas), with humidity trims of a production part.
fn trims() -> ([u8; 26], [u8; 7]) {
    let mut a = Vec::new();
    a.extend(27504u16.to_le_bytes());
    for v in [26435i16, -1000] {
        a.extend(v.to_le_bytes());
    }
    a.extend(36477u16.to_le_bytes());
    for v in [-10685i16, 3024, 2855, 140, -7, 15500, -14600, 6000] {
        a.extend(v.to_le_bytes());
    }
    a.push(0); // 0xA0, unused
    a.push(75); // dig_H1 (0xA1)
    // dig_H2 = 362, dig_H3 = 0, dig_H4 = 313 (0x139), dig_H5 = 50 (0x032), dig_H6 = 30.
    let b = [
        0x6A, 0x01, // H2 LSB, MSB
        0x00, // H3
        0x13, // E4: H4[11:4]
        0x29, // E5: H5[3:0] << 4 | H4[3:0] = 0x2 << 4 | 0x9
        0x03, // E6: H5[11:4]
        30,   // H6
    ];
    (a.try_into().expect("26 bytes"), b)
}

#[test]
fn bme280_trims_parse_per_table_16() {
    let (a, b) = trims();
    let c = Calibration::parse(&a, &b);
    assert_eq!((c.t1, c.t2, c.t3), (27504, 26435, -1000));
    assert_eq!(
        (c.p1, c.p2, c.p3, c.p4, c.p5, c.p6, c.p7, c.p8, c.p9),
        (36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
    );
    assert_eq!(
        (c.h1, c.h2, c.h3, c.h4, c.h5, c.h6),
        (75, 362, 0, 313, 50, 30)
    );
}

#[test]
fn bme280_integer_compensation_matches_the_datasheet_example() {
    let (a, b) = trims();
    let c = Calibration::parse(&a, &b);
    // Datasheet example: adc_T = 519888 -> t_fine = 128422, T = 25.08 °C;
    // adc_P = 415148 -> P = 100653.27 Pa (floating-point reference).
    let (t, t_fine) = c.compensate_t(519_888);
    assert_eq!((t, t_fine), (2508, 128_422));
    let p = c.compensate_p(415_148, t_fine) as f64 / 256.0;
    assert!((p - 100_653.27).abs() < 0.1, "{p}");
    // Humidity: the integer formula against the datasheet's double-precision one.
    for adc_h in [20_000, 27_000, 30_000, 36_000] {
        let h = c.compensate_h(adc_h, t_fine) as f64 / 1024.0;
        let var = t_fine as f64 - 76_800.0;
        let mut x = (adc_h as f64 - (c.h4 as f64 * 64.0 + c.h5 as f64 / 16384.0 * var))
            * (c.h2 as f64 / 65536.0
                * (1.0
                    + c.h6 as f64 / 67_108_864.0 * var * (1.0 + c.h3 as f64 / 67_108_864.0 * var)));
        x *= 1.0 - c.h1 as f64 * x / 524_288.0;
        let reference = x.clamp(0.0, 100.0);
        assert!(
            (h - reference).abs() < 0.05,
            "adc_H {adc_h}: {h} vs {reference}"
        );
    }
    // A zero dig_P1 would divide by zero: the datasheet returns 0.
    let zero = Calibration { p1: 0, ..c };
    assert_eq!(zero.compensate_p(415_148, t_fine), 0);
}

fn env_init() -> Vec<T> {
    let (a, b) = trims();
    vec![
        T::write_read(ENV, vec![0xD0], vec![0x60]), // chip id
        T::write(ENV, vec![0xE0, 0xB6]),            // soft reset
        T::write_read(ENV, vec![0xF3], vec![0x01]), // NVM copy running
        T::write_read(ENV, vec![0xF3], vec![0x00]), // done
        T::write_read(ENV, vec![0x88], a.to_vec()),
        T::write_read(ENV, vec![0xE1], b.to_vec()),
        T::write(ENV, vec![0xF2, 0x01]), // ctrl_hum: osrs_h x1
        T::write(ENV, vec![0xF5, 0x00]), // config: standby 0, filter off
        T::write(ENV, vec![0xF4, (1 << 5) | (1 << 2)]), // ctrl_meas: x1, x1, sleep
    ]
}

#[test]
fn bme280_forced_read_follows_the_datasheet_sequence() {
    let (adc_p, adc_t, adc_h) = (415_148u32, 519_888u32, 30_000u16);
    let burst = vec![
        (adc_p >> 12) as u8,
        (adc_p >> 4) as u8,
        ((adc_p & 0xF) << 4) as u8,
        (adc_t >> 12) as u8,
        (adc_t >> 4) as u8,
        ((adc_t & 0xF) << 4) as u8,
        (adc_h >> 8) as u8,
        adc_h as u8,
    ];
    let mut expect = env_init();
    expect.extend([
        T::write(ENV, vec![0xF4, (1 << 5) | (1 << 2) | 0b01]), // forced
        T::write_read(ENV, vec![0xF3], vec![0x08]),            // measuring
        T::write_read(ENV, vec![0xF3], vec![0x00]),
        T::write_read(ENV, vec![0xF7], burst),
    ]);
    let mut env = Bme280::new(Mock::new(&expect), NoopDelay, bme280::Settings::default());
    env.init().expect("init");
    let v = env.read().expect("read");
    assert!((v[0] - 25.08).abs() < 1e-4, "{v:?}");
    assert!((v[1] - 100_653.25).abs() < 0.1, "{v:?}");
    assert!((0.0..=100.0).contains(&v[2]), "{v:?}");
    assert_eq!(bme280::Settings::default().max_measurement_us(), 9300);
    env.release().done();
}

#[test]
fn bme280_refuses_a_bmp280_and_times_out_a_stuck_conversion() {
    let expect = vec![T::write_read(ENV, vec![0xD0], vec![0x58])];
    let mut env = Bme280::new(Mock::new(&expect), NoopDelay, bme280::Settings::default());
    let e = env.init().expect_err("a BMP280 has no humidity");
    assert_eq!(e.kind(), "wrong_chip");
    assert!(e.to_string().contains("read 0x58, expected 0x60"), "{e}");
    env.release().done();

    let mut expect = env_init();
    expect.push(T::write(ENV, vec![0xF4, (1 << 5) | (1 << 2) | 0b01]));
    for _ in 0..10 {
        expect.push(T::write_read(ENV, vec![0xF3], vec![0x08]));
    }
    let mut env = Bme280::new(Mock::new(&expect), NoopDelay, bme280::Settings::default());
    env.init().expect("init");
    let e = env.read().expect_err("never finishes");
    assert_eq!(e.kind(), "timeout", "{e}");
    env.release().done();
}

#[test]
fn bme280_over_spi_uses_the_read_bit_and_masks_writes() {
    use embedded_hal_mock::eh1::spi::{Mock as SpiMock, Transaction as S};
    let (a, b) = trims();
    let read = |reg: u8, data: Vec<u8>| {
        vec![
            S::transaction_start(),
            S::write_vec(vec![reg | 0x80]),
            S::read_vec(data),
            S::transaction_end(),
        ]
    };
    let write = |reg: u8, v: u8| {
        vec![
            S::transaction_start(),
            S::write_vec(vec![reg & 0x7F, v]),
            S::transaction_end(),
        ]
    };
    let (adc_p, adc_t) = (415_148u32, 519_888u32);
    let burst = vec![
        (adc_p >> 12) as u8,
        (adc_p >> 4) as u8,
        ((adc_p & 0xF) << 4) as u8,
        (adc_t >> 12) as u8,
        (adc_t >> 4) as u8,
        ((adc_t & 0xF) << 4) as u8,
        0x75,
        0x30,
    ];
    let mut expect = Vec::new();
    expect.extend(read(0xD0, vec![0x60]));
    expect.extend(write(0xE0, 0xB6)); // on the wire: 0x60, 0xB6
    expect.extend(read(0xF3, vec![0x00]));
    expect.extend(read(0x88, a.to_vec()));
    expect.extend(read(0xE1, b.to_vec()));
    expect.extend(write(0xF2, 0x01));
    expect.extend(write(0xF5, 0x00));
    expect.extend(write(0xF4, (1 << 5) | (1 << 2)));
    expect.extend(write(0xF4, (1 << 5) | (1 << 2) | 0b01));
    expect.extend(read(0xF3, vec![0x00]));
    expect.extend(read(0xF7, burst));
    let mut env = Bme280::new_spi(
        SpiMock::new(&expect),
        NoopDelay,
        bme280::Settings::default(),
    );
    env.init().expect("init over SPI");
    let v = env.read().expect("read over SPI");
    assert!((v[0] - 25.08).abs() < 1e-4, "{v:?}");
    assert!((v[1] - 100_653.25).abs() < 0.1, "{v:?}");
    env.release_spi().done();
}
