//! IEEE rounding to the storage dtypes a merged weight ships in (f32, f16, bf16) and
//! unit-in-the-last-place arithmetic on their grids.
//!
//! Every rounding here is round-to-nearest, ties-to-even (RNE) with overflow to ±inf, which is what
//! PyTorch's `.to(dtype)`, numpy's `astype`, ggml's `GGML_FP32_TO_FP16` and the `half` crate do.
//!
//! Rounding from f64 is done **once**. The tempting `f16::from_f32(x as f32)` rounds twice and is
//! wrong when the first rounding lands exactly on a tie of the second (see the unit test
//! `double_rounding_differs_from_single_rounding`); `half`'s own `from_f64` goes through f32 on x86
//! with F16C, or drops the low 32 mantissa bits in its fallback, so it is not used for f64 either.
//! Instead `round_to_grid_f64` scales by the format's quantum at `|x|` and rounds to an integer
//! with ties-to-even, which is exact in f64 for all three formats.
//!
//! Non-finite inputs: NaN stays NaN and ±inf stays ±inf. Signed zeros keep their sign.

use half::{bf16, f16};

use crate::simd::avx2_copy;

/// Largest finite f16, `0x7BFF`.
pub const F16_MAX: f32 = 65504.0;
/// Largest finite bf16, `0x7F7F` (= (2 − 2⁻⁷)·2¹²⁷ ≈ 3.3895314e38).
pub const BF16_MAX: f32 = 3.389_531_4e38;
/// Largest finite f32.
pub const F32_MAX: f32 = f32::MAX;

/// A binary floating-point storage format, described by the three numbers that fix its grid.
struct Grid {
    /// Significand precision in bits, including the implicit leading one.
    precision: i32,
    /// Exponent of the smallest normal binade.
    min_exp: i32,
    /// Exponent of the largest finite binade.
    max_exp: i32,
    /// Largest finite value.
    max_finite: f64,
}

const F32_GRID: Grid = Grid {
    precision: 24,
    min_exp: -126,
    max_exp: 127,
    max_finite: F32_MAX as f64,
};
const F16_GRID: Grid = Grid {
    precision: 11,
    min_exp: -14,
    max_exp: 15,
    max_finite: F16_MAX as f64,
};
const BF16_GRID: Grid = Grid {
    precision: 8,
    min_exp: -126,
    max_exp: 127,
    max_finite: BF16_MAX as f64,
};

/// Round an f32 to the nearest f16 (RNE, overflow to ±inf) and return it widened back to f32.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Round an f32 to the nearest bf16 (RNE, overflow to ±inf) and return it widened back to f32.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Round an f64 to the nearest f32 once (RNE, overflow to ±inf).
///
/// Rust's `as` cast from f64 to f32 is specified as round-to-nearest-even, so this is that cast;
/// it exists so callers name the intent and so the f64 family is complete.
#[inline]
pub fn round_f32_from_f64(x: f64) -> f32 {
    x as f32
}

/// Round an f64 to the nearest f16 in a single rounding (RNE, overflow to ±inf), widened to f32.
///
/// Differs from `round_f16(x as f32)` when `x as f32` lands exactly halfway between two f16
/// values that `x` itself was not halfway between.
///
/// f16's normal binades (|x| in [2⁻¹⁴, 2¹⁶)) take the bit path of [`round_bf16_from_f64`] with
/// 42 dropped bits ([`round_normal_on_bits`]), then a result past f16's largest value (65504) becomes infinity, the RNE
/// overflow; zeros, subnormals, larger values, infinities and NaN take the grid path (the f16
/// rounding of the exact merge was a tenth of the weight statistics' CPU on SmolLM2).
#[inline]
pub fn round_f16_from_f64(x: f64) -> f32 {
    match round_normal_on_bits(x, &F16_GRID) {
        Some(value) if value.abs() > F16_GRID.max_finite => f32::INFINITY.copysign(value as f32),
        Some(value) => value as f32,
        None => round_to_grid_f64(x, &F16_GRID),
    }
}

