//! Structural rules: does the adapter fit the base at all? Key coverage, shapes, ranks, stray
//! tensors, vocabulary sizes, tied embeddings, non-finite or all-zero adapter weights, and hints
//! that the adapter belongs to another (or a quantized) base.
//!
//! Only headers are needed for the base; adapter tensors are read (they are small) to count
//! non-finite and zero values, in parallel.

use std::collections::BTreeSet;
use std::path::Path;

use rayon::prelude::*;
use regex::Regex;
use serde::Serialize;

use super::{Code, Finding, Level};
use crate::io::adapter::{Adapter, AdapterModule, TensorRole};
use crate::io::checkpoint::{Checkpoint, CheckpointError};
use crate::io::config::ModelConfig;
use crate::io::experts::{self, Unplaced};
use crate::io::mapping::{self, BaseTarget, Resolution, Unresolved};
use crate::io::tokenizer::TokenizerInfo;

/// Everything the structural rules look at for one adapter.
pub struct StructureInput<'a> {
    pub base: &'a Checkpoint,
    pub base_config: Option<&'a ModelConfig>,
    /// The base folder's tokenizer, if any.
    pub base_tokenizer: Option<&'a TokenizerInfo>,
    pub adapter: &'a Adapter,
    /// The adapter folder's tokenizer, if any (it wins: it carries added tokens).
    pub adapter_tokenizer: Option<&'a TokenizerInfo>,
}

/// How one adapter module maps onto the base, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleMatch {
    pub module: String,
    /// Base tensor the module changes, when it resolved.
    pub base_tensor: Option<String>,
    /// `exact`, `prefix`, `suffix`, `tied-head`, or null when unresolved.
    pub resolution: Option<&'static str>,
    /// `lora`, `embedding-lora`, `dora`, `replace`, or `other`.
    pub kind: &'static str,
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub scale: Option<f64>,
}

/// The structural view of one adapter against the base.
#[derive(Debug, Clone, Serialize)]
pub struct StructureReport {
    pub adapter: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub tensors: usize,
    pub bytes: usize,
    pub modules: Vec<ModuleMatch>,
    /// Modules the merge actually uses: they resolve to a base tensor and, for LoRA modules, the
    /// config wraps them (`target_modules`, `exclude_modules`, `layers_to_transform`).
    pub matched: usize,
    #[serde(skip)]
    pub findings: Vec<Finding>,
}

