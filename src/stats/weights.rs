//! Weight statistics of one merged tensor in one precision (design.md "Statistics"):
//! how far the candidate is from the exact merge W*, relative to the update ‖ΔW‖, and how that
//! compares with the floor of rounding W* once to the precision.
//!
//! All sums are accumulated in f64. Degenerate cases (ΔW = 0, a zero floor) give `None` rather
//! than a division by zero.

use serde::Serialize;
use statrs::statistics::{Accumulate, OnlineMoments};

use crate::merge::float::{F16_MAX, FloatFormat};
use crate::merge::precision::Precision;
use crate::merge::quant::QuantFormat;

/// The distribution of ΔW = W* − W_ref over one tensor (precision-independent).
#[derive(Debug, Clone, Serialize)]
pub struct DeltaStats {
    pub numel: usize,
    pub delta_norm: f64,
    pub weight_norm: f64,
    pub delta_mean: f64,
    pub delta_std: f64,
    pub delta_skewness: f64,
    /// Excess kurtosis (0 for a normal distribution).
    pub delta_kurtosis: f64,
    /// For `--trained-on P`: ‖W − dequant(P(W))‖ / ‖ΔW‖, the QLoRA base mismatch.
    pub qlora_base_error: Option<f64>,
}

/// ΔW statistics; `delta[i] = W*[i] − W_ref[i]`.
pub fn delta_stats(wstar: &[f64], w_ref: &[f32], stored: Option<&[f32]>) -> DeltaStats {
    let mut moments = OnlineMoments::<3>::default();
    let mut sum_d2 = 0.0;
    let mut sum_w2 = 0.0;
    for (ws, wr) in wstar.iter().zip(w_ref) {
        let d = ws - *wr as f64;
        moments = moments.push(d);
        sum_d2 += d * d;
        sum_w2 += (*wr as f64) * (*wr as f64);
    }
    let mean = moments.mean().unwrap_or(0.0);
    let n = wstar.len().max(1) as f64;
    let (m2, m4) = wstar
        .iter()
        .zip(w_ref)
        .map(|(ws, wr)| ws - *wr as f64 - mean)
        .fold((0.0, 0.0), |(m2, m4), c| (m2 + c * c, m4 + c.powi(4)));
    let (var, m4) = (m2 / n, m4 / n);
    let kurtosis = if var > 0.0 {
        m4 / (var * var) - 3.0
    } else {
        0.0
    };
    let delta_norm = sum_d2.sqrt();
    let qlora_base_error = stored.map(|w| {
        let q2: f64 = w
            .iter()
            .zip(w_ref)
            .map(|(a, b)| {
                let e = *a as f64 - *b as f64;
                e * e
            })
            .sum();
        if delta_norm > 0.0 {
            q2.sqrt() / delta_norm
        } else {
            f64::INFINITY
        }
    });
    DeltaStats {
        numel: wstar.len(),
        delta_norm,
        weight_norm: sum_w2.sqrt(),
        delta_mean: mean,
        delta_std: var.sqrt(),
        delta_skewness: moments.skewness().unwrap_or(0.0),
        delta_kurtosis: kurtosis,
        qlora_base_error,
    }
}

/// Statistics of one candidate (one precision) of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionStats {
    /// ‖W_p − W*‖ / ‖ΔW‖: the share of the update lost (null when ΔW = 0).
    pub rel_error: Option<f64>,
    /// ‖p(W*) − W*‖ / ‖ΔW‖: the error of rounding / quantizing the exact merge once.
    pub rounding_floor: Option<f64>,
    /// rel_error / rounding_floor: 1 is as good as the precision allows.
    pub floor_ratio: Option<f64>,
    /// ⟨W_p − p(W), ΔW⟩ / ‖ΔW‖²: the share of ΔW that survives.
    pub delta_retention: Option<f64>,
    /// Floats: fraction of non-zero ΔW entries below half an ULP of their base weight.
    /// Quantized: fraction of non-zero ΔW entries whose quantized value did not change.
    pub delta_below_half_ulp: Option<f64>,
    pub max_abs_error: f64,
    /// 10·log10(‖W*‖² / ‖W_p − W*‖²); null when the candidate is exact.
    pub snr_db: Option<f64>,
    pub nan: usize,
    pub inf: usize,
    /// Entries of W* beyond what the format can store (f16: |w| > 65504).
    pub out_of_range: usize,
}

