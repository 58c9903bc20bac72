//! The CLI contract: exit codes, which stream gets what, atomic outputs, the JSON and CSV
//! reports, the committed example report and the README threshold table.

use super::*;

#[test]
fn json_report_follows_the_contract() {
    let (exit, report) = check_json("models/tiny-llama", &["adapters/nonfinite"]);
    assert_eq!(exit, 1);
    let object = report.as_object().expect("object");
    assert_eq!(
        object.keys().next().map(String::as_str),
        Some("schema_version")
    );
    assert_eq!(
        report["schema_version"],
        lora_doctor::report::SCHEMA_VERSION
    );
    assert_eq!(report["tool_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["verdict"], "fail");
    assert!(report["precisions"].is_null() && report["layers"].is_null());
    assert!(report["adapter_effect"].is_null());
    let finding = &report["findings"][0];
    for field in [
        "code",
        "level",
        "module",
        "message",
        "advice",
        "observed",
        "threshold",
        "precision",
    ] {
        assert!(finding.get(field).is_some(), "finding lacks `{field}`");
    }
    assert_eq!(finding["level"], "deny");
    let message = finding["message"].as_str().expect("message");
    assert!(
        message.contains("3 NaN") && message.contains("1 Inf"),
        "{message}"
    );
    let structure = &report["structure"][0];
    assert!(structure["matched"].as_u64().expect("matched") > 0);
}

#[test]
fn terminal_summary_goes_to_stderr_with_json_on_stdout_and_to_stdout_otherwise() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out = run(&["check", "--base", &base, "--adapter", &adapter]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict: PASS"), "{text}");
    assert!(text.contains("matched"), "{text}");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        "-",
    ]);
    assert!(stderr(&out).contains("verdict: PASS"));
    let quiet = run(&["check", "--quiet", "--base", &base, "--adapter", &adapter]);
    assert!(quiet.stdout.is_empty() && quiet.stderr.is_empty());
}

#[test]
fn exit_zero_overrides_a_failed_gate() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/nonfinite");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--exit-zero",
    ]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: FAIL"));
}

/// Inputs that cannot be checked exit 2 with one `error:` line naming the file, never a panic.
#[test]
fn unreadable_inputs_exit_2_with_a_named_cause() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "models/tiny-llama",
            "adapters/bin-only",
            "adapter_model.bin",
        ),
        ("models/tiny-llama", "adapters/not-lora", "IA3"),
        (
            "models/tiny-llama",
            "adapters/no-config",
            "adapter_config.json",
        ),
        (
            "models/tiny-llama",
            "adapters/truncated",
            "adapter_model.safetensors",
        ),
        (
            "models/tiny-llama",
            "adapters/garbage",
            "adapter_model.safetensors",
        ),
        (
            "models/does-not-exist",
            "adapters/llama-lora",
            "does-not-exist",
        ),
        (
            "models/tiny-llama",
            "adapters/does-not-exist",
            "does-not-exist",
        ),
    ];
    for (base, adapter, needle) in cases {
        let out = run(&[
            "check",
            "--base",
            &fixture(base),
            "--adapter",
            &fixture(adapter),
        ]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{adapter}: {err}");
        assert!(err.starts_with("error: "), "{adapter}: {err}");
        assert!(err.contains(needle), "{adapter}: `{needle}` not in {err}");
        assert!(!err.contains("panicked"), "{adapter}: {err}");
        assert!(out.stdout.is_empty(), "{adapter} printed a report");
    }
}

#[test]
fn a_bad_report_path_fails_before_work_and_inputs_are_never_written() {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        "/nonexistent-dir/report.json",
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("nonexistent-dir"));
    let inside = format!("{adapter}/report.json");
    let out = run(&[
        "check",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--json",
        &inside,
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("input folder"), "{}", stderr(&out));
    assert!(!Path::new(&inside).exists());
}

#[test]
fn json_report_is_written_atomically_to_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.json");
    let out = run(&[
        "check",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/llama-lora"),
        "--json",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert_eq!(report["verdict"], "pass");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "report.json")
        .collect();
    assert!(leftovers.is_empty(), "staging files left: {leftovers:?}");
}

