//! The one integration test binary: drives the real `lora-doctor` executable on the committed
//! fixtures and checks exit codes, both output streams and the JSON contract.

mod action;
mod bad_inputs;
mod false_alarms;
mod fuzz_regressions;
mod gguf;
mod hub;
mod reports;
mod shell;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_doctor::findings::Code;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> String {
    root().join("fixtures").join(rel).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally, not by a signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `check --json -` and returns (exit code, parsed report).
fn check_json(base: &str, adapters: &[&str]) -> (i32, Value) {
    check_json_with(base, adapters, &[])
}

/// `check_json` with extra flags (weights only).
fn check_json_with(base: &str, adapters: &[&str], extra: &[&str]) -> (i32, Value) {
    let mut flags = vec!["--weights-only"];
    flags.extend_from_slice(extra);
    check_json_full(base, adapters, &flags)
}

/// `check --json -` with exactly these flags (the logit comparison runs unless they say not to).
fn check_json_full(base: &str, adapters: &[&str], extra: &[&str]) -> (i32, Value) {
    let base = fixture(base);
    let adapter_paths: Vec<String> = adapters.iter().map(|a| fixture(a)).collect();
    let mut args = vec!["check", "--json", "-", "--base", &base];
    args.extend_from_slice(extra);
    for a in &adapter_paths {
        args.push("--adapter");
        args.push(a);
    }
    let out = run(&args);
    assert!(
        !stderr(&out).contains("panicked"),
        "panic on {adapters:?}: {}",
        stderr(&out)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {adapters:?} is not JSON ({e}); stderr: {}",
            stderr(&out)
        )
    });
    (code(&out), json)
}

fn codes(report: &Value) -> BTreeSet<String> {
    report["findings"]
        .as_array()
        .expect("findings is an array")
        .iter()
        .map(|f| f["code"].as_str().expect("code is a string").to_string())
        .collect()
}

/// (base fixture, adapter fixture(s), exit code, the exact set of codes raised).
const CASES: &[(&str, &[&str], i32, &[&str])] = &[
    // Clean adapters raise nothing.
    ("models/tiny-llama", &["adapters/llama-lora"], 0, &[]),
    (
        "models/tiny-llama",
        &["adapters/llama-rslora-patterns"],
        0,
        &[],
    ),
    ("models/tiny-llama", &["adapters/llama-layers"], 0, &[]),
    ("models/tiny-llama", &["adapters/llama-dora"], 0, &[]),
    (
        "models/tiny-llama",
        &["adapters/llama-target-regex"],
        0,
        &[],
    ),
    (
        "models/tiny-llama",
        &["adapters/llama-stack-sft", "adapters/llama-stack-ppo"],
        0,
        &[],
    ),
    (
        "models/tiny-llama-sharded",
        &["adapters/llama-lora"],
        0,
        &[],
    ),
    ("models/tiny-gpt2", &["adapters/gpt2-lora"], 0, &[]),
    ("models/tiny-neox", &["adapters/neox-lora"], 0, &[]),
    ("models/tiny-neox", &["adapters/neox-embed"], 0, &[]),
    // Each faulty adapter raises its code.
    (
        "models/tiny-llama",
        &["adapters/untrained"],
        0,
        &["untrained-adapter"],
    ),
    (
        "models/tiny-llama",
        &["adapters/nonfinite"],
        1,
        &["nonfinite-adapter"],
    ),
    // Renamed keys match neither the base nor the config's target_modules.
    (
        "models/tiny-llama",
        &["adapters/renamed"],
        1,
        &["no-match", "unused-tensor"],
    ),
    (
        "models/tiny-llama",
        &["adapters/gpt2-lora"],
        1,
        &["no-match", "base-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/extra-layer"],
        1,
        &["missing-target"],
    ),
    (
        "models/tiny-llama",
        &["adapters/wrong-shape"],
        1,
        &["shape-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/rank-config"],
        1,
        &["rank-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/rank-ab"],
        1,
        &["rank-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/stray-bias"],
        0,
        &["unused-tensor"],
    ),
    // Added tokens with the resized matrices saved, and a trained head on a tied base, are normal
    // fine-tunes (issue 17): merged untied and checked; the warning names what would re-tie them.
    (
        "models/tiny-llama",
        &["adapters/added-tokens"],
        0,
        &["tied-embeddings"],
    ),
    (
        "models/tiny-llama",
        &["adapters/added-tokens-lora-only"],
        1,
        &["vocab-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/tied-head"],
        0,
        &["tied-embeddings"],
    ),
    (
        "models/tiny-llama",
        &["adapters/wrong-base-name"],
        0,
        &["base-mismatch"],
    ),
    (
        "models/tiny-llama",
        &["adapters/bnb-4bit-name"],
        0,
        &["quantized-base"],
    ),
];

