//! Mixed mode (issue 14 §2): modules whose merge the output precision cannot hold stay unmerged,
//! served as a *residual* PEFT adapter beside the merged checkpoint.
//!
//! A module is judged by its output error relative to its update on calibration activations X,
//! ρ = ‖X(Ŵ − W*)ᵀ‖ / ‖X ΔWᵀ‖, with W* = W + ΔW the exact merge and Ŵ the weight as the output
//! precision stores it. With H = XᵀX both norms are quadratic forms, ‖X Eᵀ‖² = Σ_rows e H eᵀ, so
//! the H the repairs already accumulate is all that is needed. ρ ≈ 1 means rounding deleted the
//! update; ρ ≪ 1 means the merge kept it. A kept module's base weight is written as stored (rounded
//! to the output format like every untouched weight) and its lora_A/lora_B go into the residual
//! adapter, whose `adapter_config.json` keeps the source's r / lora_alpha / use_rslora /
//! rank_pattern / alpha_pattern so every kept module's scale is the source's.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::engine::{Source, TensorJob};
use super::precision::Precision;
use super::repair::RepairMethod;
use crate::io::adapter::Adapter;

/// `--keep-adapter auto` keeps a module unmerged when ρ exceeds this: the output precision loses
/// more than this fraction of the module's effect on its outputs (`auto:RHO` sets another).
pub const KEEP_ADAPTER_RHO: f64 = 0.5;

/// The label of a mixed candidate (`bf16+residual`; on a repaired merge `bf16:repaired+residual`),
/// defined once for every report.
pub fn candidate_label(precision: Precision, repair: Option<RepairMethod>) -> String {
    match repair {
        Some(method) => format!(
            "{}{RESIDUAL_SUFFIX}",
            super::repair::candidate_label(precision, method)
        ),
        None => format!("{}{RESIDUAL_SUFFIX}", precision.name()),
    }
}

/// Whether mixed mode can sit on a repaired merge in `precision`: float formats only (in a block
/// format a kept module's base would need its own repair, which is not built).
pub fn combines_with_repair(precision: Precision) -> bool {
    matches!(precision, Precision::Float(f) if f != super::float::FloatFormat::F32)
}

/// What a mixed candidate's label adds to its format's name.
pub const RESIDUAL_SUFFIX: &str = "+residual";

/// Which modules a mixed merge keeps unmerged.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepAdapter {
    /// Those whose ρ on the calibration text exceeds `rho` ([`KEEP_ADAPTER_RHO`] unless given).
    Auto { rho: f64 },
    /// Exactly these: a module path (`model.layers.3.mlp.down_proj`) or a suffix of one
    /// (`down_proj`), matched as PEFT matches `target_modules` lists.
    Modules(Vec<String>),
}

impl KeepAdapter {
    /// `auto`, `auto:RHO`, or a comma-separated list of module names.
    pub fn parse(text: &str) -> Result<KeepAdapter, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(KeepAdapter::Auto {
                rho: KEEP_ADAPTER_RHO,
            });
        }
        if let Some(rho) = text.strip_prefix("auto:") {
            return match rho.parse::<f64>() {
                Ok(rho) if rho.is_finite() && rho >= 0.0 => Ok(KeepAdapter::Auto { rho }),
                _ => Err(format!(
                    "`auto:{rho}`: the threshold on ρ must be a number ≥ 0"
                )),
            };
        }
        let names: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches(".weight").to_string())
            .collect();
        if names.is_empty() {
            return Err("expected `auto` or a comma-separated list of module names".into());
        }
        Ok(KeepAdapter::Modules(names))
    }

    /// Whether ρ decides (and the calibration text must run).
    pub fn needs_calibration(&self) -> bool {
        matches!(self, KeepAdapter::Auto { .. })
    }

    /// Whether `module` stays unmerged: listed, or (`auto`) its ρ, computed only then, above the
    /// threshold.
    pub fn keeps<E>(&self, module: &str, rho: impl FnOnce() -> Result<f64, E>) -> Result<bool, E> {
        match self {
            KeepAdapter::Auto { rho: threshold } => Ok(rho()? > *threshold),
            KeepAdapter::Modules(names) => Ok(names.iter().any(|n| names_module(n, module))),
        }
    }

    /// The rule in words, for reports: `auto: rho > 0.5` or the module list.
    pub fn describe(&self) -> String {
        match self {
            KeepAdapter::Auto { rho } => format!("auto: rho > {rho}"),
            KeepAdapter::Modules(names) => names.join(","),
        }
    }

    /// Entries of an explicit list that name none of `modules` (an error: a typo must not keep
    /// nothing silently).
    pub fn unmatched<'a>(&'a self, modules: &[&str]) -> Vec<&'a str> {
        match self {
            KeepAdapter::Auto { .. } => Vec::new(),
            KeepAdapter::Modules(names) => names
                .iter()
                .filter(|n| !modules.iter().any(|m| names_module(n, m)))
                .map(String::as_str)
                .collect(),
        }
    }
}

