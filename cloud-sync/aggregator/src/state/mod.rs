//! The aggregator's durable state (SQLite): seen update ids, the pending
//! buffer, and the registry of global versions.
//!
//! [`State::ingest`] validates an update and records the outcome in ONE
//! transaction: the id goes into `seen` (accepted or rejected) and an
//! accepted update into `pending`. A redelivery (QoS 1 duplicates, a
//! restarted edge) therefore never counts twice, and a restart continues
//! with the same buffer. [`State::aggregate`] folds the pending buffer into
//! a new global version and clears it, also in one transaction.
//!
//! Layout: this file holds the schema, [`State::open`] (with its column
//! migrations) and the types the parts share; `ingest` validates and
//! records updates, `aggregate` turns the pending buffer into a version
//! (FedAvg, FedBuff, robust options, FedAdam), `versions` is the registry
//! (register, current, list, promote, rollback). Every part is an `impl
//! State` block over the one connection.

mod aggregate;
mod bundles;
pub use bundles::BundleReportRow;
mod ingest;
mod partials;
pub use ingest::Superseded;
mod privacy;
pub use privacy::Spent;
mod retention;
pub mod tier;
pub use retention::{KEEP_HEADS, Pruned};
mod versions;
pub use versions::signable_head;

use crate::{Aggregation, ModelLayout};
use dai_head::Head;
use rusqlite::{Connection, params};
use std::path::Path;

/// State errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("model {0:?} is not registered")]
    UnknownModel(String),
    #[error("stored head: {0}")]
    Head(String),
    #[error("model {model:?} has no version {version} (the newest is {current})")]
    UnknownVersion {
        model: String,
        version: u64,
        current: u64,
    },
    #[error("version {version} of {model:?} is already the current one")]
    AlreadyCurrent { model: String, version: u64 },
    #[error("version {version} of {model:?} has no parent to roll back to")]
    NoParent { model: String, version: u64 },
    #[error("partial aggregate: {0}")]
    Partial(String),
    #[error("the state file is damaged: {0}")]
    Corrupt(String),
    #[error(
        "version {version} of {model:?} no longer has its head (only the newest {kept} versions keep theirs)"
    )]
    Pruned {
        model: String,
        version: u64,
        kept: u64,
    },
}

/// How pending updates become a global version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Synchronous rounds: aggregate when `min_updates` arrived (or the
    /// round timed out with at least one), weights = sample counts.
    FedAvg { min_updates: usize },
    /// Buffered asynchronous: aggregate every `k` updates, weights = sample
    /// counts x 1/sqrt(1 + staleness).
    FedBuff { k: usize },
}

/// Aggregator settings for one model.
#[derive(Debug, Clone)]
pub struct Settings {
    pub strategy: Strategy,
    pub aggregation: Aggregation,
    pub max_staleness: u64,
    pub reject_norm: f64,
    /// The most an update's `sample_count` weighs in a round.
    pub sample_cap: SampleCap,
    /// Updates one device may send a minute (a burst of as many passes);
    /// 0: no limit. Over it, an update is neither recorded nor acked.
    pub max_updates_per_minute: u32,
    /// Central differential privacy; `None`: off.
    pub dp: Option<DpSettings>,
    /// Server-side validation sets (`--validation`); `None`: off.
    pub validation: Option<std::sync::Arc<crate::validation::Validation>>,
}

/// Central DP (`--dp-noise`): per-update clipping to a fixed norm and
/// Gaussian noise on the average ([`crate::dp`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSettings {
    /// The noise's standard deviation over the clipping norm (z).
    pub noise_multiplier: f64,
    /// Every update is scaled down to this L2 norm (C).
    pub clip_norm: f64,
    /// The delta epsilon is reported at.
    pub delta: f64,
    /// No version is published that would take epsilon past this.
    pub target_epsilon: Option<f64>,
}

/// `--max-updates-per-minute` unless told otherwise: an edge trains at
/// most every few minutes, so six a minute only stops floods.
pub const DEFAULT_MAX_UPDATES_PER_MINUTE: u32 = 6;

