//! Human-readable text: the `check` summary, `inspect` summaries and `explain` pages. Plain text
//! with aligned columns, numbers with units; the `check` summary colours verdicts and finding
//! levels when its `Palette` says so (a terminal, by default), so logs and pipes stay clean.

use std::fmt::Write as _;

use super::Report;
use super::color::Palette;
use super::format::{human_bytes, num, pct, ratio, sci};
use crate::findings::{Code, Level, Verdict};

/// The summary printed after `check`, coloured with `palette`.
pub fn check_summary(report: &Report, palette: Palette) -> String {
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
    for h in &report.inputs.hub {
        let _ = writeln!(
            out,
            "hub      {} {} @ {} = {}",
            h.flag, h.repo_id, h.revision, h.sha
        );
    }
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
        // Candidate labels (`bf16:stochastic`, `q4_0+residual`) widen the first column.
        let w9 = precisions.iter().map(|p| p.name.len()).fold(9, usize::max);
        let _ = writeln!(
            out,
            "\n{:<w9$} {:<7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}  worst layer   (recipe {recipe})",
            "precision",
            "verdict",
            "worst err",
            "mean err",
            "floor×",
            "retention",
            "<½ulp",
            "nonfinite"
        );
        for p in precisions {
            let w = &p.weights;
            let _ = writeln!(
                out,
                "{:<w9$} {} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}  {}",
                p.name,
                palette.verdict(p.verdict, &format!("{:<7}", p.verdict.as_str())),
                sci(w.worst_rel_error, 3),
                sci(w.mean_rel_error, 3),
                num(w.max_floor_ratio),
                ratio(w.shown_retention()),
                pct(w.mean_below_half_ulp),
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
                let format = report.trained_on_label();
                let _ = writeln!(
                    out,
                    "  (base = dequant({format}(W)), what the adapter trained on; against the 16-bit base the \
                     reference is {shift:.4} nats away: the adapter's effect plus the quantization shift)"
                );
            }
            let rows: Vec<_> = report
                .precisions
                .iter()
                .flatten()
                .flat_map(|p| {
                    [
                        p.logits.as_ref().map(|l| (p.name.clone(), l)),
                        p.unmerged_logits
                            .as_ref()
                            .map(|l| (format!("{}+lora", p.name), l)),
                    ]
                })
                .flatten()
                .collect();
            let w10 = rows.iter().map(|(n, _)| n.len()).fold(10, usize::max);
            let _ = writeln!(
                out,
                "{:<w10$} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12}",
                "model", "mean KL", "± σ", "p99 KL", "top-1", "PPL ×", "lost", "worst drift"
            );
            for (name, l) in rows {
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
                    "{:<w10$} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12}",
                    name,
                    sci(Some(l.mean_kl), 3),
                    sci(Some(l.mean_kl_stderr), 2),
                    sci(Some(l.p99_kl), 3),
                    pct(Some(l.same_top1)),
                    ratio(Some(l.ppl_ratio)),
                    pct(l.effect_lost),
                    format!("{} @{worst_layer}", sci(Some(worst), 2)),
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
    if let Some(repair) = &report.repair {
        repair_advice(&mut out, repair);
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
                "  {} {:<18} {}",
                palette.level(f.level, &format!("{:<5}", f.level.as_str())),
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
    let verdict = palette.verdict(report.verdict, verdict);
    let _ = writeln!(
        out,
        "\nverdict: {verdict} ({} deny, {} warn); checked: {}",
        count(Level::Deny),
        count(Level::Warn),
        report.checks_run().join(", ")
    );
    out
}

/// The summary printed after `check --each`: one line per adapter, then the deny and warn
/// findings of those that have any and why the others could not be checked, then the overall
/// verdict. Each adapter's complete summary is in its report section (`--json`, `--html`, …).
pub fn each_summary(report: &super::each::EachReport, palette: Palette) -> String {
    use super::each::EachVerdict;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lora-doctor {} — check --each, {} adapter(s)",
        report.tool_version,
        report.adapters.len()
    );
    let _ = writeln!(out, "base     {}", report.base);
    let _ = writeln!(
        out,
        "shared   base opened {}×, texts tokenized {}×, base forward {}×",
        report.shared.base_opens, report.shared.tokenizations, report.shared.base_forwards
    );
    let w = report
        .adapters
        .iter()
        .map(|a| a.adapter.len())
        .fold(7, usize::max);
    let _ = writeln!(
        out,
        "\n{:<w$} {:<11} {:>5} {:>5} {:>13} {:>13}",
        "adapter", "verdict", "deny", "warn", "effect KL", "worst mean KL"
    );
    for a in &report.adapters {
        match &a.report {
            Some(r) => {
                let count = |level| r.findings.iter().filter(|f| f.level == level).count();
                let _ = writeln!(
                    out,
                    "{:<w$} {} {:>5} {:>5} {:>13} {:>13}",
                    a.adapter,
                    palette.verdict(r.verdict, &format!("{:<11}", r.verdict.as_str())),
                    count(Level::Deny),
                    count(Level::Warn),
                    sci(r.adapter_effect.as_ref().map(|e| e.mean_kl), 3),
                    sci(super::summary::worst_mean_kl(r), 3),
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:<w$} {} {:>5} {:>5} {:>13} {:>13}",
                    a.adapter,
                    palette.level(Level::Deny, &format!("{:<11}", "not checked")),
                    "-",
                    "-",
                    "-",
                    "-"
                );
            }
        }
    }
    for a in &report.adapters {
        if let Some(error) = &a.error {
            let _ = writeln!(out, "\n{}: not checked\n  {error}", a.adapter);
        }
        let Some(r) = &a.report else {
            continue;
        };
        let gating: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.level != Level::Allow)
            .collect();
        if gating.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{}: findings", a.adapter);
        for f in gating {
            let scope = [f.precision.as_deref(), f.module.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                out,
                "  {} {:<18} {}\n        {}",
                palette.level(f.level, &format!("{:<5}", f.level.as_str())),
                f.code.as_str(),
                scope,
                f.message
            );
        }
    }
    let (pass, warn, fail, error) = report.counts();
    let word = super::summary::each_verdict_word(report.verdict);
    let word = match report.verdict {
        EachVerdict::Pass => palette.verdict(Verdict::Pass, word),
        EachVerdict::Warn => palette.verdict(Verdict::Warn, word),
        EachVerdict::Fail => palette.verdict(Verdict::Fail, word),
        EachVerdict::Error => palette.level(Level::Deny, word),
    };
    let _ = writeln!(
        out,
        "\nverdict: {word} ({pass} pass, {warn} warn, {fail} fail, {error} not checked); each \
         adapter's full report is in --json / --html / --report-dir"
    );
    out
}

