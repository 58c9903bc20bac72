//! PEFT LoRA adapters on disk: `adapter_config.json` (every field that changes the merge math) and
//! the tensor key grammar of `adapter_model.safetensors`, grouped per wrapped module.
//!
//! The grammar follows what PEFT writes (merge-semantics.md §1.3): `lora_A/B.weight`,
//! `lora_B.bias`, `lora_embedding_A/B`, `lora_magnitude_vector`, `base_layer.weight/bias`,
//! `token_adapter.trainable_tokens_delta`, and full `modules_to_save` copies — with or without the
//! `base_model.model.` prefix and with an optional adapter-name infix (`lora_A.default.weight`)
//! that hand-written save scripts leave in. Pickled `adapter_model.bin` files are refused, never
//! unpickled. A llama.cpp LoRA GGUF is read as the PEFT adapter llama.cpp applies
//! (`io::gguf::adapter`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use thiserror::Error;

use super::checkpoint::{Checkpoint, CheckpointError, TensorInfo};
use super::gguf::adapter as gguf_adapter;

/// Fixed file names PEFT uses (`peft/utils/constants.py`).
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const PICKLE_FILE: &str = "adapter_model.bin";

/// Errors that stop an adapter from being read at all (exit 2). Problems *inside* a readable
/// adapter are findings, not errors.
#[derive(Debug, Error)]
pub enum AdapterError {
    #[error("adapter folder `{path}` does not exist or is not a folder")]
    NotAFolder { path: PathBuf },
    #[error(
        "no `adapter_config.json` in `{path}`: without it the rank, alpha and scaling are unknown (save the adapter with PEFT's `save_pretrained`, or restore the config that came with it)"
    )]
    MissingConfig { path: PathBuf },
    #[error(transparent)]
    File(#[from] crate::io::json_file::JsonFileError),
    #[error("`{path}`: field `{field}` {problem}")]
    BadField {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error(
        "`{path}` is a {peft_type} adapter, not LoRA; lora-doctor checks LoRA adapters (peft_type \"LORA\") only"
    )]
    NotLora { path: PathBuf, peft_type: String },
    #[error(
        "`{path}` holds only `adapter_model.bin`, a PyTorch pickle, which lora-doctor never unpickles; convert it once in Python: `PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`"
    )]
    PickleOnly { path: PathBuf },
    #[error("no `adapter_model.safetensors` in `{path}`")]
    MissingWeights { path: PathBuf },
    #[error(
        "`{path}`: {key} pattern `{pattern}` is not a regex lora-doctor can evaluate: {source}"
    )]
    BadPattern {
        path: PathBuf,
        key: &'static str,
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error(transparent)]
    Weights(#[from] CheckpointError),
}

/// `target_modules` / `exclude_modules`: a list of names (exact or dotted-suffix match), one regex
/// string (full match), or PEFT's `all-linear` shorthand.
#[derive(Debug, Clone)]
pub enum ModuleSelector {
    Names(Vec<String>),
    Regex {
        pattern: String,
        /// `pattern` anchored at both ends, compiled once when the config is read.
        matcher: Regex,
    },
    /// Every linear layer but the output head (PEFT expands it from module types at load time).
    AllLinear,
}

/// One `rank_pattern` or `alpha_pattern` entry, compiled the way PEFT ≥ 0.15 matches it.
#[derive(Debug, Clone)]
pub struct PatternEntry<T> {
    pub key: String,
    pub value: T,
    matcher: Regex,
}

/// The fields of `adapter_config.json` that change the merge, resolved with PEFT's defaults.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub path: PathBuf,
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    /// `bias`: "none", "all" or "lora_only".
    pub bias: String,
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    pub modules_to_save: Vec<String>,
    /// In file order — PEFT writes sorted keys and uses the first match, so file order is the
    /// precedence order.
    pub rank_pattern: Vec<PatternEntry<usize>>,
    pub alpha_pattern: Vec<PatternEntry<f64>>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    /// `init_lora_weights` as written (true, false, "gaussian", "pissa", "loftq", …).
    pub init_lora_weights: Value,
    pub raw: Value,
}

