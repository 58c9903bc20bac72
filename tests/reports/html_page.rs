//! The HTML report: one self-contained page, its sections, hostile names escaped in every
//! format.

use super::*;
use crate::reports::junit_and_github::parse_junit;

/// The contents of the `<div>` with `id`, from its opening tag to its matching `</div>` (nested
/// divs included).
fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element with id `{id}`"));
    let start = html[..at].rfind('<').expect("inside a tag");
    let rest = &html[start..];
    let mut depth = 0usize;
    let mut i = 0;
    while i < rest.len() {
        if rest[i..].starts_with("<div") {
            depth += 1;
        } else if rest[i..].starts_with("</div>") {
            if depth <= 1 {
                return &rest[..i];
            }
            depth -= 1;
        }
        i += rest[i..].chars().next().map_or(1, char::len_utf8);
    }
    rest
}

#[test]
fn html_is_one_self_contained_page_with_every_section() {
    let page = html::render(clean_report(), &HtmlOptions::default());
    assert!(page.starts_with("<!DOCTYPE html>"));
    for id in [
        "id=\"verdict\"",
        "<table id=\"precision-matrix\">",
        "id=\"findings\"",
        "id=\"provenance\"",
    ] {
        assert!(page.contains(id), "missing {id}");
    }
    for id in CHARTS {
        let s = section(&page, id);
        assert!(
            s.contains("data-state=\"drawn\""),
            "{id} not drawn: {s:.300}"
        );
    }
    for id in ["chart-heatmap", "chart-kl", "chart-drift"] {
        assert!(
            section(&page, id).contains("<svg"),
            "{id} has no inline SVG"
        );
    }
    assert_self_contained(&page);
    // Without --merged there are no forensics and no section for them.
    assert!(!page.contains("id=\"forensics\""));
    // Every precision has a matrix row, and every P+lora run its own.
    let precisions = clean_report().precisions.as_ref().expect("merged");
    let rows = section(&page, "chart-matrix").matches("<tr class=").count();
    let unmerged = precisions
        .iter()
        .filter(|p| p.unmerged_logits.is_some())
        .count();
    assert_eq!(rows, precisions.len() + unmerged);
}

/// Self-contained: no scripts, no external resources of any kind.
fn assert_self_contained(page: &str) {
    let lower = page.to_ascii_lowercase();
    for forbidden in [
        "<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import",
    ] {
        assert!(
            !lower.contains(forbidden),
            "the page contains `{forbidden}`"
        );
    }
    let urls = lower.matches("http").count();
    let namespaces = lower
        .matches("xmlns=\"http://www.w3.org/2000/svg\"")
        .count();
    assert_eq!(
        urls, namespaces,
        "only SVG namespace declarations may name a URL"
    );
}

#[test]
fn merged_checkpoint_section_shows_the_forensics() {
    let report = merged_with_forensics();
    let forensics = report.forensics.as_ref().expect("checked");
    let page = html::render(report, &HtmlOptions::default());
    assert_self_contained(&page);
    let at = |needle: &str| page.find(needle).unwrap_or_else(|| panic!("no `{needle}`"));
    assert!(at("<h2>Greedy generation</h2>") < at("<h2>Merged checkpoint</h2>"));
    assert!(at("<h2>Merged checkpoint</h2>") < at("<h2>Findings</h2>"));
    let block = section(&page, "forensics");
    let chart = section(&page, "chart-forensics");
    assert!(
        chart.contains("data-state=\"drawn\"") && chart.contains("<svg"),
        "{chart:.300}"
    );
    // One mark per finite ŝ/s and per positive residual, plus the legend's two.
    let finite = forensics
        .modules
        .iter()
        .map(|m| {
            usize::from(m.scale_ratio.is_some_and(f64::is_finite))
                + usize::from(
                    m.residual_to_floor
                        .is_some_and(|r| r.is_finite() && r > 0.0),
                )
        })
        .sum::<usize>();
    assert_eq!(
        chart.matches("<circle").count() + chart.matches("<polygon").count(),
        finite + 2
    );
    // The hand-broken module is named: on the chart's x axis and in the table of causes.
    let broken = "model.layers.3.self_attn.v_proj";
    let fit = forensics
        .modules
        .iter()
        .find(|m| m.module == broken)
        .expect("the broken module was fitted");
    let cause = fit.cause.expect("the ×50 update has a cause");
    assert!(chart.contains("L3 v_proj"));
    let table = &block[block
        .find("id=\"forensics-causes\"")
        .expect("a table of causes")..];
    let row = &table[table
        .find(&format!(">{}</code>", html::breakable_path(broken)))
        .expect("a row for it")..];
    assert!(row[..row.find("</tr>").expect("row end")].contains(&format!("<code>{cause}</code>")));
    assert!(block.contains("id=\"forensics-untouched\""));

    // Hostile strings in the forensics are escaped.
    let mut hostile = report.clone();
    let f = hostile.forensics.as_mut().expect("checked");
    f.modules[0].module = HOSTILE_MODULE.to_string();
    f.modules[0].cause = Some("scale-mismatch");
    f.modules[0].explanation = Some(format!("because {HOSTILE}"));
    f.inventory.extra.push(HOSTILE.to_string());
    f.untouched.worst_tensor = Some(HOSTILE.to_string());
    f.untouched.differing = 1;
    f.config_drift.push(ConfigDifference {
        file: "tokenizer_config.json".to_string(),
        key: "chat_template".to_string(),
        reference: "adapter",
        expected: HOSTILE.to_string(),
        found: format!("{HOSTILE} & more"),
    });
    let page = html::render(&hostile, &HtmlOptions::default());
    assert!(
        !page.to_ascii_lowercase().contains("<script"),
        "raw <script> in HTML"
    );
    assert!(!page.contains("&amp;lt;"), "double-escaped text in HTML");
    let block = section(&page, "forensics");
    assert!(block.matches(ESCAPED).count() >= 6, "{block}");
    assert!(block.contains(&format!("<code>{ESCAPED} &amp; more</code>")));
}

