//! Plans which base tensors a stack of adapters changes, loads one tensor's updates at a time,
//! and produces the merged tensor in each precision — the single place both `check` (statistics)
//! and `merge` (writing a checkpoint) get merged weights from.
//!
//! Nothing here holds more than one tensor's worth of data per worker: callers stream jobs
//! through rayon and drop each tensor as soon as its statistics (or bytes) are out.

use thiserror::Error;

use super::delta::{self, Layout, LowRank, Update, transpose};
use super::float::{FloatFormat, round_bf16_from_f64, round_f16_from_f64, round_f32_from_f64};
use super::ggml::GgmlType;
use super::precision::{Precision, Recipe};
use super::quant::GGML_QK;
use super::quant_format::{QuantFormat, fake_quantize_ggml};
use crate::io::adapter::{Adapter, AdapterModule, TensorRole};
use crate::io::checkpoint::{Checkpoint, CheckpointError};
use crate::io::config::ModelConfig;
use crate::io::experts::{self, FactorView};
use crate::io::mapping::{self, Conv1dRule, Resolution};
use crate::stats::weights::{self, CandidateArrays, DeltaStats, PrecisionStats, Values};

/// Why a merge cannot be planned or run.
#[derive(Debug, Error)]
pub enum MergeError {
    #[error(
        "`{tensor}` has shape {shape:?}; lora-doctor merges LoRA into 2-D weights only (Conv2d / 3-D expert tensors are not supported yet)"
    )]
    Unsupported { tensor: String, shape: Vec<usize> },
    #[error("quantizing `{tensor}` to {format}: {source}")]
    Quant {
        tensor: String,
        format: &'static str,
        #[source]
        source: super::quant::QuantError,
    },
    #[error(
        "`{key}` should hold the {rows} rows of the resized `{tensor}` but has {len} values for {cols} columns"
    )]
    Resize {
        tensor: String,
        key: String,
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error(transparent)]
    Read(#[from] CheckpointError),
}

/// Where one adapter's change to a tensor comes from.
#[derive(Debug, Clone)]
pub enum Source {
    LowRank {
        adapter: usize,
        a: String,
        b: String,
        magnitude: Option<String>,
        rank: usize,
        scale: f64,
        layout: Layout,
        /// For a PEFT `ParamWrapper` on stacked expert parameters: which part of the stored
        /// factors applies to this tensor (`None`: all of A and B, as stored).
        view: Option<FactorView>,
    },
    Replace {
        adapter: usize,
        key: String,
    },
}

/// The factors a low-rank source applies, in PEFT's orientation (A `[r', in]`, B `[out, r']`),
/// and their rank r': the stored tensors, or the part of a stacked-expert wrapper's factors its
/// `view` selects.
pub fn read_factors(
    weights: &Checkpoint,
    a: &str,
    b: &str,
    rank: usize,
    view: Option<&FactorView>,
) -> Result<(Vec<f32>, Vec<f32>, usize), CheckpointError> {
    let (a, b) = (weights.read_f32(a)?, weights.read_f32(b)?);
    Ok(match view {
        None => (a, b, rank),
        Some(view) => view.apply(&a, &b, rank),
    })
}

/// One base weight and every update that applies to it, in adapter order.
#[derive(Debug, Clone)]
pub struct TensorJob {
    /// Base module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// Base tensor the merge starts from (`….weight`).
    pub tensor: String,
    /// Tensor name in a merged checkpoint. Differs from `tensor` only for the head of a tied
    /// model, which is written as its own (untied) tensor.
    pub output: String,
    /// Rows of the merged tensor: the base's, or more when a replacement grows the vocabulary.
    pub rows: usize,
    pub cols: usize,
    pub sources: Vec<Source>,
    /// Set when a full replacement has more rows than the base tensor (tokens added and the
    /// embeddings resized before training): the base is read as the resized base.
    pub growth: Option<Growth>,
}

