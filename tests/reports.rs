//! Report renderers (HTML + charts, JUnit, GitHub annotations, Markdown summary), the JSON
//! schema, and the gate configuration, on reports built from the committed fixtures.
//!
//! A module of the one integration test binary (`tests/cli.rs`). Reports come from the library's
//! own check path (`commands::check::build_report`), so they carry every section a real run has;
//! the JSON schema test drives the real binary, since the JSON on stdout is the contract.
//!
//! The browser tests need Debian's `chromium` (`apt-get install -y chromium`); they fail, with
//! that hint, when no Chromium is found. They leave their screenshots in `target/tmp/reports/`
//! (`report.png`, `report-merged.png`, `report-forensics-210.png`) for a person to look at.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use lora_doctor::cli::{Cli, Command as CliCommand};
use lora_doctor::commands::check::build_report;
use lora_doctor::findings::{Code, Finding, Level, Verdict};
use lora_doctor::forensics::{ConfigDifference, Forensics, ModuleFit};
use lora_doctor::gate::{self, GateConfig, LevelOverrides};
use lora_doctor::report::html::HtmlOptions;
use lora_doctor::report::{Report, github, html, junit, summary};
use serde_json::Value;

const HOSTILE: &str = "<script>alert(1)</script>";
const HOSTILE_MODULE: &str = "model.layers.0.<script>alert(1)</script>";
const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";
const CHARTS: [&str; 4] = ["chart-matrix", "chart-heatmap", "chart-kl", "chart-drift"];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_path(rel: &str) -> String {
    manifest_dir()
        .join("fixtures")
        .join(rel)
        .display()
        .to_string()
}

/// Runs the library's `check` on tiny-llama with extra flags and returns the finished report.
fn build(adapter: &str, extra: &[&str]) -> Report {
    build_on("models/tiny-llama", adapter, extra)
}

/// Runs the library's `check` on a fixture base and adapter with extra flags.
fn build_on(base: &str, adapter: &str, extra: &[&str]) -> Report {
    let base = fixture_path(base);
    let adapter = fixture_path(adapter);
    let mut argv = vec![
        "lora-doctor",
        "check",
        "--quiet",
        "--base",
        &base,
        "--adapter",
        &adapter,
    ];
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(&argv).expect("the test's flags parse");
    let CliCommand::Check(args) = cli.command else {
        unreachable!("built a check command line")
    };
    build_report(&args).expect("the fixture check runs")
}

/// tiny-llama + llama-lora in every precision, with the logit comparison (64 tokens keep it fast).
fn clean_report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        build(
            "adapters/llama-lora",
            &["--precision", "all", "--max-tokens", "64"],
        )
    })
}

/// An adapter holding NaN/Inf: structural deny, no merge evaluated.
fn failing_report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| build("adapters/nonfinite", &[]))
}

/// tiny-llama-deep + deep-lora with `--merged merged/deep-broken-bf16` (layer 3 v_proj's update
/// scaled ×50 by hand): a report with a `forensics` section.
fn merged_report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        let merged = fixture_path("merged/deep-broken-bf16");
        build_on(
            "models/tiny-llama-deep",
            "adapters/deep-lora",
            &["--merged", &merged, "--max-tokens", "64"],
        )
    })
}

/// The merged report when `check --merged` filled in its forensics; `None`, with a note, while
/// it does not (the merged-checkpoint assertions are then skipped).
fn merged_with_forensics() -> &'static Report {
    let report = merged_report();
    assert!(
        report.forensics.is_some(),
        "check --merged must fill the forensics section"
    );
    report
}

/// One hand-built module fit.
fn module_fit(
    module: &str,
    scale: f64,
    residual: Option<f64>,
    cause: Option<&'static str>,
) -> ModuleFit {
    ModuleFit {
        module: module.to_string(),
        tensor: format!("{module}.weight"),
        kind: "lora",
        expected_scale: Some(2.0),
        scale_ratio: Some(scale),
        transposed_ratio: None,
        delta_norm: 1.0,
        floor: 1e-3,
        residual_to_floor: residual,
        fit_residual_to_floor: residual,
        cause,
        explanation: cause.map(|c| format!("{c} (planted)")),
    }
}

