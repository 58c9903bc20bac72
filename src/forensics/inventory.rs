//! The tensor inventory of a merged checkpoint: which tensors a faithful merge must contain (the
//! base's, plus the head a tied model gets when the adapter trains it, plus biases the adapter
//! adds) with which shapes, against what the merged checkpoint holds.

use std::collections::BTreeMap;

use super::Inventory;
use super::Reshaped;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::mapping::HEAD_NAMES;
use crate::merge::engine::{MergePlan, Source};

/// Buffers some exporters keep and others drop; never a finding either way: rotary inverse
/// frequencies, and the causal-mask buffers older GPT-2 / GPT-NeoX checkpoints carry
/// (`h.N.attn.bias`, `layers.N.attention.bias`, 4-D `[1, 1, n, n]`, unlike a real bias).
fn is_buffer(name: &str, shape: &[usize]) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".masked_bias")
        || ((name.ends_with(".attn.bias") || name.ends_with(".attention.bias")) && shape.len() == 4)
}

/// True for the output head (present or absent depending on whether the model ties it).
pub fn is_head(name: &str) -> bool {
    HEAD_NAMES
        .iter()
        .any(|h| name == *h || name.ends_with(&format!(".{h}")))
}

/// Tensor name → shape a faithful merge of `plan` into `base` contains.
pub fn expected(
    base: &Checkpoint,
    plan: &MergePlan,
    adapters: &[Adapter],
) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = base
        .tensors()
        .filter(|t| !is_buffer(&t.name, &t.shape))
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    for job in &plan.weights {
        let replaced = job.sources.iter().rev().find_map(|s| match s {
            Source::Replace { adapter, key } => adapters[*adapter]
                .weights
                .info(key)
                .map(|i| i.shape.clone()),
            Source::LowRank { .. } => None,
        });
        // A stacked expert tensor keeps its stored 3-D shape (see `TensorJob::shape_over`).
        let planned = base
            .info(&job.tensor)
            .map_or_else(|| vec![job.rows, job.cols], |t| job.shape_over(&t.shape));
        out.insert(job.output.clone(), replaced.unwrap_or(planned));
    }
    for job in &plan.biases {
        if !out.contains_key(&job.tensor) {
            let shape = job.sources.iter().find_map(|s| {
                let (adapter, key) = match s {
                    crate::merge::engine::BiasSource::Add { adapter, key, .. }
                    | crate::merge::engine::BiasSource::Replace { adapter, key } => (adapter, key),
                };
                adapters[*adapter]
                    .weights
                    .info(key)
                    .map(|i| i.shape.clone())
            });
            if let Some(shape) = shape {
                out.insert(job.tensor.clone(), shape);
            }
        }
    }
    out
}

/// Compares M's names, shapes and dtypes with the expected ones. `merged_ties`: M's config ties
/// the head to the embeddings, so a missing head tensor is normal.
pub fn compare(
    expected: &BTreeMap<String, Vec<usize>>,
    merged: &Checkpoint,
    merged_ties: bool,
) -> Inventory {
    let mut inv = Inventory::default();
    for (name, shape) in expected {
        match merged.info(name) {
            None => {
                if !(is_head(name) && merged_ties) {
                    inv.missing.push(name.clone());
                }
            }
            Some(info) => {
                if info.numel() == 0 && shape.iter().product::<usize>() != 0 {
                    inv.empty.push(name.clone());
                } else if &info.shape != shape {
                    inv.reshaped.push(Reshaped {
                        tensor: name.clone(),
                        expected: shape.clone(),
                        found: info.shape.clone(),
                    });
                }
            }
        }
    }
    for info in merged.tensors() {
        // A GGUF block type lora-doctor quantizes is compared like a float (its own floor).
        let comparable = info.dtype.is_float()
            || super::fit::StoredFormat::of(info, merged.ggml_type(&info.name)).is_some();
        if !comparable {
            inv.not_float.push(info.name.clone());
        }
        if !expected.contains_key(&info.name)
            && !is_buffer(&info.name, &info.shape)
            && !is_head(&info.name)
        {
            inv.extra.push(info.name.clone());
        }
    }
    inv
}

impl Inventory {
    /// True when names, shapes and dtypes are as a faithful merge has them.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.empty.is_empty()
            && self.reshaped.is_empty()
            && self.not_float.is_empty()
    }

    /// One line per kind of problem, with up to three names each.
    pub fn describe(&self) -> Vec<String> {
        let some =
            |names: &[String]| crate::findings::quoted_examples(names.iter().map(String::as_str));
        let mut out = Vec::new();
        if !self.missing.is_empty() {
            out.push(format!(
                "{} missing: {}",
                self.missing.len(),
                some(&self.missing)
            ));
        }
        if !self.extra.is_empty() {
            out.push(format!("{} extra: {}", self.extra.len(), some(&self.extra)));
        }
        if !self.empty.is_empty() {
            out.push(format!("{} empty: {}", self.empty.len(), some(&self.empty)));
        }
        if !self.reshaped.is_empty() {
            let names: Vec<String> = self
                .reshaped
                .iter()
                .map(|r| format!("{} {:?} instead of {:?}", r.tensor, r.found, r.expected))
                .collect();
            out.push(format!(
                "{} of another shape: {}",
                names.len(),
                some(&names)
            ));
        }
        if !self.not_float.is_empty() {
            out.push(format!(
                "{} stored in a non-float dtype: {}",
                self.not_float.len(),
                some(&self.not_float)
            ));
        }
        out
    }

    /// True when M's tensors are a PEFT adapter's (`lora_A` / `lora_B` keys), not a merged model.
    pub fn looks_like_an_adapter(&self) -> bool {
        self.extra
            .iter()
            .any(|n| n.contains(".lora_A.") || n.contains(".lora_B."))
    }

    /// True when the extra tensors look like a bitsandbytes 4-bit / 8-bit serialization.
    pub fn looks_bnb_quantized(&self) -> bool {
        self.extra
            .iter()
            .any(|n| n.ends_with(".absmax") || n.contains("quant_state") || n.ends_with(".SCB"))
    }
}
