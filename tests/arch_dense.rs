//! Gemma 1, Gemma 2, Gemma 3 (text) and Phi-3 end to end (issue 15), against the goldens of
//! `fixtures/gen/arch_dense.py` (transformers + PEFT on tiny trained models): the base, unmerged and
//! merged logits, greedy generation, the KL statistics `check` reports, `check` in every precision,
//! `check --merged` on a faithful and on a broken merge, and the finding codes that apply.

use super::*;
use lora_doctor::io::adapter::Adapter;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::merge::engine::MergePlan;
use lora_doctor::model::{
    Architecture, CheckpointProvider, MaterializedModel, WeightProvider, generate_greedy,
    sequence_nll,
};

/// Logits against transformers + PEFT (issue 15).
const LOGIT_TOLERANCE: f32 = 1e-4;
/// Per-token negative log-likelihood of a generated token, nats (from logits within 1e-4).
const NLL_TOLERANCE: f64 = 2e-4;
/// KL statistics against PyTorch's, relative (issue 4's tolerance).
const KL_RELATIVE: f64 = 0.02;

fn cases() -> Value {
    let text = std::fs::read_to_string(root().join("fixtures/goldens/arch_dense/cases.json"))
        .expect("arch_dense cases.json");
    serde_json::from_str(&text).expect("cases.json is JSON")
}

fn families(doc: &Value) -> &Vec<Value> {
    let families = doc["families"].as_array().expect("families");
    let names: Vec<&str> = families
        .iter()
        .map(|f| f["family"].as_str().expect("family"))
        .collect();
    assert_eq!(names, ["gemma2", "phi3", "gemma3", "gemma"]);
    families
}

fn token_list(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("token list")
        .iter()
        .map(|t| t.as_u64().expect("token id") as u32)
        .collect()
}

/// One family's base, config, adapter and merge plan.
struct Family {
    name: String,
    base: Checkpoint,
    config: ModelConfig,
    adapters: Vec<Adapter>,
}

impl Family {
    fn open(family: &Value) -> Self {
        let base_dir = root().join(family["base"].as_str().expect("base"));
        Family {
            name: family["family"].as_str().expect("family").to_string(),
            base: Checkpoint::open(&base_dir).expect("base opens"),
            config: ModelConfig::read_dir(&base_dir)
                .expect("config reads")
                .expect("config.json"),
            adapters: vec![
                Adapter::open(&root().join(family["adapter"].as_str().expect("adapter")))
                    .expect("adapter opens"),
            ],
        }
    }

    fn arch(&self, base: &Checkpoint) -> Architecture {
        Architecture::from_config(&self.config, &|n| base.contains(n))
            .unwrap_or_else(|e| panic!("{}: no forward: {e}", self.name))
    }

    fn plan(&self) -> MergePlan {
        MergePlan::build(&self.base, Some(&self.config), &self.adapters).expect("merge plan")
    }
}

