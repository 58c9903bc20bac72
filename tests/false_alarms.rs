//! Issue 17, "no false alarms on mainstream adapters": added tokens and trained tied heads are
//! merged and compared instead of denied, a tokenizer beyond every row the merge can produce is
//! still denied, `delta-outlier` needs a large ratio to the median as well as a large z-score, and
//! a QLoRA adapter's effect is measured against the quantized base it trained on.

use std::path::Path;

use serde_json::Value;

use super::{check_json_full, code, fixture, read_checkpoint, run, stderr};

/// The finding with `code` in a report, or a panic naming what was raised.
fn finding<'a>(report: &'a Value, code: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["code"] == code)
        .unwrap_or_else(|| panic!("no `{code}` in {}", report["findings"]))
}

#[test]
fn added_tokens_are_merged_and_compared_in_every_precision() {
    let (exit, report) = check_json_full(
        "models/tiny-llama",
        &["adapters/added-tokens"],
        &[
            "--precision",
            "all",
            "--max-tokens",
            "64",
            "--generate",
            "0",
        ],
    );
    assert_eq!(exit, 0, "{}", report["findings"]);
    let codes = super::codes(&report);
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        ["tied-embeddings"],
        "{}",
        report["findings"]
    );
    // The head is trained apart from the embedding: merged untied, which is faithful, so the
    // finding warns about configs and loaders that re-tie it instead of denying the adapter.
    let tied = finding(&report, "tied-embeddings");
    assert_eq!(tied["level"], "warn");
    assert!(
        tied["message"]
            .as_str()
            .is_some_and(|m| m.contains("re-ties")),
        "{tied}"
    );
    assert!(
        report["adapter_effect"]["mean_kl"]
            .as_f64()
            .expect("effect")
            > 0.1
    );
    let precisions = report["precisions"].as_array().expect("precisions");
    assert_eq!(precisions.len(), 9);
    for p in precisions {
        let kl = p["logits"]["mean_kl"].as_f64().expect("logits ran");
        assert!(kl.is_finite() && kl >= 0.0, "{}: {kl}", p["name"]);
    }
    // The embedding grows from 320 to 322 rows; its base rows come from the adapter's
    // original_module, so the only change the statistics see is the training.
    let layers = report["layers"].as_array().expect("layers");
    let embed = layers
        .iter()
        .find(|l| l["module"] == "model.embed_tokens" && l["precision"] == "f32")
        .expect("the embedding is a merged module");
    assert_eq!(embed["numel"], 322 * 64);
}

#[test]
fn added_tokens_merge_writes_the_resized_vocabulary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let out_s = out.display().to_string();
    let result = run(&[
        "merge",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/added-tokens"),
        "--precision",
        "f32",
        "--out",
        &out_s,
    ]);
    assert_eq!(code(&result), 0, "{}", stderr(&result));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("JSON");
    assert_eq!(config["vocab_size"], 322);
    assert_eq!(config["tie_word_embeddings"], false);
    let merged = read_checkpoint(&out);
    let adapter = read_checkpoint(Path::new(&fixture(
        "adapters/added-tokens/adapter_model.safetensors",
    )));
    let saved = |key: &str| {
        adapter
            .read_f32(&format!("base_model.model.{key}"))
            .expect("adapter tensor")
    };
    // The merged embedding is the adapter's trained copy; the head keeps the untrained resized
    // matrix PEFT tied it to, as in the unmerged model.
    assert_eq!(
        merged
            .read_f32("model.embed_tokens.weight")
            .expect("embedding"),
        saved("model.embed_tokens.weight")
    );
    assert_eq!(
        merged.read_f32("lm_head.weight").expect("an explicit head"),
        saved("lm_head.weight")
    );
    let tokenizer = std::fs::read_to_string(out.join("tokenizer.json")).expect("tokenizer");
    assert!(
        tokenizer.contains("<tool_call>"),
        "the adapter's tokenizer ships"
    );
}

