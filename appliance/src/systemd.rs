//! The systemd notification protocol (sd_notify), through the sd-notify crate. Every call is a
//! no-op when `$NOTIFY_SOCKET` is not set; a failed send is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Start-up is complete: systemd considers the unit started.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line status, shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown has begun (draining).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// When systemd asked for a watchdog (`WatchdogSec=`), ping it at half the interval from a task
/// on the runtime, so a stalled runtime stops the pings and systemd restarts the service.
/// `status` is called at each ping for a fresh `STATUS=` line.
pub fn spawn_watchdog(status: impl Fn() -> String + Send + 'static) {
    let every = sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .unwrap_or(Duration::from_secs(5));
    let watchdog = sd_notify::watchdog_enabled().is_some();
    debug!(?every, watchdog, "status updates");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            let s = status();
            if watchdog {
                send(&[NotifyState::Watchdog, NotifyState::Status(&s)]);
            } else {
                send(&[NotifyState::Status(&s)]);
            }
        }
    });
}
