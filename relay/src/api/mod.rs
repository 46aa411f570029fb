//! The control API: JSON over HTTPS under `/api/v1`, authenticated with a bearer API key.
//!
//! | method | path | does |
//! |---|---|---|
//! | POST | /api/v1/tunnels | open a tunnel → id + source and destination tokens |
//! | GET | /api/v1/tunnels?thingName=&status=&maxResults=&nextToken= | list, newest first |
//! | GET | /api/v1/tunnels/{id} | describe |
//! | POST | /api/v1/tunnels/{id}/close | close (`{"delete": true}` also deletes it) |
//! | POST | /api/v1/tunnels/{id}/rotate | new tokens (`{"clientMode": "source"|"destination"|"all"}`) |
//! | POST | /api/v1/devices | register a device for the embedded broker (or reset its password) |
//! | GET | /api/v1/devices | list devices |
//! | DELETE | /api/v1/devices/{thing} | remove a device |
//! | POST | /api/v1/devices/{thing}/tags | replace a device's tags (grants may name things by tag) |
//! | … | /api/v1/operators… | operators, keys and grants ([`operators`]) |
//! | … | /api/v1/requests… | access requests and their approval ([`requests`]) |
//! | GET | /api/v1/audit?event=&operator=&thing=&tunnel=&limit= | the newest audit records (admins; [`audit`]) |
//!
//! Opening a tunnel, and rotating its destination token, notify the device over MQTT.
//!
//! Who may do what ([`crate::access`]): viewers list and describe tunnels (and devices) of
//! things their grants name; operators also open, rotate and close them within their grants;
//! admins (and the bootstrap `api_key`) do everything. The audit trail has a line for each
//! key's first use in a run, for every request that changes something or is refused, and one
//! for every change with what it changed.
//!
//! Errors are `{"error": "<code>", "message": "<what went wrong and what to do>"}`.

// Handlers return an early `Response` on their (cold) error paths, the usual axum shape;
// boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

pub mod audit;
pub mod operators;
pub mod requests;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::access::{AccessError, Denied, Principal, Role};
use crate::registry::{ApiError, IssuedTokens, OpenRequest, RotateWhich, TunnelView};
use crate::reply::error;
use crate::state::AppState;
use crate::store::{CloseReason, Status};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            ApiError::Invalid(_) => error(StatusCode::BAD_REQUEST, "invalid_request", msg),
            ApiError::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", msg),
            ApiError::Conflict(_) => error(StatusCode::CONFLICT, "conflict", msg),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "tunnel store failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the relay could not save tunnel state; try again, and check the relay's log and disk",
                )
            }
        }
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Unauthenticated(m) => error(StatusCode::UNAUTHORIZED, "unauthorized", m),
            Denied::Forbidden(m) => error(StatusCode::FORBIDDEN, "forbidden", m),
        }
    }
}

impl IntoResponse for AccessError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            AccessError::Invalid(_) => error(StatusCode::BAD_REQUEST, "invalid_request", msg),
            AccessError::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", msg),
            AccessError::Conflict(_) => error(StatusCode::CONFLICT, "conflict", msg),
            AccessError::Store(e) => ApiError::Store(e).into_response(),
        }
    }
}

/// Every API route's first step (a route layer, see [`crate::server::router`]): who sends the
/// request, from its bearer API key, before any extractor reads the body. The [`Principal`]
/// goes into the request's extensions; the request and its status go into the audit trail.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let principal = match authorize(&state, req.headers()) {
        Ok(p) => p,
        Err(d) => {
            state.audit.refusal(
                "api_refused",
                serde_json::json!({"method": req.method().as_str(), "path": crate::audit::clip(req.uri().path()), "status": 401, "message": d.to_string()}),
            );
            return d.into_response();
        }
    };
    run_as(&state, principal, req, next).await
}

/// Run an authenticated request as `principal`, and audit it: the key's first use in this run,
/// every change and every refusal. The API key middleware and the web console's session
/// middleware ([`crate::console`]) both end here.
pub(crate) async fn run_as(
    state: &AppState,
    principal: Principal,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(principal.clone());
    if state.access.first_use_this_run(&principal) {
        state.audit.record(
            "key_use",
            serde_json::json!({"operator": principal.label(), "key": principal.key_id()}),
        );
    }
    let resp = next.run(req).await;
    // Reads that succeeded are not recorded one by one (`culvert ssh` polls its tunnel four
    // times a second while the gateway connects); changes, and every refusal, are.
    if method != "GET" || !resp.status().is_success() {
        state.audit.record(
            "api",
            serde_json::json!({
                "operator": principal.label(),
                "key": principal.key_id(),
                "method": method,
                "path": crate::audit::clip(&path),
                "status": resp.status().as_u16(),
            }),
        );
    }
    resp
}

