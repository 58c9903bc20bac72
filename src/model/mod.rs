//! The decoder forward pass on candle-core, layer-streamed: every model under test (the unmerged
//! reference, each merged candidate, the base alone) advances **block by block together**, and a
//! block's f32 weights exist only while that block runs (design.md, "Forward").
//!
//! Weights come from a [`WeightProvider`], which decides what a tensor *is* for its model: the stored
//! base, the base plus unmerged LoRA terms ([`UnmergedLora`], applied in the forward the way PEFT does),
//! or a merged weight rounded or quantized on the fly. The decoder itself only knows transformers'
//! architectures ([`Architecture`]): the Llama family (llama, mistral, qwen2, qwen3, and the
//! mixture-of-experts mixtral, qwen2_moe, qwen3_moe), Gemma 1/2/3 (text), Phi-3, GPT-2 and
//! GPT-NeoX. Everything computes in f32 on the CPU, one sequence at a time, and returns logits for
//! every position.
//!
//! ```text
//! let arch = Architecture::from_config(&config, &|name| base.contains(name))?;
//! let mut hidden: Vec<Tensor> = models.iter().map(|m| arch.embed(m, &tokens)).collect()?;
//! for i in 0..arch.num_layers() {
//!     for (h, m) in hidden.iter_mut().zip(&models) { *h = arch.block(i, m, h)?; }  // drift here
//! }
//! let logits = arch.head(model, &hidden)?;   // [T, vocab]
//! ```
//!
//! Generation ([`generate_greedy`]) instead runs one model at a time, token by token, over a
//! key/value cache ([`KvCache`], [`Architecture::block_step`]). The check streams each model's
//! weights per step (`forward::generation`); [`MaterializedModel`] (one f32 copy of the model in
//! memory) serves tests and small models that fit.
//! [`sequence_nll`] scores a continuation under a model.

mod cache;
mod gemma;
mod generate;
mod gpt2;
mod linear;
mod llama;
mod moe;
mod neox;
mod ops;
mod phi3;
mod provider;
mod rope;
mod topk;

#[cfg(test)]
mod goldens;

use candle_core::Tensor;
use serde_json::Value;
use thiserror::Error;

use crate::io::config::ModelConfig;
pub use crate::merge::delta::Layout;

pub use cache::{KvCache, LayerCache};
pub use gemma::{GemmaConfig, GemmaGeneration};
pub use generate::{
    MaterializedModel, argmax, continuation_nll, generate_greedy, log_sum_exp, sequence_nll,
};
pub use gpt2::Gpt2Config;
pub use llama::LlamaConfig;
pub use moe::{ExpertLayout, MoeConfig, Routing};
pub use neox::NeoXConfig;
pub use ops::Activation;
pub use phi3::Phi3Config;
pub use provider::CheckpointProvider;
pub(crate) use provider::stored_rows;
pub use rope::{Rope, RopeScaling};

/// Errors while running the forward pass. Each names the tensor and the shape involved.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("tensor `{tensor}` is missing")]
    Missing { tensor: String },
    #[error("tensor `{tensor}` holds {got} values; expected shape {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        got: usize,
    },
    #[error("LoRA on `{tensor}`: {part} holds {got} values; expected shape {expected:?}")]
    LoraShape {
        tensor: String,
        part: &'static str,
        expected: Vec<usize>,
        got: usize,
    },
    #[error("hidden state has shape {got:?}; expected [tokens, {hidden}]")]
    Hidden { got: Vec<usize>, hidden: usize },
    #[error(
        "projection of shape {got:?} does not split into {positions} positions × {heads} heads of {head_dim}"
    )]
    Heads {
        got: Vec<usize>,
        positions: usize,
        heads: usize,
        head_dim: usize,
    },
    #[error("token id {token} at position {position} is outside the vocabulary of {vocab}")]
    Token {
        token: u32,
        position: usize,
        vocab: usize,
    },
    #[error("the token sequence is empty")]
    Empty,
    #[error("{tokens} tokens exceed the {max} learned positions of `{tensor}`")]
    TooLong {
        tokens: usize,
        max: usize,
        tensor: String,
    },
    #[error("block {index} does not exist; the model has {layers}")]
    NoBlock { index: usize, layers: usize },
    #[error("a decoding step starts at position {start} but the cache holds {cached} positions")]
    CachePosition { start: usize, cached: usize },
    #[error("cannot read `{tensor}`: {source}")]
    Read {
        tensor: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Why logits cannot be computed for a model at all: the caller reports "logits skipped: …" and the
/// weight checks still run.
#[derive(Debug, Clone, Error)]
#[error("{reason}")]
pub struct Unsupported {
    pub reason: String,
}

impl Unsupported {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Unsupported {
            reason: reason.into(),
        }
    }
}

