//! ggml's 5-bit legacy formats (`Q5_0`, `Q5_1`) and the K-quants (`Q2_K` … `Q6_K`): quantize and
//! dequantize, bit-exact with ggml's reference code in `ggml/src/ggml-quants.c` (llama.cpp as
//! vendored in llama-cpp-python 0.3.36).
//!
//! Without an importance matrix, llama-quantize's `quantize_q*_K` / `quantize_q5_*` call the
//! `quantize_row_*_ref` bodies reproduced here; the imatrix search (`quantize_row_*_impl`) is not
//! modelled. Every float operation is written in the order the C evaluates it (left to right,
//! integers converted to f32 where C converts them), with no fused multiply-add: that is the code
//! an x86-64 build of `ggml-base` runs (it is compiled without `-march`, so nothing contracts).
//! The goldens in `fixtures/goldens/kquant/` come from that C compiled with `-ffp-contract=off`
//! (`fixtures/gen/kquant.py`); the tests below require identical bytes and dequantized bits, and
//! `mix.rs`'s tests require the bytes the real llama-quantize wrote (Q3_K … Q6_K, Q5_0, Q5_1).
//! Q5_0 is therefore *not* fused, unlike `quant.rs`'s Q4_0, which follows gguf-py's FMA
//! emulation: the two agree except where `x·id + 16.5` lands within an f32 rounding of an integer.
//!
//! The search helpers keep ggml's names so the code can be read next to the C:
//! [`nearest_int`] (round half to even through the `1.5·2^23` trick), `make_qx_quants` (Q6_K's
//! scale search), `make_q3_quants` (Q3_K's), `make_qkx2_quants` (scale and min search of Q2_K,
//! Q4_K, Q5_K) and `get_scale_min_k4` (the 6-bit scale packing of Q4_K/Q5_K).
//!
//! Non-finite inputs are not an error; they follow the C literally. `nearest_int` of a NaN or of a
//! value beyond ±2^22 returns the low mantissa bits minus 2^22 (ggml asserts only in debug
//! builds), comparisons with NaN are false as in C (`if (!d)` treats NaN as non-zero), and an
//! infinite element makes the sub-block's sums infinite or NaN, so its codes are whatever those
//! comparisons give — deterministic, and as meaningless as in ggml. The f16 conversions are
//! round-to-nearest-even like ggml's; a NaN scale is stored as the `half` crate's NaN.
//!
//! Parallelism: super-blocks are independent, so rayon splits the work by block and every output
//! byte is computed by the same sequential code whatever the thread count.

use half::f16;
use rayon::prelude::*;

use super::quant::QuantError;

/// Elements per super-block of the K-quants (`QK_K`).
pub const QK_K: usize = 256;
/// Elements per `Q5_0` / `Q5_1` block (`QK5_0`, `QK5_1`).
pub const QK5: usize = 32;
/// `{f16 d; u8 qh[4]; u8 qs[16]}`.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// `{f16 d; f16 m; u8 qh[4]; u8 qs[16]}`.
pub const Q5_1_BLOCK_BYTES: usize = 24;
/// `{u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}`.
pub const Q2_K_BLOCK_BYTES: usize = 84;
/// `{u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}`.
pub const Q3_K_BLOCK_BYTES: usize = 110;
/// `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`.
pub const Q4_K_BLOCK_BYTES: usize = 144;
/// `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`.
pub const Q5_K_BLOCK_BYTES: usize = 176;
/// `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`.
pub const Q6_K_BLOCK_BYTES: usize = 210;

/// ggml's `GROUP_MAX_EPS`: a sub-block whose largest |x| is below this quantizes to zero.
const GROUP_MAX_EPS: f32 = 1e-15;
/// Super-blocks handed to one rayon task; smaller inputs run on the calling thread.
const PAR_MIN_BLOCKS: usize = 64;

/// One ggml block format reproduced here: its name, block geometry and the two block functions.
#[derive(Clone, Copy)]
struct Layout {
    name: &'static str,
    elements: usize,
    bytes: usize,
    quantize: fn(&[f32], &mut [u8]),
    dequantize: fn(&[u8], &mut [f32]),
}

