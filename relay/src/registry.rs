//! The relay's tunnels: their records (persisted through [`Store`]), the token index, and the
//! live pairing of each tunnel's two peers.
//!
//! Locking: one registry mutex guards records and the token index (taken on API calls and
//! handshakes, never across an `.await`); each tunnel's [`Live`] has its own mutex for the data
//! path, so forwarding frames never touches the registry lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use culvert_protocol::{Mode, valid_name};
use tracing::{info, warn};

pub use crate::live::{Kick, KickReason, Live, NewPeer};
use crate::store::{CloseReason, SideRecord, Status, Store, StoreError, TunnelRecord};
use crate::tokens::{TokenHash, new_secret};

/// Rotated-away tokens remembered per side, to tell their holders why they are refused.
const ROTATED_KEPT: usize = 8;

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

/// Why a data-plane handshake is refused. All are 4xx: the client must not retry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("unknown access token: it was never issued by this relay or its tunnel was deleted")]
    UnknownToken,
    #[error("this is a {token} access token, but the request asked for local-proxy-mode={asked}")]
    WrongMode { token: Mode, asked: Mode },
    #[error(
        "this access token was already used; a reconnect must present the client-token it was first used with"
    )]
    NeedsClientToken,
    #[error(
        "this access token was already used without a client token, so it cannot be used again; rotate the tunnel's {0} token"
    )]
    Spent(Mode),
    #[error("the client-token does not match the one this access token was first used with")]
    ClientTokenMismatch,
    #[error("the client-token is already bound to another open tunnel; use a fresh one")]
    ClientTokenInUse,
    #[error("this access token was rotated; use the tunnel's new {0} token")]
    Rotated(Mode),
    #[error("tunnel {0} is closed")]
    Closed(String),
    #[error("tunnel {0} expired")]
    Expired(String),
}

impl Refusal {
    /// HTTP status: 410 for a tunnel that is gone, 400 for a malformed request, 403 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Closed(_) | Refusal::Expired(_) => 410,
            Refusal::WrongMode { .. } => 400,
            _ => 403,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownToken => "unknown_token",
            Refusal::WrongMode { .. } => "wrong_mode",
            Refusal::NeedsClientToken => "token_reused",
            Refusal::Spent(_) => "token_spent",
            Refusal::ClientTokenMismatch => "client_token_mismatch",
            Refusal::ClientTokenInUse => "client_token_in_use",
            Refusal::Rotated(_) => "token_rotated",
            Refusal::Closed(_) => "tunnel_closed",
            Refusal::Expired(_) => "tunnel_expired",
        }
    }
}

/// Characters that make stored text lie when a terminal or browser shows it: controls (NUL,
/// CR/LF, ESC sequences) and the bidirectional overrides and isolates ("Trojan Source").
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// A request to open a tunnel, validated.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    pub thing_name: String,
    pub services: Vec<String>,
    pub lifetime_minutes: u32,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl OpenRequest {
    pub const DEFAULT_LIFETIME_MINUTES: u32 = 720;

    pub fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::Invalid(m));
        if !valid_name(&self.thing_name) {
            return bad(format!(
                "thingName {:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -",
                self.thing_name
            ));
        }
        if self.services.is_empty() {
            return bad("services: give at least one service name, e.g. [\"SSH\"]".into());
        }
        if self.services.len() > limits.max_services {
            return bad(format!(
                "services: {} given, this relay allows at most {} per tunnel",
                self.services.len(),
                limits.max_services
            ));
        }
        for (i, s) in self.services.iter().enumerate() {
            if !valid_name(s) {
                return bad(format!(
                    "services[{i}] {s:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -"
                ));
            }
            if self.services[..i].contains(s) {
                return bad(format!("services[{i}] {s:?} is listed twice"));
            }
        }
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
        if self.tags.len() > 50 {
            return bad(format!(
                "{} tags given, at most 50 allowed",
                self.tags.len()
            ));
        }
        for (k, v) in &self.tags {
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

struct Entry {
    rec: TunnelRecord,
    live: Arc<Live>,
    /// When the destination token was last published to the device (in memory only: after a
    /// restart the embedded broker has lost what it held, so a tunnel counts as never sent).
    notified: Option<tokio::time::Instant>,
    /// When it was last re-announced ([`crate::reannounce`]).
    reannounced: Option<tokio::time::Instant>,
}

#[derive(Clone, Copy)]
struct TokenRef<'a> {
    tunnel: &'a str,
    mode: Mode,
    current: bool,
}

