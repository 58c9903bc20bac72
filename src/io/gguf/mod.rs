//! GGUF files (llama.cpp's format) as lora-doctor inputs: our own parser of the container
//! (`parse`), the name and row-order mapping onto transformers tensors (`names`), the model
//! config rebuilt from GGUF metadata (here) and the tokenizer rebuilt from `tokenizer.ggml.*`
//! (`tokenizer`). Tensor data is never read here: [`crate::io::checkpoint::Checkpoint`] maps the
//! file and dequantizes one tensor at a time.
//!
//! A quantized GGUF base (Q4_1, Q8_0…) is the QLoRA situation seen from the other side: the only
//! weights there are `dequant(W_q)`. lora-doctor takes those dequantized values, in f32, as the
//! stored base *and* as the reference's base (the adapter runs unmerged on top of exactly what
//! llama.cpp or transformers' GGUF loader would compute with), so the adapter effect is measured
//! against the file the user serves; each candidate precision merges `dequant(W_q) + ΔW` and rounds
//! (or re-quantizes) that. The structural `quantized-base` warning still names the quantized tensors,
//! because merging onto a quantized base is a choice to state, not a fault to hide.

pub mod adapter;
pub mod names;
pub mod parse;
pub mod tokenizer;
pub mod write;

use serde_json::{Value, json};

pub use parse::{GgufError, GgufHeader, MetaValue, TensorHeader, parse};

/// The file extension a GGUF base is recognised by (besides its magic).
pub const EXTENSION: &str = "gguf";

/// True when `bytes` start with the GGUF magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(parse::MAGIC)
}

/// The transformers `model_type` for a GGUF `general.architecture` lora-doctor maps, or why not.
pub fn model_type(header: &GgufHeader) -> Result<&'static str, String> {
    let arch = header
        .architecture()
        .ok_or("the GGUF has no `general.architecture`")?;
    if arch_u64(header, arch, "expert_count").is_some_and(|n| n > 0) {
        match arch {
            // Mixtral is written as `llama` with `llama.expert_count` (`LlamaModel`).
            "llama" => return Ok("mixtral"),
            "qwen2moe" | "qwen3moe" => {}
            _ => {
                return Err(format!(
                    "GGUF architecture `{arch}` with experts is not mapped to transformers names \
                     yet; give the safetensors original as --base"
                ));
            }
        }
    }
    names::LLAMA_FAMILY
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            format!(
                "GGUF architecture `{arch}` is not mapped to transformers names yet (lora-doctor \
                 reads {}); give the safetensors original as --base",
                names::LLAMA_FAMILY
                    .iter()
                    .map(|(a, _)| *a)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// `<arch>.<key>` as an unsigned integer.
fn arch_u64(header: &GgufHeader, arch: &str, key: &str) -> Option<u64> {
    header
        .get(&format!("{arch}.{key}"))
        .and_then(MetaValue::as_u64)
}

fn arch_f64(header: &GgufHeader, arch: &str, key: &str) -> Option<f64> {
    header
        .get(&format!("{arch}.{key}"))
        .and_then(MetaValue::as_f64)
}

/// The attention head counts `(n_head, n_head_kv)` the row permutation needs.
pub fn head_counts(header: &GgufHeader) -> Result<(usize, usize), String> {
    let arch = header.architecture().unwrap_or_default();
    let n_head = arch_u64(header, arch, "attention.head_count")
        .ok_or_else(|| format!("the GGUF has no `{arch}.attention.head_count`"))?
        as usize;
    // Absent means no grouped-query attention (`LLM_KV_ATTENTION_HEAD_COUNT_KV` defaults to
    // head_count in llama.cpp's hparams loader).
    let n_head_kv =
        arch_u64(header, arch, "attention.head_count_kv").map_or(n_head, |v| v as usize);
    Ok((n_head, n_head_kv))
}

/// Reads a small tensor of the GGUF by its lora-doctor name (e.g. Phi-3's rope factors).
pub type ReadTensor<'a> = dyn Fn(&str) -> Result<Vec<f32>, String> + 'a;

/// A transformers-style `config.json` object rebuilt from GGUF metadata, with the fields the
/// forward pass and the structural checks read (`convert_hf_to_gguf.py`'s
/// `set_gguf_parameters` wrote them from the original config). `read` gives the few tensors
/// that carry config rather than weights.
pub fn config_json(header: &GgufHeader, read: &ReadTensor<'_>) -> Result<Value, String> {
    // An untied head is stored as `output.weight` in every architecture.
    let has_output = header.tensors.iter().any(|t| t.name == "output.weight");
    let model_type = model_type(header)?;
    let arch = header.architecture().unwrap_or_default();
    let need = |key: &str| {
        arch_u64(header, arch, key).ok_or_else(|| format!("the GGUF has no `{arch}.{key}`"))
    };
    if matches!(model_type, "gpt2" | "gpt_neox") {
        return gpt_config_json(header, model_type, arch, has_output);
    }
    let hidden = need("embedding_length")?;
    let (n_head, n_head_kv) = head_counts(header)?;
    let vocab = arch_u64(header, arch, "vocab_size").or_else(|| {
        header
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(|t| t.len() as u64)
    });
    let head_dim = arch_u64(header, arch, "attention.key_length")
        .or_else(|| {
            // Phi-3's rope dimension count is the rotated part of a head, not the head.
            (arch != "phi3")
                .then(|| arch_u64(header, arch, "rope.dimension_count"))
                .flatten()
        })
        .unwrap_or(hidden / (n_head.max(1) as u64));
    let rope = rope_parameters(header, arch, 10_000.0)?;
    if header.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        // Llama 3's frequency table is stored as a tensor, not as metadata we could translate.
        return Err(
            "the GGUF stores rope frequencies as `rope_freqs.weight` (llama3-style rope), which \
             lora-doctor does not rebuild yet; give the safetensors original as --base"
                .into(),
        );
    }
    let token = |key: &str| {
        header
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(MetaValue::as_u64)
    };
    let mut config = json!({
        "model_type": model_type,
        "architectures": [architecture_class(model_type)],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": arch_u64(header, arch, "context_length"),
        "rms_norm_eps": arch_f64(header, arch, "attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_parameters": rope,
        "tie_word_embeddings": !has_output,
        "vocab_size": vocab,
        "bos_token_id": token("bos_token_id"),
        "eos_token_id": token("eos_token_id"),
        "pad_token_id": token("padding_token_id"),
    });
    match model_type {
        "gemma" | "gemma2" | "gemma3_text" => gemma_config(header, arch, &mut config)?,
        "phi3" => phi3_config(header, arch, read, &mut config)?,
        "mixtral" | "qwen2_moe" | "qwen3_moe" => moe_config(header, arch, model_type, &mut config)?,
        _ => {}
    }
    if let Some(name) = header.get("general.name").and_then(MetaValue::as_str) {
        config["_name_or_path"] = json!(name);
    }
    Ok(config)
}

/// `rope_parameters` from `<arch>.rope.freq_base` and `<arch>.rope.scaling.*`.
fn rope_parameters(header: &GgufHeader, arch: &str, default_theta: f64) -> Result<Value, String> {
    let mut rope = json!({
        "rope_type": "default",
        "rope_theta": arch_f64(header, arch, "rope.freq_base").unwrap_or(default_theta),
    });
    match header
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        None | Some("none") => {}
        Some(kind @ ("linear" | "yarn")) => {
            rope["rope_type"] = json!(kind);
            if let Some(factor) = arch_f64(header, arch, "rope.scaling.factor") {
                rope["factor"] = json!(factor);
            }
            if let Some(original) = arch_u64(header, arch, "rope.scaling.original_context_length") {
                rope["original_max_position_embeddings"] = json!(original);
            }
        }
        Some(other) => return Err(format!("GGUF rope scaling `{other}` is not supported")),
    }
    Ok(rope)
}

