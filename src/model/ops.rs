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

/// Elements per parallel work unit of the element-wise kernels.
const CHUNK: usize = 4096;

/// The contiguous f32 data behind a custom op's input.
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
                for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
                    *o = w * (x * inv);
                }
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

    fn scalar(self, x: f32) -> f32 {
        match self {
            // x / (1 + e^-x): for very negative x the denominator is inf and the result -0, as in
            // torch.
            Activation::Silu => x / (1.0 + (-x).exp()),
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
            .for_each(|(out, x)| {
                for (o, x) in out.iter_mut().zip(x) {
                    *o = self.act.scalar(*x);
                }
            });
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
        let gate = contiguous(s1, l1, CustomOp2::name(self))?;
        let up = contiguous(s2, l2, CustomOp2::name(self))?;
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg(format!(
                "gated activation: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            )));
        }
        let mut out = vec![0.0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(out, (gate, up))| {
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = self.act.scalar(*g) * u;
                }
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
    let (heads, t, dh) = q.dims3()?;
    let (kv_heads, _, _) = k.dims3()?;
    let group = heads / kv_heads;
    // Queries of one key/value group are consecutive heads: fold them into the row dimension so
    // one batched matmul per kv head serves the whole group without repeating k or v.
    let q = q.contiguous()?.reshape((kv_heads, group * t, dh))?;
    let scores = q.matmul(&k.t()?)?; // [KV, G·T, S]
    let probs = scores.apply_op1_no_bwd(&CausalSoftmax {
        scale: scale as f32,
        window: window.unwrap_or(usize::MAX),
        queries: t,
        softcap,
    })?;
    let out = probs.matmul(&v.contiguous()?)?; // [KV, G·T, Dh]
    let out = out.reshape((heads, t, dh))?.transpose(0, 1)?;
    Ok(out.reshape((t, heads * dh))?)
}

/// `softmax(scores·scale + causal mask)` over the last axis in one pass: rows are queries (row
/// index mod `queries`), the last `queries` of the row's keys, so with S keys query i sits at
/// position S − queries + i; hidden keys get exactly 0 and are never exponentiated. Equal to
/// adding a −∞ mask and softmaxing, without materialising the mask or four intermediate
/// `[H, T, S]` tensors.
struct CausalSoftmax {
    scale: f32,
    window: usize,
    queries: usize,
    softcap: Option<f32>,
}

impl CausalSoftmax {
    /// A raw score as the softmax sees it: scaled, then soft-capped when asked, in f32 in
    /// transformers' order (`s·scale / cap`, `tanh`, `· cap`).
    fn score(&self, s: f32) -> f32 {
        let scaled = s * self.scale;
        match self.softcap {
            Some(cap) => (scaled / cap).tanh() * cap,
            None => scaled,
        }
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let scores = contiguous(storage, layout, self.name())?;
        let keys = layout.dims().last().copied().unwrap_or(0);
        if keys < self.queries || self.queries == 0 {
            return Err(candle_core::Error::Msg(format!(
                "causal softmax: {} queries against {keys} keys",
                self.queries
            )));
        }
        // Absolute position of query 0: the keys before it are cached ones.
        let offset = keys - self.queries;
        let mut out = vec![0.0f32; scores.len()];
        out.par_chunks_mut(keys)
            .zip(scores.par_chunks(keys))
            .enumerate()
            .for_each(|(row, (out, scores))| {
                let i = offset + row % self.queries;
                let first = (i + 1).saturating_sub(self.window);
                let visible = &scores[first..=i];
                let max = visible
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, s| m.max(self.score(*s)));
                let mut sum = 0.0f32;
                for (o, s) in out[first..=i].iter_mut().zip(visible) {
                    *o = (self.score(*s) - max).exp();
                    sum += *o;
                }
                for o in &mut out[first..=i] {
                    *o /= sum;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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

    #[test]
    fn causal_softmax_hides_the_future_and_slides() {
        let scores = t(&[1.0; 16], &[1, 4, 4]);
        let probs = |window| {
            scores
                .apply_op1_no_bwd(&CausalSoftmax {
                    scale: 1.0,
                    window,
                    queries: 4,
                    softcap: None,
                })
                .expect("softmax")
                .squeeze(0)
                .expect("squeeze")
                .to_vec2::<f32>()
                .expect("vec")
        };
        let full = probs(usize::MAX);
        assert_eq!(full[0], vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(full[3], vec![0.25; 4]);
        let slide = probs(2);
        assert_eq!(slide[3], vec![0.0, 0.0, 0.5, 0.5]);
        assert_eq!(slide[1], vec![0.5, 0.5, 0.0, 0.0]);
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
        let scores = t(&[1.0; 8], &[1, 2, 4]);
        let probs = |window| {
            scores
                .apply_op1_no_bwd(&CausalSoftmax {
                    scale: 1.0,
                    window,
                    queries: 2,
                    softcap: None,
                })
                .expect("softmax")
                .squeeze(0)
                .expect("squeeze")
                .to_vec2::<f32>()
                .expect("vec")
        };
        let full = probs(usize::MAX);
        assert_eq!(full[0], vec![1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!(full[1], vec![0.25; 4]);
        let slide = probs(2);
        assert_eq!(slide[0], vec![0.0, 0.5, 0.5, 0.0]);
        assert_eq!(slide[1], vec![0.0, 0.0, 0.5, 0.5]);
        // More queries than keys is an error, not a panic.
        let err = t(&[1.0; 6], &[1, 3, 2]).apply_op1_no_bwd(&CausalSoftmax {
            scale: 1.0,
            window: usize::MAX,
            queries: 3,
            softcap: None,
        });
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
