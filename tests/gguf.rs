//! GGUF as a base: the tiny llama converted by llama.cpp's own `convert_hf_to_gguf.py` (f32 and
//! q8_0, `fixtures/gen/gguf.py`) read back under transformers names, un-permuted, dequantized, with
//! its config and tokenizer from the GGUF metadata; the logits against transformers' GGUF loader;
//! and malformed files refused with exit 2 and a name.

use std::path::PathBuf;

use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::io::gguf;
use lora_doctor::model::{Architecture, CheckpointProvider};

use super::{code, fixture, run, stderr};

const F32: &str = "models/tiny-llama.f32.gguf";
const Q8_0: &str = "models/tiny-llama.q8_0.gguf";
const ORIGINAL: &str = "models/tiny-llama";

fn open(rel: &str) -> Checkpoint {
    Checkpoint::open(&PathBuf::from(fixture(rel))).expect("open")
}

/// transformers tensors the converter writes (the tied head has no `lm_head.weight`).
fn hf_names(ckpt: &Checkpoint) -> Vec<String> {
    ckpt.tensors().map(|t| t.name.clone()).collect()
}

#[test]
fn gguf_inventory_is_the_safetensors_inventory_under_transformers_names() {
    let original = open(ORIGINAL);
    for file in [F32, Q8_0] {
        let ckpt = open(file);
        assert_eq!(hf_names(&ckpt), hf_names(&original), "{file}");
        for t in original.tensors() {
            let info = ckpt.info(&t.name).expect("present");
            assert_eq!(info.shape, t.shape, "{file} {}", t.name);
        }
    }
    let q8 = open(Q8_0);
    let dtype = |n: &str| q8.info(n).expect(n).dtype.name().to_string();
    assert_eq!(dtype("model.layers.0.self_attn.q_proj.weight"), "Q8_0");
    assert_eq!(dtype("model.layers.0.input_layernorm.weight"), "F32");
}

#[test]
fn f32_gguf_tensors_equal_the_safetensors_originals_after_unpermuting() {
    let original = open(ORIGINAL);
    let ckpt = open(F32);
    for t in original.tensors() {
        assert_eq!(
            ckpt.read_f32(&t.name).expect("gguf"),
            original.read_f32(&t.name).expect("safetensors"),
            "{} differs (q/k permutation?)",
            t.name
        );
    }
}

#[test]
fn q8_0_gguf_tensors_equal_gguf_py_dequantization() {
    let golden = open("goldens/gguf/tiny-llama.q8_0.dequant.safetensors");
    let ckpt = open(Q8_0);
    let header = ckpt.gguf().expect("a GGUF checkpoint").clone();
    let (n_head, n_head_kv) = gguf::head_counts(&header).expect("heads");
    for t in &header.tensors {
        let hf = gguf::names::llama_to_hf(&t.name).expect("llama name");
        let stored = golden.read_f32(&t.name).expect("golden");
        // gguf-py dequantizes in the stored (permuted) row order; undo it as the checkpoint does.
        let want = match gguf::names::llama_row_order("llama", &hf, n_head, n_head_kv) {
            gguf::names::RowOrder::Same => stored,
            gguf::names::RowOrder::LlamaRope { heads } => {
                let shape = t.torch_shape();
                gguf::names::permute_rows(&stored, shape[0], shape[1], heads, true).expect("undo")
            }
            gguf::names::RowOrder::Transposed
            | gguf::names::RowOrder::NeoxQkv { .. }
            | gguf::names::RowOrder::PlusOne => {
                panic!(
                    "{}: no llama tensor is transposed, fused or shifted",
                    t.name
                )
            }
        };
        assert_eq!(ckpt.read_f32(&hf).expect("read"), want, "{}", t.name);
    }
}

#[test]
fn gguf_config_matches_config_json_on_the_forward_fields() {
    let ckpt = open(F32);
    let from_gguf = ModelConfig::from_value(ckpt.gguf_config().expect("gguf").expect("config"));
    let json = ModelConfig::read(&PathBuf::from(fixture("models/tiny-llama/config.json")))
        .expect("config.json");
    assert_eq!(from_gguf.model_type, json.model_type);
    assert_eq!(from_gguf.vocab_size, json.vocab_size);
    assert_eq!(from_gguf.hidden_size, json.hidden_size);
    assert_eq!(from_gguf.intermediate_size, json.intermediate_size);
    assert_eq!(from_gguf.num_hidden_layers, json.num_hidden_layers);
    assert_eq!(from_gguf.num_attention_heads, json.num_attention_heads);
    assert_eq!(from_gguf.num_key_value_heads, json.num_key_value_heads);
    assert_eq!(from_gguf.head_dim, json.head_dim);
    assert_eq!(
        from_gguf.max_position_embeddings,
        json.max_position_embeddings
    );
    assert_eq!(from_gguf.rope_theta, json.rope_theta);
    assert_eq!(from_gguf.tie_word_embeddings, json.tie_word_embeddings);
    // Stored as f32 in GGUF: equal to 1e-5 rounded to f32.
    assert_eq!(
        from_gguf.rms_norm_eps.map(|e| e as f32),
        json.rms_norm_eps.map(|e| e as f32)
    );
}

