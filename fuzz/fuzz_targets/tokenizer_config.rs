//! `tokenizer_config.json` bytes as a merged folder's copy, compared with the tiny-llama base's
//! by the config-drift check (`forensics::drift::compare`: special tokens, chat template).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::forensics::drift::{Folders, compare};
use lora_doctor_fuzz::{fixtures, put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let merged = scratch_dir("merged");
    put(&merged, "tokenizer_config.json", data);
    let base = fixtures().join("models/tiny-llama");
    let folders = Folders {
        merged: &merged,
        adapters: vec![],
        base: &base,
    };
    for difference in compare(&folders) {
        assert!(!difference.file.is_empty() && !difference.key.is_empty());
        assert!(difference.expected.chars().count() <= 120);
        assert!(difference.found.chars().count() <= 120);
    }
});
