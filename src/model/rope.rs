//! Rotary position embeddings as transformers computes them: inverse frequencies from `rope_theta`
//! (default, `linear`, `llama3` and `longrope` scaling, in f32 in transformers' order of operations so
//! the angles match to the last bit where possible), optional partial rotation (GPT-NeoX's
//! `rotary_pct` / `partial_rotary_factor`), and the `rotate_half` convention: the rotated dimensions
//! are split in a first and a second half, not interleaved in pairs.
//!
//! LongRoPE (Phi-3's `longrope`, formerly `su`) keeps two frequency sets and an attention factor that
//! scales cos and sin; which set a forward step uses depends on where the step's sequence ends
//! (transformers `dynamic_rope_update`, `longrope_frequency_update`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde_json::Value;

use super::{ModelError, Unsupported, text_config};
use crate::io::config::ModelConfig;
use crate::simd::avx2_copy;

/// How the inverse frequencies are rescaled (`rope_scaling` / `rope_parameters`, `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: θ^(−2i/d).
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `dynamic` (NTK-aware): transformers only rescales once a sequence is longer than
    /// `max_position_embeddings`; up to that length the frequencies are the default ones.
    Dynamic { max_positions: usize },
    /// `llama3` (Llama 3.1): low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// `longrope` / `su` (Phi-3): `inv_freq = 1 / (ext · θ^(2i/d))` with `ext` the `short_factor`
    /// list, or the `long_factor` list once a sequence is longer than
    /// `original_max_position_embeddings`; cos and sin are multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// The rotary embedding of one attention layer: `inv_freq` has one entry per rotated pair, so
/// `2·inv_freq.len()` leading dimensions of each head rotate and the rest pass through.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Longest sequence these frequencies are valid for (dynamic scaling changes them beyond).
    max_positions: Option<usize>,
    /// LongRoPE's second set, used by steps whose sequence ends beyond `original` positions.
    long: Option<LongFrequencies>,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f32,
}

/// LongRoPE's frequencies for long sequences.
#[derive(Debug, Clone, PartialEq)]
struct LongFrequencies {
    inv_freq: Vec<f32>,
    original: usize,
}

impl Rope {
    /// Reads `rope_theta`, the scaling and the rotated fraction from the config. `default_partial` is
    /// the model class's default fraction (1.0, GPT-NeoX 0.25).
    pub fn from_config(
        config: &ModelConfig,
        head_dim: usize,
        default_partial: f64,
    ) -> Result<Self, Unsupported> {
        let theta = config.rope_theta.unwrap_or(10_000.0);
        Self::from_params(
            config,
            config.rope_scaling.as_ref(),
            theta,
            head_dim,
            default_partial,
        )
    }

