//! `e^x` a slice at a time, in f32 for the forward (attention softmax, SiLU) and in f64 for the
//! logit scoring (log normalizers and the reference's probabilities).
//!
//! glibc's `exp`/`expf` are accurate but scalar: a call per value. One SmolLM2 forward over 512
//! tokens takes 35 M of them in its attention softmax alone, and scoring one candidate takes 50 M
//! in f64 (two per logit); together about a tenth of a check's time on two cores. This is the
//! classic vectorizable form instead:
//! - Cody–Waite reduction x = n·ln 2 + r, |r| ≤ ln 2 / 2, with ln 2 split so n·ln2_hi is exact;
//! - a polynomial for e^r: in f32 Cephes' degree-7 minimax form, in f64 the Taylor series to
//!   degree 13 (its truncation is below 1e-17);
//! - 2ⁿ built from exponent bits in two halves, so that a subnormal result rounds once, as a
//!   correctly scaled product does.
//!
//! Every step is a plain add, multiply, compare or select (no fused multiply-add, no table), so the
//! scalar body, the baseline SSE2 loop and the AVX2 copy ([`crate::simd::avx2`]) give the same bits
//! on every machine. Measured against glibc on dense samples of the whole range: at most 1 ulp
//! (f32) and 2 ulp (f64) from it.
//!
//! Special values follow libm: `e^-inf = 0`, `e^+inf = +inf`, NaN stays NaN, results past the
//! largest finite value are +inf and those under half the smallest subnormal are 0.

/// One float width's constants.
trait Width: Copy {
    /// Below this the result is 0; above [`Width::HIGHEST`] it is +inf.
    const LOWEST: Self;
    const HIGHEST: Self;
    const LOG2_E: Self;
    /// ln 2 = LN2_HI + LN2_LO, LN2_HI with enough trailing zero bits that n·LN2_HI is exact for
    /// every n the clamp allows.
    const LN2_HI: Self;
    const LN2_LO: Self;
    /// 1.5·2^(mantissa bits): adding then subtracting it rounds to the nearest integer, which
    /// then sits in the low mantissa bits of the sum.
    const ROUND: Self;
}

impl Width for f32 {
    const LOWEST: f32 = -104.0;
    const HIGHEST: f32 = 89.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
}

impl Width for f64 {
    const LOWEST: f64 = -746.0;
    const HIGHEST: f64 = 710.0;
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const ROUND: f64 = 6_755_399_441_055_744.0;
}

/// Cephes' minimax coefficients for (e^r − 1 − r) / r² on |r| ≤ ln 2 / 2, highest degree first.
const P32: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // 5.000_000_12e-1 in Cephes, which rounds to 0.5 in f32
];

/// 1/k! for k = 13 down to 2: (e^r − 1 − r) / r² as a Taylor polynomial.
const P64: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// `e^x` in f32: the same operations, in the same order, as every lane of [`exp_f32_in_place`].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let c = clamp(x);
    let shifted = c * f32::LOG2_E + f32::ROUND;
    let n = shifted - f32::ROUND;
    let r = (c - n * f32::LN2_HI) - n * f32::LN2_LO;
    let mut p = P32[0];
    for coefficient in &P32[1..] {
        p = p * r + coefficient;
    }
    let y = 1.0 + (r + p * (r * r));
    // 2ⁿ as 2^(n/2) · 2^(n − n/2): each half is a normal f32 for n in [-150, 129]; the first
    // product is exact and the second rounds once. n is read from `shifted`'s low bits (its ulp
    // is 1): integer lanes, where a float-to-int conversion would saturate lane by lane.
    let n = shifted.to_bits() as i32 - f32::ROUND.to_bits() as i32;
    let half = n >> 1;
    let first = f32::from_bits(((half + 127) as u32) << 23);
    let second = f32::from_bits(((n - half + 127) as u32) << 23);
    let result = y * first * second;
    if x.is_nan() { x } else { result }
}

/// `e^x` in f64: the same operations, in the same order, as every lane of [`exp_f64_in_place`].
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let c = clamp(x);
    let shifted = c * f64::LOG2_E + f64::ROUND;
    let n = shifted - f64::ROUND;
    let r = (c - n * f64::LN2_HI) - n * f64::LN2_LO;
    let mut p = P64[0];
    for coefficient in &P64[1..] {
        p = p * r + coefficient;
    }
    let y = 1.0 + (r + p * (r * r));
    // 2ⁿ in two halves as in `exp_f32`, n in [-1077, 1025]. AVX2 has no 64-bit arithmetic
    // shift, so the halving is done in floating point (n/2 rounded to an integer, exactly) and
    // each half's integer read from the low bits as above.
    let half_shifted = n * 0.5 + f64::ROUND;
    let half = half_shifted - f64::ROUND;
    let rest_shifted = (n - half) + f64::ROUND;
    let round_bits = f64::ROUND.to_bits() as i64;
    let first = f64::from_bits(((half_shifted.to_bits() as i64 - round_bits + 1023) as u64) << 52);
    let second = f64::from_bits(((rest_shifted.to_bits() as i64 - round_bits + 1023) as u64) << 52);
    let result = y * first * second;
    if x.is_nan() { x } else { result }
}

