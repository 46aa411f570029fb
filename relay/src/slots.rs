//! Connection slots for a public listener, global and per source address, so that no client
//! (and no one address) can take every connection the relay can hold.
//!
//! Each listener has two pools, as OpenSSH's `MaxStartups` beside its session limits and
//! nginx's `limit_conn`:
//!
//! - **connections**: every accepted TCP connection holds one for its whole life;
//! - **handshakes**: a connection that has not yet proven anything (TLS, then the first HTTP
//!   request's head or the MQTT CONNECT of a registered device) also holds one, released as soon
//!   as it gets that far, or when the handshake timeout closes it.
//!
//! A connection that finds either pool full (overall, or for its source) is closed at once,
//! before TLS, so an attacker's half-open connections cost one short-lived file descriptor each
//! and cannot keep other sources, or authenticated sessions, out. IPv6 sources count per /64
//! (one subscriber's allocation); IPv4 per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use crate::metrics::METRICS;

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failed accept
/// (EMFILE and friends) is logged as `what` and backed off from instead of spun on.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Limits of one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source.
    pub max_connections_per_source: usize,
    /// Connections still in their handshake, all sources together.
    pub max_handshakes: usize,
    /// Connections still in their handshake from one source.
    pub max_handshakes_per_source: usize,
    /// Time allowed for TLS and the first request (HTTP head or MQTT CONNECT). On the HTTPS
    /// listener it is also the longest a keep-alive connection may sit idle between requests.
    pub handshake_timeout: Duration,
}

impl ListenerLimits {
    /// Defaults for a listener that may use `fd_budget` file descriptors, and at most
    /// `ceiling` connections: one source may hold an eighth of the connections (at most 1024),
    /// and at most 32 handshakes (half its connections, and half the listener's 512 at most).
    pub fn with_budget(fd_budget: usize, ceiling: usize) -> ListenerLimits {
        let max_connections = ceiling.min(fd_budget).max(16);
        let max_connections_per_source = (max_connections / 8).clamp(8, 1024);
        ListenerLimits {
            max_connections,
            max_connections_per_source,
            max_handshakes: (max_connections / 2).clamp(8, 512),
            max_handshakes_per_source: (max_connections_per_source / 2).clamp(4, 32),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What a connection counts against: its IPv4 address, or for IPv6 both its /64 and its /48
/// (a subscriber usually holds a /56 or a /48, so /64s alone would let one take 256 shares).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6Net64(u64),
    V6Net48(u64),
}

/// The sources of `ip` with the share of the per-source limit each may hold: a /48 may hold
/// [`PER_48`] times what one address or /64 may.
fn sources(ip: IpAddr) -> ([Source; 2], usize) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ([Source::V4(v4.into()), Source::V4(v4.into())], 1),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            (
                [
                    Source::V6Net64((bits >> 64) as u64),
                    Source::V6Net48((bits >> 80) as u64),
                ],
                2,
            )
        }
    }
}

/// How many per-source shares one IPv6 /48 may hold.
pub const PER_48: usize = 4;

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The pool is full for every source.
    Total,
    /// This source holds its share.
    Source,
}

struct State {
    total: usize,
    per_source: HashMap<Source, usize>,
}

/// A pool of slots with a global and a per-source maximum.
pub struct Pool {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<State>,
}

impl Pool {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Pool> {
        Arc::new(Pool {
            max_total,
            max_per_source,
            state: Mutex::new(State {
                total: 0,
                per_source: HashMap::new(),
            }),
        })
    }

