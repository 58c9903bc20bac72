//! Bad inputs, as a new user produces them: one table of input mutations, each run through the
//! real binary in a scratch workspace (copies of the fixtures), with the expected exit code and
//! finding code or message fragment. Every case also proves that no input file changed (sha256
//! before and after) and that nothing was left behind in the report folder or the working folder.
//!
//! A module of the one integration test binary (`tests/cli.rs`). Add a row for every future bug
//! of this kind: a gate that passes what it did not check is the worst failure lora-doctor has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A scratch copy of the inputs one case runs on.
struct Workspace {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Workspace {
    /// Copies `base` and `adapter` (fixture paths) into `base/` and `adapter/`, plus an optional
    /// merged folder into `merged/`; makes the empty `reports/` and `cwd/` folders.
    fn new(base: &str, adapter: &str, merged: Option<&str>) -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        copy_dir(&fixtures.join(base), &root.join("base"));
        copy_dir(&fixtures.join(adapter), &root.join("adapter"));
        if let Some(m) = merged {
            copy_dir(&fixtures.join(m), &root.join("merged"));
        }
        for d in ["reports", "cwd"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        Workspace { _dir: dir, root }
    }

    fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// Rewrites a JSON file of the workspace.
    fn edit_json(&self, rel: &str, edit: impl FnOnce(&mut Value)) {
        let path = self.root.join(rel);
        let mut value: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        edit(&mut value);
        std::fs::write(&path, value.to_string()).expect("write");
    }

    fn remove(&self, rel: &str) {
        std::fs::remove_file(self.root.join(rel)).expect("remove");
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.root.join(rel), text).expect("write");
    }

    /// sha256 of every file of the input folders.
    fn input_hashes(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for folder in ["base", "adapter", "merged"] {
            hash_tree(&self.root.join(folder), &self.root, &mut out);
        }
        out
    }

