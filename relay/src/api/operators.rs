//! Operators, their API keys and grants, under `/api/v1/operators`.
//!
//! | method | path | who | does |
//! |---|---|---|---|
//! | GET | /operators/me | anyone | who the key belongs to, role, grants in force |
//! | POST | /operators | admin | add `{"name", "role"}` → the operator and a first API key (shown once) |
//! | GET | /operators | admin | list |
//! | POST | /operators/{name}/disable | admin | disable: keys stop working, their tunnels close |
//! | POST | /operators/{name}/enable | admin | enable again |
//! | POST | /operators/{name}/keys | admin, self | new key `{"label", "expiresInDays", "kind"}` (shown once; one's own lives no longer than the key used; `"kind": "aws"`: an AWS access key pair for AWS's API) |
//! | POST | /operators/{name}/password | admin, self | set the password `{"password"}` (12-256 characters; stored as argon2id) |
//! | POST | /login | no key | `{"name", "password"}` → a key that lives 12 h (failures limited per source address) |
//! | POST | /operators/{name}/keys/{id}/revoke | admin, self | revoke a key (and the keys made with it); tunnels opened with them close |
//! | POST | /operators/{name}/grants | admin | grant `{"things", "services", "notBefore", "notAfter" or "durationMinutes"}` |
//! | POST | /operators/{name}/grants/{id}/revoke | admin | revoke a grant: tunnels it allowed close |

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiBody, denied, rfc3339};
use crate::access::{Grant, KeyKind, OperatorRecord, Principal, Role};
use crate::reply::error;
use crate::state::AppState;

pub(super) fn grant_json(g: &Grant, now: i64) -> Value {
    json!({
        "grantId": g.id,
        "things": g.things,
        "services": g.services,
        "notBefore": g.not_before_ms.map(rfc3339),
        "notAfter": g.not_after_ms.map(rfc3339),
        "createdBy": g.created_by,
        "createdAt": rfc3339(g.created_ms),
        "revokedAt": g.revoked_ms.map(rfc3339),
        "inForce": g.revoked_ms.is_none()
            && g.not_before_ms.is_none_or(|t| now >= t)
            && g.not_after_ms.is_none_or(|t| now < t),
    })
}

fn operator_json(o: &OperatorRecord, now: i64) -> Value {
    json!({
        "name": o.name,
        "role": o.role,
        "disabled": o.disabled_ms.is_some(),
        "disabledAt": o.disabled_ms.map(rfc3339),
        "createdAt": rfc3339(o.created_ms),
        "createdBy": o.created_by,
        "keys": o.keys.iter().map(|k| json!({
            "keyId": k.id,
            "kind": k.kind,
            "accessKeyId": (k.kind == KeyKind::Aws).then(|| crate::aws::keys::access_key_id(&k.id)),
            "label": k.label,
            "createdAt": rfc3339(k.created_ms),
            "expiresAt": k.expires_ms.map(rfc3339),
            "revokedAt": k.revoked_ms.map(rfc3339),
        })).collect::<Vec<_>>(),
        "grants": o.grants.iter().map(|g| grant_json(g, now)).collect::<Vec<_>>(),
        "pendingRequests": o.requests.iter().filter(|r| r.decision.is_none()).count(),
        "hasPassword": o.password.is_some(),
    })
}

fn admin(state: &AppState, p: &Principal, action: &str) -> Result<(), Response> {
    state
        .access
        .require(p, Role::Admin, action)
        .map_err(|d| denied(state, p, action, d))
}

/// Admins, and the operator themself.
fn admin_or_self(
    state: &AppState,
    p: &Principal,
    name: &str,
    action: &str,
) -> Result<(), Response> {
    if p.operator() == Some(name) {
        return Ok(());
    }
    admin(state, p, action)
}

/// Close the tunnels no longer allowed after a change to operator `name`.
pub(crate) async fn enforce(state: &AppState, name: &str) -> Vec<String> {
    match state
        .access
        .close_revoked(&state.registry, Some(name))
        .await
    {
        Ok(closed) => closed,
        Err(e) => {
            tracing::warn!(operator = name, error = %e, "could not close the tunnels of a revoked access; the sweeper tries again");
            Vec::new()
        }
    }
}

