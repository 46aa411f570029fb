//! Logging for the daemons: one line per event with `key=value` fields on stderr (journald
//! stores stderr as is), level from `RUST_LOG` (default `info`), colours only on a terminal.

/// rustls warns about every ClientHello whose SNI is not a DNS name, such as the IP address the
/// AWS localproxy (and any client told to reach the relay by address) always sends. That is
/// normal for a relay and says nothing an operator can act on, so rustls's handshake-message
/// parser logs only errors unless `RUST_LOG` names rustls itself.
const QUIET_RUSTLS: &str = "rustls::msgs::handshake=error";

/// The filter for a `RUST_LOG` value (`None`: unset).
fn filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let spec = if spec.contains("rustls") {
        spec.to_owned()
    } else {
        format!("{QUIET_RUSTLS},{spec}")
    };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{QUIET_RUSTLS},info")))
}

/// Install the daemons' log subscriber. Call once, first thing in `main`.
pub fn init() {
    let rust_log = std::env::var("RUST_LOG").ok();
    tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_sni_chatter_is_quiet_unless_asked_for() {
        assert_eq!(
            filter(None).to_string(),
            format!("{QUIET_RUSTLS},info")
                .parse::<tracing_subscriber::EnvFilter>()
                .unwrap()
                .to_string()
        );
        assert!(filter(Some("debug")).to_string().contains(QUIET_RUSTLS));
        assert!(!filter(Some("rustls=debug")).to_string().contains("=error"));
    }
}