/// The cap on one update's FedAvg weight (its claimed `sample_count`),
/// which no one checks: one client claiming 10^15 samples would decide the
/// global. The cap in force is recorded in each version's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleCap {
    /// One device, one vote: every update weighs the same, whatever it
    /// claims (the claims are still recorded). The default: measured
    /// against label-flipping devices that inflate their claims, any
    /// weight left to claims was the attack's lever (docs/benchmarks.md,
    /// robustness).
    Equal,
    /// [`SAMPLE_CAP_MEDIAN_MULTIPLE`] times the median claim of the round.
    Auto,
    /// A fixed number of samples.
    Fixed(u64),
    /// Weights as claimed.
    Off,
}

/// `SampleCap::Auto`: the cap is this many times the round's median claim.
pub const SAMPLE_CAP_MEDIAN_MULTIPLE: u64 = 2;

impl SampleCap {
    /// `auto`, `off` or a positive number of samples (`--max-sample-weight`).
    pub fn parse(s: &str) -> Option<SampleCap> {
        match s {
            "equal" => Some(SampleCap::Equal),
            "auto" => Some(SampleCap::Auto),
            "off" => Some(SampleCap::Off),
            n => n
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .map(SampleCap::Fixed),
        }
    }

    /// The cap for a round whose updates claim `claims` samples.
    pub fn for_round(self, claims: &[u64]) -> Option<u64> {
        match self {
            SampleCap::Off => None,
            SampleCap::Equal => Some(1),
            SampleCap::Fixed(n) => Some(n),
            SampleCap::Auto => {
                let mut v = claims.to_vec();
                v.sort_unstable();
                // The median (the mean of the middle two for an even
                // count): one inflated claim cannot raise it while the
                // others are more than half the round; in a round of two
                // nothing can tell the honest claim from the other.
                let n = v.len();
                let median = match n {
                    0 => return None,
                    _ if n % 2 == 1 => v[n / 2],
                    _ => {
                        v[n / 2 - 1] / 2
                            + v[n / 2] / 2
                            + (v[n / 2 - 1] % 2 + v[n / 2] % 2).div_ceil(2)
                    }
                };
                Some(median.saturating_mul(SAMPLE_CAP_MEDIAN_MULTIPLE).max(1))
            }
        }
    }
}

/// The reason in the ack of a redelivered update id.
pub const DUPLICATE_REASON: &str = "duplicate delivery; counted once";

/// A new global version, ready to sign and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGlobal {
    pub model: String,
    pub version: u64,
    pub parent: u64,
    pub head_file: Vec<u8>,
    pub contributors: Vec<String>,
    /// What the registry records about it (updates, samples, mean loss, or
    /// where a promoted version came from).
    pub metrics: serde_json::Value,
}

/// A `versions` row (model, version, parent, contributors, created_at,
/// metrics) as [`VersionRow`].
pub(crate) fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        model: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        parent: r.get::<_, Option<i64>>(2)?.map(|p| p as u64),
        contributors: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
        created_at: r.get(4)?,
        metrics: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or(serde_json::Value::Null),
    })
}

/// A registry row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VersionRow {
    pub model: String,
    pub version: u64,
    pub parent: Option<u64>,
    /// Update ids folded into this version (empty for a base or a
    /// promotion, and once retention pruned the list: see
    /// [`VersionRow::updates`]).
    pub contributors: Vec<String>,
    pub metrics: serde_json::Value,
    /// Unix seconds.
    pub created_at: f64,
}

impl VersionRow {
    /// How many updates it combined (its list, or the count its metrics
    /// keep once retention emptied the list).
    pub fn updates(&self) -> usize {
        if self.contributors.is_empty() {
            self.metrics["updates"].as_u64().unwrap_or(0) as usize
        } else {
            self.contributors.len()
        }
    }
}

/// The durable state.
#[derive(Debug)]
pub struct State {
    pub(crate) conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS seen (
    update_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    update_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    device TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    sample_count INTEGER NOT NULL,
    tensors BLOB NOT NULL,
    loss REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER,
    head BLOB NOT NULL,
    contributors TEXT NOT NULL,
    created_at REAL NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (model, version)
);";

/// Columns added after the first schema: (table, column, definition).
/// State files written before them gain the column on open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("pending", "loss", "REAL NOT NULL DEFAULT 0"),
    ("versions", "metrics", "TEXT NOT NULL DEFAULT '{}'"),
    // A tier's partial aggregate ([`partials`]): the total weight of its
    // mean (NULL for a device's update) and how many updates it folded.
    ("pending", "weight", "REAL"),
    ("pending", "votes", "INTEGER NOT NULL DEFAULT 1"),
];

