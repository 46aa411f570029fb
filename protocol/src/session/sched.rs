//! What the session writer sends next. Three rules, each tested below:
//! - control frames (starts, resets, credit, negotiation) go before any DATA;
//! - DATA goes one frame per connection in turn (round robin), so an interactive connection's
//!   keystrokes overtake a bulk transfer's backlog;
//! - a closing connection's queued DATA goes ahead of its reset, and ahead of DATA other
//!   connections queue from then on.

use std::collections::{HashMap, VecDeque};
use std::task::Waker;

use bytes::Bytes;

use super::pool::Pool;
use crate::frame::MessageBatch;
use crate::mux::ConnId;

/// DATA frames queued per connection towards the writer (each at most ~64 KiB): enough to keep
/// the writer busy, little enough that a turn of the round robin is short.
pub(super) const CONN_SEND_FRAMES: usize = 2;
/// Control messages queued towards the writer before the reader waits for them to drain.
pub(super) const CONTROL_QUEUE: usize = 256;

/// One connection's outgoing DATA frames, encoded back to back.
#[derive(Default)]
struct SendQueue {
    frames: Vec<u8>,
    /// Bytes of `frames` already sent.
    sent: usize,
    /// End offset of each queued frame.
    ends: VecDeque<usize>,
    /// The connection's writer, waiting for queue space or credit.
    waker: Option<Waker>,
}