#[test]
fn sections_that_did_not_run_say_so() {
    let weights_only = build("adapters/llama-lora", &["--weights-only"]);
    let page = html::render(&weights_only, &HtmlOptions::default());
    assert!(section(&page, "chart-heatmap").contains("data-state=\"drawn\""));
    for id in ["chart-kl", "chart-drift"] {
        let s = section(&page, id);
        assert!(
            s.contains("data-state=\"not-run\"") && s.contains("not run: "),
            "{id}: {s}"
        );
    }
    // KL columns show "—" when logits did not run.
    assert!(section(&page, "chart-matrix").contains("<td class=\"n\">—</td>"));

    let failed = html::render(failing_report(), &HtmlOptions::default());
    assert!(failed.contains("data-verdict=\"fail\""));
    for id in CHARTS {
        assert!(
            section(&failed, id).contains("data-state=\"not-run\""),
            "{id} should not run after a structural failure"
        );
    }
    assert!(failed.contains("nonfinite-adapter"));
}

#[test]
fn hostile_names_are_escaped_in_every_format() {
    let report = hostile_report();

    let page = html::render(
        &report,
        &HtmlOptions {
            heatmap_precision: Some("bf16".to_string()),
            ..HtmlOptions::default()
        },
    );
    assert!(
        !page.to_ascii_lowercase().contains("<script"),
        "raw <script> in HTML"
    );
    assert!(page.contains(ESCAPED));
    assert!(!page.contains("&amp;lt;"), "double-escaped text in HTML");
    // Inside the SVG too: the heatmap's row label is the planted module kind.
    let heatmap = section(&page, "chart-heatmap");
    assert!(
        heatmap.contains(ESCAPED),
        "heatmap SVG lacks the escaped label"
    );
    assert!(!heatmap.contains("<script"));

    let xml = junit::render(&report);
    assert!(!xml.contains("<script"), "raw <script> in JUnit");
    assert!(xml.contains(ESCAPED));
    let doc = parse_junit(&xml);
    let failure = doc
        .cases
        .iter()
        .find(|c| c.suite == "lora-doctor.bf16" && c.name == "weights")
        .and_then(|c| c.failure.as_ref())
        .expect("the planted deny finding fails bf16/weights");
    assert!(failure.1.contains(HOSTILE), "the decoded text round-trips");

    let md = summary::render(&report);
    assert!(!md.contains("<script"), "raw <script> in Markdown");
    assert!(md.contains("&lt;script&gt;"));

    let annotations = github::render(&report);
    for line in annotations.lines() {
        assert!(
            line.starts_with("::"),
            "a message broke out of its annotation: {line}"
        );
    }
    assert!(!annotations.contains("\n::error::injected"));
    assert!(annotations.contains("%0A::error::injected"));
}
