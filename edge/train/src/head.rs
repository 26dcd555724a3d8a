//! The trainable head: a stack of dense layers and its loss.
//!
//! Weights are stored row-major `[outputs x inputs]` (PyTorch's `nn.Linear`
//! layout) in `head.safetensors` as `layers.{i}.weight` / `layers.{i}.bias`,
//! with the architecture in the safetensors `__metadata__` so a file is
//! self-describing.

use crate::TrainError;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Element-wise non-linearity after a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
    None,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Activation> {
        Some(match s {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "none" | "identity" => Activation::None,
            _ => return None,
        })
    }

    /// GELU uses the tanh approximation (as `nn.GELU(approximate="tanh")`).
    pub fn apply(self, z: f32) -> f32 {
        match self {
            Activation::Relu => z.max(0.0),
            Activation::None => z,
            Activation::Gelu => {
                let u = GELU_C * (z + 0.044715 * z * z * z);
                0.5 * z * (1.0 + u.tanh())
            }
        }
    }

    /// d act / d z at `z`.
    pub fn derivative(self, z: f32) -> f32 {
        match self {
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::None => 1.0,
            Activation::Gelu => {
                let u = GELU_C * (z + 0.044715 * z * z * z);
                let t = u.tanh();
                let du = GELU_C * (1.0 + 3.0 * 0.044715 * z * z);
                0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
            }
        }
    }
}

pub(crate) const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)

/// Training objective on the last layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Softmax over the outputs, mean negative log-likelihood of the class.
    SoftmaxCrossEntropy,
    /// Mean of squared errors over all outputs.
    Mse,
}

impl Loss {
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Loss::Mse => "mse",
        }
    }

    pub fn parse(s: &str) -> Option<Loss> {
        Some(match s {
            "softmax_cross_entropy" | "cross_entropy" => Loss::SoftmaxCrossEntropy,
            "mse" => Loss::Mse,
            _ => return None,
        })
    }
}

/// One dense layer's shape and activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    pub inputs: usize,
    pub outputs: usize,
    pub activation: Activation,
}

/// The architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSpec {
    pub layers: Vec<LayerSpec>,
    pub loss: Loss,
}

impl HeadSpec {
    /// `sizes` = [in, hidden..., out]; `activations` one per layer.
    pub fn new(
        sizes: &[usize],
        activations: &[Activation],
        loss: Loss,
    ) -> Result<HeadSpec, TrainError> {
        if sizes.len() < 2 || activations.len() != sizes.len() - 1 || sizes.contains(&0) {
            return Err(TrainError::Spec(format!(
                "sizes {sizes:?} with {} activations: need [in, ..., out] (no zero) and one activation per layer",
                activations.len()
            )));
        }
        Ok(HeadSpec {
            layers: sizes
                .windows(2)
                .zip(activations)
                .map(|(w, &activation)| LayerSpec {
                    inputs: w[0],
                    outputs: w[1],
                    activation,
                })
                .collect(),
            loss,
        })
    }

    pub fn inputs(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs)
    }

    pub fn outputs(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs)
    }

    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.inputs * l.outputs + l.outputs)
            .sum()
    }
}

/// Weights and biases, one entry per layer (also used for gradients).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub weights: Vec<Vec<f32>>,
    pub biases: Vec<Vec<f32>>,
}

impl Params {
    pub fn zeros_like(spec: &HeadSpec) -> Params {
        Params {
            weights: spec
                .layers
                .iter()
                .map(|l| vec![0.0; l.inputs * l.outputs])
                .collect(),
            biases: spec.layers.iter().map(|l| vec![0.0; l.outputs]).collect(),
        }
    }

    /// All values, layer by layer (weights then bias).
    pub fn flat(&self) -> Vec<f32> {
        let mut v = Vec::new();
        for (w, b) in self.weights.iter().zip(&self.biases) {
            v.extend_from_slice(w);
            v.extend_from_slice(b);
        }
        v
    }

    pub fn all_finite(&self) -> bool {
        self.weights
            .iter()
            .chain(&self.biases)
            .all(|v| v.iter().all(|x| x.is_finite()))
    }

