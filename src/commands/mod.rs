//! One module per subcommand. Each turns validated arguments into a finished report and hands it
//! to the reporters; none of them prints directly.

pub mod check;
pub mod explain;
pub mod init;
pub mod inspect;
pub mod merge;
pub mod shell;
