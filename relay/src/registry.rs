//! The relay's tunnels: their records, through the [`Store`] and its atomic operations, and
//! this relay's live pairing of each tunnel's two peers.
//!
//! Nothing here holds a lock across a store call: the store decides (token checks, single use,
//! rotation, close) atomically, and the registry then brings the live halves in line. A
//! handshake admitted just before a rotation or a close carries the side's generation from the
//! store, and [`Live::attach`] refuses it once the live half has seen a newer one, whichever
//! order the two land in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use culvert_protocol::{Mode, valid_name};
use tokio::time::Instant;
use tracing::{info, warn};

pub use crate::live::{Kick, KickReason, Live, NewPeer};
pub use crate::store::{AdmitError, Refusal};
use crate::store::{
    ChangeError, CloseReason, Handshake, ListQuery, NewTokens, OnSite, OnSiteState, Retarget,
    SideRecord, Status, Store, StoreError, TagChange, TunnelRecord,
};
use crate::tokens::{TokenHash, new_secret};

/// How long the live half of a closed tunnel is kept: long enough that a handshake admitted
/// just before the close finds it (revoked) rather than making a fresh one.
const CLOSED_LIVE_KEPT: Duration = Duration::from_secs(60);

/// A close reason as peers are told it.
fn close_why(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::Closed => "tunnel closed",
        CloseReason::Expired => "tunnel expired",
        CloseReason::AccessRevoked => "access revoked",
        CloseReason::RefusedOnSite => "refused on site",
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug)]
pub struct Limits {
    /// Most services one tunnel may carry.
    pub max_services: usize,
    /// Closed tunnels stay visible (and their tokens answer "closed") this long.
    pub closed_retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: 8,
            closed_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why an API call failed; becomes an HTTP status and a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("no tunnel with id {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> ApiError {
        match e {
            ChangeError::NotFound(id) => ApiError::NotFound(id),
            e @ ChangeError::Closed(_) => ApiError::Conflict(e.to_string()),
            ChangeError::Store(e) => ApiError::Store(e),
        }
    }
}

pub use culvert_protocol::is_unsafe_char;

/// A request to open a tunnel, validated.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    pub thing_name: String,
    pub services: Vec<String>,
    pub lifetime_minutes: u32,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// The operator opening it (none: the bootstrap key), and the key they used.
    pub opened_by: Option<String>,
    pub opened_key: Option<String>,
    pub reason: Option<String>,
}

impl OpenRequest {
    pub const DEFAULT_LIFETIME_MINUTES: u32 = 720;

    pub fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::Invalid(m));
        validate_destination(&self.thing_name, &self.services, limits)?;
        if !(1..=720).contains(&self.lifetime_minutes) {
            return bad(format!(
                "lifetime of {} minutes is out of range: 1 to 720 (12 h)",
                self.lifetime_minutes
            ));
        }
        if let Some(d) = &self.description
            && (d.is_empty() || d.chars().count() > 2048 || d.chars().any(is_unsafe_char))
        {
            return bad(
                "description must be 1-2048 characters without control or bidirectional-override characters"
                    .into(),
            );
        }
        if let Some(r) = &self.reason
            && (r.trim().is_empty() || r.chars().count() > 1024 || r.chars().any(is_unsafe_char))
        {
            return bad(
                "reason must be 1-1024 characters without control or bidirectional-override characters"
                    .into(),
            );
        }
        validate_tags(&self.tags)?;
        Ok(())
    }
}

/// A destination: a valid thing name, and 1 to `limits.max_services` distinct valid services.
pub fn validate_destination(
    thing_name: &str,
    services: &[String],
    limits: &Limits,
) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::Invalid(m));
    if !valid_name(thing_name) {
        return bad(format!(
            "thingName {thing_name:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -"
        ));
    }
    if services.is_empty() {
        return bad("services: give at least one service name, e.g. [\"SSH\"]".into());
    }
    if services.len() > limits.max_services {
        return bad(format!(
            "services: {} given, this relay allows at most {} per tunnel",
            services.len(),
            limits.max_services
        ));
    }
    for (i, s) in services.iter().enumerate() {
        if !valid_name(s) {
            return bad(format!(
                "services[{i}] {s:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -"
            ));
        }
        if services[..i].contains(s) {
            return bad(format!("services[{i}] {s:?} is listed twice"));
        }
    }
    Ok(())
}