    /// Take a slot for a connection from `ip`, if there is one.
    pub fn try_take(self: &Arc<Pool>, ip: IpAddr) -> Result<Slot, Full> {
        let (keys, n) = sources(ip);
        let keys = &keys[..n];
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= self.max_total {
            return Err(Full::Total);
        }
        let limit = |k: &Source| match k {
            Source::V6Net48(_) => self.max_per_source.saturating_mul(PER_48),
            _ => self.max_per_source,
        };
        if keys
            .iter()
            .any(|k| st.per_source.get(k).copied().unwrap_or(0) >= limit(k))
        {
            return Err(Full::Source);
        }
        for k in keys {
            *st.per_source.entry(*k).or_insert(0) += 1;
        }
        st.total += 1;
        Ok(Slot {
            pool: self.clone(),
            keys: [keys[0], keys[n - 1]],
            n,
        })
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// A slot, given back when dropped.
pub struct Slot {
    pool: Arc<Pool>,
    keys: [Source; 2],
    n: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        st.total -= 1;
        for k in &self.keys[..self.n] {
            if let Some(c) = st.per_source.get_mut(k) {
                *c -= 1;
                if *c == 0 {
                    st.per_source.remove(k);
                }
            }
        }
    }
}

/// Refused connections are counted, and logged at most every few seconds with how many there
/// were: a flood must not fill the log.
pub struct RefusalLog {
    listener: &'static str,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn new(listener: &'static str) -> RefusalLog {
        RefusalLog {
            listener,
            last: std::sync::Mutex::new(None),
            suppressed: Default::default(),
        }
    }

    pub fn refused(&self, peer: SocketAddr, pool: &str, full: Full, limits: &ListenerLimits) {
        use std::sync::atomic::Ordering;
        let key = match (pool, full) {
            ("connections", Full::Total) => "max_connections",
            ("connections", Full::Source) => "max_connections_per_source",
            (_, Full::Total) => "max_handshakes",
            (_, Full::Source) => "max_handshakes_per_source",
        };
        METRICS
            .connections_refused
            .get_or_create(&vec![
                ("listener", self.listener.to_owned()),
                ("limit", key.to_owned()),
            ])
            .inc();
        debug!(%peer, listener = self.listener, limit = key, "connection refused: limit reached");
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let also = self.suppressed.swap(0, Ordering::Relaxed);
        let value = match key {
            "max_connections" => limits.max_connections,
            "max_connections_per_source" => limits.max_connections_per_source,
            "max_handshakes" => limits.max_handshakes,
            _ => limits.max_handshakes_per_source,
        };
        warn!(%peer, listener = self.listener, limit = key, value, refused_since_last_report = also,
            "connections refused: {key} ({value}) reached; see docs/operations.md (limits)");
    }
}

/// Both pools of one listener.
pub struct Gate {
    pub limits: ListenerLimits,
    connections: Arc<Pool>,
    handshakes: Arc<Pool>,
}

/// What an admitted connection holds: its connection slot for its life, and its handshake slot
/// until [`Admitted::handshake_done`] (or the end, whichever comes first).
pub struct Admitted {
    _connection: Slot,
    handshake: Mutex<Option<Slot>>,
    /// The connection became a WebSocket session: the write-stall limit of plain HTTP no
    /// longer applies (a tunnel peer may stop reading while its targets do; that is the
    /// protocol's back-pressure, and its own session has its own timeouts).
    upgraded: std::sync::atomic::AtomicBool,
}

