//! Snapshots of what a person reads: `--help` of every subcommand, `explain`, `inspect` and the
//! terminal summary of `check --weights-only` (exit code and both streams). A change in wording
//! or layout shows up as a reviewable diff; accept it with `INSTA_UPDATE=always cargo test
//! snapshots` (or `cargo insta review`) after reading it.
//!
//! Only deterministic output is snapshotted: the weight statistics are computed in f64 in a fixed
//! order, while logits depend on the machine's GEMM kernels and are checked with tolerances
//! elsewhere.

use super::*;

/// Exit code and both streams of one run, as one reviewable text.
fn transcript(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .expect("the binary runs");
    format!(
        "$ lora-doctor {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        code(&out),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    )
    .replace(env!("CARGO_PKG_VERSION"), "[version]")
}

fn snapshot(name: &str, args: &[&str]) {
    insta::with_settings!({ prepend_module_to_snapshot => false, omit_expression => true }, {
        insta::assert_snapshot!(name, transcript(args));
    });
}

#[test]
fn help_of_every_subcommand() {
    snapshot("help", &["--help"]);
    for sub in [
        "check",
        "merge",
        "inspect",
        "explain",
        "init",
        "completions",
    ] {
        snapshot(&format!("help-{sub}"), &[sub, "--help"]);
    }
}

#[test]
fn explain_list_and_one_code() {
    snapshot("explain", &["explain"]);
    snapshot("explain-scale-mismatch", &["explain", "scale-mismatch"]);
    snapshot("explain-unknown", &["explain", "no-such-code"]);
}

#[test]
fn inspect_adapter_and_checkpoint() {
    snapshot(
        "inspect-adapter",
        &["inspect", "fixtures/adapters/llama-lora"],
    );
    snapshot("inspect-base", &["inspect", "fixtures/models/tiny-llama"]);
}

#[test]
fn terminal_summary_of_a_weight_check() {
    snapshot(
        "check-weights",
        &[
            "check",
            "--base",
            "fixtures/models/tiny-llama",
            "--adapter",
            "fixtures/adapters/llama-lora",
            "--precision",
            "f32,bf16,f16,q8_0,q4_0",
            "--weights-only",
        ],
    );
    snapshot(
        "check-weights-failing",
        &[
            "check",
            "--base",
            "fixtures/models/tiny-llama",
            "--adapter",
            "fixtures/adapters/tiny-lr",
            "--precision",
            "bf16",
            "--weights-only",
        ],
    );
}
