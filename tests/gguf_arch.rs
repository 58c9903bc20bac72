//! GGUF as a base for Gemma 1/2/3, Phi-3, Mixtral, Qwen2-MoE and Qwen3-MoE (issue 15, GGUF
//! names): the tiny models of `arch_dense` and `arch_moe` converted by llama.cpp's own
//! `convert_hf_to_gguf.py` (`fixtures/gen/gguf_arch.py`) read back under transformers names with
//! Gemma's `1 + w` norms undone and stacked experts served per expert; the config rebuilt from
//! GGUF metadata as llama.cpp runs it; logits against transformers' GGUF loader; `check` on a GGUF
//! base and a GGUF offered as `--merged`; `merge --format gguf` still refusing these families.

use std::path::{Path, PathBuf};

use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::io::gguf;
use lora_doctor::io::gguf::names::RowOrder;
use lora_doctor::model::{Architecture, CheckpointProvider};
use serde_json::{Value, json};

use super::{code, fixture, run, stderr};

/// (fixture stem, adapter) of each family whose GGUF is read.
const FAMILIES: &[(&str, &str)] = &[
    ("tiny-gemma", "adapters/gemma-lora"),
    ("tiny-gemma2", "adapters/gemma2-lora"),
    ("tiny-gemma3", "adapters/gemma3-lora"),
    ("tiny-phi3", "adapters/phi3-lora"),
    ("moe-mixtral", "adapters/moe-mixtral-expert"),
    ("moe-qwen2_moe", "adapters/moe-qwen2_moe-expert"),
    ("moe-qwen3_moe", "adapters/moe-qwen3_moe-expert"),
];

/// The MoE families' adapters in PEFT's `target_parameters` form (on fused experts).
const FUSED_ADAPTERS: &[(&str, &str)] = &[
    ("moe-mixtral", "adapters/moe-mixtral-fused"),
    ("moe-qwen2_moe", "adapters/moe-qwen2_moe-fused"),
    ("moe-qwen3_moe", "adapters/moe-qwen3_moe-fused"),
];

/// The tensors that carry config, not weights, and keep their GGUF names (Phi-3's longrope).
const CONFIG_TENSORS: &[&str] = &["rope_factors_long.weight", "rope_factors_short.weight"];

fn open(rel: &str) -> Checkpoint {
    Checkpoint::open(&PathBuf::from(fixture(rel))).expect("open")
}

