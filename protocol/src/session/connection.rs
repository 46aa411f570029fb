//! A tunnel connection as the application sees it: `AsyncRead + AsyncWrite`, split into a
//! reader and a writer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Shared;
use super::inbox::Take;
use crate::message::MAX_PAYLOAD;
use crate::mux::ConnId;

/// One tunnel connection. Reading yields the peer's bytes in order and EOF when the peer resets
/// the connection, finishes sending (half-close), or the session ends. Writing sends DATA.
///
/// Shutting the writer down half-closes the connection when both ends negotiated half-close
/// ([`crate::ext::HALF_CLOSE`]): the peer reads EOF and can still send. Otherwise (an AWS
/// peer: the AWS protocol has no half-close) it resets the connection, as dropping the writer
/// without a shutdown always does. Once both halves are dropped, a connection that is not over
/// both ways is reset.
#[derive(Debug)]
pub struct Connection {
    reader: ConnectionReader,
    writer: ConnectionWriter,
}

/// The receiving half of a [`Connection`]; also an `AsyncBufRead` that hands out the peer's
/// bytes from its buffer without another copy.
pub struct ConnectionReader {
    id: ConnId,
    shared: Arc<Shared>,
    /// Bytes taken from the inbox; `pending[pos..]` are unread.
    pending: Vec<u8>,
    pos: usize,
    /// Flow-controlled: consumed bytes return credit to the peer.
    credited: bool,
    eof: bool,
    /// The EOF is the peer's half-close.
    finished: bool,
    /// The EOF is the tunnel's end: the connection could not be resumed, or the session ended.
    lost: bool,
    halves: Arc<AtomicU8>,
}

/// The sending half of a [`Connection`]. Dropping it resets the connection.
pub struct ConnectionWriter {
    id: ConnId,
    service: String,
    shared: Arc<Shared>,
    /// Reset, or half-closed: nothing more is written.
    closed_local: bool,
    /// Half-closed (a FIN went out): dropping it does not reset while the reader lives.
    finished: bool,
    halves: Arc<AtomicU8>,
}

impl std::fmt::Debug for ConnectionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConnectionWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionWriter")
            .field("id", &self.id)
            .field("service", &self.service)
            .finish()
    }
}

impl Connection {
    pub(super) fn new(id: ConnId, service: String, shared: &Arc<Shared>, credited: bool) -> Self {
        let halves = Arc::new(AtomicU8::new(2));
        Connection {
            reader: ConnectionReader {
                id,
                shared: shared.clone(),
                pending: Vec::new(),
                pos: 0,
                credited,
                eof: false,
                finished: false,
                lost: false,
                halves: halves.clone(),
            },
            writer: ConnectionWriter {
                id,
                service,
                shared: shared.clone(),
                closed_local: false,
                finished: false,
                halves,
            },
        }
    }

    pub fn id(&self) -> ConnId {
        self.writer.id
    }

    pub fn service(&self) -> &str {
        &self.writer.service
    }

    /// Whether this connection uses culvert's flow control.
    pub fn is_flow_controlled(&self) -> bool {
        self.reader.credited
    }

    pub fn into_split(self) -> (ConnectionReader, ConnectionWriter) {
        (self.reader, self.writer)
    }

    /// Refuse or end this connection (e.g. the LAN target refused): sends the reset now.
    pub async fn reset(mut self) {
        self.writer.reset();
    }
}

/// One half of a connection was dropped: the last one resets what is not over.
fn half_dropped(halves: &AtomicU8, shared: &Shared, id: ConnId) {
    if halves.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.lock().reset(id);
        shared.work.notify_one();
    }
}

