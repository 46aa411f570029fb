//! Framing: a tunnel carries a byte stream of `[u16 big-endian length][protobuf Message]`
//! frames, "very loosely coupled" with WebSocket messages: one WebSocket message may carry many
//! frames or a slice of one. [`FrameReader`] reassembles frames from WebSocket message payloads
//! without copying in the common case (whole frames per message); [`encode`] writes one.
//!
//! "Need more bytes" is `Ok(None)`-like (nothing is returned yet), never an error.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::message::{MAX_PAYLOAD, MAX_WS_MESSAGE, Message, MessageRef};

/// Size of the length prefix.
pub const LENGTH_PREFIX: usize = 2;

/// Largest encoded message: the payload limit plus room for every other field
/// (the localproxy's `max_size` is 65536; the 2-byte prefix caps it at 65535 anyway).
pub const MAX_MESSAGE_LEN: usize = u16::MAX as usize;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("tunnel frame of length 0 (a message needs at least its type)")]
    Empty,
    #[error("tunnel frame does not decode as a tunnel Message: {0}")]
    Decode(prost::DecodeError),
    #[error("DATA payload of {0} bytes exceeds the protocol limit of {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("message of {0} bytes does not fit a tunnel frame (at most {MAX_MESSAGE_LEN})")]
    MessageTooLarge(usize),
}

/// Reassembles frames from a sequence of byte chunks.
#[derive(Default, Debug)]
pub struct FrameReader {
    /// Bytes of an incomplete frame carried over from earlier chunks (at most one frame's worth).
    partial: BytesMut,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held back waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Feed one chunk. Calls `on_frame` with the body (without length prefix) of every frame the
    /// chunk completes, in order, and returns the wire bytes of exactly those complete frames
    /// (prefixes included) so a relay can forward them verbatim. If `on_frame` fails, the error
    /// is returned and the reader should be discarded together with its connection.
    pub fn feed<E>(
        &mut self,
        chunk: Bytes,
        mut on_frame: impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<Bytes, E>
    where
        E: From<FrameError>,
    {
        if self.partial.is_empty() {
            // Fast path: scan the chunk in place; only a trailing partial frame is copied.
            let end = scan(&chunk, &mut on_frame)?;
            if end < chunk.len() {
                self.partial.extend_from_slice(&chunk[end..]);
            }
            return Ok(chunk.slice(..end));
        }
        // Slow path: bytes carried over. Append (each byte is copied once), and only once a
        // frame is complete hand the complete prefix on, without copying it again.
        self.partial.extend_from_slice(&chunk);
        let end = complete_prefix(&self.partial);
        if end == 0 {
            return Ok(Bytes::new());
        }
        let whole = self.partial.split_to(end).freeze();
        scan(&whole, &mut on_frame)?;
        Ok(whole)
    }
}

/// Length of the longest prefix of `buf` made of complete frames.
fn complete_prefix(buf: &[u8]) -> usize {
    let mut pos = 0;
    while buf.len() - pos >= LENGTH_PREFIX {
        let len = u16::from_be_bytes([buf[pos], buf[pos + 1]]) as usize;
        if len == 0 || buf.len() - pos - LENGTH_PREFIX < len {
            // An empty frame is reported by `scan`; stop here either way.
            return if len == 0 { pos + LENGTH_PREFIX } else { pos };
        }
        pos += LENGTH_PREFIX + len;
    }
    pos
}

/// Calls `on_frame` for each complete frame at the start of `buf`; returns the end offset of the
/// last complete frame.
fn scan<E: From<FrameError>>(
    buf: &Bytes,
    on_frame: &mut impl FnMut(Bytes) -> Result<(), E>,
) -> Result<usize, E> {
    let mut pos = 0;
    while buf.len() - pos >= LENGTH_PREFIX {
        let len = u16::from_be_bytes([buf[pos], buf[pos + 1]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty.into());
        }
        let start = pos + LENGTH_PREFIX;
        if buf.len() - start < len {
            break;
        }
        on_frame(buf.slice(start..start + len))?;
        pos = start + len;
    }
    Ok(pos)
}

/// Whether an encoded frame (length prefix included) is a `STREAM_START` or `CONNECTION_START`.
///
/// Such a frame must be the last one in its WebSocket message: the AWS localproxy (3.3.1), as
/// destination, stops its read loop on a start to connect to the target, and when it resumes it
/// reads the socket again without first processing frames left in its buffer, so a DATA frame
/// that shared the message with the start would wait until more traffic arrives. Writers end a
/// WebSocket message after each start frame; the relay also splits incoming messages there.
pub fn is_start_frame(frame: &[u8]) -> bool {
    // proto3 encoders write field 1 (type, varint tag 0x08) first; types 2 and 6 fit one byte.
    frame.len() > LENGTH_PREFIX + 1
        && frame[LENGTH_PREFIX] == 0x08
        && matches!(frame[LENGTH_PREFIX + 1], 2 | 6)
}

/// A WebSocket message being filled with whole tunnel frames, as the ends and the relay send
/// them: at most [`MAX_WS_MESSAGE`] bytes, and ended after a start frame (see
/// [`is_start_frame`]). Its space is reused once the message it gave has been sent.
#[derive(Debug, Default)]
pub struct MessageBatch {
    buf: BytesMut,
    ended: bool,
}

impl MessageBatch {
    /// Whether `n` more bytes of frames fit: the message stays within the limit and no start
    /// frame has ended it.
    pub fn fits(&self, n: usize) -> bool {
        !self.ended && self.buf.len() + n <= MAX_WS_MESSAGE
    }

