//! The Llama family as transformers runs it: llama (and SmolLM), mistral, qwen2 (q/k/v biases),
//! qwen3 (per-head RMSNorm on q and k before rope), and the mixture-of-experts models built on the
//! same attention: mixtral (mistral's), qwen2_moe (qwen2's, `qkv_bias`) and qwen3_moe (qwen3's).
//! Pre-norm blocks with RMSNorm, grouped-query attention with rotary embeddings (rotate-half
//! convention, optional `linear`/`llama3` scaling), optional sliding windows, and a gated MLP
//! `down(act(gate(x)) ⊙ up(x))` — or, on a sparse layer, the experts of [`super::moe`].

use candle_core::Tensor;
use serde_json::Value;

use super::linear::{self, load};
use super::moe::{MoeConfig, Routing};
use super::ops::{self, Activation};
use super::rope::Rope;
use super::{
    Layout, ModelError, Positions, Unsupported, WeightProvider, bounded, find_prefix, required,
    text_config,
};
use crate::io::config::ModelConfig;

/// Hyper-parameters and tensor names of one Llama-family checkpoint.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_type: String,
    /// Prefix of the decoder's tensors: `model.` for `*ForCausalLM` checkpoints, empty for a bare
    /// backbone.
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
    /// Sliding-window length per layer (`None`: full causal attention).
    pub windows: Vec<Option<usize>>,
    /// Biases the config declares (for `block_tensors`; the forward adds any bias the provider has).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's `q_norm` / `k_norm`.
    pub qk_norm: bool,
    /// The head is the input embedding (`tie_word_embeddings`, or no `lm_head.weight` stored).
    pub tied: bool,
    pub embed: String,
    pub head: String,
    pub norm: String,
    /// The sparse MLP of mixture-of-experts models (`None`: every layer is dense).
    pub moe: Option<MoeConfig>,
}

impl LlamaConfig {
    pub(crate) fn from_config(
        config: &ModelConfig,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self, Unsupported> {
        let text = text_config(config);
        let model_type = config.model_type.clone().unwrap_or_default();
        let flag = |key: &str| text.get(key).and_then(Value::as_bool);
        let hidden_size = required(config.hidden_size, "hidden_size")?;
        let num_heads = required(config.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = config.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Unsupported::new(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads"
            )));
        }
        // Qwen3Config defaults head_dim to 128; the others (Qwen3MoeConfig too) derive it from the
        // hidden size.
        let head_dim = match (config.head_dim, model_type.as_str()) {
            (Some(d), _) if d > 0 => bounded(d, "head_dim")?,
            (_, "qwen3") => 128,
            _ => hidden_size / num_heads,
        };
        let num_layers = required(config.num_hidden_layers, "num_hidden_layers")?;
        let activation = Activation::from_name(
            text.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu"),
        )?;
        let prefix = find_prefix(&["model.", ""], "embed_tokens.weight", has)?;
        let head = "lm_head.weight".to_string();
        let attention_bias = flag("attention_bias").unwrap_or(false);
        let moe = MoeConfig::from_config(config, &prefix, has)?;
        Ok(LlamaConfig {
            // Qwen2MoeConfig spells the q/k/v biases `qkv_bias` (default true).
            qkv_bias: match model_type.as_str() {
                "qwen2" => true,
                "qwen2_moe" => flag("qkv_bias").unwrap_or(true),
                _ => attention_bias,
            },
            o_bias: attention_bias && !matches!(model_type.as_str(), "qwen2" | "qwen2_moe"),
            mlp_bias: flag("mlp_bias").unwrap_or(false),
            qk_norm: matches!(model_type.as_str(), "qwen3" | "qwen3_moe"),
            moe,
            windows: windows(text, &model_type, num_layers)?,
            rope: Rope::from_config(config, head_dim, 1.0)?,
            activation,
            hidden_size,
            intermediate_size: required(config.intermediate_size, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config.rms_norm_eps.unwrap_or(1e-6),
            tied: config.tie_word_embeddings || !has(&head),
            embed: format!("{prefix}embed_tokens.weight"),
            norm: format!("{prefix}norm.weight"),
            head,
            prefix,
            model_type,
        })
    }

    fn layer(&self, i: usize) -> String {
        format!("{}layers.{i}.", self.prefix)
    }

