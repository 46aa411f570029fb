//! Bytes received for one connection, on their way to its reader.

use std::task::Waker;

use super::pool::Pool;

/// Bytes waiting for one local connection without flow control before the session reader
/// waits for it (and with it the whole tunnel: the AWS protocol has no flow control).
pub(super) const INBOX_LIMIT: usize = 256 * 1024;

/// Bytes received for one connection, on their way to its
/// [`ConnectionReader`](super::ConnectionReader).
///
/// The session reader copies each DATA payload in, so the WebSocket layer gets its read buffer
/// back at once (it never has to allocate another), and a stalled connection holds its own
/// bytes rather than whole WebSocket messages. The reader swaps the buffer for its own drained
/// one: bytes cross the lock in batches and neither side allocates while data flows.
pub(super) struct Inbox {
    buf: Vec<u8>,
    /// Flow-controlled: bounded by the credit granted, never waited on. Otherwise the session
    /// reader waits while [`INBOX_LIMIT`] bytes are waiting.
    credited: bool,
    /// No more bytes will come (peer reset, local close, session end): EOF once drained.
    closed: bool,
    /// Of those, the peer's half-close: it still reads what this end sends.
    finished: bool,
    /// Ended with the tunnel ([`Inbox::mark_lost`]).
    lost: bool,
    /// The connection's reader was dropped: what arrives is discarded (and credited).
    reader_gone: bool,
    reader: Option<Waker>,
    /// The session reader, waiting for room.
    space: Option<Waker>,
}

/// What became of a payload offered to an inbox.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Push {
    /// Queued for the reader.
    Stored,
    /// The connection is closed: nothing more is delivered.
    Closed,
    /// Nobody will read it: discarded, and its credit is due back to the peer.
    Unread,
    /// No room (without flow control): the session reader waits until the reader takes some.
    Full,
}

/// What a connection's reader gets from its inbox.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Bytes, in the reader's buffer.
    Bytes,
    /// None will come: EOF. The inbox can go.
    Eof,
    /// None yet; the reader is woken when some arrive.
    Pending,
}

impl Inbox {
    pub(super) fn new(credited: bool) -> Inbox {
        Inbox {
            buf: Vec::new(),
            credited,
            closed: false,
            finished: false,
            lost: false,
            reader_gone: false,
            reader: None,
            space: None,
        }
    }

    /// Offer a payload from the peer. `Full` keeps `waker` to be woken when there is room.
    pub(super) fn push(&mut self, payload: &[u8], pool: &mut Pool, waker: &Waker) -> Push {
        if self.closed {
            return Push::Closed;
        }
        if self.reader_gone {
            return Push::Unread;
        }
        if !self.credited && self.buf.len() >= INBOX_LIMIT {
            self.space = Some(waker.clone());
            return Push::Full;
        }
        if self.buf.capacity() == 0 {
            self.buf = pool.take();
        }
        self.buf.extend_from_slice(payload);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        Push::Stored
    }

    /// Hand what arrived to the reader: `pending` (drained) is swapped for the inbox's buffer,
    /// so neither side allocates. Caught up, both buffers go back to the pool (an idle
    /// connection holds none) and `waker` waits for more.
    pub(super) fn take(&mut self, pending: &mut Vec<u8>, pool: &mut Pool, waker: &Waker) -> Take {
        pending.clear();
        if !self.buf.is_empty() {
            std::mem::swap(pending, &mut self.buf);
            if let Some(w) = self.space.take() {
                w.wake();
            }
            return Take::Bytes;
        }
        pool.put(std::mem::take(pending));
        pool.put(std::mem::take(&mut self.buf));
        if self.closed {
            return Take::Eof;
        }
        self.reader = Some(waker.clone());
        Take::Pending
    }

    /// No more bytes will come: the reader gets EOF once it has read what is buffered. True
    /// when nobody will read, so the inbox can go.
    pub(super) fn close(&mut self) -> bool {
        self.closed = true;
        self.finished = false;
        self.wake();
        self.reader_gone
    }

    /// The peer finished sending (half-close): like [`Inbox::close`], but the EOF says the
    /// peer still reads. A reset that follows makes it a plain close.
    pub(super) fn finish(&mut self) -> bool {
        let was_closed = self.closed;
        let gone = self.close();
        self.finished = !was_closed;
        gone
    }

