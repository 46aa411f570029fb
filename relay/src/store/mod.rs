//! Persistent tunnel metadata, behind the [`Store`] trait: one record per tunnel, changed only by
//! the trait's atomic operations (create, admit a handshake, release, rotate, close, delete), so
//! a relay restart loses no open tunnel and no single-use token comes back to life, and a store
//! shared by several relays (PostgreSQL) can take the place of the embedded one without touching
//! the registry above it.
//!
//! - [`RedbStore`] (`tunnels.redb` in the state directory) is the embedded default.
//! - [`PostgresStore`] (`store = "postgres://…"`) is shared by several relays.
//! - [`MemoryStore`] keeps everything in memory (tests; a relay that may forget).
//!
//! What each operation decides is written once, in [`ops`], over the [`ops::Tables`] a store
//! provides inside one transaction; the conformance tests below hold every store to it.
//! Connection state (who is connected right now) is not stored: after a restart everyone is
//! disconnected until they reconnect.

mod memory;
pub(crate) mod ops;
mod postgres;
mod redb;

use std::collections::BTreeMap;

use async_trait::async_trait;
use culvert_protocol::Mode;
use serde::{Deserialize, Serialize};

pub use self::postgres::{Placed, Placement, PostgresStore};
pub use memory::MemoryStore;
pub use redb::RedbStore;

use crate::access::OperatorRecord;
use crate::tokens::TokenHash;

/// A device allowed on the embedded MQTT broker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub thing_name: String,
    pub password: TokenHash,
    pub created_ms: i64,
    /// Labels an admin gives it (`line=2`, `site=campus`): grants may name things by tag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Open,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Closed through the API.
    Closed,
    /// The lifetime ran out.
    Expired,
    /// The operator who opened it was disabled, or lost the grant that allowed it.
    AccessRevoked,
    /// The site refused it (culvertd's on-site approval).
    RefusedOnSite,
}

/// Where a tunnel stands with its site's on-site approval (culvertd `[consent]
/// approve_tunnels`), as the thing's gateway reported it. None: the site asks for none (or
/// its gateway is not culvertd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnSite {
    pub state: OnSiteState,
    pub at_ms: i64,
    /// Who decided, as the site names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why (a refusal's reason, or what the operator waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSiteState {
    /// Waiting for someone on site to approve it.
    Waiting,
    Approved,
    Refused,
}

/// Token state of one side (source or destination) of a tunnel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideRecord {
    pub token: TokenHash,
    /// Set on the first successful handshake that presented a client token.
    pub client_token: Option<TokenHash>,
    /// The token has completed a handshake (without a client token it is now spent).
    pub used: bool,
    /// Tokens rotated away (newest last), kept to tell their holders why they are refused.
    pub rotated: Vec<TokenHash>,
    /// Last time this side connected or disconnected (unix ms).
    pub last_change_ms: i64,
    /// Bumped whenever this side's token is revoked (rotation, close): a handshake admitted
    /// under an older generation may not attach ([`crate::live::Live::attach`]).
    #[serde(default)]
    pub generation: u64,
}

impl SideRecord {
    pub fn new(token: TokenHash, now_ms: i64) -> SideRecord {
        SideRecord {
            token,
            client_token: None,
            used: false,
            rotated: Vec::new(),
            last_change_ms: now_ms,
            generation: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunnelRecord {
    pub id: String,
    pub thing_name: String,
    pub services: Vec<String>,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
    pub lifetime_minutes: u32,
    pub expires_ms: i64,
    pub status: Status,
    pub closed_ms: Option<i64>,
    pub close_reason: Option<CloseReason>,
    pub source: SideRecord,
    pub destination: SideRecord,
    /// The operator who opened it (none: the bootstrap API key, or a relay before operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_by: Option<String>,
    /// The id of the API key it was opened with: revoking that key closes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_key: Option<String>,
    /// Why it was opened, as the operator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The site's approval, when the site asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_site: Option<OnSite>,
}

impl TunnelRecord {
    pub fn side(&self, mode: Mode) -> &SideRecord {
        match mode {
            Mode::Source => &self.source,
            Mode::Destination => &self.destination,
        }
    }

    pub fn side_mut(&mut self, mode: Mode) -> &mut SideRecord {
        match mode {
            Mode::Source => &mut self.source,
            Mode::Destination => &mut self.destination,
        }
    }
}

/// The store itself failed (disk, database, a corrupt record): not the caller's fault.
#[derive(Debug, thiserror::Error)]
#[error("tunnel store {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

/// Why a data-plane handshake is refused. All are 4xx: the client must not retry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("unknown access token: it was never issued by this relay or its tunnel was deleted")]
    UnknownToken,
    #[error("this is a {token} access token, but the request asked for local-proxy-mode={asked}")]
    WrongMode { token: Mode, asked: Mode },
    #[error(
        "this {mode} access token was already used; a reconnect must present the client-token it was first used with. For a new start, rotate it: culvert tunnel rotate {tunnel} --mode {mode}"
    )]
    NeedsClientToken { mode: Mode, tunnel: String },
    #[error(
        "this {mode} access token was already used without a client token, so it cannot be used again; rotate it: culvert tunnel rotate {tunnel} --mode {mode}"
    )]
    Spent { mode: Mode, tunnel: String },
    #[error(
        "this {mode} access token is taken: the client-token does not match the one it was first used with (each culvert connect makes its own unless --client-token is given, so a restarted one is refused too). Rotate it for a new start: culvert tunnel rotate {tunnel} --mode {mode}"
    )]
    ClientTokenMismatch { mode: Mode, tunnel: String },
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
            Refusal::NeedsClientToken { .. } => "token_reused",
            Refusal::Spent { .. } => "token_spent",
            Refusal::ClientTokenMismatch { .. } => "client_token_mismatch",
            Refusal::ClientTokenInUse => "client_token_in_use",
            Refusal::Rotated(_) => "token_rotated",
            Refusal::Closed(_) => "tunnel_closed",
            Refusal::Expired(_) => "tunnel_expired",
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

