//! Gemma 1, Gemma 2 and Gemma 3 (text) as transformers 5.x runs them (`modeling_gemma.py`,
//! `modeling_gemma2.py`, `modeling_gemma3.py`). A Llama-shaped decoder with these differences, each
//! a named field of [`GemmaConfig`] rather than a branch on the generation:
//!
//! * the token embeddings are multiplied by √hidden, rounded to f32 first (transformers'
//!   `*ScaledWordEmbedding` casts the normalizer to the weight's dtype; the forward here runs in f32);
//!   PEFT scales an embedding LoRA's output by the same factor (`_get_embed_scale`);
//! * every RMSNorm multiplies by `1 + w` (the stored weight is an offset from one), computed in f32;
//! * the MLP is GeGLU: `down(act(gate(x)) ⊙ up(x))` with tanh GELU (`hidden_act` for Gemma 1,
//!   `hidden_activation` for Gemma 2/3);
//! * Gemma 2/3 wrap attention and MLP in "sandwich" norms (`post_attention_layernorm` on the attention
//!   output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP), scale scores by
//!   `query_pre_attn_scalar^-½` and alternate sliding-window and global layers (`layer_types`);
//! * Gemma 2 soft-caps attention scores (`attn_logit_softcapping`); Gemma 2 and 3 soft-cap the final
//!   logits (`final_logit_softcapping`) when the config sets it — transformers 5.x's Gemma 3 attention
//!   does not pass the attention cap on, so neither does this;
//! * Gemma 3 normalises q and k per head (`q_norm`, `k_norm`, also `1 + w`) and rotates sliding layers
//!   with their own base (`rope_local_base_freq`, or `rope_parameters.sliding_attention`) while global
//!   layers use `rope_theta` and the scaling (`rope_parameters.full_attention`).
//!
//! The head is tied to the embedding unless the checkpoint stores `lm_head.weight`; its logits are not
//! scaled by √hidden.

use candle_core::Tensor;
use serde_json::Value;

use super::cache::LayerCache;
use super::linear::{self, load};
use super::ops::{self, Activation};
use super::rope::Rope;
use super::{
    Layout, ModelError, Unsupported, WeightProvider, bounded, find_prefix, required, text_config,
};
use crate::io::config::ModelConfig;

/// The norms of a block in the order it applies them; Gemma 1 has only the first two.
const BLOCK_NORMS: [&str; 4] = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

/// Which Gemma: decides the block's norms, the attention scale and the defaults of absent keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmaGeneration {
    One,
    Two,
    Three,
}

impl GemmaGeneration {
    /// The generation a `model_type` names (`gemma3` is the multimodal wrapper whose `text_config`
    /// describes the language model), or `None` for other models.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "gemma" => Some(GemmaGeneration::One),
            "gemma2" => Some(GemmaGeneration::Two),
            "gemma3" | "gemma3_text" => Some(GemmaGeneration::Three),
            _ => None,
        }
    }
}

/// Hyper-parameters and tensor names of one Gemma checkpoint.
#[derive(Debug, Clone)]
pub struct GemmaConfig {
    pub generation: GemmaGeneration,
    /// `model.` for `*ForCausalLM`; the multimodal Gemma 3 keeps its decoder under
    /// `model.language_model.` (transformers 5.x) or `language_model.model.` (4.x).
    pub prefix: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    /// √hidden rounded to f32: multiplies the token embeddings.
    pub embed_scale: f32,
    /// Multiplies q·kᵀ: `query_pre_attn_scalar^-½` (Gemma 2/3), `head_dim^-½` (Gemma 1).
    pub attn_scale: f64,
    /// Gemma 2's `attn_logit_softcapping`.
    pub attn_softcap: Option<f32>,
    /// `final_logit_softcapping` (Gemma 2/3).
    pub final_softcap: Option<f32>,
    /// Gemma 2/3's norms around the attention output and the MLP.
    pub sandwich_norms: bool,
    /// Gemma 3's per-head `q_norm` / `k_norm`.
    pub qk_norm: bool,
    pub attention_bias: bool,
    /// Sliding-window length per layer (`None`: global attention).
    pub windows: Vec<Option<usize>>,
    /// Rotary embedding of the global layers (and of every layer before Gemma 3).
    pub rope: Rope,
    /// Gemma 3's rotary embedding of the sliding layers.
    pub local_rope: Option<Rope>,
    pub tied: bool,
    pub embed: String,
    pub head: String,
    pub norm: String,
}

