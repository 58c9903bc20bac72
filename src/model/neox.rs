//! GPT-NeoX (Pythia) as transformers runs it: LayerNorm, a fused `query_key_value` projection laid out
//! per head as `[heads, 3, head_dim]` (transformers views the output as `(…, heads, 3·head_dim)` and
//! splits the last axis), rotary embeddings on the first `rotary_pct` of each head, parallel
//! (`x + attn(ln1(x)) + mlp(ln2(x))`) or sequential residuals, exact-erf GELU, untied `embed_out`.

use candle_core::Tensor;
use serde_json::Value;

use super::cache::LayerCache;
use super::linear::{self, load};
use super::ops::{self, Activation};
use super::rope::Rope;
use super::{Layout, ModelError, Unsupported, WeightProvider, find_prefix, required, text_config};
use crate::io::config::ModelConfig;

/// transformers' GPTNeoXConfig default for the rotated share of each head.
const DEFAULT_ROTARY_PCT: f64 = 0.25;

/// Hyper-parameters and tensor names of one GPT-NeoX checkpoint.
#[derive(Debug, Clone)]
pub struct NeoXConfig {
    /// `gpt_neox.` for `GPTNeoXForCausalLM` checkpoints.
    pub prefix: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub layer_norm_eps: f64,
    pub rope: Rope,
    pub activation: Activation,
    pub parallel_residual: bool,
    pub attention_bias: bool,
    pub tied: bool,
    pub embed: String,
    pub head: String,
    pub norm: String,
}

impl NeoXConfig {
    pub(crate) fn from_config(
        config: &ModelConfig,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self, Unsupported> {
        let text = text_config(config);
        let flag =
            |key: &str, default: bool| text.get(key).and_then(Value::as_bool).unwrap_or(default);
        let hidden_size = required(config.hidden_size, "hidden_size")?;
        let num_heads = required(config.num_attention_heads, "num_attention_heads")?;
        if hidden_size % num_heads != 0 {
            return Err(Unsupported::new(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            )));
        }
        let head_dim = hidden_size / num_heads;
        let activation = Activation::from_name(
            text.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("gelu"),
        )?;
        let prefix = find_prefix(&["gpt_neox.", ""], "embed_in.weight", has)?;
        // transformers v5 loads `embed_out` as `lm_head`; a checkpoint may carry either name.
        let head = ["embed_out.weight", "lm_head.weight"]
            .into_iter()
            .find(|n| has(n))
            .unwrap_or("embed_out.weight")
            .to_string();
        Ok(NeoXConfig {
            hidden_size,
            intermediate_size: required(config.intermediate_size, "intermediate_size")?,
            num_layers: required(config.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            head_dim,
            layer_norm_eps: config.rms_norm_eps.unwrap_or(1e-5),
            rope: Rope::from_config(config, head_dim, DEFAULT_ROTARY_PCT)?,
            activation,
            parallel_residual: flag("use_parallel_residual", true),
            attention_bias: flag("attention_bias", true),
            tied: config.tie_word_embeddings || !has(&head),
            embed: format!("{prefix}embed_in.weight"),
            norm: format!("{prefix}final_layer_norm"),
            head,
            prefix,
        })
    }

    fn layer(&self, i: usize) -> String {
        format!("{}layers.{i}.", self.prefix)
    }

    pub(crate) fn block_tensors(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        let mut names = Vec::new();
        for m in ["input_layernorm", "post_attention_layernorm"] {
            names.push(format!("{p}{m}.weight"));
            names.push(format!("{p}{m}.bias"));
        }
        for m in ["attention.query_key_value", "attention.dense"] {
            names.push(format!("{p}{m}.weight"));
            if self.attention_bias {
                names.push(format!("{p}{m}.bias"));
            }
        }
        for m in ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"] {
            names.push(format!("{p}{m}.weight"));
            names.push(format!("{p}{m}.bias"));
        }
        names
    }

    pub(crate) fn head_tensors(&self) -> Vec<String> {
        let matrix = if self.tied { &self.embed } else { &self.head };
        vec![
            format!("{}.weight", self.norm),
            format!("{}.bias", self.norm),
            matrix.clone(),
        ]
    }

    pub(crate) fn embed(
        &self,
        w: &dyn WeightProvider,
        tokens: &[u32],
    ) -> Result<Tensor, ModelError> {
        linear::embedding(w, &self.embed, tokens, self.hidden_size)
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

    fn mlp(&self, w: &dyn WeightProvider, p: &str, h: &Tensor) -> Result<Tensor, ModelError> {
        let up = linear::linear(
            w,
            &format!("{p}mlp.dense_h_to_4h"),
            h,
            self.intermediate_size,
            Layout::Linear,
        )?;
        let act = self.activation.apply(&up)?;
        linear::linear(
            w,
            &format!("{p}mlp.dense_4h_to_h"),
            &act,
            self.hidden_size,
            Layout::Linear,
        )
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
        let (heads, dh) = (self.num_heads, self.head_dim);

        let h = self.layer_norm(w, &format!("{p}input_layernorm"), x)?;
        let qkv = linear::linear(
            w,
            &format!("{p}attention.query_key_value"),
            &h,
            3 * hidden,
            Layout::Linear,
        )?;
        // [T, 3·hidden] viewed as [T, heads, 3·head_dim]: q, k, v interleaved per head.
        let qkv = qkv.reshape((t, heads, 3 * dh))?;
        let part = |j: usize| qkv.narrow(2, j * dh, dh)?.reshape((t, hidden));
        let tables = self.rope.tables_at(start, t)?;
        let q = self.rope.apply(&part(0)?, heads, dh, &tables)?;
        let k = self.rope.apply(&part(1)?, heads, dh, &tables)?;
        let v = ops::split_heads(&part(2)?, heads, dh)?;
        let (k, v) = cache.append(k, v)?;
        let a = ops::attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), None)?;
        let a = linear::linear(
            w,
            &format!("{p}attention.dense"),
            &a,
            hidden,
            Layout::Linear,
        )?;

        let ln2 = format!("{p}post_attention_layernorm");
        if self.parallel_residual {
            let m = self.mlp(w, &p, &self.layer_norm(w, &ln2, x)?)?;
            ops::add(&ops::add(&m, &a)?, x)
        } else {
            let a = ops::add(&a, x)?;
            let m = self.mlp(w, &p, &self.layer_norm(w, &ln2, &a)?)?;
            ops::add(&m, &a)
        }
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
