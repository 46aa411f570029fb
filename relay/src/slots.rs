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
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The source a connection counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => Source::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

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
        let source = Source::from(ip);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= self.max_total {
            return Err(Full::Total);
        }
        let n = st.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Full::Source);
        }
        *n += 1;
        st.total += 1;
        Ok(Slot {
            pool: self.clone(),
            source,
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
    source: Source,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        st.total -= 1;
        if let Some(n) = st.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.per_source.remove(&self.source);
            }
        }
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
}

impl Admitted {
    /// The connection proved itself: its handshake slot goes back to the pool.
    pub fn handshake_done(&self) {
        self.handshake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
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
    fn ipv6_sources_count_per_64() {
        let pool = Pool::new(100, 1);
        let _a = pool.try_take(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            pool.try_take(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Full::Source)
        );
        assert!(pool.try_take(ip("2001:db8:1:3::1")).is_ok());
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
