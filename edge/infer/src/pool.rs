//! Inference workers: bounded queues, load balancing, dynamic batching.
//!
//! Each worker is an OS thread (tract is synchronous) with its own bounded
//! queue. [`Pool::submit`] picks a worker among the *active* ones with the
//! configured strategy and never blocks: a full queue is an overload the
//! caller turns into 503. A worker takes one job, then — for models with a
//! batch axis — gathers more jobs of the same model already queued (waiting
//! up to `max_batch_wait` only while other requests are in flight) until the
//! current batch size is reached, runs them as one batch and splits the
//! answer. The resource manager changes the active worker count and the
//! batch size at run time through atomics.

use crate::model::{LoadedModel, ModelError};
use crate::options::LoadBalancingStrategy;
use crate::tensor::TensorData;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a worker hands back for one job.
#[derive(Debug)]
pub struct JobOutput {
    pub outputs: Vec<TensorData>,
    pub worker: usize,
    /// Time spent queued before a worker took the job.
    pub queue: Duration,
    /// Batch assembly (concatenation) and split time.
    pub batching: Duration,
    /// Time inside tract.
    pub infer: Duration,
    /// Rows and requests in the batch this job ran in.
    pub batch_rows: usize,
    pub batch_requests: usize,
}

/// One request for a worker.
#[derive(Debug)]
pub struct Job {
    pub model: Arc<LoadedModel>,
    pub inputs: Vec<TensorData>,
    pub rows: usize,
    pub enqueued: Instant,
    pub reply: tokio::sync::oneshot::Sender<Result<JobOutput, ModelError>>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("worker {worker} queue is full ({capacity} requests)")]
    Overloaded { worker: usize, capacity: usize },
    #[error("the inference pool is shutting down")]
    ShuttingDown,
}

/// Per-worker counters, shared with the status page.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub in_flight: AtomicUsize,
    pub processed: AtomicU64,
    pub batches: AtomicU64,
}

/// Picks a worker for a request.
#[derive(Debug)]
pub struct Balancer {
    pub strategy: LoadBalancingStrategy,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(strategy: LoadBalancingStrategy) -> Balancer {
        Balancer {
            strategy,
            next: AtomicUsize::new(0),
        }
    }

    /// Index in `0..loads.len()`; `loads` are the active workers' in-flight counts.
    pub fn pick(&self, client: Option<IpAddr>, loads: &[usize]) -> usize {
        let n = loads.len().max(1);
        match self.strategy {
            LoadBalancingStrategy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalancingStrategy::LeastConnections => {
                // Ties rotate so equal load still spreads.
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                (0..n)
                    .map(|i| (start + i) % n)
                    .min_by_key(|&i| loads.get(i).copied().unwrap_or(0))
                    .unwrap_or(0)
            }
            LoadBalancingStrategy::IpHash => match client {
                Some(ip) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    ip.hash(&mut h);
                    (h.finish() % n as u64) as usize
                }
                None => self.next.fetch_add(1, Ordering::Relaxed) % n,
            },
        }
    }
}

struct Worker {
    tx: SyncSender<Job>,
    stats: Arc<WorkerStats>,
}

/// The worker pool.
pub struct Pool {
    workers: Vec<Worker>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    balancer: Balancer,
    active: Arc<AtomicUsize>,
    batch_size: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    queue_capacity: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers.len())
            .field("active", &self.active())
            .finish()
    }
}

