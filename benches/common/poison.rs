//! The poisoning simulation, shared by `cargo bench --bench robustness` and
//! its short form in `tests/edge/robustness.rs` (included by path there):
//! 20 digits devices (Dirichlet 0.3 over the 64-d backbone embeddings of
//! the zoo's digits bundle), honest local training with `dai-train`, a
//! fraction of attackers (the first devices) doing one [`Attack`], and a
//! combiner per round: ours end to end through the aggregator's intake
//! (encoded updates in on each device's topic, a real SQLite state, the
//! signed global out) or another one (Flower's strategies, in the bench).

#![allow(dead_code)]

use dai_cloud::auth::DeviceAuth;
use dai_cloud::intake::{Intake, IntakeConfig, Output};
use dai_cloud::state::{Settings, State, Strategy};
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use dai_train::cpu::CpuBackend;
use dai_train::{Dataset, Head, Optimizer, TrainConfig};
use std::path::Path;
use std::time::{Duration, Instant};

pub const EPOCHS: usize = 5;
pub const BATCH: usize = 16;
pub const LR: f32 = 0.003;
const FLEET: &str = "sim";
const MODEL: &str = "digits";

/// The devices' data, the test set and the starting head.
pub struct Fleet {
    pub devices: Vec<Dataset>,
    pub test: Dataset,
    pub base: Head,
}

fn dataset<'a>(rows: impl Iterator<Item = (&'a Vec<f32>, u32)>) -> Dataset {
    let mut x = Vec::new();
    let mut classes = Vec::new();
    let mut features = 0;
    for (e, l) in rows {
        features = e.len();
        x.extend_from_slice(e);
        classes.push(l);
    }
    Dataset {
        x,
        features,
        classes,
        values: vec![],
        outputs: 10,
    }
}

/// `devices` shards (Dirichlet `alpha`) of the digits training split, as
/// the zoo bundle's backbone embeds them; the test split; a fresh head.
pub fn fleet(repo: &Path, devices: usize, alpha: f64) -> Fleet {
    let rows = dai_models::digits::load(&repo.join("models/data/digits.csv.gz")).expect("digits");
    let bundle = dai_infer::bundle::Bundle::open(&repo.join("models/zoo/digits")).expect("bundle");
    let model = dai_infer::model::LoadedModel::load(bundle, 64).expect("backbone");
    let mut emb = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(64) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let input = dai_infer::tensor::TensorData::new(
            vec![chunk.len(), 64],
            dai_infer::tensor::Data::F32(px),
        )
        .expect("tensor");
        let out = model.run(&[&input], chunk.len()).expect("run");
        let dai_infer::tensor::Data::F32(e) = &out[0].data else {
            panic!("embedding is not f32")
        };
        let width = e.len() / chunk.len();
        emb.extend(e.chunks(width).map(|c| c.to_vec()));
    }
    let (train_idx, test_idx) = dai_models::digits::split(&rows, 0.2, 7);
    let labels: Vec<u32> = train_idx.iter().map(|&i| rows[i].1).collect();
    let shards = dai_models::shard::shard(
        &labels,
        devices,
        dai_models::shard::Scheme::Dirichlet { alpha },
        7,
    );
    let devices = shards
        .into_iter()
        .map(|idx| {
            dataset(
                idx.iter()
                    .map(|&j| (&emb[train_idx[j]], rows[train_idx[j]].1)),
            )
        })
        .collect();
    let test = dataset(test_idx.iter().map(|&i| (&emb[i], rows[i].1)));
    let shipped = std::fs::read(repo.join("models/zoo/digits/head.safetensors")).expect("head");
    let (head, _) = Head::from_bytes(&shipped).expect("head");
    Fleet {
        devices,
        test,
        base: Head::init(head.spec.clone(), 7),
    }
}

/// What the attackers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    None,
    /// The honest delta, negated.
    SignFlip,
    /// The honest delta scaled to just under the aggregator's norm bound.
    Scaling,
    /// Trained on labels `9 - l`.
    LabelFlip,
    /// Label-flipped training claiming 10^15 samples.
    SampleInflation,
    /// Baruch et al. 2019: every attacker sends the benign mean minus
    /// z x the benign standard deviation per coordinate, z from the
    /// paper's formula for n devices of which f attack.
    LittleIsEnough,
}

