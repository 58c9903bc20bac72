//! `adapter-conversion`: a llama.cpp LoRA GGUF against the PEFT adapter it was converted from.
//!
//! `convert_lora_to_gguf.py` writes one `adapter.lora.alpha` and keeps each pair's rank, and
//! llama.cpp scales every pair by alpha / rank. So PEFT's `use_rslora` (alpha / √r) and
//! `alpha_pattern` are lost in conversion: the GGUF applies the update at another strength than
//! the one trained. This module compares, module by module, the scale each side applies, which
//! modules each side has, and the A/B values (the same adapter, up to the conversion's rounding).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Code, Finding, Level, quoted_examples};
use crate::io::adapter::{Adapter, CONFIG_FILE, TensorRole, WEIGHTS_FILE};
use crate::io::checkpoint::CheckpointError;

/// Two scales agree when their ratio is within this of 1 (both are f64 arithmetic on the same
/// alpha and rank; anything larger is a different formula).
const SCALE_TOLERANCE: f64 = 1e-6;
/// A/B factors agree when ‖gguf − peft‖ / ‖peft‖ stays below this: far above the rounding of any
/// converter output type (f16 ≈ 5e-4, bf16 ≈ 4e-3, q8_0 < 1e-2 relative), far below a different
/// adapter (≈ 1.4 for independent factors).
const VALUE_TOLERANCE: f64 = 2e-2;

/// The PEFT folder a GGUF adapter lies in, when it holds a PEFT adapter (the converter's default
/// output place is the LoRA folder itself).
pub fn peft_folder_beside(gguf: &Path) -> Option<PathBuf> {
    let dir = gguf.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    (dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file()).then(|| dir.into())
}

/// Why PEFT's scale for `module` is not alpha / r, in the words a user can act on.
fn cause(peft: &Adapter, module: &str) -> String {
    let scaling = peft.config.scaling_for(module);
    let mut causes = Vec::new();
    if peft.config.use_rslora {
        causes.push(format!(
            "use_rslora (PEFT scales by lora_alpha/√r = {}/√{}, llama.cpp by alpha/r)",
            scaling.alpha, scaling.r
        ));
    }
    if let Some(key) = scaling.alpha_key {
        causes.push(format!(
            "alpha_pattern `{key}` = {} (the converter keeps only lora_alpha = {})",
            scaling.alpha, peft.config.lora_alpha
        ));
    }
    if causes.is_empty() {
        "a lora_alpha or rank that differs from the PEFT config".to_string()
    } else {
        causes.join(" and ")
    }
}

