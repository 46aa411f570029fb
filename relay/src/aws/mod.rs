//! AWS IoT Secure Tunneling's own control API on the relay's port, so that the aws CLI, boto3
//! and the AWS SDKs work against culvert-relay unmodified (`--endpoint-url https://relay`).
//!
//! AWS JSON 1.1 (botocore's model `iotsecuretunneling` 2018-10-05 is the reference): every call
//! is `POST /` with `X-Amz-Target: IoTSecuredTunneling.<Operation>`, a JSON body, and a SigV4
//! signature ([`sigv4`]) by an AWS access key pair that an operator holds ([`keys`]). Who may do
//! what is decided exactly as on culvert's own API ([`crate::access`]), and the same audit
//! records are written, with the AWS operation as the action.
//!
//! | operation | does |
//! |---|---|
//! | OpenTunnel | open (`destinationConfig.thingName` is required here) and notify the device |
//! | CloseTunnel | close (`delete: true` also deletes it) |
//! | DescribeTunnel | one tunnel |
//! | ListTunnels | newest first, `thingName`, `maxResults` 1-100, `nextToken` |
//! | RotateTunnelAccessToken | new tokens (`clientMode`), optionally a new `destinationConfig` |
//! | TagResource, UntagResource, ListTagsForResource | a tunnel's tags, by its ARN |
//!
//! Errors are AWS's: `{"__type": "<Exception>", "message": "..."}` with AWS's status codes.

pub mod keys;
pub mod sigv4;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::{Denied, Principal, Role};
use crate::api::ApiBody;
use crate::registry::{ApiError, OpenRequest, RotateWhich, TunnelView};
use crate::state::AppState;
use crate::store::{Retarget, TagChange};

/// How far a request's `X-Amz-Date` may be from the relay's clock, either way (AWS: 5 minutes).
pub const SKEW_SECS: i64 = 5 * 60;
/// Signatures of changing requests remembered to refuse a replay (for [`SKEW_SECS`]).
const REPLAY_MEMORY: usize = 20_000;

/// The AWS API's settings and the signatures it has seen.
pub struct AwsApi {
    pub region: String,
    pub account_id: String,
    /// Signature → when it stops being valid anyway (Unix seconds).
    seen: Mutex<HashMap<String, i64>>,
}

impl AwsApi {
    pub fn new(region: String, account_id: String) -> AwsApi {
        AwsApi {
            region,
            account_id,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn tunnel_arn(&self, id: &str) -> String {
        format!(
            "arn:aws:iot:{}:{}:tunnel/{id}",
            self.region, self.account_id
        )
    }

    /// The tunnel id an ARN of this relay names.
    fn tunnel_of(&self, arn: &str) -> Result<String, AwsError> {
        let bad = || {
            AwsError::validation(format!(
                "resourceArn {arn:?} is not a tunnel ARN: arn:aws:iot:{}:{}:tunnel/TUNNEL_ID",
                self.region, self.account_id
            ))
        };
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [a, partition, service, region, account, resource] = parts[..] else {
            return Err(bad());
        };
        let Some(id) = resource.strip_prefix("tunnel/") else {
            return Err(bad());
        };
        if a != "arn" || service != "iot" || !partition.starts_with("aws") || id.is_empty() {
            return Err(bad());
        }
        if region != self.region || account != self.account_id {
            return Err(AwsError::not_found(format!(
                "{arn} is not a resource of this relay (region {}, account {})",
                self.region, self.account_id
            )));
        }
        Ok(id.to_owned())
    }

    /// Remember a signature until it would have expired anyway: false if it was seen before.
    fn first_sight(&self, signature: &str, now: i64) -> Result<bool, AwsError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= REPLAY_MEMORY {
            seen.retain(|_, until| *until > now);
        }
        if seen.contains_key(signature) {
            return Ok(false);
        }
        if seen.len() >= REPLAY_MEMORY {
            return Err(AwsError::new(
                StatusCode::BAD_REQUEST,
                "ThrottlingException",
                "Rate exceeded: too many signed changes in the last 5 minutes; retry shortly",
            ));
        }
        seen.insert(signature.to_owned(), now + 2 * SKEW_SECS);
        Ok(true)
    }
}

/// An error as AWS JSON 1.1 gives it.
#[derive(Debug)]
pub struct AwsError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl AwsError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> AwsError {
        AwsError {
            status,
            kind,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> AwsError {
        AwsError::new(StatusCode::BAD_REQUEST, "ValidationException", message)
    }

    fn not_found(message: impl Into<String>) -> AwsError {
        AwsError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }

    fn signature(message: impl Into<String>) -> AwsError {
        AwsError::new(StatusCode::FORBIDDEN, "InvalidSignatureException", message)
    }

    fn incomplete(message: impl Into<String>) -> AwsError {
        AwsError::new(
            StatusCode::BAD_REQUEST,
            "IncompleteSignatureException",
            message,
        )
    }

    fn unrecognized(message: impl Into<String>) -> AwsError {
        AwsError::new(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            message,
        )
    }
}

impl From<ApiError> for AwsError {
    fn from(e: ApiError) -> AwsError {
        match e {
            ApiError::Invalid(m) => AwsError::validation(m),
            ApiError::NotFound(id) => AwsError::not_found(format!("tunnel {id} not found")),
            ApiError::Conflict(m) => AwsError::validation(m),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "tunnel store failed");
                AwsError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "the relay could not save tunnel state; try again, and check the relay's log and disk",
                )
            }
        }
    }
}

