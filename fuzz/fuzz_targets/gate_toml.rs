//! `lora-doctor.toml` text through `GateConfig::parse` (TOML syntax, then the validator that
//! collects every unknown key, code and out-of-range value with its line and column); each line
//! is also tried as a `--threshold NAME[.CLASS]=VALUE` flag.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lora_doctor::findings::Code;
use lora_doctor::findings::Level;
use lora_doctor::findings::thresholds::Thresholds;
use lora_doctor::gate::{GateConfig, GateError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match GateConfig::parse(text, Path::new("lora-doctor.toml")) {
        Ok(config) => {
            for code in Code::ALL {
                let _ = config.levels.level_of(*code, Level::Warn);
            }
        }
        Err(GateError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "an invalid config names a problem");
            let lines = text.split('\n').count();
            for p in &problems {
                assert!(p.line >= 1 && p.line <= lines.max(1), "{p:?} in {lines} lines");
                assert!(p.column >= 1);
            }
        }
        Err(other) => panic!("parsing text cannot fail to read: {other}"),
    }
    for line in text.lines().take(16) {
        let _ = Thresholds::default().apply_override(line);
    }
});