/// Largest |a − b|.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn gguf_logits_match_transformers_loading_the_same_file() {
    let golden = open("goldens/gguf/logits.safetensors");
    let (_, raw) = golden.raw("tokens").expect("tokens");
    let tokens: Vec<u32> = raw
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect();
    for file in [F32, Q8_0] {
        let ckpt = open(file);
        let config = ModelConfig::from_value(ckpt.gguf_config().expect("gguf").expect("config"));
        let arch = Architecture::from_config(&config, &|n| ckpt.contains(n)).expect("arch");
        let provider = CheckpointProvider::base(&ckpt);
        let logits = arch.forward(&provider, &tokens).expect("forward");
        let got: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
        let name = PathBuf::from(file);
        let name = name.file_name().expect("name").to_string_lossy();
        let want = golden.read_f32(&format!("logits.{name}")).expect("golden");
        // The same tolerance as the safetensors forward goldens (f32 accumulation order).
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{file}: max |Δlogit| {diff}");
    }
}

#[test]
fn check_on_a_gguf_base_agrees_with_the_safetensors_base() {
    let adapter = "adapters/llama-lora";
    let (gguf_code, gguf_report) =
        super::check_json_full(F32, &[adapter], &["--generate", "0", "--max-tokens", "64"]);
    let (st_code, st_report) = super::check_json_full(
        ORIGINAL,
        &[adapter],
        &["--generate", "0", "--max-tokens", "64"],
    );
    assert_eq!(gguf_code, st_code);
    let effect = |r: &serde_json::Value| r["adapter_effect"]["mean_kl"].as_f64().expect("kl");
    let (a, b) = (effect(&gguf_report), effect(&st_report));
    assert!(
        (a - b).abs() <= 1e-6 * b.max(1e-9) + 1e-9,
        "adapter effect {a} (gguf) vs {b} (safetensors)"
    );
    assert_eq!(
        gguf_report["adapter_effect"]["tokens"], st_report["adapter_effect"]["tokens"],
        "the tokenizer rebuilt from tokenizer.ggml.* scores the same tokens"
    );
}

/// Writes `bytes` as a `.gguf` file and runs `check --weights-only` on it.
fn check_bytes(bytes: &[u8]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).expect("write");
    let out = run(&[
        "check",
        "--weights-only",
        "--base",
        &path.display().to_string(),
        "--adapter",
        &fixture("adapters/llama-lora"),
    ]);
    (code(&out), stderr(&out))
}

#[test]
fn malformed_gguf_files_exit_2_naming_what_is_wrong() {
    let good = std::fs::read(fixture(Q8_0)).expect("read");
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGUX");
    let mut absurd_count = good.clone();
    absurd_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    // A q_proj the adapter targets, retyped to IQ2_XS (17), which has no decoder: the file opens,
    // reading that tensor is exit 2 naming it and the type.
    let mut unknown_type = good.clone();
    let type_at = type_field_offset(&good, "blk.0.attn_q.weight");
    unknown_type[type_at..type_at + 4].copy_from_slice(&17u32.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        ("header cut", good[..40].to_vec(), "metadata count"),
        ("bad magic", bad_magic, "not a GGUF file"),
        ("absurd tensor count", absurd_count, "tensor count"),
        (
            "unknown type",
            unknown_type,
            "`model.layers.0.self_attn.q_proj.weight` is stored as ggml type IQ2_XS",
        ),
    ];
    for (case, bytes, needle) in cases {
        let (code, err) = check_bytes(&bytes);
        assert_eq!(code, 2, "{case}: {err}");
        assert!(err.contains(needle), "{case}: `{needle}` not in {err}");
        assert!(!err.contains("panicked"), "{case}: {err}");
    }
}

/// Byte offset of the u32 type field of tensor `name` in a GGUF file's tensor table.
fn type_field_offset(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name in the table")
        + needle.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    at + 4 + 8 * n_dims
}