fn sorted_names(ckpt: &Checkpoint) -> Vec<String> {
    let mut names: Vec<String> = ckpt
        .tensors()
        .map(|t| t.name.clone())
        .filter(|n| !CONFIG_TENSORS.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

fn gguf_config(ckpt: &Checkpoint) -> ModelConfig {
    ModelConfig::from_value(
        ckpt.gguf_config()
            .expect("a GGUF checkpoint")
            .expect("config"),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The f32 GGUF holds every safetensors tensor under its transformers name with the same shape
/// and, after `stored − 1` on Gemma's norms, the same values bit for bit: the converter writes
/// `f32(w) + 1` in f32, exact for these bf16 weights, and `(1 + w) − 1` is then exact too.
#[test]
fn f32_ggufs_hold_the_safetensors_tensors_exactly() {
    for (stem, _) in FAMILIES {
        let original = open(&format!("models/{stem}"));
        let ckpt = open(&format!("models/{stem}.f32.gguf"));
        assert_eq!(
            sorted_names(&ckpt),
            sorted_names(&original),
            "{stem}: every tensor under its transformers name"
        );
        let arch = ckpt
            .gguf()
            .expect("gguf")
            .architecture()
            .expect("arch")
            .to_string();
        let mut shifted = 0;
        for t in original.tensors() {
            let info = ckpt.info(&t.name).expect("present");
            assert_eq!(info.shape, t.shape, "{stem} {}", t.name);
            let order = gguf::names::row_order(&arch, &t.name, 1, 1);
            shifted += usize::from(order == RowOrder::PlusOne);
            assert_eq!(
                ckpt.read_f32(&t.name).expect("gguf"),
                original.read_f32(&t.name).expect("safetensors"),
                "{stem}: {} differs",
                t.name
            );
        }
        // Gemma 1: 2 norms a layer + final; Gemma 2: 4; Gemma 3: 4 + q/k norms.
        let want = match *stem {
            "tiny-gemma" => 5,
            "tiny-gemma2" => 9,
            "tiny-gemma3" => 13,
            _ => 0,
        };
        assert_eq!(shifted, want, "{stem}: norms read as stored − 1");
    }
}

/// The q8_0 GGUF reads as gguf-py dequantizes it: Gemma's norms (kept F32 by the converter) as
/// gguf-py's stored value − 1, Mixtral's q/k un-permuted, each expert as its slab of the stack.
#[test]
fn q8_0_ggufs_equal_gguf_py_dequantization() {
    for (stem, _) in FAMILIES {
        let golden = open(&format!(
            "goldens/gguf_arch/{stem}.q8_0.dequant.safetensors"
        ));
        let ckpt = open(&format!("models/{stem}.q8_0.gguf"));
        let header = ckpt.gguf().expect("a GGUF checkpoint").clone();
        let arch = header.architecture().expect("arch").to_string();
        let (n_head, n_head_kv) = gguf::head_counts(&header).expect("heads");
        let mut quantized = 0;
        for t in &header.tensors {
            let stored = golden.read_f32(&t.name).expect("golden");
            let Some(hf) = gguf::names::to_hf(&arch, &t.name) else {
                assert!(
                    CONFIG_TENSORS.contains(&t.name.as_str()),
                    "{stem} {}",
                    t.name
                );
                assert_eq!(ckpt.read_f32(&t.name).expect("read"), stored);
                continue;
            };
            let shape = t.torch_shape();
            if hf.contains(gguf::names::EXPERT_SLOT) {
                // Expert e is the e-th [rows, cols] slab of gguf-py's [E, rows, cols].
                let each = stored.len() / shape[0];
                for (e, slab) in stored.chunks(each).enumerate() {
                    let name = hf.replace(gguf::names::EXPERT_SLOT, &e.to_string());
                    assert_eq!(ckpt.info(&name).expect("expert").shape, shape[1..]);
                    assert_eq!(ckpt.read_f32(&name).expect("read"), slab, "{stem} {name}");
                    quantized +=
                        usize::from(ckpt.ggml_type(&name).map(|t| t.name()) == Some("Q8_0".into()));
                }
                continue;
            }
            let want: Vec<f32> = match gguf::names::row_order(&arch, &hf, n_head, n_head_kv) {
                RowOrder::Same => stored,
                RowOrder::PlusOne => {
                    assert_eq!(ckpt.ggml_type(&hf).map(|t| t.name()), Some("F32".into()));
                    stored.iter().map(|v| v - 1.0).collect()
                }
                RowOrder::LlamaRope { heads } => {
                    gguf::names::permute_rows(&stored, shape[0], shape[1], heads, true)
                        .expect("undo")
                }
                other => panic!("{stem} {hf}: unexpected {other:?}"),
            };
            quantized += usize::from(ckpt.info(&hf).expect("info").dtype.name() == "Q8_0");
            assert_eq!(ckpt.read_f32(&hf).expect("read"), want, "{stem} {}", t.name);
        }
        assert!(quantized >= 9, "{stem}: only {quantized} Q8_0 tensors");
    }
}

/// The config rebuilt from the GGUF equals config.json on every field the file carries, and
/// takes llama.cpp's values for the two it does not (the query scale, Gemma 3's layer types).
#[test]
fn config_from_gguf_metadata_is_the_original_as_llama_cpp_runs_it() {
    for (stem, _) in FAMILIES {
        let ckpt = open(&format!("models/{stem}.f32.gguf"));
        let got = gguf_config(&ckpt);
        let json = ModelConfig::read(&PathBuf::from(fixture(&format!(
            "models/{stem}/config.json"
        ))))
        .expect("config.json");
        assert_eq!(got.model_type, json.model_type, "{stem}");
        assert_eq!(got.architectures, json.architectures, "{stem}");
        assert_eq!(got.vocab_size, json.vocab_size, "{stem}");
        assert_eq!(got.hidden_size, json.hidden_size, "{stem}");
        assert_eq!(got.intermediate_size, json.intermediate_size, "{stem}");
        assert_eq!(got.num_hidden_layers, json.num_hidden_layers, "{stem}");
        assert_eq!(got.num_attention_heads, json.num_attention_heads, "{stem}");
        assert_eq!(got.num_key_value_heads, json.num_key_value_heads, "{stem}");
        assert_eq!(
            got.max_position_embeddings, json.max_position_embeddings,
            "{stem}"
        );
        assert_eq!(got.tie_word_embeddings, json.tie_word_embeddings, "{stem}");
        assert_eq!(
            got.rms_norm_eps.map(|e| e as f32),
            json.rms_norm_eps.map(|e| e as f32),
            "{stem}: epsilon stored as f32"
        );
        let (g, j) = (&got.raw, &json.raw);
        let same = |key: &str| assert_eq!(g[key], j[key], "{stem}: `{key}`");
        match *stem {
            "tiny-gemma" => {
                same("head_dim");
                same("hidden_act");
                assert_eq!(g["rope_parameters"], j["rope_parameters"], "{stem}");
            }
            "tiny-gemma2" => {
                for key in [
                    "head_dim",
                    "hidden_activation",
                    "attn_logit_softcapping",
                    "final_logit_softcapping",
                    "sliding_window",
                    "layer_types",
                    "rope_parameters",
                ] {
                    same(key);
                }
                // The file has no query scalar: llama.cpp uses head_dim (16), the original 24.
                assert_eq!(
                    (&g["query_pre_attn_scalar"], &j["query_pre_attn_scalar"]),
                    (&json!(16), &json!(24))
                );
            }
            "tiny-gemma3" => {
                for key in [
                    "head_dim",
                    "hidden_activation",
                    "final_logit_softcapping",
                    "sliding_window",
                    "query_pre_attn_scalar",
                    "rope_parameters",
                ] {
                    same(key);
                }
                // No layer-type list in the file: llama.cpp makes every sixth layer global.
                assert_eq!(
                    g["layer_types"],
                    json!(["sliding_attention", "sliding_attention"])
                );
                assert_eq!(
                    j["layer_types"],
                    json!(["sliding_attention", "full_attention"])
                );
            }
            "tiny-phi3" => {
                same("hidden_act");
                same("sliding_window");
                same("original_max_position_embeddings");
                let (gr, jr) = (&g["rope_parameters"], &j["rope_parameters"]);
                for key in [
                    "rope_type",
                    "rope_theta",
                    "partial_rotary_factor",
                    "original_max_position_embeddings",
                ] {
                    assert_eq!(gr[key], jr[key], "{stem}: rope `{key}`");
                }
                // The factors travel as f32 tensors.
                let f32s = |v: &Value| -> Vec<f32> {
                    v.as_array()
                        .expect("a list")
                        .iter()
                        .map(|x| x.as_f64().expect("a number") as f32)
                        .collect()
                };
                for key in ["long_factor", "short_factor"] {
                    assert_eq!(f32s(&gr[key]), f32s(&jr[key]), "{stem}: rope `{key}`");
                }
            }
            "moe-mixtral" => {
                for key in [
                    "num_local_experts",
                    "num_experts_per_tok",
                    "rope_parameters",
                ] {
                    same(key);
                }
            }
            "moe-qwen2_moe" | "moe-qwen3_moe" => {
                for key in [
                    "num_experts_per_tok",
                    "moe_intermediate_size",
                    "norm_topk_prob",
                    "decoder_sparse_step",
                    "mlp_only_layers",
                    "rope_parameters",
                ] {
                    same(key);
                }
                // Qwen3MoeConfig spells the expert count `num_local_experts`.
                let experts =
                    |c: &Value| c.get("num_experts").or(c.get("num_local_experts")).cloned();
                assert_eq!(experts(g), experts(j), "{stem}: experts");
                if *stem == "moe-qwen2_moe" {
                    same("shared_expert_intermediate_size");
                } else {
                    same("head_dim");
                }
            }
            other => panic!("{other}"),
        }
    }
}

fn forward(ckpt: &Checkpoint, config: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let arch = Architecture::from_config(config, &|n| ckpt.contains(n)).expect("arch");
    let logits = arch
        .forward(&CheckpointProvider::base(ckpt), tokens)
        .expect("forward");
    logits.flatten_all().expect("flat").to_vec1().expect("vec")
}

fn golden_tokens(golden: &Checkpoint) -> Vec<u32> {
    let (_, raw) = golden.raw("tokens").expect("tokens");
    raw.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect()
}

/// Our forward on each GGUF, configured from its metadata alone, against transformers loading
/// the same file (given the llama.cpp-runtime config, see `gguf_arch.py`).
#[test]
fn gguf_logits_match_transformers_loading_the_same_file() {
    let golden = open("goldens/gguf_arch/logits.safetensors");
    let tokens = golden_tokens(&golden);
    for stem in [
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-phi3",
        "moe-qwen2_moe",
        "moe-qwen3_moe",
    ] {
        for kind in ["f32", "q8_0"] {
            let name = format!("{stem}.{kind}.gguf");
            let ckpt = open(&format!("models/{name}"));
            let got = forward(&ckpt, &gguf_config(&ckpt), &tokens);
            let want = golden.read_f32(&format!("logits.{name}")).expect("golden");
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "{name}: max |Δlogit| {diff}");
        }
    }
}

/// transformers has no Gemma 1 or Mixtral GGUF loader; the f32 GGUF holds the original's exact
/// tensors (above), so its forward must equal the safetensors forward, which has its own
/// transformers goldens, up to the f32-stored epsilon.
#[test]
fn gemma_and_mixtral_gguf_forwards_equal_the_safetensors_forward() {
    let tokens = [0u32, 17, 42, 101, 230, 7, 99, 311, 64, 5, 150, 2];
    for stem in ["tiny-gemma", "moe-mixtral"] {
        let original = open(&format!("models/{stem}"));
        let config = ModelConfig::read(&PathBuf::from(fixture(&format!(
            "models/{stem}/config.json"
        ))))
        .expect("config.json");
        let want = forward(&original, &config, &tokens);
        let ckpt = open(&format!("models/{stem}.f32.gguf"));
        let got = forward(&ckpt, &gguf_config(&ckpt), &tokens);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "{stem}: max |Δlogit| {diff}");
    }
}

/// A copy of the safetensors original whose config.json takes llama.cpp's values for what the
/// GGUF does not carry (the same two rules as `gguf_arch.py`'s `llama_cpp_runtime`).
fn as_llama_cpp_runs_it(stem: &str, dir: &Path) -> String {
    let src = PathBuf::from(fixture(&format!("models/{stem}")));
    for entry in std::fs::read_dir(&src).expect("read_dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
    }
    let config_path = dir.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    if stem != "tiny-gemma" && stem != "tiny-phi3" {
        config["query_pre_attn_scalar"] = config["head_dim"].clone();
    }
    if stem == "tiny-gemma3" {
        config["layer_types"] = json!(["sliding_attention", "sliding_attention"]);
    }
    std::fs::write(&config_path, config.to_string()).expect("write");
    dir.display().to_string()
}

#[test]
fn check_on_gguf_bases_agrees_with_safetensors_and_catches_an_unmerged_gguf() {
    let args = ["--generate", "0", "--max-tokens", "64"];
    for (stem, adapter) in FAMILIES.iter().chain(FUSED_ADAPTERS) {
        let dir = tempfile::tempdir().expect("tempdir");
        let original = as_llama_cpp_runs_it(stem, dir.path());
        let gguf_file = format!("models/{stem}.f32.gguf");
        let (gguf_code, gguf_report) = super::check_json_full(&gguf_file, &[adapter], &args);
        let (st_code, st_report) = super::check_json_full(&original, &[adapter], &args);
        assert_eq!((gguf_code, st_code), (0, 0), "{stem}: {gguf_report}");
        let effect = |r: &Value| r["adapter_effect"]["mean_kl"].as_f64().expect("kl");
        let (a, b) = (effect(&gguf_report), effect(&st_report));
        assert!(b > 1e-3, "{stem}: the adapter has an effect ({b})");
        assert!(
            (a - b).abs() <= 1e-6 * b,
            "{stem}: effect {a} (gguf) vs {b}"
        );
        // The base converted to GGUF, offered as the merged file: nothing of the adapter is in it.
        let merged = fixture(&format!("models/{stem}.q8_0.gguf"));
        let mut flags = args.to_vec();
        flags.extend(["--merged", merged.as_str()]);
        let (merged_code, report) =
            super::check_json_full(&format!("models/{stem}"), &[adapter], &flags);
        assert_eq!(merged_code, 1, "{stem}");
        assert!(
            super::codes(&report).contains("not-merged"),
            "{stem}: {report}"
        );
    }
}

/// Writing GGUF stays limited to the llama family: these families are refused with exit 2.
#[test]
fn merge_format_gguf_still_refuses_these_families() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (stem, adapter) in FAMILIES {
        let out = dir.path().join(format!("{stem}.gguf"));
        let (base, adapter) = (fixture(&format!("models/{stem}")), fixture(adapter));
        let result = run(&[
            "merge",
            "--quiet",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--out",
            &out.display().to_string(),
            "--format",
            "gguf",
        ]);
        assert_eq!(code(&result), 2, "{stem}: {}", stderr(&result));
        assert!(!out.exists(), "{stem}: nothing written");
    }
}
