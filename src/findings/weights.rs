//! Weight rules: turn per-tensor, per-precision statistics into findings (nonfinite-merge,
//! overflow, precision-drift, delta-swamped, quantization-error, delta-outlier), per-precision
//! summaries and the `layers[]` rows of the reports.
//!
//! Findings are aggregated per (code, precision): one finding names how many layers are
//! affected, the worst ones, and the worst value against its threshold.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;

use super::thresholds::Thresholds;
use super::{Code, Finding, Verdict};
use crate::merge::engine::TensorEvaluation;
use crate::merge::precision::Precision;
use crate::stats::outliers;

/// One row per (module, precision): every statistic, as CSV and JSON `layers[]` carry it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub module: String,
    pub precision: String,
    pub numel: usize,
    pub delta_norm: f64,
    pub weight_norm: f64,
    pub delta_mean: f64,
    pub delta_std: f64,
    pub delta_skewness: f64,
    pub delta_kurtosis: f64,
    /// Modified z-score of log ‖ΔW‖ among modules of the same kind (null with < 5 peers).
    pub delta_outlier_z: Option<f64>,
    pub rel_error: Option<f64>,
    pub rounding_floor: Option<f64>,
    pub floor_ratio: Option<f64>,
    pub delta_retention: Option<f64>,
    pub delta_below_half_ulp: Option<f64>,
    pub max_abs_error: f64,
    pub snr_db: Option<f64>,
    pub nan: usize,
    pub inf: usize,
    pub out_of_range: usize,
    /// Quantized formats: ‖dequant(q(W*)) − W*‖ / ‖ΔW‖ (equals rel_error); null for floats.
    pub quant_error_to_delta: Option<f64>,
    /// `--trained-on`: ‖W − dequant(P(W))‖ / ‖ΔW‖.
    pub qlora_base_error: Option<f64>,
    pub note: Option<String>,
}

/// The `precisions[].weights` summary.
#[derive(Debug, Clone, Serialize)]
pub struct WeightSummary {
    pub modules: usize,
    pub worst_rel_error: Option<f64>,
    pub worst_module: Option<String>,
    pub mean_rel_error: Option<f64>,
    pub max_floor_ratio: Option<f64>,
    /// A candidate's lowest ⟨W_p − W, ΔW⟩/‖ΔW‖² over its layers: how much of the update survived
    /// (rounding and quantization only lose it). Null for the merged checkpoint, see
    /// [`Self::scale_ratio_range`].
    pub min_retention: Option<f64>,
    /// The merged checkpoint only: the least-squares ŝ/s of M's change, lowest and highest over
    /// its fitted tensors. A foreign merge can overshoot (2 when the scale was applied twice), so
    /// a minimum alone would hide it.
    pub scale_ratio_range: Option<[f64; 2]>,
    pub mean_below_half_ulp: Option<f64>,
    pub nonfinite: usize,
    pub overflow: usize,
}

impl WeightSummary {
    /// A candidate whose weights the weight stage does not measure (repaired candidates: their
    /// values depend on calibration activations); its logits say how it fares.
    pub fn not_measured() -> Self {
        WeightSummary {
            modules: 0,
            worst_rel_error: None,
            worst_module: None,
            mean_rel_error: None,
            max_floor_ratio: None,
            min_retention: None,
            scale_ratio_range: None,
            mean_below_half_ulp: None,
            nonfinite: 0,
            overflow: 0,
        }
    }

    /// The retention a table shows: a candidate's minimum, or the merged checkpoint's ŝ/s bound
    /// farthest from 1.
    pub fn shown_retention(&self) -> Option<f64> {
        self.min_retention.or_else(|| {
            self.scale_ratio_range.map(|[lo, hi]| {
                if (hi - 1.0).abs() > (1.0 - lo).abs() {
                    hi
                } else {
                    lo
                }
            })
        })
    }

    /// A summary with no layers (a candidate whose weights were not merged here).
    pub fn empty() -> Self {
        WeightSummary {
            modules: 0,
            worst_rel_error: None,
            worst_module: None,
            mean_rel_error: None,
            max_floor_ratio: None,
            min_retention: None,
            scale_ratio_range: None,
            mean_below_half_ulp: None,
            nonfinite: 0,
            overflow: 0,
        }
    }
}