/// Where the rows a resized vocabulary adds to a base tensor come from. The merge of a full
/// replacement is the replacement whatever the base holds, but the statistics (‖ΔW‖) and the base
/// model of the comparison need the base as the adapter saw it: resized.
#[derive(Debug, Clone)]
pub struct Growth {
    /// Rows of the stored base tensor.
    pub base_rows: usize,
    /// Rows of the replacement (the resized vocabulary).
    pub rows: usize,
    pub adapter: usize,
    /// `original_module` (the resized, untrained copy PEFT saves with `modules_to_save`) when the
    /// adapter has it with the grown row count; else the replacement itself, so the added rows
    /// count as base rows the adapter did not change (transformers initialises them at random,
    /// so nothing better is known).
    pub key: String,
}

/// A change to a base bias.
#[derive(Debug, Clone)]
pub enum BiasSource {
    /// `lora_B.bias` with `lora_bias: true`: `bias += s·b`.
    Add {
        adapter: usize,
        key: String,
        scale: f64,
    },
    /// `modules_to_save` / `bias="all"`: the stored bias replaces the base's.
    Replace { adapter: usize, key: String },
}

/// One base bias and its changes.
#[derive(Debug, Clone)]
pub struct BiasJob {
    pub tensor: String,
    pub sources: Vec<BiasSource>,
}

/// Everything a stack of adapters changes in the base.
#[derive(Debug, Clone, Default)]
pub struct MergePlan {
    pub weights: Vec<TensorJob>,
    pub biases: Vec<BiasJob>,
}

impl MergePlan {
    /// Plans the merge of `adapters` (in order) into `base`. Only what PEFT itself would merge is
    /// planned: LoRA on modules the config wraps, DoRA magnitudes only with `use_dora`,
    /// `lora_B.bias` only with `lora_bias`. Call after the structural checks passed.
    pub fn build(
        base: &Checkpoint,
        config: Option<&ModelConfig>,
        adapters: &[Adapter],
    ) -> Result<Self, MergeError> {
        let mut plan = MergePlan::default();
        for (index, adapter) in adapters.iter().enumerate() {
            let conv1d = Conv1dRule::new(config, adapter.config.fan_in_fan_out);
            for module in adapter.modules.values() {
                if experts::is_param_module(&adapter.config, module) {
                    plan.add_expert_wrapper(index, adapter, module, base);
                    continue;
                }
                let Ok(target) = mapping::resolve(&module.name, base) else {
                    plan.add_stacked_slice(index, adapter, module, base, &conv1d);
                    continue;
                };
                if let Some(source) = weight_source(index, adapter, module, &conv1d) {
                    let tensor = target.weight();
                    let (module_name, output) = if target.resolution == Resolution::TiedHead {
                        (module.name.clone(), format!("{}.weight", module.name))
                    } else {
                        (target.prefix.clone(), tensor.clone())
                    };
                    let info = base
                        .info(&tensor)
                        .ok_or_else(|| CheckpointError::NoSuchTensor {
                            path: base.path.clone(),
                            tensor: tensor.clone(),
                        })?;
                    let [rows, cols] = info.shape[..] else {
                        return Err(MergeError::Unsupported {
                            tensor,
                            shape: info.shape.clone(),
                        });
                    };
                    let growth = growth_of(index, module, &source, rows, cols);
                    let job = match plan.weights.iter().position(|j| j.output == output) {
                        Some(i) => &mut plan.weights[i],
                        None => {
                            plan.weights.push(TensorJob {
                                module: module_name,
                                tensor,
                                output,
                                rows,
                                cols,
                                sources: Vec::new(),
                                growth: None,
                            });
                            let last = plan.weights.len() - 1;
                            &mut plan.weights[last]
                        }
                    };
                    job.sources.push(source);
                    if let Some(growth) = growth.filter(|g| g.rows > job.rows) {
                        job.rows = growth.rows;
                        job.growth = Some(growth);
                    }
                }
                if let Some(source) = bias_source(index, adapter, module) {
                    let tensor = target.bias();
                    match plan.biases.iter_mut().find(|j| j.tensor == tensor) {
                        Some(job) => job.sources.push(source),
                        None => plan.biases.push(BiasJob {
                            tensor,
                            sources: vec![source],
                        }),
                    }
                }
            }
        }
        plan.weights.sort_by(|a, b| a.output.cmp(&b.output));
        plan.biases.sort_by(|a, b| a.tensor.cmp(&b.tensor));
        Ok(plan)
    }

