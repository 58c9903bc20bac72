//! Issue 13 §3 through the CLI: a K-quant mix and single ggml types as `--precision` rows,
//! checked against an expectation built outside the engine — the type the real llama-quantize
//! chose for the tensor (`fixtures/goldens/kquant/mix.json`), quantized by the ggml quantizers
//! that the C goldens pin, applied to W* = W + s·B·A computed here.

use std::path::Path;

use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::merge::ggml::{self, GgmlType};
use serde_json::Value;

use super::{check_json_full, fixture, root};

/// `rel_error` of the ggml type `ty` for one module of tiny-llama + llama-lora: ‖dequant(q(W*)) −
/// W*‖ / ‖ΔW‖ with W* merged in f64 here (r = 8, alpha = 16, so s = 2).
fn expected_rel_error(module: &str, ty: GgmlType) -> f64 {
    let base = Checkpoint::open(Path::new(&fixture("models/tiny-llama"))).expect("base opens");
    let adapter =
        Checkpoint::open(Path::new(&fixture("adapters/llama-lora"))).expect("adapter opens");
    let w = base.read_f32(&format!("{module}.weight")).expect("W");
    let a = adapter
        .read_f32(&format!("base_model.model.{module}.lora_A.weight"))
        .expect("A");
    let b = adapter
        .read_f32(&format!("base_model.model.{module}.lora_B.weight"))
        .expect("B");
    let (r, scale) = (8, 2.0f64);
    let cols = a.len() / r;
    let rows = b.len() / r;
    assert_eq!(w.len(), rows * cols, "{module}: shapes");
    let mut delta = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let dot: f64 = (0..r)
                .map(|k| f64::from(b[i * r + k]) * f64::from(a[k * cols + j]))
                .sum();
            delta[i * cols + j] = scale * dot;
        }
    }
    let wstar: Vec<f64> = w
        .iter()
        .zip(&delta)
        .map(|(w, d)| f64::from(*w) + d)
        .collect();
    let star32: Vec<f32> = wstar.iter().map(|v| *v as f32).collect();
    let candidate = ggml::dequantize(
        ty,
        &ggml::quantize(ty, &star32).expect("quantizes"),
        star32.len(),
    )
    .expect("dequantizes");
    let err: f64 = candidate
        .iter()
        .zip(&wstar)
        .map(|(c, s)| (f64::from(*c) - s).powi(2))
        .sum();
    let norm: f64 = delta.iter().map(|d| d * d).sum();
    (err / norm).sqrt()
}

/// The type llama-quantize wrote for `tensor` of tiny-llama under `mix` (the golden table).
fn llama_quantize_type(tensor: &str, mix: &str) -> GgmlType {
    let path = root().join("fixtures/goldens/kquant/mix.json");
    let table: Value =
        serde_json::from_slice(&std::fs::read(path).expect("mix.json")).expect("JSON");
    let name = table["tiny-llama"]["tensors"][tensor]["types"][mix]
        .as_str()
        .unwrap_or_else(|| panic!("no golden type for {tensor} under {mix}"));
    (0..64)
        .map(GgmlType::from_id)
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn k_quant_rows_equal_the_real_llama_quantize_choice_quantized_independently() {
    let (exit, report) = check_json_full(
        "models/tiny-llama",
        &["adapters/llama-lora"],
        &[
            "--precision",
            "q4_k_m,q6_k,q5_0",
            "--max-tokens",
            "32",
            "--generate",
            "0",
        ],
    );
    assert_eq!(exit, 0, "{}", report["findings"]);
    let names: Vec<&str> = report["precisions"]
        .as_array()
        .expect("precisions")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["q4_k_m", "q6_k", "q5_0"]);
    for p in report["precisions"].as_array().expect("precisions") {
        let kl = p["logits"]["mean_kl"]
            .as_f64()
            .expect("a logit comparison ran");
        assert!(kl > 0.0 && kl < 0.1, "{}: mean KL {kl}", p["name"]);
        assert!(
            p["unmerged_logits"]["mean_kl"].as_f64().is_some(),
            "{}: the +lora row exists",
            p["name"]
        );
    }
    let rows = report["layers"].as_array().expect("layers");
    // layer 0 v_proj: q4_k_m keeps Q4_K there (not a use-more-bits layer) and falls back to Q5_0
    // for rows of 64; layer 1 down_proj is a use-more-bits layer: Q6_K, falling back to Q8_0.
    let cases = [
        ("model.layers.0.self_attn.v_proj", "q4_k_m"),
        ("model.layers.1.mlp.down_proj", "q4_k_m"),
        ("model.layers.1.self_attn.v_proj", "q4_k_m"),
        ("model.layers.0.mlp.up_proj", "q5_0"),
        ("model.layers.0.mlp.up_proj", "q6_k"),
    ];
    let mut types = Vec::new();
    for (module, precision) in cases {
        let ty = match precision {
            "q5_0" => GgmlType::Q5_0,
            // q6_k is "every tensor Q6_K": llama-quantize's fallback for 64-wide rows is Q8_0,
            // the type it wrote for the Q6_K-chosen output-like tensors in the golden table.
            "q6_k" => llama_quantize_type("model.embed_tokens.weight", "q4_k_m"),
            mix => llama_quantize_type(&format!("{module}.weight"), mix),
        };
        types.push(ty);
        let row = rows
            .iter()
            .find(|r| r["module"] == module && r["precision"] == precision)
            .unwrap_or_else(|| panic!("no row {module} {precision}"));
        let got = row["rel_error"].as_f64().expect("rel_error");
        let want = expected_rel_error(module, ty);
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "{module} {precision} ({ty}): report {got}, independent {want}"
        );
    }
    assert_eq!(
        types,
        [
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q8_0
        ],
        "the golden types this test relies on"
    );
}

/// A mix needs the layer count from config.json; a single-file base without one cannot be
/// quantized by rule, so the run stops with exit 2 naming the mix instead of guessing.
#[test]
fn a_mix_without_a_model_config_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("model.safetensors");
    std::fs::copy(
        root().join("fixtures/models/tiny-llama/model.safetensors"),
        &single,
    )
    .expect("copy");
    let single = single.display().to_string();
    let adapter = fixture("adapters/llama-lora");
    let out = super::run(&[
        "check",
        "--quiet",
        "--weights-only",
        "--base",
        &single,
        "--adapter",
        &adapter,
        "--precision",
        "q4_k_m",
    ]);
    let err = super::stderr(&out);
    assert_eq!(super::code(&out), 2, "{err}");
    assert!(
        err.contains("q4_k_m") && err.contains("num_hidden_layers"),
        "{err}"
    );
}

/// `--trained-on` names one type the base was stored in; a mix is refused before any work.
#[test]
fn trained_on_refuses_a_mix() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out = super::run(&[
        "check",
        "--quiet",
        "--weights-only",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--trained-on",
        "q4_k_m",
    ]);
    let err = super::stderr(&out);
    assert_eq!(super::code(&out), 2, "{err}");
    assert!(err.contains("--trained-on") && err.contains("mix"), "{err}");
}
