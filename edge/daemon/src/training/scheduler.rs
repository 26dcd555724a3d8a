//! The training scheduler: every `training.check_interval_sec`, a run for
//! each head model with at least `min_new_samples` new samples, while
//! machine CPU is under `max_cpu_percent` and no inference is queued.
//!
//! Spawned by `tasks` when `training.enabled`; it reads the machine CPU the
//! resource manager last sampled ([`Machine`]).

use super::Training;
use crate::resources::Machine;
use std::sync::Arc;
use std::time::Duration;

/// Why a model does not train now, or `None` when it may.
fn waiting_reason(cpu: f64, max_cpu_percent: f64, queue_depth: usize) -> Option<String> {
    if cpu > max_cpu_percent {
        Some(format!(
            "waiting: CPU {cpu:.0}% over max_cpu_percent {max_cpu_percent}"
        ))
    } else if queue_depth > 0 {
        Some("waiting: inference queued".into())
    } else {
        None
    }
}

/// Start runs when enough new samples exist and the device is not busy.
pub async fn scheduler_task(
    training: Training,
    machine: Arc<Machine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let t = training.config.training.clone();
    if !t.enabled {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(t.check_interval_sec)) => {}
            _ = stop.changed() => return,
        }
        for info in training.inference.runtime.models() {
            let Some(m) = info.model else { continue };
            if m.head.is_none() {
                continue;
            }
            let name = m.name().to_string();
            if !enough_new_samples(&training, &name, m.version(), t.min_new_samples).await {
                continue;
            }
            let queue = training.inference.runtime.pool().queue_depth();
            if let Some(reason) = waiting_reason(machine.cpu_percent(), t.max_cpu_percent, queue) {
                training.set_state(&name, &reason);
                continue;
            }
            let tr = training.clone();
            let result = tokio::task::spawn_blocking(move || tr.run(&name)).await;
            match result {
                Ok(Ok(run)) => tracing::info!(run = %run, "training run finished"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::chain(&e), "training run not done")
                }
                Err(e) => tracing::error!(error = %e, "training task failed"),
            }
        }
    }
}

/// Whether `model` has at least `min` samples for `base` newer than its
/// last run consumed. Store calls block: they run off the async threads.
async fn enough_new_samples(training: &Training, model: &str, base: &str, min: u64) -> bool {
    let (store, m, base) = (training.store.clone(), model.to_string(), base.to_string());
    let new = tokio::task::spawn_blocking(move || {
        let consumed = store.last_consumed_sample(&m)?;
        store.samples_since(&m, &base, consumed)
    })
    .await;
    match new {
        Ok(Ok(n)) => n as u64 >= min,
        Ok(Err(e)) => {
            tracing::warn!(%model, error = %crate::error::chain(&e), "cannot count new samples");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "sample count task failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_machine_or_a_queue_makes_training_wait() {
        assert_eq!(waiting_reason(10.0, 80.0, 0), None);
        assert_eq!(
            waiting_reason(95.0, 80.0, 0).as_deref(),
            Some("waiting: CPU 95% over max_cpu_percent 80")
        );
        assert_eq!(
            waiting_reason(10.0, 80.0, 3).as_deref(),
            Some("waiting: inference queued")
        );
    }
}