impl SendQueue {
    /// The queued frames as separate buffers (a connection that is closing: they go out as
    /// control messages, ahead of what follows).
    fn take_frames(&mut self, pool: &mut Pool) -> impl Iterator<Item = Bytes> + use<> {
        let mut start = self.sent;
        let frames: Vec<Bytes> = self
            .ends
            .drain(..)
            .map(|end| {
                let f = Bytes::copy_from_slice(&self.frames[start..end]);
                start = end;
                f
            })
            .collect();
        self.sent = 0;
        pool.put(std::mem::take(&mut self.frames));
        frames.into_iter()
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// What the writer sends next: control first, then connections in turn.
#[derive(Default)]
pub(super) struct Sched {
    control: VecDeque<Bytes>,
    queues: HashMap<ConnId, SendQueue>,
    /// Connections with queued frames, in round-robin order.
    ready: VecDeque<ConnId>,
    /// The reader waits for the control queue to drain.
    control_space: Option<Waker>,
}

impl Sched {
    pub(super) fn push_control(&mut self, f: Bytes) {
        self.control.push_back(f);
    }

    pub(super) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// Whether the control queue has room; if not, `waker` is woken once it has drained to
    /// half.
    pub(super) fn control_room(&mut self, waker: &Waker) -> bool {
        if self.control.len() < CONTROL_QUEUE {
            return true;
        }
        self.control_space = Some(waker.clone());
        false
    }

    /// Queue one DATA frame of connection `id`, encoded by `encode` at the end of its queue.
    /// `None` when the connection already has [`CONN_SEND_FRAMES`] waiting: `waker` is woken
    /// when the writer takes one.
    pub(super) fn push_data<E>(
        &mut self,
        id: ConnId,
        pool: &mut Pool,
        waker: &Waker,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let q = self.queues.entry(id).or_default();
        if q.ends.len() >= CONN_SEND_FRAMES {
            q.waker = Some(waker.clone());
            return None;
        }
        if q.frames.capacity() == 0 {
            q.frames = pool.take();
        }
        let len = q.frames.len();
        if let Err(e) = encode(&mut q.frames) {
            q.frames.truncate(len);
            return Some(Err(e));
        }
        q.ends.push_back(q.frames.len());
        if q.ends.len() == 1 {
            self.ready.push_back(id);
        }
        Some(Ok(()))
    }

    /// Connection `id`'s writer waits (for credit): `waker` is woken by [`Sched::wake`].
    pub(super) fn park(&mut self, id: ConnId, waker: &Waker) {
        self.queues.entry(id).or_default().waker = Some(waker.clone());
    }

    /// Append the next frame to `batch` if it fits there, waking whoever waits for the space it
    /// frees; false if none did.
    pub(super) fn pop_into(&mut self, batch: &mut MessageBatch, pool: &mut Pool) -> bool {
        if let Some(f) = self.control.front() {
            if !batch.fits(f.len()) {
                return false;
            }
            batch.push_frame(f);
            self.control.pop_front();
            if self.control.len() < CONTROL_QUEUE / 2
                && let Some(w) = self.control_space.take()
            {
                w.wake();
            }
            return true;
        }
        while let Some(&id) = self.ready.front() {
            let Some(q) = self.queues.get_mut(&id) else {
                self.ready.pop_front();
                continue;
            };
            let Some(&end) = q.ends.front() else {
                self.ready.pop_front();
                continue;
            };
            if !batch.fits(end - q.sent) {
                return false;
            }
            self.ready.pop_front();
            batch.push_frame(&q.frames[q.sent..end]);
            q.sent = end;
            q.ends.pop_front();
            if q.ends.is_empty() {
                q.sent = 0;
                pool.put(std::mem::take(&mut q.frames));
            } else {
                self.ready.push_back(id);
            }
            q.wake();
            return true;
        }
        false
    }

    /// Move a connection's queued frames to the end of the control queue, ahead of any DATA
    /// queued from now on: what follows them (its reset, or in V1/V2 the start of the stream
    /// that replaces it) then reaches the peer after them, and before other connections' bytes
    /// charged against the budget its close freed.
    pub(super) fn drain_into_control(&mut self, id: ConnId, pool: &mut Pool) {
        if let Some(mut q) = self.queues.remove(&id) {
            self.control.extend(q.take_frames(pool));
            q.wake();
        }
    }

    /// The peer closed connection `id`: what it still had queued would be stale on arrival.
    /// Its writer is woken (and fails).
    pub(super) fn discard(&mut self, id: ConnId, pool: &mut Pool) {
        if let Some(mut q) = self.queues.remove(&id) {
            pool.put(std::mem::take(&mut q.frames));
            q.wake();
        }
    }

    /// The WebSocket is gone: nothing queued can be sent any more (resumed connections send
    /// again from where the peer is). Every writer is woken.
    pub(super) fn discard_all(&mut self, pool: &mut Pool) {
        self.control.clear();
        self.ready.clear();
        for (_, mut q) in self.queues.drain() {
            pool.put(std::mem::take(&mut q.frames));
            q.wake();
        }
        if let Some(w) = self.control_space.take() {
            w.wake();
        }
    }

    pub(super) fn wake(&mut self, id: ConnId) {
        if let Some(q) = self.queues.get_mut(&id) {
            q.wake();
        }
    }

    pub(super) fn wake_all(&mut self) {
        for q in self.queues.values_mut() {
            q.wake();
        }
        if let Some(w) = self.control_space.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::counting_waker;
    use super::*;
    use crate::Message;
    use crate::frame::{self, FrameError, FrameReader};

    const A: ConnId = ConnId(1);
    const B: ConnId = ConnId(2);
    const C: ConnId = ConnId(3);

    fn data(conn: ConnId, tag: &str) -> Message {
        Message::data(
            1,
            "SSH",
            conn.0 as u32,
            Bytes::copy_from_slice(tag.as_bytes()),
        )
    }

    fn encoded(m: &Message) -> Bytes {
        frame::encode_to_bytes(m).unwrap()
    }

    fn queue(s: &mut Sched, pool: &mut Pool, m: &Message) {
        let (w, _) = counting_waker();
        let f = encoded(m);
        s.push_data(m_conn(m), pool, &w, |q| {
            q.extend_from_slice(&f);
            Ok::<_, ()>(())
        })
        .expect("room in the queue")
        .unwrap();
    }

    fn m_conn(m: &Message) -> ConnId {
        ConnId(m.connection_id as u64)
    }

    /// Everything the writer would send, as messages, one WebSocket message at a time.
    fn drain(s: &mut Sched, pool: &mut Pool) -> Vec<Vec<Message>> {
        let mut sent = Vec::new();
        let mut batch = MessageBatch::default();
        loop {
            batch.begin();
            while !batch.is_ended() && s.pop_into(&mut batch, pool) {}
            if batch.is_empty() {
                return sent;
            }
            let mut msgs = Vec::new();
            FrameReader::new()
                .feed::<FrameError>(batch.take(), |body| {
                    msgs.push(frame::decode(body).unwrap());
                    Ok(())
                })
                .unwrap();
            sent.push(msgs);
        }
    }

    fn payloads(sent: &[Vec<Message>]) -> Vec<String> {
        sent.iter()
            .flatten()
            .map(|m| match m.kind() {
                Some(crate::MessageType::Data) => String::from_utf8_lossy(&m.payload).into_owned(),
                _ => format!("{:?}#{}", m.kind().unwrap(), m.connection_id),
            })
            .collect()
    }

    #[test]
    fn control_frames_go_before_data_queued_earlier() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        queue(&mut s, &mut pool, &data(A, "a1"));
        s.push_control(encoded(&Message::connection_reset(1, "SSH", 9)));
        let sent = drain(&mut s, &mut pool);
        assert_eq!(payloads(&sent), ["ConnectionReset#9", "a1"]);
    }

    #[test]
    fn data_goes_one_frame_per_connection_in_turn() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        for m in [
            data(A, "a1"),
            data(A, "a2"),
            data(B, "b1"),
            data(B, "b2"),
            data(C, "c1"),
        ] {
            queue(&mut s, &mut pool, &m);
        }
        let sent = drain(&mut s, &mut pool);
        assert_eq!(payloads(&sent), ["a1", "b1", "c1", "a2", "b2"]);
    }

    #[test]
    fn a_closing_connections_data_goes_ahead_of_its_reset_and_of_later_data() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        queue(&mut s, &mut pool, &data(B, "b1"));
        queue(&mut s, &mut pool, &data(A, "a1"));
        queue(&mut s, &mut pool, &data(A, "a2"));
        // A closes: its frames, then its reset, then everyone else's DATA.
        s.drain_into_control(A, &mut pool);
        s.push_control(encoded(&Message::connection_reset(1, "SSH", A.0 as u32)));
        queue(&mut s, &mut pool, &data(C, "c1"));
        let sent = drain(&mut s, &mut pool);
        assert_eq!(
            payloads(&sent),
            ["a1", "a2", "ConnectionReset#1", "b1", "c1"]
        );
    }

