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
    let file = root()
        .join("fixtures/goldens/arch_moe")
        .join(format!("{golden}.safetensors"));
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
            (Some("base"), None) => vec![(base.to_string(), None), (format!("{base}-fused"), None)],
            (Some("reference"), Some(a)) if a.ends_with("-expert") => vec![
                (base.to_string(), Some(a.to_string())),
                (format!("{base}-fused"), Some(a.to_string())),
            ],
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
            // NaN fails too.
            if diff.is_nan() || diff > LOGIT_TOLERANCE {
                failures.push(label);
            }
        }
    }
    assert!(table.len() >= 24, "{table:#?}");
    assert!(
        failures.is_empty(),
        "beyond {LOGIT_TOLERANCE}: {failures:?}\n{table:#?}"
    );
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

const FAMILIES: [&str; 3] = ["mixtral", "qwen2_moe", "qwen3_moe"];

/// One check: base, adapter, extra flags, exit code, the exact codes raised.
type CheckCase = (String, String, Vec<String>, i32, Vec<&'static str>);

/// The checks of one family.
fn check_cases(family: &str) -> Vec<CheckCase> {
    let base = format!("models/moe-{family}");
    let fused_base = format!("models/moe-{family}-fused");
    let adapter = |kind: &str| format!("adapters/moe-{family}-{kind}");
    let damaged = root()
        .join(format!("fixtures/models/moe-{family}-damaged-merged"))
        .display()
        .to_string();
    vec![
        // Good adapters pass on every layout they apply to, in a float and a 4-bit format.
        (base.clone(), adapter("expert"), vec![], 0, vec![]),
        (base.clone(), adapter("fused"), vec![], 0, vec![]),
        (base.clone(), adapter("fused-old"), vec![], 0, vec![]),
        (fused_base.clone(), adapter("fused"), vec![], 0, vec![]),
        (fused_base.clone(), adapter("fused-old"), vec![], 0, vec![]),
        (
            base.clone(),
            adapter("fused"),
            vec!["--precision".into(), "bf16,q8_0".into()],
            0,
            vec![],
        ),
        // Per-expert LoRA on a stacked base lands in its expert's rows.
        (fused_base, adapter("expert"), vec![], 0, vec![]),
        // A merge whose expert update is 40× too large flips routing (and everything else).
        (
            base,
            adapter("fused"),
            vec!["--merged".into(), damaged],
            1,
            vec![
                "effect-lost",
                "high-kl",
                "routing-flips",
                "scale-mismatch",
                "top1-disagreement",
            ],
        ),
    ]
}

/// Every code the MoE cases raise, for `finding_codes::every_code_is_raised_by_some_fixture`.
pub(crate) fn raised_codes() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| check_cases(f).into_iter().flat_map(|c| c.4))
        .collect()
}