    /// Plans a per-expert LoRA (`….experts.E.w1`) on a base that stores its experts stacked: the
    /// update lands in its rows of the stacked tensor. Modules that are not per-expert
    /// projections, or whose factors do not fit the slice, are left to the structural checks.
    fn add_stacked_slice(
        &mut self,
        index: usize,
        adapter: &Adapter,
        module: &AdapterModule,
        base: &Checkpoint,
        conv1d: &Conv1dRule,
    ) {
        let Some(target) = experts::stacked_slice(&module.name, base) else {
            return;
        };
        let Some(Source::LowRank {
            adapter: a_index,
            a,
            b,
            magnitude: None,
            rank,
            scale,
            layout: Layout::Linear,
            view: None,
        }) = weight_source(index, adapter, module, conv1d)
        else {
            return;
        };
        if !slice_fits(module, &target, rank) {
            return;
        }
        let source = Source::LowRank {
            adapter: a_index,
            a,
            b,
            magnitude: None,
            rank,
            scale,
            layout: Layout::Linear,
            view: Some(target.view),
        };
        match self.weights.iter_mut().find(|j| j.output == target.tensor) {
            Some(job) => job.sources.push(source),
            None => self.weights.push(TensorJob {
                module: target.module,
                output: target.tensor.clone(),
                tensor: target.tensor,
                rows: target.rows,
                cols: target.cols,
                sources: vec![source],
                growth: None,
            }),
        }
    }

    /// Plans a PEFT `ParamWrapper` on a stacked expert parameter: one job per base tensor it
    /// updates (the stacked tensor, or each expert's 2-D tensors). A wrapper whose factors cannot
    /// be placed is left out here; the structural checks report it as a deny finding.
    fn add_expert_wrapper(
        &mut self,
        index: usize,
        adapter: &Adapter,
        module: &AdapterModule,
        base: &Checkpoint,
    ) {
        let (Some((stack, param)), Some(a), Some(b)) = (
            experts::param_module(&adapter.config, &module.name),
            module.get(TensorRole::LoraA),
            module.get(TensorRole::LoraB),
        ) else {
            return;
        };
        let scaling = adapter.config.scaling_for(&module.name);
        let Ok(targets) = experts::place(
            &adapter.config,
            stack,
            param,
            &a.info.shape,
            &b.info.shape,
            scaling.r,
            base,
        ) else {
            return;
        };
        for target in targets {
            let source = Source::LowRank {
                adapter: index,
                a: a.key.clone(),
                b: b.key.clone(),
                magnitude: None,
                rank: scaling.r,
                scale: scaling.scale,
                layout: Layout::Linear,
                view: Some(target.view),
            };
            match self.weights.iter_mut().find(|j| j.output == target.tensor) {
                Some(job) => job.sources.push(source),
                None => self.weights.push(TensorJob {
                    module: target.module,
                    output: target.tensor.clone(),
                    tensor: target.tensor,
                    rows: target.rows,
                    cols: target.cols,
                    sources: vec![source],
                    growth: None,
                }),
            }
        }
    }
}

/// True when a per-expert LoRA's A `[r, in]` and B `[rows, r]` fit its slice of a stacked tensor.
pub fn slice_fits(module: &AdapterModule, target: &experts::ExpertTarget, rank: usize) -> bool {
    let (Some(a), Some(b)) = (module.get(TensorRole::LoraA), module.get(TensorRole::LoraB)) else {
        return false;
    };
    let FactorView::Rows { first, rows, total } = target.view else {
        return false;
    };
    a.info.shape[..] == [rank, target.cols]
        && b.info.shape[..] == [rows, rank]
        && first + rows <= total
}

