//! The one tensor layout of a head, shared by `head.safetensors`, update
//! payloads, partial aggregates and exported graphs: layer `i` is
//! `layers.{i}.weight` (`[outputs, inputs]`, row-major, PyTorch's
//! `nn.Linear`) and `layers.{i}.bias` (`[outputs]`).

use crate::{HeadError, HeadSpec, Params};

/// Which half of a layer a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Weight,
    Bias,
}

/// Name of layer `i`'s weight tensor.
pub fn weight_name(i: usize) -> String {
    format!("layers.{i}.weight")
}

/// Name of layer `i`'s bias tensor.
pub fn bias_name(i: usize) -> String {
    format!("layers.{i}.bias")
}

/// `layers.{i}.weight|bias` -> (i, part); `None` for any other name.
pub fn parse_name(name: &str) -> Option<(usize, Part)> {
    let rest = name.strip_prefix("layers.")?;
    let (i, part) = rest.split_once('.')?;
    let part = match part {
        "weight" => Part::Weight,
        "bias" => Part::Bias,
        _ => return None,
    };
    // Digits only: "+1" or " 1" would parse as a number but is another name.
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((i.parse().ok()?, part))
}

/// Every tensor of a head of this spec with its shape, in file order
/// (weight then bias, layer by layer).
pub fn shapes(spec: &HeadSpec) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::with_capacity(spec.layers.len() * 2);
    for (i, l) in spec.layers.iter().enumerate() {
        v.push((weight_name(i), vec![l.outputs, l.inputs]));
        v.push((bias_name(i), vec![l.outputs]));
    }
    v
}

/// A named view of one tensor of [`Params`].
#[derive(Debug, Clone, Copy)]
pub struct NamedTensor<'a> {
    pub index: usize,
    pub part: Part,
    pub shape: [usize; 2],
    pub values: &'a [f32],
}

impl NamedTensor<'_> {
    pub fn name(&self) -> String {
        match self.part {
            Part::Weight => weight_name(self.index),
            Part::Bias => bias_name(self.index),
        }
    }

    /// `[outputs, inputs]` for a weight, `[outputs]` for a bias.
    pub fn dims(&self) -> Vec<usize> {
        match self.part {
            Part::Weight => self.shape.to_vec(),
            Part::Bias => vec![self.shape[0]],
        }
    }
}

/// The tensors of `params` (laid out by `spec`), in file order.
pub fn named<'a>(spec: &HeadSpec, params: &'a Params) -> Vec<NamedTensor<'a>> {
    let mut v = Vec::with_capacity(spec.layers.len() * 2);
    for (i, l) in spec.layers.iter().enumerate() {
        let shape = [l.outputs, l.inputs];
        if let (Some(w), Some(b)) = (params.weights.get(i), params.biases.get(i)) {
            v.push(NamedTensor {
                index: i,
                part: Part::Weight,
                shape,
                values: w,
            });
            v.push(NamedTensor {
                index: i,
                part: Part::Bias,
                shape,
                values: b,
            });
        }
    }
    v
}

/// Replace the tensor `name` of `params` with `values`; the name must be
/// in the layout and the length must match the spec.
pub fn set(
    spec: &HeadSpec,
    params: &mut Params,
    name: &str,
    values: Vec<f32>,
) -> Result<(), HeadError> {
    let (i, part) = parse_name(name)
        .filter(|(i, _)| *i < spec.layers.len())
        .ok_or_else(|| HeadError::Format(format!("tensor {name:?} is not in the head's layout")))?;
    let l = spec.layers[i];
    let (slot, want) = match part {
        Part::Weight => (&mut params.weights[i], l.inputs * l.outputs),
        Part::Bias => (&mut params.biases[i], l.outputs),
    };
    if values.len() != want {
        return Err(HeadError::Format(format!(
            "tensor {name}: {} values, the layout has {want}",
            values.len()
        )));
    }
    *slot = values;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Activation, Head, Loss};

    #[test]
    fn names_round_trip_and_reject_lookalikes() {
        assert_eq!(parse_name(&weight_name(12)), Some((12, Part::Weight)));
        assert_eq!(parse_name(&bias_name(0)), Some((0, Part::Bias)));
        for bad in [
            "layers..weight",
            "layers.+1.bias",
            "layers.1.gamma",
            "x.1.weight",
            "layers.1",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn set_checks_name_and_length() {
        let spec = HeadSpec::new(&[3, 2], &[Activation::None], Loss::Mse).expect("spec");
        let mut h = Head::init(spec.clone(), 1);
        set(&spec, &mut h.params, "layers.0.bias", vec![1.0, 2.0]).expect("set");
        assert_eq!(h.params.biases[0], vec![1.0, 2.0]);
        assert!(set(&spec, &mut h.params, "layers.0.bias", vec![1.0]).is_err());
        assert!(set(&spec, &mut h.params, "layers.1.bias", vec![1.0, 2.0]).is_err());
        let names: Vec<String> = named(&spec, &h.params).iter().map(|t| t.name()).collect();
        let shapes: Vec<String> = shapes(&spec).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, shapes);
    }
}
