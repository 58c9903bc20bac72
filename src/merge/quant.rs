//! Block quantizers for the formats a merged weight is shipped in, bit-exact with the tools that
//! write them: ggml `Q8_0`/`Q4_0`/`Q4_1` (as written by gguf-py and `convert_hf_to_gguf.py`),
//! bitsandbytes `nf4`/`fp4` 4-bit blockwise quantization (its CUDA kernel and its CPU reference,
//! see [`BnbBackend`]), and bitsandbytes LLM.int8 row-wise int8.
//!
//! The formulas are spec'd in merge-semantics.md §4 (bitsandbytes) and §5.5 (ggml), with the
//! upstream file and line for every step. Goldens from the real tools live in
//! `fixtures/goldens/quant/` (made by `fixtures/gen/quant.py` with gguf-py 0.19 and bitsandbytes
//! 0.50 on CPU) and the tests at the bottom of this file require identical bytes and identical
//! dequantized bits.
//!
//! What is deliberately **not** modelled:
//! - bitsandbytes double quantization (`compress_statistics=True`, §4.4). We quantize merged weights
//!   to measure what quantization does to them, with `compress_statistics=False`; the 8-bit
//!   re-quantization of `absmax` adds a second, smaller error, and its `offset = mean(absmax)`
//!   depends on the device's summation order, so it could not be reproduced bit for bit anyway.
//!   To read a double-quantized checkpoint, dequantize its `absmax` first and pass the f32 values.
//! - ggml importance-matrix quantization (`quantize_row_q4_x_impl`), which only runs with an
//!   imatrix; without one ggml and gguf-py use the `_ref` bodies reproduced here.
//!
//! Non-finite inputs are not an error (a merged weight with NaN is a finding elsewhere). They
//! follow the reproduced implementation literally, so the result is defined and deterministic:
//! - ggml: `Q8_0`'s `amax` uses ggml's `MAX(a, b) = a > b ? a : b`, `Q4_0`/`Q4_1` skip NaN in their
//!   `<`/`>` scans (gguf-py's numpy reductions propagate NaN instead, so blocks with NaN may differ
//!   from gguf-py). An infinite element makes the f32 scale infinite, `id = 0`, finite elements
//!   code 0 (Q4_0: 8) and the stored f16 scale ±inf. A finite block whose scale exceeds
//!   [`F16_MAX`](crate::merge::float::F16_MAX) also stores an infinite f16 scale (as ggml and
//!   gguf-py do), so it dequantizes to ±inf/NaN.
//! - bitsandbytes 4-bit, CUDA: `absmax` uses `fmaxf`, which skips NaN; a NaN scaled value fails
//!   every strict `>` and gets code 0. CPU: torch's `max` and `clamp` propagate NaN into `absmax`
//!   and `bucketize` puts NaN in the last bucket (NF4 code 15, FP4 code 3). With an infinite
//!   `absmax` both scale by 0: finite elements quantize as 0.0, infinite ones as NaN.
//! - int8: an f16 overflow (|w| ≥ 65520) makes `SCB = inf`, the scale 0 and every code 0; the NaN
//!   of `0 · inf` (also from an all-zero row) converts to code 0, as torch does on x86.
//!
//! Parallelism: blocks are independent, so rayon splits the work by block (or by row for int8) and
//! every output element is computed by the same sequential code whatever the thread count.

use crate::merge::float::{FloatFormat, round_f16};
use half::f16;
use rayon::prelude::*;

/// Elements per ggml `Q8_0`/`Q4_0`/`Q4_1` block (`QK8_0`, `QK4_0`, `QK4_1`).
pub const GGML_QK: usize = 32;
/// Bytes per `Q8_0` block: `{f16 d; i8 qs[32]}`.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes per `Q4_0` block: `{f16 d; u8 qs[16]}`.
pub const Q4_0_BLOCK_BYTES: usize = 18;
/// Bytes per `Q4_1` block: `{f16 d; f16 m; u8 qs[16]}`.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Default bitsandbytes 4-bit block size (`quantize_4bit`, `Params4bit`).
pub const BNB_4BIT_BLOCKSIZE: usize = 64;

/// The NF4 code, index 0..15: the f32 values of `bitsandbytes.functional.get_4bit_type("nf4")`
/// and CUDA's `nf4_dequantization_lut` (§4.1), written as the shortest decimals that round-trip.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The FP4 (E2M1, bias 2) code as CUDA dequantizes it: `fp4_dequantization_lut[v & 7]` times
/// `1 − 2·(v >> 3)`, so codes 8..15 are the exact negations of 0..7 (code 8 is −0.0).
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_33,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_3,
    -0.666_666_7,
    -1.0,
    -0.333_333_33,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// The constant `int8_vectorwise_dequant` multiplies by, `7.874015718698502e-3` in bitsandbytes'
/// source: as an f32 it is `fl32(1/127)` (`0x3C010204`).
pub const INT8_DEQUANT_SCALE: f32 = 0.007_874_016;

/// Blocks handed to one rayon task; smaller inputs run on the calling thread.
const PAR_MIN_BLOCKS: usize = 512;

