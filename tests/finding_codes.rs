//! Every fixture raises exactly the finding codes of its case: the weight, structure and
//! logit tables, and every code is raised by some fixture.

use super::*;
use crate::merged::merged_cases;

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
    // A llama.cpp GGUF adapter applies what PEFT applies for a plain LoRA…
    (
        "models/tiny-llama",
        &["adapters/gguf/llama-lora.f32.gguf"],
        0,
        &[],
    ),
    // …but not for rsLoRA with an alpha_pattern (the PEFT folder lies beside it).
    (
        "models/tiny-llama",
        &["adapters/gguf-rslora/llama-rslora-patterns.f16.gguf"],
        1,
        &["adapter-conversion"],
    ),
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
        .chain(crate::arch_moe::raised_codes())
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