    fn leftovers(&self, folder: &str) -> Vec<String> {
        std::fs::read_dir(self.root.join(folder))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn hash_tree(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            hash_tree(&path, root, out);
        } else {
            let digest = Sha256::digest(std::fs::read(&path).expect("read"));
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            out.insert(rel, digest.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
}

/// What a case must produce.
enum Expect {
    /// This finding code in the JSON report on stdout (the case passes `--json -`).
    Code(&'static str),
    /// This fragment in stderr (errors, notes) or stdout.
    Text(&'static str),
}

struct Case {
    name: &'static str,
    base: &'static str,
    adapter: &'static str,
    merged: Option<&'static str>,
    /// Changes the copied inputs before the run.
    mutate: fn(&Workspace),
    /// The command line after `lora-doctor`; `{base}`, `{adapter}`, `{merged}`, `{reports}` are
    /// workspace paths.
    args: &'static [&'static str],
    exit: i32,
    expect: Expect,
    /// Files the run must leave in `reports/` (everything else there is a leftover).
    reports: &'static [&'static str],
}

const LLAMA: &str = "models/tiny-llama";
const LORA: &str = "adapters/llama-lora";
const CHECK_JSON: &[&str] = &[
    "check",
    "--base",
    "{base}",
    "--adapter",
    "{adapter}",
    "--json",
    "-",
];

fn none(_: &Workspace) {}

fn cases() -> Vec<Case> {
    let check = |extra: &'static [&'static str]| -> &'static [&'static str] {
        let mut v: Vec<&'static str> = CHECK_JSON.to_vec();
        v.extend_from_slice(extra);
        Vec::leak(v)
    };
    let case = |name, mutate, args, exit, expect| Case {
        name,
        base: LLAMA,
        adapter: LORA,
        merged: None,
        mutate,
        args,
        exit,
        expect,
        reports: &[],
    };
    vec![
        // Flags that check nothing.
        case(
            "an empty --precision",
            none,
            check(&["--weights-only", "--precision", ""]),
            2,
            Expect::Text("names no precision"),
        ),
        case(
            "a --precision of only commas",
            none,
            check(&["--weights-only", "--precision", ",,"]),
            2,
            Expect::Text("names no precision"),
        ),
        case(
            "--threads 0",
            none,
            check(&["--weights-only", "--threads", "0"]),
            2,
            Expect::Text("--threads must be at least 1"),
        ),
        case(
            "--threads far above the cores is clamped with a note",
            none,
            &[
                "check",
                "--base",
                "{base}",
                "--adapter",
                "{adapter}",
                "--weights-only",
                "--threads",
                "100000",
            ],
            0,
            Expect::Text("more than the"),
        ),
        // adapter_config.json that PEFT refuses or that selects nothing.
        case(
            "target_modules an invalid regex",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["target_modules"] = "(q_proj".into();
                })
            },
            check(&["--weights-only"]),
            2,
            Expect::Text("(q_proj"),
        ),
        case(
            "target_modules selecting no module",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["target_modules"] = serde_json::json!(["nonexistent_proj"]);
                })
            },
            check(&["--weights-only"]),
            1,
            Expect::Code("no-match"),
        ),
        case(
            "layers_to_transform selecting no layer",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["layers_to_transform"] = serde_json::json!([7]);
                    c["layers_pattern"] = "layers".into();
                })
            },
            check(&["--weights-only"]),
            1,
            Expect::Code("no-match"),
        ),
        case(
            "exclude_modules excluding every module",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["exclude_modules"] = ".*".into();
                })
            },
            check(&["--weights-only"]),
            1,
            Expect::Code("no-match"),
        ),
        case(
            "lora_alpha 0",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["lora_alpha"] = 0.into();
                })
            },
            check(&[]),
            1,
            Expect::Code("untrained-adapter"),
        ),
        case(
            "a negative lora_alpha",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c["lora_alpha"] = (-16).into();
                })
            },
            check(&["--weights-only"]),
            0,
            Expect::Code("negative-scale"),
        ),
        case(
            "adapter_config.json without peft_type",
            |w| {
                w.edit_json("adapter/adapter_config.json", |c| {
                    c.as_object_mut().expect("object").remove("peft_type");
                })
            },
            check(&["--weights-only"]),
            2,
            Expect::Text("peft_type"),
        ),
        case(
            "adapter_config.json that is {}",
            |w| w.write("adapter/adapter_config.json", "{}"),
            check(&["--weights-only"]),
            2,
            Expect::Text("peft_type"),
        ),
        // A requested logit comparison that cannot run is not a pass.
        case(
            "a base without config.json",
            |w| w.remove("base/config.json"),
            check(&[]),
            2,
            Expect::Text("add --weights-only"),
        ),
        case(
            "a base without config.json, weights only",
            |w| w.remove("base/config.json"),
            check(&["--weights-only"]),
            0,
            Expect::Text("checked: structure, weights (f32)"),
        ),
        case(
            "an unknown model_type",
            |w| {
                w.edit_json("base/config.json", |c| {
                    c["model_type"] = "mystery".into();
                })
            },
            check(&[]),
            2,
            Expect::Text("add --weights-only"),
        ),
        case(
            "a base without a tokenizer",
            |w| w.remove("base/tokenizer.json"),
            check(&[]),
            2,
            Expect::Text("--weights-only"),
        ),
        // Outputs that would lose a report.
        case(
            "--json and --csv on one file",
            none,
            &[
                "check",
                "--base",
                "{base}",
                "--adapter",
                "{adapter}",
                "--weights-only",
                "--json",
                "{reports}/out",
                "--csv",
                "{reports}/out",
            ],
            2,
            Expect::Text("both write"),
        ),
        case(
            "--json naming report-dir's own report.json",
            none,
            &[
                "check",
                "--base",
                "{base}",
                "--adapter",
                "{adapter}",
                "--weights-only",
                "--json",
                "{reports}/report.json",
                "--report-dir",
                "{reports}",
            ],
            2,
            Expect::Text("both write"),
        ),
        case(
            "--json pointing at a folder",
            none,
            &[
                "check",
                "--base",
                "{base}",
                "--adapter",
                "{adapter}",
                "--weights-only",
                "--json",
                "{reports}",
            ],
            2,
            Expect::Text("is a folder"),
        ),
        // Double-precision adapters are legal.
        Case {
            reports: &["report.json"],
            ..case(
                "an adapter stored in F64",
                to_f64_adapter,
                &[
                    "check",
                    "--base",
                    "{base}",
                    "--adapter",
                    "{adapter}",
                    "--weights-only",
                    "--json",
                    "{reports}/report.json",
                ],
                0,
                Expect::Text("checked: structure, weights"),
            )
        },
        // --merged folders that no runtime loads.
        Case {
            base: "models/micro-llama",
            adapter: "adapters/micro-lora",
            merged: Some("merged/llama-peft-bf16"),
            ..case(
                "a merged folder without config.json",
                |w| w.remove("merged/config.json"),
                check(&["--weights-only", "--merged", "{merged}"]),
                1,
                Expect::Code("config-drift"),
            )
        },
        Case {
            base: "models/micro-llama",
            adapter: "adapters/micro-lora",
            merged: Some("merged/llama-peft-bf16"),
            ..case(
                "a merged folder with an invalid generation_config.json",
                |w| w.write("merged/generation_config.json", "{not json"),
                check(&["--weights-only", "--merged", "{merged}"]),
                0,
                Expect::Text("invalid"),
            )
        },
        Case {
            base: "models/micro-llama",
            adapter: "adapters/micro-lora",
            merged: Some("merged/llama-peft-f32"),
            ..case(
                "a merged checkpoint stored in F64",
                to_f64_merged,
                check(&["--weights-only", "--merged", "{merged}"]),
                0,
                Expect::Text("merged-checkpoint forensics"),
            )
        },
        Case {
            // micro-llama ships no tokenizer.json.
            base: "models/micro-llama",
            adapter: "adapters/micro-lora",
            merged: Some("merged/llama-peft-bf16"),
            ..case(
                "--merged on a base without a tokenizer",
                none,
                check(&["--merged", "{merged}"]),
                2,
                Expect::Text("--weights-only"),
            )
        },
        // Adapters no loader reads (the structural exit-2 cases, with the same guarantees).
        Case {
            adapter: "adapters/bin-only",
            ..case(
                "a pickle-only adapter",
                none,
                check(&[]),
                2,
                Expect::Text("adapter_model.bin"),
            )
        },
        Case {
            adapter: "adapters/not-lora",
            ..case("an IA3 adapter", none, check(&[]), 2, Expect::Text("IA3"))
        },
        Case {
            adapter: "adapters/truncated",
            ..case(
                "a truncated adapter",
                none,
                check(&[]),
                2,
                Expect::Text("adapter_model.safetensors"),
            )
        },
        Case {
            adapter: "adapters/garbage",
            ..case(
                "a garbage adapter",
                none,
                check(&[]),
                2,
                Expect::Text("adapter_model.safetensors"),
            )
        },
        case(
            "an adapter without adapter_config.json",
            |w| w.remove("adapter/adapter_config.json"),
            check(&[]),
            2,
            Expect::Text("adapter_config.json"),
        ),
        // merge never writes what it would not ship.
        Case {
            base: "models/micro-llama",
            adapter: "adapters/micro-exploded",
            ..case(
                "an f16 merge that overflows",
                none,
                &[
                    "merge",
                    "--base",
                    "{base}",
                    "--adapter",
                    "{adapter}",
                    "--precision",
                    "f16",
                    "--out",
                    "{reports}/merged",
                ],
                1,
                Expect::Text("nothing was written"),
            )
        },
    ]
}

