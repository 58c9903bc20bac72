//! Repairing a lossy merge (issue 14): the GPTQ core against the generator's torch reference, and
//! `check --repair` / `merge --repair` against transformers running the files our merge wrote
//! (fixtures/gen/repair.py, goldens/repair/).

use serde_json::Value;

use super::{check_json_full, code, fixture, run, stderr};
use lora_doctor::merge::float::FloatFormat;
use lora_doctor::merge::kquant::Kind;
use lora_doctor::merge::repair::{self, HessianFactor, Target};

/// `check` and transformers compute the same KL on the same files within this relative tolerance
/// (f32 forward passes in different operation orders; the bar is 2 %).
const KL_TOLERANCE: f64 = 0.02;

/// Share of the torch reference's GPTQ values the Rust core must reproduce exactly. The factor U
/// is computed two ways (torch: cholesky → cholesky_inverse → upper cholesky; Rust: one factor of
/// the reversed H and a triangular inverse), equal up to f64 rounding, and the lazy batch updates
/// sum in another order; a value within ~1e-12 of a rounding boundary may land on the other
/// neighbour, after which that row's later values follow a different, equally valid path.
/// Measured: 2304 of 2304 values bit-identical in all five targets (x86-64, AVX2 GEMM), and 4096
/// of 4096 in each of the seven K-quant grids (goldens/repair_kquant).
const GPTQ_MIN_SAME: f64 = 0.98;

fn goldens() -> Value {
    let text = std::fs::read_to_string(fixture("goldens/repair/kl.json")).expect("kl.json");
    serde_json::from_str(&text).expect("kl.json is JSON")
}

