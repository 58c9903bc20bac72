//! The command line, as clap derive structs. Parsing only: validation that needs the filesystem
//! happens in the commands, before any tensor is read.

use std::path::PathBuf;

use clap::{Args, ColorChoice, Parser, Subcommand};

use crate::io::hub::{DEFAULT_REVISION, HubSnapshot};
use crate::merge::precision::Recipe;
use crate::merge::repair::RepairMethod;
use crate::merge::residual::KeepAdapter;

/// Proves a LoRA merge is faithful before it ships.
#[derive(Debug, Parser)]
#[command(name = "lora-doctor", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Colour verdicts and finding levels: `auto` on a terminal unless NO_COLOR is set.
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
}

// Parsed once per process; boxing the large `check` arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that adapters fit a base checkpoint and gate on the findings.
    #[command(after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
    /// Merge adapters into the base and write a checkpoint transformers loads.
    #[command(after_help = MERGE_EXAMPLES)]
    Merge(MergeArgs),
    /// Summarise an adapter folder or a checkpoint from its headers alone.
    #[command(after_help = INSPECT_EXAMPLES)]
    Inspect(InspectArgs),
    /// Explain a finding code: what it checks, why it matters, how to fix it.
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainArgs),
    /// Write a commented lora-doctor.toml with every default threshold and level.
    #[command(after_help = INIT_EXAMPLES)]
    Init(InitArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Print the man page (roff), generated from these definitions.
    #[command(hide = true)]
    Man,
}

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  lora-doctor completions bash > ~/.local/share/bash-completion/completions/lora-doctor
  lora-doctor completions zsh > \"${fpath[1]}/_lora-doctor\"
  lora-doctor completions fish > ~/.config/fish/completions/lora-doctor.fish
  lora-doctor completions powershell >> $PROFILE";

/// Where `--revision` applies: every input flag given as a hub name.
const REVISION_HELP: &str = "Revision of every hub-name input (`org/name`): a branch, a tag or a \
commit sha, read from the local Hugging Face cache (refs/REV, or snapshots/SHA); never downloaded.";

const CHECK_EXAMPLES: &str = "\
Examples:
  lora-doctor check --base fixtures/models/tiny-llama --adapter fixtures/adapters/llama-lora
  lora-doctor check --base model.safetensors --adapter out/adapter --json report.json
  lora-doctor check --base base/ --adapter sft/ --adapter ppo/ --json - | jq .verdict
  lora-doctor check --base base/ --adapter qlora/ --trained-on nf4 --precision bf16,q4_0 --csv layers.csv
  lora-doctor check --base base/ --adapter a/ --precision all --threshold min-retention.float=0.8
  lora-doctor check --base base/ --adapter a/ --report-dir report/ --github --deny warnings
  lora-doctor check --base base/ --each loras/support/ --each loras/legal/ --junit junit.xml
  lora-doctor check --base base/ --each-dir loras/ --report-dir report/   # every adapter in loras/

Exit status: 0 gate passed, 1 gate failed (a deny-level finding), 2 could not run.";

const MERGE_EXAMPLES: &str = "\
Examples:
  lora-doctor merge --base fixtures/models/tiny-llama --adapter fixtures/adapters/llama-lora \\
      --precision bf16 --out /tmp/merged
  lora-doctor merge --base base/ --adapter sft/ --adapter ppo/ --precision bf16 --recipe peft \\
      --out merged/ --max-shard-size 2GB --gate

The output folder is written under a temporary name and renamed when complete; it must not exist
and must not lie inside an input. With --gate, a merge whose weight check fails (exit 1) leaves
nothing behind.";

const INSPECT_EXAMPLES: &str = "\
Examples:
  lora-doctor inspect fixtures/adapters/llama-rslora-patterns
  lora-doctor inspect fixtures/models/tiny-llama-sharded";

const INIT_EXAMPLES: &str = "\
Examples:
  lora-doctor init                          # ./lora-doctor.toml
  lora-doctor init --out out/adapter/lora-doctor.toml   # found there by `check` automatically";

const EXPLAIN_EXAMPLES: &str = "\
Examples:
  lora-doctor explain vocab-mismatch
  lora-doctor explain            # list every code";

/// The `--threshold` help, listing every name from the threshold registry.
fn threshold_help() -> String {
    format!(
        "Override a threshold: NAME[.CLASS]=VALUE, e.g. `min-retention.float=0.8` or \
         `quant-error.4bit=off`. Names: {}. Classes: float, 8bit, 4bit (per-class names only). \
         `lora-doctor init` writes them all with their meaning",
        crate::findings::thresholds::names()
    )
}