/// Why a tensor cannot be quantized or a quantized buffer cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// ggml quantizes whole rows into 32-element blocks; `convert_hf_to_gguf.py` falls back to F16
    /// for such tensors, so callers decide what to do.
    #[error("row length {len} is not a multiple of the `{format}` block size {block}")]
    RowNotBlockAligned {
        format: &'static str,
        len: usize,
        block: usize,
    },
    /// A quantized byte buffer is not a whole number of blocks.
    #[error("`{format}` data of {got} bytes is not a whole number of {block_bytes}-byte blocks")]
    PartialBlock {
        format: &'static str,
        got: usize,
        block_bytes: usize,
    },
    /// A buffer's length disagrees with the element count it claims to hold.
    #[error("`{format}` {what} has {got} entries, expected {expected} for {elements} elements")]
    LengthMismatch {
        format: &'static str,
        what: &'static str,
        got: usize,
        expected: usize,
        elements: usize,
    },
    /// bitsandbytes accepts power-of-two block sizes from 32 to 4096.
    #[error("`{format}` block size {blocksize} is not a power of two in 32..=4096")]
    BadBlocksize {
        format: &'static str,
        blocksize: usize,
    },
    /// A ggml tensor type lora-doctor has no decoder for (IQ*, TQ*, MXFP4, …).
    #[error("ggml type {name} cannot be dequantized by lora-doctor")]
    UnsupportedType { name: String },
    /// A ggml tensor type lora-doctor has no quantizer for (it writes floats, Q8_0, Q4_0/1,
    /// Q5_0/1 and Q2_K–Q6_K).
    #[error("ggml type {name} cannot be written by lora-doctor")]
    UnwritableType { name: String },
    /// A llama-quantize mix chooses a type per tensor from the model's layer count, which is
    /// read from the base's config.json.
    #[error(
        "`{mix}` picks a type per tensor from the model's layer count, but the base has no config.json with `num_hidden_layers`"
    )]
    MixWithoutModel { mix: &'static str },
    /// A mix's type depends on the tensor; it is applied through `engine::fake_quantize`.
    #[error("`{mix}` picks a type per tensor: quantize through the tensor's name")]
    MixNeedsTensor { mix: &'static str },
}

// ---------------------------------------------------------------------------------------------
// ggml Q8_0 / Q4_0 / Q4_1
// ---------------------------------------------------------------------------------------------

/// Quantize a row to ggml `Q8_0` bytes, `quantize_row_q8_0_ref` exactly (§5.5):
/// `d = amax/127`, `id = d ≠ 0 ? 1/d : 0` from the f32 `d`, `qs = (i8) roundf(x·id)` with
/// `roundf` rounding half away from zero, `d` stored as f16 (RNE).
pub fn quantize_q8_0(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    ggml_quantize(row, "q8_0", Q8_0_BLOCK_BYTES, q8_0_block)
}

/// Decode ggml `Q8_0` bytes: `x = qs · f32(d)` (`dequantize_row_q8_0`).
pub fn dequantize_q8_0(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    ggml_dequantize(bytes, "q8_0", Q8_0_BLOCK_BYTES, dq8_0_block)
}

/// Quantize a row to ggml `Q4_0` bytes, `quantize_row_q4_0_ref` exactly (§5.5): the signed value
/// of largest magnitude (first on ties) gives `d = max/−8`, `q = MIN(15, trunc(x·id + 8.5))`
/// evaluated as a fused multiply-add (what FMA-contracted C builds and gguf-py's f64 emulation do),
/// element `j` in the low nibble and `j+16` in the high nibble of byte `j`.
pub fn quantize_q4_0(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    ggml_quantize(row, "q4_0", Q4_0_BLOCK_BYTES, q4_0_block)
}

/// Decode ggml `Q4_0` bytes: `x = (nibble − 8) · f32(d)` (`dequantize_row_q4_0`).
pub fn dequantize_q4_0(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    ggml_dequantize(bytes, "q4_0", Q4_0_BLOCK_BYTES, dq4_0_block)
}

/// Quantize a row to ggml `Q4_1` bytes, `quantize_row_q4_1_ref` exactly (§5.5):
/// `d = (max − min)/15`, `q = MIN(15, trunc((x − min)·id + 0.5))` with a separate multiply and
/// add (gguf-py does not fuse here), using the f32 `min` and `d`; `d` and `m = min` stored as f16.
pub fn quantize_q4_1(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    ggml_quantize(row, "q4_1", Q4_1_BLOCK_BYTES, q4_1_block)
}

/// Decode ggml `Q4_1` bytes: `x = nibble · f32(d) + f32(m)`, multiply then add as gguf-py does.
pub fn dequantize_q4_1(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    ggml_dequantize(bytes, "q4_1", Q4_1_BLOCK_BYTES, dq4_1_block)
}

fn ggml_quantize(
    row: &[f32],
    format: &'static str,
    block_bytes: usize,
    block: fn(&[f32], &mut [u8]),
) -> Result<Vec<u8>, QuantError> {
    if !row.len().is_multiple_of(GGML_QK) {
        return Err(QuantError::RowNotBlockAligned {
            format,
            len: row.len(),
            block: GGML_QK,
        });
    }
    let mut out = vec![0u8; row.len() / GGML_QK * block_bytes];
    row.par_chunks_exact(GGML_QK)
        .zip(out.par_chunks_exact_mut(block_bytes))
        .with_min_len(PAR_MIN_BLOCKS)
        .for_each(|(x, y)| block(x, y));
    Ok(out)
}

fn ggml_dequantize(
    bytes: &[u8],
    format: &'static str,
    block_bytes: usize,
    block: fn(&[u8], &mut [f32]),
) -> Result<Vec<f32>, QuantError> {
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(QuantError::PartialBlock {
            format,
            got: bytes.len(),
            block_bytes,
        });
    }
    let mut out = vec![0f32; bytes.len() / block_bytes * GGML_QK];
    bytes
        .par_chunks_exact(block_bytes)
        .zip(out.par_chunks_exact_mut(GGML_QK))
        .with_min_len(PAR_MIN_BLOCKS)
        .for_each(|(x, y)| block(x, y));
    Ok(out)
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// `1/d`, or 0 when `d` is zero (ggml's `d ? 1.0f/d : 0.0f`).
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

fn q8_0_block(x: &[f32], y: &mut [u8]) {
    // ggml's MAX(a, b) is `a > b ? a : b`; written the same way so NaN behaves as in C.
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    y[..2].copy_from_slice(&f16_bytes(d));
    for (q, v) in y[2..].iter_mut().zip(x) {
        // `as i8` saturates and maps NaN to 0; finite products are within ±127.5 by construction.
        *q = ((v * id).round() as i8) as u8;
    }
}

fn dq8_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, q) in y.iter_mut().zip(&b[2..]) {
        *v = f32::from(*q as i8) * d;
    }
}

/// `MIN(15, (int8_t) v)` for the non-negative `v` of Q4 quantization, as an unsigned nibble.
fn nibble_from_trunc(v: f32) -> u8 {
    (v as i8).clamp(0, 15) as u8
}

fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = inverse_or_zero(d);
    y[..2].copy_from_slice(&f16_bytes(d));
    let half = GGML_QK / 2;
    // gguf-py's FMA emulation: the f32·f32 product is exact in f64, one rounding for the sum,
    // then truncation — the same integers as a fused multiply-add (tested below), and fast on
    // CPUs built without FMA, where `mul_add` is a software call.
    let fused = |v: f32| (f64::from(v) * f64::from(id) + 8.5) as f32;
    for j in 0..half {
        let lo = nibble_from_trunc(fused(x[j]));
        let hi = nibble_from_trunc(fused(x[j + half]));
        y[2 + j] = lo | (hi << 4);
    }
}

fn dq4_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let half = GGML_QK / 2;
    for (j, q) in b[2..].iter().enumerate() {
        y[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
        y[j + half] = f32::from(i16::from(q >> 4) - 8) * d;
    }
}

fn q4_1_block(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    y[..2].copy_from_slice(&f16_bytes(d));
    y[2..4].copy_from_slice(&f16_bytes(min));
    let half = GGML_QK / 2;
    for j in 0..half {
        let lo = nibble_from_trunc((x[j] - min) * id + 0.5);
        let hi = nibble_from_trunc((x[j + half] - min) * id + 0.5);
        y[4 + j] = lo | (hi << 4);
    }
}

fn dq4_1_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let half = GGML_QK / 2;
    for (j, q) in b[4..].iter().enumerate() {
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + half] = f32::from(q >> 4) * d + m;
    }
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes 4-bit (NF4 / FP4)
// ---------------------------------------------------------------------------------------------

/// Which 4-bit code bitsandbytes uses (`quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bnb4bitType {
    /// NormalFloat4: 16 quantiles of N(0, 1) scaled to [−1, 1] (QLoRA's default).
    Nf4,
    /// E2M1 float with bias 2 and a sign bit (bitsandbytes' default `quant_type`).
    Fp4,
}

impl Bnb4bitType {
    /// `nf4` or `fp4`, as in `quant_type` and the `quant_state.bitsandbytes__<type>` key.
    pub fn name(self) -> &'static str {
        match self {
            Bnb4bitType::Nf4 => "nf4",
            Bnb4bitType::Fp4 => "fp4",
        }
    }

    /// The 16-entry dequantization code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Bnb4bitType::Nf4 => &NF4_CODE,
            Bnb4bitType::Fp4 => &FP4_CODE,
        }
    }
}

