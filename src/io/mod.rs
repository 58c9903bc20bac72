//! Reading inputs: safetensors checkpoints (mmap, shards) and GGUF files, PEFT adapters, model configs and
//! tokenizer headers, and mapping adapter modules onto base tensors; `hub` turns `org/name` into a
//! snapshot folder of the local Hugging Face cache; `writer` streams merged checkpoints out; `json_file` is the one JSON-file reader.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod expert_params;
pub mod experts;
pub mod gguf;
pub mod hub;
pub mod json_file;
pub mod mapping;
pub mod prompts;
pub mod tokenizer;
pub mod writer;

use std::path::{Path, PathBuf};

/// The folder whose config.json / tokenizer.json describe a base given as a folder or a file.
pub fn base_folder(base: &Path) -> PathBuf {
    if base.is_file() {
        base.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        base.to_path_buf()
    }
}

/// The input folder (or the folder of an input file) that `dir` lies in, if any: outputs are
/// never written inside an input. `dir` must exist (it is resolved through symlinks).
pub fn input_containing(dir: &Path, inputs: &[&Path]) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).ok()?;
    inputs.iter().find_map(|input| {
        let input = std::fs::canonicalize(input).ok()?;
        let folder = if input.is_file() {
            input.parent()?.to_path_buf()
        } else {
            input
        };
        dir.starts_with(&folder).then_some(folder)
    })
}

/// The folder a new file or folder `path` will be created in (`.` for a bare name).
pub fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