pub async fn me(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Response {
    let now = state.access.now();
    let mut v = match p.operator().and_then(|n| state.access.get(n)) {
        Some(o) => operator_json(&o, now),
        None => json!({"name": p.label(), "role": p.role(), "bootstrap": true}),
    };
    v["keyId"] = json!(p.key_id());
    Json(v).into_response()
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Response {
    if let Err(r) = admin(&state, &p, "listing operators") {
        return r;
    }
    let now = state.access.now();
    let list: Vec<Value> = state
        .access
        .list()
        .iter()
        .map(|o| operator_json(o, now))
        .collect();
    Json(json!({ "operators": list })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    name: String,
    role: String,
}

pub async fn add(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    b: ApiBody,
) -> Response {
    if let Err(r) = admin(&state, &p, "adding operators") {
        return r;
    }
    let b: AddBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(role) = Role::parse(&b.role) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("role {:?}: expected admin, operator or viewer", b.role),
        );
    };
    match state.access.add_operator(&b.name, role, &p).await {
        Ok((o, key)) => {
            state.audit.record(
                "operator_add",
                json!({"operator": p.label(), "name": o.name, "role": role, "key": key.id}),
            );
            let mut v = operator_json(&o, state.access.now());
            v["apiKey"] = json!(key.secret);
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn set_disabled(state: &AppState, p: &Principal, name: &str, disabled: bool) -> Response {
    let action = if disabled {
        "operator_disable"
    } else {
        "operator_enable"
    };
    if let Err(r) = admin(state, p, action) {
        return r;
    }
    if disabled && p.operator() == Some(name) {
        return error(
            StatusCode::CONFLICT,
            "conflict",
            "you cannot disable yourself; another admin (or the bootstrap key) can",
        );
    }
    match state.access.set_disabled(name, disabled).await {
        Ok(o) => {
            let closed = if disabled {
                enforce(state, name).await
            } else {
                Vec::new()
            };
            state.audit.record(
                action,
                json!({"operator": p.label(), "name": name, "tunnels_closed": closed}),
            );
            let mut v = operator_json(&o, state.access.now());
            v["tunnelsClosed"] = json!(closed);
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn disable(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    set_disabled(&state, &p, &name, true).await
}

pub async fn enable(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    set_disabled(&state, &p, &name, false).await
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeyBody {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    expires_in_days: Option<u32>,
    #[serde(default)]
    kind: KeyKind,
}

pub async fn create_key(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    b: ApiBody,
) -> Response {
    if let Err(r) = admin_or_self(&state, &p, &name, "creating another operator's key") {
        return r;
    }
    let b: KeyBody = match b.json_or_default() {
        Ok(b) => b,
        Err(r) => return r,
    };
    if b.expires_in_days.is_some_and(|d| d == 0 || d > 3650) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expiresInDays must be 1-3650",
        );
    }
    let expires = b
        .expires_in_days
        .map(|d| state.access.now() + i64::from(d) * 86_400_000);
    match state
        .access
        .create_key_of(b.kind, &name, b.label, expires, &p)
        .await
    {
        Ok((_, key)) => {
            state.audit.record(
                "key_create",
                json!({"operator": p.label(), "name": name, "key": key.id, "kind": b.kind, "expires": key.expires_ms.map(rfc3339)}),
            );
            let mut out = json!({
                "name": name,
                "keyId": key.id,
                "kind": b.kind,
                "expiresAt": key.expires_ms.map(rfc3339),
            });
            match b.kind {
                KeyKind::Api => out["apiKey"] = json!(key.secret),
                KeyKind::Aws => {
                    out["accessKeyId"] = json!(crate::aws::keys::access_key_id(&key.id));
                    out["secretAccessKey"] = json!(key.secret);
                    out["region"] = json!(state.aws.region);
                }
            }
            (StatusCode::CREATED, Json(out)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

pub async fn set_password(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    b: ApiBody,
) -> Response {
    if let Err(r) = admin_or_self(&state, &p, &name, "setting another operator's password") {
        return r;
    }
    let b: PasswordBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    match state.access.set_password(&name, b.password).await {
        Ok(o) => {
            state
                .audit
                .record("password_set", json!({"operator": p.label(), "name": name}));
            Json(operator_json(&o, state.access.now())).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    name: String,
    password: String,
}

/// `POST /api/v1/login`: a password for a key that lives
/// [`crate::access::LOGIN_KEY_LIFE_MS`]. Every attempt is in the audit trail.
pub async fn login(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<crate::state::Peer>>,
    b: ApiBody,
) -> Response {
    let from = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |Extension(p)| {
        p.0.ip()
    });
    let b: LoginBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let name = crate::audit::clip(&b.name);
    match state.access.login(&b.name, b.password, from).await {
        Ok((o, key)) => {
            state.audit.record(
                "login",
                json!({"operator": o.name, "from": from.to_string(), "key": key.id, "expires": key.expires_ms.map(rfc3339)}),
            );
            (
                StatusCode::CREATED,
                Json(json!({
                    "name": o.name,
                    "role": o.role,
                    "keyId": key.id,
                    "apiKey": key.secret,
                    "expiresAt": key.expires_ms.map(rfc3339),
                })),
            )
                .into_response()
        }
        Err(e) => login_refused(&state, &name, from, e, false),
    }
}

/// A refused login's answer (401, 429 with how long to wait, 503), audited as `login_refused`
/// (`console`: through the web console's login).
pub(crate) fn login_refused(
    state: &AppState,
    name: &str,
    from: std::net::IpAddr,
    e: crate::access::LoginError,
    console: bool,
) -> Response {
    use crate::access::LoginError;
    let e = match e {
        // The store failed: not the caller's doing, and not a refusal to record.
        LoginError::Access(a) => return a.into_response(),
        e => e,
    };
    let (status, code) = match &e {
        LoginError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_logins"),
        LoginError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        _ => (StatusCode::UNAUTHORIZED, "unauthorized"),
    };
    state.audit.refusal(
        "login_refused",
        json!({"name": name, "from": from.to_string(), "status": status.as_u16(), "message": e.to_string(), "console": console.then_some(true)}),
    );
    error(status, code, e.to_string())
}

pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if let Err(r) = admin_or_self(&state, &p, &name, "revoking another operator's key") {
        return r;
    }
    match state.access.revoke_key(&name, &id).await {
        Ok(o) => {
            // The tunnels opened with it (or a key made with it) close too.
            let closed = enforce(&state, &name).await;
            state.audit.record(
                "key_revoke",
                json!({"operator": p.label(), "name": name, "key": id, "tunnels_closed": closed}),
            );
            let mut v = operator_json(&o, state.access.now());
            v["tunnelsClosed"] = json!(closed);
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrantBody {
    things: Vec<String>,
    services: Vec<String>,
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    not_after: Option<String>,
    /// Instead of notAfter: this many minutes from notBefore (or from now).
    #[serde(default)]
    duration_minutes: Option<u32>,
}

pub(super) fn parse_time(field: &str, s: &str) -> Result<i64, Response> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} {s:?}: expected an RFC 3339 time such as 2026-12-24T08:00:00Z"),
            )
        })
}

pub async fn add_grant(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    b: ApiBody,
) -> Response {
    if let Err(r) = admin(&state, &p, "granting access") {
        return r;
    }
    let b: GrantBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let not_before = match b.not_before.as_deref().map(|s| parse_time("notBefore", s)) {
        Some(Err(r)) => return r,
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let not_after = match (b.not_after.as_deref(), b.duration_minutes) {
        (Some(_), Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give notAfter or durationMinutes, not both",
            );
        }
        (Some(s), None) => match parse_time("notAfter", s) {
            Ok(t) => Some(t),
            Err(r) => return r,
        },
        (None, Some(m)) => {
            Some(not_before.unwrap_or_else(|| state.access.now()) + i64::from(m) * 60_000)
        }
        (None, None) => None,
    };
    match state
        .access
        .add_grant(&name, b.things, b.services, not_before, not_after, &p)
        .await
    {
        Ok((_, g)) => {
            let now = state.access.now();
            state.audit.record(
                "grant_add",
                json!({"operator": p.label(), "name": name, "grant": grant_json(&g, now)}),
            );
            let mut v = grant_json(&g, now);
            v["name"] = json!(name);
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if let Err(r) = admin(&state, &p, "revoking access") {
        return r;
    }
    match state.access.revoke_grant(&name, &id).await {
        Ok(o) => {
            let closed = enforce(&state, &name).await;
            state.audit.record(
                "grant_revoke",
                json!({"operator": p.label(), "name": name, "grant": id, "tunnels_closed": closed}),
            );
            let mut v = operator_json(&o, state.access.now());
            v["tunnelsClosed"] = json!(closed);
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}
