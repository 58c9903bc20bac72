//! Repairing a lossy merge (issue 14): rounding the exact merge W* = W + ΔW onto a target grid so
//! that the layer's *outputs* stay close, not each weight.
//!
//! Round-to-nearest deletes an update smaller than half a grid step (RNE(W + ΔW) = W), a bias
//! that no amount of evaluation text averages away. Two repairs are offered:
//!
//! * **GPTQ error feedback** ([`gptq`]): columns are rounded in order and each column's rounding
//!   error is pushed onto the columns not yet rounded, weighted by the inverse of the input
//!   second moment H = XᵀX (Frantar et al. 2022, "GPTQ", Algorithm 1: 1 % damping, Cholesky of
//!   H⁻¹ in upper form, 128-column lazy batches). Block formats take each block's parameters
//!   from the error-updated values when the block starts, like GPTQ with group size 32 (or 256
//!   for a K-quant super-block); for Q4_0 the scale is searched (a few candidates around ggml's
//!   max/−8, least GPTQ-weighted squared error), since 16 levels leave ggml's rule far from the
//!   best scale on heavy-tailed blocks. Q5_0, Q5_1 and the K-quants take ggml's own parameters
//!   (`quantize_row_*_ref` of the block-start values: d, dmin and the 6-bit sub-block scales and
//!   mins) and then choose each value's code under them, nearest as the dequantizer decodes it.
//! * **Stochastic rounding** ([`stochastic`]): up or down with probability given by the distance,
//!   unbiased in expectation and in need of no calibration.
//!
//! Both write plain grid values: bf16/f16 numbers, or ggml blocks (Q8_0/Q4_0/Q4_1 laid out as
//! `block_q8_0`/`block_q4_0`/`block_q4_1` in `ggml-common.h`; Q5_0, Q5_1, Q2_K … Q6_K as ggml
//! quantized them, with the chosen codes packed by `kquant.rs`) whose dequantized values are
//! exactly [`Rounded::values`], so every loader reads the result unchanged.
//!
//! Which grid a tensor gets is the format's per-tensor choice ([`Target::for_tensor`]): a
//! llama-quantize mix (`q4_k_m`) repairs each block linear onto the type it stores it in, and a
//! K-quant whose rows are not whole 256-blocks onto llama-quantize's fallback (Q4_K → Q5_0).

use half::f16;
use rayon::prelude::*;
use thiserror::Error;

use super::float::FloatFormat;
use super::ggml::GgmlType;
use super::kquant::{Kind, MAX_BLOCK_BYTES, MAX_SUB_BLOCKS, QK_K, SubGrid};
use super::precision::Precision;
use super::quant::{GGML_QK, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QuantError};
use super::quant_format::QuantFormat;
use crate::dense::{View, gemm_acc};

/// GPTQ's damping: this fraction of H's mean diagonal is added to the diagonal.
pub const DAMPING: f64 = 0.01;

/// GPTQ's lazy-batch width: errors of a batch of columns reach the later columns at its end.
pub const BATCH_COLUMNS: usize = 128;

/// Columns whose errors reach each other one at a time; a batch's later columns take each
/// group's errors as one matrix product (the same sums, grouped for the GEMM kernel).
const FEEDBACK_GROUP: usize = 32;

// A block's parameters are taken when its first column comes up, from values that must by then
// hold the feedback of every earlier column: a 32-block starts a feedback group inside one lazy
// batch, a 256-block starts a lazy batch (whose start follows the previous batches' update).
const _: () = assert!(
    FEEDBACK_GROUP == GGML_QK
        && BATCH_COLUMNS.is_multiple_of(GGML_QK)
        && QK_K.is_multiple_of(BATCH_COLUMNS)
);

/// The Q4_0 scales a GPTQ repair tries per block: d = max / divisor, max the block's value of
/// largest magnitude. −8 is ggml's rule (max lands on code 0); smaller magnitudes clip max,
/// positive divisors put max on the top code (+7 side) instead.
pub const Q4_0_SCALE_DIVISORS: [f32; 13] = [
    -8.0, -8.5, -9.0, -9.5, -10.0, -7.5, -7.0, 7.0, 7.5, 8.0, 8.5, 9.0, 6.5,
];

/// Rows rounded together by one worker (they share every read of the factor U).
const ROW_TILE: usize = 8;

/// Why a tensor cannot be repaired.
#[derive(Debug, Error)]
pub enum RepairError {
    #[error(
        "the input second moment of `{tensor}` is not positive definite after damping (pivot {pivot} of {n}); the calibration activations hold NaN/Inf or are degenerate"
    )]
    NotPositiveDefinite {
        tensor: String,
        pivot: usize,
        n: usize,
    },
    #[error(
        "`{tensor}` has {cols} columns, not a multiple of the {block}-value {format} block: it cannot be repaired in {format}"
    )]
    NotBlockAligned {
        tensor: String,
        cols: usize,
        block: usize,
        format: &'static str,
    },
    #[error("`{tensor}` has {len} values; expected {rows} x {cols}")]
    Shape {
        tensor: String,
        len: usize,
        rows: usize,
        cols: usize,
    },
}

/// How a repaired candidate was rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum RepairMethod {
    /// GPTQ error feedback with calibration activations.
    Gptq,
    /// Stochastic rounding (no calibration).
    Stochastic,
}

impl RepairMethod {
    /// The suffix of the candidate's label: `bf16:repaired`, `q4_0:stochastic`.
    pub fn label_suffix(self) -> &'static str {
        match self {
            RepairMethod::Gptq => "repaired",
            RepairMethod::Stochastic => "stochastic",
        }
    }

    /// True when the method needs calibration activations.
    pub fn needs_calibration(self) -> bool {
        matches!(self, RepairMethod::Gptq)
    }
}

/// The label of a repaired candidate (`bf16:repaired`), defined once for every report.
pub fn candidate_label(precision: Precision, method: RepairMethod) -> String {
    format!("{}:{}", precision.name(), method.label_suffix())
}

/// The precision a candidate label names: `q4_0:repaired`, `bf16+residual`, `q4_0+lora` → its
/// format (for class-based defaults and the best option per format).
pub fn label_precision(label: &str) -> Option<Precision> {
    Precision::parse(label_format(label))
}

/// The deployment format a candidate label belongs to: the part before `:` or `+`.
pub fn label_format(label: &str) -> &str {
    label.split([':', '+']).next().unwrap_or(label)
}

/// A grid a repair can round onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Float(FloatFormat),
    Q8_0,
    Q4_0,
    Q4_1,
    /// ggml's 5-bit formats and the K-quants (`kquant.rs`): each block's parameters by ggml's
    /// rule from the block-start values, every code chosen under them.
    Kquant(Kind),
}

impl Target {
    /// True when `--repair` handles `precision`: bf16, f16 and every ggml format (single types
    /// and mixes). f32 has nothing to round; bitsandbytes formats are not supported.
    pub fn repairs(precision: Precision) -> bool {
        match precision {
            Precision::Float(f) => f != FloatFormat::F32,
            Precision::Quant(q) => q.ggml_type().is_some() || matches!(q, QuantFormat::Mix(_)),
        }
    }

