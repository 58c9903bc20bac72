//! A Hugging Face `tokenizer.json` rebuilt from a GGUF's `tokenizer.ggml.*` metadata, for bases
//! that come as a single GGUF file (no tokenizer.json beside it).
//!
//! Only byte-level BPE (`tokenizer.ggml.model = gpt2`, what SmolLM2, Llama 3 and Qwen use) is
//! rebuilt. The pre-tokenizer comes from `tokenizer.ggml.pre`, the name `convert_hf_to_gguf.py`
//! (`get_vocab_base_pre`) chose by hashing the original tokenizer's output; each name supported
//! here is the original `tokenizer.json` pre-tokenizer of that family (llama.cpp's own regexes in
//! `llama-vocab.cpp`, `llm_tokenizer_bpe`, are adaptations of the same). An unknown name is an
//! error rather than a guess: a wrong pre-tokenizer gives plausible but different token ids.

use serde_json::{Value, json};

use super::{GgufHeader, MetaValue};

/// The split regexes of the Llama 3 and Qwen2 `tokenizer.json` files.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `llama_token_type` values (`LLAMA_TOKEN_TYPE_CONTROL`, `_USER_DEFINED`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<Value, String> {
    Ok(match pre {
        "default" | "gpt-2" => byte_level(true),
        // SmolLM / SmolLM2's tokenizer.json: single digits, then GPT-2 byte-level splitting.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT),
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        other => {
            return Err(format!(
                "the GGUF's pre-tokenizer `tokenizer.ggml.pre = {other}` is not one lora-doctor \
                 rebuilds (default, gpt-2, smollm, llama-bpe, qwen2); put the model's \
                 tokenizer.json beside the adapter"
            ));
        }
    })
}

fn strings(header: &GgufHeader, key: &str) -> Result<Vec<String>, String> {
    header
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| format!("the GGUF has no `{key}` array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{key}` holds a non-string item"))
        })
        .collect()
}

/// The `tokenizer.json` object for the GGUF's tokenizer, or why it cannot be rebuilt.
pub fn tokenizer_json(header: &GgufHeader) -> Result<Value, String> {
    let model = header
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or("the GGUF has no `tokenizer.ggml.model`")?;
    if model != "gpt2" {
        return Err(format!(
            "the GGUF's tokenizer model `{model}` is not rebuilt by lora-doctor (only byte-level \
             BPE, `gpt2`); put the model's tokenizer.json beside the adapter"
        ));
    }
    let pre = header
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let tokens = strings(header, "tokenizer.ggml.tokens")?;
    let merges = strings(header, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = header
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_default();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let bos = header
        .get("tokenizer.ggml.bos_token_id")
        .and_then(MetaValue::as_u64);
    let add_bos = header
        .get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let post_processor = match (add_bos, bos.and_then(|b| tokens.get(b as usize))) {
        (true, Some(bos_token)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_token, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_token.as_str(): {"id": bos_token, "ids": [bos], "tokens": [bos_token]}},
        }),
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                    "use_regex": true}),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}
