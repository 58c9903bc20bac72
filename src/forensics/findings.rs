//! The findings a merged checkpoint's forensics add up to: one function per cause, each reading
//! the classified tensors, the untouched-tensor summary, the inventory and the config drift.

use std::collections::BTreeMap;

use crate::findings::{Code, Finding, Level, quoted_examples};
use crate::merge::precision::Precision;
use crate::merge::quant_format::QuantFormat;

use super::classify::{Cause, JobResult};
use super::quantized_base::quantized_base_level;
use super::untouched::Untouched;
use super::{ConfigDifference, Inputs, Inventory, UntouchedSummary, causes, drift};

/// Everything the findings are drawn from.
#[derive(Clone, Copy)]
pub(super) struct Evidence<'a> {
    pub(super) input: &'a Inputs<'a>,
    pub(super) results: &'a [JobResult],
    pub(super) untouched: &'a UntouchedSummary,
    pub(super) differing: &'a [&'a Untouched],
    pub(super) inventory: &'a Inventory,
    pub(super) drift: &'a [ConfigDifference],
    /// M ties its head although the base has its own.
    pub(super) ties_untied_base: bool,
}

impl<'a> Evidence<'a> {
    /// The tensors classified with a cause `cause` accepts.
    fn with(&self, cause: fn(&Cause) -> bool) -> Vec<&'a JobResult> {
        self.results.iter().filter(|r| cause(&r.cause)).collect()
    }
}

/// Every finding, in the order reports list them.
pub(super) fn findings(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    out.extend(not_merged(e));
    out.extend(stack_partial(e));
    out.extend(modules_to_save_dropped(e));
    out.extend(scale_mismatch(e));
    out.extend(transposed_delta(e));
    out.extend(dora_magnitude_dropped(e));
    out.extend(quantized_merge_base(e));
    out.extend(wrong_base_or_precision_drift(e));
    out.extend(tied_head(e));
    out.extend(tensor_inventory(e));
    out.extend(nonfinite_values(e));
    out.extend(overflow(e));
    out.extend(config_drift(e));
    out
}

/// `not-merged`: the whole merge or some modules never happened.
fn not_merged(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let total = e.results.len();
    let group = e.with(|c| *c == Cause::NotMerged);
    if !group.is_empty() {
        let all = group.len() == total;
        let scale = median(group.iter().filter_map(|r| r.fit.scale_ratio).collect());
        let mut f = Finding::new(
            Code::NotMerged,
            single_module(&group),
            format!(
                "M equals the base on {} of {total} adapter-changed tensors ({}){}",
                group.len(),
                quoted_examples(group.iter().map(|r| r.fit.module.as_str())),
                if all {
                    ": the merge never happened, or the adapter failed to load"
                } else {
                    ": those modules' updates were never merged"
                }
            ),
        );
        if let Some(s) = scale {
            f = f.observed(s, Some(1.0));
        }
        out.push(f);
    }
    out
}

/// `stack-partial`: some adapters of a stack were left out.
fn stack_partial(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { input, .. } = *e;
    let total = e.results.len();
    let partial: Vec<&JobResult> = e.with(|c| matches!(c, Cause::StackPartial(_)));
    if !partial.is_empty() {
        let mut missing: Vec<usize> = partial
            .iter()
            .flat_map(|r| match &r.cause {
                Cause::StackPartial(m) => m.clone(),
                _ => Vec::new(),
            })
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let names: Vec<String> = missing
            .iter()
            .map(|i| format!("`{}`", input.adapters[*i].dir.display()))
            .collect();
        out.push(
            Finding::new(
                Code::NotMerged,
                single_module(&partial),
                format!(
                    "of the stacked adapters, {} {} not merged: M equals W plus the other adapters' \
                     updates on {} of {total} tensors ({})",
                    names.join(", "),
                    if names.len() == 1 { "was" } else { "were" },
                    partial.len(),
                    quoted_examples(partial.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .advice(
                "Merge every adapter of the stack, in order (e.g. load SFT, merge_and_unload, \
                 then load PPO on the result and merge again), or pass only the adapters M was \
                 meant to contain.",
            ),
        );
    }
    out
}

/// `modules-to-save-dropped`: a replaced module (modules_to_save) kept the base's tensor.
fn modules_to_save_dropped(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();

    let group = e.with(|c| *c == Cause::ModulesToSaveDropped);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::ModulesToSaveDropped,
            single_module(&group),
            format!(
                "M holds the base's {} instead of the adapter's trained copy (modules_to_save)",
                quoted_examples(group.iter().map(|r| r.fit.tensor.as_str()))
            ),
        ));
    }
    out
}

