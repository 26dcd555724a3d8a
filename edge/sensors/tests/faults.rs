//! Faults through the mock bus: NACK, bus timeout, wrong chip id, a sensor
//! unplugged while running and plugged back. Each is classified, counted,
//! marks the sensor degraded, backs off, and recovers by re-initialising;
//! another sensor keeps sampling meanwhile.

use dai_sensors::mpu6050::{self, Mpu6050};
use dai_sensors::sim::{Scenario, SimImu};
use dai_sensors::supervise::{Attempt, Backoff, Health, Supervised};
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};
use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
use std::time::{Duration, Instant};

const IMU: u8 = 0x68;

fn init() -> Vec<T> {
    vec![
        T::write_read(IMU, vec![0x75], vec![0x68]),
        T::write(IMU, vec![0x6B, 0x01]),
        T::write(IMU, vec![0x19, 0x00]),
        T::write(IMU, vec![0x1A, 0x03]),
        T::write(IMU, vec![0x1B, 0x08]),
        T::write(IMU, vec![0x1C, 0x08]),
    ]
}

fn burst() -> T {
    let mut b = Vec::new();
    for v in [0i16, 0, 8192, 0, 0, 0, 0] {
        b.extend(v.to_be_bytes());
    }
    T::write_read(IMU, vec![0x3B], b)
}

fn nack() -> ErrorKind {
    ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
}

fn backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    }
}

/// A bus whose write_read takes `slow` (a stretched clock, a hung slave).
struct SlowBus {
    inner: Mock,
    slow_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ErrorType for SlowBus {
    type Error = <Mock as ErrorType>::Error;
}

impl I2c for SlowBus {
    fn transaction(&mut self, a: u8, ops: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        self.inner.transaction(a, ops)
    }
    fn write(&mut self, a: u8, bytes: &[u8]) -> Result<(), Self::Error> {
        self.inner.write(a, bytes)
    }
    fn read(&mut self, a: u8, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.read(a, buf)
    }
    fn write_read(&mut self, a: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), Self::Error> {
        let ms = self.slow_ms.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        self.inner.write_read(a, bytes, buf)
    }
}

#[test]
fn unplugged_while_running_degrades_backs_off_and_recovers() {
    let mut expect = init();
    expect.push(burst());
    // Unplugged: the next read and the re-probe are not acknowledged.
    expect.push(T::write_read(IMU, vec![0x3B], vec![0; 14]).with_error(nack()));
    expect.push(T::write_read(IMU, vec![0x75], vec![0]).with_error(nack()));
    // Plugged back in (power-on defaults): full init, then data.
    expect.extend(init());
    expect.push(burst());
    let mock = Mock::new(&expect);
    let mut s = Supervised::new(
        Box::new(Mpu6050::new(mock.clone(), mpu6050::Settings::default())),
        backoff(),
        Duration::from_secs(1),
    );
    // A second, simulated sensor keeps sampling throughout.
    let mut other = Supervised::new(
        Box::new(SimImu::new(3, 100.0, Scenario::Normal)),
        backoff(),
        Duration::from_secs(1),
    );
    let t0 = Instant::now();
    assert!(matches!(s.attempt(t0), Attempt::Sample(v) if (v[2] - 9.806_65).abs() < 1e-3));
    assert_eq!(s.status().health, Health::Ok);

    let Attempt::Failed(e) = s.attempt(t0) else {
        panic!("the unplugged read must fail")
    };
    assert_eq!(e.kind(), "nack");
    let st = s.status();
    assert_eq!(st.health, Health::Degraded);
    assert_eq!(st.faults.get("nack"), Some(&1));
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("no acknowledge")
    );
    assert!(matches!(other.attempt(t0), Attempt::Sample(_)));

    // Backing off: nothing is tried before 100 ms.
    assert_eq!(s.attempt(t0 + Duration::from_millis(50)), Attempt::Skipped);
    // Then it re-probes (WHO_AM_I), still unplugged: the wait doubles.
    let t1 = t0 + Duration::from_millis(150);
    assert!(matches!(s.attempt(t1), Attempt::Failed(e) if e.kind() == "nack"));
    assert_eq!(s.attempt(t1 + Duration::from_millis(150)), Attempt::Skipped);
    assert_eq!(s.status().consecutive_failures, 2);
    assert!(matches!(other.attempt(t1), Attempt::Sample(_)));

    // Plugged back: re-initialised and reading again.
    let t2 = t1 + Duration::from_millis(250);
    assert!(matches!(s.attempt(t2), Attempt::Sample(_)));
    let st = s.status();
    assert_eq!(st.health, Health::Ok);
    assert_eq!(st.consecutive_failures, 0);
    assert_eq!(st.faults.get("nack"), Some(&2), "history is kept");
    assert_eq!(st.reads, 2);
    drop(s);
    mock.clone().done();
}

#[test]
fn a_slow_bus_counts_as_a_timeout_and_its_value_is_dropped() {
    let mut expect = init();
    expect.push(burst());
    expect.extend(init());
    expect.push(burst());
    let mock = Mock::new(&expect);
    let slow_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(30));
    let bus = SlowBus {
        inner: mock.clone(),
        slow_ms: slow_ms.clone(),
    };
    // The deadline covers the read (30 ms here), not the initialisation.
    let mut s = Supervised::new(
        Box::new(Mpu6050::new(bus, mpu6050::Settings::default())),
        backoff(),
        Duration::from_millis(20),
    );
    let t0 = Instant::now();
    let Attempt::Failed(e) = s.attempt(t0) else {
        panic!("a read over the deadline must fail")
    };
    assert_eq!(e.kind(), "timeout", "{e}");
    assert_eq!(s.status().faults.get("timeout"), Some(&1));
    assert_eq!(s.status().reads, 0);
    // The bus is healthy again: after the backoff, re-init and a sample.
    slow_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        s.attempt(t0 + Duration::from_millis(150)),
        Attempt::Sample(_)
    ));
    assert_eq!(s.status().health, Health::Ok);
    drop(s);
    mock.clone().done();
}

#[test]
fn wrong_chip_and_bus_errors_are_classified() {
    let expect = vec![
        T::write_read(IMU, vec![0x75], vec![0x98]),
        T::write_read(IMU, vec![0x75], vec![0]).with_error(ErrorKind::ArbitrationLoss),
    ];
    let mock = Mock::new(&expect);
    let mut s = Supervised::new(
        Box::new(Mpu6050::new(mock.clone(), mpu6050::Settings::default())),
        backoff(),
        Duration::from_secs(1),
    );
    let t0 = Instant::now();
    assert!(matches!(s.attempt(t0), Attempt::Failed(e) if e.kind() == "wrong_chip"));
    assert!(matches!(
        s.attempt(t0 + Duration::from_secs(1)),
        Attempt::Failed(e) if e.kind() == "bus"
    ));
    let st = s.status();
    assert_eq!(
        (st.faults.get("wrong_chip"), st.faults.get("bus")),
        (Some(&1), Some(&1))
    );
    assert!(st.retry_in_ms.is_some());
    drop(s);
    mock.clone().done();
}