impl Admitted {
    /// The connection proved itself: its handshake slot goes back to the pool.
    pub fn handshake_done(&self) {
        self.handshake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// The connection was upgraded to a WebSocket session.
    pub fn upgraded(&self) {
        self.upgraded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn is_upgraded(&self) -> bool {
        self.upgraded.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A connection's socket holding its slots, so they live exactly as long as the socket does,
/// through an HTTP upgrade into a WebSocket session. Until the upgrade, a write that makes no
/// progress for `stall` fails: a client that sends requests and never reads the answers
/// cannot hold its connection (and slot) forever.
pub struct Guarded<S> {
    io: S,
    admitted: Arc<Admitted>,
    stall: Duration,
    write_stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Guarded<S> {
    pub fn new(io: S, admitted: Arc<Admitted>, stall: Duration) -> Guarded<S> {
        Guarded {
            io,
            admitted,
            stall,
            write_stalled: None,
        }
    }

    /// Map a write-side poll: progress clears the stall clock, no progress runs it.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match r {
            Poll::Pending if !self.admitted.is_upgraded() => {
                let stall = self.stall;
                let clock = self
                    .write_stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match clock.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {stall:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Pending => Poll::Pending,
            ready => {
                self.write_stalled = None;
                ready
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Gate {
    pub fn new(limits: ListenerLimits) -> Gate {
        Gate {
            connections: Pool::new(limits.max_connections, limits.max_connections_per_source),
            handshakes: Pool::new(limits.max_handshakes, limits.max_handshakes_per_source),
            limits,
        }
    }

    /// Admit a new connection from `ip`, or say which pool is full.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, (&'static str, Full)> {
        let connection = self
            .connections
            .try_take(ip)
            .map_err(|f| ("connections", f))?;
        let handshake = self
            .handshakes
            .try_take(ip)
            .map_err(|f| ("handshakes", f))?;
        Ok(Admitted {
            _connection: connection,
            handshake: Mutex::new(Some(handshake)),
            upgraded: Default::default(),
        })
    }

    /// (connections, handshakes) in use.
    pub fn in_use(&self) -> (usize, usize) {
        (self.connections.in_use(), self.handshakes.in_use())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_source_cannot_take_the_whole_pool() {
        let pool = Pool::new(4, 2);
        let a1 = pool.try_take(ip("192.0.2.1")).unwrap();
        let _a2 = pool.try_take(ip("192.0.2.1")).unwrap();
        assert_eq!(pool.try_take(ip("192.0.2.1")).err(), Some(Full::Source));
        let _b1 = pool.try_take(ip("192.0.2.2")).unwrap();
        let _b2 = pool.try_take(ip("::ffff:192.0.2.2")).unwrap();
        assert_eq!(
            pool.try_take(ip("192.0.2.3")).err(),
            Some(Full::Total),
            "the pool is full for everyone"
        );
        drop(a1);
        assert!(
            pool.try_take(ip("192.0.2.3")).is_ok(),
            "a freed slot is free for all"
        );
    }

    #[test]
    fn ipv6_sources_count_per_64_and_per_48() {
        let pool = Pool::new(100, 1);
        let _a = pool.try_take(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            pool.try_take(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Full::Source),
            "the same /64"
        );
        // Other /64s of the same /48: PER_48 shares in all.
        let more: Vec<Slot> = (3..3 + PER_48 as u16 - 1)
            .map(|n| pool.try_take(ip(&format!("2001:db8:1:{n:x}::1"))).unwrap())
            .collect();
        assert_eq!(
            pool.try_take(ip("2001:db8:1:ff::1")).err(),
            Some(Full::Source),
            "the /48 holds its share"
        );
        assert!(pool.try_take(ip("2001:db8:2::1")).is_ok(), "another /48");
        drop(more);
        assert!(pool.try_take(ip("2001:db8:1:ff::1")).is_ok());
    }

    #[test]
    fn defaults_scale_with_the_descriptor_budget() {
        let big = ListenerLimits::with_budget(1 << 20, 100_000);
        assert_eq!(
            (
                big.max_connections,
                big.max_connections_per_source,
                big.max_handshakes,
                big.max_handshakes_per_source
            ),
            (100_000, 1024, 512, 32)
        );
        // A relay started with systemd's soft default of 1024 descriptors still shares them out.
        let small = ListenerLimits::with_budget(576, 100_000);
        assert_eq!(
            (
                small.max_connections,
                small.max_connections_per_source,
                small.max_handshakes,
                small.max_handshakes_per_source
            ),
            (576, 72, 288, 32)
        );
    }

    #[test]
    fn a_finished_handshake_frees_its_slot_and_keeps_the_connection() {
        let gate = Gate::new(ListenerLimits {
            max_connections: 10,
            max_connections_per_source: 10,
            max_handshakes: 1,
            max_handshakes_per_source: 1,
            handshake_timeout: Duration::from_secs(1),
        });
        let first = gate.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            gate.admit(ip("192.0.2.9")).err(),
            Some(("handshakes", Full::Total))
        );
        first.handshake_done();
        assert_eq!(gate.in_use(), (1, 0));
        let second = gate.admit(ip("192.0.2.9")).unwrap();
        assert_eq!(gate.in_use(), (2, 1));
        drop((first, second));
        assert_eq!(gate.in_use(), (0, 0));
    }
}
