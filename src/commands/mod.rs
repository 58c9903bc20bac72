//! One module per subcommand. Each turns validated arguments into a finished report and hands it
//! to the reporters; none of them prints directly.

pub mod check;
pub mod each;
pub mod explain;
pub mod init;
pub mod inputs;
pub mod inspect;
pub mod merge;
pub mod progress;
mod repaired;
pub mod shell;

use crate::ExitStatus;
use crate::cli::{Cli, Command};
use crate::io::hub;

/// Runs one parsed command line. Errors mean "could not run" (exit 2).
///
/// Hub names among the input arguments are replaced by their cache snapshot folders here, before
/// any command sees them, so every command treats inputs as plain paths.
pub fn run(cli: Cli) -> anyhow::Result<ExitStatus> {
    crate::report::color::set_choice(cli.color);
    match cli.command {
        Command::Check(mut args) => {
            let mut inputs = vec![("--base", &mut args.base)];
            inputs.extend(args.adapters.iter_mut().map(|a| ("--adapter", a)));
            inputs.extend(args.each.iter_mut().map(|a| ("--each", a)));
            inputs.extend(args.merged.iter_mut().map(|m| ("--merged", m)));
            args.hub = hub::resolve_all(inputs, &args.revision)?;
            if each::requested(&args) {
                each::run(&args)
            } else {
                check::run(&args)
            }
        }
        Command::Merge(mut args) => {
            let mut inputs = vec![("--base", &mut args.base)];
            inputs.extend(args.adapters.iter_mut().map(|a| ("--adapter", a)));
            hub::resolve_all(inputs, &args.revision)?;
            merge::run(&args)
        }
        Command::Inspect(mut args) => {
            hub::resolve_all([("PATH", &mut args.path)], &args.revision)?;
            inspect::run(&args)
        }
        Command::Explain(args) => explain::run(&args),
        Command::Init(args) => init::run(&args),
        Command::Completions(args) => shell::completions(&args),
        Command::Man => shell::man(),
    }
}
