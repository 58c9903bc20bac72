//! Forensics of an already-merged checkpoint (`check --merged DIR`): for every tensor the adapters
//! change, fit the merged checkpoint's change to the adapter's exact update, judge what is left
//! against the rounding floor of the checkpoint's dtype, test the known mistakes (wrong scale,
//! transposed delta, dropped DoRA magnitude, quantized base, another base), and compare the tensor
//! inventory and the generation-relevant config files. Owns the `forensics` part of the report and
//! the findings it raises; the logit comparison of the merged checkpoint lives in `forward`.
//!
//! This file holds the report schema and [`analyze`], the pipeline; `classify` names each changed
//! tensor's cause, `quantized_base` searches the quantization hypotheses, `untouched` compares the
//! tensors the adapters leave alone, `findings` turns it all into findings (one function per
//! cause); `fit`, `causes`, `inventory` and `drift` are the measurements they use.

use serde::Serialize;

/// What a merged checkpoint was found to be, module by module. JSON `forensics`.
#[derive(Debug, Clone, Serialize)]
pub struct Forensics {
    /// The float dtype most of the merged checkpoint's weights are stored in.
    pub dtype: String,
    /// A tensor is a faithful merge when ‖M − W*‖ ≤ tolerance × its rounding floor.
    pub tolerance: f64,
    /// One entry per tensor the adapters change, in tensor order.
    pub modules: Vec<ModuleFit>,
    /// Tensors the adapters do not change: they must equal the base up to M's rounding.
    pub untouched: UntouchedSummary,
    pub inventory: Inventory,
    /// Generation-relevant differences between M's files and the adapter's / base's.
    pub config_drift: Vec<ConfigDifference>,
}

/// How one adapter-changed tensor of the merged checkpoint relates to the exact merge.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleFit {
    /// Base module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The tensor's name in the merged checkpoint.
    pub tensor: String,
    /// `lora`, `dora`, `replace` (modules_to_save) or `stacked` (several adapters).
    pub kind: &'static str,
    /// The adapter's scaling s (α/r or α/√r) when one low-rank adapter changes the tensor.
    pub expected_scale: Option<f64>,
    /// ŝ/s = ⟨M − W, ΔW⟩ / ⟨ΔW, ΔW⟩, in f64. 1 for a correct merge, 0 when never merged.
    pub scale_ratio: Option<f64>,
    /// The same fit against ΔWᵀ (square tensors only): 1 when the delta went in transposed.
    pub transposed_ratio: Option<f64>,
    /// ‖ΔW‖ (Frobenius, exact).
    pub delta_norm: f64,
    /// ‖round(W*) − W*‖ in M's dtype of this tensor: what a perfect merge must lose.
    pub floor: f64,
    /// ‖M − W*‖ / floor. Null when M holds NaN or Inf here.
    pub residual_to_floor: Option<f64>,
    /// ‖M − W − ŝ·ΔW‖ / floor: what the best scale leaves unexplained.
    pub fit_residual_to_floor: Option<f64>,
    /// The finding code this tensor contributes to, if any (`scale-mismatch`, …).
    pub cause: Option<&'static str>,
    /// The named mistake or best-fitting hypothesis (`rsLoRA read as plain (1/√r)`,
    /// `nf4, dequantized base`).
    pub explanation: Option<String>,
}

/// Tensors of M the adapters do not touch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UntouchedSummary {
    pub compared: usize,
    /// How many differ from the base by more than tolerance × their rounding floor.
    pub differing: usize,
    /// Of those, how many a quantized copy of the base explains.
    pub explained_by_quantization: usize,
    pub worst_tensor: Option<String>,
    /// ‖M − W‖ / floor of the worst tensor.
    pub worst_ratio: Option<f64>,
}