impl KeepAdapter {
    /// Refuses an explicit list with an entry that names no module of `jobs` a residual adapter
    /// can hold (`merge` and `check` both ask before any work).
    pub fn refuse_unmatched(&self, jobs: &[TensorJob]) -> anyhow::Result<()> {
        let keepable: Vec<&str> = jobs
            .iter()
            .filter(|j| not_keepable(j).is_none())
            .map(|j| j.module.as_str())
            .collect();
        let unmatched = self.unmatched(&keepable);
        if !unmatched.is_empty() {
            bail!(
                "--keep-adapter names no module a residual adapter can hold: {} (modules with a \
                 plain LoRA update only)",
                unmatched.join(", ")
            );
        }
        Ok(())
    }
}

/// PEFT's list matching (`check_target_module_exists`): equal, or a `.`-separated suffix.
fn names_module(name: &str, module: &str) -> bool {
    module == name
        || module
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('.'))
}

/// Why mixed mode cannot serve these adapters, or `None`: it writes one residual adapter, and a
/// `lora_B.bias` would be added twice (merged into the bias and served again by PEFT).
pub fn unsupported_adapters(adapters: &[Adapter]) -> Option<String> {
    match adapters {
        [one] if one.config.lora_bias => Some(
            "--keep-adapter does not handle `lora_bias: true` adapters yet (the bias would be \
             merged and served again); merge without it"
                .to_string(),
        ),
        [_] => None,
        _ => Some(format!(
            "--keep-adapter writes one residual adapter: give exactly one --adapter (got {})",
            adapters.len()
        )),
    }
}

/// Why a merge job cannot be kept as a residual module, or `None` when it can: exactly one plain
/// LoRA update (no DoRA magnitude, no stacked-expert view, no full replacement, no resized rows),
/// which a residual adapter reproduces with the source's own factors and scale.
pub fn not_keepable(job: &TensorJob) -> Option<&'static str> {
    if job.growth.is_some() {
        return Some("its rows were resized");
    }
    match job.sources.as_slice() {
        [
            Source::LowRank {
                magnitude: None,
                view: None,
                ..
            },
        ] => None,
        [Source::LowRank { view: Some(_), .. }] => Some("its update is a stacked-expert slice"),
        [Source::LowRank { .. }] => Some("it is a DoRA module"),
        [Source::Replace { .. }] => Some("it is a full replacement (modules_to_save)"),
        _ => Some("more than one adapter changes it"),
    }
}

/// ‖X Eᵀ‖² / ‖X Dᵀ‖² as the pair (Σ e H eᵀ, Σ d H dᵀ) over the rows of `err` and `update`
/// (`[rows, cols]` each, `h` `[cols, cols]`), one f64 matrix product for both.
fn quadratic_forms(
    err: &[f64],
    update: &[f64],
    rows: usize,
    cols: usize,
    h: &[f64],
) -> candle_core::Result<(f64, f64)> {
    let mut stacked = Vec::with_capacity(2 * rows * cols);
    stacked.extend_from_slice(err);
    stacked.extend_from_slice(update);
    let m = Tensor::from_vec(stacked, (2 * rows, cols), &Device::Cpu)?;
    let h = Tensor::from_slice(h, (cols, cols), &Device::Cpu)?;
    let per_row = m.matmul(&h)?.mul(&m)?.sum(1)?.to_vec1::<f64>()?;
    let (e, d) = per_row.split_at(rows);
    Ok((e.iter().sum(), d.iter().sum()))
}

/// ρ = ‖X(Ŵ − W*)ᵀ‖ / ‖X ΔWᵀ‖ from H = XᵀX: `merged` is Ŵ (as the output stores it), `exact` W*,
/// `base` W, all `[rows, cols]`. An update X does not see (‖X ΔWᵀ‖ = 0) gives 0: nothing to lose.
pub fn output_error_ratio(
    merged: &[f32],
    exact: &[f64],
    base: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
) -> candle_core::Result<f64> {
    let err: Vec<f64> = merged
        .iter()
        .zip(exact)
        .map(|(m, x)| f64::from(*m) - x)
        .collect();
    let update: Vec<f64> = exact
        .iter()
        .zip(base)
        .map(|(x, w)| x - f64::from(*w))
        .collect();
    let (e, d) = quadratic_forms(&err, &update, rows, cols, h)?;
    // Rounding inside the product can leave a tiny negative sum for an all-zero row set.
    let (e, d) = (e.max(0.0), d.max(0.0));
    Ok(if d > 0.0 { (e / d).sqrt() } else { 0.0 })
}

