//! culvert-relay: the hosted tunnel service.
//!
//! # Layout
//! - [`server`]: the HTTPS listener (rustls) and router; [`server::Relay::run`] is the entry point.
//! - [`slots`]: connection limits of the public listeners, global and per source address.
//! - [`api`]: the control API (tunnels, devices, operators), JSON, bearer API key.
//! - [`access`]: operators, their API keys and grants; who may do what ([`access::Access`]).
//! - [`audit`]: the relay's hash-chained audit trail of control actions and attaches.
//! - [`dataplane`]: the AWS-compatible WebSocket endpoint `/tunnel`: the handshake, and the
//!   I/O around `culvert_protocol::forward`, which checks and plans every frame.
//! - [`registry`]: tunnels and their single-use tokens; [`live`]: who is connected on each side
//!   of a tunnel, and how a peer is disconnected (with which close frame).
//! - [`state`]: what the handlers share; [`reply`]: the HTTP error responses.
//! - [`store`]: tunnel records behind the [`store::Store`] trait, one atomic operation per
//!   change (`store::ops`); a redb file by default, in memory for tests.
//! - [`tokens`]: token generation and hashing.
//! - [`config`] / [`dev`]: configuration file and the zero-setup `--dev` mode.
//! - [`notify`]: MQTT notification of devices on open and rotation; [`reannounce`]: tunnels a
//!   device may have missed, announced again when it subscribes (bounded, per thing).
//! - [`broker`] / [`devices`] / [`topic`]: the embedded MQTT broker (rumqttd's router
//!   in-process, behind culvert's TLS listener and topic rules, with no port of its own), the
//!   device credentials it accepts (and what the broker saw of each: online, last seen), and
//!   topic names; [`onsite`] and [`health`]: what devices report through it (on-site
//!   approvals, their rules' targets).
//! - [`metrics`]: the Prometheus counters.
//! - [`cluster`]: several nodes on one PostgreSQL store: which node holds a tunnel (leases),
//!   node links (mTLS) that carry a peer to it, and draining.

pub mod access;
pub mod api;
pub mod audit;
pub mod aws;
pub mod bridge;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod console;
pub mod dataplane;
pub mod dev;
pub mod devices;
pub mod health;
pub mod live;
pub mod metrics;
pub mod notify;
pub mod onsite;
pub mod reannounce;
pub mod registry;
pub mod reply;
pub mod server;
pub mod slots;
pub mod state;
pub mod store;
pub mod tokens;
pub mod topic;
