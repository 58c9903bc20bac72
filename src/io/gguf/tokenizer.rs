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
pub fn pre_tokenizer(pre: &str) -> Result<Value, String> {
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

/// Names of the pre-tokenizers lora-doctor knows, in [`pre_tokenizer`]'s table.
const KNOWN_PRE: &[&str] = &["gpt-2", "smollm", "llama-bpe", "qwen2"];

/// The parts of a pre-tokenizer that change token ids: types, regexes and the flags that
/// split; not offsets bookkeeping (`trim_offsets`) or prefix spaces the table fixes.
fn signature(v: &Value) -> Value {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "Sequence" => json!({"Sequence": v.get("pretokenizers").and_then(Value::as_array)
            .map(|a| a.iter().map(signature).collect::<Vec<_>>())}),
        "ByteLevel" => json!({"ByteLevel": v.get("use_regex").cloned().unwrap_or(json!(true)),
                              "prefix": v.get("add_prefix_space").cloned()}),
        "Digits" => json!({"Digits": v.get("individual_digits").cloned()}),
        "Split" => json!({"Split": v.pointer("/pattern/Regex").cloned()}),
        other => json!({"other": other}),
    }
}

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer, when it is one of
/// [`KNOWN_PRE`] (the inverse of [`pre_tokenizer`]).
pub fn pre_name(pre_tokenizer_json: &Value) -> Option<&'static str> {
    let want = signature(pre_tokenizer_json);
    KNOWN_PRE
        .iter()
        .copied()
        .find(|name| pre_tokenizer(name).is_ok_and(|v| signature(&v) == want))
}

/// A special token's id: `tokenizer_config.json`'s `<role>_token` (a string or `{content}`)
/// looked up in the vocabulary, else `config.json`'s `<role>_token_id`.
fn special_id(
    role: &str,
    tokenizer_config: Option<&Value>,
    config_id: Option<&Value>,
    ids: &std::collections::HashMap<&str, usize>,
) -> Option<u32> {
    let content = tokenizer_config
        .and_then(|c| c.get(format!("{role}_token")))
        .and_then(|v| {
            v.as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))
        });
    if let Some(id) = content.and_then(|c| ids.get(c)) {
        return u32::try_from(*id).ok();
    }
    let id = match config_id? {
        Value::Array(items) => items.first()?.as_u64()?,
        other => other.as_u64()?,
    };
    u32::try_from(id).ok()
}

/// `(add_bos, add_eos)` as gguf-py's `SpecialVocab` reads them from tokenizer.json's
/// post-processor (it wins over tokenizer_config.json): a `ByteLevel` processor means false
/// unless set otherwise, a `TemplateProcessing` whose single-sequence template starts (ends)
/// with a special token means bos (eos) is added.
fn post_processor_flags(tokenizer_json: &Value) -> (Option<bool>, Option<bool>) {
    let Some(post) = tokenizer_json.get("post_processor") else {
        return (None, None);
    };
    let processors: Vec<&Value> = match post.get("processors").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![post],
    };
    let (mut bos, mut eos) = (None, None);
    for p in processors {
        match p.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => {
                bos.get_or_insert(false);
                eos.get_or_insert(false);
            }
            Some("TemplateProcessing") => {
                let single = p.get("single").and_then(Value::as_array);
                if let Some(single) = single.filter(|s| s.len() > 1) {
                    let special =
                        |v: Option<&Value>| v.and_then(|t| t.get("SpecialToken")).is_some();
                    if special(single.first()) {
                        bos = Some(true);
                    }
                    if special(single.last()) {
                        eos = Some(true);
                    }
                }
            }
            _ => {}
        }
    }
    (bos, eos)
}

/// tokenizer_config.json of `dir` as the GGUF converter sees it: a `chat_template` saved apart
/// in `chat_template.jinja` (transformers ≥ 4.43 writes it there) is put back in.
pub fn tokenizer_config_with_template(
    dir: &std::path::Path,
    config: Option<Value>,
) -> Option<Value> {
    let template = dir.join("chat_template.jinja");
    let has_template = config
        .as_ref()
        .is_some_and(|c| c.get("chat_template").is_some());
    if has_template || !template.is_file() {
        return config;
    }
    let Ok(text) = std::fs::read_to_string(&template) else {
        return config;
    };
    let mut config = config.unwrap_or_else(|| Value::Object(Default::default()));
    if let Some(map) = config.as_object_mut() {
        map.insert("chat_template".into(), Value::String(text));
    }
    Some(config)
}

