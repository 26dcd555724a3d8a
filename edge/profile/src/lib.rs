//! `dai-profile`: an on-demand CPU profile of the running process, as the
//! performance guide asks for (its PyTorch Profiler / cProfile, in Rust):
//! `GET /debug/pprof/profile?seconds=N[&format=svg][&frequency=HZ]` on
//! `dai-edge` and `dai-cloud`.
//!
//! - [`Request::parse`] reads the query (pure; every bound checked, each
//!   error names the parameter, its value and what was expected);
//! - [`capture`] samples the whole process with pprof-rs (a `SIGPROF`
//!   timer, stacks walked in the signal handler) for the asked duration,
//!   one capture at a time per process ([`ProfileError::Busy`] otherwise:
//!   the profiler is process-wide and a second timer would corrupt both);
//! - [`proto`] encodes the samples as the pprof protobuf (`profile.proto`
//!   of google/pprof), which `pprof`, `go tool pprof` and speedscope read;
//!   `format=svg` is a flamegraph drawn by [`flame`].
//!
//! [`capture`] blocks for the duration: callers run it on a blocking
//! thread. Authentication is the caller's (both servers put the route
//! behind their API token, which they require off loopback).

pub mod flame;
pub mod proto;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Longest capture.
pub const MAX_SECONDS: u64 = 60;
/// Default capture when `seconds` is not given (as Go's net/http/pprof,
/// bounded lower: our devices are small).
pub const DEFAULT_SECONDS: u64 = 10;
/// Sampling rate bounds; 99 Hz by default (off the beat of 100 Hz timers).
pub const MAX_FREQUENCY: i32 = 1000;
pub const DEFAULT_FREQUENCY: i32 = 99;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("query parameter {name}={value:?}: expected {expected}")]
    BadQuery {
        name: String,
        value: String,
        expected: &'static str,
    },
    #[error(
        "a CPU profile is already being taken; try again when it ends (at most {MAX_SECONDS} s)"
    )]
    Busy,
    #[error("profiler: {0}")]
    Profiler(String),
}

impl ProfileError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            ProfileError::BadQuery { .. } => 400,
            ProfileError::Busy => 409,
            ProfileError::Profiler(_) => 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// pprof protobuf (uncompressed; pprof tools read it as is).
    Pprof,
    /// A flamegraph.
    Svg,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub seconds: u64,
    pub frequency: i32,
    pub format: Format,
}

impl Default for Request {
    fn default() -> Request {
        Request {
            seconds: DEFAULT_SECONDS,
            frequency: DEFAULT_FREQUENCY,
            format: Format::Pprof,
        }
    }
}

impl Request {
    /// Read `seconds`, `frequency` and `format` from a raw query string
    /// (`None` or empty: the defaults). Unknown parameters are refused, so
    /// a typo does not silently profile for the default time.
    pub fn parse(query: Option<&str>) -> Result<Request, ProfileError> {
        let mut r = Request::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |expected| ProfileError::BadQuery {
                name: name.to_string(),
                value: value.to_string(),
                expected,
            };
            match name {
                "seconds" => {
                    r.seconds = value
                        .parse()
                        .ok()
                        .filter(|s| (1..=MAX_SECONDS).contains(s))
                        .ok_or_else(|| bad("whole seconds from 1 to 60"))?;
                }
                "frequency" => {
                    r.frequency = value
                        .parse()
                        .ok()
                        .filter(|f| (1..=MAX_FREQUENCY).contains(f))
                        .ok_or_else(|| bad("samples per second from 1 to 1000"))?;
                }
                "format" => {
                    r.format = match value {
                        "pprof" | "proto" => Format::Pprof,
                        "svg" | "flamegraph" => Format::Svg,
                        _ => return Err(bad("pprof or svg")),
                    };
                }
                _ => return Err(bad("one of seconds, frequency, format")),
            }
        }
        Ok(r)
    }
}

/// A finished capture.
#[derive(Debug)]
pub struct Captured {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// Stack samples taken.
    pub samples: u64,
}

/// Set while a capture runs (the one-at-a-time rule).
static BUSY: AtomicBool = AtomicBool::new(false);

struct Slot;

impl Slot {
    fn take() -> Result<Slot, ProfileError> {
        BUSY.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Slot)
            .map_err(|_| ProfileError::Busy)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        BUSY.store(false, Ordering::Release);
    }
}

/// Whether a capture is running in this process now.
pub fn running() -> bool {
    BUSY.load(Ordering::Acquire)
}