#[test]
fn fixture_table_raises_exactly_the_expected_codes() {
    let mut failures = Vec::new();
    for (base, adapters, want_exit, want_codes) in CASES {
        let (exit, report) = check_json(base, adapters);
        let case = format!("{base} + {adapters:?}");
        expect_codes(case, exit, &report, *want_exit, want_codes, &mut failures);
        let verdict = report["verdict"].as_str().expect("verdict");
        let expected_verdict = match (*want_exit, want_codes.is_empty()) {
            (1, _) => "fail",
            (_, true) => "pass",
            _ => "warn",
        };
        if verdict != expected_verdict {
            failures.push(format!("{base} + {adapters:?}: verdict {verdict}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Weight-level findings: (base, adapters, flags, exit code, the exact set of codes raised).
type WeightCase = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    i32,
    &'static [&'static str],
);

const WEIGHT_CASES: &[WeightCase] = &[
    // One lora_B blown up ×1e7: |W + ΔW| passes 65504, f16 stores Inf.
    (
        "models/tiny-llama",
        &["adapters/exploded"],
        &["--precision", "f16"],
        1,
        &["overflow", "nonfinite-merge"],
    ),
    // The same adapter is fine in bf16 (range of f32): no overflow there.
    (
        "models/tiny-llama",
        &["adapters/exploded"],
        &["--precision", "bf16"],
        0,
        &[],
    ),
    // lr 1e-6: bf16 rounding noise is 7–27× ‖ΔW‖.
    (
        "models/tiny-llama",
        &["adapters/tiny-lr"],
        &["--precision", "bf16"],
        0,
        &["delta-swamped"],
    ),
    (
        "models/tiny-llama",
        &["adapters/tiny-lr"],
        &["--precision", "f32"],
        0,
        &[],
    ),
    (
        "models/tiny-llama",
        &["adapters/tiny-lr"],
        &["--precision", "q4_0"],
        0,
        &["quantization-error", "delta-swamped"],
    ),
    // One v_proj's lora_B ×50 among 6 layers.
    (
        "models/tiny-llama-deep",
        &["adapters/deep-outlier"],
        &[],
        0,
        &["delta-outlier"],
    ),
    (
        "models/tiny-llama-deep",
        &["adapters/deep-lora"],
        &[],
        0,
        &[],
    ),
    // Trained against dequant(nf4(W)); a 16-bit merge carries the quantization error.
    (
        "models/tiny-llama",
        &["adapters/qlora-nf4"],
        &["--trained-on", "nf4", "--precision", "bf16"],
        1,
        &["quantized-base", "precision-drift"],
    ),
    // Clean adapters stay clean in every precision's default thresholds for floats.
    (
        "models/tiny-llama",
        &["adapters/llama-dora"],
        &["--precision", "f32,bf16,f16"],
        0,
        &[],
    ),
    (
        "models/tiny-gpt2",
        &["adapters/gpt2-lora"],
        &["--precision", "f32,bf16,f16"],
        0,
        &[],
    ),
    (
        "models/tiny-neox",
        &["adapters/neox-embed"],
        &["--precision", "f32,bf16,f16"],
        0,
        &[],
    ),
];

/// Records a mismatch between a check's exit code / raised codes and the table's expectation.
fn expect_codes(
    case: String,
    exit: i32,
    report: &Value,
    want_exit: i32,
    want_codes: &[&str],
    failures: &mut Vec<String>,
) {
    let got = codes(report);
    let want: BTreeSet<String> = want_codes.iter().map(|c| c.to_string()).collect();
    if exit != want_exit || got != want {
        failures.push(format!(
            "{case}: exit {exit} (want {want_exit}), codes {got:?} (want {want:?})"
        ));
    }
}

#[test]
fn weight_cases_raise_exactly_the_expected_codes() {
    let mut failures = Vec::new();
    for (base, adapters, flags, want_exit, want_codes) in WEIGHT_CASES {
        let (exit, report) = check_json_with(base, adapters, flags);
        let case = format!("{base} + {adapters:?} {flags:?}");
        expect_codes(case, exit, &report, *want_exit, want_codes, &mut failures);
        assert!(
            report["precisions"].is_array(),
            "{adapters:?}: no precisions"
        );
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Logit-level findings (the forward pass runs): same shape as WEIGHT_CASES.
const LOGIT_CASES: &[WeightCase] = &[
    // Clean in every float format and in q8_0.
    (
        "models/tiny-llama",
        &["adapters/llama-lora"],
        &["--precision", "f32,bf16,f16,q8_0"],
        0,
        &[],
    ),
    // GPT-2: sequences capped at its 128 learned positions; Conv1D quantized along `in`.
    (
        "models/tiny-gpt2",
        &["adapters/gpt2-lora"],
        &["--precision", "bf16,q4_0"],
        0,
        &[],
    ),
    (
        "models/tiny-neox",
        &["adapters/neox-embed"],
        &["--precision", "bf16,q8_0"],
        0,
        &[],
    ),
    // A lr-1e-6 adapter: its effect (KL 1e-6) drowns in bf16 storage noise.
    (
        "models/tiny-llama",
        &["adapters/tiny-lr"],
        &["--precision", "bf16"],
        1,
        &["effect-lost", "delta-swamped"],
    ),
    // Infinite weights make NaN logits.
    (
        "models/tiny-llama",
        &["adapters/exploded"],
        &["--precision", "f16"],
        1,
        &[
            "overflow",
            "nonfinite-merge",
            "nonfinite-logits",
            "high-kl",
            "effect-lost",
            "top1-disagreement",
            "gibberish",
        ],
    ),
    // A QLoRA adapter merged into the 16-bit weights it never saw.
    (
        "models/tiny-llama",
        &["adapters/qlora-nf4"],
        &["--trained-on", "nf4", "--precision", "bf16"],
        1,
        &[
            "quantized-base",
            "precision-drift",
            "high-kl",
            "top1-disagreement",
        ],
    ),
];

#[test]
fn a_broken_merged_checkpoint_is_caught_and_drift_points_at_the_broken_layer() {
    let clean = check_json_full(
        "models/tiny-llama-deep",
        &["adapters/deep-lora"],
        &[
            "--merged",
            "fixtures/merged/deep-peft-bf16",
            "--precision",
            "bf16",
        ],
    );
    assert_eq!(
        clean.0,
        0,
        "PEFT's own bf16 merge must pass: {:?}",
        codes(&clean.1)
    );
    assert!(codes(&clean.1).is_empty(), "{:?}", codes(&clean.1));
    // fixtures/merged/deep-broken-bf16: layer 3's v_proj update scaled ×50 by hand.
    let (exit, report) = check_json_full(
        "models/tiny-llama-deep",
        &["adapters/deep-lora"],
        &[
            "--merged",
            "fixtures/merged/deep-broken-bf16",
            "--precision",
            "bf16",
        ],
    );
    assert_eq!(exit, 1);
    let got = codes(&report);
    for code in ["gibberish", "high-kl", "effect-lost"] {
        assert!(got.contains(code), "{code} missing from {got:?}");
    }
    let merged = report["precisions"]
        .as_array()
        .expect("precisions")
        .iter()
        .find(|p| p["name"] == "merged")
        .expect("a `merged` entry");
    let drift: Vec<f64> = merged["logits"]["drift_by_layer"]
        .as_array()
        .expect("drift")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    let jump = drift
        .windows(2)
        .enumerate()
        .max_by(|a, b| (a.1[1] - a.1[0]).total_cmp(&(b.1[1] - b.1[0])))
        .map(|(i, _)| i + 1)
        .expect("layers");
    assert_eq!(jump, 3, "drift {drift:?} should jump at block 3");
    assert_eq!(
        report["inputs"]["merged"],
        "fixtures/merged/deep-broken-bf16"
    );
}

/// fixtures/merged/cases.json (written by fixtures/gen/forensics.py): one merged checkpoint per
/// cause `check --merged` names, plus correct merges, each with the codes it must raise.
fn merged_cases() -> Vec<(String, String, String, BTreeSet<String>)> {
    let text = std::fs::read_to_string(root().join("fixtures/merged/cases.json"))
        .expect("fixtures/merged/cases.json");
    let cases: Value = serde_json::from_str(&text).expect("cases.json is JSON");
    cases
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().expect(k).to_string();
            let expected = c["expected"]
                .as_array()
                .expect("expected")
                .iter()
                .map(|v| v.as_str().expect("code").to_string())
                .collect();
            (s("folder"), s("base"), s("adapter"), expected)
        })
        .collect()
}

/// What the named mistake must say, for the cases where the cause has a name.
const MERGED_NAMES: &[(&str, &str)] = &[
    (
        "rslora-as-plain-bf16",
        "rsLoRA adapter merged with plain α/r",
    ),
    ("alpha-ignored-bf16", "alpha ignored"),
    ("alpha-pattern-ignored-bf16", "alpha_pattern ignored"),
    ("deep-broken-bf16", "ŝ/s = 49.9"),
    ("nf4-base-bf16", "nf4-dequantized base"),
    ("q4_0-requant-f16", "quantized to q4_0"),
];

#[test]
fn merged_checkpoints_raise_exactly_the_codes_of_their_cause() {
    let cases = merged_cases();
    assert!(cases.len() >= 20, "cases.json lists {} cases", cases.len());
    let mut failures = Vec::new();
    for (folder, base, adapter, want) in &cases {
        let merged = fixture(&format!("merged/{folder}"));
        let (exit, report) = check_json_with(base, &[adapter], &["--merged", &merged]);
        // Allow-level findings are informational (a structural tied-head warning that the
        // merged checkpoint settles).
        let got: BTreeSet<String> = report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter(|f| f["level"] != "allow")
            .map(|f| f["code"].as_str().expect("code").to_string())
            .collect();
        let deny = report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .any(|f| f["level"] == "deny");
        if &got != want || exit != i32::from(deny) {
            failures.push(format!(
                "{folder}: exit {exit}, codes {got:?} (want {want:?})"
            ));
        }
        let forensics = &report["forensics"];
        let fitted = forensics["modules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["residual_to_floor"].is_number())
            .count();
        let merged_row = report["precisions"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "merged"));
        if merged_row.is_none_or(|p| p["weights"]["modules"] != fitted) {
            failures.push(format!(
                "{folder}: the `merged` precision row does not summarise the {fitted} fitted tensors"
            ));
        }
        if forensics["modules"].as_array().is_none_or(|m| m.is_empty()) {
            failures.push(format!("{folder}: no per-module fits in forensics"));
        }
        if let Some((_, name)) = MERGED_NAMES.iter().find(|(f, _)| f == folder) {
            let named = report["findings"]
                .as_array()
                .expect("findings")
                .iter()
                .any(|f| f["message"].as_str().is_some_and(|m| m.contains(name)));
            if !named {
                failures.push(format!("{folder}: no finding names `{name}`"));
            }
        }
        // Correct merges sit near one rounding: 1.0 for a single rounding, up to ~1.5 for PEFT's
        // delta-then-sum in bf16, up to ~2.7 for PEFT's f32 DoRA (norm, division and product
        // each rounded in f32). The gate's tolerance (4) leaves room above that.
        if want.is_empty() {
            for m in forensics["modules"].as_array().into_iter().flatten() {
                let ratio = m["residual_to_floor"].as_f64().unwrap_or(f64::INFINITY);
                if ratio > 3.0 {
                    failures.push(format!("{folder}: {} at {ratio}× the floor", m["module"]));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn merged_thresholds_move_the_verdict() {
    let merged = fixture("merged/q4_0-requant-f16");
    let base = ["models/micro-llama", "adapters/micro-lora"];
    let level = |extra: &[&str]| {
        let mut flags = vec!["--merged", merged.as_str()];
        flags.extend_from_slice(extra);
        let (exit, report) = check_json_with(base[0], &[base[1]], &flags);
        let levels: Vec<String> = report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f["level"].as_str().unwrap_or("?"),
                    f["code"].as_str().unwrap_or("?")
                )
            })
            .collect();
        (exit, levels)
    };
    // The re-quantized merge's error is 0.43 ‖ΔW‖: below the default 0.5, a warning.
    assert_eq!(
        level(&[]),
        (0, vec!["warn quantized-merge-base".to_string()])
    );
    assert_eq!(
        level(&["--threshold", "merged-quant-deny=0.1"]),
        (1, vec!["deny quantized-merge-base".to_string()])
    );
    // A tolerance wide enough to accept 4-bit noise accepts the merge as faithful.
    assert_eq!(level(&["--threshold", "merged-tolerance=1e9"]), (0, vec![]));
}

#[test]
fn logit_cases_raise_exactly_the_expected_codes() {
    let mut failures = Vec::new();
    for (base, adapters, flags, want_exit, want_codes) in LOGIT_CASES {
        let (exit, report) = check_json_full(base, adapters, flags);
        let case = format!("{base} + {adapters:?} {flags:?}");
        expect_codes(case, exit, &report, *want_exit, want_codes, &mut failures);
        assert!(
            report["adapter_effect"]["mean_kl"].is_number(),
            "{adapters:?}"
        );
        for p in report["precisions"].as_array().expect("precisions") {
            assert!(
                p["logits"].is_object(),
                "{adapters:?}: {} has no logits",
                p["name"]
            );
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_code_is_raised_by_some_fixture() {
    let raised: BTreeSet<String> = CASES
        .iter()
        .flat_map(|c| c.3.iter().copied())
        .chain(WEIGHT_CASES.iter().flat_map(|c| c.4.iter().copied()))
        .chain(LOGIT_CASES.iter().flat_map(|c| c.4.iter().copied()))
        .chain(bad_inputs::raised_codes())
        .map(str::to_string)
        .chain(merged_cases().into_iter().flat_map(|c| c.3))
        .collect();
    for code in Code::ALL {
        assert!(
            raised.contains(code.as_str()),
            "no fixture raises `{code}`; add one to fixtures/gen/ and CASES (or merged/cases.json)"
        );
    }
}

#[test]
fn json_report_follows_the_contract() {
    let (exit, report) = check_json("models/tiny-llama", &["adapters/nonfinite"]);
    assert_eq!(exit, 1);
    let object = report.as_object().expect("object");
    assert_eq!(
        object.keys().next().map(String::as_str),
        Some("schema_version")
    );
    assert_eq!(
        report["schema_version"],
        lora_doctor::report::SCHEMA_VERSION
    );
    assert_eq!(report["tool_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["verdict"], "fail");
    assert!(report["precisions"].is_null() && report["layers"].is_null());
    assert!(report["adapter_effect"].is_null());
    let finding = &report["findings"][0];
    for field in [
        "code",
        "level",
        "module",
        "message",
        "advice",
        "observed",
        "threshold",
        "precision",
    ] {
        assert!(finding.get(field).is_some(), "finding lacks `{field}`");
    }
    assert_eq!(finding["level"], "deny");
    let message = finding["message"].as_str().expect("message");
    assert!(
        message.contains("3 NaN") && message.contains("1 Inf"),
        "{message}"
    );
    let structure = &report["structure"][0];
    assert!(structure["matched"].as_u64().expect("matched") > 0);
}

#[test]
fn terminal_summary_goes_to_stderr_with_json_on_stdout_and_to_stdout_otherwise() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out = run(&["check", "--base", &base, "--adapter", &adapter]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict: PASS"), "{text}");
    assert!(text.contains("matched"), "{text}");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        "-",
    ]);
    assert!(stderr(&out).contains("verdict: PASS"));
    let quiet = run(&["check", "--quiet", "--base", &base, "--adapter", &adapter]);
    assert!(quiet.stdout.is_empty() && quiet.stderr.is_empty());
}

#[test]
fn exit_zero_overrides_a_failed_gate() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/nonfinite");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--exit-zero",
    ]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: FAIL"));
}

/// Inputs that cannot be checked exit 2 with one `error:` line naming the file, never a panic.
#[test]
fn unreadable_inputs_exit_2_with_a_named_cause() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "models/tiny-llama",
            "adapters/bin-only",
            "adapter_model.bin",
        ),
        ("models/tiny-llama", "adapters/not-lora", "IA3"),
        (
            "models/tiny-llama",
            "adapters/no-config",
            "adapter_config.json",
        ),
        (
            "models/tiny-llama",
            "adapters/truncated",
            "adapter_model.safetensors",
        ),
        (
            "models/tiny-llama",
            "adapters/garbage",
            "adapter_model.safetensors",
        ),
        (
            "models/does-not-exist",
            "adapters/llama-lora",
            "does-not-exist",
        ),
        (
            "models/tiny-llama",
            "adapters/does-not-exist",
            "does-not-exist",
        ),
    ];
    for (base, adapter, needle) in cases {
        let out = run(&[
            "check",
            "--base",
            &fixture(base),
            "--adapter",
            &fixture(adapter),
        ]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{adapter}: {err}");
        assert!(err.starts_with("error: "), "{adapter}: {err}");
        assert!(err.contains(needle), "{adapter}: `{needle}` not in {err}");
        assert!(!err.contains("panicked"), "{adapter}: {err}");
        assert!(out.stdout.is_empty(), "{adapter} printed a report");
    }
}

#[test]
fn a_bad_report_path_fails_before_work_and_inputs_are_never_written() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        "/nonexistent-dir/report.json",
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("nonexistent-dir"));
    let inside = format!("{adapter}/report.json");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        &inside,
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("input folder"), "{}", stderr(&out));
    assert!(!Path::new(&inside).exists());
}

#[test]
fn json_report_is_written_atomically_to_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.json");
    let out = run(&[
        "check",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/llama-lora"),
        "--json",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert_eq!(report["verdict"], "pass");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "report.json")
        .collect();
    assert!(leftovers.is_empty(), "staging files left: {leftovers:?}");
}

#[test]
fn explain_documents_every_code() {
    for code in Code::ALL {
        let out = run(&["explain", code.as_str()]);
        assert_eq!(code_of(&out), 0);
        let text = String::from_utf8_lossy(&out.stdout);
        for heading in ["What it checks", "Why it matters", "How to fix"] {
            assert!(text.contains(heading), "{code}: {text}");
        }
    }
    let index = run(&["explain"]);
    let text = String::from_utf8_lossy(&index.stdout);
    assert!(Code::ALL.iter().all(|c| text.contains(c.as_str())));
    let unknown = run(&["explain", "no-such-code"]);
    assert_eq!(code_of(&unknown), 2);
    assert!(stderr(&unknown).contains("known codes"));
}

fn code_of(out: &Output) -> i32 {
    code(out)
}

#[test]
fn every_subcommand_help_has_examples() {
    for sub in ["check", "inspect", "explain"] {
        let out = run(&[sub, "--help"]);
        assert_eq!(code(&out), 0);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{sub} --help lacks examples"
        );
    }
}

