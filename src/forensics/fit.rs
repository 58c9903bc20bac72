//! The per-tensor measurements behind the forensics: the least-squares scale of the merged
//! change along the exact update, the same fit against the transposed update, residuals of named
//! hypotheses, and the rounding floor every residual is judged against. All sums in f64.

use crate::merge::float::FloatFormat;

/// The arrays of one adapter-changed tensor: base W, merged checkpoint M, exact merge W*.
pub struct TensorArrays<'a> {
    pub w: &'a [f32],
    pub m: &'a [f32],
    pub wstar: &'a [f64],
    pub rows: usize,
    pub cols: usize,
    /// The dtype M stores this tensor in.
    pub format: FloatFormat,
}

/// What the fit measured on one tensor (norms are Frobenius, absolute).
#[derive(Debug, Clone, Copy)]
pub struct BasicFit {
    /// ‖W* − W‖.
    pub delta_norm: f64,
    /// Rounding floor of W* in M's dtype (never zero, see [`floor_of`]).
    pub floor: f64,
    /// Rounding floor of W itself in M's dtype: what an unmerged copy of the base would show.
    pub base_floor: f64,
    /// ‖M − W*‖.
    pub residual: f64,
    /// ‖M − W‖.
    pub base_distance: f64,
    /// ŝ/s = ⟨M − W, ΔW⟩ / ⟨ΔW, ΔW⟩; None when ΔW is zero.
    pub scale_ratio: Option<f64>,
    /// ‖M − W − ŝ·ΔW‖.
    pub fit_residual: Option<f64>,
    /// The fit against ΔWᵀ for square tensors: (ratio, ‖M − W − t·ΔWᵀ‖).
    pub transposed: Option<(f64, f64)>,
    /// Entries of W* beyond the largest finite value of M's dtype.
    pub out_of_range: usize,
    /// NaN / ±Inf entries of M.
    pub nan: usize,
    pub inf: usize,
}

impl BasicFit {
    pub fn ratio(&self, residual: f64) -> f64 {
        residual / self.floor
    }
}

/// The floor a residual is divided by: the actual error of rounding `exact` once to `format`,
/// but never below a tenth of the nominal `u·‖x‖` (an exactly representable tensor, such as an
/// all-ones norm, has no rounding error and would make every ratio infinite).
pub fn floor_of(rounding_error: f64, norm: f64, format: FloatFormat) -> f64 {
    let nominal = 0.1 * format.unit_roundoff() as f64 * norm;
    rounding_error.max(nominal).max(f64::MIN_POSITIVE)
}

/// Measures a tensor. Returns None fits when M holds non-finite values (they are counted).
pub fn measure(a: &TensorArrays<'_>) -> BasicFit {
    let fmt = a.format;
    let max_finite = fmt.max_finite() as f64;
    let (mut dd, mut ed, mut ee) = (0.0f64, 0.0f64, 0.0f64);
    let (mut res2, mut floor2, mut star2) = (0.0f64, 0.0f64, 0.0f64);
    let (mut wfloor2, mut w2) = (0.0f64, 0.0f64);
    let (mut nan, mut inf, mut out_of_range) = (0usize, 0usize, 0usize);
    for ((&w, &m), &s) in a.w.iter().zip(a.m).zip(a.wstar) {
        if m.is_nan() {
            nan += 1;
        } else if m.is_infinite() {
            inf += 1;
        }
        if s.is_finite() && s.abs() > max_finite {
            out_of_range += 1;
        }
        let (w, m) = (w as f64, m as f64);
        let d = s - w;
        let e = m - w;
        dd += d * d;
        ed += e * d;
        ee += e * e;
        res2 += (m - s) * (m - s);
        let r = fmt.round_from_f64(s) as f64 - s;
        if r.is_finite() {
            floor2 += r * r;
        }
        star2 += s * s;
        let rw = fmt.round(w as f32) as f64 - w;
        if rw.is_finite() {
            wfloor2 += rw * rw;
        }
        w2 += w * w;
    }
    let floor = floor_of(floor2.sqrt(), star2.sqrt(), fmt);
    let base_floor = floor_of(wfloor2.sqrt(), w2.sqrt(), fmt);
    let finite = nan == 0 && inf == 0;
    let scale = (dd > 0.0 && finite).then(|| ed / dd);
    let fit_residual = scale.map(|s| {
        a.w.iter()
            .zip(a.m)
            .zip(a.wstar)
            .map(|((&w, &m), &x)| {
                let r = (m as f64 - w as f64) - s * (x - w as f64);
                r * r
            })
            .sum::<f64>()
            .sqrt()
    });
    let transposed = if a.rows == a.cols && finite && dd > 0.0 {
        Some(transposed_fit(a, dd))
    } else {
        None
    };
    BasicFit {
        delta_norm: dd.sqrt(),
        floor,
        base_floor,
        residual: res2.sqrt(),
        base_distance: ee.sqrt(),
        scale_ratio: scale,
        fit_residual,
        transposed,
        out_of_range,
        nan,
        inf,
    }
}

/// ⟨M − W, ΔWᵀ⟩ / ⟨ΔW, ΔW⟩ and the residual of that fit, for an n×n tensor.
fn transposed_fit(a: &TensorArrays<'_>, dd: f64) -> (f64, f64) {
    let n = a.rows;
    let delta_t = |i: usize, j: usize| a.wstar[j * n + i] - a.w[j * n + i] as f64;
    let mut et = 0.0f64;
    for i in 0..n {
        for j in 0..n {
            let e = a.m[i * n + j] as f64 - a.w[i * n + j] as f64;
            et += e * delta_t(i, j);
        }
    }
    let t = et / dd;
    let mut res2 = 0.0f64;
    for i in 0..n {
        for j in 0..n {
            let e = a.m[i * n + j] as f64 - a.w[i * n + j] as f64;
            let r = e - t * delta_t(i, j);
            res2 += r * r;
        }
    }
    (t, res2.sqrt())
}

