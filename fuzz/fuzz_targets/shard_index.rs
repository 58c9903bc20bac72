//! `model.safetensors.index.json` bytes next to the three real shards of the
//! tiny-llama-sharded fixture, through `Checkpoint::open` (index JSON, shard names, the
//! index-vs-shard consistency check).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor_fuzz::{fixtures, put, scratch_dir};

const SHARDS: [&str; 3] = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
];

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("sharded");
    for shard in SHARDS {
        if !dir.join(shard).is_file() {
            let bytes = std::fs::read(fixtures().join("models/tiny-llama-sharded").join(shard))
                .expect("fixture shard");
            put(&dir, shard, &bytes);
        }
    }
    put(&dir, "model.safetensors.index.json", data);
    let Ok(checkpoint) = Checkpoint::open(&dir) else {
        return;
    };
    assert!(checkpoint.files().count() <= SHARDS.len());
    for info in checkpoint.tensors() {
        let (_, raw) = checkpoint.raw(&info.name).expect("a listed tensor has bytes");
        assert_eq!(raw.len(), info.nbytes());
    }
});
