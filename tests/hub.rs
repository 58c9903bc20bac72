//! Hub names (`org/name`) resolved offline from a Hugging Face cache laid out in a temp folder:
//! refs/main, a sha revision, a missing name, a missing revision, HF_HUB_CACHE over HF_HOME, and
//! the hub names in the JSON report.
//!
//! A module of the one integration test binary (`tests/cli.rs`). The caches are built the way
//! `huggingface_hub` builds them: snapshot files are symlinks into `blobs/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::{code, fixture, root, stderr};

const BASE_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const ADAPTER_ID: &str = "user/my-lora";
const MAIN_SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const OLD_SHA: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Copies a fixture folder into `<cache>/models--org--name/snapshots/<sha>/` as blobs plus
/// symlinks, and points `refs/<reference>` at it when given.
fn cache_repo(cache: &Path, repo_id: &str, fixture_rel: &str, sha: &str, reference: Option<&str>) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(sha);
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&snapshot).expect("snapshot folder");
    std::fs::create_dir_all(&blobs).expect("blobs folder");
    for entry in std::fs::read_dir(fixture(fixture_rel)).expect("fixture folder") {
        let entry = entry.expect("fixture entry");
        let name = entry.file_name();
        // One blob per file; the blob name only has to be unique here.
        let blob = blobs.join(format!("{sha}-{}", name.to_string_lossy()));
        std::fs::copy(entry.path(), &blob).expect("copy into blobs");
        let link = snapshot.join(&name);
        // Relative, as huggingface_hub makes them, so the cache can move.
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().expect("blob name")),
            &link,
        )
        .expect("snapshot symlink");
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).expect("snapshot copy");
    }
    if let Some(reference) = reference {
        let refs = repo.join("refs");
        std::fs::create_dir_all(&refs).expect("refs folder");
        std::fs::write(refs.join(reference), sha).expect("ref file");
    }
}

/// Runs the binary with only the given HF variables (HOME pointed at an empty folder, so no
/// developer cache leaks in).
fn run_env(args: &[&str], env: &[(&str, &Path)], home: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-doctor"));
    command.args(args).current_dir(root());
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        command.env_remove(var);
    }
    command.env("HOME", home);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the binary runs")
}

struct Caches {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    home: PathBuf,
}

/// A cache with the tiny-llama base as BASE_ID (refs/main → MAIN_SHA, plus an older snapshot
/// reachable only by sha) and llama-lora as ADAPTER_ID (refs/main).
fn caches() -> Caches {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("hub-cache");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    cache_repo(&cache, BASE_ID, "models/tiny-llama", MAIN_SHA, Some("main"));
    cache_repo(&cache, BASE_ID, "models/tiny-llama-sharded", OLD_SHA, None);
    cache_repo(
        &cache,
        ADAPTER_ID,
        "adapters/llama-lora",
        MAIN_SHA,
        Some("main"),
    );
    Caches {
        _dir: dir,
        cache,
        home,
    }
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {}", stderr(out)))
}

