//! `lora-doctor completions SHELL` and the hidden `lora-doctor man`: shell completion scripts and
//! the roff man page, both generated from the clap definitions in `cli.rs` so they never drift
//! from the real flags.

use anyhow::Context;
use clap::CommandFactory;

use crate::ExitStatus;
use crate::cli::{Cli, CompletionsArgs};
use crate::report;

/// Prints the completion script for one shell.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<ExitStatus> {
    let mut command = Cli::command();
    // Scripts register themselves under the name users type: the clap command's own name.
    let name = command.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    let text = String::from_utf8(script).context("the completion script is not UTF-8")?;
    report::print_human(&text, false)?;
    Ok(ExitStatus::Success)
}

/// Prints `lora-doctor.1` in roff (`lora-doctor man > lora-doctor.1; man ./lora-doctor.1`).
pub fn man() -> anyhow::Result<ExitStatus> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .context("rendering the man page")?;
    let text = String::from_utf8(page).context("the man page is not UTF-8")?;
    report::print_human(&text, false)?;
    Ok(ExitStatus::Success)
}
