//! Human-readable text: the `check` summary, `inspect` summaries and `explain` pages. Plain text
//! with aligned columns, numbers with units; no colour so logs and pipes stay clean.

use std::fmt::Write as _;

use super::Report;
use crate::commands::inspect::{AdapterSummary, CheckpointSummary};
use crate::findings::{Code, Level, Verdict};

/// Formats a byte count with a binary unit.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a parameter count (`134.5M`).
pub fn human_params(count: usize) -> String {
    let c = count as f64;
    if c >= 1e9 {
        format!("{:.2}B", c / 1e9)
    } else if c >= 1e6 {
        format!("{:.1}M", c / 1e6)
    } else if c >= 1e3 {
        format!("{:.1}K", c / 1e3)
    } else {
        count.to_string()
    }
}

/// The summary printed after `check`.
pub fn check_summary(report: &Report) -> String {
    let mut out = String::new();
    let mode = if report.inputs.weights_only {
        "weights only"
    } else {
        "weights and logits"
    };
    let _ = writeln!(out, "lora-doctor {} — check, {mode}", report.tool_version);
    let _ = writeln!(
        out,
        "base     {} ({} file{})",
        report.inputs.base,
        report.inputs.base_files.len(),
        if report.inputs.base_files.len() == 1 {
            ""
        } else {
            "s"
        }
    );
    for s in &report.structure {
        let rslora = if s.use_rslora { " rsLoRA" } else { "" };
        let dora = if s.use_dora { " DoRA" } else { "" };
        let _ = writeln!(
            out,
            "adapter  {}  r={} alpha={}{rslora}{dora}; {} modules, {} matched; {} tensors, {}",
            s.adapter,
            s.r,
            s.lora_alpha,
            s.modules.len(),
            s.matched,
            s.tensors,
            human_bytes(s.bytes)
        );
    }
    if let Some(settings) = &report.merge
        && let Some(why) = &settings.skipped
    {
        let _ = writeln!(out, "\nmerge not evaluated: {why}");
    }
    if let Some(precisions) = &report.precisions {
        let recipe = report.merge.as_ref().map_or("exact", |m| m.recipe.name());
        let _ = writeln!(
            out,
            "\n{:<9} {:<7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}  worst layer   (recipe {recipe})",
            "precision",
            "verdict",
            "worst err",
            "mean err",
            "floor×",
            "retention",
            "<½ulp",
            "nonfinite"
        );
        let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        for p in precisions {
            let w = &p.weights;
            let _ = writeln!(
                out,
                "{:<9} {:<7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}  {}",
                p.name,
                p.verdict.as_str(),
                num(w.worst_rel_error),
                num(w.mean_rel_error),
                num(w.max_floor_ratio),
                num(w.min_retention),
                w.mean_below_half_ulp
                    .map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0)),
                w.nonfinite + w.overflow,
                w.worst_module.as_deref().unwrap_or("-"),
            );
        }
        let _ = writeln!(
            out,
            "err = ‖W_p − W*‖/‖ΔW‖ (worst / mean over {} layers); floor× = err / error of one rounding",
            precisions.first().map_or(0, |p| p.weights.modules)
        );
    }
    match (&report.adapter_effect, &report.logits_skipped) {
        (Some(effect), _) => {
            let _ = writeln!(
                out,
                "\nlogits over {} tokens — the adapter's own effect: mean KL(reference ‖ base) = {:.4} nats, same top-1 {:.1}%",
                effect.tokens,
                effect.mean_kl,
                effect.same_top1 * 100.0
            );
            if let Some(shift) = effect.quantization_shift_kl {
                let format = report
                    .merge
                    .as_ref()
                    .and_then(|m| m.trained_on.as_deref())
                    .unwrap_or("the quantized format");
                let _ = writeln!(
                    out,
                    "  (base = dequant({format}(W)), what the adapter trained on; against the 16-bit base the \
                     reference is {shift:.4} nats away: the adapter's effect plus the quantization shift)"
                );
            }
            let _ = writeln!(
                out,
                "{:<10} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12}",
                "model", "mean KL", "± σ", "p99 KL", "top-1", "PPL ×", "lost", "worst drift"
            );
            let rows = report.precisions.iter().flatten().flat_map(|p| {
                [
                    p.logits.as_ref().map(|l| (p.name.clone(), l)),
                    p.unmerged_logits
                        .as_ref()
                        .map(|l| (format!("{}+lora", p.name), l)),
                ]
            });
            for (name, l) in rows.flatten() {
                let (worst_layer, worst) =
                    l.drift_by_layer
                        .iter()
                        .enumerate()
                        .fold(
                            (0, 0.0f64),
                            |acc, (i, d)| if *d > acc.1 { (i, *d) } else { acc },
                        );
                let _ = writeln!(
                    out,
                    "{:<10} {:>11.3e} {:>10.1e} {:>10.3e} {:>8.1}% {:>9.4} {:>8} {:>12}",
                    name,
                    l.mean_kl,
                    l.mean_kl_stderr,
                    l.p99_kl,
                    l.same_top1 * 100.0,
                    l.ppl_ratio,
                    l.effect_lost
                        .map_or("-".to_string(), |e| format!("{:.1}%", e * 100.0)),
                    format!("{worst:.1e} @{worst_layer}"),
                );
            }
            let _ = writeln!(
                out,
                "lost = KL(ref‖model) / KL(ref‖base); drift = ‖h − h_ref‖/‖h_ref‖ after a block"
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "\nlogits not compared: {why}");
        }
        (None, None) => {}
    }
    if let Some(f) = &report.forensics {
        forensics_summary(&mut out, f, report.inputs.merged.as_deref().unwrap_or("-"));
    }
    if report.findings.is_empty() {
        let _ = writeln!(out, "\nno findings");
    } else {
        let _ = writeln!(out, "\nfindings");
        for f in &report.findings {
            let scope = match (&f.precision, &f.module) {
                (Some(p), Some(m)) => format!("{p} {m}"),
                (Some(p), None) => p.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => "(adapter)".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<5} {:<18} {}",
                f.level.as_str(),
                f.code.as_str(),
                scope
            );
            let _ = writeln!(out, "        {}", f.message);
            let _ = writeln!(out, "        advice: {}", f.advice);
        }
    }
    let count = |level| report.findings.iter().filter(|f| f.level == level).count();
    let verdict = match report.verdict {
        Verdict::Pass => "PASS",
        Verdict::Warn => "PASS with warnings",
        Verdict::Fail => "FAIL",
    };
    let _ = writeln!(
        out,
        "\nverdict: {verdict} ({} deny, {} warn)",
        count(Level::Deny),
        count(Level::Warn)
    );
    out
}