#[test]
fn hub_names_resolve_through_refs_main_and_the_report_names_the_snapshot() {
    let c = caches();
    let out = run_env(
        &[
            "check",
            "--weights-only",
            "--json",
            "-",
            "--base",
            BASE_ID,
            "--adapter",
            ADAPTER_ID,
        ],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_of(&out);
    let snapshot = |id: &str| {
        c.cache
            .join(format!("models--{}", id.replace('/', "--")))
            .join("snapshots")
            .join(MAIN_SHA)
            .display()
            .to_string()
    };
    assert_eq!(report["inputs"]["base"], snapshot(BASE_ID).as_str());
    assert_eq!(
        report["inputs"]["adapters"][0],
        snapshot(ADAPTER_ID).as_str()
    );
    let errors = super::reports::schema::schema_errors(&report);
    assert!(errors.is_empty(), "{errors:#?}");
    let hub = report["inputs"]["hub"].as_array().expect("inputs.hub");
    assert_eq!(hub.len(), 2);
    assert_eq!(hub[0]["flag"], "--base");
    assert_eq!(hub[0]["repo_id"], BASE_ID);
    assert_eq!(hub[0]["revision"], "main");
    assert_eq!(hub[0]["sha"], MAIN_SHA);
    assert_eq!(hub[1]["flag"], "--adapter");
    assert_eq!(hub[1]["repo_id"], ADAPTER_ID);
    let mut bad = report.clone();
    bad["inputs"]["hub"][0]["flag"] = "--elsewhere".into();
    assert!(
        !super::reports::schema::schema_errors(&bad).is_empty(),
        "the schema checks hub entries"
    );
    // The human summary names the hub input too.
    assert!(
        stderr(&out).contains(&format!("{BASE_ID} @ main = {MAIN_SHA}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_sha_revision_maps_to_its_snapshot_without_a_ref() {
    let c = caches();
    let out = run_env(
        &["inspect", BASE_ID, "--revision", OLD_SHA, "--json"],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary = json_of(&out);
    // The old snapshot is the sharded copy: three safetensors shards.
    assert_eq!(summary["files"], 3, "{summary}");
    assert!(
        summary["path"]
            .as_str()
            .expect("path")
            .ends_with(&format!("snapshots/{OLD_SHA}"))
    );
    // refs/main is the single-file copy.
    let out = run_env(
        &["inspect", BASE_ID, "--json"],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json_of(&out)["files"], 1);
}

#[test]
fn a_name_or_revision_not_in_the_cache_exits_2_saying_how_to_download_it() {
    let c = caches();
    let out = run_env(
        &["inspect", "someone/not-cached"],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(err.contains("hf download someone/not-cached"), "{err}");
    assert!(err.contains(&c.cache.display().to_string()), "{err}");

    let out = run_env(
        &[
            "merge",
            "--base",
            BASE_ID,
            "--adapter",
            ADAPTER_ID,
            "--revision",
            "v2",
            "--precision",
            "bf16",
            "--out",
            c.home.join("merged").to_str().expect("utf-8 temp path"),
        ],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("hf download {BASE_ID} --revision v2")),
        "{err}"
    );
    assert!(!c.home.join("merged").exists());

    // A sha with no snapshot is "not cached at that revision", not a broken ref.
    let missing_sha = "f".repeat(40);
    let out = run_env(
        &["inspect", ADAPTER_ID, "--revision", &missing_sha],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("--revision ffff"), "{}", stderr(&out));
}

#[test]
fn hf_hub_cache_wins_over_hf_home_and_home_is_the_last_resort() {
    let c = caches();
    // HF_HOME/hub holds the cache; HF_HUB_CACHE points at an empty folder and must win.
    let hf_home = c.home.join("hf-home");
    std::fs::create_dir_all(&hf_home).expect("hf home");
    std::fs::rename(&c.cache, hf_home.join("hub")).expect("move the cache under HF_HOME");
    let empty = c.home.join("empty-cache");
    std::fs::create_dir_all(&empty).expect("empty cache");

    let only_home = run_env(&["inspect", ADAPTER_ID], &[("HF_HOME", &hf_home)], &c.home);
    assert_eq!(code(&only_home), 0, "{}", stderr(&only_home));
    assert!(String::from_utf8_lossy(&only_home.stdout).contains("r=8"));

    let both = run_env(
        &["inspect", ADAPTER_ID],
        &[("HF_HOME", &hf_home), ("HF_HUB_CACHE", &empty)],
        &c.home,
    );
    assert_eq!(code(&both), 2);
    assert!(stderr(&both).contains(&empty.display().to_string()));

    // Neither set: ~/.cache/huggingface/hub.
    let default = c.home.join(".cache").join("huggingface");
    std::fs::create_dir_all(&default).expect("default cache parent");
    std::fs::rename(hf_home.join("hub"), default.join("hub")).expect("move to the default");
    let fallback = run_env(&["inspect", ADAPTER_ID], &[], &c.home);
    assert_eq!(code(&fallback), 0, "{}", stderr(&fallback));
}

#[test]
fn an_existing_local_path_is_never_looked_up_and_other_names_stay_paths() {
    let c = caches();
    // `fixtures/...` has two slashes: a path, whatever the cache holds.
    let out = run_env(
        &["inspect", "fixtures/adapters/llama-lora"],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // A local folder shaped like a repo id is a path even though the cache has that name.
    let dir = tempfile::tempdir().expect("temp dir");
    let local = dir.path().join("user").join("my-lora");
    std::fs::create_dir_all(&local).expect("local folder");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            Path::new(&fixture("adapters/llama-rslora-patterns")).join(file),
            local.join(file),
        )
        .expect("copy adapter");
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-doctor"));
    let out = command
        .args(["inspect", ADAPTER_ID, "--json"])
        .current_dir(dir.path())
        .env("HF_HUB_CACHE", &c.cache)
        .output()
        .expect("the binary runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        json_of(&out)["path"],
        ADAPTER_ID,
        "the local folder, by its own name"
    );
    // A missing path that is no repo id keeps the ordinary "cannot open" error, no hub hint.
    let out = run_env(
        &["inspect", "no-such-folder"],
        &[("HF_HUB_CACHE", &c.cache)],
        &c.home,
    );
    assert_eq!(code(&out), 2);
    assert!(!stderr(&out).contains("hf download"), "{}", stderr(&out));
}