/// Supplies f32 weights by base tensor name. The provider decides what a weight is for its model
/// (stored base, merged and rounded, quantized and dequantized, …).
pub trait WeightProvider: Sync {
    /// The tensor's values in the checkpoint's own layout (row-major, as stored).
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError>;
    /// True when the provider can serve `name`. Biases are applied exactly when present; a tied
    /// model's head is `lm_head.weight` when served, else the input embedding.
    fn has(&self, name: &str) -> bool;
    /// LoRA terms to apply *unmerged* on top of `weight(name)`, in adapter order. Empty for merged
    /// candidates. A tied head's terms are asked for under the head's name (`lm_head.weight`).
    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError>;
    /// The weight as an f32 tensor the provider already keeps in memory (any shape holding the
    /// stored values in order), which the forward then reshapes without copying. `None` (the
    /// default) makes the forward call [`weight`](Self::weight), which hands out a fresh copy.
    /// [`MaterializedModel`] serves every weight this way, so a decoding step copies nothing.
    fn shared(&self, _name: &str) -> Option<Tensor> {
        None
    }
    /// The row count of the 2-D weight `name` when [`weight_rows`](Self::weight_rows) builds a
    /// range of its rows without the whole matrix (a head is then computed a block of vocabulary
    /// rows at a time); `None` (the default) when it cannot.
    fn rows_available(&self, _name: &str) -> Option<usize> {
        None
    }
    /// Rows `rows` of the 2-D weight `name`, exactly those rows of [`weight`](Self::weight).
    /// Only called where [`rows_available`](Self::rows_available) answered; the default (for
    /// providers that never do) reports the weight as missing.
    fn weight_rows(
        &self,
        name: &str,
        _rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        Err(ModelError::Missing {
            tensor: name.to_string(),
        })
    }
    /// Called by every linear layer with its input `[T, in]` just before the product with
    /// `name` (`….weight`): a calibration run records it to build H = XᵀX per input. Modules that
    /// share an input (q/k/v, gate/up) are handed the same tensor. The default ignores it.
    fn observe(&self, _name: &str, _input: &Tensor) {}
}

/// A weight's values as a flat f32 tensor, for providers that keep weights in memory and serve
/// them through [`WeightProvider::shared`].
pub fn weight_tensor(data: Vec<f32>, len: usize) -> Result<Tensor, ModelError> {
    ops::tensor(data, &[len])
}

/// One adapter's low-rank term for one weight, exactly as PEFT stores it.
///
/// Linear and Conv1D: A `[r, in]`, B `[out, r]` (Conv1D keeps A and B in this orientation; only the
/// base weight is `[in, out]`). Embedding: A `[r, vocab]`, B `[dim, r]`. The forward adds
/// `s·(x Aᵀ) Bᵀ` (embeddings: `s·A[:, t]ᵀ Bᵀ`). With a DoRA `magnitude` m (one entry per output
/// feature) the layer's output before its bias becomes `(m / n) ⊙ (x W'ᵀ + s·(x Aᵀ) Bᵀ)`, where W' is
/// the weight this adapter was trained on (the base with every earlier adapter of the stack merged)
/// and `n = ‖W' + s·B·A‖` per output feature, in f32 — PEFT's unmerged DoRA forward
/// (merge-semantics.md §2.6), extended to stacks the way `merge::delta::merge_exact` merges them.
#[derive(Debug, Clone)]
pub struct UnmergedLora {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f64,
    pub layout: Layout,
    pub magnitude: Option<Vec<f32>>,
}