    /// Append whole frames (check [`MessageBatch::fits`] first); `ends_message`: the last of
    /// them is a start frame.
    pub fn push(&mut self, frames: &[u8], ends_message: bool) {
        debug_assert!(self.fits(frames.len()));
        self.buf.extend_from_slice(frames);
        self.ended |= ends_message;
    }

    /// Start filling the next message. Call once the previous one has been sent: its space is
    /// then free again, and reserving here takes it back instead of allocating.
    pub fn begin(&mut self) {
        self.buf.clear();
        self.ended = false;
        self.buf.reserve(MAX_WS_MESSAGE);
    }

    /// Append one frame, ending the message if it is a start frame.
    pub fn push_frame(&mut self, frame: &[u8]) {
        self.push(frame, is_start_frame(frame));
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A start frame ended the message: send it before adding more.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The message, leaving the batch empty.
    pub fn take(&mut self) -> Bytes {
        self.ended = false;
        self.buf.split().freeze()
    }
}

/// Decode one frame body into a [`Message`], enforcing the payload limit.
pub fn decode(body: Bytes) -> Result<Message, FrameError> {
    let msg = Message::decode(body).map_err(FrameError::Decode)?;
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(msg.payload.len()));
    }
    Ok(msg)
}

/// A buffer frames are encoded into: [`BytesMut`], or a `Vec<u8>` reused as a queue.
pub trait FrameBuf: BufMut {
    fn reserve_for(&mut self, n: usize);
}

impl FrameBuf for BytesMut {
    fn reserve_for(&mut self, n: usize) {
        self.reserve(n);
    }
}

impl FrameBuf for Vec<u8> {
    fn reserve_for(&mut self, n: usize) {
        self.reserve(n);
    }
}

/// Decode one frame body without allocating: the service id borrows `body`.
///
/// Returns `Ok(None)` for anything off the common path (a SERVICE_IDS list, unknown fields,
/// malformed input): the caller then uses [`decode`], which gives the owned message or the
/// error. Whenever this returns a message it is exactly what [`decode`] would return (checked
/// against prost in the tests).
pub fn decode_ref(body: &Bytes) -> Result<Option<MessageRef<'_>>, FrameError> {
    let Some(m) = scan_fields(body) else {
        return Ok(None);
    };
    if m.payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(m.payload.len()));
    }
    Ok(Some(m))
}

/// The fields of a message in the subset of protobuf encodings [`decode_ref`] handles.
fn scan_fields(body: &Bytes) -> Option<MessageRef<'_>> {
    let b: &[u8] = body;
    let mut m = MessageRef {
        r#type: 0,
        stream_id: 0,
        ignorable: false,
        payload: Bytes::new(),
        service_id: "",
        connection_id: 0,
    };
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let (tag, wire) = (key >> 3, key & 7);
        match (tag, wire) {
            (1 | 2 | 3 | 7, 0) => {
                let v = varint(b, &mut pos)?;
                // As prost decodes them: int32 and uint32 truncate, bool is "not zero".
                match tag {
                    1 => m.r#type = v as i32,
                    2 => m.stream_id = v as i32,
                    3 => m.ignorable = v != 0,
                    _ => m.connection_id = v as u32,
                }
            }
            (4 | 5, 2) => {
                let len = usize::try_from(varint(b, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|&e| e <= b.len())?;
                if tag == 4 {
                    m.payload = body.slice(pos..end);
                } else {
                    m.service_id = std::str::from_utf8(&b[pos..end]).ok()?;
                }
                pos = end;
            }
            // Field 6 (service id lists), unknown fields, other wire types: the owned path.
            _ => return None,
        }
    }
    Some(m)
}

