//! `culvert operator …`, `culvert whoami` and `culvert access …`: operators, their API keys,
//! their grants and their access requests, through the relay's `/api/v1/operators` and
//! `/api/v1/requests`.

use serde_json::{Value, json};

use crate::api::{ApiClient, ApiError};
use crate::output::{print_json, s, shown};

fn strings(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|s| shown(s).into_owned())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn grant_line(g: &Value) -> String {
    let mut line = format!(
        "{}  {}: {}",
        s(g, "grantId"),
        strings(&g["things"]),
        strings(&g["services"])
    );
    if let Some(t) = g["notBefore"].as_str() {
        line += &format!("  from {}", shown(t));
    }
    if let Some(t) = g["notAfter"].as_str() {
        line += &format!("  until {}", shown(t));
    }
    if g["revokedAt"].is_string() {
        line += "  (revoked)";
    } else if g["inForce"] == json!(false) {
        line += "  (not in force now)";
    }
    line
}

fn print_operator(o: &Value) {
    let state = if o["disabled"] == json!(true) {
        "  (disabled)"
    } else {
        ""
    };
    println!("operator  {}  {}{state}", s(o, "name"), s(o, "role"));
    for k in o["keys"].as_array().into_iter().flatten() {
        let mut line = format!("  key     {}", s(k, "keyId"));
        if let Some(id) = k["accessKeyId"].as_str() {
            line += &format!("  AWS {}", shown(id));
        }
        if let Some(l) = k["label"].as_str() {
            line += &format!("  {}", shown(l));
        }
        if k["revokedAt"].is_string() {
            line += "  (revoked)";
        } else if let Some(t) = k["expiresAt"].as_str() {
            line += &format!("  expires {}", shown(t));
        }
        println!("{line}");
    }
    for g in o["grants"].as_array().into_iter().flatten() {
        println!("  grant   {}", grant_line(g));
    }
}

/// `culvert whoami`.
pub fn whoami(api: &ApiClient, as_json: bool) -> Result<Value, ApiError> {
    let v = api.get("/operators/me", &[])?;
    if as_json {
        print_json(&v);
    } else if v["bootstrap"] == json!(true) {
        println!("the relay's bootstrap API key (admin; add operators with culvert operator add)");
    } else {
        print_operator(&v);
    }
    Ok(v)
}

pub fn add(api: &ApiClient, name: &str, role: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.post("/operators", &json!({"name": name, "role": role}))?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("operator {} added as {}", s(&v, "name"), s(&v, "role"));
    println!("  API key  {}", s(&v, "apiKey"));
    println!("Shown once: hand it to {} (culvert login).", s(&v, "name"));
    println!(
        "They can reach nothing yet: culvert operator grant add {} --thing NAME --service SSH",
        s(&v, "name")
    );
    Ok(())
}

pub fn list(api: &ApiClient, as_json: bool) -> Result<(), ApiError> {
    let v = api.get("/operators", &[])?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let all = v["operators"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        println!("no operators (only the bootstrap API key)");
    }
    for o in &all {
        print_operator(o);
    }
    Ok(())
}

pub fn set_disabled(
    api: &ApiClient,
    name: &str,
    disabled: bool,
    as_json: bool,
) -> Result<(), ApiError> {
    let what = if disabled { "disable" } else { "enable" };
    let v = api.post(&format!("/operators/{name}/{what}"), &json!({}))?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("operator {} {what}d", s(&v, "name"));
    let closed = strings(&v["tunnelsClosed"]);
    if !closed.is_empty() {
        println!("  tunnels closed: {closed}");
    }
    Ok(())
}

pub fn set_password(
    api: &ApiClient,
    name: &str,
    password: &str,
    as_json: bool,
) -> Result<(), ApiError> {
    let v = api.post(
        &format!("/operators/{name}/password"),
        &json!({ "password": password }),
    )?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "password of {} set: `culvert login --user {}` uses it",
        s(&v, "name"),
        s(&v, "name")
    );
    Ok(())
}

pub fn key_create(
    api: &ApiClient,
    name: &str,
    label: Option<String>,
    expires_in_days: Option<u32>,
    aws: bool,
    as_json: bool,
) -> Result<(), ApiError> {
    let mut body = json!({});
    if aws {
        body["kind"] = json!("aws");
    }
    if let Some(l) = label {
        body["label"] = json!(l);
    }
    if let Some(d) = expires_in_days {
        body["expiresInDays"] = json!(d);
    }
    let v = api.post(&format!("/operators/{name}/keys"), &body)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("key {} for {}", s(&v, "keyId"), s(&v, "name"));
    if aws {
        println!("  AWS_ACCESS_KEY_ID      {}", s(&v, "accessKeyId"));
        println!("  AWS_SECRET_ACCESS_KEY  {}", s(&v, "secretAccessKey"));
        println!("  AWS_DEFAULT_REGION     {}", s(&v, "region"));
    } else {
        println!("  API key  {}", s(&v, "apiKey"));
    }
    if let Some(t) = v["expiresAt"].as_str() {
        println!("  expires  {}", shown(t));
    }
    println!("Shown once.");
    Ok(())
}