/// Profile the process for `req.seconds`. Blocks the calling thread.
pub fn capture(req: &Request) -> Result<Captured, ProfileError> {
    let _slot = Slot::take()?;
    let err = |e: pprof::Error| ProfileError::Profiler(e.to_string());
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(req.frequency)
        // Frames inside these libraries cannot be unwound safely from a
        // signal handler (pprof-rs's advice): the sample keeps its caller.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(err)?;
    std::thread::sleep(Duration::from_secs(req.seconds));
    let report = guard.report().build().map_err(err)?;
    drop(guard);
    let samples = report.data.values().map(|&c| c.max(0) as u64).sum();
    let (body, content_type) = match req.format {
        Format::Pprof => (proto::encode(&report), "application/octet-stream"),
        Format::Svg => {
            let title = format!(
                "CPU flamegraph: {samples} samples in {} s at {} Hz{}",
                req.seconds,
                req.frequency,
                // The timer counts CPU time: an idle process takes none.
                if samples == 0 {
                    " (the process was idle)"
                } else {
                    ""
                }
            );
            (
                flame::svg(&folded(&report), &title).into_bytes(),
                "image/svg+xml",
            )
        }
    };
    Ok(Captured {
        body,
        content_type,
        samples,
    })
}

/// The report's stacks, outermost caller first, under their thread.
fn folded(report: &pprof::Report) -> Vec<(Vec<String>, u64)> {
    report
        .data
        .iter()
        .map(|(frames, &n)| {
            let mut stack = vec![frames.thread_name_or_id()];
            // pprof-rs keeps the sampled function first.
            stack.extend(
                frames
                    .frames
                    .iter()
                    .rev()
                    .flat_map(|f| f.iter().rev().map(|s| s.name())),
            );
            (stack, n.max(0) as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bounded_and_typos_refused() {
        assert_eq!(Request::parse(None).expect("default"), Request::default());
        let r = Request::parse(Some("seconds=3&format=svg&frequency=250")).expect("ok");
        assert_eq!((r.seconds, r.frequency, r.format), (3, 250, Format::Svg));
        for (q, says) in [
            (
                "seconds=0",
                "seconds=\"0\": expected whole seconds from 1 to 60",
            ),
            ("seconds=61", "seconds=\"61\""),
            ("seconds=abc", "seconds=\"abc\""),
            (
                "frequency=5000",
                "frequency=\"5000\": expected samples per second",
            ),
            ("format=png", "format=\"png\": expected pprof or svg"),
            (
                "second=5",
                "second=\"5\": expected one of seconds, frequency, format",
            ),
        ] {
            let e = Request::parse(Some(q)).expect_err(q).to_string();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    /// Not inlined, so its name is on the sampled stacks.
    #[inline(never)]
    fn busy_for_profile_test(d: Duration) -> u64 {
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < d {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        x
    }

    #[test]
    fn a_capture_samples_this_process_and_only_one_runs_at_once() {
        let spin = std::thread::spawn(|| busy_for_profile_test(Duration::from_millis(4000)));
        let req = Request {
            seconds: 1,
            frequency: 200,
            format: Format::Pprof,
        };
        // The second asks once the first holds the slot (not after a
        // guessed delay, which a loaded machine could outrun).
        let second = std::thread::spawn(|| {
            let t = std::time::Instant::now();
            while !running() && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            capture(&Request::default()).map(|_| ())
        });
        let c = capture(&req).expect("captured");
        assert!(matches!(
            second.join().expect("joins"),
            Err(ProfileError::Busy)
        ));
        assert!(
            c.samples > 20,
            "a busy thread for 1 s at 200 Hz: {} samples",
            c.samples
        );
        let p = proto::decode(&c.body).expect("pprof protobuf");
        assert_eq!(p.string_table.first().map(String::as_str), Some(""));
        let names: Vec<&str> = p
            .function
            .iter()
            .filter_map(|f| p.string_table.get(f.name as usize).map(String::as_str))
            .collect();
        assert!(
            names.iter().any(|n| n.contains("busy_for_profile_test")),
            "the spinning closure is in the profile: {names:?}"
        );
        assert_eq!(p.period, 1_000_000_000 / 200);
        // The slot is free again.
        let svg = capture(&Request {
            format: Format::Svg,
            ..req
        })
        .expect("svg");
        let text = String::from_utf8_lossy(&svg.body).into_owned();
        assert!(
            text.contains("<svg") && text.contains("busy_for_profile_test"),
            "{text:.300}"
        );
        spin.join().expect("spins");
    }
}
