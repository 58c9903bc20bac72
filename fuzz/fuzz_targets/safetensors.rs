//! `adapter_model.safetensors` bytes through `Adapter::open` (the safetensors header, offsets,
//! dtypes and the key grammar), then every tensor read as f32 and converted to each deployment
//! precision the way a merge would store it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::adapter::Adapter;
use lora_doctor::merge::precision::Precision;
use lora_doctor_fuzz::{fixtures, put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir("adapter");
    if !dir.join("adapter_config.json").is_file() {
        let config = std::fs::read(fixtures().join("adapters/micro-lora/adapter_config.json"))
            .expect("fixture config");
        put(&dir, "adapter_config.json", &config);
    }
    put(&dir, "adapter_model.safetensors", data);
    let Ok(adapter) = Adapter::open(&dir) else {
        return;
    };
    let grouped: usize = adapter
        .modules
        .values()
        .map(|m| m.tensors.len() + m.extra.len())
        .sum();
    assert_eq!(grouped, adapter.weights.len(), "every tensor lands in one module");
    for (i, info) in adapter.weights.tensors().enumerate() {
        let (_, raw) = adapter.weights.raw(&info.name).expect("a listed tensor has bytes");
        assert_eq!(raw.len(), info.nbytes());
        let Ok(values) = adapter.weights.read_f32(&info.name) else {
            assert!(!info.dtype.is_float(), "float tensors always read");
            continue;
        };
        assert_eq!(values.len(), info.numel());
        let (rows, cols) = match info.shape.as_slice() {
            [r, c] => (*r, *c),
            _ => (1, values.len()),
        };
        let mut out = vec![0f32; values.len()];
        match Precision::ALL[i % Precision::ALL.len()] {
            Precision::Float(format) => {
                for (o, v) in out.iter_mut().zip(&values) {
                    *o = format.round(*v);
                }
            }
            Precision::Quant(format) => {
                let _ = format.fake_quantize(&values, rows, cols, &mut out);
            }
        }
    }
});
