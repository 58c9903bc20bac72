//! `lora-doctor init`: writes the commented gate configuration template.

use anyhow::{Context, bail};

use crate::ExitStatus;
use crate::cli::InitArgs;
use crate::gate::GateConfig;
use crate::report::{self, OutputTarget};

pub fn run(args: &InitArgs) -> anyhow::Result<ExitStatus> {
    if args.out.exists() {
        bail!(
            "`{}` already exists; lora-doctor never overwrites a config (remove it or pass --out)",
            args.out.display()
        );
    }
    OutputTarget::reserve(&args.out, &[])?
        .write_all(GateConfig::template().as_bytes())
        .with_context(|| format!("writing `{}`", args.out.display()))?;
    report::print_human(
        &format!(
            "wrote `{}`: edit thresholds and levels; `check` reads it from an adapter folder or --config\n",
            args.out.display()
        ),
        false,
    )?;
    Ok(ExitStatus::Success)
}