fn f64_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f64> {
    let view = st.tensor(name).expect(name);
    view.data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

fn f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = st.tensor(name).expect(name);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// How many of `got` have exactly the bits of the reference value at the same place.
fn bit_equal(got: &[f32], want: &[f32]) -> usize {
    got.iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count()
}

#[test]
fn gptq_core_reproduces_the_torch_reference() {
    let bytes = std::fs::read(fixture("goldens/repair/gptq.safetensors")).expect("golden");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let h = f64_tensor(&st, "h");
    let w = f64_tensor(&st, "w");
    let n = (h.len() as f64).sqrt() as usize;
    let rows = w.len() / n;
    let factor = HessianFactor::from_hessian(&h, n, "golden").expect("positive definite");
    for (name, target) in [
        ("bf16", Target::Float(FloatFormat::Bf16)),
        ("f16", Target::Float(FloatFormat::F16)),
        ("q8_0", Target::Q8_0),
        ("q4_0", Target::Q4_0),
        ("q4_1", Target::Q4_1),
    ] {
        let want = f32_tensor(&st, &format!("out.{name}"));
        let got = repair::gptq("golden", &w, rows, n, &factor, target).expect("gptq");
        let same = bit_equal(&got.values, &want);
        assert!(
            same as f64 / want.len() as f64 >= GPTQ_MIN_SAME,
            "{name}: {same} of {} values equal the torch reference",
            want.len()
        );
        // A plain round-to-nearest would not pass: the test can tell the two apart.
        let nearest = repair::nearest("golden", &w, rows, n, target).expect("nearest");
        let same_as_nearest = bit_equal(&nearest.values, &want);
        assert!(
            (same_as_nearest as f64 / want.len() as f64) < GPTQ_MIN_SAME,
            "{name}: round-to-nearest matches the GPTQ reference too often ({same_as_nearest})"
        );
    }
}

#[test]
fn gptq_core_reproduces_the_torch_reference_on_kquant_grids() {
    // fixtures/gen/repair_kquant.py: the same GPTQ, with each block's parameters from ggml's own
    // C quantizer of the block-start values; 512 columns, so each K-quant super-block spans two
    // lazy batches (and its block-start values come from two).
    let bytes = std::fs::read(fixture("goldens/repair_kquant/gptq.safetensors")).expect("golden");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let h = f64_tensor(&st, "h");
    let w = f64_tensor(&st, "w");
    let n = (h.len() as f64).sqrt() as usize;
    let rows = w.len() / n;
    assert!(
        n >= 512 && n.is_multiple_of(256),
        "super-blocks cross lazy batches"
    );
    let factor = HessianFactor::from_hessian(&h, n, "golden").expect("positive definite");
    for kind in Kind::ALL {
        let name = kind.name();
        let want = f32_tensor(&st, &format!("out.{name}"));
        let target = Target::Kquant(kind);
        let got = repair::gptq("golden", &w, rows, n, &factor, target).expect("gptq");
        let same = bit_equal(&got.values, &want);
        assert!(
            same as f64 / want.len() as f64 >= GPTQ_MIN_SAME,
            "{name}: {same} of {} values equal the torch reference",
            want.len()
        );
        // The bytes written are ggml blocks that decode to exactly these values.
        let back = kind
            .dequantize(got.ggml.as_deref().expect("bytes"))
            .expect("whole blocks");
        assert_eq!(back, got.values, "{name}: bytes decode to the values");
        let nearest = repair::nearest("golden", &w, rows, n, target).expect("nearest");
        let same_as_nearest = bit_equal(&nearest.values, &want);
        assert!(
            (same_as_nearest as f64 / want.len() as f64) < GPTQ_MIN_SAME,
            "{name}: round-to-nearest matches the GPTQ reference too often ({same_as_nearest})"
        );
    }
}

fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["precisions"]
        .as_array()
        .expect("precisions")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` row in {}", report["precisions"]))
}

fn close(got: f64, want: f64, what: &str) {
    let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
    assert!(
        rel <= KL_TOLERANCE,
        "{what}: lora-doctor {got:e} vs transformers {want:e} ({:.2} %)",
        rel * 100.0
    );
}

const EVAL: &str = "goldens/repair/eval.txt";

#[test]
fn check_reports_the_kl_transformers_measures_on_the_written_files() {
    let golden = goldens();
    let prompts = fixture(EVAL);
    let (status, report) = check_json_full(
        "models/repair-llama",
        &["adapters/repair-lora"],
        &[
            "--precision",
            "bf16",
            "--repair",
            "gptq,stochastic",
            "--prompts",
            &prompts,
            "--generate",
            "0",
        ],
    );
    assert_ne!(status, 2, "{report}");
    assert_eq!(
        report["inputs"]["tokens"].as_u64(),
        golden["tokens"].as_u64(),
        "the same evaluation tokens"
    );
    close(
        report["adapter_effect"]["mean_kl"]
            .as_f64()
            .expect("effect"),
        golden["base"].as_f64().expect("base"),
        "adapter effect",
    );
    for label in ["bf16", "bf16:repaired", "bf16:stochastic"] {
        let got = row(&report, label)["logits"]["mean_kl"]
            .as_f64()
            .unwrap_or_else(|| panic!("{label} has logits"));
        close(
            got,
            golden["candidates"][label].as_f64().expect("golden"),
            label,
        );
    }
    // The update is far below half a bf16 ulp: the plain merge deletes most of it, GPTQ keeps more.
    let lost = |label: &str| {
        row(&report, label)["logits"]["effect_lost"]
            .as_f64()
            .expect("lost")
    };
    assert!(lost("bf16") > 0.5, "plain bf16 loses {}", lost("bf16"));
    assert!(lost("bf16:repaired") < lost("bf16"));
    // Which texts scored and calibrated the repairs.
    let texts = &report["repair"];
    assert_eq!(texts["evaluation_text"], prompts.as_str());
    assert_eq!(texts["calibration_text"], "built-in calibration text");
    assert!(texts["calibration_tokens"].as_u64().unwrap_or(0) > 0);
    // The best option per format names a candidate that was measured; the report validates.
    let best = report["repair"]["best"].as_array().expect("best options");
    assert_eq!(best.len(), 1, "{best:?}");
    assert_eq!(best[0]["format"], "bf16");
    assert_eq!(best[0]["candidate"], "bf16:repaired");
    assert_eq!(
        super::reports::schema::schema_errors(&report),
        Vec::<String>::new()
    );
    // Repaired rows inform the choice; they never deny the plain merge.
    for f in report["findings"].as_array().expect("findings") {
        if f["precision"].as_str().is_some_and(|p| p.contains(':')) {
            assert_eq!(f["level"], "allow", "{f}");
        }
    }
}

fn merge(precision: &str, format: &str, out: &std::path::Path, repair: Option<&str>) {
    let out_s = out.display().to_string();
    let base = fixture("models/repair-llama");
    let adapter = fixture("adapters/repair-lora");
    let mut args = vec![
        "merge",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--precision",
        precision,
        "--format",
        format,
        "--out",
        &out_s,
        "--quiet",
    ];
    if let Some(method) = repair {
        args.extend(["--repair", method]);
    }
    let merged = run(&args);
    assert_eq!(code(&merged), 0, "{args:?}: {}", stderr(&merged));
}

/// `check --precision P --repair gptq --merged FILE` on the repair fixture's evaluation text: the
/// report holding both the `P:repaired` row `check` scored and the `merged` row of the file.
fn check_gptq_with_merged(precision: &str, merged: &std::path::Path) -> Value {
    let merged = merged.display().to_string();
    let prompts = fixture(EVAL);
    let (status, report) = check_json_full(
        "models/repair-llama",
        &["adapters/repair-lora"],
        &[
            "--precision",
            precision,
            "--repair",
            "gptq",
            "--merged",
            &merged,
            "--prompts",
            &prompts,
            "--generate",
            "0",
        ],
    );
    assert_ne!(status, 2, "{report}");
    report
}

/// `merge --repair` writes the candidate `check --repair` scores: its file, checked as
/// `--merged`, has the KL of the repaired row.
#[test]
fn merge_writes_the_candidate_check_scored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bf16-repaired");
    merge("bf16", "safetensors", &out, Some("gptq"));
    let report = check_gptq_with_merged("bf16", &out);
    let scored = row(&report, "bf16:repaired")["logits"]["mean_kl"]
        .as_f64()
        .expect("repaired row");
    let written = row(&report, "merged")["logits"]["mean_kl"]
        .as_f64()
        .expect("merged row");
    assert!(
        (scored - written).abs() <= KL_TOLERANCE * scored,
        "check scored {scored:e}, the written file gives {written:e}"
    );
}

/// A repaired q4_0 GGUF holds plain Q4_0 blocks in llama.cpp's row order: read back through the
/// GGUF reader (which dequantizes and undoes the q/k row permutation) every tensor stays within
/// a few q4_0 steps of the plain merge's, which a misplaced row or block would not.
#[test]
fn repaired_gguf_blocks_sit_where_llama_cpp_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, repaired) = (
        dir.path().join("plain.gguf"),
        dir.path().join("repaired.gguf"),
    );
    merge("q4_0", "gguf", &plain, None);
    merge("q4_0", "gguf", &repaired, Some("gptq"));
    let open =
        |p: &std::path::Path| lora_doctor::io::checkpoint::Checkpoint::open(p).expect("gguf");
    let (plain, repaired) = (open(&plain), open(&repaired));
    let names: Vec<String> = plain
        .tensors()
        .filter(|t| t.name.contains("proj"))
        .map(|t| t.name.clone())
        .collect();
    assert!(names.len() >= 14, "{names:?}");
    let mut changed = 0;
    for name in &names {
        let a = plain.read_f32(name).expect("plain");
        let b = repaired.read_f32(name).expect("repaired");
        let power: f64 = a.iter().map(|v| f64::from(*v).powi(2)).sum();
        let diff: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum();
        assert!(
            diff < 0.2 * power,
            "{name}: repaired differs like another tensor ({diff} vs {power})"
        );
        changed += usize::from(a != b);
    }
    assert_eq!(changed, names.len(), "every block linear is repaired");
}

/// A llama-quantize mix is repaired tensor by tensor onto the type the mix stores it in (on this
/// 64-wide model every K type falls back: Q4_K → Q5_0, Q6_K → Q8_0): the written GGUF has the
/// plain mix's types and size, and, checked as `--merged`, the KL `check` scored for
/// `q4_k_m:repaired`.
#[test]
fn repaired_mix_gguf_is_the_candidate_check_scored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, repaired) = (
        dir.path().join("plain.gguf"),
        dir.path().join("repaired.gguf"),
    );
    merge("q4_k_m", "gguf", &plain, None);
    merge("q4_k_m", "gguf", &repaired, Some("gptq"));
    let size = |p: &std::path::Path| std::fs::metadata(p).expect("written").len();
    assert_eq!(
        size(&plain),
        size(&repaired),
        "the same types, the same bytes"
    );
    let report = check_gptq_with_merged("q4_k_m", &repaired);
    let kl = |name: &str| {
        row(&report, name)["logits"]["mean_kl"]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} row"))
    };
    let (scored, written, plain) = (kl("q4_k_m:repaired"), kl("merged"), kl("q4_k_m"));
    assert!(
        (scored - written).abs() <= KL_TOLERANCE * scored,
        "check scored {scored:e}, the written file gives {written:e}"
    );
    assert!(scored < plain, "repaired {scored:e} vs plain {plain:e}");
}

#[test]
fn repair_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = fixture("models/repair-llama");
    let adapter = fixture("adapters/repair-lora");
    let out = dir.path().join("x").display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "check",
                "--base",
                &base,
                "--adapter",
                &adapter,
                "--precision",
                "nf4",
                "--repair",
                "gptq",
            ],
            "nf4",
        ),
        (
            &[
                "check",
                "--base",
                &base,
                "--adapter",
                &adapter,
                "--weights-only",
                "--repair",
                "gptq",
            ],
            "--weights-only",
        ),
        (
            &[
                "merge",
                "--base",
                &base,
                "--adapter",
                &adapter,
                "--precision",
                "f32",
                "--repair",
                "gptq",
                "--out",
                &out,
            ],
            "f32",
        ),
        (
            &[
                "merge",
                "--base",
                &base,
                "--adapter",
                &adapter,
                "--precision",
                "bf16",
                "--repair",
                "gptq",
                "--gate",
                "--out",
                &out,
            ],
            "--gate",
        ),
    ];
    for (args, named) in cases {
        let result = run(args);
        assert_eq!(code(&result), 2, "{args:?}: {}", stderr(&result));
        assert!(
            stderr(&result).contains(named),
            "{args:?}: {}",
            stderr(&result)
        );
    }
    assert!(!dir.path().join("x").exists(), "nothing written");
}

/// A repaired tensor obeys the merge's rule: nothing non-finite is written (exit 1, nothing left).
#[test]
fn repaired_overflow_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged").display().to_string();
    let result = run(&[
        "merge",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/exploded"),
        "--precision",
        "f16",
        "--repair",
        "stochastic",
        "--out",
        &out,
    ]);
    assert_eq!(code(&result), 1, "{}", stderr(&result));
    assert!(stderr(&result).contains("overflow"), "{}", stderr(&result));
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
}