fn respond(status: StatusCode, body: &Value, error_type: Option<&str>) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    let id: [u8; 16] = rand::random();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    if let Ok(v) = HeaderValue::from_str(&uuid) {
        h.insert("x-amzn-requestid", v);
    }
    if let Some(t) = error_type.and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert("x-amzn-errortype", t);
    }
    r
}

impl IntoResponse for AwsError {
    fn into_response(self) -> Response {
        respond(
            self.status,
            &json!({"__type": self.kind, "message": self.message}),
            Some(self.kind),
        )
    }
}

/// Seconds since the epoch, as AWS JSON encodes timestamps.
fn epoch(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

fn tags_list(tags: &BTreeMap<String, String>) -> Value {
    tags.iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect()
}

fn last_updated(v: &TunnelView) -> i64 {
    [
        Some(v.rec.created_ms),
        v.rec.closed_ms,
        Some(v.source_changed_ms),
        Some(v.destination_changed_ms),
        v.rec.on_site.as_ref().map(|o| o.at_ms),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(v.rec.created_ms)
}

fn status(v: &TunnelView) -> &'static str {
    match v.rec.status {
        crate::store::Status::Open => "OPEN",
        crate::store::Status::Closed => "CLOSED",
    }
}

fn tunnel_json(api: &AwsApi, v: &TunnelView) -> Value {
    let cs = |connected: bool, ms: i64| {
        json!({
            "status": if connected { "CONNECTED" } else { "DISCONNECTED" },
            "lastUpdatedAt": epoch(ms),
        })
    };
    let mut t = json!({
        "tunnelId": v.rec.id,
        "tunnelArn": api.tunnel_arn(&v.rec.id),
        "status": status(v),
        "sourceConnectionState": cs(v.source_connected, v.source_changed_ms),
        "destinationConnectionState": cs(v.destination_connected, v.destination_changed_ms),
        "destinationConfig": {"thingName": v.rec.thing_name, "services": v.rec.services},
        "timeoutConfig": {"maxLifetimeTimeoutMinutes": v.rec.lifetime_minutes},
        "tags": tags_list(&v.rec.tags),
        "createdAt": epoch(v.rec.created_ms),
        "lastUpdatedAt": epoch(last_updated(v)),
    });
    if let Some(d) = &v.rec.description {
        t["description"] = json!(d);
    }
    t
}

fn summary_json(api: &AwsApi, v: &TunnelView) -> Value {
    let mut t = json!({
        "tunnelId": v.rec.id,
        "tunnelArn": api.tunnel_arn(&v.rec.id),
        "status": status(v),
        "createdAt": epoch(v.rec.created_ms),
        "lastUpdatedAt": epoch(last_updated(v)),
    });
    if let Some(d) = &v.rec.description {
        t["description"] = json!(d);
    }
    t
}

/// The SigV4 check of one request: who signed it, or AWS's refusal.
fn authenticate(
    state: &AppState,
    api: &AwsApi,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    changes: bool,
) -> Result<Principal, AwsError> {
    let Some(header) = headers.get("authorization") else {
        return Err(AwsError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token: sign the request with SigV4 (an AWS access key pair from \
             culvert operator key create --aws, or client.env of a dev relay)",
        ));
    };
    let header = header
        .to_str()
        .map_err(|_| AwsError::incomplete("Authorization header is not ASCII"))?;
    let auth = sigv4::Authorization::parse(header).map_err(|e| AwsError::incomplete(e.0))?;
    for needed in ["host", "x-amz-date"] {
        if !auth.signed_headers.iter().any(|h| h == needed) {
            return Err(AwsError::incomplete(format!(
                "'{needed}' must be a 'SignedHeader' in the AWS Authorization."
            )));
        }
    }
    if !auth.service.eq_ignore_ascii_case("iotsecuredtunneling") {
        return Err(AwsError::incomplete(format!(
            "Credential should be scoped to correct service: 'IoTSecuredTunneling', not '{}'.",
            auth.service
        )));
    }
    if auth.region != api.region {
        return Err(AwsError::signature(format!(
            "Credential should be scoped to a valid region, not '{}': this relay is region '{}' \
             (--region {} or AWS_DEFAULT_REGION)",
            auth.region, api.region, api.region
        )));
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(signed_at) = sigv4::parse_amz_date(amz_date) else {
        return Err(AwsError::incomplete(format!(
            "X-Amz-Date {amz_date:?} is not an ISO 8601 basic date such as 20150830T123600Z"
        )));
    };
    if !amz_date.starts_with(&auth.date) {
        return Err(AwsError::signature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            &amz_date[..8]
        )));
    }
    let now = state.access.now().div_euclid(1000);
    if signed_at < now - SKEW_SECS {
        return Err(AwsError::signature(format!(
            "Signature expired: {amz_date} is now earlier than {} ({} - 5 min.)",
            sigv4::format_amz_date(now - SKEW_SECS),
            sigv4::format_amz_date(now)
        )));
    }
    if signed_at > now + SKEW_SECS {
        return Err(AwsError::signature(format!(
            "Signature not yet current: {amz_date} is still later than {} ({} + 5 min.)",
            sigv4::format_amz_date(now + SKEW_SECS),
            sigv4::format_amz_date(now)
        )));
    }
    if headers.contains_key("x-amz-security-token") {
        return Err(AwsError::unrecognized(
            "The security token included in the request is invalid: culvert-relay issues no \
             session credentials; sign with a long-term access key pair",
        ));
    }
    let (principal, secret) = match state.access.aws_secret(&auth.access_key_id) {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(AwsError::unrecognized(
                "The security token included in the request is invalid: no such access key \
                 on this relay (culvert operator key create --aws issues one)",
            ));
        }
        Err(d) => return Err(AwsError::unrecognized(d.to_string())),
    };
    let owned: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let req = sigv4::Request {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or(""),
        headers: &owned,
        body,
    };
    let creq = sigv4::canonical_request(&req, &auth).map_err(|missing| {
        AwsError::incomplete(format!(
            "SignedHeaders names '{missing}', which the request does not carry"
        ))
    })?;
    if !sigv4::matches(&creq, &auth, amz_date, &secret) {
        return Err(AwsError::signature(
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service \
             documentation for details.",
        ));
    }
    if changes && !api.first_sight(&auth.signature, now)? {
        return Err(AwsError::signature(
            "Signature already used: the relay has seen this signed request before (a replay); \
             sign the request again",
        ));
    }
    Ok(principal)
}

