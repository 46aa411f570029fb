//! The tunnel `Message` of AWS IoT Secure Tunneling (`resources/Message.proto` of the AWS
//! localproxy, proto3), written out with prost's derive so no `protoc` is needed to build.
//!
//! Field numbers 1–7 and types 0–7 are AWS's. culvert's own extensions are new message *types*
//! sent with `ignorable = true`; never new fields (the AWS service closes a socket that sends
//! unknown fields).

use bytes::Bytes;

/// Largest DATA payload a peer may send ("63kb (64512 bytes)").
pub const MAX_PAYLOAD: usize = 64_512;

/// Largest WebSocket message payload accepted or sent, in either direction.
pub const MAX_WS_MESSAGE: usize = 131_076;

/// Largest service id / thing name.
pub const MAX_SERVICE_ID_LEN: usize = 128;

/// Largest number of service ids in a SERVICE_IDS message we accept.
pub const MAX_SERVICES: usize = 64;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    #[prost(enumeration = "MessageType", tag = "1")]
    pub r#type: i32,
    #[prost(int32, tag = "2")]
    pub stream_id: i32,
    #[prost(bool, tag = "3")]
    pub ignorable: bool,
    #[prost(bytes = "bytes", tag = "4")]
    pub payload: Bytes,
    #[prost(string, tag = "5")]
    pub service_id: String,
    #[prost(string, repeated, tag = "6")]
    pub available_service_ids: Vec<String>,
    #[prost(uint32, tag = "7")]
    pub connection_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageType {
    Unknown = 0,
    Data = 1,
    StreamStart = 2,
    StreamReset = 3,
    SessionReset = 4,
    ServiceIds = 5,
    ConnectionStart = 6,
    ConnectionReset = 7,
}

impl MessageType {
    /// Types that name a stream and therefore need a non-zero stream id.
    pub fn is_stream_bound(self) -> bool {
        matches!(
            self,
            MessageType::Data
                | MessageType::StreamStart
                | MessageType::StreamReset
                | MessageType::ConnectionStart
                | MessageType::ConnectionReset
        )
    }
}

impl Message {
    /// The message type, or `None` for a number this implementation does not know.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::try_from(self.r#type).ok()
    }

    fn with(kind: MessageType, stream_id: i32, service_id: &str, connection_id: u32) -> Message {
        Message {
            r#type: kind as i32,
            stream_id,
            service_id: service_id.to_owned(),
            connection_id,
            ..Default::default()
        }
    }

    pub fn data(stream_id: i32, service_id: &str, connection_id: u32, payload: Bytes) -> Message {
        Message {
            payload,
            ..Message::with(MessageType::Data, stream_id, service_id, connection_id)
        }
    }

    pub fn stream_start(stream_id: i32, service_id: &str, connection_id: u32) -> Message {
        Message::with(
            MessageType::StreamStart,
            stream_id,
            service_id,
            connection_id,
        )
    }

    pub fn stream_reset(stream_id: i32, service_id: &str) -> Message {
        Message::with(MessageType::StreamReset, stream_id, service_id, 0)
    }

    pub fn connection_start(stream_id: i32, service_id: &str, connection_id: u32) -> Message {
        Message::with(
            MessageType::ConnectionStart,
            stream_id,
            service_id,
            connection_id,
        )
    }

    pub fn connection_reset(stream_id: i32, service_id: &str, connection_id: u32) -> Message {
        Message::with(
            MessageType::ConnectionReset,
            stream_id,
            service_id,
            connection_id,
        )
    }

    pub fn session_reset() -> Message {
        Message {
            r#type: MessageType::SessionReset as i32,
            ..Default::default()
        }
    }

    pub fn service_ids(ids: &[String]) -> Message {
        Message {
            r#type: MessageType::ServiceIds as i32,
            available_service_ids: ids.to_vec(),
            ..Default::default()
        }
    }
}

/// A decoded message whose service id borrows the frame it came from: what the hot paths
/// (DATA and credit updates at the ends, every frame at the relay) use, so that decoding a frame
/// allocates nothing. [`crate::frame::decode_ref`] produces it; it never carries
/// `available_service_ids` (SERVICE_IDS takes the owned path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub r#type: i32,
    pub stream_id: i32,
    pub ignorable: bool,
    pub payload: Bytes,
    pub service_id: &'a str,
    pub connection_id: u32,
}

impl MessageRef<'_> {
    /// The message type, or `None` for a number this implementation does not know.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::try_from(self.r#type).ok()
    }

    pub fn to_message(&self) -> Message {
        Message {
            r#type: self.r#type,
            stream_id: self.stream_id,
            ignorable: self.ignorable,
            payload: self.payload.clone(),
            service_id: self.service_id.to_owned(),
            available_service_ids: Vec::new(),
            connection_id: self.connection_id,
        }
    }
}

impl<'a> From<&'a Message> for MessageRef<'a> {
    /// The view of an owned message (its `available_service_ids`, if any, are not part of it).
    fn from(m: &'a Message) -> Self {
        MessageRef {
            r#type: m.r#type,
            stream_id: m.stream_id,
            ignorable: m.ignorable,
            payload: m.payload.clone(),
            service_id: &m.service_id,
            connection_id: m.connection_id,
        }
    }
}

impl std::fmt::Display for Message {
    /// A one-line summary for logs (never the payload).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            Some(k) => write!(f, "{k:?}")?,
            None => write!(f, "type {}", self.r#type)?,
        }
        write!(
            f,
            "(stream {}, service {:?}, connection {}, {} payload bytes{})",
            self.stream_id,
            self.service_id,
            self.connection_id,
            self.payload.len(),
            if self.ignorable { ", ignorable" } else { "" }
        )
    }
}