impl Attack {
    pub const ALL: [Attack; 5] = [
        Attack::SignFlip,
        Attack::Scaling,
        Attack::LabelFlip,
        Attack::SampleInflation,
        Attack::LittleIsEnough,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::SignFlip => "sign flip",
            Attack::Scaling => "scaling",
            Attack::LabelFlip => "label flip",
            Attack::SampleInflation => "sample inflation",
            Attack::LittleIsEnough => "little is enough",
        }
    }
}

/// One device's update for a round: the delta's tensors (layout names)
/// and the claimed sample count.
#[derive(Debug, Clone)]
pub struct Submission {
    pub device: usize,
    pub tensors: Vec<Tensor>,
    pub samples: u64,
}

fn train_delta(global: &Head, data: &Dataset, seed: u64) -> Vec<Tensor> {
    let mut head = global.clone();
    let cfg = TrainConfig {
        optimizer: Optimizer::adam(LR),
        batch_size: BATCH,
        epochs: EPOCHS,
        seed,
    };
    dai_train::train(&mut CpuBackend::new(), &mut head, data, &cfg, |_| true).expect("train");
    let delta = head.params.minus(&global.params);
    dai_protocol::update::head_tensors(&head.spec, &delta)
}

fn norm(t: &[Tensor]) -> f64 {
    t.iter()
        .flat_map(|t| &t.values)
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Inverse of the standard normal CDF (Acklam's rational approximation;
/// enough for choosing z). The coefficients are quoted as published.
#[allow(clippy::excessive_precision)]
fn probit(p: f64) -> f64 {
    let a = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    let b = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    let c = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    let d = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let q = if p < 0.5 { p } else { 1.0 - p };
    let r = if q > 0.02425 {
        let q = p - 0.5;
        let r = q * q;
        return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
    } else {
        let t = (-2.0 * q.ln()).sqrt();
        (((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5])
            / ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1.0)
    };
    if p < 0.5 { r } else { -r }
}

/// Every device's submission for `round`: the first `attackers` devices
/// do `attack`; `reject_norm` is the bound a scaled update stays under.
pub fn submissions(
    fleet: &Fleet,
    global: &Head,
    attack: Attack,
    attackers: usize,
    round: usize,
    reject_norm: f64,
) -> Vec<Submission> {
    let mut out = Vec::with_capacity(fleet.devices.len());
    for (k, data) in fleet.devices.iter().enumerate() {
        if data.classes.is_empty() {
            continue;
        }
        let seed = (round * 1000 + k) as u64;
        let hostile = k < attackers && attack != Attack::None;
        let samples = data.classes.len() as u64;
        let mut flipped = data.clone();
        let (tensors, samples) = match attack {
            _ if !hostile => (train_delta(global, data, seed), samples),
            Attack::LabelFlip | Attack::SampleInflation => {
                flipped.classes.iter_mut().for_each(|l| *l = 9 - *l);
                let t = train_delta(global, &flipped, seed);
                let claim = if attack == Attack::SampleInflation {
                    1_000_000_000_000_000
                } else {
                    samples
                };
                (t, claim)
            }
            Attack::SignFlip | Attack::Scaling => {
                let mut t = train_delta(global, data, seed);
                let factor = if attack == Attack::SignFlip {
                    -1.0
                } else {
                    (0.99 * reject_norm / norm(&t).max(1e-12)) as f32
                };
                t.iter_mut()
                    .for_each(|t| t.values.iter_mut().for_each(|v| *v *= factor));
                (t, samples)
            }
            // Filled in below from the benign updates.
            Attack::LittleIsEnough | Attack::None => (Vec::new(), samples),
        };
        out.push(Submission {
            device: k,
            tensors,
            samples,
        });
    }
    if attack == Attack::LittleIsEnough && attackers > 0 {
        let n = out.len() as f64;
        let f = attackers as f64;
        let s = (n / 2.0 + 1.0).floor() - f;
        let z = probit((n - s) / n);
        let benign: Vec<&Submission> = out.iter().filter(|s| s.device >= attackers).collect();
        let mut lie = benign[0].tensors.clone();
        for (t, tensor) in lie.iter_mut().enumerate() {
            for (i, v) in tensor.values.iter_mut().enumerate() {
                let col: Vec<f64> = benign
                    .iter()
                    .map(|b| f64::from(b.tensors[t].values[i]))
                    .collect();
                let mean = col.iter().sum::<f64>() / col.len() as f64;
                let var =
                    col.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / col.len() as f64;
                *v = (mean - z * var.sqrt()) as f32;
            }
        }
        for s in out.iter_mut().filter(|s| s.device < attackers) {
            s.tensors = lie.clone();
        }
    }
    out
}

/// Our aggregator with `settings`, end to end through its intake.
pub struct Ours {
    intake: Intake,
    key: ed25519_dalek::SigningKey,
    version: u64,
    round: usize,
    now: Instant,
    _dir: tempfile::TempDir,
}

impl Ours {
    pub fn new(base: &Head, settings: Settings) -> Ours {
        let dir = tempfile::tempdir().expect("tmp");
        let state = State::open(&dir.path().join("agg.sqlite")).expect("state");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let intake = Intake::new(
            state,
            IntakeConfig {
                fleet: FLEET.into(),
                models: vec![(
                    MODEL.into(),
                    base.to_bytes(&Default::default()).expect("bytes"),
                )],
                settings,
                round_timeout: Duration::from_secs(3600),
                signing_key: key.clone(),
                server_optimizer: None,
                devices: DeviceAuth::Unchecked,
            },
        )
        .expect("intake");
        Ours {
            intake,
            key,
            version: 0,
            round: 0,
            now: Instant::now(),
            _dir: dir,
        }
    }

    /// One round: every submission published on its device's topic, one
    /// flush; the new global, as a device would verify and load it.
    pub fn round(&mut self, global: &Head, subs: &[Submission]) -> Head {
        // A minute per round of simulated time: the per-device rate
        // limit sees each device send once a minute.
        self.now += Duration::from_secs(60);
        self.intake.tick(self.now).expect("tick");
        let epoch = self.intake.epoch();
        let base = dai_protocol::base::label(
            "1.0.0",
            (self.version > 0).then_some(dai_protocol::base::GlobalId {
                epoch,
                version: self.version,
            }),
        );
        for s in subs {
            let device = format!("d{}", s.device);
            let wire = Update {
                meta: UpdateMeta {
                    device: device.clone(),
                    model: MODEL.into(),
                    base_version: base.clone(),
                    update_id: format!("{device}-r{}", self.round),
                    sample_count: s.samples,
                    loss: 0.0,
                    encoding: Encoding::F32,
                },
                tensors: s.tensors.clone(),
            }
            .encode()
            .expect("encode");
            self.intake
                .publish(&format!("dai/v1/{FLEET}/dev/{device}/update"), &wire);
        }
        self.intake.flush(self.now).expect("flush");
        self.intake.tick(self.now).expect("tick");
        self.round += 1;
        let mut next = None;
        for o in self.intake.take_outputs() {
            if let Output::Global {
                payload, version, ..
            } = o
            {
                let g =
                    dai_protocol::global::verify(&payload, &self.key.verifying_key(), FLEET, MODEL)
                        .expect("a signed global");
                self.version = version;
                next = Some(Head::from_bytes(&g.head_file).expect("head").0);
            }
        }
        // A round the aggregator did not close (every update refused)
        // leaves the global as it was.
        next.unwrap_or_else(|| global.clone())
    }
}

/// Test accuracy after `rounds` rounds of `attack` by `attackers` devices,
/// each round combined by `combine`.
pub fn run(
    fleet: &Fleet,
    attack: Attack,
    attackers: usize,
    rounds: usize,
    reject_norm: f64,
    mut combine: impl FnMut(&Head, &[Submission]) -> Head,
) -> f64 {
    let mut global = fleet.base.clone();
    for round in 0..rounds {
        let subs = submissions(fleet, &global, attack, attackers, round, reject_norm);
        global = combine(&global, &subs);
    }
    dai_train::accuracy(&global, &fleet.test).expect("accuracy")
}

/// Our defaults (`dai-cloud run` without flags) for a fleet of `devices`,
/// rounds closing on all of them.
pub fn our_defaults(devices: usize) -> Settings {
    Settings {
        strategy: Strategy::FedAvg {
            min_updates: devices,
        },
        aggregation: dai_cloud::Aggregation::default(),
        max_staleness: 5,
        reject_norm: 100.0,
        sample_cap: dai_cloud::state::SampleCap::Equal,
        max_updates_per_minute: dai_cloud::state::DEFAULT_MAX_UPDATES_PER_MINUTE,
        dp: None,
        validation: None,
    }
}

/// Plain FedAvg (no clipping, weighted mean, claims as sent).
pub fn plain_fedavg(devices: usize) -> Settings {
    Settings {
        aggregation: dai_cloud::Aggregation::PLAIN,
        sample_cap: dai_cloud::state::SampleCap::Off,
        ..our_defaults(devices)
    }
}
