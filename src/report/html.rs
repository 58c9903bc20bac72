//! `report.html`: one self-contained page (inline CSS and SVG; no scripts, fonts or other assets,
//! so it works offline and in a CI artifact viewer). Sections: verdict banner, precision matrix,
//! per-layer heatmap, KL distribution, hidden-state drift (with, for mixture-of-experts models, the
//! routing table), greedy generation, the merged
//! checkpoint's forensics (only with `--merged`), findings with advice, inputs and provenance. A
//! section that did not run says so instead of drawing an empty chart.
//!
//! Every string that comes from the inputs — paths, module and tensor names, messages, config
//! values — passes through [`escape`]; chart text is escaped by the SVG backend (see `charts`).
//! Stable ids for tests and scripts: `verdict`, `chart-matrix` (holding `precision-matrix`),
//! `chart-heatmap`, `chart-kl`, `chart-drift`, `routing` (MoE models only), `generation`, `forensics` (holding
//! `chart-forensics`, `forensics-causes`, `forensics-untouched`, `forensics-inventory`,
//! `config-drift`; present only when the report has `forensics`), `findings`, `provenance`.
//! Every chart container has `data-state="drawn"` or `data-state="not-run"`.

use std::fmt::Write as _;

use serde_json::Value;

use super::Report;
use super::charts::{self, HeatmapData, HeatmapMetric};
use super::format::{num, num_pm, percent, ratio, sci};
use super::summary::{self, MatrixRow};
use crate::divergence::RoutingLayer;
use crate::findings::{Level, Verdict};
use crate::forensics::{Forensics, ModuleFit};

/// Choices the page leaves to the caller.
#[derive(Debug, Clone, Default)]
pub struct HtmlOptions {
    /// The precision the heatmap shows; default: [`charts::default_heatmap_precision`].
    pub heatmap_precision: Option<String>,
    pub heatmap_metric: HeatmapMetric,
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // C0 controls other than tab/newline have no business in a report (and NUL is a
            // parse error); show them as the replacement character.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// [`escape`]d module or tensor path with a line-break opportunity after each `.`, so a narrow
/// table cell breaks `model.layers.0.self_attn.q_proj` between segments, not inside a word.
pub fn breakable_path(path: &str) -> String {
    escape(path).replace('.', ".<wbr>")
}

fn verdict_class(verdict: Option<Verdict>) -> &'static str {
    match verdict {
        Some(Verdict::Pass) => "pass",
        Some(Verdict::Warn) => "warn",
        Some(Verdict::Fail) => "fail",
        None => "info",
    }
}

const STYLE: &str = r#"
:root { --pass:#1a7f37; --pass-bg:#dafbe1; --warn:#9a6700; --warn-bg:#fff8c5;
        --fail:#cf222e; --fail-bg:#ffebe9; --info:#57606a; --info-bg:#f6f8fa; --line:#d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: #fff; color: #1f2328;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
code, .mono { font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: break-word; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--info-bg); font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.banner { border-radius: 8px; padding: 16px 20px; border: 2px solid; }
.banner.pass { background: var(--pass-bg); border-color: var(--pass); }
.banner.warn { background: var(--warn-bg); border-color: var(--warn); }
.banner.fail { background: var(--fail-bg); border-color: var(--fail); }
.banner .chips { margin-top: 8px; }
.chip { display: inline-block; margin: 2px 6px 2px 0; padding: 1px 8px; border-radius: 10px;
        border: 1px solid; font-size: 12.5px; background: #fff; }
.chip.pass, .lvl.allow { color: var(--pass); } .chip.warn, .lvl.warn { color: var(--warn); }
.chip.fail, .lvl.deny { color: var(--fail); } .chip.info { color: var(--info); }
tr.pass td { background: var(--pass-bg); } tr.warn td { background: var(--warn-bg); }
tr.fail td { background: var(--fail-bg); } tr.info td { background: var(--info-bg); color: var(--info); }
.chart { margin: 8px 0; }
.chart svg { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
.not-run { color: var(--info); background: var(--info-bg); border: 1px dashed var(--line);
           padding: 12px 16px; border-radius: 6px; max-width: 1000px; }
.muted { color: var(--info); }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--info); border-radius: 6px;
           padding: 8px 12px; margin: 8px 0; max-width: 1100px; }
.finding.deny { border-left-color: var(--fail); } .finding.warn { border-left-color: var(--warn); }
.finding.allow { opacity: 0.75; }
.lvl { font-weight: 700; text-transform: uppercase; font-size: 12px; margin-right: 6px; }
.advice { margin-top: 4px; } .advice b { font-weight: 600; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; }
details summary { cursor: pointer; color: var(--info); }
footer { margin-top: 40px; color: var(--info); font-size: 12.5px; }
"#;

/// Renders the complete page. Never fails: a chart that cannot be drawn becomes a note.
pub fn render(report: &Report, options: &HtmlOptions) -> String {
    let mut out = String::with_capacity(64 * 1024);
    page_start(
        &mut out,
        report.tool_version,
        summary::verdict_word(report.verdict),
    );
    body(&mut out, report, options);
    page_end(&mut out, report.tool_version, report.schema_version);
    out
}

fn page_start(out: &mut String, tool_version: &str, title: &str) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"lora-doctor {}\">\n\
         <title>lora-doctor: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(tool_version),
        escape(title)
    );
}

/// Every section of one check's report.
fn body(out: &mut String, report: &Report, options: &HtmlOptions) {
    banner(out, report);
    matrix_section(out, report);
    heatmap_section(out, report, options);
    kl_section(out, report);
    drift_section(out, report);
    generation_section(out, report);
    forensics_section(out, report);
    findings_section(out, report);
    provenance_section(out, report);
}

fn page_end(out: &mut String, tool_version: &str, schema_version: u32) {
    let _ = write!(
        out,
        "<footer>lora-doctor {} · report schema {} · one self-contained file, no scripts</footer>\n\
         </body>\n</html>\n",
        escape(tool_version),
        schema_version
    );
}

