//! The systemd notification protocol (sd_notify), through the sd-notify crate. Every call is a
//! no-op when `$NOTIFY_SOCKET` is not set; a failed send is logged, never fatal.
//!
//! Sending is a blocking datagram write that stalls while the receiver's queue is full (a busy
//! or stopped systemd, a test that stopped reading). So notifications are handed to one sender
//! thread through a bounded queue, never written from the async runtime: a stalled receiver
//! costs dropped status updates, not a stalled daemon.

use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

enum Note {
    Ready(String),
    Status(String),
    Stopping(String),
    Watchdog(String),
}

fn sender() -> Option<&'static SyncSender<Note>> {
    static TX: OnceLock<Option<SyncSender<Note>>> = OnceLock::new();
    TX.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = sync_channel::<Note>(64);
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for note in rx {
                    let r = match &note {
                        Note::Ready(s) => {
                            sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)])
                        }
                        Note::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
                        Note::Stopping(s) => {
                            sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(s)])
                        }
                        Note::Watchdog(s) => {
                            sd_notify::notify(&[NotifyState::Watchdog, NotifyState::Status(s)])
                        }
                    };
                    if let Err(e) = r {
                        warn!(error = %e, "cannot notify systemd");
                    }
                }
            });
        spawned.ok().map(|_| tx)
    })
    .as_ref()
}

fn send(note: Note) {
    if let Some(tx) = sender() {
        match tx.try_send(note) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                debug!("systemd is not reading notifications; one dropped")
            }
        }
    }
}

/// Start-up is complete: systemd considers the unit started.
pub fn ready(status: &str) {
    send(Note::Ready(status.to_owned()));
}

/// A one-line status, shown by `systemctl status`.
pub fn status(status: &str) {
    send(Note::Status(status.to_owned()));
}

/// Shutdown has begun (draining).
pub fn stopping(status: &str) {
    send(Note::Stopping(status.to_owned()));
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
            send(if watchdog {
                Note::Watchdog(s)
            } else {
                Note::Status(s)
            });
        }
    });
}