    /// The grid a repair of `precision` rounds the 2-D weight `tensor` (rows of `cols` values)
    /// onto: the ggml type the format stores that tensor in ([`QuantFormat::stored_type`]: a
    /// mix's per-tensor choice, llama-quantize's fallback for rows that are not whole blocks).
    /// `None` when that storage is no grid a repair rounds onto (f32, rows stored as f16, a
    /// tensor a mix keeps as stored) or the precision is not repaired: the plain merge serves it.
    pub fn for_tensor(
        precision: Precision,
        tensor: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Target>, QuantError> {
        if !Target::repairs(precision) {
            return Ok(None);
        }
        Ok(match precision {
            Precision::Float(f) => Some(Target::Float(f)),
            Precision::Quant(q) => q.stored_type(tensor, rows, cols)?.and_then(Target::of_ggml),
        })
    }

    /// The grid of a ggml type, when a repair rounds onto it.
    fn of_ggml(ty: GgmlType) -> Option<Target> {
        Some(match ty {
            GgmlType::Q8_0 => Target::Q8_0,
            GgmlType::Q4_0 => Target::Q4_0,
            GgmlType::Q4_1 => Target::Q4_1,
            GgmlType::Q5_0 => Target::Kquant(Kind::Q5_0),
            GgmlType::Q5_1 => Target::Kquant(Kind::Q5_1),
            GgmlType::Q2K => Target::Kquant(Kind::Q2K),
            GgmlType::Q3K => Target::Kquant(Kind::Q3K),
            GgmlType::Q4K => Target::Kquant(Kind::Q4K),
            GgmlType::Q5K => Target::Kquant(Kind::Q5K),
            GgmlType::Q6K => Target::Kquant(Kind::Q6K),
            _ => return None,
        })
    }

    /// The ggml type a block target's bytes are (`None` for a float target).
    pub fn ggml_type(self) -> Option<GgmlType> {
        Some(match self {
            Target::Float(_) => return None,
            Target::Q8_0 => GgmlType::Q8_0,
            Target::Q4_0 => GgmlType::Q4_0,
            Target::Q4_1 => GgmlType::Q4_1,
            Target::Kquant(Kind::Q5_0) => GgmlType::Q5_0,
            Target::Kquant(Kind::Q5_1) => GgmlType::Q5_1,
            Target::Kquant(Kind::Q2K) => GgmlType::Q2K,
            Target::Kquant(Kind::Q3K) => GgmlType::Q3K,
            Target::Kquant(Kind::Q4K) => GgmlType::Q4K,
            Target::Kquant(Kind::Q5K) => GgmlType::Q5K,
            Target::Kquant(Kind::Q6K) => GgmlType::Q6K,
        })
    }

    /// The precisions that can be repaired, for messages.
    pub const NAMES: &'static str = "bf16, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, \
                                     q5_k, q6_k and the mixes q3_k_m, q4_k_s, q4_k_m, q5_k_m";

    /// Values per block (whose parameters are taken together); `None` for a float target.
    pub fn block_elements(self) -> Option<usize> {
        match self {
            Target::Float(_) => None,
            Target::Q8_0 | Target::Q4_0 | Target::Q4_1 => Some(GGML_QK),
            Target::Kquant(k) => Some(k.block_elements()),
        }
    }

    fn block_bytes(self) -> Option<usize> {
        match self {
            Target::Float(_) => None,
            Target::Q8_0 => Some(Q8_0_BLOCK_BYTES),
            Target::Q4_0 => Some(Q4_0_BLOCK_BYTES),
            Target::Q4_1 => Some(Q4_1_BLOCK_BYTES),
            Target::Kquant(k) => Some(k.block_bytes()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Float(f) => f.name(),
            Target::Q8_0 => "q8_0",
            Target::Q4_0 => "q4_0",
            Target::Q4_1 => "q4_1",
            Target::Kquant(k) => k.name(),
        }
    }
}

/// A repaired `[rows, cols]` tensor: the values every loader will see, and for block formats the
/// ggml bytes (row by row, block by block) that decode to exactly those values.
#[derive(Debug, Clone)]
pub struct Rounded {
    pub values: Vec<f32>,
    pub ggml: Option<Vec<u8>>,
    /// The grid the values lie on (the bytes' type).
    pub target: Target,
}

/// The grid one value is rounded onto: a float format, a 32-value block's parameters as stored
/// (f16 scale and minimum), or one sub-block of a [`Target::Kquant`] block.
#[derive(Debug, Clone, Copy)]
enum Block {
    Float(FloatFormat),
    Q8_0 { d: Param },
    Q4_0 { d: Param },
    Q4_1 { d: Param, m: Param },
    Sub { kind: Kind, grid: SubGrid },
}

/// A block parameter as ggml stores it (f16) and its f32 value, converted once per block: every
/// value of the block is rounded against it, and a conversion per value cost a function call
/// (the `half` crate's runtime F16C dispatch).
#[derive(Debug, Clone, Copy)]
struct Param {
    stored: f16,
    value: f32,
}

impl Param {
    fn new(stored: f16) -> Param {
        Param {
            stored,
            value: stored.to_f32(),
        }
    }
}

/// A block's parameters: one grid for all its values, or for a [`Target::Kquant`] the ggml block
/// quantized from the block-start values (its parameters stay, its codes are replaced) and the
/// grid of each of its sub-blocks.
// One per row, replaced at every block start: held inline, a K-quant block costs no allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
enum Params {
    Uniform(Block),
    Kquant {
        kind: Kind,
        bytes: [u8; MAX_BLOCK_BYTES],
        grids: [SubGrid; MAX_SUB_BLOCKS],
    },
}

impl Params {
    /// A placeholder before the first block starts (a float target's only parameters).
    fn initial(target: Target) -> Params {
        match target {
            Target::Float(f) => Params::Uniform(Block::Float(f)),
            _ => Params::Uniform(Block::Float(FloatFormat::F32)),
        }
    }

    /// ggml's parameters for a block with these (f32) values.
    fn from_values(target: Target, x: &[f32]) -> Params {
        match target {
            Target::Kquant(kind) => {
                let mut bytes = [0u8; MAX_BLOCK_BYTES];
                kind.quantize_block(x, &mut bytes[..kind.block_bytes()]);
                let grids = kind.grids(&bytes);
                Params::Kquant { kind, bytes, grids }
            }
            other => Params::Uniform(Block::from_values(other, x)),
        }
    }

    /// GPTQ's parameters ([`Block::searched`] for Q4_0, ggml's rule otherwise).
    fn searched(target: Target, x: &[f32], weights: &[f64]) -> Params {
        match target {
            Target::Kquant(_) => Params::from_values(target, x),
            other => Params::Uniform(Block::searched(other, x, weights)),
        }
    }

    /// The grid of value `k` of the block.
    fn grid(&self, k: usize) -> Block {
        match self {
            Params::Uniform(b) => *b,
            Params::Kquant { kind, grids, .. } => Block::Sub {
                kind: *kind,
                grid: grids[k / kind.sub_len()],
            },
        }
    }

    /// Writes the block's bytes with these codes.
    fn encode(&self, codes: &[i32], out: &mut [u8]) {
        match self {
            Params::Uniform(b) => b.encode(codes, out),
            Params::Kquant { kind, bytes, .. } => {
                let n = kind.block_bytes();
                out[..n].copy_from_slice(&bytes[..n]);
                let codes: Vec<u8> = codes.iter().map(|c| *c as u8).collect();
                kind.set_codes(&mut out[..n], &codes);
            }
        }
    }
}

impl Block {
    /// The block's parameters from its current values, as ggml's reference quantizers choose
    /// them (`quantize_row_q8_0_ref`: amax/127; `q4_0`: signed max/−8; `q4_1`: (max−min)/15,
    /// min), so a repair changes which code each value gets, never how the block is scaled.
    fn from_values(target: Target, x: &[f32]) -> Block {
        match target {
            Target::Float(f) => Block::Float(f),
            Target::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                Block::Q8_0 {
                    d: Param::new(f16::from_f32(amax / 127.0)),
                }
            }
            Target::Q4_0 => {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                Block::Q4_0 {
                    d: Param::new(f16::from_f32(max / -8.0)),
                }
            }
            Target::Q4_1 => {
                let min = x.iter().fold(f32::MAX, |m, v| m.min(*v));
                let max = x.iter().fold(-f32::MAX, |m, v| m.max(*v));
                Block::Q4_1 {
                    d: Param::new(f16::from_f32((max - min) / 15.0)),
                    m: Param::new(f16::from_f32(min)),
                }
            }
            // Parameters of a K-quant block live in Params; one value alone has none.
            Target::Kquant(_) => Block::Float(FloatFormat::F32),
        }
    }

    /// GPTQ's block parameters: for Q4_0 the scale among [`Q4_0_SCALE_DIVISORS`] (ggml's rule
    /// first) with the least error over the block's values, each value's squared error weighted
    /// by `weights` (GPTQ's cost of an error in that column, R_kk²); ties keep the earlier
    /// candidate. Other targets take ggml's rule. The block stays an ordinary ggml block.
    fn searched(target: Target, x: &[f32], weights: &[f64]) -> Block {
        if target != Target::Q4_0 {
            return Block::from_values(target, x);
        }
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        // Every candidate's cost in full: the weighted squared errors a chunk of values at a time
        // (vectorized, `q4_0_costs`), each candidate's sum in value order from 0 as the
        // reference adds them (so the choice is the same to the last bit), the 13 sums side by
        // side so their additions overlap. Stopping a candidate once its running sum reached the
        // best would choose the same scale (terms are never negative), but its serial compare-
        // and-branch cost more than the terms it saved.
        let candidates = Q4_0_SCALE_DIVISORS.map(|divisor| f16::from_f32(max / divisor));
        let mut sums = [0.0f64; Q4_0_SCALE_DIVISORS.len()];
        let mut terms = [[0.0f64; COST_CHUNK]; Q4_0_SCALE_DIVISORS.len()];
        for (xs, ws) in x.chunks(COST_CHUNK).zip(weights.chunks(COST_CHUNK)) {
            for (t, d) in terms.iter_mut().zip(candidates) {
                q4_0_costs(xs, ws, d, t);
            }
            for k in 0..xs.len() {
                for (sum, t) in sums.iter_mut().zip(&terms) {
                    *sum += t[k];
                }
            }
        }
        // Ties keep the earlier candidate (ggml's rule first).
        let mut best = (sums[0], candidates[0]);
        for (c, d) in sums.iter().zip(candidates).skip(1) {
            if *c < best.0 {
                best = (*c, d);
            }
        }
        Block::Q4_0 {
            d: Param::new(best.1),
        }
    }

    /// The code range and the value of a code, computed as ggml's dequantizers do (f32 product;
    /// Q4_1 multiply then add).
    fn value(self, code: i32) -> f32 {
        match self {
            Block::Float(_) => f32::NAN,
            Block::Q8_0 { d } => code as f32 * d.value,
            Block::Q4_0 { d } => (code - 8) as f32 * d.value,
            Block::Q4_1 { d, m } => code as f32 * d.value + m.value,
            Block::Sub { kind, grid } => kind.decode(grid, code),
        }
    }

    fn code_range(self) -> (i32, i32) {
        match self {
            Block::Float(_) => (0, 0),
            // ggml's own quantizer never emits −128; neither does a repair.
            Block::Q8_0 { .. } => (-127, 127),
            Block::Q4_0 { .. } | Block::Q4_1 { .. } => (0, 15),
            Block::Sub { kind, .. } => (0, kind.max_code()),
        }
    }

    /// `x` in code units (fractional), before rounding.
    fn code_position(self, x: f64) -> f64 {
        let step = |d: Param| f64::from(d.value);
        match self {
            Block::Float(_) => f64::NAN,
            Block::Q8_0 { d } => x / step(d),
            Block::Q4_0 { d } => x / step(d) + 8.0,
            Block::Q4_1 { d, m } => (x - f64::from(m.value)) / step(d),
            Block::Sub { kind, grid } => {
                (x + f64::from(grid.min)) / f64::from(grid.scale) + f64::from(kind.code_offset())
            }
        }
    }

    /// The nearest grid value to `x` and its code.
    fn nearest(self, x: f64) -> (f32, i32) {
        match self {
            Block::Float(f) => (f.round_from_f64(x), 0),
            block => {
                let (lo, hi) = block.code_range();
                let y = block.code_position(x);
                let code = if y.is_finite() {
                    (round_half_away(y) as i32).clamp(lo, hi)
                } else {
                    // A zero scale: every code decodes to the same value.
                    block.zero_code()
                };
                (block.value(code), code)
            }
        }
    }

    /// Down or up at random with probability given by the distance (`u` uniform in [0, 1)).
    fn stochastic(self, x: f64, u: f64) -> (f32, i32) {
        match self {
            Block::Float(f) => {
                let near = f.round_from_f64(x);
                if f64::from(near) == x || !x.is_finite() {
                    return (near, 0);
                }
                let other = neighbour(near, f64::from(near) < x, f);
                let (lo, hi) = if f64::from(near) < x {
                    (near, other)
                } else {
                    (other, near)
                };
                let p_up = (x - f64::from(lo)) / (f64::from(hi) - f64::from(lo));
                (if u < p_up { hi } else { lo }, 0)
            }
            block => {
                let (lo, hi) = block.code_range();
                let y = block.code_position(x);
                if !y.is_finite() {
                    let code = block.zero_code();
                    return (block.value(code), code);
                }
                let floor = y.floor();
                let code = floor as i32 + i32::from(u < y - floor);
                let code = code.clamp(lo, hi);
                (block.value(code), code)
            }
        }
    }

    fn zero_code(self) -> i32 {
        match self {
            Block::Q4_0 { .. } => 8,
            Block::Sub { kind, .. } => kind.code_offset(),
            _ => 0,
        }
    }

    /// Writes the block's bytes: f16 d (and m), then the codes (Q4: value j in the low nibble
    /// and value j+16 in the high nibble of byte j).
    fn encode(self, codes: &[i32], out: &mut [u8]) {
        match self {
            // A sub-block's bytes are written by its Params.
            Block::Float(_) | Block::Sub { .. } => {}
            Block::Q8_0 { d } => {
                out[..2].copy_from_slice(&d.stored.to_le_bytes());
                for (o, c) in out[2..].iter_mut().zip(codes) {
                    *o = (*c as i8) as u8;
                }
            }
            Block::Q4_0 { d } => {
                out[..2].copy_from_slice(&d.stored.to_le_bytes());
                pack_nibbles(codes, &mut out[2..]);
            }
            Block::Q4_1 { d, m } => {
                out[..2].copy_from_slice(&d.stored.to_le_bytes());
                out[2..4].copy_from_slice(&m.stored.to_le_bytes());
                pack_nibbles(codes, &mut out[4..]);
            }
        }
    }
}

fn pack_nibbles(codes: &[i32], out: &mut [u8]) {
    let half = GGML_QK / 2;
    for j in 0..half {
        out[j] = (codes[j] as u8 & 0x0F) | ((codes[j + half] as u8 & 0x0F) << 4);
    }
}

/// Values of a block whose Q4_0 scale-search costs are computed together (see `Block::searched`).
const COST_CHUNK: usize = GGML_QK;

/// The GPTQ-weighted squared errors `w·(x − q)²` of up to [`COST_CHUNK`] values rounded to
/// nearest on the Q4_0 grid of scale `d` (as [`Block::nearest`] rounds them) into `terms`.
///
/// A whole chunk of finite values with a finite non-zero scale goes through a branch-free loop
/// the compiler vectorizes: clamping y = x/d + 8 to [0, 15] before rounding leaves the clamped
/// code unchanged (rounding is monotone), and on [0, 15] rounding half away from zero is
/// rounding half to even plus one where that took an exact tie down. Anything else (a zero scale, NaN, a short chunk) takes
/// `Block::nearest` value by value.
fn q4_0_costs(xs: &[f32], ws: &[f64], d: f16, terms: &mut [f64; COST_CHUNK]) {
    let (d32, d64) = (d.to_f32(), f64::from(d.to_f32()));
    let whole = <&[f32; COST_CHUNK]>::try_from(xs)
        .ok()
        .zip(<&[f64; COST_CHUNK]>::try_from(ws).ok())
        .filter(|(xs, _)| d64 != 0.0 && d64.is_finite() && xs.iter().all(|v| v.is_finite()));
    let Some((xs, ws)) = whole else {
        let block = Block::Q4_0 { d: Param::new(d) };
        for ((t, v), w) in terms.iter_mut().zip(xs).zip(ws) {
            let e = f64::from(*v) - f64::from(block.nearest(f64::from(*v)).0);
            *t = w * e * e;
        }
        return;
    };
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { q4_0_chunk_avx2(xs, ws, d32, d64, terms) };
        return;
    }
    q4_0_chunk(xs, ws, d32, d64, terms);
}