/// `scale-mismatch`: M holds the update times a wrong factor.
fn scale_mismatch(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { results, .. } = *e;
    let total = e.results.len();
    // Scale mismatches: one finding when one known mistake explains every scaled tensor (the
    // usual case: a config field misread once), else one per mistake or unknown factor.
    let scaled: Vec<&JobResult> = results.iter().filter(|r| r.cause == Cause::Scale).collect();
    let kinds_of = |r: &JobResult| -> Vec<&'static str> {
        r.scale
            .as_ref()
            .map(|(_, m)| m.iter().map(|m| m.kind).collect())
            .unwrap_or_default()
    };
    let common: Vec<&'static str> = scaled
        .first()
        .map(|r| kinds_of(r))
        .unwrap_or_default()
        .into_iter()
        .filter(|k| scaled.iter().all(|r| kinds_of(r).contains(k)))
        .collect();
    let mut groups: BTreeMap<String, Vec<&JobResult>> = BTreeMap::new();
    for r in &scaled {
        let key = match (common.first(), kinds_of(r).first()) {
            (Some(k), _) | (None, Some(k)) => (*k).to_string(),
            (None, None) => format!(
                "unknown factor ×{:.3}",
                r.scale.as_ref().map_or(f64::NAN, |s| s.0)
            ),
        };
        groups.entry(key).or_default().push(r);
    }
    for (key, group) in groups {
        let factors: Vec<f64> = group
            .iter()
            .filter_map(|r| r.scale.as_ref().map(|s| s.0))
            .collect();
        let lo = factors.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = factors.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let factor = if (hi - lo).abs() <= 1e-3 * hi.abs().max(1e-12) {
            format!("ŝ/s = {lo:.4}")
        } else {
            format!("ŝ/s = {lo:.4} … {hi:.4}")
        };
        let cause = if key.starts_with("unknown factor") {
            "no known scaling mistake gives this factor".to_string()
        } else {
            let example = group.first().and_then(|r| {
                r.scale.as_ref().and_then(|(_, m)| {
                    m.iter()
                        .find(|m| m.kind == key)
                        .map(|m| format!(" — e.g. `{}`: {}", r.fit.module, m.name))
                })
            });
            let others: Vec<&str> = if common.len() > 1 {
                common[1..].iter().map(|k| causes::kind_title(k)).collect()
            } else {
                Vec::new()
            };
            format!(
                "the known mistake that gives {}: {}{}{}",
                if common.is_empty() {
                    "these factors"
                } else {
                    "every factor"
                },
                causes::kind_title(&key),
                example.unwrap_or_default(),
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" (equally consistent: {})", others.join("; "))
                }
            )
        };
        let mut f = Finding::new(
            Code::ScaleMismatch,
            single_module(&group),
            format!(
                "M's change is {factor} times the adapter's update on {} of {total} tensors ({}); {cause}",
                group.len(),
                quoted_examples(group.iter().map(|r| r.fit.module.as_str())),
            ),
        );
        if let Some(m) = median(factors) {
            f = f.observed(m, Some(1.0));
        }
        out.push(f);
    }
    out
}

/// `transposed-delta`: the update went in transposed.
fn transposed_delta(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();

    let group = e.with(|c| *c == Cause::Transposed);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::TransposedDelta,
            single_module(&group),
            format!(
                "M's change on {} matches ΔWᵀ, not ΔW: the update went in transposed",
                quoted_examples(group.iter().map(|r| r.fit.module.as_str()))
            ),
        ));
    }
    out
}

/// `dora-magnitude-dropped`: DoRA's magnitude rescaling was dropped.
fn dora_magnitude_dropped(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let total = e.results.len();
    let group = e.with(|c| *c == Cause::DoraDropped);
    if !group.is_empty() {
        out.push(Finding::new(
            Code::DoraMagnitudeDropped,
            single_module(&group),
            format!(
                "M equals W + ΔW without DoRA's magnitude rescaling on {} of {total} tensors ({})",
                group.len(),
                quoted_examples(group.iter().map(|r| r.fit.module.as_str()))
            ),
        ));
    }
    out
}