/// SmolLM2-sized forensics by hand: 30 blocks × 7 modules in safetensors (alphabetical) order,
/// four of them broken (×50, never merged, NaN, rsLoRA read as plain).
fn forensics_210() -> Forensics {
    const KINDS: [&str; 7] = [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ];
    let mut names: Vec<String> = (0..30)
        .flat_map(|l| KINDS.iter().map(move |k| format!("model.layers.{l}.{k}")))
        .collect();
    names.sort();
    let modules = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let wobble = ((i * 37) % 17) as f64 / 17.0;
            match name.as_str() {
                "model.layers.3.self_attn.v_proj" => {
                    module_fit(name, 50.0, Some(2.4e4), Some("scale-mismatch"))
                }
                "model.layers.12.self_attn.o_proj" => {
                    module_fit(name, 0.0, Some(3.1e3), Some("not-merged"))
                }
                "model.layers.20.mlp.down_proj" => {
                    module_fit(name, f64::NAN, None, Some("nonfinite-merge"))
                }
                "model.layers.25.mlp.up_proj" => {
                    module_fit(name, 4.0, Some(8.0e2), Some("scale-mismatch"))
                }
                _ => module_fit(name, 1.0 + (wobble - 0.5) * 0.01, Some(0.8 + wobble), None),
            }
        })
        .collect();
    Forensics {
        dtype: "bf16".to_string(),
        tolerance: 4.0,
        modules,
        untouched: Default::default(),
        inventory: Default::default(),
        config_drift: Vec::new(),
    }
}

/// The clean report with `<script>` planted in a module name, a path, a finding and a message.
fn hostile_report() -> Report {
    let mut report = clean_report().clone();
    let target = "model.layers.0.self_attn.q_proj";
    for row in report.layers.iter_mut().flatten() {
        if row.module == target {
            row.module = HOSTILE_MODULE.to_string();
        }
    }
    for s in &mut report.structure {
        for m in &mut s.modules {
            if m.module == target {
                m.module = HOSTILE_MODULE.to_string();
            }
        }
    }
    for p in report.precisions.iter_mut().flatten() {
        p.weights.worst_module = Some(HOSTILE_MODULE.to_string());
    }
    report.inputs.base = format!("/models/{HOSTILE}/base");
    let mut f = Finding::new(
        Code::DeltaSwamped,
        Some(HOSTILE_MODULE.to_string()),
        format!("lost in {HOSTILE} & \"friends\"\n::error::injected"),
    )
    .advice(format!("do not run {HOSTILE}"));
    f.precision = Some("bf16".to_string());
    f.level = Level::Deny;
    report.findings.insert(0, f);
    gate::recompute_verdicts(&mut report);
    report
}

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
        .find(&format!(">{broken}</code>"))
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

/// A JUnit document as a consumer sees it.
struct JunitDoc {
    totals: (usize, usize, usize),
    suites: Vec<(String, usize, usize, usize)>,
    cases: Vec<JunitCase>,
}

struct JunitCase {
    suite: String,
    name: String,
    classname: String,
    /// (message attribute, text) of `<failure>`.
    failure: Option<(String, String)>,
    skipped: bool,
    system_out: String,
}