pub fn key_revoke(api: &ApiClient, name: &str, id: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.post(&format!("/operators/{name}/keys/{id}/revoke"), &json!({}))?;
    if as_json {
        print_json(&v);
    } else {
        println!("key {id} of {name} revoked");
    }
    Ok(())
}

pub struct GrantArgs {
    pub things: Vec<String>,
    pub services: Vec<String>,
    pub from: Option<String>,
    pub until: Option<String>,
    pub minutes: Option<u32>,
}

pub fn grant_add(api: &ApiClient, name: &str, g: GrantArgs, as_json: bool) -> Result<(), ApiError> {
    let mut body = json!({"things": g.things, "services": g.services});
    if let Some(t) = g.from {
        body["notBefore"] = json!(t);
    }
    if let Some(t) = g.until {
        body["notAfter"] = json!(t);
    }
    if let Some(m) = g.minutes {
        body["durationMinutes"] = json!(m);
    }
    let v = api.post(&format!("/operators/{name}/grants"), &body)?;
    if as_json {
        print_json(&v);
    } else {
        println!("granted to {name}: {}", grant_line(&v));
    }
    Ok(())
}

pub fn grant_revoke(api: &ApiClient, name: &str, id: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.post(&format!("/operators/{name}/grants/{id}/revoke"), &json!({}))?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("grant {id} of {name} revoked");
    let closed = strings(&v["tunnelsClosed"]);
    if !closed.is_empty() {
        println!("  tunnels closed: {closed}");
    }
    Ok(())
}

fn request_line(r: &Value) -> String {
    let mut line = format!(
        "{}  {:<8}  {}  {}/{}  {} min",
        s(r, "requestId"),
        s(r, "state"),
        s(r, "operator"),
        s(r, "thingName"),
        strings(&r["services"]),
        r["durationMinutes"].as_u64().unwrap_or(0)
    );
    if let Some(t) = r["notBefore"].as_str() {
        line += &format!(" from {}", shown(t));
    }
    line += &format!("  \"{}\"", s(r, "reason"));
    if let Some(by) = r["decidedBy"].as_str() {
        line += &format!("  by {}", shown(by));
    }
    if let Some(w) = r["why"].as_str() {
        line += &format!(": {}", shown(w));
    }
    line
}

pub struct RequestArgs {
    pub thing: String,
    pub services: Vec<String>,
    pub from: Option<String>,
    pub minutes: u32,
    pub reason: String,
}

/// `culvert access request`.
pub fn request(api: &ApiClient, r: RequestArgs, as_json: bool) -> Result<(), ApiError> {
    let mut body = json!({
        "thingName": r.thing,
        "services": r.services,
        "durationMinutes": r.minutes,
        "reason": r.reason,
    });
    if let Some(t) = r.from {
        body["notBefore"] = json!(t);
    }
    let v = api.post("/requests", &body)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("requested: {}", request_line(&v));
    println!(
        "An admin decides it: culvert access approve {} (or refuse)",
        s(&v, "requestId")
    );
    Ok(())
}

/// `culvert access list`.
pub fn requests(api: &ApiClient, pending: bool, as_json: bool) -> Result<(), ApiError> {
    let q = if pending {
        vec![("state", "pending".to_owned())]
    } else {
        Vec::new()
    };
    let v = api.get("/requests", &q)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let all = v["requests"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        println!("no access requests");
    }
    for r in &all {
        println!("{}", request_line(r));
    }
    Ok(())
}

/// `culvert audit`: one line per record, newest first (`--json`: the records as the relay
/// sent them).
pub fn audit(api: &ApiClient, query: &[(&str, String)], as_json: bool) -> Result<(), ApiError> {
    let v = api.get("/audit", query)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let all = v["records"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        println!("no audit records match");
    }
    for r in &all {
        let mut rest = r.as_object().cloned().unwrap_or_default();
        let mut take = |k: &str| match rest.remove(k) {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let (ts, event) = (take("ts"), take("event"));
        for k in ["seq", "prev", "hash"] {
            rest.remove(k);
        }
        println!("{ts}  {event:<16} {}", Value::Object(rest));
    }
    if v["truncated"] == true {
        println!("(only the newest part of the audit file was searched: narrow the filters)");
    }
    Ok(())
}

/// `culvert access approve|refuse`.
pub fn decide(
    api: &ApiClient,
    id: &str,
    approve: bool,
    why: Option<String>,
    as_json: bool,
) -> Result<(), ApiError> {
    let (path, body) = if approve {
        (format!("/requests/{id}/approve"), json!({}))
    } else {
        (format!("/requests/{id}/refuse"), json!({"why": why}))
    };
    let v = api.post(&path, &body)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("{}", request_line(&v));
    if v["grant"].is_object() {
        println!("  grant   {}", grant_line(&v["grant"]));
    }
    Ok(())
}