/// Who presents the bearer API key (the bootstrap key, or an operator's).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Principal, Denied> {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Err(Denied::Unauthenticated(
            "missing API key: send the header `Authorization: Bearer <api key>`".into(),
        ));
    };
    let presented = value.strip_prefix("Bearer ").unwrap_or("").trim();
    state.access.authenticate(presented)
}

/// A refusal, recorded with who was refused what.
fn denied(state: &AppState, p: &Principal, action: &str, d: Denied) -> Response {
    state.audit.record(
        "denied",
        serde_json::json!({"operator": p.label(), "action": action, "message": d.to_string()}),
    );
    d.into_response()
}

/// What follows opening a tunnel through either API (this one or AWS's): the audit record,
/// and the destination token announced to the device.
pub(crate) async fn opened(
    state: &AppState,
    p: &Principal,
    view: &TunnelView,
    tokens: &IssuedTokens,
) {
    state.audit.record(
        "tunnel_open",
        serde_json::json!({
            "operator": p.label(),
            "tunnel": view.rec.id,
            "thing": view.rec.thing_name,
            "services": view.rec.services,
            "reason": view.rec.reason,
            "lifetime_minutes": view.rec.lifetime_minutes,
        }),
    );
    if let Some(t) = &tokens.destination {
        state.notifier.announce(&state.registry, view, t).await;
    }
}

/// Who may rotate tunnel `v`'s tokens: new tokens go only to whom revoking access can take them
/// from again, the tunnel's opener (within their grants) or an admin.
pub(crate) fn may_rotate(state: &AppState, p: &Principal, v: &TunnelView) -> Result<(), Denied> {
    let opener = p.operator().is_some() && p.operator() == v.rec.opened_by.as_deref();
    if !opener && p.role() != Role::Admin {
        return Err(Denied::Forbidden(format!(
            "only whoever opened tunnel {} ({}) or an admin may rotate its tokens; open a tunnel of your own",
            v.rec.id,
            v.rec
                .opened_by
                .as_deref()
                .unwrap_or(crate::access::BOOTSTRAP)
        )));
    }
    state
        .access
        .require(p, Role::Operator, "rotating a tunnel's tokens")
        .and_then(|()| {
            state
                .access
                .may_reach(p, &v.rec.thing_name, &v.rec.services)
        })
}

/// What follows a rotation through either API: the audit record, and a new destination token
/// announced to the (possibly new) destination.
pub(crate) async fn rotated(
    state: &AppState,
    p: &Principal,
    before: &TunnelView,
    client_mode: &str,
    tokens: &IssuedTokens,
) {
    let id = &before.rec.id;
    state.audit.record(
        "tunnel_rotate",
        serde_json::json!({"operator": p.label(), "tunnel": id, "thing": before.rec.thing_name, "client_mode": client_mode}),
    );
    if let Some(token) = &tokens.destination
        && let Ok(v) = state.registry.describe(id).await
    {
        state.notifier.announce(&state.registry, &v, token).await;
    }
}