/// The newest version of a model and its head file (the same query in
/// every transaction that needs it).
const CURRENT_SQL: &str =
    "SELECT version, head FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1";

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl State {
    pub fn open(path: &Path) -> Result<State, StateError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before its acks go out (an ack promises
        // the update is stored, so the edge deletes its copy).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(bundles::SCHEMA)?;
        conn.execute_batch(tier::SCHEMA)?;
        retention::init_counts(&conn)?;
        for (table, column, def) in ADDED_COLUMNS {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists(params![column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
            }
        }
        // The epoch: fixed when the state file is made, so every global
        // this version line signs carries it, and a new line (a new state
        // file) is told apart from the old one by edges and auditors.
        // Milliseconds x 1000 plus three random digits: ordered by making
        // time (edges adopt a newer epoch whatever its version numbers,
        // and refuse a replayed older one), and two state files made in
        // the same millisecond still differ. State files from before this
        // scheme hold plain Unix seconds, which are smaller.
        let millis = (now() * 1000.0) as u64;
        let mut r = [0u8; 2];
        // Without randomness the digits are 0: still ordered by time.
        let _ = getrandom::fill(&mut r);
        let epoch = millis.saturating_mul(1000) + u64::from(u16::from_le_bytes(r) % 1000);
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
            params![epoch.to_string()],
        )?;
        Ok(State { conn })
    }

    /// The aggregator epoch of this state file (see [`State::open`]).
    pub fn epoch(&self) -> Result<u64, StateError> {
        Self::epoch_in(&self.conn)
    }

    fn epoch_in(conn: &Connection) -> Result<u64, StateError> {
        let v: String = conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })?;
        v.parse()
            .map_err(|_| StateError::Corrupt(format!("meta epoch {v:?} is not an integer")))
    }

    /// The layout of `model`'s current head (the same at every version: a
    /// version is the base head plus deltas of this layout).
    pub fn model_layout(&self, model: &str) -> Result<ModelLayout, StateError> {
        let (_, head) = self.current(model)?;
        Self::layout(&head, model)
    }

    /// The tensor layout updates of `model` must have, read from its head
    /// file; sorted by name, which is the order [`crate::validate`] returns
    /// tensors in.
    fn layout(head_file: &[u8], model: &str) -> Result<ModelLayout, StateError> {
        let (head, _) = Head::from_bytes(head_file).map_err(|e| StateError::Head(e.to_string()))?;
        let mut tensors = dai_head::layout::shapes(&head.spec);
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(ModelLayout {
            model: model.to_string(),
            tensors,
        })
    }
}

