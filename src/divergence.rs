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
    /// Each row's argmax of `r − log Z` (first maximum wins).
    top: Vec<usize>,
}

impl<'a> ReferenceRows<'a> {
    pub fn new(logits: &'a [f32], vocab: usize) -> Self {
        let (log_z, top) = logits
            .par_chunks_exact(vocab.max(1))
            .map(|row| {
                let log_z = log_normalizer(row);
                let (mut top, mut best) = (0, f64::NAN);
                for (i, v) in row.iter().enumerate() {
                    let a = *v as f64 - log_z;
                    if i == 0 || a > best {
                        (top, best) = (i, a);
                    }
                }
                (log_z, top)
            })
            .unzip();
        ReferenceRows {
            logits,
            vocab,
            log_z,
            top,
        }
    }
}

impl TokenScores {
    /// Scores `[positions, vocab]` logits whole; `next[i]` is the token that follows position i
    /// (if any).
    pub fn push_sequence(
        &mut self,
        reference: &[f32],
        candidate: &[f32],
        vocab: usize,
        next: &[Option<u32>],
    ) {
        let rows = ReferenceRows::new(reference, vocab);
        let mut streamed = StreamedScores::new(reference.len() / vocab.max(1));
        streamed.push_whole(&rows, candidate, vocab, next);
        streamed.finish(&rows, next, self);
    }
}

/// One position's running sums while a candidate's logits arrive a block of vocabulary columns
/// at a time.
#[derive(Debug, Clone)]
struct RowSums {
    /// Largest finite candidate logit so far (−∞ before any) and Σ exp(c − max) over the
    /// columns seen, rescaled whenever the maximum grows.
    max: f64,
    sum: f64,
    /// Σ p_r and Σ p_r·(c − r) over the columns with p_r > 0.
    p_sum: f64,
    p_diff: f64,
    /// The candidate's first largest logit so far.
    top: usize,
    best: f32,
    /// The candidate's logits at the reference's argmax and at the next token.
    at_top_r: f32,
    at_next: f32,
}

/// A candidate's scores against [`ReferenceRows`] when its logits come a block of vocabulary
/// columns at a time (the head computed in vocabulary blocks, so no `[positions, vocab]` matrix of
/// the candidate's is ever held). Each row keeps running sums; KL is then
/// `P·(log Z_c − log Z_r) − Σ p_r·(c − r)` with `P = Σ p_r`: the same quantity as
/// the direct Σ p·(a − b) over two log-softmax rows, summed in another order, and as well conditioned (both terms
/// vanish together as the candidate approaches the reference). Agrees with it to ~1e-12
/// relative (`streamed_scores_equal_the_two_log_softmax_version`).
pub struct StreamedScores {
    rows: Vec<RowSums>,
}

impl StreamedScores {
    /// Running sums for the reference's first `rows` positions.
    pub fn new(rows: usize) -> Self {
        let start = RowSums {
            max: f64::NEG_INFINITY,
            sum: 0.0,
            p_sum: 0.0,
            p_diff: 0.0,
            top: 0,
            best: f32::NAN,
            at_top_r: f32::NAN,
            at_next: f32::NAN,
        };
        StreamedScores {
            rows: vec![start; rows],
        }
    }

    /// Takes the candidate's logits for vocabulary columns `col..col + width` of every row
    /// (`[rows, width]`, row-major); blocks must arrive in column order.
    pub fn push_block(
        &mut self,
        reference: &ReferenceRows<'_>,
        col: usize,
        block: &[f32],
        width: usize,
        next: &[Option<u32>],
    ) {
        let vocab = reference.vocab.max(1);
        self.rows
            .par_iter_mut()
            .zip(block.par_chunks_exact(width.max(1)))
            .enumerate()
            .for_each(|(row, (sums, c))| {
                let r = &reference.logits[row * vocab + col..row * vocab + col + c.len()];
                let next = next.get(row).copied().flatten().map(|t| t as usize);
                sums.push(r, reference.log_z[row], c, col, reference.top[row], next);
            });
    }

    /// Scores a whole `[rows, vocab]` logit matrix exactly as if it had arrived in blocks of
    /// `width` columns (a model whose logits are kept whole gets the same numbers, bit for bit,
    /// as when its head streams them).
    pub fn push_whole(
        &mut self,
        reference: &ReferenceRows<'_>,
        logits: &[f32],
        width: usize,
        next: &[Option<u32>],
    ) {
        let vocab = reference.vocab.max(1);
        let width = width.max(1);
        let mut col = 0;
        while col < vocab {
            let w = width.min(vocab - col);
            let block: Vec<f32> = logits
                .chunks_exact(vocab)
                .flat_map(|row| row[col..col + w].iter().copied())
                .collect();
            self.push_block(reference, col, &block, w, next);
            col += w;
        }
    }