/// One precision's section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionReport {
    pub name: String,
    pub class: &'static str,
    pub verdict: Verdict,
    pub weights: WeightSummary,
    /// The merged model's logits against the unmerged reference; null when not run.
    pub logits: Option<crate::divergence::LogitStats>,
    /// Quantized formats: the quantized base with the adapter served unmerged beside it (`P+lora`).
    pub unmerged_logits: Option<crate::divergence::LogitStats>,
    /// Greedy generation check; null when not run.
    pub generation: Option<crate::forward::GenerationStats>,
}

/// Everything the weight stage reports.
#[derive(Debug, Clone)]
pub struct WeightOutcome {
    pub rows: Vec<LayerRow>,
    pub precisions: Vec<PrecisionReport>,
    pub findings: Vec<Finding>,
}

/// The module kind used to compare layers: the path with layer indices replaced by `*`.
pub fn module_kind(module: &str) -> String {
    match Regex::new(r"\.\d+\.") {
        Ok(re) => re.replace_all(module, ".*.").into_owned(),
        Err(_) => module.to_string(),
    }
}

/// Builds rows, summaries and findings from the evaluations (sorted by tensor name).
pub fn assess(
    evaluations: &[TensorEvaluation],
    precisions: &[Precision],
    thresholds: &Thresholds,
) -> WeightOutcome {
    let z_scores = outlier_scores(evaluations);
    let mut rows = Vec::new();
    for (eval, z) in evaluations.iter().zip(&z_scores) {
        for result in &eval.results {
            let s = &result.stats;
            rows.push(LayerRow {
                module: eval.module.clone(),
                precision: result.precision.name().to_string(),
                numel: eval.delta.numel,
                delta_norm: eval.delta.delta_norm,
                weight_norm: eval.delta.weight_norm,
                delta_mean: eval.delta.delta_mean,
                delta_std: eval.delta.delta_std,
                delta_skewness: eval.delta.delta_skewness,
                delta_kurtosis: eval.delta.delta_kurtosis,
                delta_outlier_z: *z,
                rel_error: s.rel_error,
                rounding_floor: s.rounding_floor,
                floor_ratio: s.floor_ratio,
                delta_retention: s.delta_retention,
                delta_below_half_ulp: s.delta_below_half_ulp,
                max_abs_error: s.max_abs_error,
                snr_db: s.snr_db,
                nan: s.nan,
                inf: s.inf,
                out_of_range: s.out_of_range,
                quant_error_to_delta: result
                    .precision
                    .is_quantized()
                    .then_some(s.rel_error)
                    .flatten(),
                qlora_base_error: eval.delta.qlora_base_error,
                note: result.note.clone(),
            });
        }
    }
    let mut findings = outlier_findings(evaluations, &z_scores, thresholds);
    let mut reports = Vec::new();
    for &precision in precisions {
        let mine: Vec<&LayerRow> = rows
            .iter()
            .filter(|r| r.precision == precision.name())
            .collect();
        let mut own = precision_findings(precision, &mine, thresholds);
        reports.push(PrecisionReport {
            name: precision.name().to_string(),
            class: precision.class().name(),
            verdict: Verdict::of(&own),
            weights: summarize(&mine),
            logits: None,
            unmerged_logits: None,
            generation: None,
        });
        findings.append(&mut own);
    }
    WeightOutcome {
        rows,
        precisions: reports,
        findings,
    }
}

fn outlier_scores(evaluations: &[TensorEvaluation]) -> Vec<Option<f64>> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in evaluations.iter().enumerate() {
        if e.delta.delta_norm > 0.0 {
            groups.entry(module_kind(&e.module)).or_default().push(i);
        }
    }
    let mut scores = vec![None; evaluations.len()];
    for members in groups.values().filter(|m| m.len() >= 5) {
        let logs: Vec<f64> = members
            .iter()
            .map(|i| evaluations[*i].delta.delta_norm.ln())
            .collect();
        for (i, z) in members.iter().zip(outliers::modified_z_scores(&logs)) {
            scores[*i] = Some(z);
        }
    }
    scores
}