/// [`q4_0_chunk`] compiled for AVX2: four lanes instead of SSE2's two, the same IEEE operations
/// (no FMA: `crate::simd` says why that keeps the bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q4_0_chunk_avx2(
    xs: &[f32; COST_CHUNK],
    ws: &[f64; COST_CHUNK],
    d32: f32,
    d64: f64,
    terms: &mut [f64; COST_CHUNK],
) {
    q4_0_chunk(xs, ws, d32, d64, terms);
}

/// The branch-free body of [`q4_0_costs`] for finite values and a finite non-zero scale.
#[inline(always)]
fn q4_0_chunk(
    xs: &[f32; COST_CHUNK],
    ws: &[f64; COST_CHUNK],
    d32: f32,
    d64: f64,
    terms: &mut [f64; COST_CHUNK],
) {
    // 2⁵²: adding and subtracting it rounds a y in [0, 2⁵¹) to the nearest integer, ties to even
    // (exactly, in f64), with no float-to-int conversion to keep the loop from vectorizing.
    const MAGIC: f64 = 4_503_599_627_370_496.0;
    for k in 0..COST_CHUNK {
        let v64 = f64::from(xs[k]);
        let y = (v64 / d64 + 8.0).clamp(0.0, 15.0);
        let even = (y + MAGIC) - MAGIC;
        // Half away from zero: a tie the even rounding took down goes up.
        let code = even + if y - even == 0.5 { 1.0 } else { 0.0 };
        let e = v64 - f64::from((code - 8.0) as f32 * d32);
        terms[k] = ws[k] * e * e;
    }
}