    /// The rows' scores, appended to `scores` in position order.
    pub fn finish(
        self,
        reference: &ReferenceRows<'_>,
        next: &[Option<u32>],
        scores: &mut TokenScores,
    ) {
        let vocab = reference.vocab.max(1);
        for (row, sums) in self.rows.into_iter().enumerate() {
            let r = &reference.logits[row * vocab..(row + 1) * vocab];
            let log_z_r = reference.log_z[row];
            let log_z_c = sums.max + sums.sum.ln();
            let kl = sums.p_sum * (log_z_c - log_z_r) - sums.p_diff;
            // Non-finite normalizers make every log-probability NaN or infinite: an argmax
            // over them stays at the first column.
            let top_c = if log_z_c.is_finite() { sums.top } else { 0 };
            let top_r = reference.top[row];
            let lr = |i: usize| r[i] as f64 - log_z_r;
            scores.kl.push(if kl.is_nan() {
                f64::INFINITY
            } else {
                kl.max(0.0)
            });
            scores.same_top1.push(top_r == top_c);
            scores
                .dp
                .push(exp::exp_f64(sums.at_top_r as f64 - log_z_c) - exp::exp_f64(lr(top_r)));
            if let Some(t) = next.get(row).copied().flatten().map(|t| t as usize)
                && t < vocab
            {
                scores.nll.push(-(sums.at_next as f64 - log_z_c));
                scores.nll_reference.push(-lr(t));
            }
        }
    }
}

impl RowSums {
    /// Adds one block of columns `col..col + c.len()`: `r` the reference's, `c` the candidate's.
    fn push(
        &mut self,
        r: &[f32],
        log_z_r: f64,
        c: &[f32],
        col: usize,
        top_r: usize,
        next: Option<usize>,
    ) {
        let block_max = c
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        if block_max > self.max {
            // An infinite or NaN sum stays so (log_normalizer's +∞ and NaN terms); an empty one
            // stays 0.
            if self.sum.is_finite() && self.sum != 0.0 {
                self.sum *= exp::exp_f64(self.max - block_max);
            }
            self.max = block_max;
        }
        let mut e_buf = [0f64; EXP_CHUNK];
        let mut p_buf = [0f64; EXP_CHUNK];
        for (k, (r, c)) in r.chunks(EXP_CHUNK).zip(c.chunks(EXP_CHUNK)).enumerate() {
            let start = col + k * EXP_CHUNK;
            let (e, p) = (&mut e_buf[..c.len()], &mut p_buf[..r.len()]);
            for ((e, p), (rv, cv)) in e.iter_mut().zip(p.iter_mut()).zip(r.iter().zip(c)) {
                // −∞ adds nothing; +∞ and NaN make the sum +∞ and NaN, as in log_normalizer.
                *e = if *cv == f32::NEG_INFINITY {
                    f64::NEG_INFINITY
                } else if self.max == f64::NEG_INFINITY {
                    *cv as f64
                } else {
                    *cv as f64 - self.max
                };
                *p = *rv as f64 - log_z_r;
            }
            exp::exp_f64_in_place(e);
            exp::exp_f64_in_place(p);
            self.sum = e.iter().fold(self.sum, |s, e| s + e);
            for (j, ((rv, cv), p)) in r.iter().zip(c).zip(p.iter()).enumerate() {
                if *p > 0.0 {
                    self.p_sum += p;
                    self.p_diff += p * (*cv as f64 - *rv as f64);
                }
                let i = start + j;
                if i == 0 || *cv > self.best {
                    (self.top, self.best) = (i, *cv);
                }
                if i == top_r {
                    self.at_top_r = *cv;
                }
                if Some(i) == next {
                    self.at_next = *cv;
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

    /// Random rows with ties, a NaN, infinities, an identical row and a constant row.
    fn scoring_case() -> (Vec<f32>, Vec<f32>, usize, Vec<Option<u32>>) {
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
        (reference, candidate, vocab, next)
    }

    /// Scored a block of vocabulary columns at a time (every block width from one column to the
    /// whole row, uneven last blocks included), the candidate gets the two-log-softmax version's
    /// numbers up to summation order, on the same awkward rows.
    #[test]
    fn streamed_scores_equal_the_two_log_softmax_version() {
        let (reference, candidate, vocab, next) = scoring_case();
        let positions = reference.len() / vocab;
        let want = two_log_softmax_version(&reference, &candidate, vocab, &next);
        let rows = ReferenceRows::new(&reference, vocab);
        for width in [1, 7, 30, 64, 96, 97] {
            let mut streamed = StreamedScores::new(positions);
            let mut col = 0;
            while col < vocab {
                let w = width.min(vocab - col);
                let block: Vec<f32> = candidate
                    .chunks_exact(vocab)
                    .flat_map(|row| row[col..col + w].iter().copied())
                    .collect();
                streamed.push_block(&rows, col, &block, w, &next);
                col += w;
            }
            let mut got = TokenScores::default();
            streamed.finish(&rows, &next, &mut got);
            let close = |a: &[f64], b: &[f64], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}, width {width}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let same =
                        x.to_bits() == y.to_bits() || (x - y).abs() <= 1e-13 + 1e-10 * y.abs();
                    assert!(same, "{what}[{i}], width {width}: {x} vs {y}");
                }
            };
            close(&got.kl, &want.kl, "kl");
            close(&got.dp, &want.dp, "dp");
            close(&got.nll, &want.nll, "nll");
            close(&got.nll_reference, &want.nll_reference, "nll_reference");
            assert_eq!(got.same_top1, want.same_top1, "width {width}");
        }
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
