//! `explain`, `--help` and `inspect`, and the fixtures against their manifest.

use super::*;

#[test]
fn explain_documents_every_code() {
    for code in Code::ALL {
        let out = run(&["explain", code.as_str()]);
        assert_eq!(code_of(&out), 0);
        let text = String::from_utf8_lossy(&out.stdout);
        for heading in ["What it checks", "Why it matters", "How to fix"] {
            assert!(text.contains(heading), "{code}: {text}");
        }
    }
    let index = run(&["explain"]);
    let text = String::from_utf8_lossy(&index.stdout);
    assert!(Code::ALL.iter().all(|c| text.contains(c.as_str())));
    let unknown = run(&["explain", "no-such-code"]);
    assert_eq!(code_of(&unknown), 2);
    assert!(stderr(&unknown).contains("known codes"));
}

fn code_of(out: &Output) -> i32 {
    code(out)
}

#[test]
fn every_subcommand_help_has_examples() {
    for sub in ["check", "inspect", "explain"] {
        let out = run(&[sub, "--help"]);
        assert_eq!(code(&out), 0);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{sub} --help lacks examples"
        );
    }
}

#[test]
fn inspect_reads_headers_of_adapters_and_sharded_checkpoints() {
    let out = run(&[
        "inspect",
        "--json",
        &fixture("adapters/llama-rslora-patterns"),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["use_rslora"], true);
    let modules = summary["modules"].as_array().expect("modules");
    let down = modules
        .iter()
        .find(|m| {
            m["module"]
                .as_str()
                .is_some_and(|n| n.ends_with("layers.0.mlp.down_proj"))
        })
        .expect("a down_proj module");
    // rank_pattern {"down_proj": 4}, alpha 8, rsLoRA: 8 / sqrt(4) = 4.
    assert_eq!(down["r"], 4);
    assert_eq!(down["scale"], 4.0);

    let out = run(&["inspect", &fixture("models/tiny-llama-sharded")]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("BF16") && text.contains("files"), "{text}");
}

#[test]
fn a_single_safetensors_file_is_accepted_as_base() {
    let (exit, report) = check_json(
        "models/tiny-llama/model.safetensors",
        &["adapters/llama-lora"],
    );
    assert_eq!(exit, 0);
    assert_eq!(report["verdict"], "pass");
}

/// Goldens are produced by fixtures/generate.py only; a hand edit changes a hash here.
#[test]
fn fixtures_match_their_manifest() {
    use sha2::{Digest, Sha256};
    let fixtures = root().join("fixtures");
    let manifest =
        std::fs::read_to_string(fixtures.join("MANIFEST.sha256")).expect("MANIFEST.sha256");
    let mut checked = 0;
    for line in manifest.lines().filter(|l| !l.is_empty()) {
        let (digest, rel) = line.split_once("  ").expect("`<sha256>  <path>` lines");
        let bytes = std::fs::read(fixtures.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let actual: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(actual, digest, "{rel} differs from what generate.py wrote");
        checked += 1;
    }
    assert!(checked > 20, "manifest lists only {checked} files");
}
