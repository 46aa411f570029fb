//! Limits: connections open at once (a counter), new connections per interval and bytes per
//! second (governor's GCRA rate limiters).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::{Limits, Rate};

/// Connections open at once under one rule or one tunnel. Survives configuration reloads, so
/// live connections keep counting against a changed limit.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicUsize>);

/// One slot of a [`Gauge`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gauge {
    /// Take a slot if fewer than `max` are taken (always, without a maximum).
    pub fn try_take(&self, max: Option<usize>) -> Option<Slot> {
        let max = max.unwrap_or(usize::MAX);
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.0.clone()))
    }

    pub fn current(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// New connections per interval, bursting up to the count.
pub struct ConnectionRate(DefaultDirectRateLimiter);

impl ConnectionRate {
    pub fn new(r: Rate) -> ConnectionRate {
        let n = NonZeroU32::new(r.n).expect("validated non-zero");
        let quota = Quota::with_period(r.per / r.n)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(n);
        ConnectionRate(RateLimiter::direct(quota))
    }

    /// Admit one connection now, or say no.
    pub fn admit(&self) -> bool {
        self.0.check().is_ok()
    }
}

/// Bytes per second, shared by every connection it applies to.
pub struct Bandwidth {
    limiter: DefaultDirectRateLimiter,
    /// Largest amount taken in one go; reads are cut to this size.
    pub burst: usize,
}

impl Bandwidth {
    pub fn new(bytes_per_sec: u32) -> Bandwidth {
        // A tenth of a second's worth, so that the rate holds within a few percent over a few
        // seconds, but at least 4 KiB (or the whole rate, if smaller) to keep writes efficient.
        let burst = (bytes_per_sec / 10).clamp(4096.min(bytes_per_sec), 256 * 1024);
        let burst = NonZeroU32::new(burst.max(1)).expect("non-zero");
        let rate = NonZeroU32::new(bytes_per_sec.max(1)).expect("non-zero");
        Bandwidth {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            burst: burst.get() as usize,
        }
    }

    /// Wait until `n` bytes (at most `burst`) may pass.
    pub async fn take(&self, n: usize) {
        let Some(n) = NonZeroU32::new(n.min(self.burst) as u32) else {
            return;
        };
        // Cannot fail: n <= burst.
        let _ = self.limiter.until_n_ready(n).await;
    }
}

/// The shared limiters of one rule or one tunnel.
pub struct Limiters {
    pub limits: Limits,
    pub open: Gauge,
    pub rate: Option<Arc<ConnectionRate>>,
    pub to_target: Option<Arc<Bandwidth>>,
    pub from_target: Option<Arc<Bandwidth>>,
}

impl Limiters {
    pub fn new(limits: &Limits, open: Gauge) -> Limiters {
        Limiters {
            limits: limits.clone(),
            open,
            rate: limits
                .connection_rate
                .map(|r| Arc::new(ConnectionRate::new(r))),
            to_target: limits
                .bytes_per_sec_to_target
                .map(|b| Arc::new(Bandwidth::new(b))),
            from_target: limits
                .bytes_per_sec_from_target
                .map(|b| Arc::new(Bandwidth::new(b))),
        }
    }

    /// The limiters for `limits`, keeping every part of `self` whose setting did not change
    /// (a changed `max_connections` does not refill the connection rate's bucket, nor start a
    /// second bandwidth budget beside the one live connections use).
    pub fn update(&self, limits: &Limits) -> Limiters {
        let fresh = Limiters::new(limits, self.open.clone());
        let l = &self.limits;
        Limiters {
            rate: if l.connection_rate == limits.connection_rate {
                self.rate.clone()
            } else {
                fresh.rate
            },
            to_target: if l.bytes_per_sec_to_target == limits.bytes_per_sec_to_target {
                self.to_target.clone()
            } else {
                fresh.to_target
            },
            from_target: if l.bytes_per_sec_from_target == limits.bytes_per_sec_from_target {
                self.from_target.clone()
            } else {
                fresh.from_target
            },
            limits: fresh.limits,
            open: fresh.open,
        }
    }

    /// A slot under `max_connections`, or the reason there is none.
    pub fn slot(&self, what: &str) -> Result<Slot, String> {
        self.open
            .try_take(self.limits.max_connections)
            .ok_or_else(|| {
                format!(
                    "{what} already has {} connection(s) open (max_connections)",
                    self.open.current()
                )
            })
    }

    /// A token of the connection rate, or the reason there is none.
    pub fn rate(&self, what: &str) -> Result<(), String> {
        match (&self.rate, self.limits.connection_rate) {
            (Some(r), Some(rate)) if !r.admit() => Err(format!(
                "{what} accepts {} new connection(s) per {:?} (connection_rate)",
                rate.n, rate.per
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn gauge_counts_slots() {
        let g = Gauge::default();
        let a = g.try_take(Some(2)).unwrap();
        let _b = g.try_take(Some(2)).unwrap();
        assert!(g.try_take(Some(2)).is_none());
        drop(a);
        assert!(g.try_take(Some(2)).is_some());
        assert!(g.try_take(None).is_some());
    }

    #[test]
    fn connection_rate_bursts_then_refuses() {
        let r = ConnectionRate::new(Rate {
            n: 3,
            per: Duration::from_secs(3600),
        });
        assert!(r.admit() && r.admit() && r.admit());
        assert!(!r.admit());
    }

    #[test]
    fn admission_names_the_limit() {
        let l = Limiters::new(
            &Limits {
                max_connections: Some(1),
                ..Limits::default()
            },
            Gauge::default(),
        );
        let _s = l.slot("rule SSH").unwrap();
        assert!(l.slot("rule SSH").unwrap_err().contains("max_connections"));
        // Changing one limit keeps the others' state.
        let rated = Limiters::new(
            &Limits {
                connection_rate: Some(Rate {
                    n: 1,
                    per: Duration::from_secs(3600),
                }),
                ..Limits::default()
            },
            Gauge::default(),
        );
        rated.rate("rule X").unwrap();
        let more = rated.update(&Limits {
            max_connections: Some(5),
            ..rated.limits.clone()
        });
        assert!(more.rate("rule X").unwrap_err().contains("connection_rate"));
    }

    #[test]
    fn bandwidth_burst() {
        assert_eq!(Bandwidth::new(1_000_000).burst, 100_000);
        assert_eq!(Bandwidth::new(1000).burst, 1000);
        assert_eq!(Bandwidth::new(100_000_000).burst, 256 * 1024);
    }
}
