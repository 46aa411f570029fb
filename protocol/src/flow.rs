//! culvert's flow-control extension: credit windows per connection and a budget per tunnel, so
//! that a connection whose reader is slow stalls itself and not the whole tunnel.
//!
//! The AWS protocol has no flow control. The extension travels as two message types of our own,
//! always sent with `ignorable = true`, and is switched on only after the relay and both ends
//! have said they support it:
//!
//! - [`HELLO`] carries a [`Hello`] (protobuf, in `payload`). culvert-relay sends one (`from:
//!   "relay"`) to each peer when it attaches, and again whenever the *other* side (re)attaches.
//!   An end sends its own HELLO only in answer to the relay's, so against AWS's relay (which sends
//!   none) nothing but AWS messages ever leaves it. The relay forwards the ends' HELLOs verbatim.
//! - The **source** decides when the extension starts: on a destination HELLO it switches flow
//!   control on for connections it starts from then on, and sends a HELLO with `confirm = true`.
//!   The destination applies flow control to the connections started after that confirmation
//!   (the relay keeps each direction in order, so both ends agree on every connection). A
//!   relay HELLO (a peer came or went) or a source HELLO without `confirm` switches it off again
//!   for new connections until the next confirmation. A destination answers every source HELLO
//!   without `confirm` with its own HELLO (`reply = true`), so the source hears of the
//!   destination whichever of them connected first.
//! - [`WINDOW_UPDATE`] names a connection as DATA does (stream id, service id, connection id)
//!   and carries a 4-byte big-endian credit increment in `payload`.
//!
//! Credit: each end announces in its HELLO the window it grants every connection it receives on
//! (`window`) and the most it will buffer over all of them (`budget`). A sender may have at most
//! `window` bytes of a connection, and `budget` bytes of all connections, sent and not yet
//! credited back. The receiver returns credit as the application *consumes* the bytes, batched
//! (every quarter window). Sending past either limit is a protocol error that ends the session.
//! A connection that closes gives its outstanding bytes back to the budget on both ends.

use bytes::Bytes;
use prost::Message as _;

use crate::message::Message;

/// Message type of [`Hello`] (culvert extension; not an AWS type).
pub const HELLO: i32 = 0x4355_0001;
/// Message type of a credit update (culvert extension; not an AWS type).
pub const WINDOW_UPDATE: i32 = 0x4355_0002;

/// The feature name of this extension in [`Hello::features`].
pub const FEATURE: &str = "flow-control/1";

/// Window granted to each connection by default: enough for a loopback or LAN relay to run at
/// full speed, small enough that an interactive connection is not queued behind much bulk data.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;
/// Bytes buffered over all connections of a tunnel by default (32 stalled connections' worth).
pub const DEFAULT_BUDGET: u64 = 8 * 1024 * 1024;
/// Smallest window or budget a peer may announce (one full DATA payload).
pub const MIN_WINDOW: u32 = crate::message::MAX_PAYLOAD as u32;

/// The payload of a [`HELLO`] message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// "relay", "source" or "destination".
    #[prost(string, tag = "1")]
    pub from: String,
    /// Extensions the sender supports, e.g. [`FEATURE`].
    #[prost(string, repeated, tag = "2")]
    pub features: Vec<String>,
    /// Credit the sender grants each connection it receives on.
    #[prost(uint32, tag = "3")]
    pub window: u32,
    /// Bytes the sender buffers over all connections it receives on.
    #[prost(uint64, tag = "4")]
    pub budget: u64,
    /// Source: flow control applies to the connections it starts after this message.
    #[prost(bool, tag = "5")]
    pub confirm: bool,
    /// Destination: this HELLO answers the source's.
    #[prost(bool, tag = "6")]
    pub reply: bool,
}

impl Hello {
    pub fn supports_flow_control(&self) -> bool {
        self.features.iter().any(|f| f == FEATURE)
    }

    pub fn to_message(&self) -> Message {
        Message {
            r#type: HELLO,
            ignorable: true,
            payload: Bytes::from(self.encode_to_vec()),
            ..Default::default()
        }
    }

    /// The HELLO in `msg`, if it is one and it parses.
    pub fn from_message(msg: &Message) -> Option<Hello> {
        (msg.r#type == HELLO)
            .then(|| Hello::decode(msg.payload.clone()).ok())
            .flatten()
    }

    /// What culvert-relay sends to each peer.
    pub fn relay() -> Hello {
        Hello {
            from: "relay".into(),
            features: vec![FEATURE.into()],
            ..Default::default()
        }
    }
}

/// Flow-control settings of one end: what it grants the peer for sending to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowConfig {
    pub window: u32,
    pub budget: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            window: DEFAULT_WINDOW,
            budget: DEFAULT_BUDGET,
        }
    }
}

/// A credit update for the connection a DATA message with the same names would reach.
pub fn window_update(stream_id: i32, service_id: &str, connection_id: u32, inc: u32) -> Message {
    Message {
        r#type: WINDOW_UPDATE,
        stream_id,
        ignorable: true,
        payload: Bytes::copy_from_slice(&inc.to_be_bytes()),
        service_id: service_id.to_owned(),
        connection_id,
        ..Default::default()
    }
}

/// The increment a WINDOW_UPDATE carries, if its payload is well formed.
pub fn window_increment(msg: &Message) -> Option<u32> {
    increment(&msg.payload)
}

/// The increment in a WINDOW_UPDATE payload: 4 bytes, big-endian, not zero.
pub fn increment(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_be_bytes(b)).filter(|&n| n > 0)
}

/// Credit state of one connection that uses flow control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnCredit {
    /// Bytes we may still send on it.
    pub send: u64,
    /// Bytes we sent that the peer has not credited back.
    pub in_flight: u64,
    /// Bytes the peer may still send before we return credit.
    pub recv: u64,
    /// Bytes received and not yet consumed by the application.
    pub buffered: u64,
    /// Bytes consumed and not yet credited back (batched).
    pub unreturned: u64,
}

impl ConnCredit {
    pub fn new(peer_window: u32, own_window: u32) -> Self {
        ConnCredit {
            send: peer_window as u64,
            in_flight: 0,
            recv: own_window as u64,
            buffered: 0,
            unreturned: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_is_ignorable() {
        let h = Hello {
            from: "source".into(),
            features: vec![FEATURE.into()],
            window: 1000,
            budget: 5000,
            confirm: true,
            reply: false,
        };
        let m = h.to_message();
        assert!(m.ignorable);
        assert!(m.kind().is_none(), "not an AWS type");
        assert_eq!(Hello::from_message(&m), Some(h));
    }

    #[test]
    fn window_updates_carry_a_positive_increment() {
        let m = window_update(3, "SSH", 2, 65536);
        assert!(m.ignorable);
        assert_eq!(window_increment(&m), Some(65536));
        let mut bad = m.clone();
        bad.payload = Bytes::from_static(&[0, 0, 0]);
        assert_eq!(window_increment(&bad), None);
        bad.payload = Bytes::from_static(&[0, 0, 0, 0]);
        assert_eq!(window_increment(&bad), None);
    }
}
