//! culvertd, the gateway daemon.
//!
//! # Layout
//! - [`config`]: the TOML rules file — service name → LAN target — read in two stages (raw serde
//!   struct refusing unknown keys, then validation with errors naming file, line and key).
//! - [`gateway`]: connect to the relay as destination, keep the session up (reconnecting with
//!   the client token), and forward each tunnel connection to its rule's target.
//!
//! - [`notify`]: MQTT notifications: each one starts a destination session for its token.
//!
//! Not here yet: ACLs and limits, HTTP routing, systemd integration.

pub mod config;
pub mod gateway;
pub mod notify;

/// Exit code for a configuration error (EX_USAGE / EX_CONFIG convention: 64).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for "the relay refused the token / the tunnel is closed".
pub const EXIT_REFUSED: u8 = 3;
