//! lora-doctor: proves a LoRA merge is faithful before it ships.
//!
//! The library holds everything; `main.rs` only parses and maps the exit status. Data flows
//! inputs → load (`io`) → findings (`findings`) → verdict → reports (`report`), driven by one
//! module per subcommand (`commands`).

pub mod alloc_policy;
pub mod cli;
pub mod commands;
pub mod dense;
pub mod divergence;
pub mod exit_status;
pub mod exp;
pub mod findings;
pub mod forensics;
pub mod forward;
pub mod gate;
pub mod interrupt;
pub mod io;
pub mod merge;
pub mod model;
pub mod report;
pub mod simd;
pub mod stats;
pub mod threads;

pub use commands::run;
pub use exit_status::ExitStatus;
