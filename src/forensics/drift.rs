//! Config drift: the files beside the weights that change what a deployed model generates —
//! special-token ids in config.json, generation_config.json, the chat template and the
//! tokenizer — compared between the merged folder and the folder it should have copied them
//! from (the adapter's when it ships the file, since added tokens and templates are saved there,
//! else the base's).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ConfigDifference;

/// config.json keys that decide generation.
const CONFIG_KEYS: &[&str] = &["bos_token_id", "eos_token_id", "pad_token_id"];
/// config.json keys of the forward pass a merge must carry over and that the logit comparison
/// cannot see for a `--merged` folder (it runs the merged weights under the base's architecture):
/// Gemma 2/3's soft-caps (a merged Gemma 2 without them still loads, and degrades), query scalar
/// and sliding window, the MLP activation, Phi-3's LongRoPE pretraining length. Looked up in
/// `text_config` when the base nests one; compared only when the base writes the key, numbers by
/// value (transformers 5.x re-saves each of these keys unchanged, checked per config class).
const FORWARD_KEYS: &[&str] = &[
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "sliding_window",
    "hidden_activation",
    "hidden_act",
    "original_max_position_embeddings",
];
/// generation_config.json keys that are bookkeeping, not behaviour.
const GENERATION_IGNORED: &[&str] = &["transformers_version", "_from_model_config"];
/// tokenizer_config.json keys that change tokenization or the prompt format.
const TOKENIZER_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
];

/// The folders to compare: the merged one, the adapters' (last wins) and the base's.
pub struct Folders<'a> {
    pub merged: &'a Path,
    pub adapters: Vec<&'a Path>,
    pub base: &'a Path,
}

impl Folders<'_> {
    /// The folder expected values come from: the last adapter folder for which `has` holds,
    /// else the base folder if it holds there, with its label (`adapter` / `base`).
    fn source(&self, has: impl Fn(&Path) -> bool) -> Option<(&Path, &'static str)> {
        self.adapters
            .iter()
            .rev()
            .map(|d| (*d, "adapter"))
            .chain(std::iter::once((self.base, "base")))
            .find(|(d, _)| has(d))
    }

    /// Where the expected copy of `file` comes from (see [`Self::source`]).
    fn reference(&self, file: &str) -> Option<(&'static str, PathBuf)> {
        self.source(|d| d.join(file).is_file())
            .map(|(d, label)| (label, d.join(file)))
    }
}

fn read_json(path: &Path) -> Option<Value> {
    match read_json_checked(path) {
        JsonFile::Parsed(v) => Some(v),
        JsonFile::Absent | JsonFile::Invalid(_) => None,
    }
}

/// A JSON side file as a loader sees it: missing, present but unreadable, or parsed.
enum JsonFile {
    Absent,
    Invalid(String),
    Parsed(Value),
}

fn read_json_checked(path: &Path) -> JsonFile {
    if !path.is_file() {
        return JsonFile::Absent;
    }
    match std::fs::read_to_string(path) {
        Err(e) => JsonFile::Invalid(e.to_string()),
        Ok(text) => match serde_json::from_str(&text) {
            Ok(v) => JsonFile::Parsed(v),
            Err(e) => JsonFile::Invalid(format!("not valid JSON: {e}")),
        },
    }
}

/// The `key` of a difference about a whole file (missing, extra, unreadable).
pub const FILE_KEY: &str = "(file)";