/// Names and shapes of M against the base plus what the adapters add.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inventory {
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub empty: Vec<String>,
    pub reshaped: Vec<Reshaped>,
    /// Tensors stored in a non-float dtype (a quantized checkpoint), which are not compared.
    pub not_float: Vec<String>,
    /// NaN / ±Inf values anywhere in M.
    pub nan: usize,
    pub inf: usize,
}

/// A tensor whose shape in M differs from the expected one.
#[derive(Debug, Clone, Serialize)]
pub struct Reshaped {
    pub tensor: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// One generation-relevant value that differs between M and its reference folder.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigDifference {
    /// `config.json`, `generation_config.json`, `tokenizer_config.json`, `tokenizer.json`, …
    pub file: String,
    /// The key (`eos_token_id`, `chat_template`, …) or `(file)` for a missing/extra file.
    pub key: String,
    /// Which folder the expected value comes from: `adapter` or `base`.
    pub reference: &'static str,
    pub expected: String,
    pub found: String,
}

pub mod causes;
mod classify;
pub mod drift;
mod findings;
pub mod fit;
mod hypothesis;
pub mod inventory;
mod quantized_base;
mod untouched;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rayon::prelude::*;

use crate::findings::Finding;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::mapping;
use crate::merge::engine::{MergeError, MergePlan};
use crate::merge::float::FloatFormat;
use crate::merge::precision::Precision;
use quantized_base::QuantSearch;
use untouched::Untouched;

/// Default of `merged-quant-deny` (defined with the other thresholds).
pub use crate::findings::thresholds::MERGED_QUANT_DENY as QUANTIZED_BASE_DENY;
/// Default of `merged-tolerance` (defined with the other thresholds).
pub use crate::findings::thresholds::MERGED_TOLERANCE as TOLERANCE;
/// The label findings about the merged checkpoint carry as their precision (the same label as
/// its row in the precision table).
pub use crate::forward::MERGED_LABEL as LABEL;

/// What the analysis reads.
pub struct Inputs<'a> {
    pub base: &'a Checkpoint,
    pub base_dir: &'a Path,
    pub base_config: Option<&'a ModelConfig>,
    pub adapters: &'a [Adapter],
    pub plan: &'a MergePlan,
    pub merged: &'a Checkpoint,
    pub merged_dir: &'a Path,
    /// `--trained-on`: a dequantized base in this format is what the adapter trained against.
    pub trained_on: Option<Precision>,
    /// `merged-tolerance`, in rounding floors (see [`TOLERANCE`]).
    pub tolerance: f64,
    /// `merged-quant-deny`, as a share of ‖ΔW‖ (see [`QUANTIZED_BASE_DENY`]).
    pub quant_deny: f64,
    /// Called once per adapter-changed tensor fitted (progress).
    pub tick: &'a (dyn Fn() + Sync),
}

