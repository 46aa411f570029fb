//! What makes culvert's daemons (culvertd, culvert-relay) behave as appliances under systemd —
//! and sensibly outside it:
//!
//! - [`systemd`]: `READY=1`, `STATUS=…`, `STOPPING=1` and `WATCHDOG=1` on `$NOTIFY_SOCKET`
//!   (`Type=notify`, `WatchdogSec=`); no-ops when not started by systemd.
//! - [`privileges`]: started as root outside systemd, drop to the configured user once the keys
//!   are read.
//! - [`metrics`]: the opt-in Prometheus endpoint (`GET /metrics`).
//! - [`logging`]: the daemons' log subscriber.
//! - [`limits`]: the open-file limit raised to what the system allows.
//! - [`audit`]: the hash-chained audit file both daemons write, and its verifier.
//!
//! Signal handling stays in each program's `main`, where the program's shutdown is decided.

pub mod audit;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod privileges;
pub mod systemd;