impl ConnectionReader {
    /// Make sure unread bytes are in `pending`, unless there are none yet (`Pending`) or
    /// none will come (`Ready` with nothing pending: EOF).
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pos < self.pending.len() || self.eof {
            return Poll::Ready(());
        }
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(ib) = inner.conns.get_mut(&self.id) else {
            self.eof = true;
            return Poll::Ready(());
        };
        self.pos = 0;
        match ib.take(&mut self.pending, &mut inner.pool, cx.waker()) {
            Take::Bytes => Poll::Ready(()),
            Take::Pending => Poll::Pending,
            Take::Eof => {
                self.finished = ib.is_finished();
                self.lost = ib.is_lost();
                inner.remove_inbox(self.id);
                self.eof = true;
                Poll::Ready(())
            }
        }
    }

    /// The EOF read was the peer's half-close: it finished sending and still reads what this
    /// end sends. False before EOF, and for an EOF from a reset or the session's end.
    pub fn peer_finished(&self) -> bool {
        self.finished
    }

    /// The EOF read was the tunnel's end, not the peer's: the tunnel dropped and the
    /// connection could not be resumed (or the session ended). False before EOF.
    pub fn tunnel_lost(&self) -> bool {
        self.lost
    }

    /// The application took `n` bytes.
    fn consume_pending(&mut self, n: usize) {
        self.pos += n;
        if self.credited && n > 0 {
            let mut inner = self.shared.lock();
            inner.consumed(self.id, n);
            let queued = inner.sched.has_control();
            drop(inner);
            if queued {
                self.shared.work.notify_one();
            }
        }
    }
}

impl Drop for ConnectionReader {
    fn drop(&mut self) {
        let credit_due = {
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            match inner.conns.get_mut(&self.id) {
                // Read to EOF already: nothing is buffered.
                None => false,
                Some(ib) => {
                    let unread = self.pending.len() - self.pos + ib.reader_dropped(&mut inner.pool);
                    if ib.is_closed() {
                        inner.remove_inbox(self.id);
                    }
                    // Bytes nobody will read: their credit goes back to the peer.
                    let due = self.credited && unread > 0;
                    if due {
                        inner.consumed(self.id, unread);
                    }
                    due
                }
            }
        };
        if credit_due {
            self.shared.work.notify_one();
        }
        half_dropped(&self.halves, &self.shared, self.id);
    }
}

impl ConnectionWriter {
    /// Reset the connection from this side, both ways: the reset goes out after what is
    /// queued. A no-op once the connection is over.
    pub fn reset(&mut self) {
        if self.closed_local && !self.finished {
            return;
        }
        self.closed_local = true;
        self.finished = false;
        self.shared.lock().reset(self.id);
        self.shared.work.notify_one();
    }

    /// Whether shutting down half-closes the connection (both ends negotiated it) rather than
    /// resetting it.
    pub fn can_half_close(&self) -> bool {
        self.shared.lock().mux.is_half_closable(self.id)
    }

    /// Finish sending: a FIN after what is queued if the connection can be half-closed, else
    /// the reset.
    fn finish(&mut self) {
        if self.closed_local {
            return;
        }
        self.closed_local = true;
        self.finished = self.shared.lock().finish(self.id);
        self.shared.work.notify_one();
    }
}

impl AsyncRead for ConnectionReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx));
        let this = &mut *self;
        let n = (this.pending.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.pending[this.pos..this.pos + n]);
        this.consume_pending(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncBufRead for ConnectionReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx));
        Poll::Ready(Ok(&this.pending[this.pos..]))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        let n = amt.min(self.pending.len() - self.pos);
        self.consume_pending(n);
    }
}

impl AsyncWrite for ConnectionWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed_local || self.shared.cancel.is_cancelled() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let id = self.id;
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let credit = match inner.mux.send_credit(id) {
            Ok(c) => c,
            Err(_) => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
        };
        let n = buf.len().min(MAX_PAYLOAD).min(credit.unwrap_or(usize::MAX));
        if n == 0 {
            // Out of credit: say so, so that credit for another connection wakes this writer
            // when the tunnel budget is what holds it.
            inner.mux.wait_for_credit(id);
            inner.sched.park(id, cx.waker());
            return Poll::Pending;
        }
        // One copy: the payload goes straight into its frame, behind the queued ones.
        let mux = &mut inner.mux;
        let queued = inner
            .sched
            .push_data(id, &mut inner.pool, cx.waker(), |frames| {
                mux.encode_data(id, &buf[..n], frames)
            });
        match queued {
            // Wait for the writer to take a frame.
            None => Poll::Pending,
            Some(Err(_)) => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            Some(Ok(())) => {
                self.shared.work.notify_one();
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for ConnectionWriter {
    fn drop(&mut self) {
        // Queues the reset behind this connection's data; never blocks. A half-closed one
        // lives on while its reader does.
        if !self.finished {
            self.reset();
        }
        half_dropped(&self.halves, &self.shared, self.id);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
