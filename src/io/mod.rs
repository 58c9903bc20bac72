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
