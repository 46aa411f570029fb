//! culvert-relay: the hosted tunnel service.
//!
//! # Layout
//! - [`server`]: the HTTPS listener (rustls) and router; [`server::Relay::run`] is the entry point.
//! - [`slots`]: connection limits of the public listeners, global and per source address.
//! - [`api`]: the control API (open / list / describe / close / rotate), JSON, bearer API key.
//! - [`dataplane`]: the AWS-compatible WebSocket endpoint `/tunnel` and frame forwarding.
//! - [`registry`]: tunnels, single-use tokens, and the live pairing of each tunnel's two peers.
//! - [`store`]: persistence of tunnel records (embedded redb file by default).
//! - [`tokens`]: token generation and hashing.
//! - [`config`] / [`dev`]: configuration file and the zero-setup `--dev` mode.
//! - [`notify`]: MQTT notification of devices on open and rotation; [`reannounce`]: tunnels a
//!   device may have missed, announced again when it subscribes (bounded, per thing).
//! - [`broker`] / [`devices`]: the embedded MQTT broker (rumqttd's router in-process, behind
//!   culvert's TLS listener and topic rules, with no port of its own) and the device
//!   credentials it accepts.
//!
//! Not here (yet): metrics, multi-node operation.

pub mod api;
pub mod broker;
pub mod config;
pub mod dataplane;
pub mod dev;
pub mod devices;
pub mod metrics;
pub mod notify;
pub mod reannounce;
pub mod registry;
pub mod server;
pub mod slots;
pub mod store;
pub mod tokens;