/// The largest |w| a precision stores without overflow: the dtype's max for floats; for formats
/// that keep f16 scales or cast to f16 first, the value whose scale overflows f16.
pub fn range_limit(precision: Precision) -> Option<f64> {
    let f16 = F16_MAX as f64;
    match precision {
        Precision::Float(f) => Some(f.max_finite() as f64),
        // LLM.int8 casts the weight to f16 before quantizing.
        Precision::Quant(QuantFormat::Int8) => Some(f16),
        Precision::Quant(QuantFormat::Q8_0) => Some(f16 * 127.0),
        Precision::Quant(QuantFormat::Q4_0) => Some(f16 * 8.0),
        // d = (max − min)/15 and m = min are f16: the tighter bound is |min| ≤ 65504.
        Precision::Quant(QuantFormat::Q4_1) => Some(f16),
        // bitsandbytes keeps an f32 absmax.
        Precision::Quant(QuantFormat::Nf4 | QuantFormat::Fp4) => None,
    }
}

/// The arrays one precision's statistics are computed from, all of the tensor's length.
pub struct CandidateArrays<'a> {
    /// The exact merge W* (onto the reference base).
    pub wstar: &'a [f64],
    /// The reference base W_ref (the stored base, or dequant(P(W)) with `--trained-on`).
    pub w_ref: &'a [f32],
    /// The candidate W_p as deployed (dequantized to f32).
    pub candidate: &'a [f32],
    /// p(W*): W* rounded / quantized once.
    pub floor: &'a [f32],
    /// p(W): the base stored in the precision.
    pub base_in_p: &'a [f32],
    /// The exact merge onto the stored base, whose range matters for overflow.
    pub wstar_user: &'a [f64],
}

/// Computes every per-precision statistic in one pass.
pub fn precision_stats(precision: Precision, a: &CandidateArrays<'_>) -> PrecisionStats {
    let limit = range_limit(precision);
    let mut sum_err2 = 0.0;
    let mut sum_floor2 = 0.0;
    let mut sum_d2 = 0.0;
    let mut dot = 0.0;
    let mut sum_w2 = 0.0;
    let mut max_abs_error = 0.0f64;
    let (mut nan, mut inf, mut out_of_range) = (0, 0, 0);
    let (mut nonzero, mut vanished) = (0usize, 0usize);
    for i in 0..a.wstar.len() {
        let ws = a.wstar[i];
        let c = a.candidate[i] as f64;
        let d = ws - a.w_ref[i] as f64;
        if a.candidate[i].is_nan() {
            nan += 1;
        } else if a.candidate[i].is_infinite() {
            inf += 1;
        } else {
            let e = c - ws;
            sum_err2 += e * e;
            max_abs_error = max_abs_error.max(e.abs());
        }
        if limit.is_some_and(|l| a.wstar_user[i].abs() > l) {
            out_of_range += 1;
        }
        let f = a.floor[i] as f64 - ws;
        if f.is_finite() {
            sum_floor2 += f * f;
        }
        sum_d2 += d * d;
        sum_w2 += ws * ws;
        dot += (c - a.base_in_p[i] as f64) * d;
        if d != 0.0 {
            nonzero += 1;
            let lost = match precision {
                Precision::Float(fmt) => d.abs() < half_ulp(fmt, a.w_ref[i]),
                Precision::Quant(_) => a.candidate[i] == a.base_in_p[i],
            };
            if lost {
                vanished += 1;
            }
        }
    }
    let delta_norm = sum_d2.sqrt();
    let rel = |x: f64| (delta_norm > 0.0).then(|| x.sqrt() / delta_norm);
    let rel_error = if nan + inf > 0 {
        Some(f64::INFINITY)
    } else {
        rel(sum_err2)
    };
    let rounding_floor = rel(sum_floor2);
    let floor_ratio = match (rel_error, rounding_floor) {
        (Some(e), Some(f)) if f > 0.0 => Some(e / f),
        (Some(e), Some(_)) => Some(if e == 0.0 { 1.0 } else { f64::INFINITY }),
        _ => None,
    };
    PrecisionStats {
        rel_error,
        rounding_floor,
        floor_ratio,
        delta_retention: (sum_d2 > 0.0).then(|| dot / sum_d2),
        delta_below_half_ulp: (nonzero > 0).then(|| vanished as f64 / nonzero as f64),
        max_abs_error,
        snr_db: (sum_err2 > 0.0).then(|| 10.0 * (sum_w2 / sum_err2).log10()),
        nan,
        inf,
        out_of_range,
    }
}

