//! `culvert connect -s NAME=udp:PORT`: a local UDP port for a gateway's udp rule.
//!
//! Each client address and port is one flow, and each flow is one tunnel connection, opened
//! for its first datagram; its datagrams travel framed in the connection's stream
//! ([`culvert_protocol::datagram`]), so boundaries and order are kept end to end. A flow ends
//! after `idle` without a datagram either way, or when the gateway ends its connection (its
//! own idle timeout, a refusal); the client's next datagram starts a new one.
//!
//! Every buffer is bounded: a flow queues at most [`FLOW_QUEUE`] datagrams while its tunnel
//! connection is opened or is slower than the client; beyond that a datagram is dropped, as a
//! congested UDP path would, and the drops are counted in the log (warned once per flow).
//! Flows count against the proxy's connection limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use culvert_protocol::datagram::{self, Deframer, MAX_DATAGRAM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::connect::{MAX_CONNECTIONS, Relay, session_for};

/// Datagrams a flow holds while its tunnel connection cannot take them yet.
pub const FLOW_QUEUE: usize = 64;

/// What every flow of one local port shares.
pub(crate) struct Port {
    pub socket: Arc<UdpSocket>,
    pub service: Option<String>,
    pub v1_service: Arc<OnceLock<String>>,
    pub current: watch::Receiver<Relay>,
    pub limit: Arc<Semaphore>,
    pub idle: Duration,
}

/// Receive on the port and hand each datagram to its flow, until `shutdown`.
pub(crate) async fn serve(port: Port, shutdown: CancellationToken) {
    let port = Arc::new(port);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = port.socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "udp receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut datagram = buf[..n].to_vec();
        // Twice at most: a flow that ended just now is replaced by a new one.
        for _ in 0..2 {
            let tx = match flows.get(&peer) {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    flows.retain(|_, tx| !tx.is_closed());
                    let Ok(permit) = port.limit.clone().try_acquire_owned() else {
                        warn!(%peer, max = MAX_CONNECTIONS, "too many connections and flows; datagram dropped");
                        break;
                    };
                    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                    tokio::spawn(flow(port.clone(), peer, rx, permit));
                    flows.insert(peer, tx.clone());
                    tx
                }
            };
            match tx.try_send(datagram) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped(peer);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(d)) => datagram = d,
            }
        }
    }
}

/// Datagrams dropped because their flow's queue was full, all flows together.
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn dropped(peer: SocketAddr) {
    let n = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
    // The first, then every 1000th: a flood must not become a flood of log lines.
    if n == 1 || n.is_multiple_of(1000) {
        warn!(%peer, dropped = n, queue = FLOW_QUEUE, "a udp flow's tunnel connection is not keeping up; datagrams dropped");
    }
}

/// One flow: open its tunnel connection, then carry datagrams both ways until either side
/// ends it or it is idle.
async fn flow(
    port: Arc<Port>,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(handle) = session_for(peer, port.current.clone()).await else {
        return;
    };
    let Some(service) = port
        .service
        .clone()
        .or_else(|| port.v1_service.get().cloned())
    else {
        return;
    };
    let stream = match handle.open(&service).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, %service, error = %e, "cannot open a tunnel connection for a udp flow");
            return;
        }
    };
    let id = stream.id();
    debug!(%peer, %service, conn = %id, "udp flow opened");
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut from_tunnel, mut to_tunnel) = tokio::io::split(stream);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = async {
        while let Some(d) = rx.recv().await {
            let framed = datagram::frame(&d).expect("a received datagram fits the framing");
            if to_tunnel.write_all(&framed).await.is_err() {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            touch();
        }
    };
    let down = async {
        let mut d = Deframer::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + datagram::HEADER];
        loop {
            let n = match from_tunnel.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            d.push(&buf[..n]);
            while let Some(g) = d.next_datagram() {
                if let Err(e) = port.socket.send_to(g, peer).await {
                    debug!(%peer, error = %e, "a datagram to the local client was not sent");
                }
                received.fetch_add(1, Ordering::Relaxed);
            }
            touch();
        }
    };
    let idle = async {
        loop {
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= port.idle {
                return;
            }
            tokio::time::sleep(port.idle - quiet).await;
        }
    };
    let why = tokio::select! {
        () = up => "the tunnel connection failed",
        () = down => "the gateway ended it",
        () = idle => "idle",
    };
    debug!(%peer, %service, conn = %id, sent = sent.load(Ordering::Relaxed), received = received.load(Ordering::Relaxed), why, "udp flow ended");
}
