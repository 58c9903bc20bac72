//! Rotary position embeddings as transformers computes them: inverse frequencies from `rope_theta`
//! (default, `linear` and `llama3` scaling, in f32 in transformers' order of operations so the angles
//! match to the last bit where possible), optional partial rotation (GPT-NeoX's `rotary_pct` /
//! `partial_rotary_factor`), and the `rotate_half` convention: the rotated dimensions are split in a
//! first and a second half, not interleaved in pairs.

use candle_core::Tensor;
use serde_json::Value;

use super::{ModelError, Unsupported, ops, text_config};
use crate::io::config::ModelConfig;

/// How the inverse frequencies are rescaled (`rope_scaling` / `rope_parameters`, `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: θ^(−2i/d).
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1): low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The rotary embedding of one attention layer: `inv_freq` has one entry per rotated pair, so
/// `2·inv_freq.len()` leading dimensions of each head rotate and the rest pass through.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Reads `rope_theta`, the scaling and the rotated fraction from the config. `default_partial` is
    /// the model class's default fraction (1.0, GPT-NeoX 0.25).
    pub fn from_config(
        config: &ModelConfig,
        head_dim: usize,
        default_partial: f64,
    ) -> Result<Self, Unsupported> {
        let params = config.rope_scaling.as_ref();
        let text = text_config(config);
        let number = |v: Option<&Value>| v.and_then(Value::as_f64);
        let partial = number(params.and_then(|p| p.get("partial_rotary_factor")))
            .or_else(|| number(text.get("partial_rotary_factor")))
            .or_else(|| number(text.get("rotary_pct")))
            .unwrap_or(default_partial);
        // transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * partial).floor() as usize;
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
            return Err(Unsupported::new(format!(
                "rotary dimension {rotary_dim} (head_dim {head_dim} × {partial}) is not an even number in 1..={head_dim}"
            )));
        }
        let theta = config.rope_theta.unwrap_or(10_000.0);
        let scaling = match params {
            Some(p) => parse_scaling(p, config.max_position_embeddings)?,
            None => RopeScaling::None,
        };
        Ok(Rope::new(theta, rotary_dim, &scaling))
    }

    /// The frequencies for `rotary_dim` rotated dimensions.
    pub fn new(theta: f64, rotary_dim: usize, scaling: &RopeScaling) -> Self {
        let base = default_inv_freq(theta, rotary_dim);
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => {
                let f = factor as f32;
                base.into_iter().map(|v| v / f).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3(
                &base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ),
        };
        Rope { inv_freq }
    }

    /// One inverse frequency per rotated pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Number of leading head dimensions that rotate.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos` and `sin` of the angles `p·inv_freq[j]` for positions 0..t: two `[t, rotary_dim/2]`
    /// tensors (transformers concatenates each with itself; the halves are identical).
    pub(crate) fn tables(&self, t: usize) -> Result<(Tensor, Tensor), ModelError> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in &self.inv_freq {
                // f32 product then f32 cos/sin, as transformers' rotary forward computes them.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((ops::tensor(cos, &[t, half])?, ops::tensor(sin, &[t, half])?))
    }

    /// Rotates `x` `[H, T, Dh]`: with x₁, x₂ the two halves of the rotated part,
    /// `(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`, the remaining `Dh − rotary_dim` dimensions unchanged.
    pub(crate) fn apply(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let (_heads, _t, head_dim) = x.dims3()?;
        let half = self.inv_freq.len();
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        let rotary = 2 * half;
        let mut parts = vec![first, second];
        if rotary < head_dim {
            parts.push(x.narrow(2, rotary, head_dim - rotary)?);
        }
        Ok(Tensor::cat(&parts, 2)?)
    }
}

fn parse_scaling(
    params: &Value,
    max_position_embeddings: Option<usize>,
) -> Result<RopeScaling, Unsupported> {
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| -> Result<f64, Unsupported> {
        params
            .get(key)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| {
                Unsupported::new(format!(
                    "rope scaling `{kind}` needs a positive number `{key}`"
                ))
            })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => {
            let original = match number("original_max_position_embeddings") {
                Ok(v) => v,
                Err(e) => max_position_embeddings.map(|m| m as f64).ok_or(e)?,
            };
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            if high == low {
                return Err(Unsupported::new(
                    "rope scaling `llama3` has high_freq_factor == low_freq_factor",
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            })
        }
        other => Err(Unsupported::new(format!(
            "rope scaling `{other}` is not implemented (default, linear and llama3 are)"
        ))),
    }
}

/// `1 / θ^(2i/d)`: the exponent divided in f32, the power rounded once to f32, the reciprocal in
/// f32 (transformers: `1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))`).
fn default_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            let power = (theta as f32 as f64).powf(exponent as f64) as f32;
            1.0f32 / power
        })
        .collect()
}