#[derive(Default)]
struct State {
    tunnels: HashMap<String, Entry>,
    /// Token hash → (tunnel id, mode, still current?).
    tokens: HashMap<TokenHash, (String, Mode, bool)>,
    /// Client token hash → tunnel id, for open tunnels (client tokens are unique among them).
    client_tokens: HashMap<TokenHash, String>,
}

impl State {
    fn index(&mut self, rec: &TunnelRecord) {
        for mode in [Mode::Source, Mode::Destination] {
            let side = side_of(rec, mode);
            self.tokens.insert(side.token, (rec.id.clone(), mode, true));
            for old in &side.rotated {
                self.tokens.insert(*old, (rec.id.clone(), mode, false));
            }
            if let (Some(ct), Status::Open) = (side.client_token, rec.status) {
                self.client_tokens.insert(ct, rec.id.clone());
            }
        }
    }

    fn unindex(&mut self, rec: &TunnelRecord) {
        for mode in [Mode::Source, Mode::Destination] {
            let side = side_of(rec, mode);
            self.tokens.remove(&side.token);
            for old in &side.rotated {
                self.tokens.remove(old);
            }
            if let Some(ct) = side.client_token {
                self.client_tokens.remove(&ct);
            }
        }
    }
}

fn side_of(rec: &TunnelRecord, mode: Mode) -> &SideRecord {
    match mode {
        Mode::Source => &rec.source,
        Mode::Destination => &rec.destination,
    }
}

fn side_of_mut(rec: &mut TunnelRecord, mode: Mode) -> &mut SideRecord {
    match mode {
        Mode::Source => &mut rec.source,
        Mode::Destination => &mut rec.destination,
    }
}

/// What a successful handshake gets.
pub struct Admission {
    pub live: Arc<Live>,
    pub mode: Mode,
    pub thing_name: String,
    /// The side's revocation generation when admitted (see [`Live::attach`]).
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
}

pub struct Registry {
    state: Mutex<State>,
    store: Arc<Store>,
    limits: Limits,
}

