//! Tensors of the merged checkpoint the adapters do not change: they must equal the base up to
//! M's rounding. One that differs is either quantized like the changed tensors (a GGUF or
//! bitsandbytes round trip touches every linear layer) or evidence of another base.

use crate::io::checkpoint::decode_f32;
use crate::merge::engine::{MergeError, TensorJob};
use crate::merge::float::FloatFormat;

use super::Inputs;
use super::fit::{self, StoredFormat, explained};
use super::hypothesis::QuantHypothesis;

/// ‖M − W‖ over a tensor the adapters do not change, and M's non-finite values there.
pub(super) struct Untouched {
    pub(super) name: String,
    pub(super) ratio: f64,
    pub(super) nan: usize,
    pub(super) inf: usize,
    /// The quantized-base hypothesis chosen for the changed tensors explains this one too.
    pub(super) explained: bool,
}

/// Compares one untouched tensor of M with the base; None when it cannot be compared (absent,
/// another shape, not a float: the inventory reports those).
pub(super) fn compare(
    name: &str,
    input: &Inputs<'_>,
    hypothesis: Option<QuantHypothesis>,
) -> Result<Option<Untouched>, MergeError> {
    let (Some(bi), Some(mi)) = (input.base.info(name), input.merged.info(name)) else {
        return Ok(None);
    };
    let Some(format) = StoredFormat::of(mi, input.merged.ggml_type(name)) else {
        return Ok(None);
    };
    if bi.shape != mi.shape || !(bi.dtype.is_float() || input.base.ggml_type(name).is_some()) {
        return Ok(None);
    }
    let raw_comparable = input.base.gguf().is_none() && input.merged.gguf().is_none();
    let (ratio, nan, inf, floor) = match format {
        StoredFormat::Float(f) if raw_comparable => match streamed_distance(name, input, f)? {
            Some(measured) => measured,
            None => return Ok(None),
        },
        _ => {
            // Whole tensors, read through the checkpoint: a block format cannot be compared in
            // arbitrary chunks, and a GGUF's raw q/k rows are in llama.cpp's order.
            let w = input.base.read_f32(name)?;
            let m = input.merged.read_f32(name)?;
            let cols = mi.shape.last().copied().unwrap_or(1);
            let stored = format.store(w.iter().map(|v| f64::from(*v)), cols);
            let (mut r2, mut w2) = (0.0f64, 0.0f64);
            for (&w, s) in w.iter().zip(&stored) {
                r2 += (s - f64::from(w)).powi(2);
                w2 += f64::from(w).powi(2);
            }
            let floor = fit::floor_of(r2.sqrt(), w2.sqrt(), format);
            let d = fit::distance(&m, w.iter().map(|v| f64::from(*v)));
            let nan = m.iter().filter(|v| v.is_nan()).count();
            let inf = m.iter().filter(|v| v.is_infinite()).count();
            (d / floor, nan, inf, floor)
        }
    };
    let mut explained_by_quant = false;
    if ratio > input.tolerance
        && let Some(h) = hypothesis
        && let [rows, cols] = bi.shape[..]
    {
        let w = input.base.read_f32(name)?;
        let m = input.merged.read_f32(name)?;
        let job = TensorJob {
            module: name.trim_end_matches(".weight").to_string(),
            tensor: name.to_string(),
            output: name.to_string(),
            rows,
            cols,
            sources: Vec::new(),
            growth: None,
        };
        // An untouched tensor has no update: both hypotheses reduce to dequant(q(W)) (a GGUF
        // round trip quantizes every linear layer, targeted or not).
        let load_dtype = if h.requantized {
            FloatFormat::F32
        } else {
            format.load_dtype()
        };
        if let Some(q) = h.apply(&job, &w, load_dtype)? {
            let r = fit::distance(&m, q.iter().map(|v| *v as f64)) / floor;
            explained_by_quant = explained(r, ratio, input.tolerance);
        }
    }
    Ok(Some(Untouched {
        name: name.to_string(),
        ratio,
        nan,
        inf,
        explained: explained_by_quant,
    }))
}

/// ‖M − W‖ / floor streamed in chunks for a float M, with M's NaN/Inf counts and the floor; None
/// when a dtype has no fixed element size.
fn streamed_distance(
    name: &str,
    input: &Inputs<'_>,
    format: FloatFormat,
) -> Result<Option<(f64, usize, usize, f64)>, MergeError> {
    let (Some(bi), Some(mi)) = (input.base.info(name), input.merged.info(name)) else {
        return Ok(None);
    };
    // Streamed in chunks: the largest untouched tensor is usually the embedding matrix, and two
    // f32 copies of it would dominate the run's peak memory.
    let (bw, mw) = match (bi.dtype.bytes_per_element(), mi.dtype.bytes_per_element()) {
        (Some(b), Some(m)) => (b, m),
        _ => return Ok(None),
    };
    let (_, base_bytes) = input.base.raw(name)?;
    let (_, merged_bytes) = input.merged.raw(name)?;
    const CHUNK: usize = 1 << 20;
    let (mut d2, mut r2, mut w2, mut nan, mut inf) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    for (bc, mc) in base_bytes
        .chunks(CHUNK * bw)
        .zip(merged_bytes.chunks(CHUNK * mw))
    {
        let w = decode_f32(bi, bc)?;
        let m = decode_f32(mi, mc)?;
        for (&w, &m) in w.iter().zip(&m) {
            if m.is_nan() {
                nan += 1;
            } else if m.is_infinite() {
                inf += 1;
            }
            let d = m as f64 - w as f64;
            d2 += d * d;
            let r = format.round(w) as f64 - w as f64;
            if r.is_finite() {
                r2 += r * r;
            }
            w2 += w as f64 * w as f64;
        }
    }
    input.base.release_tensor(name);
    input.merged.release_tensor(name);
    let floor = fit::floor_of(r2.sqrt(), w2.sqrt(), StoredFormat::Float(format));
    Ok(Some((d2.sqrt() / floor, nan, inf, floor)))
}