/// Which bitsandbytes quantizer to reproduce. For NF4 the two write the same bytes except for
/// all-zero blocks and non-finite values. For FP4 they also differ on near-zero values (the CPU
/// reference stores the opposite sign of zero: ~1% of a Gaussian weight's codes, ~5% when an
/// outlier sets the absmax, all still ±0 after dequantization) and on values that land exactly
/// on a threshold (which bf16 weights do now and then: 2 of 1024 codes in the `gauss` golden).
///
/// Dequantization is the same for both: the CUDA kernel and the native CPU kernel both compute
/// `code[q] · absmax` in f32 and round once (the CPU torch fallback, used only when the last dim
/// is odd, differs only in giving +0.0 instead of −0.0 for FP4 code 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BnbBackend {
    /// CUDA `kQuantizeBlockwise` (`csrc/kernels.cu`): what GPU-quantized checkpoints contain.
    /// `inv = 1/absmax` for every block; the `dQuantizeNF4`/`dQuantizeFP4` decision trees with
    /// their f32 literal thresholds, strict `>`, FP4 on `|x|` with the sign from `x < 0`; an
    /// all-zero block gives `0 · inf = NaN`, which every comparison sends to code 0.
    Cuda,
    /// The torch reference that bitsandbytes 0.50 runs for `quantize_4bit` on CPU
    /// (`backends/default/ops.py`; there is no native CPU quantize kernel): `torch.bucketize` on
    /// the f32 midpoints of the sorted code (ties to the lower bucket), with these differences:
    /// - `absmax` is clamped to `1e-38` before the reciprocal, so an all-zero block quantizes as
    ///   0.0 (NF4 code 7) and a partial all-zero last block stores `absmax = 1e-38`;
    /// - the partial last block is divided by its absmax instead of multiplied by the reciprocal;
    /// - FP4 midpoints are f32 sums of the codes (e.g. `0.5833334`, CUDA `0.583333`), negative
    ///   values break ties toward the larger magnitude, and values in `(0, 0.0026]` get code 8
    ///   (−0) while those in `(−0.0026, 0]` get code 0, the reverse of CUDA's sign bit.
    Cpu,
}

/// A tensor quantized by bitsandbytes `quantize_4bit(..., compress_statistics=False)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4bit {
    /// NF4 or FP4.
    pub quant_type: Bnb4bitType,
    /// Elements per `absmax` block.
    pub blocksize: usize,
    /// Number of quantized elements (`prod(shape)`).
    pub len: usize,
    /// `(len + 1) / 2` bytes, element `2k` in the high nibble of byte `k`.
    pub packed: Vec<u8>,
    /// One f32 absmax per block of the row-major flattened tensor; the last block may be partial.
    pub absmax: Vec<f32>,
}

/// NF4 thresholds: the f32 midpoints `(NF4_CODE[i] + NF4_CODE[i + 1]) / 2`. CUDA's `dQuantizeNF4`
/// literals and the CPU reference's computed midpoints are the same f32 values (unit-tested).
const NF4_MIDPOINTS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_42,
    -0.234_607_4,
    -0.137_911_74,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_76,
    0.389_312_54,
    0.501_663_45,
    0.642_786_9,
    0.861_478_45,
];

/// FP4 midpoints of the CPU reference: adjacent values of the sorted code, summed and halved in
/// f32. The ±0 pair contributes the bound 0.0.
const FP4_CPU_MIDPOINTS: [f32; 15] = [
    -0.833_333_4,
    -0.583_333_4,
    -0.416_666_7,
    -0.291_666_7,
    -0.208_333_34,
    -0.085_937_5,
    -0.002_604_166_7,
    0.0,
    0.002_604_166_7,
    0.085_937_5,
    0.208_333_34,
    0.291_666_7,
    0.416_666_7,
    0.583_333_4,
    0.833_333_4,
];

/// Code index of each bucket of [`FP4_CPU_MIDPOINTS`] (`torch.argsort` of the code, with +0 at
/// index 0 sorting before the second zero at index 8).
const FP4_CPU_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Number of `bounds` strictly below `x`: walking a strict-`>` decision tree, and
/// `torch.bucketize(x, bounds, right=False)`. A NaN fails every comparison of the tree (bucket 0)
/// but lands past the last bound in `torch.bucketize` (bucket 15), hence `nan_bucket`.
///
/// The bounds are sorted, so the bounds below `x` are a prefix and counting all of them without
/// stopping gives the same number: 15 branch-free compares the compiler turns into SIMD, where
/// the early exit mispredicted on most elements (the NF4/FP4 quantizers were 6 % of a
/// `check --precision all`'s CPU).
#[inline(always)]
fn bucket(x: f32, bounds: &[f32; 15], nan_bucket: u8) -> u8 {
    if x.is_nan() {
        return nan_bucket;
    }
    bounds.iter().map(|b| u8::from(*b < x)).sum()
}

/// The f32 literals of CUDA's `dQuantizeFP4` tree, in the order the tree tests them.
#[cfg(test)]
const FP4_CUDA_THRESHOLDS: [f32; 7] = [
    0.291_666_67,
    0.583_333,
    0.833_333_3,
    0.416_666_7,
    0.085_937_5,
    0.208_333_33,
    0.002_604_17,
];

/// CUDA `dQuantizeFP4`: sign bit from `x < 0`, strict `>` on `|x|` against the tree's literals.
fn quantize_fp4_cuda(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let magnitude = if a > 0.291_666_67 {
        if a > 0.583_333 {
            if a > 0.833_333_3 { 0b011 } else { 0b010 }
        } else if a > 0.416_666_7 {
            0b101
        } else {
            0b100
        }
    } else if a > 0.085_937_5 {
        if a > 0.208_333_33 { 0b111 } else { 0b110 }
    } else if a > 0.002_604_17 {
        0b001
    } else {
        0b000
    };
    magnitude | sign
}

/// The 4-bit code of a value already scaled by `1/absmax`.
#[inline(always)]
fn quantize_scaled(xn: f32, quant_type: Bnb4bitType, backend: BnbBackend) -> u8 {
    match (quant_type, backend) {
        (Bnb4bitType::Nf4, BnbBackend::Cuda) => bucket(xn, &NF4_MIDPOINTS, 0),
        (Bnb4bitType::Nf4, BnbBackend::Cpu) => bucket(xn, &NF4_MIDPOINTS, 15),
        (Bnb4bitType::Fp4, BnbBackend::Cuda) => quantize_fp4_cuda(xn),
        (Bnb4bitType::Fp4, BnbBackend::Cpu) => {
            FP4_CPU_ORDER[usize::from(bucket(xn, &FP4_CPU_MIDPOINTS, 15))]
        }
    }
}

/// The largest block bitsandbytes quantizes with (`blocksize` is a power of two up to this).
const MAX_4BIT_BLOCKSIZE: usize = 4096;

fn check_blocksize(format: &'static str, blocksize: usize) -> Result<(), QuantError> {
    if blocksize.is_power_of_two() && (32..=MAX_4BIT_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::BadBlocksize { format, blocksize })
    }
}

/// Quantize a tensor (flattened row-major) like bitsandbytes `quantize_4bit(A, blocksize,
/// quant_type, compress_statistics=False)` (§4.2): per block `absmax = max |x|` (f32), the code of
/// `x · (1/absmax)`, two codes per byte with the first in the high nibble. Blocks may straddle
/// rows; the last one may be partial and has its own absmax. An odd element count pads the last
/// low nibble with the code of a 0.0 element. See [`BnbBackend`] for the two quantizers.
///
/// `data` holds the tensor's values in its dtype (f32, or f16/bf16 widened exactly); its length is
/// `prod(shape)`.
pub fn quantize_4bit(
    data: &[f32],
    quant_type: Bnb4bitType,
    blocksize: usize,
    backend: BnbBackend,
) -> Result<Bnb4bit, QuantError> {
    check_blocksize(quant_type.name(), blocksize)?;
    let mut packed = vec![0u8; data.len().div_ceil(2)];
    let mut absmax = vec![0f32; data.len().div_ceil(blocksize)];
    data.par_chunks(blocksize)
        .zip(packed.par_chunks_mut(blocksize / 2))
        .zip(absmax.par_iter_mut())
        .with_min_len(PAR_MIN_BLOCKS / 4)
        .for_each(|((x, bytes), amax)| {
            let partial = x.len() < blocksize;
            *amax = quantize_4bit_block(x, partial, quant_type, backend, bytes);
        });
    Ok(Bnb4bit {
        quant_type,
        blocksize,
        len: data.len(),
        packed,
        absmax,
    })
}