/// JSON equality with numbers compared by value (`256` and `256.0` are one setting).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Shows a value short enough for a table cell.
fn show(v: Option<&Value>) -> String {
    let s = match v {
        None => return "(absent)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let one_line = s.replace('\n', "⏎");
    if one_line.chars().count() > 80 {
        let head: String = one_line.chars().take(77).collect();
        format!("{head}… ({} chars)", s.chars().count())
    } else {
        one_line
    }
}

/// Every generation-relevant difference.
pub fn compare(folders: &Folders<'_>) -> Vec<ConfigDifference> {
    let mut out = Vec::new();
    let mut push =
        |file: &str, key: &str, reference: &'static str, e: Option<&Value>, f: Option<&Value>| {
            out.push(ConfigDifference {
                file: file.to_string(),
                key: key.to_string(),
                reference,
                expected: show(e),
                found: show(f),
            });
        };

    // config.json: adapters do not ship one, so the base is the reference. A merged folder
    // without a readable one cannot be loaded at all.
    let merged_config = match read_json_checked(&folders.merged.join("config.json")) {
        JsonFile::Parsed(v) => Some(v),
        JsonFile::Absent => {
            push(
                "config.json",
                FILE_KEY,
                "base",
                Some(&Value::String("present".into())),
                None,
            );
            None
        }
        JsonFile::Invalid(why) => {
            push(
                "config.json",
                FILE_KEY,
                "base",
                Some(&Value::String("present".into())),
                Some(&Value::String(format!("(invalid: {why})"))),
            );
            None
        }
    };
    if let (Some(expected), Some(found)) =
        (read_json(&folders.base.join("config.json")), merged_config)
    {
        for key in CONFIG_KEYS {
            if expected.get(*key) != found.get(*key) {
                push(
                    "config.json",
                    key,
                    "base",
                    expected.get(*key),
                    found.get(*key),
                );
            }
        }
        let text = |v: &Value| v.get("text_config").filter(|t| t.is_object()).cloned();
        let (expected_text, found_text) = (text(&expected), text(&found));
        let expected_scope = expected_text.as_ref().unwrap_or(&expected);
        let found_scope = found_text.as_ref().unwrap_or(&found);
        for key in FORWARD_KEYS {
            let Some(want) = expected_scope.get(*key) else {
                continue;
            };
            let got = found_scope.get(*key);
            if !got.is_some_and(|got| same_value(want, got)) {
                push("config.json", key, "base", Some(want), got);
            }
        }
    }

    // generation_config.json: every behavioural key.
    let file = "generation_config.json";
    if let Some((reference, path)) = folders.reference(file) {
        let expected = read_json(&path).unwrap_or(Value::Null);
        match read_json_checked(&folders.merged.join(file)) {
            JsonFile::Absent => push(
                file,
                FILE_KEY,
                reference,
                Some(&Value::String("present".into())),
                None,
            ),
            JsonFile::Invalid(why) => push(
                file,
                FILE_KEY,
                reference,
                Some(&Value::String("present".into())),
                Some(&Value::String(format!("(invalid: {why})"))),
            ),
            JsonFile::Parsed(found) => {
                let mut keys: Vec<&String> = expected
                    .as_object()
                    .into_iter()
                    .chain(found.as_object())
                    .flat_map(|o| o.keys())
                    .collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    if GENERATION_IGNORED.contains(&key.as_str()) {
                        continue;
                    }
                    if expected.get(key) != found.get(key) {
                        push(file, key, reference, expected.get(key), found.get(key));
                    }
                }
            }
        }
    }

    // A folder without any tokenizer file is one problem, not one per key.
    const TOKENIZER_FILES: &[&str] = &[
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
    ];
    let has_tokenizer = |dir: &Path| TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file());
    if !has_tokenizer(folders.merged) {
        let reference = folders.source(has_tokenizer);
        if let Some((_, reference)) = reference {
            push(
                "tokenizer files",
                FILE_KEY,
                reference,
                Some(&Value::String("present".into())),
                None,
            );
        }
        return out;
    }

    // The chat template: tokenizer_config.json's `chat_template` or chat_template.jinja.
    let template = |dir: &Path| -> Option<Value> {
        std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .map(Value::String)
            .or_else(|| {
                read_json(&dir.join("tokenizer_config.json"))
                    .and_then(|c| c.get("chat_template").cloned())
            })
    };
    let template_source = folders.source(|d| {
        d.join("chat_template.jinja").is_file() || d.join("tokenizer_config.json").is_file()
    });
    if let Some((dir, reference)) = template_source {
        let (expected, found) = (template(dir), template(folders.merged));
        let file = if dir.join("chat_template.jinja").is_file()
            || folders.merged.join("chat_template.jinja").is_file()
        {
            "chat_template.jinja"
        } else {
            "tokenizer_config.json"
        };
        if expected != found {
            push(
                file,
                "chat_template",
                reference,
                expected.as_ref(),
                found.as_ref(),
            );
        }
    }

    // tokenizer_config.json special tokens.
    let file = "tokenizer_config.json";
    if let Some((reference, path)) = folders.reference(file)
        && let Some(expected) = read_json(&path)
    {
        let found = read_json(&folders.merged.join(file)).unwrap_or(Value::Null);
        for key in TOKENIZER_KEYS {
            if expected.get(*key) != found.get(*key) {
                push(file, key, reference, expected.get(*key), found.get(*key));
            }
        }
    }

    // tokenizer.json: compared as parsed JSON (formatting is not a difference).
    let file = "tokenizer.json";
    if let Some((reference, path)) = folders.reference(file) {
        let merged_path = folders.merged.join(file);
        if !merged_path.is_file() {
            push(
                file,
                FILE_KEY,
                reference,
                Some(&Value::String("present".into())),
                None,
            );
        } else {
            let (expected, found) = (read_json(&path), read_json(&merged_path));
            if expected != found {
                let keys = differing_keys(expected.as_ref(), found.as_ref());
                push(
                    file,
                    &keys,
                    reference,
                    Some(&Value::String(tokenizer_summary(expected.as_ref()))),
                    Some(&Value::String(tokenizer_summary(found.as_ref()))),
                );
            }
        }
    }
    out
}