/// `y.round()` (half away from zero) without a call into libm, which the baseline x86-64 target
/// makes of `f64::round`: exact, since the truncation t of y and y − t are exact in f64. Only
/// codes need it, so a |y| ≥ 2⁶³ (saturated by the cast, then clamped by the caller) may come
/// out as any value of the same sign beyond every code range.
#[inline(always)]
fn round_half_away(y: f64) -> f64 {
    let t = (y as i64) as f64;
    let f = y - t;
    if f >= 0.5 {
        t + 1.0
    } else if f <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// The next value of format `f` above (`up`) or below `v`.
fn neighbour(v: f32, up: bool, f: FloatFormat) -> f32 {
    match f {
        FloatFormat::F32 => {
            let bits = v.to_bits();
            let toward_larger_magnitude = up == (v >= 0.0);
            if v == 0.0 {
                return if up {
                    f32::from_bits(1)
                } else {
                    -f32::from_bits(1)
                };
            }
            f32::from_bits(if toward_larger_magnitude {
                bits + 1
            } else {
                bits - 1
            })
        }
        FloatFormat::Bf16 => {
            let h = half::bf16::from_f32(v);
            if v == 0.0 {
                let tiny = half::bf16::from_bits(1).to_f32();
                return if up { tiny } else { -tiny };
            }
            let toward_larger_magnitude = up == (v > 0.0);
            let bits = h.to_bits();
            half::bf16::from_bits(if toward_larger_magnitude {
                bits + 1
            } else {
                bits - 1
            })
            .to_f32()
        }
        FloatFormat::F16 => {
            let h = f16::from_f32(v);
            if v == 0.0 {
                let tiny = f16::from_bits(1).to_f32();
                return if up { tiny } else { -tiny };
            }
            let toward_larger_magnitude = up == (v > 0.0);
            let bits = h.to_bits();
            f16::from_bits(if toward_larger_magnitude {
                bits + 1
            } else {
                bits - 1
            })
            .to_f32()
        }
    }
}

/// GPTQ's factor of the damped input second moment, in the form the column loop reads.
///
/// GPTQ (Frantar et al. 2022, Algorithm 1) takes U, the upper Cholesky factor of H⁻¹, and after
/// rounding column j pushes e_j·U[j, k] onto every later column k, e_j = (w̃_j − q_j)/U_jj. With
/// P the reversal permutation and P·H·P = L·Lᵀ, R = P·L·P is upper triangular with H = R·Rᵀ, so
/// H⁻¹ = (R⁻¹)ᵀ·R⁻¹ and U = R⁻¹. Writing δ = w − q (original weights minus their grid values),
/// the error vector is e = δ·R, and the value column j is rounded from is
///
///   w̃_j = w_j + Σ_{k<j} δ_k · R_kj / R_jj
///
/// (Chen et al. 2025 read this as Babai's nearest-plane algorithm). So GPTQ needs only H's own
/// reversed Cholesky factor, column-scaled to a unit diagonal (`s`): no inverse, half the
/// factorization work, the same rounding decisions up to f64 summation order.
///
/// Block formats also need GPTQ's *partially* updated values when a 32-column block starts at j
/// (its scale is chosen from them): w⁽ʲ⁾_k = w_k − Σ_{i<j} e_i·U_ik for k in the block. Split
/// F = [0, j) and the rest r: those are the rest's best values given q_F,
/// w_r + c·R_rr⁻¹ with c = δ_F·R_Fr, and R_rr⁻¹ being upper triangular, its leading 32×32 block
/// is the inverse of R's 32×32 diagonal block. The running sums hold c/R_kk already, so one small
/// triangular product per block gives GPTQ's values exactly (`block_inverse`). A K-quant's
/// 256-column super-block is the same with R's 256×256 diagonal blocks (`super_inverse`); it
/// starts a lazy batch, so its running values hold every earlier column's feedback, the half in
/// the next batch included.
#[derive(Debug, Clone)]
pub struct HessianFactor {
    pub n: usize,
    /// S = R·diag(1/R_jj), upper triangular, row-major `[n, n]`.
    pub s: Vec<f64>,
    /// R's diagonal (so R = S·diag(d)).
    pub d: Vec<f64>,
    /// For each whole 32-column block b: the inverse of R's diagonal block, upper triangular,
    /// row-major `[32, 32]` at `b·32·32`.
    pub block_inverse: Vec<f64>,
    /// The same for each whole 256-column super-block, `[256, 256]` at `b·256·256`.
    pub super_inverse: Vec<f64>,
}

impl HessianFactor {
    /// From H `[n, n]` (symmetric): inputs that never fire get a unit diagonal (GPTQ's dead
    /// columns), then [`DAMPING`] · mean diagonal is added.
    pub fn from_hessian(h: &[f64], n: usize, tensor: &str) -> Result<Self, RepairError> {
        let mut a = h.to_vec();
        let mut diag_sum = 0.0;
        for i in 0..n {
            if a[i * n + i] <= 0.0 {
                a[i * n + i] = 1.0;
            }
            diag_sum += a[i * n + i];
        }
        let damp = DAMPING * diag_sum / n.max(1) as f64;
        for i in 0..n {
            a[i * n + i] += damp;
        }
        // Reverse rows and columns, factor, reverse back: R upper with H = R·Rᵀ.
        let reversed: Vec<f64> = (0..n * n)
            .map(|k| a[(n - 1 - k / n) * n + (n - 1 - k % n)])
            .collect();
        drop(a);
        let l = cholesky_lower(&reversed, n).map_err(|pivot| RepairError::NotPositiveDefinite {
            tensor: tensor.to_string(),
            pivot,
            n,
        })?;
        let r = |i: usize, j: usize| l[(n - 1 - i) * n + (n - 1 - j)];
        let mut s = vec![0.0f64; n * n];
        s.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate().skip(i) {
                *v = r(i, j) / r(j, j);
            }
        });
        let diagonal_inverses = |size: usize| -> Vec<f64> {
            (0..n / size)
                .into_par_iter()
                .flat_map_iter(|b| {
                    // inv(R_bb) = inv(R_bbᵀ)ᵀ, R_bbᵀ lower triangular.
                    let j = b * size;
                    let lower: Vec<f64> = (0..size * size)
                        .map(|k| r(j + k % size, j + k / size))
                        .collect();
                    transpose(&invert_lower_unblocked(&lower, size), size, size)
                })
                .collect()
        };
        Ok(HessianFactor {
            n,
            s,
            d: (0..n).map(|j| r(j, j)).collect(),
            block_inverse: diagonal_inverses(GGML_QK),
            super_inverse: diagonal_inverses(QK_K),
        })
    }
}

