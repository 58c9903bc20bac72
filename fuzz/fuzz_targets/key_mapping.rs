//! Adapter tensor names (one per line of the input) stored in a real safetensors file, grouped by
//! `Adapter::open`'s key grammar, and each module resolved against the tiny-llama base
//! (`mapping::resolve`, head/embedding detection, the Conv1D rule, the config's selectors).
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::adapter::Adapter;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::mapping::{self, Conv1dRule};
use lora_doctor_fuzz::{fixtures, put, scratch_dir};
use serde_json::{Map, Value, json};

fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        Checkpoint::open(&fixtures().join("models/tiny-llama")).expect("tiny-llama opens")
    })
}

/// A safetensors file holding one F32 scalar per name.
fn safetensors_with(names: &BTreeSet<&str>) -> Vec<u8> {
    let mut header = Map::new();
    for (i, name) in names.iter().enumerate() {
        header.insert(
            (*name).to_string(),
            json!({"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}),
        );
    }
    let header = Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + 4 * names.len(), 0);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let names: BTreeSet<&str> = text
        .lines()
        .filter(|n| *n != "__metadata__")
        .take(64)
        .collect();
    let dir = scratch_dir("keys");
    if !dir.join("adapter_config.json").is_file() {
        let config = std::fs::read(fixtures().join("adapters/llama-lora/adapter_config.json"))
            .expect("fixture config");
        put(&dir, "adapter_config.json", &config);
    }
    put(&dir, "adapter_model.safetensors", &safetensors_with(&names));
    let adapter = Adapter::open(&dir).expect("a well-formed safetensors file with any names opens");
    assert_eq!(adapter.weights.len(), names.len());
    let base = base();
    let conv1d = Conv1dRule::new(None, adapter.config.fan_in_fan_out);
    for (name, module) in &adapter.modules {
        if let Ok(target) = mapping::resolve(name, base) {
            assert!(base.contains(&target.weight()), "a resolved module has a weight");
        }
        let _ = mapping::is_head_module(name);
        let _ = mapping::is_embedding_module(name);
        let _ = conv1d.is_conv1d(name);
        let _ = adapter.config.wraps(name);
        let _ = adapter.config.scaling_for(name);
        let _ = module.tensor_rank();
        let _ = module.is_embedding_lora();
    }
});
