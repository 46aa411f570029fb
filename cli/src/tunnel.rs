//! `culvert tunnel …`: manage tunnels through the relay's API. Human output by default,
//! `--json` prints the relay's JSON for scripts.

use serde_json::{Value, json};

use crate::api::{ApiClient, ApiError};
use crate::output::{print_json, s, shown};

pub struct OpenArgs {
    pub thing: String,
    pub services: Vec<String>,
    pub lifetime_minutes: Option<u32>,
    pub description: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<(String, String)>,
    /// Refuse to open when the gateway's last report does not show a rule for every service
    /// (or there is no report to check against).
    pub strict: bool,
}

/// What the gateway's last health report says about the services a tunnel is for.
#[derive(Debug, PartialEq, Eq)]
pub enum ServiceCheck {
    /// Nothing to check against; why.
    Unknown(String),
    Reported {
        /// The requested services the gateway has no rule for.
        missing: Vec<String>,
        /// The gateway's rules, for the message.
        rules: Vec<String>,
        /// Requested services whose target did not answer: name, target, why.
        down: Vec<(String, String, String)>,
        /// When the report came.
        at: String,
    },
}

/// Check `services` against `thing`'s last health report (`GET /devices`).
pub fn check_services(api: &ApiClient, thing: &str, services: &[String]) -> ServiceCheck {
    let v = match api.get("/devices", &[]) {
        Ok(v) => v,
        Err(e) => return ServiceCheck::Unknown(format!("the device list is not available: {e}")),
    };
    let device = v["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["thingName"] == thing));
    let Some(device) = device else {
        return ServiceCheck::Unknown(format!(
            "{thing} is not a device of this relay's broker, so it reports nothing here"
        ));
    };
    check_against(thing, &device["health"], services)
}

fn check_against(thing: &str, health: &Value, services: &[String]) -> ServiceCheck {
    let Some(reported) = health["services"].as_array() else {
        return ServiceCheck::Unknown(format!(
            "{thing}'s gateway has not reported its services (culvertd's [mqtt] \
             health_report_secs turns reports on)"
        ));
    };
    let rules: Vec<String> = reported
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    let missing = services
        .iter()
        .filter(|s| !rules.contains(s))
        .cloned()
        .collect();
    let down = reported
        .iter()
        .filter(|r| r["state"] == "down" && services.iter().any(|s| r["name"] == **s))
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (text("name"), text("target"), text("detail"))
        })
        .collect();
    ServiceCheck::Reported {
        missing,
        rules,
        down,
        at: health["reportedAt"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Warn on stderr of what `check` found; the refusal for `--strict`, if it applies.
pub fn warn_of(thing: &str, check: &ServiceCheck, strict: bool) -> Result<(), ApiError> {
    match check {
        ServiceCheck::Unknown(why) if strict => Err(ApiError::Refused(format!(
            "--strict: cannot check that {thing} has rules for these services: {why}"
        ))),
        ServiceCheck::Unknown(why) => {
            eprintln!(
                "culvert: note: not checked that {thing} has rules for these services: {why}"
            );
            Ok(())
        }
        ServiceCheck::Reported {
            missing,
            rules,
            down,
            at,
        } => {
            for (name, target, why) in down {
                eprintln!(
                    "culvert: warning: {thing}'s target for {name} ({}) did not answer at {at}: {}",
                    shown(target),
                    shown(why)
                );
            }
            if missing.is_empty() {
                return Ok(());
            }
            let msg = format!(
                "{thing} has no rule for {} (its gateway's rules: {}; reported {at}); \
                 connections to {} would be refused",
                missing.join(", "),
                if rules.is_empty() {
                    "none".into()
                } else {
                    rules.join(", ")
                },
                if missing.len() == 1 { "it" } else { "them" },
            );
            if strict {
                return Err(ApiError::Refused(format!("--strict: {msg}")));
            }
            eprintln!("culvert: warning: {msg} (--strict refuses to open such a tunnel)");
            Ok(())
        }
    }
}

pub fn open(api: &ApiClient, a: OpenArgs, as_json: bool) -> Result<(), ApiError> {
    // Before opening: --strict opens nothing it would refuse.
    let check = check_services(api, &a.thing, &a.services);
    warn_of(&a.thing, &check, a.strict)?;
    let mut body = json!({"thingName": a.thing, "services": a.services});
    if let Some(m) = a.lifetime_minutes {
        body["lifetimeMinutes"] = json!(m);
    }
    if let Some(d) = a.description {
        body["description"] = json!(d);
    }
    if let Some(r) = a.reason {
        body["reason"] = json!(r);
    }
    if !a.tags.is_empty() {
        body["tags"] = Value::Object(a.tags.into_iter().map(|(k, v)| (k, json!(v))).collect());
    }
    let v = api.post("/tunnels", &body)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let services: Vec<&str> = v["services"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "tunnel {} opened for thing {}",
        s(&v, "tunnelId"),
        s(&v, "thingName")
    );
    println!("  services           {}", services.join(", "));
    println!("  expires            {}", s(&v, "expiresAt"));
    println!("  source token       {}", s(&v, "sourceAccessToken"));
    println!("  destination token  {}", s(&v, "destinationAccessToken"));
    let mapping: Vec<String> = services
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{s}={}", 5555 + i))
        .collect();
    println!();
    // In the environment, not on the command line, where `ps` would show it to every user.
    println!(
        "operator side:  CULVERT_ACCESS_TOKEN={} culvert connect -s {}",
        s(&v, "sourceAccessToken"),
        mapping.join(",")
    );
    Ok(())
}

pub fn list(
    api: &ApiClient,
    thing: Option<String>,
    status: Option<String>,
    max: Option<u32>,
    as_json: bool,
) -> Result<(), ApiError> {
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut q = Vec::new();
        if let Some(t) = &thing {
            q.push(("thingName", t.clone()));
        }
        if let Some(st) = &status {
            q.push(("status", st.to_ascii_uppercase()));
        }
        q.push(("maxResults", max.unwrap_or(100).min(100).to_string()));
        if let Some(n) = &next {
            q.push(("nextToken", n.clone()));
        }
        let v = api.get("/tunnels", &q)?;
        all.extend(v["tunnels"].as_array().cloned().unwrap_or_default());
        next = v["nextToken"].as_str().map(str::to_owned);
        let enough = max.is_some_and(|m| all.len() >= m as usize);
        if next.is_none() || enough {
            break;
        }
    }
    if let Some(m) = max {
        all.truncate(m as usize);
    }
    if as_json {
        print_json(&json!({"tunnels": all}));
        return Ok(());
    }
    if all.is_empty() {
        println!("no tunnels");
        return Ok(());
    }
    println!(
        "{:<36}  {:<20}  {:<6}  {:<12}  {:<12}  CREATED",
        "TUNNEL", "THING", "STATUS", "SOURCE", "DESTINATION"
    );
    for t in &all {
        println!(
            "{:<36}  {:<20}  {:<6}  {:<12}  {:<12}  {}",
            s(t, "tunnelId"),
            s(t, "thingName"),
            s(t, "status"),
            s(&t["sourceConnectionState"], "status"),
            s(&t["destinationConnectionState"], "status"),
            s(t, "createdAt")
        );
    }
    Ok(())
}

pub fn describe(api: &ApiClient, id: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.get(&format!("/tunnels/{id}"), &[])?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    print_tunnel(&v);
    Ok(())
}

fn print_tunnel(v: &Value) {
    let services: Vec<&str> = v["services"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("tunnel       {}", s(v, "tunnelId"));
    println!("thing        {}", s(v, "thingName"));
    println!("status       {}", s(v, "status"));
    println!("services     {}", services.join(", "));
    if let Some(d) = v["description"].as_str() {
        println!("description  {}", shown(d));
    }
    if let Some(o) = v["openedBy"].as_str() {
        println!("opened by    {}", shown(o));
    }
    if let Some(r) = v["reason"].as_str() {
        println!("reason       {}", shown(r));
    }
    if let Some(tags) = v["tags"].as_object().filter(|t| !t.is_empty()) {
        let tags: Vec<String> = tags
            .iter()
            .map(|(k, v)| format!("{}={}", shown(k), shown(v.as_str().unwrap_or(""))))
            .collect();
        println!("tags         {}", tags.join(", "));
    }
    println!("created      {}", s(v, "createdAt"));
    println!("expires      {}", s(v, "expiresAt"));
    if let Some(c) = v["closedAt"].as_str() {
        println!("closed       {c} ({})", s(v, "closeReason"));
    }
    if v["health"].is_object() {
        println!("at the gateway, as of {}:", s(&v["health"], "reportedAt"));
        print_health(&v["health"], Some(&services));
    }
    if let Some(o) = v["onSite"].as_object() {
        let mut line = format!(
            "{} since {}",
            s(&v["onSite"], "state"),
            s(&v["onSite"], "since")
        );
        if let Some(by) = o.get("by").and_then(Value::as_str) {
            line.push_str(&format!(" by {}", shown(by)));
        }
        if let Some(d) = o.get("detail").and_then(Value::as_str) {
            line.push_str(&format!(": {}", shown(d)));
        }
        println!("on site      {line}");
    }
    for (label, key) in [
        ("source     ", "sourceConnectionState"),
        ("destination", "destinationConnectionState"),
    ] {
        println!(
            "{label}  {} since {}",
            s(&v[key], "status"),
            s(&v[key], "lastUpdatedAt")
        );
    }
}

pub fn close(api: &ApiClient, id: &str, delete: bool, as_json: bool) -> Result<(), ApiError> {
    let v = api.post(&format!("/tunnels/{id}/close"), &json!({"delete": delete}))?;
    if as_json {
        print_json(&v);
    } else if delete {
        println!("tunnel {id} closed and deleted");
    } else {
        println!("tunnel {id} closed");
    }
    Ok(())
}

pub fn rotate(api: &ApiClient, id: &str, mode: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.post(
        &format!("/tunnels/{id}/rotate"),
        &json!({"clientMode": mode}),
    )?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    println!("tunnel {id}: new tokens issued; the old ones no longer work");
    if let Some(t) = v["sourceAccessToken"].as_str() {
        println!("  source token       {t}");
    }
    if let Some(t) = v["destinationAccessToken"].as_str() {
        println!("  destination token  {t}");
    }
    Ok(())
}

/// `culvert device add`: register a gateway on the relay's embedded MQTT broker, and print the
/// gateway's `[relay]` and `[mqtt]` settings: `relay` and `ca` are this CLI's own (the relay it
/// talks to, and the CA file it trusts, which the gateway needs a copy of).
pub fn device_add(
    api: &ApiClient,
    thing: &str,
    tags: &[(String, String)],
    relay: &str,
    ca: Option<&std::path::Path>,
    as_json: bool,
) -> Result<(), ApiError> {
    let mut body = json!({"thingName": thing});
    if !tags.is_empty() {
        body["tags"] = tag_map(tags);
    }
    let v = api.post("/devices", &body)?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let broker = v["broker"].as_str().unwrap_or("RELAY-HOST:8883");
    println!("device {thing} registered; its password is shown only now.");
    println!();
    println!("In the gateway's culvertd.toml:");
    println!();
    println!("[relay]");
    println!("endpoint = \"{}\"", shown(relay));
    if let Some(ca) = ca {
        println!(
            "ca = \"/etc/culvert/relay-ca.pem\"   # a copy of {} (the relay's CA)",
            shown(&ca.display().to_string())
        );
    }
    println!();
    println!("[mqtt]");
    println!("broker = \"mqtts://{broker}\"");
    println!("thing_name = \"{thing}\"");
    println!("health_report_secs = 30   # report whether each rule's target answers");
    println!(
        "password = \"{}\"   # or password_file = \"/etc/culvert/mqtt-password\"",
        s(&v, "password")
    );
    Ok(())
}

fn tag_map(tags: &[(String, String)]) -> serde_json::Value {
    tags.iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `line=2, site=campus`.
fn tags_shown(d: &serde_json::Value) -> String {
    d["tags"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(k, v)| format!("{}={}", shown(k), shown(v.as_str().unwrap_or_default())))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

pub fn device_tag(
    api: &ApiClient,
    thing: &str,
    tags: &[(String, String)],
    as_json: bool,
) -> Result<(), ApiError> {
    let v = api.post(
        &format!("/devices/{thing}/tags"),
        &json!({ "tags": tag_map(tags) }),
    )?;
    if as_json {
        print_json(&v);
    } else {
        println!("device {thing} tags: {}", tags_shown(&v));
    }
    Ok(())
}

pub fn device_list(api: &ApiClient, as_json: bool) -> Result<(), ApiError> {
    let v = api.get("/devices", &[])?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let list = v["devices"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no devices");
    }
    for d in &list {
        let seen = match (d["online"].as_bool(), d["lastSeen"].as_str()) {
            (Some(true), _) => "online".to_owned(),
            (_, Some(at)) => format!("offline, last seen {at}"),
            _ => "never connected".to_owned(),
        };
        println!(
            "{:<40}  {seen}  registered {}  {}",
            s(d, "thingName"),
            s(d, "createdAt"),
            tags_shown(d)
        );
        if d["health"].is_object() {
            println!(
                "  its rules' targets, as of {}:",
                s(&d["health"], "reportedAt")
            );
            print_health(&d["health"], None);
        }
    }
    Ok(())
}

/// The lines of a health report: each service's target and whether it answered (only those
/// in `only`, when given, with the ones the gateway has no rule for).
fn print_health(health: &Value, only: Option<&[&str]>) {
    let Some(services) = health["services"].as_array() else {
        return;
    };
    for r in services {
        let name = s(r, "name");
        if only.is_some_and(|o| !o.contains(&&*name)) {
            continue;
        }
        let state = match r["state"].as_str() {
            Some("up") => "answers".to_owned(),
            Some("down") => format!("DOWN: {}", s(r, "detail")),
            Some("no_rule") => "NO RULE on this gateway: connections are refused".to_owned(),
            Some("unchecked") => s(r, "detail").into_owned(),
            other => shown(other.unwrap_or("?")).into_owned(),
        };
        let target = match r["target"].as_str() {
            Some(t) => format!(" {}", shown(t)),
            None => String::new(),
        };
        println!("  {name:<12}{target}  {state}");
    }
}

pub fn device_remove(api: &ApiClient, thing: &str, as_json: bool) -> Result<(), ApiError> {
    let v = api.delete(&format!("/devices/{thing}"))?;
    if as_json {
        print_json(&v);
    } else {
        println!("device {thing} removed");
    }
    Ok(())
}
