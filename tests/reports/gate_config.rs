//! The gate configuration: level overrides, a config file, `init` then edit.

use super::*;

#[test]
fn level_overrides_recompute_every_verdict_and_keep_allowed_findings() {
    let mut report = clean_report().clone();
    let mut warn = Finding::new(
        Code::DeltaSwamped,
        Some("model.layers.1.mlp.down_proj".into()),
        "planted".into(),
    );
    warn.precision = Some("bf16".into());
    report.findings.push(warn);
    gate::recompute_verdicts(&mut report);
    let bf16 = |r: &Report| {
        r.precisions
            .as_ref()
            .and_then(|ps| ps.iter().find(|p| p.name == "bf16"))
            .map(|p| p.verdict)
    };
    assert_eq!(bf16(&report), Some(Verdict::Warn));

    let deny_warnings = LevelOverrides::default()
        .with_flags(&["warnings".into()], &[], &[])
        .expect("valid");
    let mut denied = report.clone();
    gate::apply_gate(&mut denied, &deny_warnings);
    assert_eq!(denied.verdict, Verdict::Fail);
    assert_eq!(bf16(&denied), Some(Verdict::Fail));
    assert_eq!(
        denied.findings[0].level,
        Level::Deny,
        "re-sorted, most severe first"
    );

    let allow = LevelOverrides::default()
        .with_flags(&[], &[], &["delta-swamped".into()])
        .expect("valid");
    let mut allowed = report.clone();
    gate::apply_gate(&mut allowed, &allow);
    assert_eq!(bf16(&allowed), Some(Verdict::Pass));
    assert!(
        allowed
            .findings
            .iter()
            .any(|f| f.code == Code::DeltaSwamped && f.level == Level::Allow),
        "allowed findings stay in the report"
    );
}

#[test]
fn a_config_file_sets_levels_and_thresholds_and_reports_every_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(gate::FILE_NAME);
    let edited = GateConfig::template()
        .replace("# delta-swamped = \"warn\"", "delta-swamped = \"deny\"")
        .replacen("min-retention = 0.5", "min-retention = 0.9", 1);
    std::fs::write(&path, edited).expect("write the config");
    let config = GateConfig::load(&path).expect("the edited template is valid");
    assert_eq!(config.thresholds.float.min_retention, Some(0.9));
    assert_eq!(
        config.levels.codes.get(&Code::DeltaSwamped),
        Some(&Level::Deny)
    );
    assert_eq!(
        GateConfig::find(&[dir.path().to_path_buf()]).as_deref(),
        Some(path.as_path())
    );

    std::fs::write(
        &path,
        "[thresholds.float]\nmin-retention = 2\n[levels]\nnot-a-code = \"deny\"\noverflow = \"loud\"\n",
    )
    .expect("write");
    let message = GateConfig::load(&path).expect_err("invalid").to_string();
    for line in [":2:17: ", ":4:1: ", ":5:12: "] {
        assert!(
            message.contains(line),
            "no problem at {line} in:\n{message}"
        );
    }
}

/// `init` → edit a threshold → `check --config` changes the verdict, through the real binary.
#[test]

fn init_then_edit_a_threshold_changes_the_verdict() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lora-doctor.toml");
    let template = GateConfig::template();
    // bf16's mean KL on this fixture is ~1e-4: below the default deny limit, far above 1e-9.
    let edited = template.replacen("high-kl = 0.01", "high-kl = 1e-9", 1);
    assert_ne!(
        edited, template,
        "the template holds the float high-kl default"
    );
    std::fs::write(&config, edited).expect("write the config");
    let base = fixture_path("models/tiny-llama");
    let adapter = fixture_path("adapters/llama-lora");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "check",
            "--quiet",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--precision",
            "bf16",
            "--max-tokens",
            "64",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
            .args(&args)
            .output()
            .expect("the binary runs")
            .status
            .code()
    };
    assert_eq!(run(&[]), Some(0));
    let config = config.display().to_string();
    assert_eq!(run(&["--config", &config]), Some(1));
}
