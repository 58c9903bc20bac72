//! Weight statistics of one merged tensor in one precision (design.md "Statistics"):
//! how far the candidate is from the exact merge W*, relative to the update ‖ΔW‖, and how that
//! compares with the floor of rounding W* once to the precision.
//!
//! All sums are accumulated in f64. Degenerate cases (ΔW = 0, a zero floor) give `None` rather
//! than a division by zero.

use serde::Serialize;

use crate::merge::float::{F16_MAX, FloatFormat};
use crate::merge::precision::Precision;
use crate::merge::quant_format::QuantFormat;
use crate::stats::lanes::{Chunk, LANES, Sums};

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

/// ΔW statistics; `delta[i] = W*[i] − W_ref[i]`. Two passes in f64: sums, then central moments
/// (a per-element online update would divide once per element — too slow for 100M weights).
pub fn delta_stats(wstar: &[f64], w_ref: &[f32], stored: Option<&[f32]>) -> DeltaStats {
    let n = wstar.len().max(1) as f64;
    let (mut sum_d, mut sum_d2, mut sum_w2) = (0.0f64, 0.0f64, 0.0f64);
    for (ws, wr) in wstar.iter().zip(w_ref) {
        let w = *wr as f64;
        let d = ws - w;
        sum_d += d;
        sum_d2 += d * d;
        sum_w2 += w * w;
    }
    let mean = sum_d / n;
    let (mut m2, mut m3, mut m4) = (0.0f64, 0.0f64, 0.0f64);
    for (ws, wr) in wstar.iter().zip(w_ref) {
        let c = ws - *wr as f64 - mean;
        let c2 = c * c;
        m2 += c2;
        m3 += c2 * c;
        m4 += c2 * c2;
    }
    let (var, m3, m4) = (m2 / n, m3 / n, m4 / n);
    let skewness = if var > 0.0 { m3 / var.powf(1.5) } else { 0.0 };
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
        delta_skewness: skewness,
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
        Precision::Quant(QuantFormat::Q5_0) => Some(f16 * 16.0),
        // As Q4_1: m = min is stored in f16.
        Precision::Quant(QuantFormat::Q5_1) => Some(f16),
        // bitsandbytes keeps an f32 absmax. The K-quants store f16 scales of 6/8-bit sub-block
        // scales, which overflow only for |w| of order 1e6 or more; a result that does is
        // counted as non-finite anyway.
        Precision::Quant(
            QuantFormat::Nf4
            | QuantFormat::Fp4
            | QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q4K
            | QuantFormat::Q5K
            | QuantFormat::Q6K
            | QuantFormat::Mix(_),
        ) => None,
    }
}

/// One tensor-length array of f32 values: stored, or produced element by element by rounding
/// another array to a float format. Rounding on the fly spares a tensor-sized buffer per
/// precision (a 7B MLP weight is 180 MB of f32 per worker).
#[derive(Clone, Copy)]
pub enum Values<'a> {
    Stored(&'a [f32]),
    /// `format`'s rounding of each f64 (the exact merge rounded once).
    RoundedF64(FloatFormat, &'a [f64]),
    /// `format`'s rounding of each f32 (the base stored in the format).
    Rounded(FloatFormat, &'a [f32]),
}

impl Values<'_> {
    /// Values `start..start + out.len()` into `out`: the variant is matched once per chunk, so
    /// each arm is one vectorized slice operation (matched per element inside the statistics
    /// loop it was not, and that loop was 5 % of a `check --precision all`'s CPU).
    fn fill(&self, start: usize, out: &mut [f32]) {
        let range = start..start + out.len();
        match self {
            Values::Stored(v) => out.copy_from_slice(&v[range]),
            Values::RoundedF64(f, v) => f.round_slice_from_f64(&v[range], out),
            Values::Rounded(f, v) => f.round_slice(&v[range], out),
        }
    }

    fn len(&self) -> usize {
        match self {
            Values::Stored(v) | Values::Rounded(_, v) => v.len(),
            Values::RoundedF64(_, v) => v.len(),
        }
    }
}

/// The arrays one precision's statistics are computed from, all of the tensor's length.
pub struct CandidateArrays<'a> {
    /// The exact merge W* (onto the reference base).
    pub wstar: &'a [f64],
    /// The reference base W_ref (the stored base, or dequant(P(W)) with `--trained-on`).
    pub w_ref: &'a [f32],
    /// The candidate W_p as deployed (dequantized to f32); `None` when it is the floor itself
    /// (the exact recipe onto the reference base).
    pub candidate: Option<Values<'a>>,
    /// p(W*): W* rounded / quantized once.
    pub floor: Values<'a>,
    /// p(W): the base stored in the precision.
    pub base_in_p: Values<'a>,
    /// The exact merge onto the stored base, whose range matters for overflow.
    pub wstar_user: &'a [f64],
}

