//! The relay's HTTP error responses, the same for the control API and the data plane's
//! refused handshakes: `{"error": "<code>", "message": "<what went wrong and what to do>"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error response.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({"error": code, "message": message.into()})),
    )
        .into_response()
}