/// Pool sizing and behaviour.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub workers: usize,
    pub queue_capacity: usize,
    pub strategy: LoadBalancingStrategy,
    pub max_batch: usize,
    pub max_batch_wait: Duration,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        let active = Arc::new(AtomicUsize::new(cfg.workers.max(1)));
        let batch_size = Arc::new(AtomicUsize::new(cfg.max_batch.max(1)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for id in 0..cfg.workers.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_capacity.max(1));
            let stats = Arc::new(WorkerStats::default());
            let ctx = WorkerCtx {
                id,
                rx,
                stats: stats.clone(),
                batch_size: batch_size.clone(),
                in_flight: in_flight.clone(),
                max_wait: cfg.max_batch_wait,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("dai-infer-{id}"))
                .spawn(move || ctx.run());
            match spawned {
                Ok(handle) => {
                    threads.push(handle);
                    workers.push(Worker { tx, stats });
                }
                Err(e) => tracing::error!(worker = id, error = %e, "cannot start inference worker"),
            }
        }
        active.store(workers.len().max(1), Ordering::Relaxed);
        Pool {
            workers,
            threads: Mutex::new(threads),
            balancer: Balancer::new(cfg.strategy),
            active,
            batch_size,
            in_flight,
            queue_capacity: cfg.queue_capacity.max(1),
        }
    }

    pub fn strategy(&self) -> LoadBalancingStrategy {
        self.balancer.strategy
    }

    pub fn max_workers(&self) -> usize {
        self.workers.len()
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn set_active(&self, n: usize) {
        self.active
            .store(n.clamp(1, self.workers.len().max(1)), Ordering::Relaxed);
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size.load(Ordering::Relaxed)
    }

    pub fn set_batch_size(&self, n: usize) {
        self.batch_size.store(n.max(1), Ordering::Relaxed);
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity * self.workers.len()
    }

    /// Requests submitted and not yet answered, all workers.
    pub fn queue_depth(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn worker_stats(&self) -> Vec<Arc<WorkerStats>> {
        self.workers.iter().map(|w| w.stats.clone()).collect()
    }

    /// Queue `job` on a worker chosen by the strategy; never blocks.
    pub fn submit(&self, job: Job, client: Option<IpAddr>) -> Result<(), SubmitError> {
        let active = self.active().min(self.workers.len());
        if active == 0 {
            return Err(SubmitError::ShuttingDown);
        }
        let loads: Vec<usize> = self.workers[..active]
            .iter()
            .map(|w| w.stats.in_flight.load(Ordering::Relaxed))
            .collect();
        let idx = self.balancer.pick(client, &loads);
        let worker = &self.workers[idx];
        worker.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        match worker.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                worker.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Overloaded {
                        worker: idx,
                        capacity: self.queue_capacity,
                    },
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Stop accepting work, let workers finish their queues, join them.
    pub fn shutdown(self) {
        let Pool {
            workers, threads, ..
        } = self;
        drop(workers);
        let threads = threads.into_inner().unwrap_or_else(|p| p.into_inner());
        for t in threads {
            let _ = t.join();
        }
    }
}

struct WorkerCtx {
    id: usize,
    rx: Receiver<Job>,
    stats: Arc<WorkerStats>,
    batch_size: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_wait: Duration,
}

impl WorkerCtx {
    fn run(self) {
        let mut deferred: VecDeque<Job> = VecDeque::new();
        loop {
            let first = match deferred.pop_front() {
                Some(j) => j,
                None => match self.rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            let batch = self.gather(first, &mut deferred);
            self.execute(batch);
        }
    }

    fn gather(&self, first: Job, deferred: &mut VecDeque<Job>) -> Vec<Job> {
        let limit = self
            .batch_size
            .load(Ordering::Relaxed)
            .min(first.model.max_batch);
        let mut rows = first.rows;
        let mut batch = vec![first];
        let manifest = &batch[0].model.bundle.manifest;
        if !manifest.batching || !manifest.dynamic_batching || rows >= limit {
            return batch;
        }
        let deadline = Instant::now() + self.max_wait;
        while rows < limit {
            let next = match self.rx.try_recv() {
                Ok(j) => j,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    // Waiting only pays when more requests for this worker
                    // exist right now (queued ones count in its in_flight).
                    let others = self.stats.in_flight.load(Ordering::Relaxed) > batch.len();
                    let now = Instant::now();
                    if !others || now >= deadline {
                        break;
                    }
                    match self.rx.recv_timeout(deadline - now) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if Arc::ptr_eq(&next.model, &batch[0].model) && rows + next.rows <= limit {
                rows += next.rows;
                batch.push(next);
            } else {
                deferred.push_back(next);
                break;
            }
        }
        batch
    }

    fn execute(&self, batch: Vec<Job>) {
        let started = Instant::now();
        let model = batch[0].model.clone();
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        let n = batch.len();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(&model, &batch, rows)
        }))
        .unwrap_or_else(|_| {
            Err(ModelError::Run {
                model: model.name().to_string(),
                message: "the runtime panicked on this input".into(),
            })
        });
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((per_job, batching, infer)) => {
                for (job, outputs) in batch.into_iter().zip(per_job) {
                    let out = JobOutput {
                        outputs,
                        worker: self.id,
                        queue: started.saturating_duration_since(job.enqueued),
                        batching,
                        infer,
                        batch_rows: rows,
                        batch_requests: n,
                    };
                    self.finish(job.reply, Ok(out));
                }
            }
            // One bad request must not fail the others it was merged
            // with: rerun each job alone so only the culprit gets the error.
            Err(_) if n > 1 => {
                for job in batch {
                    self.execute(vec![job]);
                }
            }
            Err(e) => {
                for job in batch {
                    self.finish(job.reply, Err(e.clone()));
                }
            }
        }
    }

    fn finish(
        &self,
        reply: tokio::sync::oneshot::Sender<Result<JobOutput, ModelError>>,
        result: Result<JobOutput, ModelError>,
    ) {
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The HTTP client may have gone away; its answer is simply dropped.
        let _ = reply.send(result);
    }
}

