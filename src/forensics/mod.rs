//! Forensics of an already-merged checkpoint (`check --merged DIR`): for every tensor the adapters
//! change, fit the merged checkpoint's change to the adapter's exact update, judge what is left
//! against the rounding floor of the checkpoint's dtype, test the known mistakes (wrong scale,
//! transposed delta, dropped DoRA magnitude, quantized base, another base), and compare the tensor
//! inventory and the generation-relevant config files. Owns the `forensics` part of the report and
//! the findings it raises; the logit comparison of the merged checkpoint lives in `forward`.

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
pub mod drift;
pub mod fit;
pub mod inventory;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rayon::prelude::*;

use crate::findings::{Code, Finding, Level};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::mapping;
use crate::merge::delta::{self, Update};
use crate::merge::engine::{self, MergeError, MergePlan, Source, TensorJob};
use crate::merge::float::FloatFormat;
use crate::merge::precision::Precision;
use crate::merge::quant::{
    BNB_4BIT_BLOCKSIZE, Bnb4bitType, BnbBackend, QuantFormat, dequantize_4bit, quantize_4bit,
};
use fit::{BasicFit, TensorArrays};

/// Default of `merged-tolerance` (defined with the other thresholds).
pub use crate::findings::thresholds::MERGED_TOLERANCE as TOLERANCE;
/// A hypothesis that cannot be modelled to the last bit (bitsandbytes double quantization, a
/// dequantization dtype) still explains a tensor when it removes all but this share of the
/// residual.
const EXPLAINED_SHARE: f64 = 0.2;
/// Default of `merged-quant-deny` (defined with the other thresholds).
pub use crate::findings::thresholds::MERGED_QUANT_DENY as QUANTIZED_BASE_DENY;
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

/// A way a merged tensor can have come about from a quantized copy of W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QuantHypothesis {
    format: QuantFormat,
    /// false: M = dequant(q(W)) + ΔW (merged onto the dequantized base, Unsloth/QLoRA style);
    /// true: M = dequant(q(W + ΔW)) (the merge re-quantized and stored as floats).
    requantized: bool,
    /// NF4/FP4 only: bitsandbytes' CPU quantizer instead of the CUDA kernel (they differ on
    /// ties and a few thresholds, see `BnbBackend`).
    cpu: bool,
}

impl QuantHypothesis {
    fn all() -> Vec<QuantHypothesis> {
        let mut out = Vec::new();
        for &format in &QuantFormat::FORENSIC_HYPOTHESES {
            let bnb4 = matches!(format, QuantFormat::Nf4 | QuantFormat::Fp4);
            for requantized in [false, true] {
                for cpu in [false, true] {
                    if cpu && !bnb4 {
                        continue;
                    }
                    out.push(QuantHypothesis {
                        format,
                        requantized,
                        cpu,
                    });
                }
            }
        }
        out
    }

    fn describe(self) -> String {
        let how = if self.cpu {
            " (bitsandbytes' CPU quantizer)"
        } else {
            ""
        };
        if self.requantized {
            format!(
                "the exact merge quantized to {}{how} and stored as floats",
                self.format.name()
            )
        } else {
            format!(
                "ΔW added to the {}-dequantized base{how}",
                self.format.name()
            )
        }
    }

    /// dequant(q(x)) as the tool behind this hypothesis computes it: the input first cast to the
    /// dtype the model was loaded in (QLoRA loads the base in bf16/f16, then quantizes), NF4/FP4
    /// dequantized into that dtype. None when the format cannot hold the tensor (ggml rows that
    /// are not a multiple of 32 fall back to f16, which proves nothing).
    fn apply(
        self,
        job: &TensorJob,
        data: &[f32],
        dtype: FloatFormat,
    ) -> Result<Option<Vec<f32>>, MergeError> {
        let cast: Vec<f32> = data.iter().map(|v| dtype.round(*v)).collect();
        let (rows, cols, conv1d) = (job.rows, job.cols, job.is_conv1d());
        let kind = match self.format {
            QuantFormat::Nf4 => Some(Bnb4bitType::Nf4),
            QuantFormat::Fp4 => Some(Bnb4bitType::Fp4),
            _ => None,
        };
        let Some(kind) = kind.filter(|_| !conv1d) else {
            let (q, note) =
                engine::fake_quantize(self.format, &job.tensor, &cast, rows, cols, conv1d)?;
            return Ok(note.is_none().then_some(q));
        };
        let backend = if self.cpu {
            BnbBackend::Cpu
        } else {
            BnbBackend::Cuda
        };
        let quant_error = |source| MergeError::Quant {
            tensor: job.tensor.clone(),
            format: self.format.name(),
            source,
        };
        let q = quantize_4bit(&cast, kind, BNB_4BIT_BLOCKSIZE, backend).map_err(quant_error)?;
        Ok(Some(dequantize_4bit(&q, dtype).map_err(quant_error)?))
    }
}

/// Why one adapter-changed tensor of M is what it is.
#[derive(Debug, Clone, PartialEq)]
enum Cause {
    Faithful,
    NotMerged,
    ModulesToSaveDropped,
    DoraDropped,
    Transposed,
    Scale,
    Quantized(QuantHypothesis, f64),
    Tied,
    /// A stack of adapters of which only some were merged: the adapters (by index) left out.
    StackPartial(Vec<usize>),
    NonFinite,
    Unexplained,
    /// Not compared (missing from M, another shape, not a float): the inventory reports it.
    Skipped,
}

impl Cause {
    fn code(&self) -> Option<Code> {
        Some(match self {
            Cause::NotMerged | Cause::StackPartial(_) => Code::NotMerged,
            Cause::ModulesToSaveDropped => Code::ModulesToSaveDropped,
            Cause::DoraDropped => Code::DoraMagnitudeDropped,
            Cause::Transposed => Code::TransposedDelta,
            Cause::Scale => Code::ScaleMismatch,
            Cause::Quantized(..) => Code::QuantizedMergeBase,
            Cause::Tied => Code::TiedEmbeddings,
            Cause::NonFinite => Code::NonfiniteMerge,
            Cause::Unexplained => Code::PrecisionDrift,
            Cause::Faithful | Cause::Skipped => return None,
        })
    }
}