/// `quantized-merge-base`: the merge went onto a dequantized base, or was re-quantized.
fn quantized_merge_base(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence {
        input, untouched, ..
    } = *e;
    let total = e.results.len();
    let quantized: Vec<&JobResult> = e.with(|c| matches!(c, Cause::Quantized(..)));
    if let Some(Cause::Quantized(h, _)) = quantized.first().map(|r| &r.cause) {
        let (mut err2, mut delta2) = (0.0f64, 0.0f64);
        for r in &quantized {
            if let (Some(b), Some(ratio)) = (&r.basic, r.fit.residual_to_floor) {
                err2 += (ratio * b.floor).powi(2);
                delta2 += b.delta_norm.powi(2);
            }
        }
        let size = if delta2 > 0.0 {
            (err2 / delta2).sqrt()
        } else {
            f64::INFINITY
        };
        let matches_training =
            !h.requantized && input.trained_on == Some(Precision::Quant(h.format));
        let mut f = Finding::new(
            Code::QuantizedMergeBase,
            single_module(&quantized),
            format!(
                "{} of {total} adapter-changed tensors match {} (best of {} formats); the \
                 quantization error is {:.2}× ‖ΔW‖{}",
                quantized.len(),
                h.describe(),
                QuantFormat::FORENSIC_HYPOTHESES.len(),
                size,
                if matches_training {
                    format!(
                        " — the base --trained-on names, so the merge keeps the {} error the adapter trained with",
                        h.format.name()
                    )
                } else {
                    String::new()
                }
            ),
        )
        .observed(size, Some(input.quant_deny))
        .advice(if h.requantized {
            format!(
                "Do not round-trip the merged model through {}: keep the 16-bit merge as the \
                 checkpoint you ship, and quantize only in the runtime's own format when serving \
                 (compare the candidates with `check --precision {}`).",
                h.format.name(),
                h.format.name()
            )
        } else {
            format!(
                "Merge into the 16-bit base (PEFT merge_and_unload on a base loaded without \
                 quantization). If the adapter was trained on a {} base (QLoRA), run `check \
                 --trained-on {}` to see whether the 16-bit merge or this one serves it better.",
                h.format.name(),
                h.format.name()
            )
        });
        f.level = quantized_base_level(size, input.quant_deny, matches_training);
        if untouched.explained_by_quantization > 0 {
            f.message.push_str(&format!(
                "; {} untouched tensors are quantized the same way",
                untouched.explained_by_quantization
            ));
        }
        out.push(f);
    }
    out
}