/// `check --each`: the overall verdict and a table of adapters, then one section per adapter
/// holding its complete report (or why it could not be checked). Element ids inside section `i`
/// are the single report's prefixed with `adapter-{i}-`, so every id on the page is unique
/// (`#adapter-1-verdict` is the second adapter's verdict).
pub fn render_each(report: &super::each::EachReport) -> String {
    use super::each::EachVerdict;
    let mut out = String::with_capacity(64 * 1024 * report.adapters.len().max(1));
    let word = summary::each_verdict_word(report.verdict);
    page_start(&mut out, report.tool_version, word);
    let class = match report.verdict {
        EachVerdict::Pass => "pass",
        EachVerdict::Warn => "warn",
        EachVerdict::Fail | EachVerdict::Error => "fail",
    };
    let (pass, warn, fail, error) = report.counts();
    let _ = writeln!(
        out,
        "<header id=\"each-verdict\" class=\"banner {class}\" data-verdict=\"{}\">\n<h1>{}</h1>\n\
         <div>{} adapter(s) on base <code>{}</code>: {pass} pass · {warn} warn · {fail} fail · \
         {error} not checked</div>\n</header>",
        report.verdict.as_str(),
        escape(word),
        report.adapters.len(),
        escape(&report.base)
    );
    out.push_str(
        "<section id=\"adapters\"><h2>Adapters</h2>\n<table>\n<tr><th>adapter</th><th>verdict</th>\
         <th>deny</th><th>warn</th><th>worst mean KL</th></tr>\n",
    );
    for (i, a) in report.adapters.iter().enumerate() {
        match &a.report {
            Some(r) => {
                let count = |level| r.findings.iter().filter(|f| f.level == level).count();
                let _ = writeln!(
                    out,
                    "<tr><td><a href=\"#adapter-{i}\">{}</a></td><td class=\"{}\">{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td></tr>",
                    breakable_path(&a.adapter),
                    verdict_class(Some(r.verdict)),
                    r.verdict.as_str(),
                    count(Level::Deny),
                    count(Level::Warn),
                    super::format::sci(summary::worst_mean_kl(r), 3)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "<tr><td><a href=\"#adapter-{i}\">{}</a></td><td class=\"fail\">not checked</td>\
                     <td colspan=\"3\">{}</td></tr>",
                    breakable_path(&a.adapter),
                    escape(a.error.as_deref().unwrap_or("unknown error"))
                );
            }
        }
    }
    out.push_str("</table>\n</section>\n");
    for (i, a) in report.adapters.iter().enumerate() {
        let _ = writeln!(
            out,
            "<section id=\"adapter-{i}\" class=\"adapter\" data-status=\"{}\">\n\
             <h2>Adapter <code>{}</code></h2>",
            a.status,
            escape(&a.adapter)
        );
        match &a.report {
            Some(r) => {
                let mut section = String::with_capacity(64 * 1024);
                body(&mut section, r, &HtmlOptions::default());
                out.push_str(&section.replace(" id=\"", &format!(" id=\"adapter-{i}-")));
            }
            None => {
                let _ = writeln!(
                    out,
                    "<div class=\"finding deny\"><span class=\"lvl\">not checked</span>{}</div>",
                    escape(a.error.as_deref().unwrap_or("unknown error"))
                );
            }
        }
        out.push_str("</section>\n");
    }
    page_end(&mut out, report.tool_version, report.schema_version);
    out
}

fn banner(out: &mut String, report: &Report) {
    let count = |level| report.findings.iter().filter(|f| f.level == level).count();
    let _ = write!(
        out,
        "<header id=\"verdict\" class=\"banner {cls}\" data-verdict=\"{v}\">\n\
         <h1>{word}</h1>\n<div>{deny} deny · {warn} warn · {allow} allowed finding(s) — ",
        cls = verdict_class(Some(report.verdict)),
        v = report.verdict.as_str(),
        word = summary::verdict_word(report.verdict),
        deny = count(Level::Deny),
        warn = count(Level::Warn),
        allow = count(Level::Allow),
    );
    let checked = match (report.inputs.tokens, &report.logits_skipped) {
        (Some(tokens), _) => format!("weights and logits over {tokens} tokens"),
        (None, Some(why)) => format!("weights only (logits not run: {})", escape(why)),
        (None, None) if report.inputs.weights_only => "weights only".to_string(),
        (None, None) => "weights".to_string(),
    };
    let _ = writeln!(
        out,
        "{checked}; base <code>{}</code>, adapter{} {}</div>",
        escape(&report.inputs.base),
        if report.inputs.adapters.len() == 1 {
            ""
        } else {
            "s"
        },
        report
            .inputs
            .adapters
            .iter()
            .map(|a| format!("<code>{}</code>", escape(a)))
            .collect::<Vec<_>>()
            .join(" → ")
    );
    if let Some(precisions) = &report.precisions {
        out.push_str("<div class=\"chips\">");
        for p in precisions {
            let _ = write!(
                out,
                "<span class=\"chip {}\">{} {}</span>",
                verdict_class(Some(p.verdict)),
                escape(&p.name),
                p.verdict.as_str()
            );
        }
        out.push_str("</div>\n");
    }
    out.push_str("</header>\n");
}

fn not_run(out: &mut String, id: &str, why: &str) {
    let _ = writeln!(
        out,
        "<div id=\"{id}\" class=\"chart not-run\" data-state=\"not-run\">not run: {}</div>",
        escape(why)
    );
}

fn chart(out: &mut String, id: &str, drawn: Result<Option<String>, charts::ChartError>, why: &str) {
    match drawn {
        Ok(Some(svg)) => {
            let _ = writeln!(
                out,
                "<div id=\"{id}\" class=\"chart\" data-state=\"drawn\">\n{svg}</div>"
            );
        }
        Ok(None) => not_run(out, id, why),
        Err(e) => not_run(out, id, &e.to_string()),
    }
}

/// Why the weight stage has nothing to show.
fn weights_missing(report: &Report) -> String {
    report
        .merge
        .as_ref()
        .and_then(|m| m.skipped.clone())
        .unwrap_or_else(|| "no precision was evaluated".to_string())
}

