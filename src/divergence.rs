//! Output-level closeness of a candidate to the reference, modeled on llama.cpp's
//! `--kl-divergence` report (user-pain.md §B1): per-token KL(reference ‖ candidate) in nats,
//! same-top-1, Δp of the reference's argmax token, and perplexity ratio — all in f64 — plus the
//! summaries with their uncertainties.
//!
//! Percentiles interpolate linearly at fraction·(n−1) on sorted values; standard errors use
//! n−1 as llama.cpp does.

use rayon::prelude::*;
use serde::Serialize;

use crate::exp;

/// Per-token scores of one candidate against the reference.
#[derive(Debug, Clone, Default)]
pub struct TokenScores {
    /// KL(reference ‖ candidate) at every scored position.
    pub kl: Vec<f64>,
    /// Whether the candidate's argmax equals the reference's.
    pub same_top1: Vec<bool>,
    /// p_candidate(t*) − p_reference(t*) with t* the reference's argmax.
    pub dp: Vec<f64>,
    /// Negative log-likelihood of the actual next token under the candidate / reference
    /// (positions that have a next token).
    pub nll: Vec<f64>,
    pub nll_reference: Vec<f64>,
}

/// Values per slice of exponentials ([`exp::exp_f64_in_place`]): a stack buffer, summed in
/// order right after.
const EXP_CHUNK: usize = 256;

/// The log normalizer `log Σ exp(z)` of one row in f64, shifted by the largest finite value.
fn log_normalizer(row: &[f32]) -> f64 {
    let max = row
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut buf = [0f64; EXP_CHUNK];
    let mut sum = 0.0f64;
    for chunk in row.chunks(EXP_CHUNK) {
        let e = &mut buf[..chunk.len()];
        for (e, v) in e.iter_mut().zip(chunk) {
            *e = *v as f64 - max;
        }
        exp::exp_f64_in_place(e);
        sum = e.iter().fold(sum, |s, e| s + e);
    }
    max + sum.ln()
}

/// The reference's logits `[positions, vocab]` with every row's log normalizer, computed once and
/// shared by every candidate scored against it.
pub struct ReferenceRows<'a> {
    logits: &'a [f32],
    vocab: usize,
    log_z: Vec<f64>,
}

impl<'a> ReferenceRows<'a> {
    pub fn new(logits: &'a [f32], vocab: usize) -> Self {
        let log_z = logits
            .par_chunks_exact(vocab.max(1))
            .map(log_normalizer)
            .collect();
        ReferenceRows {
            logits,
            vocab,
            log_z,
        }
    }
}

/// One position's scores.
struct RowScore {
    kl: f64,
    same_top1: bool,
    dp: f64,
    /// (candidate, reference) NLL of the next token, when there is one inside the vocabulary.
    nll: Option<(f64, f64)>,
}

/// Scores one row in a single pass over the vocabulary (one exp per logit for the candidate's
/// normalizer, one for p_ref), with the reference's normalizer given. Every term is the one the
/// straightforward version computes (two f64 log-softmax vectors, then Σ p·(a − b) in order, the
/// argmaxes first-maximum-wins on those vectors), so the results are the same bit for bit
/// (`fused_scores_equal_the_two_log_softmax_version`).
fn score_row(r: &[f32], log_z_r: f64, c: &[f32], next: Option<u32>) -> RowScore {
    let log_z_c = log_normalizer(c);
    let mut kl = 0.0f64;
    let (mut top_r, mut best_r) = (0, f64::NAN);
    let (mut top_c, mut best_c) = (0, f64::NAN);
    let mut p_buf = [0f64; EXP_CHUNK];
    for (start, (r, c)) in r
        .chunks(EXP_CHUNK)
        .zip(c.chunks(EXP_CHUNK))
        .enumerate()
        .map(|(k, rc)| (k * EXP_CHUNK, rc))
    {
        let p_chunk = &mut p_buf[..r.len()];
        for (p, rv) in p_chunk.iter_mut().zip(r) {
            *p = *rv as f64 - log_z_r;
        }
        exp::exp_f64_in_place(p_chunk);
        for (j, ((rv, cv), p)) in r.iter().zip(c).zip(p_chunk.iter()).enumerate() {
            let i = start + j;
            let a = *rv as f64 - log_z_r;
            let b = *cv as f64 - log_z_c;
            kl += if *p > 0.0 { p * (a - b) } else { 0.0 };
            if i == 0 || a > best_r {
                (top_r, best_r) = (i, a);
            }
            if i == 0 || b > best_c {
                (top_c, best_c) = (i, b);
            }
        }
    }
    let lr = |i: usize| r[i] as f64 - log_z_r;
    let lc = |i: usize| c[i] as f64 - log_z_c;
    RowScore {
        kl: if kl.is_nan() {
            f64::INFINITY
        } else {
            kl.max(0.0)
        },
        same_top1: top_r == top_c,
        dp: exp::exp_f64(lc(top_r)) - exp::exp_f64(lr(top_r)),
        nll: next
            .map(|t| t as usize)
            .filter(|t| *t < r.len())
            .map(|t| (-lc(t), -lr(t))),
    }
}

