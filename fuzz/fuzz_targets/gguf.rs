//! GGUF bytes through `gguf::parse` (header, every metadata type, nested arrays, tensor table,
//! alignment) and, when they parse, through `Checkpoint::open` as a `.gguf` base: the config and
//! tokenizer rebuilt from the metadata, and every tensor read (dequantized, un-permuted) or refused
//! with an error — never a panic, never an allocation sized by a header claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::gguf;
use lora_doctor_fuzz::{put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = gguf::parse(data) else {
        return;
    };
    for t in &header.tensors {
        assert!(t.start + t.len <= data.len(), "tensor ranges lie inside the file");
    }
    let _ = gguf::config_json(&header, true);
    let _ = gguf::tokenizer::tokenizer_json(&header);
    let path = put(&scratch_dir("gguf"), "model.gguf", data);
    let Ok(ckpt) = Checkpoint::open(&path) else {
        return;
    };
    for info in ckpt.tensors() {
        if let Ok(values) = ckpt.read_f32(&info.name) {
            assert_eq!(values.len(), info.numel());
        }
    }
});
