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
//!
//! This file holds the shared report builders; the tests live in `tests/reports/<subject>.rs`.

mod browser;
mod gate_config;
mod html_page;
pub(crate) mod junit_and_github;
pub(crate) mod schema;

use clap::Parser;
use lora_doctor::cli::{Cli, Command as CliCommand};
use lora_doctor::commands::check::build_report;
use lora_doctor::findings::{Code, Finding, Level, Verdict};
use lora_doctor::forensics::{ConfigDifference, Forensics, ModuleFit};
use lora_doctor::gate::{self, GateConfig, LevelOverrides};
use lora_doctor::report::html::HtmlOptions;
use lora_doctor::report::{Report, github, html, junit, summary};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
