//! `config.json` bytes through `ModelConfig::read_dir` and then `Architecture::from_config`
//! (the forward pass's hyper-parameters, rotary scaling and tensor names) against the tiny-llama
//! base's tensor names.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::mapping::Conv1dRule;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::model::Architecture;
use lora_doctor_fuzz::{fixtures, put, scratch_dir};

fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        Checkpoint::open(&fixtures().join("models/tiny-llama")).expect("tiny-llama opens")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("model");
    put(&dir, "config.json", data);
    let Ok(Some(config)) = ModelConfig::read_dir(&dir) else {
        return;
    };
    let _ = config.quantization_summary();
    let _ = Conv1dRule::new(Some(&config), false).is_conv1d("model.layers.0.attn.c_attn");
    let base = base();
    let Ok(arch) = Architecture::from_config(&config, &|name| base.contains(name)) else {
        return;
    };
    let _ = arch.hidden_size();
    let _ = arch.max_positions();
    let _ = arch.embed_tensors();
    let _ = arch.head_tensors();
    for i in 0..arch.num_layers().min(4) {
        let _ = arch.block_tensors(i);
    }
});
