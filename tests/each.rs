//! `check --each` / `--each-dir`: N independent adapters against one base in one run — exit
//! codes, one report section per adapter in every format, numbers identical to separate runs,
//! and the base's work (open, tokenization, base forward) done once.

use super::*;

/// The logit comparison and the generation check run, small enough to be quick.
const LOGIT_FLAGS: [&str; 4] = ["--max-tokens", "48", "--generate", "3"];

/// `check --json - --base tiny-llama` with `args`, returning (exit code, JSON on stdout).
fn each_json(args: &[&str]) -> (i32, Value) {
    let base = fixture("models/tiny-llama");
    let mut all = vec!["check", "--json", "-", "--base", &base];
    all.extend_from_slice(args);
    let out = run(&all);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}); stderr: {}", stderr(&out));
    });
    (code(&out), json)
}

/// `--each A --each B …` for fixture adapters, then `extra`.
fn each_args(adapters: &[String], extra: &[&'static str]) -> Vec<String> {
    let mut args = Vec::new();
    for a in adapters {
        args.push("--each".to_string());
        args.push(a.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn fixtures(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| fixture(&format!("adapters/{n}")))
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn assert_valid(report: &Value) {
    let errors = crate::reports::schema::each_schema_errors(report);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn every_adapter_passing_exits_0_with_a_section_and_verdict_each_and_the_base_read_once() {
    let adapters = fixtures(&["llama-lora", "llama-layers", "llama-rslora-patterns"]);
    let (status, report) = each_json(&strs(&each_args(&adapters, &LOGIT_FLAGS)));
    assert_eq!(status, 0, "{report:#}");
    assert_valid(&report);
    assert_eq!(report["mode"], "each");
    assert_eq!(report["verdict"], "pass");
    let sections = report["adapters"].as_array().expect("adapters");
    assert_eq!(sections.len(), 3);
    for (section, dir) in sections.iter().zip(&adapters) {
        assert_eq!(section["adapter"], dir.as_str());
        assert_eq!(section["status"], "checked");
        assert_eq!(section["verdict"], "pass");
        assert_eq!(section["report"]["inputs"]["adapters"][0], dir.as_str());
        assert!(section["report"]["adapter_effect"]["mean_kl"].as_f64() > Some(0.0));
    }
    // The schema is not vacuous for this shape either: each change is caught.
    let mutations: [fn(&mut Value); 4] = [
        |r| r["adapters"][0]["status"] = "maybe".into(),
        |r| {
            r.as_object_mut().expect("object").remove("shared");
        },
        |r| r["adapters"][1]["report"]["verdict"] = "maybe".into(),
        |r| r["adapters"] = Value::Array(Vec::new()),
    ];
    for (i, mutate) in mutations.iter().enumerate() {
        let mut bad = report.clone();
        mutate(&mut bad);
        assert!(
            !crate::reports::schema::each_schema_errors(&bad).is_empty(),
            "mutation {i} passed the schema"
        );
    }
    // Counted where the work is done: three adapters, the base's work once.
    assert_eq!(report["shared"]["base_opens"], 1, "{:#}", report["shared"]);
    assert_eq!(
        report["shared"]["tokenizations"], 1,
        "{:#}",
        report["shared"]
    );
    assert_eq!(
        report["shared"]["base_forwards"], 1,
        "{:#}",
        report["shared"]
    );
}

#[test]
fn one_adapter_with_a_deny_finding_fails_the_run_with_exit_1() {
    let adapters = fixtures(&["llama-lora", "nonfinite"]);
    let (status, report) = each_json(&strs(&each_args(&adapters, &["--weights-only"])));
    assert_eq!(status, 1, "{report:#}");
    assert_valid(&report);
    assert_eq!(report["verdict"], "fail");
    assert_eq!(report["adapters"][0]["verdict"], "pass");
    assert_eq!(report["adapters"][1]["verdict"], "fail");
    assert_eq!(
        report["adapters"][1]["report"]["findings"][0]["code"],
        "nonfinite-adapter"
    );
    assert_eq!(
        report["shared"]["base_forwards"], 0,
        "weights only: no forward"
    );
    // --exit-zero forgives a failed gate...
    let mut args = each_args(&adapters, &["--weights-only", "--exit-zero"]);
    args.push("--quiet".into());
    assert_eq!(each_json(&strs(&args)).0, 0);
}

#[test]
fn an_unloadable_adapter_is_a_reported_failure_with_exit_2_never_skipped() {
    let adapters = fixtures(&["llama-lora", "garbage", "llama-layers"]);
    for extra in [
        &["--weights-only"][..],
        &["--weights-only", "--exit-zero"][..],
    ] {
        let mut args = each_args(&adapters, &[]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let (status, report) = each_json(&strs(&args));
        assert_eq!(status, 2, "{extra:?}: {report:#}");
        assert_valid(&report);
        assert_eq!(report["verdict"], "error");
        let broken = &report["adapters"][1];
        assert_eq!(broken["status"], "error");
        assert!(broken["verdict"].is_null() && broken["report"].is_null());
        let why = broken["error"].as_str().expect("error text");
        assert!(why.contains("adapter_model.safetensors"), "{why}");
        // The others are still checked.
        assert_eq!(report["adapters"][0]["verdict"], "pass");
        assert_eq!(report["adapters"][2]["verdict"], "pass");
    }
    // A missing folder likewise.
    let mut missing = fixtures(&["llama-lora"]);
    missing.push(fixture("adapters/does-not-exist"));
    let (status, report) = each_json(&strs(&each_args(&missing, &["--weights-only"])));
    assert_eq!(status, 2);
    assert_eq!(report["adapters"][1]["status"], "error");
}

#[test]
fn each_adapters_numbers_equal_those_of_its_own_run_exactly() {
    // Two adapters sharing the base forward, and one shipping its own tokenizer and resized
    // vocabulary (its own tokens and base forward).
    let adapters = fixtures(&["llama-lora", "llama-layers", "added-tokens"]);
    let mut flags = LOGIT_FLAGS.to_vec();
    flags.extend(["--precision", "f32,bf16,q8_0"]);
    let (_, report) = each_json(&strs(&each_args(&adapters, &flags)));
    assert_valid(&report);
    assert_eq!(
        report["shared"]["base_forwards"], 2,
        "{:#}",
        report["shared"]
    );
    assert_eq!(
        report["shared"]["tokenizations"], 2,
        "{:#}",
        report["shared"]
    );
    for (section, dir) in report["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .zip(&adapters)
    {
        let base = fixture("models/tiny-llama");
        let mut args = vec!["check", "--json", "-", "--base", &base, "--adapter", dir];
        args.extend_from_slice(&flags);
        let out = run(&args);
        let alone: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert!(alone["precisions"][0]["logits"]["mean_kl"].is_f64());
        assert_eq!(
            section["report"], alone,
            "{dir}: not the numbers of its own run"
        );
        assert_eq!(code(&out), if section["verdict"] == "fail" { 1 } else { 0 });
    }
}

#[test]
fn each_dir_checks_every_sub_folder_by_name_and_junit_has_a_suite_per_adapter() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("loras");
    std::fs::create_dir(&dir).expect("mkdir");
    for (name, from) in [
        ("b-layers", "llama-layers"),
        ("a-lora", "llama-lora"),
        ("c-bad", "garbage"),
        ("d-deny", "nonfinite"),
    ] {
        let to = dir.join(name);
        std::fs::create_dir(&to).expect("mkdir");
        for entry in std::fs::read_dir(fixture(&format!("adapters/{from}"))).expect("fixture") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    std::fs::create_dir(dir.join(".cache")).expect("hidden folder");
    let reports = tmp.path().join("report");
    let base = fixture("models/tiny-llama");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--each-dir",
        &dir.display().to_string(),
        "--report-dir",
        &reports.display().to_string(),
        "--max-tokens",
        "32",
        "--generate",
        "0",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("a-lora") && text.contains("not checked"),
        "{text}"
    );

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(reports.join("report.json")).expect("report.json"),
    )
    .expect("JSON");
    assert_valid(&json);
    let names: Vec<String> = json["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| {
            a["adapter"]
                .as_str()
                .expect("name")
                .rsplit('/')
                .next()
                .expect("name")
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        ["a-lora", "b-layers", "c-bad", "d-deny"],
        "sorted, hidden folder skipped"
    );

    let junit = std::fs::read_to_string(reports.join("junit.xml")).expect("junit.xml");
    let doc = crate::reports::junit_and_github::parse_junit(&junit);
    crate::reports::junit_and_github::assert_junit_consistent(&doc);
    assert_eq!(doc.suites.len(), 4, "one testsuite per adapter: {junit}");
    let denied = doc
        .cases
        .iter()
        .filter(|c| c.failure.is_some())
        .map(|c| c.suite.as_str())
        .collect::<Vec<_>>();
    assert!(
        !denied.is_empty() && denied.iter().all(|s| s.ends_with("/d-deny")),
        "{denied:?}"
    );
    for name in &names {
        assert!(junit.contains(&format!(
            "name=\"lora-doctor.each.{}",
            dir.join(name).display()
        )));
    }
    assert!(
        junit.contains("<error message=\"the adapter could not be checked"),
        "{junit}"
    );
    assert!(junit.contains("errors=\"1\""), "{junit}");
    assert!(junit.contains("name=\"structure: structure: "), "{junit}");

    let layers = std::fs::read_to_string(reports.join("layers.csv")).expect("layers.csv");
    assert!(layers.starts_with("adapter,module,precision,"), "{layers}");
    for name in ["a-lora", "b-layers"] {
        assert!(
            layers
                .lines()
                .any(|l| l.contains(&format!("/{name},model.layers.")))
        );
    }
    let tokens = std::fs::read_to_string(reports.join("tokens.csv")).expect("tokens.csv");
    assert!(tokens.starts_with("adapter,position,kl_base,"), "{tokens}");
    let html = std::fs::read_to_string(reports.join("report.html")).expect("report.html");
    let sections: Vec<&str> = html
        .match_indices("<section id=\"adapter-")
        .map(|(i, _)| &html[i..i + 60])
        .collect();
    assert_eq!(sections.len(), 4, "a section per adapter: {sections:#?}");
    assert!(html.contains("data-status=\"error\""));
    let mut ids: Vec<&str> = html
        .match_indices(" id=\"")
        .map(|(i, m)| {
            let rest = &html[i + m.len()..];
            &rest[..rest.find('"').expect("closing quote")]
        })
        .collect();
    let all = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all, "every element id on the page is unique");
    assert!(ids.contains(&"adapter-0-verdict") && ids.contains(&"adapter-1-verdict"));
    let summary = std::fs::read_to_string(reports.join("summary.md")).expect("summary.md");
    assert!(
        summary.contains("NOT CHECKED") && summary.contains("b-layers"),
        "{summary}"
    );
}

#[test]
fn each_refuses_what_it_cannot_mean() {
    let base = fixture("models/tiny-llama");
    let lora = fixture("adapters/llama-lora");
    // Stacking and independent adapters in one run: clap refuses (exit 2).
    let out = run(&[
        "check",
        "--base",
        &base,
        "--each",
        &lora,
        "--adapter",
        &lora,
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    // One adapter twice would be two identical sections.
    let out = run(&["check", "--base", &base, "--each", &lora, "--each", &lora]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("given twice"), "{}", stderr(&out));
    // An empty folder of adapters checks nothing: not a pass.
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--each-dir",
        &tmp.path().display().to_string(),
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("holds no adapter folder"),
        "{}",
        stderr(&out)
    );
    // A bad flag fails before anything is read.
    let out = run(&[
        "check",
        "--base",
        &base,
        "--each",
        &lora,
        "--precision",
        "f33",
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("--precision"), "{}", stderr(&out));
}

#[test]
fn terminal_summary_of_a_weight_check_of_three_adapters() {
    // Weights only: deterministic numbers (f64 in a fixed order), so the summary is a snapshot.
    // stderr carries one line per adapter with its time, so only stdout is kept.
    let args = [
        "check",
        "--weights-only",
        "--base",
        "fixtures/models/tiny-llama",
        "--each",
        "fixtures/adapters/llama-lora",
        "--each",
        "fixtures/adapters/garbage",
        "--each",
        "fixtures/adapters/nonfinite",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs");
    let progress = stderr(&out);
    for line in [
        "[1/3] llama-lora: pass (",
        "[2/3] garbage: error (",
        "[3/3] nonfinite: fail (",
    ] {
        assert!(progress.contains(line), "{progress}");
    }
    let transcript = format!(
        "$ lora-doctor {}\nexit: {}\n--- stdout\n{}",
        args.join(" "),
        code(&out),
        String::from_utf8_lossy(&out.stdout)
    )
    .replace(env!("CARGO_PKG_VERSION"), "[version]");
    insta::with_settings!({ prepend_module_to_snapshot => false, omit_expression => true }, {
        insta::assert_snapshot!("check-each-weights", transcript);
    });
}