    /// `self - other`, layer by layer.
    pub fn minus(&self, other: &Params) -> Params {
        let sub = |a: &Vec<Vec<f32>>, b: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect())
                .collect()
        };
        Params {
            weights: sub(&self.weights, &other.weights),
            biases: sub(&self.biases, &other.biases),
        }
    }

    /// L2 norm over every value.
    pub fn norm(&self) -> f64 {
        self.weights
            .iter()
            .chain(&self.biases)
            .flat_map(|v| v.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// A head: architecture + weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub spec: HeadSpec,
    pub params: Params,
}

/// Deterministic generator for initialisation and shuffling (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

impl Head {
    /// Kaiming-uniform weights (PyTorch's `nn.Linear` default), zero-mean biases.
    pub fn init(spec: HeadSpec, seed: u64) -> Head {
        let mut rng = Rng::new(seed);
        let mut params = Params::zeros_like(&spec);
        for (l, layer) in spec.layers.iter().enumerate() {
            let bound = 1.0 / (layer.inputs as f32).sqrt();
            for w in params.weights[l].iter_mut() {
                *w = (rng.uniform() * 2.0 - 1.0) * bound;
            }
            for b in params.biases[l].iter_mut() {
                *b = (rng.uniform() * 2.0 - 1.0) * bound;
            }
        }
        Head { spec, params }
    }

    /// Write `head.safetensors` (atomically: temp file, fsync, rename).
    pub fn save(&self, path: &Path, extra: &HashMap<String, String>) -> Result<(), TrainError> {
        let bytes = self.to_bytes(extra)?;
        let tmp = path.with_extension("safetensors.tmp");
        let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", path.display()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    pub fn to_bytes(&self, extra: &HashMap<String, String>) -> Result<Vec<u8>, TrainError> {
        let mut meta = extra.clone();
        meta.insert("format".into(), "dai-head-v1".into());
        meta.insert("loss".into(), self.spec.loss.as_str().into());
        meta.insert(
            "activations".into(),
            self.spec
                .layers
                .iter()
                .map(|l| l.activation.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        let mut owned = Vec::new();
        for (i, l) in self.spec.layers.iter().enumerate() {
            let w: Vec<u8> = self.params.weights[i]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let b: Vec<u8> = self.params.biases[i]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            owned.push((format!("layers.{i}.weight"), vec![l.outputs, l.inputs], w));
            owned.push((format!("layers.{i}.bias"), vec![l.outputs], b));
        }
        let views = owned
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| TrainError::Format(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, Some(meta)).map_err(|e| TrainError::Format(e.to_string()))
    }

    /// Read a head written by [`Head::save`] (or any safetensors file with the
    /// same names and metadata). Returns the head and the file's metadata.
    pub fn load(path: &Path) -> Result<(Head, HashMap<String, String>), TrainError> {
        let bytes =
            std::fs::read(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            TrainError::Format(m) => TrainError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<(Head, HashMap<String, String>), TrainError> {
        let bad = |m: String| TrainError::Format(m);
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let acts: Vec<Activation> = meta
            .get("activations")
            .ok_or_else(|| bad("metadata lacks `activations`".into()))?
            .split(',')
            .map(|a| {
                Activation::parse(a.trim()).ok_or_else(|| bad(format!("unknown activation {a:?}")))
            })
            .collect::<Result<_, _>>()?;
        let loss = meta
            .get("loss")
            .and_then(|l| Loss::parse(l))
            .ok_or_else(|| bad("metadata lacks a known `loss`".into()))?;
        let mut sizes = Vec::new();
        let mut params = Params {
            weights: Vec::new(),
            biases: Vec::new(),
        };
        for i in 0..acts.len() {
            let w = st
                .tensor(&format!("layers.{i}.weight"))
                .map_err(|e| bad(format!("layers.{i}.weight: {e}")))?;
            let b = st
                .tensor(&format!("layers.{i}.bias"))
                .map_err(|e| bad(format!("layers.{i}.bias: {e}")))?;
            if w.dtype() != Dtype::F32
                || b.dtype() != Dtype::F32
                || w.shape().len() != 2
                || b.shape() != [w.shape()[0]]
            {
                return Err(bad(format!(
                    "layer {i}: expected f32 weight [out, in] and bias [out]"
                )));
            }
            if i == 0 {
                sizes.push(w.shape()[1]);
            } else if sizes[i] != w.shape()[1] {
                return Err(bad(format!(
                    "layer {i} takes {} inputs, layer {} gives {}",
                    w.shape()[1],
                    i - 1,
                    sizes[i]
                )));
            }
            sizes.push(w.shape()[0]);
            let f = |d: &[u8]| {
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>()
            };
            params.weights.push(f(w.data()));
            params.biases.push(f(b.data()));
        }
        let spec = HeadSpec::new(&sizes, &acts, loss)?;
        if !params.all_finite() {
            return Err(bad("weights contain NaN or infinity".into()));
        }
        Ok((Head { spec, params }, meta))
    }
}