/// Top-level keys whose values differ (`model`, `added_tokens`, …).
fn differing_keys(a: Option<&Value>, b: Option<&Value>) -> String {
    let (Some(Value::Object(a)), Some(Value::Object(b))) = (a, b) else {
        return "(content)".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Vocabulary size and added-token count of a tokenizer.json.
fn tokenizer_summary(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "unreadable".into();
    };
    let vocab = v.pointer("/model/vocab").and_then(|x| {
        x.as_object()
            .map(|o| o.len())
            .or(x.as_array().map(Vec::len))
    });
    let added = v
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::len);
    format!(
        "vocab {}, {} added tokens",
        vocab.map_or("?".into(), |n| n.to_string()),
        added.map_or("?".into(), |n| n.to_string())
    )
}

/// The `file` of a GGUF metadata difference.
pub const GGUF_FILE: &str = "GGUF metadata";

/// `tokenizer.ggml.*` keys whose value changes what llama.cpp feeds the model or when it stops
/// (`tokenizer.ggml.pre` is compared by what the pre-tokenizer does, not by name).
const GGUF_TOKENIZER_KEYS: &[&str] = &[
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
];
/// The add-special flags, compared by the value llama.cpp runs with: the flag when written, else
/// its default for a BPE vocabulary (`llama_vocab::impl::load`: false, true for the pre-tokenizers
/// listed in [`ADDS_BOS_BY_DEFAULT`]).
const GGUF_ADD_FLAGS: &[&str] = &[
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
];
/// BPE pre-tokenizers for which llama.cpp adds BOS unless told otherwise (of the ones lora-doctor
/// names; `llama-bpe` is Llama 3's).
const ADDS_BOS_BY_DEFAULT: &[&str] = &["llama-bpe", "llama3"];
const GGUF_PRE_KEY: &str = "tokenizer.ggml.pre";

