//! Installs the process's log subscriber once the config says how to log.

use anyproxy::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// `RUST_LOG`, when set, wins over the config's level: it is how an operator turns
/// on debug for one run without editing the file. `format` from the command line wins
/// over the file's.
pub fn init(config: &LogConfig, format: Option<LogFormat>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => EnvFilter::try_new(&s).unwrap_or_else(|e| {
            eprintln!(
                "warning: RUST_LOG={s:?} is not a valid filter ({e}); using {:?}",
                config.level
            );
            EnvFilter::new(&config.level)
        }),
        _ => EnvFilter::new(&config.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: tests and embedders may have installed a subscriber already.
    let _ = match format.unwrap_or(config.format) {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            // Not flattened: the access line's `target` field (the destination) would
            // collide with the event's own `target` (the log target, `access`).
            .json()
            .with_current_span(false)
            .try_init(),
    };
}
