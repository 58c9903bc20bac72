//! What `lora-doctor inspect` reports: the summary of an adapter folder or a checkpoint (built
//! from headers by the command), and its plain-text rendering. The JSON form is the serde form.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::format::{human_bytes, human_params};
use crate::findings::structure::ModuleMatch;

/// An adapter folder's summary.
#[derive(Debug, Serialize)]
pub struct AdapterSummary {
    pub path: String,
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    /// The default scale (before rank/alpha patterns).
    pub scale: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    pub base_model_name_or_path: Option<String>,
    pub target_modules: Option<String>,
    pub modules_to_save: Vec<String>,
    pub tensors: usize,
    pub bytes: usize,
    pub dtypes: Vec<String>,
    pub modules: Vec<ModuleMatch>,
}

/// A checkpoint's summary.
#[derive(Debug, Serialize)]
pub struct CheckpointSummary {
    pub path: String,
    pub architecture: Option<String>,
    pub parameters: usize,
    pub tensors: usize,
    pub bytes: usize,
    pub files: usize,
    pub dtypes: BTreeMap<String, usize>,
    pub layers: Option<usize>,
    pub hidden_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub quantization: Option<String>,
    /// Whether `check` can run the logit comparison on this checkpoint as a base: `forward pass
    /// (<model_type>)`, or `weights only: <why>`.
    pub logits: String,
}

/// `inspect` of an adapter folder.
pub fn adapter_summary(s: &AdapterSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "adapter   {}", s.path);
    let _ = writeln!(out, "peft_type {}", s.peft_type);
    let _ = writeln!(
        out,
        "rank      r={} alpha={} scale={} ({}){}{}",
        s.r,
        s.lora_alpha,
        s.scale,
        if s.use_rslora {
            "alpha/sqrt(r), rsLoRA"
        } else {
            "alpha/r"
        },
        if s.use_dora { ", DoRA" } else { "" },
        if s.fan_in_fan_out {
            ", fan_in_fan_out"
        } else {
            ""
        },
    );
    if let Some(base) = &s.base_model_name_or_path {
        let _ = writeln!(out, "base      {base}");
    }
    if let Some(targets) = &s.target_modules {
        let _ = writeln!(out, "targets   {targets}");
    }
    if !s.modules_to_save.is_empty() {
        let _ = writeln!(out, "saved     {}", s.modules_to_save.join(", "));
    }
    let _ = writeln!(
        out,
        "tensors   {} ({}, {})",
        s.tensors,
        human_bytes(s.bytes),
        s.dtypes.join(", ")
    );
    let _ = writeln!(
        out,
        "\n{:<52} {:>4} {:>8} {:>9}  kind",
        "module", "r", "alpha", "scale"
    );
    for m in &s.modules {
        let _ = writeln!(
            out,
            "{:<52} {:>4} {:>8} {:>9}  {}",
            m.module,
            m.r.map_or("-".into(), |r| r.to_string()),
            m.alpha.map_or("-".into(), |a| format!("{a}")),
            m.scale.map_or("-".into(), |v| format!("{v:.4}")),
            m.kind
        );
    }
    out
}

/// `inspect` of a checkpoint.
pub fn checkpoint_summary(s: &CheckpointSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "checkpoint {}", s.path);
    if let Some(arch) = &s.architecture {
        let _ = writeln!(out, "arch       {arch}");
    }
    let _ = writeln!(
        out,
        "params     {} in {} tensors, {} ({} file{})",
        human_params(s.parameters),
        s.tensors,
        human_bytes(s.bytes),
        s.files,
        if s.files == 1 { "" } else { "s" }
    );
    let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    let _ = writeln!(out, "dtypes     {}", dtypes.join(", "));
    let _ = writeln!(out, "logits     {}", s.logits);
    if let Some(layers) = s.layers {
        let _ = writeln!(out, "layers     {layers}");
    }
    if let Some(h) = s.hidden_size {
        let _ = writeln!(out, "hidden     {h}");
    }
    if let Some(v) = s.vocab_size {
        let _ = writeln!(out, "vocab      {v}");
    }
    if let Some(t) = s.tie_word_embeddings {
        let _ = writeln!(out, "tied       {t}");
    }
    if let Some(q) = &s.quantization {
        let _ = writeln!(out, "quantized  {q}");
    }
    out
}