/// ‖M − round(W + f·ΔW)‖ in M's dtype (with ΔWᵀ when `transposed`, square tensors only): the
/// distance to a hypothesis after the same rounding M went through. A small update can sit within
/// a few rounding floors of any scale, but after rounding the right hypothesis matches M almost
/// element for element and the wrong ones do not.
pub fn rounded_distance(a: &TensorArrays<'_>, factor: f64, transposed: bool) -> f64 {
    let n = a.cols;
    let mut sum = 0.0f64;
    for (i, (&w, &m)) in a.w.iter().zip(a.m).enumerate() {
        let j = if transposed { (i % n) * n + i / n } else { i };
        let delta = a.wstar[j] - a.w[j] as f64;
        let expected = a.format.round_from_f64(w as f64 + factor * delta) as f64;
        let d = m as f64 - expected;
        sum += d * d;
    }
    sum.sqrt()
}

/// ‖M − expected‖ for a hypothesis given element by element.
pub fn distance(m: &[f32], expected: impl Iterator<Item = f64>) -> f64 {
    m.iter()
        .zip(expected)
        .map(|(&m, x)| {
            let d = m as f64 - x;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// A hypothesis that cannot be modelled to the last bit (bitsandbytes double quantization, a
/// dequantization dtype) still explains a tensor when it removes all but this share of the
/// residual.
const EXPLAINED_SHARE: f64 = 0.2;

/// Whether a hypothesis explains a tensor: its residual is within the tolerance, or it removes
/// all but [`EXPLAINED_SHARE`] of the plain residual.
pub fn explained(ratio: f64, plain_ratio: f64, tolerance: f64) -> bool {
    ratio <= tolerance || ratio <= EXPLAINED_SHARE * plain_ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrays<'a>(
        w: &'a [f32],
        m: &'a [f32],
        wstar: &'a [f64],
        n: usize,
        format: FloatFormat,
    ) -> TensorArrays<'a> {
        TensorArrays {
            w,
            m,
            wstar,
            rows: n,
            cols: n,
            format,
        }
    }

    fn sample(n: usize) -> (Vec<f32>, Vec<f64>) {
        // Deterministic, irregular values: W of order 1, ΔW of order 1e-2, not symmetric.
        let w: Vec<f32> = (0..n * n)
            .map(|i| (i as f32 * 0.7381).sin() * 0.9 + 0.05)
            .collect();
        let wstar: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 + 0.01 * ((i * i) as f64 * 0.013).cos() + 0.003)
            .collect();
        (w, wstar)
    }

    #[test]
    fn a_correct_rounded_merge_sits_at_the_floor_with_unit_scale() {
        let (w, wstar) = sample(16);
        let m: Vec<f32> = wstar
            .iter()
            .map(|v| FloatFormat::Bf16.round_from_f64(*v))
            .collect();
        let fit = measure(&arrays(&w, &m, &wstar, 16, FloatFormat::Bf16));
        assert!((fit.ratio(fit.residual) - 1.0).abs() < 1e-12);
        assert!((fit.scale_ratio.unwrap() - 1.0).abs() < 0.05);
    }

    #[test]
    fn a_scaled_delta_is_recovered_and_fits_to_the_floor() {
        let (w, wstar) = sample(16);
        let m: Vec<f32> = w
            .iter()
            .zip(&wstar)
            .map(|(&w, &s)| (w as f64 + 4.0 * (s - w as f64)) as f32)
            .collect();
        let fit = measure(&arrays(&w, &m, &wstar, 16, FloatFormat::F32));
        assert!((fit.scale_ratio.unwrap() - 4.0).abs() < 1e-5);
        assert!(fit.ratio(fit.fit_residual.unwrap()) < 4.0);
        assert!(fit.ratio(fit.residual) > 1e4);
    }

    #[test]
    fn a_transposed_delta_fits_the_transpose_not_the_delta() {
        let n = 12;
        let (w, wstar) = sample(n);
        let mut m = vec![0.0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                m[i * n + j] =
                    (w[i * n + j] as f64 + wstar[j * n + i] - w[j * n + i] as f64) as f32;
            }
        }
        let fit = measure(&arrays(&w, &m, &wstar, n, FloatFormat::F32));
        let (t, res) = fit.transposed.unwrap();
        assert!((t - 1.0).abs() < 1e-5, "{t}");
        assert!(fit.ratio(res) < 4.0);
        assert!(fit.ratio(fit.fit_residual.unwrap()) > 100.0);
    }

    #[test]
    fn non_finite_values_are_counted_and_disable_the_fit() {
        let (w, wstar) = sample(4);
        let mut m: Vec<f32> = wstar.iter().map(|v| *v as f32).collect();
        m[0] = f32::NAN;
        m[1] = f32::INFINITY;
        let fit = measure(&arrays(&w, &m, &wstar, 4, FloatFormat::F16));
        assert_eq!((fit.nan, fit.inf), (1, 1));
        assert!(fit.scale_ratio.is_none() && fit.transposed.is_none());
    }

    #[test]
    fn floor_never_reaches_zero_for_representable_tensors() {
        let ones = vec![1.0f32; 8];
        let exact: Vec<f64> = vec![1.0; 8];
        let fit = measure(&arrays(&ones, &ones, &exact, 0, FloatFormat::Bf16));
        assert!(fit.floor > 0.0 && fit.base_floor > 0.0);
        assert_eq!(fit.residual, 0.0);
    }
}