fn outlier_findings(
    evaluations: &[TensorEvaluation],
    z_scores: &[Option<f64>],
    thresholds: &Thresholds,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (eval, z) in evaluations.iter().zip(z_scores) {
        let Some(z) = z.filter(|z| z.abs() > thresholds.outlier_z) else {
            continue;
        };
        let peers: Vec<f64> = evaluations
            .iter()
            .filter(|e| module_kind(&e.module) == module_kind(&eval.module))
            .map(|e| e.delta.delta_norm)
            .collect();
        let mut sorted = peers.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let ratio = eval.delta.delta_norm / median.max(f64::MIN_POSITIVE);
        // Both directions count: a module that learned 1/ratio of its peers is as suspicious as
        // one that learned ratio times more. A zero ‖ΔW‖ has no z-score (it is `untrained`'s job).
        let spread = if ratio > 0.0 {
            ratio.max(1.0 / ratio)
        } else {
            f64::INFINITY
        };
        if spread < thresholds.outlier_ratio {
            continue;
        }
        findings.push(
            Finding::new(
                Code::DeltaOutlier,
                Some(eval.module.clone()),
                format!(
                    "‖ΔW‖ = {:.3e} is {ratio:.3}× the median {:.3e} of its {} `{}` peers (modified z = {z:.1}; \
                     flagged from {:.1}× and |z| > {:.1})",
                    eval.delta.delta_norm,
                    median,
                    peers.len(),
                    module_kind(&eval.module),
                    thresholds.outlier_ratio,
                    thresholds.outlier_z,
                ),
            )
            .observed(z, Some(thresholds.outlier_z)),
        );
    }
    findings
}

fn summarize(rows: &[&LayerRow]) -> WeightSummary {
    let rel: Vec<(f64, &str)> = rows
        .iter()
        .filter_map(|r| r.rel_error.map(|e| (e, r.module.as_str())))
        .collect();
    let worst = rel.iter().copied().max_by(|a, b| a.0.total_cmp(&b.0));
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    WeightSummary {
        modules: rows.len(),
        worst_rel_error: worst.map(|w| w.0),
        worst_module: worst.map(|w| w.1.to_string()),
        mean_rel_error: mean(rel.iter().map(|r| r.0).collect()),
        max_floor_ratio: rows
            .iter()
            .filter_map(|r| r.floor_ratio)
            .max_by(f64::total_cmp),
        min_retention: rows
            .iter()
            .filter_map(|r| r.delta_retention)
            .min_by(f64::total_cmp),
        scale_ratio_range: None,
        mean_below_half_ulp: mean(rows.iter().filter_map(|r| r.delta_below_half_ulp).collect()),
        nonfinite: rows.iter().map(|r| r.nan + r.inf).sum(),
        overflow: rows.iter().map(|r| r.out_of_range).sum(),
    }
}

