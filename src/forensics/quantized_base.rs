//! The quantized-base hypotheses of `check --merged`: a merged tensor no scale or layout mistake
//! explains may have been merged onto a dequantized copy of the base (Unsloth / QLoRA style) or
//! re-quantized after merging. Every format lora-doctor quantizes to is tried both ways on a few
//! probe tensors; the best one is then tested on every other unexplained tensor while it is still
//! loaded (see [`QuantSearch`]).

use rayon::prelude::*;

use crate::findings::{Code, Level};
use crate::merge::engine::{MergeError, TensorJob};
use crate::merge::float::FloatFormat;

use super::classify::{Cause, JobResult, Loaded};
use super::fit::{self, BasicFit, explained};
use super::hypothesis::QuantHypothesis;

/// Unexplained tensors on which every hypothesis is scored before one is chosen.
const PROBES: usize = 3;

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
        let Some(q) = h.apply(job, &l.w, l.format.load_dtype())? else {
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

/// The search over hypotheses, fed tensor by tensor in plan order so that no more than
/// [`PROBES`] loaded tensors wait for the decision: the first `PROBES` unexplained tensors are
/// kept as probes, every hypothesis is scored on them (mean log of ‖M − H(W)‖ / floor), and the
/// winner is then tested on each later unexplained tensor right after it was classified.
#[derive(Default)]
pub(super) struct QuantSearch {
    probes: Vec<(usize, Loaded)>,
    /// `None` until decided; `Some(None)` when no hypothesis applies to any probe.
    decided: Option<Option<QuantHypothesis>>,
    /// Whether the winner explained at least one tensor.
    explained_any: bool,
}

impl QuantSearch {
    /// The decision so far: `None` while probes are still being collected.
    pub(super) fn decided(&self) -> Option<Option<QuantHypothesis>> {
        self.decided
    }

    /// Takes an unexplained tensor (at `position` in `results`) classified before the decision.
    pub(super) fn offer(
        &mut self,
        position: usize,
        loaded: Loaded,
        results: &mut [JobResult],
        jobs: &[TensorJob],
        tolerance: f64,
    ) -> Result<(), MergeError> {
        match self.decided {
            Some(Some(h)) => {
                let job = &jobs[results[position].index];
                self.explained_any |= test(h, job, &mut results[position], &loaded, tolerance)?;
            }
            Some(None) => {}
            None => {
                self.probes.push((position, loaded));
                if self.probes.len() == PROBES {
                    self.decide(results, jobs, tolerance)?;
                }
            }
        }
        Ok(())
    }

    /// Records that a tensor classified in parallel after the decision was explained.
    pub(super) fn note_explained(&mut self, explained: bool) {
        self.explained_any |= explained;
    }

    /// Decides on the probes collected so far (fewer than [`PROBES`] when the model has fewer
    /// unexplained tensors) and returns the hypothesis that explained at least one tensor.
    pub(super) fn finish(
        mut self,
        results: &mut [JobResult],
        jobs: &[TensorJob],
        tolerance: f64,
    ) -> Result<Option<QuantHypothesis>, MergeError> {
        if self.decided.is_none() && !self.probes.is_empty() {
            self.decide(results, jobs, tolerance)?;
        }
        Ok(self.decided.flatten().filter(|_| self.explained_any))
    }

    fn decide(
        &mut self,
        results: &mut [JobResult],
        jobs: &[TensorJob],
        tolerance: f64,
    ) -> Result<(), MergeError> {
        let hypotheses = QuantHypothesis::all();
        let mut score: Vec<(f64, usize)> = vec![(0.0, 0); hypotheses.len()];
        for (position, l) in &self.probes {
            let result = &results[*position];
            let (job, Some(basic)) = (&jobs[result.index], result.basic) else {
                continue;
            };
            let ratios = hypotheses
                .par_iter()
                .map(|h| quant_ratio(*h, job, l, &basic))
                .collect::<Result<Vec<_>, _>>()?;
            for (s, r) in score.iter_mut().zip(ratios) {
                if let Some(r) = r {
                    s.0 += r.max(f64::MIN_POSITIVE).ln();
                    s.1 += 1;
                }
            }
        }
        let winner = hypotheses
            .iter()
            .zip(&score)
            .filter(|(_, s)| s.1 > 0)
            .min_by(|a, b| (a.1.0 / a.1.1 as f64).total_cmp(&(b.1.0 / b.1.1 as f64)))
            .map(|(h, _)| *h);
        self.decided = Some(winner);
        let probes = std::mem::take(&mut self.probes);
        if let Some(h) = winner {
            for (position, l) in probes {
                let job = &jobs[results[position].index];
                self.explained_any |= test(h, job, &mut results[position], &l, tolerance)?;
            }
        }
        Ok(())
    }
}

/// Tests hypothesis `h` on one unexplained tensor; when it explains M, records it as the cause.
pub(super) fn test(
    h: QuantHypothesis,
    job: &TensorJob,
    result: &mut JobResult,
    l: &Loaded,
    tolerance: f64,
) -> Result<bool, MergeError> {
    let Some(basic) = result.basic else {
        return Ok(false);
    };
    let plain = basic.ratio(basic.residual);
    let Some(r) = quant_ratio(h, job, l, &basic)?.filter(|r| explained(*r, plain, tolerance))
    else {
        return Ok(false);
    };
    result.cause = Cause::Quantized(h, r);
    result.fit.cause = Some(Code::QuantizedMergeBase.as_str());
    result.fit.explanation = Some(format!("{} ({r:.2}× the floor)", h.describe()));
    Ok(true)
}

/// `quantized-merge-base` by size: deny when the quantization error is at least
/// [`QUANTIZED_BASE_DENY`] of ‖ΔW‖. Merging onto the dequantized base the adapter trained against
/// (QLoRA, declared with --trained-on) is a legitimate choice: inform, do not fail.
pub(super) fn quantized_base_level(size: f64, deny_at: f64, matches_training: bool) -> Level {
    if size >= deny_at && !matches_training {
        Level::Deny
    } else {
        Level::Warn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::QUANTIZED_BASE_DENY;

    #[test]
    fn quantized_base_is_deny_by_size_unless_it_is_the_declared_training_base() {
        let deny_at = QUANTIZED_BASE_DENY;
        assert_eq!(quantized_base_level(14.6, deny_at, false), Level::Deny);
        assert_eq!(quantized_base_level(0.5, deny_at, false), Level::Deny);
        assert_eq!(quantized_base_level(0.45, deny_at, false), Level::Warn);
        assert_eq!(quantized_base_level(14.6, deny_at, true), Level::Warn);
        assert_eq!(quantized_base_level(14.6, 20.0, false), Level::Warn);
    }
}