/// Computes every per-precision statistic in one pass.
pub fn precision_stats(precision: Precision, a: &CandidateArrays<'_>) -> PrecisionStats {
    let limit = range_limit(precision);
    let mut sums = Sums::default();
    let mut counts = Counts::default();
    let n = a.wstar.len();
    assert!(
        a.floor.len() == n && a.base_in_p.len() == n && a.candidate.is_none_or(|c| c.len() == n),
        "candidate arrays of one tensor differ in length"
    );
    let (wstar, w_ref, user) = (&a.wstar[..n], &a.w_ref[..n], &a.wstar_user[..n]);
    let (floor, base_p, cand) = (a.floor, a.base_in_p, a.candidate);
    let limit = limit.unwrap_or(f64::INFINITY);
    // The three derived arrays are produced a chunk at a time into stack buffers. The float sums
    // then run in four interleaved lanes ([`Sums`]: the same bits on every machine), the counts
    // in one branch-light pass (selects instead of ifs; counts do not depend on order).
    const CHUNK: usize = 1024;
    const _: () = assert!(
        CHUNK.is_multiple_of(LANES),
        "chunks start on a lane boundary"
    );
    let (mut floor_buf, mut base_buf, mut cand_buf) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        floor.fill(start, &mut floor_buf[..len]);
        base_p.fill(start, &mut base_buf[..len]);
        let cand_chunk: &[f32] = match cand {
            Some(c) => {
                c.fill(start, &mut cand_buf[..len]);
                &cand_buf[..len]
            }
            None => &floor_buf[..len],
        };
        let range = start..start + len;
        sums.add(Chunk {
            wstar: &wstar[range.clone()],
            w_ref: &w_ref[range.clone()],
            candidate: cand_chunk,
            floor: &floor_buf[..len],
            base_in_p: &base_buf[..len],
        });
        counts.add(
            precision,
            limit,
            (&wstar[range.clone()], &w_ref[range.clone()], &user[range]),
            (cand_chunk, &base_buf[..len]),
        );
    }
    let Counts {
        nan,
        inf,
        out_of_range,
        nonzero,
        vanished,
    } = counts;
    let sum_err2 = Sums::total(sums.err2);
    let sum_floor2 = Sums::total(sums.floor2);
    let sum_d2 = Sums::total(sums.d2);
    let sum_w2 = Sums::total(sums.w2);
    let dot = Sums::total(sums.dot);
    let max_abs_error = Sums::max(sums.max_abs);
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

/// The counted statistics of one tensor in one precision.
#[derive(Default)]
struct Counts {
    nan: usize,
    inf: usize,
    out_of_range: usize,
    /// Entries the update moves (d ≠ 0).
    nonzero: usize,
    /// Moved entries the precision loses (below half an ulp, or quantized back onto the base).
    vanished: usize,
}

impl Counts {
    /// Counts one chunk: W*, W_ref and the user's W* (`exact`), the candidate and the base stored
    /// in the precision (`stored`), four at a time through AVX2 where the processor has it
    /// (counts do not depend on order).
    fn add(
        &mut self,
        precision: Precision,
        limit: f64,
        exact: (&[f64], &[f32], &[f64]),
        stored: (&[f32], &[f32]),
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2() {
            // SAFETY: the processor supports AVX2, checked just above.
            return unsafe { self.add_avx2(precision, limit, exact, stored) };
        }
        self.add_plain(precision, limit, exact, stored)
    }

