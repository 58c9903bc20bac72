//! GPT-2 as transformers runs it: learned absolute positions, pre-norm blocks with LayerNorm, Conv1D
//! projections (weights stored `[in, out]`) with q, k and v fused along the output dimension of
//! `c_attn`, `gelu_new` by default, and the head tied to `wte`.

use candle_core::Tensor;
use serde_json::Value;

use super::cache::LayerCache;
use super::linear::{self, load};
use super::ops::{self, Activation};
use super::{Layout, ModelError, Unsupported, WeightProvider, find_prefix, required, text_config};
use crate::io::config::ModelConfig;

/// Hyper-parameters and tensor names of one GPT-2 checkpoint.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    /// `transformer.` for `GPT2LMHeadModel` checkpoints, empty for the original OpenAI names.
    pub prefix: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub max_positions: usize,
    pub tied: bool,
    pub embed: String,
    pub positions: String,
    pub head: String,
    pub norm: String,
}

impl Gpt2Config {
    pub(crate) fn from_config(
        config: &ModelConfig,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self, Unsupported> {
        let text = text_config(config);
        let flag =
            |key: &str, default: bool| text.get(key).and_then(Value::as_bool).unwrap_or(default);
        let hidden_size = required(config.hidden_size, "n_embd")?;
        let num_heads = required(config.num_attention_heads, "n_head")?;
        if hidden_size % num_heads != 0 {
            return Err(Unsupported::new(format!(
                "n_embd {hidden_size} is not a multiple of n_head {num_heads}"
            )));
        }
        let activation = Activation::from_name(
            text.get("activation_function")
                .and_then(Value::as_str)
                .unwrap_or("gelu_new"),
        )?;
        let prefix = find_prefix(&["transformer.", ""], "wte.weight", has)?;
        let head = "lm_head.weight".to_string();
        Ok(Gpt2Config {
            hidden_size,
            intermediate_size: config.intermediate_size.unwrap_or(4 * hidden_size),
            num_layers: required(config.num_hidden_layers, "n_layer")?,
            num_heads,
            head_dim: hidden_size / num_heads,
            layer_norm_eps: config.rms_norm_eps.unwrap_or(1e-5),
            activation,
            scale_attn_weights: flag("scale_attn_weights", true),
            scale_attn_by_inverse_layer_idx: flag("scale_attn_by_inverse_layer_idx", false),
            max_positions: required(config.max_position_embeddings, "n_positions")?,
            tied: config.tie_word_embeddings || !has(&head),
            embed: format!("{prefix}wte.weight"),
            positions: format!("{prefix}wpe.weight"),
            norm: format!("{prefix}ln_f"),
            head,
            prefix,
        })
    }

    fn layer(&self, i: usize) -> String {
        format!("{}h.{i}.", self.prefix)
    }

    pub(crate) fn block_tensors(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        [
            "ln_1",
            "attn.c_attn",
            "attn.c_proj",
            "ln_2",
            "mlp.c_fc",
            "mlp.c_proj",
        ]
        .iter()
        .flat_map(|m| [format!("{p}{m}.weight"), format!("{p}{m}.bias")])
        .collect()
    }

    pub(crate) fn head_tensors(&self) -> Vec<String> {
        let matrix = if self.tied { &self.embed } else { &self.head };
        vec![
            format!("{}.weight", self.norm),
            format!("{}.bias", self.norm),
            matrix.clone(),
        ]
    }

    /// Word embeddings plus the learned positions `start..start + T`.
    pub(crate) fn embed_at(
        &self,
        w: &dyn WeightProvider,
        tokens: &[u32],
        start: usize,
    ) -> Result<Tensor, ModelError> {
        let end = start + tokens.len();
        if end > self.max_positions {
            return Err(ModelError::TooLong {
                tokens: end,
                max: self.max_positions,
                tensor: self.positions.clone(),
            });
        }
        let words = linear::embedding(w, &self.embed, tokens, self.hidden_size)?;
        let positions: Vec<u32> = (start as u32..end as u32).collect();
        let places = linear::embedding(w, &self.positions, &positions, self.hidden_size)?;
        Ok((words + places)?)
    }

    fn layer_norm(
        &self,
        w: &dyn WeightProvider,
        module: &str,
        x: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let h = self.hidden_size;
        let weight = load(w, &format!("{module}.weight"), &[h])?;
        let bias = load(w, &format!("{module}.bias"), &[h])?;
        ops::layer_norm(x, &weight, &bias, self.layer_norm_eps)
    }

    /// Block `i` on new positions `x` `[T, hidden]` following the ones whose keys and values are in
    /// `cache` (GPT-2's positions are in the embedding, so the block needs no offset), appending
    /// its own.
    pub(crate) fn block_step(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        x: &Tensor,
        cache: &mut LayerCache,
    ) -> Result<Tensor, ModelError> {
        let p = self.layer(i);
        let (_t, hidden) = x.dims2()?;
        let (heads, dh) = (self.num_heads, self.head_dim);

        let h = self.layer_norm(w, &format!("{p}ln_1"), x)?;
        let qkv = linear::linear(
            w,
            &format!("{p}attn.c_attn"),
            &h,
            3 * hidden,
            Layout::Conv1d,
        )?;
        let q = ops::split_heads(&qkv.narrow(1, 0, hidden)?, heads, dh)?;
        let k = ops::split_heads(&qkv.narrow(1, hidden, hidden)?, heads, dh)?;
        let v = ops::split_heads(&qkv.narrow(1, 2 * hidden, hidden)?, heads, dh)?;
        let (k, v) = cache.append(k, v)?;
        // transformers folds both factors into one scalar before multiplying.
        let mut scale = if self.scale_attn_weights {
            1.0 / (dh as f64).sqrt()
        } else {
            1.0
        };
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        let a = ops::attention(&q, &k, &v, scale, None)?;
        let a = linear::linear(w, &format!("{p}attn.c_proj"), &a, hidden, Layout::Conv1d)?;
        let x = ops::add(&a, x)?;

        let h = self.layer_norm(w, &format!("{p}ln_2"), &x)?;
        let up = linear::linear(
            w,
            &format!("{p}mlp.c_fc"),
            &h,
            self.intermediate_size,
            Layout::Conv1d,
        )?;
        let act = self.activation.apply(&up)?;
        let down = linear::linear(w, &format!("{p}mlp.c_proj"), &act, hidden, Layout::Conv1d)?;
        ops::add(&x, &down)
    }

    pub(crate) fn head(&self, w: &dyn WeightProvider, x: &Tensor) -> Result<Tensor, ModelError> {
        let h = self.layer_norm(w, &self.norm, x)?;
        let matrix = if self.tied && !w.has(&self.head) {
            &self.embed
        } else {
            &self.head
        };
        linear::head(w, matrix, &self.head, &h)
    }
}