/// One job's outcome.
struct JobResult {
    index: usize,
    fit: ModuleFit,
    basic: Option<BasicFit>,
    cause: Cause,
    /// For `Cause::Scale`: the factor that explains M and the known mistakes that give it.
    scale: Option<(f64, Vec<causes::ScaleMistake>)>,
}

/// The three arrays a tensor's hypotheses are tested on.
struct Loaded {
    w: Vec<f32>,
    m: Vec<f32>,
    wstar: Vec<f64>,
    updates: Vec<Update>,
    format: FloatFormat,
}

fn kind(job: &TensorJob) -> &'static str {
    if job.sources.len() > 1 {
        return "stacked";
    }
    match &job.sources[0] {
        Source::Replace { .. } => "replace",
        Source::LowRank {
            magnitude: Some(_), ..
        } => "dora",
        Source::LowRank { .. } => "lora",
    }
}

fn expected_scale(job: &TensorJob) -> Option<f64> {
    match job.sources.as_slice() {
        [Source::LowRank { scale, .. }] => Some(*scale),
        _ => None,
    }
}

fn empty_fit(
    job: &TensorJob,
    cause: Option<&'static str>,
    explanation: Option<String>,
) -> ModuleFit {
    ModuleFit {
        module: job.module.clone(),
        tensor: job.output.clone(),
        kind: kind(job),
        expected_scale: expected_scale(job),
        scale_ratio: None,
        transposed_ratio: None,
        delta_norm: 0.0,
        floor: 0.0,
        residual_to_floor: None,
        fit_residual_to_floor: None,
        cause,
        explanation,
    }
}

fn explained(ratio: f64, plain_ratio: f64, tolerance: f64) -> bool {
    ratio <= tolerance || ratio <= EXPLAINED_SHARE * plain_ratio
}

/// Reads W, M and the exact merge of one job; None when M cannot be compared element-wise.
fn load(job: &TensorJob, input: &Inputs<'_>) -> Result<Option<Loaded>, MergeError> {
    let Some(info) = input.merged.info(&job.output) else {
        return Ok(None);
    };
    let Some(format) = FloatFormat::of_dtype(&info.dtype) else {
        return Ok(None);
    };
    // Another shape (even with the same element count, e.g. stored transposed) is an inventory
    // finding, not something to fit element by element.
    if info.shape != [job.rows, job.cols] {
        return Ok(None);
    }
    let w = engine::base_weight(job, input.base, input.adapters)?;
    let updates = engine::load_updates(job, input.adapters)?;
    let wstar = delta::merge_exact(&w, job.rows, job.cols, &updates);
    if wstar.len() != w.len() {
        return Ok(None);
    }
    let m = input.merged.read_f32(&job.output)?;
    Ok(Some(Loaded {
        w,
        m,
        wstar,
        updates,
        format,
    }))
}

fn fit_job(
    index: usize,
    job: &TensorJob,
    input: &Inputs<'_>,
    head_tied_in_m: bool,
) -> Result<JobResult, MergeError> {
    if head_tied_in_m && inventory::is_head(&job.output) {
        let why = "M ties the head to the embeddings, so this trained head is not what loaders use";
        return Ok(JobResult {
            index,
            fit: empty_fit(job, Some(Code::TiedEmbeddings.as_str()), Some(why.into())),
            basic: None,
            cause: Cause::Tied,
            scale: None,
        });
    }
    let Some(l) = load(job, input)? else {
        return Ok(JobResult {
            index,
            fit: empty_fit(
                job,
                None,
                Some("not compared: see the tensor inventory".into()),
            ),
            basic: None,
            cause: Cause::Skipped,
            scale: None,
        });
    };
    let arrays = TensorArrays {
        w: &l.w,
        m: &l.m,
        wstar: &l.wstar,
        rows: job.rows,
        cols: job.cols,
        format: l.format,
    };
    let basic = fit::measure(&arrays);
    let ratio = basic.ratio(basic.residual);
    let mistakes = mistakes_for(job, input);
    let mut explanation = None;
    let mut scale = None;
    let rounded = (basic.nan + basic.inf == 0 && basic.delta_norm > 0.0)
        .then(|| rounded_alternative(&arrays, &basic, &mistakes, input.tolerance))
        .flatten();
    let cause = if basic.nan + basic.inf > 0 {
        Cause::NonFinite
    } else if let Some(alternative) = rounded {
        match alternative {
            Alternative::Factor(0.0) if kind(job) == "replace" => {
                explanation =
                    Some("M holds the base's tensor, not the adapter's trained copy".into());
                Cause::ModulesToSaveDropped
            }
            Alternative::Factor(0.0) => {
                explanation = Some("M equals the base here (after rounding)".into());
                Cause::NotMerged
            }
            Alternative::Factor(f) => {
                let matched = causes::matching(f, &mistakes);
                explanation = Some(scale_explanation(f, basic.scale_ratio, &matched, true));
                scale = Some((f, matched));
                Cause::Scale
            }
            Alternative::Transposed => {
                explanation = Some("round(W + ΔWᵀ) matches M, round(W + ΔW) does not".into());
                Cause::Transposed
            }
        }
    } else if let Some(missing) = stack_subset(job, &l, &arrays, &basic, input)? {
        let names: Vec<String> = missing
            .iter()
            .map(|i| format!("`{}`", input.adapters[*i].dir.display()))
            .collect();
        explanation = Some(format!(
            "M = W + the other adapters' updates: {} not merged",
            names.join(", ")
        ));
        Cause::StackPartial(missing)
    } else if ratio <= input.tolerance {
        Cause::Faithful
    } else if basic.base_distance <= input.tolerance * basic.base_floor {
        if kind(job) == "replace" {
            explanation = Some("M holds the base's tensor, not the adapter's trained copy".into());
            Cause::ModulesToSaveDropped
        } else {
            explanation = Some("M equals the base here".into());
            Cause::NotMerged
        }
    } else if let Some(plain) = dora_dropped_ratio(job, &l, &basic)
        && explained(plain, ratio, input.tolerance)
    {
        explanation = Some(format!(
            "W + ΔW without the magnitude rescaling fits ({plain:.2}× the floor)"
        ));
        Cause::DoraDropped
    } else if let Some((t, res)) = basic.transposed
        && (t - 1.0).abs() < 0.1
        && explained(basic.ratio(res), ratio, input.tolerance)
    {
        explanation = Some(format!(
            "ΔWᵀ fits with scale {t:.3} ({:.2}× the floor)",
            basic.ratio(res)
        ));
        Cause::Transposed
    } else if let (Some(s), Some(res)) = (basic.scale_ratio, basic.fit_residual)
        && explained(basic.ratio(res), ratio, input.tolerance)
    {
        let matched = causes::matching(s, &mistakes);
        explanation = Some(scale_explanation(s, Some(s), &matched, false));
        scale = Some((s, matched));
        Cause::Scale
    } else {
        Cause::Unexplained
    };
    let fit = ModuleFit {
        module: job.module.clone(),
        tensor: job.output.clone(),
        kind: kind(job),
        expected_scale: expected_scale(job),
        scale_ratio: basic.scale_ratio,
        transposed_ratio: basic.transposed.map(|(t, _)| t),
        delta_norm: basic.delta_norm,
        floor: basic.floor,
        residual_to_floor: (basic.nan + basic.inf == 0).then_some(ratio),
        fit_residual_to_floor: basic.fit_residual.map(|r| basic.ratio(r)),
        cause: cause.code().map(Code::as_str),
        explanation,
    };
    Ok(JobResult {
        index,
        fit,
        basic: Some(basic),
        cause,
        scale,
    })
}

