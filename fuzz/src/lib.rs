//! Helpers shared by the fuzz targets: a per-process scratch folder (under `$TMPDIR`, which
//! `scripts/fuzz.sh` points at a tmpfs folder it removes afterwards) and the repository's fixtures.
//!
//! Most of lora-doctor's parsers take a path (checkpoints are memory-mapped, the file extension
//! picks the prompt format), so the targets write the fuzzed bytes to a file and call the real
//! entry point rather than a test-only shortcut.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch folder (created once).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lora-doctor-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch folder");
        dir
    })
}

/// A sub-folder of the scratch folder (created once per name).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).expect("create a scratch sub-folder");
    }
    dir
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write a scratch file");
    path
}

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Module paths of the tiny-llama fixture (what adapters for it name), for matching config
/// selectors and patterns against.
pub const TINY_LLAMA_MODULES: &[&str] = &[
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.norm",
    "lm_head",
];