/// Runs `merge` of tiny-llama + llama-lora into `out` with extra flags; returns the exit code.
fn merge(out: &std::path::Path, extra: &[&str]) -> i32 {
    let mut args = vec![
        "merge".to_string(),
        "--quiet".into(),
        "--base".into(),
        fixture(ORIGINAL),
        "--adapter".into(),
        fixture("adapters/llama-lora"),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = run(&args);
    assert!(!stderr(&result).contains("panicked"), "{}", stderr(&result));
    code(&result)
}

#[test]
fn a_written_gguf_reads_back_equal_to_the_safetensors_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    for precision in ["f32", "f16", "bf16"] {
        let folder = dir.path().join(format!("st-{precision}"));
        let file = dir.path().join(format!("m-{precision}.gguf"));
        assert_eq!(merge(&folder, &["--precision", precision]), 0);
        assert_eq!(
            merge(&file, &["--precision", precision, "--format", "gguf"]),
            0
        );
        let st = Checkpoint::open(&folder).expect("safetensors merge");
        let gg = Checkpoint::open(&file).expect("gguf merge");
        assert_eq!(hf_names(&gg), hf_names(&st), "{precision}");
        for t in st.tensors() {
            let want = st.read_f32(&t.name).expect("st");
            let got = gg.read_f32(&t.name).expect("gguf");
            if t.shape.len() == 1 {
                // 1-D tensors are written F32, as the converter does: equal up to the rounding
                // the safetensors output applied.
                assert_eq!(gg.info(&t.name).expect("info").dtype.name(), "F32");
                continue;
            }
            assert_eq!(got, want, "{precision} {}", t.name);
        }
        let header = gg.gguf().expect("header");
        assert_eq!(header.version, 3);
        assert_eq!(header.architecture(), Some("llama"));
        let tokens = header
            .get("tokenizer.ggml.tokens")
            .and_then(gguf::MetaValue::as_array)
            .expect("tokens");
        assert_eq!(tokens.len(), 320);
        assert_eq!(
            header
                .get("tokenizer.ggml.pre")
                .and_then(gguf::MetaValue::as_str),
            Some("gpt-2")
        );
    }
}

#[test]
fn a_quantized_gguf_merge_is_the_f32_merge_quantized() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f32_file = dir.path().join("m-f32.gguf");
    let q8_file = dir.path().join("m-q8_0.gguf");
    assert_eq!(
        merge(&f32_file, &["--precision", "f32", "--format", "gguf"]),
        0
    );
    assert_eq!(
        merge(&q8_file, &["--precision", "q8_0", "--format", "gguf"]),
        0
    );
    let exact = Checkpoint::open(&f32_file).expect("f32");
    let q8 = Checkpoint::open(&q8_file).expect("q8_0");
    let name = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(q8.info(name).expect("k").dtype.name(), "Q8_0");
    // Quantizing the (permuted) rows and un-permuting on read equals quantizing the transformers
    // rows: Q8_0 blocks run along a row, and the permutation only moves whole rows.
    let want: Vec<f32> = exact
        .read_f32(name)
        .expect("f32")
        .chunks(64)
        .flat_map(|row| {
            let bytes = lora_doctor::merge::quant::quantize_q8_0(row).expect("q8_0");
            lora_doctor::merge::quant::dequantize_q8_0(&bytes).expect("dq")
        })
        .collect();
    assert_eq!(q8.read_f32(name).expect("q8"), want);
    // A GGUF is never written over an existing file, and refuses formats it cannot hold.
    assert_eq!(
        merge(&q8_file, &["--precision", "q8_0", "--format", "gguf"]),
        2
    );
    assert_eq!(
        merge(
            &dir.path().join("x.gguf"),
            &["--precision", "nf4", "--format", "gguf"]
        ),
        2
    );
}

#[test]
fn the_tokenizer_rebuilt_from_tokenizer_ggml_encodes_like_the_original() {
    let ckpt = open(F32);
    let rebuilt: tokenizers::Tokenizer =
        gguf::tokenizer::tokenizer_json(ckpt.gguf().expect("gguf"))
            .expect("rebuilt")
            .to_string()
            .parse()
            .expect("a tokenizers Tokenizer");
    let original = tokenizers::Tokenizer::from_file(fixture("models/tiny-llama/tokenizer.json"))
        .expect("orig");
    let text = "Hello world, 12345 tokens!\n<|im_start|>user\n  spaced   out\t";
    let ids = |t: &tokenizers::Tokenizer| t.encode(text, true).expect("encode").get_ids().to_vec();
    assert_eq!(ids(&rebuilt), ids(&original));
}