/// ‖M − (W + ΔW without DoRA's rescaling)‖ / floor, for DoRA jobs.
fn dora_dropped_ratio(job: &TensorJob, l: &Loaded, basic: &BasicFit) -> Option<f64> {
    if !l
        .updates
        .iter()
        .any(|u| matches!(u, Update::LowRank(lr) if lr.magnitude.is_some()))
    {
        return None;
    }
    let plain: Vec<Update> = l
        .updates
        .iter()
        .map(|u| match u {
            Update::LowRank(lr) => {
                let mut lr = lr.clone();
                lr.magnitude = None;
                Update::LowRank(lr)
            }
            other => other.clone(),
        })
        .collect();
    let expected = delta::merge_exact(&l.w, job.rows, job.cols, &plain);
    Some(basic.ratio(fit::distance(&l.m, expected.into_iter())))
}

/// The known scaling mistakes for a tensor one plain LoRA adapter changes (none otherwise: a
/// DoRA, replaced or stacked tensor has no single scale to get wrong).
fn mistakes_for(job: &TensorJob, input: &Inputs<'_>) -> Vec<causes::ScaleMistake> {
    match job.sources.as_slice() {
        [
            Source::LowRank {
                adapter,
                magnitude: None,
                ..
            },
        ] => {
            let config = &input.adapters[*adapter].config;
            causes::candidates(config, &config.scaling_for(&job.module))
        }
        _ => Vec::new(),
    }
}

/// A hypothesis that explains M clearly better than the exact merge once both are rounded to
/// M's dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Alternative {
    /// M = round(W + f·ΔW): 0 = never merged, else a known mistake's factor.
    Factor(f64),
    Transposed,
}

/// Compares the exact merge with "never merged", every known mistake's factor and ΔWᵀ after
/// rounding to M's dtype. An alternative wins when it is within the tolerance of M and less than
/// half as far from M as the exact merge — so a correct merge, which after rounding matches
/// round(W*) almost element for element, never loses to one.
fn rounded_alternative(
    a: &TensorArrays<'_>,
    basic: &BasicFit,
    mistakes: &[causes::ScaleMistake],
    tolerance: f64,
) -> Option<Alternative> {
    let exact = fit::rounded_distance(a, 1.0, false);
    if exact == 0.0 {
        return None;
    }
    let mut factors: Vec<f64> = vec![0.0];
    for m in mistakes {
        if !factors.iter().any(|f| (f - m.factor).abs() < 1e-9) {
            factors.push(m.factor);
        }
    }
    let mut candidates: Vec<(Alternative, f64)> = factors
        .into_iter()
        .map(|f| (Alternative::Factor(f), fit::rounded_distance(a, f, false)))
        .collect();
    if a.rows == a.cols {
        candidates.push((Alternative::Transposed, fit::rounded_distance(a, 1.0, true)));
    }
    let (best, distance) = candidates.into_iter().min_by(|x, y| x.1.total_cmp(&y.1))?;
    (distance < 0.5 * exact && basic.ratio(distance) <= tolerance).then_some(best)
}

