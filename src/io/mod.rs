//! Reading inputs: safetensors checkpoints (mmap, shards), PEFT adapters, model configs and
//! tokenizer headers, and mapping adapter modules onto base tensors; `hub` turns `org/name` into a
//! snapshot folder of the local Hugging Face cache; `writer` streams merged checkpoints out.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod hub;
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