impl TokenScores {
    /// Scores `[positions, vocab]` logits; `next[i]` is the token that follows position i (if any).
    pub fn push_sequence(
        &mut self,
        reference: &[f32],
        candidate: &[f32],
        vocab: usize,
        next: &[Option<u32>],
    ) {
        self.push_rows(&ReferenceRows::new(reference, vocab), 0, candidate, next);
    }

    /// Scores a candidate's logits for the positions `first..` (`[rows, vocab]`, so a candidate
    /// can be scored a chunk of positions at a time, in order) against the reference's same rows,
    /// rows in parallel on rayon's pool; `next[i]` is the token that follows position i (if any).
    pub fn push_rows(
        &mut self,
        reference: &ReferenceRows<'_>,
        first: usize,
        candidate: &[f32],
        next: &[Option<u32>],
    ) {
        let vocab = reference.vocab.max(1);
        let rows: Vec<RowScore> = reference.logits[(first * vocab).min(reference.logits.len())..]
            .par_chunks_exact(vocab)
            .zip(candidate.par_chunks_exact(vocab))
            .zip(&reference.log_z[first.min(reference.log_z.len())..])
            .enumerate()
            .map(|(i, ((r, c), log_z_r))| {
                score_row(r, *log_z_r, c, next.get(first + i).copied().flatten())
            })
            .collect();
        for row in rows {
            self.kl.push(row.kl);
            self.same_top1.push(row.same_top1);
            self.dp.push(row.dp);
            if let Some((candidate, reference)) = row.nll {
                self.nll.push(candidate);
                self.nll_reference.push(reference);
            }
        }
    }
}

/// Linear-interpolated percentile of sorted values at `fraction` ∈ [0, 1].
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = fraction.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    (mean, (var / (n - 1) as f64).sqrt())
}

/// The `precisions[].logits` section.
#[derive(Debug, Clone, Serialize)]
pub struct LogitStats {
    pub tokens: usize,
    pub mean_kl: f64,
    pub mean_kl_stderr: f64,
    pub median_kl: f64,
    pub p90_kl: f64,
    pub p99_kl: f64,
    pub p999_kl: f64,
    pub max_kl: f64,
    pub same_top1: f64,
    pub same_top1_stderr: f64,
    pub mean_dp: f64,
    pub rms_dp: f64,
    pub p01_dp: f64,
    pub p99_dp: f64,
    pub ppl_ratio: f64,
    /// mean KL(ref‖candidate) / mean KL(ref‖base): the share of the fine-tune's effect lost.
    pub effect_lost: Option<f64>,
    /// Relative L2 distance of the residual stream to the reference's after each block.
    pub drift_by_layer: Vec<f64>,
    /// Mixture-of-experts models: per sparse block, how the model's router choices compare with the
    /// reference's (empty for dense models).
    pub routing_by_layer: Vec<RoutingLayer>,
}

/// One sparse block's routing against the reference's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingLayer {
    /// Decoder block index.
    pub layer: usize,
    /// Tokens routed in the block.
    pub tokens: usize,
    /// Share of tokens whose selected expert set differs from the reference's.
    pub flip_rate: f64,
    /// The reference's smallest gap between the k-th and (k+1)-th router probability: how close
    /// its choices are to a tie (rounding alone flips a token whose gap is tiny).
    pub min_margin: f64,
    /// The reference's mean gap between the k-th and (k+1)-th router probability.
    pub mean_margin: f64,
}

impl RoutingLayer {
    /// The worst block by flip rate, if any block is sparse.
    pub fn worst(layers: &[RoutingLayer]) -> Option<&RoutingLayer> {
        layers
            .iter()
            .max_by(|a, b| a.flip_rate.total_cmp(&b.flip_rate))
    }
}

