//! Maps adapter module paths to base checkpoint tensors (merge-semantics.md §1.4): exact name,
//! then a toggled `model.` prefix, then known multimodal prefixes, then a unique dotted suffix.
//! A tied `lm_head` with no tensor of its own maps to the input embedding it shares.

use super::checkpoint::Checkpoint;
use super::config::ModelConfig;

/// How a module found its base tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Exact,
    /// Found after adding or removing a known prefix (`model.`, `language_model.`…).
    Prefix,
    /// Found as the only base tensor ending in `.<module>.weight`.
    Suffix,
    /// `lm_head` of a tied model: the tensor is the input embedding.
    TiedHead,
}

/// The base tensor a module maps to: `<prefix>.weight` (and `<prefix>.bias` when present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseTarget {
    /// Module path in the base checkpoint (without `.weight`).
    pub prefix: String,
    pub resolution: Resolution,
}

impl BaseTarget {
    pub fn weight(&self) -> String {
        format!("{}.weight", self.prefix)
    }
    pub fn bias(&self) -> String {
        format!("{}.bias", self.prefix)
    }
}

/// Why a module found no base tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    NotFound,
    /// Several base tensors end with the module path; listing up to a few.
    Ambiguous(Vec<String>),
}

/// Pairs of prefixes that name the same module in different model classes
/// (task model vs bare backbone, VLM in-memory vs on-disk layouts).
const PREFIX_SWAPS: &[(&str, &str)] = &[
    ("model.", ""),
    ("model.language_model.", "language_model.model."),
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("transformer.", ""),
    ("gpt_neox.", ""),
];

/// Fused projections and the separate ones they stand for, in row order (Phi-3's `qkv_proj` holds
/// q, k, v; its `gate_up_proj` gate, up). A copy of such a model with the projections split
/// (Unsloth "llamafies" Phi-3) trains adapters on the separate names.
pub const FUSED_PROJECTIONS: &[(&str, &[&str])] = &[
    ("qkv_proj", &["q_proj", "k_proj", "v_proj"]),
    ("gate_up_proj", &["gate_proj", "up_proj"]),
];

/// The base module that fuses the separate projection `module` (`…self_attn.q_proj` →
/// `…self_attn.qkv_proj`), when the base has it: the adapter was trained on a split copy.
pub fn fused_sibling(module: &str, base: &Checkpoint) -> Option<String> {
    let (parent, leaf) = module.rsplit_once('.')?;
    let (fused, _) = FUSED_PROJECTIONS
        .iter()
        .find(|(_, parts)| parts.contains(&leaf))?;
    resolve(&format!("{parent}.{fused}"), base)
        .ok()
        .map(|target| target.prefix)
}

/// Known names of the input embedding and the output head.
pub const EMBEDDING_SUFFIXES: &[&str] = &[
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
];
pub const HEAD_NAMES: &[&str] = &["lm_head.weight", "embed_out.weight", "output.weight"];

/// Resolves one adapter module path against the base.
pub fn resolve(module: &str, base: &Checkpoint) -> Result<BaseTarget, Unresolved> {
    let has = |prefix: &str| base.contains(&format!("{prefix}.weight"));
    if has(module) {
        return Ok(BaseTarget {
            prefix: module.to_string(),
            resolution: Resolution::Exact,
        });
    }
    for (a, b) in PREFIX_SWAPS {
        for (from, to) in [(a, b), (b, a)] {
            if let Some(rest) = module.strip_prefix(*from) {
                let candidate = format!("{to}{rest}");
                if has(&candidate) {
                    return Ok(BaseTarget {
                        prefix: candidate,
                        resolution: Resolution::Prefix,
                    });
                }
            }
        }
    }
    let wanted = format!(".{module}.weight");
    let matches: Vec<String> = base
        .tensors()
        .filter(|t| t.name.ends_with(&wanted))
        .map(|t| t.name.trim_end_matches(".weight").to_string())
        .collect();
    match matches.len() {
        1 => {
            return Ok(BaseTarget {
                prefix: matches[0].clone(),
                resolution: Resolution::Suffix,
            });
        }
        0 => {}
        _ => return Err(Unresolved::Ambiguous(matches.into_iter().take(4).collect())),
    }
    if is_head_module(module)
        && find_head(base).is_none()
        && let Some(embedding) = find_embedding(base)
    {
        return Ok(BaseTarget {
            prefix: embedding.trim_end_matches(".weight").to_string(),
            resolution: Resolution::TiedHead,
        });
    }
    Err(Unresolved::NotFound)
}

/// True for module paths that name the output head.
pub fn is_head_module(module: &str) -> bool {
    matches!(module.rsplit('.').next(), Some("lm_head" | "embed_out"))
}

/// True for module paths that name the input embedding.
pub fn is_embedding_module(module: &str) -> bool {
    EMBEDDING_SUFFIXES
        .iter()
        .any(|s| format!("{module}.weight").ends_with(s))
}

/// The input embedding tensor's name, if the base has a recognisable one.
pub fn find_embedding(base: &Checkpoint) -> Option<String> {
    base.tensors()
        .find(|t| EMBEDDING_SUFFIXES.iter().any(|s| t.name.ends_with(s)))
        .map(|t| t.name.clone())
}

/// The output head tensor's name, if the base stores one (tied models usually do not).
pub fn find_head(base: &Checkpoint) -> Option<String> {
    base.tensors()
        .find(|t| {
            HEAD_NAMES
                .iter()
                .any(|h| t.name == *h || t.name.ends_with(&format!(".{h}")))
        })
        .map(|t| t.name.clone())
}

/// `model_type`s whose linear layers are transformers' `Conv1D` (weights stored `[in, out]`).
/// The merge reads this list; the forward pass's [`crate::model::Architecture::conv1d`] must
/// agree (a test checks it for every architecture with a forward pass).
pub const CONV1D_MODEL_TYPES: [&str; 3] = ["gpt2", "openai-gpt", "imagegpt"];

/// Whether a `model_type` stores its linear weights `[in, out]` (see [`CONV1D_MODEL_TYPES`]).
pub fn stores_conv1d(model_type: &str) -> bool {
    CONV1D_MODEL_TYPES.contains(&model_type)
}

/// Decides whether a base weight is stored `[in, out]` (GPT-2 style Conv1D).
pub struct Conv1dRule {
    gpt2_family: bool,
    fan_in_fan_out: bool,
}

impl Conv1dRule {
    pub fn new(config: Option<&ModelConfig>, fan_in_fan_out: bool) -> Self {
        let gpt2_family = config
            .and_then(|c| c.model_type.as_deref())
            .is_some_and(stores_conv1d);
        Conv1dRule {
            gpt2_family,
            fan_in_fan_out,
        }
    }

    /// PEFT forces fan_in_fan_out for `transformers.pytorch_utils.Conv1D` whatever the config
    /// says; GPT-2's attention and MLP projections are Conv1D.
    pub fn is_conv1d(&self, module: &str) -> bool {
        if self.gpt2_family {
            return matches!(
                module.rsplit('.').next(),
                Some("c_attn" | "c_proj" | "c_fc" | "q_attn")
            );
        }
        self.fan_in_fan_out
    }
}