/// A full replacement with more rows than the base (same columns) grows the tensor.
fn growth_of(
    index: usize,
    module: &AdapterModule,
    source: &Source,
    base_rows: usize,
    cols: usize,
) -> Option<Growth> {
    let Source::Replace { key, .. } = source else {
        return None;
    };
    let full = module.get(TensorRole::FullWeight)?;
    let rows = match full.info.shape[..] {
        [r, c] if r > base_rows && c == cols => r,
        _ => return None,
    };
    let key = module
        .get(TensorRole::OriginalModule)
        .filter(|o| o.info.shape[..] == [rows, cols])
        .map_or_else(|| key.clone(), |o| o.key.clone());
    Some(Growth {
        base_rows,
        rows,
        adapter: index,
        key,
    })
}

/// The base tensor of a job as the adapters saw it: the stored tensor, plus the rows a resized
/// vocabulary added (see [`Growth`]).
pub fn base_weight(
    job: &TensorJob,
    base: &Checkpoint,
    adapters: &[Adapter],
) -> Result<Vec<f32>, MergeError> {
    let mut w = base.read_f32(&job.tensor)?;
    if let Some(g) = &job.growth {
        let extra = adapters[g.adapter].weights.read_f32(&g.key)?;
        let rows = extra
            .get(g.base_rows * job.cols..job.rows * job.cols)
            .ok_or_else(|| MergeError::Resize {
                tensor: job.tensor.clone(),
                key: g.key.clone(),
                rows: job.rows,
                cols: job.cols,
                len: extra.len(),
            })?;
        w.truncate(g.base_rows * job.cols);
        w.extend_from_slice(rows);
    }
    Ok(w)
}

fn weight_source(
    index: usize,
    adapter: &Adapter,
    module: &AdapterModule,
    conv1d: &Conv1dRule,
) -> Option<Source> {
    let config = &adapter.config;
    let lora_pair = module
        .get(TensorRole::LoraA)
        .zip(module.get(TensorRole::LoraB))
        .map(|(a, b)| (a, b, false))
        .or_else(|| {
            module
                .get(TensorRole::EmbeddingA)
                .zip(module.get(TensorRole::EmbeddingB))
                .map(|(a, b)| (a, b, true))
        });
    if let Some((a, b, embedding)) = lora_pair
        && config.wraps(&module.name).is_ok()
    {
        let scaling = config.scaling_for(&module.name);
        let layout = if embedding {
            Layout::Embedding
        } else if conv1d.is_conv1d(&module.name) {
            Layout::Conv1d
        } else {
            Layout::Linear
        };
        let magnitude = module
            .get(TensorRole::Magnitude)
            .filter(|_| config.use_dora)
            .map(|m| m.key.clone());
        return Some(Source::LowRank {
            adapter: index,
            a: a.key.clone(),
            b: b.key.clone(),
            magnitude,
            rank: scaling.r,
            scale: scaling.scale,
            layout,
            view: None,
        });
    }
    module
        .get(TensorRole::FullWeight)
        .map(|full| Source::Replace {
            adapter: index,
            key: full.key.clone(),
        })
}

fn bias_source(index: usize, adapter: &Adapter, module: &AdapterModule) -> Option<BiasSource> {
    if let Some(full) = module.get(TensorRole::FullBias) {
        return Some(BiasSource::Replace {
            adapter: index,
            key: full.key.clone(),
        });
    }
    let b = module
        .get(TensorRole::LoraBBias)
        .filter(|_| adapter.config.lora_bias)?;
    Some(BiasSource::Add {
        adapter: index,
        key: b.key.clone(),
        scale: adapter.config.scaling_for(&module.name).scale,
    })
}

