//! The audit trail through the API: `GET /api/v1/audit`, admins only.
//!
//! `?event=&operator=&thing=&tunnel=&limit=`: the newest records of this relay's current audit
//! file that match every filter given (each an exact value), newest first, `limit` (1-500,
//! default 100) at most. One query reads at most [`crate::audit::SCAN_LIMIT`] bytes from the
//! end; `truncated` says when older records were not looked at. Rotated files (`FILE.1`, …)
//! and other cluster nodes' files are not read: `culvert-relay audit verify` and `jq` are the
//! tools for those.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::denied;
use crate::access::{Principal, Role};
use crate::reply::error;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    event: Option<String>,
    operator: Option<String>,
    thing: Option<String>,
    tunnel: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(d) = state
        .access
        .require(&p, Role::Admin, "reading the audit trail")
    {
        return denied(&state, &p, "audit", d);
    }
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "query: expected event, operator, thing, tunnel, limit",
        );
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "limit must be 1-500",
        );
    }
    // Empty filters (an empty form field) match everything.
    let filters: Vec<(&'static str, String)> = [
        ("event", q.event),
        ("operator", q.operator),
        ("thing", q.thing),
        ("tunnel", q.tunnel),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
    .collect();
    let keep = move |r: &Value| filters.iter().all(|(k, v)| r[*k] == v.as_str());
    let audit = state.audit.clone();
    match tokio::task::spawn_blocking(move || audit.recent(keep, limit)).await {
        Ok(Ok((records, truncated))) => {
            Json(json!({"records": records, "truncated": truncated})).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the audit file");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "audit_unreadable",
                format!("the relay cannot read its audit file: {e}"),
            )
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reading the audit file failed: {e}"),
        ),
    }
}