/// `x` limited to [LOWEST, HIGHEST]; NaN fails both comparisons and is passed through (the
/// callers put it back at the end).
#[inline(always)]
fn clamp<T: Width + PartialOrd>(x: T) -> T {
    if x < T::LOWEST {
        T::LOWEST
    } else if x > T::HIGHEST {
        T::HIGHEST
    } else {
        x
    }
}

/// Replaces every value of `xs` by [`exp_f32`] of it.
pub fn exp_f32_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: AVX2 is present (checked just above).
        unsafe { f32_avx2(xs) };
        return;
    }
    f32_body(xs);
}

/// Replaces every value of `xs` by [`exp_f64`] of it.
pub fn exp_f64_in_place(xs: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: AVX2 is present (checked just above).
        unsafe { f64_avx2(xs) };
        return;
    }
    f64_body(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f32_avx2(xs: &mut [f32]) {
    f32_body(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f64_avx2(xs: &mut [f64]) {
    f64_body(xs);
}

#[inline(always)]
fn f32_body(xs: &mut [f32]) {
    for x in xs {
        *x = exp_f32(*x);
    }
}

#[inline(always)]
fn f64_body(xs: &mut [f64]) {
    for x in xs {
        *x = exp_f64(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps32(a: f32, b: f32) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    fn ulps64(a: f64, b: f64) -> u64 {
        (a.to_bits() as i128 - b.to_bits() as i128).unsigned_abs() as u64
    }

    #[test]
    fn f32_within_one_ulp_of_libm_over_the_whole_range() {
        let mut worst = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            // Normal results only: a subnormal's ulp is absolute (checked below).
            if want > f32::MIN_POSITIVE as f64 {
                worst = worst.max(ulps32(exp_f32(x), want as f32));
            }
            x += 0.000_731;
        }
        assert!(worst <= 1, "worst error {worst} ulp");
    }

    #[test]
    fn f64_within_two_ulp_of_libm_over_the_whole_range() {
        let mut worst = 0;
        let mut x = -745.0f64;
        while x < 709.7 {
            let want = x.exp();
            if want > f64::MIN_POSITIVE {
                worst = worst.max(ulps64(exp_f64(x), want));
            }
            x += 0.001_373_1;
        }
        // Near zero, where the scoring's differences of log-probabilities live.
        for i in -20_000..20_000 {
            let x = i as f64 * 1.37e-5;
            worst = worst.max(ulps64(exp_f64(x), x.exp()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn special_values_and_the_edges_of_the_range() {
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(88.8), f32::INFINITY);
        assert!(exp_f32(88.7).is_finite());
        assert_eq!(exp_f32(-104.0), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(709.8), f64::INFINITY);
        assert!(exp_f64(709.7).is_finite());
        assert_eq!(exp_f64(-746.0), 0.0);
        assert_eq!(exp_f64(-1e300), 0.0);
        // Subnormal results round once: within one subnormal step of libm's.
        for x in [-88.0f32, -90.0, -95.5, -100.0, -103.2] {
            let step = 2f64.powi(-149);
            let want = (x as f64).exp();
            assert!((exp_f32(x) as f64 - want).abs() <= step, "{x}");
        }
        for x in [-708.5f64, -715.0, -730.3, -744.4] {
            let want = x.exp();
            assert!(
                ulps64(exp_f64(x), want) <= 1,
                "{x}: {} vs {want}",
                exp_f64(x)
            );
        }
    }

    fn xorshift(n: usize, span: f64) -> Vec<f64> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * span
            })
            .collect()
    }

    #[test]
    fn the_slices_and_the_scalars_give_the_same_bits() {
        let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0];
        let mut xs: Vec<f32> = xorshift(10_007, 240.0).iter().map(|v| *v as f32).collect();
        xs.extend(specials.iter().map(|v| *v as f32));
        let want: Vec<u32> = xs.iter().map(|x| exp_f32(*x).to_bits()).collect();
        let (mut dispatched, mut plain) = (xs.clone(), xs);
        exp_f32_in_place(&mut dispatched);
        f32_body(&mut plain);
        assert_eq!(
            dispatched.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want
        );
        assert_eq!(plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);

        let mut xs = xorshift(10_007, 1600.0);
        xs.extend(specials);
        let want: Vec<u64> = xs.iter().map(|x| exp_f64(*x).to_bits()).collect();
        let (mut dispatched, mut plain) = (xs.clone(), xs);
        exp_f64_in_place(&mut dispatched);
        f64_body(&mut plain);
        assert_eq!(
            dispatched.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want
        );
        assert_eq!(plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
    }
}
