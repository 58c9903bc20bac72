//! Output-level closeness of a candidate to the reference, modeled on llama.cpp's
//! `--kl-divergence` report (user-pain.md §B1): per-token KL(reference ‖ candidate) in nats,
//! same-top-1, Δp of the reference's argmax token, and perplexity ratio — all in f64 — plus the
//! summaries with their uncertainties.
//!
//! Percentiles interpolate linearly at fraction·(n−1) on sorted values; standard errors use
//! n−1 as llama.cpp does.

use serde::Serialize;

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

/// log-softmax of one row in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|v| (*v as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
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

impl TokenScores {
    /// Scores `[positions, vocab]` logits; `next[i]` is the token that follows position i (if any).
    pub fn push_sequence(
        &mut self,
        reference: &[f32],
        candidate: &[f32],
        vocab: usize,
        next: &[Option<u32>],
    ) {
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
                    let p = a.exp();
                    if p > 0.0 { p * (a - b) } else { 0.0 }
                })
                .sum();
            let top_r = argmax(&lr);
            let top_c = argmax(&lc);
            self.kl.push(if kl.is_nan() {
                f64::INFINITY
            } else {
                kl.max(0.0)
            });
            self.same_top1.push(top_r == top_c);
            self.dp.push(lc[top_r].exp() - lr[top_r].exp());
            if let Some(Some(t)) = next.get(i) {
                let t = *t as usize;
                if t < vocab {
                    self.nll.push(-lc[t]);
                    self.nll_reference.push(-lr[t]);
                }
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

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