/// Reads one job's updates from the adapters (f32, in adapter order).
pub fn load_updates(job: &TensorJob, adapters: &[Adapter]) -> Result<Vec<Update>, MergeError> {
    job.sources
        .iter()
        .map(|source| {
            Ok(match source {
                Source::Replace { adapter, key } => {
                    Update::Replace(adapters[*adapter].weights.read_f32(key)?)
                }
                Source::LowRank {
                    adapter,
                    a,
                    b,
                    magnitude,
                    rank,
                    scale,
                    layout,
                    view,
                } => {
                    let w = &adapters[*adapter].weights;
                    let magnitude = magnitude.as_ref().map(|m| w.read_f32(m)).transpose()?;
                    let (a, b, rank) = read_factors(w, a, b, *rank, view.as_ref())?;
                    Update::LowRank(LowRank::from_peft(&a, &b, rank, *scale, *layout, magnitude))
                }
            })
        })
        .collect()
}

/// Applies a bias job to the stored base bias (zeros when the base has none), in f32 as PEFT does.
pub fn merged_bias(
    job: &BiasJob,
    base: &Checkpoint,
    adapters: &[Adapter],
) -> Result<Vec<f32>, MergeError> {
    let mut bias = match base.info(&job.tensor) {
        Some(_) => base.read_f32(&job.tensor)?,
        None => Vec::new(),
    };
    for source in &job.sources {
        match source {
            BiasSource::Replace { adapter, key } => {
                bias = adapters[*adapter].weights.read_f32(key)?
            }
            BiasSource::Add {
                adapter,
                key,
                scale,
            } => {
                let b = adapters[*adapter].weights.read_f32(key)?;
                if bias.is_empty() {
                    bias = vec![0.0; b.len()];
                }
                let s32 = *scale as f32;
                for (x, y) in bias.iter_mut().zip(&b) {
                    *x += y * s32;
                }
            }
        }
    }
    Ok(bias)
}

/// Quantizes and dequantizes a `[rows, cols]` tensor as the format's tools ship it.
///
/// Rows that do not fit a ggml format's block: convert_hf_to_gguf stores Q8_0/Q4_0/Q4_1 tensors
/// with rows that are not a multiple of 32 in f16; llama-quantize demotes the other ggml types
/// (Q4_K → Q5_0, Q6_K → Q8_0, …, then f16: [`super::mix::fallback`]). A mix picks the type from the
/// tensor's name ([`super::mix::Mix::type_for`], which needs the model it was bound to) and leaves what
/// llama-quantize leaves (position embeddings) as stored; the note names the type it chose.
///
/// `conv1d`: the tensor is a GPT-2 Conv1D weight stored `[in, out]`. Every quantizing tool works
/// on the `[out, in]` orientation (convert_hf_to_gguf and transformers' bitsandbytes integration
/// both transpose Conv1D weights first), so blocks run along `in`: quantize the transpose and
/// transpose the result back.
pub fn fake_quantize(
    format: QuantFormat,
    tensor: &str,
    data: &[f32],
    rows: usize,
    cols: usize,
    conv1d: bool,
) -> Result<(Vec<f32>, Option<String>), MergeError> {
    if conv1d {
        let (out, note) = fake_quantize(
            format,
            tensor,
            &transpose(data, rows, cols),
            cols,
            rows,
            false,
        )?;
        return Ok((transpose(&out, cols, rows), note));
    }
    let quant_error = |source| MergeError::Quant {
        tensor: tensor.to_string(),
        format: format.name(),
        source,
    };
    let stored = format
        .stored_type(tensor, rows, cols)
        .map_err(quant_error)?;
    let (ty, note) = match (format, stored) {
        (QuantFormat::Mix(_), Some(ty)) => (ty, Some(format!("{}: stored as {ty}", format.name()))),
        (QuantFormat::Mix(_), None) => {
            let note = format!("{}: kept as stored, as llama-quantize does", format.name());
            return Ok((data.to_vec(), Some(note)));
        }
        (QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1, Some(GgmlType::F16)) => {
            let note = format!(
                "rows of {cols} are not a multiple of {GGML_QK}: stored as f16, as convert_hf_to_gguf does"
            );
            (GgmlType::F16, Some(note))
        }
        (other, Some(ty)) => {
            let target = other.ggml_type();
            let note = (Some(ty) != target).then(|| {
                let target = target.map(|t| t.to_string()).unwrap_or_default();
                format!(
                    "rows of {cols} do not fit {target} blocks: stored as {ty}, as llama-quantize does"
                )
            });
            (ty, note)
        }
        (other, None) => {
            let mut out = vec![0.0f32; data.len()];
            other
                .fake_quantize(data, rows, cols, &mut out)
                .map_err(quant_error)?;
            return Ok((out, None));
        }
    };
    let out = match ty {
        GgmlType::F16 => data.iter().map(|v| FloatFormat::F16.round(*v)).collect(),
        ty => fake_quantize_ggml(ty, data, cols).map_err(quant_error)?,
    };
    Ok((out, note))
}

