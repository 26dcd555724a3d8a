//! Bundles arriving over MQTT (`dai-cloud models publish`): the daemon's
//! half of [`dai_protocol::bundle`]. The uplink verifies each offer's
//! signature and each chunk against the offer's list; this keeps the
//! chunks on disk so a download resumes after a reconnect or a restart,
//! and hands the complete archive to the same [`Installer`] as
//! `POST /v1/models`.
//!
//! Files under `data_dir/models/.downloads/`: `SHA.part` (the chunks so
//! far, appended in order) and `SHA.done` (the outcome: once a bundle was
//! loaded or failed, its retained offer is not fetched again). Reports
//! (downloading, verified, loaded, failed with the reason) queue here for
//! the uplink to publish.

use super::Installer;
use crate::handles::{Inference, StoreHandle};
use crate::training::Training;
use dai_protocol::bundle::{Offer, Report, ReportState};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// Reports held for the uplink; older ones are dropped past this.
const MAX_QUEUED: usize = 64;
/// A downloading report every this many chunks.
const PROGRESS_EVERY: u32 = 32;

/// Downloads in progress and their reports.
#[derive(Debug, Clone)]
pub struct Downloads {
    dir: PathBuf,
    installer: Arc<Installer>,
    inference: Inference,
    store: StoreHandle,
    training: Training,
    reports: Arc<Mutex<VecDeque<Report>>>,
}

fn report(offer: &Offer, state: ReportState, received: u32, detail: String) -> Report {
    Report {
        name: offer.name.clone(),
        version: offer.version.clone(),
        sha256: offer.sha256.clone(),
        state,
        received,
        total: offer.chunks.len() as u32,
        detail,
    }
}

impl Downloads {
    pub fn new(
        installer: Arc<Installer>,
        inference: Inference,
        store: StoreHandle,
        training: Training,
    ) -> Downloads {
        Downloads {
            dir: installer.root().join(".downloads"),
            installer,
            inference,
            store,
            training,
            reports: Arc::default(),
        }
    }