#[test]
fn csv_has_one_row_per_module_and_precision() {
    let out = run(&[
        "check",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/llama-lora"),
        "--precision",
        "bf16,q4_0,nf4",
        "--csv",
        "-",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).expect("utf-8");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    for column in [
        "module",
        "precision",
        "rel_error",
        "rounding_floor",
        "delta_retention",
        "delta_below_half_ulp",
        "snr_db",
        "out_of_range",
    ] {
        assert!(
            header.split(',').any(|c| c == column),
            "no `{column}` in {header}"
        );
    }
    // 14 target modules × 3 precisions; the summary went to stderr.
    assert_eq!(lines.count(), 14 * 3);
    assert!(stderr(&out).contains("verdict: PASS"));
}

/// Splits text into runs of non-numbers and unsigned decimal numbers (`12`, `0.0119`, `1.78e-7`):
/// a sign stays in the text, so it must match exactly.
fn number_runs(text: &str) -> Vec<(bool, &str)> {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let mut j = i;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            if j + 1 < bytes.len() && bytes[j] == b'.' && bytes[j + 1].is_ascii_digit() {
                j += 1;
                while j < bytes.len() && bytes[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if j < bytes.len() && matches!(bytes[j], b'e' | b'E') {
                let mut k = j + 1;
                if k < bytes.len() && matches!(bytes[k], b'-' | b'+') {
                    k += 1;
                }
                if k < bytes.len() && bytes[k].is_ascii_digit() {
                    while k < bytes.len() && bytes[k].is_ascii_digit() {
                        k += 1;
                    }
                    j = k;
                }
            }
            if start < i {
                runs.push((false, &text[start..i]));
            }
            runs.push((true, &text[i..j]));
            start = j;
            i = j;
        } else {
            i += 1;
        }
    }
    if start < text.len() {
        runs.push((false, &text[start..]));
    }
    runs
}

/// Two printed numbers agree within 2 % or one unit of the last digit either prints (a value
/// that moved by 1e-4 relative can still round to a neighbouring last digit). Integers (counts,
/// layer indices) must be equal.
fn printed_close(a: &str, b: &str) -> bool {
    let integer = |t: &str| t.bytes().all(|c| c.is_ascii_digit());
    if integer(a) && integer(b) {
        return a == b;
    }
    let last_unit = |t: &str| -> f64 {
        let (mantissa, exp) = match t.find(['e', 'E']) {
            Some(k) => (&t[..k], t[k + 1..].parse::<i32>().unwrap_or(0)),
            None => (t, 0),
        };
        let decimals = mantissa.find('.').map_or(0, |d| mantissa.len() - d - 1) as i32;
        10f64.powi(exp - decimals)
    };
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => {
            (x - y).abs() <= (2e-2 * x.abs().max(y.abs())).max(last_unit(a).max(last_unit(b)))
        }
        _ => a == b,
    }
}

/// Where two rendered reports differ beyond [`printed_close`]: text must match exactly.
fn first_difference(a: &str, b: &str) -> Option<String> {
    let (ra, rb) = (number_runs(a), number_runs(b));
    let mut offset = 0;
    for (x, y) in ra.iter().zip(&rb) {
        let same = match (x, y) {
            ((true, x), (true, y)) => printed_close(x, y),
            (x, y) => x == y,
        };
        if !same {
            let line = a[..offset].matches('\n').count() + 1;
            return Some(format!("line {line}: `{}` vs `{}`", x.1, y.1));
        }
        offset += x.1.len();
    }
    (ra.len() != rb.len()).then(|| "one is longer".to_string())
}

/// Numbers equal within a relative 1e-3 (absolute 1e-9), everything else exactly.
fn json_close(a: &Value, b: &Value, path: &str, diffs: &mut Vec<String>) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            if (x - y).abs() > 1e-9 + 1e-3 * x.abs().max(y.abs()) {
                diffs.push(format!("{path}: {x} vs {y}"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            if x.keys().ne(y.keys()) {
                diffs.push(format!("{path}: different keys"));
                return;
            }
            for (k, v) in x {
                if k == "tool_version" {
                    continue;
                }
                json_close(v, &y[k], &format!("{path}.{k}"), diffs);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_close(v, w, &format!("{path}[{i}]"), diffs);
            }
        }
        _ if a == b => {}
        _ => diffs.push(format!("{path}: {a} vs {b}")),
    }
}