/// Parses JUnit XML with quick-xml (well-formedness, entities, attribute values) and collects
/// what a JUnit consumer reads.
fn parse_junit(xml: &str) -> JunitDoc {
    use quick_xml::XmlVersion;
    use quick_xml::events::{BytesStart, Event};

    fn attrs(e: &BytesStart<'_>) -> std::collections::BTreeMap<String, String> {
        e.attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                (
                    a.key.as_ref().to_string(),
                    a.normalized_value(XmlVersion::Implicit1_0)
                        .expect("attribute value with known entities")
                        .into_owned(),
                )
            })
            .collect()
    }
    let count = |m: &std::collections::BTreeMap<String, String>, k: &str| -> usize {
        m.get(k)
            .unwrap_or_else(|| panic!("missing `{k}`"))
            .parse()
            .expect("a count")
    };

    let mut reader = quick_xml::Reader::from_str(xml);
    let mut doc = JunitDoc {
        totals: (0, 0, 0),
        suites: Vec::new(),
        cases: Vec::new(),
    };
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut failure_message = String::new();
    let mut suite = String::new();
    loop {
        let event = reader.read_event().expect("well-formed XML");
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = e.name().as_ref().to_string();
                let a = attrs(e);
                match name.as_str() {
                    "testsuites" => {
                        doc.totals = (
                            count(&a, "tests"),
                            count(&a, "failures"),
                            count(&a, "skipped"),
                        )
                    }
                    "testsuite" => {
                        suite = a["name"].clone();
                        doc.suites.push((
                            suite.clone(),
                            count(&a, "tests"),
                            count(&a, "failures"),
                            count(&a, "skipped"),
                        ));
                    }
                    "testcase" => doc.cases.push(JunitCase {
                        suite: suite.clone(),
                        name: a.get("name").cloned().expect("testcase name"),
                        classname: a.get("classname").cloned().expect("testcase classname"),
                        failure: None,
                        skipped: false,
                        system_out: String::new(),
                    }),
                    "failure" => failure_message = a.get("message").cloned().unwrap_or_default(),
                    "skipped" => doc.cases.last_mut().expect("inside a testcase").skipped = true,
                    "system-out" | "properties" | "property" => {}
                    other => panic!("unexpected JUnit element <{other}>"),
                }
                if matches!(event, Event::Start(_)) {
                    stack.push(name);
                    text.clear();
                }
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .expect("valid character reference")
                        .expect("a character")
                        .to_string()
                } else {
                    match &*r.into_inner() {
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "amp" => "&".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        other => panic!("undefined entity &{other};"),
                    }
                };
                text.push_str(&resolved);
            }
            Event::End(e) => {
                let name = stack.pop().expect("balanced tags");
                assert_eq!(name.as_str(), e.name().as_ref());
                let case = doc.cases.last_mut();
                match (name.as_str(), case) {
                    ("failure", Some(c)) => {
                        c.failure = Some((failure_message.clone(), text.clone()));
                    }
                    ("system-out", Some(c)) => c.system_out = text.clone(),
                    _ => {}
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    doc
}

/// The counts a JUnit consumer derives must equal the declared ones.
fn assert_junit_consistent(doc: &JunitDoc) {
    let mut totals = (0, 0, 0);
    for (name, tests, failures, skipped) in &doc.suites {
        let cases: Vec<&JunitCase> = doc.cases.iter().filter(|c| &c.suite == name).collect();
        let f = cases.iter().filter(|c| c.failure.is_some()).count();
        let s = cases.iter().filter(|c| c.skipped).count();
        assert_eq!(
            (*tests, *failures, *skipped),
            (cases.len(), f, s),
            "suite {name}"
        );
        for c in &cases {
            assert_eq!(c.classname, *name);
            if let Some((message, body)) = &c.failure {
                assert!(
                    !message.is_empty() && body.contains("advice: "),
                    "{}",
                    c.name
                );
            }
        }
        totals = (totals.0 + tests, totals.1 + failures, totals.2 + skipped);
    }
    assert_eq!(doc.totals, totals);
}

#[test]
fn junit_has_a_suite_per_precision_and_a_case_per_check() {
    let report = clean_report();
    let doc = parse_junit(&junit::render(report));
    assert_junit_consistent(&doc);
    let names: Vec<&str> = doc.suites.iter().map(|s| s.0.as_str()).collect();
    let precisions = report.precisions.as_ref().expect("merged");
    let mut expected = vec!["lora-doctor.structure".to_string()];
    expected.extend(precisions.iter().map(|p| format!("lora-doctor.{}", p.name)));
    assert_eq!(names, expected);
    for p in precisions {
        let suite = format!("lora-doctor.{}", p.name);
        let cases: BTreeSet<&str> = doc
            .cases
            .iter()
            .filter(|c| c.suite == suite)
            .map(|c| c.name.as_str())
            .collect();
        for check in ["weights", "logits", "generation"] {
            assert!(cases.contains(check), "{suite} lacks {check}: {cases:?}");
        }
    }
    // Every warn finding is reported (system-out); no deny means no failure.
    let deny = report
        .findings
        .iter()
        .filter(|f| f.level == Level::Deny)
        .count();
    assert_eq!(doc.totals.1 > 0, deny > 0);
    let notes: String = doc.cases.iter().map(|c| c.system_out.as_str()).collect();
    for f in report.findings.iter().filter(|f| f.level != Level::Deny) {
        assert!(
            notes.contains(&f.message),
            "warn/allow finding missing: {}",
            f.message
        );
    }

    let failed = parse_junit(&junit::render(failing_report()));
    assert_junit_consistent(&failed);
    let structure = failed
        .cases
        .iter()
        .find(|c| c.suite == "lora-doctor.structure")
        .expect("a structure case");
    let (_, body) = structure
        .failure
        .as_ref()
        .expect("the structural check fails");
    assert!(body.contains("nonfinite-adapter") && body.contains("NaN"));
    assert!(
        failed
            .cases
            .iter()
            .any(|c| c.suite == "lora-doctor.merge" && c.skipped)
    );
}

#[test]
fn github_annotations_and_summary_follow_the_findings() {
    let failed = failing_report();
    let annotations = github::render(failed);
    let errors = annotations
        .lines()
        .filter(|l| l.starts_with("::error "))
        .count();
    let deny = failed
        .findings
        .iter()
        .filter(|f| f.level == Level::Deny)
        .count();
    assert_eq!(errors, deny);
    assert!(
        annotations
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("::notice "))
    );

    let md = summary::render(failed);
    assert!(md.starts_with("### ❌ lora-doctor: FAIL"));
    assert!(md.contains("`nonfinite-adapter`"));

    let md = summary::render(clean_report());
    let table_rows = md.lines().filter(|l| l.starts_with("| ")).count();
    let precisions = clean_report().precisions.as_ref().expect("merged").len();
    assert_eq!(table_rows, precisions + 1, "header + one row per precision");
}

