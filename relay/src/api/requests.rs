//! Access requests, under `/api/v1/requests`: an operator without a standing grant asks for
//! one thing, some services and a window, with a reason; an admin approves (a grant for that
//! window only) or refuses.
//!
//! | method | path | who | does |
//! |---|---|---|---|
//! | POST | /requests | operator | `{"thingName", "services", "notBefore"?, "durationMinutes", "reason"}` → 201 the request |
//! | GET | /requests?state=pending | anyone | admins: every request; others: their own; newest first |
//! | POST | /requests/{id}/approve | admin | the grant for the requested window (not one's own request) |
//! | POST | /requests/{id}/refuse | admin | `{"why"?}` |

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::operators::{grant_json, parse_time};
use super::{ApiBody, denied, rfc3339};
use crate::access::{AccessRequest, Principal, Role};
use crate::reply::error;
use crate::state::AppState;

fn request_json(owner: &str, r: &AccessRequest) -> Value {
    let state = match &r.decision {
        None => "pending",
        Some(d) if d.approved => "approved",
        Some(_) => "refused",
    };
    json!({
        "requestId": r.id,
        "operator": owner,
        "thingName": r.thing,
        "services": r.services,
        "notBefore": r.not_before_ms.map(rfc3339),
        "durationMinutes": r.duration_minutes,
        "reason": r.reason,
        "createdAt": rfc3339(r.created_ms),
        "state": state,
        "decidedBy": r.decision.as_ref().map(|d| d.by.clone()),
        "decidedAt": r.decision.as_ref().map(|d| rfc3339(d.at_ms)),
        "grantId": r.decision.as_ref().and_then(|d| d.grant_id.clone()),
        "why": r.decision.as_ref().and_then(|d| d.why.clone()),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestBody {
    thing_name: String,
    services: Vec<String>,
    #[serde(default)]
    not_before: Option<String>,
    duration_minutes: u32,
    #[serde(default)]
    reason: String,
}

pub async fn file(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    b: ApiBody,
) -> Response {
    let Some(name) = p.operator() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the bootstrap key needs no access requests: it may reach everything",
        );
    };
    if let Err(d) = state
        .access
        .require(&p, Role::Operator, "requesting access")
    {
        return denied(&state, &p, "request", d);
    }
    let b: RequestBody = match b.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let start = match b.not_before.as_deref().map(|s| parse_time("notBefore", s)) {
        Some(Err(r)) => return r,
        Some(Ok(t)) => Some(t),
        None => None,
    };
    match state
        .access
        .request(
            name,
            &b.thing_name,
            b.services,
            start,
            b.duration_minutes,
            b.reason,
        )
        .await
    {
        Ok(r) => {
            let v = request_json(name, &r);
            state
                .audit
                .record("request_add", json!({"operator": name, "request": v}));
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    state: Option<String>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Response {
    let admin = p.role() == Role::Admin;
    let list: Vec<Value> = state
        .access
        .requests()
        .iter()
        .filter(|(owner, _)| admin || p.operator() == Some(owner.as_str()))
        .map(|(owner, r)| request_json(owner, r))
        .filter(|v| q.state.as_deref().is_none_or(|s| v["state"] == s))
        .collect();
    Json(json!({ "requests": list })).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefuseBody {
    #[serde(default)]
    why: Option<String>,
}

async fn decide(state: &AppState, p: &Principal, id: &str, approve: bool, b: ApiBody) -> Response {
    let action = if approve {
        "request_approve"
    } else {
        "request_refuse"
    };
    if let Err(d) = state
        .access
        .require(p, Role::Admin, "deciding access requests")
    {
        return denied(state, p, action, d);
    }
    let why = match b.json_or_default::<RefuseBody>() {
        Ok(b) => b.why,
        Err(r) => return r,
    };
    if why
        .as_ref()
        .is_some_and(|w| w.chars().count() > 1024 || w.chars().any(crate::registry::is_unsafe_char))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "why: at most 1024 characters without control characters",
        );
    }
    match state.access.decide(id, approve, why, p).await {
        Ok((owner, r, grant)) => {
            let now = state.access.now();
            let mut v = request_json(&owner, &r);
            if let Some(g) = &grant {
                v["grant"] = grant_json(g, now);
            }
            state
                .audit
                .record(action, json!({"operator": p.label(), "request": v}));
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn approve(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    b: ApiBody,
) -> Response {
    decide(&state, &p, &id, true, b).await
}

pub async fn refuse(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    b: ApiBody,
) -> Response {
    decide(&state, &p, &id, false, b).await
}
