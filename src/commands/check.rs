//! `lora-doctor check`: load the base and every adapter, run the rule families, decide the
//! verdict, write the reports. Until the merge engine lands this is the structural gate.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::ExitStatus;
use crate::cli::CheckArgs;
use crate::findings::structure::{self, StructureInput};
use crate::findings::{self, Verdict};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::tokenizer::TokenizerInfo;
use crate::report::{self, Inputs, OutputTarget, Report};

/// The folder whose config.json / tokenizer.json describe a base given as a folder or a file.
pub fn base_folder(base: &Path) -> PathBuf {
    if base.is_file() {
        base.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        base.to_path_buf()
    }
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitStatus> {
    // Plan: every output is reserved before any tensor is read, so a bad path fails at once.
    let mut input_paths: Vec<&Path> = vec![args.base.as_path()];
    input_paths.extend(args.adapters.iter().map(PathBuf::as_path));
    let json_out = args
        .json
        .as_deref()
        .map(|p| OutputTarget::reserve(p, &input_paths))
        .transpose()?;

    let base = Checkpoint::open(&args.base)
        .with_context(|| format!("cannot open the base `{}`", args.base.display()))?;
    let folder = base_folder(&args.base);
    let base_config = ModelConfig::read_dir(&folder)?;
    let base_tokenizer = TokenizerInfo::read_dir(&folder)?;

    let mut all_findings = Vec::new();
    let mut structures = Vec::new();
    for dir in &args.adapters {
        let adapter = Adapter::open(dir)
            .with_context(|| format!("cannot read the adapter `{}`", dir.display()))?;
        let adapter_tokenizer = TokenizerInfo::read_dir(dir)?;
        let mut result = structure::check(&StructureInput {
            base: &base,
            base_config: base_config.as_ref(),
            base_tokenizer: base_tokenizer.as_ref(),
            adapter: &adapter,
            adapter_tokenizer: adapter_tokenizer.as_ref(),
        })
        .with_context(|| format!("reading the adapter tensors in `{}`", dir.display()))?;
        all_findings.append(&mut result.findings);
        structures.push(result);
    }
    findings::sort(&mut all_findings);
    let verdict = Verdict::of(&all_findings);
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION"),
        verdict,
        inputs: Inputs {
            base: args.base.display().to_string(),
            base_files: base.files().map(|f| f.display().to_string()).collect(),
            adapters: args
                .adapters
                .iter()
                .map(|a| a.display().to_string())
                .collect(),
            merged: None,
            tokens: None,
            weights_only: args.weights_only,
        },
        adapter_effect: None,
        findings: all_findings,
        structure: structures,
        precisions: None,
        layers: None,
    };

    let json_to_stdout = json_out.as_ref().is_some_and(OutputTarget::is_stdout);
    if let Some(out) = json_out {
        out.write_all(&report::json::render(&report)?)?;
    }
    if !args.quiet {
        report::print_human(&report::terminal::check_summary(&report), json_to_stdout)?;
    }
    Ok(match verdict {
        Verdict::Fail if !args.exit_zero => ExitStatus::Failure,
        _ => ExitStatus::Success,
    })
}
