//! The one integration test binary: drives the real `lora-doctor` executable on the committed
//! fixtures and checks exit codes, both output streams and the JSON contract.
//!
//! This file holds the helpers every subject module uses; the tests live in one module per subject.

mod action;
mod arch_dense;
mod arch_moe;
mod bad_inputs;
mod contract;
mod docs_and_inspect;
mod each;
mod false_alarms;
mod finding_codes;
mod fuzz_regressions;
mod gguf;
mod gguf_arch;
mod gguf_lora;
mod gguf_merged;
mod hub;
mod kquant;
mod merge_command;
mod merged;
mod mixed;
mod repair;
mod reports;
mod shell;
mod snapshots;

use lora_doctor::findings::Code;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> String {
    root().join("fixtures").join(rel).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally, not by a signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `check --json -` and returns (exit code, parsed report).
fn check_json(base: &str, adapters: &[&str]) -> (i32, Value) {
    check_json_with(base, adapters, &[])
}

/// `check_json` with extra flags (weights only).
fn check_json_with(base: &str, adapters: &[&str], extra: &[&str]) -> (i32, Value) {
    let mut flags = vec!["--weights-only"];
    flags.extend_from_slice(extra);
    check_json_full(base, adapters, &flags)
}

/// `check --json -` with exactly these flags (the logit comparison runs unless they say not to).
fn check_json_full(base: &str, adapters: &[&str], extra: &[&str]) -> (i32, Value) {
    let base = fixture(base);
    let adapter_paths: Vec<String> = adapters.iter().map(|a| fixture(a)).collect();
    let mut args = vec!["check", "--json", "-", "--base", &base];
    args.extend_from_slice(extra);
    for a in &adapter_paths {
        args.push("--adapter");
        args.push(a);
    }
    let out = run(&args);
    assert!(
        !stderr(&out).contains("panicked"),
        "panic on {adapters:?}: {}",
        stderr(&out)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {adapters:?} is not JSON ({e}); stderr: {}",
            stderr(&out)
        )
    });
    (code(&out), json)
}

fn codes(report: &Value) -> BTreeSet<String> {
    report["findings"]
        .as_array()
        .expect("findings is an array")
        .iter()
        .map(|f| f["code"].as_str().expect("code is a string").to_string())
        .collect()
}

fn read_checkpoint(dir: &Path) -> lora_doctor::io::checkpoint::Checkpoint {
    lora_doctor::io::checkpoint::Checkpoint::open(dir).expect("merged checkpoint opens")
}
