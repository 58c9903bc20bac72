//! Progress bars for long work, on stderr only: a command concern (reports compute nothing and
//! show no progress).

use std::borrow::Cow;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar on stderr counting `len` `unit`s (`tensors`, `blocks`, `models`), with the
/// elapsed time and an estimate of what remains; hidden with `--quiet` (indicatif also hides it
/// when stderr is not a TTY). `message` names the phase (`check --each`: the adapter too).
pub fn bar(
    len: usize,
    quiet: bool,
    message: impl Into<Cow<'static, str>>,
    unit: &'static str,
) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template =
        format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, ~{{eta}} left)");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}
