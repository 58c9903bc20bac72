//! Names the mistake behind a fitted scale: the factors the known scaling slips produce for one
//! module's rank and alpha (rsLoRA read as plain or applied to a plain adapter, α/r applied twice,
//! α ignored, the division by r forgotten, rank/alpha patterns ignored, the update added twice or
//! subtracted), matched to the measured ŝ/s.

use crate::io::adapter::{AdapterConfig, ModuleScaling, lora_scale};

/// A known scaling mistake and the ŝ/s it produces.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleMistake {
    pub factor: f64,
    /// Stable id of the mistake, the same for every module (`rslora-read-as-plain`, …).
    pub kind: &'static str,
    pub name: String,
}

/// How close (relative, in log space) a measured ratio must be to a mistake's factor to be named.
pub const MATCH_TOLERANCE: f64 = 0.03;

/// Every mistake that applies to a module with this scaling, with its factor ŝ/s.
pub fn candidates(config: &AdapterConfig, module: &ModuleScaling) -> Vec<ScaleMistake> {
    let s = module.scale;
    let r = module.r as f64;
    let mut out = Vec::new();
    let mut add = |factor: f64, kind: &'static str, name: String| {
        if factor.is_finite() && factor != 0.0 && (factor - 1.0).abs() > 1e-9 {
            out.push(ScaleMistake { factor, kind, name });
        }
    };
    if config.use_rslora {
        add(
            lora_scale(module.alpha, module.r, false) / s,
            "rslora-read-as-plain",
            format!(
                "rsLoRA adapter merged with plain α/r scaling (factor 1/√r, r = {})",
                module.r
            ),
        );
    } else {
        add(
            lora_scale(module.alpha, module.r, true) / s,
            "rslora-applied-to-plain",
            format!(
                "plain adapter merged with rsLoRA's α/√r scaling (factor √r, r = {})",
                module.r
            ),
        );
    }
    add(
        s,
        "scale-twice",
        format!("scale applied twice (s² instead of s = {s:.4})"),
    );
    add(
        1.0 / s,
        "alpha-ignored",
        format!("alpha ignored: scale 1 instead of s = {s:.4}"),
    );
    add(
        if config.use_rslora { r.sqrt() } else { r },
        "rank-not-divided",
        format!(
            "scale α = {} used without dividing by the rank",
            module.alpha
        ),
    );
    if module.rank_key.is_some() || module.alpha_key.is_some() {
        let default = lora_scale(config.lora_alpha, config.r, config.use_rslora);
        let which = match (&module.rank_key, &module.alpha_key) {
            (Some(_), Some(_)) => "rank_pattern and alpha_pattern",
            (Some(_), None) => "rank_pattern",
            _ => "alpha_pattern",
        };
        add(
            default / s,
            "pattern-ignored",
            format!(
                "{which} ignored: the default scale {default:.4} used instead of this module's {s:.4}"
            ),
        );
    }
    if config.use_rslora || module.alpha_key.is_some() {
        // convert_lora_to_gguf.py keeps one lora_alpha and each pair's rank; llama.cpp (and so
        // llama-export-lora) scales by alpha / rank.
        add(
            lora_scale(config.lora_alpha, module.r, false) / s,
            "gguf-conversion",
            format!(
                "converted to a llama.cpp GGUF adapter and merged there: lora_alpha/r = {}/{} \
                 instead of this module's {s:.4} (rsLoRA and alpha_pattern are dropped by \
                 convert_lora_to_gguf.py)",
                config.lora_alpha, module.r
            ),
        );
    }
    add(
        2.0,
        "added-twice",
        "update added twice (merged twice)".to_string(),
    );
    add(
        -1.0,
        "subtracted",
        "update subtracted (unmerged instead of merged)".to_string(),
    );
    out
}

/// What a mistake kind is, independent of one module's numbers.
pub fn kind_title(kind: &str) -> &'static str {
    match kind {
        "rslora-read-as-plain" => "rsLoRA adapter merged with plain α/r scaling (factor 1/√r)",
        "rslora-applied-to-plain" => "plain adapter merged with rsLoRA's α/√r scaling (factor √r)",
        "scale-twice" => "scale applied twice (factor s)",
        "alpha-ignored" => "alpha ignored: scale 1 instead of s (factor 1/s)",
        "rank-not-divided" => "scale α used without dividing by the rank (factor r)",
        "pattern-ignored" => "rank_pattern / alpha_pattern ignored (the default scale used)",
        "gguf-conversion" => {
            "merged through a llama.cpp GGUF adapter (lora_alpha/r; rsLoRA and alpha_pattern dropped)"
        }
        "added-twice" => "update added twice (merged twice)",
        "subtracted" => "update subtracted (unmerged instead of merged)",
        _ => "unknown mistake",
    }
}

/// The mistakes whose factor matches `ratio` within [`MATCH_TOLERANCE`]; empty when none does.
pub fn matching(ratio: f64, mistakes: &[ScaleMistake]) -> Vec<ScaleMistake> {
    mistakes
        .iter()
        .filter(|m| {
            m.factor.signum() == ratio.signum()
                && ((ratio / m.factor).ln()).abs() < MATCH_TOLERANCE.ln_1p()
        })
        .cloned()
        .collect()
}

/// The names of [`matching`] mistakes.
pub fn name_scale(ratio: f64, mistakes: &[ScaleMistake]) -> Vec<String> {
    let mut names: Vec<String> = matching(ratio, mistakes)
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(raw: serde_json::Value) -> AdapterConfig {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, raw.to_string()).expect("write");
        AdapterConfig::read(&path).expect("config")
    }

    #[test]
    fn rslora_read_as_plain_is_named_with_one_over_root_r() {
        let c = config(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
            "use_rslora": true, "target_modules": ["q_proj"]}));
        let m = c.scaling_for("model.layers.0.self_attn.q_proj");
        let names = name_scale(0.25, &candidates(&c, &m));
        // Without patterns, llama.cpp's alpha/r after a GGUF conversion is the same factor.
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("plain α/r"), "{names:?}");
        assert!(names[1].contains("llama.cpp GGUF adapter"), "{names:?}");
    }

    #[test]
    fn plain_adapter_with_rslora_scaling_is_named_with_root_r() {
        let c = config(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
            "target_modules": ["q_proj"]}));
        let m = c.scaling_for("q_proj");
        let names = name_scale(4.0, &candidates(&c, &m));
        assert!(names.iter().any(|n| n.contains("α/√r")), "{names:?}");
        // s = 2: "applied twice" and "added twice" are both factor 2 and both named.
        let twice = name_scale(2.01, &candidates(&c, &m));
        assert_eq!(twice.len(), 2, "{twice:?}");
        assert!(name_scale(1.5, &candidates(&c, &m)).is_empty());
        assert_eq!(name_scale(-1.0, &candidates(&c, &m)).len(), 1);
    }

    #[test]
    fn ignored_alpha_pattern_is_named_for_the_pattern_module_only() {
        let c = config(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
            "alpha_pattern": {"v_proj": 32}, "target_modules": ["q_proj", "v_proj"]}));
        let v = c.scaling_for("model.layers.0.self_attn.v_proj");
        let names = name_scale(0.25, &candidates(&c, &v));
        assert!(
            names.iter().any(|n| n.contains("alpha_pattern")),
            "{names:?}"
        );
        let q = c.scaling_for("model.layers.0.self_attn.q_proj");
        assert!(
            !candidates(&c, &q)
                .iter()
                .any(|m| m.name.contains("pattern"))
        );
    }
}
