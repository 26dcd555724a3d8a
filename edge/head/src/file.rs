//! The `head.safetensors` file: weights in the [`crate::layout`] names,
//! the architecture in the safetensors `__metadata__` (`format`, `loss`,
//! `activations`) so a file is self-describing.

use crate::layout::{bias_name, weight_name};
use crate::{Activation, Head, HeadError, HeadSpec, Loss, Params, Rng};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Most layers a head file may declare: far above any real head, and it
/// bounds the work done on a hostile metadata string before any tensor is read.
pub const MAX_LAYERS: usize = 64;

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
    pub fn save(&self, path: &Path, extra: &HashMap<String, String>) -> Result<(), HeadError> {
        let bytes = self.to_bytes(extra)?;
        let tmp = path.with_extension("safetensors.tmp");
        let io = |source: std::io::Error| HeadError::Io {
            path: path.to_path_buf(),
            source,
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    pub fn to_bytes(&self, extra: &HashMap<String, String>) -> Result<Vec<u8>, HeadError> {
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
            owned.push((weight_name(i), vec![l.outputs, l.inputs], w));
            owned.push((bias_name(i), vec![l.outputs], b));
        }
        let views = owned
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| HeadError::Format(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, Some(meta)).map_err(|e| HeadError::Format(e.to_string()))
    }

    /// Read a head written by [`Head::save`] (or any safetensors file with the
    /// same names and metadata). Returns the head and the file's metadata.
    pub fn load(path: &Path) -> Result<(Head, HashMap<String, String>), HeadError> {
        let bytes = std::fs::read(path).map_err(|source| HeadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            HeadError::Format(m) => HeadError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<(Head, HashMap<String, String>), HeadError> {
        let bad = |m: String| HeadError::Format(m);
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
        if acts.len() > MAX_LAYERS {
            return Err(bad(format!(
                "metadata declares {} layers, at most {MAX_LAYERS} are allowed",
                acts.len()
            )));
        }
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
                .tensor(&weight_name(i))
                .map_err(|e| bad(format!("{}: {e}", weight_name(i))))?;
            let b = st
                .tensor(&bias_name(i))
                .map_err(|e| bad(format!("{}: {e}", bias_name(i))))?;
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