/// Why the logit stage has nothing to show.
fn logits_missing(report: &Report) -> String {
    if report.precisions.is_none() {
        return weights_missing(report);
    }
    report
        .logits_skipped
        .clone()
        .unwrap_or_else(|| "the logit comparison did not run".to_string())
}

fn matrix_section(out: &mut String, report: &Report) {
    out.push_str("<h2>Precision matrix</h2>\n");
    let rows = summary::matrix(report, true);
    if rows.is_empty() {
        not_run(out, "chart-matrix", &weights_missing(report));
        return;
    }
    out.push_str(
        "<div id=\"chart-matrix\" class=\"chart\" data-state=\"drawn\">\n<table id=\"precision-matrix\">\n\
         <thead><tr><th>precision</th><th>verdict</th><th>worst layer error</th><th>retention</th>\
         <th>mean KL (nats)</th><th>p99 KL</th><th>same top-1</th><th>effect lost</th></tr></thead>\n<tbody>\n",
    );
    for r in &rows {
        matrix_row(out, r);
    }
    out.push_str("</tbody>\n</table>\n");
    out.push_str(
        "<p class=\"muted\">worst layer error = max over layers of ‖W<sub>p</sub> − W*‖ / ‖ΔW‖; \
         retention = ⟨W<sub>p</sub> − W<sub>p</sub><sup>0</sup>, ΔW⟩ / ‖ΔW‖², the lowest over layers \
         (for a merged checkpoint the fitted ŝ/s farthest from 1); KL(reference ‖ model) \
         with the unmerged adapter in f32 as reference; effect lost = mean KL(ref ‖ model) / mean \
         KL(ref ‖ base). <i>P</i>+lora rows: the base quantized in <i>P</i> with the adapter served \
         unmerged beside it (informational, never gating). — : section not run.</p>\n</div>\n",
    );
}