/// Whether layer `il` of `layers` slides its attention window, by llama.cpp's rule: the
/// `<arch>.attention.sliding_window_pattern` array when present, else its period (the key as a
/// number, else `default_period`) with the last layer of each period global
/// (`llama_hparams::set_swa_pattern`, `load_swa_pattern`).
fn sliding_layers(
    header: &GgufHeader,
    arch: &str,
    layers: usize,
    default_period: u64,
) -> Result<Vec<bool>, String> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    if let Some(flags) = header.get(&key).and_then(MetaValue::as_array) {
        let flags: Vec<bool> = flags.iter().filter_map(MetaValue::as_bool).collect();
        if flags.len() < layers {
            return Err(format!(
                "`{key}` lists {} layers, the model has {layers}",
                flags.len()
            ));
        }
        return Ok(flags[..layers].to_vec());
    }
    let period = header
        .get(&key)
        .and_then(MetaValue::as_u64)
        .unwrap_or(default_period) as usize;
    Ok((0..layers)
        .map(|il| period == 0 || il % period < period - 1)
        .collect())
}

/// The Gemma 1/2/3 part of the config, as llama.cpp runs the file (`src/models/gemma*.cpp`,
/// `load_arch_hparams`): activation, query scale, soft-capping, sliding windows, local rope.
/// The GGUF has no `query_pre_attn_scalar`: llama.cpp scales queries by 1/√head_dim, except
/// for the 27B sizes (46 layers for Gemma 2, 62 for Gemma 3), which use 1/√(hidden / heads).
fn gemma_config(header: &GgufHeader, arch: &str, config: &mut Value) -> Result<(), String> {
    let number = |key: &str| config[key].as_u64().unwrap_or(0);
    let (layers, hidden, heads) = (
        number("num_hidden_layers"),
        number("hidden_size"),
        number("num_attention_heads"),
    );
    let head_dim = number("head_dim");
    config["attention_bias"] = json!(false);
    if arch == "gemma" {
        config["hidden_act"] = json!("gelu_pytorch_tanh");
        return Ok(());
    }
    config["hidden_activation"] = json!("gelu_pytorch_tanh");
    let big = if arch == "gemma2" { 46 } else { 62 };
    config["query_pre_attn_scalar"] = json!(if layers == big {
        hidden / heads.max(1)
    } else {
        head_dim
    });
    let window = arch_u64(header, arch, "attention.sliding_window");
    let final_cap = arch_f64(header, arch, "final_logit_softcapping");
    if arch == "gemma2" {
        // llama_hparams defaults: both caps on (50, 30), a 4096-token window, period 2.
        config["attn_logit_softcapping"] =
            json!(arch_f64(header, arch, "attn_logit_softcapping").unwrap_or(50.0));
        config["final_logit_softcapping"] = json!(final_cap.unwrap_or(30.0));
        let sliding = sliding_layers(header, arch, layers as usize, 2)?;
        config["sliding_window"] = json!(window.unwrap_or(4096));
        config["layer_types"] = layer_types(&sliding);
        return Ok(());
    }
    // Gemma 3: no attention cap; the final cap only when written; sliding layers only with a
    // window, every sixth layer global; local layers use `rope.freq_base_swa` (10 000 when
    // absent) without the global layers' scaling (`rope_freq_scale_train_swa` = 1).
    config["attn_logit_softcapping"] = Value::Null;
    config["final_logit_softcapping"] = json!(final_cap);
    let global = config["rope_parameters"].take();
    let sliding = match window.filter(|w| *w > 0) {
        Some(w) => {
            config["sliding_window"] = json!(w);
            sliding_layers(header, arch, layers as usize, 6)?
        }
        None => {
            config["sliding_window"] = Value::Null;
            vec![false; layers as usize]
        }
    };
    config["layer_types"] = layer_types(&sliding);
    config["rope_parameters"] = json!({
        "full_attention": global,
        "sliding_attention": {
            "rope_type": "default",
            "rope_theta": arch_f64(header, arch, "rope.freq_base_swa").unwrap_or(10_000.0),
        },
    });
    Ok(())
}