/// Runs every structural rule for one adapter.
pub fn check(input: &StructureInput<'_>) -> Result<StructureReport, CheckpointError> {
    let adapter = input.adapter;
    let mut findings = Vec::new();
    let conv1d = mapping::Conv1dRule::new(input.base_config, adapter.config.fan_in_fan_out);
    let mut matches = Vec::new();
    let mut unresolved = Vec::new();
    let mut merged = 0;
    let mut unwrapped = 0;
    let mut scales = Vec::new();
    for module in adapter.modules.values() {
        let merge_relevant = module
            .tensors
            .keys()
            .any(|role| !matches!(role, TensorRole::Unknown | TensorRole::OriginalModule));
        if experts::is_param_module(&adapter.config, module) {
            unused_tensors(adapter, module, &mut findings);
            let scaling = adapter.config.scaling_for(&module.name);
            let placed = place_expert_wrapper(input.base, adapter, module, scaling.r);
            matches.push(ModuleMatch {
                module: module.name.clone(),
                base_tensor: placed
                    .as_ref()
                    .ok()
                    .and_then(|t| t.first())
                    .map(|t| t.tensor.clone()),
                resolution: placed.is_ok().then_some("experts"),
                kind: module_kind(module),
                r: Some(scaling.r),
                alpha: Some(scaling.alpha),
                scale: Some(scaling.scale),
            });
            match placed {
                Ok(_) => {
                    merged += 1;
                    scales.push((module.name.clone(), scaling));
                }
                Err(Unplaced::NotFound) => {
                    unresolved.push((module.name.clone(), Unresolved::NotFound))
                }
                Err(Unplaced::Shapes(why)) => findings.push(
                    Finding::new(
                        Code::ShapeMismatch,
                        Some(module.name.clone()),
                        format!("the stacked-expert LoRA `{}`: {why}", module.name),
                    )
                    .advice(Code::ShapeMismatch.doc().fix),
                ),
            }
            continue;
        }
        let target = mapping::resolve(&module.name, input.base);
        // A per-expert LoRA on a base that stores its experts stacked.
        if target.is_err()
            && module.has_lora()
            && let Some(slice) = experts::stacked_slice(&module.name, input.base)
        {
            unused_tensors(adapter, module, &mut findings);
            let scaling = adapter.config.scaling_for(&module.name);
            let fits = crate::merge::engine::slice_fits(module, &slice, scaling.r);
            matches.push(ModuleMatch {
                module: module.name.clone(),
                base_tensor: Some(slice.tensor.clone()),
                resolution: Some("experts"),
                kind: module_kind(module),
                r: Some(scaling.r),
                alpha: Some(scaling.alpha),
                scale: Some(scaling.scale),
            });
            if !fits {
                findings.push(
                    Finding::new(
                        Code::ShapeMismatch,
                        Some(module.name.clone()),
                        format!(
                            "`{}`: its lora_A/lora_B do not fit its expert slice of `{}` ({} columns)",
                            module.name, slice.tensor, slice.cols
                        ),
                    )
                    .advice(Code::ShapeMismatch.doc().fix),
                );
            } else if adapter.config.wraps(&module.name).is_ok() {
                merged += 1;
                scales.push((module.name.clone(), scaling));
            } else {
                unwrapped += 1;
            }
            continue;
        }
        let scaling = module
            .has_lora()
            .then(|| adapter.config.scaling_for(&module.name));
        matches.push(ModuleMatch {
            module: module.name.clone(),
            base_tensor: target.as_ref().ok().map(BaseTarget::weight),
            resolution: target.as_ref().ok().map(|t| match t.resolution {
                Resolution::Exact => "exact",
                Resolution::Prefix => "prefix",
                Resolution::Suffix => "suffix",
                Resolution::TiedHead => "tied-head",
            }),
            kind: module_kind(module),
            r: scaling.as_ref().map(|s| s.r),
            alpha: scaling.as_ref().map(|s| s.alpha),
            scale: scaling.as_ref().map(|s| s.scale),
        });
        unused_tensors(adapter, module, &mut findings);
        let wrapped = !module.has_lora() || adapter.config.wraps(&module.name).is_ok();
        if merge_relevant && target.is_ok() {
            if wrapped {
                merged += 1;
                scales.extend(scaling.as_ref().map(|s| (module.name.clone(), s.clone())));
            } else {
                unwrapped += 1;
            }
        }
        match target {
            Ok(target) => {
                rank_rules(adapter, module, &mut findings);
                shape_rules(input.base, module, &target, &conv1d, &mut findings);
            }
            Err(why) if merge_relevant => unresolved.push((module.name.clone(), why)),
            Err(_) => {}
        }
    }
    let matched = merged;
    coverage_rules(
        input.base,
        matched,
        unwrapped,
        unresolved,
        adapter,
        &mut findings,
    );
    scale_rules(adapter, &scales, &mut findings);
    vocab_rules(input, &mut findings);
    tied_rules(input, &mut findings)?;
    findings.extend(value_rules(adapter)?);
    base_identity_rules(input, &mut findings);
    quantized_base_rules(input, &mut findings);
    let label = adapter.dir.display().to_string();
    for finding in &mut findings {
        finding.adapter = Some(label.clone());
    }
    Ok(StructureReport {
        adapter: label,
        base_model_name_or_path: adapter.config.base_model_name_or_path.clone(),
        r: adapter.config.r,
        lora_alpha: adapter.config.lora_alpha,
        use_rslora: adapter.config.use_rslora,
        use_dora: adapter.config.use_dora,
        tensors: adapter.weights.len(),
        bytes: adapter.nbytes(),
        modules: matches,
        matched,
        findings,
    })
}

fn module_kind(module: &AdapterModule) -> &'static str {
    if module.is_embedding_lora() {
        "embedding-lora"
    } else if module.get(TensorRole::Magnitude).is_some() && module.has_lora() {
        "dora"
    } else if module.has_lora() {
        "lora"
    } else if module.get(TensorRole::FullWeight).is_some()
        || module.get(TensorRole::FullBias).is_some()
        || module.get(TensorRole::TrainableTokens).is_some()
    {
        "replace"
    } else {
        "other"
    }
}