    pub(crate) fn block_tensors(&self, i: usize) -> Vec<String> {
        let p = self.layer(i);
        let mut names = vec![
            format!("{p}input_layernorm.weight"),
            format!("{p}post_attention_layernorm.weight"),
        ];
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("{p}self_attn.{proj}.weight"));
            let bias = if proj == "o_proj" {
                self.o_bias
            } else {
                self.qkv_bias
            };
            if bias {
                names.push(format!("{p}self_attn.{proj}.bias"));
            }
        }
        if self.qk_norm {
            names.push(format!("{p}self_attn.q_norm.weight"));
            names.push(format!("{p}self_attn.k_norm.weight"));
        }
        match self.sparse_moe(i) {
            Some(moe) => names.extend(moe.tensors(&p)),
            None => {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    names.push(format!("{p}mlp.{proj}.weight"));
                    if self.mlp_bias {
                        names.push(format!("{p}mlp.{proj}.bias"));
                    }
                }
            }
        }
        names
    }

    /// The MoE configuration when layer `i` is sparse.
    fn sparse_moe(&self, i: usize) -> Option<&MoeConfig> {
        self.moe
            .as_ref()
            .filter(|m| m.sparse.get(i).copied().unwrap_or(false))
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
    /// keys and values in `cache` (positions `0..start`) and appending its own. On a sparse MoE
    /// layer the router's decisions come back beside the output.
    pub(crate) fn block_step(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        x: &Tensor,
        positions: Positions<'_>,
    ) -> Result<(Tensor, Option<Routing>), ModelError> {
        let p = self.layer(i);
        let (t, hidden) = x.dims2()?;
        let (heads, kv_heads, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let eps = self.rms_norm_eps;

        let ln1 = load(w, &format!("{p}input_layernorm.weight"), &[hidden])?;
        let h = ops::rms_norm(x, &ln1, eps)?;
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
            let qn = load(w, &format!("{attn}q_norm.weight"), &[dh])?;
            let kn = load(w, &format!("{attn}k_norm.weight"), &[dh])?;
            (
                ops::rms_norm(&q.reshape((t * heads, dh))?, &qn, eps)?.reshape((t, heads * dh))?,
                ops::rms_norm(&k.reshape((t * kv_heads, dh))?, &kn, eps)?
                    .reshape((t, kv_heads * dh))?,
            )
        } else {
            (q, k)
        };
        let tables = match &positions {
            Positions::Cached { start, .. } => self.rope.tables_at(*start, t)?,
            Positions::Segments(lengths) => self.rope.tables_for_segments(lengths)?,
        };
        let q = self.rope.apply(&q, heads, dh, &tables)?;
        let k = self.rope.apply(&k, kv_heads, dh, &tables)?;
        let v = ops::split_heads(&v, kv_heads, dh)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let a = match positions {
            Positions::Cached { cache, .. } => {
                let (k, v) = cache.append(k, v)?;
                ops::attention(&q, &k, &v, scale, self.windows[i])?
            }
            Positions::Segments(lengths) => {
                ops::attention_segments(&q, &k, &v, scale, self.windows[i], lengths)?
            }
        };
        let a = linear::linear(w, &format!("{attn}o_proj"), &a, hidden, Layout::Linear)?;
        let x = ops::add(x, &a)?;

        let ln2 = load(w, &format!("{p}post_attention_layernorm.weight"), &[hidden])?;
        let h = ops::rms_norm(&x, &ln2, eps)?;
        if let Some(moe) = self.sparse_moe(i) {
            let (y, routing) = moe.forward(w, &p, &h, self.activation)?;
            return Ok((ops::add(&x, &y)?, Some(routing)));
        }
        let mlp = format!("{p}mlp.");
        let inter = self.intermediate_size;
        let gate = linear::linear(w, &format!("{mlp}gate_proj"), &h, inter, Layout::Linear)?;
        let up = linear::linear(w, &format!("{mlp}up_proj"), &h, inter, Layout::Linear)?;
        let act = self.activation.gated(&gate, &up)?;
        let down = linear::linear(w, &format!("{mlp}down_proj"), &act, hidden, Layout::Linear)?;
        Ok((ops::add(&x, &down)?, None))
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

/// Sliding windows per layer, as transformers derives them: an explicit `layer_types` list wins;
/// mistral slides every layer when `sliding_window` is set (class default 4096); qwen2/qwen3 slide
/// layers `>= max_window_layers` (default 28) only with `use_sliding_window`.
fn windows(
    text: &Value,
    model_type: &str,
    layers: usize,
) -> Result<Vec<Option<usize>>, Unsupported> {
    let enabled = text
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let window = match text.get("sliding_window") {
        Some(Value::Null) => None,
        // Qwen2MoeConfig writes 0 when `use_sliding_window` is off.
        Some(v) if v.as_u64() == Some(0) && !enabled => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|w| *w > 0)
                .ok_or_else(|| Unsupported::new("`sliding_window` is not a positive integer"))?
                as usize,
        ),
        None if model_type == "mistral" => Some(4096),
        None => None,
    };
    if let Some(types) = text.get("layer_types").and_then(Value::as_array) {
        if types.len() != layers {
            return Err(Unsupported::new(format!(
                "`layer_types` lists {} layers, the model has {layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    Unsupported::new("`sliding_attention` layers without a `sliding_window`")
                }),
                other => Err(Unsupported::new(format!(
                    "layer type {other:?} is not implemented"
                ))),
            })
            .collect();
    }
    let per_layer = |i: usize| match model_type {
        // MixtralConfig defaults `sliding_window` to None (above), mistral to 4096.
        "mistral" | "mixtral" => window,
        "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" => {
            let from = text
                .get("max_window_layers")
                .and_then(Value::as_u64)
                .unwrap_or(28) as usize;
            window.filter(|_| enabled && i >= from)
        }
        _ => None,
    };
    Ok((0..layers).map(per_layer).collect())
}