#[test]
fn inspect_reads_headers_of_adapters_and_sharded_checkpoints() {
    let out = run(&[
        "inspect",
        "--json",
        &fixture("adapters/llama-rslora-patterns"),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["use_rslora"], true);
    let modules = summary["modules"].as_array().expect("modules");
    let down = modules
        .iter()
        .find(|m| {
            m["module"]
                .as_str()
                .is_some_and(|n| n.ends_with("layers.0.mlp.down_proj"))
        })
        .expect("a down_proj module");
    // rank_pattern {"down_proj": 4}, alpha 8, rsLoRA: 8 / sqrt(4) = 4.
    assert_eq!(down["r"], 4);
    assert_eq!(down["scale"], 4.0);

    let out = run(&["inspect", &fixture("models/tiny-llama-sharded")]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("BF16") && text.contains("files"), "{text}");
}

#[test]
fn a_single_safetensors_file_is_accepted_as_base() {
    let (exit, report) = check_json(
        "models/tiny-llama/model.safetensors",
        &["adapters/llama-lora"],
    );
    assert_eq!(exit, 0);
    assert_eq!(report["verdict"], "pass");
}

/// Goldens are produced by fixtures/generate.py only; a hand edit changes a hash here.
#[test]
fn fixtures_match_their_manifest() {
    use sha2::{Digest, Sha256};
    let fixtures = root().join("fixtures");
    let manifest =
        std::fs::read_to_string(fixtures.join("MANIFEST.sha256")).expect("MANIFEST.sha256");
    let mut checked = 0;
    for line in manifest.lines().filter(|l| !l.is_empty()) {
        let (digest, rel) = line.split_once("  ").expect("`<sha256>  <path>` lines");
        let bytes = std::fs::read(fixtures.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let actual: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(actual, digest, "{rel} differs from what generate.py wrote");
        checked += 1;
    }
    assert!(checked > 20, "manifest lists only {checked} files");
}

fn read_checkpoint(dir: &Path) -> lora_doctor::io::checkpoint::Checkpoint {
    lora_doctor::io::checkpoint::Checkpoint::open(dir).expect("merged checkpoint opens")
}

/// `merge --recipe peft` reproduces PEFT's merge_and_unload (goldens by fixtures/gen/merge.py):
/// bf16/f16 bit-identical except where the f32 GEMM's summation order flips a final rounding
/// (< 1e-3 of elements, each within 1 ULP); f32 within 1 ULP everywhere.
#[test]
fn merge_matches_peft_goldens() {
    use lora_doctor::merge::float::{FloatFormat, ulp_distance};
    let cases_path = root().join("fixtures/goldens/merge/cases.json");
    let cases: Value =
        serde_json::from_slice(&std::fs::read(&cases_path).expect("cases.json")).expect("JSON");
    let mut checked = 0usize;
    let mut report = Vec::new();
    for case in cases["cases"].as_array().expect("cases") {
        let name = case["case"].as_str().expect("case name");
        for dtype in case["dtypes"].as_array().expect("dtypes") {
            let dtype = dtype.as_str().expect("dtype");
            let format = match dtype {
                "f32" => FloatFormat::F32,
                "bf16" => FloatFormat::Bf16,
                _ => FloatFormat::F16,
            };
            let out_root = tempfile::tempdir().expect("tempdir");
            let out = out_root.path().join("merged");
            let base = root().join(case["base"].as_str().expect("base"));
            let mut args = vec![
                "merge".to_string(),
                "--quiet".into(),
                "--recipe".into(),
                "peft".into(),
                "--precision".into(),
                dtype.into(),
                "--out".into(),
                out.display().to_string(),
                "--base".into(),
                base.display().to_string(),
            ];
            for a in case["adapters"].as_array().expect("adapters") {
                args.push("--adapter".into());
                args.push(
                    root()
                        .join(a.as_str().expect("adapter"))
                        .display()
                        .to_string(),
                );
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let run_out = run(&refs);
            assert_eq!(code(&run_out), 0, "{name}/{dtype}: {}", stderr(&run_out));
            let ours = read_checkpoint(&out);
            let golden = lora_doctor::io::checkpoint::Checkpoint::open(
                &root().join(format!("fixtures/goldens/merge/{name}/{dtype}.safetensors")),
            )
            .expect("golden");
            let (mut total, mut differ, mut worst) = (0usize, 0usize, 0u64);
            for t in golden.tensors() {
                let want = golden.read_f32(&t.name).expect("golden tensor");
                let got = ours
                    .read_f32(&t.name)
                    .unwrap_or_else(|e| panic!("{name}/{dtype}: {e}"));
                assert_eq!(got.len(), want.len(), "{name}/{dtype} {}", t.name);
                for (g, w) in got.iter().zip(&want) {
                    let d = ulp_distance(*g, *w, format).unwrap_or(u64::MAX);
                    total += 1;
                    if d > 0 {
                        differ += 1;
                        worst = worst.max(d);
                    }
                }
            }
            let fraction = differ as f64 / total.max(1) as f64;
            report.push(format!(
                "{name}/{dtype}: {differ}/{total} differ ({fraction:.2e}), max {worst} ULP"
            ));
            assert!(worst <= 1, "{}", report.join("\n"));
            if format != FloatFormat::F32 {
                assert!(fraction < 1e-3, "{}", report.join("\n"));
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} golden merges checked");
    // Shown with `cargo test -- --nocapture`: the measured agreement per case.
    #[allow(clippy::disallowed_macros)]
    {
        eprintln!("{}", report.join("\n"));
    }
}

#[test]
fn merge_writes_a_loadable_sharded_folder_and_refuses_unsafe_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out_s = out.display().to_string();
    let args = [
        "merge",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--precision",
        "bf16",
        "--out",
        &out_s,
        "--max-shard-size",
        "100KB",
    ];
    let first = run(&args);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    for file in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("JSON");
    assert_eq!(config["torch_dtype"], "bfloat16");
    let merged = read_checkpoint(&out);
    let original = read_checkpoint(Path::new(&base));
    assert_eq!(merged.len(), original.len());
    assert!(merged.tensors().all(|t| t.dtype.name() == "BF16"));
    // Nothing left behind next to the output, and a second run refuses to overwrite.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
    assert_eq!(entries.len(), 1);
    let again = run(&args);
    assert_eq!(code(&again), 2);
    assert!(stderr(&again).contains("already exists"));
    // Inside an input folder, or a quantized "precision": refused before anything is read.
    let inside = format!("{adapter}/merged");
    let mut bad = args;
    bad[8] = &inside;
    let refused = run(&bad);
    assert_eq!(code(&refused), 2);
    assert!(stderr(&refused).contains("input folder"));
    assert!(!Path::new(&inside).exists());
    let q = run(&[
        "merge",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--precision",
        "q4_0",
        "--out",
        "/tmp/x",
    ]);
    assert_eq!(code(&q), 2);
}

#[test]
fn a_stack_merged_without_its_second_adapter_names_the_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let merge = |adapters: &[&str], name: &str| {
        let out = dir.path().join(name).display().to_string();
        let mut args = vec![
            "merge",
            "--base",
            "fixtures/models/tiny-llama",
            "--precision",
            "bf16",
        ];
        for a in adapters {
            args.extend_from_slice(&["--adapter", a]);
        }
        args.extend_from_slice(&["--out", &out]);
        let result = run(&args);
        assert_eq!(code(&result), 0, "{}", stderr(&result));
        out
    };
    let (sft, ppo) = (
        "fixtures/adapters/llama-stack-sft",
        "fixtures/adapters/llama-stack-ppo",
    );
    let both = merge(&[sft, ppo], "both");
    let sft_only = merge(&[sft], "sft-only");
    let check = |merged: &str| {
        check_json_with(
            "models/tiny-llama",
            &["adapters/llama-stack-sft", "adapters/llama-stack-ppo"],
            &["--merged", merged],
        )
    };
    let (exit, report) = check(&both);
    assert_eq!((exit, codes(&report)), (0, BTreeSet::new()));
    let (exit, report) = check(&sft_only);
    assert_eq!(exit, 1);
    assert_eq!(codes(&report), BTreeSet::from(["not-merged".to_string()]));
    let message = report["findings"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("llama-stack-ppo` was not merged") && message.contains("14 of 14"),
        "{message}"
    );
}

#[test]
fn an_adapter_folder_given_as_merged_is_named_as_such() {
    let (exit, report) = check_json_with(
        "models/micro-llama",
        &["adapters/micro-lora"],
        &["--merged", &fixture("adapters/micro-lora")],
    );
    assert_eq!(exit, 1);
    let inventory = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["code"] == "tensor-inventory")
        .expect("tensor-inventory");
    assert!(
        inventory["message"]
            .as_str()
            .is_some_and(|m| m.contains("it is an adapter folder")),
        "{inventory}"
    );
}

#[test]
fn merge_gate_failure_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let out_s = out.display().to_string();
    let result = run(&[
        "merge",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/exploded"),
        "--precision",
        "f16",
        "--out",
        &out_s,
        "--gate",
    ]);
    assert_eq!(code(&result), 1, "{}", stderr(&result));
    assert!(stderr(&result).contains("overflow"), "{}", stderr(&result));
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
}

#[test]
fn tied_head_is_written_untied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let out_s = out.display().to_string();
    let result = run(&[
        "merge",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/tied-head"),
        "--precision",
        "f32",
        "--out",
        &out_s,
    ]);
    assert_eq!(code(&result), 0, "{}", stderr(&result));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("JSON");
    assert_eq!(config["tie_word_embeddings"], false);
    let merged = read_checkpoint(&out);
    let head = merged
        .read_f32("lm_head.weight")
        .expect("an explicit lm_head");
    let embed = merged
        .read_f32("model.embed_tokens.weight")
        .expect("embedding");
    assert_ne!(
        head, embed,
        "the trained head must not overwrite the embedding"
    );
    let base = read_checkpoint(Path::new(&fixture("models/tiny-llama")));
    assert_eq!(
        embed,
        base.read_f32("model.embed_tokens.weight")
            .expect("base embedding")
    );
}