/// Relative L2 difference of two tensors of the same length (`None` when lengths differ).
fn relative_difference(gguf: &[f32], peft: &[f32]) -> Option<f64> {
    if gguf.len() != peft.len() {
        return None;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (g, p) in gguf.iter().zip(peft) {
        diff += (f64::from(*g) - f64::from(*p)).powi(2);
        norm += f64::from(*p).powi(2);
    }
    Some(if norm > 0.0 {
        (diff / norm).sqrt()
    } else if diff > 0.0 {
        f64::INFINITY
    } else {
        0.0
    })
}

/// Compares the GGUF adapter with the PEFT adapter beside it. Findings name the modules, the
/// factor and the cause; an empty list means llama.cpp applies what PEFT applies.
pub fn cross_check(gguf: &Adapter, peft: &Adapter) -> Result<Vec<Finding>, CheckpointError> {
    let mut findings = Vec::new();
    let lora = |a: &Adapter| -> Vec<String> {
        a.modules
            .values()
            .filter(|m| m.has_lora())
            .map(|m| m.name.clone())
            .collect()
    };
    let (gguf_modules, peft_modules) = (lora(gguf), lora(peft));
    let missing: Vec<&str> = peft_modules
        .iter()
        .filter(|m| !gguf_modules.contains(m))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        findings.push(
            Finding::new(
                Code::AdapterConversion,
                None,
                format!(
                    "{} LoRA module(s) of the PEFT adapter are not in the GGUF adapter: {}",
                    missing.len(),
                    quoted_examples(missing.iter().copied())
                ),
            )
            .observed(missing.len() as f64, Some(0.0)),
        );
    }
    let extra: Vec<&str> = gguf_modules
        .iter()
        .filter(|m| !peft_modules.contains(m))
        .map(String::as_str)
        .collect();
    if !extra.is_empty() {
        findings.push(
            Finding::new(
                Code::AdapterConversion,
                None,
                format!(
                    "{} LoRA module(s) of the GGUF adapter are not in the PEFT adapter beside it \
                     (another adapter?): {}",
                    extra.len(),
                    quoted_examples(extra.iter().copied())
                ),
            )
            .observed(extra.len() as f64, Some(0.0)),
        );
    }
    // Factor (gguf scale / peft scale, rounded for grouping) → modules.
    let mut by_factor: BTreeMap<String, (f64, Vec<String>)> = BTreeMap::new();
    let mut differing_values: Vec<(String, f64)> = Vec::new();
    for module in gguf_modules.iter().filter(|m| peft_modules.contains(m)) {
        let g = gguf.config.scaling_for(module).scale;
        let p = peft.config.scaling_for(module).scale;
        let factor = if p != 0.0 { g / p } else { f64::INFINITY };
        if (factor - 1.0).abs() > SCALE_TOLERANCE {
            by_factor
                .entry(format!("{factor:.6e}"))
                .or_insert_with(|| (factor, Vec::new()))
                .1
                .push(module.clone());
        }
        let (Some(gm), Some(pm)) = (gguf.modules.get(module), peft.modules.get(module)) else {
            continue;
        };
        let mut worst = 0.0f64;
        for (g_role, p_role) in [
            (TensorRole::LoraA, TensorRole::LoraA),
            (TensorRole::LoraB, TensorRole::LoraB),
            (TensorRole::EmbeddingA, TensorRole::EmbeddingA),
            (TensorRole::EmbeddingB, TensorRole::EmbeddingB),
        ] {
            let (Some(gt), Some(pt)) = (gm.get(g_role), pm.get(p_role)) else {
                continue;
            };
            let gv = gguf.weights.read_f32(&gt.key)?;
            let pv = peft.weights.read_f32(&pt.key)?;
            let d = if gt.info.shape == pt.info.shape {
                relative_difference(&gv, &pv).unwrap_or(f64::INFINITY)
            } else {
                f64::INFINITY
            };
            worst = worst.max(d);
        }
        if worst > VALUE_TOLERANCE {
            differing_values.push((module.clone(), worst));
        }
    }
    for (factor, modules) in by_factor.into_values() {
        let why = cause(peft, &modules[0]);
        findings.push(
            Finding::new(
                Code::AdapterConversion,
                Some(modules[0].clone()),
                format!(
                    "llama.cpp applies {factor:.4}× the update PEFT applies on {} module(s) ({}): \
                     the conversion dropped {why}",
                    modules.len(),
                    quoted_examples(modules.iter().map(String::as_str)),
                ),
            )
            .observed(factor, Some(1.0))
            .advice(format!(
                "Serve the fine-tune by merging with PEFT and converting the merged model; or, to \
                 keep a GGUF adapter, multiply each lora_B by {:.6} before converting so that \
                 llama.cpp's alpha/r reproduces PEFT's scale.",
                1.0 / factor
            )),
        );
    }
    if !differing_values.is_empty() {
        let worst = differing_values.iter().map(|(_, d)| *d).fold(0.0, f64::max);
        findings.push(
            Finding::new(
                Code::AdapterConversion,
                Some(differing_values[0].0.clone()),
                format!(
                    "the GGUF adapter's A/B factors differ from the PEFT adapter's on {} module(s) \
                     ({}), by up to {:.3} relative: it was converted from another adapter or \
                     checkpoint",
                    differing_values.len(),
                    quoted_examples(differing_values.iter().map(|(m, _)| m.as_str())),
                    worst
                ),
            )
            .observed(worst, Some(VALUE_TOLERANCE))
            .advice(
                "Convert the GGUF again from this PEFT folder (convert_lora_to_gguf.py --base \
                 <base> <this folder>), or point --adapter at the adapter it came from.",
            ),
        );
    }
    Ok(findings)
}

/// A cross-check that could not run because the PEFT adapter beside the GGUF is unreadable: said
/// as a warning, so the gate never reads silence as agreement.
pub fn unreadable(peft_dir: &Path, error: &dyn std::fmt::Display) -> Finding {
    Finding::new(
        Code::AdapterConversion,
        None,
        format!(
            "the PEFT adapter beside the GGUF adapter (`{}`) cannot be read, so the conversion \
             was not cross-checked: {error}",
            peft_dir.display()
        ),
    )
    .level(Level::Warn)
    .advice("Repair or remove the PEFT files beside the GGUF adapter.")
}
