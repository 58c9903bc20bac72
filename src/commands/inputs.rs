//! The inputs every merge-evaluating command opens the same way: the base checkpoint (with its
//! config.json and tokenizer), every adapter, and the structural rules run on them. Unreadable
//! input is an error (exit 2); a misfit is findings.
//!
//! The base is opened on its own ([`open_base`]) so that `check --each` opens it once and checks
//! every adapter against the same [`OpenedBase`]; [`SharedWork`] counts the work done on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::findings::conversion;
use crate::findings::structure::{self, StructureInput};
use crate::io::adapter::Adapter;
use crate::io::base_folder;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::tokenizer::TokenizerInfo;

/// How often this process did the work `check --each` shares between adapters: the report states
/// it, and the tests hold it to once per run whatever the number of adapters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedWork {
    /// Base checkpoints opened (headers parsed, files mapped, config and tokenizer read).
    pub base_opens: usize,
    /// Texts run through a tokenizer (evaluation and calibration texts).
    pub tokenizations: usize,
}

static BASE_OPENS: AtomicUsize = AtomicUsize::new(0);
static TOKENIZATIONS: AtomicUsize = AtomicUsize::new(0);

impl SharedWork {
    /// The counts so far in this process.
    pub fn now() -> Self {
        SharedWork {
            base_opens: BASE_OPENS.load(Ordering::Relaxed),
            tokenizations: TOKENIZATIONS.load(Ordering::Relaxed),
        }
    }

    /// The work done since `earlier`.
    pub fn since(self, earlier: SharedWork) -> Self {
        SharedWork {
            base_opens: self.base_opens - earlier.base_opens,
            tokenizations: self.tokenizations - earlier.tokenizations,
        }
    }
}

/// What identifies a tokenized text: the tokenizer file (or the GGUF base it is rebuilt from),
/// the text (a file, or the address of a built-in text) and the limits.
type TextKey = (Option<PathBuf>, PathBuf, usize, usize);

/// The base checkpoint opened once, with what it describes about itself, and the texts already
/// tokenized for it (every adapter that ships no tokenizer of its own scores the same tokens).
pub struct OpenedBase {
    pub path: PathBuf,
    pub checkpoint: Arc<Checkpoint>,
    pub config: Option<ModelConfig>,
    tokenizer: Option<TokenizerInfo>,
    heads: Option<(usize, usize)>,
    texts: Mutex<HashMap<TextKey, crate::io::prompts::TokenizedPrompts>>,
    /// The base model's logits, kept for the next adapter (`check --each` only: a single check
    /// has no later comparison to share them with).
    pub base_logits: Option<crate::forward::SharedBaseLogits>,
}

impl OpenedBase {
    /// Keeps the base model's logits from one adapter's comparison for the next.
    pub fn shared_across_adapters(mut self) -> Self {
        self.base_logits = Some(crate::forward::SharedBaseLogits::default());
        self
    }
}

/// Opens the base: its tensors' headers, config.json (or GGUF metadata) and tokenizer (exit 2 on
/// unreadable input).
pub fn open_base(base_path: &Path) -> anyhow::Result<OpenedBase> {
    BASE_OPENS.fetch_add(1, Ordering::Relaxed);
    let base = Checkpoint::open(base_path)
        .with_context(|| format!("cannot open the base `{}`", base_path.display()))?;
    let folder = base_folder(base_path);
    let (config, tokenizer) = match base.gguf() {
        Some(header) => gguf_config_and_tokenizer(&base, header)?,
        None => (
            ModelConfig::read_dir(&folder)?,
            TokenizerInfo::read_dir(&folder)?,
        ),
    };
    let heads = config.as_ref().and_then(|c| {
        let n_head = c.num_attention_heads?;
        Some((n_head, c.num_key_value_heads.unwrap_or(n_head)))
    });
    Ok(OpenedBase {
        path: base_path.to_path_buf(),
        checkpoint: Arc::new(base),
        config,
        tokenizer,
        heads,
        texts: Mutex::new(HashMap::new()),
        base_logits: None,
    })
}

/// Inputs opened and structurally checked, shared by `check` and `merge`.
pub struct Loaded {
    pub base: Arc<Checkpoint>,
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
    load_on(&open_base(base_path)?, adapter_dirs)
}

/// Opens every adapter (exit 2 on unreadable input) and runs the structural rules against a base
/// opened already.
pub fn load_on(opened: &OpenedBase, adapter_dirs: &[PathBuf]) -> anyhow::Result<Loaded> {
    let base = &opened.checkpoint;
    let base_config = opened.config.clone();
    let base_tokenizer = opened.tokenizer.as_ref();
    let base_heads = opened.heads;
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
            base,
            base_config: base_config.as_ref(),
            base_tokenizer,
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
        base: Arc::clone(base),
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
    let tokenizer = tokenizer_file(base_path, adapters);
    tokenize(
        file, builtin, base_path, base, tokenizer, max_tokens, max_len,
    )
}

impl OpenedBase {
    /// [`tokenized_text`] on this base, tokenized once per (tokenizer, text, limits): adapters
    /// that ship no tokenizer of their own share the base's tokens.
    pub fn tokenized(
        &self,
        file: Option<&Path>,
        builtin: &'static str,
        adapters: &[Adapter],
        max_tokens: usize,
        max_len: usize,
    ) -> anyhow::Result<crate::io::prompts::TokenizedPrompts> {
        let tokenizer = tokenizer_file(&self.path, adapters);
        // A built-in text is named by its address: the texts are distinct constants.
        let text = file.map_or_else(
            || PathBuf::from(format!("builtin:{:p}", builtin.as_ptr())),
            Path::to_path_buf,
        );
        let key = (tokenizer.clone(), text, max_tokens, max_len);
        if let Some(found) = self.texts.lock().ok().and_then(|t| t.get(&key).cloned()) {
            return Ok(found);
        }
        let tokens = tokenize(
            file,
            builtin,
            &self.path,
            &self.checkpoint,
            tokenizer,
            max_tokens,
            max_len,
        )?;
        if let Ok(mut texts) = self.texts.lock() {
            texts.insert(key, tokens.clone());
        }
        Ok(tokens)
    }
}

/// The tokenizer.json the prompts are tokenized with: the adapters' (added tokens) or the
/// base's; `None` when only a GGUF base's own vocabulary is left.
fn tokenizer_file(base_path: &Path, adapters: &[Adapter]) -> Option<PathBuf> {
    let dirs: Vec<&Path> = adapters.iter().map(|a| a.dir.as_path()).collect();
    crate::io::prompts::find_tokenizer(&dirs, &base_folder(base_path))
}

fn tokenize(
    file: Option<&Path>,
    builtin: &str,
    base_path: &Path,
    base: &Checkpoint,
    tokenizer: Option<PathBuf>,
    max_tokens: usize,
    max_len: usize,
) -> anyhow::Result<crate::io::prompts::TokenizedPrompts> {
    use crate::io::prompts;
    TOKENIZATIONS.fetch_add(1, Ordering::Relaxed);
    let texts = match file {
        Some(path) => prompts::read_prompts(path)?,
        None => prompts::split_paragraphs(builtin),
    };
    // The rebuilt tokenizer file lives until the prompts are tokenized.
    let (tokenizer, _rebuilt) = match (tokenizer, base.gguf()) {
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
