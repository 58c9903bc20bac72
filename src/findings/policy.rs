//! Level policy that depends on what was evaluated, in one place: which structural findings stop
//! the merge stages, when a tied-head hazard is settled, and which rows inform without gating.

use super::{Code, Finding, Level};
use crate::forward::ModelKind;

/// A structural finding that makes merging meaningless. A tied head the adapter trains is a
/// hazard for a merge, not a misfit: the engine unties it, so the later stages still mean
/// something. A GGUF adapter that applies another scale than its PEFT origin still fits its
/// base: the later stages then measure what llama.cpp serves.
pub fn blocks_merge(f: &Finding) -> bool {
    f.level == Level::Deny && !matches!(f.code, Code::TiedEmbeddings | Code::AdapterConversion)
}

/// The structural tied-head warning is about what a merge might do; a `--merged` checkpoint that
/// unties the head correctly (forensics found no tied-embeddings problem) settles it.
pub fn settle_tied_head_by_merged(findings: &mut [Finding], forensics: &[Finding]) {
    if forensics.iter().any(|f| f.code == Code::TiedEmbeddings) {
        return;
    }
    for f in findings
        .iter_mut()
        .filter(|f| f.code == Code::TiedEmbeddings && f.precision.is_none())
    {
        f.level = Level::Allow;
        f.message
            .push_str(" — settled: the --merged checkpoint unties the head correctly");
    }
}

/// `merge` writes the head untied when the adapter changes it, which resolves tied-embeddings for
/// the checkpoint it writes.
pub fn settle_tied_head_by_untied_write(findings: &mut Vec<Finding>) {
    findings.retain(|f| f.code != Code::TiedEmbeddings);
}

/// Logit findings of a `P+lora` row (the adapter served unmerged beside a quantized base), of a
/// repaired candidate (`bf16:repaired`) and of a mixed one (`bf16+residual`, a partly unmerged
/// deployment like `P+lora`) inform the choice of deployment; they do not gate the plain merge,
/// which is what `check` was asked to prove.
pub fn logit_levels(kind: ModelKind, findings: &mut [Finding]) {
    if matches!(
        kind,
        ModelKind::AdapterBeside(_) | ModelKind::Repaired(..) | ModelKind::Residual(..)
    ) {
        for f in findings {
            f.level = Level::Allow;
        }
    }
}