/// `tokenizer.ggml.*` for a byte-level BPE `tokenizer.json`, as `convert_hf_to_gguf.py`'s
/// `_set_vocab_gpt2` and `gguf.SpecialVocab` write them: every id up to the model's vocab size
/// (missing ids as `[PAD<i>]`, type UNUSED), token types, merges, the pre-tokenizer name, special
/// ids, `add_bos_token` and the chat template.
pub fn tokenizer_metadata(
    tokenizer_json: &Value,
    tokenizer_config: Option<&Value>,
    config: &crate::io::config::ModelConfig,
) -> anyhow::Result<Vec<(String, MetaValue)>> {
    use anyhow::{Context, bail};
    let model = tokenizer_json
        .get("model")
        .context("tokenizer.json has no model")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        bail!("writing GGUF needs a byte-level BPE tokenizer.json (SmolLM, Llama 3, Qwen)");
    }
    let pre = tokenizer_json
        .get("pre_tokenizer")
        .and_then(pre_name)
        .with_context(|| {
            format!(
                "the tokenizer.json pre-tokenizer is none of {} that lora-doctor can name for llama.cpp",
                KNOWN_PRE.join(", ")
            )
        })?;
    let mut by_id: std::collections::BTreeMap<usize, (String, i32)> = Default::default();
    if let Some(Value::Object(vocab)) = model.get("vocab") {
        for (token, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as usize, (token.clone(), 1));
            }
        }
    }
    if let Some(Value::Array(added)) = tokenizer_json.get("added_tokens") {
        for t in added {
            let (Some(id), Some(content)) = (
                t.get("id").and_then(Value::as_u64),
                t.get("content").and_then(Value::as_str),
            ) else {
                continue;
            };
            let special = t.get("special").and_then(Value::as_bool) == Some(true);
            let ty = if special {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            };
            by_id.insert(id as usize, (content.to_string(), ty as i32));
        }
    }
    let n = config
        .vocab_size
        .unwrap_or(0)
        .max(by_id.keys().next_back().map_or(0, |m| m + 1));
    // `gguf.TokenType.UNUSED`: ids the tokenizer never emits but the embedding has rows for.
    const TOKEN_TYPE_UNUSED: i32 = 5;
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n {
        let (token, ty) = by_id
            .remove(&i)
            .unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_TYPE_UNUSED));
        tokens.push(MetaValue::Str(token));
        types.push(MetaValue::I32(ty));
    }
    let merges: Vec<MetaValue> = model
        .get("merges")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|pair| match pair {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(p) => Some(
                        p.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => None,
                })
                .map(MetaValue::Str)
                .collect()
        })
        .unwrap_or_default();
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_str().map(|s| (s, i)))
        .collect();
    let mut specials = Vec::new();
    for (role, key, config_id) in [
        ("bos", "bos_token_id", config.bos_token_id.as_ref()),
        ("eos", "eos_token_id", config.eos_token_id.as_ref()),
        ("unk", "unknown_token_id", None),
        ("pad", "padding_token_id", config.pad_token_id.as_ref()),
    ] {
        if let Some(id) = special_id(role, tokenizer_config, config_id, &ids) {
            specials.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(id)));
        }
    }
    drop(ids);
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), MetaValue::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::Array(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Array(merges)),
    ];
    out.extend(specials);
    let (mut add_bos, mut add_eos) = post_processor_flags(tokenizer_json);
    for (flag, slot) in [
        ("add_bos_token", &mut add_bos),
        ("add_eos_token", &mut add_eos),
    ] {
        if slot.is_none() {
            *slot = tokenizer_config
                .and_then(|c| c.get(flag))
                .and_then(Value::as_bool);
        }
    }
    for (flag, value) in [("add_bos_token", add_bos), ("add_eos_token", add_eos)] {
        if let Some(v) = value {
            out.push((format!("tokenizer.ggml.{flag}"), MetaValue::Bool(v)));
        }
    }
    if let Some(template) = tokenizer_config
        .and_then(|c| c.get("chat_template"))
        .and_then(Value::as_str)
    {
        out.push((
            "tokenizer.chat_template".into(),
            MetaValue::Str(template.into()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_pre_tokenizer_is_named_back() {
        for name in KNOWN_PRE {
            let json = pre_tokenizer(name).expect("known");
            assert_eq!(pre_name(&json), Some(*name));
        }
        assert!(pre_tokenizer("deepseek-coder").is_err());
    }
}
