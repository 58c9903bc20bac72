//! Tokenizer facts read from `tokenizer.json` headers: how many ids it can emit, and which tokens
//! were added on top of the base vocabulary. Enough to check vocabulary sizes against embedding
//! rows without loading a tokenizer runtime.
//!
//! A GGUF base carries its tokenizer inside (`tokenizer.ggml.*`): [`gguf_tokenizer_file`] rebuilds
//! it as a `tokenizer.json` in a temporary file for the tokenizer runtime. The rule for which
//! tokenizer scores the prompts stays the one of `prompts::find_tokenizer`: an adapter's
//! tokenizer.json first, then one beside the base, and only then the GGUF's own.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// Errors reading `tokenizer.json`.
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error(transparent)]
    File(#[from] crate::io::json_file::JsonFileError),
}

/// What a `tokenizer.json` says about its id space.
#[derive(Debug, Clone)]
pub struct TokenizerInfo {
    pub path: PathBuf,
    /// Highest token id + 1, over the model vocabulary and the added tokens — what `len(tokenizer)`
    /// returns in transformers, and the number of embedding rows the model needs at least.
    pub size: usize,
    /// Contents of `added_tokens` (special or not), in file order.
    pub added_tokens: Vec<String>,
}

impl TokenizerInfo {
    /// Reads `<dir>/tokenizer.json`; `Ok(None)` when the folder has none.
    pub fn read_dir(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let raw: Value = crate::io::json_file::read(&path)?;
        Ok(Some(Self::from_value(path, &raw)))
    }

    /// The facts of an already parsed `tokenizer.json` object (e.g. one rebuilt from a GGUF).
    pub fn from_value(path: PathBuf, raw: &Value) -> Self {
        let mut max_id: Option<u64> = None;
        let mut bump = |id: u64| max_id = Some(max_id.map_or(id, |m| m.max(id)));
        match raw.pointer("/model/vocab") {
            // BPE / WordPiece / WordLevel: token -> id.
            Some(Value::Object(map)) => map.values().filter_map(Value::as_u64).for_each(&mut bump),
            // Unigram: [[token, score], ...], ids are positions.
            Some(Value::Array(items)) if !items.is_empty() => bump(items.len() as u64 - 1),
            _ => {}
        }
        let mut added_tokens = Vec::new();
        if let Some(Value::Array(items)) = raw.get("added_tokens") {
            for item in items {
                if let Some(id) = item.get("id").and_then(Value::as_u64) {
                    bump(id);
                }
                if let Some(content) = item.get("content").and_then(Value::as_str) {
                    added_tokens.push(content.to_string());
                }
            }
        }
        TokenizerInfo {
            path,
            // Saturating: an id of u64::MAX must still read as "needs more rows than any
            // embedding has", not wrap to an empty vocabulary.
            size: max_id.map_or(0, |m| {
                usize::try_from(m.saturating_add(1)).unwrap_or(usize::MAX)
            }),
            added_tokens,
        }
    }
}

/// Writes the tokenizer rebuilt from a GGUF header to a temporary `tokenizer.json` (deleted when
/// the handle drops), or says why it cannot be rebuilt.
pub fn gguf_tokenizer_file(
    header: &crate::io::gguf::GgufHeader,
) -> anyhow::Result<tempfile::NamedTempFile> {
    let json = crate::io::gguf::tokenizer::tokenizer_json(header).map_err(anyhow::Error::msg)?;
    let mut file = tempfile::Builder::new()
        .prefix("lora-doctor-gguf-tokenizer")
        .suffix(".json")
        .tempfile()?;
    serde_json::to_writer(&mut file, &json)?;
    std::io::Write::flush(&mut file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn size_covers_added_tokens_beyond_the_vocab() {
        let raw = json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}},
            "added_tokens": [{"id": 3, "content": "<x>"}, {"id": 4, "content": "<y>"}]
        });
        let info = TokenizerInfo::from_value(PathBuf::from("t.json"), &raw);
        assert_eq!(info.size, 5);
        assert_eq!(info.added_tokens, vec!["<x>", "<y>"]);
    }

    #[test]
    fn unigram_vocab_is_positional() {
        let raw = json!({"model": {"type": "Unigram", "vocab": [["a", 0.0], ["b", -1.0]]}});
        assert_eq!(
            TokenizerInfo::from_value(PathBuf::from("t.json"), &raw).size,
            2
        );
    }
}