#[test]
fn level_overrides_recompute_every_verdict_and_keep_allowed_findings() {
    let mut report = clean_report().clone();
    let mut warn = Finding::new(
        Code::DeltaSwamped,
        Some("model.layers.1.mlp.down_proj".into()),
        "planted".into(),
    );
    warn.precision = Some("bf16".into());
    report.findings.push(warn);
    gate::recompute_verdicts(&mut report);
    let bf16 = |r: &Report| {
        r.precisions
            .as_ref()
            .and_then(|ps| ps.iter().find(|p| p.name == "bf16"))
            .map(|p| p.verdict)
    };
    assert_eq!(bf16(&report), Some(Verdict::Warn));

    let deny_warnings = LevelOverrides::default()
        .with_flags(&["warnings".into()], &[], &[])
        .expect("valid");
    let mut denied = report.clone();
    gate::apply_gate(&mut denied, &deny_warnings);
    assert_eq!(denied.verdict, Verdict::Fail);
    assert_eq!(bf16(&denied), Some(Verdict::Fail));
    assert_eq!(
        denied.findings[0].level,
        Level::Deny,
        "re-sorted, most severe first"
    );

    let allow = LevelOverrides::default()
        .with_flags(&[], &[], &["delta-swamped".into()])
        .expect("valid");
    let mut allowed = report.clone();
    gate::apply_gate(&mut allowed, &allow);
    assert_eq!(bf16(&allowed), Some(Verdict::Pass));
    assert!(
        allowed
            .findings
            .iter()
            .any(|f| f.code == Code::DeltaSwamped && f.level == Level::Allow),
        "allowed findings stay in the report"
    );
}