#[test]
fn csv_has_one_row_per_module_and_precision() {
    let out = run(&[
        "check",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/llama-lora"),
        "--precision",
        "bf16,q4_0,nf4",
        "--csv",
        "-",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).expect("utf-8");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    for column in [
        "module",
        "precision",
        "rel_error",
        "rounding_floor",
        "delta_retention",
        "delta_below_half_ulp",
        "snr_db",
        "out_of_range",
    ] {
        assert!(
            header.split(',').any(|c| c == column),
            "no `{column}` in {header}"
        );
    }
    // 14 target modules × 3 precisions; the summary went to stderr.
    assert_eq!(lines.count(), 14 * 3);
    assert!(stderr(&out).contains("verdict: PASS"));
}

/// Replaces every number with `#`, so text compares across CPUs whose f32 kernels round the
/// last bits differently.
fn without_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        let numeric = c.is_ascii_digit() || (in_number && matches!(c, '.' | 'e' | 'E' | '-' | '+'));
        if numeric {
            if !in_number {
                out.push('#');
            }
        } else {
            out.push(c);
        }
        in_number = numeric;
    }
    out
}

/// Numbers equal within a relative 1e-3 (absolute 1e-9), everything else exactly.
fn json_close(a: &Value, b: &Value, path: &str, diffs: &mut Vec<String>) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            if (x - y).abs() > 1e-9 + 1e-3 * x.abs().max(y.abs()) {
                diffs.push(format!("{path}: {x} vs {y}"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            if x.keys().ne(y.keys()) {
                diffs.push(format!("{path}: different keys"));
                return;
            }
            for (k, v) in x {
                if k == "tool_version" {
                    continue;
                }
                json_close(v, &y[k], &format!("{path}.{k}"), diffs);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_close(v, w, &format!("{path}[{i}]"), diffs);
            }
        }
        _ if a == b => {}
        _ => diffs.push(format!("{path}: {a} vs {b}")),
    }
}

