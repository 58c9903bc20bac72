//! `summary.md`: a compact Markdown verdict for a PR comment or `$GITHUB_STEP_SUMMARY` — the
//! precision matrix (precision × verdict × key numbers) and the top findings. Also owns the
//! matrix rows and number formats the HTML report shares, so both show the same numbers.
//!
//! Every string from the inputs is escaped for Markdown and inline HTML (GitHub renders both).

use std::fmt::Write as _;

use super::Report;
pub use super::format::{num, num_pm, percent};
use super::format::{ratio, sci};
use crate::divergence::LogitStats;
use crate::findings::{Level, Verdict};

/// How many findings the summary lists before pointing at the full report.
pub const TOP_FINDINGS: usize = 10;

/// One row of the precision matrix: a precision's verdict and key numbers; `None` where the
/// section did not run (shown as "—").
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixRow {
    /// The precision name, or `P+lora` for a quantized base with the adapter served unmerged.
    pub label: String,
    /// The precision's verdict; `None` for `P+lora` rows (informational, never gating).
    pub verdict: Option<Verdict>,
    pub worst_rel_error: Option<f64>,
    pub worst_module: Option<String>,
    /// [`crate::findings::weights::WeightSummary::shown_retention`].
    pub retention: Option<f64>,
    pub mean_kl: Option<f64>,
    pub mean_kl_stderr: Option<f64>,
    pub p99_kl: Option<f64>,
    pub same_top1: Option<f64>,
    pub effect_lost: Option<f64>,
}

impl MatrixRow {
    fn with_logits(mut self, logits: Option<&LogitStats>) -> Self {
        if let Some(l) = logits {
            self.mean_kl = finite(l.mean_kl);
            self.mean_kl_stderr = finite(l.mean_kl_stderr);
            self.p99_kl = finite(l.p99_kl);
            self.same_top1 = finite(l.same_top1);
            self.effect_lost = l.effect_lost.and_then(finite);
        }
        self
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The matrix rows in report order; each quantized precision with an unmerged-adapter run is
/// followed by its `P+lora` row when `with_unmerged` is set.
pub fn matrix(report: &Report, with_unmerged: bool) -> Vec<MatrixRow> {
    let mut rows = Vec::new();
    for p in report.precisions.iter().flatten() {
        let w = &p.weights;
        rows.push(
            MatrixRow {
                label: p.name.clone(),
                verdict: Some(p.verdict),
                worst_rel_error: w.worst_rel_error,
                worst_module: w.worst_module.clone(),
                retention: w.shown_retention(),
                mean_kl: None,
                mean_kl_stderr: None,
                p99_kl: None,
                same_top1: None,
                effect_lost: None,
            }
            .with_logits(p.logits.as_ref()),
        );
        if with_unmerged && let Some(u) = &p.unmerged_logits {
            rows.push(
                MatrixRow {
                    label: format!("{}+lora", p.name),
                    verdict: None,
                    worst_rel_error: None,
                    worst_module: None,
                    retention: None,
                    mean_kl: None,
                    mean_kl_stderr: None,
                    p99_kl: None,
                    same_top1: None,
                    effect_lost: None,
                }
                .with_logits(Some(u)),
            );
        }
    }
    rows
}

/// The headline word of a verdict.
pub fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "PASS",
        Verdict::Warn => "PASS with warnings",
        Verdict::Fail => "FAIL",
    }
}

/// The headline word of a `check --each` run's overall verdict.
pub fn each_verdict_word(verdict: super::each::EachVerdict) -> &'static str {
    use super::each::EachVerdict;
    match verdict {
        EachVerdict::Pass => verdict_word(Verdict::Pass),
        EachVerdict::Warn => verdict_word(Verdict::Warn),
        EachVerdict::Fail => verdict_word(Verdict::Fail),
        EachVerdict::Error => "NOT CHECKED",
    }
}

/// One adapter's headline number: its worst candidate's mean KL to the reference (the largest),
/// if the logit comparison ran.
pub fn worst_mean_kl(report: &Report) -> Option<f64> {
    matrix(report, false)
        .iter()
        .filter_map(|r| r.mean_kl)
        .fold(None, |worst, kl| Some(worst.map_or(kl, |w: f64| w.max(kl))))
}

/// `check --each`: the overall verdict, one table row per adapter, then each adapter's own
/// summary (or why it was not checked).
pub fn render_each(report: &super::each::EachReport) -> String {
    let mut out = String::new();
    let (pass, warn, fail, error) = report.counts();
    let _ = writeln!(
        out,
        "### {} lora-doctor --each: {} — {} adapter(s): {pass} pass, {warn} warn, {fail} fail, \
         {error} not checked\n",
        match report.verdict {
            super::each::EachVerdict::Error => "⛔",
            super::each::EachVerdict::Fail => verdict_icon(Some(Verdict::Fail)),
            super::each::EachVerdict::Warn => verdict_icon(Some(Verdict::Warn)),
            super::each::EachVerdict::Pass => verdict_icon(Some(Verdict::Pass)),
        },
        each_verdict_word(report.verdict),
        report.adapters.len()
    );
    let _ = writeln!(out, "base {}\n", escape_markdown(&report.base));
    out.push_str("| adapter | verdict | deny | warn | worst mean KL |\n|---|---|---:|---:|---:|\n");
    for a in &report.adapters {
        match &a.report {
            Some(r) => {
                let count = |level| r.findings.iter().filter(|f| f.level == level).count();
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {} | {} | {} |",
                    escape_markdown(&a.adapter),
                    verdict_icon(Some(r.verdict)),
                    r.verdict.as_str(),
                    count(Level::Deny),
                    count(Level::Warn),
                    sci(worst_mean_kl(r), 3)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "| {} | ⛔ not checked | — | — | — |",
                    escape_markdown(&a.adapter)
                );
            }
        }
    }
    out.push('\n');
    for a in &report.adapters {
        let _ = writeln!(
            out,
            "<details><summary>{}</summary>\n",
            escape_markdown(&a.adapter)
        );
        match (&a.report, &a.error) {
            (Some(r), _) => out.push_str(&render(r)),
            (None, error) => {
                let _ = writeln!(
                    out,
                    "Not checked: {}",
                    escape_markdown(error.as_deref().unwrap_or("unknown error"))
                );
            }
        }
        out.push_str("\n</details>\n\n");
    }
    out
}