/// `POST /`: one AWS JSON 1.1 call.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: ApiBody,
) -> Response {
    let api = &state.aws;
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let operation = target
        .strip_prefix("IoTSecuredTunneling.")
        .unwrap_or(target)
        .to_owned();
    let changes = !matches!(
        operation.as_str(),
        "DescribeTunnel" | "ListTunnels" | "ListTagsForResource"
    );
    let p = match authenticate(&state, api, &method, &uri, &headers, &body.0, changes) {
        Ok(p) => p,
        Err(e) => {
            state.audit.refusal(
                "api_refused",
                json!({"aws": crate::audit::clip(&operation), "status": e.status.as_u16(), "message": e.message}),
            );
            return e.into_response();
        }
    };
    if state.access.first_use_this_run(&p) {
        state
            .audit
            .record("key_use", json!({"operator": p.label(), "key": p.key_id()}));
    }
    let result = match operation.as_str() {
        "OpenTunnel" => open(&state, &p, &body.0).await,
        "CloseTunnel" => close(&state, &p, &body.0).await,
        "DescribeTunnel" => describe(&state, &p, &body.0).await,
        "ListTunnels" => list(&state, &p, &body.0).await,
        "RotateTunnelAccessToken" => rotate(&state, &p, &body.0).await,
        "TagResource" => retag(&state, &p, &body.0, "TagResource", false).await,
        "UntagResource" => retag(&state, &p, &body.0, "UntagResource", true).await,
        "ListTagsForResource" => list_tags(&state, &p, &body.0).await,
        _ if target.is_empty() => Err(AwsError::new(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            "no X-Amz-Target header: AWS JSON calls name their operation in it \
             (X-Amz-Target: IoTSecuredTunneling.ListTunnels)",
        )),
        _ => Err(AwsError::new(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            format!(
                "{} is not an operation of IoTSecuredTunneling that culvert-relay serves",
                crate::audit::clip(target)
            ),
        )),
    };
    let (status, resp) = match result {
        Ok(v) => (StatusCode::OK, respond(StatusCode::OK, &v, None)),
        Err(e) => (e.status, e.into_response()),
    };
    if changes || !status.is_success() {
        state.audit.record(
            "api",
            json!({
                "operator": p.label(),
                "key": p.key_id(),
                "aws": crate::audit::clip(&operation),
                "status": status.as_u16(),
            }),
        );
    }
    resp
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AwsError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        AwsError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("request body: {e}"),
        )
    })
}