/// `merge --format gguf --precision q4_k_m` writes every tensor in the type llama-quantize's rules
/// give it (the rules are checked against the real llama-quantize in `tests/kquant.rs`), and each
/// quantized tensor holds exactly ggml's reference quantization of the f32 merge.
#[test]
fn a_k_quant_mix_gguf_holds_llama_quantize_types_and_the_quantized_merge() {
    use lora_doctor::merge::ggml::{dequantize, quantize};
    use lora_doctor::merge::mix::{Mix, MixKind, MixModel};
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |precision: &str| {
        let out = dir.path().join(format!("{precision}.gguf"));
        let out_s = out.display().to_string();
        let result = run(&[
            "merge",
            "--quiet",
            "--base",
            &fixture("models/tiny-llama"),
            "--adapter",
            &fixture("adapters/llama-lora"),
            "--format",
            "gguf",
            "--precision",
            precision,
            "--out",
            &out_s,
        ]);
        assert_eq!(code(&result), 0, "{precision}: {}", stderr(&result));
        Checkpoint::open(&out).expect("the written GGUF opens")
    };
    let mixed = write("q4_k_m");
    let exact = write("f32");
    let config = ModelConfig::read_dir(&PathBuf::from(fixture("models/tiny-llama")))
        .expect("config")
        .expect("config.json");
    let model = MixModel::from_config(&config, mixed.contains("lm_head.weight")).expect("layers");
    let mix = Mix::unbound(MixKind::Q4KM).bind(model);
    let mut quantized = 0;
    for t in mixed.tensors() {
        let expected = mix
            .type_for(&t.name, &t.shape)
            .expect("a bound mix")
            .unwrap_or(lora_doctor::merge::ggml::GgmlType::F32);
        let ty = mixed.ggml_type(&t.name).expect("a GGUF tensor");
        assert_eq!(ty, expected, "{}", t.name);
        let merged = exact.read_f32(&t.name).expect("f32 merge");
        let cols = *t.shape.last().expect("shape");
        let want: Vec<f32> = merged
            .chunks(cols)
            .flat_map(|row| {
                dequantize(ty, &quantize(ty, row).expect("quantize"), row.len())
                    .expect("dequantize")
            })
            .collect();
        assert_eq!(mixed.read_f32(&t.name).expect("read"), want, "{}", t.name);
        quantized += usize::from(!ty.is_float());
    }
    assert!(quantized >= 15, "{quantized} quantized tensors");
}

/// GPT-2 and GPT-NeoX GGUFs: the fixture models converted by the same `convert_hf_to_gguf.py`.
const GPT_FAMILIES: &[(&str, &str, &str)] = &[
    ("models/tiny-gpt2", "adapters/gpt2-lora", "tiny-gpt2"),
    ("models/tiny-neox", "adapters/neox-lora", "tiny-neox"),
];

#[test]
fn gpt2_and_neox_f32_ggufs_hold_the_safetensors_tensors_exactly() {
    for (original, _, stem) in GPT_FAMILIES {
        let original = open(original);
        let ckpt = open(&format!("models/{stem}.f32.gguf"));
        let mut names = hf_names(&ckpt);
        let mut want = hf_names(&original);
        names.sort();
        want.sort();
        assert_eq!(
            names, want,
            "{stem}: every tensor under its transformers name"
        );
        for t in original.tensors() {
            let info = ckpt.info(&t.name).expect("present");
            assert_eq!(info.shape, t.shape, "{stem} {}", t.name);
            // GPT-2's Conv1D weights come back transposed, NeoX's fused qkv regrouped per head.
            assert_eq!(
                ckpt.read_f32(&t.name).expect("gguf"),
                original.read_f32(&t.name).expect("safetensors"),
                "{stem}: {} differs",
                t.name
            );
        }
    }
}