const Q5_0: Layout = Layout {
    name: "q5_0",
    elements: QK5,
    bytes: Q5_0_BLOCK_BYTES,
    quantize: q5_0_block,
    dequantize: dq5_0_block,
};
const Q5_1: Layout = Layout {
    name: "q5_1",
    elements: QK5,
    bytes: Q5_1_BLOCK_BYTES,
    quantize: q5_1_block,
    dequantize: dq5_1_block,
};
const Q2_K: Layout = Layout {
    name: "q2_k",
    elements: QK_K,
    bytes: Q2_K_BLOCK_BYTES,
    quantize: q2_k_block,
    dequantize: dq2_k_block,
};
const Q3_K: Layout = Layout {
    name: "q3_k",
    elements: QK_K,
    bytes: Q3_K_BLOCK_BYTES,
    quantize: q3_k_block,
    dequantize: dq3_k_block,
};
const Q4_K: Layout = Layout {
    name: "q4_k",
    elements: QK_K,
    bytes: Q4_K_BLOCK_BYTES,
    quantize: q4_k_block,
    dequantize: dq4_k_block,
};
const Q5_K: Layout = Layout {
    name: "q5_k",
    elements: QK_K,
    bytes: Q5_K_BLOCK_BYTES,
    quantize: q5_k_block,
    dequantize: dq5_k_block,
};
const Q6_K: Layout = Layout {
    name: "q6_k",
    elements: QK_K,
    bytes: Q6_K_BLOCK_BYTES,
    quantize: q6_k_block,
    dequantize: dq6_k_block,
};

/// `quantize_row_q5_0_ref`: like Q4_0 with 5-bit codes, `d = max/−16`,
/// `q = MIN(31, (int8)(x·id + 16.5))` (multiply, then add).
pub fn quantize_q5_0(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q5_0, row)
}
/// `dequantize_row_q5_0`: `x = (q − 16) · d`.
pub fn dequantize_q5_0(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q5_0, bytes)
}
/// `quantize_row_q5_1_ref`: `d = (max − min)/31`, `m = min`, `q = (uint8)((x − min)·id + 0.5)`.
pub fn quantize_q5_1(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q5_1, row)
}
/// `dequantize_row_q5_1`: `x = q · d + m`.
pub fn dequantize_q5_1(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q5_1, bytes)
}
/// `quantize_row_q2_K_ref`: 16 sub-blocks of 16, 2-bit codes with a 4-bit scale and min each.
pub fn quantize_q2_k(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q2_K, row)
}
/// `dequantize_row_q2_K`.
pub fn dequantize_q2_k(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q2_K, bytes)
}
/// `quantize_row_q3_K_ref`: 16 sub-blocks of 16, symmetric 3-bit codes with 6-bit scales.
pub fn quantize_q3_k(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q3_K, row)
}
/// `dequantize_row_q3_K`.
pub fn dequantize_q3_k(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q3_K, bytes)
}
/// `quantize_row_q4_K_ref`: 8 sub-blocks of 32, 4-bit codes with 6-bit scale and min each.
pub fn quantize_q4_k(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q4_K, row)
}
/// `dequantize_row_q4_K`.
pub fn dequantize_q4_k(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q4_K, bytes)
}
/// `quantize_row_q5_K_ref`: as Q4_K with 5-bit codes (high bits in `qh`).
pub fn quantize_q5_k(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q5_K, row)
}
/// `dequantize_row_q5_K`.
pub fn dequantize_q5_k(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q5_K, bytes)
}
/// `quantize_row_q6_K_ref`: 16 sub-blocks of 16, symmetric 6-bit codes with 8-bit scales.
pub fn quantize_q6_k(row: &[f32]) -> Result<Vec<u8>, QuantError> {
    quantize_blocks(Q6_K, row)
}
/// `dequantize_row_q6_K`.
pub fn dequantize_q6_k(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    dequantize_blocks(Q6_K, bytes)
}

fn quantize_blocks(layout: Layout, row: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !row.len().is_multiple_of(layout.elements) {
        return Err(QuantError::RowNotBlockAligned {
            format: layout.name,
            len: row.len(),
            block: layout.elements,
        });
    }
    let mut out = vec![0u8; row.len() / layout.elements * layout.bytes];
    row.par_chunks_exact(layout.elements)
        .zip(out.par_chunks_exact_mut(layout.bytes))
        .with_min_len(PAR_MIN_BLOCKS)
        .for_each(|(x, y)| (layout.quantize)(x, y));
    Ok(out)
}

fn dequantize_blocks(layout: Layout, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    if !bytes.len().is_multiple_of(layout.bytes) {
        return Err(QuantError::PartialBlock {
            format: layout.name,
            got: bytes.len(),
            block_bytes: layout.bytes,
        });
    }
    let mut out = vec![0f32; bytes.len() / layout.bytes * layout.elements];
    bytes
        .par_chunks_exact(layout.bytes)
        .zip(out.par_chunks_exact_mut(layout.elements))
        .with_min_len(PAR_MIN_BLOCKS)
        .for_each(|(x, y)| (layout.dequantize)(x, y));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers (ggml-quants.c names)
// ---------------------------------------------------------------------------------------------

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `nearest_int`: adds `1.5·2^23` so the FPU rounds to an integer (half to even) and reads
/// it from the mantissa. Outside ±2^22 (and for NaN) it returns the same garbage the C does.
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `1/d` or 0 (ggml's `d ? 1.0f/d : 0.0f`; `!=` is true for NaN, as C's truth test is).
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// C's `(int8_t)f` on x86-64: truncate to int32 (`cvttss2si`, NaN and overflow give `INT_MIN`),
/// keep the low byte.
fn trunc_to_i8(v: f32) -> i8 {
    let i = if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    };
    i as i8
}