/// Shared by the tests of every part.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{Settings, Strategy};
    use crate::{Aggregation, Robust};
    use dai_head::{Activation, Head, HeadSpec, Loss};
    use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};

    /// A 2 -> 2 head (seed 1).
    pub(crate) fn base() -> Head {
        Head::init(
            HeadSpec::new(&[2, 2], &[Activation::None], Loss::SoftmaxCrossEntropy).expect("spec"),
            1,
        )
    }

    pub(crate) fn base_file() -> Vec<u8> {
        base().to_bytes(&Default::default()).expect("bytes")
    }

    /// An update of model `m` from device `dev-{id}`, every value `v`.
    pub(crate) fn upd(id: &str, base: &str, samples: u64, v: f32) -> Update {
        Update {
            meta: UpdateMeta {
                device: format!("dev-{id}"),
                model: "m".into(),
                base_version: base.into(),
                update_id: id.into(),
                sample_count: samples,
                loss: 0.1,
                encoding: Encoding::F32,
            },
            tensors: vec![
                Tensor {
                    name: "layers.0.weight".into(),
                    shape: vec![2, 2],
                    values: vec![v; 4],
                },
                Tensor {
                    name: "layers.0.bias".into(),
                    shape: vec![2],
                    values: vec![v; 2],
                },
            ],
        }
    }

    /// FedAvg, 2 updates per round, plain mean.
    pub(crate) fn settings() -> Settings {
        Settings {
            strategy: Strategy::FedAvg { min_updates: 2 },
            aggregation: Aggregation {
                clip: crate::Clip::Off,
                robust: Robust::Mean,
            },
            max_staleness: 3,
            reject_norm: 100.0,
            sample_cap: super::SampleCap::Auto,
            max_updates_per_minute: 0,
            dp: None,
            validation: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{base, settings, upd};
    use super::*;
    use dai_protocol::messages::AckStatus;

    #[test]
    fn rounds_aggregate_once_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agg.sqlite");
        let head0 = base();
        {
            let mut s = State::open(&path).expect("open");
            s.register("m", &head0.to_bytes(&Default::default()).expect("bytes"))
                .expect("register");
            let a = s
                .ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
                .expect("ingest");
            assert_eq!(a.status, AckStatus::Accepted);
            assert!(
                s.aggregate("m", &settings(), false, &mut None)
                    .expect("agg")
                    .is_none(),
                "one of two updates"
            );
        }
        // Restart: the pending update and the seen id survive.
        let mut s = State::open(&path).expect("reopen");
        assert_eq!(s.pending_count("m").expect("n"), 1);
        let dup = s
            .ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
            .expect("dup");
        assert_eq!(dup.status, AckStatus::Accepted);
        assert!(dup.reason.expect("reason").contains("counted once"));
        assert_eq!(
            s.pending_count("m").expect("n"),
            1,
            "a duplicate is not buffered twice"
        );
        s.ingest(&upd("u2", "0", 3, 2.0), &settings(), |b| b.parse().ok())
            .expect("ingest");
        let g = s
            .aggregate("m", &settings(), false, &mut None)
            .expect("agg")
            .expect("new version");
        assert_eq!((g.version, g.parent), (1, 0));
        assert_eq!(g.contributors, vec!["u1", "u2"]);
        let (new_head, md) = Head::from_bytes(&g.head_file).expect("head");
        assert_eq!(md["version"], "1");
        // FedAvg: (1*1 + 3*2) / 4 = 1.75 added to every weight.
        for (a, b) in new_head.params.weights[0]
            .iter()
            .zip(&head0.params.weights[0])
        {
            assert!((a - b - 1.75).abs() < 1e-6);
        }
        assert_eq!(s.pending_count("m").expect("n"), 0);
        // Stale and malformed updates are rejected with reasons.
        let bad = s
            .ingest(&upd("u3", "x", 1, 1.0), &settings(), |b| b.parse().ok())
            .expect("ingest");
        assert_eq!(bad.status, AckStatus::Rejected);
        assert!(bad.reason.expect("reason").contains("not a global version"));
        let unknown = s
            .ingest(
                &{
                    let mut u = upd("u4", "1", 1, 1.0);
                    u.meta.model = "zz".into();
                    u
                },
                &settings(),
                |b| b.parse().ok(),
            )
            .expect("ingest");
        assert_eq!(unknown.status, AckStatus::Rejected);
        assert_eq!(s.current("m").expect("current").0, 1);
    }

    #[test]
    fn a_sqlite_error_says_its_part_once_and_keeps_its_cause() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = State::open(&dir.path().join("missing/agg.sqlite")).expect_err("no dir");
        assert!(matches!(e, StateError::Sqlite(_)), "{e:?}");
        assert_eq!(e.to_string(), "sqlite");
        let chain = crate::error_chain(&e);
        assert!(chain.starts_with("sqlite: "), "{chain}");
        assert!(chain.contains("unable to open database file"), "{chain}");
    }

    #[test]
    fn an_old_state_file_gains_the_added_columns() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("old.sqlite");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE pending (update_id TEXT PRIMARY KEY, model TEXT NOT NULL,
                   device TEXT NOT NULL, base_version INTEGER NOT NULL,
                   sample_count INTEGER NOT NULL, tensors BLOB NOT NULL);
                 CREATE TABLE versions (model TEXT NOT NULL, version INTEGER NOT NULL,
                   parent INTEGER, head BLOB NOT NULL, contributors TEXT NOT NULL,
                   created_at REAL NOT NULL, PRIMARY KEY (model, version));",
            )
            .expect("old schema");
        }
        let s = State::open(&path).expect("migrated");
        for (table, column, _) in ADDED_COLUMNS {
            let present = s
                .conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))
                .expect("prepare")
                .exists(params![column])
                .expect("query");
            assert!(present, "{table}.{column}");
        }
        // Opening again is a no-op, not a duplicate-column error.
        State::open(&path).expect("reopen");
    }
}