/// Finding codes the table raises (for the every-code-has-a-fixture test).
pub fn raised_codes() -> Vec<&'static str> {
    cases()
        .into_iter()
        .filter_map(|c| match c.expect {
            Expect::Code(code) => Some(code),
            Expect::Text(_) => None,
        })
        .collect()
}

/// Rewrites the adapter's safetensors with every tensor in F64.
fn to_f64_adapter(w: &Workspace) {
    to_f64(&w.root.join("adapter/adapter_model.safetensors"));
}

/// Rewrites a merged checkpoint's safetensors with every tensor in F64.
fn to_f64_merged(w: &Workspace) {
    to_f64(&w.root.join("merged/model.safetensors"));
}

/// Rewrites a safetensors file with every float tensor widened to F64 (values unchanged).
fn to_f64(path: &Path) {
    let bytes = std::fs::read(path).expect("read");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut converted: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in tensors.tensors() {
        let values: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            safetensors::Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            safetensors::Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            other => panic!("{name}: fixture dtype {other:?}"),
        };
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        converted.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = converted
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F64, shape.clone(), data)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write F64 tensors");
}

fn substitute(arg: &str, w: &Workspace) -> String {
    arg.replace("{base}", &w.path("base"))
        .replace("{adapter}", &w.path("adapter"))
        .replace("{merged}", &w.path("merged"))
        .replace("{reports}", &w.path("reports"))
}

fn run_in(w: &Workspace, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(args)
        .current_dir(w.root.join("cwd"))
        .output()
        .expect("the binary runs")
}