/// The page `lora-doctor explain CODE` prints.
pub fn explain_page(code: Code) -> String {
    let doc = code.doc();
    format!(
        "{name} (default level: {level})\n{summary}\n\nWhat it checks\n  {what}\n\nWhy it matters\n  {why}\n\nHow to fix\n  {fix}\n",
        name = code.as_str(),
        level = doc.default_level.as_str(),
        summary = doc.summary,
        what = doc.what,
        why = doc.why,
        fix = doc.fix,
    )
}

/// The list `lora-doctor explain` prints with no code.
pub fn explain_index() -> String {
    let mut out = String::from("finding codes (lora-doctor explain CODE for details):\n");
    for code in Code::ALL {
        let doc = code.doc();
        let _ = writeln!(
            out,
            "  {:<18} {:<5} {}",
            code.as_str(),
            doc.default_level.as_str(),
            doc.summary
        );
    }
    out
}

/// `inspect` of an adapter folder.
pub fn adapter_summary(s: &AdapterSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "adapter   {}", s.path);
    let _ = writeln!(out, "peft_type {}", s.peft_type);
    let _ = writeln!(
        out,
        "rank      r={} alpha={} scale={} ({}){}{}",
        s.r,
        s.lora_alpha,
        s.scale,
        if s.use_rslora {
            "alpha/sqrt(r), rsLoRA"
        } else {
            "alpha/r"
        },
        if s.use_dora { ", DoRA" } else { "" },
        if s.fan_in_fan_out {
            ", fan_in_fan_out"
        } else {
            ""
        },
    );
    if let Some(base) = &s.base_model_name_or_path {
        let _ = writeln!(out, "base      {base}");
    }
    if let Some(targets) = &s.target_modules {
        let _ = writeln!(out, "targets   {targets}");
    }
    if !s.modules_to_save.is_empty() {
        let _ = writeln!(out, "saved     {}", s.modules_to_save.join(", "));
    }
    let _ = writeln!(
        out,
        "tensors   {} ({}, {})",
        s.tensors,
        human_bytes(s.bytes),
        s.dtypes.join(", ")
    );
    let _ = writeln!(
        out,
        "\n{:<52} {:>4} {:>8} {:>9}  kind",
        "module", "r", "alpha", "scale"
    );
    for m in &s.modules {
        let _ = writeln!(
            out,
            "{:<52} {:>4} {:>8} {:>9}  {}",
            m.module,
            m.r.map_or("-".into(), |r| r.to_string()),
            m.alpha.map_or("-".into(), |a| format!("{a}")),
            m.scale.map_or("-".into(), |v| format!("{v:.4}")),
            m.kind
        );
    }
    out
}

