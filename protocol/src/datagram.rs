//! UDP datagrams carried in a tunnel connection's byte stream.
//!
//! A tunnel connection is a byte stream: DATA messages may split or join what was written. To
//! keep datagram boundaries, each datagram travels as a 2-byte big-endian length and its bytes
//! (the same framing the protocol's own messages use on the WebSocket). Any relay, AWS's
//! included, forwards this unchanged: it is ordinary stream data, so it needs no extension.
//!
//! One UDP flow (a client's address and port) is one tunnel connection; `culvert connect` opens
//! it for the first datagram of the flow and culvertd sends its datagrams from one socket
//! connected to the rule's target.

/// The largest datagram the framing carries: the length field's maximum, which is also more
/// than any UDP payload over IPv4 (65 507) or IPv6 without jumbograms (65 527).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Bytes of framing in front of every datagram.
pub const HEADER: usize = 2;

/// `datagram` framed for the stream: its length and its bytes. `None` when it is longer
/// than [`MAX_DATAGRAM`].
pub fn frame(datagram: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(datagram.len()).ok()?;
    let mut out = Vec::with_capacity(HEADER + datagram.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    Some(out)
}

/// Turns the stream's bytes back into datagrams, whatever pieces they arrive in. It holds at
/// most one incomplete datagram beyond the last bytes pushed: pop every complete one
/// ([`Deframer::next_datagram`]) after each push and it stays under 2 × (64 KiB + 2).
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Where the next datagram's header starts in `buf`.
    at: usize,
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// Append bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete datagram, if one has arrived whole.
    pub fn next_datagram(&mut self) -> Option<&[u8]> {
        let rest = &self.buf[self.at..];
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        if rest.len() < HEADER + len {
            return None;
        }
        let start = self.at + HEADER;
        self.at = start + len;
        Some(&self.buf[start..start + len])
    }

    /// Bytes of a datagram that has not arrived whole (non-zero at the end of the stream
    /// means the sender stopped inside one).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths_frame_and_deframe_whole() {
        assert_eq!(frame(b"").unwrap(), [0, 0]);
        assert_eq!(frame(b"abc").unwrap(), [0, 3, b'a', b'b', b'c']);
        assert_eq!(
            frame(&vec![7; MAX_DATAGRAM]).unwrap().len(),
            MAX_DATAGRAM + 2
        );
        assert!(frame(&vec![7; MAX_DATAGRAM + 1]).is_none());
        let mut d = Deframer::new();
        d.push(&[0]);
        assert_eq!(d.next_datagram(), None);
        d.push(&[2, b'h']);
        assert_eq!(d.next_datagram(), None);
        assert_eq!(d.pending(), 3);
        d.push(&[b'i', 0, 0, 0]);
        assert_eq!(d.next_datagram(), Some(&b"hi"[..]));
        assert_eq!(d.next_datagram(), Some(&b""[..]));
        assert_eq!(d.next_datagram(), None);
        assert_eq!(d.pending(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]
        /// However the stream cuts the framed bytes, the same datagrams come out, in order,
        /// and the buffer never holds more than one incomplete datagram and the last push.
        #[test]
        fn datagrams_survive_any_cutting(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..20),
            cuts in proptest::collection::vec(1usize..5000, 1..40),
        ) {
            let stream: Vec<u8> = datagrams.iter().flat_map(|d| frame(d).unwrap()).collect();
            let mut d = Deframer::new();
            let mut out = Vec::new();
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at == stream.len() {
                    break;
                }
                let end = (at + cut).min(stream.len());
                d.push(&stream[at..end]);
                prop_assert!(d.buf.len() <= 2 * (MAX_DATAGRAM + HEADER) + cut);
                at = end;
                while let Some(g) = d.next_datagram() {
                    out.push(g.to_vec());
                }
            }
            prop_assert_eq!(d.pending(), 0);
            prop_assert_eq!(out, datagrams);
        }
    }
}