impl Registry {
    /// Load every stored tunnel. Open tunnels come back with both sides disconnected.
    pub fn load(store: Arc<Store>, limits: Limits) -> Result<Registry, StoreError> {
        let mut state = State::default();
        for rec in store.load_all()? {
            state.index(&rec);
            let live = Arc::new(Live::new(&rec));
            state.tunnels.insert(
                rec.id.clone(),
                Entry {
                    rec,
                    live,
                    notified: None,
                    reannounced: None,
                },
            );
        }
        let open = state
            .tunnels
            .values()
            .filter(|e| e.rec.status == Status::Open)
            .count();
        info!(tunnels = state.tunnels.len(), open, "tunnel store loaded");
        Ok(Registry {
            state: Mutex::new(state),
            store,
            limits,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self, req: OpenRequest) -> Result<(TunnelView, IssuedTokens), ApiError> {
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
        };
        self.store.put(&rec)?;
        let mut st = self.lock();
        st.index(&rec);
        let live = Arc::new(Live::new(&rec));
        info!(tunnel = %rec.id, thing = %rec.thing_name, services = ?rec.services, "tunnel opened");
        let view = view(&rec, &live);
        st.tunnels.insert(
            rec.id.clone(),
            Entry {
                rec,
                live,
                notified: None,
                reannounced: None,
            },
        );
        Ok((
            view,
            IssuedTokens {
                source: Some(src),
                destination: Some(dst),
            },
        ))
    }

    pub fn describe(&self, id: &str) -> Result<TunnelView, ApiError> {
        let st = self.lock();
        let e = st
            .tunnels
            .get(id)
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        Ok(view(&e.rec, &e.live))
    }

    /// Newest first; `after` is the (created_ms, id) of the last item of the previous page.
    pub fn list(
        &self,
        thing: Option<&str>,
        status: Option<Status>,
        after: Option<(i64, String)>,
        max: usize,
    ) -> (Vec<TunnelView>, Option<(i64, String)>) {
        let st = self.lock();
        let mut all: Vec<&Entry> = st
            .tunnels
            .values()
            .filter(|e| thing.is_none_or(|t| e.rec.thing_name == t))
            .filter(|e| status.is_none_or(|s| e.rec.status == s))
            .filter(|e| {
                after
                    .as_ref()
                    .is_none_or(|(c, id)| (e.rec.created_ms, &e.rec.id) < (*c, id))
            })
            .collect();
        all.sort_by(|a, b| (b.rec.created_ms, &b.rec.id).cmp(&(a.rec.created_ms, &a.rec.id)));
        let more = all.len() > max;
        let page: Vec<TunnelView> = all
            .iter()
            .take(max)
            .map(|e| view(&e.rec, &e.live))
            .collect();
        let next = more
            .then(|| page.last().map(|v| (v.rec.created_ms, v.rec.id.clone())))
            .flatten();
        (page, next)
    }

    /// Close a tunnel (idempotent), disconnecting both sides; optionally delete its record.
    pub fn close(&self, id: &str, delete: bool) -> Result<TunnelView, ApiError> {
        self.close_with(id, CloseReason::Closed, delete)
    }

    fn close_with(
        &self,
        id: &str,
        reason: CloseReason,
        delete: bool,
    ) -> Result<TunnelView, ApiError> {
        let mut st = self.lock();
        let st = &mut *st;
        let e = st
            .tunnels
            .get_mut(id)
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        if e.rec.status == Status::Open {
            let mut rec = e.rec.clone();
            rec.status = Status::Closed;
            rec.closed_ms = Some(now_ms());
            rec.close_reason = Some(reason);
            if !delete {
                self.store.put(&rec)?;
            }
            e.rec = rec;
            for mode in [Mode::Source, Mode::Destination] {
                if let Some(ct) = side_of(&e.rec, mode).client_token {
                    st.client_tokens.remove(&ct);
                }
            }
            let why = match reason {
                CloseReason::Closed => "tunnel closed",
                CloseReason::Expired => "tunnel expired",
            };
            e.live.revoke(Mode::Source, why);
            e.live.revoke(Mode::Destination, why);
            info!(tunnel = %id, reason = why, "tunnel closed");
        }
        let v = view(&e.rec, &e.live);
        if delete {
            self.store.remove(id)?;
            if let Some(e) = st.tunnels.remove(id) {
                st.unindex(&e.rec);
            }
            info!(tunnel = %id, "tunnel deleted");
        }
        Ok(v)
    }

    /// Issue new tokens; the old ones stop working and their peers are disconnected.
    pub fn rotate(&self, id: &str, which: RotateWhich) -> Result<IssuedTokens, ApiError> {
        let mut st = self.lock();
        let st = &mut *st;
        let e = st
            .tunnels
            .get(id)
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        if e.rec.status != Status::Open {
            return Err(ApiError::Conflict(format!(
                "tunnel {id} is closed; open a new tunnel instead"
            )));
        }
        let mut rec = e.rec.clone();
        let live = e.live.clone();
        let mut issued = IssuedTokens::default();
        let mut index_changes = Vec::new();
        let mut unbound = Vec::new();
        for mode in [Mode::Source, Mode::Destination] {
            if !which.includes(mode) {
                continue;
            }
            let secret = new_secret();
            let side = side_of_mut(&mut rec, mode);
            let old = side.token;
            side.rotated.push(old);
            if side.rotated.len() > ROTATED_KEPT {
                let gone = side.rotated.remove(0);
                index_changes.push((gone, None));
            }
            if let Some(ct) = side.client_token.take() {
                unbound.push(ct);
            }
            side.token = TokenHash::of(&secret);
            side.used = false;
            index_changes.push((old, Some((id.to_owned(), mode, false))));
            index_changes.push((side.token, Some((id.to_owned(), mode, true))));
            match mode {
                Mode::Source => issued.source = Some(secret),
                Mode::Destination => issued.destination = Some(secret),
            }
        }
        self.store.put(&rec)?;
        for ct in unbound {
            st.client_tokens.remove(&ct);
        }
        for (h, v) in index_changes {
            match v {
                Some(v) => st.tokens.insert(h, v),
                None => st.tokens.remove(&h),
            };
        }
        if let Some(e) = st.tunnels.get_mut(id) {
            e.rec = rec;
        }
        for mode in [Mode::Source, Mode::Destination] {
            if which.includes(mode) {
                live.revoke(mode, "access token rotated");
            }
        }
        info!(tunnel = %id, ?which, "tokens rotated");
        Ok(issued)
    }

    /// Check a data-plane handshake and consume the token as AWS defines single use.
    pub fn admit(
        &self,
        token: &str,
        mode: Mode,
        client_token: Option<&str>,
    ) -> Result<Admission, AdmitError> {
        let h = TokenHash::of(token);
        let mut st = self.lock();
        let st = &mut *st;
        let Some((tid, tmode, current)) = st.tokens.get(&h).cloned() else {
            return Err(Refusal::UnknownToken.into());
        };
        let r = TokenRef {
            tunnel: &tid,
            mode: tmode,
            current,
        };
        let e = st
            .tunnels
            .get_mut(r.tunnel)
            .ok_or(AdmitError::Refused(Refusal::UnknownToken))?;
        match e.rec.close_reason {
            Some(CloseReason::Expired) => return Err(Refusal::Expired(tid).into()),
            Some(CloseReason::Closed) => return Err(Refusal::Closed(tid).into()),
            None if e.rec.expires_ms <= now_ms() => return Err(Refusal::Expired(tid).into()),
            None => {}
        }
        if !r.current {
            return Err(Refusal::Rotated(r.mode).into());
        }
        if !side_of(&e.rec, r.mode).token.matches(&h) {
            return Err(Refusal::UnknownToken.into());
        }
        if r.mode != mode {
            return Err(Refusal::WrongMode {
                token: r.mode,
                asked: mode,
            }
            .into());
        }
        let ct = client_token.map(TokenHash::of);
        let side = side_of(&e.rec, mode);
        let first_use = !side.used;
        if side.used {
            match (side.client_token, ct) {
                (Some(bound), Some(ct)) if bound.matches(&ct) => {}
                (Some(_), Some(_)) => return Err(Refusal::ClientTokenMismatch.into()),
                (Some(_), None) => return Err(Refusal::NeedsClientToken.into()),
                (None, _) => return Err(Refusal::Spent(mode).into()),
            }
        } else {
            if let Some(ct) = ct
                && st.client_tokens.get(&ct).is_some_and(|t| *t != tid)
            {
                return Err(Refusal::ClientTokenInUse.into());
            }
            let mut rec = e.rec.clone();
            let side = side_of_mut(&mut rec, mode);
            side.used = true;
            side.client_token = ct;
            side.last_change_ms = now_ms();
            self.store.put(&rec)?;
            e.rec = rec;
            if let Some(ct) = ct {
                st.client_tokens.insert(ct, tid.clone());
            }
        }
        Ok(Admission {
            live: e.live.clone(),
            mode,
            thing_name: e.rec.thing_name.clone(),
            generation: e.live.generation(mode),
            first_use,
            token: h,
        })
    }

    /// Undo the first use of a token whose WebSocket upgrade failed after admission.
    pub fn release(&self, tunnel: &str, mode: Mode, token: TokenHash) -> Result<(), StoreError> {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(e) = st.tunnels.get_mut(tunnel) else {
            return Ok(());
        };
        let side = side_of(&e.rec, mode);
        if !side.used || !side.token.matches(&token) {
            return Ok(());
        }
        let mut rec = e.rec.clone();
        let side = side_of_mut(&mut rec, mode);
        side.used = false;
        let unbound = side.client_token.take();
        self.store.put(&rec)?;
        e.rec = rec;
        if let Some(ct) = unbound {
            st.client_tokens.remove(&ct);
        }
        Ok(())
    }

    /// The destination token of tunnel `id` was just published to its device.
    pub fn mark_notified(&self, id: &str) {
        if let Some(e) = self.lock().tunnels.get_mut(id) {
            e.notified = Some(tokio::time::Instant::now());
        }
    }

    /// Tunnel `id` is being re-announced now.
    pub fn mark_reannounced(&self, id: &str) {
        if let Some(e) = self.lock().tunnels.get_mut(id) {
            e.reannounced = Some(tokio::time::Instant::now());
        }
    }

    /// Open tunnels of `thing` that a device which subscribed at `subscribed_at` may have
    /// missed: the destination token is still unused, its last notification (if any) went out
    /// before that subscription, and it was not re-announced in the last `interval`. A tunnel
    /// notified while the device was subscribed reached it.
    pub fn unclaimed_destinations(
        &self,
        thing: &str,
        subscribed_at: tokio::time::Instant,
        interval: Duration,
    ) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let wall = now_ms();
        self.lock()
            .tunnels
            .values()
            .filter(|e| {
                e.rec.thing_name == thing
                    && e.rec.status == Status::Open
                    && e.rec.expires_ms > wall
                    && !e.rec.destination.used
                    && e.notified.is_none_or(|n| n < subscribed_at)
                    && e.reannounced
                        .is_none_or(|r| now.duration_since(r) >= interval)
            })
            .map(|e| e.rec.id.clone())
            .collect()
    }