/// `wrong-base-or-precision-drift`: another base (untouched tensors differ), or a residual no mistake explains.
fn wrong_base_or_precision_drift(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence {
        input,
        untouched,
        differing,
        ..
    } = *e;
    let total = e.results.len();
    // Another base: untouched tensors differ beyond rounding and no quantization explains them.
    let unexplained_targets: Vec<&JobResult> = e.with(|c| *c == Cause::Unexplained);
    let foreign: Vec<&&Untouched> = differing.iter().filter(|u| !u.explained).collect();
    if !foreign.is_empty() {
        let most =
            foreign.len() * 2 >= untouched.compared.max(1) || !unexplained_targets.is_empty();
        let mut f = Finding::new(
            Code::WrongBase,
            None,
            format!(
                "{} of {} tensors the adapter does not touch differ from the base by up to {:.3e}× \
                 their rounding floor ({}){}",
                foreign.len(),
                untouched.compared,
                foreign.iter().map(|u| u.ratio).fold(0.0, f64::max),
                quoted_examples(foreign.iter().map(|u| u.name.as_str())),
                if unexplained_targets.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", and {} of {total} adapter-changed tensors fit no known mistake",
                        unexplained_targets.len()
                    )
                }
            ),
        )
        .observed(foreign.len() as f64, None);
        if !most {
            f.level = Level::Warn;
            f.message
                .push_str(": M was partly built from other weights than this base");
        }
        out.push(f);
    } else if !unexplained_targets.is_empty() {
        let worst = unexplained_targets
            .iter()
            .filter_map(|r| r.fit.residual_to_floor)
            .fold(0.0, f64::max);
        out.push(
            Finding::new(
                Code::PrecisionDrift,
                single_module(&unexplained_targets),
                format!(
                    "M differs from the exact merge by up to {worst:.3e}× the rounding floor of its \
                     dtype on {} of {total} tensors ({}), and no known mistake (scale, transpose, \
                     DoRA, quantized base) explains it",
                    unexplained_targets.len(),
                    quoted_examples(unexplained_targets.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .observed(worst, Some(input.tolerance))
            .advice(
                "Re-merge in f32 with PEFT's merge_and_unload (or `lora-doctor merge`) and cast \
                 once; compare the tool's merge code with merge-semantics: ΔW = s·B·A in the base \
                 layout.",
            ),
        );
    }
    out
}

/// `tied-head`: M ties a head that must differ from the embeddings.
fn tied_head(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence {
        ties_untied_base, ..
    } = *e;
    let tied = e.with(|c| *c == Cause::Tied);
    if !tied.is_empty() || ties_untied_base {
        out.push(Finding::new(
            Code::TiedEmbeddings,
            Some(
                tied.first()
                    .map_or_else(|| "lm_head".to_string(), |r| r.fit.module.clone()),
            ),
            "M's config ties the output head to the input embeddings (tie_word_embeddings), but \
             the merged head must differ from them: loaders will use the embeddings as the head"
                .to_string(),
        )
        .advice(
            "Set `tie_word_embeddings: false` in M's config.json and save `lm_head.weight` \
             explicitly (the adapter's trained head merged onto the base's), or use \
             `lora-doctor merge`, which unties the head when it must.",
        ));
    }
    out
}

/// `tensor-inventory`: M's names and shapes differ from the expected ones.
fn tensor_inventory(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { inventory, .. } = *e;
    if !inventory.is_clean() {
        let mut message = format!(
            "M's tensors differ from the base's: {}",
            inventory.describe().join("; ")
        );
        if inventory.looks_like_an_adapter() {
            message.push_str(
                " — M holds LoRA tensors: it is an adapter folder, not a merged model; pass the \
                 folder merge_and_unload().save_pretrained() wrote",
            );
        }
        if inventory.looks_bnb_quantized() {
            message.push_str(
                " — M looks like a bitsandbytes-quantized checkpoint; save a dequantized 16-bit copy to compare",
            );
        }
        out.push(Finding::new(Code::TensorInventory, None, message));
    }
    out
}

/// `nonfinite-values`: NaN or Inf anywhere in M.
fn nonfinite_values(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { inventory, .. } = *e;
    if inventory.nan + inventory.inf > 0 {
        out.push(
            Finding::new(
                Code::NonfiniteMerge,
                None,
                format!(
                    "M holds {} NaN and {} ±Inf values",
                    inventory.nan, inventory.inf
                ),
            )
            .observed((inventory.nan + inventory.inf) as f64, Some(0.0)),
        );
    }
    out
}

/// `overflow`: merged values beyond the dtype's range.
fn overflow(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { results, .. } = *e;
    let overflow: Vec<&JobResult> = results
        .iter()
        .filter(|r| r.basic.is_some_and(|b| b.out_of_range > 0))
        .collect();
    if !overflow.is_empty() {
        let n: usize = overflow
            .iter()
            .filter_map(|r| r.basic.map(|b| b.out_of_range))
            .sum();
        out.push(
            Finding::new(
                Code::Overflow,
                single_module(&overflow),
                format!(
                    "{n} merged values exceed the largest finite value of M's dtype ({})",
                    quoted_examples(overflow.iter().map(|r| r.fit.module.as_str()))
                ),
            )
            .observed(n as f64, Some(0.0)),
        );
    }
    out
}

/// `config-drift`: an unloadable config.json, or generation-relevant settings that drifted.
fn config_drift(e: &Evidence<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Evidence { drift, .. } = *e;
    // Without a loadable config.json no runtime (transformers, vLLM, TGI) opens the folder: that
    // is not drift in a setting but an undeployable checkpoint.
    let (unloadable, drift): (Vec<&ConfigDifference>, Vec<&ConfigDifference>) = drift
        .iter()
        .partition(|d| d.file == "config.json" && d.key == drift::FILE_KEY);
    for d in unloadable {
        let mut finding = Finding::new(
            Code::ConfigDrift,
            None,
            format!(
                "M's config.json is {}: transformers, vLLM and TGI cannot load this folder",
                if d.found == "(absent)" {
                    "missing".to_string()
                } else {
                    d.found.trim_matches(|c| c == '(' || c == ')').to_string()
                }
            ),
        )
        .advice(
            "Write the merge with `save_pretrained` (or `lora-doctor merge`), which saves config.json \
             next to the weights; or copy the base's config.json and set its dtype to M's",
        );
        finding.level = Level::Deny;
        out.push(finding);
    }
    if !drift.is_empty() {
        let list = drift
            .iter()
            .map(|d| format!("{} {}: {} → {}", d.file, d.key, d.expected, d.found))
            .collect::<Vec<_>>();
        let mut finding = Finding::new(
            Code::ConfigDrift,
            None,
            format!(
                "{} generation-relevant setting(s) of M differ from the adapter's / base's folder: {}",
                list.len(),
                list.join("; ")
            ),
        );
        if drift.iter().any(|d| d.file == drift::GGUF_FILE) {
            finding = finding.advice(
                "Convert again with llama.cpp's convert_hf_to_gguf.py from a folder holding the \
                 tokenizer the adapter was trained with (tokenizer.json, tokenizer_config.json, \
                 chat_template.jinja); a wrong tokenizer.ggml.pre changes how llama.cpp splits \
                 text even when every weight is right.",
            );
        }
        out.push(finding);
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn single_module(group: &[&JobResult]) -> Option<String> {
    match group {
        [one] => Some(one.fit.module.clone()),
        _ => None,
    }
}
