//! `adapter_config.json` bytes through `AdapterConfig::read`, then the resolved selectors and
//! rank/alpha patterns (and `layers_to_transform`) evaluated on tiny-llama's module paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lora_doctor::io::adapter::AdapterConfig;
use lora_doctor_fuzz::{TINY_LLAMA_MODULES, put, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let path = put(&scratch_dir("config"), "adapter_config.json", data);
    let Ok(config) = AdapterConfig::read(&path) else {
        return;
    };
    assert!(config.r > 0 && config.lora_alpha.is_finite());
    for module in TINY_LLAMA_MODULES {
        let scaling = config.scaling_for(module);
        assert!(scaling.r > 0, "a resolved rank is positive");
        assert!(scaling.scale.is_finite(), "a resolved scale is finite");
        let _ = config.targets(module);
        let _ = config.wraps(module);
    }
});
