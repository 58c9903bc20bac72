//! `check --merged`: broken merged checkpoints are caught and named by their cause.

use super::*;

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
pub(crate) fn merged_cases() -> Vec<(String, String, String, BTreeSet<String>)> {
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