/// `inspect` of a checkpoint.
pub fn checkpoint_summary(s: &CheckpointSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "checkpoint {}", s.path);
    if let Some(arch) = &s.architecture {
        let _ = writeln!(out, "arch       {arch}");
    }
    let _ = writeln!(
        out,
        "params     {} in {} tensors, {} ({} file{})",
        human_params(s.parameters),
        s.tensors,
        human_bytes(s.bytes),
        s.files,
        if s.files == 1 { "" } else { "s" }
    );
    let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    let _ = writeln!(out, "dtypes     {}", dtypes.join(", "));
    if let Some(layers) = s.layers {
        let _ = writeln!(out, "layers     {layers}");
    }
    if let Some(h) = s.hidden_size {
        let _ = writeln!(out, "hidden     {h}");
    }
    if let Some(v) = s.vocab_size {
        let _ = writeln!(out, "vocab      {v}");
    }
    if let Some(t) = s.tie_word_embeddings {
        let _ = writeln!(out, "tied       {t}");
    }
    if let Some(q) = &s.quantization {
        let _ = writeln!(out, "quantized  {q}");
    }
    out
}

/// The `--merged` forensics in three lines: how many tensors are faithful, the spread of the scale
/// fit and of the residual against the rounding floor, and the untouched tensors.
fn forensics_summary(out: &mut String, f: &crate::forensics::Forensics, path: &str) {
    let fitted: Vec<&crate::forensics::ModuleFit> = f
        .modules
        .iter()
        .filter(|m| m.residual_to_floor.is_some())
        .collect();
    let faithful = fitted
        .iter()
        .filter(|m| m.residual_to_floor.is_some_and(|r| r <= f.tolerance))
        .count();
    let sorted = |mut v: Vec<f64>| {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        v
    };
    let scales = sorted(fitted.iter().filter_map(|m| m.scale_ratio).collect());
    let ratios = sorted(fitted.iter().filter_map(|m| m.residual_to_floor).collect());
    let _ = writeln!(
        out,
        "\nmerged checkpoint {path} ({}): {} adapter-changed tensors, {faithful} faithful (residual ≤ {} × the rounding floor)",
        f.dtype,
        f.modules.len(),
        f.tolerance
    );
    if let (Some(lo), Some(hi)) = (scales.first(), scales.last()) {
        let _ = writeln!(
            out,
            "  ŝ/s median {:.4} (range {lo:.4} … {hi:.4}); residual/floor median {:.2}, worst {:.3e}",
            scales[scales.len() / 2],
            ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
        );
    }
    let u = &f.untouched;
    let _ = writeln!(
        out,
        "  untouched tensors: {} compared, {} differ from the base{}",
        u.compared,
        u.differing,
        if u.explained_by_quantization > 0 {
            format!(
                " ({} explained by quantization)",
                u.explained_by_quantization
            )
        } else {
            String::new()
        }
    );
}
