//! Log output: human-readable text or one JSON object per line, filtered by `RUST_LOG`.
//!
//! Logs go to stdout (the container convention). The default filter is `info`, which includes the
//! one-line-per-request access log on target `plextera_gateway::access`; `RUST_LOG=warn` silences it.
//! Text is coloured only when stdout is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>), so files, pipes and log collectors get plain text.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stdout is a terminal and NO_COLOR is unset.
    #[default]
    Text,
    /// One JSON object per line, with the request span's fields.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours_wanted(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` holds anything.
fn colours_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(colours_wanted(true, None));
        assert!(colours_wanted(true, Some(OsStr::new(""))));
        assert!(!colours_wanted(true, Some(OsStr::new("1"))));
        assert!(!colours_wanted(false, None));
    }
}