    /// Close expired tunnels and forget closed ones past retention. Called periodically.
    pub fn sweep(&self) {
        let now = now_ms();
        let retention = self.limits.closed_retention.as_millis() as i64;
        let (expired, stale): (Vec<String>, Vec<String>) = {
            let st = self.lock();
            let expired = st
                .tunnels
                .values()
                .filter(|e| e.rec.status == Status::Open && e.rec.expires_ms <= now)
                .map(|e| e.rec.id.clone())
                .collect();
            let stale = st
                .tunnels
                .values()
                .filter(|e| e.rec.closed_ms.is_some_and(|c| c + retention <= now))
                .map(|e| e.rec.id.clone())
                .collect();
            (expired, stale)
        };
        for id in expired {
            if let Err(e) = self.close_with(&id, CloseReason::Expired, false) {
                warn!(tunnel = %id, error = %e, "could not expire tunnel");
            }
        }
        for id in stale {
            if let Err(e) = self.close_with(&id, CloseReason::Closed, true) {
                warn!(tunnel = %id, error = %e, "could not purge closed tunnel");
            }
        }
    }

    /// Open tunnels, and how many peers are connected to them.
    pub fn counts(&self) -> (usize, usize) {
        // Take the live halves out first: a tunnel's lock is never taken under the registry's.
        let open: Vec<Arc<Live>> = {
            let st = self.lock();
            st.tunnels
                .values()
                .filter(|e| e.rec.status == Status::Open)
                .map(|e| e.live.clone())
                .collect()
        };
        let peers = open
            .iter()
            .map(|l| {
                [Mode::Source, Mode::Destination]
                    .iter()
                    .filter(|m| l.state(**m).0)
                    .count()
            })
            .sum();
        (open.len(), peers)
    }

