//! The GitHub Action: `scripts/action-run.sh` (its run step) in a fake GitHub environment — temp
//! `GITHUB_STEP_SUMMARY` and `GITHUB_OUTPUT`, the built binary on PATH — on a passing adapter, a
//! failing one and inputs that cannot be read; and `action.yml` wired to that script (every input
//! used, every variable read, every output written).
//!
//! A module of the one integration test binary (`tests/cli.rs`). The schema validation of
//! action.yml needs Python and lives in `scripts/validate-action.sh` (CI never runs Python).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{code, fixture, root, stderr};

/// What one run of the action script left behind.
struct ActionRun {
    out: Output,
    summary: String,
    outputs: BTreeMap<String, String>,
    report_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// Runs scripts/action-run.sh with these `LD_*` inputs, as the runner would.
fn run_action(inputs: &[(&str, &str)]) -> ActionRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let summary = dir.path().join("step-summary.md");
    let outputs = dir.path().join("github-output");
    // The summary file exists before the step, as on a runner.
    std::fs::write(&summary, "").expect("summary file");
    let report_dir = dir.path().join("lora-report");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .parent()
        .expect("the binary's folder");
    let path = std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    let mut command = Command::new("bash");
    command
        .arg(root().join("scripts/action-run.sh"))
        .current_dir(dir.path())
        .env("PATH", path)
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_OUTPUT", &outputs)
        .env("LD_REPORT_DIR", &report_dir)
        .env_remove("LD_BIN");
    for (k, v) in inputs {
        command.env(k, v);
    }
    let out = command.output().expect("bash runs");
    let outputs = std::fs::read_to_string(&outputs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ActionRun {
        out,
        summary: std::fs::read_to_string(&summary).expect("summary file"),
        outputs,
        report_dir,
        _dir: dir,
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_passing_adapter_passes_with_summary_outputs_and_reports() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let run = run_action(&[
        ("LD_BASE", &base),
        ("LD_ADAPTERS", &format!("\n{adapter}\n")),
        ("LD_PRECISION", "bf16,q8_0"),
        (
            "LD_THRESHOLDS",
            "min-retention.float=0.4\nquant-error.8bit=off",
        ),
        ("LD_WEIGHTS_ONLY", "true"),
        ("LD_ARGS", "--quiet"),
    ]);
    assert_eq!(code(&run.out), 0, "{}", stderr(&run.out));
    assert_eq!(run.outputs["verdict"], "pass", "{:?}", run.outputs);
    assert_eq!(run.outputs["exit-code"], "0");
    assert_eq!(
        run.outputs["report-dir"],
        run.report_dir.display().to_string()
    );
    for file in [
        "report.json",
        "report.html",
        "layers.csv",
        "junit.xml",
        "summary.md",
    ] {
        assert!(run.report_dir.join(file).is_file(), "{file} missing");
    }
    // `--github` appended exactly the report's summary.md to the step summary.
    let summary_md =
        std::fs::read_to_string(run.report_dir.join("summary.md")).expect("summary.md");
    assert_eq!(run.summary, summary_md);
    // Markdown escapes the underscore.
    assert!(run.summary.contains("| bf16 |") && run.summary.contains("| q8\\_0 |"));
    assert!(stdout(&run.out).contains("::notice title=lora-doctor verdict::pass"));
    // Every input reached the command line the script logs.
    let log = stderr(&run.out);
    for flag in [
        "--precision bf16,q8_0",
        "--threshold min-retention.float=0.4 --threshold quant-error.8bit=off",
        "--weights-only",
        "--quiet",
        "--github",
    ] {
        assert!(log.contains(flag), "`{flag}` not passed: {log}");
    }
}

#[test]
fn a_deny_finding_fails_the_step_and_says_fail() {
    let run = run_action(&[
        ("LD_BASE", &fixture("models/tiny-llama")),
        ("LD_ADAPTERS", &fixture("adapters/nonfinite")),
        ("LD_WEIGHTS_ONLY", "true"),
    ]);
    assert_eq!(code(&run.out), 1, "{}", stderr(&run.out));
    assert_eq!(run.outputs["verdict"], "fail");
    assert_eq!(run.outputs["exit-code"], "1");
    assert!(stdout(&run.out).contains("::error title=lora-doctor nonfinite-adapter"));
    assert!(run.summary.contains("nonfinite-adapter"), "{}", run.summary);
    assert!(run.report_dir.join("report.json").is_file());

    // --exit-zero passes the step, but the verdict output still says fail.
    let run = run_action(&[
        ("LD_BASE", &fixture("models/tiny-llama")),
        ("LD_ADAPTERS", &fixture("adapters/nonfinite")),
        ("LD_WEIGHTS_ONLY", "true"),
        ("LD_ARGS", "--exit-zero"),
    ]);
    assert_eq!(code(&run.out), 0);
    assert_eq!(run.outputs["verdict"], "fail");
}

#[test]
fn inputs_that_cannot_be_read_exit_2_with_a_summary_that_says_why() {
    let run = run_action(&[
        ("LD_BASE", "/nonexistent/base-model"),
        ("LD_ADAPTERS", &fixture("adapters/llama-lora")),
        ("LD_WEIGHTS_ONLY", "true"),
    ]);
    assert_eq!(code(&run.out), 2);
    assert_eq!(run.outputs["verdict"], "error");
    assert_eq!(run.outputs["exit-code"], "2");
    assert!(run.summary.contains("could not run"), "{}", run.summary);
    assert!(
        run.summary.contains("/nonexistent/base-model"),
        "{}",
        run.summary
    );
}

/// The top-level keys of one block of action.yml (`inputs:` or `outputs:`).
fn block_keys(yaml: &str, block: &str) -> BTreeSet<String> {
    let key = regex::Regex::new(r"^  ([a-z][a-z-]*):").expect("regex");
    yaml.lines()
        .skip_while(|l| *l != format!("{block}:"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter_map(|l| key.captures(l).map(|c| c[1].to_string()))
        .collect()
}

#[test]
fn action_yml_uses_every_input_and_the_script_reads_and_writes_what_it_declares() {
    let yaml = std::fs::read_to_string(root().join("action.yml")).expect("action.yml");
    let script =
        std::fs::read_to_string(root().join("scripts/action-run.sh")).expect("action-run.sh");
    let inputs = block_keys(&yaml, "inputs");
    assert!(
        inputs.contains("base") && inputs.contains("adapters"),
        "{inputs:?}"
    );
    for input in &inputs {
        assert!(
            yaml.contains(&format!("${{{{ inputs.{input} }}}}"))
                || yaml.contains(&format!("inputs.{input} ")),
            "input `{input}` is declared but never used"
        );
    }
    // Every LD_ variable the action sets is read by the script.
    let env = regex::Regex::new(r"(LD_[A-Z_]+):").expect("regex");
    let vars: BTreeSet<String> = env.captures_iter(&yaml).map(|c| c[1].to_string()).collect();
    assert!(vars.len() >= 10, "{vars:?}");
    for var in &vars {
        assert!(
            script.contains(&format!("${{{var}")),
            "{var} is set by action.yml but not read"
        );
    }
    // Inputs are passed through the environment, never spliced into shell text.
    for line in yaml.lines().filter(|l| l.trim_start().starts_with("run:")) {
        assert!(
            !line.contains("${{"),
            "expression inside a run line: {line}"
        );
    }
    // Every declared output is written by the script, under the step id the outputs read.
    for output in block_keys(&yaml, "outputs") {
        assert!(
            yaml.contains(&format!("steps.check.outputs.{output} }}}}")),
            "{output}"
        );
        assert!(script.contains(&format!("echo \"{output}=")), "{output}");
    }
    assert!(yaml.contains("uses: actions/upload-artifact@v4"));
    assert!(yaml.contains("cargo install --locked --path \"$GITHUB_ACTION_PATH\""));
}