/// The mixture-of-experts part of the config, as llama.cpp runs the file: every block sparse
/// (its MoE graphs have no dense layers, so a block without a router is refused), top-k
/// renormalised for Mixtral and Qwen3-MoE but not Qwen2-MoE (the `norm_w` argument of
/// `build_moe_ffn` in `src/models/llama.cpp`, `qwen3moe.cpp`, `qwen2moe.cpp`).
fn moe_config(
    header: &GgufHeader,
    arch: &str,
    model_type: &str,
    config: &mut Value,
) -> Result<(), String> {
    let need = |key: &str| {
        arch_u64(header, arch, key).ok_or_else(|| format!("the GGUF has no `{arch}.{key}`"))
    };
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0);
    for il in 0..layers {
        let router = format!("blk.{il}.ffn_gate_inp.weight");
        if !header.tensors.iter().any(|t| t.name == router) {
            return Err(format!(
                "block {il} of this mixture-of-experts GGUF has no router `{router}` (a dense \
                 layer), which lora-doctor does not map yet; give the safetensors original"
            ));
        }
    }
    config["num_experts_per_tok"] = json!(need("expert_used_count")?);
    config["hidden_act"] = json!("silu");
    if model_type == "mixtral" {
        config["num_local_experts"] = json!(need("expert_count")?);
        config["sliding_window"] = Value::Null;
        return Ok(());
    }
    config["num_experts"] = json!(need("expert_count")?);
    config["moe_intermediate_size"] = json!(need("expert_feed_forward_length")?);
    config["norm_topk_prob"] = json!(model_type == "qwen3_moe");
    config["decoder_sparse_step"] = json!(1);
    config["mlp_only_layers"] = json!([]);
    if model_type == "qwen2_moe" {
        config["shared_expert_intermediate_size"] =
            json!(need("expert_shared_feed_forward_length")?);
    }
    Ok(())
}