/// At most 50 tags, keys of 1-128 characters, values of at most 256, no control characters.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::Invalid(m));
    if tags.len() > 50 {
        return bad(format!("{} tags given, at most 50 allowed", tags.len()));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > 128 || v.len() > 256 {
            return bad(format!(
                "tag {k:?}: keys are 1-128 characters, values at most 256"
            ));
        }
        if k.chars().chain(v.chars()).any(is_unsafe_char) {
            return bad(format!(
                "tag {k:?}: keys and values may not contain control or bidirectional-override characters"
            ));
        }
    }
    Ok(())
}

/// Tokens handed out once, at open or rotation.
#[derive(Clone, Debug, Default)]
pub struct IssuedTokens {
    pub source: Option<String>,
    pub destination: Option<String>,
}

/// Which tokens a rotation replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateWhich {
    Source,
    Destination,
    All,
}

impl RotateWhich {
    fn includes(self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (RotateWhich::All, _)
                | (RotateWhich::Source, Mode::Source)
                | (RotateWhich::Destination, Mode::Destination)
        )
    }
}

/// What a successful handshake gets.
pub struct Admission {
    pub live: Arc<Live>,
    pub mode: Mode,
    pub thing_name: String,
    /// The side's generation when admitted (see [`Live::attach`]).
    pub generation: u64,
    /// This handshake was the token's first use: if the upgrade then fails, the use is
    /// released ([`Registry::release`]), since AWS spends a token only on a successful handshake.
    pub first_use: bool,
    pub token: TokenHash,
}

/// A snapshot of one tunnel for the API.
#[derive(Clone, Debug)]
pub struct TunnelView {
    pub rec: TunnelRecord,
    pub source_connected: bool,
    pub source_changed_ms: i64,
    pub destination_connected: bool,
    pub destination_changed_ms: i64,
    /// In a cluster: the node each side is attached on, if it is.
    pub source_node: Option<String>,
    pub destination_node: Option<String>,
}

/// This relay's in-memory state of one tunnel.
struct Local {
    live: Arc<Live>,
    /// When the tunnel was closed (its live half goes [`CLOSED_LIVE_KEPT`] later).
    closed: Option<Instant>,
}

/// When a tunnel's destination token was last published to its device, and last re-announced
/// ([`crate::reannounce`]). In memory only: after a restart the embedded broker has lost what
/// it held, so a tunnel counts as never sent.
#[derive(Clone, Copy, Default)]
struct Marks {
    notified: Option<Instant>,
    reannounced: Option<Instant>,
}

#[derive(Default)]
struct LocalState {
    tunnels: HashMap<String, Local>,
    marks: HashMap<String, Marks>,
}

pub struct Registry {
    store: Arc<dyn Store>,
    limits: Limits,
    local: Mutex<LocalState>,
    /// Open tunnels, as of the last sweep (for status lines and metrics).
    open: AtomicUsize,
    /// In a cluster: the store's side leases, which say where each side is connected, and
    /// this node's name.
    placements: std::sync::OnceLock<(Arc<crate::store::PostgresStore>, String)>,
}

impl Registry {
    /// A registry over `store`. Stored open tunnels come back with both sides disconnected.
    pub async fn new(store: Arc<dyn Store>, limits: Limits) -> Result<Registry, StoreError> {
        let open = store.count_open().await?;
        info!(open, "tunnel store loaded");
        Ok(Registry {
            store,
            limits,
            local: Mutex::new(LocalState::default()),
            open: AtomicUsize::new(open),
            placements: Default::default(),
        })
    }