/// How a block maps an element to `[-1, 1]`.
#[derive(Clone, Copy)]
enum Scale {
    /// `x · inv`, with `inv = 1/absmax` rounded to f32 first.
    Mul(f32),
    /// `x / absmax`.
    Div(f32),
}

impl Scale {
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            Scale::Mul(inv) => x * inv,
            Scale::Div(absmax) => x / absmax,
        }
    }
}

/// Quantize one block into `bytes` and return the absmax to store, in an AVX2 copy where the
/// processor has one ([`crate::simd`]: the same codes).
fn quantize_4bit_block(
    x: &[f32],
    partial: bool,
    quant_type: Bnb4bitType,
    backend: BnbBackend,
    bytes: &mut [u8],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the processor supports AVX2, checked just above.
        return unsafe { quantize_4bit_block_avx2(x, partial, quant_type, backend, bytes) };
    }
    quantize_4bit_block_plain(x, partial, quant_type, backend, bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_4bit_block_avx2(
    x: &[f32],
    partial: bool,
    quant_type: Bnb4bitType,
    backend: BnbBackend,
    bytes: &mut [u8],
) -> f32 {
    quantize_4bit_block_plain(x, partial, quant_type, backend, bytes)
}

#[inline(always)]
fn quantize_4bit_block_plain(
    x: &[f32],
    partial: bool,
    quant_type: Bnb4bitType,
    backend: BnbBackend,
    bytes: &mut [u8],
) -> f32 {
    let amax = match backend {
        // fmaxf: NaN never wins. Starting at 0 equals CUDA's −FLT_MAX start for |x| ≥ 0.
        BnbBackend::Cuda => x.iter().fold(0.0f32, |m, v| m.max(v.abs())),
        // torch's `max` propagates NaN.
        BnbBackend::Cpu => x.iter().fold(0.0f32, |m, v| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m.max(v.abs())
            }
        }),
    };
    // `stored` is the absmax written out; `pad` is the scaled value of the padding element of an
    // odd-length tensor (CUDA pads the input with 0 and scales it, the CPU reference pads the
    // scaled tensor with 0.0).
    let (stored, pad, scale) = match backend {
        BnbBackend::Cuda => {
            let inv = 1.0 / amax;
            (amax, 0.0 * inv, Scale::Mul(inv))
        }
        BnbBackend::Cpu => {
            // `1e-38` is an f32 subnormal, the value torch's `clamp(min=1e-38)` uses; torch's clamp
            // keeps NaN, `f32::max` would not.
            let clamped = if amax.is_nan() { amax } else { amax.max(1e-38) };
            if partial {
                (clamped, 0.0, Scale::Div(clamped))
            } else {
                (amax, 0.0, Scale::Mul(1.0 / clamped))
            }
        }
    };
    // One loop per (type, backend): the choice is made once per block, not per element.
    match (quant_type, backend) {
        (Bnb4bitType::Nf4, BnbBackend::Cuda) => pack_codes(x, scale, pad, bytes, |v| {
            quantize_scaled(v, Bnb4bitType::Nf4, BnbBackend::Cuda)
        }),
        (Bnb4bitType::Nf4, BnbBackend::Cpu) => pack_codes(x, scale, pad, bytes, |v| {
            quantize_scaled(v, Bnb4bitType::Nf4, BnbBackend::Cpu)
        }),
        (Bnb4bitType::Fp4, BnbBackend::Cuda) => pack_codes(x, scale, pad, bytes, |v| {
            quantize_scaled(v, Bnb4bitType::Fp4, BnbBackend::Cuda)
        }),
        (Bnb4bitType::Fp4, BnbBackend::Cpu) => pack_codes(x, scale, pad, bytes, |v| {
            quantize_scaled(v, Bnb4bitType::Fp4, BnbBackend::Cpu)
        }),
    }
    stored
}

/// Codes of a block's scaled elements, two per byte (the first in the high nibble; `pad` scaled
/// is the missing partner of an odd last element). Every element's code is found first, in a
/// loop over elements the compiler vectorizes, then the codes are packed in pairs.
#[inline(always)]
fn pack_codes(x: &[f32], scale: Scale, pad: f32, bytes: &mut [u8], code: impl Fn(f32) -> u8) {
    let mut codes = [0u8; MAX_4BIT_BLOCKSIZE];
    let codes = &mut codes[..x.len()];
    for (c, v) in codes.iter_mut().zip(x) {
        *c = code(scale.apply(*v));
    }
    let pad_code = code(pad);
    for (k, byte) in bytes.iter_mut().enumerate() {
        let lo = codes.get(2 * k + 1).copied().unwrap_or(pad_code);
        *byte = (codes[2 * k] << 4) | lo;
    }
}

/// Dequantize like bitsandbytes `dequantize_4bit` (§4.3): `code[q] · absmax` as one f32 multiply,
/// then rounded once to `dtype` (the `quant_state.dtype`). Returned widened to f32.
pub fn dequantize_4bit(q: &Bnb4bit, dtype: FloatFormat) -> Result<Vec<f32>, QuantError> {
    let format = q.quant_type.name();
    check_blocksize(format, q.blocksize)?;
    let expected_bytes = q.len.div_ceil(2);
    if q.packed.len() != expected_bytes {
        return Err(QuantError::LengthMismatch {
            format,
            what: "packed data",
            got: q.packed.len(),
            expected: expected_bytes,
            elements: q.len,
        });
    }
    let expected_blocks = q.len.div_ceil(q.blocksize);
    if q.absmax.len() != expected_blocks {
        return Err(QuantError::LengthMismatch {
            format,
            what: "absmax",
            got: q.absmax.len(),
            expected: expected_blocks,
            elements: q.len,
        });
    }
    let code = q.quant_type.code();
    let mut out = vec![0f32; q.len];
    out.par_chunks_mut(q.blocksize)
        .zip(q.packed.par_chunks(q.blocksize / 2))
        .zip(q.absmax.par_iter())
        .with_min_len(PAR_MIN_BLOCKS / 4)
        .for_each(|((y, bytes), &amax)| {
            for (k, v) in y.iter_mut().enumerate() {
                let byte = bytes[k / 2];
                let nibble = if k % 2 == 0 { byte >> 4 } else { byte & 0x0F };
                *v = dtype.round(code[usize::from(nibble)] * amax);
            }
        });
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes LLM.int8 (row-wise int8)
// ---------------------------------------------------------------------------------------------

/// A weight quantized like bitsandbytes `Int8Params` (§4.6): one int8 row per output row and one
/// f32 scale (`SCB`, the row's absmax) per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rowwise {
    /// Number of rows (`out_features`).
    pub rows: usize,
    /// Number of columns (`in_features`).
    pub cols: usize,
    /// `rows × cols` int8 codes, row-major (`CB`).
    pub cb: Vec<i8>,
    /// Per-row absmax of the f16 weight, as f32 (`SCB`).
    pub scb: Vec<f32>,
}

