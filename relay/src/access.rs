//! Operators, their API keys and grants: who may reach which device and service, until when.
//!
//! - An **operator** has a role: `admin` (everything, including managing operators), `operator`
//!   (open, rotate and close tunnels within their grants) or `viewer` (see tunnels within their
//!   grants). A disabled operator's keys stop working and the tunnels they opened are closed.
//! - An **API key** is `ck-<id>.<secret>`: the id names the key (in lists, audit and
//!   revocation), the 256-bit secret is stored only as its SHA-256 (like access tokens: a
//!   high-entropy secret needs no slow hash) and compared in constant time. Keys are shown
//!   once, may expire, and can be revoked.
//! - A **grant** lets an operator reach things matching any of its patterns (`cell-7`,
//!   `cell-*`, `*`) on the services it lists (`*`: all), optionally only from `not_before` and
//!   until `not_after`. A grant that runs out closes the tunnels it allowed at the next sweep.
//! - The relay's configured `api_key` stays the **bootstrap admin** credential, so a relay
//!   configured before operators existed works unchanged.
//!
//! Every operator is kept in memory (keys are checked on every request, synchronously) and
//! written through to the [`Store`]. Changes are serialized by one lock on this relay and start
//! from the stored record; relays sharing a store read it again every 5 s ([`Access::reload`]).
//! Two relays changing one operator at the same instant can still overwrite each other: making
//! that one store step is the cluster issue's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::registry::is_unsafe_char;
use crate::store::{Store, StoreError};
use crate::tokens::{Secret, TokenHash, new_secret};

/// Milliseconds since the Unix epoch, from a clock tests can set.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a key is presented as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// `Authorization: Bearer ck-<id>.<secret>` on culvert's API.
    #[default]
    Api,
    /// An AWS access key pair (`CKIA<ID>` and a derived secret) signing requests to the AWS
    /// control API with SigV4 ([`crate::aws::keys`]).
    Aws,
}

impl KeyKind {
    fn is_api(&self) -> bool {
        *self == KeyKind::Api
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "KeyKind::is_api")]
    pub kind: KeyKind,
    pub hash: TokenHash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
    /// The key an operator used to create this one themself: revoking it revokes this too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    /// Thing names or patterns (`*` any run of characters, `?` one).
    pub things: Vec<String>,
    /// Service names; `*` for all.
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<i64>,
    pub created_by: String,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
}

impl Grant {
    fn in_force(&self, now: i64) -> bool {
        self.revoked_ms.is_none()
            && self.not_before_ms.is_none_or(|t| now >= t)
            && self.not_after_ms.is_none_or(|t| now < t)
    }

    /// Does a pattern name `thing`: by name (a glob), or `tag:KEY=VALUE` (VALUE a glob) by
    /// one of its device tags?
    fn covers_thing(&self, thing: &str, tags: &BTreeMap<String, String>) -> bool {
        self.things.iter().any(|p| match tag_pattern(p) {
            Some((key, value)) => tags.get(key).is_some_and(|v| glob(value, v)),
            None => glob(p, thing),
        })
    }

    fn covers_service(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == "*" || s == service)
    }

    /// `cell-7: SSH, HTTP (until 2026-12-02T18:00:00Z)`.
    fn describe(&self) -> String {
        let mut s = format!("{}: {}", self.things.join(","), self.services.join(","));
        if let Some(t) = self.not_before_ms {
            s += &format!(" from {}", crate::api::rfc3339(t));
        }
        if let Some(t) = self.not_after_ms {
            s += &format!(" until {}", crate::api::rfc3339(t));
        }
        s
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_ms: Option<i64>,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Access this operator asked for.
    #[serde(default)]
    pub requests: Vec<AccessRequest>,
    /// Their password for `culvert login --user` and the console: an argon2id PHC string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// Password lengths accepted, in characters.
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 12..=256;
/// How long the key a password login issues lives.
pub const LOGIN_KEY_LIFE_MS: i64 = 12 * 3_600_000;
/// Failed logins one source address may make in [`LOGIN_WINDOW_MS`].
pub const LOGIN_FAILURES: u32 = 10;
pub const LOGIN_WINDOW_MS: i64 = 15 * 60_000;
/// Source addresses whose failures are remembered (the oldest windows go first).
const LOGIN_SOURCES: usize = 10_000;
/// Password verifications running at once: each takes argon2's 19 MiB and tens of ms of CPU,
/// so a flood of logins costs a bounded share of the relay, and the rest are told to retry.
const VERIFYING: usize = 2;

/// argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's minimum), a random
/// 16-byte salt.
fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    let salt: [u8; 16] = rand::random();
    let salt = argon2::password_hash::SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify_password(phc: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    argon2::password_hash::PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Why a password login was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    TooMany(String),
    #[error("the relay is checking other logins; try again in a moment")]
    Busy,
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// An operator's request for access they have no standing grant for: one thing, some
/// services, a window, and why. An admin approves it (a grant for that window only) or
/// refuses it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub thing: String,
    pub services: Vec<String>,
    /// The window starts here (none: when it is approved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    pub duration_minutes: u32,
    pub reason: String,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decision {
    pub approved: bool,
    pub by: String,
    pub at_ms: i64,
    /// The grant an approval made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The longest window a request may ask for: a week.
pub const MAX_REQUEST_MINUTES: u32 = 7 * 24 * 60;

/// The bootstrap key's name in the audit trail (reserved: no operator may have it).
pub const BOOTSTRAP: &str = "bootstrap-admin";

/// A change to an operator that keeps meeting other relays' changes is given up after this
/// many tries.
const CHANGE_TRIES: usize = 20;

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The relay's configured `api_key`: an admin with no name of its own.
    Bootstrap,
    Operator {
        name: String,
        role: Role,
        key: String,
    },
}

impl Principal {
    pub fn role(&self) -> Role {
        match self {
            Principal::Bootstrap => Role::Admin,
            Principal::Operator { role, .. } => *role,
        }
    }

    /// The operator's name; none for the bootstrap key.
    pub fn operator(&self) -> Option<&str> {
        match self {
            Principal::Bootstrap => None,
            Principal::Operator { name, .. } => Some(name),
        }
    }

    /// For the audit trail and messages.
    pub fn label(&self) -> &str {
        self.operator().unwrap_or(BOOTSTRAP)
    }

    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::Bootstrap => None,
            Principal::Operator { key, .. } => Some(key),
        }
    }
}

