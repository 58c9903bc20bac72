//! The parts of a transformers `config.json` that decide how weights are laid out and merged.
//!
//! Real configs spell the same thing several ways (GPT-2's `n_embd` vs `hidden_size`, `torch_dtype`
//! vs transformers v5's `dtype`, `rope_theta` at top level vs inside `rope_parameters`), and omit
//! fields whose defaults depend on the model class (`tie_word_embeddings`). This module resolves
//! all of that once so no other module looks at raw JSON.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// Errors reading `config.json`.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] crate::io::json_file::JsonFileError),
    #[error("`{path}` is not a JSON object")]
    NotAnObject { path: PathBuf },
}

/// A resolved model configuration. Every field is optional because a bare `.safetensors` base
/// comes without any config, and checks degrade gracefully rather than guess.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    pub path: Option<PathBuf>,
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
    pub name_or_path: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rope_theta: Option<f64>,
    /// `rope_scaling` / `rope_parameters` as written (for the forward pass).
    pub rope_scaling: Option<Value>,
    pub rms_norm_eps: Option<f64>,
    /// Explicit value, or the model class's default when the key is absent (see `tie_default`).
    pub tie_word_embeddings: bool,
    /// True when `tie_word_embeddings` was written in the file rather than defaulted.
    pub tie_word_embeddings_explicit: bool,
    /// `torch_dtype` or `dtype`, as written (`bfloat16`, `float16`, `float32`).
    pub dtype: Option<String>,
    pub quantization_config: Option<Value>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub raw: Value,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`. Returns `Ok(None)` when the folder has none.
    pub fn read_dir(dir: &Path) -> Result<Option<Self>, ConfigError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::read(&path).map(Some)
    }

    /// Reads and resolves one `config.json`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let raw: Value = crate::io::json_file::read(path)?;
        if !raw.is_object() {
            return Err(ConfigError::NotAnObject {
                path: path.to_path_buf(),
            });
        }
        let mut config = Self::from_value(raw);
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Resolves a parsed config object (aliases, nested rope parameters, class defaults).
    pub fn from_value(raw: Value) -> Self {
        // Multimodal configs nest the language model; its fields are the ones that matter here.
        let text = raw
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(&raw);
        let usize_of = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| text.get(*k).and_then(Value::as_u64))
                .map(|v| v as usize)
        };
        let str_of = |key: &str| text.get(key).and_then(Value::as_str).map(str::to_string);
        let model_type = str_of("model_type").or_else(|| {
            raw.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let rope_parameters = text
            .get("rope_parameters")
            .or_else(|| text.get("rope_scaling"))
            .filter(|v| v.is_object())
            .cloned();
        let rope_theta = text
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .or_else(|| text.get("rotary_emb_base").and_then(Value::as_f64));
        let explicit_tie = raw
            .get("tie_word_embeddings")
            .or_else(|| text.get("tie_word_embeddings"))
            .and_then(Value::as_bool);
        let dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| raw.get(*k).or_else(|| text.get(*k)).and_then(Value::as_str))
            .map(str::to_string);
        let architectures = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        ModelConfig {
            path: None,
            tie_word_embeddings: explicit_tie.unwrap_or_else(|| tie_default(model_type.as_deref())),
            tie_word_embeddings_explicit: explicit_tie.is_some(),
            model_type,
            architectures,
            name_or_path: raw
                .get("_name_or_path")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            vocab_size: usize_of(&["vocab_size"]),
            hidden_size: usize_of(&["hidden_size", "n_embd", "d_model"]),
            intermediate_size: usize_of(&["intermediate_size", "n_inner", "ffn_dim"]),
            num_hidden_layers: usize_of(&["num_hidden_layers", "n_layer", "num_layers"]),
            num_attention_heads: usize_of(&["num_attention_heads", "n_head"]),
            num_key_value_heads: usize_of(&["num_key_value_heads", "num_kv_heads"]),
            head_dim: usize_of(&["head_dim"]),
            max_position_embeddings: usize_of(&["max_position_embeddings", "n_positions"]),
            rope_theta,
            rope_scaling: rope_parameters,
            rms_norm_eps: text
                .get("rms_norm_eps")
                .or_else(|| text.get("layer_norm_eps"))
                .or_else(|| text.get("layer_norm_epsilon"))
                .and_then(Value::as_f64),
            dtype,
            quantization_config: raw
                .get("quantization_config")
                .filter(|v| !v.is_null())
                .cloned(),
            bos_token_id: text.get("bos_token_id").cloned(),
            eos_token_id: text.get("eos_token_id").cloned(),
            pad_token_id: text.get("pad_token_id").cloned(),
            raw,
        }
    }

    /// A short human description of the quantization, when the config declares one.
    pub fn quantization_summary(&self) -> Option<String> {
        let q = self.quantization_config.as_ref()?;
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unknown method");
        let detail = if q.get("load_in_4bit").and_then(Value::as_bool) == Some(true) {
            let kind = q
                .get("bnb_4bit_quant_type")
                .and_then(Value::as_str)
                .unwrap_or("fp4");
            format!(" 4-bit {kind}")
        } else if q.get("load_in_8bit").and_then(Value::as_bool) == Some(true) {
            " 8-bit".to_string()
        } else if let Some(bits) = q.get("bits").and_then(Value::as_u64) {
            format!(" {bits}-bit")
        } else {
            String::new()
        };
        Some(format!("{method}{detail}"))
    }
}

/// transformers' default for `tie_word_embeddings` when a config omits it: `PretrainedConfig`
/// defaults to true, but these classes override it to false in their `__init__`.
fn tie_default(model_type: Option<&str>) -> bool {
    !matches!(
        model_type,
        Some(
            "llama"
                | "mistral"
                | "mixtral"
                | "qwen2"
                | "qwen2_moe"
                | "qwen3"
                | "qwen3_moe"
                | "gpt_neox"
                | "phi3"
                | "olmo"
                | "olmo2"
                | "granite"
                | "starcoder2"
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rope_theta_inside_rope_parameters_and_v5_dtype() {
        let c = ModelConfig::from_value(json!({
            "model_type": "llama", "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}
        }));
        assert_eq!(c.rope_theta, Some(500000.0));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(!c.tie_word_embeddings, "llama defaults to untied");
    }

    #[test]
    fn gpt2_aliases_and_tied_default() {
        let c = ModelConfig::from_value(json!({
            "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "torch_dtype": "float32"
        }));
        assert_eq!(c.hidden_size, Some(64));
        assert_eq!(c.num_hidden_layers, Some(2));
        assert!(c.tie_word_embeddings);
        assert!(!c.tie_word_embeddings_explicit);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn quantization_summary_names_bnb_4bit() {
        let c = ModelConfig::from_value(json!({
            "model_type": "llama",
            "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                                    "bnb_4bit_quant_type": "nf4"}
        }));
        assert_eq!(
            c.quantization_summary().as_deref(),
            Some("bitsandbytes 4-bit nf4")
        );
    }
}