/// AWS's refusal of an action, with culvert's reason.
fn denied(state: &AppState, p: &Principal, action: &str, resource: &str, d: Denied) -> AwsError {
    state.audit.record(
        "denied",
        json!({"operator": p.label(), "action": action, "message": d.to_string()}),
    );
    AwsError::new(
        StatusCode::FORBIDDEN,
        "AccessDeniedException",
        format!(
            "User: arn:aws:iam::{}:user/{} is not authorized to perform: iot:{action} on resource: {resource} because {d}",
            state.aws.account_id,
            p.label()
        ),
    )
}

fn thing_arn(state: &AppState, thing: &str) -> String {
    format!(
        "arn:aws:iot:{}:{}:thing/{thing}",
        state.aws.region, state.aws.account_id
    )
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DestinationConfig {
    thing_name: Option<String>,
    #[serde(default)]
    services: Vec<String>,
}

#[derive(Deserialize)]
struct Tag {
    key: String,
    value: String,
}

fn tag_map(tags: Vec<Tag>) -> Result<BTreeMap<String, String>, AwsError> {
    let mut out = BTreeMap::new();
    for t in tags {
        if out.insert(t.key.clone(), t.value).is_some() {
            return Err(AwsError::validation(format!(
                "tag key {:?} is given twice",
                t.key
            )));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenInput {
    description: Option<String>,
    tags: Option<Vec<Tag>>,
    destination_config: Option<DestinationConfig>,
    timeout_config: Option<TimeoutConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutConfig {
    max_lifetime_timeout_minutes: Option<u32>,
}

async fn open(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: OpenInput = parse(body)?;
    let dest = b.destination_config.unwrap_or_default();
    let Some(thing) = dest.thing_name else {
        return Err(AwsError::validation(
            "destinationConfig.thingName is required by culvert-relay: it names the device to \
             notify and the grants that allow reaching it (--destination-config thingName=NAME,services=SSH)",
        ));
    };
    if let Err(d) = state
        .access
        .require(p, Role::Operator, "opening a tunnel")
        .and_then(|()| state.access.may_reach(p, &thing, &dest.services))
    {
        return Err(denied(state, p, "OpenTunnel", &thing_arn(state, &thing), d));
    }
    // AWS's API has no reason field: where the relay asks for one, the description is it.
    if state.access.require_reason && b.description.as_deref().is_none_or(|d| d.trim().is_empty()) {
        return Err(AwsError::validation(
            "this relay requires a reason for every tunnel: give it as the description (--description \"…\")",
        ));
    }
    let req = OpenRequest {
        thing_name: thing,
        services: dest.services,
        lifetime_minutes: b
            .timeout_config
            .and_then(|t| t.max_lifetime_timeout_minutes)
            .unwrap_or(OpenRequest::DEFAULT_LIFETIME_MINUTES),
        reason: state
            .access
            .require_reason
            .then(|| b.description.clone())
            .flatten(),
        description: b.description,
        tags: tag_map(b.tags.unwrap_or_default())?,
        opened_by: p.operator().map(str::to_owned),
        opened_key: p.key_id().map(str::to_owned),
    };
    let (view, tokens) = state.registry.open(req).await?;
    crate::api::opened(state, p, &view, &tokens).await;
    Ok(json!({
        "tunnelId": view.rec.id,
        "tunnelArn": state.aws.tunnel_arn(&view.rec.id),
        "sourceAccessToken": tokens.source,
        "destinationAccessToken": tokens.destination,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TunnelIdInput {
    tunnel_id: Option<String>,
    #[serde(default)]
    delete: Option<bool>,
}

fn tunnel_id(id: Option<String>) -> Result<String, AwsError> {
    match id {
        Some(id) if !id.is_empty() && id.len() <= 128 => Ok(id),
        _ => Err(AwsError::validation(
            "1 validation error detected: Value at 'tunnelId' failed to satisfy constraint: \
             Member must not be null and have 1-128 characters",
        )),
    }
}

/// Tunnel `id` if `p` may see it; a tunnel they may not see is refused as AWS refuses a
/// resource outside a policy.
async fn visible(
    state: &AppState,
    p: &Principal,
    id: &str,
    action: &str,
) -> Result<TunnelView, AwsError> {
    let v = state.registry.describe(id).await?;
    if state.access.may_see(p, &v.rec.thing_name) {
        return Ok(v);
    }
    let d = state
        .access
        .may_reach(p, &v.rec.thing_name, &v.rec.services)
        .err()
        .unwrap_or_else(|| Denied::Forbidden("not within your grants".into()));
    Err(denied(state, p, action, &state.aws.tunnel_arn(id), d))
}

/// `p` may change tunnel `v` (operator role, within their grants).
fn may_change(
    state: &AppState,
    p: &Principal,
    v: &TunnelView,
    action: &str,
    what: &str,
) -> Result<(), AwsError> {
    state
        .access
        .require(p, Role::Operator, what)
        .and_then(|()| {
            state
                .access
                .may_reach(p, &v.rec.thing_name, &v.rec.services)
        })
        .map_err(|d| denied(state, p, action, &state.aws.tunnel_arn(&v.rec.id), d))
}

async fn close(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: TunnelIdInput = parse(body)?;
    let id = tunnel_id(b.tunnel_id)?;
    let delete = b.delete.unwrap_or(false);
    let v = visible(state, p, &id, "CloseTunnel").await?;
    may_change(state, p, &v, "CloseTunnel", "closing a tunnel")?;
    let v = state.registry.close(&id, delete).await?;
    state.audit.record(
        "tunnel_close",
        json!({"operator": p.label(), "tunnel": id, "thing": v.rec.thing_name, "deleted": delete}),
    );
    Ok(json!({}))
}

async fn describe(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: TunnelIdInput = parse(body)?;
    let id = tunnel_id(b.tunnel_id)?;
    let v = visible(state, p, &id, "DescribeTunnel").await?;
    Ok(json!({"tunnel": tunnel_json(&state.aws, &v)}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListInput {
    thing_name: Option<String>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

fn encode_next(created_ms: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_ms}.{id}"))
}

fn decode_next(token: &str) -> Option<(i64, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (c, id) = text.split_once('.')?;
    Some((c.parse().ok()?, id.to_owned()))
}

async fn list(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: ListInput = parse(body)?;
    let max = b.max_results.unwrap_or(100);
    if !(1..=100).contains(&max) {
        return Err(AwsError::validation(format!(
            "1 validation error detected: Value '{max}' at 'maxResults' failed to satisfy \
             constraint: Member must have value between 1 and 100"
        )));
    }
    let after = match b.next_token.as_deref() {
        None => None,
        Some(t) => Some(
            decode_next(t)
                .ok_or_else(|| AwsError::validation("nextToken is not one this relay issued"))?,
        ),
    };
    let (page, next) = state
        .registry
        .list(b.thing_name.as_deref(), None, after, max as usize)
        .await?;
    let summaries: Vec<Value> = page
        .iter()
        .filter(|v| state.access.may_see(p, &v.rec.thing_name))
        .map(|v| summary_json(&state.aws, v))
        .collect();
    let mut out = json!({"tunnelSummaries": summaries});
    if let Some((c, id)) = next {
        out["nextToken"] = json!(encode_next(c, &id));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotateInput {
    tunnel_id: Option<String>,
    client_mode: Option<String>,
    destination_config: Option<DestinationConfig>,
}

async fn rotate(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: RotateInput = parse(body)?;
    let id = tunnel_id(b.tunnel_id)?;
    let which = match b.client_mode.as_deref() {
        Some("SOURCE") => RotateWhich::Source,
        Some("DESTINATION") => RotateWhich::Destination,
        Some("ALL") => RotateWhich::All,
        other => {
            return Err(AwsError::validation(format!(
                "1 validation error detected: Value {other:?} at 'clientMode' failed to satisfy \
                 constraint: Member must satisfy enum value set: [SOURCE, DESTINATION, ALL]"
            )));
        }
    };
    let v = visible(state, p, &id, "RotateTunnelAccessToken").await?;
    crate::api::may_rotate(state, p, &v).map_err(|d| {
        denied(
            state,
            p,
            "RotateTunnelAccessToken",
            &state.aws.tunnel_arn(&id),
            d,
        )
    })?;
    // A destinationConfig moves the destination (its thing defaults to the tunnel's own);
    // the operator must be allowed to reach where it goes, too.
    let retarget = b.destination_config.map(|d| Retarget {
        thing_name: d.thing_name.unwrap_or_else(|| v.rec.thing_name.clone()),
        services: d.services,
    });
    if let Some(r) = &retarget
        && let Err(d) = state.access.may_reach(p, &r.thing_name, &r.services)
    {
        return Err(denied(
            state,
            p,
            "RotateTunnelAccessToken",
            &thing_arn(state, &r.thing_name),
            d,
        ));
    }
    let tokens = state.registry.rotate(&id, which, retarget).await?;
    crate::api::rotated(
        state,
        p,
        &v,
        b.client_mode.as_deref().unwrap_or_default(),
        &tokens,
    )
    .await;
    let mut out = json!({"tunnelArn": state.aws.tunnel_arn(&id)});
    if let Some(s) = tokens.source {
        out["sourceAccessToken"] = json!(s);
    }
    if let Some(d) = tokens.destination {
        out["destinationAccessToken"] = json!(d);
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TagInput {
    resource_arn: Option<String>,
    tags: Option<Vec<Tag>>,
    tag_keys: Option<Vec<String>>,
}

fn resource(state: &AppState, arn: Option<String>) -> Result<String, AwsError> {
    let arn = arn.ok_or_else(|| {
        AwsError::validation(
            "1 validation error detected: Value null at 'resourceArn' failed to satisfy \
             constraint: Member must not be null",
        )
    })?;
    state.aws.tunnel_of(&arn)
}

/// TagResource and UntagResource: one store step on the tunnel's tags.
async fn retag(
    state: &AppState,
    p: &Principal,
    body: &[u8],
    action: &str,
    untag: bool,
) -> Result<Value, AwsError> {
    let b: TagInput = parse(body)?;
    let id = resource(state, b.resource_arn)?;
    let change = if untag {
        TagChange {
            remove: b.tag_keys.unwrap_or_default(),
            ..TagChange::default()
        }
    } else {
        TagChange {
            set: tag_map(b.tags.unwrap_or_default())?,
            ..TagChange::default()
        }
    };
    let v = visible(state, p, &id, action).await?;
    may_change(state, p, &v, action, "changing a tunnel's tags")?;
    let v = state.registry.retag(&id, change).await?;
    state.audit.record(
        "tunnel_tags",
        json!({"operator": p.label(), "tunnel": id, "tags": v.rec.tags}),
    );
    Ok(json!({}))
}

async fn list_tags(state: &AppState, p: &Principal, body: &[u8]) -> Result<Value, AwsError> {
    let b: TagInput = parse(body)?;
    let id = resource(state, b.resource_arn)?;
    let v = visible(state, p, &id, "ListTagsForResource").await?;
    Ok(json!({"tags": tags_list(&v.rec.tags)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_name_this_relays_tunnels_only() {
        let api = AwsApi::new("eu-west-1".into(), "123456789012".into());
        let arn = api.tunnel_arn("abc");
        assert_eq!(arn, "arn:aws:iot:eu-west-1:123456789012:tunnel/abc");
        assert_eq!(api.tunnel_of(&arn).unwrap(), "abc");
        let e = api
            .tunnel_of("arn:aws:iot:us-east-1:123456789012:tunnel/abc")
            .unwrap_err();
        assert_eq!(e.kind, "ResourceNotFoundException");
        for bad in [
            "abc",
            "arn:aws:iot:eu-west-1:123456789012:thing/abc",
            "arn:aws:s3:eu-west-1:123456789012:tunnel/x",
        ] {
            assert_eq!(
                api.tunnel_of(bad).unwrap_err().kind,
                "ValidationException",
                "{bad}"
            );
        }
    }

    #[test]
    fn next_tokens_round_trip_in_aws_characters() {
        let t = encode_next(1_700_000_000_123, "Zx9-_a");
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{t}"
        );
        assert_eq!(decode_next(&t), Some((1_700_000_000_123, "Zx9-_a".into())));
        assert_eq!(decode_next("!!"), None);
    }

    #[test]
    fn a_signature_is_accepted_once_and_the_memory_is_bounded() {
        let api = AwsApi::new("us-east-1".into(), "000000000000".into());
        assert!(api.first_sight("a", 100).unwrap());
        assert!(!api.first_sight("a", 101).unwrap());
        for i in 0..REPLAY_MEMORY - 1 {
            assert!(api.first_sight(&format!("s{i}"), 100).unwrap());
        }
        // Full of signatures still valid: refused until they age out.
        assert_eq!(
            api.first_sight("b", 100).unwrap_err().kind,
            "ThrottlingException"
        );
        assert!(api.first_sight("b", 100 + 2 * SKEW_SECS + 1).unwrap());
        assert!(!api.first_sight("b", 100 + 2 * SKEW_SECS + 2).unwrap());
    }
}