/// Runs the whole analysis: per-tensor fits, quantization search, untouched tensors, inventory,
/// tied heads and config drift, and the findings they add up to.
pub fn analyze(input: &Inputs<'_>) -> anyhow::Result<(Forensics, Vec<Finding>)> {
    let merged_config = match input.merged.gguf() {
        // A GGUF describes itself: its config is its metadata.
        Some(_) => input
            .merged
            .gguf_config()
            .and_then(Result::ok)
            .map(ModelConfig::from_value),
        None => ModelConfig::read_dir(input.merged_dir)?,
    };
    let merged_ties = match &merged_config {
        Some(c) => c.tie_word_embeddings,
        None => input.base_config.is_some_and(|c| c.tie_word_embeddings),
    };
    let base_has_head = mapping::find_head(input.base).is_some();
    let head_job = input
        .plan
        .weights
        .iter()
        .any(|j| inventory::is_head(&j.output) && !input.base.contains(&j.output));
    // M's head must differ from its embeddings when the base's do or the adapter trains a head
    // the tied base does not have.
    let head_tied_in_m = merged_ties && (base_has_head || head_job);

    let expected = inventory::expected(input.base, input.plan, input.adapters);
    let mut inventory = inventory::compare(&expected, input.merged, merged_ties);

    let mut results = Vec::with_capacity(input.plan.weights.len());
    let mut search = QuantSearch::default();
    // In plan order, a few tensors at a time: an unexplained tensor waits, loaded, only until the
    // quantized-base hypothesis is decided on the first ones; later ones are tested right away.
    let chunk = rayon::current_num_threads().max(1);
    let jobs = &input.plan.weights;
    for start in (0..jobs.len()).step_by(chunk) {
        let decided = search.decided();
        let fitted = (start..(start + chunk).min(jobs.len()))
            .into_par_iter()
            .map(|i| {
                let (mut result, loaded) = classify::fit_job(i, &jobs[i], input, head_tied_in_m)?;
                let mut explained = false;
                let pending = match (loaded, decided) {
                    (Some(l), Some(Some(h))) => {
                        explained =
                            quantized_base::test(h, &jobs[i], &mut result, &l, input.tolerance)?;
                        None
                    }
                    (Some(_), Some(None)) | (None, _) => None,
                    (Some(l), None) => Some(l),
                };
                (input.tick)();
                Ok((result, pending, explained))
            })
            .collect::<Result<Vec<_>, MergeError>>()?;
        for (result, pending, explained) in fitted {
            search.note_explained(explained);
            results.push(result);
            if let Some(l) = pending {
                search.offer(results.len() - 1, l, &mut results, jobs, input.tolerance)?;
            }
        }
    }
    let hypothesis = search.finish(&mut results, jobs, input.tolerance)?;

    let changed: BTreeSet<&str> = input
        .plan
        .weights
        .iter()
        .map(|j| j.output.as_str())
        .chain(input.plan.biases.iter().map(|b| b.tensor.as_str()))
        .collect();
    let untouched_names: Vec<&String> = expected
        .keys()
        .filter(|n| !changed.contains(n.as_str()))
        .collect();
    let untouched = untouched_names
        .par_iter()
        .map(|n| untouched::compare(n, input, hypothesis))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();

    for r in &results {
        if let Some(b) = &r.basic {
            inventory.nan += b.nan;
            inventory.inf += b.inf;
        }
    }
    for u in &untouched {
        inventory.nan += u.nan;
        inventory.inf += u.inf;
    }
    let differing: Vec<&Untouched> = untouched
        .iter()
        .filter(|u| u.ratio > input.tolerance && u.nan + u.inf == 0)
        .collect();
    let worst = untouched
        .iter()
        .filter(|u| u.ratio.is_finite())
        .max_by(|a, b| a.ratio.total_cmp(&b.ratio));
    let untouched_summary = UntouchedSummary {
        compared: untouched.len(),
        differing: differing.len(),
        explained_by_quantization: differing.iter().filter(|u| u.explained).count(),
        worst_tensor: worst.map(|u| u.name.clone()),
        worst_ratio: worst.map(|u| u.ratio),
    };

    let adapter_dirs: Vec<&Path> = input.adapters.iter().map(|a| a.dir.as_path()).collect();
    let folders = drift::Folders {
        merged: input.merged_dir,
        adapters: adapter_dirs,
        base: input.base_dir,
    };
    let config_drift = match input.merged.gguf() {
        Some(header) => drift::compare_gguf(header, &folders, input.base_config),
        None => drift::compare(&folders),
    };

    let dtype = merged_format_name(input.merged);
    let mut findings = findings::findings(&findings::Evidence {
        input,
        results: &results,
        untouched: &untouched_summary,
        differing: &differing,
        inventory: &inventory,
        drift: &config_drift,
        ties_untied_base: merged_ties && base_has_head,
    });
    for f in &mut findings {
        f.precision = Some(LABEL.to_string());
    }
    results.sort_by_key(|r| r.index);
    let forensics = Forensics {
        dtype,
        tolerance: input.tolerance,
        modules: results.into_iter().map(|r| r.fit).collect(),
        untouched: untouched_summary,
        inventory,
        config_drift,
    };
    Ok((forensics, findings))
}