impl HessianFactor {
    /// GPTQ's values of the `size`-column block (32, or a 256 super-block) starting at `j` when
    /// it comes up, from the running values `partial` (w_k + c_k/R_kk) and the original weights
    /// `w` (see the type's notes).
    fn block_start_values(
        &self,
        j: usize,
        size: usize,
        partial: &[f64],
        w: &[f64],
        out: &mut [f32; QK_K],
    ) {
        let inverses = if size == QK_K {
            &self.super_inverse
        } else {
            &self.block_inverse
        };
        let inv = &inverses[j * size..(j + size) * size];
        // On the stack: this runs once per row and block, too often to allocate.
        let mut c = [0.0f64; QK_K];
        for (k, ck) in c[..size].iter_mut().enumerate() {
            *ck = (partial[k] - w[k]) * self.d[j + k];
        }
        // pushed_k = Σ_{m≤k} c_m · inv[m, k], each sum in m order from −0.0 (as `Iterator::sum`
        // would), accumulated row of `inv` by row so the inner loop runs along memory.
        let mut pushed = [-0.0f64; QK_K];
        for (m, &cm) in c[..size].iter().enumerate() {
            let row = &inv[m * size + m..(m + 1) * size];
            for (p, v) in pushed[m..size].iter_mut().zip(row) {
                *p += cm * v;
            }
        }
        for ((o, wk), p) in out.iter_mut().zip(&w[..size]).zip(&pushed) {
            *o = (wk + p) as f32;
        }
    }
}

/// Lower Cholesky factor of a symmetric positive-definite `[n, n]` matrix, column by column;
/// `Err(pivot)` when a pivot is not positive. Sequential: it only factors the diagonal blocks of
/// [`cholesky_lower`] (n ≤ [`FACTOR_BLOCK`], n³/6 multiply-adds: a fraction of a millisecond),
/// where handing each column's rows to the thread pool cost more than the arithmetic.
fn cholesky_unblocked(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let row_j: Vec<f64> = l[j * n..j * n + j].to_vec();
        let pivot = a[j * n + j] - dot(&row_j, &row_j);
        if pivot.is_nan() || pivot <= 0.0 || !pivot.is_finite() {
            return Err(j);
        }
        let d = pivot.sqrt();
        l[j * n + j] = d;
        for (k, row) in l[(j + 1) * n..].chunks_mut(n).enumerate() {
            let i = j + 1 + k;
            row[j] = (a[i * n + j] - dot(&row[..j], &row_j)) / d;
        }
    }
    Ok(l)
}

/// Side of the diagonal blocks of the blocked factorizations: the work outside them is GEMM.
const FACTOR_BLOCK: usize = 128;

/// Lower Cholesky factor, blocked (right-looking): each diagonal block is factored directly, the
/// panel below it is solved with that block's inverse and the trailing matrix is updated by one
/// matrix product, so almost all of the n³/3 work runs in candle's GEMM.
fn cholesky_lower(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let mut a = a.to_vec();
    let mut l = vec![0.0f64; n * n];
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + FACTOR_BLOCK).min(n);
        let b = k1 - k0;
        let diag = submatrix(&a, n, k0..k1, k0..k1);
        let l_kk = cholesky_unblocked(&diag, b).map_err(|p| k0 + p)?;
        put(&mut l, n, k0, k0, &l_kk, b, b);
        if k1 < n {
            let rest = n - k1;
            // L21 = A21 · L11⁻ᵀ
            let inv = invert_lower_unblocked(&l_kk, b);
            gemm_acc(
                (&mut l, View::of(k1 * n + k0, rest, b, n)),
                (&a, View::of(k1 * n + k0, rest, b, n)),
                (&inv, View::of(0, b, b, b)),
                true,
                1.0,
                gemm::Parallelism::Rayon(0),
            );
            // A22 -= L21 · L21ᵀ, lower triangle only: one column panel at a time, from its
            // diagonal down (the upper triangle is never read).
            let mut p0 = k1;
            while p0 < n {
                let p1 = (p0 + FACTOR_BLOCK).min(n);
                gemm_acc(
                    (&mut a, View::of(p0 * n + p0, n - p0, p1 - p0, n)),
                    (&l, View::of(p0 * n + k0, n - p0, b, n)),
                    (&l, View::of(p0 * n + k0, p1 - p0, b, n)),
                    true,
                    -1.0,
                    gemm::Parallelism::Rayon(0),
                );
                p0 = p1;
            }
        }
        k0 = k1;
    }
    Ok(l)
}

/// L⁻¹ by forward substitution, one column per worker.
fn invert_lower_unblocked(l: &[f64], n: usize) -> Vec<f64> {
    let columns: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|c| {
            // Rows c..n of column c.
            let mut v = vec![0.0f64; n - c];
            for i in c..n {
                let rhs = if i == c { 1.0 } else { 0.0 };
                let s = dot(&l[i * n + c..i * n + i], &v[..i - c]);
                v[i - c] = (rhs - s) / l[i * n + i];
            }
            v
        })
        .collect();
    let mut out = vec![0.0f64; n * n];
    for (c, v) in columns.iter().enumerate() {
        for (k, x) in v.iter().enumerate() {
            out[(c + k) * n + c] = *x;
        }
    }
    out
}

fn submatrix(
    a: &[f64],
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for r in rows {
        out.extend_from_slice(&a[r * n + cols.start..r * n + cols.end]);
    }
    out
}

fn put(a: &mut [f64], n: usize, row: usize, col: usize, block: &[f64], rows: usize, cols: usize) {
    for r in 0..rows {
        a[(row + r) * n + col..(row + r) * n + col + cols]
            .copy_from_slice(&block[r * cols..(r + 1) * cols]);
    }
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
    out
}

/// A dot product with four accumulators, so the compiler vectorizes it.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for k in 0..chunks {
        for (lane, slot) in acc.iter_mut().enumerate() {
            *slot += a[4 * k + lane] * b[4 * k + lane];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for k in chunks * 4..a.len() {
        s += a[k] * b[k];
    }
    s
}

fn check_shape(
    tensor: &str,
    len: usize,
    rows: usize,
    cols: usize,
    target: Target,
) -> Result<(), RepairError> {
    if len != rows * cols {
        return Err(RepairError::Shape {
            tensor: tensor.to_string(),
            len,
            rows,
            cols,
        });
    }
    if let Some(block) = target.block_elements()
        && !cols.is_multiple_of(block)
    {
        return Err(RepairError::NotBlockAligned {
            tensor: tensor.to_string(),
            cols,
            block,
            format: target.name(),
        });
    }
    Ok(())
}