    /// The rotary embedding described by one `rope_parameters` dict (`params`; `None`: default
    /// frequencies) with base `theta`, for models whose layers rotate differently (Gemma 3's local and
    /// global layers each have their own dict). The rotated fraction and the model-level lengths
    /// (`max_position_embeddings`, Phi-3's top-level `original_max_position_embeddings`) come from
    /// `config`.
    pub fn from_params(
        config: &ModelConfig,
        params: Option<&Value>,
        theta: f64,
        head_dim: usize,
        default_partial: f64,
    ) -> Result<Self, Unsupported> {
        let text = text_config(config);
        let number = |v: Option<&Value>| v.and_then(Value::as_f64);
        let partial = number(params.and_then(|p| p.get("partial_rotary_factor")))
            .or_else(|| number(text.get("partial_rotary_factor")))
            .or_else(|| number(text.get("rotary_pct")))
            .unwrap_or(default_partial);
        // transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * partial).floor() as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(Unsupported::new(format!(
                "rotary dimension {rotary_dim} (head_dim {head_dim} × {partial}) is not an even number in 1..={head_dim}"
            )));
        }
        let lengths = Lengths {
            max_positions: config.max_position_embeddings,
            // Phi-3 writes the pretraining length next to `rope_scaling`; transformers gives it
            // priority over the one inside the dict (`standardize_rope_params`).
            original_top: text
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize),
        };
        let scaling = match params {
            Some(p) => parse_scaling(p, &lengths, rotary_dim)?,
            None => RopeScaling::None,
        };
        Ok(Rope::new(theta, rotary_dim, &scaling))
    }

    /// The frequencies for `rotary_dim` rotated dimensions.
    pub fn new(theta: f64, rotary_dim: usize, scaling: &RopeScaling) -> Self {
        let base = default_inv_freq(theta, rotary_dim);
        let max_positions = match *scaling {
            RopeScaling::Dynamic { max_positions } => Some(max_positions),
            _ => None,
        };
        let (mut long, mut attention_factor) = (None, 1.0f32);
        let inv_freq = match scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                base.into_iter().map(|v| v / f).collect()
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor: factor,
            } => {
                long = Some(LongFrequencies {
                    inv_freq: longrope(theta, rotary_dim, long_factor),
                    original: *original_max_position_embeddings,
                });
                attention_factor = *factor as f32;
                longrope(theta, rotary_dim, short_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3(
                &base,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            ),
        };
        Rope {
            inv_freq,
            max_positions,
            long,
            attention_factor,
        }
    }

    /// One inverse frequency per rotated pair (LongRoPE: the short set).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// LongRoPE's pretraining length, past which the long factors apply; `None` without LongRoPE.
    pub fn long_threshold(&self) -> Option<usize> {
        self.long.as_ref().map(|l| l.original)
    }

    /// The frequencies a step whose sequence ends at position `end` (exclusive) rotates with:
    /// LongRoPE's long set once `end` passes the pretraining length (transformers compares
    /// `max(position_ids) + 1` with it at every forward, so a cached decode switches sets mid-way and
    /// keeps the keys it already rotated with the short set), else the one set.
    pub fn inv_freq_until(&self, end: usize) -> &[f32] {
        match &self.long {
            Some(long) if end > long.original => &long.inv_freq,
            _ => &self.inv_freq,
        }
    }

    /// Number of leading head dimensions that rotate.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos` and `sin` of the angles `p·inv_freq[j]` for the t absolute positions
    /// `start..start + t` (a whole sequence from 0; decoding with a cache, the new tokens rotate by
    /// where they sit in the whole sequence). Row r of the tables is position `start + r`.
    pub(crate) fn tables_at(&self, start: usize, t: usize) -> Result<RopeTables, ModelError> {
        let end = start + t;
        if let Some(max) = self.max_positions.filter(|max| end > *max) {
            return Err(ModelError::TooLong {
                tokens: end,
                max,
                tensor:
                    "rotary embedding (dynamic NTK scaling beyond this length is not implemented)"
                        .to_string(),
            });
        }
        let freqs = self.inv_freq_until(end);
        let half = freqs.len();
        let factor = self.attention_factor;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..end {
            for f in freqs {
                // f32 product then f32 cos/sin, each times the attention factor in f32, as
                // transformers' rotary forward computes them (a factor of 1 changes nothing).
                let angle = p as f32 * f;
                cos.push(angle.cos() * factor);
                sin.push(angle.sin() * factor);
            }
        }
        Ok(RopeTables {
            cos,
            sin,
            positions: t,
        })
    }

    /// The tables of several sequences laid end to end, `lengths[s]` positions each, every one
    /// from position 0 (its own dynamic frequencies when they depend on the length).
    pub(crate) fn tables_for_segments(&self, lengths: &[usize]) -> Result<RopeTables, ModelError> {
        let mut joined = RopeTables {
            cos: Vec::new(),
            sin: Vec::new(),
            positions: 0,
        };
        for &len in lengths {
            let part = self.tables_at(0, len)?;
            joined.cos.extend(part.cos);
            joined.sin.extend(part.sin);
            joined.positions += part.positions;
        }
        Ok(joined)
    }

    /// Rotates the heads of `x` `[T, heads·Dh]` (a projection's output) and returns them as
    /// `[heads, T, Dh]`: with x₁, x₂ the two halves of the rotated part,
    /// `(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`; the remaining `Dh − rotary_dim` dimensions are copied.
    pub(crate) fn apply(
        &self,
        x: &Tensor,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables,
    ) -> Result<Tensor, ModelError> {
        let (t, width) = x.dims2()?;
        if t != tables.positions || head_dim * heads != width || head_dim < self.rotary_dim() {
            return Err(ModelError::Heads {
                got: vec![t, width],
                positions: tables.positions,
                heads,
                head_dim,
            });
        }
        let op = Rotate {
            tables,
            heads,
            head_dim,
            half: self.inv_freq.len(),
        };
        Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

/// Precomputed `cos`/`sin` of every (position, frequency) pair, `[T, rotary_dim/2]` row-major.
#[derive(Debug, Clone)]
pub(crate) struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

/// The rotation as one pass that also moves heads to the front (`[T, H·Dh]` → `[H, T, Dh]`).
struct Rotate<'a> {
    tables: &'a RopeTables,
    heads: usize,
    head_dim: usize,
    half: usize,
}

