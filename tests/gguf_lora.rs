//! llama.cpp LoRA adapters (`convert_lora_to_gguf.py` output) as `--adapter`: read as the PEFT
//! adapter they came from, merged as `llama-export-lora` merges them (goldens from the real tool),
//! and cross-checked against the PEFT folder beside them (`adapter-conversion`).

use std::path::Path;

use lora_doctor::io::adapter::{Adapter, TensorRole};
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::io::gguf;

use super::{code, fixture, run, stderr};

const PLAIN: &str = "adapters/gguf/llama-lora.f32.gguf";
const RSLORA: &str = "adapters/gguf-rslora/llama-rslora-patterns.f16.gguf";
/// `embed_tokens` + q/v: the converter stores token_embd's A transposed.
const EMBED: &str = "adapters/gguf-embed/llama-embed.f32.gguf";
const BASE: &str = "models/tiny-llama";
const GGUF_BASE: &str = "models/tiny-llama.f32.gguf";

fn heads() -> (usize, usize) {
    let config = ModelConfig::read_dir(Path::new(&fixture(BASE)))
        .expect("config")
        .expect("config.json");
    let n = config.num_attention_heads.expect("heads");
    (n, config.num_key_value_heads.unwrap_or(n))
}

#[test]
fn a_gguf_adapter_reads_as_the_peft_adapter_it_was_converted_from() {
    for (file, folder) in [
        (PLAIN, "adapters/llama-lora"),
        (EMBED, "adapters/gguf-embed"),
    ] {
        gguf_reads_as_peft(file, folder);
    }
}

fn gguf_reads_as_peft(file: &str, folder: &str) {
    let gguf = Adapter::open_any(Path::new(&fixture(file)), Some(heads())).expect("gguf adapter");
    let peft = Adapter::open(Path::new(&fixture(folder))).expect("peft adapter");
    assert!(gguf.is_gguf());
    let names = |a: &Adapter| a.modules.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&gguf), names(&peft));
    for (module, pm) in &peft.modules {
        let gm = &gguf.modules[module];
        assert_eq!(
            gguf.config.scaling_for(module).scale,
            peft.config.scaling_for(module).scale,
            "{module}: llama.cpp's alpha/r is PEFT's scale for a plain LoRA"
        );
        let embedding = pm.get(TensorRole::EmbeddingA).is_some();
        let roles = if embedding {
            [TensorRole::EmbeddingA, TensorRole::EmbeddingB]
        } else {
            [TensorRole::LoraA, TensorRole::LoraB]
        };
        for role in roles {
            let (g, p) = (gm.get(role).expect("gguf"), pm.get(role).expect("peft"));
            assert_eq!(g.info.shape, p.info.shape, "{module} {role:?}");
            // f32 conversion, q/k rows of B un-permuted, token_embd's Aᵀ transposed back:
            // bit-identical.
            assert_eq!(
                gguf.weights.read_f32(&g.key).expect("gguf"),
                peft.weights.read_f32(&p.key).expect("peft"),
                "{module} {role:?}"
            );
        }
    }
}

#[test]
fn merging_a_gguf_adapter_matches_llama_export_lora() {
    let dir = tempfile::tempdir().expect("tempdir");
    for adapter in [PLAIN, RSLORA, EMBED] {
        let file_name = Path::new(adapter)
            .file_name()
            .expect("name")
            .to_string_lossy();
        let out = dir.path().join(format!("merged-{file_name}"));
        let result = run(&[
            "merge",
            "--quiet",
            "--base",
            &fixture(GGUF_BASE),
            "--adapter",
            &fixture(adapter),
            "--precision",
            "f32",
            "--format",
            "gguf",
            "--out",
            &out.display().to_string(),
        ]);
        // The rsLoRA conversion is denied, but `merge` only refuses structural misfits: it
        // writes what llama.cpp would serve, as export-lora does.
        assert_eq!(code(&result), 0, "{adapter}: {}", stderr(&result));
        let ours = Checkpoint::open(&out).expect("our merge");
        let golden = Checkpoint::open(Path::new(&fixture(&format!(
            "goldens/gguf-lora/export-lora.{file_name}.safetensors"
        ))))
        .expect("golden");
        for t in golden.tensors() {
            let hf = gguf::names::llama_to_hf(&t.name).expect("mapped name");
            // Both in llama.cpp's row order: our raw F32 bytes against export-lora's tensor.
            let (info, bytes) = ours.raw(&hf).expect("tensor in our merge");
            assert_eq!(info.dtype.name(), "F32");
            let got: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            let want = golden.read_f32(&t.name).expect("golden");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // f32 rounding of W + s·BA accumulated in another order (export-lora: ggml f32).
            assert!(
                diff <= 1e-6 * scale,
                "{adapter} {}: {diff} of {scale}",
                t.name
            );
        }
    }
}

