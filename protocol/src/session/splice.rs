//! A tunnel connection joined to a local socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};

use super::Connection;
use crate::message::MAX_PAYLOAD;

/// A read buffer that starts at 4 KiB and grows (up to `max`) while reads fill it: an idle
/// connection holds 4 KiB, a busy one up to a full DATA payload.
pub struct GrowBuf {
    buf: Vec<u8>,
    max: usize,
}

impl GrowBuf {
    const START: usize = 4096;

    pub fn new(max: usize) -> GrowBuf {
        GrowBuf {
            buf: vec![0; Self::START.min(max.max(1))],
            max: max.max(1),
        }
    }

    /// Where the next read goes.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The `n` bytes just read; a read that filled the buffer makes the next one larger.
    pub fn filled(&mut self, n: usize) -> &[u8] {
        let full = n == self.buf.len() && self.buf.len() < self.max;
        if full {
            let grown = (self.buf.len() * 4).min(self.max);
            self.buf.resize(grown, 0);
        }
        &self.buf[..n]
    }
}

/// Bytes carried by [`splice`], and who ended it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Local → tunnel.
    pub sent: u64,
    /// Tunnel → local.
    pub received: u64,
    /// The peer (or the session) ended the connection, rather than the local side.
    pub peer_closed: bool,
}

/// Counts bytes written through it.
struct Counting<'a, W> {
    inner: W,
    n: &'a std::sync::atomic::AtomicU64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if let Ok(n) = &r {
            self.n
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Poll::Ready(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Carry bytes both ways between a local socket and a tunnel connection until both directions
/// have ended.
///
/// - Local EOF: with half-close negotiated, the peer gets a FIN and the other direction goes
///   on until the peer finishes too; without it (AWS peers), the tunnel connection is reset and
///   what the peer had already sent is still written out locally. A local read error resets.
/// - Peer FIN (half-close): everything received is written, the local socket is shut down for
///   writing (a FIN), and the local side may go on sending.
/// - Peer reset or session end: everything received is written, then the local socket is shut
///   down.
pub async fn splice<L>(local: L, tunnel: Connection) -> Spliced
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, copy_buf};
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut lr, lw) = tokio::io::split(local);
    let (mut tr, tw) = tunnel.into_split();
    let mut tw = Counting {
        inner: tw,
        n: &sent,
    };
    let mut lw = Counting {
        inner: lw,
        n: &received,
    };
    let up = async {
        let mut buf = GrowBuf::new(MAX_PAYLOAD);
        let eof = loop {
            let n = match lr.read(buf.space()).await {
                Ok(0) => break true,
                Err(_) => break false,
                Ok(n) => n,
            };
            if tw.write_all(buf.filled(n)).await.is_err() {
                break false;
            }
        };
        if eof {
            // A FIN to the peer, or the reset where half-close is not negotiated.
            let _ = tw.shutdown().await;
        } else {
            tw.inner.reset();
        }
    };
    let down = async {
        let _ = copy_buf(&mut tr, &mut lw).await;
        let _ = lw.shutdown().await;
        tr.peer_finished()
    };
    tokio::pin!(up, down);
    let peer_closed = tokio::select! {
        peer_finished = &mut down => {
            if peer_finished {
                // Half-closed by the peer: the local side may still send.
                up.await;
            }
            true
        }
        _ = &mut up => {
            // A FIN or reset is queued; the peer's bytes drain until it finishes or resets
            // (after a reset, the connection reads EOF).
            down.await;
            false
        }
    };
    Spliced {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        peer_closed,
    }
}
