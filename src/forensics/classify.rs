//! The per-tensor classifier of `check --merged`: loads W, M and the exact merge W* of one
//! adapter-changed tensor once, fits M's change to the adapter's update, and names the cause
//! (faithful, never merged, wrong scale, transposed, DoRA magnitude dropped, part of a stack, …).
//! A tensor no cause explains is handed to [`super::quantized_base`] with its arrays still loaded.

use crate::findings::Code;
use crate::merge::delta::{self, Update};
use crate::merge::engine::{self, MergeError, Source, TensorJob};

use super::fit::{self, BasicFit, StoredFormat, TensorArrays, explained};
use super::hypothesis::QuantHypothesis;
use super::{Inputs, ModuleFit, causes, inventory};

/// Why one adapter-changed tensor of M is what it is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cause {
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
    pub(super) fn code(&self) -> Option<Code> {
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
pub(super) struct JobResult {
    pub(super) index: usize,
    pub(super) fit: ModuleFit,
    pub(super) basic: Option<BasicFit>,
    pub(super) cause: Cause,
    /// For `Cause::Scale`: the factor that explains M and the known mistakes that give it.
    pub(super) scale: Option<(f64, Vec<causes::ScaleMistake>)>,
}

/// The three arrays a tensor's hypotheses are tested on, read and computed once per tensor.
pub(super) struct Loaded {
    pub(super) w: Vec<f32>,
    pub(super) m: Vec<f32>,
    pub(super) wstar: Vec<f64>,
    pub(super) updates: Vec<Update>,
    pub(super) format: StoredFormat,
}

pub(super) fn kind(job: &TensorJob) -> &'static str {
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

/// Reads W, M and the exact merge of one job; None when M cannot be compared element-wise.
fn load(job: &TensorJob, input: &Inputs<'_>) -> Result<Option<Loaded>, MergeError> {
    let Some(info) = input.merged.info(&job.output) else {
        return Ok(None);
    };
    let Some(format) = StoredFormat::of(info, input.merged.ggml_type(&job.output)) else {
        return Ok(None);
    };
    // Another shape (even with the same element count, e.g. stored transposed) is an inventory
    // finding, not something to fit element by element.
    let planned = input
        .base
        .info(&job.tensor)
        .map_or_else(|| vec![job.rows, job.cols], |t| job.shape_over(&t.shape));
    if info.shape != planned {
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

/// Classifies one tensor. A tensor left [`Cause::Unexplained`] comes back with its loaded arrays,
/// so the quantized-base search can test its hypotheses without reading and merging it again.
pub(super) fn fit_job(
    index: usize,
    job: &TensorJob,
    input: &Inputs<'_>,
    head_tied_in_m: bool,
) -> Result<(JobResult, Option<Loaded>), MergeError> {
    if head_tied_in_m && inventory::is_head(&job.output) {
        let why = "M ties the head to the embeddings, so this trained head is not what loaders use";
        let result = JobResult {
            index,
            fit: empty_fit(job, Some(Code::TiedEmbeddings.as_str()), Some(why.into())),
            basic: None,
            cause: Cause::Tied,
            scale: None,
        };
        return Ok((result, None));
    }
    let Some(l) = load(job, input)? else {
        let result = JobResult {
            index,
            fit: empty_fit(
                job,
                None,
                Some("not compared: see the tensor inventory".into()),
            ),
            basic: None,
            cause: Cause::Skipped,
            scale: None,
        };
        return Ok((result, None));
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
    let keep = (cause == Cause::Unexplained).then_some(l);
    let result = JobResult {
        index,
        fit,
        basic: Some(basic),
        cause,
        scale,
    };
    Ok((result, keep))
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
pub(super) enum Alternative {
    /// M = round(W + f·ΔW): 0 = never merged, else a known mistake's factor.
    Factor(f64),
    Transposed,
}

/// Compares the exact merge with "never merged", every known mistake's factor and ΔWᵀ after
/// rounding to M's dtype. An alternative wins when it is within the tolerance of M and less than
/// half as far from M as the exact merge — so a correct merge, which after rounding matches
/// round(W*) almost element for element, never loses to one.
pub(super) fn rounded_alternative(
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
    let rounded =
        |target: &[f64]| fit::stored_distance(a.m, a.format, target.iter().copied(), a.cols);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::TOLERANCE;
    use crate::merge::float::FloatFormat;

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
                format: StoredFormat::Float(FloatFormat::Bf16),
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
