//! `merge`: PEFT-identical merged checkpoints, safe outputs, the gate, untied heads.

use super::*;

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

/// The merge decides Conv1D layout from `model_type` (io::mapping), the forward pass from its
/// architecture: they must agree for every architecture with a forward pass, or a GPT-2 update
/// would be merged transposed relative to how the model reads it.
#[test]
fn merge_and_forward_agree_on_which_models_store_conv1d() {
    use lora_doctor::io::config::ModelConfig;
    use lora_doctor::io::mapping::stores_conv1d;
    use lora_doctor::model::Architecture;
    for model in [
        "tiny-llama",
        "tiny-gpt2",
        "tiny-neox",
        "tiny-gemma",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-phi3",
    ] {
        let dir = root().join("fixtures/models").join(model);
        let config = ModelConfig::read_dir(&dir)
            .expect("config.json parses")
            .expect("config.json exists");
        let checkpoint = read_checkpoint(&dir);
        let arch = Architecture::from_config(&config, &|name| checkpoint.contains(name))
            .unwrap_or_else(|e| panic!("{model}: {e:?}"));
        let model_type = config.model_type.as_deref().expect("model_type");
        assert_eq!(arch.conv1d(), stores_conv1d(model_type), "{model}");
    }
}