#[test]
fn bad_inputs_never_pass_silently_and_never_touch_inputs() {
    let mut failures = Vec::new();
    for case in cases() {
        let w = Workspace::new(case.base, case.adapter, case.merged);
        (case.mutate)(&w);
        let before = w.input_hashes();
        let args: Vec<String> = case.args.iter().map(|a| substitute(a, &w)).collect();
        let out = run_in(&w, &args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let code = out.status.code();
        let mut problems = Vec::new();
        if code != Some(case.exit) {
            problems.push(format!("exit {code:?}, expected {}", case.exit));
        }
        if stderr.contains("panicked") {
            problems.push("panicked".into());
        }
        match &case.expect {
            Expect::Code(wanted) => {
                let report: Option<Value> = serde_json::from_str(&stdout).ok();
                let found: Vec<String> = report
                    .as_ref()
                    .and_then(|r| r["findings"].as_array())
                    .map(|f| {
                        f.iter()
                            .filter_map(|f| f["code"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if !found.iter().any(|c| c == wanted) {
                    problems.push(format!("no `{wanted}` finding (found {found:?})"));
                }
            }
            Expect::Text(fragment) => {
                if !stderr.contains(fragment) && !stdout.contains(fragment) {
                    problems.push(format!("`{fragment}` not in the output"));
                }
            }
        }
        if w.input_hashes() != before {
            problems.push("an input file changed".into());
        }
        let mut left = w.leftovers("reports");
        left.retain(|f| !case.reports.contains(&f.as_str()));
        if !left.is_empty() {
            problems.push(format!("left in the report folder: {left:?}"));
        }
        let cwd = w.leftovers("cwd");
        if !cwd.is_empty() {
            problems.push(format!("left in the working folder: {cwd:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                case.name,
                problems.join("; "),
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The header counts what is merged, not what resolved.
#[test]
fn the_structure_counts_only_modules_the_merge_uses() {
    let w = Workspace::new(LLAMA, LORA, None);
    w.edit_json("adapter/adapter_config.json", |c| {
        c["target_modules"] = serde_json::json!(["q_proj"]);
    });
    let args: Vec<String> = CHECK_JSON
        .iter()
        .chain(&["--weights-only"])
        .map(|a| substitute(a, &w))
        .collect();
    let out = run_in(&w, &args);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let structure = &report["structure"][0];
    let modules = structure["modules"].as_array().expect("modules").len();
    // tiny-llama has 2 layers; only their q_proj are selected.
    assert_eq!(structure["matched"], 2, "{structure}");
    assert!(modules > 2);
    let layers = report["layers"].as_array().expect("layers");
    assert!(
        layers
            .iter()
            .all(|l| l["module"].as_str().is_some_and(|m| m.ends_with("q_proj"))),
        "only selected modules are merged"
    );
}

/// `init --out -` prints the document and nothing else, so it can be redirected into a file the
/// gate reads back.
#[test]
fn init_to_stdout_is_only_the_document() {
    let w = Workspace::new(LLAMA, LORA, None);
    let out = run_in(&w, &["init".into(), "--out".into(), "-".into()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(!text.contains("wrote"), "{text}");
    let parsed = lora_doctor::gate::GateConfig::parse(&text, Path::new("stdout.toml"));
    assert!(parsed.is_ok(), "{:?}", parsed.err());
    assert!(w.leftovers("cwd").is_empty());
}

/// SIGTERM while reports are reserved: the staging files are removed and the exit is 130.
#[test]
fn an_interrupted_check_leaves_no_staging_files() {
    let w = Workspace::new("models/tiny-llama-deep", "adapters/deep-lora", None);
    let args: Vec<String> = [
        "check",
        "--base",
        "{base}",
        "--adapter",
        "{adapter}",
        "--precision",
        "all",
        "--generate",
        "64",
        "--quiet",
        "--report-dir",
        "{reports}",
    ]
    .iter()
    .map(|a| substitute(a, &w))
    .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(&args)
        .current_dir(w.root.join("cwd"))
        .spawn()
        .expect("spawn");
    // Wait until the reports are reserved (staging files exist), then interrupt.
    let start = std::time::Instant::now();
    let reserved = loop {
        if w.leftovers("reports")
            .iter()
            .any(|f| f.starts_with(".lora-doctor-"))
        {
            break true;
        }
        if child.try_wait().expect("wait").is_some() || start.elapsed().as_secs() > 60 {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(
        reserved,
        "the check ended before its reports were seen reserved"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    let left = w.leftovers("reports");
    assert!(
        status.code() == Some(130),
        "exit {status:?} (the run may have finished before the signal); left: {left:?}"
    );
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// One word, one meaning: `--help` lists every threshold name the CLI accepts, and `explain`
/// says when a code's level depends on a threshold.
#[test]
fn help_and_explain_use_the_registry_names_and_levels() {
    let w = Workspace::new(LLAMA, LORA, None);
    let help = run_in(&w, &["check".into(), "--help".into()]);
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for def in lora_doctor::findings::thresholds::THRESHOLDS {
        assert!(
            help.contains(def.name),
            "`check --help` lacks `{}`",
            def.name
        );
    }
    let explain = run_in(&w, &["explain".into(), "high-kl".into()]);
    let page = String::from_utf8_lossy(&explain.stdout).into_owned();
    assert!(
        page.contains("warn or deny") && page.contains("high-kl-warn"),
        "{page}"
    );
    let index = run_in(&w, &["explain".into()]);
    let index = String::from_utf8_lossy(&index.stdout).into_owned();
    // Every row's summary starts in the same column, however long the code.
    let columns: std::collections::BTreeSet<usize> = index
        .lines()
        .skip(1)
        .filter_map(|l| {
            let code = l.split_whitespace().next()?;
            let doc = lora_doctor::findings::Code::parse(code)?.doc();
            l.find(doc.summary)
        })
        .collect();
    assert_eq!(columns.len(), 1, "misaligned explain index:\n{index}");
}