type BatchResult = (Vec<Vec<TensorData>>, Duration, Duration);

fn run_batch(model: &LoadedModel, batch: &[Job], rows: usize) -> Result<BatchResult, ModelError> {
    if batch.len() == 1 {
        let inputs: Vec<&TensorData> = batch[0].inputs.iter().collect();
        let t = Instant::now();
        let out = model.run(&inputs, rows)?;
        return Ok((vec![out], Duration::ZERO, t.elapsed()));
    }
    let t0 = Instant::now();
    let bad = |e: crate::tensor::TensorError| ModelError::Run {
        model: model.name().to_string(),
        message: e.0,
    };
    let mut joined = Vec::with_capacity(batch[0].inputs.len());
    for i in 0..batch[0].inputs.len() {
        let parts: Vec<&TensorData> = batch.iter().map(|j| &j.inputs[i]).collect();
        joined.push(TensorData::concat_rows(&parts, rows).map_err(bad)?);
    }
    let assemble = t0.elapsed();
    let t1 = Instant::now();
    let refs: Vec<&TensorData> = joined.iter().collect();
    let outputs = model.run(&refs, rows)?;
    let infer = t1.elapsed();
    let t2 = Instant::now();
    let mut per_job = Vec::with_capacity(batch.len());
    let mut start = 0;
    for job in batch {
        let mut outs = Vec::with_capacity(outputs.len());
        for o in &outputs {
            outs.push(o.slice_rows(start, job.rows).map_err(bad)?);
        }
        start += job.rows;
        per_job.push(outs);
    }
    Ok((per_job, assemble + t2.elapsed(), infer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(
        strategy: LoadBalancingStrategy,
        clients: &[Option<IpAddr>],
        loads: &[usize],
    ) -> Vec<usize> {
        let b = Balancer::new(strategy);
        let mut c = vec![0; loads.len()];
        for client in clients {
            c[b.pick(*client, loads)] += 1;
        }
        c
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let clients = vec![None; 300];
        assert_eq!(
            counts(LoadBalancingStrategy::RoundRobin, &clients, &[0, 0, 0]),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn least_connections_prefers_the_idle_worker() {
        let clients = vec![None; 50];
        assert_eq!(
            counts(
                LoadBalancingStrategy::LeastConnections,
                &clients,
                &[5, 0, 3]
            ),
            vec![0, 50, 0]
        );
        // Equal loads rotate.
        let c = counts(LoadBalancingStrategy::LeastConnections, &clients, &[1, 1]);
        assert_eq!(c, vec![25, 25]);
    }

    #[test]
    fn ip_hash_is_sticky_per_client_and_spreads_clients() {
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let c = counts(
            LoadBalancingStrategy::IpHash,
            &vec![Some(a); 40],
            &[0, 0, 0, 0],
        );
        assert_eq!(c.iter().filter(|&&n| n == 40).count(), 1, "{c:?}");
        let many: Vec<Option<IpAddr>> = (1..=200u8)
            .map(|i| Some(IpAddr::from([10, 0, 0, i])))
            .collect();
        let c = counts(LoadBalancingStrategy::IpHash, &many, &[0, 0, 0, 0]);
        assert!(c.iter().all(|&n| n >= 25), "uneven: {c:?}");
    }
}