impl GemmaConfig {
    pub(crate) fn from_config(
        config: &ModelConfig,
        generation: GemmaGeneration,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self, Unsupported> {
        let text = text_config(config);
        let hidden_size = required(config.hidden_size, "hidden_size")?;
        let num_heads = required(config.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = config.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Unsupported::new(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads"
            )));
        }
        if text
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err(Unsupported::new(
                "`use_bidirectional_attention` (an encoder-style Gemma) is not implemented",
            ));
        }
        // Every Gemma config class defaults head_dim to 256, independent of the hidden size.
        let head_dim = bounded(
            config.head_dim.filter(|d| *d > 0).unwrap_or(256),
            "head_dim",
        )?;
        let num_layers = required(config.num_hidden_layers, "num_hidden_layers")?;
        let activation_key = match generation {
            GemmaGeneration::One => "hidden_act",
            GemmaGeneration::Two | GemmaGeneration::Three => "hidden_activation",
        };
        let activation = Activation::from_name(
            text.get(activation_key)
                .and_then(Value::as_str)
                .unwrap_or("gelu_pytorch_tanh"),
        )?;
        let attn_scale = match generation {
            GemmaGeneration::One => (head_dim as f64).powf(-0.5),
            GemmaGeneration::Two | GemmaGeneration::Three => {
                let scalar = match text.get("query_pre_attn_scalar") {
                    None => 256.0,
                    Some(v) => v.as_f64().filter(|s| *s > 0.0).ok_or_else(|| {
                        Unsupported::new("`query_pre_attn_scalar` is not a positive number")
                    })?,
                };
                scalar.powf(-0.5)
            }
        };
        // A cap of null (or absent where the class default is null) turns capping off.
        let cap = |key: &str, default: Option<f64>| -> Result<Option<f32>, Unsupported> {
            let value = match text.get(key) {
                None => default,
                Some(Value::Null) => None,
                Some(v) => Some(v.as_f64().filter(|c| *c > 0.0).ok_or_else(|| {
                    Unsupported::new(format!("`{key}` is not a positive number"))
                })?),
            };
            Ok(value.map(|c| c as f32))
        };
        let (attn_softcap, final_softcap) = match generation {
            GemmaGeneration::One => (None, None),
            GemmaGeneration::Two => (
                cap("attn_logit_softcapping", Some(50.0))?,
                cap("final_logit_softcapping", Some(30.0))?,
            ),
            GemmaGeneration::Three => (None, cap("final_logit_softcapping", None)?),
        };
        let windows = windows(text, generation, num_layers)?;
        let (rope, local_rope) = ropes(config, text, generation, head_dim)?;
        let prefix = find_prefix(
            &[
                "model.",
                "",
                "model.language_model.",
                "language_model.model.",
            ],
            "embed_tokens.weight",
            has,
        )?;
        let head = ["lm_head.weight", "language_model.lm_head.weight"]
            .into_iter()
            .find(|n| has(n))
            .unwrap_or("lm_head.weight")
            .to_string();
        Ok(GemmaConfig {
            generation,
            hidden_size,
            intermediate_size: required(config.intermediate_size, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config.rms_norm_eps.unwrap_or(1e-6),
            activation,
            // transformers: `hidden_size**0.5` in f64, then `.to(weight.dtype)`.
            embed_scale: (hidden_size as f64).sqrt() as f32,
            attn_scale,
            attn_softcap,
            final_softcap,
            sandwich_norms: generation != GemmaGeneration::One,
            qk_norm: generation == GemmaGeneration::Three,
            attention_bias: text
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            windows,
            rope,
            local_rope,
            tied: config.tie_word_embeddings || !has(&head),
            embed: format!("{prefix}embed_tokens.weight"),
            norm: format!("{prefix}norm.weight"),
            head,
            prefix,
        })
    }

    fn layer(&self, i: usize) -> String {
        format!("{}layers.{i}.", self.prefix)
    }

    /// The norms of block `i` the block applies (Gemma 1 has the first two).
    fn norm_names(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        let count = if self.sandwich_norms { 4 } else { 2 };
        BLOCK_NORMS[..count]
            .iter()
            .map(|n| format!("{p}{n}.weight"))
            .collect()
    }

    pub(crate) fn block_tensors(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        let mut names = self.norm_names(i);
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("{p}self_attn.{proj}.weight"));
            if self.attention_bias {
                names.push(format!("{p}self_attn.{proj}.bias"));
            }
        }
        if self.qk_norm {
            names.push(format!("{p}self_attn.q_norm.weight"));
            names.push(format!("{p}self_attn.k_norm.weight"));
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}mlp.{proj}.weight"));
        }
        names
    }

    pub(crate) fn head_tensors(&self) -> Vec<String> {
        let matrix = if self.tied { &self.embed } else { &self.head };
        vec![self.norm.clone(), matrix.clone()]
    }

    pub(crate) fn embed(
        &self,
        w: &dyn WeightProvider,
        tokens: &[u32],
    ) -> Result<Tensor, ModelError> {
        let x = linear::embedding(w, &self.embed, tokens, self.hidden_size)?;
        // x·s + 0 in f32: exactly x·s.
        Ok(x.affine(f64::from(self.embed_scale), 0.0)?)
    }

    /// Gemma's RMSNorm of `x` over its last `dim` values with the stored offset `name`.
    fn norm(
        &self,
        w: &dyn WeightProvider,
        name: &str,
        x: &Tensor,
        dim: usize,
    ) -> Result<Tensor, ModelError> {
        let offset = load(w, name, &[dim])?;
        ops::rms_norm(x, &(offset + 1.0)?, self.rms_norm_eps)
    }

    /// Block `i` on the new positions `start..start + T` of `x` `[T, hidden]`, attending to the
    /// keys and values in `cache` (positions `0..start`) and appending its own.
    pub(crate) fn block_step(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        x: &Tensor,
        cache: &mut LayerCache,
        start: usize,
    ) -> Result<Tensor, ModelError> {
        let p = self.layer(i);
        let (t, hidden) = x.dims2()?;
        let (heads, kv_heads, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [ln_in, ln_post_attn, ln_pre_ff, ln_post_ff] =
            BLOCK_NORMS.map(|n| format!("{p}{n}.weight"));

        let h = self.norm(w, &ln_in, x, hidden)?;
        let attn = format!("{p}self_attn.");
        let q = linear::linear(w, &format!("{attn}q_proj"), &h, heads * dh, Layout::Linear)?;
        let k = linear::linear(
            w,
            &format!("{attn}k_proj"),
            &h,
            kv_heads * dh,
            Layout::Linear,
        )?;
        let v = linear::linear(
            w,
            &format!("{attn}v_proj"),
            &h,
            kv_heads * dh,
            Layout::Linear,
        )?;
        let (q, k) = if self.qk_norm {
            let qn = self.norm(
                w,
                &format!("{attn}q_norm.weight"),
                &q.reshape((t * heads, dh))?,
                dh,
            )?;
            let kn = self.norm(
                w,
                &format!("{attn}k_norm.weight"),
                &k.reshape((t * kv_heads, dh))?,
                dh,
            )?;
            (
                qn.reshape((t, heads * dh))?,
                kn.reshape((t, kv_heads * dh))?,
            )
        } else {
            (q, k)
        };
        let window = self.windows.get(i).copied().flatten();
        let rope = match (&self.local_rope, window) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        };
        let tables = rope.tables_at(start, t)?;
        let q = rope.apply(&q, heads, dh, &tables)?;
        let k = rope.apply(&k, kv_heads, dh, &tables)?;
        let v = ops::split_heads(&v, kv_heads, dh)?;
        let (k, v) = cache.append(k, v)?;
        let a = ops::attention_capped(&q, &k, &v, self.attn_scale, window, self.attn_softcap)?;
        let a = linear::linear(w, &format!("{attn}o_proj"), &a, hidden, Layout::Linear)?;

        let mlp = format!("{p}mlp.");
        let inter = self.intermediate_size;
        let gated_mlp = |h: &Tensor| -> Result<Tensor, ModelError> {
            let gate = linear::linear(w, &format!("{mlp}gate_proj"), h, inter, Layout::Linear)?;
            let up = linear::linear(w, &format!("{mlp}up_proj"), h, inter, Layout::Linear)?;
            let act = self.activation.gated(&gate, &up)?;
            linear::linear(w, &format!("{mlp}down_proj"), &act, hidden, Layout::Linear)
        };
        if self.sandwich_norms {
            // Gemma 2/3: `post_attention_layernorm` normalises the attention output itself.
            let x = ops::add(x, &self.norm(w, &ln_post_attn, &a, hidden)?)?;
            let m = gated_mlp(&self.norm(w, &ln_pre_ff, &x, hidden)?)?;
            ops::add(&x, &self.norm(w, &ln_post_ff, &m, hidden)?)
        } else {
            // Gemma 1: Llama's pre-norm, `post_attention_layernorm` feeding the MLP.
            let x = ops::add(x, &a)?;
            let m = gated_mlp(&self.norm(w, &ln_post_attn, &x, hidden)?)?;
            ops::add(&x, &m)
        }
    }

    pub(crate) fn head(&self, w: &dyn WeightProvider, x: &Tensor) -> Result<Tensor, ModelError> {
        let (_t, hidden) = x.dims2()?;
        let h = self.norm(w, &self.norm, x, hidden)?;
        let matrix = if self.tied && !w.has(&self.head) {
            &self.embed
        } else {
            &self.head
        };
        let logits = linear::head(w, matrix, &self.head, &h)?;
        match self.final_softcap {
            Some(cap) => ops::soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }
}