impl CustomOp1 for Rotate<'_> {
    fn name(&self) -> &'static str {
        "rotary-embedding"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg(
                "rotary embedding takes contiguous f32 input".into(),
            ));
        };
        let x = &data[start..end];
        let (t, dh, half) = (self.tables.positions, self.head_dim, self.half);
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(dh).enumerate().for_each(|(row, out)| {
            let (h, p) = (row / t, row % t);
            let src = &x[(p * self.heads + h) * dh..][..dh];
            let cos = &self.tables.cos[p * half..][..half];
            let sin = &self.tables.sin[p * half..][..half];
            let (lo, hi) = out.split_at_mut(half);
            rotate_pairs(
                lo,
                &mut hi[..half],
                &src[..half],
                &src[half..2 * half],
                cos,
                sin,
            );
            out[2 * half..].copy_from_slice(&src[2 * half..]);
        });
        Ok((CpuStorage::F32(out), Shape::from((self.heads, t, dh))))
    }
}

avx2_copy! {
    /// One head's rotated halves: lo = x1·cos − x2·sin, hi = x2·cos + x1·sin (an AVX2 copy where
    /// available: the same bits, eight pairs at a time).
    fn rotate_pairs(
        lo: &mut [f32],
        hi: &mut [f32],
        x1: &[f32],
        x2: &[f32],
        cos: &[f32],
        sin: &[f32],
    ) {
        let n = lo.len();
        let (hi, x1, x2, cos, sin) = (&mut hi[..n], &x1[..n], &x2[..n], &cos[..n], &sin[..n]);
        for j in 0..n {
            lo[j] = x1[j] * cos[j] - x2[j] * sin[j];
            hi[j] = x2[j] * cos[j] + x1[j] * sin[j];
        }
    }
}

/// The model-level lengths a scaling may need.
struct Lengths {
    max_positions: Option<usize>,
    /// A top-level `original_max_position_embeddings` (Phi-3).
    original_top: Option<usize>,
}

fn parse_scaling(
    params: &Value,
    lengths: &Lengths,
    rotary_dim: usize,
) -> Result<RopeScaling, Unsupported> {
    let max_position_embeddings = lengths.max_positions;
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
        "dynamic" => Ok(RopeScaling::Dynamic {
            max_positions: max_position_embeddings.ok_or_else(|| {
                Unsupported::new("rope scaling `dynamic` needs `max_position_embeddings`")
            })?,
        }),
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
        // transformers' Phi3Config renames `su` (the first Phi-3 release) to `longrope`.
        "longrope" | "su" => longrope_scaling(params, lengths, rotary_dim),
        other => Err(Unsupported::new(format!(
            "rope scaling `{other}` is not implemented (default, linear, dynamic, llama3 and longrope are)"
        ))),
    }
}