    /// Whole groups of four through AVX2 compares (a lane's mask counts −1), the tail through
    /// [`Self::add_plain`]. The half-ulp test uses the binade of W_ref read from the exponent
    /// field of its f64 value, which is [`half_ulp`] for every finite W_ref (zero and f32
    /// subnormals land in the format's smallest normal binade either way); for ±inf and NaN
    /// it is ∞ where `half_ulp` is finite, but d is then ±inf or NaN and below neither.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_avx2(
        &mut self,
        precision: Precision,
        limit: f64,
        (wstar, w_ref, user): (&[f64], &[f32], &[f64]),
        (cand, base_p): (&[f32], &[f32]),
    ) {
        use std::arch::x86_64::*;
        let n = wstar.len();
        let (w_ref, user, cand, base_p) = (&w_ref[..n], &user[..n], &cand[..n], &base_p[..n]);
        let groups = n / 4;
        let sign = _mm256_set1_pd(-0.0);
        let exponent = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7ff0_0000_0000_0000));
        let (inf, limit_v) = (_mm256_set1_pd(f64::INFINITY), _mm256_set1_pd(limit));
        let (smallest, spacing) = match precision {
            Precision::Float(fmt) => {
                let (precision, min_exp) = format_binades(fmt);
                (2f64.powi(min_exp), 2f64.powi(-precision))
            }
            Precision::Quant(_) => (0.0, 0.0),
        };
        let (smallest, spacing) = (_mm256_set1_pd(smallest), _mm256_set1_pd(spacing));
        let [
            mut nan,
            mut infinite,
            mut out_of_range,
            mut moved_n,
            mut lost_n,
        ] = [_mm256_setzero_si256(); 5];
        // A compare mask is −1 in each true lane: subtracting it counts.
        let count = |acc: __m256i, mask: __m256d| _mm256_sub_epi64(acc, _mm256_castpd_si256(mask));
        for g in 0..groups {
            let at = g * 4;
            // SAFETY: each slice below holds exactly four values (bounds-checked); unaligned loads.
            let (ws, w, u, c, b) = unsafe {
                (
                    _mm256_loadu_pd(wstar[at..at + 4].as_ptr()),
                    _mm256_cvtps_pd(_mm_loadu_ps(w_ref[at..at + 4].as_ptr())),
                    _mm256_loadu_pd(user[at..at + 4].as_ptr()),
                    _mm256_cvtps_pd(_mm_loadu_ps(cand[at..at + 4].as_ptr())),
                    _mm256_cvtps_pd(_mm_loadu_ps(base_p[at..at + 4].as_ptr())),
                )
            };
            nan = count(nan, _mm256_cmp_pd::<_CMP_UNORD_Q>(c, c));
            infinite = count(
                infinite,
                _mm256_cmp_pd::<_CMP_EQ_OQ>(_mm256_andnot_pd(sign, c), inf),
            );
            let above = _mm256_cmp_pd::<_CMP_GT_OQ>(_mm256_andnot_pd(sign, u), limit_v);
            out_of_range = count(out_of_range, above);
            let d = _mm256_sub_pd(ws, w);
            let moved = _mm256_cmp_pd::<_CMP_NEQ_UQ>(d, _mm256_setzero_pd());
            moved_n = count(moved_n, moved);
            let lost = match precision {
                Precision::Float(_) => {
                    let binade = _mm256_max_pd(_mm256_and_pd(w, exponent), smallest);
                    let half_ulp = _mm256_mul_pd(binade, spacing);
                    _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_andnot_pd(sign, d), half_ulp)
                }
                // f32 values compare as their exact f64 widenings do.
                Precision::Quant(_) => _mm256_cmp_pd::<_CMP_EQ_OQ>(c, b),
            };
            lost_n = count(lost_n, _mm256_and_pd(moved, lost));
        }
        let total = |v: __m256i| {
            let mut lanes = [0i64; 4];
            // SAFETY: `lanes` holds four i64, the width of the store.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v) };
            lanes.iter().sum::<i64>() as usize
        };
        self.nan += total(nan);
        self.inf += total(infinite);
        self.out_of_range += total(out_of_range);
        self.nonzero += total(moved_n);
        self.vanished += total(lost_n);
        let at = groups * 4;
        self.add_plain(
            precision,
            limit,
            (&wstar[at..], &w_ref[at..], &user[at..]),
            (&cand[at..], &base_p[at..]),
        );
    }

    #[inline(always)]
    fn add_plain(
        &mut self,
        precision: Precision,
        limit: f64,
        (wstar, w_ref, user): (&[f64], &[f32], &[f64]),
        (cand, base_p): (&[f32], &[f32]),
    ) {
        let n = wstar.len();
        let (w_ref, user, cand, base_p) = (&w_ref[..n], &user[..n], &cand[..n], &base_p[..n]);
        for i in 0..n {
            let c32 = cand[i];
            self.nan += c32.is_nan() as usize;
            self.inf += c32.is_infinite() as usize;
            self.out_of_range += (user[i].abs() > limit) as usize;
        }
        // One loop per kind of loss, so neither matches per element; zipped slices (no index
        // to bounds-check) and `&` rather than `&&` (no branch).
        let (mut nonzero, mut vanished) = (0usize, 0usize);
        match precision {
            Precision::Float(fmt) => {
                for (ws, w) in wstar.iter().zip(w_ref) {
                    let d = ws - *w as f64;
                    let moved = d != 0.0;
                    nonzero += moved as usize;
                    vanished += (moved & (d.abs() < half_ulp(fmt, *w))) as usize;
                }
            }
            Precision::Quant(_) => {
                for (((ws, w), c), b) in wstar.iter().zip(w_ref).zip(cand).zip(base_p) {
                    let moved = ws - *w as f64 != 0.0;
                    nonzero += moved as usize;
                    vanished += (moved & (c == b)) as usize;
                }
            }
        }
        self.nonzero += nonzero;
        self.vanished += vanished;
    }
}

