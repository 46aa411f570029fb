//! A udp rule's connection: one UDP flow, carried as framed datagrams
//! ([`culvert_protocol::datagram`]) in the tunnel connection's byte stream.
//!
//! [`bridge`] turns the socket connected to the target into a byte stream that the ordinary
//! pump carries (limits, idle timeout, byte counts and audit as for TCP; the counts include
//! the 2-byte length of each datagram). Each datagram from the tunnel is sent as one datagram
//! to the target; each datagram from the target goes back as one framed datagram.
//!
//! UDP loses datagrams by design; this end loses none it has read. A target that answers with
//! ICMP port unreachable (nothing listening) does not end the flow: the datagrams of that time
//! are lost as they would be on the LAN, the flow goes on, and the first such error is logged.
//! The flow ends when the tunnel connection ends, or after the rule's idle timeout.

use culvert_protocol::datagram::{self, Deframer, MAX_DATAGRAM};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

/// The stream side of a flow to `socket` (connected to the target). The returned stream ends
/// when the tunnel's side ends (dropped or shut down), or when it sends something that is not
/// framed datagrams (it ends inside one).
pub fn bridge(socket: UdpSocket, conn: String) -> DuplexStream {
    // Room for a datagram each way in flight between the pump and the socket.
    let (near, far) = tokio::io::duplex(2 * (MAX_DATAGRAM + datagram::HEADER));
    tokio::spawn(async move {
        let (mut from_tunnel, mut to_tunnel) = tokio::io::split(far);
        let unreachable_logged = std::sync::atomic::AtomicBool::new(false);
        let refused = |e: &std::io::Error| {
            if e.kind() != std::io::ErrorKind::ConnectionRefused {
                return false;
            }
            if !unreachable_logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
                warn!(%conn, "the udp target answers port unreachable (nothing listening?); datagrams to it are lost until it listens");
            }
            true
        };
        let down = async {
            let mut d = Deframer::new();
            let mut buf = vec![0u8; MAX_DATAGRAM + datagram::HEADER];
            loop {
                let n = match from_tunnel.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                d.push(&buf[..n]);
                while let Some(g) = d.next_datagram() {
                    match socket.send(g).await {
                        Ok(_) => {}
                        Err(e) if refused(&e) => {}
                        Err(e) => {
                            debug!(%conn, error = %e, "a datagram to the udp target was not sent")
                        }
                    }
                }
            }
            if d.pending() > 0 {
                warn!(%conn, bytes = d.pending(), "the tunnel connection ended inside a datagram; its start is discarded");
            }
        };
        let up = async {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let n = match socket.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(e) if refused(&e) => continue,
                    Err(e) => {
                        warn!(%conn, error = %e, "cannot receive from the udp target; the flow ends");
                        break;
                    }
                };
                let framed =
                    datagram::frame(&buf[..n]).expect("a received datagram fits the framing");
                if to_tunnel.write_all(&framed).await.is_err() {
                    break;
                }
            }
        };
        // Either way ending ends the flow: the tunnel's side is gone, or the socket is.
        tokio::select! {
            () = down => {}
            () = up => {}
        }
        let _ = to_tunnel.shutdown().await;
    });
    near
}
