//! `tokenizer.json` bytes through both readers: `TokenizerInfo::read_dir` (id space, added tokens)
//! and `prompts::tokenize` (the `tokenizers` runtime loads it and encodes two prompts).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::prompts::tokenize;
use lora_doctor::io::tokenizer::TokenizerInfo;
use lora_doctor_fuzz::{put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("tokenizer");
    let path = put(&dir, "tokenizer.json", data);
    let _ = TokenizerInfo::read_dir(&dir);
    let prompts = [
        "The quick brown fox <|im_start|> jumps 42 times.".to_string(),
        "fn main() { println!(\"héllo\"); }\n\n\tdef f(x): return x ** 2".to_string(),
    ];
    if let Ok(tokenized) = tokenize(&path, &prompts, 64, 32) {
        assert!(tokenized.tokens() <= 64);
        assert!(tokenized.sequences.iter().all(|s| s.len() >= 2 && s.len() <= 32));
    }
});
