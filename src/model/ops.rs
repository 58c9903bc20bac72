//! The numeric building blocks of every decoder, in f32 on the CPU: RMSNorm, LayerNorm, the
//! activations transformers names in `hidden_act`, and causal (optionally sliding-window) multi-head
//! attention with grouped key/value heads.
//!
//! Matmuls are candle's. The row-wise and element-wise steps are fused candle custom ops: each
//! reads contiguous f32 storage and writes one new buffer, in parallel over rows on rayon's pool
//! (the one candle's gemm uses). Written as chains of candle ops they cost five to eight passes and
//! allocations each, which on a 512-token sequence took a third of the forward time.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{ModelError, Unsupported};
use crate::dense::{View, gemm_acc};
use crate::exp;
use crate::simd::avx2_copy;

/// Elements per parallel work unit of the element-wise kernels.
const CHUNK: usize = 4096;

/// The contiguous f32 data behind a custom op's input.
/// The two operands of an element-wise op as contiguous f32 slices of one shape.
fn contiguous_pair<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    op: &str,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (contiguous(s1, l1, op)?, contiguous(s2, l2, op)?);
    if l1.shape() != l2.shape() {
        return Err(candle_core::Error::Msg(format!(
            "{op}: operands {:?} and {:?} differ",
            l1.dims(),
            l2.dims()
        )));
    }
    Ok((a, b))
}

fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op} takes contiguous f32 tensors"
        ))),
    }
}

/// `a + b` element-wise, for tensors of one shape (residual adds). candle's own binary ops run on
/// its element-wise barrier pool, whose extra worker competes with rayon's for the same cores (the
/// caller spins at the barrier until it is scheduled: 8 % of a check's CPU on 2 cores); this runs on
/// rayon's pool like every other kernel here. The same f32 sums as candle's.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
    Ok(a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &AddScaled { scale: None })?)
}

/// `x · wᵀ` for `x` `[T, in]` and a linear weight `w` `[out, in]`: candle's `x.matmul(&w.t())`
/// bit for bit, without zero-filling the output first ([`crate::dense::product_nt`]).
pub(crate) fn linear_product(x: &Tensor, w: &Tensor) -> Result<Tensor, ModelError> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &LinearProduct)?)
}

struct LinearProduct;