impl TensorJob {
    /// The shape the merged tensor is written in: the stored shape when the job covers it as is
    /// (a stacked expert tensor `[E, out, in]` is merged as its `[E·out, in]` matrix), else the
    /// job's `[rows, cols]` (a resized vocabulary).
    pub fn shape_over(&self, stored: &[usize]) -> Vec<usize> {
        if stored.iter().product::<usize>() == self.rows * self.cols {
            stored.to_vec()
        } else {
            vec![self.rows, self.cols]
        }
    }

    /// True when the base weight is a GPT-2 Conv1D (`[in, out]`), as the plan's LoRA layout says.
    pub fn is_conv1d(&self) -> bool {
        self.sources.iter().any(|s| {
            matches!(
                s,
                Source::LowRank {
                    layout: Layout::Conv1d,
                    ..
                }
            )
        })
    }
}

/// A precision applied to any f32 tensor (rounding or quantize + dequantize).
fn store_in(
    precision: Precision,
    tensor: &str,
    data: &[f32],
    rows: usize,
    cols: usize,
    conv1d: bool,
) -> Result<(Vec<f32>, Option<String>), MergeError> {
    match precision {
        Precision::Float(f) => Ok((data.iter().map(|v| f.round(*v)).collect(), None)),
        Precision::Quant(q) => fake_quantize(q, tensor, data, rows, cols, conv1d),
    }
}

/// The merged tensor in a float dtype, by recipe: exact (f64 sum rounded once) or PEFT's.
pub fn merged_float(
    base: &[f32],
    rows: usize,
    cols: usize,
    updates: &[Update],
    dtype: FloatFormat,
    recipe: Recipe,
) -> Vec<f32> {
    match recipe {
        Recipe::Exact => round_exact(&delta::merge_exact(base, rows, cols, updates), dtype),
        Recipe::Peft => delta::merge_peft(base, rows, cols, updates, dtype),
    }
}

/// The exact merge W* rounded once to `dtype`: the exact recipe's merged tensor. One loop per
/// format (the rounding inlined in each; an out-of-line call per element was 5 % of a default
/// check's CPU).
pub fn round_exact(exact: &[f64], dtype: FloatFormat) -> Vec<f32> {
    match dtype {
        FloatFormat::F32 => exact.iter().map(|v| round_f32_from_f64(*v)).collect(),
        FloatFormat::F16 => exact.iter().map(|v| round_f16_from_f64(*v)).collect(),
        FloatFormat::Bf16 => exact.iter().map(|v| round_bf16_from_f64(*v)).collect(),
    }
}

/// Statistics of one tensor in one precision, with a note when the format had to fall back.
#[derive(Debug, Clone)]
pub struct PrecisionResult {
    pub precision: Precision,
    pub stats: PrecisionStats,
    pub note: Option<String>,
}

/// Everything measured on one merged tensor.
#[derive(Debug, Clone)]
pub struct TensorEvaluation {
    pub module: String,
    pub tensor: String,
    pub delta: DeltaStats,
    pub results: Vec<PrecisionResult>,
}

/// Options shared by every tensor of one evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions<'a> {
    pub precisions: &'a [Precision],
    pub recipe: Recipe,
    /// The precision the adapter was trained against (QLoRA): the reference base is
    /// dequant(P(W)) instead of W.
    pub trained_on: Option<Precision>,
}