/// Quantize `[rows, cols]` like `Int8Params._quantize` with the torch reference kernel that
/// bitsandbytes runs on CPU (`backends/default/ops.py`): cast to f16 first, `SCB = max |w16|` per
/// row, `CB = round_half_even(w16 · s)` with `s = fl32(fl32(1/SCB) · 127)` (torch's
/// `127.0 / tensor` is a reciprocal then a multiply) and the product in f32. An all-zero row has
/// `SCB = 0` and codes 0.
///
/// The CUDA kernel uses `__fdividef(127, SCB)` (≤ 2 ulp) for the scale, so GPU codes can differ
/// from these by one LSB on elements that land near a rounding boundary.
pub fn quantize_int8_rowwise(
    data: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Int8Rowwise, QuantError> {
    check_shape("int8", "input", data.len(), rows, cols)?;
    let mut cb = vec![0i8; data.len()];
    let mut scb = vec![0f32; rows];
    if cols > 0 {
        data.par_chunks_exact(cols)
            .zip(cb.par_chunks_exact_mut(cols))
            .zip(scb.par_iter_mut())
            .for_each(|((w, q), s)| *s = quantize_int8_row(w, q));
    }
    Ok(Int8Rowwise {
        rows,
        cols,
        cb,
        scb,
    })
}

fn quantize_int8_row(w: &[f32], q: &mut [i8]) -> f32 {
    // The f16 cast once per element (it is a call into `half` per value), for the absmax and the
    // codes both.
    let w: Vec<f32> = w.iter().map(|v| round_f16(*v)).collect();
    let scb = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // torch evaluates the Python-scalar division `127.0 / row_stats` as `reciprocal() * 127`, two
    // f32 roundings; an exact `127.0 / scb` gives different codes (e.g. 7.5 with SCB = 15).
    let scale = (1.0 / scb) * 127.0;
    for (c, v) in q.iter_mut().zip(&w) {
        // `as i8` saturates and maps the NaN of 0·inf (all-zero row) to 0.
        *c = round_ties_even_small(v * scale) as i8;
    }
    scb
}

/// `x.round_ties_even()` for the int8 codes' range, without the `rintf` call it compiles to on
/// baseline x86-64 (no SSE4.1 `roundss`; 3 % of a `check --precision all`'s CPU): adding and
/// subtracting 2²³ with x's sign rounds to the nearest integer, ties to even, in the default
/// rounding mode, for every |x| < 2²³. Larger values are integers already and pass through; NaN
/// stays NaN. Only the sign of a zero result can differ from `rintf` (−0.3 gives +0), which no
/// integer conversion sees.
#[inline(always)]
fn round_ties_even_small(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    if x.abs() < TWO_23 {
        let shift = TWO_23.copysign(x);
        (x + shift) - shift
    } else {
        x
    }
}

/// Dequantize like `int8_vectorwise_dequant`: `CB · SCB · (1/127)` as two f32 multiplies in that
/// order (`bitsandbytes/_ops.py`), giving f32.
pub fn dequantize_int8_rowwise(q: &Int8Rowwise) -> Result<Vec<f32>, QuantError> {
    check_shape("int8", "codes", q.cb.len(), q.rows, q.cols)?;
    if q.scb.len() != q.rows {
        return Err(QuantError::LengthMismatch {
            format: "int8",
            what: "SCB",
            got: q.scb.len(),
            expected: q.rows,
            elements: q.cb.len(),
        });
    }
    let mut out = vec![0f32; q.cb.len()];
    if q.cols > 0 {
        out.par_chunks_exact_mut(q.cols)
            .zip(q.cb.par_chunks_exact(q.cols))
            .zip(q.scb.par_iter())
            .for_each(|((y, c), &s)| {
                for (v, code) in y.iter_mut().zip(c) {
                    *v = f32::from(*code) * s * INT8_DEQUANT_SCALE;
                }
            });
    }
    Ok(out)
}

pub(crate) fn check_shape(
    format: &'static str,
    what: &'static str,
    got: usize,
    rows: usize,
    cols: usize,
) -> Result<(), QuantError> {
    let expected = rows.saturating_mul(cols);
    if got == expected {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch {
            format,
            what,
            got,
            expected,
            elements: expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::float::F16_MAX;
    use safetensors::{Dtype, SafeTensors, tensor::TensorView};

    // ---- helpers ------------------------------------------------------------------------------

    /// Deterministic uniform values in `[-scale, scale)` (xorshift64).
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn next_up(x: f32) -> f32 {
        if x >= 0.0 {
            f32::from_bits(x.to_bits() + 1)
        } else {
            f32::from_bits(x.to_bits() - 1)
        }
    }

    fn goldens(file: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/goldens/quant")
            .join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn view<'a>(st: &SafeTensors<'a>, key: &str) -> TensorView<'a> {
        st.tensor(key)
            .unwrap_or_else(|e| panic!("golden tensor `{key}`: {e}"))
    }

    /// Tensor data widened to f32 (exact for f16/bf16).
    fn floats(v: &TensorView<'_>) -> Vec<f32> {
        let data = v.data();
        match v.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => panic!("unexpected dtype {other:?}"),
        }
    }

    /// The golden input vectors, sorted by name, as (name, rows, cols, values).
    fn inputs() -> Vec<(String, usize, usize, Vec<f32>)> {
        let bytes = goldens("inputs.safetensors");
        let st = SafeTensors::deserialize(&bytes).expect("inputs.safetensors parses");
        let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let v = view(&st, &name);
                let (rows, cols) = (v.shape()[0], v.shape()[1]);
                let x = floats(&v);
                (name, rows, cols, x)
            })
            .collect()
    }

    fn assert_same_bits(label: &str, ours: &[f32], want: &[f32]) {
        assert_eq!(ours.len(), want.len(), "{label}: length");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{label}: element {i} is {:e}, golden {:e}",
                ours[i], want[i]
            );
        }
    }

    fn assert_same_bytes(label: &str, ours: &[u8], want: &[u8], unit: usize) {
        assert_eq!(ours.len(), want.len(), "{label}: length");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i] != want[i]) {
            let b = i / unit * unit;
            panic!(
                "{label}: byte {i} (block {}) differs\n ours   {:?}\n golden {:?}",
                i / unit,
                &ours[b..(b + unit).min(ours.len())],
                &want[b..(b + unit).min(want.len())]
            );
        }
    }

    const FLOAT_FORMATS: [FloatFormat; 3] = [FloatFormat::F32, FloatFormat::F16, FloatFormat::Bf16];
    const BNB_TYPES: [Bnb4bitType; 2] = [Bnb4bitType::Nf4, Bnb4bitType::Fp4];

    // ---- goldens from the real tools ----------------------------------------------------------

    type Quantize = fn(&[f32]) -> Result<Vec<u8>, QuantError>;
    type Dequantize = fn(&[u8]) -> Result<Vec<f32>, QuantError>;
    const GGML: [(&str, usize, Quantize, Dequantize); 3] = [
        ("q8_0", Q8_0_BLOCK_BYTES, quantize_q8_0, dequantize_q8_0),
        ("q4_0", Q4_0_BLOCK_BYTES, quantize_q4_0, dequantize_q4_0),
        ("q4_1", Q4_1_BLOCK_BYTES, quantize_q4_1, dequantize_q4_1),
    ];

    #[test]
    fn ggml_matches_gguf_py_bit_for_bit() {
        let bytes = goldens("ggml.safetensors");
        let gold = SafeTensors::deserialize(&bytes).expect("ggml.safetensors parses");
        let mut checked = 0;
        for (name, _rows, cols, x) in inputs() {
            for (q, block_bytes, quantize, dequantize) in GGML {
                let key = format!("{name}.{q}");
                if !cols.is_multiple_of(GGML_QK) {
                    // gguf-py refuses these rows too, so there is no golden.
                    assert!(gold.tensor(&format!("{key}.bytes")).is_err(), "{key}");
                    let err = quantize(&x[..cols]).expect_err("unaligned row");
                    assert!(
                        matches!(err, QuantError::RowNotBlockAligned { .. }),
                        "{key}: {err}"
                    );
                    continue;
                }
                let ours = quantize(&x).expect("aligned rows quantize");
                assert_same_bytes(
                    &key,
                    &ours,
                    view(&gold, &format!("{key}.bytes")).data(),
                    block_bytes,
                );
                let back = dequantize(&ours).expect("whole blocks dequantize");
                assert_same_bits(
                    &key,
                    &back,
                    &floats(&view(&gold, &format!("{key}.dequant"))),
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 15, "five 32-aligned vectors × three formats");
    }

    #[test]
    fn bnb_4bit_cpu_matches_bitsandbytes_bit_for_bit() {
        let bytes = goldens("bnb_4bit.safetensors");
        let gold = SafeTensors::deserialize(&bytes).expect("bnb_4bit.safetensors parses");
        let mut checked = 0;
        for (name, _rows, _cols, x) in inputs() {
            for quant_type in BNB_TYPES {
                for dtype in FLOAT_FORMATS {
                    let key = format!("{name}.{}.{}", quant_type.name(), dtype.name());
                    let xd: Vec<f32> = x.iter().map(|v| dtype.round(*v)).collect();
                    let q = quantize_4bit(&xd, quant_type, BNB_4BIT_BLOCKSIZE, BnbBackend::Cpu)
                        .expect("valid blocksize");
                    assert_same_bytes(
                        &key,
                        &q.packed,
                        view(&gold, &format!("{key}.packed")).data(),
                        32,
                    );
                    assert_same_bits(
                        &key,
                        &q.absmax,
                        &floats(&view(&gold, &format!("{key}.absmax"))),
                    );
                    let back = dequantize_4bit(&q, dtype).expect("consistent lengths");
                    assert_same_bits(
                        &key,
                        &back,
                        &floats(&view(&gold, &format!("{key}.dequant"))),
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(
            checked,
            8 * 2 * 3,
            "eight vectors × two codes × three dtypes"
        );
    }

    /// The CUDA quantizer cannot be run here, so check the claim in [`BnbBackend`]'s doc: on the
    /// golden inputs it differs from the CPU goldens only on all-zero blocks and on scaled values
    /// within two f32 steps of a threshold (or, for FP4, within the ±0 bucket), and it does differ
    /// there (the threshold vector is built to hit those cases).
    #[test]
    fn bnb_4bit_cuda_differs_from_cpu_only_at_documented_points() {
        let bytes = goldens("bnb_4bit.safetensors");
        let gold = SafeTensors::deserialize(&bytes).expect("bnb_4bit.safetensors parses");
        let near = |s: f32, t: f32| (s - t).abs() <= 2.0 * f32::EPSILON * t.abs().max(1e-30);
        // (vector, quant type, reason) → differing codes, over the three dtypes.
        let mut counts = std::collections::BTreeMap::<(String, &str, &str), usize>::new();
        for (name, _rows, _cols, x) in inputs() {
            for quant_type in BNB_TYPES {
                for dtype in FLOAT_FORMATS {
                    let key = format!("{name}.{}.{}", quant_type.name(), dtype.name());
                    let xd: Vec<f32> = x.iter().map(|v| dtype.round(*v)).collect();
                    let q = quantize_4bit(&xd, quant_type, BNB_4BIT_BLOCKSIZE, BnbBackend::Cuda)
                        .expect("valid blocksize");
                    let packed = view(&gold, &format!("{key}.packed")).data().to_vec();
                    let absmax = floats(&view(&gold, &format!("{key}.absmax")));
                    for (b, (&ours, &want)) in q.absmax.iter().zip(&absmax).enumerate() {
                        let zero_partial = ours == 0.0 && want == 1e-38;
                        assert!(
                            ours == want || zero_partial,
                            "{key}: absmax {b}: {ours:e} vs {want:e}"
                        );
                    }
                    for (i, v) in xd.iter().enumerate() {
                        let nibble = |p: &[u8]| {
                            if i % 2 == 0 {
                                p[i / 2] >> 4
                            } else {
                                p[i / 2] & 0x0F
                            }
                        };
                        let (ours, want) = (nibble(&q.packed), nibble(&packed));
                        if ours == want {
                            continue;
                        }
                        let amax = q.absmax[i / BNB_4BIT_BLOCKSIZE];
                        let s = v / amax;
                        let near_threshold = match quant_type {
                            Bnb4bitType::Nf4 => NF4_MIDPOINTS.iter().any(|t| near(s, *t)),
                            Bnb4bitType::Fp4 => FP4_CPU_MIDPOINTS
                                .iter()
                                .chain(&FP4_CUDA_THRESHOLDS)
                                .any(|t| near(s, *t) || near(s, -t)),
                        };
                        let reason = if amax == 0.0 {
                            "all-zero block"
                        } else if !s.is_finite() {
                            "non-finite"
                        } else if quant_type == Bnb4bitType::Fp4 && ours | want == 0b1000 {
                            "fp4 sign of zero"
                        } else if near_threshold {
                            "threshold"
                        } else {
                            panic!("{key}: element {i} = {v:e} (scaled {s:e}): {ours} vs {want}")
                        };
                        *counts
                            .entry((name.clone(), quant_type.name(), reason))
                            .or_default() += 1;
                    }
                }
            }
        }
        // NF4 thresholds are identical, so NF4 differs only where no ordinary weight goes; ordinary
        // FP4 weights differ in the sign of zero (±0 either way after dequantization) and, rarely,
        // on an exact negative tie; the adversarial vectors hit every documented difference.
        for (name, quant_type, reason) in counts.keys() {
            if *quant_type == "nf4" {
                assert!(
                    ["all-zero block", "non-finite"].contains(reason),
                    "{counts:?}"
                );
            }
            if ["gauss", "outliers", "partial", "odd"].contains(&name.as_str()) {
                assert!(
                    ["fp4 sign of zero", "threshold"].contains(reason),
                    "{counts:?}"
                );
            }
        }
        for reason in [
            "all-zero block",
            "non-finite",
            "fp4 sign of zero",
            "threshold",
        ] {
            assert!(
                counts.keys().any(|(_, _, r)| *r == reason),
                "no `{reason}`: {counts:?}"
            );
        }
    }

    #[test]
    fn int8_matches_bitsandbytes_bit_for_bit() {
        let bytes = goldens("bnb_int8.safetensors");
        let gold = SafeTensors::deserialize(&bytes).expect("bnb_int8.safetensors parses");
        for (name, rows, cols, x) in inputs() {
            let key = format!("{name}.int8");
            let q = quantize_int8_rowwise(&x, rows, cols).expect("shape matches");
            let cb: Vec<u8> = q.cb.iter().map(|c| *c as u8).collect();
            assert_same_bytes(&key, &cb, view(&gold, &format!("{key}.cb")).data(), cols);
            assert_same_bits(&key, &q.scb, &floats(&view(&gold, &format!("{key}.scb"))));
            let back = dequantize_int8_rowwise(&q).expect("consistent lengths");
            assert_same_bits(
                &key,
                &back,
                &floats(&view(&gold, &format!("{key}.dequant"))),
            );
        }
    }

    // ---- ggml edge cases ----------------------------------------------------------------------

    #[test]
    fn q8_0_all_zero_block_is_all_zero_bytes() {
        let bytes = quantize_q8_0(&[0.0; 32]).expect("one block");
        assert_eq!(bytes, vec![0u8; Q8_0_BLOCK_BYTES]);
        assert_eq!(dequantize_q8_0(&bytes).expect("one block"), vec![0.0; 32]);
    }

    #[test]
    fn q8_0_rounds_ties_away_from_zero() {
        let mut x = [0.0f32; 32];
        x[..5].copy_from_slice(&[127.0, 0.5, -0.5, 1.5, -2.5]);
        let bytes = quantize_q8_0(&x).expect("one block");
        assert_eq!(f16_at(&bytes, 0), 1.0);
        let qs: Vec<i8> = bytes[2..7].iter().map(|b| *b as i8).collect();
        assert_eq!(qs, [127, 1, -1, 2, -3]);
    }

    #[test]
    fn q8_0_single_nonzero_is_exact_up_to_the_f16_scale() {
        let mut x = [0.0f32; 32];
        x[7] = -0.3;
        let back = dequantize_q8_0(&quantize_q8_0(&x).expect("one block")).expect("one block");
        assert_eq!(back[7], -127.0 * round_f16(0.3 / 127.0));
        assert!(back.iter().enumerate().all(|(i, v)| i == 7 || *v == 0.0));
    }

    #[test]
    fn q4_0_scale_comes_from_the_signed_max() {
        // A negative max maps to code 0 and the opposite extreme clamps at 15.
        let mut x = [1.0f32; 32];
        x[3] = -4.0;
        x[20] = 3.9;
        let bytes = quantize_q4_0(&x).expect("one block");
        assert_eq!(f16_at(&bytes, 0), 0.5);
        assert_eq!(bytes[2 + 3] & 0x0F, 0);
        assert_eq!(bytes[2 + 4] >> 4, 15); // element 20 is the high nibble of byte 4
        // On a |max| tie the first one wins, sign included.
        let mut y = [0.0f32; 32];
        y[1] = 2.0;
        y[5] = -2.0;
        assert_eq!(f16_at(&quantize_q4_0(&y).expect("one block"), 0), -0.25);
        y[1] = -2.0;
        y[5] = 2.0;
        assert_eq!(f16_at(&quantize_q4_0(&y).expect("one block"), 0), 0.25);
    }

    #[test]
    fn q4_0_fma_matches_gguf_py_f64_emulation() {
        // gguf-py computes trunc(f32(f64(x)·f64(id) + 8.5)); our `mul_add` rounds once. The product
        // is exact in f64, and the sum only needs rounding where it is far from an integer.
        let x = random(1 << 20, 7, 3.0);
        for block in x.chunks_exact(GGML_QK) {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in block {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let id = inverse_or_zero(max / -8.0);
            for &v in block {
                let emulated = ((f64::from(v) * f64::from(id)) + 8.5) as f32;
                assert_eq!(v.mul_add(id, 8.5).trunc(), emulated.trunc(), "{v:e} {id:e}");
            }
        }
    }

    #[test]
    fn q4_1_constant_block_has_zero_scale() {
        let bytes = quantize_q4_1(&[0.7; 32]).expect("one block");
        assert_eq!(f16_at(&bytes, 0), 0.0);
        assert_eq!(f16_at(&bytes, 2), round_f16(0.7));
        assert!(bytes[4..].iter().all(|b| *b == 0));
        assert_eq!(
            dequantize_q4_1(&bytes).expect("one block"),
            vec![round_f16(0.7); 32]
        );
    }

    #[test]
    fn ggml_non_finite_inputs_follow_the_c_comparisons() {
        // An infinite element: f16 scale inf, id 0, every code 0, dequant NaN (0·inf).
        let mut x = [0.25f32; 32];
        x[0] = f32::INFINITY;
        let bytes = quantize_q8_0(&x).expect("one block");
        assert_eq!(f16_at(&bytes, 0), f32::INFINITY);
        assert!(bytes[2..].iter().all(|b| *b == 0));
        assert!(
            dequantize_q8_0(&bytes)
                .expect("one block")
                .iter()
                .all(|v| v.is_nan())
        );
        // A finite block whose scale overflows f16 stores inf too (as ggml does).
        let big = quantize_q8_0(&[F16_MAX * 200.0; 32]).expect("one block");
        assert_eq!(f16_at(&big, 0), f32::INFINITY);
        // NaN first: MAX(0, NaN) is NaN, then MAX(NaN, 0.25) is 0.25, so NaN is forgotten.
        let mut y = [0.25f32; 32];
        y[0] = f32::NAN;
        let bytes = quantize_q8_0(&y).expect("one block");
        assert_eq!(f16_at(&bytes, 0), round_f16(0.25 / 127.0));
        assert_eq!(bytes[2], 0); // NaN · id converts to 0
        // Q4_0 and Q4_1 skip NaN in their scans.
        let q4 = quantize_q4_0(&y).expect("one block");
        assert_eq!(f16_at(&q4, 0), round_f16(0.25 / -8.0));
        let q41 = quantize_q4_1(&y).expect("one block");
        assert_eq!(f16_at(&q41, 0), 0.0);
    }

    #[test]
    fn ggml_rejects_bad_lengths() {
        assert_eq!(
            quantize_q4_1(&[0.0; 48]),
            Err(QuantError::RowNotBlockAligned {
                format: "q4_1",
                len: 48,
                block: 32
            })
        );
        assert_eq!(
            dequantize_q8_0(&[0; 35]),
            Err(QuantError::PartialBlock {
                format: "q8_0",
                got: 35,
                block_bytes: 34
            })
        );
        let msg = quantize_q8_0(&[0.0; 33])
            .expect_err("unaligned")
            .to_string();
        assert_eq!(
            msg,
            "row length 33 is not a multiple of the `q8_0` block size 32"
        );
    }

    // ---- bitsandbytes 4-bit edge cases --------------------------------------------------------

    #[test]
    fn codes_are_the_bitsandbytes_f32_values() {
        // Bit patterns of `get_4bit_type("nf4")` and of CUDA's FP4 lut times the sign.
        let nf4: [u32; 16] = [
            0xbf80_0000,
            0xbf32_39b1,
            0xbf06_6b30,
            0xbeca_32a0,
            0xbe91_a24d,
            0xbe3d_353f,
            0xbdba_7871,
            0x0000_0000,
            0x3da2_faff,
            0x3e24_cae3,
            0x3e7c_04dd,
            0x3ead_033a,
            0x3ee1_a4b8,
            0x3f10_07ab,
            0x3f39_13b3,
            0x3f80_0000,
        ];
        assert_eq!(NF4_CODE.map(f32::to_bits), nf4);
        let fp4: [u32; 8] = [
            0x0000_0000,
            0x3baa_aaab,
            0x3f2a_aaab,
            0x3f80_0000,
            0x3eaa_aaab,
            0x3f00_0000,
            0x3e2a_aaab,
            0x3e80_0000,
        ];
        for (i, bits) in fp4.iter().enumerate() {
            assert_eq!(FP4_CODE[i].to_bits(), *bits, "fp4 {i}");
            assert_eq!(
                FP4_CODE[i + 8].to_bits(),
                bits | 0x8000_0000,
                "fp4 {}",
                i + 8
            );
        }
    }

    #[test]
    fn nf4_midpoints_are_the_f32_midpoints_of_the_code() {
        // `bucket` counts every bound below x: a prefix only while the bounds ascend.
        for bounds in [&NF4_MIDPOINTS, &FP4_CPU_MIDPOINTS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        }
        for (i, mid) in NF4_MIDPOINTS.iter().enumerate() {
            assert_eq!(*mid, (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0, "midpoint {i}");
        }
        let sorted: Vec<f32> = FP4_CPU_ORDER
            .iter()
            .map(|&c| FP4_CODE[usize::from(c)])
            .collect();
        for (i, mid) in FP4_CPU_MIDPOINTS.iter().enumerate() {
            assert!(sorted[i] <= sorted[i + 1], "order is ascending at {i}");
            assert_eq!(*mid, (sorted[i] + sorted[i + 1]) / 2.0, "fp4 midpoint {i}");
        }
    }

    #[test]
    fn nf4_exact_midpoints_take_the_lower_code() {
        for backend in [BnbBackend::Cuda, BnbBackend::Cpu] {
            for (i, mid) in NF4_MIDPOINTS.iter().enumerate() {
                assert_eq!(quantize_scaled(*mid, Bnb4bitType::Nf4, backend), i as u8);
                assert_eq!(
                    quantize_scaled(next_up(*mid), Bnb4bitType::Nf4, backend),
                    i as u8 + 1
                );
            }
            // Through the whole pipeline: absmax 1 makes the scaled value the input itself.
            let mut x = vec![0.0f32; 64];
            x[0] = 1.0;
            x[1] = NF4_MIDPOINTS[7];
            x[2] = next_up(NF4_MIDPOINTS[7]);
            let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, backend).expect("valid blocksize");
            assert_eq!(q.packed[0], 0xF7);
            assert_eq!(q.packed[1] >> 4, 8);
        }
    }

    #[test]
    fn all_zero_4bit_block_differs_between_backends() {
        let zeros = [0.0f32; 64];
        let cuda = quantize_4bit(&zeros, Bnb4bitType::Nf4, 64, BnbBackend::Cuda).expect("valid");
        assert_eq!((cuda.packed[0], cuda.absmax[0]), (0x00, 0.0)); // 0·inf = NaN → code 0 (−1.0)
        let back = dequantize_4bit(&cuda, FloatFormat::Bf16).expect("consistent");
        assert!(back.iter().all(|v| *v == 0.0 && v.is_sign_negative()));
        let cpu = quantize_4bit(&zeros, Bnb4bitType::Nf4, 64, BnbBackend::Cpu).expect("valid");
        assert_eq!((cpu.packed[0], cpu.absmax[0]), (0x77, 0.0)); // clamp(1e-38) → 0.0 → code 7
        // A partial all-zero block stores the clamped absmax on CPU.
        let cpu =
            quantize_4bit(&zeros[..10], Bnb4bitType::Nf4, 64, BnbBackend::Cpu).expect("valid");
        assert_eq!(cpu.absmax[0], 1e-38);
    }

    #[test]
    fn single_nonzero_4bit_block_is_exact() {
        let mut x = vec![0.0f32; 64];
        x[17] = -0.123;
        for quant_type in BNB_TYPES {
            for backend in [BnbBackend::Cuda, BnbBackend::Cpu] {
                let q = quantize_4bit(&x, quant_type, 64, backend).expect("valid");
                assert_eq!(q.absmax[0], 0.123);
                let back = dequantize_4bit(&q, FloatFormat::F32).expect("consistent");
                assert_eq!(back[17], -0.123);
                assert!(back.iter().enumerate().all(|(i, v)| i == 17 || *v == 0.0));
            }
        }
    }

    #[test]
    fn fp4_sign_of_zero_differs_between_backends() {
        let fp4 = Bnb4bitType::Fp4;
        assert_eq!(quantize_scaled(0.001, fp4, BnbBackend::Cuda), 0b0000);
        assert_eq!(quantize_scaled(-0.001, fp4, BnbBackend::Cuda), 0b1000);
        assert_eq!(quantize_scaled(0.001, fp4, BnbBackend::Cpu), 0b1000);
        assert_eq!(quantize_scaled(-0.001, fp4, BnbBackend::Cpu), 0b0000);
        // Away from the thresholds the two agree on every code, including the sign bit.
        for x in [
            -1.0f32, -0.7, -0.45, -0.3, -0.22, -0.1, -0.004, 0.004, 0.1, 0.22, 0.3, 0.45, 0.7, 1.0,
        ] {
            assert_eq!(
                quantize_scaled(x, fp4, BnbBackend::Cuda),
                quantize_scaled(x, fp4, BnbBackend::Cpu)
            );
            let code = quantize_scaled(x, fp4, BnbBackend::Cuda);
            assert_eq!(
                FP4_CODE[usize::from(code)].is_sign_negative(),
                x < 0.0,
                "{x}"
            );
        }
        // The CUDA literal 0.583333 is below the true midpoint 0.5833334.
        let s = next_up(0.583_333);
        assert_eq!(quantize_scaled(s, fp4, BnbBackend::Cuda), 0b010);
        assert_eq!(quantize_scaled(s, fp4, BnbBackend::Cpu), 0b101);
    }

    #[test]
    fn odd_length_pads_the_last_low_nibble() {
        let x = [0.5f32, -1.0, 0.25];
        let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, BnbBackend::Cuda).expect("valid");
        assert_eq!(q.packed.len(), 2);
        assert_eq!(q.packed[1] & 0x0F, 7); // code of 0.0
        assert_eq!(
            dequantize_4bit(&q, FloatFormat::F32)
                .expect("consistent")
                .len(),
            3
        );
    }

    #[test]
    fn bnb_4bit_non_finite_inputs() {
        let mut x = vec![0.5f32; 64];
        x[3] = f32::NAN;
        x[9] = -0.25;
        let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, BnbBackend::Cuda).expect("valid");
        assert_eq!(q.absmax[0], 0.5); // fmaxf skips NaN
        assert_eq!(q.packed[1] & 0x0F, 0); // NaN fails every `>`: code 0
        x[5] = f32::INFINITY;
        let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, BnbBackend::Cuda).expect("valid");
        assert_eq!(q.absmax[0], f32::INFINITY);
        assert_eq!(q.packed[0], 0x77); // finite · 0 = 0.0 → code 7
        assert_eq!(q.packed[2] & 0x0F, 0); // element 5: inf · 0 = NaN → code 0
        // The CPU reference propagates NaN through `max`, and bucketizes NaN past the last bound.
        x[5] = 0.5;
        let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, BnbBackend::Cpu).expect("valid");
        assert!(q.absmax[0].is_nan());
        assert!(q.packed.iter().all(|b| *b == 0xFF));
    }

    #[test]
    fn bnb_4bit_rejects_bad_inputs() {
        let err = quantize_4bit(&[0.0; 8], Bnb4bitType::Fp4, 48, BnbBackend::Cuda).expect_err("48");
        assert_eq!(
            err,
            QuantError::BadBlocksize {
                format: "fp4",
                blocksize: 48
            }
        );
        let q = Bnb4bit {
            quant_type: Bnb4bitType::Nf4,
            blocksize: 64,
            len: 100,
            packed: vec![0; 50],
            absmax: vec![1.0],
        };
        assert!(matches!(
            dequantize_4bit(&q, FloatFormat::F32),
            Err(QuantError::LengthMismatch {
                what: "absmax",
                got: 1,
                expected: 2,
                ..
            })
        ));
    }

    // ---- int8 edge cases ----------------------------------------------------------------------

    #[test]
    fn int8_rounds_half_to_even_after_the_f16_cast() {
        // SCB = 127 makes the scale exactly 1, so k + 0.5 is an exact tie.
        let w = [127.0f32, 0.5, 1.5, 2.5, -2.5, 0.1, 0.0, -127.0];
        let q = quantize_int8_rowwise(&w, 1, 8).expect("shape");
        assert_eq!(q.scb, [127.0]);
        assert_eq!(q.cb, [127, 0, 2, 2, -2, 0, 0, -127]);
        let back = dequantize_int8_rowwise(&q).expect("shape");
        assert_eq!(INT8_DEQUANT_SCALE.to_bits(), 0x3C01_0204);
        assert_eq!(back[0], 127.0 * 127.0 * INT8_DEQUANT_SCALE);
        // The f16 cast comes first: 1e-8 is below f16's smallest subnormal.
        let q = quantize_int8_rowwise(&[1e-8, 0.0], 1, 2).expect("shape");
        assert_eq!((q.scb[0], q.cb[0]), (0.0, 0));
    }

    #[test]
    fn int8_zero_row_and_f16_overflow_give_zero_codes() {
        let w = [0.0f32, 0.0, 1.0e6, 3.0];
        let q = quantize_int8_rowwise(&w, 2, 2).expect("shape");
        assert_eq!(q.scb, [0.0, f32::INFINITY]);
        assert_eq!(q.cb, [0, 0, 0, 0]);
        assert!(
            matches!(
                quantize_int8_rowwise(&w, 3, 2),
                Err(QuantError::LengthMismatch { .. })
            ),
            "shape is checked"
        );
    }
}