    fn push(&self, r: Report) {
        match r.state {
            ReportState::Failed => {
                tracing::warn!(bundle = %r.name, version = %r.version, reason = %r.detail, "bundle from the aggregator failed")
            }
            s => {
                tracing::info!(bundle = %r.name, version = %r.version, state = s.as_str(), received = r.received, total = r.total, "bundle from the aggregator")
            }
        }
        let mut q = self.reports.lock();
        if q.len() >= MAX_QUEUED {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// Reports to publish, oldest first (drained).
    pub fn take_reports(&self, max: usize) -> Vec<Report> {
        let mut q = self.reports.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    fn part(&self, offer: &Offer) -> PathBuf {
        self.dir.join(format!("{}.part", offer.sha256))
    }

    fn done(&self, offer: &Offer) -> PathBuf {
        self.dir.join(format!("{}.done", offer.sha256))
    }

    /// A verified offer for this device: the chunks already held (resume
    /// from there), or `None` when it wants none (done before, or too big).
    pub fn offered(&self, offer: &Offer) -> Option<u32> {
        if self.done(offer).exists() {
            return None;
        }
        if offer.size > self.installer.max_bytes() {
            self.finish(
                offer,
                ReportState::Failed,
                format!(
                    "{} bytes is more than daemon.max_upload_mb ({} MiB)",
                    offer.size,
                    self.installer.max_bytes() >> 20
                ),
            );
            return None;
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot keep bundle downloads");
            return None;
        }
        let held = self.held(offer);
        self.push(report(offer, ReportState::Downloading, held, String::new()));
        Some(held)
    }

    /// Chunks of the part file that match the offer, in order; the file is
    /// cut after the last good one.
    fn held(&self, offer: &Offer) -> u32 {
        let path = self.part(offer);
        let Ok(mut f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            return 0;
        };
        let mut good = 0u32;
        let mut buf = vec![0u8; offer.chunk_bytes as usize];
        while let Some(len) = offer.chunk_len(good) {
            let b = &mut buf[..len];
            if f.read_exact(b).is_err() || offer.check_chunk(good, b).is_err() {
                break;
            }
            good += 1;
        }
        let keep = u64::from(good) * u64::from(offer.chunk_bytes);
        let _ = f.set_len(keep.min(offer.size));
        good
    }

    /// Chunk `index` (already checked against the offer) onto the part file.
    pub fn chunk(&self, offer: &Offer, index: u32, data: &[u8]) -> Result<(), String> {
        let path = self.part(offer);
        let at = u64::from(index) * u64::from(offer.chunk_bytes);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < at {
            return Err(format!("chunk {index} arrived before the ones it follows"));
        }
        f.set_len(at)
            .and_then(|()| f.seek(std::io::SeekFrom::Start(at)).map(|_| ()))
            .and_then(|()| f.write_all(data))
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let received = index + 1;
        if received.is_multiple_of(PROGRESS_EVERY) {
            self.push(report(
                offer,
                ReportState::Downloading,
                received,
                String::new(),
            ));
        }
        Ok(())
    }

    /// Every chunk is in: check the whole archive and install it, in the
    /// background (a load can take seconds; the uplink goes on).
    pub fn complete(&self, offer: &Offer) {
        let this = self.clone();
        let offer = offer.clone();
        tokio::task::spawn_blocking(move || this.install(&offer));
    }

    fn install(&self, offer: &Offer) {
        let part = self.part(offer);
        let total = offer.chunks.len() as u32;
        let sha = match dai_infer::bundle::sha256_file(&part) {
            Ok((sha, _)) => sha,
            Err(e) => return self.finish(offer, ReportState::Failed, e.to_string()),
        };
        if !sha.eq_ignore_ascii_case(&offer.sha256) {
            let _ = std::fs::remove_file(&part);
            return self.finish(
                offer,
                ReportState::Failed,
                format!("archive sha256 {sha} is not the offer's {}", offer.sha256),
            );
        }
        self.push(report(offer, ReportState::Verified, total, String::new()));
        let archive = match self.installer.incoming_path("archive") {
            Ok(p) => p,
            Err(e) => {
                return self.finish(
                    offer,
                    ReportState::Failed,
                    crate::error::chain(&e).to_string(),
                );
            }
        };
        if let Err(e) = std::fs::rename(&part, &archive) {
            return self.finish(
                offer,
                ReportState::Failed,
                format!("{}: {e}", archive.display()),
            );
        }
        match self.installer.install(&self.inference.runtime, &archive) {
            Ok(done) => {
                self.store.record_load(&done.event);
                self.training.restore_head(&done.name);
                self.inference.refresh_model_info();
                if done.version != offer.version {
                    tracing::warn!(offered = %offer.version, installed = %done.version, "the bundle's manifest names another version than its offer");
                }
                self.finish(offer, ReportState::Loaded, String::new());
            }
            Err(e) => self.finish(
                offer,
                ReportState::Failed,
                crate::error::chain(&e).to_string(),
            ),
        }
    }

    /// Record the outcome (so the retained offer is not fetched again) and
    /// report it.
    fn finish(&self, offer: &Offer, state: ReportState, detail: String) {
        let _ = std::fs::create_dir_all(&self.dir);
        let line = format!("{} {}\n", state.as_str(), detail);
        if let Err(e) = std::fs::write(self.done(offer), line) {
            tracing::error!(error = %e, "cannot record a bundle's outcome");
        }
        if matches!(state, ReportState::Loaded | ReportState::Failed) {
            self.inference
                .metrics
                .bundle_outcomes
                .get_or_create(&crate::metrics::Outcome {
                    outcome: state.as_str().into(),
                })
                .inc();
        }
        let received = if state == ReportState::Loaded {
            offer.chunks.len() as u32
        } else {
            0
        };
        self.push(report(offer, state, received, detail));
    }

    /// An offer whose signature did not verify: reported, never fetched.
    pub fn refused(&self, model: &str, reason: &str) {
        self.push(Report {
            name: model.into(),
            version: String::new(),
            sha256: String::new(),
            state: ReportState::Failed,
            received: 0,
            total: 0,
            detail: format!("offer refused: {reason}"),
        });
    }
}
