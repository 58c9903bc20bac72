//! The inputs every merge-evaluating command opens the same way: the base checkpoint (with its
//! config.json and tokenizer), every adapter, and the structural rules run on them. Unreadable
//! input is an error (exit 2); a misfit is findings.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::findings::conversion;
use crate::findings::structure::{self, StructureInput};
use crate::io::adapter::Adapter;
use crate::io::base_folder;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::tokenizer::TokenizerInfo;

/// Inputs opened and structurally checked, shared by `check` and `merge`.
pub struct Loaded {
    pub base: Checkpoint,
    pub base_config: Option<ModelConfig>,
    pub adapters: Vec<Adapter>,
    pub findings: Vec<crate::findings::Finding>,
    pub structures: Vec<structure::StructureReport>,
}

/// A GGUF base describes itself: its config comes from the GGUF metadata (a config.json beside
/// the file is not read — the file is what llama.cpp serves), and so does its tokenizer's size
/// unless a tokenizer.json lies beside it (the same tokenizer the prompts are scored with).
fn gguf_config_and_tokenizer(
    base: &Checkpoint,
    header: &crate::io::gguf::GgufHeader,
) -> anyhow::Result<(Option<ModelConfig>, Option<TokenizerInfo>)> {
    let config = base
        .gguf_config()
        .unwrap_or_else(|| Err("the base is not a GGUF file".to_string()))
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the model config of `{}`", base.path.display()))?;
    let mut config = ModelConfig::from_value(config);
    config.path = Some(base.path.clone());
    let beside = TokenizerInfo::read_dir(&base_folder(&base.path))?;
    let tokenizer = beside.or_else(|| {
        crate::io::gguf::tokenizer::tokenizer_json(header)
            .ok()
            .map(|json| TokenizerInfo::from_value(base.path.clone(), &json))
    });
    Ok((Some(config), tokenizer))
}

/// llama.cpp refuses a GGUF adapter whose architecture is not the model's
/// (`llama_adapter_lora_init_impl`), and so does lora-doctor: its names and row order follow it.
fn gguf_adapter_fits(adapter: &Adapter, base_config: Option<&ModelConfig>) -> anyhow::Result<()> {
    let Some(header) = adapter.weights.gguf() else {
        return Ok(());
    };
    let adapter_type = crate::io::gguf::model_type(header).map_err(anyhow::Error::msg)?;
    match base_config.and_then(|c| c.model_type.as_deref()) {
        Some(base_type) if base_type != adapter_type => anyhow::bail!(
            "the GGUF adapter `{}` is for `{adapter_type}` models but the base is `{base_type}`; \
             llama.cpp refuses it too (\"model arch and LoRA arch mismatch\") — convert the \
             adapter with this base (convert_lora_to_gguf.py --base <base folder>)",
            adapter.dir.display()
        ),
        _ => Ok(()),
    }
}

/// For a llama.cpp GGUF adapter lying in the PEFT folder it was converted from: whether
/// llama.cpp applies what PEFT applies (`adapter-conversion`).
fn conversion_findings(
    gguf: &Adapter,
    base_heads: Option<(usize, usize)>,
) -> anyhow::Result<Vec<crate::findings::Finding>> {
    let Some(dir) = conversion::peft_folder_beside(&gguf.dir) else {
        return Ok(Vec::new());
    };
    let peft = match Adapter::open_any(&dir, base_heads) {
        Ok(peft) => peft,
        Err(e) => return Ok(vec![conversion::unreadable(&dir, &e)]),
    };
    conversion::cross_check(gguf, &peft).with_context(|| {
        format!(
            "cross-checking `{}` with `{}`",
            gguf.dir.display(),
            dir.display()
        )
    })
}

/// Opens the base and every adapter (exit 2 on unreadable input) and runs the structural rules.
pub fn load(base_path: &Path, adapter_dirs: &[PathBuf]) -> anyhow::Result<Loaded> {
    let base = Checkpoint::open(base_path)
        .with_context(|| format!("cannot open the base `{}`", base_path.display()))?;
    let folder = base_folder(base_path);
    let (base_config, base_tokenizer) = match base.gguf() {
        Some(header) => gguf_config_and_tokenizer(&base, header)?,
        None => (
            ModelConfig::read_dir(&folder)?,
            TokenizerInfo::read_dir(&folder)?,
        ),
    };
    let base_heads = base_config.as_ref().and_then(|c| {
        let n_head = c.num_attention_heads?;
        Some((n_head, c.num_key_value_heads.unwrap_or(n_head)))
    });
    let mut adapters = Vec::with_capacity(adapter_dirs.len());
    for dir in adapter_dirs {
        let adapter = Adapter::open_any(dir, base_heads)
            .with_context(|| format!("cannot read the adapter `{}`", dir.display()))?;
        gguf_adapter_fits(&adapter, base_config.as_ref())?;
        adapters.push(adapter);
    }
    let mut findings = Vec::new();
    let mut structures = Vec::new();
    for adapter in &adapters {
        let adapter_tokenizer = TokenizerInfo::read_dir(&adapter.dir)?;
        let mut result = structure::check(&StructureInput {
            base: &base,
            base_config: base_config.as_ref(),
            base_tokenizer: base_tokenizer.as_ref(),
            adapter,
            adapter_tokenizer: adapter_tokenizer.as_ref(),
        })
        .with_context(|| format!("reading the adapter tensors in `{}`", adapter.dir.display()))?;
        if adapter.is_gguf() {
            let mut conversion = conversion_findings(adapter, base_heads)?;
            for f in &mut conversion {
                f.adapter = Some(result.adapter.clone());
            }
            result.findings.append(&mut conversion);
        }
        findings.append(&mut result.findings);
        structures.push(result);
    }
    Ok(Loaded {
        base,
        base_config,
        adapters,
        findings,
        structures,
    })
}

/// Where a text read through the model's tokenizer came from, as reports name it.
pub fn text_source(file: Option<&Path>, builtin: &str) -> String {
    file.map_or_else(|| builtin.to_string(), |p| p.display().to_string())
}

/// Tokenizes `file` (or the built-in `builtin` text) with the adapters' or the base's tokenizer
/// (a GGUF base without tokenizer.json: the one inside the file), keeping at most `max_tokens`
/// tokens in sequences of at most `max_len` positions.
pub fn tokenized_text(
    file: Option<&Path>,
    builtin: &str,
    base_path: &Path,
    base: &Checkpoint,
    adapters: &[Adapter],
    max_tokens: usize,
    max_len: usize,
) -> anyhow::Result<crate::io::prompts::TokenizedPrompts> {
    use crate::io::prompts;
    let texts = match file {
        Some(path) => prompts::read_prompts(path)?,
        None => prompts::split_paragraphs(builtin),
    };
    let dirs: Vec<&Path> = adapters.iter().map(|a| a.dir.as_path()).collect();
    // The rebuilt tokenizer file lives until the prompts are tokenized.
    let (tokenizer, _rebuilt) = match (
        prompts::find_tokenizer(&dirs, &base_folder(base_path)),
        base.gguf(),
    ) {
        (Some(path), _) => (path, None),
        (None, Some(header)) => {
            let file = crate::io::tokenizer::gguf_tokenizer_file(header).with_context(|| {
                format!("rebuilding the tokenizer of `{}`", base_path.display())
            })?;
            (file.path().to_path_buf(), Some(file))
        }
        (None, None) => return Err(prompts::PromptError::NoTokenizer.into()),
    };
    Ok(prompts::tokenize(&tokenizer, &texts, max_tokens, max_len)?)
}
