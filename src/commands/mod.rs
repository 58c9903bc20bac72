//! One module per subcommand. Each turns validated arguments into a finished report and hands it
//! to the reporters; none of them prints directly.

pub mod check;
pub mod explain;
pub mod init;
pub mod inputs;
pub mod inspect;
pub mod merge;
pub mod progress;

use crate::ExitStatus;
use crate::cli::{Cli, Command};

/// Runs one parsed command line. Errors mean "could not run" (exit 2).
pub fn run(cli: Cli) -> anyhow::Result<ExitStatus> {
    match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Init(args) => init::run(&args),
    }
}