#[test]
fn gpt2_and_neox_q8_0_ggufs_equal_gguf_py_dequantization() {
    use gguf::names::RowOrder;
    for (_, _, stem) in GPT_FAMILIES {
        let golden = open(&format!("goldens/gguf/{stem}.q8_0.dequant.safetensors"));
        let ckpt = open(&format!("models/{stem}.q8_0.gguf"));
        let header = ckpt.gguf().expect("a GGUF checkpoint").clone();
        let arch = header.architecture().expect("arch").to_string();
        let (n_head, n_head_kv) = gguf::head_counts(&header).expect("heads");
        let mut quantized = 0;
        for t in &header.tensors {
            let hf = gguf::names::to_hf(&arch, &t.name).expect("a transformers name");
            let stored = golden.read_f32(&t.name).expect("golden");
            let shape = t.torch_shape();
            let want = match gguf::names::row_order(&arch, &hf, n_head, n_head_kv) {
                RowOrder::Same => stored,
                RowOrder::Transposed => transpose(&stored, shape[0], shape[1]),
                RowOrder::NeoxQkv { heads } => {
                    let cols = shape.get(1).copied().unwrap_or(1);
                    gguf::names::neox_qkv_rows(&stored, shape[0], cols, heads, true).expect("qkv")
                }
                RowOrder::LlamaRope { .. } | RowOrder::PlusOne => {
                    panic!("{stem}: no rope permutation, no norm shift")
                }
            };
            quantized += usize::from(ckpt.info(&hf).expect("info").dtype.name() == "Q8_0");
            assert_eq!(ckpt.read_f32(&hf).expect("read"), want, "{stem} {}", t.name);
        }
        assert!(quantized >= 8, "{stem}: only {quantized} Q8_0 tensors");
    }
}

#[test]
fn gpt2_gguf_logits_match_transformers_loading_the_same_file() {
    let golden = open("goldens/gguf/logits.safetensors");
    let (_, raw) = golden.raw("tokens").expect("tokens");
    let tokens: Vec<u32> = raw
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect();
    for name in ["tiny-gpt2.f32.gguf", "tiny-gpt2.q8_0.gguf"] {
        let got = gguf_forward(&format!("models/{name}"), &tokens);
        let want = golden.read_f32(&format!("logits.{name}")).expect("golden");
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{name}: max |Δlogit| {diff}");
    }
}

/// Logits of our forward on a GGUF, configured from its metadata alone.
fn gguf_forward(rel: &str, tokens: &[u32]) -> Vec<f32> {
    let ckpt = open(rel);
    let config = ModelConfig::from_value(ckpt.gguf_config().expect("gguf").expect("config"));
    let arch = Architecture::from_config(&config, &|n| ckpt.contains(n)).expect("arch");
    let provider = CheckpointProvider::base(&ckpt);
    let logits = arch.forward(&provider, tokens).expect("forward");
    logits.flatten_all().expect("flat").to_vec1().expect("vec")
}

/// transformers has no GPT-NeoX GGUF loader; the f32 GGUF holds the original's exact tensors
/// (checked above), so its forward must equal the safetensors forward — which has its own
/// transformers goldens — up to the f32-stored layer-norm epsilon.
#[test]
fn neox_gguf_forward_equals_the_safetensors_forward() {
    let tokens = [0u32, 17, 42, 101, 230, 7, 99, 311, 64, 5, 150, 2];
    let original = open("models/tiny-neox");
    let config = ModelConfig::read(&PathBuf::from(fixture("models/tiny-neox/config.json")))
        .expect("config.json");
    let arch = Architecture::from_config(&config, &|n| original.contains(n)).expect("arch");
    let want: Vec<f32> = arch
        .forward(&CheckpointProvider::base(&original), &tokens)
        .expect("forward")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let got = gguf_forward("models/tiny-neox.f32.gguf", &tokens);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "max |Δlogit| {diff}");
}

#[test]
fn check_on_gpt2_and_neox_gguf_bases_agrees_with_safetensors_and_catches_an_unmerged_gguf() {
    let args = ["--generate", "0", "--max-tokens", "64"];
    for (original, adapter, stem) in GPT_FAMILIES {
        let gguf_file = format!("models/{stem}.f32.gguf");
        let (gguf_code, gguf_report) = super::check_json_full(&gguf_file, &[adapter], &args);
        let (st_code, st_report) = super::check_json_full(original, &[adapter], &args);
        assert_eq!((gguf_code, st_code), (0, 0), "{stem}");
        let effect = |r: &serde_json::Value| r["adapter_effect"]["mean_kl"].as_f64().expect("kl");
        let (a, b) = (effect(&gguf_report), effect(&st_report));
        assert!(
            (a - b).abs() <= 1e-6 * b,
            "{stem}: effect {a} (gguf) vs {b}"
        );
        // The base converted to GGUF, offered as the merged file: nothing of the adapter is in it.
        let merged = fixture(&format!("models/{stem}.q8_0.gguf"));
        let mut flags = args.to_vec();
        flags.extend(["--merged", merged.as_str()]);
        let (merged_code, report) = super::check_json_full(original, &[adapter], &flags);
        assert_eq!(merged_code, 1, "{stem}");
        assert!(
            super::codes(&report).contains("not-merged"),
            "{stem}: {report}"
        );
    }
}

/// `m` (`rows` × `cols`, row-major) transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}
