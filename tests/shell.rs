//! Shell conventions: completion scripts for every shell, the man page, and colour that follows
//! `--color` and `NO_COLOR`.
//!
//! A module of the one integration test binary (`tests/cli.rs`).

use std::process::{Command, Output};

use super::{code, fixture, root, stderr};

const ESCAPE: char = '\x1b';

/// Runs the binary with NO_COLOR removed unless `no_color` is given.
fn run_colour(args: &[&str], no_color: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-doctor"));
    command
        .args(args)
        .current_dir(root())
        .env_remove("NO_COLOR");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    command.output().expect("the binary runs")
}

#[test]
fn completions_exist_for_every_shell_and_know_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = run_colour(&["completions", shell], None);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).expect("UTF-8 script");
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        // Long flags without their dashes: fish spells them `-l adapter`.
        for word in ["check", "merge", "inspect", "adapter", "revision"] {
            assert!(script.contains(word), "{shell} script lacks `{word}`");
        }
    }
    let out = run_colour(&["completions", "tcsh"], None);
    assert_eq!(code(&out), 2, "an unknown shell is a usage error");
}

#[test]
fn the_man_page_is_roff_for_every_visible_subcommand() {
    let out = run_colour(&["man"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let page = String::from_utf8(out.stdout).expect("UTF-8 roff");
    assert!(page.contains(".TH lora-doctor 1"), "{page}");
    for word in ["check", "merge", "inspect", "explain", "completions"] {
        assert!(page.contains(word), "man page lacks `{word}`");
    }
    // `man` is hidden from --help: it is for packagers.
    let help = run_colour(&["--help"], None);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("completions"));
    assert!(!help.contains("\n  man "), "{help}");
}

/// `check` on an adapter with a deny finding, weights only, summary on stdout.
fn failing_check(colour: &[&str], no_color: Option<&str>) -> (i32, String) {
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/nonfinite");
    let mut args = vec![
        "check",
        "--weights-only",
        "--base",
        &base,
        "--adapter",
        &adapter,
    ];
    args.extend_from_slice(colour);
    let out = run_colour(&args, no_color);
    (
        code(&out),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn colour_follows_the_flag_and_no_color() {
    // Not a terminal: auto means plain.
    let (status, plain) = failing_check(&[], None);
    assert_eq!(status, 1);
    assert!(plain.contains("verdict: FAIL"), "{plain}");
    assert!(!plain.contains(ESCAPE), "auto off a terminal: {plain:?}");

    let (status, always) = failing_check(&["--color", "always"], None);
    assert_eq!(status, 1, "colour never changes the verdict");
    assert!(always.contains("\x1b[1;31mFAIL\x1b[0m"), "{always:?}");
    assert!(always.contains("\x1b[1;31mdeny \x1b[0m"), "{always:?}");
    // Stripping the escapes gives back the plain text: columns are padded before painting.
    let stripped = regex::Regex::new("\x1b\\[[0-9;]*m")
        .expect("regex")
        .replace_all(&always, "");
    assert_eq!(stripped, plain);

    let (_, never) = failing_check(&["--color", "never"], None);
    assert!(!never.contains(ESCAPE));
    // NO_COLOR turns auto off; an explicit --color always still wins (no-color.org).
    let (_, no_color) = failing_check(&["--color", "auto"], Some("1"));
    assert!(!no_color.contains(ESCAPE));
    let (_, forced) = failing_check(&["--color=always"], Some("1"));
    assert!(forced.contains(ESCAPE));
    // The flag is global: accepted before the subcommand too.
    let out = run_colour(&["--color", "never", "explain", "overflow"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// Runs `check` on the failing adapter inside a pseudo-terminal (util-linux `script`), so `auto`
/// sees a terminal on stdout. stderr is dropped: progress bars draw there with their own escapes.
fn failing_check_on_a_terminal(no_color: Option<&str>) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let command_line = [
        env!("CARGO_BIN_EXE_lora-doctor"),
        "check",
        "--weights-only",
        "--base",
        &fixture("models/tiny-llama"),
        "--adapter",
        &fixture("adapters/nonfinite"),
    ]
    .map(quote)
    .join(" ")
        + " 2>/dev/null";
    let mut command = Command::new("script");
    command
        .args([
            "--quiet",
            "--return",
            "--command",
            &command_line,
            "/dev/null",
        ])
        .current_dir(root())
        .env_remove("NO_COLOR")
        .env("TERM", "xterm");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let out = command
        .output()
        .expect("util-linux `script` runs (apt-get install -y util-linux)");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn auto_colours_a_terminal_unless_no_color_is_set() {
    let tty = failing_check_on_a_terminal(None);
    assert!(tty.contains("\x1b[1;31mFAIL\x1b[0m"), "{tty:?}");
    let tty = failing_check_on_a_terminal(Some("1"));
    assert!(tty.contains("verdict: FAIL"), "{tty:?}");
    assert!(!tty.contains(ESCAPE), "{tty:?}");
    // An empty NO_COLOR does not count (no-color.org: "present and not an empty string").
    let tty = failing_check_on_a_terminal(Some(""));
    assert!(tty.contains(ESCAPE), "{tty:?}");
}
