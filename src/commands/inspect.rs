//! `lora-doctor inspect PATH`: what an adapter or a checkpoint holds, from headers only.

use std::path::Path;

use crate::ExitStatus;
use crate::cli::InspectArgs;
use crate::findings::structure::ModuleMatch;
use crate::io::adapter::{self, Adapter, ModuleSelector, TensorRole};
use crate::io::base_folder;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::report;
use crate::report::inspect::{self as summary, AdapterSummary, CheckpointSummary};
use anyhow::Context;

pub fn run(args: &InspectArgs) -> anyhow::Result<ExitStatus> {
    // `inspect dir/adapter_config.json` means the adapter folder.
    let path = match args.path.file_name().and_then(|n| n.to_str()) {
        Some(adapter::CONFIG_FILE) | Some(adapter::WEIGHTS_FILE) => {
            args.path.parent().unwrap_or(&args.path).to_path_buf()
        }
        _ => args.path.clone(),
    };
    let path = &path;
    let is_adapter = (path.is_dir() && path.join(adapter::CONFIG_FILE).is_file())
        || crate::io::gguf::adapter::is_adapter_file(path);
    let (text, json) = if is_adapter {
        let summary = summarize_adapter(path)?;
        (
            summary::adapter_summary(&summary),
            serde_json::to_string_pretty(&summary)?,
        )
    } else {
        let summary = summarize_checkpoint(path)?;
        (
            summary::checkpoint_summary(&summary),
            serde_json::to_string_pretty(&summary)?,
        )
    };
    if args.json {
        report::print_human(&format!("{json}\n"), false)?;
    } else {
        report::print_human(&text, false)?;
    }
    Ok(ExitStatus::Success)
}

fn summarize_adapter(dir: &Path) -> anyhow::Result<AdapterSummary> {
    let adapter = if dir.is_file() {
        Adapter::open_gguf_listing(dir)
    } else {
        Adapter::open(dir)
    }
    .with_context(|| format!("cannot read the adapter `{}`", dir.display()))?;
    let config = &adapter.config;
    let mut dtypes: Vec<String> = adapter
        .weights
        .tensors()
        .map(|t| t.dtype.name().to_string())
        .collect();
    dtypes.sort();
    dtypes.dedup();
    let modules = adapter
        .modules
        .values()
        .map(|m| {
            let scaling = m.has_lora().then(|| config.scaling_for(&m.name));
            let kind = if m.is_embedding_lora() {
                "embedding-lora"
            } else if m.has_lora() && m.get(TensorRole::Magnitude).is_some() {
                "dora"
            } else if m.has_lora() {
                "lora"
            } else {
                "replace"
            };
            ModuleMatch {
                module: m.name.clone(),
                base_tensor: None,
                resolution: None,
                kind,
                r: scaling.as_ref().map(|s| s.r),
                alpha: scaling.as_ref().map(|s| s.alpha),
                scale: scaling.as_ref().map(|s| s.scale),
            }
        })
        .collect();
    Ok(AdapterSummary {
        path: dir.display().to_string(),
        peft_type: config.peft_type.clone(),
        r: config.r,
        lora_alpha: config.lora_alpha,
        scale: adapter::lora_scale(config.lora_alpha, config.r, config.use_rslora),
        use_rslora: config.use_rslora,
        use_dora: config.use_dora,
        fan_in_fan_out: config.fan_in_fan_out,
        base_model_name_or_path: config.base_model_name_or_path.clone(),
        target_modules: config.target_modules.as_ref().map(ModuleSelector::describe),
        modules_to_save: config.modules_to_save.clone(),
        tensors: adapter.weights.len(),
        bytes: adapter.nbytes(),
        dtypes,
        modules,
    })
}

/// Whether the logit comparison can run with this checkpoint as the base, the way `check`
/// decides it (`Architecture::from_config`).
fn logit_support(config: Option<&ModelConfig>, checkpoint: &Checkpoint) -> String {
    if let Some(header) = checkpoint.gguf() {
        // `check` builds the config from the GGUF metadata; every architecture it maps has a
        // forward pass.
        return match crate::io::gguf::model_type(header) {
            Ok(model_type) => format!("forward pass ({model_type}, from the GGUF metadata)"),
            Err(why) => format!("weights only: {why}"),
        };
    }
    let Some(config) = config else {
        return "weights only: no config.json, so the architecture is unknown".to_string();
    };
    match crate::model::Architecture::from_config(config, &|n| checkpoint.contains(n)) {
        Ok(_) => format!(
            "forward pass ({})",
            config.model_type.as_deref().unwrap_or_default()
        ),
        Err(why) => format!("weights only: {why}"),
    }
}

fn summarize_checkpoint(path: &Path) -> anyhow::Result<CheckpointSummary> {
    let checkpoint = Checkpoint::open(path)
        .with_context(|| format!("cannot open the checkpoint `{}`", path.display()))?;
    let config = ModelConfig::read_dir(&base_folder(path))?;
    let mut dtypes = std::collections::BTreeMap::new();
    for t in checkpoint.tensors() {
        *dtypes.entry(t.dtype.name().to_string()).or_insert(0) += 1;
    }
    Ok(CheckpointSummary {
        path: path.display().to_string(),
        architecture: config.as_ref().and_then(|c| {
            c.architectures
                .first()
                .cloned()
                .or_else(|| c.model_type.clone())
        }),
        parameters: checkpoint.tensors().map(|t| t.numel()).sum(),
        tensors: checkpoint.len(),
        bytes: checkpoint.tensors().map(|t| t.nbytes()).sum(),
        files: checkpoint.files().count(),
        dtypes,
        layers: config.as_ref().and_then(|c| c.num_hidden_layers),
        hidden_size: config.as_ref().and_then(|c| c.hidden_size),
        vocab_size: config.as_ref().and_then(|c| c.vocab_size),
        tie_word_embeddings: config.as_ref().map(|c| c.tie_word_embeddings),
        quantization: config.as_ref().and_then(ModelConfig::quantization_summary),
        logits: logit_support(config.as_ref(), &checkpoint),
    })
}