fn half_ulp(fmt: FloatFormat, w: f32) -> f64 {
    fmt.ulp(fmt.round(w)) as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_candidate_has_floor_ratio_one_and_full_retention() {
        let w_ref = [1.0f32, -2.0, 0.5, 0.25];
        let wstar = [1.25f64, -2.0, 0.75, 0.25];
        let cand: Vec<f32> = wstar.iter().map(|v| *v as f32).collect();
        let stats = precision_stats(
            Precision::Float(FloatFormat::F32),
            &CandidateArrays {
                wstar: &wstar,
                w_ref: &w_ref,
                candidate: &cand,
                floor: &cand,
                base_in_p: &w_ref,
                wstar_user: &wstar,
            },
        );
        assert_eq!(stats.rel_error, Some(0.0));
        assert_eq!(stats.floor_ratio, Some(1.0));
        assert_eq!(stats.delta_retention, Some(1.0));
        assert_eq!(stats.delta_below_half_ulp, Some(0.0));
        assert!(stats.snr_db.is_none());
    }

    #[test]
    fn swamped_bf16_update_is_counted_and_overflow_is_seen() {
        let w_ref = [1.0f32; 4];
        let wstar = [1.0 + 2f64.powi(-10), 1.0 + 2f64.powi(-10), 1.0, 70000.0];
        let cand: Vec<f32> = wstar
            .iter()
            .map(|v| FloatFormat::F16.round_from_f64(*v))
            .collect();
        let stats = precision_stats(
            Precision::Float(FloatFormat::Bf16),
            &CandidateArrays {
                wstar: &wstar,
                w_ref: &w_ref,
                candidate: &cand,
                floor: &cand,
                base_in_p: &w_ref,
                wstar_user: &wstar,
            },
        );
        // Two of the three non-zero deltas are below half a bf16 ulp at 1.0 (2^-9).
        assert_eq!(stats.delta_below_half_ulp, Some(2.0 / 3.0));
        assert_eq!(stats.out_of_range, 0);
        let f16 = precision_stats(
            Precision::Float(FloatFormat::F16),
            &CandidateArrays {
                wstar: &wstar,
                w_ref: &w_ref,
                candidate: &cand,
                floor: &cand,
                base_in_p: &w_ref,
                wstar_user: &wstar,
            },
        );
        assert_eq!(f16.out_of_range, 1);
        assert_eq!(f16.inf, 1);
    }

    #[test]
    fn zero_delta_gives_no_ratios() {
        let w = [1.0f32, 2.0];
        let ws = [1.0f64, 2.0];
        let stats = precision_stats(
            Precision::Float(FloatFormat::Bf16),
            &CandidateArrays {
                wstar: &ws,
                w_ref: &w,
                candidate: &w,
                floor: &w,
                base_in_p: &w,
                wstar_user: &ws,
            },
        );
        assert!(stats.rel_error.is_none() && stats.delta_retention.is_none());
        let d = delta_stats(&ws, &w, None);
        assert_eq!(d.delta_norm, 0.0);
        assert_eq!(d.delta_kurtosis, 0.0);
    }
}
