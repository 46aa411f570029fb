//! On-site consent: the "remote access allowed" switch (`[consent] switch_file`).
//!
//! The switch is a file the site controls: written by a local command (`echo 1 >
//! /run/culvert/remote-access`), an HMI, or a GPIO input line's sysfs `value` file. It reads
//! on when its first line is `1`, `on`, `yes`, `true` or `allowed`; anything else, a missing
//! file or one that cannot be read is off (fail closed). culvertd checks it for every new
//! connection, and reads it every [`POLL`]: turning it off ends the live connections
//! (audit reason `consent_withdrawn`); while off, new ones are refused (`no_consent`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::audit::{EndReason, Record};
use crate::rules::Gateway;

/// How often the switch is read.
pub const POLL: Duration = Duration::from_millis(500);

/// Does the switch at `path` read on?
pub fn reads_on(path: &Path) -> bool {
    // A switch is a few bytes; a larger file is not one.
    let Ok(text) = std::fs::read(path) else {
        return false;
    };
    if text.len() > 64 {
        return false;
    }
    let first = String::from_utf8_lossy(&text);
    let first = first
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(first.as_str(), "1" | "on" | "yes" | "true" | "allowed")
}

/// Keep `gw.consent` current, for as long as the process runs.
pub async fn watch(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The path of the rules in force: a reload may add, change or remove the switch.
        let path = gw.rules().config.consent_switch.clone();
        let on = match &path {
            None => true,
            Some(p) => {
                let p = p.clone();
                tokio::task::spawn_blocking(move || reads_on(&p))
                    .await
                    .unwrap_or(false)
            }
        };
        let changed = gw.consent.send_if_modified(|cur| {
            let changed = *cur != on;
            *cur = on;
            changed
        });
        if changed {
            let shown = path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if on {
                info!(switch = %shown, "on-site consent: remote access allowed");
            } else {
                warn!(switch = %shown, "on-site consent: remote access switched off; live connections end");
            }
            gw.audit.record(Record {
                event: "consent",
                detail: Some(format!(
                    "remote access {} ({shown})",
                    if on { "allowed" } else { "switched off" }
                )),
                ..Record::default()
            });
        }
    }
}

/// Resolves when the switch turns off (at once if it is off).
pub async fn withdrawn(gw: &Gateway) -> EndReason {
    let mut rx = gw.consent.subscribe();
    loop {
        if !*rx.borrow_and_update() {
            return EndReason::ConsentWithdrawn;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_reads_on_only_for_what_says_so() {
        let dir = std::env::temp_dir().join(format!("culvertd-consent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("switch");
        assert!(!reads_on(&p), "missing: off");
        for (text, on) in [
            ("1\n", true),
            ("ON", true),
            ("allowed\n", true),
            ("0\n", false),
            ("", false),
            ("off", false),
            ("10", false),
        ] {
            std::fs::write(&p, text).unwrap();
            assert_eq!(reads_on(&p), on, "{text:?}");
        }
        std::fs::write(&p, "1".repeat(100)).unwrap();
        assert!(!reads_on(&p));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