/// C's `(uint8_t)f` on x86-64 for the same conversion.
fn trunc_to_u8(v: f32) -> u8 {
    trunc_to_i8(v) as u8
}

/// `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = NULL)`: the symmetric scale search Q6_K
/// uses. `L` gets codes offset by `nmax`; returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (l_slot, &v) in l_out.iter_mut().zip(x) {
        let l = code(iscale, v);
        *l_slot = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|is| *is != 0) {
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = code(iscale, v);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l_slot, &v) in l_out.iter_mut().zip(x) {
                *l_slot = (nmax + code(iscale, v)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants(n, nmax, x, L, do_rmse = true)`: Q3_K's symmetric search, a greedy per-element
/// refinement of the weighted least-squares scale. `L` gets codes offset by `nmax`.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (l_slot, &v) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *l_slot = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let li = f32::from(l_out[i]);
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(l_out[i]) {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for l in l_out.iter_mut() {
        *l += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// The knobs of one `make_qkx2_quants` call.
struct Qkx2 {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// `make_qkx2_quants`: the asymmetric search of Q2_K/Q4_K/Q5_K. Tries `nstep + 1` scales around
/// `nmax/(max − min)` and keeps the weighted least-squares (scale, min) with the smallest error.
/// Writes codes `0..=nmax` to `l_out` and returns `(scale, −min)`.
fn make_qkx2_quants(p: &Qkx2, x: &[f32], weights: &[f32], l_out: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmaxf = p.nmax as f32;
    let error = |d: f32, w: f32| if p.use_mad { w * d.abs() } else { w * (d * d) };
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += error(diff, weights[i]);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += error(diff, weights[i]);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from Q4_K/Q5_K's 12 packed bytes.
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Q5_0 / Q5_1
// ---------------------------------------------------------------------------------------------

/// Packs 32 five-bit codes: low nibbles of `j` and `j+16` into `qs[j]`, fifth bits into `qh`.
fn pack_q5(codes: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    let mut high = 0u32;
    for j in 0..16 {
        let (c0, c1) = (codes[j], codes[j + 16]);
        qs[j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
        high |= u32::from((c0 & 0x10) >> 4) << j;
        high |= u32::from((c1 & 0x10) >> 4) << (j + 16);
    }
    qh.copy_from_slice(&high.to_le_bytes());
}

/// The 32 five-bit codes of a Q5_0/Q5_1 block (`dequantize_row_q5_*`'s bit picking).
fn unpack_q5(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut codes = [0u8; 32];
    for j in 0..16 {
        let h0 = (((high >> j) << 4) & 0x10) as u8;
        let h1 = ((high >> (j + 12)) & 0x10) as u8;
        codes[j] = (qs[j] & 0x0F) | h0;
        codes[j + 16] = (qs[j] >> 4) | h1;
    }
    codes
}

fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    let mut codes = [0u8; 32];
    for (c, &v) in codes.iter_mut().zip(x) {
        // MIN(31, (int8_t)(x0 + 16.5f)) stored into a uint8_t.
        *c = i32::from(trunc_to_i8(v * id + 16.5)).min(31) as u8;
    }
    let (qh, qs) = y[2..].split_at_mut(4);
    pack_q5(&codes, qh, qs);
}

fn dq5_0_block(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    let codes = unpack_q5(&b[2..6], &b[6..]);
    for (v, c) in y.iter_mut().zip(codes) {
        *v = (i32::from(c) - 16) as f32 * d;
    }
}

fn q5_1_block(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut codes = [0u8; 32];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = trunc_to_u8((v - min) * id + 0.5);
    }
    let (qh, qs) = y[4..].split_at_mut(4);
    pack_q5(&codes, qh, qs);
}

fn dq5_1_block(b: &[u8], y: &mut [f32]) {
    let d = get_f16(b, 0);
    let m = get_f16(b, 2);
    let codes = unpack_q5(&b[4..8], &b[8..]);
    for (v, c) in y.iter_mut().zip(codes) {
        *v = f32::from(c) * d + m;
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants
// ---------------------------------------------------------------------------------------------

/// Packs 2-bit codes as Q2_K/Q3_K do: byte `j/4 + l` of each 128-half holds elements
/// `l, l+32, l+64, l+96` in bit pairs 0, 2, 4, 6.
fn pack_2bit(codes: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] = codes[j + l]
                | (codes[j + l + 32] << 2)
                | (codes[j + l + 64] << 4)
                | (codes[j + l + 96] << 6);
        }
    }
}

fn q2_k_block(x: &[f32], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let search = Qkx2 {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut codes = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
        let (scale, min) = make_qkx2_quants(&search, xs, &weights, &mut codes[16 * j..16 * j + 16]);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let (sc, rest) = y.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(dd, 0, max_scale / Q4SCALE);
    } else {
        sc.fill(0);
        put_f16(dd, 0, 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        put_f16(dd, 2, max_min / Q4SCALE);
    } else {
        put_f16(dd, 2, 0.0);
    }
    let (d_all, dmin_all) = (get_f16(dd, 0), get_f16(dd, 2));
    for j in 0..16 {
        let d = d_all * f32::from(sc[j] & 0xF);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(sc[j] >> 4);
        for ii in 0..16 {
            codes[16 * j + ii] = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&codes, qs);
}

fn dq2_k_block(b: &[u8], y: &mut [f32]) {
    let (sc, rest) = b.split_at(16);
    let (qs, dd) = rest.split_at(64);
    let d = get_f16(dd, 0);
    let min = get_f16(dd, 2);
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in [0, 16] {
                let s = sc[is];
                is += 1;
                let dl = d * f32::from(s & 0xF);
                let ml = min * f32::from(s >> 4);
                for l in 0..16 {
                    y[out] = dl * f32::from((q[l + part] >> shift) & 3) - ml;
                    out += 1;
                }
            }
        }
    }
}

/// Q3_K's 6-bit scale `j` (0..16), unsigned (0..64), from its 12 packed bytes.
fn q3_k_scale(scales: &[u8], j: usize) -> i32 {
    let low = if j < 8 {
        scales[j] & 0xF
    } else {
        scales[j - 8] >> 4
    };
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    i32::from(low | (high << 4))
}

fn q3_k_block(x: &[f32], y: &mut [u8]) {
    let mut codes_i = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(
            4,
            &x[16 * j..16 * j + 16],
            &mut codes_i[16 * j..16 * j + 16],
        );
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(12);
    sc.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            // `int8_t l = nearest_int(...)` truncates before the clamp.
            let l = (i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = l & 0xF;
            } else {
                sc[j - 8] |= (l & 0xF) << 4;
            }
            sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        put_f16(dd, 0, 1.0 / iscale);
    } else {
        put_f16(dd, 0, 0.0);
    }
    let d_all = get_f16(dd, 0);
    for j in 0..16 {
        // `sc` is an int8_t in C; the 6-bit value minus 32 always fits.
        let d = d_all * (q3_k_scale(sc, j) - 32) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            codes_i[16 * j + ii] = (l + 4) as i8;
        }
    }
    let codes: [u8; QK_K] = std::array::from_fn(|j| codes_i[j] as u8);
    pack_q3_k(&codes, hmask, qs);
}

/// Q3_K's codes `0..=7`: the third bit into `hmask` (bit `j / 32` of byte `j % 32`), the low two
/// bits as Q2_K packs them.
fn pack_q3_k(codes: &[u8; QK_K], hmask: &mut [u8], qs: &mut [u8]) {
    hmask.fill(0);
    let mut low = [0u8; QK_K];
    for (j, (&c, out)) in codes.iter().zip(low.iter_mut()).enumerate() {
        let mut c = c;
        if c > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            c -= 4;
        }
        *out = c;
    }
    pack_2bit(&low, qs);
}

fn dq3_k_block(b: &[u8], y: &mut [f32]) {
    let (hmask, rest) = b.split_at(32);
    let (qs, rest) = rest.split_at(64);
    let (sc, dd) = rest.split_at(12);
    let d_all = get_f16(dd, 0);
    let mut out = 0;
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in [0, 16] {
                let dl = d_all * (q3_k_scale(sc, is) - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let low = i32::from((q[l + part] >> shift) & 3);
                    let high = if hmask[l + part] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - high) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The shared body of Q4_K and Q5_K: the sub-block search, the 6-bit scale packing into
/// `scales` and the f16 `d`/`dmin` into `dd`; returns the final codes (`0..=nmax`).
fn q45_k_codes(x: &[f32], search: &Qkx2, dd: &mut [u8], packed: &mut [u8], codes: &mut [u8; QK_K]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(search, xs, &weights, &mut codes[32 * j..32 * j + 32]);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..8 {
        // `uint8_t ls = nearest_int(...)` truncates, then MIN(63, ·).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(dd, 0, max_scale / 63.0);
    put_f16(dd, 2, max_min / 63.0);
    let (d_all, dmin_all) = (get_f16(dd, 0), get_f16(dd, 2));
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, packed);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for ii in 0..32 {
            codes[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, search.nmax) as u8;
        }
    }
}

fn q4_k_block(x: &[f32], y: &mut [u8]) {
    let search = Qkx2 {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let (dd, rest) = y.split_at_mut(4);
    let (packed, qs) = rest.split_at_mut(12);
    packed.fill(0);
    let mut codes = [0u8; QK_K];
    q45_k_codes(x, &search, dd, packed, &mut codes);
    pack_q4_k(&codes, qs);
}

/// Q4_K's codes: per 64 values, value `l` in the low and value `l + 32` in the high nibble.
fn pack_q4_k(codes: &[u8; QK_K], qs: &mut [u8]) {
    for (chunk, q) in codes.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] = chunk[l] | (chunk[l + 32] << 4);
        }
    }
}

/// The per-sub-block `(d·sc, dmin·m)` pairs of Q4_K/Q5_K, as `dequantize_row_q4_K` computes them.
fn q45_k_scales(dd: &[u8], packed: &[u8]) -> [(f32, f32); 8] {
    let (d, min) = (get_f16(dd, 0), get_f16(dd, 2));
    std::array::from_fn(|j| {
        let (sc, m) = get_scale_min_k4(j, packed);
        (d * f32::from(sc), min * f32::from(m))
    })
}

fn dq4_k_block(b: &[u8], y: &mut [f32]) {
    let (dd, rest) = b.split_at(4);
    let (packed, qs) = rest.split_at(12);
    let sm = q45_k_scales(dd, packed);
    for (pair, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let ((d1, m1), (d2, m2)) = (sm[2 * pair], sm[2 * pair + 1]);
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0xF) - m1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

fn q5_k_block(x: &[f32], y: &mut [u8]) {
    let search = Qkx2 {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let (dd, rest) = y.split_at_mut(4);
    let (packed, rest) = rest.split_at_mut(12);
    let (qh, ql) = rest.split_at_mut(32);
    packed.fill(0);
    let mut codes = [0u8; QK_K];
    q45_k_codes(x, &search, dd, packed, &mut codes);
    pack_q5_k(&codes, qh, ql);
}

/// Q5_K's codes: the low four bits as Q4_K packs them, the fifth bit of values `l` and `l + 32`
/// of each 64 into bits `2i` and `2i + 1` of `qh[l]`.
fn pack_q5_k(codes: &[u8; QK_K], qh: &mut [u8], ql: &mut [u8]) {
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, q) in codes.chunks_exact(64).zip(ql.chunks_exact_mut(32)) {
        for j in 0..32 {
            let mut l1 = chunk[j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = chunk[j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

fn dq5_k_block(b: &[u8], y: &mut [f32]) {
    let (dd, rest) = b.split_at(4);
    let (packed, rest) = rest.split_at(12);
    let (qh, ql) = rest.split_at(32);
    let sm = q45_k_scales(dd, packed);
    let (mut u1, mut u2) = (1u8, 2u8);
    for (pair, (q, out)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let ((d1, m1), (d2, m2)) = (sm[2 * pair], sm[2 * pair + 1]);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * f32::from((q[l] & 0xF) + h1) - m1;
            out[l + 32] = d2 * f32::from((q[l] >> 4) + h2) - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn q6_k_block(x: &[f32], y: &mut [u8]) {
    let mut codes = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let scale = make_qx_quants_rmse1(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut codes[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(16);
    if max_abs_scale < GROUP_MAX_EPS {
        ql.fill(0);
        qh.fill(0);
        sc.fill(0);
        put_f16(dd, 0, 0.0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(dd, 0, 1.0 / iscale);
    for (s, &v) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * v).min(127) as i8 as u8;
    }
    let d_all = get_f16(dd, 0);
    for j in 0..16 {
        let d = d_all * f32::from(sc[j] as i8);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            codes[16 * j + ii] = (l + 32) as i8;
        }
    }
    let codes: [u8; QK_K] = std::array::from_fn(|j| codes[j] as u8);
    pack_q6_k(&codes, ql, qh);
}

/// Q6_K's codes `0..=63`: per 128 values, low nibbles of `l`/`l + 64` and `l + 32`/`l + 96` in
/// `ql`, the top two bits of all four in `qh[l]`.
fn pack_q6_k(codes: &[u8; QK_K], ql: &mut [u8], qh: &mut [u8]) {
    for (l_half, (ql, qh)) in codes
        .chunks_exact(128)
        .zip(ql.chunks_exact_mut(64).zip(qh.chunks_exact_mut(32)))
    {
        let c = |i: usize| l_half[i];
        for l in 0..32 {
            ql[l] = (c(l) & 0xF) | ((c(l + 64) & 0xF) << 4);
            ql[l + 32] = (c(l + 32) & 0xF) | ((c(l + 96) & 0xF) << 4);
            qh[l] = (c(l) >> 4)
                | ((c(l + 32) >> 4) << 2)
                | ((c(l + 64) >> 4) << 4)
                | ((c(l + 96) >> 4) << 6);
        }
    }
}

fn dq6_k_block(b: &[u8], y: &mut [f32]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (sc, dd) = rest.split_at(16);
    let d = get_f16(dd, 0);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let out = &mut y[128 * n..128 * n + 128];
        let scale = |i: usize| f32::from(sc[i] as i8);
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            out[l] = d * scale(is) * q1 as f32;
            out[l + 32] = d * scale(is + 2) * q2 as f32;
            out[l + 64] = d * scale(is + 4) * q3 as f32;
            out[l + 96] = d * scale(is + 6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Codes under fixed parameters (repairs)
// ---------------------------------------------------------------------------------------------

/// The block formats of this file, for a caller that takes a block's parameters from ggml's rule
/// and then chooses every code itself (a GPTQ repair, `repair.rs`): the block is quantized as
/// ggml quantizes it ([`Kind::quantize_block`]), its sub-blocks' grids are read back as the
/// dequantizer reads them ([`Kind::grids`]), and other codes are written over the ggml codes
/// ([`Kind::set_codes`]), so the result is still an ordinary ggml block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// The largest block of any [`Kind`] in bytes (Q6_K's).
pub const MAX_BLOCK_BYTES: usize = Q6_K_BLOCK_BYTES;
/// The most sub-blocks a [`Kind`] block has (Q2_K, Q3_K, Q6_K: 16 of 16 values).
pub const MAX_SUB_BLOCKS: usize = 16;

/// The grid of one sub-block as the dequantizer decodes it: code `c` is the f32 value
/// `scale · (c − offset) − min`, evaluated in that order ([`Kind::decode`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SubGrid {
    pub scale: f32,
    pub min: f32,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Q5_0,
        Kind::Q5_1,
        Kind::Q2K,
        Kind::Q3K,
        Kind::Q4K,
        Kind::Q5K,
        Kind::Q6K,
    ];

    fn layout(self) -> Layout {
        match self {
            Kind::Q5_0 => Q5_0,
            Kind::Q5_1 => Q5_1,
            Kind::Q2K => Q2_K,
            Kind::Q3K => Q3_K,
            Kind::Q4K => Q4_K,
            Kind::Q5K => Q5_K,
            Kind::Q6K => Q6_K,
        }
    }

    pub fn name(self) -> &'static str {
        self.layout().name
    }

    /// Values per block (32 or 256).
    pub fn block_elements(self) -> usize {
        self.layout().elements
    }

    pub fn block_bytes(self) -> usize {
        self.layout().bytes
    }

    /// Values sharing one (scale, min): the whole 32-block for Q5_0/Q5_1, 16 or 32 in a K-quant.
    pub fn sub_len(self) -> usize {
        match self {
            Kind::Q5_0 | Kind::Q5_1 | Kind::Q4K | Kind::Q5K => 32,
            Kind::Q2K | Kind::Q3K | Kind::Q6K => 16,
        }
    }

    /// The largest stored code (codes are `0..=max_code`).
    pub fn max_code(self) -> i32 {
        match self {
            Kind::Q2K => 3,
            Kind::Q3K => 7,
            Kind::Q4K => 15,
            Kind::Q5_0 | Kind::Q5_1 | Kind::Q5K => 31,
            Kind::Q6K => 63,
        }
    }

    /// What the dequantizer subtracts from a stored code before scaling: 16 for Q5_0, 4 for
    /// Q3_K, 32 for Q6_K (symmetric formats), 0 for the formats with a minimum.
    pub fn code_offset(self) -> i32 {
        match self {
            Kind::Q5_0 => 16,
            Kind::Q3K => 4,
            Kind::Q6K => 32,
            Kind::Q5_1 | Kind::Q2K | Kind::Q4K | Kind::Q5K => 0,
        }
    }

    /// ggml's `quantize_row_*_ref` of one block (`x.len() == block_elements`): its parameters
    /// and its own codes.
    pub fn quantize_block(self, x: &[f32], out: &mut [u8]) {
        (self.layout().quantize)(x, out)
    }

    /// The grid of every sub-block of `block`, read as `dequantize_row_*` reads it (the first
    /// `block_elements / sub_len` entries are used).
    pub fn grids(self, b: &[u8]) -> [SubGrid; MAX_SUB_BLOCKS] {
        let mut out = [SubGrid::default(); MAX_SUB_BLOCKS];
        match self {
            Kind::Q5_0 => {
                out[0] = SubGrid {
                    scale: get_f16(b, 0),
                    min: 0.0,
                }
            }
            // x = q·d + m, and q·d − (−m) is the same f32 sum.
            Kind::Q5_1 => {
                out[0] = SubGrid {
                    scale: get_f16(b, 0),
                    min: -get_f16(b, 2),
                }
            }
            Kind::Q2K => {
                let (sc, dd) = (&b[..16], &b[80..84]);
                let (d, min) = (get_f16(dd, 0), get_f16(dd, 2));
                for (g, s) in out.iter_mut().zip(sc) {
                    *g = SubGrid {
                        scale: d * f32::from(s & 0xF),
                        min: min * f32::from(s >> 4),
                    };
                }
            }
            Kind::Q3K => {
                let (sc, d) = (&b[96..108], get_f16(b, 108));
                for (j, g) in out.iter_mut().enumerate() {
                    *g = SubGrid {
                        scale: d * (q3_k_scale(sc, j) - 32) as f32,
                        min: 0.0,
                    };
                }
            }
            Kind::Q4K | Kind::Q5K => {
                for (g, (scale, min)) in out.iter_mut().zip(q45_k_scales(&b[..4], &b[4..16])) {
                    *g = SubGrid { scale, min };
                }
            }
            Kind::Q6K => {
                let (sc, d) = (&b[192..208], get_f16(b, 208));
                for (g, s) in out.iter_mut().zip(sc) {
                    *g = SubGrid {
                        scale: d * f32::from(*s as i8),
                        min: 0.0,
                    };
                }
            }
        }
        out
    }

    /// The value stored code `code` of a sub-block with grid `g` decodes to, in the dequantizer's
    /// f32 operations (`d·q − m`, `(d·sc)·q`, `q·d + m`: each the same product and sum).
    pub fn decode(self, g: SubGrid, code: i32) -> f32 {
        g.scale * (code - self.code_offset()) as f32 - g.min
    }

    /// Writes `codes` (`0..=max_code`, one per value) into `block`, keeping its parameters.
    pub fn set_codes(self, block: &mut [u8], codes: &[u8]) {
        match self {
            Kind::Q5_0 | Kind::Q5_1 => {
                let at = if self == Kind::Q5_0 { 2 } else { 4 };
                let codes: &[u8; QK5] = codes.try_into().expect("32 codes");
                let (qh, qs) = block[at..].split_at_mut(4);
                pack_q5(codes, qh, qs);
            }
            kind => {
                let codes: &[u8; QK_K] = codes.try_into().expect("256 codes");
                match kind {
                    Kind::Q2K => pack_2bit(codes, &mut block[16..80]),
                    Kind::Q3K => {
                        let (hmask, rest) = block.split_at_mut(32);
                        pack_q3_k(codes, hmask, &mut rest[..64]);
                    }
                    Kind::Q4K => pack_q4_k(codes, &mut block[16..]),
                    Kind::Q5K => {
                        let (qh, ql) = block[16..].split_at_mut(32);
                        pack_q5_k(codes, qh, ql);
                    }
                    Kind::Q6K => {
                        let (ql, rest) = block.split_at_mut(128);
                        pack_q6_k(codes, ql, &mut rest[..64]);
                    }
                    Kind::Q5_0 | Kind::Q5_1 => unreachable!("handled above"),
                }
            }
        }
    }

    /// Dequantizes whole blocks (`dequantize_row_*`).
    pub fn dequantize(self, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
        dequantize_blocks(self.layout(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    type Quantize = fn(&[f32]) -> Result<Vec<u8>, QuantError>;
    type Dequantize = fn(&[u8]) -> Result<Vec<f32>, QuantError>;
    const TYPES: [(&str, usize, Quantize, Dequantize); 7] = [
        ("q5_0", Q5_0_BLOCK_BYTES, quantize_q5_0, dequantize_q5_0),
        ("q5_1", Q5_1_BLOCK_BYTES, quantize_q5_1, dequantize_q5_1),
        ("q2_k", Q2_K_BLOCK_BYTES, quantize_q2_k, dequantize_q2_k),
        ("q3_k", Q3_K_BLOCK_BYTES, quantize_q3_k, dequantize_q3_k),
        ("q4_k", Q4_K_BLOCK_BYTES, quantize_q4_k, dequantize_q4_k),
        ("q5_k", Q5_K_BLOCK_BYTES, quantize_q5_k, dequantize_q5_k),
        ("q6_k", Q6_K_BLOCK_BYTES, quantize_q6_k, dequantize_q6_k),
    ];

    fn golden(file: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/goldens/kquant")
            .join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn f32s(st: &SafeTensors<'_>, key: &str) -> Vec<f32> {
        let view = st.tensor(key).unwrap_or_else(|e| panic!("`{key}`: {e}"));
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn first_bit_difference(ours: &[f32], want: &[f32]) -> Option<usize> {
        assert_eq!(ours.len(), want.len());
        (0..ours.len()).find(|&i| ours[i].to_bits() != want[i].to_bits())
    }

    /// Every vector × type: our bytes are ggml's `quantize_row_*_ref` bytes, and our dequantized
    /// values are `dequantize_row_*`'s and gguf-py's, bit for bit.
    #[test]
    fn matches_ggml_reference_c_bit_for_bit() {
        let inputs_bytes = golden("inputs.safetensors");
        let inputs = SafeTensors::deserialize(&inputs_bytes).expect("inputs parse");
        let gold_bytes = golden("ggml.safetensors");
        let gold = SafeTensors::deserialize(&gold_bytes).expect("goldens parse");
        let mut names: Vec<&str> = inputs.names();
        names.sort();
        let mut checked = 0;
        for name in names {
            let x = f32s(&inputs, name);
            for (t, block_bytes, quantize, dequantize) in TYPES {
                let key = format!("{name}.{t}");
                let ours = quantize(&x).expect("rows are whole blocks");
                let want = gold
                    .tensor(&format!("{key}.bytes"))
                    .expect("golden bytes")
                    .data();
                if let Some(i) = (0..ours.len()).find(|&i| ours[i] != want[i]) {
                    let b = i / block_bytes * block_bytes;
                    panic!(
                        "{key}: byte {i} (block {}, offset {}) differs\n ours   {:?}\n golden {:?}",
                        i / block_bytes,
                        i - b,
                        &ours[b..b + block_bytes],
                        &want[b..b + block_bytes]
                    );
                }
                assert_eq!(ours.len(), want.len(), "{key}: length");
                let back = dequantize(&ours).expect("whole blocks");
                for reference in ["dequant", "gguf_py"] {
                    let want = f32s(&gold, &format!("{key}.{reference}"));
                    if let Some(i) = first_bit_difference(&back, &want) {
                        panic!(
                            "{key}.{reference}: element {i} is {:e}, golden {:e}",
                            back[i], want[i]
                        );
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 12 * 7, "twelve vectors × seven types");
    }

    #[test]
    fn nearest_int_rounds_half_to_even_like_the_c_trick() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.49), 0);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    #[test]
    fn rejects_partial_blocks() {
        assert!(matches!(
            quantize_q4_k(&[0.0; 255]),
            Err(QuantError::RowNotBlockAligned { block: 256, .. })
        ));
        assert!(matches!(
            dequantize_q5_0(&[0; 23]),
            Err(QuantError::PartialBlock {
                block_bytes: 22,
                ..
            })
        ));
    }

    #[test]
    fn grids_and_codes_reproduce_ggml_blocks() {
        // ggml's own block, read as grids and rewritten code by code from its dequantized values,
        // comes back byte for byte: the grids and the packing are the dequantizer's.
        let inputs_bytes = golden("inputs.safetensors");
        let inputs = SafeTensors::deserialize(&inputs_bytes).expect("inputs parse");
        let x = f32s(&inputs, "gauss");
        for kind in Kind::ALL {
            let n = kind.block_elements();
            for block in x.chunks_exact(n).take(4) {
                let mut bytes = vec![0u8; kind.block_bytes()];
                kind.quantize_block(block, &mut bytes);
                let values = kind.dequantize(&bytes).expect("one block");
                let grids = kind.grids(&bytes);
                let codes: Vec<u8> = values
                    .iter()
                    .enumerate()
                    .map(|(k, v)| {
                        let g = grids[k / kind.sub_len()];
                        let found = (0..=kind.max_code())
                            .find(|c| kind.decode(g, *c).to_bits() == v.to_bits());
                        found.unwrap_or_else(|| {
                            panic!("{}: value {k} = {v} off its grid", kind.name())
                        }) as u8
                    })
                    .collect();
                let mut rewritten = bytes.clone();
                kind.set_codes(&mut rewritten, &codes);
                let again = kind.dequantize(&rewritten).expect("one block");
                assert_eq!(
                    again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{}",
                    kind.name()
                );
                // Other codes land where decode says they do.
                let shifted: Vec<u8> = codes
                    .iter()
                    .map(|c| (c + 1) % (kind.max_code() as u8 + 1))
                    .collect();
                kind.set_codes(&mut rewritten, &shifted);
                let moved = kind.dequantize(&rewritten).expect("one block");
                for (k, (v, c)) in moved.iter().zip(&shifted).enumerate() {
                    let want = kind.decode(grids[k / kind.sub_len()], i32::from(*c));
                    assert_eq!(v.to_bits(), want.to_bits(), "{} value {k}", kind.name());
                }
            }
        }
    }
}