/// reports/example is what the README's documented command writes; regenerate it with
/// `cargo run --release -- check --base fixtures/models/tiny-llama --adapter
/// fixtures/adapters/llama-lora --precision all --report-dir reports/example`.
#[test]
fn committed_example_report_matches_what_the_command_produces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("example");
    let out_s = out_dir.display().to_string();
    let result = run(&[
        "check",
        "--quiet",
        "--base",
        "fixtures/models/tiny-llama",
        "--adapter",
        "fixtures/adapters/llama-lora",
        "--precision",
        "all",
        "--report-dir",
        &out_s,
    ]);
    assert_eq!(code(&result), 0, "{}", stderr(&result));
    let committed = root().join("reports/example");
    let read = |d: &Path, f: &str| {
        std::fs::read_to_string(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let mut diffs = Vec::new();
    let fresh: Value = serde_json::from_str(&read(&out_dir, "report.json")).expect("JSON");
    let old: Value = serde_json::from_str(&read(&committed, "report.json")).expect("JSON");
    json_close(&fresh, &old, "report", &mut diffs);
    for file in ["layers.csv", "report.html", "summary.md", "junit.xml"] {
        let a = without_numbers(&read(&out_dir, file).replace(env!("CARGO_PKG_VERSION"), "V"));
        let b = without_numbers(&read(&committed, file).replace(env!("CARGO_PKG_VERSION"), "V"));
        if a != b {
            let line = a
                .lines()
                .zip(b.lines())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            diffs.push(format!("{file} differs from line {}", line + 1));
        }
    }
    assert!(
        diffs.is_empty(),
        "reports/example is stale; regenerate it (see the README):\n{}",
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An architecture without a forward pass cannot give the logit comparison that was asked for:
/// exit 2 naming the way out; with --weights-only the weight checks run and the report says why
/// logits were skipped.
#[test]
fn unknown_architecture_needs_weights_only_for_a_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("mystery-llama");
    std::fs::create_dir(&base).expect("mkdir");
    let src = root().join("fixtures/models/tiny-llama");
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(file), base.join(file)).expect("copy");
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("config"))
            .expect("JSON");
    config["model_type"] = Value::String("mystery".into());
    std::fs::write(base.join("config.json"), config.to_string()).expect("write config");
    let base_s = base.display().to_string();
    let adapter = fixture("adapters/llama-lora");
    let args = [
        "check",
        "--json",
        "-",
        "--base",
        &base_s,
        "--adapter",
        &adapter,
    ];
    let out = run(&args);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("mystery"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--weights-only"), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "no report for a check that could not run"
    );

    let mut weights_only = args.to_vec();
    weights_only.push("--weights-only");
    let out = run(&weights_only);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["logits_skipped"], "--weights-only");
    assert!(report["adapter_effect"].is_null());
    assert!(report["layers"].as_array().is_some_and(|l| !l.is_empty()));
    assert!(stderr(&out).contains("checked: structure, weights"));
}

/// The README's threshold table is the registry's, row for row (one source of truth per name).
#[test]
fn readme_threshold_table_is_the_registry() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let table = lora_doctor::findings::thresholds::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's threshold table differs from the registry; paste this:\n{table}"
    );
}