/// A protobuf varint as prost accepts it (at most ten bytes, the tenth at most 1).
fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        if i == 9 && byte > 1 {
            return None;
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Append a WINDOW_UPDATE frame (culvert's flow control) without building a [`Message`]:
/// byte for byte what [`encode`] produces for [`crate::flow::window_update`].
pub fn encode_window_update(
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
    increment: u32,
    out: &mut impl FrameBuf,
) -> Result<(), FrameError> {
    encode_fields(
        crate::flow::WINDOW_UPDATE,
        stream_id,
        true,
        service_id,
        connection_id,
        &increment.to_be_bytes(),
        out,
    )
}

/// Append one frame (length prefix + message) to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_MESSAGE_LEN {
        return Err(FrameError::MessageTooLarge(len));
    }
    out.reserve(LENGTH_PREFIX + len);
    out.put_u16(len as u16);
    msg.encode(out)
        .expect("reserved capacity always suffices for prost encoding");
    Ok(())
}

/// Append a DATA frame straight from a payload slice: one copy of the payload, no
/// intermediate `Message` (the per-write hot path). Byte for byte what [`encode`] produces for
/// the equivalent [`Message::data`], defaults omitted as proto3 does.
pub fn encode_data(
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
    payload: &[u8],
    out: &mut impl FrameBuf,
) -> Result<(), FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(payload.len()));
    }
    encode_fields(
        crate::message::MessageType::Data as i32,
        stream_id,
        false,
        service_id,
        connection_id,
        payload,
        out,
    )
}

/// Append a frame of a message without `available_service_ids`, encoded as prost encodes it
/// (fields in order, proto3 defaults omitted).
fn encode_fields(
    r#type: i32,
    stream_id: i32,
    ignorable: bool,
    service_id: &str,
    connection_id: u32,
    payload: &[u8],
    out: &mut impl FrameBuf,
) -> Result<(), FrameError> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let delimited = |tag: u32, n: usize| key_len(tag) + encoded_len_varint(n as u64) + n;
    // int32 is encoded sign-extended to 64 bits, as prost and protobuf do.
    let (kind, stream) = (r#type as i64 as u64, stream_id as i64 as u64);
    let mut len = 0;
    if r#type != 0 {
        len += key_len(1) + encoded_len_varint(kind);
    }
    if stream_id != 0 {
        len += key_len(2) + encoded_len_varint(stream);
    }
    if ignorable {
        len += key_len(3) + 1;
    }
    if !payload.is_empty() {
        len += delimited(4, payload.len());
    }
    if !service_id.is_empty() {
        len += delimited(5, service_id.len());
    }
    if connection_id != 0 {
        len += key_len(7) + encoded_len_varint(u64::from(connection_id));
    }
    if len > MAX_MESSAGE_LEN {
        return Err(FrameError::MessageTooLarge(len));
    }
    out.reserve_for(LENGTH_PREFIX + len);
    out.put_u16(len as u16);
    if r#type != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(kind, out);
    }
    if stream_id != 0 {
        encode_key(2, WireType::Varint, out);
        encode_varint(stream, out);
    }
    if ignorable {
        encode_key(3, WireType::Varint, out);
        encode_varint(1, out);
    }
    if !payload.is_empty() {
        encode_key(4, WireType::LengthDelimited, out);
        encode_varint(payload.len() as u64, out);
        out.put_slice(payload);
    }
    if !service_id.is_empty() {
        encode_key(5, WireType::LengthDelimited, out);
        encode_varint(service_id.len() as u64, out);
        out.put_slice(service_id.as_bytes());
    }
    if connection_id != 0 {
        encode_key(7, WireType::Varint, out);
        encode_varint(u64::from(connection_id), out);
    }
    Ok(())
}