    /// This registry is node `node` of a cluster on `store`: a tunnel's sides may be
    /// connected on other nodes, as the store's leases say.
    pub fn set_cluster(&self, store: Arc<crate::store::PostgresStore>, node: String) {
        let _ = self.placements.set((store, node));
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, LocalState> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live half of `rec`'s tunnel, made if this relay has none yet.
    fn live_for(&self, rec: &TunnelRecord) -> Arc<Live> {
        self.lock()
            .tunnels
            .entry(rec.id.clone())
            .or_insert_with(|| Local {
                live: Arc::new(Live::new(rec)),
                closed: None,
            })
            .live
            .clone()
    }

    fn view(&self, rec: TunnelRecord) -> TunnelView {
        let live = self.lock().tunnels.get(&rec.id).map(|l| l.live.clone());
        let state = |mode: Mode| match &live {
            Some(l) => l.state(mode),
            None => (false, rec.side(mode).last_change_ms),
        };
        let (sc, sm) = state(Mode::Source);
        let (dc, dm) = state(Mode::Destination);
        TunnelView {
            rec,
            source_connected: sc,
            source_changed_ms: sm,
            destination_connected: dc,
            destination_changed_ms: dm,
            source_node: None,
            destination_node: None,
        }
    }

    /// Views of `recs`; in a cluster, with where each side is connected on any node.
    async fn views(&self, recs: Vec<TunnelRecord>) -> Result<Vec<TunnelView>, StoreError> {
        let mut views: Vec<TunnelView> = recs.into_iter().map(|r| self.view(r)).collect();
        let Some((store, node)) = self.placements.get() else {
            return Ok(views);
        };
        let ids = views.iter().map(|v| v.rec.id.clone()).collect();
        let placed = store.placements(ids, now_ms()).await?;
        for v in &mut views {
            for p in placed.iter().filter(|p| p.tunnel == v.rec.id) {
                let (connected, changed, at) = match p.mode {
                    Mode::Source => (
                        &mut v.source_connected,
                        &mut v.source_changed_ms,
                        &mut v.source_node,
                    ),
                    Mode::Destination => (
                        &mut v.destination_connected,
                        &mut v.destination_changed_ms,
                        &mut v.destination_node,
                    ),
                };
                // This node's own state is exact; another node's lease says it is there.
                if p.node != *node && !*connected {
                    *connected = true;
                    *changed = p.since_ms;
                }
                if *connected {
                    *at = Some(p.node.clone());
                }
            }
        }
        Ok(views)
    }

    async fn view_one(&self, rec: TunnelRecord) -> Result<TunnelView, ApiError> {
        let mut v = self.views(vec![rec]).await?;
        Ok(v.remove(0))
    }

    pub async fn open(&self, req: OpenRequest) -> Result<(TunnelView, IssuedTokens), ApiError> {
        req.validate(&self.limits)?;
        let now = now_ms();
        let src = new_secret();
        let dst = new_secret();
        let rec = TunnelRecord {
            id: culvert_protocol::new_client_token(),
            thing_name: req.thing_name,
            services: req.services,
            description: req.description,
            tags: req.tags,
            created_ms: now,
            lifetime_minutes: req.lifetime_minutes,
            expires_ms: now + i64::from(req.lifetime_minutes) * 60_000,
            status: Status::Open,
            closed_ms: None,
            close_reason: None,
            source: SideRecord::new(TokenHash::of(&src), now),
            destination: SideRecord::new(TokenHash::of(&dst), now),
            opened_by: req.opened_by,
            opened_key: req.opened_key,
            reason: req.reason,
            on_site: None,
        };
        self.store.create(&rec).await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        info!(tunnel = %rec.id, thing = %rec.thing_name, services = ?rec.services, "tunnel opened");
        Ok((
            self.view(rec),
            IssuedTokens {
                source: Some(src),
                destination: Some(dst),
            },
        ))
    }

    pub async fn describe(&self, id: &str) -> Result<TunnelView, ApiError> {
        let rec = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        self.view_one(rec).await
    }

    /// Newest first; `after` is the (created_ms, id) of the last item of the previous page.
    pub async fn list(
        &self,
        thing: Option<&str>,
        status: Option<Status>,
        after: Option<(i64, String)>,
        max: usize,
    ) -> Result<(Vec<TunnelView>, Option<(i64, String)>), ApiError> {
        let q = ListQuery {
            thing: thing.map(str::to_owned),
            status,
            after,
            max,
        };
        let (recs, more) = self.store.list(&q).await?;
        let page = self.views(recs).await?;
        let next = more
            .then(|| page.last().map(|v| (v.rec.created_ms, v.rec.id.clone())))
            .flatten();
        Ok((page, next))
    }

    /// Close a tunnel (idempotent), disconnecting both sides; optionally delete its record.
    pub async fn close(&self, id: &str, delete: bool) -> Result<TunnelView, ApiError> {
        let v = self.close_with(id, CloseReason::Closed).await?;
        if delete {
            self.delete(id).await?;
        }
        Ok(v)
    }

    /// `thing`'s gateway reported where tunnel `id` stands with the site's approval: true if
    /// that changed it (gateways repeat their reports). A tunnel of another thing is "not
    /// found" (a device speaks for its own tunnels only); a refusal closes the tunnel.
    pub async fn set_on_site(
        &self,
        thing: &str,
        id: &str,
        on_site: OnSite,
    ) -> Result<bool, ApiError> {
        let rec = match self.store.get(id).await? {
            Some(rec) if rec.thing_name == thing => rec,
            _ => return Err(ApiError::NotFound(id.to_owned())),
        };
        let same = |o: &OnSite| {
            (o.state, &o.by, &o.detail) == (on_site.state, &on_site.by, &on_site.detail)
        };
        if rec.on_site.as_ref().is_some_and(same) {
            return Ok(false);
        }
        let refused = on_site.state == OnSiteState::Refused;
        self.store.set_on_site(id, &on_site).await?;
        if refused {
            self.close_with(id, CloseReason::RefusedOnSite).await?;
        }
        Ok(true)
    }

    async fn close_with(&self, id: &str, reason: CloseReason) -> Result<TunnelView, ApiError> {
        let c = self.store.close(id, reason, now_ms()).await?;
        if c.changed {
            let why = close_why(reason);
            // Revoke even a live half this relay has not made yet: a handshake admitted just
            // before the close must find it revoked.
            let live = self.live_for(&c.rec);
            if let Some(l) = self.lock().tunnels.get_mut(id) {
                l.closed = Some(Instant::now());
            }
            self.lock().marks.remove(id);
            for mode in [Mode::Source, Mode::Destination] {
                live.revoke(mode, c.rec.side(mode).generation, why);
            }
            self.open.fetch_sub(1, Ordering::Relaxed);
            info!(tunnel = %id, reason = why, "tunnel closed");
        }
        Ok(self.view(c.rec))
    }

    /// Close every open tunnel an operator opened that `allowed` no longer allows (the
    /// operator was disabled, a grant was revoked or ran out). Returns the closed ones.
    pub async fn close_unallowed(
        &self,
        allowed: impl Fn(&str, &TunnelRecord) -> bool,
    ) -> Result<Vec<String>, ApiError> {
        let mut closed = Vec::new();
        let mut after = None;
        loop {
            let q = ListQuery {
                thing: None,
                status: Some(Status::Open),
                after: after.take(),
                max: 100,
            };
            let (recs, more) = self.store.list(&q).await?;
            for rec in &recs {
                if let Some(by) = &rec.opened_by
                    && !allowed(by, rec)
                {
                    self.close_with(&rec.id, CloseReason::AccessRevoked).await?;
                    info!(tunnel = %rec.id, operator = %by, "tunnel closed: its operator's access was revoked");
                    closed.push(rec.id.clone());
                }
            }
            match recs.last() {
                Some(last) if more => after = Some((last.created_ms, last.id.clone())),
                _ => return Ok(closed),
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        if self.store.delete(id).await? {
            info!(tunnel = %id, "tunnel deleted");
        }
        Ok(())
    }

    /// Issue new tokens; the old ones stop working and their peers are disconnected. With
    /// `retarget` (destination or both sides only) the new destination token is for another
    /// thing and set of services.
    pub async fn rotate(
        &self,
        id: &str,
        which: RotateWhich,
        retarget: Option<Retarget>,
    ) -> Result<IssuedTokens, ApiError> {
        let mut issued = IssuedTokens::default();
        if let Some(r) = &retarget {
            if !which.includes(Mode::Destination) {
                return Err(ApiError::Invalid(
                    "a new destination needs a new destination token: rotate the destination (or all)"
                        .into(),
                ));
            }
            validate_destination(&r.thing_name, &r.services, &self.limits)?;
        }
        let mut new = NewTokens {
            retarget,
            ..NewTokens::default()
        };
        if which.includes(Mode::Source) {
            let s = new_secret();
            new.source = Some(TokenHash::of(&s));
            issued.source = Some(s);
        }
        if which.includes(Mode::Destination) {
            let s = new_secret();
            new.destination = Some(TokenHash::of(&s));
            issued.destination = Some(s);
        }
        let rec = self.store.rotate(id, &new).await?;
        let live = self.lock().tunnels.get(id).map(|l| l.live.clone());
        if let Some(live) = live {
            for mode in [Mode::Source, Mode::Destination] {
                if which.includes(mode) {
                    live.revoke(mode, rec.side(mode).generation, "access token rotated");
                }
            }
        }
        info!(tunnel = %id, ?which, "tokens rotated");
        Ok(issued)
    }

    /// Change a tunnel's tags, open or closed, in one store step. The tags set are checked as
    /// at open; the 50-tag limit against the tunnel as it stands just before.
    pub async fn retag(&self, id: &str, change: TagChange) -> Result<TunnelView, ApiError> {
        let mut after = self.describe(id).await?.rec.tags;
        for k in &change.remove {
            after.remove(k);
        }
        after.extend(change.set.clone());
        validate_tags(&change.set)?;
        validate_tags(&after)?;
        let rec = self.store.retag(id, &change).await?;
        self.view_one(rec).await
    }

    /// Check a data-plane handshake and consume the token as AWS defines single use.
    pub async fn admit(
        &self,
        token: &str,
        mode: Mode,
        client_token: Option<&str>,
    ) -> Result<Admission, AdmitError> {
        let h = TokenHash::of(token);
        let a = self
            .store
            .admit(&Handshake {
                token: h,
                mode,
                client_token: client_token.map(TokenHash::of),
                now_ms: now_ms(),
            })
            .await?;
        Ok(Admission {
            live: self.live_for(&a.rec),
            mode,
            thing_name: a.rec.thing_name.clone(),
            generation: a.rec.side(mode).generation,
            first_use: a.first_use,
            token: h,
        })
    }

    /// A peer another node of the cluster admitted under `generation` of side `mode`, to
    /// attach here (this node holds the tunnel). Refused if the tunnel closed or the side's
    /// token was rotated since.
    pub async fn admit_forwarded(
        &self,
        id: &str,
        mode: Mode,
        generation: u64,
    ) -> Result<Admission, ApiError> {
        let rec = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        if rec.status != Status::Open {
            return Err(ApiError::Conflict(format!("tunnel {id} is closed")));
        }
        if generation < rec.side(mode).generation {
            return Err(ApiError::Conflict(format!(
                "the {mode} access token of tunnel {id} was rotated"
            )));
        }
        Ok(Admission {
            live: self.live_for(&rec),
            mode,
            thing_name: rec.thing_name.clone(),
            generation,
            first_use: false,
            token: TokenHash([0; 32]),
        })
    }

    /// Every live half this relay has, taken out of the registry's lock (a tunnel's lock is
    /// never taken under the registry's).
    fn lives(&self) -> Vec<Arc<Live>> {
        self.lock()
            .tunnels
            .values()
            .map(|l| l.live.clone())
            .collect()
    }

    /// The sides of tunnels with a peer attached on this relay now.
    pub fn attached_sides(&self) -> Vec<(String, Mode)> {
        let lives = self.lives();
        let mut sides = Vec::new();
        for l in lives {
            for mode in [Mode::Source, Mode::Destination] {
                if l.state(mode).0 {
                    sides.push((l.id.clone(), mode));
                }
            }
        }
        sides
    }

    /// Disconnect both peers of tunnel `id` on this relay.
    pub fn kick_tunnel(&self, id: &str, reason: KickReason) {
        let live = self.lock().tunnels.get(id).map(|l| l.live.clone());
        if let Some(l) = live {
            l.kick(Mode::Source, reason.clone());
            l.kick(Mode::Destination, reason);
        }
    }

    /// Another relay on the shared store changed tunnel `id` (closed it, rotated a token):
    /// bring this relay's live half in line, disconnecting the peers it revoked. `"*"`:
    /// changes may have been missed, look at every tunnel this relay has live.
    pub async fn changed_elsewhere(&self, id: &str) {
        let ids: Vec<String> = if id == "*" {
            self.lock().tunnels.keys().cloned().collect()
        } else {
            match self.lock().tunnels.contains_key(id) {
                true => vec![id.to_owned()],
                false => return,
            }
        };
        for id in ids {
            let rec = match self.store.get(&id).await {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e) => {
                    warn!(tunnel = %id, error = %e, "could not read a tunnel another relay changed");
                    continue;
                }
            };
            let Some(live) = self.lock().tunnels.get(&id).map(|l| l.live.clone()) else {
                continue;
            };
            let why = match rec.close_reason {
                Some(r) if rec.status != Status::Open => close_why(r),
                _ => "access token rotated",
            };
            if rec.status != Status::Open {
                let mut st = self.lock();
                if let Some(l) = st.tunnels.get_mut(&id) {
                    l.closed.get_or_insert_with(Instant::now);
                }
                st.marks.remove(&id);
            }
            for mode in [Mode::Source, Mode::Destination] {
                live.revoke(mode, rec.side(mode).generation, why);
            }
        }
    }

    /// Undo the first use of a token whose WebSocket upgrade failed after admission.
    pub async fn release(
        &self,
        tunnel: &str,
        mode: Mode,
        token: TokenHash,
    ) -> Result<(), StoreError> {
        self.store.release(tunnel, mode, token).await
    }

    /// The destination token of tunnel `id` was just published to its device.
    pub fn mark_notified(&self, id: &str) {
        self.lock().marks.entry(id.to_owned()).or_default().notified = Some(Instant::now());
    }

    /// Tunnel `id` is being re-announced now.
    pub fn mark_reannounced(&self, id: &str) {
        self.lock()
            .marks
            .entry(id.to_owned())
            .or_default()
            .reannounced = Some(Instant::now());
    }

    /// Open tunnels of `thing` that a device which subscribed at `subscribed_at` may have
    /// missed: the destination token is still unused, its last notification (if any) went out
    /// before that subscription, and it was not re-announced in the last `interval`. A tunnel
    /// notified while the device was subscribed reached it.
    pub async fn unclaimed_destinations(
        &self,
        thing: &str,
        subscribed_at: Instant,
        interval: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let ids = self.store.unclaimed(thing, now_ms()).await?;
        let now = Instant::now();
        let st = self.lock();
        Ok(ids
            .into_iter()
            .filter(|id| {
                let m = st.marks.get(id).copied().unwrap_or_default();
                m.notified.is_none_or(|n| n < subscribed_at)
                    && m.reannounced
                        .is_none_or(|r| now.duration_since(r) >= interval)
            })
            .collect())
    }

    /// Close expired tunnels and forget closed ones past retention. Called periodically.
    pub async fn sweep(&self) {
        let now = now_ms();
        let retention = self.limits.closed_retention.as_millis() as i64;
        let due = match self.store.due(now, now - retention).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "could not sweep the tunnel store");
                return;
            }
        };
        for id in due.expired {
            if let Err(e) = self.close_with(&id, CloseReason::Expired).await {
                warn!(tunnel = %id, error = %e, "could not expire tunnel");
            }
        }
        for id in due.purge {
            if let Err(e) = self.delete(&id).await {
                warn!(tunnel = %id, error = %e, "could not purge closed tunnel");
            }
        }
        if let Ok(n) = self.store.count_open().await {
            self.open.store(n, Ordering::Relaxed);
        }
        let mut st = self.lock();
        st.tunnels
            .retain(|_, l| l.closed.is_none_or(|c| c.elapsed() < CLOSED_LIVE_KEPT));
    }

    /// Open tunnels, and how many peers are connected to this relay.
    pub fn counts(&self) -> (usize, usize) {
        let lives = self.lives();
        let peers = lives
            .iter()
            .map(|l| {
                [Mode::Source, Mode::Destination]
                    .iter()
                    .filter(|m| l.state(**m).0)
                    .count()
            })
            .sum();
        (self.open.load(Ordering::Relaxed), peers)
    }

    /// Disconnect every peer (relay shutdown).
    pub fn kick_all(&self, reason: KickReason) {
        let lives = self.lives();
        for l in lives {
            l.kick(Mode::Source, reason.clone());
            l.kick(Mode::Destination, reason.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    async fn registry() -> Registry {
        Registry::new(
            Arc::new(crate::store::MemoryStore::new()),
            Limits::default(),
        )
        .await
        .unwrap()
    }

    fn peer() -> NewPeer {
        let (tx, _rx) = mpsc::channel(1);
        NewPeer {
            tx,
            kick: Kick::default(),
            extensions: culvert_protocol::ext::Extensions::NONE,
            format: culvert_protocol::Format::V3,
        }
    }

    fn req() -> OpenRequest {
        OpenRequest {
            thing_name: "cell-7".into(),
            services: vec!["SSH".into()],
            lifetime_minutes: 720,
            description: None,
            tags: Default::default(),
            opened_by: None,
            opened_key: None,
            reason: None,
        }
    }

    fn refusal(r: Result<Admission, AdmitError>) -> Refusal {
        match r {
            Err(AdmitError::Refused(r)) => r,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted"),
        }
    }

    #[tokio::test]
    async fn single_use_and_client_tokens() {
        let reg = registry().await;
        let (v, t) = reg.open(req()).await.unwrap();
        let src = t.source.unwrap();
        let dst = t.destination.unwrap();
        let ct = culvert_protocol::new_client_token();
        assert_eq!(
            refusal(reg.admit("nope", Mode::Source, None).await),
            Refusal::UnknownToken
        );
        reg.admit(&src, Mode::Source, Some(&ct)).await.unwrap();
        reg.admit(&src, Mode::Source, Some(&ct)).await.unwrap();
        assert!(matches!(
            refusal(reg.admit(&src, Mode::Source, None).await),
            Refusal::NeedsClientToken {
                mode: Mode::Source,
                ..
            }
        ));
        reg.admit(&dst, Mode::Destination, None).await.unwrap();
        assert!(matches!(
            refusal(reg.admit(&dst, Mode::Destination, None).await),
            Refusal::Spent {
                mode: Mode::Destination,
                ..
            }
        ));
        // Rotation: old token refused with the reason, new one works.
        let new = reg
            .rotate(&v.rec.id, RotateWhich::Destination, None)
            .await
            .unwrap();
        assert!(new.source.is_none());
        assert_eq!(
            refusal(reg.admit(&dst, Mode::Destination, None).await),
            Refusal::Rotated(Mode::Destination)
        );
        reg.admit(new.destination.as_deref().unwrap(), Mode::Destination, None)
            .await
            .unwrap();
        reg.close(&v.rec.id, false).await.unwrap();
        assert_eq!(
            refusal(reg.admit(&src, Mode::Source, Some(&ct)).await),
            Refusal::Closed(v.rec.id.clone())
        );
        assert!(matches!(
            reg.rotate(&v.rec.id, RotateWhich::All, None).await,
            Err(ApiError::Conflict(_))
        ));
        reg.close(&v.rec.id, true).await.unwrap();
        assert!(matches!(
            reg.describe(&v.rec.id).await,
            Err(ApiError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn state_survives_a_restart_on_the_embedded_store() {
        let dir = std::env::temp_dir().join(format!(
            "culvert-reg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let open = || Arc::new(crate::store::RedbStore::open(&dir.join("t.redb")).unwrap());
        let reg = Registry::new(open(), Limits::default()).await.unwrap();
        let (v, t) = reg.open(req()).await.unwrap();
        let src = t.source.unwrap();
        let ct = culvert_protocol::new_client_token();
        reg.admit(&src, Mode::Source, Some(&ct)).await.unwrap();
        drop(reg);
        let reg = Registry::new(open(), Limits::default()).await.unwrap();
        assert_eq!(reg.counts(), (1, 0));
        let d = reg.describe(&v.rec.id).await.unwrap();
        assert_eq!(d.rec.status, Status::Open);
        assert!(!d.source_connected);
        reg.admit(&src, Mode::Source, Some(&ct)).await.unwrap();
        assert!(matches!(
            refusal(reg.admit(&src, Mode::Source, None).await),
            Refusal::NeedsClientToken {
                mode: Mode::Source,
                ..
            }
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_revoked_admission_cannot_attach_and_a_failed_upgrade_releases_the_token() {
        let reg = registry().await;
        let (v, t) = reg.open(req()).await.unwrap();
        let dst = t.destination.unwrap();
        let adm = reg.admit(&dst, Mode::Destination, None).await.unwrap();
        assert!(adm.first_use);
        // The upgrade failed: the token is usable again.
        reg.release(&v.rec.id, Mode::Destination, adm.token)
            .await
            .unwrap();
        let adm = reg.admit(&dst, Mode::Destination, None).await.unwrap();
        // A rotation lands between admission and attach: the attach is refused.
        reg.rotate(&v.rec.id, RotateWhich::Destination, None)
            .await
            .unwrap();
        assert_eq!(
            adm.live.attach(Mode::Destination, adm.generation, peer()),
            None
        );
    }

    #[tokio::test]
    async fn a_close_between_admission_and_attach_wins_even_before_the_live_half_exists() {
        let reg = registry().await;
        let (v, t) = reg.open(req()).await.unwrap();
        let src = t.source.unwrap();
        // Admitted, and the tunnel closed, before this relay made its live half: the close
        // makes it (revoked), and the admission finds that one.
        let adm = reg.admit(&src, Mode::Source, None).await.unwrap();
        reg.lock().tunnels.clear();
        reg.close(&v.rec.id, false).await.unwrap();
        let live = reg.live_for(&reg.describe(&v.rec.id).await.unwrap().rec);
        assert_eq!(live.attach(Mode::Source, adm.generation, peer()), None);
    }

    /// What the destination is sent when the source goes away and comes back: with both
    /// ends resuming, a relay HELLO (hold your connections) and no reset; with a new source
    /// that cannot resume, the reset of the stream that was kept.
    #[tokio::test]
    async fn streams_are_kept_for_a_resume_only_between_peers_that_resume() {
        use culvert_protocol::ext::Extensions;
        use culvert_protocol::frame::decode;
        use culvert_protocol::{Message, MessageType};
        let reg = registry().await;
        let (v, t) = reg.open(req()).await.unwrap();
        let adm = reg
            .admit(&t.destination.unwrap(), Mode::Destination, None)
            .await
            .unwrap();
        let live = adm.live.clone();
        let with = |extensions| {
            let (tx, rx) = mpsc::channel(16);
            (
                NewPeer {
                    tx,
                    kick: Kick::default(),
                    extensions,
                    format: culvert_protocol::Format::V3,
                },
                rx,
            )
        };
        let (dst, mut to_dst) = with(Extensions::ALL);
        live.attach(Mode::Destination, adm.generation, dst).unwrap();
        let (src, _to_src) = with(Extensions::ALL);
        let src_id = live.attach(Mode::Source, 0, src).unwrap();
        let start = Message::stream_start(1, "SSH", 1);
        live.lock().rules.check(Mode::Source, &start).unwrap();
        let mut sent = || {
            let mut types = Vec::new();
            while let Ok(c) = to_dst.try_recv() {
                types.push(decode(c.bytes.slice(2..)).unwrap().r#type);
            }
            types
        };
        assert!(live.detach(Mode::Source, src_id));
        assert_eq!(
            sent(),
            vec![culvert_protocol::flow::HELLO],
            "hold, not reset"
        );
        // A source that cannot resume (the localproxy) takes its place: the kept stream dies.
        let (aws, _to_aws) = with(Extensions::NONE);
        live.attach(Mode::Source, 0, aws).unwrap();
        assert_eq!(sent(), vec![MessageType::StreamReset as i32]);
        let _ = v;
    }

    #[tokio::test]
    async fn a_rotation_after_attach_disconnects_the_peer() {
        let reg = registry().await;
        let (v, t) = reg.open(req()).await.unwrap();
        let adm = reg
            .admit(t.source.as_deref().unwrap(), Mode::Source, None)
            .await
            .unwrap();
        let p = peer();
        let kick = p.kick.clone();
        adm.live.attach(Mode::Source, adm.generation, p).unwrap();
        assert_eq!(reg.counts(), (1, 1));
        reg.rotate(&v.rec.id, RotateWhich::Source, None)
            .await
            .unwrap();
        assert!(matches!(kick.kicked().await, KickReason::Revoked(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn unclaimed_destinations_are_the_open_never_used_ones_the_device_missed() {
        let minute = Duration::from_secs(60);
        let reg = registry().await;
        let (a, ta) = reg.open(req()).await.unwrap();
        let (b, _tb) = reg.open(req()).await.unwrap();
        let (c, _tc) = reg.open(req()).await.unwrap();
        reg.admit(ta.destination.as_deref().unwrap(), Mode::Destination, None)
            .await
            .unwrap();
        reg.close(&c.rec.id, false).await.unwrap();
        let mut other = req();
        other.thing_name = "another-thing".into();
        reg.open(other).await.unwrap();
        reg.mark_notified(&b.rec.id);
        tokio::time::advance(Duration::from_millis(50)).await;
        let subscribed = Instant::now();
        let unclaimed = |at| reg.unclaimed_destinations("cell-7", at, minute);
        assert_eq!(
            unclaimed(subscribed).await.unwrap(),
            vec![b.rec.id.clone()],
            "notified before the device subscribed"
        );
        assert!(!unclaimed(subscribed).await.unwrap().contains(&a.rec.id));
        // Re-announced now: not again within the interval, whatever the device does.
        reg.mark_reannounced(&b.rec.id);
        reg.mark_notified(&b.rec.id);
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = Instant::now();
        assert!(unclaimed(again).await.unwrap().is_empty());
        assert!(unclaimed(subscribed).await.unwrap().is_empty());
        tokio::time::advance(minute).await;
        let later = Instant::now();
        assert_eq!(
            unclaimed(later).await.unwrap(),
            vec![b.rec.id.clone()],
            "once the interval is over, a new subscription may get it again"
        );
        // A tunnel opened and notified after the subscription reached the device.
        let (d, _) = reg.open(req()).await.unwrap();
        reg.mark_notified(&d.rec.id);
        tokio::time::advance(2 * minute).await;
        assert!(!unclaimed(again).await.unwrap().contains(&d.rec.id));
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let l = Limits::default();
        let mut r = req();
        r.services = vec!["SSH".into(), "SSH".into()];
        assert!(
            r.validate(&l)
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        r.services = vec![];
        assert!(
            r.validate(&l)
                .unwrap_err()
                .to_string()
                .contains("at least one")
        );
        r = req();
        r.lifetime_minutes = 721;
        assert!(r.validate(&l).unwrap_err().to_string().contains("1 to 720"));
        r = req();
        r.thing_name = "bad name".into();
        assert!(
            r.validate(&l)
                .unwrap_err()
                .to_string()
                .contains("thingName")
        );
    }

    #[test]
    fn stored_text_cannot_carry_terminal_escapes_or_bidi_overrides() {
        let l = Limits::default();
        for evil in [
            "a\0b",
            "line\r\nforged",
            "\u{1b}[2Jcleared",
            "admin\u{202E}txt.exe",
            "x\u{2066}y",
        ] {
            let mut r = req();
            r.tags.insert("site".into(), evil.into());
            assert!(r.validate(&l).is_err(), "tag value {evil:?} accepted");
            let mut r = req();
            r.tags.insert(evil.into(), "v".into());
            assert!(r.validate(&l).is_err(), "tag key {evil:?} accepted");
            let mut r = req();
            r.description = Some(evil.into());
            assert!(r.validate(&l).is_err(), "description {evil:?} accepted");
        }
        let mut r = req();
        r.description = Some("Kawasaki RS007N, cell 7 — Zürich".into());
        r.tags.insert("owner".into(), "équipe maintenance".into());
        assert!(r.validate(&l).is_ok());
    }
}