#[test]
fn a_tokenizer_beyond_every_row_is_a_vocab_mismatch() {
    let (exit, report) = check_json_full(
        "models/tiny-llama",
        &["adapters/added-tokens-lora-only"],
        &["--weights-only"],
    );
    assert_eq!(exit, 1);
    let vocab = finding(&report, "vocab-mismatch");
    assert_eq!(vocab["level"], "deny");
    let message = vocab["message"].as_str().expect("message");
    assert!(message.contains("ids up to 321"), "{message}");
    assert!(message.contains("320"), "{message}");
    assert!(report["precisions"].is_null(), "nothing is merged");
}

#[test]
fn a_trained_tied_head_is_judged_untied() {
    let (exit, report) = check_json_full(
        "models/tiny-llama",
        &["adapters/tied-head"],
        &[
            "--precision",
            "bf16",
            "--max-tokens",
            "64",
            "--generate",
            "0",
        ],
    );
    assert_eq!(exit, 0, "{}", report["findings"]);
    assert_eq!(finding(&report, "tied-embeddings")["level"], "warn");
    let bf16 = &report["precisions"][0]["logits"];
    assert!(
        bf16["mean_kl"].as_f64().expect("logits") < 1e-3,
        "the untied bf16 merge is faithful: {bf16}"
    );
}

#[test]
fn delta_outlier_needs_a_large_ratio_as_well_as_a_large_z() {
    let outliers = |flags: &[&str]| {
        let mut all = vec!["--weights-only", "--precision", "f32"];
        all.extend_from_slice(flags);
        let (_, report) =
            check_json_full("models/tiny-llama-deep", &["adapters/deep-outlier"], &all);
        report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter(|f| f["code"] == "delta-outlier")
            .map(|f| f["module"].as_str().expect("module").to_string())
            .collect::<Vec<_>>()
    };
    // The ×50 module is far beyond both limits.
    assert_eq!(outliers(&[]), ["model.layers.3.self_attn.v_proj"]);
    // A ratio limit above its 50× spread silences it: the ratio is enforced, not only reported.
    assert!(outliers(&["--threshold", "outlier-ratio=100"]).is_empty());
    assert_eq!(
        outliers(&["--threshold", "outlier-ratio=1"]),
        outliers(&[]),
        "with the ratio off, the z-score alone decides"
    );
}

#[test]
fn qlora_effect_is_measured_against_the_quantized_base() {
    let (_, report) = check_json_full(
        "models/tiny-llama",
        &["adapters/qlora-nf4"],
        &[
            "--trained-on",
            "nf4",
            "--precision",
            "bf16",
            "--generate",
            "0",
        ],
    );
    let effect = &report["adapter_effect"];
    let own = effect["mean_kl"].as_f64().expect("effect");
    let shift = effect["quantization_shift_kl"]
        .as_f64()
        .expect("the shift is reported with --trained-on");
    assert!(own > 0.0 && shift > 0.0, "{effect}");
    assert_ne!(own, shift, "two different bases");
    let logits = &report["precisions"][0]["logits"];
    let lost = logits["effect_lost"].as_f64().expect("effect lost");
    let kl = logits["mean_kl"].as_f64().expect("kl");
    assert!(
        (lost - kl / own).abs() <= 1e-9 * lost.abs().max(1.0),
        "effect lost divides by the adapter's own effect: {lost} vs {kl}/{own}"
    );
}

#[test]
fn the_quantization_shift_is_shown_in_terminal_and_html() {
    let dir = tempfile::tempdir().expect("tempdir");
    let html = dir.path().join("report.html");
    let html_s = html.display().to_string();
    let (base, adapter) = (fixture("models/tiny-llama"), fixture("adapters/qlora-nf4"));
    let args = [
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--trained-on",
        "nf4",
        "--precision",
        "bf16",
        "--max-tokens",
        "32",
        "--generate",
        "0",
        "--html",
        &html_s,
    ];
    let out = run(&args);
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(
        terminal.contains("base = dequant(nf4(W))") && terminal.contains("quantization shift"),
        "{terminal}"
    );
    let page = std::fs::read_to_string(&html).expect("html written");
    assert!(
        page.contains("dequant(nf4(W))") && page.contains("quantization shift"),
        "the HTML report names the shift"
    );
    // Without --trained-on there is no shift to report.
    let plain = run(&args[..args.len() - 2]
        .iter()
        .copied()
        .filter(|a| *a != "--trained-on" && *a != "nf4")
        .collect::<Vec<_>>());
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("quantization shift"));
}