/// `x` rounded ties-to-even to `grid`'s significand precision on its bits, when its binade is one
/// of the grid's normal binades (else `None`): adding `2^(dropped − 1) − 1` plus the kept last bit
/// and clearing the dropped bits (a carry moves into the exponent, as rounding up a binade does).
/// The result may lie past the grid's largest value; overflow is the caller's.
#[inline]
fn round_normal_on_bits(x: f64, grid: &Grid) -> Option<f64> {
    let dropped = (53 - grid.precision) as u32;
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7FF) as i32;
    if !(1023 + grid.min_exp..=1023 + grid.max_exp).contains(&biased) {
        return None;
    }
    let kept_lsb = (bits >> dropped) & 1;
    let rounded = (bits + ((1u64 << (dropped - 1)) - 1) + kept_lsb) & !((1u64 << dropped) - 1);
    Some(f64::from_bits(rounded))
}

/// Round an f64 to the nearest bf16 in a single rounding (RNE, overflow to ±inf), widened to f32.
///
/// Values whose binade is one of bf16's normal binades (|x| in [2⁻¹²⁶, 2¹²⁸)) take a bit path:
/// ties-to-even on the 45 significand bits bf16 drops, by adding `2⁴⁴ − 1` plus the kept last
/// bit and clearing them (a carry moves into the exponent, as rounding up a binade does). The
/// result has at most 8 significant bits, so its f32 conversion is exact, except that 2¹²⁸ (a
/// round-up past bf16's largest value) converts to infinity, the RNE overflow. That is
/// [`round_to_grid_f64`]'s value without its division and branches (the bf16 rounding of the
/// exact merge was 7 % of a default check's CPU); zeros, subnormals, infinities and NaN take the
/// grid path.
#[inline]
pub fn round_bf16_from_f64(x: f64) -> f32 {
    match round_normal_on_bits(x, &BF16_GRID) {
        Some(value) => value as f32,
        None => round_to_grid_f64(x, &BF16_GRID),
    }
}

/// Spacing of the f16 grid at `|x|`: `2^(e − 10)` with `e = floor(log2 |x|)` clamped to the
/// format's exponent range, so zero and subnormals get the subnormal spacing `2⁻²⁴` and values
/// beyond [`F16_MAX`] get the spacing of the top binade (`32`). NaN and ±inf give NaN.
pub fn ulp_f16(x: f32) -> f32 {
    ulp_on_grid(x, &F16_GRID)
}

/// Spacing of the bf16 grid at `|x|` (`2^(e − 7)`, subnormal spacing `2⁻¹³³`); see [`ulp_f16`].
pub fn ulp_bf16(x: f32) -> f32 {
    ulp_on_grid(x, &BF16_GRID)
}

/// Spacing of the f32 grid at `|x|` (`2^(e − 23)`, subnormal spacing `2⁻¹⁴⁹`); see [`ulp_f16`].
pub fn ulp_f32(x: f32) -> f32 {
    ulp_on_grid(x, &F32_GRID)
}

/// The storage dtypes a merged weight can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatFormat {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`torch.float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`): f32's exponent range with an 8-bit significand.
    Bf16,
}

