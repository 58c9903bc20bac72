//! Mixture-of-experts models end to end against transformers + PEFT (`fixtures/gen/arch_moe.py`):
//! Mixtral, Qwen2-MoE and Qwen3-MoE in the per-expert and the fused (transformers 5.x) layout, with
//! per-expert adapters and PEFT `target_parameters` adapters in both A/B layouts — logits within
//! 1e-4, greedy generations identical, `check` verdicts, and the routing-flip finding on a damaged
//! merge.

use std::path::Path;

use lora_doctor::io::adapter::Adapter;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::merge::engine::MergePlan;
use lora_doctor::model::{Architecture, CheckpointProvider, WeightProvider, generate_greedy};
use serde_json::Value;

use super::*;

/// New tokens the generation goldens ask for (`GEN_NEW` in arch_moe.py); fewer when eos came.
const GENERATED: usize = 12;

/// Largest |Δlogit| accepted against transformers (f32 on both sides, different summation order).
const LOGIT_TOLERANCE: f32 = 1e-4;

fn cases() -> Value {
    let path = root().join("fixtures/goldens/arch_moe/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read cases.json")).expect("parse")
}

fn token_ids(doc: &Value) -> Vec<u32> {
    doc["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

/// Runs `f` on the architecture and the reference provider (adapters unmerged) of `base` + `adapter`.
fn with_model<R>(
    base: &str,
    adapter: Option<&str>,
    f: impl FnOnce(&Architecture, &dyn WeightProvider) -> R,
) -> R {
    let base_dir = root().join("fixtures/models").join(base);
    let checkpoint = Checkpoint::open(&base_dir).expect("open base");
    let config = ModelConfig::read_dir(&base_dir)
        .expect("config")
        .expect("config.json");
    let adapters: Vec<Adapter> = adapter
        .map(|a| Adapter::open(&root().join("fixtures/adapters").join(a)).expect("adapter"))
        .into_iter()
        .collect();
    let plan = MergePlan::build(&checkpoint, Some(&config), &adapters).expect("plan");
    let provider = CheckpointProvider::with_adapters(&checkpoint, &adapters, &plan);
    let arch = Architecture::from_config(&config, &|n| provider.has(n))
        .unwrap_or_else(|e| panic!("{base}: unsupported: {e}"));
    f(&arch, &provider)
}

fn max_diff(base: &str, adapter: Option<&str>, golden: &str, tokens: &[u32]) -> f32 {
    let got = with_model(base, adapter, |arch, w| {
        arch.forward(w, tokens)
            .expect("forward")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("logits")
    });
    let file = root().join("fixtures/goldens/arch_moe").join(format!("{golden}.safetensors"));
    let want = Checkpoint::open_file(Path::new(&file))
        .expect("golden")
        .read_f32("logits")
        .expect("logits");
    assert_eq!(got.len(), want.len(), "{golden}: logit count");
    got.iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

/// Base models in both layouts, and the unmerged reference of every adapter on every layout it
/// applies to, match transformers (+ PEFT) within 1e-4 at every position.
#[test]
fn logits_match_transformers_in_every_layout() {
    let doc = cases();
    let tokens = token_ids(&doc);
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let base = case["base"].as_str().expect("base");
        let adapter = case["adapter"].as_str();
        let runs: Vec<(String, Option<String>)> = match (case["kind"].as_str(), adapter) {
            (Some("base"), None) => vec![
                (base.to_string(), None),
                (format!("{base}-fused"), None),
            ],
            (Some("reference"), Some(a)) if a.ends_with("-expert") => {
                vec![(base.to_string(), Some(a.to_string()))]
            }
            (Some("reference"), Some(a)) => vec![
                (base.to_string(), Some(a.to_string())),
                (base.to_string(), Some(format!("{a}-old"))),
                (format!("{base}-fused"), Some(a.to_string())),
                (format!("{base}-fused"), Some(format!("{a}-old"))),
            ],
            _ => continue,
        };
        for (base, adapter) in runs {
            let diff = max_diff(&base, adapter.as_deref(), name, &tokens);
            let label = format!("{name} on {base} + {adapter:?}");
            table.push(format!("{label:70} max |Δlogit| {diff:.2e}"));
            if !(diff <= LOGIT_TOLERANCE) {
                failures.push(label);
            }
        }
    }
    assert!(table.len() >= 9, "{table:#?}");
    assert!(failures.is_empty(), "beyond {LOGIT_TOLERANCE}: {failures:?}\n{table:#?}");
}

/// Greedy continuations of the unmerged reference equal transformers' `generate`.
#[test]
fn greedy_generation_matches_transformers() {
    let doc = cases();
    for entry in doc["generation"].as_array().expect("generation") {
        let base = entry["base"].as_str().expect("base");
        let adapter = entry["adapter"].as_str().expect("adapter");
        let ids = |key: &str| -> Vec<u32> {
            entry[key]
                .as_array()
                .expect("ids")
                .iter()
                .map(|t| t.as_u64().expect("id") as u32)
                .collect()
        };
        let (prompt, want, eos) = (ids("prompt"), ids("generated"), ids("eos"));
        let got = with_model(base, Some(adapter), |arch, w| {
            generate_greedy(arch, w, &prompt, GENERATED, &eos).expect("generate")
        });
        assert_eq!(got, want, "{base} + {adapter}");
    }
}
