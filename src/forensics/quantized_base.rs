//! The quantized-base hypotheses of `check --merged`: a merged tensor no scale or layout mistake
//! explains may have been merged onto a dequantized copy of the base (Unsloth / QLoRA style) or
//! re-quantized after merging. Every format lora-doctor quantizes to is tried both ways on a few
//! probe tensors; the best one is then tested on every other unexplained tensor while it is still
//! loaded (see [`QuantSearch`]).

use rayon::prelude::*;

use crate::findings::{Code, Level};
use crate::merge::engine::{self, MergeError, TensorJob};
use crate::merge::float::FloatFormat;
use crate::merge::quant::{
    BNB_4BIT_BLOCKSIZE, Bnb4bitType, BnbBackend, QuantFormat, dequantize_4bit, quantize_4bit,
};

use super::classify::{Cause, JobResult, Loaded, explained};
use super::fit::{self, BasicFit};

/// Unexplained tensors on which every hypothesis is scored before one is chosen.
const PROBES: usize = 3;

/// A way a merged tensor can have come about from a quantized copy of W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QuantHypothesis {
    pub(super) format: QuantFormat,
    /// false: M = dequant(q(W)) + ΔW (merged onto the dequantized base, Unsloth/QLoRA style);
    /// true: M = dequant(q(W + ΔW)) (the merge re-quantized and stored as floats).
    pub(super) requantized: bool,
    /// NF4/FP4 only: bitsandbytes' CPU quantizer instead of the CUDA kernel (they differ on
    /// ties and a few thresholds, see `BnbBackend`).
    pub(super) cpu: bool,
}

impl QuantHypothesis {
    pub(super) fn all() -> Vec<QuantHypothesis> {
        let mut out = Vec::new();
        for &format in &QuantFormat::ALL {
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

    pub(super) fn describe(self) -> String {
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
    pub(super) fn apply(
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

    #[test]
    fn every_quantized_format_is_a_hypothesis_both_ways_and_bnb_on_both_backends() {
        let all = QuantHypothesis::all();
        assert_eq!(all.len(), 6 * 2 + 2 * 2);
        for f in QuantFormat::ALL {
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
}