/// Where the residual adapter of `--out` goes: beside it, named after it
/// (`merged/` → `merged-residual/`, `model.gguf` → `model-residual/`).
pub fn residual_dir(out: &Path) -> PathBuf {
    let stem = match out.extension().and_then(|e| e.to_str()) {
        Some("gguf") => out.file_stem(),
        _ => out.file_name(),
    }
    .map_or_else(|| "merged".into(), |s| s.to_string_lossy().into_owned());
    crate::io::parent_folder(out).join(format!("{stem}-residual"))
}

/// The PEFT module path (as the adapter names it) and the stored keys of A and B of a kept job.
pub struct ResidualModule {
    pub peft_module: String,
    pub keys: [String; 2],
}

/// The residual module of `job` in `adapter`: its lora_A/lora_B keys and the module path PEFT will
/// match (`target_modules` entry).
pub fn residual_module(job: &TensorJob, adapter: &Adapter) -> anyhow::Result<ResidualModule> {
    let [Source::LowRank { a, b, .. }] = job.sources.as_slice() else {
        bail!(
            "`{}` cannot stay unmerged: {}",
            job.module,
            not_keepable(job).unwrap_or("unsupported update")
        );
    };
    let peft_module = adapter
        .modules
        .values()
        .find(|m| m.tensors.values().any(|t| &t.key == a))
        .map(|m| m.name.clone())
        .with_context(|| format!("no adapter module holds `{a}`"))?;
    Ok(ResidualModule {
        peft_module,
        keys: [a.clone(), b.clone()],
    })
}

/// The residual adapter's `adapter_config.json`: the source's, with `target_modules` listing
/// exactly the kept modules and every other selector that could widen or narrow it cleared
/// (`modules_to_save` were merged; a layer filter would drop kept modules).
pub fn residual_config(source: &Value, kept: &BTreeSet<String>) -> Value {
    let mut config = source.clone();
    if let Value::Object(map) = &mut config {
        map.insert(
            "target_modules".into(),
            Value::Array(kept.iter().cloned().map(Value::String).collect()),
        );
        for key in [
            "modules_to_save",
            "layers_to_transform",
            "layers_pattern",
            "exclude_modules",
            "trainable_token_indices",
        ] {
            if map.contains_key(key) {
                map.insert(key.into(), Value::Null);
            }
        }
    }
    config
}

