//! `--prompts` files through `read_prompts`: the first input byte picks `.txt` (paragraphs) or
//! `.jsonl` (a `text` field per line), the rest is the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::prompts::read_prompts;
use lora_doctor_fuzz::{put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let name = if selector & 1 == 0 { "prompts.txt" } else { "prompts.jsonl" };
    let path = put(&scratch_dir("prompts"), name, body);
    if let Ok(prompts) = read_prompts(&path) {
        assert!(!prompts.is_empty(), "Ok means at least one prompt");
        let total: usize = prompts.iter().map(String::len).sum();
        assert!(total <= body.len(), "prompts come from the file");
    }
});
