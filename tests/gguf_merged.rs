//! `check --merged model.gguf`: forensics of GGUF merges made by the real tools (llama-export-lora,
//! llama-quantize; `fixtures/gen/gguf_lora.py`), each tensor judged against the rounding floor of
//! the format it is stored in, and the GGUF's tokenizer metadata against the reference tokenizer.

use serde_json::Value;

const BASE: &str = "models/tiny-llama";

fn check_merged(adapter: &str, merged: &str) -> (i32, Value) {
    let merged = super::fixture(merged);
    super::check_json_full(
        BASE,
        &[adapter],
        &[
            "--merged",
            &merged,
            "--precision",
            "f32",
            "--generate",
            "0",
            "--max-tokens",
            "64",
        ],
    )
}

fn findings_of<'a>(report: &'a Value, code: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["code"] == code)
        .collect()
}

#[test]
fn a_faithful_merge_requantized_by_llama_quantize_sits_at_the_q8_0_floor() {
    let (exit, report) = check_merged(
        "adapters/llama-lora",
        "merged/gguf/export-lora.f32-base.q8_0.gguf",
    );
    assert_eq!(exit, 0, "{}", report["findings"]);
    let forensics = &report["forensics"];
    assert_eq!(forensics["dtype"], "q8_0");
    let modules = forensics["modules"].as_array().expect("modules");
    assert_eq!(modules.len(), 14);
    for m in modules {
        let ratio = m["residual_to_floor"].as_f64().expect("compared");
        // llama-quantize's x86 Q8_0 rounds like ggml's reference except on rare ties.
        assert!((0.9..=1.1).contains(&ratio), "{}: {ratio}", m["tensor"]);
        assert!(m["cause"].is_null(), "{m}");
    }
    assert_eq!(forensics["untouched"]["differing"], 0);
    assert!(
        forensics["inventory"]["not_float"]
            .as_array()
            .expect("list")
            .is_empty()
    );
    assert!(
        super::codes(&report).is_empty(),
        "{:?}",
        super::codes(&report)
    );
    // The file itself ran in the logit comparison, judged with the 8-bit thresholds.
    let merged = report["precisions"]
        .as_array()
        .expect("precisions")
        .iter()
        .find(|p| p["name"] == "merged")
        .expect("merged row");
    assert_eq!(merged["class"], "8bit");
    assert!(merged["logits"]["mean_kl"].as_f64().expect("kl") > 0.0);
}

#[test]
fn export_lora_onto_a_quantized_base_is_named_with_its_format() {
    let (exit, report) = check_merged(
        "adapters/llama-lora",
        "merged/gguf/export-lora.q8_0-base.gguf",
    );
    assert_eq!(exit, 0, "a warning, not a deny, at this quantization error");
    let found = findings_of(&report, "quantized-merge-base");
    assert_eq!(found.len(), 1, "{}", report["findings"]);
    let message = found[0]["message"].as_str().expect("message");
    assert!(message.contains("q8_0-dequantized base"), "{message}");
    assert!(message.contains("14 of 14"), "{message}");
}

#[test]
fn a_merge_through_a_converted_rslora_adapter_is_a_scale_mismatch_named_as_such() {
    let (exit, report) = check_merged(
        "adapters/llama-rslora-patterns",
        "merged/gguf/export-lora.rslora.gguf",
    );
    assert_eq!(exit, 1);
    let found = findings_of(&report, "scale-mismatch");
    assert_eq!(found.len(), 1, "{}", report["findings"]);
    let message = found[0]["message"].as_str().expect("message");
    assert!(message.contains("10 of 10"), "{message}");
    assert!(message.contains("llama.cpp GGUF adapter"), "{message}");
    // Fitted through llama.cpp's q/k permutation: every ŝ/s is llama.cpp's alpha/r over PEFT's s.
    for m in report["forensics"]["modules"].as_array().expect("modules") {
        let fitted = m["scale_ratio"].as_f64().expect("fitted");
        let s = m["expected_scale"].as_f64().expect("s");
        let module = m["module"].as_str().expect("module");
        let r = if module.ends_with("down_proj") {
            4.0
        } else if module == "model.layers.1.self_attn.q_proj" {
            2.0
        } else {
            8.0
        };
        let want = 8.0 / r / s;
        assert!(
            (fitted / want - 1.0).abs() < 1e-3,
            "{module}: {fitted} vs {want}"
        );
    }
}

/// Rewrites one string value of a GGUF's metadata in place (same length), into a temp copy.
fn patched(rel: &str, from: &str, to: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(super::fixture(rel)).expect("read");
    let needle = from.as_bytes();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("value present");
    bytes[at..at + needle.len()].copy_from_slice(to.as_bytes());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("patched.gguf");
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

#[test]
fn a_wrong_pre_tokenizer_in_the_gguf_is_config_drift() {
    let (_dir, path) = patched(
        "merged/gguf/export-lora.f32-base.q8_0.gguf",
        "gpt-2",
        "qwen2",
    );
    let (exit, report) = super::check_json_full(
        BASE,
        &["adapters/llama-lora"],
        &["--merged", &path.display().to_string(), "--weights-only"],
    );
    assert_eq!(exit, 0, "config drift warns");
    let drift = report["forensics"]["config_drift"]
        .as_array()
        .expect("drift");
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["key"], "tokenizer.ggml.pre");
    assert_eq!(drift[0]["expected"], "gpt-2");
    assert_eq!(drift[0]["found"], "qwen2");
    assert_eq!(findings_of(&report, "config-drift").len(), 1);
}
