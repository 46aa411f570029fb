//! culvertd, the gateway daemon.
//!
//! # Layout
//! - [`config`]: the TOML rules file, read in three passes (syntax, structure, validation) so
//!   that every problem is reported with file, line and key.
//! - [`acl`]: which addresses a rule may reach (default deny, checked after resolution).
//! - [`limits`]: connection counts, connection rates and bandwidth (governor).
//! - [`audit`]: the JSON-lines audit trail, hash-chained, surviving log rotation.
//! - [`consent`]: the site's "remote access allowed" switch, checked per connection.
//! - [`approval`]: on-site approval of each tunnel (`culvertd consent`, decision files), and
//!   [`hmi`], the same from a local HMI over HTTP.
//! - [`rules`]: the rules in force, swapped whole on reload (SIGHUP); per-tunnel state.
//! - [`gateway`]: connect to the relay as destination, keep the session up (reconnecting with
//!   the client token), hand each tunnel connection to [`forward`].
//! - [`forward`]: one connection from arrival to audit record: rule, limits, connect, pump.
//! - [`target`]: reaching a rule's target: resolve, check every address against the ACL,
//!   connect (tcp rules and http upstreams alike; a udp target's socket).
//! - [`udp`]: a udp rule's flow: datagrams framed in the tunnel connection's stream.
//! - [`modbus`]: a read-only Modbus/TCP rule's filter in front of its target.
//! - [`serial`]: a serial rule's port: one user at a time, raw bytes or RFC 2217.
//! - `http` (feature `http`): HTTP routing by Host and path to device web UIs, pingora embedded.
//! - [`notify`]: MQTT notifications: each one starts a destination session for its token;
//!   [`health`]: the rules' targets probed and reported to the relay over the same client;
//!   [`mqtt_proxy`]: that client's way through the site's proxy.
//! - [`service`]: [`run`]: serve, stop (drain, then cut after the grace period) and reload
//!   on [`Signal`]s, under one shutdown; `main` only prepares and calls it.
//! - [`metrics`]: counters and gauges for the Prometheus endpoint and systemd's STATUS line
//!   (readiness, watchdog and the endpoint itself are in `culvert-appliance`).

pub mod acl;
pub mod approval;
pub mod audit;
pub mod config;
pub mod consent;
pub mod forward;
pub mod gateway;
pub mod health;
pub mod hmi;
#[cfg(feature = "http")]
pub mod http;
pub mod limits;
pub mod metrics;
pub mod modbus;
pub mod mqtt_proxy;
pub mod notify;
pub mod rules;
pub mod serial;
pub mod service;
pub mod target;
pub mod udp;

pub use service::{Daemon, Signal, Work, run};

/// Exit code for a configuration error (EX_USAGE / EX_CONFIG convention: 64).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for "the relay refused the token / the tunnel is closed".
pub const EXIT_REFUSED: u8 = 3;
