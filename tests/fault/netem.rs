//! A user-space netem for the partition tests: this kernel has no `sch_netem`
//! (and no way to load it), so packets that must suffer loss or latency are
//! routed through a TUN device and this program delays or drops them.
//!
//!     netem TUN CONTROL MAX_SECS
//!
//! Runs inside the test's router namespace. Every packet the router sends
//! to TUN (policy routing: what comes from or goes to an edge) is read
//! here, dropped with the loss of its rule or held for its delay (± a
//! uniform jitter), and written back into TUN, from where the kernel
//! forwards it on. CONTROL holds one rule per line, `ADDR LOSS DELAY_MS
//! JITTER_MS` (a packet from or to ADDR gets it; no rule: passed at once);
//! it is read again whenever it changes. The program ends by itself when
//! CONTROL is removed or after MAX_SECS. At most `MAX_QUEUED` packets are
//! held (more are dropped, as a full router queue drops them). Each
//! reload logs the counts so far (`so far P passed, D delayed, X
//! dropped`), which the tests read to show the faults were real.
//!
//! Built by the tests with `rustc` (no crates, like the power-loss shim).

use std::collections::BinaryHeap;
use std::cmp::Reverse;
use std::ffi::CString;
use std::time::{Duration, Instant, SystemTime};

const MAX_QUEUED: usize = 20_000;
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const O_RDWR: i32 = 2;
const POLLIN: i16 = 1;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

unsafe extern "C" {
    fn open(path: *const std::ffi::c_char, flags: i32, ...) -> i32;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn read(fd: i32, buf: *mut u8, n: usize) -> isize;
    fn write(fd: i32, buf: *const u8, n: usize) -> isize;
    fn poll(fds: *mut PollFd, n: u64, timeout_ms: i32) -> i32;
}

#[derive(Clone, Copy)]
struct Rule {
    addr: [u8; 4],
    loss: f64,
    delay: Duration,
    jitter: Duration,
}

fn parse_rules(text: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 {
            continue;
        }
        let addr: Vec<u8> = f[0].split('.').filter_map(|o| o.parse().ok()).collect();
        let (Ok(loss), Ok(delay), Ok(jitter)) =
            (f[1].parse::<f64>(), f[2].parse::<u64>(), f[3].parse::<u64>())
        else {
            continue;
        };
        if addr.len() == 4 {
            rules.push(Rule {
                addr: [addr[0], addr[1], addr[2], addr[3]],
                loss,
                delay: Duration::from_millis(delay),
                jitter: Duration::from_millis(jitter),
            });
        }
    }
    rules
}

/// xorshift: enough for loss and jitter, seeded from the clock.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn open_tun(name: &str) -> i32 {
    let dev = CString::new("/dev/net/tun").expect("path");
    let fd = unsafe { open(dev.as_ptr(), O_RDWR) };
    if fd < 0 {
        eprintln!("netem: cannot open /dev/net/tun");
        std::process::exit(1);
    }
    // struct ifreq: the name (16 bytes), then the flags (a short).
    let mut ifr = [0u8; 40];
    let n = name.len().min(15);
    ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    if unsafe { ioctl(fd, TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        eprintln!("netem: TUNSETIFF {name} failed");
        std::process::exit(1);
    }
    fd
}

fn modified(path: &str) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: netem TUN CONTROL MAX_SECS");
        std::process::exit(2);
    }
    let (tun, control) = (&args[1], &args[2]);
    let max = Duration::from_secs(args[3].parse().unwrap_or(600));
    let fd = open_tun(tun);
    let began = Instant::now();
    let mut rng = Rng(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1,
    );
    let mut rules: Vec<Rule> = Vec::new();
    let mut seen_mtime = None;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65_536];
    let (mut passed, mut dropped, mut delayed) = (0u64, 0u64, 0u64);
    loop {
        let now = Instant::now();
        if now.duration_since(last_check) >= Duration::from_millis(100) {
            last_check = now;
            match modified(control) {
                None => break,
                Some(m) if Some(m) != seen_mtime => {
                    seen_mtime = Some(m);
                    rules = parse_rules(&std::fs::read_to_string(control).unwrap_or_default());
                    eprintln!(
                        "netem: {} rule(s); so far {passed} passed, {delayed} delayed, {dropped} dropped",
                        rules.len()
                    );
                }
                Some(_) => {}
            }
            if began.elapsed() > max {
                break;
            }
        }
        // Release what is due.
        while let Some(Reverse((at, _, _))) = queue.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, p))) = queue.pop() else {
                break;
            };
            unsafe { write(fd, p.as_ptr(), p.len()) };
        }
        let wait = queue
            .peek()
            .map(|Reverse((at, _, _))| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let mut pfd = PollFd {
            fd,
            events: POLLIN,
            revents: 0,
        };
        let ready = unsafe { poll(&mut pfd, 1, wait.as_millis().max(1) as i32) };
        if ready <= 0 || pfd.revents & POLLIN == 0 {
            continue;
        }
        let n = unsafe { read(fd, buf.as_mut_ptr(), buf.len()) };
        if n < 20 {
            continue;
        }
        let p = &buf[..n as usize];
        if p[0] >> 4 != 4 {
            // Not IPv4 (the lab has none other): passed as it is.
            unsafe { write(fd, p.as_ptr(), p.len()) };
            continue;
        }
        let (src, dst) = (&p[12..16], &p[16..20]);
        let rule = rules
            .iter()
            .find(|r| r.addr == src || r.addr == dst)
            .copied();
        match rule {
            None => {
                passed += 1;
                unsafe { write(fd, p.as_ptr(), p.len()) };
            }
            Some(r) if rng.unit() < r.loss => dropped += 1,
            Some(_) if queue.len() >= MAX_QUEUED => dropped += 1,
            Some(r) => {
                let spread = r.jitter.as_secs_f64() * (2.0 * rng.unit() - 1.0);
                let hold = (r.delay.as_secs_f64() + spread).max(0.0);
                seq += 1;
                delayed += 1;
                queue.push(Reverse((
                    Instant::now() + Duration::from_secs_f64(hold),
                    seq,
                    p.to_vec(),
                )));
            }
        }
    }
    eprintln!("netem: done; {passed} passed, {delayed} delayed, {dropped} dropped");
}