#[test]
fn check_verdicts_and_codes_for_every_family_and_layout() {
    let mut failures = Vec::new();
    for family in FAMILIES {
        for (base, adapter, flags, want_exit, want_codes) in check_cases(family) {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let (exit, report) = check_json_full(&base, &[&adapter], &flags);
            let got = codes(&report);
            let want: BTreeSet<String> = want_codes.iter().map(|c| c.to_string()).collect();
            if exit != want_exit || got != want {
                failures.push(format!(
                    "{base} + {adapter} {flags:?}: exit {exit} (want {want_exit}), codes {got:?} (want {want:?})"
                ));
            }
            if want_exit == 0 {
                let checked = report["precisions"].as_array().expect("precisions");
                assert!(
                    checked.iter().all(|p| {
                        let routing = &p["logits"]["routing_by_layer"];
                        routing.as_array().is_some_and(|r| r.len() == 2)
                    }),
                    "{base} + {adapter}: every candidate has routing for both blocks"
                );
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The A/B layout of a wrapper without `peft_version` is decided by the shapes; when both layouts
/// fit (Mixtral here: 2I = H), the adapter is refused rather than merged by a guess.
#[test]
fn layout_without_peft_version_is_read_from_shapes_or_refused() {
    for (family, kind, want_exit) in [
        ("mixtral", "fused", 1),
        ("qwen2_moe", "fused", 0),
        ("qwen2_moe", "fused-old", 0),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = root().join(format!("fixtures/adapters/moe-{family}-{kind}"));
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(src.join(file), dir.path().join(file)).expect("copy");
        }
        let config_path = dir.path().join("adapter_config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read"))
                .expect("json");
        config
            .as_object_mut()
            .expect("object")
            .remove("peft_version");
        std::fs::write(&config_path, config.to_string()).expect("write");
        let base = fixture(&format!("models/moe-{family}"));
        let adapter = dir.path().display().to_string();
        let out = run(&[
            "check",
            "--json",
            "-",
            "--base",
            &base,
            "--adapter",
            &adapter,
        ]);
        let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(code(&out), want_exit, "{family} {kind}: {}", stderr(&out));
        let got = codes(&report);
        if want_exit == 1 {
            assert_eq!(
                got,
                BTreeSet::from(["shape-mismatch".to_string()]),
                "{family}"
            );
            let message = report["findings"][0]["message"].as_str().expect("message");
            assert!(message.contains("peft_version"), "{message}");
        } else {
            assert!(got.is_empty(), "{family} {kind}: {got:?}");
        }
    }
}

/// `merge` writes a checkpoint whose logits are transformers' of PEFT's `merge_and_unload()`
/// (f32), from either base layout; a stacked base keeps its 3-D expert tensors.
#[test]
fn merged_checkpoints_match_peft_merge_and_unload() {
    let doc = cases();
    let tokens = token_ids(&doc);
    for family in FAMILIES {
        for layout in ["", "-fused"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let out_dir = root()
                .join("fixtures/models")
                .join(format!("moe-{family}{layout}"));
            let merged = dir.path().join("merged");
            let adapter = fixture(&format!("adapters/moe-{family}-fused"));
            let out = run(&[
                "merge",
                "--quiet",
                "--precision",
                "f32",
                "--base",
                &out_dir.display().to_string(),
                "--adapter",
                &adapter,
                "--out",
                &merged.display().to_string(),
            ]);
            assert_eq!(code(&out), 0, "{family}{layout}: {}", stderr(&out));
            let checkpoint = Checkpoint::open(&merged).expect("merged checkpoint");
            if layout == "-fused" {
                let info = checkpoint
                    .info("model.layers.0.mlp.experts.gate_up_proj")
                    .expect("stacked tensor written");
                assert_eq!(info.shape.len(), 3, "{family}: {:?}", info.shape);
            }
            let config = ModelConfig::read_dir(&merged)
                .expect("config")
                .expect("config.json");
            let provider = CheckpointProvider::base(&checkpoint);
            let arch = Architecture::from_config(&config, &|n| provider.has(n)).expect("arch");
            let got = arch
                .forward(&provider, &tokens)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("logits");
            let golden = root().join(format!(
                "fixtures/goldens/arch_moe/moe-{family}-fused-merged.safetensors"
            ));
            let want = Checkpoint::open_file(&golden)
                .expect("golden")
                .read_f32("logits")
                .expect("logits");
            let diff = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0, f32::max);
            assert!(
                diff <= LOGIT_TOLERANCE,
                "{family}{layout}: max |Δlogit| {diff:.2e}"
            );
            // The forensics of `--merged` accept the checkpoint (stacked tensors in their 3-D shape).
            let merged_s = merged.display().to_string();
            let (exit, report) = check_json_full(
                &format!("models/moe-{family}{layout}"),
                &[&format!("adapters/moe-{family}-fused")],
                &["--weights-only", "--merged", &merged_s],
            );
            assert_eq!(
                (exit, codes(&report)),
                (0, BTreeSet::new()),
                "{family}{layout}: check --merged of our own merge"
            );
        }
    }
}

/// Largest relative gap of a KL statistic to transformers + PEFT's.
const KL_RELATIVE: f64 = 0.02;

/// `check`'s KL of the base and of the bf16 merge against the unmerged reference, over its own
/// evaluation tokens, within 2 % of transformers + PEFT's (goldens `kl` in cases.json).
#[test]
fn kl_statistics_match_transformers() {
    let doc = cases();
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in doc["kl"].as_array().expect("kl cases") {
        let base = format!("models/{}", case["base"].as_str().expect("base"));
        let adapter = format!("adapters/{}", case["adapter"].as_str().expect("adapter"));
        let (exit, report) = check_json_full(&base, &[&adapter], &["--precision", "bf16"]);
        assert_eq!(exit, 0, "{base} + {adapter}");
        assert_eq!(
            report["adapter_effect"]["tokens"].as_u64(),
            case["tokens"].as_u64(),
            "{base}: the same evaluation tokens"
        );
        let bf16 = report["precisions"]
            .as_array()
            .expect("precisions")
            .iter()
            .find(|p| p["name"] == "bf16")
            .expect("bf16 evaluated");
        for (label, ours, theirs) in [
            (
                "base",
                &report["adapter_effect"]["mean_kl"],
                &case["models"]["base"]["mean_kl"],
            ),
            (
                "bf16",
                &bf16["logits"]["mean_kl"],
                &case["models"]["bf16"]["mean_kl"],
            ),
            (
                "bf16 same-top1",
                &bf16["logits"]["same_top1"],
                &case["models"]["bf16"]["same_top1"],
            ),
        ] {
            let (ours, theirs) = (
                ours.as_f64().expect("ours"),
                theirs.as_f64().expect("theirs"),
            );
            let rel = (ours / theirs - 1.0).abs();
            table.push(format!(
                "{base} {label:15} ours {ours:.4e} transformers {theirs:.4e} ({:.2}%)",
                rel * 100.0
            ));
            if rel.is_nan() || rel > KL_RELATIVE {
                failures.push(table.last().cloned().unwrap_or_default());
            }
        }
    }
    assert!(failures.is_empty(), "beyond 2 %: {failures:#?}\n{table:#?}");
    assert!(table.len() >= 9, "{table:#?}");
}