    /// Disconnect every peer (relay shutdown).
    pub fn kick_all(&self, reason: KickReason) {
        let st = self.lock();
        for e in st.tunnels.values() {
            e.live.kick(Mode::Source, reason.clone());
            e.live.kick(Mode::Destination, reason.clone());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn view(rec: &TunnelRecord, live: &Live) -> TunnelView {
    let (sc, sm) = live.state(Mode::Source);
    let (dc, dm) = live.state(Mode::Destination);
    TunnelView {
        rec: rec.clone(),
        source_connected: sc,
        source_changed_ms: sm,
        destination_connected: dc,
        destination_changed_ms: dm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn registry() -> (Registry, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "culvert-reg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(Store::open(&dir.join("t.redb")).unwrap());
        (Registry::load(store, Limits::default()).unwrap(), dir)
    }

    fn req() -> OpenRequest {
        OpenRequest {
            thing_name: "cell-7".into(),
            services: vec!["SSH".into()],
            lifetime_minutes: 720,
            description: None,
            tags: Default::default(),
        }
    }

    fn refusal(r: Result<Admission, AdmitError>) -> Refusal {
        match r {
            Err(AdmitError::Refused(r)) => r,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted"),
        }
    }

    #[test]
    fn single_use_and_client_tokens() {
        let (reg, dir) = registry();
        let (v, t) = reg.open(req()).unwrap();
        let src = t.source.unwrap();
        let dst = t.destination.unwrap();
        let ct = culvert_protocol::new_client_token();
        assert_eq!(
            refusal(reg.admit("nope", Mode::Source, None)),
            Refusal::UnknownToken
        );
        assert_eq!(
            refusal(reg.admit(&src, Mode::Destination, None)),
            Refusal::WrongMode {
                token: Mode::Source,
                asked: Mode::Destination
            }
        );
        reg.admit(&src, Mode::Source, Some(&ct)).unwrap();
        reg.admit(&src, Mode::Source, Some(&ct)).unwrap();
        assert_eq!(
            refusal(reg.admit(&src, Mode::Source, None)),
            Refusal::NeedsClientToken
        );
        let other = culvert_protocol::new_client_token();
        assert_eq!(
            refusal(reg.admit(&src, Mode::Source, Some(&other))),
            Refusal::ClientTokenMismatch
        );
        reg.admit(&dst, Mode::Destination, None).unwrap();
        assert_eq!(
            refusal(reg.admit(&dst, Mode::Destination, None)),
            Refusal::Spent(Mode::Destination)
        );
        // Rotation: old token refused with the reason, new one works.
        let new = reg.rotate(&v.rec.id, RotateWhich::Destination).unwrap();
        assert_eq!(
            refusal(reg.admit(&dst, Mode::Destination, None)),
            Refusal::Rotated(Mode::Destination)
        );
        reg.admit(new.destination.as_deref().unwrap(), Mode::Destination, None)
            .unwrap();
        // A client token cannot be bound to two open tunnels.
        let (_v2, t2) = reg.open(req()).unwrap();
        assert_eq!(
            refusal(reg.admit(t2.source.as_deref().unwrap(), Mode::Source, Some(&ct))),
            Refusal::ClientTokenInUse
        );
        reg.close(&v.rec.id, false).unwrap();
        assert_eq!(
            refusal(reg.admit(&src, Mode::Source, Some(&ct))),
            Refusal::Closed(v.rec.id.clone())
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn state_survives_reload() {
        let (reg, dir) = registry();
        let (v, t) = reg.open(req()).unwrap();
        let src = t.source.unwrap();
        let ct = culvert_protocol::new_client_token();
        reg.admit(&src, Mode::Source, Some(&ct)).unwrap();
        drop(reg);
        let store = Arc::new(Store::open(&dir.join("t.redb")).unwrap());
        let reg = Registry::load(store, Limits::default()).unwrap();
        assert_eq!(reg.describe(&v.rec.id).unwrap().rec.status, Status::Open);
        reg.admit(&src, Mode::Source, Some(&ct)).unwrap();
        assert_eq!(
            refusal(reg.admit(&src, Mode::Source, None)),
            Refusal::NeedsClientToken
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_revoked_admission_cannot_attach_and_a_failed_upgrade_releases_the_token() {
        let (reg, dir) = registry();
        let (v, t) = reg.open(req()).unwrap();
        let dst = t.destination.unwrap();
        let adm = reg.admit(&dst, Mode::Destination, None).unwrap();
        assert!(adm.first_use);
        // The upgrade failed: the token is usable again.
        reg.release(&v.rec.id, Mode::Destination, adm.token)
            .unwrap();
        let adm = reg.admit(&dst, Mode::Destination, None).unwrap();
        // A rotation lands between admission and attach: the attach is refused.
        reg.rotate(&v.rec.id, RotateWhich::Destination).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let new = NewPeer {
            tx,
            kick: Kick::default(),
            extensions: culvert_protocol::ext::Extensions::NONE,
        };
        assert_eq!(
            adm.live.attach(Mode::Destination, adm.generation, new),
            None
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unclaimed_destinations_are_the_open_never_used_ones_the_device_missed() {
        let minute = Duration::from_secs(60);
        let (reg, dir) = registry();
        let (a, ta) = reg.open(req()).unwrap();
        let (b, _tb) = reg.open(req()).unwrap();
        let (c, _tc) = reg.open(req()).unwrap();
        reg.admit(ta.destination.as_deref().unwrap(), Mode::Destination, None)
            .unwrap();
        reg.close(&c.rec.id, false).unwrap();
        let mut other = req();
        other.thing_name = "another-thing".into();
        reg.open(other).unwrap();
        reg.mark_notified(&b.rec.id);
        tokio::time::advance(Duration::from_millis(50)).await;
        let subscribed = tokio::time::Instant::now();
        assert_eq!(
            reg.unclaimed_destinations("cell-7", subscribed, minute),
            vec![b.rec.id.clone()],
            "notified before the device subscribed"
        );
        assert!(
            !reg.unclaimed_destinations("cell-7", subscribed, minute)
                .contains(&a.rec.id)
        );
        // Re-announced now: not again within the interval, whatever the device does.
        reg.mark_reannounced(&b.rec.id);
        reg.mark_notified(&b.rec.id);
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = tokio::time::Instant::now();
        assert!(
            reg.unclaimed_destinations("cell-7", again, minute)
                .is_empty()
        );
        assert!(
            reg.unclaimed_destinations("cell-7", subscribed, minute)
                .is_empty()
        );
        tokio::time::advance(minute).await;
        let later = tokio::time::Instant::now();
        assert_eq!(
            reg.unclaimed_destinations("cell-7", later, minute),
            vec![b.rec.id.clone()],
            "once the interval is over, a new subscription may get it again"
        );
        // A tunnel opened and notified after the subscription reached the device.
        let (d, _) = reg.open(req()).unwrap();
        reg.mark_notified(&d.rec.id);
        tokio::time::advance(2 * minute).await;
        assert!(
            !reg.unclaimed_destinations("cell-7", again, minute)
                .contains(&d.rec.id)
        );
        std::fs::remove_dir_all(dir).unwrap();
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