fn verdict_icon(verdict: Option<Verdict>) -> &'static str {
    match verdict {
        Some(Verdict::Pass) => "✅",
        Some(Verdict::Warn) => "⚠️",
        Some(Verdict::Fail) => "❌",
        None => "ℹ️",
    }
}

fn level_icon(level: Level) -> &'static str {
    match level {
        Level::Deny => "❌",
        Level::Warn => "⚠️",
        Level::Allow => "ℹ️",
    }
}

/// Escapes text for a Markdown table cell or paragraph: HTML-significant characters become
/// entities, Markdown punctuation is backslash-escaped, line breaks become spaces.
pub fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\r' | '\n' => out.push(' '),
            '\\' | '`' | '*' | '_' | '[' | ']' | '#' | '|' | '~' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Renders the Markdown summary.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let count = |level| report.findings.iter().filter(|f| f.level == level).count();
    let (deny, warn, allow) = (count(Level::Deny), count(Level::Warn), count(Level::Allow));
    let _ = writeln!(
        out,
        "### {} lora-doctor: {} — {deny} deny, {warn} warn\n",
        verdict_icon(Some(report.verdict)),
        verdict_word(report.verdict)
    );
    let adapters: Vec<String> = report
        .inputs
        .adapters
        .iter()
        .map(|a| escape_markdown(a))
        .collect();
    let _ = writeln!(
        out,
        "base {} · adapter{} {}\n",
        escape_markdown(&report.inputs.base),
        if adapters.len() == 1 { "" } else { "s" },
        adapters.join(" → ")
    );
    let rows = matrix(report, false);
    if rows.is_empty() {
        let why = report
            .merge
            .as_ref()
            .and_then(|m| m.skipped.as_deref())
            .unwrap_or("no precision was evaluated");
        let _ = writeln!(out, "Merge not evaluated: {}\n", escape_markdown(why));
    } else {
        out.push_str(
            "| precision | verdict | worst layer error | retention | mean KL | p99 KL | same top-1 | effect lost |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &rows {
            let _ = writeln!(
                out,
                "| {} | {} {} | {} | {} | {} | {} | {} | {} |",
                escape_markdown(&r.label),
                verdict_icon(r.verdict),
                r.verdict.map_or("", Verdict::as_str),
                sci(r.worst_rel_error, 3),
                ratio(r.retention),
                sci(r.mean_kl, 3),
                sci(r.p99_kl, 3),
                percent(r.same_top1),
                percent(r.effect_lost),
            );
        }
        out.push('\n');
        if let Some(why) = &report.logits_skipped {
            let _ = writeln!(out, "Logit comparison not run: {}\n", escape_markdown(why));
        }
    }
    let gating: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.level != Level::Allow)
        .collect();
    if gating.is_empty() {
        out.push_str("No deny or warn findings.");
    } else {
        let shown = gating.len().min(TOP_FINDINGS);
        let _ = writeln!(out, "**Findings** ({shown} of {}):\n", gating.len());
        for f in gating.iter().take(TOP_FINDINGS) {
            let scope: Vec<String> = [f.precision.as_deref(), f.module.as_deref()]
                .into_iter()
                .flatten()
                .map(escape_markdown)
                .collect();
            let _ = writeln!(
                out,
                "- {} **{}** `{}`{}{} — {}",
                level_icon(f.level),
                f.level.as_str(),
                f.code.as_str(),
                if scope.is_empty() { "" } else { " · " },
                scope.join(" · "),
                escape_markdown(&f.message)
            );
        }
    }
    if allow > 0 {
        let _ = write!(out, "\n{allow} allowed finding(s) not counted.");
    }
    let _ = writeln!(
        out,
        "\n\n<sub>lora-doctor {} · schema {} · details in report.html / report.json</sub>",
        escape_markdown(report.tool_version),
        report.schema_version
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(num(Some(0.011893)), "0.01189");
        assert_eq!(num(Some(1.0)), "1.000");
        assert_eq!(num(Some(6.55e-5)), "6.55e-5");
        assert_eq!(num(None), "—");
        assert_eq!(percent(Some(0.9921875)), "99.2 %");
    }

    #[test]
    fn markdown_escaping_neutralises_tables_links_and_html() {
        assert_eq!(
            escape_markdown("a|b <script>[x](y)\n"),
            "a\\|b &lt;script&gt;\\[x\\](y) "
        );
    }
}