fn matrix_row(out: &mut String, r: &MatrixRow) {
    let title = r
        .worst_module
        .as_deref()
        .map(|m| format!(" title=\"worst layer: {}\"", escape(m)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "<tr class=\"{cls}\"><th>{label}</th><td>{verdict}</td><td class=\"n\"{title}>{err}</td>\
         <td class=\"n\">{ret}</td><td class=\"n\">{kl}</td><td class=\"n\">{p99}</td>\
         <td class=\"n\">{top1}</td><td class=\"n\">{lost}</td></tr>",
        cls = verdict_class(r.verdict),
        label = escape(&r.label),
        verdict = r.verdict.map_or("info", Verdict::as_str),
        err = sci(r.worst_rel_error, 3),
        ret = ratio(r.retention),
        kl = num_pm(r.mean_kl, r.mean_kl_stderr),
        p99 = sci(r.p99_kl, 3),
        top1 = percent(r.same_top1),
        lost = percent(r.effect_lost),
    );
}

fn heatmap_section(out: &mut String, report: &Report, options: &HtmlOptions) {
    let precision = options
        .heatmap_precision
        .clone()
        .or_else(|| charts::default_heatmap_precision(report));
    let what = match options.heatmap_metric {
        HeatmapMetric::RelError => "error ‖W<sub>p</sub> − W*‖ / ‖ΔW‖",
        HeatmapMetric::Retention => "retention of ΔW",
    };
    let _ = writeln!(
        out,
        "<h2>Per-layer {what}{}</h2>",
        precision
            .as_deref()
            .map(|p| format!(" — {}", escape(p)))
            .unwrap_or_default()
    );
    let Some(precision) = precision else {
        not_run(out, "chart-heatmap", &weights_missing(report));
        return;
    };
    chart(
        out,
        "chart-heatmap",
        charts::heatmap(report, &precision, options.heatmap_metric),
        &format!("no layer statistics for `{precision}`"),
    );
    let data = HeatmapData::collect(report, &precision, options.heatmap_metric);
    if let Some(d) = data.filter(|d| !d.outside.is_empty()) {
        let list: Vec<String> = d
            .outside
            .iter()
            .map(|(m, v)| format!("<code>{}</code> {}", escape(m), num(*v)))
            .collect();
        let _ = writeln!(
            out,
            "<p class=\"muted\">Outside the numbered blocks: {}</p>",
            list.join(", ")
        );
    }
    out.push_str(
        "<p class=\"muted\">One cell per (layer, module kind); darker is worse, and the colour \
         scale is anchored on the gate's thresholds (pale: a thousandth of the threshold or less; \
         darkest: at the threshold), so a clean report stays pale. The default is the merged \
         checkpoint under <code>--merged</code>, else the worst precision other than f32.</p>\n",
    );
}

fn kl_section(out: &mut String, report: &Report) {
    out.push_str("<h2>KL distribution per precision</h2>\n");
    chart(
        out,
        "chart-kl",
        charts::kl_distribution(report),
        &logits_missing(report),
    );
    if let Some(effect) = &report.adapter_effect {
        let _ = writeln!(
            out,
            "<p class=\"muted\">Share of scored tokens whose KL(reference ‖ model) is at most x. \
             The adapter's own effect (grey, KL(reference ‖ base)): mean {} nats, same top-1 {} \
             over {} tokens — a merge is faithful when its curve sits far to the left of it.</p>",
            num(Some(effect.mean_kl)),
            percent(Some(effect.same_top1)),
            effect.tokens
        );
        if let Some(shift) = effect.quantization_shift_kl {
            let format = report.trained_on_label();
            let _ = writeln!(
                out,
                "<p class=\"muted\">The adapter was trained on a quantized base, so its effect is \
                 measured against dequant({}(W)). Against the 16-bit base the reference is {} nats \
                 away: the adapter's effect plus the quantization shift.</p>",
                escape(format),
                num(Some(shift))
            );
        }
    }
    logit_table(out, report);
}

/// Every number of `precisions[].logits` (and the `P+lora` runs).
fn logit_table(out: &mut String, report: &Report) {
    let mut rows: Vec<(String, Value)> = Vec::new();
    for p in report.precisions.iter().flatten() {
        for (label, stats) in [
            (p.name.clone(), p.logits.as_ref()),
            (format!("{}+lora", p.name), p.unmerged_logits.as_ref()),
        ] {
            if let Some(value) = stats.and_then(|s| serde_json::to_value(s).ok()) {
                rows.push((label, value));
            }
        }
    }
    stats_table(out, "every logit statistic", &rows, false);
}

/// A table of statistics objects (one row per model), read from their serialized form so new
/// fields show up without touching this page; arrays and nested objects are left out.
fn stats_table(out: &mut String, summary: &str, rows: &[(String, Value)], open: bool) {
    let Some((_, first)) = rows.first() else {
        return;
    };
    let columns: Vec<String> = first
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| !v.is_array() && !v.is_object())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let _ = write!(
        out,
        "<details{}><summary>{}</summary>\n<table>\n<thead><tr><th>model</th>",
        if open { " open" } else { "" },
        escape(summary)
    );
    for c in &columns {
        let _ = write!(out, "<th>{}</th>", escape(&c.replace('_', " ")));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for (label, value) in rows {
        let _ = write!(out, "<tr><th>{}</th>", escape(label));
        for c in &columns {
            let _ = write!(out, "<td class=\"n\">{}</td>", scalar(value.get(c)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n</details>\n");
}

fn generation_section(out: &mut String, report: &Report) {
    out.push_str("<h2>Greedy generation</h2>\n<div id=\"generation\">\n");
    let rows: Vec<(String, Value)> = report
        .precisions
        .iter()
        .flatten()
        .filter_map(|p| {
            let g = p.generation.as_ref()?;
            Some((p.name.clone(), serde_json::to_value(g).ok()?))
        })
        .collect();
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<p class=\"not-run\">not run: {}</p>",
            escape(&logits_missing(report))
        );
    } else {
        out.push_str(
            "<p class=\"muted\">Reference and merged model continue the same prompts greedily; \
             nll ratio = NLL of the merged model's text under the reference / NLL of the \
             reference's own text (gibberish shows as a large jump); repetition = share of \
             generated tokens closing an earlier trigram.</p>\n",
        );
        stats_table(out, "generation statistics", &rows, true);
    }
    out.push_str("</div>\n");
}

/// A JSON scalar for a table cell (numbers with 4 significant digits), escaped.
fn scalar(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "—".to_string(),
        Some(Value::Number(n)) if n.is_f64() => num(n.as_f64()),
        Some(Value::String(s)) => escape(s),
        Some(other) => escape(&other.to_string()),
    }
}

fn drift_section(out: &mut String, report: &Report) {
    out.push_str("<h2>Hidden-state drift per layer</h2>\n");
    chart(
        out,
        "chart-drift",
        charts::drift(report),
        &logits_missing(report),
    );
    out.push_str(
        "<p class=\"muted\">Relative distance of each model's residual stream to the reference's \
         after every block: the layer where a curve jumps is where the merge goes wrong.</p>\n",
    );
    routing_table(out, report);
}

/// Mixture-of-experts models: per candidate and sparse block, the share of tokens routed to other
/// experts than the reference (`routing_by_layer`); absent for dense models.
fn routing_table(out: &mut String, report: &Report) {
    let rows: Vec<(String, &[RoutingLayer])> = report
        .precisions
        .iter()
        .flatten()
        .flat_map(|p| {
            [
                (p.name.clone(), p.logits.as_ref()),
                (format!("{}+lora", p.name), p.unmerged_logits.as_ref()),
            ]
        })
        .filter_map(|(name, l)| {
            l.filter(|l| !l.routing_by_layer.is_empty())
                .map(|l| (name, l.routing_by_layer.as_slice()))
        })
        .collect();
    let Some((_, first)) = rows.first() else {
        return;
    };
    out.push_str(
        "<h3>Expert routing per sparse block</h3>\n<table id=\"routing\">\n<thead><tr><th>model</th>",
    );
    for layer in *first {
        out.push_str(&format!("<th>block {}</th>", layer.layer));
    }
    out.push_str("</tr></thead>\n<tbody>\n<tr><td>reference min margin</td>");
    for layer in *first {
        out.push_str(&format!(
            "<td class=\"n\">{}</td>",
            num(Some(layer.min_margin))
        ));
    }
    out.push_str("</tr>\n");
    for (name, layers) in &rows {
        out.push_str(&format!("<tr><td>{}</td>", escape(name)));
        for layer in *layers {
            out.push_str(&format!(
                "<td class=\"n\">{:.1}%</td>",
                layer.flip_rate * 100.0
            ));
        }
        out.push_str("</tr>\n");
    }
    out.push_str(
        "</tbody></table>\n<p class=\"muted\">Share of tokens whose top-k experts differ from the \
         reference's (routing-flips), and the reference's smallest gap between the k-th and \
         (k+1)-th router probability: flips at tiny margins are rounding at near-ties.</p>\n",
    );
}

/// Rows of the table of modules with a cause; the rest are counted.
const MAX_CAUSE_ROWS: usize = 25;
/// Names listed per inventory line; the rest are counted.
const MAX_LISTED: usize = 20;
/// Rows of the config-drift table; the rest are counted.
const MAX_DRIFT_ROWS: usize = 50;
/// Characters of a config value shown in a cell (the whole value, up to `MAX_TITLE_CHARS`, is
/// in the cell's tooltip).
const MAX_VALUE_CHARS: usize = 160;
const MAX_TITLE_CHARS: usize = 4000;

/// `text` cut to `max` characters, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let head: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{head}…")
    }
}

/// "… and N more" after a capped list or table.
fn and_more(out: &mut String, shown: usize, total: usize, what: &str) {
    if total > shown {
        let _ = writeln!(
            out,
            "<p class=\"muted\">… and {} more {what}</p>",
            total - shown
        );
    }
}