impl FloatFormat {
    /// The torch dtype name config.json uses (`dtype` / `torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatFormat::F32 => "float32",
            FloatFormat::F16 => "float16",
            FloatFormat::Bf16 => "bfloat16",
        }
    }

    /// Round an f32 to this format (RNE, overflow to ±inf), widened back to f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatFormat::F32 => x,
            FloatFormat::F16 => round_f16(x),
            FloatFormat::Bf16 => round_bf16(x),
        }
    }

    /// [`Self::round`] of every value of `src` into `out` (of the same length), with the same
    /// bits. f16 goes eight values at a time through F16C's conversions where the processor has
    /// them: the `half` crate rounds each value through those very instructions (IEEE
    /// round-to-nearest-even, NaN kept quiet), one call per value. The weight statistics round
    /// every base weight this way, once per precision.
    pub fn round_slice(self, src: &[f32], out: &mut [f32]) {
        assert_eq!(src.len(), out.len(), "round_slice lengths");
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self == FloatFormat::F16 && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the processor supports F16C (and so AVX), checked just above.
            done = unsafe { round_f16_groups_f16c(src, out) };
        }
        round_values(self, &src[done..], &mut out[done..])
    }

    /// [`Self::round_from_f64`] of every value of `src` into `out` (same length), in an AVX2 copy
    /// where the processor has one ([`crate::simd`]): the bit path is branch-free selects the
    /// compiler vectorizes there, so the same bits as one value at a time.
    pub fn round_slice_from_f64(self, src: &[f64], out: &mut [f32]) {
        assert_eq!(src.len(), out.len(), "round_slice_from_f64 lengths");
        round_values_from_f64(self, src, out)
    }

    /// Whether every value of `other` is a value of this format, so rounding it here is the
    /// identity: f32 holds f16 and bf16 (wider exponent and mantissa), each format holds itself;
    /// f16 and bf16 hold neither of each other.
    pub fn holds(self, other: FloatFormat) -> bool {
        self == other || self == FloatFormat::F32
    }

    /// Round an f64 to this format in a single rounding, widened to f32.
    #[inline]
    pub fn round_from_f64(self, x: f64) -> f32 {
        match self {
            FloatFormat::F32 => round_f32_from_f64(x),
            FloatFormat::F16 => round_f16_from_f64(x),
            FloatFormat::Bf16 => round_bf16_from_f64(x),
        }
    }

    /// Spacing of this format's grid at `|x|` (see [`ulp_f16`] for the edge cases).
    pub fn ulp(self, x: f32) -> f32 {
        ulp_on_grid(x, self.grid())
    }

    /// Largest finite value of this format.
    pub fn max_finite(self) -> f32 {
        match self {
            FloatFormat::F32 => F32_MAX,
            FloatFormat::F16 => F16_MAX,
            FloatFormat::Bf16 => BF16_MAX,
        }
    }

    /// Unit roundoff `u = 2^−p` (half an ulp at 1.0): the bound on the relative error of one
    /// rounding in the normal range. `2⁻²⁴` for f32, `2⁻¹¹` for f16, `2⁻⁸` for bf16.
    pub fn unit_roundoff(self) -> f32 {
        // 2^-p is exact in f32 for every p used here.
        exp2i(-self.grid().precision) as f32
    }

    /// Lower-case dtype name as users write it: `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            FloatFormat::F32 => "f32",
            FloatFormat::F16 => "f16",
            FloatFormat::Bf16 => "bf16",
        }
    }

    fn grid(self) -> &'static Grid {
        match self {
            FloatFormat::F32 => &F32_GRID,
            FloatFormat::F16 => &F16_GRID,
            FloatFormat::Bf16 => &BF16_GRID,
        }
    }

    /// Bit pattern of `x` rounded to this format, mapped to a signed integer that is monotone in
    /// the value: consecutive representable values differ by one, and ±0 both map to 0.
    fn ordinal(self, x: f32) -> i64 {
        let (bits, sign_bit) = match self {
            FloatFormat::F32 => (u64::from(x.to_bits()), 1u64 << 31),
            FloatFormat::F16 => (u64::from(f16::from_f32(x).to_bits()), 1u64 << 15),
            FloatFormat::Bf16 => (u64::from(bf16::from_f32(x).to_bits()), 1u64 << 15),
        };
        // Magnitudes are below 2^31, so the conversions cannot fail; saturate rather than unwrap.
        let magnitude = i64::try_from(bits & (sign_bit - 1)).unwrap_or(i64::MAX);
        if bits & sign_bit != 0 {
            -magnitude
        } else {
            magnitude
        }
    }
}