/// Half the spacing of `fmt`'s grid at |w|, from the exponent bits of `w` (the binade of `w`
/// itself; rounding `w` to the grid first would only move a value sitting just below a power of
/// two into the next binade).
fn half_ulp(fmt: FloatFormat, w: f32) -> f64 {
    let (precision, min_exp) = format_binades(fmt);
    let biased = ((w.to_bits() >> 23) & 0xff) as i32;
    let exponent = if biased == 0 { -127 } else { biased - 127 };
    let e = exponent.max(min_exp) - (precision - 1) - 1;
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// A float format's significand precision (bits, the implicit one included) and the exponent of
/// its smallest normal binade.
fn format_binades(fmt: FloatFormat) -> (i32, i32) {
    match fmt {
        FloatFormat::F32 => (24, -126),
        FloatFormat::F16 => (11, -14),
        FloatFormat::Bf16 => (8, -126),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 counts equal the plain loop's, for every kind of loss, on values that sit on
    /// half an ulp, zeros, f32 subnormals, overflow, infinities and NaN, with a tail.
    #[test]
    fn vectorized_counts_equal_the_plain_loop() {
        let mut w_ref: Vec<f32> =
            vec![1.0, 0.0, 1e-40, -2.0, f32::INFINITY, f32::NAN, 65504.0, 3.0];
        let mut wstar: Vec<f64> = vec![
            1.0 + 2f64.powi(-9),
            1e-30,
            1e-40 + 1e-46,
            -2.0,
            1.0,
            1.0,
            70000.0,
            3.0 + 2f64.powi(-12),
        ];
        let mut seed = 0x1234_5678_9abc_def1u64;
        for _ in 0..1001 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let w = ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32;
            let scale = 2f64.powi((seed % 24) as i32 - 30);
            w_ref.push(w);
            wstar.push(w as f64 + if seed.is_multiple_of(3) { 0.0 } else { scale });
        }
        let user = wstar.clone();
        let mut cand: Vec<f32> = wstar.iter().map(|v| *v as f32).collect();
        cand[2] = f32::NAN;
        cand[9] = f32::NEG_INFINITY;
        let base_p: Vec<f32> = w_ref
            .iter()
            .zip(&cand)
            .enumerate()
            .map(|(i, (w, c))| if i.is_multiple_of(5) { *c } else { *w })
            .collect();
        for precision in [
            Precision::Float(FloatFormat::Bf16),
            Precision::Float(FloatFormat::F16),
            Precision::Float(FloatFormat::F32),
            Precision::Quant(QuantFormat::Q4_0),
        ] {
            let limit = range_limit(precision).unwrap_or(f64::INFINITY);
            let (mut fast, mut plain) = (Counts::default(), Counts::default());
            fast.add(precision, limit, (&wstar, &w_ref, &user), (&cand, &base_p));
            plain.add_plain(precision, limit, (&wstar, &w_ref, &user), (&cand, &base_p));
            let tuple = |c: &Counts| (c.nan, c.inf, c.out_of_range, c.nonzero, c.vanished);
            assert_eq!(tuple(&fast), tuple(&plain), "{precision:?}");
            assert!(
                plain.vanished > 0 && plain.vanished < plain.nonzero,
                "{precision:?}"
            );
        }
    }

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
                candidate: Some(Values::Stored(&cand)),
                floor: Values::Stored(&cand),
                base_in_p: Values::Stored(&w_ref),
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
                candidate: Some(Values::Stored(&cand)),
                floor: Values::Stored(&cand),
                base_in_p: Values::Stored(&w_ref),
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
                candidate: Some(Values::Stored(&cand)),
                floor: Values::Stored(&cand),
                base_in_p: Values::Stored(&w_ref),
                wstar_user: &wstar,
            },
        );
        assert_eq!(f16.out_of_range, 1);
        assert_eq!(f16.inf, 1);
    }

    #[test]
    fn half_ulp_agrees_with_the_grid_spacing() {
        for fmt in [FloatFormat::F32, FloatFormat::F16, FloatFormat::Bf16] {
            for w in [1.0f32, 0.75, -3.5e-3, 1e-30, 0.0, 6e-8, 1000.0, -2.5e10] {
                if fmt == FloatFormat::F16 && w.abs() > 65504.0 {
                    continue;
                }
                assert_eq!(half_ulp(fmt, w), fmt.ulp(w) as f64 / 2.0, "{fmt:?} {w}");
            }
        }
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
                candidate: Some(Values::Stored(&w)),
                floor: Values::Stored(&w),
                base_in_p: Values::Stored(&w),
                wstar_user: &ws,
            },
        );
        assert!(stats.rel_error.is_none() && stats.delta_retention.is_none());
        let d = delta_stats(&ws, &w, None);
        assert_eq!(d.delta_norm, 0.0);
        assert_eq!(d.delta_kurtosis, 0.0);
    }
}