#[test]
fn a_config_file_sets_levels_and_thresholds_and_reports_every_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(gate::FILE_NAME);
    let edited = GateConfig::template()
        .replace("# delta-swamped = \"warn\"", "delta-swamped = \"deny\"")
        .replacen("min-retention = 0.5", "min-retention = 0.9", 1);
    std::fs::write(&path, edited).expect("write the config");
    let config = GateConfig::load(&path).expect("the edited template is valid");
    assert_eq!(config.thresholds.float.min_retention, Some(0.9));
    assert_eq!(
        config.levels.codes.get(&Code::DeltaSwamped),
        Some(&Level::Deny)
    );
    assert_eq!(
        GateConfig::find(&[dir.path().to_path_buf()]).as_deref(),
        Some(path.as_path())
    );

    std::fs::write(
        &path,
        "[thresholds.float]\nmin-retention = 2\n[levels]\nnot-a-code = \"deny\"\noverflow = \"loud\"\n",
    )
    .expect("write");
    let message = GateConfig::load(&path).expect_err("invalid").to_string();
    for line in [":2:17: ", ":4:1: ", ":5:12: "] {
        assert!(
            message.contains(line),
            "no problem at {line} in:\n{message}"
        );
    }
}

/// `init` → edit a threshold → `check --config` changes the verdict, through the real binary.
#[test]

fn init_then_edit_a_threshold_changes_the_verdict() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lora-doctor.toml");
    let template = GateConfig::template();
    // bf16's mean KL on this fixture is ~1e-4: below the default deny limit, far above 1e-9.
    let edited = template.replacen("high-kl = 0.01", "high-kl = 1e-9", 1);
    assert_ne!(
        edited, template,
        "the template holds the float high-kl default"
    );
    std::fs::write(&config, edited).expect("write the config");
    let base = fixture_path("models/tiny-llama");
    let adapter = fixture_path("adapters/llama-lora");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "check",
            "--quiet",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--precision",
            "bf16",
            "--max-tokens",
            "64",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
            .args(&args)
            .output()
            .expect("the binary runs")
            .status
            .code()
    };
    assert_eq!(run(&[]), Some(0));
    let config = config.display().to_string();
    assert_eq!(run(&["--config", &config]), Some(1));
}

// ---------------------------------------------------------------------------------------------
// JSON schema: a minimal validator for the subset reports/schema.json uses.

/// Keywords the validator understands; the schema may use no other (so nothing is silently
/// unchecked).
const SCHEMA_KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "const",
];

fn schema() -> Value {
    let text = std::fs::read_to_string(manifest_dir().join("reports/schema.json"))
        .expect("reports/schema.json exists");
    serde_json::from_str(&text).expect("the schema is JSON")
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        other => panic!("unknown JSON type `{other}` in the schema"),
    }
}