/// A request refused for who sent it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// 401: no credential, or one that is unknown, revoked, expired or of a disabled operator.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: a known operator without the role or grant.
    #[error("{0}")]
    Forbidden(String),
}

/// Why a change to operators was not made.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `*` matches any run of characters, `?` one; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // The classic two-pointer wildcard match: linear, no backtracking blow-up.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `tag:KEY=VALUE` → (KEY, VALUE). A thing name has no `=`, so no name is taken for one.
fn tag_pattern(p: &str) -> Option<(&str, &str)> {
    p.strip_prefix("tag:")?.split_once('=')
}

/// A grant's thing pattern: a name glob, or `tag:KEY=VALUE` with a tag name and a value glob
/// (`tag:` always starts a tag: a `tag:x` without `=` is refused, not taken for a name).
fn valid_thing_pattern(p: &str) -> bool {
    match tag_pattern(p) {
        Some((key, value)) => culvert_protocol::valid_name(key) && valid_pattern(value),
        None => !p.starts_with("tag:") && valid_pattern(p),
    }
}

fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 128
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '*' | '?'))
}

/// `ck-<12 hex>.<secret>` → (id, secret).
fn split_key(presented: &str) -> Option<(&str, &str)> {
    let (id, secret) = presented.strip_prefix("ck-")?.split_once('.')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty())
        .then_some((id, secret))
}

fn new_id() -> String {
    TokenHash::of(&new_secret()).to_hex()[..12].to_owned()
}

pub struct Access {
    store: Arc<dyn Store>,
    /// The registered devices, for grants that name things by tag.
    devices: Arc<crate::devices::Devices>,
    operators: Mutex<BTreeMap<String, OperatorRecord>>,
    bootstrap: Secret,
    clock: Clock,
    /// Opening a tunnel needs a reason.
    pub require_reason: bool,
    /// Keys (and the bootstrap key, as "") used since this relay started.
    used: Mutex<std::collections::HashSet<String>>,
    /// Serializes changes (see [`Access::change`]).
    writes: tokio::sync::Mutex<()>,
    /// Failed password logins per source address: (window start, failures).
    failures: Mutex<std::collections::HashMap<std::net::IpAddr, (i64, u32)>>,
    verifying: tokio::sync::Semaphore,
    /// Where the secrets of AWS access key pairs come from; none: no AWS keys.
    aws: Option<Arc<crate::aws::keys::AwsKeys>>,
}

/// A key handed out once.
pub struct IssuedKey {
    pub id: String,
    pub secret: String,
    pub expires_ms: Option<i64>,
}

impl Access {
    pub async fn load(
        store: Arc<dyn Store>,
        devices: Arc<crate::devices::Devices>,
        bootstrap: Secret,
        clock: Clock,
        require_reason: bool,
    ) -> Result<Access, StoreError> {
        let operators = store
            .operators()
            .await?
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        Ok(Access {
            store,
            devices,
            operators: Mutex::new(operators),
            bootstrap,
            clock,
            require_reason,
            used: Mutex::new(Default::default()),
            writes: tokio::sync::Mutex::new(()),
            failures: Mutex::new(Default::default()),
            verifying: tokio::sync::Semaphore::new(VERIFYING),
            aws: None,
        })
    }

