//! `lora-doctor init`: writes the commented gate configuration template.

use anyhow::{Context, bail};

use crate::ExitStatus;
use crate::cli::InitArgs;
use crate::gate::GateConfig;
use crate::report::{self, OutputTarget};

pub fn run(args: &InitArgs) -> anyhow::Result<ExitStatus> {
    if args.out != std::path::Path::new("-") && args.out.exists() {
        bail!(
            "`{}` already exists; lora-doctor never overwrites a config (remove it or pass --out)",
            args.out.display()
        );
    }
    let target = OutputTarget::reserve(&args.out, &[])?;
    let to_stdout = target.is_stdout();
    target
        .write_all(GateConfig::template().as_bytes())
        .with_context(|| format!("writing `{}`", args.out.display()))?;
    // `init --out - > lora-doctor.toml`: stdout carries the document and nothing else.
    if to_stdout {
        return Ok(ExitStatus::Success);
    }
    report::print_human(
        &format!(
            "wrote `{}`: edit thresholds and levels; `check` reads it from an adapter folder or --config\n",
            args.out.display()
        ),
        false,
    )?;
    Ok(ExitStatus::Success)
}
