//! llama.cpp LoRA adapters — the GGUF files `convert_lora_to_gguf.py` writes and `llama-cli
//! --lora` / `llama-export-lora` read — seen as PEFT adapters, so every check runs on them unchanged.
//!
//! The file holds `general.type = "adapter"`, `adapter.type = "lora"`, one `adapter.lora.alpha`
//! and, per targeted weight, `<gguf weight name>.lora_a` (PEFT's A, `[r, in]`) and `.lora_b`
//! (PEFT's B, `[out, r]`); `token_embd.weight.lora_a` is stored transposed (`[vocab, r]`, for
//! `llm_build_inp_embd`'s row lookup). The converter permutes B's rows of q/k like the base's
//! weights, which we undo with the *base's* head counts (the adapter carries none).
//!
//! llama.cpp scales every pair by `alpha / rank`, with the rank read from each B
//! (`llama_adapter_lora_weight::get_scale` in `src/llama-adapter.h`), and by 1 when alpha is 0. So
//! rsLoRA and `alpha_pattern` do not survive the conversion, while `rank_pattern` does (each pair
//! keeps its own rank). The PEFT config built here says exactly that: the GGUF's one alpha, the
//! most common rank as `r`, the other ranks as `rank_pattern`, no rsLoRA.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::names::{self, RowOrder};
use super::{GgufHeader, MetaValue, TensorHeader};

/// `general.type` of an adapter file.
const GENERAL_TYPE: &str = "adapter";
/// `adapter.type` of a LoRA adapter.
const LORA_TYPE: &str = "lora";
const ALPHA_KEY: &str = "adapter.lora.alpha";
const LORA_A_SUFFIX: &str = ".lora_a";
const LORA_B_SUFFIX: &str = ".lora_b";
/// The GGUF weight whose `lora_a` is stored transposed.
const TOKEN_EMBD: &str = "token_embd.weight";
/// The prefix PEFT puts before every module path on save.
const PEFT_PREFIX: &str = "base_model.model.";

/// True when the header describes an adapter (not a model).
pub fn is_adapter(header: &GgufHeader) -> bool {
    header.get("general.type").and_then(MetaValue::as_str) == Some(GENERAL_TYPE)
}

/// True when `path` is a GGUF file whose header says it is an adapter (an unreadable file is not).
pub fn is_adapter_file(path: &std::path::Path) -> bool {
    if !path.is_file() {
        return false;
    }
    // Mapped, not read: a model GGUF can be tens of gigabytes and only its header is parsed.
    let Ok(map) = crate::io::checkpoint::map_file(path) else {
        return false;
    };
    super::parse(&map).is_ok_and(|h| is_adapter(&h))
}

/// The adapter's architecture and `adapter.lora.alpha`, or why llama.cpp would refuse the file
/// (`llama_adapter_lora_init_impl`: general.type must be "adapter", adapter.type "lora").
pub fn describe(header: &GgufHeader) -> Result<(&'static str, f64), String> {
    if !is_adapter(header) {
        return Err(
            "the GGUF is not an adapter (`general.type` is not \"adapter\"); a model \
                    GGUF goes to --base or --merged"
                .into(),
        );
    }
    let kind = header.get("adapter.type").and_then(MetaValue::as_str);
    if kind != Some(LORA_TYPE) {
        return Err(format!(
            "the GGUF adapter's `adapter.type` is {}, not \"lora\"; lora-doctor checks LoRA \
             adapters only",
            kind.map_or("missing".to_string(), |k| format!("\"{k}\""))
        ));
    }
    let model_type = super::model_type(header)?;
    if !matches!(model_type, "llama" | "mistral" | "qwen2" | "qwen3") {
        return Err(format!(
            "GGUF LoRA adapters of `{model_type}` models are not read yet (llama, mistral, qwen2 \
             and qwen3 are); give the PEFT adapter folder"
        ));
    }
    // llama.cpp reads a missing alpha as 0, which means "scale 1".
    let alpha = header
        .get(ALPHA_KEY)
        .and_then(MetaValue::as_f64)
        .unwrap_or(0.0);
    if !alpha.is_finite() {
        return Err(format!("`{ALPHA_KEY}` is {alpha}, not a finite number"));
    }
    Ok((model_type, alpha))
}

/// The PEFT key and row order of one adapter tensor. A tensor that is not a LoRA factor of a
/// mapped weight keeps its GGUF name, so the structural checks list it as unused.
pub fn peft_view(
    t: &TensorHeader,
    arch: &str,
    n_head: usize,
    n_head_kv: usize,
) -> (String, RowOrder) {
    let (weight, is_a) = match (
        t.name.strip_suffix(LORA_A_SUFFIX),
        t.name.strip_suffix(LORA_B_SUFFIX),
    ) {
        (Some(w), _) => (w, true),
        (_, Some(w)) => (w, false),
        _ => return (t.name.clone(), RowOrder::Same),
    };
    let Some(hf) = names::llama_to_hf(weight) else {
        return (t.name.clone(), RowOrder::Same);
    };
    let Some(module) = hf.strip_suffix(".weight") else {
        return (t.name.clone(), RowOrder::Same);
    };
    if weight == TOKEN_EMBD {
        return if is_a {
            (
                format!("{PEFT_PREFIX}{module}.lora_embedding_A"),
                RowOrder::Transposed,
            )
        } else {
            (
                format!("{PEFT_PREFIX}{module}.lora_embedding_B"),
                RowOrder::Same,
            )
        };
    }
    if is_a {
        (
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            RowOrder::Same,
        )
    } else {
        // B's rows are the weight's output rows, permuted for q/k exactly like the weight.
        let order = names::llama_row_order(arch, &hf, n_head, n_head_kv);
        (format!("{PEFT_PREFIX}{module}.lora_B.weight"), order)
    }
}