    #[test]
    fn a_start_frame_ends_its_websocket_message() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        s.push_control(encoded(&Message::connection_reset(1, "SSH", 3)));
        s.push_control(encoded(&Message::connection_start(1, "SSH", 4)));
        s.push_control(encoded(&Message::connection_start(1, "SSH", 5)));
        queue(&mut s, &mut pool, &data(A, "a1"));
        let sent = drain(&mut s, &mut pool);
        let sizes: Vec<usize> = sent.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [2, 1, 1],
            "a start ends its message: reset and start, start, then the data"
        );
    }

    #[test]
    fn frames_are_coalesced_up_to_the_message_limit_and_never_split() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        let big = "x".repeat(crate::message::MAX_PAYLOAD);
        for conn in [A, B, C] {
            queue(&mut s, &mut pool, &data(conn, &big));
        }
        let sent = drain(&mut s, &mut pool);
        let sizes: Vec<usize> = sent.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [2, 1],
            "two full frames fit one message, the third waits"
        );
    }

    #[test]
    fn a_full_queue_parks_its_writer_until_a_frame_is_taken() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        for i in 0..CONN_SEND_FRAMES {
            queue(&mut s, &mut pool, &data(A, &format!("a{i}")));
        }
        let (w, woken) = counting_waker();
        let full = s.push_data(A, &mut pool, &w, |_| Ok::<_, ()>(()));
        assert!(full.is_none(), "the queue is full");
        let mut batch = MessageBatch::default();
        batch.begin();
        assert!(s.pop_into(&mut batch, &mut pool));
        assert_eq!(woken.get(), 1, "taking a frame wakes the parked writer");
    }

    #[test]
    fn a_failed_encoding_leaves_the_queue_as_it_was() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        queue(&mut s, &mut pool, &data(A, "a1"));
        let (w, _) = counting_waker();
        let r = s.push_data(A, &mut pool, &w, |q| {
            q.extend_from_slice(b"half a frame");
            Err("refused")
        });
        assert_eq!(r, Some(Err("refused")));
        assert_eq!(payloads(&drain(&mut s, &mut pool)), ["a1"]);
    }

    #[test]
    fn a_full_control_queue_wakes_the_reader_once_it_has_drained_to_half() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        let reset = encoded(&Message::connection_reset(1, "SSH", 1));
        for _ in 0..CONTROL_QUEUE {
            s.push_control(reset.clone());
        }
        let (w, woken) = counting_waker();
        assert!(!s.control_room(&w));
        let mut batch = MessageBatch::default();
        let mut taken = 0;
        while woken.get() == 0 {
            batch.begin();
            assert!(s.pop_into(&mut batch, &mut pool));
            taken += 1;
        }
        assert_eq!(taken, CONTROL_QUEUE / 2 + 1);
        assert!(s.control_room(&w));
    }

    #[test]
    fn a_connection_the_peer_closed_sends_nothing_more() {
        let (mut s, mut pool) = (Sched::default(), Pool::default());
        queue(&mut s, &mut pool, &data(A, "a1"));
        queue(&mut s, &mut pool, &data(B, "b1"));
        s.discard(A, &mut pool);
        assert_eq!(payloads(&drain(&mut s, &mut pool)), ["b1"]);
    }
}