/// Merges one tensor exactly and in every precision and measures each candidate.
pub fn evaluate(
    job: &TensorJob,
    base: &Checkpoint,
    adapters: &[Adapter],
    options: EvalOptions<'_>,
) -> Result<TensorEvaluation, MergeError> {
    let (rows, cols) = (job.rows, job.cols);
    let conv1d = job.is_conv1d();
    let stored = base_weight(job, base, adapters)?;
    let updates = load_updates(job, adapters)?;
    // Without --trained-on the reference base is the stored base: borrow it, not a copy (a
    // 7B MLP weight is 180 MB of f32 per worker).
    let w_ref_owned = match options.trained_on {
        Some(p) => Some(store_in(p, &job.tensor, &stored, rows, cols, conv1d)?.0),
        None => None,
    };
    let w_ref: &[f32] = w_ref_owned.as_deref().unwrap_or(&stored);
    let wstar = delta::merge_exact(w_ref, rows, cols, &updates);
    // Without --trained-on the user's merge and the reference merge are the same array.
    let wstar_user_owned = options
        .trained_on
        .map(|_| delta::merge_exact(&stored, rows, cols, &updates));
    let wstar_user: &[f64] = wstar_user_owned.as_deref().unwrap_or(&wstar);
    let delta = weights::delta_stats(&wstar, w_ref, options.trained_on.map(|_| stored.as_slice()));
    let mut results = Vec::with_capacity(options.precisions.len());
    for &precision in options.precisions {
        let same_merge = wstar_user_owned.is_none();
        // Float floors and the base in a float format are rounded element by element inside
        // the statistics pass instead of being stored: two tensor-sized buffers fewer per worker.
        let (mut floor_owned, mut base_owned) = (Vec::new(), Vec::new());
        let (candidate, note): (Option<Vec<f32>>, _) = match precision {
            Precision::Float(f) => {
                let candidate = match (options.recipe, same_merge) {
                    (Recipe::Exact, true) => None,
                    (Recipe::Exact, false) => {
                        Some(wstar_user.iter().map(|v| f.round_from_f64(*v)).collect())
                    }
                    (Recipe::Peft, _) => Some(delta::merge_peft(&stored, rows, cols, &updates, f)),
                };
                (candidate, None)
            }
            Precision::Quant(q) => {
                let star32: Vec<f32> = wstar.iter().map(|v| *v as f32).collect();
                let (floor, note) = fake_quantize(q, &job.tensor, &star32, rows, cols, conv1d)?;
                drop(star32);
                floor_owned = floor;
                let candidate = if same_merge {
                    None
                } else {
                    let user32: Vec<f32> = wstar_user.iter().map(|v| *v as f32).collect();
                    Some(fake_quantize(q, &job.tensor, &user32, rows, cols, conv1d)?.0)
                };
                base_owned = store_in(precision, &job.tensor, &stored, rows, cols, conv1d)?.0;
                (candidate, note)
            }
        };
        let (floor_values, base_values) = match precision {
            // f32 stores an f32 base unchanged.
            Precision::Float(FloatFormat::F32) => (
                Values::RoundedF64(FloatFormat::F32, &wstar),
                Values::Stored(&stored),
            ),
            Precision::Float(f) => (Values::RoundedF64(f, &wstar), Values::Rounded(f, &stored)),
            Precision::Quant(_) => (Values::Stored(&floor_owned), Values::Stored(&base_owned)),
        };
        let stats = weights::precision_stats(
            precision,
            &CandidateArrays {
                wstar: &wstar,
                w_ref,
                candidate: candidate.as_deref().map(Values::Stored),
                floor: floor_values,
                base_in_p: base_values,
                wstar_user,
            },
        );
        results.push(PrecisionResult {
            precision,
            stats,
            note,
        });
    }
    Ok(TensorEvaluation {
        module: job.module.clone(),
        tensor: job.tensor.clone(),
        delta,
        results,
    })
}