fn shape_str(shape: &[usize]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Where a `target_parameters` wrapper's factors land in the base (see `io::experts`).
fn place_expert_wrapper(
    base: &Checkpoint,
    adapter: &Adapter,
    module: &AdapterModule,
    rank: usize,
) -> Result<Vec<experts::ExpertTarget>, Unplaced> {
    let (Some((stack, param)), Some(a), Some(b)) = (
        experts::param_module(&adapter.config, &module.name),
        module.get(TensorRole::LoraA),
        module.get(TensorRole::LoraB),
    ) else {
        return Err(Unplaced::NotFound);
    };
    experts::place(
        &adapter.config,
        stack,
        param,
        &a.info.shape,
        &b.info.shape,
        rank,
        base,
    )
}

fn shape_rules(
    base: &Checkpoint,
    module: &AdapterModule,
    target: &BaseTarget,
    conv1d: &mapping::Conv1dRule,
    findings: &mut Vec<Finding>,
) {
    let Some(weight) = base.info(&target.weight()) else {
        return;
    };
    // Packed integer weights (bnb 4-bit) have no meaningful shape; quantized-base covers them.
    if !weight.dtype.is_float() {
        return;
    }
    let w = &weight.shape;
    let embedding_like = mapping::is_embedding_module(&target.prefix)
        || mapping::is_head_module(&module.name)
        || target.resolution == Resolution::TiedHead;
    let mut mismatch = |role: TensorRole, got: &[usize], expected: String, hint: &str| {
        findings.push(
            Finding::new(
                Code::ShapeMismatch,
                Some(module.name.clone()),
                format!(
                    "`{}` ({}) is {}, but base `{}` is {} so it must be {expected}{hint}",
                    module
                        .get(role)
                        .map(|t| t.key.as_str())
                        .unwrap_or(&module.name),
                    role.label(),
                    shape_str(got),
                    target.weight(),
                    shape_str(w),
                ),
            )
            .advice(Code::ShapeMismatch.doc().fix),
        );
    };
    let is_conv1d = conv1d.is_conv1d(&module.name);
    let (out_dim, in_dims): (usize, Vec<usize>) = match w.as_slice() {
        [a, b] if is_conv1d => (*b, vec![*a]),
        [o, rest @ ..] if !rest.is_empty() => (*o, rest.to_vec()),
        _ => return,
    };
    if let Some(a) = module.get(TensorRole::LoraA) {
        let s = &a.info.shape;
        if s.len() != 1 + in_dims.len() || s[1..] != in_dims[..] {
            let transposed = w.len() == 2 && s.len() == 2 && s[1] == out_dim;
            let hint = if transposed {
                " (the shapes fit the transposed weight: check `fan_in_fan_out`)"
            } else {
                ""
            };
            let expected = format!("[r, {}]", shape_str(&in_dims).trim_matches(['[', ']']));
            mismatch(TensorRole::LoraA, s, expected, hint);
        }
    }
    if let Some(b) = module.get(TensorRole::LoraB) {
        let s = &b.info.shape;
        let trailing_ones = s.iter().skip(2).all(|d| *d == 1);
        if s.len() < 2 || s[0] != out_dim || !trailing_ones {
            mismatch(TensorRole::LoraB, s, format!("[{out_dim}, r]"), "");
        }
    }
    for role in [TensorRole::LoraBBias, TensorRole::Magnitude] {
        if let Some(t) = module.get(role) {
            // DoRA on an embedding keeps one magnitude per embedding dimension.
            let expected = if module.is_embedding_lora() && role == TensorRole::Magnitude {
                *w.last().unwrap_or(&0)
            } else {
                out_dim
            };
            if t.info.shape != [expected] {
                mismatch(role, &t.info.shape, format!("[{expected}]"), "");
            }
        }
    }
    // Embedding LoRA: A [r, num_embeddings], B [embedding_dim, r]; rows are vocab-mismatch's job.
    if let ([rows, dim], true) = (w.as_slice(), module.is_embedding_lora()) {
        if let Some(b) = module.get(TensorRole::EmbeddingB)
            && (b.info.shape.len() != 2 || b.info.shape[0] != *dim)
        {
            mismatch(
                TensorRole::EmbeddingB,
                &b.info.shape,
                format!("[{dim}, r]"),
                "",
            );
        }
        if let Some(a) = module.get(TensorRole::EmbeddingA) {
            let s = &a.info.shape;
            if s.len() != 2 || (s[1] != *rows && !embedding_like) {
                mismatch(TensorRole::EmbeddingA, s, format!("[r, {rows}]"), "");
            }
        }
    }
    if let Some(full) = module.get(TensorRole::FullWeight) {
        let s = &full.info.shape;
        // A different row count on an embedding or head is a resized vocabulary (vocab-mismatch).
        let rows_only = embedding_like && s.len() == w.len() && s[1..] == w[1..];
        if s != w && !rows_only {
            mismatch(TensorRole::FullWeight, s, shape_str(w), "");
        }
    }
    if let Some(tokens) = module.get(TensorRole::TrainableTokens) {
        let s = &tokens.info.shape;
        if s.len() != 2 || Some(&s[1]) != w.last() {
            mismatch(
                TensorRole::TrainableTokens,
                s,
                format!("[n, {}]", w.last().unwrap_or(&0)),
                "",
            );
        }
    }
    if let (Some(bias), Some(base_bias)) =
        (module.get(TensorRole::FullBias), base.info(&target.bias()))
        && bias.info.shape != base_bias.shape
    {
        mismatch(
            TensorRole::FullBias,
            &bias.info.shape,
            shape_str(&base_bias.shape),
            "",
        );
    }
}

fn rank_rules(adapter: &Adapter, module: &AdapterModule, findings: &mut Vec<Finding>) {
    let pairs = [
        (TensorRole::LoraA, TensorRole::LoraB),
        (TensorRole::EmbeddingA, TensorRole::EmbeddingB),
    ];
    for (a_role, b_role) in pairs {
        let (Some(a), Some(b)) = (module.get(a_role), module.get(b_role)) else {
            continue;
        };
        let a_rank = a.info.shape.first().copied().unwrap_or(0);
        let b_rank = b.info.shape.get(1).copied().unwrap_or(0);
        if a_rank != b_rank {
            findings.push(
                Finding::new(
                    Code::RankMismatch,
                    Some(module.name.clone()),
                    format!(
                        "{} has r = {a_rank} rows but {} has r = {b_rank} columns",
                        a_role.label(),
                        b_role.label()
                    ),
                )
                .observed(b_rank as f64, Some(a_rank as f64)),
            );
            continue;
        }
        let scaling = adapter.config.scaling_for(&module.name);
        if scaling.r != a_rank {
            let source = match &scaling.rank_key {
                Some(key) => format!("rank_pattern[\"{key}\"] = {}", scaling.r),
                None => format!("r = {}", scaling.r),
            };
            findings.push(
                Finding::new(
                    Code::RankMismatch,
                    Some(module.name.clone()),
                    format!(
                        "the tensors have rank {a_rank} but adapter_config.json gives {source}; the scale \
                         alpha/r would be computed with the wrong r"
                    ),
                )
                .observed(a_rank as f64, Some(scaling.r as f64)),
            );
        }
    }
}

fn unused_tensors(adapter: &Adapter, module: &AdapterModule, findings: &mut Vec<Finding>) {
    let config = &adapter.config;
    let mut unused = |key: &str, why: String| {
        findings.push(Finding::new(
            Code::UnusedTensor,
            Some(module.name.clone()),
            format!("`{key}` is ignored by the merge: {why}"),
        ));
    };
    if let Some(t) = module.get(TensorRole::LoraBBias)
        && !config.lora_bias
    {
        unused(
            &t.key,
            "adapter_config.json has no `lora_bias: true`, so PEFT drops it".into(),
        );
    }
    if let Some(t) = module.get(TensorRole::Magnitude)
        && !config.use_dora
    {
        unused(
            &t.key,
            "adapter_config.json has no `use_dora: true`, so PEFT drops the magnitude".into(),
        );
    }
    for (one, other) in [
        (TensorRole::LoraA, TensorRole::LoraB),
        (TensorRole::LoraB, TensorRole::LoraA),
        (TensorRole::EmbeddingA, TensorRole::EmbeddingB),
        (TensorRole::EmbeddingB, TensorRole::EmbeddingA),
    ] {
        if let (Some(t), None) = (module.get(one), module.get(other)) {
            unused(
                &t.key,
                format!("it has no {} partner, so there is no ΔW", other.label()),
            );
        }
    }
    for t in &module.extra {
        // PEFT ≥ 0.21 writes a modules_to_save copy both as `<M>.modules_to_save.weight` and, for
        // resized embeddings, as `<M>.weight`; identical duplicates are harmless.
        if let Some(primary) = module.get(t.role)
            && t.role == TensorRole::FullWeight
            && same_bytes(adapter, &primary.key, &t.key)
        {
            continue;
        }
        let why = if t.role == TensorRole::Unknown {
            "the key is outside PEFT's LoRA key grammar".to_string()
        } else {
            format!(
                "a second {} for the module (adapter-name infix `{}`)",
                t.role.label(),
                t.adapter_name.as_deref().unwrap_or("none")
            )
        };
        unused(&t.key, why);
    }
    if module.has_lora()
        && let Err(why) = config.wraps(&module.name)
    {
        findings.push(
            Finding::new(
                Code::UnusedTensor,
                Some(module.name.clone()),
                format!(
                    "`{}` is ignored by the merge: {why}, so PEFT never wraps it",
                    module.name
                ),
            )
            .advice(
                "Make adapter_config.json select the modules the adapter holds tensors for \
                 (`target_modules`, `exclude_modules`, `layers_to_transform`, as PEFT wrote them \
                 when training), or delete the tensors if they were never meant to be merged.",
            ),
        );
    }
}

fn coverage_rules(
    base: &Checkpoint,
    matched: usize,
    unwrapped: usize,
    unresolved: Vec<(String, Unresolved)>,
    adapter: &Adapter,
    findings: &mut Vec<Finding>,
) {
    // Every module resolves, yet the config selects none of them: PEFT raises "Target modules
    // … not found" on load, and a merge would change nothing.
    if matched == 0 && unresolved.is_empty() && unwrapped > 0 {
        let selectors = [
            adapter
                .config
                .target_modules
                .as_ref()
                .map(|t| format!("target_modules [{}]", t.describe())),
            adapter
                .config
                .exclude_modules
                .as_ref()
                .map(|t| format!("exclude_modules [{}]", t.describe())),
            adapter
                .config
                .layers_to_transform
                .as_ref()
                .map(|l| format!("layers_to_transform {l:?}")),
        ];
        let selectors: Vec<String> = selectors.into_iter().flatten().collect();
        findings.push(
            Finding::new(
                Code::NoMatch,
                None,
                format!(
                    "adapter_config.json ({}) selects none of the adapter's {unwrapped} LoRA modules, so \
                     PEFT refuses to load it and a merge would change nothing",
                    selectors.join(", ")
                ),
            )
            .observed(0.0, Some(unwrapped as f64)),
        );
        return;
    }
    if unresolved.is_empty() {
        return;
    }
    if matched == 0 {
        let examples: Vec<&str> = unresolved.iter().take(3).map(|(m, _)| m.as_str()).collect();
        let base_examples: Vec<&str> = base
            .tensors()
            .filter(|t| t.shape.len() == 2)
            .take(3)
            .map(|t| t.name.as_str())
            .collect();
        findings.push(
            Finding::new(
                Code::NoMatch,
                None,
                format!(
                    "none of the adapter's {} modules maps to a base tensor (adapter: {}; base: {}) — the \
                     adapter would be silently ignored",
                    unresolved.len(),
                    examples.join(", "),
                    base_examples.join(", ")
                ),
            )
            .observed(0.0, Some(unresolved.len() as f64)),
        );
        return;
    }
    for (module, why) in unresolved {
        let message = match why {
            Unresolved::NotFound => match mapping::fused_sibling(&module, base) {
                Some(fused) => format!(
                    "no base tensor `{module}.weight`: the base fuses it into `{fused}` (Phi-3's \
                     layout), so the adapter was trained on a copy with separate projections \
                     (e.g. Unsloth's llamafied Phi-3); merge it into that copy, or its update \
                     would be dropped"
                ),
                None => format!(
                    "no base tensor `{module}.weight` (nor under a known prefix or as a unique \
                     suffix); its update would be dropped"
                ),
            },
            Unresolved::Ambiguous(candidates) => format!(
                "`{module}` matches several base tensors ({}); refusing to guess",
                candidates.join(", ")
            ),
        };
        findings.push(Finding::new(Code::MissingTarget, Some(module), message));
    }
}

/// An update that is zero or sign-flipped by configuration: `lora_alpha` (or every
/// `alpha_pattern` entry) of 0 makes ΔW = 0 however well B·A trained; a negative alpha subtracts it.
fn scale_rules(
    adapter: &Adapter,
    scales: &[(String, crate::io::adapter::ModuleScaling)],
    findings: &mut Vec<Finding>,
) {
    if scales.is_empty() {
        return;
    }
    let other_payload = adapter.modules.values().any(|m| {
        m.get(TensorRole::FullWeight).is_some() || m.get(TensorRole::TrainableTokens).is_some()
    });
    if scales.iter().all(|(_, s)| s.scale == 0.0) && !other_payload {
        let mut finding = Finding::new(
            Code::UntrainedAdapter,
            None,
            format!(
                "lora_alpha is {} (scale α/r = 0 on all {} LoRA modules): ΔW = 0 everywhere \
                     whatever lora_A and lora_B hold, so the merged model equals the base",
                adapter.config.lora_alpha,
                scales.len()
            ),
        )
        .observed(0.0, None);
        // Zero by configuration is not "maybe saved early": every check downstream would pass
        // trivially on a model equal to the base.
        finding.level = super::Level::Deny;
        findings.push(finding);
    }
    let negative: Vec<&(String, crate::io::adapter::ModuleScaling)> =
        scales.iter().filter(|(_, s)| s.scale < 0.0).collect();
    if let Some((module, first)) = negative.first() {
        findings.push(
            Finding::new(
                Code::NegativeScale,
                (negative.len() == 1).then(|| module.clone()),
                format!(
                    "{} of {} LoRA modules have a negative scale (e.g. `{module}`: alpha {}, r {}, \
                     scale {}): the merge computes W − {}·B·A, pushing the model away from what the \
                     adapter learned",
                    negative.len(),
                    scales.len(),
                    first.alpha,
                    first.r,
                    first.scale,
                    first.scale.abs()
                ),
            )
            .observed(first.scale, Some(0.0)),
        );
    }
}

/// Rows of the adapter tensors that stand in for an embedding / head tensor of the base.
fn adapter_rows(module: &AdapterModule) -> Option<(usize, &'static str)> {
    if let Some(full) = module.get(TensorRole::FullWeight) {
        return full.info.shape.first().map(|r| (*r, "full weight"));
    }
    module
        .get(TensorRole::EmbeddingA)
        .and_then(|a| a.info.shape.get(1))
        .map(|r| (*r, "lora_embedding_A columns"))
}

/// Vocabulary sizes. A full embedding / head matrix with more rows than the base is a vocabulary
/// resized before training (TRL's `setup_chat_format`, added special tokens): the merge takes the
/// adapter's matrix, so the merged model has its rows. What cannot be merged is a tokenizer with ids
/// beyond every row the merge produces, an adapter that shrinks the vocabulary or grows it without
/// full matrices (embedding LoRA: the rows do not exist), and a base that disagrees with itself.
fn vocab_rules(input: &StructureInput<'_>, findings: &mut Vec<Finding>) {
    let base = input.base;
    let embedding = mapping::find_embedding(base);
    let head = mapping::find_head(base);
    let rows_of = |name: &Option<String>| {
        name.as_ref()
            .and_then(|n| base.info(n))
            .and_then(|t| t.shape.first().copied())
    };
    let base_embed_rows = rows_of(&embedding);
    let base_head_rows = rows_of(&head);
    let config_vocab = input.base_config.and_then(|c| c.vocab_size);
    let tokenizer = input.adapter_tokenizer.or(input.base_tokenizer);
    let mut problems = Vec::new();
    // Rows of the merged input embedding and output head (a tied model without a stored head
    // reads the embedding's rows until the adapter stores a head of its own).
    let mut merged_embed_rows = base_embed_rows;
    let mut merged_head_rows = base_head_rows.or(base_embed_rows);
    let mut culprit = None;
    for module in input.adapter.modules.values() {
        let Ok(target) = mapping::resolve(&module.name, base) else {
            continue;
        };
        let is_head = mapping::is_head_module(&module.name)
            || head.as_deref() == Some(target.weight().as_str());
        let is_embed = !is_head && embedding.as_deref() == Some(target.weight().as_str());
        if !(is_embed || is_head) {
            continue;
        }
        let Some((rows, what)) = adapter_rows(module) else {
            continue;
        };
        let base_rows = if is_embed {
            base_embed_rows
        } else {
            base_head_rows.or(base_embed_rows)
        };
        let full = module.get(TensorRole::FullWeight).is_some();
        if let Some(base_rows) = base_rows.filter(|b| *b != rows) {
            if full && rows > base_rows {
                let slot = if is_embed {
                    &mut merged_embed_rows
                } else {
                    &mut merged_head_rows
                };
                *slot = Some(slot.map_or(rows, |m| m.max(rows)));
                continue;
            }
            let why = if full {
                "a merge would shrink the vocabulary"
            } else {
                "a low-rank update cannot add rows the base does not have"
            };
            problems.push(format!(
                "the adapter's `{}` ({what}) has {rows} rows but the base's has {base_rows}: {why}",
                module.name
            ));
            culprit.get_or_insert(module.name.clone());
        }
    }
    if let (Some(vocab), Some(rows)) = (config_vocab, base_embed_rows)
        && vocab != rows
    {
        problems.push(format!(
            "config.json says vocab_size = {vocab} but the base embedding has {rows} rows"
        ));
    }
    if let (Some(embed), Some(head)) = (base_embed_rows, base_head_rows)
        && embed != head
    {
        problems.push(format!(
            "the base embedding has {embed} rows but its output head has {head}"
        ));
    }
    let merged_rows = match (merged_embed_rows, merged_head_rows) {
        (Some(e), Some(h)) => Some(e.min(h)),
        (e, h) => e.or(h),
    };
    if let (Some(tok), Some(rows)) = (tokenizer, merged_rows)
        && tok.size > rows
    {
        problems.push(format!(
            "the tokenizer at `{}` emits ids up to {} but the merged model would have {rows} \
             embedding / head rows (embedding {}, head {}): ids from {rows} on have no row",
            tok.path.display(),
            tok.size - 1,
            merged_embed_rows.map_or_else(|| "?".into(), |r| r.to_string()),
            merged_head_rows.map_or_else(|| "?".into(), |r| r.to_string()),
        ));
    }
    if problems.is_empty() {
        return;
    }
    let added = tokenizer
        .map(|t| t.added_tokens.len())
        .filter(|n| *n > 0)
        .map(|n| format!(" (the tokenizer lists {n} added tokens)"))
        .unwrap_or_default();
    findings.push(
        Finding::new(
            Code::VocabMismatch,
            culprit.or(embedding.map(|e| e.trim_end_matches(".weight").to_string())),
            format!("{}{added}", problems.join("; ")),
        )
        .advice(
            "Ship the tokenizer the adapter was trained with, and save the resized embeddings with \
             the adapter (PEFT: `modules_to_save=[\"embed_tokens\", \"lm_head\"]` or \
             `save_embedding_layers=True`) so the merge has every row; or resize the base to that \
             tokenizer (`model.resize_token_embeddings(len(tokenizer))`) and check against it.",
        ),
    );
}

fn tied_rules(
    input: &StructureInput<'_>,
    findings: &mut Vec<Finding>,
) -> Result<(), CheckpointError> {
    let base = input.base;
    let head_stored = mapping::find_head(base).is_some();
    let tied = input
        .base_config
        .map_or(!head_stored, |c| c.tie_word_embeddings);
    if !tied {
        return Ok(());
    }
    let embedding = mapping::find_embedding(base);
    let mut embed_change: Option<&AdapterModule> = None;
    let mut head_change: Option<&AdapterModule> = None;
    for module in input.adapter.modules.values() {
        let changes = module.has_lora()
            || module.get(TensorRole::FullWeight).is_some()
            || module.get(TensorRole::TrainableTokens).is_some();
        if !changes {
            continue;
        }
        let Ok(target) = mapping::resolve(&module.name, base) else {
            continue;
        };
        if mapping::is_head_module(&module.name) {
            head_change = Some(module);
        } else if embedding.as_deref() == Some(target.weight().as_str()) {
            embed_change = Some(module);
        }
    }
    // A trained head merges into a tensor of its own (the merge engine writes `lm_head.weight` and
    // `tie_word_embeddings: false`, and the candidates here are judged that way), which is faithful:
    // PEFT's unmerged model keeps the head apart too (PEFT issue #2777). What can still go wrong
    // happens after lora-doctor: a config that ties the head again, or a loader that re-ties it.
    let untied_merge = |what: String, module: String| {
        Finding::new(
            Code::TiedEmbeddings,
            Some(module),
            format!(
                "tie_word_embeddings is true and {what}: the merge is faithful only untied (lm_head \
                 stored as its own tensor, `tie_word_embeddings: false`), which is how lora-doctor \
                 merges and judges it; a merged config.json that ties the head, or a loader that \
                 re-ties it on save or reload, puts one tensor in both places"
            ),
        )
        .level(Level::Warn)
        .advice(
            "Merge with `lora-doctor merge` (or PEFT's merge_and_unload + save_pretrained on \
             transformers ≥ 5 / PEFT ≥ 0.21, which keep the head untied), then run `lora-doctor check \
             --merged DIR` on the result: it denies a merged config.json that ties the head. Serve \
             with a loader that honours `tie_word_embeddings: false`.",
        )
    };
    let finding = match (embed_change, head_change) {
        (None, None) => return Ok(()),
        (Some(e), None) => Finding::new(
            Code::TiedEmbeddings,
            Some(e.name.clone()),
            format!(
                "tie_word_embeddings is true and the adapter changes `{}` but not the output head: after \
                 a merge the head (which shares that tensor) changes too, unlike in the unmerged model",
                e.name
            ),
        ),
        (None, Some(h)) => untied_merge(
            format!(
                "the adapter changes `{}` but not the input embedding",
                h.name
            ),
            h.name.clone(),
        ),
        (Some(e), Some(h)) => {
            if same_full_weight(input.adapter, e, h)? {
                return Ok(());
            }
            untied_merge(
                format!(
                    "the adapter changes `{}` and `{}` differently",
                    e.name, h.name
                ),
                h.name.clone(),
            )
        }
    };
    findings.push(finding);
    Ok(())
}

fn same_bytes(adapter: &Adapter, a: &str, b: &str) -> bool {
    match (adapter.weights.raw(a), adapter.weights.raw(b)) {
        (Ok((ia, xa)), Ok((ib, xb))) => ia.dtype == ib.dtype && ia.shape == ib.shape && xa == xb,
        _ => false,
    }
}

fn same_full_weight(
    adapter: &Adapter,
    a: &AdapterModule,
    b: &AdapterModule,
) -> Result<bool, CheckpointError> {
    let (Some(x), Some(y)) = (a.get(TensorRole::FullWeight), b.get(TensorRole::FullWeight)) else {
        return Ok(false);
    };
    if a.has_lora() || b.has_lora() {
        return Ok(false);
    }
    let (_, xb) = adapter.weights.raw(&x.key)?;
    let (_, yb) = adapter.weights.raw(&y.key)?;
    Ok(xb == yb)
}

/// Non-finite counts and the all-zero-B check, reading every adapter tensor once in parallel.
fn value_rules(adapter: &Adapter) -> Result<Vec<Finding>, CheckpointError> {
    struct Scan {
        key: String,
        module: String,
        role: TensorRole,
        nan: usize,
        inf: usize,
        all_zero: bool,
    }
    let tensors: Vec<_> = adapter
        .modules
        .values()
        .flat_map(|m| m.tensors.values().chain(m.extra.iter()))
        .filter(|t| t.info.dtype.is_float())
        .collect();
    let scans = tensors
        .par_iter()
        .map(|t| {
            let values = adapter.weights.read_f32(&t.key)?;
            Ok(Scan {
                key: t.key.clone(),
                module: t.module.clone(),
                role: t.role,
                nan: values.iter().filter(|v| v.is_nan()).count(),
                inf: values.iter().filter(|v| v.is_infinite()).count(),
                all_zero: values.iter().all(|v| *v == 0.0),
            })
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    let mut findings = Vec::new();
    for scan in scans.iter().filter(|s| s.nan + s.inf > 0) {
        findings.push(
            Finding::new(
                Code::NonfiniteAdapter,
                Some(scan.module.clone()),
                format!(
                    "`{}` holds {} NaN and {} Inf values",
                    scan.key, scan.nan, scan.inf
                ),
            )
            .observed((scan.nan + scan.inf) as f64, Some(0.0)),
        );
    }
    let b_scans: Vec<&Scan> = scans
        .iter()
        .filter(|s| matches!(s.role, TensorRole::LoraB | TensorRole::EmbeddingB))
        .collect();
    let other_payload = scans.iter().any(|s| {
        matches!(
            s.role,
            TensorRole::FullWeight
                | TensorRole::FullBias
                | TensorRole::TrainableTokens
                | TensorRole::Magnitude
                | TensorRole::LoraBBias
        )
    });
    if !b_scans.is_empty() && b_scans.iter().all(|s| s.all_zero) && !other_payload {
        findings.push(
            Finding::new(
                Code::UntrainedAdapter,
                None,
                format!(
                    "all {} lora_B tensors are exactly zero: ΔW = 0 everywhere, the merged model equals \
                     the base",
                    b_scans.len()
                ),
            )
            .observed(0.0, None),
        );
    }
    Ok(findings)
}

/// Model families recognisable in names, with the `model_type`s that belong to them.
const FAMILIES: &[(&str, &[&str])] = &[
    ("llama", &["llama"]),
    ("mistral", &["mistral", "mixtral"]),
    ("qwen", &["qwen"]),
    ("gemma", &["gemma"]),
    ("phi", &["phi"]),
    ("gpt2", &["gpt2", "gpt-2"]),
    ("gpt_neox", &["neox", "pythia"]),
    ("falcon", &["falcon"]),
    ("smollm", &["smollm"]),
    ("olmo", &["olmo"]),
    ("deepseek", &["deepseek"]),
    ("granite", &["granite"]),
    ("opt", &["facebook/opt"]),
    ("bloom", &["bloom"]),
];

fn families(text: &str) -> BTreeSet<&'static str> {
    let text = text.to_lowercase();
    FAMILIES
        .iter()
        .filter(|(_, needles)| needles.iter().any(|n| text.contains(n)))
        .map(|(family, _)| *family)
        .collect()
}

/// Parameter count a name advertises (`7B`, `135M`, `1.7b`), in units.
fn advertised_size(text: &str) -> Option<f64> {
    let re = Regex::new(r"(?i)(?:^|[^a-z0-9.])(\d+(?:\.\d+)?)([bm])(?:[^a-z0-9]|$)").ok()?;
    let caps = re.captures(text)?;
    let number: f64 = caps.get(1)?.as_str().parse().ok()?;
    let unit = if caps.get(2)?.as_str().eq_ignore_ascii_case("b") {
        1e9
    } else {
        1e6
    };
    Some(number * unit)
}

fn base_identity_rules(input: &StructureInput<'_>, findings: &mut Vec<Finding>) {
    let Some(named) = input.adapter.config.base_model_name_or_path.as_deref() else {
        return;
    };
    // A local path that is the base itself settles it.
    let same_path = std::fs::canonicalize(named)
        .ok()
        .zip(std::fs::canonicalize(&input.base.path).ok())
        .is_some_and(|(a, b)| a == b);
    if same_path {
        return;
    }
    let mut base_text = input.base.path.display().to_string();
    if let Some(config) = input.base_config {
        for part in config
            .model_type
            .iter()
            .chain(config.architectures.iter())
            .chain(config.name_or_path.iter())
        {
            base_text.push(' ');
            base_text.push_str(part);
        }
    }
    let adapter_families = families(named);
    let base_families = families(&base_text);
    let mut reasons = Vec::new();
    if !adapter_families.is_empty()
        && !base_families.is_empty()
        && adapter_families.is_disjoint(&base_families)
    {
        reasons.push(format!(
            "it names a {} model, the base is {}",
            join(&adapter_families),
            join(&base_families)
        ));
    }
    if let Some(advertised) = advertised_size(named) {
        let name_size = advertised_size(&base_path_tail(&input.base.path));
        let counted = input.base.tensors().map(|t| t.numel() as f64).sum::<f64>();
        let base_size = name_size.unwrap_or(counted);
        let ratio = advertised / base_size.max(1.0);
        if !(0.5..=2.0).contains(&ratio) {
            reasons.push(format!(
                "it names a ~{} model, the base has ~{} parameters",
                human_count(advertised),
                human_count(base_size)
            ));
        }
    }
    if reasons.is_empty() {
        return;
    }
    findings.push(Finding::new(
        Code::BaseMismatch,
        None,
        format!(
            "adapter_config.json says base_model_name_or_path = \"{named}\", but {}",
            reasons.join("; ")
        ),
    ));
}

fn base_path_tail(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn join(set: &BTreeSet<&str>) -> String {
    set.iter().copied().collect::<Vec<_>>().join("/")
}

fn human_count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.0}M", n / 1e6)
    }
}