/// The strided columns (ids 0, step, 2·step, …) of `[T, vocab]` logits, flattened.
fn strided(logits: &candle_core::Tensor, step: usize) -> Vec<f32> {
    logits
        .to_vec2::<f32>()
        .expect("logits")
        .iter()
        .flat_map(|row| row.iter().step_by(step).copied().collect::<Vec<_>>())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `lora-doctor merge` of a family's adapter (`--recipe recipe`), written to a temporary folder.
fn merged_by_us(family: &Value, precision: &str, recipe: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let base = fixture_path(family["base"].as_str().expect("base"));
    let adapter = fixture_path(family["adapter"].as_str().expect("adapter"));
    let result = run(&[
        "merge",
        "--quiet",
        "--recipe",
        recipe,
        "--precision",
        precision,
        "--out",
        &out.display().to_string(),
        "--base",
        &base,
        "--adapter",
        &adapter,
    ]);
    assert_eq!(code(&result), 0, "merge: {}", stderr(&result));
    dir
}

/// A repository-relative path (`fixtures/...`) as an absolute one.
fn fixture_path(rel: &str) -> String {
    root().join(rel).display().to_string()
}

/// The base alone, the base with the adapter unmerged (PEFT's forward) and lora-doctor's own f32
/// merge (`merge --precision f32`, read back) reproduce transformers' logits at every position:
/// Gemma's scaled embeddings, (1 + w) norms, sandwich norms, soft-caps that bite, alternating
/// sliding windows and local/global rope; Phi-3's fused projections and LongRoPE past the
/// pretraining length.
#[test]
fn logits_match_transformers_and_peft() {
    let doc = cases();
    let tokens = token_list(&doc["tokens"]);
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for family in families(&doc) {
        let f = Family::open(family);
        let step = family["column_step"].as_u64().expect("column_step") as usize;
        let golden = Checkpoint::open(&root().join(family["file"].as_str().expect("file")))
            .expect("golden opens");
        let want = |name: &str| golden.read_f32(name).expect("golden logits");
        let plan = f.plan();
        let arch = f.arch(&f.base);
        let base = CheckpointProvider::base(&f.base);
        let unmerged = CheckpointProvider::with_adapters(&f.base, &f.adapters, &plan);
        let merged_dir = merged_by_us(family, "f32", "exact");
        let merged = Checkpoint::open(&merged_dir.path().join("merged")).expect("merged opens");
        let merged_arch = f.arch(&merged);
        let runs: [(&str, &Architecture, &dyn WeightProvider); 3] = [
            ("base", &arch, &base),
            ("unmerged", &arch, &unmerged),
            ("merged", &merged_arch, &CheckpointProvider::base(&merged)),
        ];
        for (label, arch, provider) in runs {
            let logits = arch.forward(provider, &tokens).expect("forward");
            let diff = max_abs_diff(&strided(&logits, step), &want(label));
            table.push(format!("{:7} {label:9} max |Δlogit| {diff:.2e}", f.name));
            // NaN fails too.
            if diff.is_nan() || diff > LOGIT_TOLERANCE {
                failures.push(format!("{} {label}", f.name));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", table.join("\n"));
}

/// Greedy generation with the key/value cache reproduces transformers' `generate` token for token,
/// for the base and the adapter model (Phi-3's cached keys keep the short LongRoPE factors once
/// the sequence passes 16 positions, as transformers' do). A step whose top-2 margin in
/// transformers is below the logit tolerance may pick the runner-up; comparison stops there.
#[test]
fn greedy_generation_matches_transformers() {
    let doc = cases();
    let mut failures = Vec::new();
    let mut compared = 0usize;
    for family in families(&doc) {
        let f = Family::open(family);
        let plan = f.plan();
        let arch = f.arch(&f.base);
        let base = CheckpointProvider::base(&f.base);
        let unmerged = CheckpointProvider::with_adapters(&f.base, &f.adapters, &plan);
        let max_new = doc["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
        for entry in family["generation"].as_array().expect("generation") {
            let case = entry["case"].as_str().expect("case");
            let inner: &dyn WeightProvider = if case.ends_with("-lora") {
                &unmerged
            } else {
                &base
            };
            let model = MaterializedModel::new(&arch, inner).expect("materialize");
            let prompt = token_list(&entry["prompt"]);
            let eos = token_list(&entry["eos"]);
            let want = token_list(&entry["generated"]);
            let ours = generate_greedy(&arch, &model, &prompt, max_new, &eos).expect("generate");
            let margins = entry["margins"].as_array().expect("margins");
            let runner_up = token_list(&entry["runner_up"]);
            let agree = ours.iter().zip(&want).position(|(a, b)| a != b).map_or(
                ours.len() == want.len(),
                |i| {
                    margins[i].as_f64().expect("margin") < f64::from(LOGIT_TOLERANCE)
                        && ours[i] == runner_up[i]
                },
            );
            if !agree {
                failures.push(format!(
                    "{} {case} prompt {}: {ours:?} vs transformers {want:?}",
                    f.name, entry["prompt_index"]
                ));
            }
            let nll = sequence_nll(&arch, &model, &prompt, &want).expect("nll");
            for (j, (got, golden)) in nll
                .iter()
                .zip(entry["nll"].as_array().expect("nll"))
                .enumerate()
            {
                let golden = golden.as_f64().expect("nll value");
                if (got - golden).abs() > NLL_TOLERANCE {
                    failures.push(format!(
                        "{} {case} token {j}: nll {got:.6} vs transformers {golden:.6}",
                        f.name
                    ));
                }
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 16);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn relative(ours: f64, theirs: f64) -> f64 {
    (ours - theirs).abs() / theirs.abs().max(f64::MIN_POSITIVE)
}

/// The precision entry of a `check` report.
fn precision<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["precisions"]
        .as_array()
        .expect("precisions")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no precision {name} in the report"))
}

/// `check` on each family's clean adapter passes (exit 0, no finding), and its KL statistics
/// match PyTorch's over the same evaluation prompts within 2 %: the adapter's effect
/// KL(reference ‖ base), the bf16 merge and the q4_0 merge.
#[test]
fn check_passes_and_kl_matches_pytorch() {
    let doc = cases();
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for family in families(&doc) {
        let name = family["family"].as_str().expect("family");
        let base = family["base"]
            .as_str()
            .expect("base")
            .trim_start_matches("fixtures/");
        let adapter = family["adapter"]
            .as_str()
            .expect("adapter")
            .trim_start_matches("fixtures/");
        let (exit, report) = check_json_full(base, &[adapter], &["--precision", "bf16,q4_0"]);
        let raised = codes(&report);
        // q4_0 on a 32-wide model is far from lossless (its top-1 agreement is 83–93 %); what
        // matters here is that it ran and that bf16 raised nothing.
        let allowed: BTreeSet<String> =
            ["quantization-error", "delta-swamped", "top1-disagreement"]
                .iter()
                .map(|c| c.to_string())
                .collect();
        if exit != 0 || !raised.is_subset(&allowed) {
            failures.push(format!("{name}: exit {exit}, codes {raised:?}"));
        }
        let kl = &family["kl"];
        let golden = |model: &str| kl[model]["mean_kl"].as_f64().expect("golden mean_kl");
        let ours = [
            ("base", report["adapter_effect"]["mean_kl"].as_f64()),
            (
                "bf16",
                precision(&report, "bf16")["logits"]["mean_kl"].as_f64(),
            ),
            (
                "q4_0",
                precision(&report, "q4_0")["logits"]["mean_kl"].as_f64(),
            ),
        ];
        for (model, value) in ours {
            let Some(value) = value else {
                failures.push(format!("{name}: no mean_kl for {model}"));
                continue;
            };
            let rel = relative(value, golden(model));
            table.push(format!(
                "{name:7} {model:5} KL {value:.4e} vs PyTorch {:.4e} ({:.2} %)",
                golden(model),
                100.0 * rel
            ));
            if rel > KL_RELATIVE {
                failures.push(format!("{name} {model}: {:.2} % off", 100.0 * rel));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", table.join("\n"));
}

/// `check` runs every precision on every family: the float formats clean, the quantized ones
/// measured (exit 0 or 1 from their own findings, never 2).
#[test]
fn check_runs_every_precision() {
    let doc = cases();
    for family in families(&doc) {
        let base = family["base"]
            .as_str()
            .expect("base")
            .trim_start_matches("fixtures/");
        let adapter = family["adapter"]
            .as_str()
            .expect("adapter")
            .trim_start_matches("fixtures/");
        let (exit, report) = check_json_full(
            base,
            &[adapter],
            &["--precision", "f32,bf16,f16,q8_0,q4_k_m", "--generate", "0"],
        );
        assert_ne!(exit, 2, "{base}: {report}");
        for p in ["f32", "bf16", "f16", "q8_0", "q4_k_m"] {
            assert!(
                precision(&report, p)["logits"]["mean_kl"].is_number(),
                "{base}: {p} has no logits"
            );
        }
        let float_codes: BTreeSet<String> = report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter(|f| {
                f["precision"]
                    .as_str()
                    .is_some_and(|p| ["f32", "bf16", "f16"].contains(&p))
            })
            .map(|f| f["code"].as_str().expect("code").to_string())
            .collect();
        assert!(float_codes.is_empty(), "{base}: {float_codes:?}");
    }
}

/// `merge --recipe peft --precision bf16` writes PEFT's merge (`merge_and_unload` on the f32 base,
/// saved in bf16) on every family, fused Phi-3 projections included: every tensor within one bf16
/// ULP, fewer than 1e-3 of the elements off at all (the f32 GEMM's summation order can flip a
/// final rounding).
#[test]
fn merge_recipe_peft_reproduces_peft_in_bf16() {
    use lora_doctor::merge::float::{FloatFormat, ulp_distance};
    let doc = cases();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for family in families(&doc) {
        let name = family["family"].as_str().expect("family");
        let dir = merged_by_us(family, "bf16", "peft");
        let ours = Checkpoint::open(&dir.path().join("merged")).expect("merged opens");
        let golden = Checkpoint::open(
            &root()
                .join("fixtures")
                .join(family["merged_good"].as_str().expect("merged_good")),
        )
        .expect("PEFT merge opens");
        let (mut total, mut differ, mut worst) = (0usize, 0usize, 0u64);
        for t in golden.tensors() {
            let want = golden.read_f32(&t.name).expect("golden tensor");
            let got = ours
                .read_f32(&t.name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.len(), want.len(), "{name} {}", t.name);
            for (g, w) in got.iter().zip(&want) {
                let d = ulp_distance(*g, *w, FloatFormat::Bf16).unwrap_or(u64::MAX);
                total += 1;
                if d > 0 {
                    differ += 1;
                    worst = worst.max(d);
                }
            }
        }
        let fraction = differ as f64 / total.max(1) as f64;
        report.push(format!(
            "{name}: {differ}/{total} differ ({fraction:.2e}), max {worst} ULP"
        ));
        if worst > 1 || fraction >= 1e-3 {
            failures.push(name.to_string());
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", report.join("\n"));
}

/// (family, fixture base, adapters, flags, exit code, the exact set of codes raised).
type CodeRow = (
    String,
    String,
    Vec<String>,
    Vec<String>,
    i32,
    Vec<&'static str>,
);

/// The codes that apply to a dense family fire on each.
fn code_table(doc: &Value) -> Vec<CodeRow> {
    let mut rows = Vec::new();
    for family in families(doc) {
        let name = family["family"].as_str().expect("family").to_string();
        let rel = |key: &str| {
            family[key]
                .as_str()
                .expect(key)
                .trim_start_matches("fixtures/")
                .to_string()
        };
        let (base, adapter) = (rel("base"), rel("adapter"));
        let merged = |key: &str| fixture(family[key].as_str().expect(key));
        // PEFT's own merge, saved in bf16: nothing to report.
        rows.push((
            name.clone(),
            base.clone(),
            vec![adapter.clone()],
            vec!["--merged".to_string(), merged("merged_good")],
            0,
            vec![],
        ));
        // alpha/r applied twice.
        rows.push((
            name.clone(),
            base.clone(),
            vec![adapter.clone()],
            vec!["--merged".to_string(), merged("merged_scale_twice")],
            1,
            vec!["scale-mismatch"],
        ));
        // An adapter trained on another model (tiny-llama's): its config names a llama, Gemma's
        // q/k/v/o and MLP names match with other shapes, Phi-3 has no q_proj/k_proj/v_proj/gate_proj
        // /up_proj at all (fused) and only o_proj/down_proj match, with other shapes.
        let wrong_model: Vec<&'static str> = if name == "phi3" {
            vec!["base-mismatch", "missing-target", "shape-mismatch"]
        } else {
            vec!["base-mismatch", "shape-mismatch"]
        };
        rows.push((
            name.clone(),
            base.clone(),
            vec!["adapters/llama-lora".to_string()],
            vec![],
            1,
            wrong_model,
        ));
    }
    rows
}

#[test]
fn finding_codes_fire_on_each_family() {
    let doc = cases();
    let mut failures = Vec::new();
    for (family, base, adapters, flags, want_exit, want) in code_table(&doc) {
        let adapters: Vec<&str> = adapters.iter().map(String::as_str).collect();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (exit, report) = check_json_with(&base, &adapters, &flags);
        let got: BTreeSet<String> = report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter(|f| f["level"] != "allow")
            .map(|f| f["code"].as_str().expect("code").to_string())
            .collect();
        let want: BTreeSet<String> = want.iter().map(|c| c.to_string()).collect();
        if exit != want_exit || got != want {
            failures.push(format!(
                "{family} {adapters:?} {flags:?}: exit {exit} (want {want_exit}), codes {got:?} (want {want:?})"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A faithful merge checked with the logit comparison too: the merged checkpoint is one more
/// candidate and the gate stays green.
#[test]
fn check_merged_with_logits_passes() {
    let doc = cases();
    for family in families(&doc) {
        let rel = |key: &str| {
            family[key]
                .as_str()
                .expect(key)
                .trim_start_matches("fixtures/")
                .to_string()
        };
        let merged = fixture(family["merged_good"].as_str().expect("merged_good"));
        let (exit, report) = check_json_full(
            &rel("base"),
            &[&rel("adapter")],
            &[
                "--precision",
                "bf16",
                "--merged",
                &merged,
                "--generate",
                "0",
            ],
        );
        assert_eq!(exit, 0, "{}: {report}", rel("base"));
    }
}

/// `inspect` of each base says the logit comparison runs on it (and names the model type).
#[test]
fn inspect_says_the_forward_pass_runs() {
    let doc = cases();
    for family in families(&doc) {
        let base = fixture_path(family["base"].as_str().expect("base"));
        let out = run(&["inspect", &base]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        let model_type = family["model_type"].as_str().expect("model_type");
        assert!(
            text.contains(&format!("logits     forward pass ({model_type})")),
            "{text}"
        );
    }
}

/// A merged Gemma 2 whose config.json lost its final-logit soft-cap (its weights are PEFT's
/// faithful merge, so only the config can tell): `config-drift` names the key. The logit
/// comparison would not see it, since the merged weights run under the base's architecture.
#[test]
fn a_merged_gemma2_without_its_soft_cap_is_config_drift() {
    let doc = cases();
    let family = families(&doc)
        .iter()
        .find(|f| f["family"] == "gemma2")
        .expect("gemma2");
    let good = root()
        .join("fixtures")
        .join(family["merged_good"].as_str().expect("merged_good"));
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&good).expect("merged folder") {
        let path = entry.expect("entry").path();
        let dest = dir.path().join(path.file_name().expect("name"));
        std::fs::copy(&path, &dest).expect("copy");
    }
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config"))
            .expect("JSON");
    config["final_logit_softcapping"] = Value::Null;
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let merged = dir.path().display().to_string();
    let (exit, report) = check_json_with(
        "models/tiny-gemma2",
        &["adapters/gemma2-lora"],
        &["--merged", &merged],
    );
    assert_eq!(exit, 0, "config drift warns: {report}");
    let drift: Vec<&Value> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["code"] == "config-drift")
        .collect();
    assert_eq!(drift.len(), 1, "{report}");
    assert!(
        drift[0]["message"]
            .as_str()
            .expect("message")
            .contains("final_logit_softcapping"),
        "{}",
        drift[0]
    );
}

/// An adapter with separate q/k/v and gate/up projections on Phi-3's fused base (trained on a
/// split copy, as Unsloth's llamafied Phi-3 is): each `missing-target` names the fused module.
#[test]
fn split_projections_on_a_fused_base_name_the_fused_module() {
    let (exit, report) = check_json("models/tiny-phi3", &["adapters/llama-lora"]);
    assert_eq!(exit, 1);
    let missing: Vec<&Value> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["code"] == "missing-target")
        .collect();
    // q, k, v, gate, up in each of the two layers.
    assert_eq!(missing.len(), 10, "{report}");
    for f in missing {
        let module = f["module"].as_str().expect("module");
        let fused = if module.contains("self_attn") {
            "qkv_proj"
        } else {
            "gate_up_proj"
        };
        let message = f["message"].as_str().expect("message");
        assert!(
            message.contains(&format!("`{}", module.rsplit_once('.').expect("dot").0))
                && message.contains(fused),
            "{message}"
        );
    }
}