/// The module (transformers path) and rank of every LoRA pair, read from the B factors: llama.cpp
/// takes the rank from B (`b->ne[0]`), so that is the rank its scale uses.
pub fn module_ranks(header: &GgufHeader) -> BTreeMap<String, usize> {
    let mut ranks = BTreeMap::new();
    for t in &header.tensors {
        let Some(weight) = t.name.strip_suffix(LORA_B_SUFFIX) else {
            continue;
        };
        let Some(module) = names::llama_to_hf(weight)
            .and_then(|hf| hf.strip_suffix(".weight").map(str::to_string))
        else {
            continue;
        };
        // ggml dims: ne[0] is the row length of B [out, r], i.e. the rank.
        if let Some(&r) = t.dims.first() {
            ranks.insert(module, r as usize);
        }
    }
    ranks
}

/// An `adapter_config.json` equivalent of the adapter as llama.cpp applies it: scale
/// `alpha / rank` per pair (or 1 when alpha is 0), no rsLoRA, no alpha pattern.
pub fn peft_config(alpha: f64, ranks: &BTreeMap<String, usize>) -> Value {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in ranks.values() {
        *counts.entry(*r).or_default() += 1;
    }
    // The most common rank is `r`; ties go to the larger rank, so the choice is stable.
    let r = counts
        .iter()
        .max_by_key(|(rank, n)| (**n, **rank))
        .map_or(8, |(rank, _)| *rank);
    let exact = |module: &str| regex::escape(module);
    let rank_pattern: serde_json::Map<String, Value> = ranks
        .iter()
        .filter(|(_, rank)| **rank != r)
        .map(|(m, rank)| (exact(m), json!(rank)))
        .collect();
    // alpha = 0 means scale 1 in llama.cpp; PEFT's alpha/r gives 1 when alpha equals the rank.
    let (lora_alpha, alpha_pattern) = if alpha == 0.0 {
        let pattern: serde_json::Map<String, Value> = ranks
            .iter()
            .filter(|(_, rank)| **rank != r)
            .map(|(m, rank)| (exact(m), json!(rank)))
            .collect();
        (r as f64, pattern)
    } else {
        (alpha, serde_json::Map::new())
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": false,
        "target_modules": ranks.keys().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::ggml::GgmlType;

    fn tensor(name: &str, dims: &[u64]) -> TensorHeader {
        TensorHeader {
            name: name.into(),
            ty: GgmlType::F32,
            dims: dims.to_vec(),
            start: 0,
            len: 0,
        }
    }

    #[test]
    fn names_map_to_peft_keys_with_b_of_q_and_k_permuted() {
        let (key, order) = peft_view(
            &tensor("blk.3.attn_q.weight.lora_b", &[8, 64]),
            "llama",
            4,
            2,
        );
        assert_eq!(
            key,
            "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
        );
        assert_eq!(order, RowOrder::LlamaRope { heads: 4 });
        let (key, order) = peft_view(
            &tensor("blk.3.attn_k.weight.lora_b", &[8, 32]),
            "llama",
            4,
            2,
        );
        assert_eq!(
            key,
            "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"
        );
        assert_eq!(order, RowOrder::LlamaRope { heads: 2 });
        let (key, order) = peft_view(
            &tensor("blk.3.attn_q.weight.lora_a", &[64, 8]),
            "llama",
            4,
            2,
        );
        assert_eq!(
            key,
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(order, RowOrder::Same);
        // Qwen2 GGUFs are not permuted.
        let (_, order) = peft_view(
            &tensor("blk.0.attn_q.weight.lora_b", &[8, 64]),
            "qwen2",
            4,
            2,
        );
        assert_eq!(order, RowOrder::Same);
        let (key, order) = peft_view(
            &tensor("token_embd.weight.lora_a", &[8, 320]),
            "llama",
            4,
            2,
        );
        assert_eq!(key, "base_model.model.model.embed_tokens.lora_embedding_A");
        assert_eq!(order, RowOrder::Transposed);
        let (key, _) = peft_view(&tensor("blk.0.attn_norm.weight", &[64]), "llama", 4, 2);
        assert_eq!(key, "blk.0.attn_norm.weight");
    }

    #[test]
    fn config_keeps_per_pair_ranks_and_drops_rslora() {
        let ranks = BTreeMap::from([
            ("model.layers.0.mlp.down_proj".to_string(), 4),
            ("model.layers.0.self_attn.q_proj".to_string(), 8),
            ("model.layers.1.self_attn.q_proj".to_string(), 8),
        ]);
        let config = peft_config(16.0, &ranks);
        assert_eq!(config["r"], 8);
        assert_eq!(config["lora_alpha"], 16.0);
        assert_eq!(config["use_rslora"], false);
        assert_eq!(config["rank_pattern"].as_object().map(|m| m.len()), Some(1));
        let zero = peft_config(0.0, &ranks);
        // Scale 1 everywhere: alpha equals each pair's rank.
        assert_eq!(zero["lora_alpha"], 8.0);
        assert_eq!(zero["alpha_pattern"].as_object().map(|m| m.len()), Some(1));
    }
}