/// Shows a GGUF metadata value short enough for a table cell (arrays by length).
fn show_meta(v: Option<&crate::io::gguf::MetaValue>) -> String {
    use crate::io::gguf::MetaValue;
    match v {
        None => "(absent)".into(),
        Some(MetaValue::Array(items)) => format!("{} entries", items.len()),
        Some(MetaValue::Str(s)) => show(Some(&Value::String(s.clone()))),
        Some(other) => match (other.as_u64(), other.as_bool(), other.as_f64()) {
            (Some(n), _, _) => n.to_string(),
            (_, Some(b), _) => b.to_string(),
            (_, _, Some(x)) => x.to_string(),
            _ => format!("{other:?}"),
        },
    }
}

/// Config drift of a GGUF merge: its tokenizer metadata against what `convert_hf_to_gguf.py`
/// writes from the reference tokenizer (the adapter's tokenizer.json when it ships one, else the
/// base's): the vocabulary and merges, special ids, add_bos/add_eos, the chat template and what
/// the pre-tokenizer does (the llama.cpp #7062 failure: right weights, wrong pre-tokenizer). A
/// reference tokenizer lora-doctor cannot translate (not byte-level BPE) leaves the special ids
/// of config.json to compare.
pub fn compare_gguf(
    header: &crate::io::gguf::GgufHeader,
    folders: &Folders<'_>,
    base_config: Option<&crate::io::config::ModelConfig>,
) -> Vec<ConfigDifference> {
    use crate::io::gguf::{MetaValue, tokenizer};
    let file = GGUF_FILE.to_string();
    let mut out = Vec::new();
    let Some((reference, path)) = folders.reference("tokenizer.json") else {
        return out;
    };
    let Some(tokenizer_json) = read_json(&path) else {
        return out;
    };
    // The tokenizer_config.json (and chat template) of the folder the tokenizer comes from.
    let dir = path.parent().unwrap_or(folders.base);
    let tokenizer_config = tokenizer::tokenizer_config_with_template(
        dir,
        read_json(&dir.join("tokenizer_config.json")),
    );
    let config = base_config.cloned().unwrap_or_else(|| {
        crate::io::config::ModelConfig::from_value(Value::Object(Default::default()))
    });
    let expected =
        match tokenizer::tokenizer_metadata(&tokenizer_json, tokenizer_config.as_ref(), &config) {
            Ok(meta) => meta,
            Err(_) => {
                // Not translatable: compare the special ids config.json states.
                for (key, config_key) in [
                    ("tokenizer.ggml.bos_token_id", &config.bos_token_id),
                    ("tokenizer.ggml.eos_token_id", &config.eos_token_id),
                ] {
                    let want = config_key.as_ref().and_then(Value::as_u64);
                    let found = header.get(key).and_then(MetaValue::as_u64);
                    if want.is_some() && want != found {
                        out.push(ConfigDifference {
                            file: file.clone(),
                            key: key.to_string(),
                            reference: "base",
                            expected: want.map_or("(absent)".into(), |v| v.to_string()),
                            found: found.map_or("(absent)".into(), |v| v.to_string()),
                        });
                    }
                }
                return out;
            }
        };
    let want = |key: &str| expected.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    for key in GGUF_TOKENIZER_KEYS {
        let (e, f) = (want(key), header.get(key));
        // Integers compare by value: a converter may write an id as u32 or i32.
        let same = match (e.and_then(MetaValue::as_u64), f.and_then(MetaValue::as_u64)) {
            (Some(a), Some(b)) => a == b,
            _ => e == f,
        };
        if !same {
            let (mut expected_text, mut found_text) = (show_meta(e), show_meta(f));
            if let (Some(MetaValue::Array(a)), Some(MetaValue::Array(b))) = (e, f)
                && let Some(i) = a.iter().zip(b.iter()).position(|(x, y)| x != y)
            {
                expected_text.push_str(&format!(", first difference at {i}"));
                found_text.push_str(&format!(", first difference at {i}"));
            }
            out.push(ConfigDifference {
                file: file.clone(),
                key: key.to_string(),
                reference,
                expected: expected_text,
                found: found_text,
            });
        }
    }
    fn pre_of(meta: Option<&MetaValue>) -> &str {
        meta.and_then(MetaValue::as_str).unwrap_or("default")
    }
    for key in GGUF_ADD_FLAGS {
        let effective = |flag: Option<&MetaValue>, pre: &str| {
            flag.and_then(MetaValue::as_bool)
                .unwrap_or(key.ends_with("add_bos_token") && ADDS_BOS_BY_DEFAULT.contains(&pre))
        };
        let e = effective(want(key), pre_of(want(GGUF_PRE_KEY)));
        let f = effective(header.get(key), pre_of(header.get(GGUF_PRE_KEY)));
        if e != f {
            out.push(ConfigDifference {
                file: file.clone(),
                key: key.to_string(),
                reference,
                expected: e.to_string(),
                found: f.to_string(),
            });
        }
    }
    // The pre-tokenizer: equal when both names split text the same way; a name lora-doctor does
    // not know cannot be judged and is left alone.
    let expected_pre = want(GGUF_PRE_KEY).and_then(MetaValue::as_str);
    let found_pre = header.get(GGUF_PRE_KEY).and_then(MetaValue::as_str);
    if let (Some(e), Some(f)) = (expected_pre, found_pre)
        && e != f
        && let (Ok(ev), Ok(fv)) = (tokenizer::pre_tokenizer(e), tokenizer::pre_tokenizer(f))
        && tokenizer::pre_name(&ev) != tokenizer::pre_name(&fv)
    {
        out.push(ConfigDifference {
            file: file.clone(),
            key: GGUF_PRE_KEY.to_string(),
            reference,
            expected: e.to_string(),
            found: f.to_string(),
        });
    } else if expected_pre.is_some() && found_pre.is_none() {
        out.push(ConfigDifference {
            file,
            key: GGUF_PRE_KEY.to_string(),
            reference,
            expected: expected_pre.unwrap_or_default().to_string(),
            found: "(absent)".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).expect("write");
    }

    #[test]
    fn identical_folders_have_no_drift_and_each_change_is_reported() {
        let base = tempfile::tempdir().expect("tmp");
        let merged = tempfile::tempdir().expect("tmp");
        let adapter = tempfile::tempdir().expect("tmp");
        for dir in [base.path(), merged.path()] {
            write(
                dir,
                "config.json",
                r#"{"eos_token_id": 2, "hidden_size": 8}"#,
            );
            write(
                dir,
                "generation_config.json",
                r#"{"eos_token_id": 2, "transformers_version": "4"}"#,
            );
            write(
                dir,
                "tokenizer.json",
                r#"{"model": {"vocab": {"a": 0}}, "added_tokens": []}"#,
            );
        }
        write(
            base.path(),
            "tokenizer_config.json",
            r#"{"eos_token": "</s>"}"#,
        );
        write(
            merged.path(),
            "tokenizer_config.json",
            r#"{"eos_token": "</s>"}"#,
        );
        // Formatting and transformers_version are not drift.
        write(
            merged.path(),
            "generation_config.json",
            "{\n \"eos_token_id\": 2, \"transformers_version\": \"5\"}",
        );
        let folders = Folders {
            merged: merged.path(),
            adapters: vec![adapter.path()],
            base: base.path(),
        };
        assert!(compare(&folders).is_empty(), "{:?}", compare(&folders));

        write(
            merged.path(),
            "config.json",
            r#"{"eos_token_id": 5, "hidden_size": 8}"#,
        );
        write(
            adapter.path(),
            "tokenizer_config.json",
            r#"{"eos_token": "<|im_end|>", "chat_template": "{{ x }}"}"#,
        );
        std::fs::remove_file(merged.path().join("tokenizer.json")).expect("rm");
        let found = compare(&folders);
        let keys: Vec<(&str, &str, &str)> = found
            .iter()
            .map(|d| (d.file.as_str(), d.key.as_str(), d.reference))
            .collect();
        assert!(
            keys.contains(&("config.json", "eos_token_id", "base")),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("tokenizer_config.json", "chat_template", "adapter")),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("tokenizer_config.json", "eos_token", "adapter")),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("tokenizer.json", FILE_KEY, "base")),
            "{keys:?}"
        );
    }

    /// A merged Gemma 2 whose config lost its soft-caps is drift; the same values re-written as
    /// floats, or keys the base never wrote, are not.
    #[test]
    fn forward_keys_are_compared_by_value_when_the_base_writes_them() {
        let base = tempfile::tempdir().expect("tmp");
        let merged = tempfile::tempdir().expect("tmp");
        write(
            base.path(),
            "config.json",
            r#"{"query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0}"#,
        );
        write(
            merged.path(),
            "config.json",
            r#"{"query_pre_attn_scalar": 256.0, "final_logit_softcapping": 30,
                "attn_logit_softcapping": 50.0, "sliding_window": 4096}"#,
        );
        let folders = Folders {
            merged: merged.path(),
            adapters: vec![],
            base: base.path(),
        };
        let config_keys = |found: Vec<ConfigDifference>| -> Vec<String> {
            found
                .into_iter()
                .filter(|d| d.file == "config.json")
                .map(|d| d.key)
                .collect()
        };
        assert!(config_keys(compare(&folders)).is_empty());
        write(
            merged.path(),
            "config.json",
            r#"{"query_pre_attn_scalar": 256, "final_logit_softcapping": null}"#,
        );
        assert_eq!(
            config_keys(compare(&folders)),
            ["final_logit_softcapping", "attn_logit_softcapping"]
        );
        // A multimodal config nests the language model's keys.
        write(
            base.path(),
            "config.json",
            r#"{"text_config": {"sliding_window": 512}}"#,
        );
        write(
            merged.path(),
            "config.json",
            r#"{"text_config": {"sliding_window": 4096}}"#,
        );
        assert_eq!(config_keys(compare(&folders)), ["sliding_window"]);
    }

    #[test]
    fn a_folder_without_tokenizer_files_is_one_difference() {
        let base = tempfile::tempdir().expect("tmp");
        let merged = tempfile::tempdir().expect("tmp");
        write(
            base.path(),
            "tokenizer.json",
            r#"{"model": {"vocab": {"a": 0}}}"#,
        );
        write(
            base.path(),
            "tokenizer_config.json",
            r#"{"eos_token": "</s>", "chat_template": "x"}"#,
        );
        for dir in [base.path(), merged.path()] {
            write(dir, "config.json", r#"{"model_type": "llama"}"#);
        }
        let folders = Folders {
            merged: merged.path(),
            adapters: vec![],
            base: base.path(),
        };
        let found = compare(&folders);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].file.as_str(), found[0].key.as_str()),
            ("tokenizer files", FILE_KEY)
        );
    }

    #[test]
    fn a_missing_or_unparseable_side_file_is_named_as_such() {
        let base = tempfile::tempdir().expect("tempdir");
        let merged = tempfile::tempdir().expect("tempdir");
        write(base.path(), "config.json", r#"{"model_type": "llama"}"#);
        write(
            base.path(),
            "generation_config.json",
            r#"{"eos_token_id": 2}"#,
        );
        write(merged.path(), "generation_config.json", "{not json");
        let folders = Folders {
            merged: merged.path(),
            adapters: vec![],
            base: base.path(),
        };
        let found = compare(&folders);
        let config = found
            .iter()
            .find(|d| d.file == "config.json")
            .expect("a missing config.json is a difference");
        assert_eq!(
            (config.key.as_str(), config.found.as_str()),
            (FILE_KEY, "(absent)")
        );
        let generation = found
            .iter()
            .find(|d| d.file == "generation_config.json")
            .expect("an invalid generation_config.json is a difference");
        assert!(
            generation.found.starts_with("(invalid: not valid JSON"),
            "{generation:?}"
        );
    }
}