pub(crate) fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionState {
    status: &'static str,
    last_updated_at: String,
    /// In a cluster: the relay node this side is attached on.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TunnelJson {
    tunnel_id: String,
    thing_name: String,
    status: Status,
    services: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    tags: BTreeMap<String, String>,
    created_at: String,
    expires_at: String,
    lifetime_minutes: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    close_reason: Option<CloseReason>,
    source_connection_state: ConnectionState,
    destination_connection_state: ConnectionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    opened_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Where the tunnel stands with the site's on-site approval, when the site asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    on_site: Option<OnSiteJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OnSiteJson {
    state: crate::store::OnSiteState,
    since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn tunnel_json(v: &TunnelView) -> TunnelJson {
    let cs = |connected: bool, ms: i64, node: &Option<String>| ConnectionState {
        status: if connected {
            "CONNECTED"
        } else {
            "DISCONNECTED"
        },
        last_updated_at: rfc3339(ms),
        node: node.clone(),
    };
    TunnelJson {
        tunnel_id: v.rec.id.clone(),
        thing_name: v.rec.thing_name.clone(),
        status: v.rec.status,
        services: v.rec.services.clone(),
        description: v.rec.description.clone(),
        tags: v.rec.tags.clone(),
        created_at: rfc3339(v.rec.created_ms),
        expires_at: rfc3339(v.rec.expires_ms),
        lifetime_minutes: v.rec.lifetime_minutes,
        closed_at: v.rec.closed_ms.map(rfc3339),
        close_reason: v.rec.close_reason,
        source_connection_state: cs(v.source_connected, v.source_changed_ms, &v.source_node),
        destination_connection_state: cs(
            v.destination_connected,
            v.destination_changed_ms,
            &v.destination_node,
        ),
        opened_by: v.rec.opened_by.clone(),
        reason: v.rec.reason.clone(),
        on_site: v.rec.on_site.as_ref().map(|o| OnSiteJson {
            state: o.state,
            since: rfc3339(o.at_ms),
            by: o.by.clone(),
            detail: o.detail.clone(),
        }),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenBody {
    thing_name: String,
    services: Vec<String>,
    #[serde(default)]
    lifetime_minutes: Option<u32>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Why the tunnel is opened (required when the relay's policy says so).
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokensJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    source_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_access_token: Option<String>,
}

fn tokens_json(t: IssuedTokens) -> TokensJson {
    TokensJson {
        source_access_token: t.source,
        destination_access_token: t.destination,
    }
}

/// How long a request body may take to arrive once the head has: a body sent a byte at a time
/// is answered with 408 instead of holding the handler.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body, read (at most the router's body limit) within 10 s, and parsed
/// as JSON by the handler, after the API key was checked. The deadline covers only the body:
/// what a handler then does runs to completion.
pub struct ApiBody(pub(crate) axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for ApiBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let read = axum::body::Bytes::from_request(req, state);
        match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Ok(Ok(b)) => Ok(ApiBody(b)),
            Ok(Err(rejection)) => Err(error(
                rejection.status(),
                "invalid_request",
                format!("request body: {}", rejection.body_text()),
            )),
            Err(_) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )),
        }
    }
}

impl ApiBody {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Response> {
        serde_json::from_slice(&self.0).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("request body: {e}"),
            )
        })
    }

    /// An optional body: nothing (or only whitespace) means the defaults.
    fn json_or_default<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, Response> {
        if self.0.iter().all(u8::is_ascii_whitespace) {
            Ok(T::default())
        } else {
            self.json()
        }
    }
}

pub async fn open(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    b: ApiBody,
) -> Response {
    let b: OpenBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(d) = state
        .access
        .require(&p, Role::Operator, "opening a tunnel")
        .and_then(|()| state.access.may_reach(&p, &b.thing_name, &b.services))
    {
        return denied(&state, &p, "open", d);
    }
    if state.access.require_reason && b.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "reason_required",
            "this relay requires a reason for every tunnel: give one (culvert tunnel open --reason \"…\")",
        );
    }
    let req = OpenRequest {
        thing_name: b.thing_name,
        services: b.services,
        lifetime_minutes: b
            .lifetime_minutes
            .unwrap_or(OpenRequest::DEFAULT_LIFETIME_MINUTES),
        description: b.description,
        tags: b.tags,
        opened_by: p.operator().map(str::to_owned),
        opened_key: p.key_id().map(str::to_owned),
        reason: b.reason,
    };
    match state.registry.open(req).await {
        Ok((view, tokens)) => {
            opened(&state, &p, &view, &tokens).await;
            let mut v = serde_json::to_value(tunnel_json(&view)).unwrap_or_default();
            if let serde_json::Value::Object(m) = &mut v
                && let Ok(serde_json::Value::Object(t)) = serde_json::to_value(tokens_json(tokens))
            {
                m.extend(t);
            }
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    thing_name: Option<String>,
    status: Option<String>,
    max_results: Option<usize>,
    next_token: Option<String>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "query: expected thingName, status, maxResults, nextToken",
        );
    };
    let status = match q.status.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None => None,
        Some("OPEN") => Some(Status::Open),
        Some("CLOSED") => Some(Status::Closed),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("status {other:?}: expected OPEN or CLOSED"),
            );
        }
    };
    let max = q.max_results.unwrap_or(50);
    if !(1..=100).contains(&max) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "maxResults must be 1-100",
        );
    }
    let after = match q.next_token.as_deref() {
        None => None,
        Some(t) => match t
            .split_once('.')
            .and_then(|(c, id)| Some((c.parse().ok()?, id.to_owned())))
        {
            Some(a) => Some(a),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "nextToken is not one this relay issued",
                );
            }
        },
    };
    let (page, next) = match state
        .registry
        .list(q.thing_name.as_deref(), status, after, max)
        .await
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // A page filtered to what the caller may see can be short (or empty) with more to come:
    // nextToken says whether it is the last.
    let tunnels: Vec<TunnelJson> = page
        .iter()
        .filter(|v| state.access.may_see(&p, &v.rec.thing_name))
        .map(tunnel_json)
        .collect();
    Json(serde_json::json!({
        "tunnels": tunnels,
        "nextToken": next.map(|(c, id)| format!("{c}.{id}")),
    }))
    .into_response()
}