/// Number of representable `fmt` values one has to step over to get from `a` to `b`
/// (0 when they are equal, 1 for neighbours; +0 and −0 count as the same value; ±inf is one step
/// beyond the largest finite value). Both inputs are first rounded to `fmt`, so the distance is
/// measured on that format's grid. Returns `None` if either is NaN.
///
/// Used to compare our merged weights with PEFT goldens: "max 1 ulp apart" is `<= Some(1)`.
pub fn ulp_distance(a: f32, b: f32, fmt: FloatFormat) -> Option<u64> {
    if a.is_nan() || b.is_nan() {
        return None;
    }
    Some(fmt.ordinal(a).abs_diff(fmt.ordinal(b)))
}

/// `2^e` as an f64 for `e` in f64's normal range (all uses here are within ±200).
#[inline]
fn exp2i(e: i32) -> f64 {
    // The biased exponent is in 1..=2046 for e in -1022..=1023; clamp keeps the bit trick valid.
    let biased = (e.clamp(-1022, 1023) + 1023) as u64;
    f64::from_bits(biased << 52)
}

/// `floor(log2 |x|)` for finite non-zero `x`; f64 subnormals report −1023 (below every grid here).
#[inline]
fn binade_f64(x: f64) -> i32 {
    let biased = ((x.to_bits() >> 52) & 0x7FF) as i32;
    biased - 1023
}

/// Quantum (ulp) of `grid` for a magnitude whose binade is `e`.
#[inline]
fn quantum(e: i32, grid: &Grid) -> f64 {
    exp2i(e.clamp(grid.min_exp, grid.max_exp) - (grid.precision - 1))
}

/// Round `x` to the nearest value on `grid` with ties to even, in one step.
///
/// `|x| / q` is exact (division by a power of two that stays in f64's normal range),
/// `round_ties_even` is exact, and `r · q` is exact because it is a value of the grid. Ties-to-even
/// on the integer `r` is ties-to-even on the significand because `q` is the last significand bit.
/// A result past the largest finite value is the RNE overflow to infinity.
#[inline]
fn round_to_grid_f64(x: f64, grid: &Grid) -> f32 {
    if !x.is_finite() || x == 0.0 {
        return x as f32;
    }
    let magnitude = x.abs();
    let q = quantum(binade_f64(magnitude), grid);
    let rounded = round_ties_even_nonnegative(magnitude / q) * q;
    let result = if rounded > grid.max_finite {
        f64::INFINITY
    } else {
        rounded
    };
    (result as f32).copysign(x as f32)
}

/// Ties-to-even rounding of a non-negative f64 without a libm call (x86-64 baseline has no
/// `roundsd`): adding and subtracting 2⁵² leaves the nearest integer under the default
/// round-to-nearest-even mode. Values ≥ 2⁵² are integers already.
#[inline]
fn round_ties_even_nonnegative(y: f64) -> f64 {
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    if y < TWO_52 { (y + TWO_52) - TWO_52 } else { y }
}

fn ulp_on_grid(x: f32, grid: &Grid) -> f32 {
    if !x.is_finite() {
        return f32::NAN;
    }
    let magnitude = f64::from(x.abs());
    let e = if magnitude == 0.0 {
        grid.min_exp
    } else {
        binade_f64(magnitude)
    };
    quantum(e, grid) as f32
}

/// The whole groups of eight of `src` rounded to f16 and widened back through F16C; returns how
/// many values it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn round_f16_groups_f16c(src: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let groups = src.len() / 8;
    for g in 0..groups {
        let (from, to) = (&src[g * 8..g * 8 + 8], &mut out[g * 8..g * 8 + 8]);
        // SAFETY: both slices hold exactly eight f32 (bounds-checked above); unaligned forms.
        unsafe {
            let half = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(from.as_ptr()));
            _mm256_storeu_ps(to.as_mut_ptr(), _mm256_cvtph_ps(half));
        }
    }
    groups * 8
}