/// The page `lora-doctor explain CODE` prints.
pub fn explain_page(code: Code) -> String {
    let doc = code.doc();
    format!(
        "{name} (default level: {level})\n{summary}\n\nWhat it checks\n  {what}\n\nWhy it matters\n  {why}\n\nHow to fix\n  {fix}\n",
        name = code.as_str(),
        level = match code.level_rule() {
            Some(rule) => format!("{}: {rule}", code.level_label()),
            None => code.level_label(),
        },
        summary = doc.summary,
        what = doc.what,
        why = doc.why,
        fix = doc.fix,
    )
}

/// The list `lora-doctor explain` prints with no code.
pub fn explain_index() -> String {
    let mut out = String::from("finding codes (lora-doctor explain CODE for details):\n");
    // Columns sized to the longest entries, so long codes never push their row out of line.
    let code_width = Code::ALL
        .iter()
        .map(|c| c.as_str().len())
        .max()
        .unwrap_or(0);
    let level_width = Code::ALL
        .iter()
        .map(|c| c.level_label().len())
        .max()
        .unwrap_or(0);
    for code in Code::ALL {
        let _ = writeln!(
            out,
            "  {:<code_width$} {:<level_width$} {}",
            code.as_str(),
            code.level_label(),
            code.doc().summary
        );
    }
    out
}

/// The `--merged` forensics in three lines: how many tensors are faithful, the spread of the scale
/// fit and of the residual against the rounding floor, and the untouched tensors.
/// `check --repair` / `--keep-adapter`: the best option per deployment format, the texts behind
/// the candidates, and what each mixed candidate keeps unmerged.
fn repair_advice(out: &mut String, repair: &crate::report::RepairSection) {
    let _ = writeln!(
        out,
        "\nrepair: scored on {}{}",
        repair.evaluation_text,
        repair
            .calibration_text
            .as_ref()
            .map(|c| format!(
                ", fitted on {c} ({} tokens)",
                repair.calibration_tokens.unwrap_or(0)
            ))
            .unwrap_or_default()
    );
    for r in &repair.residual {
        let _ = writeln!(
            out,
            "  {}: {} of {} modules kept unmerged ({}), residual adapter {}",
            r.candidate,
            r.kept_modules,
            r.modules,
            repair.keep_adapter.as_deref().unwrap_or(""),
            crate::report::format::human_bytes(r.adapter_bytes)
        );
    }
    for best in &repair.best {
        let plain = best
            .plain_mean_kl
            .map(|p| format!(" (plain {}: {p:.3e})", best.format))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  to ship {}: {} — mean KL {:.3e}{plain}",
            best.format, best.candidate, best.mean_kl
        );
    }
}

fn forensics_summary(out: &mut String, f: &crate::forensics::Forensics, path: &str) {
    let fitted: Vec<&crate::forensics::ModuleFit> = f
        .modules
        .iter()
        .filter(|m| m.residual_to_floor.is_some())
        .collect();
    let faithful = fitted
        .iter()
        // Within the tolerance and no cause named: a small update can sit within the floor of
        // a coarse format and still be proven absent after rounding (`not-merged`).
        .filter(|m| m.cause.is_none() && m.residual_to_floor.is_some_and(|r| r <= f.tolerance))
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
            "  ŝ/s median {} (range {} … {}); residual/floor median {}, worst {}",
            ratio(Some(scales[scales.len() / 2])),
            ratio(Some(*lo)),
            ratio(Some(*hi)),
            sci(ratios.get(ratios.len() / 2).copied(), 3),
            sci(ratios.last().copied(), 3),
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