/// Where a block step's rows sit: new positions of one sequence after `start` cached ones
/// (generation, or a whole sequence from 0 with an empty cache), or several whole sequences laid
/// end to end (`lengths`), each from position 0, with no cache.
pub(crate) enum Positions<'a> {
    Cached {
        cache: &'a mut LayerCache,
        start: usize,
    },
    Segments(&'a [usize]),
}

/// A decoder architecture with its resolved hyper-parameters and tensor names.
#[derive(Debug, Clone)]
pub enum Architecture {
    Llama(LlamaConfig),
    Gemma(GemmaConfig),
    Phi3(Phi3Config),
    Gpt2(Gpt2Config),
    NeoX(NeoXConfig),
}

/// The `model_type`s with a forward pass, as the unsupported message lists them.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
];

impl Architecture {
    /// Resolves the architecture from `config.json`. `has` answers whether the base checkpoint holds a
    /// tensor, to find the naming prefix (`model.`, `transformer.`, bare GPT-2 names…) and whether the
    /// head is stored. Unknown model types and unimplemented features are `Unsupported`, never a panic.
    pub fn from_config(
        config: &ModelConfig,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self, Unsupported> {
        let model_type = config
            .model_type
            .as_deref()
            .ok_or_else(|| Unsupported::new("config.json has no `model_type`"))?;
        match model_type {
            "llama" | "mistral" | "qwen2" | "qwen3" | "mixtral" | "qwen2_moe" | "qwen3_moe" => {
                LlamaConfig::from_config(config, has).map(Architecture::Llama)
            }
            "phi3" => Phi3Config::from_config(config, has).map(Architecture::Phi3),
            "gpt2" => Gpt2Config::from_config(config, has).map(Architecture::Gpt2),
            "gpt_neox" => NeoXConfig::from_config(config, has).map(Architecture::NeoX),
            other => match GemmaGeneration::from_model_type(other) {
                Some(generation) => {
                    GemmaConfig::from_config(config, generation, has).map(Architecture::Gemma)
                }
                None => Err(Unsupported::new(format!(
                    "architecture `{other}` has no forward pass in lora-doctor yet ({} do)",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ))),
            },
        }
    }

    /// True for a mixture-of-experts router weight (`….gate.weight`): deployment formats keep it
    /// unquantized (transformers 5.x routers are plain parameters, not the `nn.Linear`s
    /// bitsandbytes replaces; llama.cpp `src/llama-quant.cpp` skips `ffn_gate_inp.weight`), so the
    /// comparison does too. Qwen2-MoE's `shared_expert_gate` is an `nn.Linear` and is quantized.
    pub fn is_router(&self, name: &str) -> bool {
        match self {
            Architecture::Llama(c) => c.moe.as_ref().is_some_and(|m| m.is_router(name)),
            Architecture::Gemma(_)
            | Architecture::Phi3(_)
            | Architecture::Gpt2(_)
            | Architecture::NeoX(_) => false,
        }
    }

    /// True when linear weights are stored `[in, out]` (transformers' `Conv1D`: GPT-2), so a
    /// LoRA update is added transposed.
    pub fn conv1d(&self) -> bool {
        match self {
            Architecture::Gpt2(_) => true,
            Architecture::Llama(_)
            | Architecture::Gemma(_)
            | Architecture::Phi3(_)
            | Architecture::NeoX(_) => false,
        }
    }

    /// True when positions are a learned embedding added to the tokens (GPT-2) rather than
    /// rotary, so the position table streams with the embeddings.
    pub fn learned_positions(&self) -> bool {
        match self {
            Architecture::Gpt2(_) => true,
            Architecture::Llama(_)
            | Architecture::Gemma(_)
            | Architecture::Phi3(_)
            | Architecture::NeoX(_) => false,
        }
    }

    /// Whether a decoding cache of `cached` positions must be dropped and the whole sequence
    /// recomputed before the sequence grows to `total` positions. Phi-3 with LongRoPE rotates every
    /// position with the long factors once the sequence is longer than
    /// `original_max_position_embeddings`, and transformers' `Phi3ForCausalLM.
    /// prepare_inputs_for_generation` drops a cache built below that length at the step that
    /// crosses it (the cached keys were rotated with the short factors). Never for other models.
    pub fn cache_is_stale(&self, cached: usize, total: usize) -> bool {
        let threshold = match self {
            Architecture::Phi3(c) => c.rope.long_threshold(),
            Architecture::Llama(_)
            | Architecture::Gemma(_)
            | Architecture::Gpt2(_)
            | Architecture::NeoX(_) => None,
        };
        threshold.is_some_and(|n| cached > 0 && cached <= n && total > n)
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Architecture::Llama(c) => c.num_layers,
            Architecture::Gemma(c) => c.num_layers,
            Architecture::Phi3(c) => c.num_layers,
            Architecture::Gpt2(c) => c.num_layers,
            Architecture::NeoX(c) => c.num_layers,
        }
    }