fn validate(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{path}: not allowed"));
        }
        return;
    };
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let target = reference
            .strip_prefix("#/")
            .map(|p| p.split('/').fold(root, |v, key| &v[key]))
            .filter(|v| !v.is_null())
            .unwrap_or_else(|| panic!("unresolvable $ref {reference}"));
        validate(root, target, value, path, errors);
    }
    if let Some(t) = schema.get("type") {
        let names: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            other => panic!("bad `type` {other}"),
        };
        if !names.iter().any(|n| type_matches(n, value)) {
            errors.push(format!("{path}: expected {names:?}, got {value}"));
            return;
        }
    }
    if let Some(c) = schema.get("const")
        && c != value
    {
        errors.push(format!("{path}: expected {c}, got {value}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {options:?}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(key) {
                errors.push(format!("{path}: missing `{key}`"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, item) in object {
            let child = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(s) => validate(root, s, item, &child, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{path}: unexpected field `{key}`"))
                    }
                    Some(s @ Value::Object(_)) => validate(root, s, item, &child, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(root, items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Every way `value` breaks reports/schema.json (also used by the hub tests).
pub(super) fn schema_errors(value: &Value) -> Vec<String> {
    let root = schema();
    let mut errors = Vec::new();
    validate(&root, &root, value, "$", &mut errors);
    errors
}

/// Every keyword used anywhere in the schema (property names excluded).
fn keywords(schema: &Value, out: &mut BTreeSet<String>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for (key, value) in object {
        out.insert(key.clone());
        match key.as_str() {
            "properties" | "$defs" => {
                for sub in value.as_object().into_iter().flat_map(|o| o.values()) {
                    keywords(sub, out);
                }
            }
            "items" | "additionalProperties" => keywords(value, out),
            _ => {}
        }
    }
}

/// A change that makes a valid report invalid.
type Mutation = fn(&mut Value);

/// `check --json -` through the real binary: the exact bytes CI consumes.
fn json_of(adapter: &str, extra: &[&str]) -> Value {
    let base = fixture_path("models/tiny-llama");
    let adapter = fixture_path(adapter);
    let mut args = vec![
        "check",
        "--json",
        "-",
        "--base",
        &base,
        "--adapter",
        &adapter,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn json_reports_validate_against_the_committed_schema() {
    let root = schema();
    assert_eq!(
        root["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "draft 2020-12"
    );
    assert_eq!(
        root["properties"]["schema_version"]["const"],
        lora_doctor::report::SCHEMA_VERSION,
        "the schema's version is the code's"
    );
    let mut used = BTreeSet::new();
    keywords(&root, &mut used);
    let unsupported: Vec<&String> = used
        .iter()
        .filter(|k| !SCHEMA_KEYWORDS.contains(&k.as_str()))
        .collect();
    assert!(
        unsupported.is_empty(),
        "the test validator ignores {unsupported:?}"
    );
    let codes: BTreeSet<&str> =
        root["properties"]["findings"]["items"]["properties"]["code"]["enum"]
            .as_array()
            .expect("code enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
    let known: BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, known, "the schema lists exactly the finding codes");

    let reports = [
        (
            "every precision with logits",
            json_of(
                "adapters/llama-lora",
                &["--precision", "all", "--max-tokens", "32"],
            ),
        ),
        (
            "weights only",
            json_of("adapters/llama-lora", &["--weights-only"]),
        ),
        ("structural failure", json_of("adapters/nonfinite", &[])),
        (
            "QLoRA: effect against the quantized base, shift beside it",
            json_of(
                "adapters/qlora-nf4",
                &[
                    "--trained-on",
                    "nf4",
                    "--precision",
                    "bf16",
                    "--max-tokens",
                    "32",
                ],
            ),
        ),
    ];
    for (name, report) in &reports {
        let errors = schema_errors(report);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    assert!(reports[0].1["precisions"][0]["logits"].is_object());
    assert!(reports[2].1["precisions"].is_null());
    assert!(reports[0].1["adapter_effect"]["quantization_shift_kl"].is_null());
    assert!(reports[3].1["adapter_effect"]["quantization_shift_kl"].is_f64());

    // The validator is not vacuous: each mutation is caught.
    let good = &reports[0].1;
    let mutations: [(&str, Mutation); 6] = [
        ("schema_version", |r| r["schema_version"] = 1.into()),
        ("missing verdict", |r| {
            r.as_object_mut().expect("object").remove("verdict");
        }),
        ("unknown field", |r| r["surprise"] = true.into()),
        ("bad verdict", |r| {
            r["precisions"][0]["verdict"] = "maybe".into()
        }),
        ("numel as text", |r| r["layers"][0]["numel"] = "many".into()),
        ("no quantization shift", |r| {
            r["adapter_effect"]
                .as_object_mut()
                .expect("object")
                .remove("quantization_shift_kl");
        }),
    ];
    for (name, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(
            !schema_errors(&bad).is_empty(),
            "mutation `{name}` passed the schema"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium: the HTML report as a browser draws it.

/// Chromium from `LORA_DOCTOR_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("LORA_DOCTOR_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the HTML report test needs headless Chromium and none was found on PATH.\n\
         Install it with `apt-get install -y chromium` (Debian/Ubuntu; `.ci/run` does this in CI),\n\
         or point LORA_DOCTOR_CHROMIUM at a Chrome/Chromium binary."
    );
}

/// Runs Chromium headless on a local file with a fresh profile; stdout goes to `stdout_to`.
/// Flags: no sandbox (CI runs as root), no GPU, and no background networking so a closed
/// network does not stall it.
fn run_chromium(page: &Path, extra: &[String], height: u32, stdout_to: &Path) {
    let profile = tempfile::tempdir().expect("a fresh profile");
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size=1400,{height}"))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout_to).expect("stdout file"))
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start {}: {e}; install Chromium with `apt-get install -y chromium`",
            chromium().display()
        )
    });
    let started = Instant::now();
    loop {
        match child.try_wait().expect("waiting for chromium") {
            Some(status) => {
                assert!(status.success(), "chromium exited with {status}");
                return;
            }
            None if started.elapsed() > Duration::from_secs(120) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 120 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Page-pixel rectangle of an element: x, y, width, height.
type Rect = (u32, u32, u32, u32);

/// Measures, in a copy of the page with a probe script added, the document height and the
/// rectangle of every chart (its SVG or table, not the full-width container), by dumping the
/// DOM after the script wrote them into an attribute. The report itself has no script.
fn measure(page: &str, dir: &Path) -> (u32, Vec<(String, Rect)>, String) {
    const PROBE: &str = "<script>(function(){var parts=[];\
        document.querySelectorAll('[data-state]').forEach(function(e){\
        var t=e.querySelector('svg, table')||e;var r=t.getBoundingClientRect();\
        parts.push(e.id+':'+[r.left+window.scrollX,r.top+window.scrollY,r.width,r.height]\
        .map(Math.round).join(','));});\
        document.body.setAttribute('data-test-layout','height:'+\
        document.documentElement.scrollHeight+';'+parts.join(';'));})();</script>";
    let probe = dir.join("probe.html");
    std::fs::write(&probe, page.replace("</body>", &format!("{PROBE}</body>"))).expect("write");
    let dom_path = dir.join("dom.html");
    run_chromium(&probe, &["--dump-dom".to_string()], 1200, &dom_path);
    let dom = std::fs::read_to_string(&dom_path).expect("the dumped DOM");
    let start = dom
        .find("data-test-layout=\"")
        .map(|i| i + "data-test-layout=\"".len())
        .expect("the probe ran and wrote its measurements");
    let layout = &dom[start..start + dom[start..].find('"').expect("closed attribute")];
    let mut height = 0;
    let mut rects = Vec::new();
    for part in layout.split(';') {
        let (key, value) = part.split_once(':').expect("key:value");
        if key == "height" {
            height = value.parse().expect("height");
            continue;
        }
        let n: Vec<u32> = value
            .split(',')
            .map(|v| v.parse::<i64>().expect("integer").max(0) as u32)
            .collect();
        rects.push((key.to_string(), (n[0], n[1], n[2], n[3])));
    }
    (height, rects, dom)
}

/// An RGB screenshot.
struct Image {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Image {
        let file = std::fs::File::open(path).expect("the screenshot exists");
        let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("a sane size")];
        let info = reader.next_frame(&mut buf).expect("a frame");
        let channels = info.color_type.samples();
        let rgb = buf[..info.buffer_size()]
            .chunks_exact(channels)
            .flat_map(|px| [px[0], px[1 % channels], px[2 % channels]])
            .collect();
        Image {
            width: info.width,
            height: info.height,
            rgb,
        }
    }

    /// (distinct colours, share of pixels not of the most common colour) inside a rectangle.
    fn ink(&self, (x, y, w, h): Rect) -> (usize, f64) {
        let mut counts = std::collections::HashMap::new();
        let mut total = 0usize;
        for py in y..(y + h).min(self.height) {
            for px in x..(x + w).min(self.width) {
                let i = ((py * self.width + px) * 3) as usize;
                *counts
                    .entry((self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]))
                    .or_insert(0usize) += 1;
                total += 1;
            }
        }
        let dominant = counts.values().copied().max().unwrap_or(0);
        (
            counts.len(),
            if total == 0 {
                0.0
            } else {
                1.0 - dominant as f64 / total as f64
            },
        )
    }
}

/// Renders `page` in headless Chromium and checks that every container in `ids` holds a drawing:
/// measured in the DOM, then looked at in a screenshot (kept as `target/tmp/reports/{keep_as}`).
/// Returns the DOM Chromium built.
fn assert_charts_drawn(page: &str, ids: &[&str], keep_as: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (height, rects, dom) = measure(page, dir.path());
    let shot = dir.path().join("report.png");
    let page_path = dir.path().join("report.html");
    std::fs::write(&page_path, page).expect("write the page");
    let window = height.clamp(800, 16_000);
    run_chromium(
        &page_path,
        &[format!("--screenshot={}", shot.display())],
        window,
        &dir.path().join("screenshot.log"),
    );
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reports");
    let _ = std::fs::create_dir_all(&kept);
    let _ = std::fs::copy(&shot, kept.join(keep_as));
    let image = Image::read(&shot);
    assert_eq!(image.width, 1400, "device scale factor 1");
    for id in ids {
        let (_, rect) = rects
            .iter()
            .find(|(name, _)| name == id)
            .unwrap_or_else(|| panic!("{id} was not measured"));
        let (x, y, w, h) = *rect;
        assert!(w >= 300 && h >= 100, "{id} is too small: {rect:?}");
        assert!(y + h <= image.height, "{id} lies below the screenshot");
        let inner = (x + 3, y + 3, w.saturating_sub(6), h.saturating_sub(6));
        let (colours, share) = image.ink(inner);
        assert!(
            colours >= 12 && share >= 0.02,
            "{id} looks blank: {colours} colours, {:.2}% ink (screenshot kept in {})",
            share * 100.0,
            kept.join(keep_as).display()
        );
        // Control: the page right of the chart is blank, so the measure can tell the two apart.
        if x + w + 40 < image.width {
            let right = (x + w + 20, y, image.width - (x + w + 20) - 10, h);
            let (_, blank) = image.ink(right);
            assert!(
                blank < 0.005,
                "{id}: the area right of it is not blank ({blank})"
            );
        }
    }
    dom
}

#[test]
fn html_report_draws_every_chart_in_headless_chromium() {
    let report = clean_report();
    let page = html::render(report, &HtmlOptions::default());
    let dom = assert_charts_drawn(&page, &CHARTS, "report.png");

    // From the DOM: the verdict banner and the precision matrix with a row per precision.
    let verdict_at = dom
        .find("id=\"verdict\"")
        .expect("the verdict banner is in the DOM");
    let word = lora_doctor::report::summary::verdict_word(report.verdict);
    assert!(dom[verdict_at..].contains(&format!("<h1>{word}</h1>")));
    let matrix_at = dom
        .find("<table id=\"precision-matrix\">")
        .expect("the precision matrix is in the DOM");
    let matrix = &dom[matrix_at..matrix_at + dom[matrix_at..].find("</table>").expect("closed")];
    for p in report.precisions.as_ref().expect("merged") {
        assert!(
            matrix.contains(&format!("<th>{}</th>", p.name)),
            "no matrix row for {}",
            p.name
        );
    }
}

#[test]
fn merged_checkpoint_chart_draws_in_headless_chromium() {
    // SmolLM2-sized forensics by hand (210 modules, 4 broken) on the clean report's page.
    let mut report = clean_report().clone();
    report.forensics = Some(forensics_210());
    let page = html::render(&report, &HtmlOptions::default());
    let dom = assert_charts_drawn(&page, &["chart-forensics"], "report-forensics-210.png");
    let table_at = dom
        .find("<table id=\"forensics-causes\">")
        .expect("the table of causes is in the DOM");
    let table = &dom[table_at..table_at + dom[table_at..].find("</table>").expect("closed")];
    assert_eq!(
        table.matches("<tr><td>").count(),
        4,
        "one row per module with a cause"
    );

    // The real `check --merged` report: every chart, the fit chart included.
    let report = merged_with_forensics();
    let page = html::render(report, &HtmlOptions::default());
    // (Its precision matrix has too few rows for the size check; the SVG charts have none.)
    assert_charts_drawn(
        &page,
        &[
            "chart-heatmap",
            "chart-kl",
            "chart-drift",
            "chart-forensics",
        ],
        "report-merged.png",
    );
}