/// For a tensor several adapters change: the adapters left out of M, when merging only the
/// others explains M clearly better than the whole stack (compared after rounding, like
/// [`rounded_alternative`]). Stacks of up to 4 adapters (15 subsets).
fn stack_subset(
    job: &TensorJob,
    l: &Loaded,
    a: &TensorArrays<'_>,
    basic: &BasicFit,
    input: &Inputs<'_>,
) -> Result<Option<Vec<usize>>, MergeError> {
    let n = l.updates.len();
    if !(2..=4).contains(&n) || basic.nan + basic.inf > 0 {
        return Ok(None);
    }
    let rounded = |target: &[f64]| {
        fit::distance(
            a.m,
            target.iter().map(|v| a.format.round_from_f64(*v) as f64),
        )
    };
    let exact = rounded(a.wstar);
    if exact == 0.0 {
        return Ok(None);
    }
    let mut best: Option<(f64, Vec<usize>)> = None;
    // Proper, non-empty subsets (the empty one is "never merged", tested elsewhere).
    for mask in 1..(1u32 << n) - 1 {
        let kept: Vec<Update> = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| l.updates[i].clone())
            .collect();
        let target = delta::merge_exact(&l.w, job.rows, job.cols, &kept);
        let d = rounded(&target);
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            let missing: Vec<usize> = (0..n)
                .filter(|i| mask & (1 << i) == 0)
                .map(|i| match &job.sources[i] {
                    Source::LowRank { adapter, .. } | Source::Replace { adapter, .. } => *adapter,
                })
                .collect();
            best = Some((d, missing));
        }
    }
    Ok(best
        .filter(|(d, _)| *d < 0.5 * exact && basic.ratio(*d) <= input.tolerance)
        .map(|(_, missing)| missing))
}

/// "f = 0.5000 (least-squares ŝ/s 0.4712): rsLoRA adapter merged with plain α/r scaling (…)".
fn scale_explanation(
    factor: f64,
    least_squares: Option<f64>,
    matched: &[causes::ScaleMistake],
    rounded: bool,
) -> String {
    let measured = match (rounded, least_squares) {
        (true, Some(s)) if s.abs() < 0.9 * factor.abs() => format!(
            "M = round(W + f·ΔW) with f = {factor:.4} (least-squares ŝ/s {s:.4}, pulled toward 0 by rounding)"
        ),
        (true, Some(s)) => {
            format!("M = round(W + f·ΔW) with f = {factor:.4} (least-squares ŝ/s {s:.4})")
        }
        _ => format!("ŝ/s = {factor:.4}"),
    };
    if matched.is_empty() {
        format!("{measured}: no known scaling mistake gives this factor")
    } else {
        let names: Vec<&str> = matched.iter().map(|m| m.name.as_str()).collect();
        format!("{measured}: {}", names.join(", or "))
    }
}

/// ‖M − H(W)‖ / floor for a quantization hypothesis; None when it does not apply.
fn quant_ratio(
    h: QuantHypothesis,
    job: &TensorJob,
    l: &Loaded,
    basic: &BasicFit,
) -> Result<Option<f64>, MergeError> {
    let distance = if h.requantized {
        let star32: Vec<f32> = l.wstar.iter().map(|v| *v as f32).collect();
        let Some(q) = h.apply(job, &star32, FloatFormat::F32)? else {
            return Ok(None);
        };
        fit::distance(&l.m, q.iter().map(|v| *v as f64))
    } else {
        let Some(q) = h.apply(job, &l.w, l.format)? else {
            return Ok(None);
        };
        fit::distance(
            &l.m,
            q.iter()
                .zip(l.wstar.iter().zip(&l.w))
                .map(|(qv, (s, w))| *qv as f64 + (s - *w as f64)),
        )
    };
    Ok(Some(basic.ratio(distance)))
}

/// Finds the quantization hypothesis that explains the unexplained tensors: all hypotheses on a
/// few tensors, then the winner on the rest.
fn quant_search(
    results: &mut [JobResult],
    input: &Inputs<'_>,
) -> Result<Option<QuantHypothesis>, MergeError> {
    let unexplained: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.cause == Cause::Unexplained)
        .map(|(i, _)| i)
        .collect();
    if unexplained.is_empty() {
        return Ok(None);
    }
    const PROBES: usize = 3;
    let hypotheses = QuantHypothesis::all();
    let mut score: Vec<(f64, usize)> = vec![(0.0, 0); hypotheses.len()];
    for &i in unexplained.iter().take(PROBES) {
        let job = &input.plan.weights[results[i].index];
        let (Some(l), Some(basic)) = (load(job, input)?, results[i].basic) else {
            continue;
        };
        let ratios = hypotheses
            .par_iter()
            .map(|h| quant_ratio(*h, job, &l, &basic))
            .collect::<Result<Vec<_>, _>>()?;
        for (s, r) in score.iter_mut().zip(ratios) {
            if let Some(r) = r {
                s.0 += r.max(f64::MIN_POSITIVE).ln();
                s.1 += 1;
            }
        }
    }
    let Some((best, _)) = hypotheses
        .iter()
        .zip(&score)
        .filter(|(_, s)| s.1 > 0)
        .min_by(|a, b| (a.1.0 / a.1.1 as f64).total_cmp(&(b.1.0 / b.1.1 as f64)))
    else {
        return Ok(None);
    };
    let best = *best;
    let outcomes = unexplained
        .par_iter()
        .map(|&i| {
            let job = &input.plan.weights[results[i].index];
            let (Some(l), Some(basic)) = (load(job, input)?, results[i].basic) else {
                return Ok((i, None));
            };
            let plain = basic.ratio(basic.residual);
            let r = quant_ratio(best, job, &l, &basic)?;
            Ok((i, r.filter(|r| explained(*r, plain, input.tolerance))))
        })
        .collect::<Result<Vec<_>, MergeError>>()?;
    let mut any = false;
    for (i, r) in outcomes {
        if let Some(r) = r {
            any = true;
            let res = &mut results[i];
            res.cause = Cause::Quantized(best, r);
            res.fit.cause = Some(Code::QuantizedMergeBase.as_str());
            res.fit.explanation = Some(format!("{} ({r:.2}× the floor)", best.describe()));
        }
    }
    Ok(any.then_some(best))
}

/// ‖M − W‖ over a tensor the adapters do not change, and M's non-finite values there.
struct Untouched {
    name: String,
    ratio: f64,
    nan: usize,
    inf: usize,
    explained: bool,
}