/// Llama 3.1's frequency rescaling (transformers `_compute_llama3_parameters`), step by step in f32
/// as torch evaluates it; `a / tensor` is torch's `reciprocal(tensor) · a`.
fn llama3(base: &[f32], factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let factor32 = factor as f32;
    let low_wavelen = (original / low) as f32;
    let high_wavelen = (original / high) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let (low32, span32, original32) = (low as f32, (high - low) as f32, original as f32);
    base.iter()
        .map(|&inv| {
            let wavelen = (1.0 / inv) * two_pi;
            let scaled = if wavelen > low_wavelen {
                inv / factor32
            } else {
                inv
            };
            let smooth = ((1.0 / wavelen) * original32 - low32) / span32;
            let smoothed = (1.0 - smooth) * scaled / factor32 + smooth * scaled;
            let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
            if medium { smoothed } else { scaled }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goldens() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/goldens/forward/cases.json"
        );
        let text = std::fs::read_to_string(path).expect("read forward goldens");
        serde_json::from_str(&text).expect("parse forward goldens")
    }

    /// Every inverse frequency transformers computed for the configs in the generator (llama3 at
    /// Llama-3.1-8B's parameters, llama3 on the tiny fixture, linear, default, NeoX partial).
    #[test]
    fn inverse_frequencies_match_transformers() {
        let doc = goldens();
        let entries = doc["rope"].as_array().expect("rope entries");
        assert!(entries.len() >= 5);
        for entry in entries {
            let name = entry["name"].as_str().expect("name");
            let config = ModelConfig::from_value(entry["config"].clone());
            let heads = config.num_attention_heads.expect("heads");
            let head_dim = config
                .head_dim
                .unwrap_or(config.hidden_size.expect("hidden") / heads);
            let partial = if config.model_type.as_deref() == Some("gpt_neox") {
                0.25
            } else {
                1.0
            };
            let rope = Rope::from_config(&config, head_dim, partial).expect("supported rope");
            let expected: Vec<f32> = entry["inv_freq"]
                .as_array()
                .expect("inv_freq")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect();
            assert_eq!(rope.inv_freq().len(), expected.len(), "{name}");
            for (i, (got, want)) in rope.inv_freq().iter().zip(&expected).enumerate() {
                let rel = ((got - want) / want).abs();
                assert!(rel <= 2.5e-7, "{name}[{i}]: {got} vs transformers {want}");
            }
        }
    }

    #[test]
    fn llama3_keeps_high_divides_low_and_blends_the_middle() {
        let scaling = RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        };
        let plain = Rope::new(10_000.0, 16, &RopeScaling::None);
        let scaled = Rope::new(10_000.0, 16, &scaling);
        // wavelengths 2π·10000^(i/8): 6.3 (< 8, kept), 19.9 (between 8 and 32, blended), ≥ 62.8 (÷4)
        assert_eq!(scaled.inv_freq()[0], plain.inv_freq()[0]);
        let mid = scaled.inv_freq()[1] / plain.inv_freq()[1];
        assert!(mid > 0.25 && mid < 1.0, "{mid}");
        for i in 2..8 {
            assert_eq!(scaled.inv_freq()[i], plain.inv_freq()[i] / 4.0);
        }
    }

    #[test]
    fn unknown_rope_type_is_unsupported() {
        let config = ModelConfig::from_value(serde_json::json!({
            "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}
        }));
        let err = Rope::from_config(&config, 64, 1.0).expect_err("yarn is not implemented");
        assert!(err.reason.contains("yarn"));
    }

    #[test]
    fn rotation_keeps_position_zero_and_the_pass_through_part() {
        let rope = Rope::new(10_000.0, 4, &RopeScaling::None);
        let (cos, sin) = rope.tables(3).expect("tables");
        let data: Vec<f32> = (0..18).map(|v| v as f32 * 0.1 - 0.5).collect();
        let x = Tensor::from_vec(data.clone(), (1, 3, 6), &candle_core::Device::Cpu).expect("x");
        let y = rope.apply(&x, &cos, &sin).expect("apply");
        let y = y
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        assert_eq!(&y[0..6], &data[0..6], "position 0 is not rotated");
        for p in 0..3 {
            assert_eq!(&y[p * 6 + 4..p * 6 + 6], &data[p * 6 + 4..p * 6 + 6]);
        }
        // Position 1, pair 0 (dims 0 and 2) rotates by exactly 1 radian.
        let (x1, x2) = (data[6], data[8]);
        assert!((y[6] - (x1 * 1f32.cos() - x2 * 1f32.sin())).abs() < 1e-6);
        assert!((y[8] - (x2 * 1f32.cos() + x1 * 1f32.sin())).abs() < 1e-6);
    }
}