/// Why a change to one tunnel was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no tunnel with id {0:?}")]
    NotFound(String),
    #[error("tunnel {0} is closed; open a new tunnel instead")]
    Closed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A data-plane handshake to admit.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub token: TokenHash,
    pub mode: Mode,
    pub client_token: Option<TokenHash>,
    pub now_ms: i64,
}

/// An admitted handshake.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// The tunnel as it is after the admission.
    pub rec: TunnelRecord,
    /// This was the token's first use (it is now spent, or bound to the client token).
    pub first_use: bool,
}

/// New token hashes for a rotation: `None` leaves that side's token as it is.
#[derive(Clone, Debug, Default)]
pub struct NewTokens {
    pub source: Option<TokenHash>,
    pub destination: Option<TokenHash>,
    /// A new destination for the tunnel (AWS's `destinationConfig` of a rotation).
    pub retarget: Option<Retarget>,
}

/// A change to a tunnel's tags: these keys removed, then these set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagChange {
    pub remove: Vec<String>,
    pub set: BTreeMap<String, String>,
}

/// The thing a tunnel's destination is, and the services it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retarget {
    pub thing_name: String,
    pub services: Vec<String>,
}

impl NewTokens {
    pub fn get(&self, mode: Mode) -> Option<TokenHash> {
        match mode {
            Mode::Source => self.source,
            Mode::Destination => self.destination,
        }
    }
}

/// A close: the tunnel after it, and whether this call closed it (false: it already was).
#[derive(Clone, Debug)]
pub struct Closed {
    pub rec: TunnelRecord,
    pub changed: bool,
}

/// Which tunnels to list: newest first, `after` the (created_ms, id) of the previous page's
/// last item, at most `max`.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub thing: Option<String>,
    pub status: Option<Status>,
    pub after: Option<(i64, String)>,
    pub max: usize,
}

/// Tunnels the sweeper must act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Open, and past their expiry.
    pub expired: Vec<String>,
    /// Closed before the retention cut-off: to be deleted.
    pub purge: Vec<String>,
}

/// The relay's persistent state. Every method is one atomic operation: two relays (or two
/// handlers) calling it at once see one happen before the other.
#[async_trait]
pub trait Store: Send + Sync {
    /// Store a new tunnel (its id and token hashes are fresh).
    async fn create(&self, rec: &TunnelRecord) -> Result<(), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<TunnelRecord>, StoreError>;

    /// One page of tunnels (see [`ListQuery`]) and whether more follow.
    async fn list(&self, q: &ListQuery) -> Result<(Vec<TunnelRecord>, bool), StoreError>;

    /// Check a handshake's token and spend it as AWS defines single use ([`ops::admit`]).
    async fn admit(&self, h: &Handshake) -> Result<Admitted, AdmitError>;

    /// Undo the first use of `token` (its WebSocket upgrade failed after admission).
    async fn release(&self, id: &str, mode: Mode, token: TokenHash) -> Result<(), StoreError>;

    /// Replace the tokens `new` names; the old ones answer "rotated" from now on.
    async fn rotate(&self, id: &str, new: &NewTokens) -> Result<TunnelRecord, ChangeError>;

    /// Close tunnel `id` (idempotent).
    async fn close(
        &self,
        id: &str,
        reason: CloseReason,
        now_ms: i64,
    ) -> Result<Closed, ChangeError>;

    /// Change the tags of tunnel `id`, open or closed, in one step (two concurrent changes
    /// both land).
    async fn retag(&self, id: &str, change: &TagChange) -> Result<TunnelRecord, ChangeError>;

    /// Record the site's approval state of open tunnel `id`.
    async fn set_on_site(&self, id: &str, on_site: &OnSite) -> Result<TunnelRecord, ChangeError>;

    /// Forget tunnel `id` and its tokens. False if there was none.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;

    /// Open tunnels past expiry at `now_ms`, and closed ones closed before `purge_before_ms`.
    async fn due(&self, now_ms: i64, purge_before_ms: i64) -> Result<Due, StoreError>;

    /// Open, unexpired tunnels of `thing` whose destination token was never used.
    async fn unclaimed(&self, thing: &str, now_ms: i64) -> Result<Vec<String>, StoreError>;

    async fn count_open(&self) -> Result<usize, StoreError>;

    /// Create or replace a device.
    async fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError>;

    async fn remove_device(&self, thing: &str) -> Result<(), StoreError>;

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Create or replace an operator (with their keys and grants).
    async fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError>;

    /// Store `after` if the operator of its name is still `before` (`None`: there is none);
    /// false, changing nothing, if another writer got there first.
    async fn swap_operator(
        &self,
        before: Option<&OperatorRecord>,
        after: &OperatorRecord,
    ) -> Result<bool, StoreError>;

    async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError>;
}

/// Whether two operator records are the same (as stored: field by field, through JSON).
pub(crate) fn same_operator(a: Option<&OperatorRecord>, b: Option<&OperatorRecord>) -> bool {
    let json = |r: Option<&OperatorRecord>| r.map(|r| serde_json::to_value(r).ok());
    json(a) == json(b)
}

#[cfg(test)]
mod conformance;