/// GPTQ: rounds `w` (`[rows, cols]`, the exact merge, row-major `[out, in]`) onto `target` with
/// error feedback through `factor` (from the H of this layer's input, `n == cols`).
///
/// Per row, columns go in order; column j is rounded from w̃_j = w_j + Σ_{k<j} δ_k·S_kj, δ_k the
/// rounding error of column k against the *original* weight ([`HessianFactor`]). Within a
/// [`BATCH_COLUMNS`]-wide batch each δ_j reaches the later columns at once; the columns after the
/// batch receive the whole batch's δ in one matrix product when it ends (GPTQ's lazy batch
/// update; the same sums, grouped for cache). A block format takes each block's parameters from
/// GPTQ's values as they are when its first column comes up (a K-quant super-block spans two
/// lazy batches: its parameters and codes carry over from one batch to the next).
pub fn gptq(
    tensor: &str,
    w: &[f64],
    rows: usize,
    cols: usize,
    factor: &HessianFactor,
    target: Target,
) -> Result<Rounded, RepairError> {
    check_shape(tensor, w.len(), rows, cols, target)?;
    if factor.n != cols {
        return Err(RepairError::Shape {
            tensor: tensor.to_string(),
            len: factor.n * factor.n,
            rows: cols,
            cols,
        });
    }
    let s = &factor.s;
    let weights: Vec<f64> = factor.d.iter().map(|d| d * d).collect();
    let block_bytes = target.block_bytes();
    // Values per block: a float target has one "block" that never restarts.
    let block = target.block_elements().unwrap_or(cols.max(1));
    let row_bytes = block_bytes.map_or(0, |b| cols / block * b);
    let mut work = w.to_vec();
    let mut values = vec![0.0f32; rows * cols];
    let mut bytes = vec![0u8; rows * row_bytes];
    // Each row's current block parameters and codes, kept across lazy batches.
    let mut params = vec![Params::initial(target); rows];
    let mut codes = vec![
        0i32;
        if block_bytes.is_some() {
            rows * block
        } else {
            0
        }
    ];
    let code_tile = if block_bytes.is_some() {
        block * ROW_TILE
    } else {
        1
    };
    let mut start = 0;
    while start < cols {
        let end = (start + BATCH_COLUMNS).min(cols);
        let width = end - start;
        let mut deltas = vec![0.0f64; rows * width];
        // The batch's columns, rows in parallel tiles (each row's feedback is its own).
        let byte_tiles: Vec<Option<&mut [u8]>> = if row_bytes > 0 {
            bytes.chunks_mut(row_bytes * ROW_TILE).map(Some).collect()
        } else {
            (0..rows.div_ceil(ROW_TILE)).map(|_| None).collect()
        };
        let mut code_tiles: Vec<&mut [i32]> = codes.chunks_mut(code_tile).collect();
        code_tiles.resize_with(rows.div_ceil(ROW_TILE), Default::default);
        work.par_chunks_mut(cols * ROW_TILE)
            .zip(w.par_chunks(cols * ROW_TILE))
            .zip(values.par_chunks_mut(cols * ROW_TILE))
            .zip(deltas.par_chunks_mut(width * ROW_TILE))
            .zip(byte_tiles)
            .zip(params.par_chunks_mut(ROW_TILE))
            .zip(code_tiles)
            .for_each(
                |((((((work, original), out), deltas), mut out_bytes), params), codes)| {
                    let count = out.len() / cols;
                    for j in start..end {
                        if block_bytes.is_some() && j % block == 0 {
                            let mut current = [0.0f32; QK_K];
                            for (r, p) in params.iter_mut().enumerate() {
                                let at = r * cols + j;
                                factor.block_start_values(
                                    j,
                                    block,
                                    &work[at..at + block],
                                    &original[at..at + block],
                                    &mut current,
                                );
                                *p = Params::searched(
                                    target,
                                    &current[..block],
                                    &weights[j..j + block],
                                );
                            }
                        }
                        // Within a 32-column group the errors go on one column at a time; the
                        // rest of the batch takes the group's errors as one product when it ends.
                        let group_start = start + (j - start) / FEEDBACK_GROUP * FEEDBACK_GROUP;
                        let group_end = (group_start + FEEDBACK_GROUP).min(end);
                        let spread = &s[j * cols + j + 1..j * cols + group_end];
                        for r in 0..count {
                            let x = work[r * cols + j];
                            let (q, code) = params[r].grid(j % block).nearest(x);
                            out[r * cols + j] = q;
                            if block_bytes.is_some() {
                                codes[r * block + j % block] = code;
                            }
                            let delta = original[r * cols + j] - f64::from(q);
                            deltas[r * width + (j - start)] = delta;
                            let later = &mut work[r * cols + j + 1..r * cols + group_end];
                            for (v, s) in later.iter_mut().zip(spread) {
                                *v += delta * s;
                            }
                        }
                        if j + 1 == group_end && group_end < end {
                            gemm_acc(
                                (work, View::of(group_end, count, end - group_end, cols)),
                                (
                                    deltas,
                                    View::of(
                                        group_start - start,
                                        count,
                                        group_end - group_start,
                                        width,
                                    ),
                                ),
                                (
                                    s,
                                    View::of(
                                        group_start * cols + group_end,
                                        group_end - group_start,
                                        end - group_end,
                                        cols,
                                    ),
                                ),
                                false,
                                1.0,
                                gemm::Parallelism::None,
                            );
                        }
                        if let (Some(bb), Some(dst)) = (block_bytes, out_bytes.as_deref_mut())
                            && j % block == block - 1
                        {
                            let b = j / block;
                            for (r, p) in params.iter().enumerate() {
                                let at = r * row_bytes + b * bb;
                                p.encode(&codes[r * block..(r + 1) * block], &mut dst[at..at + bb]);
                            }
                        }
                    }
                },
            );
        // The batch's errors reach every later column at once: W̃[:, end:] += Δ · S[batch, end:],
        // one matrix product (GPTQ's lazy batch update).
        if end < cols {
            let rest = cols - end;
            gemm_acc(
                (&mut work, View::of(end, rows, rest, cols)),
                (&deltas, View::of(0, rows, width, width)),
                (s, View::of(start * cols + end, width, rest, cols)),
                false,
                1.0,
                gemm::Parallelism::Rayon(0),
            );
        }
        start = end;
    }
    Ok(Rounded {
        values,
        ggml: block_bytes.map(|_| bytes),
        target,
    })
}

/// Round-to-nearest with the same block parameters a repair uses (ggml's), for comparisons and
/// as the zero-feedback limit of [`gptq`].
pub fn nearest(
    tensor: &str,
    w: &[f64],
    rows: usize,
    cols: usize,
    target: Target,
) -> Result<Rounded, RepairError> {
    round_each(tensor, w, rows, cols, target, |b, x, _| b.nearest(x))
}

/// Stochastic rounding: each value goes to one of its two grid neighbours, up with probability
/// (x − lo)/(hi − lo), from a fixed per-tensor seed (the same merge writes the same file). Block
/// formats keep ggml's block scales from the exact values; only the codes are drawn.
pub fn stochastic(
    tensor: &str,
    w: &[f64],
    rows: usize,
    cols: usize,
    target: Target,
) -> Result<Rounded, RepairError> {
    let seed = name_seed(tensor);
    round_each(tensor, w, rows, cols, target, move |b, x, index| {
        b.stochastic(x, uniform(seed, index as u64))
    })
}

fn round_each(
    tensor: &str,
    w: &[f64],
    rows: usize,
    cols: usize,
    target: Target,
    round: impl Fn(Block, f64, usize) -> (f32, i32) + Sync,
) -> Result<Rounded, RepairError> {
    check_shape(tensor, w.len(), rows, cols, target)?;
    let mut values = vec![0.0f32; rows * cols];
    let (Some(block), Some(bb)) = (target.block_elements(), target.block_bytes()) else {
        let Target::Float(f) = target else {
            unreachable!("every block target has a block size and bytes")
        };
        values.par_iter_mut().enumerate().for_each(|(k, o)| {
            *o = round(Block::Float(f), w[k], k).0;
        });
        return Ok(Rounded {
            values,
            ggml: None,
            target,
        });
    };
    let mut bytes = vec![0u8; rows * cols / block * bb];
    values
        .par_chunks_mut(block)
        .zip(bytes.par_chunks_mut(bb))
        .enumerate()
        .for_each(|(g, (out, dst))| {
            let at = g * block;
            let x = &w[at..at + block];
            let current: Vec<f32> = x.iter().map(|v| *v as f32).collect();
            let params = Params::from_values(target, &current);
            let codes: Vec<i32> = x
                .iter()
                .zip(out.iter_mut())
                .enumerate()
                .map(|(k, (v, o))| {
                    let (q, code) = round(params.grid(k), *v, at + k);
                    *o = q;
                    code
                })
                .collect();
            params.encode(&codes, dst);
        });
    Ok(Rounded {
        values,
        ggml: Some(bytes),
        target,
    })
}