#[test]
fn check_with_a_gguf_adapter_measures_the_same_effect_as_its_peft_folder() {
    let extra = ["--generate", "0", "--max-tokens", "64"];
    let (gguf_code, gguf) = super::check_json_full(BASE, &[PLAIN], &extra);
    let (peft_code, peft) = super::check_json_full(BASE, &["adapters/llama-lora"], &extra);
    assert_eq!((gguf_code, peft_code), (0, 0));
    let effect = |r: &serde_json::Value| r["adapter_effect"]["mean_kl"].as_f64().expect("kl");
    let (a, b) = (effect(&gguf), effect(&peft));
    assert!((a - b).abs() <= 1e-9 + 1e-9 * b, "{a} vs {b}");
    assert!(super::codes(&gguf).is_empty(), "{:?}", super::codes(&gguf));
    // With an embedding LoRA on a tied model both find the same trap: a merge changes the head.
    let (gguf_code, gguf) = super::check_json_full(BASE, &[EMBED], &extra);
    let (peft_code, peft) = super::check_json_full(BASE, &["adapters/gguf-embed"], &extra);
    assert_eq!(gguf_code, peft_code);
    let (a, b) = (effect(&gguf), effect(&peft));
    assert!((a - b).abs() <= 1e-9 + 1e-9 * b, "{a} vs {b}");
    assert_eq!(super::codes(&gguf), super::codes(&peft));
    assert!(super::codes(&gguf).contains("tied-embeddings"));
}

#[test]
fn a_converted_rslora_adapter_is_denied_with_each_dropped_factor() {
    let (exit, report) =
        super::check_json_full(BASE, &[RSLORA], &["--generate", "0", "--max-tokens", "64"]);
    assert_eq!(exit, 1);
    let findings: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["code"] == "adapter-conversion")
        .collect();
    let mut factors: Vec<f64> = findings
        .iter()
        .map(|f| f["observed"].as_f64().expect("factor"))
        .collect();
    factors.sort_by(f64::total_cmp);
    // llama.cpp: lora_alpha/r with lora_alpha = 8; PEFT (rsLoRA): alpha/√r, v_proj alpha 32,
    // down_proj r = 4, layers.1 q_proj r = 2, the rest r = 8.
    let llama = |alpha: f64, r: f64| 8.0 / r / (alpha / r.sqrt());
    let mut want = vec![
        llama(32.0, 8.0),
        llama(8.0, 8.0),
        llama(8.0, 4.0),
        llama(8.0, 2.0),
    ];
    want.sort_by(f64::total_cmp);
    assert_eq!(factors.len(), want.len(), "{findings:?}");
    for (g, w) in factors.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "{factors:?} vs {want:?}");
    }
    assert!(findings.iter().all(|f| f["level"] == "deny"));
    // The adapter still fits its base: what llama.cpp serves was measured.
    let effect = report["adapter_effect"]["mean_kl"]
        .as_f64()
        .expect("effect measured");
    assert!(effect > 0.0);
}

#[test]
fn a_gguf_adapter_for_another_architecture_exits_2() {
    let result = run(&[
        "check",
        "--quiet",
        "--weights-only",
        "--base",
        &fixture("models/tiny-gpt2"),
        "--adapter",
        &fixture(PLAIN),
    ]);
    assert_eq!(code(&result), 2, "{}", stderr(&result));
    assert!(
        stderr(&result).contains("model arch and LoRA arch mismatch"),
        "{}",
        stderr(&result)
    );
}

#[test]
fn inspect_lists_a_gguf_adapter_with_the_scales_llama_cpp_applies() {
    let result = run(&["inspect", "--json", &fixture(RSLORA)]);
    assert_eq!(code(&result), 0, "{}", stderr(&result));
    let summary: serde_json::Value =
        serde_json::from_slice(&result.stdout).expect("inspect --json");
    let scale_of = |module: &str| {
        summary["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .find(|m| m["module"] == module)
            .and_then(|m| m["scale"].as_f64())
            .expect("module scale")
    };
    // alpha / rank per pair: rank_pattern survives the conversion, rsLoRA does not.
    assert_eq!(scale_of("model.layers.0.mlp.down_proj"), 2.0);
    assert_eq!(scale_of("model.layers.1.self_attn.q_proj"), 4.0);
    assert_eq!(scale_of("model.layers.0.self_attn.v_proj"), 1.0);
}
