//! The architecture of a head: dense layers ([`LayerSpec`]), their
//! activations and the loss ([`HeadSpec`]).

use crate::HeadError;

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
    ) -> Result<HeadSpec, HeadError> {
        if sizes.len() < 2 || activations.len() != sizes.len() - 1 || sizes.contains(&0) {
            return Err(HeadError::Spec(format!(
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