fn compare_untouched(
    name: &str,
    input: &Inputs<'_>,
    hypothesis: Option<QuantHypothesis>,
) -> Result<Option<Untouched>, MergeError> {
    let (Some(bi), Some(mi)) = (input.base.info(name), input.merged.info(name)) else {
        return Ok(None);
    };
    let Some(format) = FloatFormat::of_dtype(&mi.dtype) else {
        return Ok(None);
    };
    if bi.shape != mi.shape || !bi.dtype.is_float() {
        return Ok(None);
    }
    // Streamed in chunks: the largest untouched tensor is usually the embedding matrix, and two
    // f32 copies of it would dominate the run's peak memory.
    let (bw, mw) = match (bi.dtype.bytes_per_element(), mi.dtype.bytes_per_element()) {
        (Some(b), Some(m)) => (b, m),
        _ => return Ok(None),
    };
    let (_, base_bytes) = input.base.raw(name)?;
    let (_, merged_bytes) = input.merged.raw(name)?;
    const CHUNK: usize = 1 << 20;
    let (mut d2, mut r2, mut w2, mut nan, mut inf) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    for (bc, mc) in base_bytes
        .chunks(CHUNK * bw)
        .zip(merged_bytes.chunks(CHUNK * mw))
    {
        let w = crate::io::checkpoint::decode_f32(bi, bc)?;
        let m = crate::io::checkpoint::decode_f32(mi, mc)?;
        for (&w, &m) in w.iter().zip(&m) {
            if m.is_nan() {
                nan += 1;
            } else if m.is_infinite() {
                inf += 1;
            }
            let d = m as f64 - w as f64;
            d2 += d * d;
            let r = format.round(w) as f64 - w as f64;
            if r.is_finite() {
                r2 += r * r;
            }
            w2 += w as f64 * w as f64;
        }
    }
    input.base.release_tensor(name);
    input.merged.release_tensor(name);
    let floor = fit::floor_of(r2.sqrt(), w2.sqrt(), format);
    let ratio = d2.sqrt() / floor;
    let mut explained_by_quant = false;
    if ratio > input.tolerance
        && let Some(h) = hypothesis
        && let [rows, cols] = bi.shape[..]
    {
        let w = input.base.read_f32(name)?;
        let m = input.merged.read_f32(name)?;
        let job = TensorJob {
            module: name.trim_end_matches(".weight").to_string(),
            tensor: name.to_string(),
            output: name.to_string(),
            rows,
            cols,
            sources: Vec::new(),
            growth: None,
        };
        // An untouched tensor has no update: both hypotheses reduce to dequant(q(W)) (a GGUF
        // round trip quantizes every linear layer, targeted or not).
        let load_dtype = if h.requantized {
            FloatFormat::F32
        } else {
            format
        };
        if let Some(q) = h.apply(&job, &w, load_dtype)? {
            let r = fit::distance(&m, q.iter().map(|v| *v as f64)) / floor;
            explained_by_quant = explained(r, ratio, input.tolerance);
        }
    }
    Ok(Some(Untouched {
        name: name.to_string(),
        ratio,
        nan,
        inf,
        explained: explained_by_quant,
    }))
}