    /// Take the store's operators as they are now: another relay sharing the store may have
    /// changed them (a key, a grant, a disabled operator). Serialized with this relay's own
    /// changes, so it never undoes one.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.writes.lock().await;
        let fresh = self
            .store
            .operators()
            .await?
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        *self.lock() = fresh;
        Ok(())
    }

    /// Let operators have AWS access key pairs, their secrets derived from `keys`.
    pub fn with_aws_keys(mut self, keys: Arc<crate::aws::keys::AwsKeys>) -> Access {
        self.aws = Some(keys);
        self
    }

    /// The dev relay's bootstrap AWS pair (access key id, secret), if there is one.
    pub fn aws_bootstrap(&self) -> Option<(String, String)> {
        let (id, secret) = self.aws.as_ref()?.bootstrap()?;
        Some((id.to_owned(), secret.to_owned()))
    }

    /// True the first time `p`'s key is used in this run (for the audit trail).
    pub fn first_use_this_run(&self, p: &Principal) -> bool {
        let key = p.key_id().unwrap_or("").to_owned();
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key)
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OperatorRecord>> {
        self.operators.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The admins, named in refusals so the operator knows whom to ask.
    fn admins(&self) -> String {
        let names: Vec<String> = self
            .lock()
            .values()
            .filter(|o| o.role == Role::Admin && o.disabled_ms.is_none())
            .map(|o| o.name.clone())
            .collect();
        if names.is_empty() {
            "the holder of the relay's bootstrap api_key".to_owned()
        } else {
            format!("an admin ({})", names.join(", "))
        }
    }

    /// Who presents `presented` (the bearer credential), in constant time for the secret.
    pub fn authenticate(&self, presented: &str) -> Result<Principal, Denied> {
        if self.bootstrap.matches(presented) {
            return Ok(Principal::Bootstrap);
        }
        let refused = || {
            Denied::Unauthenticated(
                "API key not accepted: check the key (culvert login), or ask an admin for a new one"
                    .into(),
            )
        };
        let Some((id, secret)) = split_key(presented) else {
            return Err(refused());
        };
        let hash = TokenHash::of(secret);
        let Some((name, role, disabled, key)) = self.key_record(id, KeyKind::Api) else {
            return Err(refused());
        };
        if !key.hash.matches(&hash) {
            return Err(refused());
        }
        self.key_in_force(&name, disabled, &key)?;
        Ok(Principal::Operator {
            name,
            role,
            key: id.to_owned(),
        })
    }

    /// The operator holding key `id` of `kind`: name, role, disabled, the key.
    fn key_record(&self, id: &str, kind: KeyKind) -> Option<(String, Role, bool, KeyRecord)> {
        self.lock().values().find_map(|o| {
            let k = o.keys.iter().find(|k| k.id == id && k.kind == kind)?;
            Some((o.name.clone(), o.role, o.disabled_ms.is_some(), k.clone()))
        })
    }

    /// Refuse a key that is revoked, expired or of a disabled operator, saying which.
    fn key_in_force(&self, name: &str, disabled: bool, key: &KeyRecord) -> Result<(), Denied> {
        let now = self.now();
        let id = match key.kind {
            KeyKind::Api => format!("API key {}", key.id),
            KeyKind::Aws => format!(
                "AWS access key {}",
                crate::aws::keys::access_key_id(&key.id)
            ),
        };
        if disabled {
            return Err(Denied::Unauthenticated(format!(
                "operator {name} is disabled; {} can enable them again",
                self.admins()
            )));
        }
        if key.revoked_ms.is_some() {
            return Err(Denied::Unauthenticated(format!(
                "{id} of {name} was revoked; create a new one (culvert operator key create)"
            )));
        }
        if key.expires_ms.is_some_and(|t| now >= t) {
            return Err(Denied::Unauthenticated(format!(
                "{id} of {name} expired at {}; create a new one (culvert operator key create)",
                crate::api::rfc3339(key.expires_ms.unwrap_or_default())
            )));
        }
        Ok(())
    }

    /// Who holds AWS access key `access_key_id`, and its secret (to check their signature
    /// with). `Ok(None)`: no such key, as AWS's "The security token included in the request is
    /// invalid".
    pub fn aws_secret(&self, access_key_id: &str) -> Result<Option<(Principal, String)>, Denied> {
        let Some(aws) = &self.aws else {
            return Ok(None);
        };
        if let Some((id, secret)) = aws.bootstrap()
            && id == access_key_id
        {
            return Ok(Some((Principal::Bootstrap, secret.to_owned())));
        }
        let Some(id) = crate::aws::keys::record_id(access_key_id) else {
            return Ok(None);
        };
        let Some((name, role, disabled, key)) = self.key_record(&id, KeyKind::Aws) else {
            return Ok(None);
        };
        self.key_in_force(&name, disabled, &key)?;
        Ok(Some((
            Principal::Operator {
                name,
                role,
                key: id,
            },
            aws.secret(access_key_id),
        )))
    }

    /// Refuse unless `p` has at least `role`.
    pub fn require(&self, p: &Principal, role: Role, action: &str) -> Result<(), Denied> {
        if p.role() >= role {
            return Ok(());
        }
        Err(Denied::Forbidden(format!(
            "{} is {} {}; {action} needs the {} role, which {} can give",
            p.label(),
            if p.role() == Role::Viewer { "a" } else { "an" },
            p.role().as_str(),
            role.as_str(),
            self.admins()
        )))
    }

    /// The grants of `p` in force now (none for the bootstrap admin, who needs none).
    fn grants_in_force(&self, name: &str) -> Vec<Grant> {
        let now = self.now();
        self.lock()
            .get(name)
            .map(|o| {
                o.grants
                    .iter()
                    .filter(|g| g.in_force(now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// May `p` reach every one of `services` on `thing` now? Admins may reach everything.
    pub fn may_reach(&self, p: &Principal, thing: &str, services: &[String]) -> Result<(), Denied> {
        let Some(name) = p.operator() else {
            return Ok(());
        };
        if p.role() == Role::Admin {
            return Ok(());
        }
        let grants = self.grants_in_force(name);
        let tags = self.devices.tags(thing);
        let missing: Vec<&str> = services
            .iter()
            .filter(|s| {
                !grants
                    .iter()
                    .any(|g| g.covers_thing(thing, &tags) && g.covers_service(s))
            })
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let have = if grants.is_empty() {
            "none in force".to_owned()
        } else {
            grants
                .iter()
                .map(Grant::describe)
                .collect::<Vec<_>>()
                .join("; ")
        };
        Err(Denied::Forbidden(format!(
            "{name} has no grant for {thing}/{} (their grants: {have}). {} can grant it: \
             culvert operator grant add {name} --thing {thing} --service {}; or ask for it: \
             culvert access request --thing {thing} --service {} --for MINUTES --reason WHY",
            missing.join(","),
            capitalize(&self.admins()),
            missing.join(","),
            missing.join(",")
        )))
    }

    /// May `p` see tunnels to `thing` (any grant naming it, for any service)?
    pub fn may_see(&self, p: &Principal, thing: &str) -> bool {
        match p.operator() {
            None => true,
            Some(_) if p.role() == Role::Admin => true,
            Some(name) => {
                let tags = self.devices.tags(thing);
                self.grants_in_force(name)
                    .iter()
                    .any(|g| g.covers_thing(thing, &tags))
            }
        }
    }

    /// Is a tunnel that `opened_by` opened with key `key` to `thing` for `services` still
    /// allowed now? Not if the operator was disabled, the key revoked, or no grant covers it.
    pub fn still_allowed(
        &self,
        opened_by: &str,
        key: Option<&str>,
        thing: &str,
        services: &[String],
    ) -> bool {
        let (role, disabled, key_revoked) = match self.lock().get(opened_by) {
            Some(o) => (
                o.role,
                o.disabled_ms.is_some(),
                key.is_some_and(|id| o.keys.iter().any(|k| k.id == id && k.revoked_ms.is_some())),
            ),
            // An operator this relay does not know (a restored store): leave it be.
            None => return true,
        };
        if disabled || key_revoked {
            return false;
        }
        let p = Principal::Operator {
            name: opened_by.to_owned(),
            role,
            key: String::new(),
        };
        self.may_reach(&p, thing, services).is_ok()
    }

    /// Close the open tunnels whose opener may no longer reach them: every operator's, or
    /// only `only`'s (after a change to them). The closed ones.
    pub async fn close_revoked(
        &self,
        registry: &crate::registry::Registry,
        only: Option<&str>,
    ) -> Result<Vec<String>, crate::registry::ApiError> {
        registry
            .close_unallowed(|by, rec| {
                only.is_some_and(|n| n != by)
                    || self.still_allowed(
                        by,
                        rec.opened_key.as_deref(),
                        &rec.thing_name,
                        &rec.services,
                    )
            })
            .await
    }

    pub fn list(&self) -> Vec<OperatorRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<OperatorRecord> {
        self.lock().get(name).cloned()
    }

    /// Change operator `name` by `f` and write it through: store first, then memory. Changes
    /// on this relay are serialized by `writes` (held across the store's write; they are
    /// rare), so memory never runs ahead of the store. The write is a compare-and-swap
    /// against the record `f` started from: if another relay sharing the store changed it in
    /// between, `f` runs again on the new one, so no change is lost.
    async fn change<T>(
        &self,
        name: &str,
        f: impl Fn(&mut OperatorRecord, i64) -> Result<T, AccessError>,
    ) -> Result<(OperatorRecord, T), AccessError> {
        let _one_at_a_time = self.writes.lock().await;
        for _ in 0..CHANGE_TRIES {
            let now = self.now();
            // The stored record, not the one in memory: another relay sharing the store may
            // have changed it since this one last read it.
            let stored = self
                .store
                .operators()
                .await?
                .into_iter()
                .find(|o| o.name == name);
            let mut after = stored
                .clone()
                .or_else(|| self.lock().get(name).cloned())
                .ok_or_else(|| AccessError::NotFound(format!("no operator {name:?}")))?;
            let out = f(&mut after, now)?;
            if self.store.swap_operator(stored.as_ref(), &after).await? {
                self.lock().insert(name.to_owned(), after.clone());
                return Ok((after, out));
            }
        }
        Err(AccessError::Conflict(format!(
            "operator {name:?} kept changing through other relays; try again"
        )))
    }

    pub async fn add_operator(
        &self,
        name: &str,
        role: Role,
        by: &Principal,
    ) -> Result<(OperatorRecord, IssuedKey), AccessError> {
        if !culvert_protocol::valid_name(name) {
            return Err(AccessError::Invalid(format!(
                "operator name {name:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -"
            )));
        }
        if name == BOOTSTRAP {
            return Err(AccessError::Invalid(format!(
                "{BOOTSTRAP} names the relay's bootstrap key in the audit trail; choose another name"
            )));
        }
        let writes = self.writes.lock().await;
        let now = self.now();
        let rec = OperatorRecord {
            name: name.to_owned(),
            role,
            created_ms: now,
            created_by: by.label().to_owned(),
            disabled_ms: None,
            keys: Vec::new(),
            grants: Vec::new(),
            requests: Vec::new(),
            password: None,
        };
        {
            let mut ops = self.lock();
            if ops.contains_key(name) {
                return Err(AccessError::Conflict(format!(
                    "operator {name} exists; give them a key with culvert operator key create {name}"
                )));
            }
            ops.insert(name.to_owned(), rec.clone());
        }
        // Only if no relay sharing the store made one of that name meanwhile.
        match self.store.swap_operator(None, &rec).await {
            Ok(true) => {}
            Ok(false) => {
                self.lock().remove(name);
                return Err(AccessError::Conflict(format!(
                    "operator {name} exists (made through another relay); give them a key with culvert operator key create {name}"
                )));
            }
            Err(e) => {
                self.lock().remove(name);
                return Err(e.into());
            }
        }
        drop(writes);
        let (rec, key) = self
            .create_key(name, Some("first key".into()), None, by)
            .await?;
        Ok((rec, key))
    }

    /// A new key for `name`, created by `by`. An operator creating one of their own gets one
    /// that lives no longer than the key they used, and dies with it: a key cannot outlive
    /// its revocation or expiry by minting successors.
    pub async fn create_key(
        &self,
        name: &str,
        label: Option<String>,
        expires_ms: Option<i64>,
        by: &Principal,
    ) -> Result<(OperatorRecord, IssuedKey), AccessError> {
        self.create_key_of(KeyKind::Api, name, label, expires_ms, by)
            .await
    }

    /// [`Access::create_key`] for a key of `kind`: an AWS pair's [`IssuedKey::secret`] is its
    /// secret access key (its access key id is [`crate::aws::keys::access_key_id`] of the id).
    pub async fn create_key_of(
        &self,
        kind: KeyKind,
        name: &str,
        label: Option<String>,
        expires_ms: Option<i64>,
        by: &Principal,
    ) -> Result<(OperatorRecord, IssuedKey), AccessError> {
        let aws = match (kind, &self.aws) {
            (KeyKind::Aws, None) => {
                return Err(AccessError::Invalid(
                    "this relay has no AWS key file, so it cannot issue AWS access keys".into(),
                ));
            }
            (KeyKind::Aws, Some(a)) => Some(a.clone()),
            (KeyKind::Api, _) => None,
        };
        let parent = (by.operator() == Some(name) && by.role() != Role::Admin)
            .then(|| by.key_id().map(str::to_owned))
            .flatten();
        if let Some(l) = &label
            && (l.is_empty() || l.chars().count() > 128 || l.chars().any(is_unsafe_char))
        {
            return Err(AccessError::Invalid(
                "label must be 1-128 characters without control characters".into(),
            ));
        }
        let id = new_id();
        let secret = match &aws {
            Some(a) => a.secret(&crate::aws::keys::access_key_id(&id)),
            None => new_secret(),
        };
        let hash = TokenHash::of(&secret);
        let kid = id.clone();
        let (rec, expires_ms) = self
            .change(name, move |o, now| {
                if expires_ms.is_some_and(|t| t <= now) {
                    return Err(AccessError::Invalid("the expiry is in the past".into()));
                }
                let cap = parent
                    .as_ref()
                    .and_then(|p| o.keys.iter().find(|k| &k.id == p))
                    .and_then(|k| k.expires_ms);
                let expires_ms = match (expires_ms, cap) {
                    (Some(e), Some(c)) => Some(e.min(c)),
                    (e, c) => e.or(c),
                };
                o.keys.push(KeyRecord {
                    id: kid.clone(),
                    kind,
                    hash,
                    label: label.clone(),
                    created_ms: now,
                    expires_ms,
                    revoked_ms: None,
                    parent: parent.clone(),
                });
                Ok(expires_ms)
            })
            .await?;
        Ok((
            rec,
            IssuedKey {
                secret: match kind {
                    KeyKind::Api => format!("ck-{id}.{secret}"),
                    KeyKind::Aws => secret,
                },
                id,
                expires_ms,
            },
        ))
    }

    /// Set `name`'s password (replacing any): stored as an argon2id hash only.
    pub async fn set_password(
        &self,
        name: &str,
        password: String,
    ) -> Result<OperatorRecord, AccessError> {
        let chars = password.chars().count();
        if !PASSWORD_CHARS.contains(&chars) || password.chars().any(char::is_control) {
            return Err(AccessError::Invalid(format!(
                "a password has {}-{} characters and no control characters",
                PASSWORD_CHARS.start(),
                PASSWORD_CHARS.end()
            )));
        }
        if self.get(name).is_none() {
            return Err(AccessError::NotFound(format!("no operator {name:?}")));
        }
        let phc = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| AccessError::Invalid(format!("cannot hash the password: {e}")))?;
        let (rec, ()) = self
            .change(name, move |o, _| {
                o.password = Some(phc.clone());
                Ok(())
            })
            .await?;
        Ok(rec)
    }

    /// A password login from `from`: a new key for `name` that lives [`LOGIN_KEY_LIFE_MS`].
    /// Unknown names, operators without a password and wrong passwords get the same answer
    /// after the same work; a source with [`LOGIN_FAILURES`] failures in [`LOGIN_WINDOW_MS`]
    /// is refused until its window ends.
    pub async fn login(
        &self,
        name: &str,
        password: String,
        from: std::net::IpAddr,
    ) -> Result<(OperatorRecord, IssuedKey), LoginError> {
        let now = self.now();
        if let Some((start, n)) = self.failures_lock().get(&from).copied()
            && n >= LOGIN_FAILURES
            && now < start + LOGIN_WINDOW_MS
        {
            let minutes = (start + LOGIN_WINDOW_MS - now + 59_999) / 60_000;
            return Err(LoginError::TooMany(format!(
                "{LOGIN_FAILURES} failed logins from {from}; try again in {minutes} min"
            )));
        }
        let Ok(_permit) = self.verifying.try_acquire() else {
            return Err(LoginError::Busy);
        };
        let rec = self.get(name);
        let phc = rec.as_ref().and_then(|o| o.password.clone());
        let ok = tokio::task::spawn_blocking(move || match phc {
            Some(phc) => verify_password(&phc, &password),
            None => {
                // The same work as a real check, so timing does not tell which names exist.
                static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                let dummy = DUMMY.get_or_init(|| hash_password(&new_secret()).unwrap_or_default());
                verify_password(dummy, &password);
                false
            }
        })
        .await
        .unwrap_or(false);
        let refused = || LoginError::Refused("name or password not accepted".into());
        let Some(rec) = rec.filter(|_| ok) else {
            let mut failures = self.failures_lock();
            if failures.len() >= LOGIN_SOURCES && !failures.contains_key(&from) {
                failures.retain(|_, (start, _)| now < *start + LOGIN_WINDOW_MS);
                if failures.len() >= LOGIN_SOURCES
                    && let Some(oldest) = failures
                        .iter()
                        .min_by_key(|(_, (s, _))| *s)
                        .map(|(ip, _)| *ip)
                {
                    failures.remove(&oldest);
                }
            }
            let entry = failures.entry(from).or_insert((now, 0));
            if now >= entry.0 + LOGIN_WINDOW_MS {
                *entry = (now, 0);
            }
            entry.1 += 1;
            return Err(refused());
        };
        if rec.disabled_ms.is_some() {
            return Err(LoginError::Refused(format!(
                "operator {name} is disabled; {} can enable them again",
                self.admins()
            )));
        }
        self.failures_lock().remove(&from);
        Ok(self
            .create_key(
                name,
                Some("login".into()),
                Some(now + LOGIN_KEY_LIFE_MS),
                // Issued by the relay for the login: a key of its own, not made with another.
                &Principal::Bootstrap,
            )
            .await?)
    }

    fn failures_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, (i64, u32)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn revoke_key(&self, name: &str, id: &str) -> Result<OperatorRecord, AccessError> {
        // An AWS pair may be named by its access key id too.
        let id = crate::aws::keys::record_id(id).unwrap_or_else(|| id.to_owned());
        let id = id.as_str();
        let (rec, ()) = self
            .change(name, |o, now| {
                if !o.keys.iter().any(|k| k.id == id) {
                    return Err(AccessError::NotFound(format!("{name} has no key {id}")));
                }
                // The key, and every key made with it (and with those).
                let mut gone = vec![id.to_owned()];
                while let Some(k) = o.keys.iter_mut().find(|k| {
                    k.revoked_ms.is_none()
                        && (gone.contains(&k.id)
                            || k.parent.as_ref().is_some_and(|p| gone.contains(p)))
                }) {
                    k.revoked_ms = Some(now);
                    gone.push(k.id.clone());
                }
                Ok(())
            })
            .await?;
        Ok(rec)
    }

    pub async fn set_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<OperatorRecord, AccessError> {
        let (rec, ()) = self
            .change(name, |o, now| {
                o.disabled_ms = if disabled {
                    Some(o.disabled_ms.unwrap_or(now))
                } else {
                    None
                };
                Ok(())
            })
            .await?;
        Ok(rec)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn add_grant(
        &self,
        name: &str,
        things: Vec<String>,
        services: Vec<String>,
        not_before_ms: Option<i64>,
        not_after_ms: Option<i64>,
        by: &Principal,
    ) -> Result<(OperatorRecord, Grant), AccessError> {
        if things.is_empty() || things.len() > 64 || !things.iter().all(|t| valid_thing_pattern(t))
        {
            return Err(AccessError::Invalid(
                "things: 1-64 names or patterns of A-Z a-z 0-9 : _ - with * and ?, or \
                 tag:KEY=VALUE (a device tag; the value may be a pattern)"
                    .into(),
            ));
        }
        if services.is_empty()
            || services.len() > 64
            || !services
                .iter()
                .all(|s| s == "*" || culvert_protocol::valid_name(s))
        {
            return Err(AccessError::Invalid(
                "services: 1-64 service names, or \"*\" for all".into(),
            ));
        }
        if let (Some(a), Some(b)) = (not_before_ms, not_after_ms)
            && a >= b
        {
            return Err(AccessError::Invalid(
                "notBefore must be earlier than notAfter".into(),
            ));
        }
        let g = Grant {
            id: new_id(),
            things,
            services,
            not_before_ms,
            not_after_ms,
            created_by: by.label().to_owned(),
            created_ms: self.now(),
            revoked_ms: None,
        };
        let grant = g.clone();
        let (rec, ()) = self
            .change(name, move |o, _| {
                o.grants.push(g.clone());
                Ok(())
            })
            .await?;
        Ok((rec, grant))
    }

    pub async fn revoke_grant(&self, name: &str, id: &str) -> Result<OperatorRecord, AccessError> {
        let (rec, ()) = self
            .change(name, |o, now| {
                let g =
                    o.grants.iter_mut().find(|g| g.id == id).ok_or_else(|| {
                        AccessError::NotFound(format!("{name} has no grant {id}"))
                    })?;
                g.revoked_ms.get_or_insert(now);
                Ok(())
            })
            .await?;
        Ok(rec)
    }
}

impl Access {
    /// File a request for access by operator `name`.
    pub async fn request(
        &self,
        name: &str,
        thing: &str,
        services: Vec<String>,
        not_before_ms: Option<i64>,
        duration_minutes: u32,
        reason: String,
    ) -> Result<AccessRequest, AccessError> {
        if !culvert_protocol::valid_name(thing) {
            return Err(AccessError::Invalid(format!(
                "thingName {thing:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -"
            )));
        }
        if services.is_empty()
            || services.len() > 64
            || !services.iter().all(|s| culvert_protocol::valid_name(s))
        {
            return Err(AccessError::Invalid("services: 1-64 service names".into()));
        }
        if !(1..=MAX_REQUEST_MINUTES).contains(&duration_minutes) {
            return Err(AccessError::Invalid(format!(
                "durationMinutes must be 1-{MAX_REQUEST_MINUTES} (a week)"
            )));
        }
        if reason.trim().is_empty()
            || reason.chars().count() > 1024
            || reason.chars().any(is_unsafe_char)
        {
            return Err(AccessError::Invalid(
                "a request needs a reason: 1-1024 characters without control characters".into(),
            ));
        }
        let r = AccessRequest {
            id: new_id(),
            thing: thing.to_owned(),
            services,
            not_before_ms,
            duration_minutes,
            reason,
            created_ms: self.now(),
            decision: None,
        };
        let out = r.clone();
        self.change(name, move |o, now| {
            if not_before_ms.is_some_and(|t| t + i64::from(duration_minutes) * 60_000 <= now) {
                return Err(AccessError::Invalid("that window is already over".into()));
            }
            let pending = o.requests.iter().filter(|r| r.decision.is_none()).count();
            if pending >= 32 {
                return Err(AccessError::Conflict(format!(
                    "{} has {pending} requests waiting; wait for an admin to decide them",
                    o.name
                )));
            }
            o.requests.push(r.clone());
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Every request, with the operator who filed it, newest first.
    pub fn requests(&self) -> Vec<(String, AccessRequest)> {
        let mut all: Vec<(String, AccessRequest)> = self
            .lock()
            .values()
            .flat_map(|o| o.requests.iter().rev().map(|r| (o.name.clone(), r.clone())))
            .collect();
        // Stable: requests of one millisecond stay newest first.
        all.sort_by_key(|r| std::cmp::Reverse(r.1.created_ms));
        all
    }

    /// Approve (a grant for the requested window only) or refuse request `id`.
    pub async fn decide(
        &self,
        id: &str,
        approve: bool,
        why: Option<String>,
        by: &Principal,
    ) -> Result<(String, AccessRequest, Option<Grant>), AccessError> {
        let owner = self
            .lock()
            .values()
            .find(|o| o.requests.iter().any(|r| r.id == id))
            .map(|o| o.name.clone())
            .ok_or_else(|| AccessError::NotFound(format!("no access request {id:?}")))?;
        if by.operator() == Some(owner.as_str()) {
            return Err(AccessError::Conflict(
                "you cannot decide your own request; another admin can".into(),
            ));
        }
        let by = by.label().to_owned();
        let (_, (req, grant)) = self
            .change(&owner, move |o, now| {
                let r =
                    o.requests.iter_mut().find(|r| r.id == id).ok_or_else(|| {
                        AccessError::NotFound(format!("no access request {id:?}"))
                    })?;
                if let Some(d) = &r.decision {
                    return Err(AccessError::Conflict(format!(
                        "request {id} was already {} by {}",
                        if d.approved { "approved" } else { "refused" },
                        d.by
                    )));
                }
                let grant = if approve {
                    let start = r.not_before_ms.unwrap_or(now);
                    let end = start + i64::from(r.duration_minutes) * 60_000;
                    if end <= now {
                        return Err(AccessError::Invalid(format!(
                            "request {id}'s window is already over; refuse it"
                        )));
                    }
                    Some(Grant {
                        id: new_id(),
                        things: vec![r.thing.clone()],
                        services: r.services.clone(),
                        not_before_ms: Some(start),
                        not_after_ms: Some(end),
                        created_by: by.clone(),
                        created_ms: now,
                        revoked_ms: None,
                    })
                } else {
                    None
                };
                r.decision = Some(Decision {
                    approved: approve,
                    by: by.clone(),
                    at_ms: now,
                    grant_id: grant.as_ref().map(|g| g.id.clone()),
                    why: why.clone(),
                });
                let req = r.clone();
                o.grants.extend(grant.clone());
                Ok((req, grant))
            })
            .await?;
        Ok((owner, req, grant))
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::store::MemoryStore;

    const T0: i64 = 1_800_000_000_000;

    async fn access(clock: Arc<AtomicI64>) -> Access {
        let store = Arc::new(MemoryStore::default());
        Access::load(
            store.clone(),
            Arc::new(crate::devices::Devices::load(store).await.unwrap()),
            Secret::new("boot"),
            Arc::new(move || clock.load(Ordering::SeqCst)),
            false,
        )
        .await
        .unwrap()
    }

    fn svc(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_password_login_issues_a_short_lived_key_and_failures_are_limited_per_source() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock.clone()).await;
        a.add_operator("alice", Role::Operator, &Principal::Bootstrap)
            .await
            .unwrap();
        let here: std::net::IpAddr = [127, 0, 0, 1].into();
        let there: std::net::IpAddr = [127, 0, 0, 2].into();
        // No password yet: refused like a wrong one.
        let e = a.login("alice", "correct horse battery".into(), here).await;
        assert!(
            matches!(e, Err(LoginError::Refused(_))),
            "{:?}",
            e.as_ref().err()
        );
        assert!(matches!(
            a.set_password("alice", "short".into()).await,
            Err(AccessError::Invalid(_))
        ));
        let o = a
            .set_password("alice", "correct horse battery".into())
            .await
            .unwrap();
        assert!(o.password.as_deref().unwrap().starts_with("$argon2id$"));
        let (_, key) = a
            .login("alice", "correct horse battery".into(), here)
            .await
            .unwrap();
        assert_eq!(key.expires_ms, Some(T0 + LOGIN_KEY_LIFE_MS));
        assert_eq!(
            a.authenticate(&key.secret).unwrap().operator(),
            Some("alice")
        );
        clock.store(T0 + LOGIN_KEY_LIFE_MS, Ordering::SeqCst);
        assert!(
            a.authenticate(&key.secret).is_err(),
            "the login key expired"
        );

        // Wrong passwords and unknown names get one answer; the source is then held off.
        let mut messages = std::collections::BTreeSet::new();
        for i in 1..LOGIN_FAILURES {
            let name = if i % 2 == 0 { "alice" } else { "mallory" };
            match a.login(name, "guess".into(), here).await {
                Err(LoginError::Refused(m)) => messages.insert(m),
                other => panic!("{:?}", other.err()),
            };
        }
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(a.login("alice", "guess".into(), here).await.is_err());
        let e = a.login("alice", "correct horse battery".into(), here).await;
        assert!(
            matches!(e, Err(LoginError::TooMany(_))),
            "{:?}",
            e.as_ref().err()
        );
        // Another source is not held off; the window ends.
        assert!(
            a.login("alice", "correct horse battery".into(), there)
                .await
                .is_ok()
        );
        clock.fetch_add(LOGIN_WINDOW_MS, Ordering::SeqCst);
        assert!(
            a.login("alice", "correct horse battery".into(), here)
                .await
                .is_ok()
        );

        a.set_disabled("alice", true).await.unwrap();
        let e = a.login("alice", "correct horse battery".into(), here).await;
        assert!(
            matches!(&e, Err(LoginError::Refused(m)) if m.contains("disabled")),
            "{:?}",
            e.as_ref().err()
        );
    }

    #[tokio::test]
    async fn a_grant_by_device_tag_follows_the_devices_tags() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock).await;
        a.add_operator("alice", Role::Operator, &Principal::Bootstrap)
            .await
            .unwrap();
        let line2 = || Some([("line".to_owned(), "2".to_owned())].into());
        a.devices.issue("cell-7", line2()).await.unwrap();
        a.devices.issue("cell-8", None).await.unwrap();
        assert!(matches!(
            a.add_grant(
                "alice",
                svc(&["tag:line"]),
                svc(&["SSH"]),
                None,
                None,
                &Principal::Bootstrap
            )
            .await,
            Err(AccessError::Invalid(_))
        ));
        a.add_grant(
            "alice",
            svc(&["tag:line=2*"]),
            svc(&["SSH"]),
            None,
            None,
            &Principal::Bootstrap,
        )
        .await
        .unwrap();
        let alice = Principal::Operator {
            name: "alice".into(),
            role: Role::Operator,
            key: String::new(),
        };
        assert!(a.may_reach(&alice, "cell-7", &svc(&["SSH"])).is_ok());
        assert!(a.may_see(&alice, "cell-7"));
        assert!(a.may_reach(&alice, "cell-8", &svc(&["SSH"])).is_err());
        assert!(!a.may_see(&alice, "cell-8"));
        // A thing named like the pattern is not matched by name.
        assert!(a.may_reach(&alice, "tag:line=2", &svc(&["SSH"])).is_err());
        // Re-issuing a password keeps the tags; retagging moves the access.
        a.devices.issue("cell-7", None).await.unwrap();
        assert!(a.still_allowed("alice", None, "cell-7", &svc(&["SSH"])));
        a.devices.set_tags("cell-7", BTreeMap::new()).await.unwrap();
        assert!(!a.still_allowed("alice", None, "cell-7", &svc(&["SSH"])));
        a.devices
            .set_tags("cell-8", line2().unwrap())
            .await
            .unwrap();
        assert!(a.may_reach(&alice, "cell-8", &svc(&["SSH"])).is_ok());
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("cell-*", "cell-7"));
        assert!(glob("*", "anything"));
        assert!(glob("cell-?", "cell-7"));
        assert!(!glob("cell-?", "cell-17"));
        assert!(!glob("cell-7", "cell-70"));
        assert!(glob("*-7", "cell-7"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }

    #[tokio::test]
    async fn a_grant_scopes_an_operator_to_its_things_services_and_window() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock.clone()).await;
        let (_, key) = a
            .add_operator("alice", Role::Operator, &Principal::Bootstrap)
            .await
            .unwrap();
        let alice = a.authenticate(&key.secret).unwrap();
        assert_eq!(alice.operator(), Some("alice"));
        let e = a.may_reach(&alice, "cell-7", &svc(&["SSH"])).unwrap_err();
        assert!(
            e.to_string().contains(
                "alice has no grant for cell-7/SSH (their grants: none in force). The holder of \
                 the relay's bootstrap api_key can grant it: culvert operator grant add alice"
            ),
            "{e}"
        );
        // Time-boxed: from T0 + 1 min for one hour.
        let (_, g) = a
            .add_grant(
                "alice",
                svc(&["cell-7"]),
                svc(&["SSH"]),
                Some(T0 + 60_000),
                Some(T0 + 3_660_000),
                &Principal::Bootstrap,
            )
            .await
            .unwrap();
        assert!(a.may_reach(&alice, "cell-7", &svc(&["SSH"])).is_err());
        clock.store(T0 + 60_000, Ordering::SeqCst);
        assert!(a.may_reach(&alice, "cell-7", &svc(&["SSH"])).is_ok());
        assert!(a.may_see(&alice, "cell-7") && !a.may_see(&alice, "cell-8"));
        let e = a
            .may_reach(&alice, "cell-7", &svc(&["SSH", "HTTP"]))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cell-7/HTTP (their grants: cell-7: SSH from"),
            "{e}"
        );
        assert!(a.may_reach(&alice, "cell-8", &svc(&["SSH"])).is_err());
        assert!(a.still_allowed("alice", None, "cell-7", &svc(&["SSH"])));
        clock.store(T0 + 3_660_000, Ordering::SeqCst);
        assert!(a.may_reach(&alice, "cell-7", &svc(&["SSH"])).is_err());
        assert!(!a.still_allowed("alice", None, "cell-7", &svc(&["SSH"])));
        // Revoked before it ran out: the same.
        clock.store(T0 + 120_000, Ordering::SeqCst);
        a.revoke_grant("alice", &g.id).await.unwrap();
        assert!(!a.still_allowed("alice", None, "cell-7", &svc(&["SSH"])));
    }

    #[tokio::test]
    async fn an_approved_request_grants_exactly_its_window_and_a_refused_one_nothing() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock.clone()).await;
        let (_, key) = a
            .add_operator("alice", Role::Operator, &Principal::Bootstrap)
            .await
            .unwrap();
        let alice = a.authenticate(&key.secret).unwrap();
        let start = T0 + 3_600_000;
        let r = a
            .request(
                "alice",
                "cell-7",
                svc(&["SSH"]),
                Some(start),
                30,
                "ticket 1".into(),
            )
            .await
            .unwrap();
        let refused = a
            .request(
                "alice",
                "cell-8",
                svc(&["SSH"]),
                None,
                30,
                "ticket 2".into(),
            )
            .await
            .unwrap();
        assert!(
            a.decide(&r.id, true, None, &alice).await.is_err(),
            "not her own"
        );
        let (owner, _, g) = a
            .decide(&r.id, true, None, &Principal::Bootstrap)
            .await
            .unwrap();
        assert_eq!(owner, "alice");
        assert_eq!(g.unwrap().not_after_ms, Some(start + 1_800_000));
        assert!(
            a.decide(&r.id, false, None, &Principal::Bootstrap)
                .await
                .is_err(),
            "decided"
        );
        a.decide(&refused.id, false, Some("no".into()), &Principal::Bootstrap)
            .await
            .unwrap();
        for (at, ok) in [
            (T0, false),
            (start, true),
            (start + 1_799_999, true),
            (start + 1_800_000, false),
        ] {
            clock.store(at, Ordering::SeqCst);
            assert_eq!(
                a.may_reach(&alice, "cell-7", &svc(&["SSH"])).is_ok(),
                ok,
                "at {at}"
            );
            assert!(a.may_reach(&alice, "cell-7", &svc(&["HTTP"])).is_err());
            assert!(a.may_reach(&alice, "cell-8", &svc(&["SSH"])).is_err());
        }
    }

    #[tokio::test]
    async fn a_key_an_operator_makes_lives_no_longer_than_and_dies_with_the_one_used() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock.clone()).await;
        a.add_operator("carol", Role::Operator, &Principal::Bootstrap)
            .await
            .unwrap();
        let (_, given) = a
            .create_key("carol", None, Some(T0 + 1000), &Principal::Bootstrap)
            .await
            .unwrap();
        let carol = a.authenticate(&given.secret).unwrap();
        let (_, own) = a.create_key("carol", None, None, &carol).await.unwrap();
        assert_eq!(own.expires_ms, Some(T0 + 1000), "capped at the key used");
        let by_own = a.authenticate(&own.secret).unwrap();
        let (_, grandchild) = a.create_key("carol", None, None, &by_own).await.unwrap();
        a.revoke_key("carol", &given.id).await.unwrap();
        for k in [&given, &own, &grandchild] {
            assert!(
                a.authenticate(&k.secret).is_err(),
                "{} outlived its parent",
                k.id
            );
        }
        assert!(
            a.add_operator(BOOTSTRAP, Role::Admin, &Principal::Bootstrap)
                .await
                .is_err(),
            "the bootstrap key's name is reserved"
        );
    }

    #[tokio::test]
    async fn keys_expire_revoke_and_die_with_a_disabled_operator() {
        let clock = Arc::new(AtomicI64::new(T0));
        let a = access(clock.clone()).await;
        assert_eq!(a.authenticate("boot"), Ok(Principal::Bootstrap));
        let (_, first) = a
            .add_operator("bob", Role::Viewer, &Principal::Bootstrap)
            .await
            .unwrap();
        let (_, short) = a
            .create_key("bob", None, Some(T0 + 1000), &Principal::Bootstrap)
            .await
            .unwrap();
        assert!(a.authenticate(&short.secret).is_ok());
        // A wrong secret with a real id is refused like an unknown key.
        let forged = format!("ck-{}.{}", short.id, "x".repeat(43));
        assert!(a.authenticate(&forged).is_err());
        clock.store(T0 + 1000, Ordering::SeqCst);
        assert!(
            a.authenticate(&short.secret)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        let bob = a.authenticate(&first.secret).unwrap();
        let e = a
            .require(&bob, Role::Operator, "opening a tunnel")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("bob is a viewer; opening a tunnel needs the operator role"),
            "{e}"
        );
        a.revoke_key("bob", &first.id).await.unwrap();
        assert!(
            a.authenticate(&first.secret)
                .unwrap_err()
                .to_string()
                .contains("revoked")
        );
        let (_, k) = a
            .create_key("bob", None, None, &Principal::Bootstrap)
            .await
            .unwrap();
        a.set_disabled("bob", true).await.unwrap();
        assert!(
            a.authenticate(&k.secret)
                .unwrap_err()
                .to_string()
                .contains("disabled")
        );
        a.set_disabled("bob", false).await.unwrap();
        assert!(a.authenticate(&k.secret).is_ok());
        // Kept in the store: a restart knows them.
        let b = Access::load(
            a.store.clone(),
            a.devices.clone(),
            Secret::new("boot"),
            a.clock.clone(),
            false,
        )
        .await
        .unwrap();
        assert!(b.authenticate(&k.secret).is_ok());
        assert!(b.authenticate(&first.secret).is_err());
    }
}