impl CustomOp2 for LinearProduct {
    fn name(&self) -> &'static str {
        "linear-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let w = contiguous(s2, l2, self.name())?;
        let ((t, k), (n, kw)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != kw {
            return Err(candle_core::Error::Msg(format!(
                "linear product: input {:?}, weight {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let out = crate::dense::product_nt(x, w, t, k, n);
        Ok((CpuStorage::F32(out), Shape::from((t, n))))
    }
}

// The element-wise loops of the ops below, each in an AVX2 copy (`simd::avx2_copy`: the same
// bits, eight lanes where the baseline build has four).

avx2_copy! {
    /// out = y + t.
    fn add_into(out: &mut [f32], y: &[f32], t: &[f32]) {
        for ((o, y), t) in out.iter_mut().zip(y).zip(t) {
            *o = y + t;
        }
    }
}

avx2_copy! {
    /// out = y + (t · s + 0), candle's affine map of a scaled LoRA term.
    fn add_scaled_into(out: &mut [f32], y: &[f32], t: &[f32], s: f32) {
        for ((o, y), t) in out.iter_mut().zip(y).zip(t) {
            *o = y + (t * s + 0.0);
        }
    }
}

avx2_copy! {
    /// out = w · (x · inv), an RMS-normalized row.
    fn scale_weighted_into(out: &mut [f32], x: &[f32], w: &[f32], inv: f32) {
        for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
            *o = w * (x * inv);
        }
    }
}

avx2_copy! {
    /// out ·= up, the gate times the up projection.
    fn mul_in_place(out: &mut [f32], up: &[f32]) {
        for (o, u) in out.iter_mut().zip(up) {
            *o *= u;
        }
    }
}

avx2_copy! {
    /// out = −x.
    fn negate_into(out: &mut [f32], x: &[f32]) {
        for (o, x) in out.iter_mut().zip(x) {
            *o = -x;
        }
    }
}

avx2_copy! {
    /// out = x / (1 + out), SiLU from out = e^−x.
    fn silu_from_exp(out: &mut [f32], x: &[f32]) {
        for (o, x) in out.iter_mut().zip(x) {
            *o = x / (1.0 + *o);
        }
    }
}

avx2_copy! {
    /// v −= by.
    fn sub_in_place(v: &mut [f32], by: f32) {
        for o in v.iter_mut() {
            *o -= by;
        }
    }
}

avx2_copy! {
    /// v /= by.
    fn div_in_place(v: &mut [f32], by: f32) {
        for o in v.iter_mut() {
            *o /= by;
        }
    }
}

/// `y + (t · scale + 0)` element-wise in f32: a LoRA term scaled exactly as candle's `Tensor * f64`
/// (its affine map `v · mul + add`) and added, in one pass on rayon's pool (see [`add`]).
pub(crate) fn add_scaled(y: &Tensor, t: &Tensor, scale: f64) -> Result<Tensor, ModelError> {
    Ok(y.contiguous()?.apply_op2_no_bwd(
        &t.contiguous()?,
        &AddScaled {
            scale: Some(scale as f32),
        },
    )?)
}

struct AddScaled {
    scale: Option<f32>,
}

impl CustomOp2 for AddScaled {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, t) = contiguous_pair((s1, l1), (s2, l2), self.name())?;
        let mut out = vec![0.0f32; y.len()];
        out.par_chunks_mut(CHUNK)
            .zip(y.par_chunks(CHUNK).zip(t.par_chunks(CHUNK)))
            .for_each(|(out, (y, t))| match self.scale {
                None => add_into(out, y, t),
                Some(s) => add_scaled_into(out, y, t, s),
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension (transformers' `LlamaRMSNorm`); the mean
/// is accumulated in f64.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, ModelError> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })?)
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let w = contiguous(s2, l2, self.name())?;
        check_rows(x, w.len(), self.name())?;
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(w.len())
            .zip(x.par_chunks(w.len()))
            .for_each(|(out, x)| {
                let squares: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
                let mean = squares / x.len() as f64;
                let inv = 1.0 / (mean as f32 + self.eps as f32).sqrt();
                scale_weighted_into(out, x, w, inv);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `(x − mean) / sqrt(var + eps) · w + b` over the last dimension, biased variance, moments
/// accumulated in f64 (`torch.nn.LayerNorm`).
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor, ModelError> {
    Ok(x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &LayerNorm { eps },
    )?)
}

struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let w = contiguous(s2, l2, self.name())?;
        let b = contiguous(s3, l3, self.name())?;
        check_rows(x, w.len(), self.name())?;
        if b.len() != w.len() {
            return Err(candle_core::Error::Msg(format!(
                "layer norm: {} weights, {} biases",
                w.len(),
                b.len()
            )));
        }
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(w.len())
            .zip(x.par_chunks(w.len()))
            .for_each(|(out, x)| {
                let n = x.len() as f64;
                let mean = x.iter().map(|v| *v as f64).sum::<f64>() / n;
                let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
                let inv = (1.0 / (var + self.eps).sqrt()) as f32;
                let mean = mean as f32;
                for (((o, x), w), b) in out.iter_mut().zip(x).zip(w).zip(b) {
                    *o = (x - mean) * inv * w + b;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn check_rows(x: &[f32], width: usize, op: &str) -> candle_core::Result<()> {
    if width == 0 || !x.len().is_multiple_of(width) {
        return Err(candle_core::Error::Msg(format!(
            "{op}: {} values are not rows of {width}",
            x.len()
        )));
    }
    Ok(())
}

/// The MLP activations of the supported architectures, by transformers' `ACT2FN` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: x·σ(x).
    Silu,
    /// `gelu`: the exact form, 0.5·x·(1 + erf(x/√2)).
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses transformers' activation name.
    pub fn from_name(name: &str) -> Result<Self, Unsupported> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(Unsupported::new(format!(
                "activation `{other}` is not implemented"
            ))),
        }
    }

    /// `out[i] = act(x[i])` over one chunk. SiLU takes its exponentials a slice at a time
    /// ([`exp::exp_f32_in_place`]); the others go value by value.
    fn chunk(self, x: &[f32], out: &mut [f32]) {
        if self == Activation::Silu {
            // x / (1 + e^-x): for very negative x the denominator is inf and the result -0, as
            // in torch.
            negate_into(out, x);
            exp::exp_f32_in_place(out);
            silu_from_exp(out, x);
            return;
        }
        for (o, x) in out.iter_mut().zip(x) {
            *o = self.scalar(*x);
        }
    }

    fn scalar(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + exp::exp_f32(-x)),
            Activation::GeluErf => {
                let erf =
                    candle_core::cpu::erf::erf_f64(x as f64 * std::f64::consts::FRAC_1_SQRT_2);
                0.5 * x * (1.0 + erf as f32)
            }
            Activation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
        }
    }

    /// `act(x)` element-wise.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(x.contiguous()?.apply_op1_no_bwd(&Activate { act: self })?)
    }

    /// `act(gate) ⊙ up` element-wise (the gated MLP of the Llama family).
    pub(crate) fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor, ModelError> {
        Ok(gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &Activate { act: self })?)
    }
}

struct Activate {
    act: Activation,
}

impl CustomOp1 for Activate {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, CustomOp1::name(self))?;
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(out, x)| self.act.chunk(x, out));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl CustomOp2 for Activate {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = contiguous_pair((s1, l1), (s2, l2), CustomOp2::name(self))?;
        let mut out = vec![0.0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(out, (gate, up))| {
                self.act.chunk(gate, out);
                mul_in_place(out, up);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Scaled dot-product attention with grouped key/value heads and a causal (optionally
/// sliding-window) mask.
///
/// `q` is `[H, T, Dh]`, `k` and `v` are `[KV, S, Dh]` with H a multiple of KV and S ≥ T: the T
/// queries are the *last* T of the S positions (S = T for a whole sequence; S > T when earlier
/// keys and values come from a cache), so query i sits at absolute position p = S − T + i. Query
/// head h reads key/value head h / (H/KV), as transformers' `repeat_kv` lays them out. Query p sees
/// keys j ≤ p (and p − j < window: transformers' `sliding_window_overlay` keeps
/// `kv_idx > q_idx − window`). Scores `q·kᵀ·scale` are softmaxed in f32. Returns `[T, H·Dh]` (heads
/// concatenated per position).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor, ModelError> {
    attention_capped(q, k, v, scale, window, None)
}

/// [`attention`] over several sequences laid end to end (`lengths[s]` rows each, no cache): each
/// query sees only the keys of its own sequence, each sequence's positions count from 0. The
/// projections around it then run once over every sequence's rows (one GEMM of ΣT rows instead
/// of one per sequence).
pub(crate) fn attention_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    lengths: &[usize],
) -> Result<Tensor, ModelError> {
    causal_attention(q, k, v, scale, window, None, lengths)
}

/// [`attention`] with Gemma 2's attention-logit soft-capping: each scaled score s becomes
/// `cap · tanh(s / cap)` before the mask and the softmax (transformers' `eager_attention_forward`
/// with `softcap`).
pub(crate) fn attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor, ModelError> {
    causal_attention(q, k, v, scale, window, softcap, &[])
}

/// The [`CausalAttention`] op on contiguous q, k, v: `segments` empty for one sequence.
fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f32>,
    segments: &[usize],
) -> Result<Tensor, ModelError> {
    Ok(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &CausalAttention {
            scale: scale as f32,
            window: window.unwrap_or(usize::MAX),
            softcap,
            segments: segments.to_vec(),
        },
    )?)
}

/// Query rows per attention tile: a tile's scores (`TILE` × at most S keys) stay in L2 while
/// they are softmaxed and multiplied by V.
const TILE: usize = 64;

/// Causal attention in query tiles: tile (head h, queries r0..r1) multiplies only the keys some
/// query of the tile can see (`first(r0)..=position(r1 − 1)`), so the masked upper triangle of
/// `QKᵀ` and of `P·V` (half of both products on a whole sequence) is never computed, and no
/// `[H, T, S]` score tensor is ever allocated. Within a tile, each row is softmaxed over exactly
/// its visible keys (hidden keys get 0 and are never exponentiated) as the mask-then-softmax of
/// transformers does; a hidden key's zero probability adds nothing to `P·V`.
struct CausalAttention {
    scale: f32,
    window: usize,
    softcap: Option<f32>,
    /// Row counts of sequences laid end to end (no cache); empty for one sequence whose queries
    /// are the last T of the S keys.
    segments: Vec<usize>,
}

/// One sequence's place in the attention's inputs: its queries are rows `row..row + len` of q,
/// its keys start at row `row` of k, and its first query sits at position `offset` (the number
/// of cached keys before it).
struct Segment {
    row: usize,
    len: usize,
    offset: usize,
}

impl CausalAttention {
    /// A raw score as the softmax sees it: scaled, then soft-capped when asked, in f32 in
    /// transformers' order (`s·scale / cap`, `tanh`, `· cap`).
    fn score(&self, s: f32) -> f32 {
        let scaled = s * self.scale;
        match self.softcap {
            Some(cap) => (scaled / cap).tanh() * cap,
            None => scaled,
        }
    }

    /// The first key absolute position `p` sees.
    fn first_key(&self, p: usize) -> usize {
        (p + 1).saturating_sub(self.window)
    }

    /// Softmax of `row` (the scores of keys `from..` for the query at position `p`) over its
    /// visible keys, in place; every other entry becomes 0.
    fn softmax_row(&self, row: &mut [f32], from: usize, p: usize) {
        let lo = self.first_key(p) - from;
        let hi = p + 1 - from;
        let visible = &mut row[lo..hi];
        let mut max = f32::NEG_INFINITY;
        for o in visible.iter_mut() {
            *o = self.score(*o);
            max = max.max(*o);
        }
        sub_in_place(visible, max);
        exp::exp_f32_in_place(visible);
        // In order, as the scores always were summed (a reassociated sum would move the bits).
        let sum: f32 = visible.iter().fold(0.0, |s, e| s + e);
        div_in_place(visible, sum);
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous(s1, l1, self.name())?;
        let k = contiguous(s2, l2, self.name())?;
        let v = contiguous(s3, l3, self.name())?;
        let (heads, t, dh) = l1.shape().dims3()?;
        let (kv_heads, keys, dk) = l2.shape().dims3()?;
        let (kv_v, keys_v, dv) = l3.shape().dims3()?;
        if dk != dh
            || kv_v != kv_heads
            || keys_v != keys
            || kv_heads == 0
            || heads % kv_heads != 0
            || keys < t
            || t == 0
        {
            return Err(candle_core::Error::Msg(format!(
                "causal attention: q {:?}, k {:?}, v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let group = heads / kv_heads;
        let segments: Vec<Segment> = if self.segments.is_empty() {
            // Absolute position of query 0: the keys before it are cached ones.
            vec![Segment {
                row: 0,
                len: t,
                offset: keys - t,
            }]
        } else {
            if keys != t || self.segments.iter().sum::<usize>() != t {
                return Err(candle_core::Error::Msg(format!(
                    "causal attention: segments {:?} for {t} queries and {keys} keys",
                    self.segments
                )));
            }
            let mut row = 0;
            self.segments
                .iter()
                .map(|&len| {
                    row += len;
                    Segment {
                        row: row - len,
                        len,
                        offset: 0,
                    }
                })
                .collect()
        };
        // Largest tiles (the most keys) first, so the last jobs rayon hands out are the short ones.
        let mut jobs: Vec<(usize, &Segment, usize)> = segments
            .iter()
            .flat_map(|seg| {
                (0..seg.len.div_ceil(TILE))
                    .flat_map(move |tile| (0..heads).map(move |h| (h, seg, tile)))
            })
            .collect();
        jobs.sort_by_key(|(_, seg, tile)| std::cmp::Reverse(seg.offset + (tile + 1) * TILE));
        let parts: Vec<(usize, usize, Vec<f32>)> = jobs
            .into_par_iter()
            .map(|(h, seg, tile)| {
                let r0 = tile * TILE;
                let rows = TILE.min(seg.len - r0);
                let offset = seg.offset;
                // Keys some query of the tile sees: from the first query's first key to the last
                // query's own position (positions within the segment; its keys start at
                // `seg.row`).
                let from = self.first_key(offset + r0);
                let to = offset + r0 + rows;
                let n = to - from;
                let kvh = h / group;
                let (q0, k0) = (h * t + seg.row + r0, kvh * keys + seg.row);
                let q_tile = &q[q0 * dh..(q0 + rows) * dh];
                let k_span = &k[(k0 + from) * dh..(k0 + to) * dh];
                let v_span = &v[(k0 + from) * dv..(k0 + to) * dv];
                // Q·Kᵀ: q_tile [rows, dh] times k_span [n, dh] read transposed; one thread per
                // tile (the tiles run in parallel).
                let mut scores = vec![0.0f32; rows * n];
                gemm_acc(
                    (&mut scores, View::of(0, rows, n, n)),
                    (q_tile, View::of(0, rows, dh, dh)),
                    (k_span, View::of(0, n, dh, dh)),
                    true,
                    1.0,
                    gemm::Parallelism::None,
                );
                for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                    self.softmax_row(row, from, offset + r0 + i);
                }
                // P·V: scores [rows, n] times v_span [n, dv].
                let mut out = vec![0.0f32; rows * dv];
                gemm_acc(
                    (&mut out, View::of(0, rows, dv, dv)),
                    (&scores, View::of(0, rows, n, n)),
                    (v_span, View::of(0, n, dv, dv)),
                    false,
                    1.0,
                    gemm::Parallelism::None,
                );
                (h, seg.row + r0, out)
            })
            .collect();
        // Heads concatenated per position: `[T, H·Dv]`.
        let width = heads * dv;
        let mut out = vec![0.0f32; t * width];
        for (h, r0, part) in parts {
            for (i, row) in part.chunks_exact(dv).enumerate() {
                let at = (r0 + i) * width + h * dv;
                out[at..at + dv].copy_from_slice(row);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((t, width))))
    }
}

/// `cap · tanh(x / cap)` element-wise in f32 (Gemma's final-logit soft-capping, transformers'
/// order of operations).
pub(crate) fn soft_cap(x: &Tensor, cap: f32) -> Result<Tensor, ModelError> {
    let shape = x.shape().clone();
    let capped: Vec<f32> = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| (v / cap).tanh() * cap)
        .collect();
    Ok(Tensor::from_vec(capped, shape, &Device::Cpu)?)
}

/// `[T, H·Dh]` → `[H, T, Dh]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor, ModelError> {
    let (t, _) = x.dims2()?;
    Ok(x.reshape((t, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()?)
}

/// An f32 tensor on the CPU from owned data (no copy).
pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor, ModelError> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).expect("tensor")
    }

    /// The attention probabilities of `queries` queries over `keys` keys when every score is 1:
    /// q and k rows are the unit vector e0 and V is the identity, so output row i is row i of P.
    fn uniform_probs(queries: usize, keys: usize, window: usize) -> Vec<Vec<f32>> {
        let unit = |rows: usize| -> Vec<f32> {
            (0..rows * keys)
                .map(|i| if i % keys == 0 { 1.0 } else { 0.0 })
                .collect()
        };
        let identity: Vec<f32> = (0..keys * keys)
            .map(|i| if i / keys == i % keys { 1.0 } else { 0.0 })
            .collect();
        attention(
            &t(&unit(queries), &[1, queries, keys]),
            &t(&unit(keys), &[1, keys, keys]),
            &t(&identity, &[1, keys, keys]),
            1.0,
            Some(window),
        )
        .expect("attention")
        .to_vec2::<f32>()
        .expect("vec")
    }

    #[test]
    fn causal_softmax_hides_the_future_and_slides() {
        let full = uniform_probs(4, 4, usize::MAX);
        assert_eq!(full[0], vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(full[3], vec![0.25; 4]);
        let slide = uniform_probs(4, 4, 2);
        assert_eq!(slide[3], vec![0.0, 0.0, 0.5, 0.5]);
        assert_eq!(slide[1], vec![0.5, 0.5, 0.0, 0.0]);
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Masked attention the plain way: every score, a mask, a softmax per row, P·V.
    #[allow(clippy::too_many_arguments)]
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (heads, kv_heads, t, keys, dh): (usize, usize, usize, usize, usize),
        scale: f32,
        window: usize,
        softcap: Option<f32>,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; t * heads * dh];
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            for i in 0..t {
                let p = keys - t + i;
                let scores: Vec<f32> = (0..keys)
                    .map(|j| {
                        let dot: f32 = (0..dh)
                            .map(|d| q[(h * t + i) * dh + d] * k[(kvh * keys + j) * dh + d])
                            .sum();
                        let s = dot * scale;
                        let s = softcap.map_or(s, |c| (s / c).tanh() * c);
                        if j <= p && p - j < window {
                            s
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for d in 0..dh {
                    out[i * heads * dh + h * dh + d] = (0..keys)
                        .map(|j| e[j] / sum * v[(kvh * keys + j) * dh + d])
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn tiled_attention_equals_the_masked_softmax_across_tiles() {
        // More queries than one tile, cached keys before them, grouped heads, windows and a cap.
        let (heads, kv_heads, dh) = (4, 2, 8);
        for (queries, keys, window, softcap) in [
            (2 * TILE + 7, 2 * TILE + 7, usize::MAX, None),
            (TILE + 3, TILE + 20, usize::MAX, Some(5.0)),
            (2 * TILE + 1, 2 * TILE + 1, 37, None),
            (1, 90, 16, None),
        ] {
            let q = values(heads * queries * dh, 1);
            let k = values(kv_heads * keys * dh, 2);
            let v = values(kv_heads * keys * dh, 3);
            let got = attention_capped(
                &t(&q, &[heads, queries, dh]),
                &t(&k, &[kv_heads, keys, dh]),
                &t(&v, &[kv_heads, keys, dh]),
                0.5,
                Some(window),
                softcap,
            )
            .expect("attention")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
            let want = naive_attention(
                &q,
                &k,
                &v,
                (heads, kv_heads, queries, keys, dh),
                0.5,
                window,
                softcap,
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-5,
                "queries {queries}, keys {keys}, window {window}: {worst}"
            );
        }
    }

    #[test]
    fn segmented_attention_equals_each_sequence_alone() {
        // Sequences laid end to end across tile edges (one shorter than a tile, one spanning
        // three), grouped heads, with and without a window: every sequence's rows are exactly
        // the attention of that sequence on its own.
        let (heads, kv_heads, dh) = (4, 2, 8);
        let lengths = [TILE + 6, 3, 2 * TILE + 3];
        let total: usize = lengths.iter().sum();
        let q = values(heads * total * dh, 4);
        let k = values(kv_heads * total * dh, 5);
        let v = values(kv_heads * total * dh, 6);
        // Rows start..start + len of every head of a `[H, T, Dh]` buffer.
        let rows = |x: &[f32], h: usize, start: usize, len: usize| -> Vec<f32> {
            (0..h)
                .flat_map(|head| {
                    x[(head * total + start) * dh..(head * total + start + len) * dh].to_vec()
                })
                .collect()
        };
        for window in [None, Some(37)] {
            let got = attention_segments(
                &t(&q, &[heads, total, dh]),
                &t(&k, &[kv_heads, total, dh]),
                &t(&v, &[kv_heads, total, dh]),
                0.5,
                window,
                &lengths,
            )
            .expect("segmented")
            .to_vec2::<f32>()
            .expect("vec");
            let mut start = 0;
            for len in lengths {
                let want = attention(
                    &t(&rows(&q, heads, start, len), &[heads, len, dh]),
                    &t(&rows(&k, kv_heads, start, len), &[kv_heads, len, dh]),
                    &t(&rows(&v, kv_heads, start, len), &[kv_heads, len, dh]),
                    0.5,
                    window,
                )
                .expect("alone")
                .to_vec2::<f32>()
                .expect("vec");
                assert_eq!(&got[start..start + len], &want[..], "window {window:?}");
                start += len;
            }
        }
        let bad = attention_segments(
            &t(&q, &[heads, total, dh]),
            &t(&k, &[kv_heads, total, dh]),
            &t(&v, &[kv_heads, total, dh]),
            0.5,
            None,
            &[total - 1],
        );
        assert!(bad.is_err(), "segments must cover every row");
    }

    #[test]
    fn attention_is_causal_and_groups_kv_heads() {
        // One kv head shared by two query heads; position 0 sees only itself, so its output is v[0].
        let q = t(&[1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 2.0, -1.0], &[2, 2, 2]);
        let k = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 2]);
        let v = t(&[3.0, 4.0, -1.0, 2.0], &[1, 2, 2]);
        let out = attention(&q, &k, &v, 1.0, None)
            .expect("attention")
            .to_vec2::<f32>()
            .expect("vec");
        assert_eq!(out[0], vec![3.0, 4.0, 3.0, 4.0]);
        // Head 0, position 1: scores (0.5, 0.5) → mean of v rows; head 1: scores (2, -1).
        let p = 1.0 / (1.0 + (-3.0f32).exp());
        let expect_h1 = [3.0 * p - (1.0 - p), 4.0 * p + 2.0 * (1.0 - p)];
        assert!((out[1][0] - 1.0).abs() < 1e-6 && (out[1][1] - 3.0).abs() < 1e-6);
        assert!((out[1][2] - expect_h1[0]).abs() < 1e-5);
        assert!((out[1][3] - expect_h1[1]).abs() < 1e-5);
    }

    #[test]
    fn queries_after_cached_keys_see_them_and_the_window_counts_absolute_positions() {
        // 4 keys, the last 2 are the queries (positions 2 and 3).
        let full = uniform_probs(2, 4, usize::MAX);
        assert_eq!(full[0], vec![1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!(full[1], vec![0.25; 4]);
        let slide = uniform_probs(2, 4, 2);
        assert_eq!(slide[0], vec![0.0, 0.5, 0.5, 0.0]);
        assert_eq!(slide[1], vec![0.0, 0.0, 0.5, 0.5]);
        // More queries than keys is an error, not a panic.
        let err = attention(
            &t(&[1.0; 6], &[1, 3, 2]),
            &t(&[1.0; 4], &[1, 2, 2]),
            &t(&[1.0; 4], &[1, 2, 2]),
            1.0,
            None,
        );
        assert!(err.is_err());
    }

    #[test]
    fn norms_and_activations_match_their_formulas() {
        let x = t(&[1.0, -2.0, 3.0, 0.5], &[1, 4]);
        let ones = t(&[1.0; 4], &[4]);
        let zeros = t(&[0.0; 4], &[4]);
        let rms = rms_norm(&x, &ones, 0.0)
            .expect("rms")
            .to_vec2::<f32>()
            .expect("vec");
        let r = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32).sqrt();
        assert!((rms[0][2] - 3.0 / r).abs() < 1e-6);
        let ln = layer_norm(&x, &ones, &zeros, 0.0)
            .expect("ln")
            .to_vec2::<f32>()
            .expect("vec");
        assert!(ln[0].iter().sum::<f32>().abs() < 1e-5);
        let g = Activation::GeluErf
            .apply(&t(&[1.0], &[1]))
            .expect("gelu")
            .to_vec1::<f32>()
            .expect("vec");
        assert!((g[0] - 0.841_344_7).abs() < 1e-6);
        let s = Activation::Silu
            .apply(&t(&[-200.0, 2.0], &[2]))
            .expect("silu")
            .to_vec1::<f32>()
            .expect("vec");
        assert!(s[0].abs() < 1e-30 && (s[1] - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    }
}