impl LogitStats {
    /// Summarises token scores. `adapter_mean_kl` is mean KL(ref‖base), for `effect_lost`.
    pub fn summarize(
        scores: &TokenScores,
        adapter_mean_kl: Option<f64>,
        drift_by_layer: Vec<f64>,
    ) -> Self {
        let n = scores.kl.len();
        let mut sorted = scores.kl.clone();
        sorted.sort_by(f64::total_cmp);
        let (mean_kl, mean_kl_stderr) = mean_and_stderr(&scores.kl);
        let same = scores.same_top1.iter().filter(|s| **s).count() as f64 / n.max(1) as f64;
        let same_err = if n > 1 {
            (same * (1.0 - same) / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        let mut dp_sorted = scores.dp.clone();
        dp_sorted.sort_by(f64::total_cmp);
        let mean_dp = scores.dp.iter().sum::<f64>() / n.max(1) as f64;
        let rms_dp = (scores.dp.iter().map(|d| d * d).sum::<f64>() / n.max(1) as f64).sqrt();
        let nll_c = scores.nll.iter().sum::<f64>() / scores.nll.len().max(1) as f64;
        let nll_r =
            scores.nll_reference.iter().sum::<f64>() / scores.nll_reference.len().max(1) as f64;
        LogitStats {
            tokens: n,
            mean_kl,
            mean_kl_stderr,
            median_kl: percentile(&sorted, 0.5),
            p90_kl: percentile(&sorted, 0.9),
            p99_kl: percentile(&sorted, 0.99),
            p999_kl: percentile(&sorted, 0.999),
            max_kl: sorted.last().copied().unwrap_or(f64::NAN),
            same_top1: same,
            same_top1_stderr: same_err,
            mean_dp,
            rms_dp,
            p01_dp: percentile(&dp_sorted, 0.01),
            p99_dp: percentile(&dp_sorted, 0.99),
            ppl_ratio: (nll_c - nll_r).exp(),
            effect_lost: adapter_mean_kl.filter(|k| *k > 0.0).map(|k| mean_kl / k),
            drift_by_layer,
            routing_by_layer: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_have_zero_kl_and_full_agreement() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, 0.1, -1.0];
        let mut s = TokenScores::default();
        s.push_sequence(&logits, &logits, 3, &[Some(2), None]);
        let stats = LogitStats::summarize(&s, Some(0.5), vec![]);
        assert_eq!(stats.tokens, 2);
        assert!(stats.mean_kl.abs() < 1e-15);
        assert_eq!(stats.same_top1, 1.0);
        assert!((stats.ppl_ratio - 1.0).abs() < 1e-12);
        assert_eq!(stats.effect_lost, Some(stats.mean_kl / 0.5));
    }

    #[test]
    fn kl_matches_a_hand_computed_value() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]; q = [0.5, 0.5].
        let r = [0.0f32, 3f32.ln()];
        let c = [0.0f32, 0.0];
        let mut s = TokenScores::default();
        s.push_sequence(&r, &c, 2, &[None]);
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((s.kl[0] - want).abs() < 1e-7, "{} vs {want}", s.kl[0]);
        assert!((s.dp[0] - (0.5 - 0.75)).abs() < 1e-7);
    }

    /// The scoring before it was fused: two f64 log-softmax vectors per row.
    fn two_log_softmax_version(
        reference: &[f32],
        candidate: &[f32],
        vocab: usize,
        next: &[Option<u32>],
    ) -> TokenScores {
        fn log_softmax(row: &[f32]) -> Vec<f64> {
            let log_z = log_normalizer(row);
            row.iter().map(|v| *v as f64 - log_z).collect()
        }
        fn argmax(row: &[f64]) -> usize {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best
        }
        let mut s = TokenScores::default();
        for (i, (r, c)) in reference
            .chunks_exact(vocab)
            .zip(candidate.chunks_exact(vocab))
            .enumerate()
        {
            let lr = log_softmax(r);
            let lc = log_softmax(c);
            let kl: f64 = lr
                .iter()
                .zip(&lc)
                .map(|(a, b)| {
                    let p = exp::exp_f64(*a);
                    if p > 0.0 { p * (a - b) } else { 0.0 }
                })
                .sum();
            let (top_r, top_c) = (argmax(&lr), argmax(&lc));
            s.kl.push(if kl.is_nan() {
                f64::INFINITY
            } else {
                kl.max(0.0)
            });
            s.same_top1.push(top_r == top_c);
            s.dp.push(exp::exp_f64(lc[top_r]) - exp::exp_f64(lr[top_r]));
            if let Some(Some(t)) = next.get(i) {
                let t = *t as usize;
                if t < vocab {
                    s.nll.push(-lc[t]);
                    s.nll_reference.push(-lr[t]);
                }
            }
        }
        s
    }

    /// The fused, row-parallel scoring gives exactly the two-log-softmax version's numbers, on
    /// random rows with ties, a NaN, infinities and near-identical candidates.
    #[test]
    fn fused_scores_equal_the_two_log_softmax_version() {
        let vocab = 97;
        let positions = 40;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let reference: Vec<f32> = (0..vocab * positions)
            .map(|_| (uniform() * 20.0 - 10.0) as f32)
            .collect();
        let mut candidate: Vec<f32> = reference
            .iter()
            .map(|v| v + (uniform() * 0.02 - 0.01) as f32)
            .collect();
        candidate[5] = f32::NAN;
        candidate[vocab + 3] = f32::INFINITY;
        candidate[2 * vocab + 1] = f32::NEG_INFINITY;
        candidate[3 * vocab..4 * vocab].copy_from_slice(&reference[3 * vocab..4 * vocab]);
        candidate[4 * vocab..5 * vocab].fill(1.0);
        let next: Vec<Option<u32>> = (0..positions)
            .map(|i| match i % 4 {
                0 => None,
                1 => Some(vocab as u32 + 3),
                _ => Some((i * 7 % vocab) as u32),
            })
            .collect();
        let want = two_log_softmax_version(&reference, &candidate, vocab, &next);
        let mut got = TokenScores::default();
        got.push_sequence(&reference, &candidate, vocab, &next);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.kl), bits(&want.kl));
        assert_eq!(got.same_top1, want.same_top1);
        assert_eq!(bits(&got.dp), bits(&want.dp));
        assert_eq!(bits(&got.nll), bits(&want.nll));
        assert_eq!(bits(&got.nll_reference), bits(&want.nll_reference));
        assert_eq!(got.kl.len(), positions);
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