/// The merged checkpoint (`check --merged`): the per-module fit chart, the modules with a cause,
/// the untouched tensors, the tensor inventory and the config drift. Absent without forensics.
fn forensics_section(out: &mut String, report: &Report) {
    let Some(f) = &report.forensics else {
        return;
    };
    out.push_str("<h2>Merged checkpoint</h2>\n<div id=\"forensics\">\n");
    let n = f.modules.len();
    let faithful = f
        .modules
        .iter()
        .filter(|m| m.residual_to_floor.is_some_and(|r| r <= f.tolerance))
        .count();
    let mut causes: Vec<&ModuleFit> = f.modules.iter().filter(|m| m.cause.is_some()).collect();
    let stored = match report.inputs.merged.as_deref() {
        Some(m) => format!("<code>{}</code>, stored as", escape(m)),
        None => "Stored as".to_string(),
    };
    let _ = writeln!(
        out,
        "<p>{stored} {}: {n} adapter-changed tensor(s), {faithful} within {} × the rounding \
         floor of the exact merge, {} with a named cause.</p>",
        escape(&f.dtype),
        charts::tick_label(f.tolerance),
        causes.len(),
    );
    chart(
        out,
        "chart-forensics",
        charts::module_fit(f),
        "the merged checkpoint has no adapter-changed tensors to fit",
    );
    if n > 0 {
        out.push_str(
            "<p class=\"muted\">One position per adapter-changed tensor, in model order. Top: \
             ŝ/s = ⟨M − W, ΔW⟩ / ‖ΔW‖², the scale the checkpoint applied relative to the \
             adapter's (1: as configured; 0: the update is missing; √r or r: the scaling rule \
             misread). Bottom: ‖M − W*‖ in units of ‖round(W*) − W*‖, what rounding the exact \
             merge must cost; a faithful merge stays at or below the dashed tolerance. Red: \
             tensors with a named cause, labelled on the x axis.</p>\n",
        );
    }
    cause_table(out, f, &mut causes);
    untouched_line(out, f);
    inventory_list(out, f);
    config_drift_table(out, f);
    out.push_str("</div>\n");
}

/// The modules with a cause, worst residual first (non-finite ones first of all).
fn cause_table(out: &mut String, f: &Forensics, causes: &mut [&ModuleFit]) {
    if causes.is_empty() {
        out.push_str("<p>No adapter-changed tensor has a named cause.</p>\n");
        return;
    }
    let severity = |m: &ModuleFit| {
        m.residual_to_floor
            .filter(|r| !r.is_nan())
            .unwrap_or(f64::INFINITY)
    };
    causes.sort_by(|a, b| severity(b).total_cmp(&severity(a)));
    out.push_str(
        "<h3>Tensors with a cause (worst first)</h3>\n<table id=\"forensics-causes\">\n\
         <thead><tr><th>module</th><th>cause</th><th>ŝ/s</th><th>residual / floor</th>\
         <th>explanation</th></tr></thead>\n<tbody>\n",
    );
    for m in causes.iter().take(MAX_CAUSE_ROWS) {
        let residual = match m.residual_to_floor {
            None => "non-finite".to_string(),
            r => num(r),
        };
        let _ = writeln!(
            out,
            "<tr><td><code title=\"{tensor}\">{module}</code></td><td><code>{cause}</code></td>\
             <td class=\"n\">{scale}</td><td class=\"n\">{residual}</td><td>{why}</td></tr>",
            tensor = escape(&m.tensor),
            module = breakable_path(&m.module),
            cause = escape(m.cause.unwrap_or("")),
            scale = num(m.scale_ratio),
            why = m.explanation.as_deref().map_or("—".to_string(), escape),
        );
    }
    out.push_str("</tbody>\n</table>\n");
    and_more(
        out,
        MAX_CAUSE_ROWS,
        causes.len(),
        &format!(
            "(all {} tensors are in the JSON report's <code>forensics.modules</code>)",
            f.modules.len()
        ),
    );
}

fn untouched_line(out: &mut String, f: &Forensics) {
    let u = &f.untouched;
    let text = if u.compared == 0 {
        "none compared".to_string()
    } else if u.differing == 0 {
        format!(
            "{} compared, all equal to the base within {} × their rounding floor",
            u.compared,
            charts::tick_label(f.tolerance)
        )
    } else {
        let mut t = format!(
            "{} compared, <b>{} differ</b> from the base by more than {} × their rounding floor",
            u.compared,
            u.differing,
            charts::tick_label(f.tolerance)
        );
        if u.explained_by_quantization > 0 {
            let _ = write!(
                t,
                " ({} explained by a quantized copy of the base)",
                u.explained_by_quantization
            );
        }
        if let Some(worst) = &u.worst_tensor {
            let _ = write!(
                t,
                "; worst <code>{}</code> at {} × its floor",
                escape(worst),
                num(u.worst_ratio)
            );
        }
        t
    };
    let _ = writeln!(
        out,
        "<p id=\"forensics-untouched\">Tensors the adapters do not change: {text}.</p>"
    );
}

/// A capped list of tensor names for one inventory line.
fn name_list(names: &[String]) -> String {
    let mut list: Vec<String> = names
        .iter()
        .take(MAX_LISTED)
        .map(|n| format!("<code>{}</code>", escape(n)))
        .collect();
    if names.len() > MAX_LISTED {
        list.push(format!("… and {} more", names.len() - MAX_LISTED));
    }
    list.join(", ")
}

