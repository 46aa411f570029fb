//! Re-announcing tunnels a device may have missed. The embedded broker keeps nothing for a
//! device that never subscribed, and nothing across a relay restart; so when a device's
//! subscription to its notify topic is confirmed, the tunnels of that thing whose destination
//! token is still unused, and whose notification went out before the subscription, get a new
//! destination token, announced again.
//!
//! A device decides how often it subscribes, so this is bounded on the relay's side: one task
//! for all devices (no task per subscription), subscriptions of a thing coalesced into one pass
//! [`CLAIM_GRACE`] after the first, and each tunnel re-announced at most once per
//! [`INTERVAL`]. The queue from the broker is bounded ([`crate::broker::SUBSCRIBED_QUEUE`]) and
//! so is the set of things waiting ([`MAX_WAITING`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Subscribed;
use crate::notify::Notifier;
use crate::registry::{Registry, RotateWhich};

/// How long after a device subscribes its tunnels may stay unclaimed before they are re-issued
/// (the device may be about to use a token it already had).
pub const CLAIM_GRACE: Duration = Duration::from_secs(2);
/// A tunnel is re-announced at most once in this interval, however often its device subscribes.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Things waiting for their pass; subscriptions of further things are dropped until it drains.
pub const MAX_WAITING: usize = 100_000;

/// Coalesces subscriptions into one pass per thing.
#[derive(Default)]
struct Waiting {
    /// Thing → (when its pass is due, the latest subscription it covers).
    things: HashMap<String, (Instant, Instant)>,
}

impl Waiting {
    /// Record a subscription; false if it had to be dropped.
    fn add(&mut self, s: Subscribed) -> bool {
        if let Some(w) = self.things.get_mut(&s.thing) {
            w.1 = w.1.max(s.at);
            return true;
        }
        if self.things.len() >= MAX_WAITING {
            return false;
        }
        self.things.insert(s.thing, (s.at + CLAIM_GRACE, s.at));
        true
    }

    fn next_due(&self) -> Option<Instant> {
        self.things.values().map(|w| w.0).min()
    }

    /// Things whose pass is due at `now`, with the subscription time it covers.
    fn take_due(&mut self, now: Instant) -> Vec<(String, Instant)> {
        let due: Vec<String> = self
            .things
            .iter()
            .filter(|(_, w)| w.0 <= now)
            .map(|(t, _)| t.clone())
            .collect();
        due.into_iter()
            .filter_map(|t| self.things.remove(&t).map(|w| (t, w.1)))
            .collect()
    }
}

/// Run until `shutdown` (or until the broker goes away).
pub async fn run(
    mut subscribed: mpsc::Receiver<Subscribed>,
    registry: Arc<Registry>,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let mut waiting = Waiting::default();
    loop {
        let next = waiting.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            s = subscribed.recv() => match s {
                None => return,
                Some(s) => {
                    let thing = s.thing.clone();
                    if !waiting.add(s) {
                        warn!(thing = %thing, waiting = MAX_WAITING, "too many devices waiting for re-announcement; this subscription is skipped");
                    }
                }
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                for (thing, at) in waiting.take_due(Instant::now()) {
                    reannounce(&registry, &notifier, &thing, at).await;
                }
            }
        }
    }
}

async fn reannounce(registry: &Arc<Registry>, notifier: &Notifier, thing: &str, at: Instant) {
    let ids = match registry.unclaimed_destinations(thing, at, INTERVAL).await {
        Ok(ids) => ids,
        Err(e) => {
            warn!(%thing, error = %e, "could not look for tunnels to re-announce");
            return;
        }
    };
    for id in ids {
        if let Ok(tokens) = registry.rotate(&id, RotateWhich::Destination, None).await
            && let Ok(view) = registry.describe(&id).await
            && let Some(token) = tokens.destination
        {
            info!(tunnel = %id, %thing, "re-announcing an unclaimed tunnel to its device");
            registry.mark_reannounced(&id);
            notifier.announce(registry, &view, &token).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(thing: &str, at: Instant) -> Subscribed {
        Subscribed {
            thing: thing.into(),
            at,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn subscriptions_of_a_thing_coalesce_into_one_pass() {
        let mut w = Waiting::default();
        let t0 = Instant::now();
        for i in 0..2000 {
            assert!(w.add(sub("cell-7", t0 + Duration::from_millis(i))));
        }
        assert!(w.add(sub("door-3", t0 + Duration::from_secs(1))));
        assert_eq!(w.things.len(), 2);
        assert!(w.take_due(t0 + Duration::from_secs(1)).is_empty());
        let due = w.take_due(t0 + CLAIM_GRACE);
        assert_eq!(
            due,
            vec![("cell-7".to_owned(), t0 + Duration::from_millis(1999))],
            "one pass, covering the latest subscription"
        );
        assert_eq!(
            w.next_due(),
            Some(t0 + Duration::from_secs(1) + CLAIM_GRACE)
        );
    }

    #[test]
    fn the_waiting_set_is_bounded() {
        let mut w = Waiting::default();
        let now = Instant::now();
        for i in 0..MAX_WAITING {
            assert!(w.add(sub(&format!("t{i}"), now)));
        }
        assert!(!w.add(sub("one-too-many", now)));
        assert!(w.add(sub("t0", now)), "a waiting thing is still coalesced");
    }
}