/// reports/example is what the README's documented command writes; regenerate it with
/// `cargo run --release -- check --base fixtures/models/tiny-llama --adapter
/// fixtures/adapters/llama-lora --precision all --report-dir reports/example`.
#[test]
fn printed_numbers_compare_by_value_and_text_exactly() {
    assert!(first_difference("kl 0.0119 nats", "kl 0.0118 nats").is_none());
    assert!(first_difference("kl 1.78e-7", "kl 1.80e-7").is_none());
    assert!(first_difference("layers.3.q", "layers.3.q").is_none());
    assert!(first_difference("layers.3.q", "layers.4.q").is_some());
    assert!(first_difference("kl 0.0119 nats", "kl 0.0150 nats").is_some());
    assert!(first_difference("PASS 0.1", "FAIL 0.1").is_some());
    assert!(first_difference("-0.5", "0.5").is_some());
}

#[test]
fn committed_example_report_matches_what_the_command_produces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("example");
    let out_s = out_dir.display().to_string();
    let result = run(&[
        "check",
        "--quiet",
        "--base",
        "fixtures/models/tiny-llama",
        "--adapter",
        "fixtures/adapters/llama-lora",
        "--precision",
        "all",
        "--report-dir",
        &out_s,
    ]);
    assert_eq!(code(&result), 0, "{}", stderr(&result));
    let committed = root().join("reports/example");
    let read = |d: &Path, f: &str| {
        std::fs::read_to_string(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let mut diffs = Vec::new();
    let fresh: Value = serde_json::from_str(&read(&out_dir, "report.json")).expect("JSON");
    let old: Value = serde_json::from_str(&read(&committed, "report.json")).expect("JSON");
    json_close(&fresh, &old, "report", &mut diffs);
    for file in ["layers.csv", "report.html", "summary.md", "junit.xml"] {
        let a = read(&out_dir, file).replace(env!("CARGO_PKG_VERSION"), "V");
        let b = read(&committed, file).replace(env!("CARGO_PKG_VERSION"), "V");
        if let Some(at) = first_difference(&a, &b) {
            diffs.push(format!("{file}: {at}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "reports/example is stale; regenerate it (see the README):\n{}",
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An architecture without a forward pass cannot give the logit comparison that was asked for:
/// exit 2 naming the way out; with --weights-only the weight checks run and the report says why
/// logits were skipped.
#[test]
fn unknown_architecture_needs_weights_only_for_a_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("mystery-llama");
    std::fs::create_dir(&base).expect("mkdir");
    let src = root().join("fixtures/models/tiny-llama");
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(file), base.join(file)).expect("copy");
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("config"))
            .expect("JSON");
    config["model_type"] = Value::String("mystery".into());
    std::fs::write(base.join("config.json"), config.to_string()).expect("write config");
    let base_s = base.display().to_string();
    let adapter = fixture("adapters/llama-lora");
    let args = [
        "check",
        "--json",
        "-",
        "--base",
        &base_s,
        "--adapter",
        &adapter,
    ];
    let out = run(&args);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("mystery"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--weights-only"), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "no report for a check that could not run"
    );

    let mut weights_only = args.to_vec();
    weights_only.push("--weights-only");
    let out = run(&weights_only);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["logits_skipped"], "--weights-only");
    assert!(report["adapter_effect"].is_null());
    assert!(report["layers"].as_array().is_some_and(|l| !l.is_empty()));
    assert!(stderr(&out).contains("checked: structure, weights"));
}

/// The README's threshold table is the registry's, row for row (one source of truth per name).
#[test]
fn readme_threshold_table_is_the_registry() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let table = lora_doctor::findings::thresholds::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's threshold table differs from the registry; paste this:\n{table}"
    );
}
