//! Logging for the daemons: one line per event with `key=value` fields on stderr (journald
//! stores stderr as is), level from `RUST_LOG` (default `info`), colours only on a terminal.

/// Install the daemons' log subscriber. Call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
