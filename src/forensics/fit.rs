//! The per-tensor measurements behind the forensics: the least-squares scale of the merged
//! change along the exact update, the same fit against the transposed update, residuals of named
//! hypotheses, and the rounding floor every residual is judged against. All sums in f64.
//!
//! The floor is the error of storing the exact merge in *the format M stores that tensor in*
//! ([`StoredFormat`]): a float dtype rounds element by element; a quantized GGUF tensor (Q8_0,
//! Q4_K, …) rounds block by block with ggml's reference quantizer, so a GGUF re-quantized after a
//! correct merge sits at one floor, like a correctly rounded bf16 merge.

use crate::io::checkpoint::TensorInfo;
use crate::merge::float::FloatFormat;
use crate::merge::ggml::{self, GgmlType};

/// The format M stores one tensor in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredFormat {
    /// f32, f16 or bf16: rounding to nearest even, element by element.
    Float(FloatFormat),
    /// A quantized ggml type lora-doctor quantizes bit-exactly (rows are whole blocks).
    Ggml(GgmlType),
}

impl StoredFormat {
    /// The format of a tensor of M, when it can be compared element-wise: a float dtype, or a
    /// quantized ggml type whose rows are whole blocks and which lora-doctor can quantize.
    pub fn of(info: &TensorInfo, ggml_type: Option<GgmlType>) -> Option<StoredFormat> {
        if let Some(f) = info.dtype.float_format() {
            return Some(StoredFormat::Float(f));
        }
        let ty = ggml_type?;
        let cols = *info.shape.last()?;
        let (block, _) = ty.layout()?;
        let probe = vec![0.0f32; block];
        (cols.is_multiple_of(block) && ggml::quantize(ty, &probe).is_ok())
            .then_some(StoredFormat::Ggml(ty))
    }

    /// `f32`, `bf16`, `q4_k`, …
    pub fn name(self) -> String {
        match self {
            StoredFormat::Float(f) => f.name().to_string(),
            StoredFormat::Ggml(t) => t.name().to_ascii_lowercase(),
        }
    }

    /// The dtype a quantized base is dequantized into before a merge stored in this format
    /// (llama.cpp computes in f32).
    pub fn load_dtype(self) -> FloatFormat {
        match self {
            StoredFormat::Float(f) => f,
            StoredFormat::Ggml(_) => FloatFormat::F32,
        }
    }

    /// A nominal relative error of one rounding: the unit roundoff of a float dtype, 2^-bits
    /// per weight for a block format (only used as a lower bound of the floor).
    fn unit_roundoff(self) -> f64 {
        match self {
            StoredFormat::Float(f) => f64::from(f.unit_roundoff()),
            StoredFormat::Ggml(t) => t.layout().map_or(1e-2, |(block, bytes)| {
                (-((bytes * 8) as f64 / block as f64)).exp2()
            }),
        }
    }

    /// The largest magnitude the format holds (block formats: no limit the fit can use).
    fn max_finite(self) -> f64 {
        match self {
            StoredFormat::Float(f) => f64::from(f.max_finite()),
            StoredFormat::Ggml(_) => f64::from(f32::MAX),
        }
    }

    /// `values` (rows of `cols`) as M would store them, read back as f64.
    pub fn store(self, values: impl Iterator<Item = f64>, cols: usize) -> Vec<f64> {
        match self {
            StoredFormat::Float(f) => values.map(|v| f64::from(f.round_from_f64(v))).collect(),
            StoredFormat::Ggml(ty) => {
                let row_f32: Vec<f32> = values.map(|v| v as f32).collect();
                let mut out = Vec::with_capacity(row_f32.len());
                for row in row_f32.chunks(cols.max(1)) {
                    // `StoredFormat::of` admitted only whole-block rows of a writable type.
                    match ggml::quantize(ty, row)
                        .and_then(|bytes| ggml::dequantize(ty, &bytes, row.len()))
                    {
                        Ok(back) => out.extend(back.into_iter().map(f64::from)),
                        Err(_) => out.extend(row.iter().map(|v| f64::from(*v))),
                    }
                }
                out
            }
        }
    }
}