fn shape(dims: &[usize]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Missing, extra, empty, reshaped and non-float tensors and non-finite values; nothing when
/// the inventory is clean.
fn inventory_list(out: &mut String, f: &Forensics) {
    let inv = &f.inventory;
    let mut rows: Vec<(&str, String)> = Vec::new();
    for (label, names) in [
        ("missing", &inv.missing),
        ("extra", &inv.extra),
        ("empty", &inv.empty),
        ("not float (not compared)", &inv.not_float),
    ] {
        if !names.is_empty() {
            rows.push((label, format!("{} · {}", names.len(), name_list(names))));
        }
    }
    if !inv.reshaped.is_empty() {
        let mut list: Vec<String> = inv
            .reshaped
            .iter()
            .take(MAX_LISTED)
            .map(|r| {
                format!(
                    "<code>{}</code> expected {}, found {}",
                    escape(&r.tensor),
                    shape(&r.expected),
                    shape(&r.found)
                )
            })
            .collect();
        if inv.reshaped.len() > MAX_LISTED {
            list.push(format!("… and {} more", inv.reshaped.len() - MAX_LISTED));
        }
        rows.push(("reshaped", list.join("<br>")));
    }
    if inv.nan > 0 || inv.inf > 0 {
        rows.push((
            "non-finite values",
            format!("{} NaN, {} ±Inf", inv.nan, inv.inf),
        ));
    }
    if rows.is_empty() {
        return;
    }
    out.push_str("<h3>Tensor inventory</h3>\n<dl class=\"kv\" id=\"forensics-inventory\">\n");
    for (label, value) in rows {
        let _ = writeln!(out, "<dt>{}</dt><dd>{value}</dd>", escape(label));
    }
    out.push_str("</dl>\n");
}

/// A config value for a table cell: clipped, with the whole value (within reason) as tooltip.
fn config_value(value: &str) -> String {
    let shown = clip(value, MAX_VALUE_CHARS);
    if shown.len() == value.len() {
        format!("<code>{}</code>", escape(value))
    } else {
        format!(
            "<code title=\"{}\">{}</code>",
            escape(&clip(value, MAX_TITLE_CHARS)),
            escape(&shown)
        )
    }
}

fn config_drift_table(out: &mut String, f: &Forensics) {
    if f.config_drift.is_empty() {
        out.push_str(
            "<p class=\"muted\">Config files: no generation-relevant difference from the \
             adapter's and the base's.</p>\n",
        );
        return;
    }
    out.push_str(
        "<h3>Config drift</h3>\n<table id=\"config-drift\">\n<thead><tr><th>file</th><th>key</th>\
         <th>reference</th><th>expected</th><th>found</th></tr></thead>\n<tbody>\n",
    );
    for d in f.config_drift.iter().take(MAX_DRIFT_ROWS) {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&d.file),
            escape(&d.key),
            escape(d.reference),
            config_value(&d.expected),
            config_value(&d.found),
        );
    }
    out.push_str("</tbody>\n</table>\n");
    and_more(out, MAX_DRIFT_ROWS, f.config_drift.len(), "differences");
}

fn findings_section(out: &mut String, report: &Report) {
    out.push_str("<h2>Findings</h2>\n<div id=\"findings\">\n");
    if report.findings.is_empty() {
        out.push_str("<p>No findings.</p>\n");
    }
    for f in &report.findings {
        let level = f.level.as_str();
        let _ = write!(
            out,
            "<div class=\"finding {level}\" data-code=\"{code}\"><span class=\"lvl {level}\">{level}</span>\
             <code>{code}</code>",
            code = f.code.as_str()
        );
        for scope in [&f.adapter, &f.precision, &f.module].into_iter().flatten() {
            let _ = write!(out, " · <code>{}</code>", escape(scope));
        }
        let _ = write!(out, "<div>{}</div>", escape(&f.message));
        if f.observed.is_some() || f.threshold.is_some() {
            let _ = write!(
                out,
                "<div class=\"muted\">observed {} · threshold {}</div>",
                num(f.observed),
                num(f.threshold)
            );
        }
        let _ = writeln!(
            out,
            "<div class=\"advice\"><b>Advice:</b> {}</div><div class=\"muted\">{}</div></div>",
            escape(&f.advice),
            escape(f.code.doc().summary)
        );
    }
    out.push_str("</div>\n");
}

