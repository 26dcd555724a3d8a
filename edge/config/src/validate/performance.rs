//! The top-level knobs of the performance guide: resources, batching,
//! caching, timeouts, profiling and the latency / throughput targets.

use super::{Problems, finite_pos};
use crate::Config;

pub(super) fn check(p: &mut Problems<'_>, c: &Config, cores: Option<usize>) {
    p.check(
        finite_pos(c.gpu_memory_allocation) && c.gpu_memory_allocation <= 1.0,
        "gpu_memory_allocation",
        c.gpu_memory_allocation,
        "expected a fraction in (0, 1]",
    );
    check_cpu_limit(p, c.cpu_limit, cores);
    p.check(
        (16..=16_777_216).contains(&c.memory_limit_mb),
        "memory_limit_mb",
        c.memory_limit_mb,
        "expected MiB in 16..=16777216",
    );
    p.check(
        (1..=64).contains(&c.max_parallel_agents),
        "max_parallel_agents",
        c.max_parallel_agents,
        "expected workers in 1..=64",
    );
    p.check(
        (1..=1024).contains(&c.batch_size),
        "batch_size",
        c.batch_size,
        "expected 1..=1024",
    );
    p.check(
        (1..=10_000).contains(&c.num_epochs),
        "num_epochs",
        c.num_epochs,
        "expected 1..=10000",
    );
    p.check(
        c.cache_size_mb <= 65_536,
        "cache_size_mb",
        c.cache_size_mb,
        "expected MiB in 0..=65536",
    );
    p.check(
        (1..=3600).contains(&c.connection_timeout_sec),
        "connection_timeout_sec",
        c.connection_timeout_sec,
        "expected seconds in 1..=3600",
    );
    p.check(
        c.retry_delay_sec <= 3600,
        "retry_delay_sec",
        c.retry_delay_sec,
        "expected seconds in 0..=3600",
    );
    p.check(
        (1..=86_400).contains(&c.profiling_interval_sec),
        "profiling_interval_sec",
        c.profiling_interval_sec,
        "expected seconds in 1..=86400",
    );
    p.check(
        finite_pos(c.latency_threshold_ms),
        "latency_threshold_ms",
        c.latency_threshold_ms,
        "expected milliseconds > 0",
    );
    p.check(
        finite_pos(c.throughput_target_rps),
        "throughput_target_rps",
        c.throughput_target_rps,
        "expected requests per second > 0",
    );
}

/// The shipped default: a 1-core board runs the embedded config as it is
/// (the worker count is capped by the cores anyway); only a value someone
/// chose is held to the machine.
const DEFAULT_CPU_LIMIT: f64 = 2.0;

/// `cpu_limit` is documented as "> 0 and at most the machine's core count";
/// more cores than the machine has would only oversubscribe it. `cores` is
/// `None` when the count is unknown: then only the fixed range applies.
fn check_cpu_limit(p: &mut Problems<'_>, cpu_limit: f64, cores: Option<usize>) {
    if !(finite_pos(cpu_limit) && cpu_limit <= 1024.0) {
        p.invalid(
            "cpu_limit",
            cpu_limit.to_string(),
            "expected CPU cores in (0, 1024]",
        );
    } else if let Some(cores) =
        cores.filter(|&n| cpu_limit > n as f64 && cpu_limit != DEFAULT_CPU_LIMIT)
    {
        p.invalid(
            "cpu_limit",
            cpu_limit.to_string(),
            &format!("expected CPU cores in (0, {cores}]: at most this machine's core count"),
        );
    }
}