fn layer_types(sliding: &[bool]) -> Value {
    sliding
        .iter()
        .map(|s| {
            if *s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect()
}

/// The Phi-3 part of the config (`Phi3MiniModel.set_gguf_parameters`): partial rotary from
/// `rope.dimension_count`, the sliding window (0 = none), and longrope rebuilt from the
/// `rope_factors_long/short.weight` tensors the converter writes for long-context models
/// (`generate_extra_tensors`) with `rope.scaling.original_context_length`.
fn phi3_config(
    header: &GgufHeader,
    arch: &str,
    read: &ReadTensor<'_>,
    config: &mut Value,
) -> Result<(), String> {
    let head_dim = config["head_dim"].as_u64().unwrap_or(1).max(1);
    let rotary = arch_u64(header, arch, "rope.dimension_count").unwrap_or(head_dim);
    config["hidden_act"] = json!("silu");
    // The window the file states, as transformers applies it. llama.cpp currently ignores it
    // (`llama_model_phi3::load_arch_hparams` turns Phi SWA off, llama.cpp PR 13676), which only
    // differs from this past the window length.
    config["sliding_window"] = match arch_u64(header, arch, "attention.sliding_window") {
        Some(w) if w > 0 => json!(w),
        _ => Value::Null,
    };
    let rope = &mut config["rope_parameters"];
    rope["partial_rotary_factor"] = json!(rotary as f64 / head_dim as f64);
    let has = |name: &str| header.tensors.iter().any(|t| t.name == name);
    match (
        has("rope_factors_long.weight"),
        has("rope_factors_short.weight"),
    ) {
        (false, false) => return Ok(()),
        (true, true) => {}
        _ => {
            return Err(
                "the GGUF has only one of `rope_factors_long.weight` / `rope_factors_short.weight`"
                    .into(),
            );
        }
    }
    let original = arch_u64(header, arch, "rope.scaling.original_context_length").ok_or(
        "the GGUF has longrope factors but no `phi3.rope.scaling.original_context_length`",
    )?;
    let factors = |name: &str| -> Result<Vec<f64>, String> {
        let values = read(name).map_err(|e| format!("reading `{name}`: {e}"))?;
        Ok(values.into_iter().map(f64::from).collect())
    };
    rope["rope_type"] = json!("longrope");
    rope["long_factor"] = json!(factors("rope_factors_long.weight")?);
    rope["short_factor"] = json!(factors("rope_factors_short.weight")?);
    rope["original_max_position_embeddings"] = json!(original);
    config["original_max_position_embeddings"] = json!(original);
    Ok(())
}

/// The config of a GPT-2 or GPT-NeoX GGUF, in the keys transformers' config classes use
/// (`GPT2Model` / `GPTNeoXModel.set_gguf_parameters` in the converter wrote them).
fn gpt_config_json(
    header: &GgufHeader,
    model_type: &str,
    arch: &str,
    has_output: bool,
) -> Result<Value, String> {
    let need = |key: &str| {
        arch_u64(header, arch, key).ok_or_else(|| format!("the GGUF has no `{arch}.{key}`"))
    };
    let hidden = need("embedding_length")?;
    let (n_head, _) = head_counts(header)?;
    let vocab = header
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(|t| t.len() as u64);
    let eps = arch_f64(header, arch, "attention.layer_norm_epsilon").unwrap_or(1e-5);
    let token = |key: &str| {
        header
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(MetaValue::as_u64)
    };
    let mut config = if model_type == "gpt2" {
        json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": hidden,
            "n_layer": need("block_count")?,
            "n_head": n_head,
            "n_inner": need("feed_forward_length")?,
            "n_positions": need("context_length")?,
            "layer_norm_epsilon": eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": !has_output,
            "vocab_size": vocab,
        })
    } else {
        let head_dim = hidden / n_head.max(1) as u64;
        let rotary = arch_u64(header, arch, "rope.dimension_count").unwrap_or(head_dim);
        json!({
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "hidden_size": hidden,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": n_head,
            "intermediate_size": need("feed_forward_length")?,
            "max_position_embeddings": need("context_length")?,
            "layer_norm_eps": eps,
            "hidden_act": "gelu",
            "use_parallel_residual": header
                .get(&format!("{arch}.use_parallel_residual"))
                .and_then(MetaValue::as_bool)
                .unwrap_or(true),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": arch_f64(header, arch, "rope.freq_base").unwrap_or(10_000.0),
                "partial_rotary_factor": rotary as f64 / head_dim.max(1) as f64,
            },
            "tie_word_embeddings": !has_output,
            "vocab_size": vocab,
        })
    };
    config["bos_token_id"] = json!(token("bos_token_id"));
    config["eos_token_id"] = json!(token("eos_token_id"));
    config["pad_token_id"] = json!(token("padding_token_id"));
    if let Some(name) = header.get("general.name").and_then(MetaValue::as_str) {
        config["_name_or_path"] = json!(name);
    }
    Ok(config)
}

fn architecture_class(model_type: &str) -> &'static str {
    match model_type {
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "mixtral" => "MixtralForCausalLM",
        "qwen2_moe" => "Qwen2MoeForCausalLM",
        "qwen3_moe" => "Qwen3MoeForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => "LlamaForCausalLM",
    }
}
