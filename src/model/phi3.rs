//! Phi-3 (and Phi-3.5 / Phi-4-mini, which share `model_type` `phi3`) as transformers 5.x runs it
//! (`modeling_phi3.py`): Llama's pre-norm block with two fused projections, each an ordinary linear
//! layer for the merge and for LoRA (PEFT targets `qkv_proj` and `gate_up_proj` as wholes):
//!
//! * `self_attn.qkv_proj` `[H·Dh + 2·KV·Dh, hidden]`: the query rows, then the key rows, then the value
//!   rows (transformers slices the output at `H·Dh` and `H·Dh + KV·Dh`);
//! * `mlp.gate_up_proj` `[2·I, hidden]`: the gate rows first, then the up rows (`chunk(2)`), and the MLP
//!   is `down(up ⊙ act(gate))`.
//!
//! Rotary embeddings may use LongRoPE (`rope_scaling.type` `longrope` / `su`, see `rope.rs`) and a
//! partial rotary factor; a `sliding_window` applies to every layer.

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

/// Hyper-parameters and tensor names of one Phi-3 checkpoint.
#[derive(Debug, Clone)]
pub struct Phi3Config {
    /// `model.` for `Phi3ForCausalLM` checkpoints, empty for a bare backbone.
    pub prefix: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub activation: Activation,
    /// `sliding_window`, applied to every layer when set.
    pub window: Option<usize>,
    pub tied: bool,
    pub embed: String,
    pub head: String,
    pub norm: String,
}

impl Phi3Config {
    pub(crate) fn from_config(
        config: &ModelConfig,
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
        let head_dim = match config.head_dim {
            Some(d) if d > 0 => bounded(d, "head_dim")?,
            _ => hidden_size / num_heads,
        };
        let window = match text.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|w| *w > 0)
                    .ok_or_else(|| Unsupported::new("`sliding_window` is not a positive integer"))?
                    as usize,
            ),
        };
        let activation = Activation::from_name(
            text.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu"),
        )?;
        let prefix = find_prefix(&["model.", ""], "embed_tokens.weight", has)?;
        let head = "lm_head.weight".to_string();
        Ok(Phi3Config {
            hidden_size,
            intermediate_size: required(config.intermediate_size, "intermediate_size")?,
            num_layers: required(config.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config.rms_norm_eps.unwrap_or(1e-5),
            rope: Rope::from_config(config, head_dim, 1.0)?,
            activation,
            window,
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

    pub(crate) fn block_tensors(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        ]
        .iter()
        .map(|m| format!("{p}{m}.weight"))
        .collect()
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
        linear::embedding(w, &self.embed, tokens, self.hidden_size)
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
        let eps = self.rms_norm_eps;

        let ln1 = load(w, &format!("{p}input_layernorm.weight"), &[hidden])?;
        let h = ops::rms_norm(x, &ln1, eps)?;
        let (q_width, kv_width) = (heads * dh, kv_heads * dh);
        let qkv = linear::linear(
            w,
            &format!("{p}self_attn.qkv_proj"),
            &h,
            q_width + 2 * kv_width,
            Layout::Linear,
        )?;
        let q = qkv.narrow(1, 0, q_width)?;
        let k = qkv.narrow(1, q_width, kv_width)?;
        let v = qkv.narrow(1, q_width + kv_width, kv_width)?;
        let tables = self.rope.tables_at(start, t)?;
        let q = self.rope.apply(&q, heads, dh, &tables)?;
        let k = self.rope.apply(&k, kv_heads, dh, &tables)?;
        let v = ops::split_heads(&v, kv_heads, dh)?;
        let (k, v) = cache.append(k, v)?;
        let a = ops::attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), self.window)?;
        let a = linear::linear(
            w,
            &format!("{p}self_attn.o_proj"),
            &a,
            hidden,
            Layout::Linear,
        )?;
        let x = ops::add(x, &a)?;

        let ln2 = load(w, &format!("{p}post_attention_layernorm.weight"), &[hidden])?;
        let h = ops::rms_norm(&x, &ln2, eps)?;
        let inter = self.intermediate_size;
        let gate_up = linear::linear(
            w,
            &format!("{p}mlp.gate_up_proj"),
            &h,
            2 * inter,
            Layout::Linear,
        )?;
        let gate = gate_up.narrow(1, 0, inter)?;
        let up = gate_up.narrow(1, inter, inter)?;
        let act = self.activation.gated(&gate, &up)?;
        let down = linear::linear(
            w,
            &format!("{p}mlp.down_proj"),
            &act,
            hidden,
            Layout::Linear,
        )?;
        ops::add(&x, &down)
    }

    pub(crate) fn head(&self, w: &dyn WeightProvider, x: &Tensor) -> Result<Tensor, ModelError> {
        let (_t, hidden) = x.dims2()?;
        let norm = load(w, &self.norm, &[hidden])?;
        let h = ops::rms_norm(x, &norm, self.rms_norm_eps)?;
        let matrix = if self.tied && !w.has(&self.head) {
            &self.embed
        } else {
            &self.head
        };
        linear::head(w, matrix, &self.head, &h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn phi3_defaults_and_window() {
        let config = ModelConfig::from_value(json!({
            "model_type": "phi3", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "sliding_window": 2047
        }));
        let has = |n: &str| n == "model.embed_tokens.weight" || n == "lm_head.weight";
        let c = Phi3Config::from_config(&config, &has).expect("phi3");
        assert_eq!((c.num_kv_heads, c.head_dim, c.window), (4, 16, Some(2047)));
        assert_eq!(c.activation, Activation::Silu);
        assert!(!c.tied, "Phi-3 defaults to an untied head");
        assert!(
            c.block_tensors(1)
                .contains(&"model.layers.1.self_attn.qkv_proj.weight".into())
        );
        assert!(
            c.block_tensors(0)
                .contains(&"model.layers.0.mlp.gate_up_proj.weight".into())
        );
    }
}