avx2_copy! {
    /// `format`'s rounding of each value of `src` into `out`.
    fn round_values(format: FloatFormat, src: &[f32], out: &mut [f32]) {
        match format {
            FloatFormat::F32 => out.copy_from_slice(src),
            FloatFormat::F16 => out.iter_mut().zip(src).for_each(|(o, x)| *o = round_f16(*x)),
            FloatFormat::Bf16 => out.iter_mut().zip(src).for_each(|(o, x)| *o = round_bf16(*x)),
        }
    }
}

avx2_copy! {
    /// `format`'s single rounding of each f64 of `src` into `out`.
    fn round_values_from_f64(format: FloatFormat, src: &[f64], out: &mut [f32]) {
        let pairs = out.iter_mut().zip(src);
        match format {
            FloatFormat::F32 => pairs.for_each(|(o, x)| *o = round_f32_from_f64(*x)),
            FloatFormat::F16 => pairs.for_each(|(o, x)| *o = round_f16_from_f64(*x)),
            FloatFormat::Bf16 => pairs.for_each(|(o, x)| *o = round_bf16_from_f64(*x)),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The slice roundings (F16C groups, AVX2 copies, scalar tails) give the bits of rounding one
    /// value at a time, on ties, subnormals, overflow, infinities and NaN, at lengths that leave
    /// tails.
    #[test]
    fn slice_rounding_matches_one_value_at_a_time() {
        let mut values: Vec<f64> = vec![
            0.0,
            -0.0,
            1.0 + 2f64.powi(-11),
            1.0 + 3.0 * 2f64.powi(-11),
            1.0 + 2f64.powi(-8),
            65504.0,
            65519.99,
            65520.0,
            -1e6,
            6e-8,
            3e-8,
            1e-40,
            3.4e38,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let unit = (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            values.push(unit * 2f64.powi((seed % 40) as i32 - 20));
        }
        for len in [values.len(), values.len() - 3, 7] {
            let wide = &values[..len];
            let narrow: Vec<f32> = wide.iter().map(|v| *v as f32).collect();
            for fmt in [FloatFormat::F32, FloatFormat::F16, FloatFormat::Bf16] {
                let mut out = vec![0f32; len];
                fmt.round_slice(&narrow, &mut out);
                let one: Vec<u32> = narrow.iter().map(|v| fmt.round(*v).to_bits()).collect();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    one,
                    "{fmt:?}"
                );
                fmt.round_slice_from_f64(wide, &mut out);
                let one: Vec<u32> = wide
                    .iter()
                    .map(|v| fmt.round_from_f64(*v).to_bits())
                    .collect();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    one,
                    "{fmt:?} f64"
                );
            }
        }
    }

    #[test]
    fn bf16_bit_path_equals_the_grid_rounding() {
        bit_path_equals_the_grid_rounding(&super::BF16_GRID, super::round_bf16_from_f64);
    }

    #[test]
    fn f16_bit_path_equals_the_grid_rounding() {
        bit_path_equals_the_grid_rounding(&super::F16_GRID, super::round_f16_from_f64);
    }

    /// `fast` against the grid rounding on both sides of the format's largest value, its smallest
    /// normal, a pseudo-random spread over every binade and every exact tie of its significands.
    fn bit_path_equals_the_grid_rounding(format: &super::Grid, fast: fn(f64) -> f32) {
        let grid = |x: f64| super::round_to_grid_f64(x, format);
        let max = format.max_finite;
        let bits = format.precision;
        let (min_exp, max_exp) = (format.min_exp, format.max_exp);
        let mut values = vec![
            max,
            max * (1.0 + 2f64.powi(-bits - 1)),
            max * (1.0 + 2f64.powi(-bits - 1)) * (1.0 + 1e-12),
            max * (1.0 + 2f64.powi(-bits - 1)) * (1.0 - 1e-12),
            2f64.powi(min_exp),
            2f64.powi(min_exp) * (1.0 - 1e-12),
            2f64.powi(max_exp) * (2.0 - 2f64.powi(-bits)),
            2f64.powi(max_exp + 1),
            1.0 + 2f64.powi(-bits),
            1.0 + 3.0 * 2f64.powi(-bits),
            1.0 + 2f64.powi(-bits) + 2f64.powi(-40),
            (2.0 - 2f64.powi(-bits - 1)) * 0.5,
        ];
        // A fixed pseudo-random spread over every binade, and exact ties around each.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let span = 2 * (max_exp - min_exp + 14);
            let exponent = (state % span as u64) as i32 + min_exp - 14;
            let mantissa = 1.0 + (state >> 11) as f64 / (1u64 << 53) as f64;
            values.push(mantissa * 2f64.powi(exponent));
            // The tie just above the mantissa's rounding to `bits` significant bits.
            let scale = 2f64.powi(bits - 1);
            let tie = (mantissa * scale).floor() / scale + 2f64.powi(-bits);
            values.push(tie * 2f64.powi(exponent.clamp(min_exp, max_exp)));
        }
        // Every exact tie of the significands, in low, middle and top binades.
        let top = 1u32 << bits;
        for e in [min_exp, min_exp / 3, -1, 0, 1, max_exp / 2, max_exp] {
            for k in top / 2..top {
                values.push((f64::from(k) + 0.5) * 2f64.powi(e - bits + 1));
            }
        }
        for x in values {
            for v in [x, -x] {
                assert_eq!(fast(v).to_bits(), grid(v).to_bits(), "x = {v:e}");
            }
        }
    }

    use super::*;

    /// `holds` is exact: every non-NaN bf16 and f16 value rounds to itself in each format said to
    /// hold it, and f16/bf16 each have values the other moves.
    #[test]
    fn a_format_that_holds_another_rounds_its_values_to_themselves() {
        let formats = [FloatFormat::F32, FloatFormat::F16, FloatFormat::Bf16];
        let values = |f: FloatFormat| -> Vec<f32> {
            (0..=u16::MAX)
                .map(|bits| match f {
                    FloatFormat::F16 => half::f16::from_bits(bits).to_f32(),
                    _ => half::bf16::from_bits(bits).to_f32(),
                })
                .filter(|v| !v.is_nan())
                .collect()
        };
        for stored in [FloatFormat::F16, FloatFormat::Bf16] {
            for target in formats {
                let moved = values(stored)
                    .iter()
                    .filter(|v| target.round(**v).to_bits() != v.to_bits())
                    .count();
                assert_eq!(moved == 0, target.holds(stored), "{stored:?} in {target:?}");
            }
        }
        assert!(FloatFormat::F32.holds(FloatFormat::F32));
    }

    #[test]
    fn max_finite_constants_are_the_bit_patterns() {
        assert_eq!(F16_MAX.to_bits(), f16::from_bits(0x7BFF).to_f32().to_bits());
        assert_eq!(
            BF16_MAX.to_bits(),
            bf16::from_bits(0x7F7F).to_f32().to_bits()
        );
        assert_eq!(F16_MAX, f16::MAX.to_f32());
        assert_eq!(BF16_MAX, bf16::MAX.to_f32());
    }

    #[test]
    fn round_f16_is_rne_with_overflow_to_inf() {
        // 1 + 2^-11 is the tie between 1 and 1 + 2^-10: goes to even (1.0).
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0);
        // 1 + 3·2^-11 is the tie between 1 + 2^-10 and 1 + 2^-9: goes to even (1 + 2^-9).
        assert_eq!(round_f16(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9));
        assert_eq!(round_f16(65519.0), 65504.0);
        assert_eq!(round_f16(65520.0), f32::INFINITY);
        assert_eq!(round_f16(-65520.0), f32::NEG_INFINITY);
        assert_eq!(round_f16(2f32.powi(-25)), 0.0); // tie with the smallest subnormal → 0
        assert_eq!(round_f16(2f32.powi(-25) * 1.5), 2f32.powi(-24));
        assert!(round_f16(f32::NAN).is_nan());
        assert!(round_f16(-0.0).is_sign_negative());
    }

    #[test]
    fn round_bf16_is_rne_with_overflow_to_inf() {
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-f32::MAX), f32::NEG_INFINITY);
        assert_eq!(round_bf16(BF16_MAX), BF16_MAX);
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn double_rounding_differs_from_single_rounding() {
        // x = 1 + 2^-11 + 2^-40: just above the f16 tie between 1 and 1 + 2^-10, so the correct
        // f16 is 1 + 2^-10. Rounding to f32 first drops 2^-40 and lands on the tie, which then
        // goes to even (1.0).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let naive = round_f16(x as f32);
        assert_eq!(naive, 1.0);
        assert_eq!(round_f16_from_f64(x), 1.0 + 2f32.powi(-10));
        // The same trap for bf16.
        let y = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(round_bf16(y as f32), 1.0);
        assert_eq!(round_bf16_from_f64(y), 1.0 + 2f32.powi(-7));
        // And in the f16 subnormal range.
        let z = 2f64.powi(-25) + 2f64.powi(-60);
        assert_eq!(round_f16(z as f32), 0.0);
        assert_eq!(round_f16_from_f64(z), 2f32.powi(-24));
    }

    #[test]
    fn single_rounding_agrees_with_half_on_f32_inputs() {
        // For inputs that are already f32, one rounding is what `half` does.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f32::from_bits((state >> 32) as u32);
            let d = f64::from(x);
            if x.is_nan() {
                assert!(round_f16_from_f64(d).is_nan() && round_bf16_from_f64(d).is_nan());
                continue;
            }
            assert_eq!(
                round_f16_from_f64(d).to_bits(),
                round_f16(x).to_bits(),
                "{x:e}"
            );
            assert_eq!(
                round_bf16_from_f64(d).to_bits(),
                round_bf16(x).to_bits(),
                "{x:e}"
            );
            assert_eq!(
                round_to_grid_f64(d, &F32_GRID).to_bits(),
                x.to_bits(),
                "{x:e}"
            );
        }
    }

    #[test]
    fn single_rounding_from_f64_matches_exact_midpoint_rule() {
        // For every pair of adjacent positive finite f16 values, probe just below, at and just
        // above their midpoint in f64.
        let values: Vec<f32> = (0..0x7C00u16).map(|b| f16::from_bits(b).to_f32()).collect();
        for pair in values.windows(2) {
            let (lo, hi) = (f64::from(pair[0]), f64::from(pair[1]));
            let mid = (lo + hi) / 2.0;
            let eps = mid * 2f64.powi(-45) + 2f64.powi(-1000);
            assert_eq!(f64::from(round_f16_from_f64(mid - eps)), lo);
            assert_eq!(f64::from(round_f16_from_f64(mid + eps)), hi);
            let lo_even = f16::from_f64(lo).to_bits().is_multiple_of(2);
            let want = if lo_even { lo } else { hi };
            assert_eq!(f64::from(round_f16_from_f64(mid)), want);
            assert_eq!(f64::from(round_f16_from_f64(-mid)), -want);
        }
        // Overflow: the midpoint between F16_MAX and 2^16 goes to infinity (2^16 is "even").
        assert_eq!(round_f16_from_f64(65519.999), 65504.0);
        assert_eq!(round_f16_from_f64(65520.0), f32::INFINITY);
        assert_eq!(round_bf16_from_f64(1e300), f32::INFINITY);
        assert_eq!(round_f32_from_f64(-1e300), f32::NEG_INFINITY);
        assert_eq!(round_bf16_from_f64(1e-300), 0.0);
        assert!(round_bf16_from_f64(-1e-300).is_sign_negative());
        assert!(round_f16_from_f64(f64::NAN).is_nan());
        assert_eq!(round_f16_from_f64(f64::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn ulp_is_the_spacing_of_each_grid() {
        assert_eq!(ulp_f16(1.0), 2f32.powi(-10));
        assert_eq!(ulp_f16(1.999), 2f32.powi(-10));
        assert_eq!(ulp_f16(-2.0), 2f32.powi(-9));
        assert_eq!(ulp_f16(0.0), 2f32.powi(-24));
        assert_eq!(ulp_f16(1e-7), 2f32.powi(-24));
        assert_eq!(ulp_f16(F16_MAX), 32.0);
        assert_eq!(ulp_f16(1e6), 32.0);
        assert_eq!(ulp_bf16(1.0), 2f32.powi(-7));
        assert_eq!(ulp_bf16(0.0), f32::from_bits(1 << 16)); // 2^-133
        assert_eq!(ulp_f32(1.0), f32::EPSILON);
        assert_eq!(ulp_f32(0.0), f32::from_bits(1));
        assert_eq!(ulp_f32(f32::MIN_POSITIVE), f32::from_bits(1));
        assert_eq!(ulp_f32(f32::MAX), 2f32.powi(104));
        assert!(ulp_f32(f32::INFINITY).is_nan());
        // The ulp is the distance to the next value up, wherever that is on the grid.
        for bits in 0..0x7BFFu16 {
            let v = f16::from_bits(bits).to_f32();
            let next = bits + 1;
            assert_eq!(f16::from_bits(next).to_f32() - v, ulp_f16(v), "{v:e}");
        }
    }

    #[test]
    fn format_methods_are_consistent() {
        for fmt in [FloatFormat::F32, FloatFormat::F16, FloatFormat::Bf16] {
            assert_eq!(fmt.round(fmt.max_finite()), fmt.max_finite());
            assert_eq!(fmt.ulp(1.0), 2.0 * fmt.unit_roundoff());
            assert_eq!(
                fmt.round_from_f64(1.0 / 3.0),
                fmt.round((1.0f64 / 3.0) as f32)
            );
        }
        assert_eq!(FloatFormat::F32.unit_roundoff(), 2f32.powi(-24));
        assert_eq!(FloatFormat::F16.unit_roundoff(), 2f32.powi(-11));
        assert_eq!(FloatFormat::Bf16.unit_roundoff(), 2f32.powi(-8));
        assert_eq!(FloatFormat::Bf16.name(), "bf16");
    }

    #[test]
    fn ulp_distance_counts_grid_steps() {
        let fmt = FloatFormat::Bf16;
        assert_eq!(ulp_distance(1.0, 1.0, fmt), Some(0));
        assert_eq!(ulp_distance(1.0, 1.0 + 2f32.powi(-7), fmt), Some(1));
        assert_eq!(
            ulp_distance(1.0 - 2f32.powi(-8), 1.0 + 2f32.powi(-7), fmt),
            Some(2)
        );
        assert_eq!(ulp_distance(0.0, -0.0, fmt), Some(0));
        let tiny = bf16::from_bits(1).to_f32();
        assert_eq!(ulp_distance(-tiny, tiny, fmt), Some(2));
        assert_eq!(ulp_distance(BF16_MAX, f32::INFINITY, fmt), Some(1));
        assert_eq!(ulp_distance(f32::NAN, 1.0, fmt), None);
        assert_eq!(
            ulp_distance(F16_MAX, -F16_MAX, FloatFormat::F16),
            Some(2 * 0x7BFF)
        );
        assert_eq!(
            ulp_distance(f32::MAX, -f32::MAX, FloatFormat::F32),
            Some(2 * 0x7F7F_FFFF)
        );
        // ulp(1) in f16 is 2^-10, so 1 + 2^-9 is two steps away; 1 + 2^-12 rounds to 1 first.
        assert_eq!(
            ulp_distance(1.0, 1.0 + 2f32.powi(-9), FloatFormat::F16),
            Some(2)
        );
        assert_eq!(
            ulp_distance(1.0, 1.0 + 2f32.powi(-12), FloatFormat::F16),
            Some(0)
        );
    }
}