fn keep_adapter_help(command: &str) -> String {
    let what = if command == "merge" {
        "The merged output holds their base weights; their lora_A/lora_B (same r, alpha, rsLoRA \
         and patterns) go into a PEFT adapter written beside --out, `<out>-residual/` \
         (`model.gguf` → `model-residual/`), which PEFT loads on the merged model and \
         llama.cpp's convert_lora_to_gguf.py converts. With --repair (bf16, f16) the merged part \
         is repaired and ρ is measured on the repaired weights"
    } else {
        "Adds a mixed candidate per precision (row `bf16+residual`): what `merge --keep-adapter` \
         writes, served as PEFT serves the residual adapter; with --repair also on each repaired \
         bf16/f16 merge (`bf16:repaired+residual`)"
    };
    format!(
        "Keep modules unmerged that the output precision cannot hold: `auto` keeps those whose \
         output error on the calibration text exceeds {} of their update's (ρ = ‖X(Ŵ−W*)ᵀ‖ / \
         ‖XΔWᵀ‖; `auto:RHO` sets another threshold), or a comma-separated list of modules (`down_proj`, \
         `model.layers.3.mlp.down_proj`). {what}",
        crate::merge::residual::KEEP_ADAPTER_RHO
    )
}

#[derive(Debug, Clone, Args)]
#[command(group(
    clap::ArgGroup::new("adapter_inputs")
        .required(true)
        .multiple(true)
        .args(["adapters", "each", "each_dir"])
))]
pub struct CheckArgs {
    /// Base model: an HF folder (config.json + safetensors, sharded or not) or one .safetensors file.
    /// A hub name (`org/name`) that is not a local path is read from the Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors); repeat to stack
    /// adapters in the order they were trained.
    #[arg(long = "adapter", value_name = "DIR")]
    pub adapters: Vec<PathBuf>,
    /// Check this adapter on its own against the base; repeat to check N independent adapters in
    /// one run that reads the base once (one verdict and report section per adapter; exit 0 only
    /// if every adapter was checked and passed, 1 if any failed the gate, 2 if any could not be
    /// checked). Not with --adapter, which stacks adapters into one model.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["adapters", "merged"])]
    pub each: Vec<PathBuf>,
    /// Like --each for every sub-folder of DIR (sorted by name; hidden ones skipped): a folder of
    /// adapter folders. A sub-folder that is not a readable adapter is reported as not checked
    /// (exit 2), never skipped.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["adapters", "merged"])]
    pub each_dir: Option<PathBuf>,
    /// An already-merged checkpoint to compare against the unmerged adapter, as one more candidate
    /// (its own dtype).
    #[arg(long, value_name = "DIR")]
    pub merged: Option<PathBuf>,
    #[arg(long, value_name = "REV", default_value = DEFAULT_REVISION, help = REVISION_HELP)]
    pub revision: String,
    /// The inputs that were hub names, once resolved to cache snapshots (set by `crate::run`).
    #[arg(skip)]
    pub hub: Vec<HubSnapshot>,
    /// Precisions to merge and evaluate: a comma-separated list of f32, bf16, f16, int8, q8_0,
    /// nf4, fp4, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, the llama-quantize mixes
    /// q3_k_m, q4_k_s, q4_k_m, q5_k_m, or `all` (the first nine). Default: f32 plus the base
    /// checkpoint's own dtype.
    #[arg(long, value_name = "LIST|all")]
    pub precision: Vec<String>,
    /// How float merges are rounded: `exact` (f64 sum rounded once) or `peft` (what PEFT's
    /// merge_and_unload does on CPU).
    #[arg(long, value_enum, default_value_t = Recipe::Exact)]
    pub recipe: Recipe,
    /// The precision the adapter was trained against (QLoRA: `nf4`); the reference base becomes
    /// dequant(P(W)).
    #[arg(long, value_name = "PRECISION")]
    pub trained_on: Option<String>,
    #[arg(long, value_name = "NAME[.CLASS]=VALUE", help = threshold_help())]
    pub threshold: Vec<String>,
    /// Only run the weight-level checks (no forward pass).
    #[arg(long)]
    pub weights_only: bool,
    /// Evaluation text: plain text (paragraphs separated by blank lines) or .jsonl with a `text`
    /// field. Default: a built-in text of prose, code, numbers and a chat turn.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Tokens scored by the logit comparison.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_tokens: usize,
    /// Add repaired candidates beside each plain precision that can be repaired (bf16, f16 and
    /// the ggml formats, K-quants and mixes included): `gptq` (error-feedback rounding fitted on
    /// the calibration text: row `bf16:repaired`) and/or `stochastic` (`bf16:stochastic`).
    /// Comma-separated.
    #[arg(long, value_enum, value_name = "METHOD", value_delimiter = ',')]
    pub repair: Vec<RepairMethod>,
    #[arg(long, value_name = "auto|MODULES", value_parser = KeepAdapter::parse, help = keep_adapter_help("check"))]
    pub keep_adapter: Option<KeepAdapter>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Greedy tokens generated per prompt by the reference and each candidate (0 = no generation
    /// check).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub generate: usize,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Write one CSV row per (module, precision) with every weight statistic (`-` for stdout).
    #[arg(long, value_name = "FILE|-")]
    pub csv: Option<PathBuf>,
    /// Write the JSON report to FILE, or to stdout with `-` (the summary then goes to stderr).
    #[arg(long, value_name = "FILE|-")]
    pub json: Option<PathBuf>,
    /// Write every report into DIR: report.html, report.json, layers.csv, tokens.csv, junit.xml,
    /// summary.md (created if missing; must not be inside an input).
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,
    /// Write the self-contained HTML report (`-` for stdout).
    #[arg(long, value_name = "FILE|-")]
    pub html: Option<PathBuf>,
    /// Write JUnit XML (a testsuite per precision; `-` for stdout).
    #[arg(long, value_name = "FILE|-")]
    pub junit: Option<PathBuf>,
    /// Print GitHub annotations and append summary.md to $GITHUB_STEP_SUMMARY when set.
    #[arg(long)]
    pub github: bool,
    /// Gate configuration (default: lora-doctor.toml in an adapter folder, if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Raise a finding code to deny, or `warnings` to deny every warning.
    #[arg(long, value_name = "CODE|warnings")]
    pub deny: Vec<String>,
    /// Set a finding code to warn.
    #[arg(long, value_name = "CODE")]
    pub warn: Vec<String>,
    /// Allow a finding code (reported, never gating).
    #[arg(long, value_name = "CODE")]
    pub allow: Vec<String>,
    /// Print nothing but errors (and the JSON when `--json -`).
    #[arg(long, short)]
    pub quiet: bool,
    /// Always exit 0 when the check ran, whatever the verdict.
    #[arg(long)]
    pub exit_zero: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the template (refuses to overwrite).
    #[arg(long, value_name = "FILE", default_value = "lora-doctor.toml")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An adapter folder, a checkpoint folder, or a .safetensors file; or a hub name (`org/name`)
    /// from the Hugging Face cache.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    #[arg(long, value_name = "REV", default_value = DEFAULT_REVISION, help = REVISION_HELP)]
    pub revision: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A finding code such as `shape-mismatch`; omit to list every code.
    #[arg(value_name = "CODE")]
    pub code: Option<String>,
}

/// The calibration text of a GPTQ repair (`--repair gptq`).
#[derive(Debug, Clone, Args)]
pub struct CalibrationArgs {
    /// Calibration text for `--repair gptq` and `--keep-adapter auto` (plain text with paragraphs separated by blank
    /// lines, or .jsonl with a `text` field). Default: a built-in text that shares nothing with
    /// the built-in evaluation text.
    #[arg(long = "calibration", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Calibration tokens run through the reference.
    #[arg(long = "calibration-tokens", value_name = "N", default_value_t = 512)]
    pub tokens: usize,
}

/// What `merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeFormat {
    Safetensors,
    Gguf,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: an HF folder or one .safetensors file.
    /// A hub name (`org/name`) that is not a local path is read from the Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,
    /// PEFT adapter folder; repeat to merge stacked adapters in order.
    #[arg(long = "adapter", value_name = "DIR", required = true)]
    pub adapters: Vec<PathBuf>,
    #[arg(long, value_name = "REV", default_value = DEFAULT_REVISION, help = REVISION_HELP)]
    pub revision: String,
    /// Output dtype: f32, bf16 or f16; with `--format gguf` also q8_0, q4_0, q4_1, q5_0, q5_1,
    /// q2_k–q6_k or a llama-quantize mix (q3_k_m, q4_k_s, q4_k_m, q5_k_m).
    #[arg(long, value_name = "PRECISION")]
    pub precision: String,
    /// Output folder (must not exist yet); with `--format gguf`, the .gguf file.
    #[arg(long, value_name = "DIR|FILE")]
    pub out: PathBuf,
    /// `safetensors`: a folder transformers loads; `gguf`: one GGUF v3 file llama.cpp loads.
    #[arg(long, value_enum, default_value_t = MergeFormat::Safetensors)]
    pub format: MergeFormat,
    /// `exact` (f64 sum rounded once) or `peft` (bit-compatible with PEFT's merge_and_unload).
    #[arg(long, value_enum, default_value_t = Recipe::Exact)]
    pub recipe: Recipe,
    /// Largest shard, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
    /// Round the merge so that each layer's outputs, not each weight, stay close (`gptq`: error
    /// feedback fitted on the calibration text; `stochastic`: no calibration). For bf16, f16 and
    /// every GGUF ggml type, K-quants and mixes included; the files are ordinary checkpoints.
    /// `check --repair` measures it.
    #[arg(long, value_enum, value_name = "METHOD")]
    pub repair: Option<RepairMethod>,
    #[arg(long, value_name = "auto|MODULES", value_parser = KeepAdapter::parse, help = keep_adapter_help("merge"))]
    pub keep_adapter: Option<KeepAdapter>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Check the merge's weights first and write nothing (exit 1) if the gate fails.
    #[arg(long)]
    pub gate: bool,
    #[arg(long, value_name = "NAME[.CLASS]=VALUE", help = threshold_help())]
    pub threshold: Vec<String>,
    /// No progress bars or summary.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}