/// The arrays of one adapter-changed tensor: base W, merged checkpoint M, exact merge W*.
pub struct TensorArrays<'a> {
    pub w: &'a [f32],
    pub m: &'a [f32],
    pub wstar: &'a [f64],
    pub rows: usize,
    pub cols: usize,
    /// The format M stores this tensor in.
    pub format: StoredFormat,
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
pub fn floor_of(rounding_error: f64, norm: f64, format: StoredFormat) -> f64 {
    let nominal = 0.1 * format.unit_roundoff() * norm;
    rounding_error.max(nominal).max(f64::MIN_POSITIVE)
}

/// Measures a tensor. Returns None fits when M holds non-finite values (they are counted).
pub fn measure(a: &TensorArrays<'_>) -> BasicFit {
    match a.format {
        StoredFormat::Float(f) => measure_with(
            a,
            |_, s| f64::from(f.round_from_f64(s)),
            |_, w| f64::from(f.round(w)),
        ),
        StoredFormat::Ggml(_) => {
            let star = a.format.store(a.wstar.iter().copied(), a.cols);
            let base = a.format.store(a.w.iter().map(|v| f64::from(*v)), a.cols);
            measure_with(a, |i, _| star[i], |i, _| base[i])
        }
    }
}

/// [`measure`] with the stored value of W*[i] and of W[i] given by `store_star` / `store_w`
/// (monomorphised: the float path keeps its element-wise rounding without a copy).
fn measure_with(
    a: &TensorArrays<'_>,
    store_star: impl Fn(usize, f64) -> f64,
    store_w: impl Fn(usize, f32) -> f64,
) -> BasicFit {
    let fmt = a.format;
    let max_finite = fmt.max_finite();
    let (mut dd, mut ed, mut ee) = (0.0f64, 0.0f64, 0.0f64);
    let (mut res2, mut floor2, mut star2) = (0.0f64, 0.0f64, 0.0f64);
    let (mut wfloor2, mut w2) = (0.0f64, 0.0f64);
    let (mut nan, mut inf, mut out_of_range) = (0usize, 0usize, 0usize);
    for (i, ((&w, &m), &s)) in a.w.iter().zip(a.m).zip(a.wstar).enumerate() {
        if m.is_nan() {
            nan += 1;
        } else if m.is_infinite() {
            inf += 1;
        }
        if s.is_finite() && s.abs() > max_finite {
            out_of_range += 1;
        }
        let stored_w = store_w(i, w);
        let (w, m) = (w as f64, m as f64);
        let d = s - w;
        let e = m - w;
        dd += d * d;
        ed += e * d;
        ee += e * e;
        res2 += (m - s) * (m - s);
        let r = store_star(i, s) - s;
        if r.is_finite() {
            floor2 += r * r;
        }
        star2 += s * s;
        let rw = stored_w - w;
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
    let target = a.w.iter().enumerate().map(|(i, &w)| {
        let j = if transposed { (i % n) * n + i / n } else { i };
        let delta = a.wstar[j] - a.w[j] as f64;
        w as f64 + factor * delta
    });
    stored_distance(a.m, a.format, target, a.cols)
}

/// ‖M − store(target)‖: the distance to a hypothesis after storing it as M stores the tensor.
pub fn stored_distance(
    m: &[f32],
    format: StoredFormat,
    target: impl Iterator<Item = f64>,
    cols: usize,
) -> f64 {
    match format {
        StoredFormat::Float(f) => distance(m, target.map(|v| f64::from(f.round_from_f64(v)))),
        StoredFormat::Ggml(_) => distance(m, format.store(target, cols).into_iter()),
    }
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
            format: StoredFormat::Float(format),
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
    fn a_requantized_merge_sits_at_the_floor_of_its_block_format() {
        let (w, wstar) = sample(64);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K] {
            let cols = 256;
            let rows = w.len() / cols;
            let format = StoredFormat::Ggml(ty);
            let m: Vec<f32> = format
                .store(wstar.iter().copied(), cols)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let a = TensorArrays {
                w: &w,
                m: &m,
                wstar: &wstar,
                rows,
                cols,
                format,
            };
            let fit = measure(&a);
            assert!((fit.ratio(fit.residual) - 1.0).abs() < 1e-9, "{ty:?}");
            // The same file judged as f16 would be hundreds of floors away.
            let as_f16 = TensorArrays {
                format: StoredFormat::Float(FloatFormat::F16),
                ..a
            };
            let f16 = measure(&as_f16);
            assert!(f16.ratio(f16.residual) > 10.0, "{ty:?}");
        }
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
