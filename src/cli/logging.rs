//! Installs the process's log subscriber once the config says how to log.

use std::sync::Arc;

use anyproxy::config::{LevelSwitch, LogConfig, LogFormat};
use tracing_subscriber::{reload, EnvFilter};

/// `RUST_LOG`, when set, wins over the config's level: it is how an operator turns
/// on debug for one run without editing the file. `format` from the command line wins
/// over the file's. The returned switch changes the level later (a reload).
pub fn init(config: &LogConfig, format: Option<LogFormat>) -> Arc<dyn LevelSwitch> {
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => match EnvFilter::try_new(&s) {
            Ok(f) => ((f, s), true),
            Err(e) => {
                eprintln!(
                    "warning: RUST_LOG={s:?} is not a valid filter ({e}); using {:?}",
                    config.level
                );
                ((EnvFilter::new(&config.level), config.level.clone()), false)
            }
        },
        _ => ((EnvFilter::new(&config.level), config.level.clone()), false),
    };
    let (filter, current) = filter;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The filter's reload layer wraps the formatting layer, so it is added last.
    // try_init: tests and embedders may have installed a subscriber already.
    match format.unwrap_or(config.format) {
        LogFormat::Human => {
            let builder = builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = builder.try_init();
            Switch::arc(handle, current, from_env)
        }
        LogFormat::Json => {
            // Not flattened: the access line's `target` field (the destination) would
            // collide with the event's own `target` (the log target, `access`).
            let builder = builder
                .json()
                .with_current_span(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = builder.try_init();
            Switch::arc(handle, current, from_env)
        }
    }
}

/// A reload handle on the subscriber's filter, whatever the line format.
struct Switch<S> {
    handle: reload::Handle<EnvFilter, S>,
    current: parking_lot::Mutex<String>,
    from_env: bool,
}

impl<S: Send + Sync + 'static> Switch<S> {
    fn arc(
        handle: reload::Handle<EnvFilter, S>,
        current: String,
        from_env: bool,
    ) -> Arc<dyn LevelSwitch> {
        Arc::new(Switch {
            handle,
            current: parking_lot::Mutex::new(current),
            from_env,
        })
    }
}

impl<S: Send + Sync + 'static> LevelSwitch for Switch<S> {
    fn current(&self) -> String {
        self.current.lock().clone()
    }

    fn overridden(&self) -> bool {
        self.from_env
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let next = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.handle.reload(next).map_err(|e| e.to_string())?;
        *self.current.lock() = filter.to_owned();
        Ok(())
    }
}
