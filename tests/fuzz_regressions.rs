//! Inputs the fuzz targets in `fuzz/` (run by `scripts/fuzz.sh`) found to panic, abort or
//! allocate without bound, fed through the same library entry points. Each must now be a typed
//! error or a correct result.

use std::path::{Path, PathBuf};

use lora_doctor::io::config::ModelConfig;
use lora_doctor::io::prompts::{PromptError, tokenize};
use lora_doctor::io::tokenizer::TokenizerInfo;
use lora_doctor::model::Architecture;
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// A word-level tokenizer (`<s>` = 5 prepended) with the given `padding` and `truncation`.
fn word_level(padding: serde_json::Value, truncation: serde_json::Value) -> String {
    json!({
        "version": "1.0",
        "truncation": truncation,
        "padding": padding,
        "added_tokens": [{"id": 5, "content": "<s>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [5], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]",
                  "vocab": {"the": 0, "quick": 1, "fox": 2, "[UNK]": 3, "[PAD]": 4}}
    })
    .to_string()
}

fn prompts() -> Vec<String> {
    vec!["the quick fox the fox".to_string()]
}

/// tokenizers 0.23 panics (`expect("Helper")`) on a JSON syntax error inside `decoder`; found by
/// the `tokenizer` target. It must be a tokenizer error naming the file.
#[test]
fn tokenizer_json_with_a_syntax_error_in_the_decoder_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "tokenizer.json",
        r#"{"decoder":{"type":"ByteLevel" 1}}"#,
    );
    match tokenize(&path, &prompts(), 64, 32) {
        Err(PromptError::Tokenizer {
            path: named,
            reason,
        }) => {
            assert_eq!(named, path);
            assert!(reason.contains("line 1"), "{reason}");
        }
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

/// A `Fixed` padding length of 2⁴⁰ made every encoding allocate terabytes (an abort); any
/// padding would also have put pad ids into the scored sequences. transformers ignores the file's
/// padding for plain calls, and so does lora-doctor now.
#[test]
fn tokenizer_json_padding_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let padding = json!({"strategy": {"Fixed": 1u64 << 40}, "direction": "Right",
                         "pad_to_multiple_of": null, "pad_id": 4, "pad_type_id": 0,
                         "pad_token": "[PAD]"});
    let path = write(
        dir.path(),
        "tokenizer.json",
        &word_level(padding, json!(null)),
    );
    let tokenized = tokenize(&path, &prompts(), 64, 32).expect("tokenizes");
    assert_eq!(tokenized.sequences, vec![vec![5, 0, 1, 2, 0, 2]]);
}

/// A truncation `stride` not below `max_length` tripped an assertion inside tokenizers'
/// `Encoding::truncate`. The file's truncation is ignored like its padding: lora-doctor cuts
/// sequences itself (`max_len`).
#[test]
fn tokenizer_json_truncation_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let truncation =
        json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5});
    let path = write(
        dir.path(),
        "tokenizer.json",
        &word_level(json!(null), truncation),
    );
    let tokenized = tokenize(&path, &prompts(), 64, 4).expect("tokenizes");
    assert_eq!(tokenized.sequences, vec![vec![5, 0, 1, 2]]);
}

/// An added-token id of u64::MAX overflowed `size = max_id + 1` (a panic in debug builds; in
/// release it wrapped to 0 and hid the vocabulary-size check).
#[test]
fn added_token_id_u64_max_saturates_the_tokenizer_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "tokenizer.json",
        r#"{"added_tokens":[{"id":18446744073709551615,"content":"x"}]}"#,
    );
    let info = TokenizerInfo::read_dir(dir.path())
        .expect("valid JSON")
        .expect("the file exists");
    assert_eq!(info.size, usize::MAX);
    assert_eq!(info.added_tokens, vec!["x"]);
}

fn llama_config(extra: serde_json::Value) -> ModelConfig {
    let mut raw = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                         "num_hidden_layers": 2, "intermediate_size": 128});
    for (k, v) in extra.as_object().expect("an object") {
        raw[k] = v.clone();
    }
    ModelConfig::from_value(raw)
}

/// `head_dim` 4·10¹² sized the rotary frequency table (8 TB): an allocation abort found through
/// the `model_config` target. Now `Unsupported`, naming the key.
#[test]
fn config_with_a_huge_head_dim_is_unsupported() {
    let config = llama_config(json!({"head_dim": 4_000_000_000_000u64}));
    let err = Architecture::from_config(&config, &|_| true).expect_err("head_dim is absurd");
    assert!(err.reason.contains("`head_dim`"), "{}", err.reason);
    let fine = llama_config(json!({"head_dim": 16}));
    assert!(Architecture::from_config(&fine, &|_| true).is_ok());
}

/// `num_hidden_layers` 4·10¹² sized the per-layer attention-window table: the same abort.
#[test]
fn config_with_a_huge_layer_count_is_unsupported() {
    let config = llama_config(json!({"num_hidden_layers": 4_000_000_000_000u64}));
    let err = Architecture::from_config(&config, &|_| true).expect_err("layer count is absurd");
    assert!(err.reason.contains("`num_hidden_layers`"), "{}", err.reason);
}