/// The affected layers of one rule, worst first, as "module (value)" for a message.
fn worst_list(
    hits: &mut [(&LayerRow, f64)],
    worst_is_high: bool,
    fmt: impl Fn(f64) -> String,
) -> String {
    hits.sort_by(|a, b| {
        let o = a.1.total_cmp(&b.1);
        if worst_is_high { o.reverse() } else { o }
    });
    let shown: Vec<String> = hits
        .iter()
        .take(5)
        .map(|(r, v)| format!("{} ({})", r.module, fmt(*v)))
        .collect();
    let more = hits.len().saturating_sub(5);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn precision_findings(
    precision: Precision,
    rows: &[&LayerRow],
    thresholds: &Thresholds,
) -> Vec<Finding> {
    let t = thresholds.class(precision.class());
    let name = precision.name();
    let total = rows.len();
    let mut findings = Vec::new();
    let mut push = |code: Code,
                    hits: Vec<(&LayerRow, f64)>,
                    observed: f64,
                    threshold: Option<f64>,
                    message: String| {
        let module = hits.first().map(|h| h.0.module.clone());
        let mut f = Finding::new(code, module, message).observed(observed, threshold);
        f.precision = Some(name.to_string());
        findings.push(f);
    };

    let mut nonfinite: Vec<(&LayerRow, f64)> = rows
        .iter()
        .filter(|r| r.nan + r.inf > 0)
        .map(|r| (*r, (r.nan + r.inf) as f64))
        .collect();
    if !nonfinite.is_empty() {
        let count: f64 = nonfinite.iter().map(|h| h.1).sum();
        let list = worst_list(&mut nonfinite, true, |v| format!("{v:.0} values"));
        push(
            Code::NonfiniteMerge,
            nonfinite,
            count,
            Some(0.0),
            format!("{count:.0} NaN/Inf values in the {name} merge: {list}"),
        );
    }

    let mut overflow: Vec<(&LayerRow, f64)> = rows
        .iter()
        .filter(|r| r.out_of_range > 0)
        .map(|r| (*r, r.out_of_range as f64))
        .collect();
    if !overflow.is_empty() {
        let count: f64 = overflow.iter().map(|h| h.1).sum();
        let limit = crate::stats::weights::range_limit(precision).unwrap_or(f64::INFINITY);
        let list = worst_list(&mut overflow, true, |v| format!("{v:.0} values"));
        push(
            Code::Overflow,
            overflow,
            count,
            Some(limit),
            format!(
                "{count:.0} merged values exceed what {name} can store (|w| > {limit}): {list}"
            ),
        );
    }

    if let Some(limit) = t.floor_ratio {
        let mut drift: Vec<(&LayerRow, f64)> = rows
            .iter()
            .filter_map(|r| {
                r.floor_ratio
                    .filter(|v| *v > limit && v.is_finite())
                    .map(|v| (*r, v))
            })
            .collect();
        if !drift.is_empty() {
            let worst = drift.iter().map(|h| h.1).fold(0.0, f64::max);
            let n = drift.len();
            let list = worst_list(&mut drift, true, |v| format!("{v:.1}× the floor"));
            push(
                Code::PrecisionDrift,
                drift,
                worst,
                Some(limit),
                format!(
                    "{n} of {total} layers are merged with more error than one rounding to {name} allows: {list}"
                ),
            );
        }
    }

    let mut swamped: Vec<(&LayerRow, f64)> = Vec::new();
    // Layers with NaN/Inf are nonfinite-merge's; their retention is meaningless.
    for r in rows.iter().filter(|r| r.nan + r.inf == 0) {
        let noisy = t
            .swamped_error
            .zip(r.rel_error)
            .is_some_and(|(limit, e)| e > limit && e.is_finite());
        let lost = t
            .min_retention
            .zip(r.delta_retention)
            .is_some_and(|(limit, k)| k < limit);
        if noisy || lost {
            swamped.push((*r, r.delta_retention.unwrap_or(0.0)));
        }
    }
    if !swamped.is_empty() {
        let n = swamped.len();
        let worst_rel = swamped
            .iter()
            .filter_map(|h| h.0.rel_error)
            .fold(0.0, f64::max);
        let min_ret = swamped.iter().map(|h| h.1).fold(f64::INFINITY, f64::min);
        let below: Vec<f64> = swamped
            .iter()
            .filter_map(|h| h.0.delta_below_half_ulp)
            .collect();
        let mean_below = below.iter().sum::<f64>() / below.len().max(1) as f64;
        let unit = if precision.is_quantized() {
            "left unchanged by quantization"
        } else {
            "below half an ULP of their weight"
        };
        let list = worst_list(&mut swamped, false, |v| format!("retention {v:.2}"));
        push(
            Code::DeltaSwamped,
            swamped,
            min_ret,
            t.min_retention,
            format!(
                "{n} of {total} layers lose the update in {name}: rounding error up to {worst_rel:.2}× ‖ΔW‖, \
                 retention down to {min_ret:.2}, on average {:.1}% of ΔW entries {unit}; {list}",
                mean_below * 100.0
            ),
        );
    }

    if let Some(limit) = t.quant_error {
        let mut noisy: Vec<(&LayerRow, f64)> = rows
            .iter()
            .filter_map(|r| {
                r.quant_error_to_delta
                    .filter(|v| *v > limit)
                    .map(|v| (*r, v))
            })
            .collect();
        if !noisy.is_empty() {
            let worst = noisy.iter().map(|h| h.1).fold(0.0, f64::max);
            let n = noisy.len();
            let list = worst_list(&mut noisy, true, |v| format!("{v:.1}× ‖ΔW‖"));
            push(
                Code::QuantizationError,
                noisy,
                worst,
                Some(limit),
                format!(
                    "in {n} of {total} layers the {name} quantization error exceeds {limit}× the update: {list}"
                ),
            );
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_kind_hides_layer_indices() {
        assert_eq!(
            module_kind("model.layers.12.self_attn.q_proj"),
            "model.layers.*.self_attn.q_proj"
        );
        assert_eq!(module_kind("lm_head"), "lm_head");
    }
}