impl Forensics {
    /// The merged checkpoint's row of the precision table, in the same terms as the candidates':
    /// rel_error = ‖M − W*‖/‖ΔW‖, floor ratio = residual/floor, retention = the fitted ŝ/s.
    pub fn weight_summary(&self) -> crate::findings::weights::WeightSummary {
        let mut summary = crate::findings::weights::WeightSummary::empty();
        let mut rel_errors = Vec::new();
        for m in &self.modules {
            let Some(ratio) = m.residual_to_floor else {
                continue;
            };
            summary.modules += 1;
            summary.max_floor_ratio = Some(summary.max_floor_ratio.map_or(ratio, |r| r.max(ratio)));
            if let Some(s) = m.scale_ratio {
                summary.scale_ratio_range = Some(
                    summary
                        .scale_ratio_range
                        .map_or([s, s], |[lo, hi]| [lo.min(s), hi.max(s)]),
                );
            }
            if m.delta_norm > 0.0 {
                let rel = ratio * m.floor / m.delta_norm;
                if summary.worst_rel_error.is_none_or(|w| rel > w) {
                    summary.worst_rel_error = Some(rel);
                    summary.worst_module = Some(m.module.clone());
                }
                rel_errors.push(rel);
            }
        }
        if !rel_errors.is_empty() {
            summary.mean_rel_error = Some(rel_errors.iter().sum::<f64>() / rel_errors.len() as f64);
        }
        summary.nonfinite = self.inventory.nan + self.inventory.inf;
        summary
    }
}

/// The float format most of a checkpoint's weights are stored in.
pub fn merged_dtype(checkpoint: &Checkpoint) -> FloatFormat {
    let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
    for t in checkpoint.tensors() {
        if let Some(f) = t.dtype.float_format() {
            *count.entry(f.name()).or_default() += t.numel();
        }
    }
    let best = count
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or("bf16", |(name, _)| *name);
    match best {
        "f32" => FloatFormat::F32,
        "f16" => FloatFormat::F16,
        _ => FloatFormat::Bf16,
    }
}

/// The ggml type most of a GGUF checkpoint's values are stored in (by element count), `None` for
/// safetensors.
fn dominant_ggml_type(checkpoint: &Checkpoint) -> Option<crate::merge::ggml::GgmlType> {
    let mut count: BTreeMap<u32, (crate::merge::ggml::GgmlType, usize)> = BTreeMap::new();
    for t in checkpoint.tensors() {
        let ty = checkpoint.ggml_type(&t.name)?;
        count.entry(ty.id()).or_insert((ty, 0)).1 += t.numel();
    }
    count
        .into_values()
        .max_by_key(|(_, n)| *n)
        .map(|(ty, _)| ty)
}

/// The storage format M is reported in: its float dtype, or a GGUF's dominant ggml type
/// (`q4_k`, `f16`).
pub fn merged_format_name(checkpoint: &Checkpoint) -> String {
    match dominant_ggml_type(checkpoint) {
        Some(ty) if !ty.is_float() => ty.name().to_ascii_lowercase(),
        _ => merged_dtype(checkpoint).name().to_string(),
    }
}

/// The precision M's row is judged as (its thresholds' class): a GGUF's dominant quantized type
/// when lora-doctor knows it as a precision, else M's float dtype.
pub fn merged_precision(checkpoint: &Checkpoint) -> Precision {
    dominant_ggml_type(checkpoint)
        .filter(|ty| !ty.is_float())
        .and_then(|ty| {
            Precision::KNOWN.iter().copied().find(|p| match p {
                Precision::Quant(q) => q.ggml_type() == Some(ty),
                Precision::Float(_) => false,
            })
        })
        .unwrap_or(Precision::Float(merged_dtype(checkpoint)))
}