    /// The EOF is the peer's half-close ([`Inbox::finish`]).
    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }

    /// The connection ended because the tunnel did: it could not be resumed, or the session
    /// ended.
    pub(super) fn mark_lost(&mut self) {
        self.lost = true;
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The reader was dropped: what is buffered is discarded. Returns how many bytes that was.
    pub(super) fn reader_dropped(&mut self, pool: &mut Pool) -> usize {
        self.reader_gone = true;
        let unread = self.buf.len();
        pool.put(std::mem::take(&mut self.buf));
        unread
    }

    /// The buffer, for the pool, as the inbox goes.
    pub(super) fn into_buf(self) -> Vec<u8> {
        self.buf
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.space.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::counting_waker;
    use super::*;

    #[test]
    fn without_flow_control_the_inbox_is_bounded_and_the_session_reader_waits_for_room() {
        let mut pool = Pool::default();
        let (waker, woken) = counting_waker();
        let mut ib = Inbox::new(false);
        let chunk = vec![1u8; 64 * 1024];
        let mut stored = 0;
        while ib.push(&chunk, &mut pool, &waker) == Push::Stored {
            stored += chunk.len();
            assert!(stored <= INBOX_LIMIT + chunk.len(), "unbounded");
        }
        assert!(stored >= INBOX_LIMIT);
        assert_eq!(woken.get(), 0);
        let mut pending = Vec::new();
        assert_eq!(ib.take(&mut pending, &mut pool, &waker), Take::Bytes);
        assert_eq!(
            pending.len(),
            stored,
            "the reader gets every byte, in one batch"
        );
        assert_eq!(
            woken.get(),
            1,
            "taking bytes wakes the waiting session reader"
        );
        assert_eq!(ib.push(&chunk, &mut pool, &waker), Push::Stored);
    }

    #[test]
    fn with_flow_control_the_credit_bounds_the_inbox_and_nothing_waits() {
        let mut pool = Pool::default();
        let (waker, _) = counting_waker();
        let mut ib = Inbox::new(true);
        for _ in 0..(2 * INBOX_LIMIT / 1024) {
            assert_eq!(ib.push(&[0; 1024], &mut pool, &waker), Push::Stored);
        }
    }

    #[test]
    fn bytes_come_out_in_order_then_eof_after_close() {
        let mut pool = Pool::default();
        let (waker, woken) = counting_waker();
        let mut ib = Inbox::new(false);
        let mut pending = Vec::new();
        assert_eq!(ib.take(&mut pending, &mut pool, &waker), Take::Pending);
        ib.push(b"hel", &mut pool, &waker);
        assert_eq!(woken.get(), 1, "a waiting reader is woken by new bytes");
        ib.push(b"lo", &mut pool, &waker);
        assert!(!ib.close(), "the reader is still there: keep the inbox");
        assert_eq!(ib.push(b"late", &mut pool, &waker), Push::Closed);
        assert_eq!(ib.take(&mut pending, &mut pool, &waker), Take::Bytes);
        assert_eq!(pending, b"hello");
        assert_eq!(ib.take(&mut pending, &mut pool, &waker), Take::Eof);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_half_close_is_an_eof_that_a_later_reset_turns_into_a_close() {
        let mut pool = Pool::default();
        let (waker, _) = counting_waker();
        let mut ib = Inbox::new(true);
        ib.push(b"last", &mut pool, &waker);
        assert!(!ib.finish());
        assert!(ib.is_finished() && ib.is_closed());
        assert_eq!(ib.push(b"late", &mut pool, &waker), Push::Closed);
        ib.close();
        assert!(!ib.is_finished(), "a reset after the FIN is a close");
        let mut closed = Inbox::new(true);
        closed.close();
        closed.finish();
        assert!(!closed.is_finished(), "a FIN after a close changes nothing");
    }

    #[test]
    fn once_the_reader_is_gone_bytes_are_discarded_and_counted_for_credit() {
        let mut pool = Pool::default();
        let (waker, _) = counting_waker();
        let mut ib = Inbox::new(true);
        ib.push(&[0; 100], &mut pool, &waker);
        assert_eq!(ib.reader_dropped(&mut pool), 100);
        assert_eq!(ib.push(&[0; 10], &mut pool, &waker), Push::Unread);
        assert!(ib.close(), "nobody reads: the inbox can go");
    }
}