/// One frame as its own buffer.
pub fn encode_to_bytes(msg: &Message) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(LENGTH_PREFIX + msg.encoded_len());
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn frames(msgs: &[Message]) -> Bytes {
        let mut out = BytesMut::new();
        for m in msgs {
            encode(m, &mut out).unwrap();
        }
        out.freeze()
    }

    fn collect(reader: &mut FrameReader, chunk: Bytes) -> (Vec<Message>, Bytes) {
        let mut got = Vec::new();
        let fwd = reader
            .feed::<FrameError>(chunk, |b| {
                got.push(decode(b)?);
                Ok(())
            })
            .unwrap();
        (got, fwd)
    }

    #[test]
    fn frames_split_at_every_byte_reassemble() {
        let msgs = vec![
            Message::stream_start(1, "SSH", 1),
            Message::data(1, "SSH", 1, Bytes::from(vec![7u8; 1000])),
            Message::connection_reset(1, "SSH", 1),
        ];
        let wire = frames(&msgs);
        for split in 0..wire.len() {
            let mut r = FrameReader::new();
            let (mut a, fa) = collect(&mut r, wire.slice(..split));
            let (b, fb) = collect(&mut r, wire.slice(split..));
            a.extend(b);
            assert_eq!(a, msgs, "split at {split}");
            assert_eq!(
                [fa, fb].concat(),
                wire.to_vec(),
                "forwarded bytes at split {split}"
            );
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn whole_frames_are_forwarded_without_copy() {
        let wire = frames(&[Message::stream_start(1, "SSH", 1)]);
        let mut r = FrameReader::new();
        let (_, fwd) = collect(&mut r, wire.clone());
        assert_eq!(fwd.as_ptr(), wire.as_ptr());
    }

    #[test]
    fn byte_by_byte_input_is_not_rescanned() {
        // A 60 KiB frame fed one byte per chunk: nothing is returned until it is complete.
        let wire = frames(&[Message::data(1, "S", 1, Bytes::from(vec![1u8; 60_000]))]);
        let mut r = FrameReader::new();
        for i in 0..wire.len() - 1 {
            let (got, fwd) = collect(&mut r, wire.slice(i..i + 1));
            assert!(got.is_empty() && fwd.is_empty());
        }
        let (got, fwd) = collect(&mut r, wire.slice(wire.len() - 1..));
        assert_eq!(got.len(), 1);
        assert_eq!(fwd, wire);
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        let mut r = FrameReader::new();
        let err = r
            .feed::<FrameError>(Bytes::from_static(&[0, 0, 1]), |_| Ok(()))
            .unwrap_err();
        assert_eq!(err, FrameError::Empty);
    }

    #[test]
    fn garbage_fails_to_decode_and_oversized_payload_is_refused() {
        assert!(matches!(
            decode(Bytes::from_static(&[0xff, 0xff, 0xff])),
            Err(FrameError::Decode(_))
        ));
        let big = Message::data(1, "SSH", 1, Bytes::from(vec![0u8; MAX_PAYLOAD + 1]));
        let wire = encode_to_bytes(&big).unwrap();
        assert_eq!(
            decode(wire.slice(2..)),
            Err(FrameError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        let huge = Message::data(1, "SSH", 1, Bytes::from(vec![0u8; 70_000]));
        assert!(matches!(
            encode_to_bytes(&huge),
            Err(FrameError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn direct_data_encoding_matches_prost() {
        for (stream, service, conn) in [
            (1, "SSH", 1),
            (7, "SSH", 0),
            (3, "", 0),
            (i32::MAX, "x", u32::MAX),
        ] {
            for payload in [&b""[..], b"hello", &[9u8; MAX_PAYLOAD][..]] {
                let msg = Message::data(stream, service, conn, Bytes::copy_from_slice(payload));
                let mut direct = BytesMut::new();
                encode_data(stream, service, conn, payload, &mut direct).unwrap();
                assert_eq!(
                    direct.freeze(),
                    encode_to_bytes(&msg).unwrap(),
                    "{stream} {service:?} {conn}"
                );
            }
        }
        let mut out = BytesMut::new();
        assert!(encode_data(1, "S", 1, &[0; MAX_PAYLOAD + 1], &mut out).is_err());
    }

    #[test]
    fn window_update_encoding_matches_prost() {
        for (stream, service, conn) in [(1, "SSH", 1), (7, "SSH", 0), (3, "", 0)] {
            let mut direct = BytesMut::new();
            encode_window_update(stream, service, conn, 65536, &mut direct).unwrap();
            let msg = crate::flow::window_update(stream, service, conn, 65536);
            assert_eq!(direct.freeze(), encode_to_bytes(&msg).unwrap());
        }
    }

    /// `decode_ref` agrees with prost wherever it answers, and answers for what the hot paths
    /// carry.
    #[test]
    fn borrowed_decoding_matches_prost() {
        let body = |m: &Message| encode_to_bytes(m).unwrap().slice(LENGTH_PREFIX..);
        let mut hello = crate::flow::Hello::relay().to_message();
        hello.stream_id = -5;
        let common = [
            Message::data(1, "SSH", 1, Bytes::from_static(b"hello")),
            Message::data(i32::MAX, "", 0, Bytes::from(vec![7u8; MAX_PAYLOAD])),
            crate::flow::window_update(3, "HMI", 9, 1 << 20),
            Message::connection_reset(2, "SSH", u32::MAX),
            Message::stream_start(4, "SSH", 0),
            Message::session_reset(),
            hello,
        ];
        for m in &common {
            let b = body(m);
            let r = decode_ref(&b)
                .unwrap()
                .expect("common messages take the borrowed path");
            assert_eq!(r.to_message(), *m);
        }
        // SERVICE_IDS and unknown fields take the owned path.
        let ids = Message::service_ids(&["A".into()]);
        assert_eq!(decode_ref(&body(&ids)).unwrap(), None);
        let mut unknown = body(&common[0]).to_vec();
        unknown.extend_from_slice(&[0x40, 0x01]); // field 8, varint
        assert_eq!(decode_ref(&Bytes::from(unknown)).unwrap(), None);
        let big = Message::data(1, "S", 1, Bytes::from(vec![0u8; MAX_PAYLOAD + 1]));
        assert_eq!(
            decode_ref(&body(&big)),
            Err(FrameError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );

        // Mutated frames (bytes flipped, cut short, extended): whatever the borrowed path
        // accepts, prost decodes to the same message.
        let mut rng = rand::rng();
        let mut answered = 0;
        for _ in 0..20_000 {
            let mut b = body(&common[rand::Rng::random_range(&mut rng, 0..common.len())]).to_vec();
            b.truncate(b.len().min(64));
            for _ in 0..rand::Rng::random_range(&mut rng, 1..4) {
                match rand::Rng::random_range(&mut rng, 0..3) {
                    0 if !b.is_empty() => {
                        let i = rand::Rng::random_range(&mut rng, 0..b.len());
                        b[i] = rand::Rng::random(&mut rng);
                    }
                    1 if !b.is_empty() => {
                        let n = rand::Rng::random_range(&mut rng, 0..b.len());
                        b.truncate(n);
                    }
                    _ => b.push(rand::Rng::random(&mut rng)),
                }
            }
            let b = Bytes::from(b);
            let owned = Message::decode(b.clone());
            if let Some(r) = scan_fields(&b) {
                answered += 1;
                assert_eq!(owned.ok(), Some(r.to_message()), "{b:02x?}");
            }
        }
        assert!(
            answered > 1_000,
            "only {answered} mutated frames were decoded"
        );
    }

    #[test]
    fn start_frames_are_recognised() {
        let start = encode_to_bytes(&Message::stream_start(1, "SSH", 1)).unwrap();
        let conn = encode_to_bytes(&Message::connection_start(1, "SSH", 2)).unwrap();
        let data = encode_to_bytes(&Message::data(1, "SSH", 1, Bytes::from_static(b"x"))).unwrap();
        assert!(is_start_frame(&start) && is_start_frame(&conn));
        assert!(!is_start_frame(&data) && !is_start_frame(&[0, 1]));
    }

    #[test]
    fn a_message_batch_keeps_the_limit_and_ends_after_a_start() {
        let data =
            encode_to_bytes(&Message::data(1, "S", 1, Bytes::from(vec![0u8; 60_000]))).unwrap();
        let start = encode_to_bytes(&Message::stream_start(2, "S", 1)).unwrap();
        let mut b = MessageBatch::default();
        b.begin();
        assert!(b.fits(data.len()));
        b.push_frame(&data);
        b.push_frame(&data);
        assert!(
            !b.fits(data.len()),
            "a third would pass {MAX_WS_MESSAGE} bytes"
        );
        assert!(b.fits(start.len()));
        b.push_frame(&start);
        assert!(b.is_ended() && !b.fits(1), "nothing after a start frame");
        let m = b.take();
        assert_eq!(m.len(), 2 * data.len() + start.len());
        assert!(m.len() <= MAX_WS_MESSAGE);
        assert!(b.is_empty() && !b.is_ended() && b.fits(data.len()));
    }

    #[test]
    fn defaults_are_not_encoded_like_the_localproxy() {
        // proto3 omits default values: SESSION_RESET is just the type field.
        let wire = encode_to_bytes(&Message::session_reset()).unwrap();
        assert_eq!(&wire[..], &[0, 2, 0x08, MessageType::SessionReset as u8]);
    }
}