/// Tunnel `id`, if `p` may see its thing (403 otherwise, naming what is missing).
async fn visible(state: &AppState, p: &Principal, id: &str) -> Result<TunnelView, Response> {
    let v = state
        .registry
        .describe(id)
        .await
        .map_err(IntoResponse::into_response)?;
    if state.access.may_see(p, &v.rec.thing_name) {
        Ok(v)
    } else {
        Err(denied(
            state,
            p,
            "describe",
            state
                .access
                .may_reach(p, &v.rec.thing_name, &v.rec.services)
                .err()
                .unwrap_or_else(|| Denied::Forbidden("not within your grants".into())),
        ))
    }
}

pub async fn describe(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match visible(&state, &p, &id).await {
        Ok(v) => {
            let mut j = serde_json::to_value(tunnel_json(&v)).unwrap_or_default();
            let seen = state.devices.seen(&v.rec.thing_name);
            if let Some(h) = &seen.health {
                j["health"] = tunnel_health(&v.rec.services, h);
            }
            Json(j).into_response()
        }
        Err(r) => r,
    }
}

/// The tunnel's services as the gateway's last health report has them: each with its rule's
/// target and state, or `no_rule` when the gateway has no rule for it.
fn tunnel_health(services: &[String], h: &crate::health::Health) -> serde_json::Value {
    let list: Vec<serde_json::Value> = services
        .iter()
        .map(|name| match h.services.iter().find(|s| s.name == *name) {
            Some(s) => serde_json::to_value(s).unwrap_or_default(),
            None => serde_json::json!({"name": name, "state": "no_rule"}),
        })
        .collect();
    serde_json::json!({"reportedAt": rfc3339(h.at_ms), "services": list})
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CloseBody {
    #[serde(default)]
    delete: bool,
}

/// `POST …/close`: the body is optional (empty, or `{"delete": true}`).
pub async fn close(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    b: ApiBody,
) -> Response {
    let delete = match b.json_or_default::<CloseBody>() {
        Ok(b) => b.delete,
        Err(r) => return r,
    };
    let v = match visible(&state, &p, &id).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(d) = state
        .access
        .require(&p, Role::Operator, "closing a tunnel")
        .and_then(|()| {
            state
                .access
                .may_reach(&p, &v.rec.thing_name, &v.rec.services)
        })
    {
        return denied(&state, &p, "close", d);
    }
    match state.registry.close(&id, delete).await {
        Ok(v) => {
            state.audit.record(
                "tunnel_close",
                serde_json::json!({"operator": p.label(), "tunnel": id, "thing": v.rec.thing_name, "deleted": delete}),
            );
            let mut j = serde_json::to_value(tunnel_json(&v)).unwrap_or_default();
            j["deleted"] = serde_json::Value::Bool(delete);
            Json(j).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateBody {
    client_mode: String,
}

pub async fn rotate(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    b: ApiBody,
) -> Response {
    let b: RotateBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let which = match b.client_mode.to_ascii_lowercase().as_str() {
        "source" => RotateWhich::Source,
        "destination" => RotateWhich::Destination,
        "all" => RotateWhich::All,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("clientMode {other:?}: expected source, destination or all"),
            );
        }
    };
    let v = match visible(&state, &p, &id).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(d) = may_rotate(&state, &p, &v) {
        return denied(&state, &p, "rotate", d);
    }
    match state.registry.rotate(&id, which, None).await {
        Ok(t) => {
            rotated(&state, &p, &v, &b.client_mode, &t).await;
            let mut j = serde_json::to_value(tokens_json(t)).unwrap_or_default();
            j["tunnelId"] = serde_json::Value::String(id);
            Json(j).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceBody {
    thing_name: String,
    /// Replaces the device's tags; absent: they stay as they are.
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    tags: BTreeMap<String, String>,
}

/// At most this many tags on a device.
const MAX_TAGS: usize = 16;

/// Tags an admin may give a device: names as thing names, values of 1-128 characters without
/// control characters, `=` or glob characters (so a grant's `tag:KEY=VALUE` reads one way).
fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), Response> {
    let bad_value = |v: &str| {
        v.is_empty()
            || v.chars().count() > 128
            || v.chars()
                .any(|c| culvert_protocol::is_unsafe_char(c) || matches!(c, '=' | '*' | '?'))
    };
    if tags.len() > MAX_TAGS
        || tags
            .iter()
            .any(|(k, v)| !culvert_protocol::valid_name(k) || bad_value(v))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "tags: at most {MAX_TAGS}, each KEY=VALUE with KEY of A-Z a-z 0-9 : _ - and VALUE of \
                 1-128 characters without control characters, =, * or ?"
            ),
        ));
    }
    Ok(())
}