/// Writes the residual adapter of `kept` jobs into `dir` (which exists): adapter_config.json and
/// adapter_model.safetensors with each kept module's lora_A/lora_B bytes as the source stores them.
/// Returns the bytes of tensors written.
pub fn write_adapter(dir: &Path, adapter: &Adapter, kept: &[&TensorJob]) -> anyhow::Result<usize> {
    use crate::io::writer::{self, OutTensor};
    let mut modules = BTreeSet::new();
    let mut tensors = Vec::new();
    for job in kept {
        let m = residual_module(job, adapter)?;
        for key in &m.keys {
            let info = adapter
                .weights
                .info(key)
                .with_context(|| format!("the adapter has no `{key}`"))?;
            tensors.push(OutTensor {
                name: key.clone(),
                dtype: info.dtype.clone(),
                shape: info.shape.clone(),
            });
        }
        modules.insert(m.peft_module);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let bytes: usize = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() * t.dtype.bytes_per_element().unwrap_or(1))
        .sum();
    // One file whatever its size: PEFT reads a single adapter_model.safetensors.
    let files = writer::write_checkpoint(
        dir,
        &tensors,
        usize::MAX,
        |t| Ok(adapter.weights.raw(&t.name)?.1.to_vec()),
        || {},
    )?;
    for file in files {
        std::fs::rename(dir.join(&file), dir.join("adapter_model.safetensors"))
            .with_context(|| format!("naming the residual adapter's `{file}`"))?;
    }
    let config = residual_config(&adapter.config.raw, &modules);
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rho_on_a_hand_case() {
        // X = [[1, 0], [1, 1]] → H = XᵀX = [[2, 1], [1, 1]].
        let h = [2.0, 1.0, 1.0, 1.0];
        let base = [1.0f32, 2.0];
        // ΔW = [1, -1]: X ΔWᵀ = [1, 0], norm 1.
        let exact = [2.0f64, 1.0];
        // Ŵ = W (the update deleted): error −ΔW, ρ = 1.
        let rho = output_error_ratio(&base, &exact, &base, 1, 2, &h).expect("rho");
        assert!((rho - 1.0).abs() < 1e-12, "{rho}");
        // Ŵ = W* + [0, 0.5]: X Eᵀ = [0, 0.5], ρ = 0.5.
        let merged = [2.0f32, 1.5];
        let rho = output_error_ratio(&merged, &exact, &base, 1, 2, &h).expect("rho");
        assert!((rho - 0.5).abs() < 1e-12, "{rho}");
        // An error along a direction the inputs never take counts for nothing (H = [[1, 0], [0, 0]]).
        let h_null = [1.0, 0.0, 0.0, 0.0];
        let merged = [2.0f32, 7.0];
        let rho = output_error_ratio(&merged, &exact, &base, 1, 2, &h_null).expect("rho");
        assert!(rho.abs() < 1e-12, "{rho}");
        // Two rows add their squared norms.
        let base2 = [1.0f32, 2.0, 0.0, 0.0];
        let exact2 = [2.0f64, 1.0, 0.0, 1.0]; // second row's update [0, 1]: X dᵀ = [0, 1]
        let merged2 = [2.0f32, 1.0, 0.0, 0.0]; // second row deleted: error norm² 1
        let rho = output_error_ratio(&merged2, &exact2, &base2, 2, 2, &h).expect("rho");
        assert!((rho - (0.5f64).sqrt()).abs() < 1e-12, "{rho}");
    }

    #[test]
    fn an_update_the_inputs_never_see_has_nothing_to_lose() {
        let h = [0.0; 4];
        let rho = output_error_ratio(&[1.0, 1.0], &[2.0, 2.0], &[1.0, 1.0], 1, 2, &h).expect("rho");
        assert_eq!(rho, 0.0);
    }

    #[test]
    fn keep_lists_match_like_peft() {
        let keep =
            KeepAdapter::parse("down_proj, model.layers.0.self_attn.q_proj.weight").expect("list");
        let keeps = |m: &str| {
            keep.keeps(m, || Err::<f64, ()>(()))
                .expect("no rho for a list")
        };
        assert!(keeps("model.layers.3.mlp.down_proj"));
        assert!(keeps("model.layers.0.self_attn.q_proj"));
        assert!(!keeps("model.layers.10.self_attn.q_proj"));
        assert!(!keeps("model.layers.3.mlp.xdown_proj"));
        assert_eq!(
            keep.unmatched(&["model.layers.3.mlp.down_proj"]),
            vec!["model.layers.0.self_attn.q_proj"]
        );
        let auto = KeepAdapter::parse("auto").expect("auto");
        assert_eq!(
            auto,
            KeepAdapter::Auto {
                rho: KEEP_ADAPTER_RHO
            }
        );
        assert_eq!(auto.keeps("m", || Ok::<_, ()>(KEEP_ADAPTER_RHO)), Ok(false));
        assert_eq!(auto.keeps("m", || Ok::<_, ()>(0.51)), Ok(true));
        assert_eq!(
            KeepAdapter::parse("auto:0.9"),
            Ok(KeepAdapter::Auto { rho: 0.9 })
        );
        assert!(KeepAdapter::parse("auto:x").is_err());
        assert!(KeepAdapter::parse("auto:-1").is_err());
        assert!(KeepAdapter::parse(" , ").is_err());
    }

    #[test]
    fn residual_folders_sit_beside_the_output() {
        assert_eq!(
            residual_dir(Path::new("/x/merged")),
            Path::new("/x/merged-residual")
        );
        assert_eq!(
            residual_dir(Path::new("/x/model.gguf")),
            Path::new("/x/model-residual")
        );
    }

    #[test]
    fn residual_config_targets_exactly_the_kept_modules() {
        let source = serde_json::json!({
            "r": 16, "lora_alpha": 32, "use_rslora": true,
            "rank_pattern": {"q_proj": 8}, "alpha_pattern": {},
            "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"],
            "layers_to_transform": [0, 1],
        });
        let kept: BTreeSet<String> = ["model.layers.1.self_attn.q_proj".to_string()].into();
        let out = residual_config(&source, &kept);
        assert_eq!(
            out["target_modules"],
            serde_json::json!(["model.layers.1.self_attn.q_proj"])
        );
        assert_eq!(out["modules_to_save"], Value::Null);
        assert_eq!(out["layers_to_transform"], Value::Null);
        for same in ["r", "lora_alpha", "use_rslora", "rank_pattern"] {
            assert_eq!(out[same], source[same], "{same}");
        }
    }
}