/// LongRoPE's parameters (transformers `_compute_longrope_parameters`): both factor lists with one
/// entry per rotated pair; the pretraining length from the top level of the config, else the dict,
/// else `max_position_embeddings`; `factor` defaulting to max / original; the attention factor,
/// unless given, `sqrt(1 + ln(factor) / ln(original))` for factors above 1.
fn longrope_scaling(
    params: &Value,
    lengths: &Lengths,
    rotary_dim: usize,
) -> Result<RopeScaling, Unsupported> {
    let list = |key: &str| -> Result<Vec<f64>, Unsupported> {
        let values = params
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>());
        match values {
            Some(v) if v.len() == rotary_dim / 2 && v.iter().all(|f| f.is_finite() && *f > 0.0) => {
                Ok(v)
            }
            _ => Err(Unsupported::new(format!(
                "rope scaling `longrope` needs `{key}`: {} positive numbers, one per rotated pair",
                rotary_dim / 2
            ))),
        }
    };
    let original = lengths
        .original_top
        .or_else(|| {
            params
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
        })
        .or(lengths.max_positions)
        .filter(|v| *v > 1)
        .ok_or_else(|| {
            Unsupported::new("rope scaling `longrope` needs `original_max_position_embeddings`")
        })?;
    let positive = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let factor = positive("factor").or_else(|| {
        lengths
            .max_positions
            .map(|max| max as f64 / original as f64)
    });
    let attention_factor = match (positive("attention_factor"), factor) {
        (Some(given), _) => given,
        (None, Some(f)) if f > 1.0 => (1.0 + f.ln() / (original as f64).ln()).sqrt(),
        (None, _) => 1.0,
    };
    Ok(RopeScaling::LongRope {
        short_factor: list("short_factor")?,
        long_factor: list("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// `1 / (ext_i · θ^(2i/d))`, every step in f32 (transformers: `1.0 / (ext_factors *
/// base**inv_freq_shape)` with `ext_factors` a float32 tensor of the config's list).
fn longrope(theta: f64, rotary_dim: usize, ext: &[f64]) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            let power = (theta as f32 as f64).powf(exponent as f64) as f32;
            // A list of the wrong length cannot come from a config (parse_scaling checks it);
            // a missing entry scales by 1 rather than panicking.
            let ext = ext.get(i).copied().unwrap_or(1.0) as f32;
            1.0f32 / (ext * power)
        })
        .collect()
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
            // transformers: ~(wavelen < high) & ~(wavelen > low); wavelengths are never NaN.
            let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
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

    /// LongRoPE as transformers computes it for Phi-3 configs in the v5 style (`rope_parameters`)
    /// and the v4 style (`rope_scaling` with `type`, top-level theta and partial rotary factor):
    /// the short and the long set, and the attention factor (fixtures/gen/arch_dense.py).
    #[test]
    fn longrope_matches_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/goldens/arch_dense/cases.json"
        );
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read arch_dense goldens"))
                .expect("parse arch_dense goldens");
        let entries = doc["rope"].as_array().expect("rope entries");
        assert_eq!(entries.len(), 2);
        let floats = |v: &Value| -> Vec<f32> {
            v.as_array()
                .expect("list")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        };
        for entry in entries {
            let name = entry["name"].as_str().expect("name");
            let config = ModelConfig::from_value(entry["config"].clone());
            let head_dim =
                config.hidden_size.expect("hidden") / config.num_attention_heads.expect("heads");
            let rope = Rope::from_config(&config, head_dim, 1.0).expect("longrope is supported");
            let threshold = rope.long_threshold().expect("a long set");
            assert_eq!(threshold, 16, "{name}");
            for (got, want, set) in [
                (
                    rope.inv_freq_until(threshold),
                    floats(&entry["short_inv_freq"]),
                    "short",
                ),
                (
                    rope.inv_freq_until(threshold + 1),
                    floats(&entry["long_inv_freq"]),
                    "long",
                ),
            ] {
                assert_eq!(got.len(), want.len(), "{name} {set}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let rel = ((g - w) / w).abs();
                    assert!(rel <= 2.5e-7, "{name} {set}[{i}]: {g} vs transformers {w}");
                }
            }
            let factor = entry["attention_factor"].as_f64().expect("factor") as f32;
            assert_eq!(rope.attention_factor(), factor, "{name}");
            assert!(factor > 1.0, "{name}: the factor must bite");
        }
    }

    #[test]
    fn longrope_tables_switch_sets_at_the_pretraining_length_and_scale_by_the_factor() {
        let scaling = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![4.0, 8.0],
            original_max_position_embeddings: 4,
            attention_factor: 1.5,
        };
        let rope = Rope::new(10_000.0, 4, &scaling);
        let short = rope.tables_at(0, 4).expect("short");
        let long = rope.tables_at(0, 5).expect("long");
        // Position 1, pair 0: angle 1 / 1 (short) or 1 / 4 (long), times the factor.
        assert_eq!(short.cos[2], 1f32.cos() * 1.5);
        assert_eq!(long.cos[2], 0.25f32.cos() * 1.5);
        // A decoding step ending past the length uses the long set at its own positions.
        assert_eq!(rope.tables_at(4, 1).expect("step").sin[1], long.sin[9]);
        // `su` is the first Phi-3 release's name; factor lists of the wrong length are refused.
        let config = |factors: serde_json::Value| {
            ModelConfig::from_value(serde_json::json!({
                "model_type": "phi3", "max_position_embeddings": 64,
                "original_max_position_embeddings": 16,
                "rope_scaling": {"type": "su", "short_factor": factors, "long_factor": [1.0, 2.0]}
            }))
        };
        let su = Rope::from_config(&config(serde_json::json!([1.0, 1.5])), 4, 1.0).expect("su");
        assert_eq!(su.long_threshold(), Some(16));
        let expected = (1.0 + 4f64.ln() / 16f64.ln()).sqrt() as f32;
        assert_eq!(su.attention_factor(), expected);
        let err = Rope::from_config(&config(serde_json::json!([1.0])), 4, 1.0)
            .expect_err("one factor for two pairs");
        assert!(err.reason.contains("short_factor"), "{}", err.reason);
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
    fn dynamic_scaling_is_the_default_up_to_max_positions() {
        let config = ModelConfig::from_value(serde_json::json!({
            "model_type": "llama", "max_position_embeddings": 8,
            "rope_scaling": {"type": "dynamic", "factor": 2.0}
        }));
        let rope = Rope::from_config(&config, 8, 1.0).expect("dynamic");
        assert_eq!(
            rope.inv_freq(),
            Rope::new(10_000.0, 8, &RopeScaling::None).inv_freq()
        );
        assert!(rope.tables_at(0, 8).is_ok());
        assert!(matches!(
            rope.tables_at(0, 9),
            Err(ModelError::TooLong { .. })
        ));
        assert!(matches!(
            rope.tables_at(7, 2),
            Err(ModelError::TooLong { tokens: 9, .. })
        ));
    }

    #[test]
    fn tables_at_an_offset_are_the_rows_of_the_whole_sequence() {
        let rope = Rope::new(10_000.0, 8, &RopeScaling::None);
        let whole = rope.tables_at(0, 7).expect("whole");
        let tail = rope.tables_at(5, 2).expect("tail");
        assert_eq!(tail.positions, 2);
        assert_eq!(tail.cos, whole.cos[5 * 4..]);
        assert_eq!(tail.sin, whole.sin[5 * 4..]);
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
        let tables = rope.tables_at(0, 3).expect("tables");
        let data: Vec<f32> = (0..18).map(|v| v as f32 * 0.1 - 0.5).collect();
        let x = Tensor::from_vec(data.clone(), (3, 6), &candle_core::Device::Cpu).expect("x");
        let y = rope.apply(&x, 1, 6, &tables).expect("apply");
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