/// Sliding windows per layer: an explicit `layer_types` list (transformers 5.x writes it) wins;
/// otherwise Gemma 2 slides every even layer (`(i + 1) % 2`), Gemma 3 every layer but each
/// `sliding_window_pattern`-th (default 6), Gemma 1 none.
fn windows(
    text: &Value,
    generation: GemmaGeneration,
    layers: usize,
) -> Result<Vec<Option<usize>>, Unsupported> {
    if generation == GemmaGeneration::One {
        return Ok(vec![None; layers]);
    }
    let window = match text.get("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|w| *w > 0)
                .ok_or_else(|| Unsupported::new("`sliding_window` is not a positive integer"))?
                as usize,
        ),
    };
    let sliding: Vec<bool> = match text.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            if types.len() != layers {
                return Err(Unsupported::new(format!(
                    "`layer_types` lists {} layers, the model has {layers}",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    other => Err(Unsupported::new(format!(
                        "layer type {other:?} is not implemented"
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
        None => {
            let pattern = match generation {
                GemmaGeneration::Three => text
                    .get("sliding_window_pattern")
                    .and_then(Value::as_u64)
                    .filter(|p| *p > 0)
                    .unwrap_or(6) as usize,
                _ => 2,
            };
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    sliding
        .into_iter()
        .map(|slides| match (slides, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => Err(Unsupported::new(
                "`sliding_attention` layers without a `sliding_window`",
            )),
        })
        .collect()
}

/// The global rotary embedding and, for Gemma 3, the local one. transformers 5.x nests one
/// `rope_parameters` dict per layer type; older Gemma 3 configs give `rope_theta` (+ `rope_scaling`)
/// for global layers and `rope_local_base_freq` for local ones (class defaults 1e6 and 1e4).
fn ropes(
    config: &ModelConfig,
    text: &Value,
    generation: GemmaGeneration,
    head_dim: usize,
) -> Result<(Rope, Option<Rope>), Unsupported> {
    if generation != GemmaGeneration::Three {
        return Ok((Rope::from_config(config, head_dim, 1.0)?, None));
    }
    let nested = |layer_type: &str| {
        text.get("rope_parameters")
            .and_then(|p| p.get(layer_type))
            .filter(|p| p.is_object())
    };
    let theta_in = |params: Option<&Value>| params.and_then(|p| p.get("rope_theta")?.as_f64());
    let top = |key: &str| text.get(key).and_then(Value::as_f64);
    let global_params =
        nested("full_attention").or_else(|| text.get("rope_scaling").filter(|p| p.is_object()));
    let global_theta = theta_in(global_params)
        .or_else(|| top("rope_theta"))
        .unwrap_or(1_000_000.0);
    let local_params = nested("sliding_attention");
    let local_theta = theta_in(local_params)
        .or_else(|| top("rope_local_base_freq"))
        .unwrap_or(10_000.0);
    Ok((
        Rope::from_params(config, global_params, global_theta, head_dim, 1.0)?,
        Some(Rope::from_params(
            config,
            local_params,
            local_theta,
            head_dim,
            1.0,
        )?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(raw: Value) -> Result<GemmaConfig, Unsupported> {
        let config = ModelConfig::from_value(raw);
        let generation =
            GemmaGeneration::from_model_type(config.model_type.as_deref().unwrap_or(""))
                .expect("a Gemma model type");
        GemmaConfig::from_config(&config, generation, &|n| n == "model.embed_tokens.weight")
    }

    fn dims(model_type: &str) -> Value {
        json!({"model_type": model_type, "hidden_size": 48, "intermediate_size": 96,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 16})
    }

    fn with(mut base: Value, extra: Value) -> Value {
        for (k, v) in extra.as_object().expect("object") {
            base[k] = v.clone();
        }
        base
    }

    /// Configs written before transformers 5 have no `layer_types`: Gemma 2 slides the even
    /// layers, Gemma 3 all but every sixth (or `sliding_window_pattern`-th); the class defaults
    /// of absent keys apply (Gemma 2's soft-caps 50 and 30, window 4096, scalar 256).
    #[test]
    fn older_configs_get_the_class_rules_and_defaults() {
        let g2 = parse(dims("gemma2")).expect("gemma2");
        let w = Some(4096);
        assert_eq!(g2.windows, vec![w, None, w, None, w, None]);
        assert_eq!(
            (g2.attn_softcap, g2.final_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(g2.attn_scale, 1.0 / 16.0);
        assert!(g2.sandwich_norms && !g2.qk_norm && g2.tied);
        assert_eq!(g2.embed_scale, 48f64.sqrt() as f32);

        let g3 = parse(with(
            dims("gemma3_text"),
            json!({"sliding_window": 8, "sliding_window_pattern": 3, "rope_theta": 1e6,
                   "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        ))
        .expect("gemma3");
        assert_eq!(
            g3.windows,
            vec![Some(8), Some(8), None, Some(8), Some(8), None]
        );
        assert_eq!((g3.attn_softcap, g3.final_softcap), (None, None));
        let local = g3.local_rope.as_ref().expect("local rope");
        let want = 1.0 / 1e4f64.powf(2.0 / 16.0);
        assert!((f64::from(local.inv_freq()[1]) / want - 1.0).abs() < 1e-6);
        let global = Rope::new(1e6, 16, &super::super::RopeScaling::Linear { factor: 8.0 });
        assert_eq!(g3.rope.inv_freq(), global.inv_freq());

        let g1 = parse(with(dims("gemma"), json!({"hidden_act": "gelu"}))).expect("gemma");
        assert_eq!(g1.windows, vec![None; 6]);
        assert_eq!(g1.activation, Activation::GeluErf);
        assert!(!g1.sandwich_norms);
        assert_eq!(g1.attn_scale, 0.25);
    }

    #[test]
    fn null_caps_turn_capping_off_and_unsupported_variants_say_why() {
        let g2 = parse(with(
            dims("gemma2"),
            json!({"attn_logit_softcapping": null, "final_logit_softcapping": null}),
        ))
        .expect("gemma2");
        assert_eq!((g2.attn_softcap, g2.final_softcap), (None, None));
        let err = parse(with(
            dims("gemma3_text"),
            json!({"use_bidirectional_attention": true}),
        ))
        .expect_err("encoder-style Gemma");
        assert!(err.reason.contains("bidirectional"), "{}", err.reason);
        let err = parse(with(
            dims("gemma2"),
            json!({"layer_types": ["full_attention"]}),
        ))
        .expect_err("one type for six layers");
        assert!(err.reason.contains("layer_types"), "{}", err.reason);
        let err = parse(with(
            dims("gemma2"),
            json!({"attn_logit_softcapping": -1.0}),
        ))
        .expect_err("negative cap");
        assert!(
            err.reason.contains("attn_logit_softcapping"),
            "{}",
            err.reason
        );
    }

    /// The multimodal Gemma 3 keeps the language model under a nested prefix.
    #[test]
    fn multimodal_gemma3_finds_its_language_model() {
        let config = ModelConfig::from_value(json!({
            "model_type": "gemma3",
            "text_config": with(dims("gemma3_text"), json!({"sliding_window": 8}))
        }));
        let has = |n: &str| n == "model.language_model.embed_tokens.weight";
        let c = GemmaConfig::from_config(&config, GemmaGeneration::Three, &has).expect("gemma3");
        assert_eq!(c.prefix, "model.language_model.");
        assert_eq!(c.norm, "model.language_model.norm.weight");
        assert!(c.tied);
    }
}
