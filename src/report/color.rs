//! Whether human output is coloured, and the few colours it uses: verdicts and finding levels.
//!
//! `--color auto` (the default) colours only a terminal, and never when `NO_COLOR` is set to a
//! non-empty value or `TERM=dumb`; `--color always` wins over `NO_COLOR`, as no-color.org asks of
//! an explicit flag. The choice is process-wide, set once by `crate::run` from the global flag, so
//! reporters ask for a `Palette` per stream instead of threading the flag through every command.

use std::io::IsTerminal;
use std::sync::OnceLock;

use clap::ColorChoice;

use crate::findings::{Level, Verdict};

static CHOICE: OnceLock<ColorChoice> = OnceLock::new();

/// Records the `--color` choice; the first call wins (tests may run commands twice).
pub fn set_choice(choice: ColorChoice) {
    let _ = CHOICE.set(choice);
}

/// True when `NO_COLOR` asks for plain text (set and not empty, per no-color.org).
fn no_color_requested() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// The colours for text written to stdout, or to stderr when `to_stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Palette {
    enabled: bool,
}

/// Select Graphic Rendition codes used here, each paired with a reset.
const RED_BOLD: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const GREEN_BOLD: &str = "\x1b[1;32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Palette {
    /// No colour at all.
    pub const PLAIN: Palette = Palette { enabled: false };
    /// Colour regardless of the stream.
    pub const ANSI: Palette = Palette { enabled: true };

    /// The palette the `--color` choice gives the stream human text goes to.
    pub fn for_stream(to_stderr: bool) -> Palette {
        let enabled = match CHOICE.get().copied().unwrap_or(ColorChoice::Auto) {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                let terminal = if to_stderr {
                    std::io::stderr().is_terminal()
                } else {
                    std::io::stdout().is_terminal()
                };
                terminal
                    && !no_color_requested()
                    && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
            }
        };
        Palette { enabled }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.enabled {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    /// `text` (already padded, so columns stay aligned) in the colour of a finding level.
    pub fn level(self, level: Level, text: &str) -> String {
        match level {
            Level::Deny => self.paint(RED_BOLD, text),
            Level::Warn => self.paint(YELLOW, text),
            Level::Allow => self.paint(DIM, text),
        }
    }

    /// `text` in the colour of a verdict.
    pub fn verdict(self, verdict: Verdict, text: &str) -> String {
        match verdict {
            Verdict::Fail => self.paint(RED_BOLD, text),
            Verdict::Warn => self.paint(YELLOW, text),
            Verdict::Pass => self.paint(GREEN_BOLD, text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_is_untouched_and_ansi_is_reset() {
        assert_eq!(Palette::PLAIN.level(Level::Deny, "deny "), "deny ");
        let painted = Palette::ANSI.verdict(Verdict::Fail, "FAIL");
        assert_eq!(painted, "\x1b[1;31mFAIL\x1b[0m");
        assert_ne!(
            Palette::ANSI.level(Level::Warn, "warn"),
            Palette::ANSI.level(Level::Deny, "warn")
        );
    }
}
