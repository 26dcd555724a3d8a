//! Named crash points for the fault-injection tests (tests/edge/nemesis.rs):
//! `DAI_CRASH_POINT=NAME` (or `NAME:N`) makes the process abort, as a
//! SIGKILL or a power cut would end it, the first (or N-th) time execution
//! passes [`hit`]`(NAME)`. They sit where a crash is most dangerous: between
//! a commit and what it promises (a publish, an ack, a delete).
//!
//! The variable is read once; without it, [`hit`] is one atomic load. This
//! is the crate's one exception to "no I/O": both binaries use it, and it
//! only reads its own environment.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    after: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("DAI_CRASH_POINT").ok()?;
            let (name, after) = match v.split_once(':') {
                Some((n, k)) => (n.to_string(), k.parse().ok()?),
                None => (v, 1),
            };
            Some(Armed {
                name,
                after,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Abort here if this is the armed point's N-th pass.
pub fn hit(name: &str) {
    if let Some(a) = armed()
        && a.name == name
        && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.after
    {
        eprintln!("DAI_CRASH_POINT {name}: aborting");
        std::process::abort();
    }
}