/// Runs the whole analysis: per-tensor fits, quantization search, untouched tensors, inventory,
/// tied heads and config drift, and the findings they add up to.
pub fn analyze(input: &Inputs<'_>) -> anyhow::Result<(Forensics, Vec<Finding>)> {
    let merged_config = ModelConfig::read_dir(input.merged_dir)?;
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

    let mut results = input
        .plan
        .weights
        .par_iter()
        .enumerate()
        .map(|(i, job)| {
            let result = fit_job(i, job, input, head_tied_in_m);
            (input.tick)();
            result
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hypothesis = quant_search(&mut results, input)?;

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
        .map(|n| compare_untouched(n, input, hypothesis))
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
    let config_drift = drift::compare(&drift::Folders {
        merged: input.merged_dir,
        adapters: adapter_dirs,
        base: input.base_dir,
    });

    let dtype = merged_dtype(input.merged);
    let mut findings = findings_for(
        input,
        &results,
        &untouched_summary,
        &differing,
        &inventory,
        &config_drift,
        merged_ties && base_has_head,
    );
    for f in &mut findings {
        f.precision = Some(LABEL.to_string());
    }
    results.sort_by_key(|r| r.index);
    let forensics = Forensics {
        dtype: dtype.name().to_string(),
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
                summary.min_retention = Some(summary.min_retention.map_or(s, |r| r.min(s)));
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

/// `quantized-merge-base` by size: deny when the quantization error is at least
/// [`QUANTIZED_BASE_DENY`] of ‖ΔW‖. Merging onto the dequantized base the adapter trained against
/// (QLoRA, declared with --trained-on) is a legitimate choice: inform, do not fail.
fn quantized_base_level(size: f64, deny_at: f64, matches_training: bool) -> Level {
    if size >= deny_at && !matches_training {
        Level::Deny
    } else {
        Level::Warn
    }
}

/// The float format most of a checkpoint's weights are stored in.
pub fn merged_dtype(checkpoint: &Checkpoint) -> FloatFormat {
    let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
    for t in checkpoint.tensors() {
        if let Some(f) = FloatFormat::of_dtype(&t.dtype) {
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

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// "`a`, `b`, `c` and 4 more".
fn examples<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    let mut s = names
        .iter()
        .take(3)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 3 {
        s.push_str(&format!(" and {} more", names.len() - 3));
    }
    s
}

fn single_module(group: &[&JobResult]) -> Option<String> {
    match group {
        [one] => Some(one.fit.module.clone()),
        _ => None,
    }
}

fn findings_for(
    input: &Inputs<'_>,
    results: &[JobResult],
    untouched: &UntouchedSummary,
    differing: &[&Untouched],
    inventory: &Inventory,
    drift: &[ConfigDifference],
    ties_untied_base: bool,
) -> Vec<Finding> {
    let total = results.len();
    let mut out = Vec::new();
    let with = |cause: fn(&Cause) -> bool| -> Vec<&JobResult> {
        results.iter().filter(|r| cause(&r.cause)).collect()
    };

    let group = with(|c| *c == Cause::NotMerged);
    if !group.is_empty() {
        let all = group.len() == total;
        let scale = median(group.iter().filter_map(|r| r.fit.scale_ratio).collect());
        let mut f = Finding::new(
            Code::NotMerged,
            single_module(&group),
            format!(
                "M equals the base on {} of {total} adapter-changed tensors ({}){}",
                group.len(),
                examples(group.iter().map(|r| r.fit.module.as_str())),
                if all {
                    ": the merge never happened, or the adapter failed to load"
                } else {
                    ": those modules' updates were never merged"
                }
            ),
        );
        if let Some(s) = scale {
            f = f.observed(s, Some(1.0));
        }
        out.push(f);
    }

    let partial: Vec<&JobResult> = with(|c| matches!(c, Cause::StackPartial(_)));
    if !partial.is_empty() {
        let mut missing: Vec<usize> = partial
            .iter()
            .flat_map(|r| match &r.cause {
                Cause::StackPartial(m) => m.clone(),
                _ => Vec::new(),
            })
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let names: Vec<String> = missing
            .iter()
            .map(|i| format!("`{}`", input.adapters[*i].dir.display()))
            .collect();
        out.push(
            Finding::new(
                Code::NotMerged,
                single_module(&partial),
                format!(
                    "of the stacked adapters, {} {} not merged: M equals W plus the other adapters' \
                     updates on {} of {total} tensors ({})",
                    names.join(", "),
                    if names.len() == 1 { "was" } else { "were" },
                    partial.len(),
                    examples(partial.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .advice(
                "Merge every adapter of the stack, in order (e.g. load SFT, merge_and_unload, \
                 then load PPO on the result and merge again), or pass only the adapters M was \
                 meant to contain.",
            ),
        );
    }

    let group = with(|c| *c == Cause::ModulesToSaveDropped);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::ModulesToSaveDropped,
            single_module(&group),
            format!(
                "M holds the base's {} instead of the adapter's trained copy (modules_to_save)",
                examples(group.iter().map(|r| r.fit.tensor.as_str()))
            ),
        ));
    }

    // Scale mismatches: one finding when one known mistake explains every scaled tensor (the
    // usual case: a config field misread once), else one per mistake or unknown factor.
    let scaled: Vec<&JobResult> = results.iter().filter(|r| r.cause == Cause::Scale).collect();
    let kinds_of = |r: &JobResult| -> Vec<&'static str> {
        r.scale
            .as_ref()
            .map(|(_, m)| m.iter().map(|m| m.kind).collect())
            .unwrap_or_default()
    };
    let common: Vec<&'static str> = scaled
        .first()
        .map(|r| kinds_of(r))
        .unwrap_or_default()
        .into_iter()
        .filter(|k| scaled.iter().all(|r| kinds_of(r).contains(k)))
        .collect();
    let mut groups: BTreeMap<String, Vec<&JobResult>> = BTreeMap::new();
    for r in &scaled {
        let key = match (common.first(), kinds_of(r).first()) {
            (Some(k), _) | (None, Some(k)) => (*k).to_string(),
            (None, None) => format!(
                "unknown factor ×{:.3}",
                r.scale.as_ref().map_or(f64::NAN, |s| s.0)
            ),
        };
        groups.entry(key).or_default().push(r);
    }
    for (key, group) in groups {
        let factors: Vec<f64> = group
            .iter()
            .filter_map(|r| r.scale.as_ref().map(|s| s.0))
            .collect();
        let lo = factors.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = factors.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let factor = if (hi - lo).abs() <= 1e-3 * hi.abs().max(1e-12) {
            format!("ŝ/s = {lo:.4}")
        } else {
            format!("ŝ/s = {lo:.4} … {hi:.4}")
        };
        let cause = if key.starts_with("unknown factor") {
            "no known scaling mistake gives this factor".to_string()
        } else {
            let example = group.first().and_then(|r| {
                r.scale.as_ref().and_then(|(_, m)| {
                    m.iter()
                        .find(|m| m.kind == key)
                        .map(|m| format!(" — e.g. `{}`: {}", r.fit.module, m.name))
                })
            });
            let others: Vec<&str> = if common.len() > 1 {
                common[1..].iter().map(|k| causes::kind_title(k)).collect()
            } else {
                Vec::new()
            };
            format!(
                "the known mistake that gives {}: {}{}{}",
                if common.is_empty() {
                    "these factors"
                } else {
                    "every factor"
                },
                causes::kind_title(&key),
                example.unwrap_or_default(),
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" (equally consistent: {})", others.join("; "))
                }
            )
        };
        let mut f = Finding::new(
            Code::ScaleMismatch,
            single_module(&group),
            format!(
                "M's change is {factor} times the adapter's update on {} of {total} tensors ({}); {cause}",
                group.len(),
                examples(group.iter().map(|r| r.fit.module.as_str())),
            ),
        );
        if let Some(m) = median(factors) {
            f = f.observed(m, Some(1.0));
        }
        out.push(f);
    }

    let group = with(|c| *c == Cause::Transposed);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::TransposedDelta,
            single_module(&group),
            format!(
                "M's change on {} matches ΔWᵀ, not ΔW: the update went in transposed",
                examples(group.iter().map(|r| r.fit.module.as_str()))
            ),
        ));
    }

    let group = with(|c| *c == Cause::DoraDropped);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::DoraMagnitudeDropped,
            single_module(&group),
            format!(
                "M equals W + ΔW without DoRA's magnitude rescaling on {} of {total} tensors ({})",
                group.len(),
                examples(group.iter().map(|r| r.fit.module.as_str()))
            ),
        ));
    }

    let quantized: Vec<&JobResult> = with(|c| matches!(c, Cause::Quantized(..)));
    if let Some(Cause::Quantized(h, _)) = quantized.first().map(|r| &r.cause) {
        let (mut err2, mut delta2) = (0.0f64, 0.0f64);
        for r in &quantized {
            if let (Some(b), Some(ratio)) = (&r.basic, r.fit.residual_to_floor) {
                err2 += (ratio * b.floor).powi(2);
                delta2 += b.delta_norm.powi(2);
            }
        }
        let size = if delta2 > 0.0 {
            (err2 / delta2).sqrt()
        } else {
            f64::INFINITY
        };
        let matches_training =
            !h.requantized && input.trained_on == Some(Precision::Quant(h.format));
        let mut f = Finding::new(
            Code::QuantizedMergeBase,
            single_module(&quantized),
            format!(
                "{} of {total} adapter-changed tensors match {} (best of {} formats); the \
                 quantization error is {:.2}× ‖ΔW‖{}",
                quantized.len(),
                h.describe(),
                QuantFormat::FORENSIC_HYPOTHESES.len(),
                size,
                if matches_training {
                    format!(
                        " — the base --trained-on names, so the merge keeps the {} error the adapter trained with",
                        h.format.name()
                    )
                } else {
                    String::new()
                }
            ),
        )
        .observed(size, Some(input.quant_deny))
        .advice(if h.requantized {
            format!(
                "Do not round-trip the merged model through {}: keep the 16-bit merge as the \
                 checkpoint you ship, and quantize only in the runtime's own format when serving \
                 (compare the candidates with `check --precision {}`).",
                h.format.name(),
                h.format.name()
            )
        } else {
            format!(
                "Merge into the 16-bit base (PEFT merge_and_unload on a base loaded without \
                 quantization). If the adapter was trained on a {} base (QLoRA), run `check \
                 --trained-on {}` to see whether the 16-bit merge or this one serves it better.",
                h.format.name(),
                h.format.name()
            )
        });
        f.level = quantized_base_level(size, input.quant_deny, matches_training);
        if untouched.explained_by_quantization > 0 {
            f.message.push_str(&format!(
                "; {} untouched tensors are quantized the same way",
                untouched.explained_by_quantization
            ));
        }
        out.push(f);
    }

    // Another base: untouched tensors differ beyond rounding and no quantization explains them.
    let unexplained_targets: Vec<&JobResult> = with(|c| *c == Cause::Unexplained);
    let foreign: Vec<&&Untouched> = differing.iter().filter(|u| !u.explained).collect();
    if !foreign.is_empty() {
        let most =
            foreign.len() * 2 >= untouched.compared.max(1) || !unexplained_targets.is_empty();
        let mut f = Finding::new(
            Code::WrongBase,
            None,
            format!(
                "{} of {} tensors the adapter does not touch differ from the base by up to {:.3e}× \
                 their rounding floor ({}){}",
                foreign.len(),
                untouched.compared,
                foreign.iter().map(|u| u.ratio).fold(0.0, f64::max),
                examples(foreign.iter().map(|u| u.name.as_str())),
                if unexplained_targets.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", and {} of {total} adapter-changed tensors fit no known mistake",
                        unexplained_targets.len()
                    )
                }
            ),
        )
        .observed(foreign.len() as f64, None);
        if !most {
            f.level = Level::Warn;
            f.message
                .push_str(": M was partly built from other weights than this base");
        }
        out.push(f);
    } else if !unexplained_targets.is_empty() {
        let worst = unexplained_targets
            .iter()
            .filter_map(|r| r.fit.residual_to_floor)
            .fold(0.0, f64::max);
        out.push(
            Finding::new(
                Code::PrecisionDrift,
                single_module(&unexplained_targets),
                format!(
                    "M differs from the exact merge by up to {worst:.3e}× the rounding floor of its \
                     dtype on {} of {total} tensors ({}), and no known mistake (scale, transpose, \
                     DoRA, quantized base) explains it",
                    unexplained_targets.len(),
                    examples(unexplained_targets.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .observed(worst, Some(input.tolerance))
            .advice(
                "Re-merge in f32 with PEFT's merge_and_unload (or `lora-doctor merge`) and cast \
                 once; compare the tool's merge code with merge-semantics: ΔW = s·B·A in the base \
                 layout.",
            ),
        );
    }

    let tied = with(|c| *c == Cause::Tied);
    if !tied.is_empty() || ties_untied_base {
        out.push(Finding::new(
            Code::TiedEmbeddings,
            Some(
                tied.first()
                    .map_or_else(|| "lm_head".to_string(), |r| r.fit.module.clone()),
            ),
            "M's config ties the output head to the input embeddings (tie_word_embeddings), but \
             the merged head must differ from them: loaders will use the embeddings as the head"
                .to_string(),
        )
        .advice(
            "Set `tie_word_embeddings: false` in M's config.json and save `lm_head.weight` \
             explicitly (the adapter's trained head merged onto the base's), or use \
             `lora-doctor merge`, which unties the head when it must.",
        ));
    }

    if !inventory.is_clean() {
        let mut message = format!(
            "M's tensors differ from the base's: {}",
            inventory.describe().join("; ")
        );
        if inventory.looks_like_an_adapter() {
            message.push_str(
                " — M holds LoRA tensors: it is an adapter folder, not a merged model; pass the \
                 folder merge_and_unload().save_pretrained() wrote",
            );
        }
        if inventory.looks_bnb_quantized() {
            message.push_str(
                " — M looks like a bitsandbytes-quantized checkpoint; save a dequantized 16-bit copy to compare",
            );
        }
        out.push(Finding::new(Code::TensorInventory, None, message));
    }

    if inventory.nan + inventory.inf > 0 {
        out.push(
            Finding::new(
                Code::NonfiniteMerge,
                None,
                format!(
                    "M holds {} NaN and {} ±Inf values",
                    inventory.nan, inventory.inf
                ),
            )
            .observed((inventory.nan + inventory.inf) as f64, Some(0.0)),
        );
    }
    let overflow: Vec<&JobResult> = results
        .iter()
        .filter(|r| r.basic.is_some_and(|b| b.out_of_range > 0))
        .collect();
    if !overflow.is_empty() {
        let n: usize = overflow
            .iter()
            .filter_map(|r| r.basic.map(|b| b.out_of_range))
            .sum();
        out.push(
            Finding::new(
                Code::Overflow,
                single_module(&overflow),
                format!(
                    "{n} merged values exceed the largest finite value of M's dtype ({})",
                    examples(overflow.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .observed(n as f64, Some(0.0)),
        );
    }

    // Without a loadable config.json no runtime (transformers, vLLM, TGI) opens the folder: that
    // is not drift in a setting but an undeployable checkpoint.
    let (unloadable, drift): (Vec<&ConfigDifference>, Vec<&ConfigDifference>) = drift
        .iter()
        .partition(|d| d.file == "config.json" && d.key == drift::FILE_KEY);
    for d in unloadable {
        let mut finding = Finding::new(
            Code::ConfigDrift,
            None,
            format!(
                "M's config.json is {}: transformers, vLLM and TGI cannot load this folder",
                if d.found == "(absent)" {
                    "missing".to_string()
                } else {
                    d.found.trim_matches(|c| c == '(' || c == ')').to_string()
                }
            ),
        )
        .advice(
            "Write the merge with `save_pretrained` (or `lora-doctor merge`), which saves config.json \
             next to the weights; or copy the base's config.json and set its dtype to M's",
        );
        finding.level = Level::Deny;
        out.push(finding);
    }
    if !drift.is_empty() {
        let list = drift
            .iter()
            .map(|d| format!("{} {}: {} → {}", d.file, d.key, d.expected, d.found))
            .collect::<Vec<_>>();
        out.push(Finding::new(
            Code::ConfigDrift,
            None,
            format!(
                "{} generation-relevant setting(s) of M differ from the adapter's / base's folder: {}",
                list.len(),
                list.join("; ")
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_base_is_deny_by_size_unless_it_is_the_declared_training_base() {
        let deny_at = QUANTIZED_BASE_DENY;
        assert_eq!(quantized_base_level(14.6, deny_at, false), Level::Deny);
        assert_eq!(quantized_base_level(0.5, deny_at, false), Level::Deny);
        assert_eq!(quantized_base_level(0.45, deny_at, false), Level::Warn);
        assert_eq!(quantized_base_level(14.6, deny_at, true), Level::Warn);
        assert_eq!(quantized_base_level(14.6, 20.0, false), Level::Warn);
    }

    #[test]
    fn every_quantized_format_is_a_hypothesis_both_ways_and_bnb_on_both_backends() {
        let all = QuantHypothesis::all();
        assert_eq!(all.len(), 6 * 2 + 2 * 2);
        for f in QuantFormat::FORENSIC_HYPOTHESES {
            for requantized in [false, true] {
                assert!(
                    all.iter()
                        .any(|h| h.format == f && h.requantized == requantized && !h.cpu)
                );
            }
        }
        assert!(
            all.iter()
                .all(|h| !h.cpu || matches!(h.format, QuantFormat::Nf4 | QuantFormat::Fp4))
        );
    }

    /// A bf16 tensor whose update is only a few rounding floors (SmolLM2's r=16 adapter: 1.7–10):
    /// every hypothesis sits within the tolerance of M, and only the comparison after rounding
    /// tells them apart.
    #[test]
    fn small_updates_are_told_apart_after_rounding() {
        let n = 64;
        let w: Vec<f32> = (0..n * n)
            .map(|i| FloatFormat::Bf16.round(((i as f32 * 0.618).sin()) * 0.05))
            .collect();
        let wstar: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 + 4e-4 * ((i as f64 * 1.3).cos() + 0.2))
            .collect();
        let round_to = |f: f64| -> Vec<f32> {
            w.iter()
                .zip(&wstar)
                .map(|(&w, &s)| FloatFormat::Bf16.round_from_f64(w as f64 + f * (s - w as f64)))
                .collect()
        };
        let half = causes::ScaleMistake {
            factor: 0.5,
            kind: "alpha-ignored",
            name: "alpha ignored".into(),
        };
        let judge = |m: &[f32]| {
            let a = TensorArrays {
                w: &w,
                m,
                wstar: &wstar,
                rows: n,
                cols: n,
                format: FloatFormat::Bf16,
            };
            let basic = fit::measure(&a);
            (
                basic.ratio(basic.residual),
                rounded_alternative(&a, &basic, std::slice::from_ref(&half), TOLERANCE),
            )
        };
        let (ratio, alternative) = judge(&round_to(0.5));
        assert!(
            ratio <= TOLERANCE,
            "the plain test alone would call it faithful: {ratio}"
        );
        assert_eq!(alternative, Some(Alternative::Factor(0.5)));
        assert_eq!(judge(&round_to(0.0)).1, Some(Alternative::Factor(0.0)));
        assert_eq!(judge(&round_to(1.0)).1, None);
    }

    #[test]
    fn a_hypothesis_explains_a_tensor_near_the_floor_or_when_it_removes_most_of_the_residual() {
        assert!(explained(3.9, 5.0, TOLERANCE));
        assert!(explained(12.0, 60.0, TOLERANCE));
        assert!(!explained(13.0, 60.0, TOLERANCE));
        assert!(!explained(4.1, 5.0, TOLERANCE));
        assert!(explained(4.1, 5.0, 8.0));
    }
}
