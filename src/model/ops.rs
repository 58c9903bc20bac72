//! The numeric building blocks of every decoder, written on candle-core tensor ops in f32: RMSNorm,
//! LayerNorm, softmax, the activations transformers names in `hidden_act`, and causal (optionally
//! sliding-window) multi-head attention with grouped key/value heads.

use candle_core::{D, Device, Tensor};

use super::{ModelError, Unsupported};

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension (transformers' `LlamaRMSNorm`).
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, ModelError> {
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (variance + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// `(x − mean) / sqrt(var + eps) · w + b` over the last dimension, biased variance
/// (`torch.nn.LayerNorm`).
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor, ModelError> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (variance + eps)?.sqrt()?.recip()?;
    Ok(centered
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// Softmax over the last dimension, shifted by the row maximum. Rows must hold at least one finite
/// value (a causal mask always leaves the diagonal).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor, ModelError> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
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

    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self {
            // x / (1 + e^-x): for very negative x the denominator overflows to inf and the result is
            // -0, as in torch.
            Activation::Silu => x.broadcast_div(&(x.neg()?.exp()? + 1.0)?)?,
            Activation::GeluErf => {
                let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
                (x.broadcast_mul(&cdf)? * 0.5)?
            }
            Activation::GeluTanh => {
                let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
                let cube = (x.sqr()?.broadcast_mul(x)? * 0.044715)?;
                let inner = (x.broadcast_add(&cube)? * sqrt_2_over_pi)?;
                (x.broadcast_mul(&(inner.tanh()? + 1.0)?)? * 0.5)?
            }
            Activation::Relu => x.relu()?,
        })
    }
}

/// Additive causal mask `[T, T]`: 0 where key j is visible from query i (j ≤ i, and i − j < window
/// with a sliding window), −∞ elsewhere. transformers' `sliding_window_overlay` keeps
/// `kv_idx > q_idx − window`, the same set.
pub(crate) fn causal_mask(t: usize, window: Option<usize>) -> Result<Tensor, ModelError> {
    let window = window.unwrap_or(usize::MAX);
    let mut mask = vec![f32::NEG_INFINITY; t * t];
    for (i, row) in mask.chunks_mut(t).enumerate() {
        let first = (i + 1).saturating_sub(window);
        row[first..=i].fill(0.0);
    }
    Ok(Tensor::from_vec(mask, (t, t), &Device::Cpu)?)
}

/// Scaled dot-product attention with grouped key/value heads.
///
/// `q` is `[H, T, Dh]`, `k` and `v` are `[KV, T, Dh]` with H a multiple of KV; query head h reads
/// key/value head h / (H/KV), as transformers' `repeat_kv` lays them out. Scores are
/// `q·kᵀ·scale + mask`, softmaxed in f32. Returns `[T, H·Dh]` (heads concatenated per position).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor, ModelError> {
    let (heads, t, dh) = q.dims3()?;
    let (kv_heads, t_k, _) = k.dims3()?;
    let group = heads / kv_heads;
    // Queries of one key/value group are consecutive heads: fold them into the row dimension so
    // one batched matmul per kv head serves the whole group without copying k or v.
    let q = q.contiguous()?.reshape((kv_heads, group * t, dh))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.reshape((heads, t, t_k))?.broadcast_add(mask)?;
    let probs = softmax_last(&scores)?.reshape((kv_heads, group * t, t_k))?;
    let out = probs.matmul(&v.contiguous()?)?; // [KV, G·T, Dh]
    let out = out.reshape((heads, t, dh))?.transpose(0, 1)?;
    Ok(out.reshape((t, heads * dh))?)
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
    fn causal_mask_hides_the_future_and_slides() {
        let full = causal_mask(3, None)
            .expect("mask")
            .to_vec2::<f32>()
            .expect("vec");
        assert_eq!(full[0][1], f32::NEG_INFINITY);
        assert_eq!(full[2], vec![0.0, 0.0, 0.0]);
        let slide = causal_mask(4, Some(2))
            .expect("mask")
            .to_vec2::<f32>()
            .expect("vec");
        assert_eq!(
            slide[3],
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0]
        );
        assert_eq!(slide[0][0], 0.0);
    }

    #[test]
    fn attention_is_causal_and_groups_kv_heads() {
        // One kv head shared by two query heads; position 0 sees only itself, so its output is v[0].
        let q = t(&[1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 2.0, -1.0], &[2, 2, 2]);
        let k = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 2]);
        let v = t(&[3.0, 4.0, -1.0, 2.0], &[1, 2, 2]);
        let mask = causal_mask(2, None).expect("mask");
        let out = attention(&q, &k, &v, 1.0, &mask)
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