    /// The longest sequence the model can embed (learned absolute positions), if limited.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            Architecture::Gpt2(c) => Some(c.max_positions),
            Architecture::Llama(_)
            | Architecture::Gemma(_)
            | Architecture::Phi3(_)
            | Architecture::NeoX(_) => None,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            Architecture::Llama(c) => c.hidden_size,
            Architecture::Gemma(c) => c.hidden_size,
            Architecture::Phi3(c) => c.hidden_size,
            Architecture::Gpt2(c) => c.hidden_size,
            Architecture::NeoX(c) => c.hidden_size,
        }
    }

    /// Every tensor `embed` reads.
    pub fn embed_tensors(&self) -> Vec<String> {
        match self {
            Architecture::Llama(c) => vec![c.embed.clone()],
            Architecture::Gemma(c) => vec![c.embed.clone()],
            Architecture::Phi3(c) => vec![c.embed.clone()],
            Architecture::Gpt2(c) => vec![c.embed.clone(), c.positions.clone()],
            Architecture::NeoX(c) => vec![c.embed.clone()],
        }
    }

    /// Every tensor block `i` reads (biases included when the config declares them), so callers can
    /// prepare exactly these weights before running the block.
    pub fn block_tensors(&self, i: usize) -> Vec<String> {
        match self {
            Architecture::Llama(c) => c.block_tensors(i),
            Architecture::Gemma(c) => c.block_tensors(i),
            Architecture::Phi3(c) => c.block_tensors(i),
            Architecture::Gpt2(c) => c.block_tensors(i),
            Architecture::NeoX(c) => c.block_tensors(i),
        }
    }

    /// Every tensor `head` reads: the final norm and the output matrix (the input embedding for tied
    /// models; a provider that serves `lm_head.weight` for a tied model overrides it).
    pub fn head_tensors(&self) -> Vec<String> {
        match self {
            Architecture::Llama(c) => c.head_tensors(),
            Architecture::Gemma(c) => c.head_tensors(),
            Architecture::Phi3(c) => c.head_tensors(),
            Architecture::Gpt2(c) => c.head_tensors(),
            Architecture::NeoX(c) => c.head_tensors(),
        }
    }

    /// The output matrix the head reads when the provider serves it (`lm_head.weight`; a tied
    /// model falls back to the input embedding, listed in [`head_tensors`](Self::head_tensors)).
    pub fn head_matrix(&self) -> &str {
        match self {
            Architecture::Llama(c) => &c.head,
            Architecture::Gemma(c) => &c.head,
            Architecture::Phi3(c) => &c.head,
            Architecture::Gpt2(c) => &c.head,
            Architecture::NeoX(c) => &c.head,
        }
    }

    /// Token embeddings (GPT-2: plus learned positions): `[T, hidden]`.
    pub fn embed(&self, w: &dyn WeightProvider, tokens: &[u32]) -> Result<Tensor, ModelError> {
        self.embed_at(w, tokens, 0)
    }

    /// Embeddings of `tokens` sitting at absolute positions `start_pos..` of their sequence (only
    /// GPT-2's learned positions depend on it; rotary models rotate inside the blocks):
    /// `[T, hidden]`.
    pub fn embed_at(
        &self,
        w: &dyn WeightProvider,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<Tensor, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Empty);
        }
        match self {
            Architecture::Llama(c) => c.embed(w, tokens),
            Architecture::Gemma(c) => c.embed(w, tokens),
            Architecture::Phi3(c) => c.embed(w, tokens),
            Architecture::Gpt2(c) => c.embed_at(w, tokens, start_pos),
            Architecture::NeoX(c) => c.embed(w, tokens),
        }
    }

    /// Decoder block `i`: causal self-attention over all T positions and the MLP, with residuals.
    /// `hidden` is `[T, hidden]`; so is the result. The same computation as
    /// [`block_step`](Self::block_step) from an empty cache.
    pub fn block(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        hidden: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.block_step(i, w, hidden, &mut LayerCache::new(), 0)
    }

    /// Decoder block `i` on `t_new` new positions `start_pos..start_pos + t_new` of a sequence
    /// whose earlier positions' keys and values are in `cache` (which must hold exactly
    /// `start_pos` positions): rotary angles at the absolute positions, attention over the cached
    /// keys plus the new ones (causal among the new ones, sliding windows measured in absolute
    /// positions). The new keys and values are appended to `cache`. `hidden_new` is
    /// `[t_new, hidden]`; so is the result.
    pub fn block_step(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        hidden_new: &Tensor,
        cache: &mut LayerCache,
        start_pos: usize,
    ) -> Result<Tensor, ModelError> {
        Ok(self
            .block_step_routed(i, w, hidden_new, cache, start_pos)?
            .0)
    }

    /// [`block`](Self::block) with the router's decisions of a sparse mixture-of-experts layer
    /// (`None` for a dense block).
    pub fn block_routed(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        hidden: &Tensor,
    ) -> Result<(Tensor, Option<Routing>), ModelError> {
        self.block_step_routed(i, w, hidden, &mut LayerCache::new(), 0)
    }

    fn block_step_routed(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        hidden_new: &Tensor,
        cache: &mut LayerCache,
        start_pos: usize,
    ) -> Result<(Tensor, Option<Routing>), ModelError> {
        let layers = self.num_layers();
        if i >= layers {
            return Err(ModelError::NoBlock { index: i, layers });
        }
        self.check_hidden(hidden_new)?;
        if cache.len() != start_pos {
            return Err(ModelError::CachePosition {
                start: start_pos,
                cached: cache.len(),
            });
        }
        match self {
            Architecture::Llama(c) => c.block_step(
                i,
                w,
                hidden_new,
                Positions::Cached {
                    cache,
                    start: start_pos,
                },
            ),
            Architecture::Gemma(c) => Ok((c.block_step(i, w, hidden_new, cache, start_pos)?, None)),
            Architecture::Phi3(c) => Ok((c.block_step(i, w, hidden_new, cache, start_pos)?, None)),
            Architecture::Gpt2(c) => Ok((c.block_step(i, w, hidden_new, cache)?, None)),
            Architecture::NeoX(c) => Ok((c.block_step(i, w, hidden_new, cache, start_pos)?, None)),
        }
    }

    /// [`block_routed`](Self::block_routed) on several whole sequences at once: `hidden` is their
    /// rows laid end to end (`lengths[s]` each), and so is the result. Position-wise work (norms,
    /// projections, the MLP) runs once over all rows, so each projection is one GEMM of ΣT rows
    /// rather than one per sequence; rotary positions and the causal mask are per sequence.
    /// Architectures without a segmented step run sequence by sequence. A sparse block's routing
    /// covers every row in order.
    pub fn block_segments(
        &self,
        i: usize,
        w: &dyn WeightProvider,
        hidden: &Tensor,
        lengths: &[usize],
    ) -> Result<(Tensor, Option<Routing>), ModelError> {
        let layers = self.num_layers();
        if i >= layers {
            return Err(ModelError::NoBlock { index: i, layers });
        }
        self.check_hidden(hidden)?;
        let rows = hidden.dims()[0];
        if lengths.iter().sum::<usize>() != rows || lengths.contains(&0) {
            return Err(ModelError::Hidden {
                got: hidden.dims().to_vec(),
                hidden: self.hidden_size(),
            });
        }
        if let Architecture::Llama(c) = self {
            return c.block_step(i, w, hidden, Positions::Segments(lengths));
        }
        let mut outputs = Vec::with_capacity(lengths.len());
        let mut routing: Option<Routing> = None;
        let mut start = 0;
        for &len in lengths {
            let part = hidden.narrow(0, start, len)?.contiguous()?;
            let (out, route) = self.block_routed(i, w, &part)?;
            outputs.push(out);
            if let Some(r) = route {
                let joined = routing.get_or_insert_with(|| Routing {
                    experts: Vec::new(),
                    margins: Vec::new(),
                });
                joined.experts.extend(r.experts);
                joined.margins.extend(r.margins);
            }
            start += len;
        }
        Ok((Tensor::cat(&outputs, 0)?, routing))
    }

    /// Final norm and output projection: logits `[T, vocab]` in f32 for every position.
    pub fn head(&self, w: &dyn WeightProvider, hidden: &Tensor) -> Result<Tensor, ModelError> {
        self.check_hidden(hidden)?;
        match self {
            Architecture::Llama(c) => c.head(w, hidden),
            Architecture::Gemma(c) => c.head(w, hidden),
            Architecture::Phi3(c) => c.head(w, hidden),
            Architecture::Gpt2(c) => c.head(w, hidden),
            Architecture::NeoX(c) => c.head(w, hidden),
        }
    }

    /// The whole model on one sequence (embed, every block, head), for callers that do not need to
    /// interleave models.
    pub fn forward(&self, w: &dyn WeightProvider, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let mut hidden = self.embed(w, tokens)?;
        for i in 0..self.num_layers() {
            hidden = self.block(i, w, &hidden)?;
        }
        self.head(w, &hidden)
    }

    fn check_hidden(&self, hidden: &Tensor) -> Result<(), ModelError> {
        let dims = hidden.dims();
        if dims.len() != 2 || dims[1] != self.hidden_size() || dims[0] == 0 {
            return Err(ModelError::Hidden {
                got: dims.to_vec(),
                hidden: self.hidden_size(),
            });
        }
        Ok(())
    }
}

