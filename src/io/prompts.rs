//! Evaluation text for the logit comparison: `--prompts FILE` (plain text with paragraphs separated
//! by blank lines, or `.jsonl` with a `text` field per line) or the built-in text below, tokenized
//! with the `tokenizers` crate from `tokenizer.json` (the adapter folder's wins: it knows the
//! added tokens). Prompts are cut so the scored tokens stay within `--max-tokens`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors reading prompts or the tokenizer.
#[derive(Debug, Error)]
pub enum PromptError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` line {line}: {reason}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("`{path}` holds no text")]
    Empty { path: PathBuf },
    #[error("cannot load the tokenizer `{path}`: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error(
        "no tokenizer.json in the adapter folders or next to the base, so the logit comparison cannot run; pass a base folder with tokenizer.json, or add --weights-only for a weights-only gate"
    )]
    NoTokenizer,
}

/// A built-in evaluation text written for lora-doctor: varied prose, code, numbers and a chat
/// turn, about a thousand tokens with common tokenizers. Paragraphs are separate prompts.
pub const BUILTIN_TEXT: &str = include_str!("eval_text.txt");

/// The built-in calibration text for repairs (`merge --repair gptq`, `check --repair gptq`):
/// written for lora-doctor, shares no paragraph with [`BUILTIN_TEXT`], so a repaired candidate is
/// never scored on the text it was fitted to.
pub const CALIBRATION_TEXT: &str = include_str!("calibration_text.txt");

/// Splits plain text into prompts at blank lines.
pub fn split_paragraphs(text: &str) -> Vec<String> {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads `--prompts FILE`.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, PromptError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let prompts =
        if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| PromptError::Jsonl {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason: e.to_string(),
                    })?;
                let text = value.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    PromptError::Jsonl {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason: "no string field `text`".into(),
                    }
                })?;
                out.push(text.to_string());
            }
            out
        } else {
            split_paragraphs(&text)
        };
    if prompts.is_empty() {
        return Err(PromptError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(prompts)
}

/// The first `tokenizer.json` among the adapter folders (last adapter first), else the base's.
pub fn find_tokenizer(adapter_dirs: &[&Path], base_dir: &Path) -> Option<PathBuf> {
    adapter_dirs
        .iter()
        .rev()
        .map(|d| d.join("tokenizer.json"))
        .chain(std::iter::once(base_dir.join("tokenizer.json")))
        .find(|p| p.is_file())
}

/// Token id sequences to score.
#[derive(Debug, Clone)]
pub struct TokenizedPrompts {
    pub tokenizer: PathBuf,
    pub sequences: Vec<Vec<u32>>,
}

impl TokenizedPrompts {
    /// Total tokens scored.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// Tokenizes prompts (with the tokenizer's special tokens, e.g. BOS) and keeps whole or cut
/// sequences until `max_tokens` are reached. Sequences are capped at `max_len` positions.
pub fn tokenize(
    tokenizer_path: &Path,
    prompts: &[String],
    max_tokens: usize,
    max_len: usize,
) -> Result<TokenizedPrompts, PromptError> {
    let tokenizer = load_tokenizer(tokenizer_path)?;
    let mut sequences = Vec::new();
    let mut budget = max_tokens;
    for prompt in prompts {
        if budget < 2 {
            break;
        }
        let encoding =
            tokenizer
                .encode(prompt.as_str(), true)
                .map_err(|e| PromptError::Tokenizer {
                    path: tokenizer_path.to_path_buf(),
                    reason: e.to_string(),
                })?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(budget.min(max_len));
        if ids.len() >= 2 {
            budget -= ids.len();
            sequences.push(ids);
        }
    }
    Ok(TokenizedPrompts {
        tokenizer: tokenizer_path.to_path_buf(),
        sequences,
    })
}

/// Loads `tokenizer.json` as transformers uses it for plain calls: without the file's truncation
/// and padding settings (they would cut or pad the scored sequences, and a huge `Fixed` padding
/// length is an unbounded allocation). The text must be valid JSON before `tokenizers` sees it:
/// `tokenizers` 0.23 panics on a syntax error inside the `decoder` object.
fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, PromptError> {
    let failed = |reason: String| PromptError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| failed(e.to_string()))?;
    let mut tokenizer: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e: tokenizers::Error| failed(e.to_string()))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| failed(e.to_string()))?
        .with_padding(None);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_text_has_several_varied_paragraphs() {
        let paragraphs = split_paragraphs(BUILTIN_TEXT);
        assert!(paragraphs.len() >= 6, "{}", paragraphs.len());
        assert!(BUILTIN_TEXT.contains("fn ") || BUILTIN_TEXT.contains("def "));
        assert!(BUILTIN_TEXT.chars().filter(char::is_ascii_digit).count() > 20);
    }

    #[test]
    fn jsonl_needs_text_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("p.jsonl");
        std::fs::write(&good, "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n").expect("write");
        assert_eq!(read_prompts(&good).expect("read"), vec!["a", "b"]);
        let bad = dir.path().join("q.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"a\"}\n").expect("write");
        let err = read_prompts(&bad).expect_err("no text");
        assert!(err.to_string().contains("line 1"));
    }

    #[test]
    fn tokenizes_within_budget() {
        let tok =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/tiny-llama/tokenizer.json");
        let prompts = split_paragraphs(BUILTIN_TEXT);
        let t = tokenize(&tok, &prompts, 100, 64).expect("tokenize");
        assert!(t.tokens() <= 100 && t.tokens() > 50, "{}", t.tokens());
        assert!(t.sequences.iter().all(|s| s.len() <= 64));
    }
}