fn quantized_base_rules(input: &StructureInput<'_>, findings: &mut Vec<Finding>) {
    let mut reasons = Vec::new();
    if let Some(summary) = input
        .base_config
        .and_then(ModelConfig::quantization_summary)
    {
        reasons.push(format!("the base config declares {summary} quantization"));
    }
    let integer_tensors = input
        .base
        .tensors()
        .filter(|t| !t.dtype.is_float() && t.shape.len() >= 2)
        .count();
    if integer_tensors > 0 {
        reasons.push(format!(
            "the base stores {integer_tensors} weight tensors in integer formats"
        ));
    }
    if let Some(named) = input.adapter.config.base_model_name_or_path.as_deref() {
        let quantized_name = Regex::new(r"(?i)(bnb|4bit|4-bit|int4|nf4|gptq|awq|8bit|int8)")
            .ok()
            .and_then(|re| re.find(named).map(|m| m.as_str().to_string()));
        if let Some(hint) = quantized_name {
            reasons.push(format!(
                "the adapter was trained on \"{named}\" (`{hint}`: a quantized base, i.e. QLoRA)"
            ));
        }
    }
    if reasons.is_empty() {
        return;
    }
    findings.push(Finding::new(Code::QuantizedBase, None, reasons.join("; ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_sizes() {
        assert_eq!(advertised_size("Qwen/Qwen2.5-7B-Instruct"), Some(7e9));
        assert_eq!(
            advertised_size("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(135e6)
        );
        assert_eq!(advertised_size("meta-llama/Llama-3.2-1.5b"), Some(1.5e9));
        assert_eq!(advertised_size("fixtures/models/tiny-llama"), None);
    }

    #[test]
    fn families_by_name() {
        assert!(families("Qwen/Qwen2.5-7B").contains("qwen"));
        assert!(families("fixtures/models/tiny-llama llama").contains("llama"));
        assert!(families("unknown-model").is_empty());
    }
}