/// FNV-1a of the tensor name: the stochastic stream of one tensor.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A uniform draw in [0, 1) for element `index` (splitmix64 of seed + index, top 53 bits).
fn uniform(seed: u64, index: u64) -> f64 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::quant::{dequantize_q4_0, dequantize_q4_1, dequantize_q8_0};

    fn hessian(x: &[f64], tokens: usize, n: usize) -> Vec<f64> {
        let mut h = vec![0.0; n * n];
        for t in 0..tokens {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[t * n + i] * x[t * n + j];
                }
            }
        }
        h
    }

    #[test]
    fn round_half_away_is_f64_round() {
        let edges: [f64; 15] = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            7.5,
            15.5,
            -0.49999999999999994,
            0.49999999999999994,
            4503599627370495.5,
            4503599627370497.0,
            1e300,
            -1e300,
        ];
        for y in edges {
            let want = y.round();
            let got = round_half_away(y);
            // Beyond i64 the result only needs the sign and to lie outside every code range.
            if want.abs() >= 9.0e18 {
                assert_eq!(got.signum(), want.signum(), "{y}");
                assert!(got.abs() >= 9.0e18, "{y}");
            } else {
                // (−0.0 and 0.0 compare equal: both are code 0.)
                assert_eq!(got, want, "{y}");
            }
        }
        for (i, u) in pseudo(7, 100_000, 40.0).into_iter().enumerate() {
            // Halves and near-halves as well as arbitrary values.
            let y = if i % 3 == 0 {
                (u * 2.0).round() / 2.0
            } else {
                u
            };
            assert_eq!(round_half_away(y), y.round(), "{y}");
        }
    }

    #[test]
    fn q4_0_costs_match_nearest_value_by_value() {
        let xs = pseudo(11, COST_CHUNK * 2000, 0.05);
        let ws = pseudo(12, COST_CHUNK * 2000, 3.0);
        for (i, (x, w)) in xs.chunks(COST_CHUNK).zip(ws.chunks(COST_CHUNK)).enumerate() {
            let mut x: Vec<f32> = x.iter().map(|v| *v as f32).collect();
            let w: Vec<f64> = w.iter().map(|v| v.abs()).collect();
            let d = f16::from_f32(x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / -8.0);
            // Exact half-steps, a clipped value and (last chunks) a zero scale.
            if i % 4 == 0 {
                x[3] = 2.5 * d.to_f32();
                x[5] = -20.0 * d.to_f32();
            }
            let d = if i % 500 == 499 { f16::ZERO } else { d };
            let mut got = [0.0f64; COST_CHUNK];
            q4_0_costs(&x, &w, d, &mut got);
            for k in 0..COST_CHUNK {
                let e = f64::from(x[k])
                    - f64::from(Block::Q4_0 { d: Param::new(d) }.nearest(f64::from(x[k])).0);
                assert_eq!(
                    got[k].to_bits(),
                    (w[k] * e * e).to_bits(),
                    "chunk {i} value {k}"
                );
            }
        }
    }

    fn pseudo(seed: u64, len: usize, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|i| (uniform(seed, i as u64) - 0.5) * 2.0 * scale)
            .collect()
    }

    fn output_error(
        w: &[f64],
        q: &[f32],
        x: &[f64],
        rows: usize,
        cols: usize,
        tokens: usize,
    ) -> f64 {
        let mut s = 0.0;
        for t in 0..tokens {
            for r in 0..rows {
                let mut y = 0.0;
                for c in 0..cols {
                    y += x[t * cols + c] * (w[r * cols + c] - f64::from(q[r * cols + c]));
                }
                s += y * y;
            }
        }
        s
    }

    #[test]
    fn factor_is_the_reversed_cholesky_of_the_damped_moment() {
        let n = 6;
        let x = pseudo(1, 20 * n, 1.0);
        let h = hessian(&x, 20, n);
        let f = HessianFactor::from_hessian(&h, n, "t").expect("positive definite");
        // R·Rᵀ = H + λI with R = S·diag(d) upper triangular and S unit-diagonal.
        let damp = DAMPING * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        let r = |i: usize, j: usize| f.s[i * n + j] * f.d[j];
        for i in 0..n {
            assert_eq!(f.s[i * n + i], 1.0);
            for j in 0..n {
                let got: f64 = (0..n).map(|k| r(i, k) * r(j, k)).sum();
                let want = h[i * n + j] + if i == j { damp } else { 0.0 };
                assert!(
                    (got - want).abs() < 1e-9 * want.abs().max(1.0),
                    "({i},{j}) = {got}"
                );
                if j < i {
                    assert_eq!(f.s[i * n + j], 0.0, "upper triangular");
                }
            }
        }
    }

    #[test]
    fn blocked_cholesky_agrees_with_the_direct_one() {
        let n = 300;
        let x = pseudo(9, 400 * n, 1.0);
        let mut h = vec![0.0; n * n];
        for t in 0..400 {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[t * n + i] * x[t * n + j];
                }
            }
        }
        let blocked = cholesky_lower(&h, n).expect("pd");
        let direct = cholesky_unblocked(&h, n).expect("pd");
        let worst = blocked
            .iter()
            .zip(&direct)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-9, "cholesky {worst}");
        // L·L⁻¹ = I for the diagonal blocks' inverse.
        let m = 40;
        let inv = invert_lower_unblocked(&submatrix(&direct, n, 0..m, 0..m), m);
        for i in 0..m {
            for j in 0..m {
                let got: f64 = (0..m).map(|k| direct[i * n + k] * inv[k * m + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((got - want).abs() < 1e-9, "inverse ({i},{j}) {got}");
            }
        }
    }

    #[test]
    fn error_feedback_lowers_the_output_error_in_every_target() {
        // 512 columns: two K-quant super-blocks, each spanning two lazy batches.
        let (rows, cols, tokens) = (16, 512, 96);
        let x = pseudo(2, tokens * cols, 1.0);
        // Correlated inputs: a shared component makes H far from diagonal.
        let shared = pseudo(3, tokens, 1.0);
        let x: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(k, v)| v + shared[k / cols])
            .collect();
        let w = pseudo(4, rows * cols, 0.05);
        let f = HessianFactor::from_hessian(&hessian(&x, tokens, cols), cols, "t").expect("pd");
        for target in [
            Target::Float(FloatFormat::Bf16),
            Target::Float(FloatFormat::F16),
            Target::Q8_0,
            Target::Q4_0,
            Target::Q4_1,
        ]
        .into_iter()
        .chain(Kind::ALL.map(Target::Kquant))
        {
            let g = gptq("t", &w, rows, cols, &f, target).expect("repair");
            let n = nearest("t", &w, rows, cols, target).expect("nearest");
            let (eg, en) = (
                output_error(&w, &g.values, &x, rows, cols, tokens),
                output_error(&w, &n.values, &x, rows, cols, tokens),
            );
            assert!(eg < 0.7 * en, "{target:?}: gptq {eg} vs nearest {en}");
        }
    }

    #[test]
    fn kquant_bytes_decode_to_the_repaired_values() {
        // Every repaired K-quant block is an ordinary ggml block: ggml's dequantizer (kquant.rs,
        // bit-exact with the C) gives back exactly the values the repair reports.
        let (rows, cols) = (3, 512);
        let w = pseudo(15, rows * cols, 0.05);
        let x = pseudo(16, 600 * cols / 4, 1.0);
        let x: Vec<f64> = (0..600 * cols)
            .map(|k| x[k / 4] + 0.1 * (k % cols) as f64 / cols as f64)
            .collect();
        let f = HessianFactor::from_hessian(&hessian(&x, 600, cols), cols, "t").expect("pd");
        for kind in Kind::ALL {
            let target = Target::Kquant(kind);
            for (how, r) in [
                ("gptq", gptq("t", &w, rows, cols, &f, target).expect("gptq")),
                (
                    "stochastic",
                    stochastic("t", &w, rows, cols, target).expect("stochastic"),
                ),
                (
                    "nearest",
                    nearest("t", &w, rows, cols, target).expect("nearest"),
                ),
            ] {
                let bytes = r.ggml.as_deref().expect("block bytes");
                assert_eq!(
                    bytes.len(),
                    rows * cols / kind.block_elements() * kind.block_bytes()
                );
                let back = kind.dequantize(bytes).expect("decodes");
                assert!(
                    back.iter()
                        .zip(&r.values)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {how}",
                    kind.name()
                );
            }
        }
    }

    #[test]
    fn kquant_blocks_keep_ggml_parameters_of_the_block_start_values() {
        // Without feedback (H = I has no off-diagonal terms to push errors along), GPTQ's
        // block-start values are the weights themselves: every block's parameter bytes are
        // ggml's own for those values, and each code is the nearest under them.
        let (rows, cols) = (2, 512);
        let w = pseudo(17, rows * cols, 0.05);
        let mut h = vec![0.0; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        let f = HessianFactor::from_hessian(&h, cols, "t").expect("pd");
        let w32: Vec<f32> = w.iter().map(|v| *v as f32).collect();
        for kind in Kind::ALL {
            let target = Target::Kquant(kind);
            let g = gptq("t", &w, rows, cols, &f, target).expect("gptq");
            let n = nearest("t", &w, rows, cols, target).expect("nearest");
            assert_eq!(g.ggml, n.ggml, "{}", kind.name());
            let (e, bb) = (kind.block_elements(), kind.block_bytes());
            let bytes = g.ggml.as_deref().expect("bytes");
            for (b, x) in w32.chunks_exact(e).enumerate() {
                let mut ggml = vec![0u8; bb];
                kind.quantize_block(x, &mut ggml);
                assert_eq!(kind.grids(&ggml), kind.grids(&bytes[b * bb..(b + 1) * bb]));
            }
        }
    }

    #[test]
    fn each_tensor_is_repaired_onto_the_type_its_format_stores() {
        use crate::merge::mix::{Mix, MixKind, MixModel};
        let q4km = Precision::Quant(QuantFormat::Mix(Mix::unbound(MixKind::Q4KM).bind(
            MixModel {
                layers: 30,
                is_70b: false,
                tied_embeddings: true,
            },
        )));
        let down = "model.layers.0.mlp.down_proj.weight";
        let q = "model.layers.5.self_attn.q_proj.weight";
        // Layer 0 of 30 uses more bits: Q6_K; 576-wide rows fall back from Q4_K to Q5_0.
        let t = |p, name, cols| Target::for_tensor(p, name, 576, cols).expect("bound");
        assert_eq!(t(q4km, down, 1536), Some(Target::Kquant(Kind::Q6K)));
        assert_eq!(t(q4km, q, 576), Some(Target::Kquant(Kind::Q5_0)));
        assert_eq!(t(q4km, q, 512), Some(Target::Kquant(Kind::Q4K)));
        let q4k = Precision::Quant(QuantFormat::Q4K);
        assert_eq!(t(q4k, q, 576), Some(Target::Kquant(Kind::Q5_0)));
        // q8_0 rows that are not whole 32-blocks are stored as f16: no repair grid.
        assert_eq!(t(Precision::Quant(QuantFormat::Q8_0), q, 40), None);
        assert_eq!(t(Precision::Float(FloatFormat::F32), q, 576), None);
        assert!(!Target::repairs(Precision::Quant(QuantFormat::Nf4)));
        assert!(Target::repairs(Precision::Quant(QuantFormat::Q6K)));
        let unbound = Precision::Quant(QuantFormat::Mix(Mix::unbound(MixKind::Q4KM)));
        assert!(Target::for_tensor(unbound, q, 576, 576).is_err());
    }

    #[test]
    fn block_bytes_decode_to_the_repaired_values() {
        let (rows, cols) = (5, 64);
        let w = pseudo(5, rows * cols, 0.3);
        let x = pseudo(6, 40 * cols, 1.0);
        let f = HessianFactor::from_hessian(&hessian(&x, 40, cols), cols, "t").expect("pd");
        type Decode = fn(&[u8]) -> Result<Vec<f32>, crate::merge::quant::QuantError>;
        let decode: [(Target, Decode); 3] = [
            (Target::Q8_0, dequantize_q8_0),
            (Target::Q4_0, dequantize_q4_0),
            (Target::Q4_1, dequantize_q4_1),
        ];
        for (target, dq) in decode {
            for r in [
                gptq("t", &w, rows, cols, &f, target).expect("gptq"),
                stochastic("t", &w, rows, cols, target).expect("stochastic"),
                nearest("t", &w, rows, cols, target).expect("nearest"),
            ] {
                let bytes = r.ggml.as_deref().expect("block bytes");
                assert_eq!(dq(bytes).expect("decodes"), r.values, "{target:?}");
            }
        }
    }

    #[test]
    fn nearest_on_blocks_is_ggml_round_to_nearest() {
        let w = pseudo(7, 4 * 64, 1.0);
        let w32: Vec<f32> = w.iter().map(|v| *v as f32).collect();
        let w32_64: Vec<f64> = w32.iter().map(|v| f64::from(*v)).collect();
        let ours = nearest("t", &w32_64, 4, 64, Target::Q8_0).expect("q8_0");
        let ggml =
            dequantize_q8_0(&crate::merge::quant::quantize_q8_0(&w32).expect("q")).expect("dq");
        let same = ours
            .values
            .iter()
            .zip(&ggml)
            .filter(|(a, b)| a == b)
            .count();
        // ggml rounds with the f32 scale and decodes with its f16: rare codes differ by one.
        assert!(same >= ggml.len() * 98 / 100, "{same} of {}", ggml.len());
    }

    #[test]
    fn stochastic_rounding_is_unbiased_below_half_an_ulp() {
        // 1.0 + 0.3 ulp(bf16): nearest rounding keeps 1.0 everywhere; stochastic keeps ~30 %.
        let ulp = f64::from(FloatFormat::Bf16.ulp(1.0));
        let w = vec![1.0 + 0.3 * ulp; 20_000];
        let target = Target::Float(FloatFormat::Bf16);
        let n = nearest("t", &w, 1, w.len(), target).expect("nearest");
        assert!(n.values.iter().all(|v| *v == 1.0));
        let s = stochastic("t", &w, 1, w.len(), target).expect("stochastic");
        let mean = s.values.iter().map(|v| f64::from(*v) - 1.0).sum::<f64>() / w.len() as f64;
        assert!((mean / ulp - 0.3).abs() < 0.02, "mean {}", mean / ulp);
        let again = stochastic("t", &w, 1, w.len(), target).expect("stochastic");
        assert_eq!(s.values, again.values, "seeded by the tensor name");
    }

    #[test]
    fn searched_q4_0_scale_never_costs_more_than_ggml_rule() {
        let mut better = 0;
        for seed in 0..200 {
            let x: Vec<f32> = pseudo(100 + seed, GGML_QK, 1.0)
                .iter()
                .map(|v| (v * v * v) as f32)
                .collect();
            let weights: Vec<f64> = pseudo(400 + seed, GGML_QK, 1.0)
                .iter()
                .map(|v| 1.0 + v.abs())
                .collect();
            let cost = |b: Block| -> f64 {
                x.iter()
                    .zip(&weights)
                    .map(|(v, w)| {
                        let e = f64::from(*v) - f64::from(b.nearest(f64::from(*v)).0);
                        w * e * e
                    })
                    .sum()
            };
            let (ggml, searched) = (
                Block::from_values(Target::Q4_0, &x),
                Block::searched(Target::Q4_0, &x, &weights),
            );
            assert!(cost(searched) <= cost(ggml), "seed {seed}");
            better += usize::from(cost(searched) < cost(ggml));
        }
        // Heavy-tailed blocks: clipping the largest value usually pays.
        assert!(better > 100, "{better} of 200 blocks improved");
    }

    #[test]
    fn refuses_rows_that_are_not_whole_blocks() {
        let w = vec![0.0; 2 * 40];
        let err = nearest("m.w", &w, 2, 40, Target::Q4_0).expect_err("40 columns");
        assert!(err.to_string().contains("m.w") && err.to_string().contains("32"));
    }

    #[test]
    fn labels_name_precision_and_method() {
        let p = Precision::Quant(QuantFormat::Q4_0);
        assert_eq!(candidate_label(p, RepairMethod::Gptq), "q4_0:repaired");
        assert_eq!(label_precision("q4_0:repaired"), Some(p));
        assert_eq!(label_precision("bf16"), Precision::parse("bf16"));
        assert_eq!(label_precision("q4_0+residual"), Some(p));
    }
}