fn provenance_section(out: &mut String, report: &Report) {
    out.push_str("<h2>Inputs and provenance</h2>\n<div id=\"provenance\">\n");
    let i = &report.inputs;
    out.push_str("<dl class=\"kv\">\n");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "<dt>{}</dt><dd>{v}</dd>", escape(k));
    };
    kv(
        "tool",
        format!("lora-doctor {}", escape(report.tool_version)),
    );
    kv("report schema", report.schema_version.to_string());
    kv("base", format!("<code>{}</code>", escape(&i.base)));
    kv(
        "base files",
        i.base_files
            .iter()
            .map(|f| format!("<code>{}</code>", escape(f)))
            .collect::<Vec<_>>()
            .join("<br>"),
    );
    kv(
        "adapters (in order)",
        i.adapters
            .iter()
            .map(|a| format!("<code>{}</code>", escape(a)))
            .collect::<Vec<_>>()
            .join("<br>"),
    );
    kv(
        "merged checkpoint",
        i.merged
            .as_deref()
            .map_or("—".to_string(), |m| format!("<code>{}</code>", escape(m))),
    );
    if !i.hub.is_empty() {
        kv(
            "hub snapshots",
            i.hub
                .iter()
                .map(|h| {
                    format!(
                        "{} <code>{}</code> @ {} = <code>{}</code>",
                        escape(&h.flag),
                        escape(&h.repo_id),
                        escape(&h.revision),
                        escape(&h.sha)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    kv(
        "tokens scored",
        i.tokens.map_or("—".to_string(), |t| t.to_string()),
    );
    kv("weights only", i.weights_only.to_string());
    if let Some(why) = &report.logits_skipped {
        kv("logits not run", escape(why));
    }
    if let Some(m) = &report.merge {
        kv("recipe", escape(m.recipe.name()));
        kv(
            "trained on",
            m.trained_on.as_deref().map_or("—".to_string(), escape),
        );
        if let Some(why) = &m.skipped {
            kv("merge not evaluated", escape(why));
        }
    }
    out.push_str("</dl>\n");
    if let Some(m) = &report.merge {
        thresholds_table(out, &m.thresholds);
    }
    for s in &report.structure {
        let _ = writeln!(
            out,
            "<h3>Adapter <code>{}</code></h3>\n<dl class=\"kv\"><dt>trained on</dt><dd>{}</dd>\
             <dt>rank</dt><dd>r = {}, alpha = {}{}{}</dd><dt>tensors</dt><dd>{} ({})</dd>\
             <dt>modules</dt><dd>{} of {} matched a base tensor</dd></dl>",
            escape(&s.adapter),
            s.base_model_name_or_path
                .as_deref()
                .map_or("—".to_string(), escape),
            s.r,
            s.lora_alpha,
            if s.use_rslora { ", rsLoRA" } else { "" },
            if s.use_dora { ", DoRA" } else { "" },
            s.tensors,
            super::format::human_bytes(s.bytes),
            s.matched,
            s.modules.len(),
        );
        out.push_str(
            "<details><summary>module mapping</summary>\n<table><thead><tr><th>module</th>\
             <th>base tensor</th><th>resolution</th><th>kind</th><th>r</th><th>alpha</th>\
             <th>scale</th></tr></thead><tbody>\n",
        );
        for m in &s.modules {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&m.module),
                m.base_tensor.as_deref().map_or("—".to_string(), escape),
                m.resolution.map_or("—".to_string(), escape),
                escape(m.kind),
                m.r.map_or("—".to_string(), |r| r.to_string()),
                num(m.alpha),
                num(m.scale),
            );
        }
        out.push_str("</tbody></table></details>\n");
    }
    out.push_str("</div>\n");
}

/// The thresholds the gate used: one row per name (the `--threshold` names, from the one
/// registry), one column per precision class; a global threshold spans the columns.
fn thresholds_table(out: &mut String, thresholds: &crate::findings::thresholds::Thresholds) {
    use crate::findings::thresholds::{CLASSES, Scope, THRESHOLDS};
    let show = |v: Option<f64>| v.map_or_else(|| "off".to_string(), |v| num(Some(v)));
    out.push_str("<h3>Thresholds</h3>\n<table><thead><tr><th>threshold</th>");
    for class in CLASSES {
        let _ = write!(out, "<th>{}</th>", escape(class.name()));
    }
    out.push_str("</tr></thead><tbody>\n");
    for def in THRESHOLDS {
        let _ = write!(
            out,
            "<tr><th title=\"{}\">{}</th>",
            escape(def.meaning),
            escape(def.name)
        );
        match def.scope {
            Scope::PerClass => {
                for class in CLASSES {
                    let _ = write!(
                        out,
                        "<td class=\"n\">{}</td>",
                        show(def.get(thresholds, class))
                    );
                }
            }
            Scope::Global => {
                let _ = write!(
                    out,
                    "<td class=\"n\" colspan=\"{}\">{}</td>",
                    CLASSES.len(),
                    show(def.get(thresholds, CLASSES[0]))
                );
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_quotes_and_controls() {
        assert_eq!(
            escape("<a href='x'>\"&\"</a>\u{0}"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;\u{fffd}"
        );
    }

    use crate::forensics::{ConfigDifference, Inventory, Reshaped, UntouchedSummary};
    use crate::report::{Inputs, SCHEMA_VERSION};

    const HOSTILE: &str = "<script>alert(1)</script>";
    const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";

    fn report(forensics: Option<Forensics>) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            tool_version: "test",
            verdict: Verdict::Fail,
            inputs: Inputs {
                base: "/models/base".to_string(),
                base_files: vec!["model.safetensors".to_string()],
                adapters: vec!["/adapters/a".to_string()],
                merged: Some("/models/merged".to_string()),
                tokens: None,
                weights_only: true,
                config: None,
                hub: Vec::new(),
            },
            adapter_effect: None,
            logits_skipped: None,
            findings: Vec::new(),
            structure: Vec::new(),
            merge: None,
            precisions: None,
            layers: None,
            forensics,
            token_kl: Default::default(),
            repair: None,
        }
    }

    fn fit(
        module: &str,
        scale: Option<f64>,
        residual: Option<f64>,
        cause: Option<&'static str>,
        explanation: Option<&str>,
    ) -> ModuleFit {
        ModuleFit {
            module: module.to_string(),
            tensor: format!("{module}.weight"),
            kind: "lora",
            expected_scale: Some(2.0),
            scale_ratio: scale,
            transposed_ratio: None,
            delta_norm: 1.0,
            floor: 1e-3,
            residual_to_floor: residual,
            fit_residual_to_floor: residual,
            cause,
            explanation: explanation.map(str::to_string),
        }
    }

    fn forensics(modules: Vec<ModuleFit>) -> Forensics {
        Forensics {
            dtype: "bf16".to_string(),
            tolerance: 4.0,
            modules,
            untouched: UntouchedSummary::default(),
            inventory: Inventory::default(),
            config_drift: Vec::new(),
        }
    }

    fn page(f: Forensics) -> String {
        render(&report(Some(f)), &HtmlOptions::default())
    }

    /// The `<div id="forensics">` block.
    fn forensics_block(page: &str) -> &str {
        let start = page
            .find("<div id=\"forensics\">")
            .expect("the section is there");
        let end = page[start..]
            .find("<h2>Findings</h2>")
            .expect("findings follow");
        &page[start..start + end]
    }

    #[test]
    fn no_forensics_no_section() {
        let page = render(&report(None), &HtmlOptions::default());
        for absent in [
            "Merged checkpoint",
            "id=\"forensics\"",
            "chart-forensics",
            "config-drift",
        ] {
            assert!(!page.contains(absent), "`{absent}` without forensics");
        }
    }

    #[test]
    fn forensics_section_sits_after_the_logit_sections() {
        let page = page(forensics(vec![
            fit(
                "model.layers.0.self_attn.q_proj",
                Some(1.0),
                Some(1.0),
                None,
                None,
            ),
            fit(
                "model.layers.3.self_attn.v_proj",
                Some(50.0),
                Some(2.4e4),
                Some("scale-mismatch"),
                Some("update scaled ×50"),
            ),
        ]));
        let at = |needle: &str| page.find(needle).unwrap_or_else(|| panic!("no `{needle}`"));
        assert!(at("<h2>Greedy generation</h2>") < at("<h2>Merged checkpoint</h2>"));
        assert!(at("<h2>Merged checkpoint</h2>") < at("<h2>Findings</h2>"));
        let block = forensics_block(&page);
        assert!(block.contains("id=\"chart-forensics\" class=\"chart\" data-state=\"drawn\""));
        assert!(block.contains("<svg"));
        assert!(
            block.contains("2 adapter-changed tensor(s), 1 within 4 ×"),
            "{block}"
        );
        // Only the module with a cause has a row.
        let table = &block[block.find("id=\"forensics-causes\"").expect("cause table")..];
        assert_eq!(table.matches("<tr><td>").count(), 1);
        assert!(table.contains("<code>scale-mismatch</code>"));
        assert!(table.contains("<td class=\"n\">50.00</td><td class=\"n\">2.40e4</td>"));
        assert!(table.contains("update scaled ×50"));
        // A clean inventory and no config drift: no inventory list, a one-line note.
        assert!(!block.contains("forensics-inventory"));
        assert!(!block.contains("id=\"config-drift\""));
        assert!(block.contains("Config files: no generation-relevant difference"));
        assert!(block.contains("Tensors the adapters do not change: none compared."));
    }

    #[test]
    fn no_modules_says_so_instead_of_a_chart() {
        let block_page = page(forensics(Vec::new()));
        let block = forensics_block(&block_page);
        assert!(block.contains("id=\"chart-forensics\" class=\"chart not-run\""));
        assert!(block.contains("no adapter-changed tensors"));
        assert!(block.contains("No adapter-changed tensor has a named cause."));
    }

    #[test]
    fn hostile_strings_in_forensics_are_escaped() {
        let mut f = forensics(vec![fit(
            &format!("model.layers.0.{HOSTILE}"),
            Some(0.0),
            None,
            Some("not-merged"),
            Some(&format!("explained by {HOSTILE}")),
        )]);
        f.dtype = HOSTILE.to_string();
        f.untouched = UntouchedSummary {
            compared: 3,
            differing: 1,
            explained_by_quantization: 0,
            worst_tensor: Some(HOSTILE.to_string()),
            worst_ratio: Some(12.0),
        };
        f.inventory = Inventory {
            missing: vec![HOSTILE.to_string()],
            extra: vec![],
            empty: vec![],
            reshaped: vec![Reshaped {
                tensor: HOSTILE.to_string(),
                expected: vec![4, 8],
                found: vec![8, 4],
            }],
            not_float: vec![],
            nan: 2,
            inf: 0,
        };
        f.config_drift = vec![ConfigDifference {
            file: format!("{HOSTILE}.json"),
            key: HOSTILE.to_string(),
            reference: "adapter",
            expected: HOSTILE.to_string(),
            found: format!("{}{HOSTILE}", "x".repeat(300)),
        }];
        let mut r = report(Some(f));
        r.inputs.merged = Some(format!("/m/{HOSTILE}"));
        let page = render(&r, &HtmlOptions::default());
        assert!(
            !page.to_ascii_lowercase().contains("<script"),
            "raw <script>"
        );
        assert!(!page.contains("&amp;lt;"), "double-escaped");
        let block = forensics_block(&page);
        // Table, explanation, untouched line, inventory (list and reshaped), config table (cell
        // and tooltip), dtype, path — and the chart's x label.
        assert!(block.matches(ESCAPED).count() >= 10, "{block}");
        assert!(block.contains(&format!("explained by {ESCAPED}")));
        assert!(block.contains(&format!("worst <code>{ESCAPED}</code> at 12.00")));
        assert!(block.contains("expected [4, 8], found [8, 4]"));
        assert!(block.contains("2 NaN, 0 ±Inf"));
        assert!(block.contains("<td class=\"n\">0</td><td class=\"n\">non-finite</td>"));
        // The long value is clipped in the cell, whole in the tooltip.
        assert!(block.contains(&format!("title=\"{}{ESCAPED}\"", "x".repeat(300))));
        assert!(block.contains(&format!(">{}…</code>", "x".repeat(159))));
    }

    #[test]
    fn long_lists_are_capped_and_nan_values_do_not_panic() {
        let modules: Vec<ModuleFit> = (0..60)
            .map(|i| {
                fit(
                    &format!("model.layers.{i}.mlp.up_proj"),
                    if i % 3 == 0 {
                        Some(f64::NAN)
                    } else {
                        Some(4.0)
                    },
                    match i % 4 {
                        0 => None,
                        1 => Some(f64::INFINITY),
                        2 => Some(f64::NAN),
                        _ => Some(i as f64 * 100.0),
                    },
                    Some("scale-mismatch"),
                    None,
                )
            })
            .collect();
        let mut f = forensics(modules);
        f.tolerance = f64::NAN;
        f.untouched = UntouchedSummary {
            compared: 10,
            differing: 2,
            explained_by_quantization: 2,
            worst_tensor: Some("model.norm.weight".to_string()),
            worst_ratio: Some(f64::NAN),
        };
        f.inventory.extra = (0..45).map(|i| format!("extra.{i}")).collect();
        f.config_drift = (0..70)
            .map(|i| ConfigDifference {
                file: "config.json".to_string(),
                key: format!("k{i}"),
                reference: "base",
                expected: "1".to_string(),
                found: "2".to_string(),
            })
            .collect();
        let page = page(f);
        let block = forensics_block(&page);
        let causes = &block[block.find("id=\"forensics-causes\"").expect("table")..];
        assert_eq!(
            causes[..causes.find("</table>").expect("closed")]
                .matches("<tr><td>")
                .count(),
            MAX_CAUSE_ROWS
        );
        assert!(block.contains("… and 35 more (all 60 tensors"));
        assert!(block.contains("45 · <code>extra.0</code>"));
        assert!(block.contains("… and 25 more</dd>"));
        assert!(block.contains("… and 20 more differences"));
        assert!(block.contains("(2 explained by a quantized copy of the base)"));
        // Non-finite residuals sort first.
        let first_row = &causes[causes.find("<tr><td>").expect("a row")..];
        assert!(first_row[..first_row.find("</tr>").expect("row end")].contains("non-finite"));
    }
}