/// A device, with what this relay's broker has seen of it: whether it is connected now, when
/// it was last seen, and its last health report (the services it has rules for, and whether
/// their targets answered).
fn device_json(
    d: &crate::store::DeviceRecord,
    seen: &crate::devices::Presence,
) -> serde_json::Value {
    let mut j = serde_json::json!({
        "thingName": d.thing_name,
        "createdAt": rfc3339(d.created_ms),
        "tags": d.tags,
        "online": seen.connections > 0,
        "lastSeen": seen.last_seen_ms.map(rfc3339),
    });
    if let Some(h) = &seen.health {
        j["health"] = serde_json::json!({"reportedAt": rfc3339(h.at_ms), "services": h.services});
    }
    j
}

/// Register a device for the embedded broker, or give it a new password.
pub async fn add_device(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    b: ApiBody,
) -> Response {
    let b: DeviceBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(d) = state
        .access
        .require(&p, Role::Admin, "registering a device")
    {
        return denied(&state, &p, "device_add", d);
    }
    if !culvert_protocol::valid_name(&b.thing_name) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "thingName {:?} is invalid: 1-128 characters of A-Z a-z 0-9 : _ -",
                b.thing_name
            ),
        );
    }
    if let Some(tags) = &b.tags
        && let Err(r) = check_tags(tags)
    {
        return r;
    }
    match state.devices.issue(&b.thing_name, b.tags.clone()).await {
        Ok(password) => {
            state.audit.record(
                "device_add",
                serde_json::json!({"operator": p.label(), "thing": b.thing_name, "tags": b.tags}),
            );
            (
                StatusCode::CREATED,
                Json(serde_json::json!({
                    "thingName": b.thing_name,
                    "clientId": b.thing_name,
                    "username": b.thing_name,
                    "password": password,
                    "broker": state.mqtt_listen.map(|a| a.to_string()),
                })),
            )
                .into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn list_devices(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Response {
    let list: Vec<serde_json::Value> = state
        .devices
        .list()
        .into_iter()
        .filter(|d| state.access.may_see(&p, &d.thing_name))
        .map(|d| device_json(&d, &state.devices.seen(&d.thing_name)))
        .collect();
    Json(serde_json::json!({ "devices": list })).into_response()
}

/// Replace a device's tags. Tunnels that were allowed by a tag the device no longer has close
/// with the relay's next sweep, as when a grant runs out.
pub async fn set_device_tags(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(thing): Path<String>,
    b: ApiBody,
) -> Response {
    if let Err(d) = state.access.require(&p, Role::Admin, "tagging a device") {
        return denied(&state, &p, "device_tags", d);
    }
    let b: TagsBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_tags(&b.tags) {
        return r;
    }
    match state.devices.set_tags(&thing, b.tags).await {
        Ok(Some(d)) => {
            state.audit.record(
                "device_tags",
                serde_json::json!({"operator": p.label(), "thing": thing, "tags": d.tags}),
            );
            Json(device_json(&d, &state.devices.seen(&d.thing_name))).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {thing:?} (culvert device list shows them)"),
        ),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn remove_device(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(thing): Path<String>,
) -> Response {
    if let Err(d) = state.access.require(&p, Role::Admin, "removing a device") {
        return denied(&state, &p, "device_remove", d);
    }
    match state.devices.remove(&thing).await {
        Ok(true) => {
            state.audit.record(
                "device_remove",
                serde_json::json!({"operator": p.label(), "thing": thing}),
            );
            Json(serde_json::json!({"thingName": thing, "deleted": true})).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {thing:?}"),
        ),
        Err(e) => ApiError::from(e).into_response(),
    }
}