/// The part of `config.json` that describes the language model (multimodal configs nest it).
pub(crate) fn text_config(config: &ModelConfig) -> &Value {
    config
        .raw
        .get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(&config.raw)
}

/// The largest size (width, head dimension, layer count, positions) a config may declare: far
/// beyond any real model, small enough that tables sized by it (rotary frequencies, per-layer
/// attention windows) stay a few megabytes whatever a config claims.
pub(crate) const MAX_CONFIG_SIZE: usize = 1 << 20;

/// A required size, or why the config cannot be run.
pub(crate) fn required(value: Option<usize>, key: &str) -> Result<usize, Unsupported> {
    let value = value
        .filter(|v| *v > 0)
        .ok_or_else(|| Unsupported::new(format!("config.json has no usable `{key}`")))?;
    bounded(value, key)
}

/// `value` when it is at most [`MAX_CONFIG_SIZE`], else why the config cannot be run.
pub(crate) fn bounded(value: usize, key: &str) -> Result<usize, Unsupported> {
    if value > MAX_CONFIG_SIZE {
        return Err(Unsupported::new(format!(
            "config.json `{key}` is {value}, beyond any real model (at most {MAX_CONFIG_SIZE})"
        )));
    }
    Ok(value)
}

/// The first prefix under which `suffix` exists in the checkpoint (`""` included as a candidate).
pub(crate) fn find_prefix(
    prefixes: &[&str],
    suffix: &str,
    has: &dyn Fn(&str) -> bool,
) -> Result<String, Unsupported> {
    prefixes
        .iter()
        .find(|p| has(&format!("{p}{suffix}")))
        .map(|p| p.to_string())
        .ok_or_else(|| {
            Unsupported::new(format!(
                "no `{suffix}` in the checkpoint under any known prefix ({})",
                prefixes
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}