/// Rank, alpha and scaling that apply to one module after pattern resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleScaling {
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`, or `alpha / sqrt(r)` under rsLoRA (Python float64, as PEFT computes it).
    pub scale: f64,
    /// The rank_pattern key that decided `r`, if any.
    pub rank_key: Option<String>,
    /// The alpha_pattern key that decided `alpha`, if any.
    pub alpha_key: Option<String>,
}

impl AdapterConfig {
    /// Parses and validates `adapter_config.json`.
    pub fn read(path: &Path) -> Result<Self, AdapterError> {
        let raw: Value = crate::io::json_file::read(path)?;
        Self::from_value(path, raw)
    }

    pub(crate) fn from_value(path: &Path, raw: Value) -> Result<Self, AdapterError> {
        let bad = |field: &str, problem: &str| AdapterError::BadField {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem: problem.to_string(),
        };
        if !raw.is_object() {
            return Err(bad("(root)", "is not a JSON object"));
        }
        // PEFT's `PeftConfig.from_pretrained` dispatches on this field and refuses a config
        // without it; guessing LoRA would check an adapter no loader can use.
        let peft_type = match raw.get("peft_type") {
            None | Some(Value::Null) => {
                return Err(bad(
                    "peft_type",
                    "is missing, so PEFT cannot load this adapter (a LoRA adapter saved by PEFT has \
                     \"peft_type\": \"LORA\"; restore the adapter_config.json PEFT wrote)",
                ));
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("peft_type", "is not a string")),
        };
        if !peft_type.eq_ignore_ascii_case("LORA") {
            return Err(AdapterError::NotLora {
                path: path.to_path_buf(),
                peft_type,
            });
        }
        let flag = |field: &str| -> Result<bool, AdapterError> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(field, "is not true/false")),
            }
        };
        let r = match raw.get("r") {
            None | Some(Value::Null) => 8,
            Some(v) => {
                v.as_u64()
                    .filter(|r| *r > 0)
                    .ok_or_else(|| bad("r", "must be a positive integer"))? as usize
            }
        };
        let lora_alpha = match raw.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad("lora_alpha", "must be a finite number"))?,
        };
        let rank_pattern = compile_patterns(path, "rank_pattern", raw.get("rank_pattern"), |v| {
            v.as_u64().filter(|r| *r > 0).map(|r| r as usize)
        })?;
        let alpha_pattern =
            compile_patterns(path, "alpha_pattern", raw.get("alpha_pattern"), |v| {
                v.as_f64().filter(|a| a.is_finite())
            })?;
        let layers_to_transform = match raw.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![
                n.as_u64()
                    .ok_or_else(|| bad("layers_to_transform", "must be a layer index"))?
                    as usize,
            ]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_u64().map(|i| i as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform", "must list layer indices"))?,
            ),
            Some(_) => return Err(bad("layers_to_transform", "must be an int or a list")),
        };
        let layers_pattern = match raw.get("layers_pattern") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(_) => return Err(bad("layers_pattern", "must be a string or a list")),
        };
        Ok(AdapterConfig {
            path: path.to_path_buf(),
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            use_dora: flag("use_dora")?,
            lora_bias: flag("lora_bias")?,
            bias: raw
                .get("bias")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            target_modules: selector(path, "target_modules", raw.get("target_modules"))?,
            exclude_modules: selector(path, "exclude_modules", raw.get("exclude_modules"))?,
            modules_to_save: string_list(raw.get("modules_to_save")),
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path: raw
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            task_type: raw
                .get("task_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            init_lora_weights: raw.get("init_lora_weights").cloned().unwrap_or(Value::Null),
            peft_type,
            raw,
        })
    }

    /// Rank, alpha and scale for a module, as `LoraModel._create_and_replace` resolves them:
    /// the first pattern key (file order) matching `(.*\.)?(key)$` over the whole module name.
    /// `module` is the name inside the task model, without `base_model.model.`.
    pub fn scaling_for(&self, module: &str) -> ModuleScaling {
        let rank_hit = self
            .rank_pattern
            .iter()
            .find(|p| p.matcher.is_match(module));
        let alpha_hit = self
            .alpha_pattern
            .iter()
            .find(|p| p.matcher.is_match(module));
        let r = rank_hit.map_or(self.r, |p| p.value);
        let alpha = alpha_hit.map_or(self.lora_alpha, |p| p.value);
        ModuleScaling {
            r,
            alpha,
            scale: lora_scale(alpha, r, self.use_rslora),
            rank_key: rank_hit.map(|p| p.key.clone()),
            alpha_key: alpha_hit.map(|p| p.key.clone()),
        }
    }

    /// True when `module` is listed in (or, for a regex, matched by) `target_modules`.
    /// For validation only: the adapter's tensors decide what is merged.
    pub fn targets(&self, module: &str) -> Option<bool> {
        self.target_modules
            .as_ref()
            .map(|selector| selector.matches(module))
    }
    /// Whether PEFT would wrap `module` with a LoRA layer given this config (`target_modules`,
    /// `exclude_modules`, `layers_to_transform`). A LoRA tensor for a module PEFT does not wrap is
    /// dropped at load time. `Err` carries the reason.
    ///
    /// Follows PEFT's `check_target_module_exists`: exclusions first; then a regex string
    /// full-matches; a list entry equal to the whole path selects it outright; a dotted-suffix
    /// match is further filtered by `layers_to_transform` (a module whose layer index cannot be
    /// read is then not wrapped).
    pub fn wraps(&self, module: &str) -> Result<(), String> {
        // `target_parameters` wraps stacked expert parameters (see `io::experts`).
        if super::expert_params::param_module(&self.raw, module).is_some() {
            return Ok(());
        }
        if let Some(selector) = &self.exclude_modules
            && excluded(selector, module)
        {
            return Err("`exclude_modules` excludes this module".into());
        }
        if self.targets(module) == Some(false) {
            return Err("`target_modules` does not select this module".into());
        }
        let suffix_match = match &self.target_modules {
            Some(ModuleSelector::Names(names)) => !names.iter().any(|n| n == module),
            _ => false,
        };
        let layers = self.layers_to_transform.as_ref().filter(|l| !l.is_empty());
        if let (true, Some(layers)) = (suffix_match, layers) {
            match layer_index(module, &self.layers_pattern) {
                Some(index) if layers.contains(&index) => {}
                Some(index) => {
                    return Err(format!(
                        "layer {index} is not in `layers_to_transform` {layers:?}"
                    ));
                }
                None => {
                    return Err(format!(
                        "no layer index matching `layers_pattern` {:?} in its path, and \
                         `layers_to_transform` {layers:?} is set",
                        self.layers_pattern
                    ));
                }
            }
        }
        Ok(())
    }
}

/// PEFT's scaling rule (`LoraLayer.update_layer`): `alpha/sqrt(r)` with rsLoRA, else `alpha/r`.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if r == 0 {
        return 0.0;
    }
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

impl ModuleSelector {
    /// PEFT's `check_target_module_exists`: a regex string must match the whole name; a list
    /// entry matches the name exactly or as a dotted suffix. `all-linear` matches everything here
    /// (the linear-only restriction needs module types, which a checkpoint does not store).
    pub fn matches(&self, module: &str) -> bool {
        match self {
            ModuleSelector::AllLinear => true,
            ModuleSelector::Regex { matcher, .. } => matcher.is_match(module),
            ModuleSelector::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
        }
    }

    /// How the config wrote it, for summaries.
    pub fn describe(&self) -> String {
        match self {
            ModuleSelector::Names(names) => names.join(", "),
            ModuleSelector::Regex { pattern, .. } => format!("regex {pattern}"),
            ModuleSelector::AllLinear => "all-linear".into(),
        }
    }
}

/// Reads `target_modules` / `exclude_modules` as PEFT does. A regex PEFT's `re.fullmatch` would
/// reject (or one this engine cannot evaluate) is an error: PEFT refuses to load such an adapter,
/// and a selector that silently matches nothing would merge nothing.
fn selector(
    path: &Path,
    key: &'static str,
    value: Option<&Value>,
) -> Result<Option<ModuleSelector>, AdapterError> {
    let bad_type = || AdapterError::BadField {
        path: path.to_path_buf(),
        field: key.to_string(),
        problem: "must be a regex string or a list of module names".to_string(),
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
            Ok(Some(ModuleSelector::AllLinear))
        }
        Some(Value::String(pattern)) => {
            let matcher = compile_pattern(path, key, pattern, &format!("^(?:{pattern})$"))?;
            Ok(Some(ModuleSelector::Regex {
                pattern: pattern.clone(),
                matcher,
            }))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad_type))
            .collect::<Result<Vec<_>, _>>()
            .map(|names| Some(ModuleSelector::Names(names))),
        Some(_) => Err(bad_type()),
    }
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Compiles `anchored` (the config's `pattern` as PEFT applies it); a regex that does not
/// compile is an error naming the config key and the pattern as written.
fn compile_pattern(
    path: &Path,
    key: &'static str,
    pattern: &str,
    anchored: &str,
) -> Result<Regex, AdapterError> {
    Regex::new(anchored).map_err(|source| AdapterError::BadPattern {
        path: path.to_path_buf(),
        key,
        pattern: pattern.to_string(),
        source: Box::new(source),
    })
}

fn compile_patterns<T>(
    path: &Path,
    key: &'static str,
    value: Option<&Value>,
    parse: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<PatternEntry<T>>, AdapterError> {
    let Some(Value::Object(map)) = value else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::with_capacity(map.len());
    for (pattern, v) in map {
        let value = parse(v).ok_or_else(|| AdapterError::BadField {
            path: path.to_path_buf(),
            field: format!("{key}.{pattern}"),
            problem: "has an invalid value".to_string(),
        })?;
        // peft/utils/other.py `get_pattern_key`: re.match(rf"(.*\.)?({key})$", name)
        let matcher = compile_pattern(path, key, pattern, &format!(r"^(?:.*\.)?(?:{pattern})$"))?;
        entries.push(PatternEntry {
            key: pattern.clone(),
            value,
            matcher,
        });
    }
    Ok(entries)
}

/// What an adapter tensor is, from its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TensorRole {
    LoraA,
    LoraB,
    LoraBBias,
    EmbeddingA,
    EmbeddingB,
    Magnitude,
    /// A full replacement weight (`modules_to_save`, resized embeddings, `base_layer.weight`).
    FullWeight,
    /// A full replacement bias (`bias="all"/"lora_only"`, `modules_to_save`).
    FullBias,
    TrainableTokens,
    /// `modules_to_save`'s frozen `original_module` copy: kept for unloading, never merged.
    OriginalModule,
    /// A key this grammar does not know.
    Unknown,
}

impl TensorRole {
    /// The key suffix a user would recognise.
    pub fn label(self) -> &'static str {
        match self {
            TensorRole::LoraA => "lora_A",
            TensorRole::LoraB => "lora_B",
            TensorRole::LoraBBias => "lora_B.bias",
            TensorRole::EmbeddingA => "lora_embedding_A",
            TensorRole::EmbeddingB => "lora_embedding_B",
            TensorRole::Magnitude => "lora_magnitude_vector",
            TensorRole::FullWeight => "full weight",
            TensorRole::FullBias => "full bias",
            TensorRole::TrainableTokens => "trainable_tokens_delta",
            TensorRole::OriginalModule => "original_module",
            TensorRole::Unknown => "unknown",
        }
    }
}

/// One adapter tensor, parsed.
#[derive(Debug, Clone)]
pub struct AdapterTensor {
    /// The key as stored.
    pub key: String,
    /// The wrapped module's path in the task model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    pub role: TensorRole,
    /// An adapter-name infix found in the key (`default` in `lora_A.default.weight`).
    pub adapter_name: Option<String>,
    pub info: TensorInfo,
}

/// All tensors an adapter holds for one module.
#[derive(Debug, Clone, Default)]
pub struct AdapterModule {
    pub name: String,
    pub tensors: BTreeMap<TensorRole, AdapterTensor>,
    /// Second tensors of a role already present (two infixes, say) and unknown keys.
    pub extra: Vec<AdapterTensor>,
}

impl AdapterModule {
    pub fn get(&self, role: TensorRole) -> Option<&AdapterTensor> {
        self.tensors.get(&role)
    }

    /// True when this module carries a low-rank update (linear or embedding LoRA).
    pub fn has_lora(&self) -> bool {
        [
            TensorRole::LoraA,
            TensorRole::LoraB,
            TensorRole::EmbeddingA,
            TensorRole::EmbeddingB,
        ]
        .iter()
        .any(|r| self.tensors.contains_key(r))
    }

    /// True when the LoRA on this module is an embedding LoRA.
    pub fn is_embedding_lora(&self) -> bool {
        self.tensors.contains_key(&TensorRole::EmbeddingA)
            || self.tensors.contains_key(&TensorRole::EmbeddingB)
    }

    /// The LoRA rank seen in the tensors: rows of A (or of lora_embedding_A).
    pub fn tensor_rank(&self) -> Option<usize> {
        self.get(TensorRole::LoraA)
            .or_else(|| self.get(TensorRole::EmbeddingA))
            .and_then(|t| t.info.shape.first().copied())
    }
}

/// A PEFT LoRA adapter folder (or a llama.cpp LoRA GGUF seen as one), parsed and memory-mapped.
pub struct Adapter {
    /// The folder; for a GGUF adapter, the file.
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub weights: Checkpoint,
    /// Grouped by module name, sorted.
    pub modules: BTreeMap<String, AdapterModule>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("dir", &self.dir)
            .field("modules", &self.modules.len())
            .finish()
    }
}

impl Adapter {
    /// Opens an adapter folder: config first (so a wrong `peft_type` is named before anything
    /// else), then the safetensors weights.
    pub fn open(dir: &Path) -> Result<Self, AdapterError> {
        if !dir.is_dir() {
            return Err(AdapterError::NotAFolder {
                path: dir.to_path_buf(),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(AdapterError::MissingConfig {
                path: dir.to_path_buf(),
            });
        }
        let config = AdapterConfig::read(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            if dir.join(PICKLE_FILE).is_file() {
                return Err(AdapterError::PickleOnly {
                    path: dir.to_path_buf(),
                });
            }
            return Err(AdapterError::MissingWeights {
                path: dir.to_path_buf(),
            });
        }
        let weights = Checkpoint::open_file(&weights_path)?;
        Ok(Self::from_parts(dir.to_path_buf(), config, weights))
    }

    /// Opens what `--adapter` names: a PEFT folder, or a llama.cpp LoRA adapter GGUF file.
    /// `base_heads` are the base's `(n_head, n_head_kv)`, which a GGUF adapter needs to undo the
    /// q/k row permutation (the adapter file does not carry them).
    pub fn open_any(path: &Path, base_heads: Option<(usize, usize)>) -> Result<Self, AdapterError> {
        if path.is_file() {
            Self::open_gguf(path, base_heads)
        } else {
            Self::open(path)
        }
    }

    /// Opens a llama.cpp LoRA adapter (`convert_lora_to_gguf.py` output) as the PEFT adapter
    /// llama.cpp applies: `io::gguf::adapter` names its tensors and builds its config. `dir` is
    /// the file itself.
    pub fn open_gguf(
        path: &Path,
        base_heads: Option<(usize, usize)>,
    ) -> Result<Self, AdapterError> {
        let mut alpha = 0.0;
        let mut ranks = BTreeMap::new();
        let weights = Checkpoint::open_gguf_with(path, |header| {
            let (_, a) = gguf_adapter::describe(header)?;
            alpha = a;
            ranks = gguf_adapter::module_ranks(header);
            let arch = header.architecture().unwrap_or_default().to_string();
            let (n_head, n_head_kv) = match base_heads {
                Some(heads) => heads,
                None if !crate::io::gguf::names::permutes_qk(&arch) => (0, 0),
                None => {
                    return Err("the base's attention head counts are unknown (no config), and                                 a llama GGUF adapter's q/k factors cannot be un-permuted without                                 them"
                        .into());
                }
            };
            Ok(move |t: &crate::io::gguf::TensorHeader| {
                gguf_adapter::peft_view(t, &arch, n_head, n_head_kv)
            })
        })?;
        let raw = gguf_adapter::peft_config(alpha, &ranks);
        let config = AdapterConfig::from_value(path, raw)?;
        Ok(Self::from_parts(path.to_path_buf(), config, weights))
    }

    /// Opens a llama.cpp LoRA adapter for listing only (`inspect`): names, shapes, ranks and
    /// scales, without the base's head counts. Reading a q/k B factor from it fails loudly (its
    /// rows cannot be un-permuted without them); every other tensor reads normally.
    pub fn open_gguf_listing(path: &Path) -> Result<Self, AdapterError> {
        Self::open_gguf(path, Some((0, 0)))
    }

    /// Groups the tensors of an adapter checkpoint by module.
    fn from_parts(dir: PathBuf, config: AdapterConfig, weights: Checkpoint) -> Self {
        let mut modules: BTreeMap<String, AdapterModule> = BTreeMap::new();
        for info in weights.tensors() {
            let tensor = parse_key(info.clone());
            let module = modules
                .entry(tensor.module.clone())
                .or_insert_with(|| AdapterModule {
                    name: tensor.module.clone(),
                    ..AdapterModule::default()
                });
            if tensor.role == TensorRole::Unknown || module.tensors.contains_key(&tensor.role) {
                module.extra.push(tensor);
            } else {
                module.tensors.insert(tensor.role, tensor);
            }
        }
        // PEFT's nested expert wrappers are named by the parameter each wraps.
        for (old, renamed) in super::expert_params::param_renames(&config.raw, modules.keys()) {
            if let Some(mut module) = modules.remove(&old) {
                module.name = renamed.clone();
                let rename = |t: &mut AdapterTensor| t.module = renamed.clone();
                module.tensors.values_mut().for_each(rename);
                module.extra.iter_mut().for_each(rename);
                modules.insert(renamed, module);
            }
        }
        Adapter {
            dir,
            config,
            weights,
            modules,
        }
    }

    /// True for a llama.cpp GGUF adapter (its `dir` is the file).
    pub fn is_gguf(&self) -> bool {
        self.weights.gguf().is_some()
    }

    /// Total bytes of tensor data.
    pub fn nbytes(&self) -> usize {
        self.weights.tensors().map(TensorInfo::nbytes).sum()
    }
}

/// PEFT's `exclude_modules`: a string is a full-match regex, a list matches exactly or as suffix.
fn excluded(selector: &ModuleSelector, module: &str) -> bool {
    match selector {
        ModuleSelector::AllLinear => false,
        other => other.matches(module),
    }
}

/// The layer index PEFT's `layers_to_transform` filter reads from a module path
/// (`check_target_module_exists`: the first `.<name>.<digits>.` segment, or the one after
/// `layers_pattern`).
pub fn layer_index(module: &str, layers_pattern: &[String]) -> Option<usize> {
    let patterns: Vec<String> = if layers_pattern.is_empty() {
        vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
    } else {
        layers_pattern
            .iter()
            .map(|p| format!(r"^.*?\.{}\.(\d+)\.", regex::escape(p)))
            .collect()
    };
    patterns.iter().find_map(|p| {
        Regex::new(p)
            .ok()?
            .captures(module)?
            .get(1)?
            .as_str()
            .parse()
            .ok()
    })
}

/// The prefix PEFT puts before every module path on save.
const PEFT_PREFIX: &str = "base_model.model.";

/// Parses one key into (module, role, adapter-name infix). Unknown shapes of keys become
/// `TensorRole::Unknown` rather than errors, so they surface as findings.
pub fn parse_key(info: TensorInfo) -> AdapterTensor {
    let key = info.name.clone();
    let path = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
    let segments: Vec<&str> = path.split('.').collect();
    // A `base_layer` followed by another marker is a nested PEFT wrapper (`ParamWrapper`s on one
    // module): it belongs to the module path (renamed by `expert_params::param_renames`).
    let nested = |i: usize| {
        segments[i] == "base_layer"
            && segments
                .get(i + 1)
                .is_some_and(|n| matches!(*n, "base_layer" | "lora_A" | "lora_B"))
    };
    let marker = (0..segments.len()).find(|&i| {
        !nested(i)
            && matches!(
                segments[i],
                "lora_A"
                    | "lora_B"
                    | "lora_embedding_A"
                    | "lora_embedding_B"
                    | "lora_magnitude_vector"
                    | "base_layer"
                    | "token_adapter"
                    | "modules_to_save"
                    | "original_module"
            )
    });
    let (module, role, adapter_name) = match marker {
        Some(i) if i > 0 => {
            let module = segments[..i].join(".");
            let rest = &segments[i + 1..];
            let (role, name) = classify(segments[i], rest);
            (module, role, name)
        }
        _ => match segments.split_last() {
            Some((&"weight", head)) if !head.is_empty() => {
                (head.join("."), TensorRole::FullWeight, None)
            }
            Some((&"bias", head)) if !head.is_empty() => {
                (head.join("."), TensorRole::FullBias, None)
            }
            _ => (path.to_string(), TensorRole::Unknown, None),
        },
    };
    AdapterTensor {
        key,
        module,
        role,
        adapter_name,
        info,
    }
}

fn classify(marker: &str, rest: &[&str]) -> (TensorRole, Option<String>) {
    // `rest` is what follows the marker: [], [name], [weight], [name, weight], ...
    let (name, tail): (Option<String>, Vec<&str>) = match rest {
        [] => (None, vec![]),
        [only] if matches!(*only, "weight" | "bias" | "trainable_tokens_delta") => {
            (None, vec![*only])
        }
        [first, tail @ ..] if !matches!(*first, "weight" | "bias") => {
            (Some((*first).to_string()), tail.to_vec())
        }
        other => (None, other.to_vec()),
    };
    let role = match (marker, tail.as_slice()) {
        ("lora_A", ["weight"]) => TensorRole::LoraA,
        ("lora_B", ["weight"]) => TensorRole::LoraB,
        ("lora_B", ["bias"]) => TensorRole::LoraBBias,
        ("lora_embedding_A", []) => TensorRole::EmbeddingA,
        ("lora_embedding_B", []) => TensorRole::EmbeddingB,
        ("lora_magnitude_vector", [] | ["weight"]) => TensorRole::Magnitude,
        ("base_layer", ["weight"]) | ("modules_to_save", ["weight"]) => TensorRole::FullWeight,
        ("base_layer", ["bias"]) | ("modules_to_save", ["bias"]) => TensorRole::FullBias,
        ("token_adapter", ["trainable_tokens_delta"]) => TensorRole::TrainableTokens,
        ("original_module", ["weight" | "bias"]) => TensorRole::OriginalModule,
        // `token_adapter.trainable_tokens_delta.<name>`: the name follows the parameter.
        ("token_adapter", []) if name.as_deref() == Some("trainable_tokens_delta") => {
            return (TensorRole::TrainableTokens, None);
        }
        _ => TensorRole::Unknown,
    };
    // For `base_layer.weight` the "name" slot never holds an adapter name.
    (
        role,
        if role == TensorRole::Unknown {
            None
        } else {
            name
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(name: &str) -> TensorInfo {
        // Build through a tiny real safetensors header so TensorInfo stays private-constructed.
        let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&0f32.to_le_bytes());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.safetensors");
        std::fs::write(&file, bytes).expect("write");
        let ckpt = Checkpoint::open_file(&file).expect("open");
        ckpt.info(name).expect("info").clone()
    }

    fn role_of(key: &str) -> (String, TensorRole, Option<String>) {
        let t = parse_key(info(key));
        (t.module, t.role, t.adapter_name)
    }

    #[test]
    fn key_grammar() {
        let q = "model.layers.0.self_attn.q_proj";
        let cases = [
            (
                format!("base_model.model.{q}.lora_A.weight"),
                TensorRole::LoraA,
                None,
            ),
            (
                format!("base_model.model.{q}.lora_B.weight"),
                TensorRole::LoraB,
                None,
            ),
            (
                format!("base_model.model.{q}.lora_B.bias"),
                TensorRole::LoraBBias,
                None,
            ),
            (
                format!("base_model.model.{q}.lora_A.default.weight"),
                TensorRole::LoraA,
                Some("default"),
            ),
            (
                format!("base_model.model.{q}.lora_magnitude_vector"),
                TensorRole::Magnitude,
                None,
            ),
            (
                format!("base_model.model.{q}.lora_magnitude_vector.default.weight"),
                TensorRole::Magnitude,
                Some("default"),
            ),
            (format!("{q}.lora_A.weight"), TensorRole::LoraA, None),
            (
                format!("base_model.model.{q}.base_layer.bias"),
                TensorRole::FullBias,
                None,
            ),
            (
                format!("base_model.model.{q}.weight"),
                TensorRole::FullWeight,
                None,
            ),
            (
                format!("base_model.model.{q}.lora_C.weight"),
                TensorRole::FullWeight,
                None,
            ),
        ];
        for (key, role, name) in cases {
            let (module, got, got_name) = role_of(&key);
            assert_eq!(got, role, "{key}");
            assert_eq!(got_name.as_deref(), name, "{key}");
            if role != TensorRole::FullWeight {
                assert_eq!(module, q, "{key}");
            }
        }
        let (module, role, _) = role_of("base_model.model.model.embed_tokens.lora_embedding_A");
        assert_eq!(
            (module.as_str(), role),
            ("model.embed_tokens", TensorRole::EmbeddingA)
        );
        let (module, role, _) = role_of("base_model.model.lm_head.modules_to_save.default.weight");
        assert_eq!((module.as_str(), role), ("lm_head", TensorRole::FullWeight));
        let (_, role, _) = role_of("base_model.model.x.lora_A.default.extra.weight");
        assert_eq!(role, TensorRole::Unknown);
    }

    #[test]
    fn pattern_precedence_follows_file_order_and_anchors() {
        let cfg = AdapterConfig::from_value(
            Path::new("adapter_config.json"),
            json!({
                "peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
                "rank_pattern": {"down_proj": 4, "layers.1.self_attn.q_proj": 2},
                "alpha_pattern": {"v_proj": 32}
            }),
        )
        .expect("config");
        let s = cfg.scaling_for("model.layers.1.mlp.down_proj");
        assert_eq!((s.r, s.alpha, s.scale), (4, 16.0, 4.0));
        let s = cfg.scaling_for("model.layers.1.self_attn.q_proj");
        assert_eq!((s.r, s.scale), (2, 8.0));
        // `(.*\.)?` requires a dot boundary: `xdown_proj` is not `down_proj`.
        assert_eq!(cfg.scaling_for("model.layers.0.mlp.xdown_proj").r, 8);
        let s = cfg.scaling_for("model.layers.0.self_attn.v_proj");
        assert_eq!((s.r, s.alpha, s.scale), (8, 32.0, 4.0));
    }

    #[test]
    fn layer_index_follows_peft() {
        assert_eq!(layer_index("model.layers.12.mlp.down_proj", &[]), Some(12));
        assert_eq!(
            layer_index("model.layers.3.mlp.experts.7.w1", &["layers".into()]),
            Some(3)
        );
        assert_eq!(layer_index("lm_head", &[]), None);
    }

    #[test]
    fn rslora_scale() {
        assert!((lora_scale(16.0, 16, true) - 4.0).abs() < 1e-12);
        assert!((lora_scale(16.0, 16, false) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn non_lora_peft_type_is_refused() {
        let err = AdapterConfig::from_value(Path::new("c.json"), json!({"peft_type": "IA3"}))
            .expect_err("IA3 is not LoRA");
        assert!(err.to_string().contains("IA3"));
    }

    #[test]
    fn selector_semantics() {
        let names = ModuleSelector::Names(vec!["q_proj".into()]);
        assert!(names.matches("model.layers.0.self_attn.q_proj"));
        assert!(!names.matches("model.layers.0.self_attn.xq_proj"));
        let config = |target: Value| {
            AdapterConfig::from_value(
                Path::new("c.json"),
                json!({"peft_type": "LORA", "target_modules": target}),
            )
        };
        let re = config(json!(r".*\.(q_proj|v_proj)$"))
            .expect("a valid regex")
            .target_modules
            .expect("a selector");
        assert!(re.matches("model.layers.0.self_attn.v_proj"));
        assert!(!re.matches("model.layers.0.self_attn.k_proj"));
        // PEFT full-matches a string: a bare name is not a suffix pattern.
        let bare = config(json!("q_proj")).expect("valid").target_modules;
        assert!(bare.is_some_and(|b| !b.matches("model.layers.0.self_attn.q_proj")));
        assert!(matches!(
            config(json!("ALL-LINEAR")).expect("valid").target_modules,
            Some(ModuleSelector::AllLinear)
        ));
        let err = config(json!("(q_proj")).expect_err("unbalanced parenthesis");
        assert!(err.to_string().contains("(q_proj"), "{err}");
        for wrong in [json!(3), json!(["q_proj", 1])] {
            let err = config(wrong).expect_err("neither a string nor a list of strings");
            assert!(err.to_string().contains("target_modules"), "{err}");
        }
    }

    #[test]
    fn wraps_follows_peft_check_target_module_exists() {
        let config = |extra: Value| {
            let mut raw = json!({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]});
            for (k, v) in extra.as_object().expect("object") {
                raw[k] = v.clone();
            }
            AdapterConfig::from_value(Path::new("c.json"), raw).expect("valid config")
        };
        let q0 = "model.layers.0.self_attn.q_proj";
        let q1 = "model.layers.1.self_attn.q_proj";
        let plain = config(json!({}));
        assert!(plain.wraps(q0).is_ok() && plain.wraps("model.layers.0.mlp.up_proj").is_err());
        let layers = config(json!({"layers_to_transform": [1], "layers_pattern": "layers"}));
        assert!(layers.wraps(q0).is_err() && layers.wraps(q1).is_ok());
        // An empty list means "every layer" in PEFT.
        assert!(config(json!({"layers_to_transform": []})).wraps(q0).is_ok());
        // A pattern that names no segment of the path: PEFT cannot read the index, so no wrap.
        let other = config(json!({"layers_to_transform": [0], "layers_pattern": "h"}));
        assert!(other.wraps(q0).is_err());
        // The whole path listed: selected outright, layer filter not applied.
        let exact = config(json!({"target_modules": [q0], "layers_to_transform": [1]}));
        assert!(exact.wraps(q0).is_ok());
        let excluded = config(json!({"exclude_modules": ["layers.0.self_attn.q_proj"]}));
        assert!(excluded.wraps(q0).is_err() && excluded.wraps(q1).is_ok());
        let excluded_re = config(json!({"exclude_modules": r".*\.0\..*"}));
        assert!(excluded_re.wraps(q0).is_err() && excluded_re.wraps(q1).is_ok());
        let all = config(json!({"target_modules": "all-linear"}));
        assert!(all.wraps("model.layers.0.mlp.down_proj").is_ok());
    }

    #[test]
    fn a_config_without_peft_type_is_refused() {
        for raw in [json!({}), json!({"r": 8, "lora_alpha": 16})] {
            let err = AdapterConfig::from_value(Path::new("c.json"), raw).expect_err("no type");
            assert!(err.to_string().contains("peft_type"), "{err}");
        }
    }
}
