//! Operators, grants and the audit trail, as an admin and an operator use them: the real
//! culvert-relay, culvertd and `culvert` binaries as separate processes.
//!
//! - an operator granted `cell-7/ECHO` opens that and nothing else, and every refusal names
//!   the missing grant and who can give it; a grant by device tag follows the tags;
//! - a viewer sees, but cannot open; keys are revocable; `culvert login` saves a key, or
//!   trades an operator's password for one that expires;
//! - disabling an operator, or revoking their grant, ends their live connection at once;
//! - an access request, once approved, opens exactly what was asked; a refused one nothing;
//! - a relay that requires reasons refuses a tunnel without one, and stores the reason;
//! - the operator and reason reach the gateway's audit trail, through the notification;
//! - the site's consent switch refuses new connections while off and ends live ones;
//! - a site that approves each tunnel holds its connections (bytes kept) until someone there
//!   runs `culvertd consent approve`, contacting no target before; the operator sees "waiting"
//!   and then who approved; a refusal closes the tunnel and `culvert open` says who refused
//!   and why; a local HMI approves over HTTP with its token (and not without);
//! - the relay's audit file verifies with `culvert-relay audit verify`, and a one-byte edit is
//!   found, with its line.
//!
//! Time-boxed grants run out on a clock the test controls: `relay/src/access.rs`' unit tests.

use std::io::{Read, Write};
use std::process::{Command, Output};

use culvert_e2e::*;

/// `culvert --json <args>` with `key`: its output.
fn as_key(relay: &Relay, key: &str, args: &[&str]) -> Output {
    relay
        .culvert()
        .env("CULVERT_API_KEY", key)
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

/// `culvert whoami` with no relay, key or CA given: the ones saved in `creds`.
fn whoami_saved(creds: &std::path::Path, what: &str) -> serde_json::Value {
    let out = Command::new(bin("culvert"))
        .args(["--json", "whoami"])
        .env("CULVERT_CREDENTIALS", creds)
        .env_remove("CULVERT_RELAY")
        .env_remove("CULVERT_API_KEY")
        .env_remove("CULVERT_CA")
        .output()
        .unwrap();
    ok_json(what, out)
}

fn ok_json(what: &str, out: Output) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed: {}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn refused(what: &str, out: Output) -> String {
    assert!(!out.status.success(), "{what} was allowed");
    stderr_of(&out)
}

/// Add an operator with the bootstrap key; their first API key.
fn add_operator(relay: &Relay, name: &str, role: &str) -> String {
    let v = relay.api(&["operator", "add", name, "--role", role]);
    v["apiKey"].as_str().unwrap().to_owned()
}

fn audit_verify(files: &[&std::path::Path]) -> Output {
    Command::new(bin("culvert-relay"))
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn an_operator_reaches_exactly_their_grants_and_refusals_say_who_can_grant_more() {
    let dir = scratch("access-scope");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    let vera = add_operator(&relay, "vera", "viewer");
    // Nothing granted yet.
    let e = refused(
        "alice opening before any grant",
        as_key(
            &relay,
            &alice,
            &["tunnel", "open", "--thing", "cell-7", "--service", "ECHO"],
        ),
    );
    assert!(
        e.contains("HTTP 403")
            && e.contains("alice has no grant for cell-7/ECHO (their grants: none in force)")
            && e.contains("culvert operator grant add alice --thing cell-7 --service ECHO"),
        "{e}"
    );
    relay.api(&[
        "operator",
        "grant",
        "add",
        "alice",
        "--thing",
        "cell-7",
        "--service",
        "ECHO",
    ]);
    relay.api(&[
        "operator",
        "grant",
        "add",
        "vera",
        "--thing",
        "cell-*",
        "--service",
        "*",
    ]);
    let t = ok_json(
        "alice opening cell-7/ECHO",
        as_key(
            &relay,
            &alice,
            &["tunnel", "open", "--thing", "cell-7", "--service", "ECHO"],
        ),
    );
    let id = t["tunnelId"].as_str().unwrap();
    assert_eq!(relay.describe(id)["openedBy"], "alice");
    for (args, missing) in [
        (["--thing", "cell-8", "--service", "ECHO"], "cell-8/ECHO"),
        (["--thing", "cell-7", "--service", "SSH"], "cell-7/SSH"),
    ] {
        let mut a = vec!["tunnel", "open"];
        a.extend(args);
        let e = refused(
            &format!("alice opening {missing}"),
            as_key(&relay, &alice, &a),
        );
        assert!(
            e.contains(&format!(
                "alice has no grant for {missing} (their grants: cell-7: ECHO)"
            )),
            "{e}"
        );
    }
    // A viewer sees tunnels of the things granted, and cannot open one.
    let e = refused(
        "vera opening",
        as_key(
            &relay,
            &vera,
            &["tunnel", "open", "--thing", "cell-7", "--service", "ECHO"],
        ),
    );
    assert!(
        e.contains("vera is a viewer; opening a tunnel needs the operator role"),
        "{e}"
    );
    let listed = ok_json("vera listing", as_key(&relay, &vera, &["tunnel", "list"]));
    assert_eq!(listed["tunnels"][0]["tunnelId"], id, "{listed}");
    // Tunnels outside an operator's grants are neither listed nor described to them.
    relay.open_tunnel("plant-9", &["ECHO"]);
    let listed = ok_json("alice listing", as_key(&relay, &alice, &["tunnel", "list"]));
    let things: Vec<&str> = listed["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["thingName"].as_str().unwrap())
        .collect();
    assert_eq!(things, ["cell-7"]);
    // Only admins manage operators.
    let e = refused(
        "alice adding an operator",
        as_key(&relay, &alice, &["operator", "add", "mallory"]),
    );
    assert!(
        e.contains("alice is an operator; adding operators needs the admin role"),
        "{e}"
    );
    // An operator manages their own keys; a revoked key stops at once.
    let k = ok_json(
        "alice creating a key of her own",
        as_key(
            &relay,
            &alice,
            &[
                "operator",
                "key",
                "create",
                "alice",
                "--expires-in-days",
                "1",
            ],
        ),
    );
    let second = k["apiKey"].as_str().unwrap();
    let with_second = ok_json(
        "a tunnel opened with the new key",
        as_key(
            &relay,
            second,
            &["tunnel", "open", "--thing", "cell-7", "--service", "ECHO"],
        ),
    );
    let kid = k["keyId"].as_str().unwrap();
    let v = ok_json(
        "revoking it",
        as_key(&relay, &alice, &["operator", "key", "revoke", "alice", kid]),
    );
    let e = refused("a revoked key", as_key(&relay, second, &["whoami"]));
    assert!(e.contains("HTTP 401") && e.contains("was revoked"), "{e}");
    // What was opened with a revoked key closes with it; what the other key opened stays.
    let closed = with_second["tunnelId"].as_str().unwrap();
    assert_eq!(v["tunnelsClosed"], serde_json::json!([closed]), "{v}");
    assert_eq!(relay.describe(closed)["closeReason"], "access_revoked");
    assert_eq!(relay.describe(id)["status"], "OPEN");
    // Another operator with the same grant may not take the tunnel's tokens by rotating.
    let bob = add_operator(&relay, "bob", "operator");
    relay.api(&[
        "operator",
        "grant",
        "add",
        "bob",
        "--thing",
        "cell-7",
        "--service",
        "ECHO",
    ]);
    let e = refused(
        "bob rotating alice's tunnel",
        as_key(&relay, &bob, &["tunnel", "rotate", id]),
    );
    assert!(
        e.contains("only whoever opened tunnel") && e.contains("(alice)"),
        "{e}"
    );
    // The bootstrap api_key of a relay set up before operators still does everything.
    relay.api(&["tunnel", "close", id]);
}

#[test]
fn a_grant_by_device_tag_reaches_the_tagged_things_and_a_retag_ends_its_tunnels() {
    let dir = scratch("access-tags");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    relay.api(&["device", "add", "--thing", "cell-7", "--tag", "line=2"]);
    relay.api(&["device", "add", "--thing", "cell-8", "--tag", "line=3"]);
    relay.api(&[
        "operator",
        "grant",
        "add",
        "alice",
        "--thing",
        "tag:line=2",
        "--service",
        "ECHO",
    ]);
    let open = |thing: &str| {
        as_key(
            &relay,
            &alice,
            &["tunnel", "open", "--thing", thing, "--service", "ECHO"],
        )
    };
    let t = ok_json("alice opening a thing tagged line=2", open("cell-7"));
    let id = t["tunnelId"].as_str().unwrap();
    let e = refused("alice opening a thing tagged line=3", open("cell-8"));
    assert!(
        e.contains("alice has no grant for cell-8/ECHO (their grants: tag:line=2: ECHO)"),
        "{e}"
    );
    let devices = relay.api(&["device", "list"]);
    assert_eq!(devices["devices"][0]["tags"]["line"], "2", "{devices}");
    // Moving cell-7 to another line takes the access with it: the open tunnel closes.
    let v = relay.api(&["device", "tag", "--thing", "cell-7", "line=4"]);
    assert_eq!(v["tags"]["line"], "4", "{v}");
    let closed = wait_for("the retagged thing's tunnel to close", || {
        let v = relay.describe(id);
        (v["status"] == "CLOSED").then_some(v)
    });
    assert_eq!(closed["closeReason"], "access_revoked", "{closed}");
    let e = refused("alice opening the retagged thing", open("cell-7"));
    assert!(e.contains("HTTP 403"), "{e}");
}

#[test]
fn culvert_login_saves_the_key_for_the_commands_that_follow() {
    let dir = scratch("access-login");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    let creds = dir.join("credentials.json");
    let mut login = relay.culvert();
    login
        .arg("login")
        .env("CULVERT_CREDENTIALS", &creds)
        .env("CULVERT_API_KEY", &alice);
    let out = login.output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("as alice (operator)"),
        "{}",
        stderr_of(&out)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the saved key is readable by its user alone");
    // No relay, key or CA given: the saved ones.
    let me = whoami_saved(&creds, "whoami with the saved key");
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("alice"), Some("operator"))
    );
    // A wrong key is not saved.
    let out = relay
        .culvert()
        .arg("login")
        .env("CULVERT_CREDENTIALS", dir.join("other.json"))
        .env("CULVERT_API_KEY", "ck-0123456789ab.nope")
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr_of(&out).contains("API key not accepted"));
    assert!(!dir.join("other.json").exists());
}

#[test]
fn a_password_login_issues_a_key_and_a_wrong_password_saves_nothing() {
    let dir = scratch("access-password");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    let bob = add_operator(&relay, "bob", "operator");
    let secret = "correct horse battery staple";
    let set = |key: &str, name: &str| {
        relay
            .culvert()
            .env("CULVERT_API_KEY", key)
            .env("CULVERT_PASSWORD", secret)
            .args(["--json", "operator", "password", name])
            .output()
            .unwrap()
    };
    // One's own password, yes; another operator's, no.
    let v = ok_json("alice setting her password", set(&alice, "alice"));
    assert_eq!(v["hasPassword"], true, "{v}");
    let out = set(&bob, "alice");
    assert!(
        !out.status.success() && stderr_of(&out).contains("setting another operator's password"),
        "{}",
        stderr_of(&out)
    );
    let login = |password: &str, creds: &std::path::Path| {
        relay
            .culvert()
            .args(["login", "--user", "alice"])
            .env("CULVERT_CREDENTIALS", creds)
            .env("CULVERT_PASSWORD", password)
            .output()
            .unwrap()
    };
    let creds = dir.join("credentials.json");
    let out = login(secret, &creds);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("as alice (operator)"),
        "{}",
        stderr_of(&out)
    );
    let me = whoami_saved(&creds, "whoami with the key the login issued");
    assert_eq!(me["name"], "alice");
    let key = me["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyId"] == me["keyId"])
        .cloned()
        .unwrap();
    assert_eq!(key["label"], "login");
    assert!(key["expiresAt"].is_string(), "a login key expires: {key}");

    let other = dir.join("other.json");
    let out = login("not the password", &other);
    assert!(
        !out.status.success() && stderr_of(&out).contains("name or password not accepted"),
        "{}",
        stderr_of(&out)
    );
    assert!(!other.exists());
    // The relay keeps only a hash, shows none, and records both attempts.
    let list = relay.api(&["operator", "list"]).to_string();
    assert!(!list.contains("argon2") && !list.contains(secret), "{list}");
    let audit = std::fs::read_to_string(find_audit(&relay)).unwrap();
    assert!(!audit.contains(secret) && !audit.contains("argon2"));
    let events: Vec<_> = audit_records(&find_audit(&relay))
        .iter()
        .filter_map(|r| r["event"].as_str().map(str::to_owned))
        .filter(|e| e.starts_with("login") || e == "password_set")
        .collect();
    assert_eq!(
        events,
        ["password_set", "login", "login_refused"],
        "{events:?}"
    );
}

/// Open a tunnel as `key` to `thing`/ECHO, with a gateway and a proxy; a live connection.
fn live_connection(
    relay: &Relay,
    dir: &std::path::Path,
    key: &str,
    thing: &str,
) -> (Proc, Proc, std::net::TcpStream) {
    let t = ok_json(
        "opening the tunnel",
        as_key(
            relay,
            key,
            &["tunnel", "open", "--thing", thing, "--service", "ECHO"],
        ),
    );
    std::fs::create_dir_all(dir).unwrap();
    let rules = rules(dir, &[("ECHO", echo_server().to_string())]);
    let gw = relay.gateway(dir, &rules, t["destinationAccessToken"].as_str().unwrap());
    let (px, ports) = relay.proxy(dir, t["sourceAccessToken"].as_str().unwrap(), &["ECHO"]);
    let mut live = connect_local(ports["ECHO"]);
    live.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    (gw, px, live)
}

/// The connection ends (EOF or reset) without another byte.
fn ends(mut live: std::net::TcpStream, what: &str) {
    let _ = live.write_all(b"more");
    let mut buf = [0u8; 16];
    match live.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("{what}: the live connection did not end: {other:?}"),
    }
}

#[test]
fn disabling_an_operator_or_revoking_their_grant_ends_their_live_connections() {
    let dir = scratch("access-revoke");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    let bob = add_operator(&relay, "bob", "operator");
    relay.api(&[
        "operator",
        "grant",
        "add",
        "alice",
        "--thing",
        "cell-1",
        "--service",
        "ECHO",
    ]);
    let g = relay.api(&[
        "operator",
        "grant",
        "add",
        "bob",
        "--thing",
        "cell-2",
        "--service",
        "ECHO",
    ]);

    let (_gw1, _px1, live1) = live_connection(&relay, &dir.join("a"), &alice, "cell-1");
    let (_gw2, _px2, live2) = live_connection(&relay, &dir.join("b"), &bob, "cell-2");

    let v = relay.api(&["operator", "disable", "alice"]);
    assert_eq!(v["tunnelsClosed"].as_array().unwrap().len(), 1, "{v}");
    ends(live1, "alice disabled");
    let e = refused(
        "a disabled operator's key",
        as_key(&relay, &alice, &["whoami"]),
    );
    assert!(e.contains("operator alice is disabled"), "{e}");
    // Bob's connection is not touched by that; revoking his grant ends it.
    let mut live2 = live2;
    live2.write_all(b"pong").unwrap();
    let mut b = [0u8; 4];
    live2.read_exact(&mut b).unwrap();
    let v = relay.api(&[
        "operator",
        "grant",
        "revoke",
        "bob",
        g["grantId"].as_str().unwrap(),
    ]);
    assert_eq!(v["tunnelsClosed"].as_array().unwrap().len(), 1, "{v}");
    ends(live2, "bob's grant revoked");
    let tunnels = relay.api(&["tunnel", "list", "--thing", "cell-2"]);
    assert_eq!(
        tunnels["tunnels"][0]["closeReason"], "access_revoked",
        "{tunnels}"
    );

    // The audit trail names who did what, and verifies.
    let audit = find_audit(&relay);
    let records = audit_records(&audit);
    let has = |event: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        records.iter().any(|r| r["event"] == event && f(r))
    };
    assert!(has("tunnel_open", &|r| r["operator"] == "alice"
        && r["thing"] == "cell-1"));
    assert!(has("operator_disable", &|r| r["name"] == "alice"
        && r["operator"] == "bootstrap-admin"));
    assert!(has("grant_revoke", &|r| r["name"] == "bob"));
    assert!(has("attach", &|r| r["thing"] == "cell-2"
        && r["mode"] == "destination"));
    assert!(has("api_refused", &|r| r["status"] == 401));
    let out = audit_verify(&[&audit]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with(&format!("audit OK: {} records", records.len())),
        "{text}"
    );
    // One byte changed: found, with its line.
    let mut bytes = std::fs::read(&audit).unwrap();
    let line3 = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .unwrap()
        .0
        + 10;
    bytes[line3] ^= 0x01;
    let copy = dir.join("edited.jsonl");
    std::fs::write(&copy, &bytes).unwrap();
    let out = audit_verify(&[&copy]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("line 3: the line was changed after it was written"),
        "{}",
        stderr_of(&out)
    );
}

/// The relay's audit file: `audit.jsonl` in its state directory.
fn find_audit(relay: &Relay) -> std::path::PathBuf {
    let p = relay.dir.join("relay-state").join("audit.jsonl");
    assert!(p.exists(), "no audit file at {}", p.display());
    p
}

#[test]
fn a_relay_that_requires_reasons_refuses_a_tunnel_without_one_and_keeps_the_reason() {
    let dir = scratch("access-reason");
    let relay = Relay::start_with(
        &dir,
        "127.0.0.1:0".parse().unwrap(),
        &["--require-reason".into()],
    );
    let e = refused(
        "a tunnel without a reason",
        relay
            .culvert()
            .args(["tunnel", "open", "--thing", "cell-7", "--service", "SSH"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("this relay requires a reason"), "{e}");
    let v = relay.api(&[
        "tunnel",
        "open",
        "--thing",
        "cell-7",
        "--service",
        "SSH",
        "--reason",
        "ticket 4711: gripper fault",
    ]);
    let d = relay.describe(v["tunnelId"].as_str().unwrap());
    assert_eq!(d["reason"], "ticket 4711: gripper fault");
    let audit = find_audit(&relay);
    let rec = audit_records(&audit)
        .into_iter()
        .find(|r| r["event"] == "tunnel_open")
        .unwrap();
    assert_eq!(rec["reason"], "ticket 4711: gripper fault");
}

#[test]
fn the_gateway_audit_names_the_operator_and_reason_the_relay_recorded_and_verifies() {
    let dir = scratch("access-site");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    relay.api(&[
        "operator",
        "grant",
        "add",
        "alice",
        "--thing",
        "cell-7",
        "--service",
        "ECHO",
    ]);
    let password = relay.add_device("cell-7");
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "cell-7",
        &password,
        &[("ECHO", echo_server().to_string())],
    );
    let site_audit = dir.join("culvertd-audit.jsonl");
    let mut text = std::fs::read_to_string(&rules).unwrap();
    text.push_str(&format!("[audit]\nfile = \"{}\"\n", site_audit.display()));
    std::fs::write(&rules, text).unwrap();
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");
    let t = ok_json(
        "alice opening with a reason",
        as_key(
            &relay,
            &alice,
            &[
                "tunnel",
                "open",
                "--thing",
                "cell-7",
                "--service",
                "ECHO",
                "--reason",
                "ticket 4711",
            ],
        ),
    );
    let (_px, ports) = relay.proxy(&dir, t["sourceAccessToken"].as_str().unwrap(), &["ECHO"]);
    assert!(echo_works(ports["ECHO"], b"who is there"));
    let rec = wait_audit(&site_audit, "the connection's end", |r| r["event"] == "end");
    assert_eq!(rec["tunnel"], t["tunnelId"]);
    assert_eq!(rec["operator"], "alice", "{rec}");
    assert_eq!(rec["operator_reason"], "ticket 4711", "{rec}");
    let out = Command::new(bin("culvertd"))
        .args(["audit", "verify"])
        .arg(&site_audit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("audit OK: 2 records, from the start of the chain")
    );
}

#[test]
fn an_approved_access_request_opens_exactly_what_was_asked_and_a_refused_one_nothing() {
    let dir = scratch("access-request");
    let relay = Relay::start(&dir);
    let alice = add_operator(&relay, "alice", "operator");
    let root = add_operator(&relay, "root", "admin");
    let open = |thing: &str, service: &str| {
        as_key(
            &relay,
            &alice,
            &["tunnel", "open", "--thing", thing, "--service", service],
        )
    };
    let e = refused("alice without a grant", open("cell-7", "ECHO"));
    assert!(
        e.contains("or ask for it: culvert access request --thing cell-7 --service ECHO"),
        "{e}"
    );
    let r = ok_json(
        "alice requesting",
        as_key(
            &relay,
            &alice,
            &[
                "access",
                "request",
                "--thing",
                "cell-7",
                "--service",
                "ECHO",
                "--for",
                "60",
                "--reason",
                "ticket 4711",
            ],
        ),
    );
    let other = ok_json(
        "alice requesting more",
        as_key(
            &relay,
            &alice,
            &[
                "access",
                "request",
                "--thing",
                "cell-8",
                "--service",
                "ECHO",
                "--for",
                "60",
                "--reason",
                "just looking",
            ],
        ),
    );
    // Waiting: still refused; she cannot approve her own; the admin sees both.
    refused("alice before the approval", open("cell-7", "ECHO"));
    let rid = r["requestId"].as_str().unwrap();
    let e = refused(
        "alice approving herself",
        as_key(&relay, &alice, &["access", "approve", rid]),
    );
    assert!(e.contains("needs the admin role"), "{e}");
    let pending = ok_json(
        "root listing",
        as_key(&relay, &root, &["access", "list", "--pending"]),
    );
    assert_eq!(
        pending["requests"].as_array().unwrap().len(),
        2,
        "{pending}"
    );
    let v = ok_json(
        "root approving",
        as_key(&relay, &root, &["access", "approve", rid]),
    );
    assert_eq!(
        (v["state"].as_str(), v["decidedBy"].as_str()),
        (Some("approved"), Some("root"))
    );
    let until = v["grant"]["notAfter"].as_str().unwrap();
    assert!(until > v["grant"]["notBefore"].as_str().unwrap(), "{v}");
    ok_json(
        "root refusing the other",
        as_key(
            &relay,
            &root,
            &[
                "access",
                "refuse",
                other["requestId"].as_str().unwrap(),
                "--why",
                "no ticket",
            ],
        ),
    );
    // Exactly what was asked: cell-7/ECHO, nothing else.
    ok_json("alice after the approval", open("cell-7", "ECHO"));
    refused("another service", open("cell-7", "SSH"));
    refused("the refused thing", open("cell-8", "ECHO"));
    let mine = ok_json(
        "alice's requests",
        as_key(&relay, &alice, &["access", "list"]),
    );
    let states: Vec<&str> = mine["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["refused", "approved"]);
    let audit = audit_records(&find_audit(&relay));
    assert!(audit.iter().any(|r| r["event"] == "request_approve"
        && r["operator"] == "root"
        && r["request"]["reason"] == "ticket 4711"));
}

#[test]
fn the_sites_consent_switch_refuses_new_connections_and_ends_live_ones() {
    let dir = scratch("access-consent");
    let relay = Relay::start(&dir);
    let t = relay.open_tunnel("cell-7", &["ECHO"]);
    let switch = dir.join("remote-access");
    std::fs::write(&switch, "0\n").unwrap();
    let site_audit = dir.join("culvertd-audit.jsonl");
    let config = rules(&dir, &[("ECHO", echo_server().to_string())]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[consent]\nswitch_file = \"{}\"\n\n[audit]\nfile = \"{}\"\n",
        switch.display(),
        site_audit.display()
    ));
    std::fs::write(&config, text).unwrap();
    let _gw = relay.gateway(&dir, &config, &t.destination);
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    // Off: refused before the target is contacted, and the record says why.
    expect_refused(ports["ECHO"]);
    let rec = wait_audit(&site_audit, "a refusal for consent", |r| {
        r["reason"] == "no_consent"
    });
    assert!(
        rec["detail"]
            .as_str()
            .unwrap()
            .contains("switched off on site"),
        "{rec}"
    );
    // On: connections go through.
    std::fs::write(&switch, "1\n").unwrap();
    wait_for("the switch to be read on", || {
        echo_works(ports["ECHO"], b"allowed?").then_some(())
    });
    let mut live = connect_local(ports["ECHO"]);
    live.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    // Off again: the live connection ends.
    std::fs::write(&switch, "off\n").unwrap();
    wait_audit(&site_audit, "the live connection's end", |r| {
        r["reason"] == "consent_withdrawn"
    });
    ends(live, "the switch turned off");
    let events: Vec<String> = audit_records(&site_audit)
        .iter()
        .filter(|r| r["event"] == "consent")
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect();
    assert!(events.len() >= 2, "{events:?}");
    assert!(events[0].starts_with("remote access allowed"), "{events:?}");
    assert!(
        events[1].starts_with("remote access switched off"),
        "{events:?}"
    );
    expect_refused(ports["ECHO"]);
}

/// `culvertd consent --dir DIR <args>`.
fn consent(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("culvertd"))
        .arg("consent")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_site_that_approves_each_tunnel_holds_it_until_approved_and_a_refusal_closes_it() {
    let dir = scratch("access-approval");
    let relay = Relay::start(&dir);
    let password = relay.add_device("cell-7");
    let (target, reached) = counting_echo_server();
    let rules = mqtt_rules(
        &dir,
        relay.mqtt.unwrap(),
        "cell-7",
        &password,
        &[("ECHO", target.to_string())],
    );
    let approvals = dir.join("approvals");
    let site_audit = dir.join("culvertd-audit.jsonl");
    let hmi_token = "panel-2-token-0123456789";
    std::fs::write(dir.join("hmi-token"), format!("{hmi_token}\n")).unwrap();
    let hmi_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut text = std::fs::read_to_string(&rules).unwrap();
    text.push_str(&format!(
        "[consent]\napprove_tunnels = true\napproval_dir = \"{}\"\nhmi_listen = \"127.0.0.1:{hmi_port}\"\nhmi_token_file = \"{}\"\n\n[audit]\nfile = \"{}\"\n",
        approvals.display(),
        dir.join("hmi-token").display(),
        site_audit.display()
    ));
    std::fs::write(&rules, text).unwrap();
    let gw = relay.mqtt_gateway(&dir, &rules);
    wait_log(&gw, "subscribed");

    // A tunnel waits: the relay shows it, and the site lists it.
    let t = relay.open_tunnel("cell-7", &["ECHO"]);
    let on_site = wait_for("the relay to show the tunnel waiting", || {
        let v = relay.describe(&t.id);
        (v["onSite"]["state"] == "waiting").then_some(v)
    });
    assert!(
        on_site["onSite"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("culvertd consent approve {}", t.id)),
        "{on_site}"
    );
    let out = consent(&approvals, &["list"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&t.id));

    // A connection made now is held, its bytes kept, and carried once approved.
    let (_px, ports) = relay.proxy(&dir, &t.source, &["ECHO"]);
    let mut held = connect_local(ports["ECHO"]);
    held.write_all(b"sent before approval").unwrap();
    wait_log(&gw, "connection waits for on-site approval");
    let out = consent(&approvals, &["list"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the target was contacted before the site approved the tunnel"
    );
    let out = consent(&approvals, &["approve", "--by", "shift lead"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut b = [0u8; 20];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"sent before approval");
    let v = wait_for("the relay to show the approval", || {
        let v = relay.describe(&t.id);
        (v["onSite"]["state"] == "approved").then_some(v)
    });
    assert_eq!(v["onSite"]["by"], "shift lead", "{v}");
    assert!(echo_works(ports["ECHO"], b"and after"));
    let out = consent(&approvals, &["list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no tunnel is waiting"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // `culvert open` says it waits, and a refusal ends it with who and why.
    let mut open = Proc::spawn_logging_stdout(
        "culvert-open",
        relay
            .culvert()
            .args(["open", "cell-7", "--service", "ECHO"]),
        &dir,
    );
    wait_log(&open, "waiting for on-site approval at cell-7");
    let out = consent(&approvals, &["refuse", "--why", "robot is running a job"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_ne!(open.wait_exit(), 0);
    assert!(
        open.log_text()
            .contains("the site refused the tunnel to cell-7 (by "),
        "{}",
        open.log_text()
    );
    assert!(open.log_text().contains("robot is running a job"));
    let refused: Vec<_> = relay.api(&["tunnel", "list", "--thing", "cell-7"])["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| relay.describe(t["tunnelId"].as_str().unwrap()))
        .filter(|t| t["closeReason"] == "refused_on_site")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");

    // A local HMI decides over HTTP, with its token and only with it.
    let hmi = |token: Option<&str>, method: &str, path: &str, body: &str| {
        let mut c = Command::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg(format!("http://127.0.0.1:{hmi_port}{path}"));
        if let Some(t) = token {
            c.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        if !body.is_empty() {
            c.args(["-H", "content-type: application/json", "--data", body]);
        }
        let out = c.output().expect("curl (Debian: curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (code.to_owned(), body.to_owned())
    };
    let (code, _) = hmi(None, "GET", "/approvals", "");
    assert_eq!(code, "401");
    let (code, _) = hmi(Some("panel-2-token-wrong"), "GET", "/approvals", "");
    assert_eq!(code, "401");
    let open = Proc::spawn_logging_stdout(
        "culvert-open-hmi",
        relay
            .culvert()
            .args(["open", "cell-7", "--service", "ECHO"]),
        &dir,
    );
    wait_log(&open, "waiting for on-site approval at cell-7");
    let (code, body) = hmi(Some(hmi_token), "GET", "/approvals", "");
    assert_eq!(code, "200", "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let waiting = listed["waiting"][0]["tunnel"].as_str().unwrap().to_owned();
    let (code, body) = hmi(
        Some(hmi_token),
        "POST",
        "/approvals/not-a-waiting-tunnel/approve",
        "",
    );
    assert_eq!(code, "404", "{body}");
    let (code, body) = hmi(
        Some(hmi_token),
        "POST",
        &format!("/approvals/{waiting}/approve"),
        r#"{"by": "HMI panel 2"}"#,
    );
    assert_eq!(code, "200", "{body}");
    wait_log(&open, "approved on site by HMI panel 2");
    drop(open);

    // Both sites' records: the relay's audit names each step, and so does the gateway's.
    let relay_audit = audit_records(&find_audit(&relay));
    let states: Vec<_> = relay_audit
        .iter()
        .filter(|r| r["event"] == "on_site")
        .map(|r| r["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states,
        [
            "waiting", "approved", "waiting", "refused", "waiting", "approved"
        ],
        "{relay_audit:?}"
    );
    let details: Vec<_> = audit_records(&site_audit)
        .iter()
        .filter(|r| r["event"] == "approval")
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d == "approved on site by shift lead"),
        "{details:?}"
    );
    assert!(
        details.iter().any(
            |d| d.starts_with("refused on site by ") && d.ends_with(": robot is running a job")
        ),
        "{details:?}"
    );
}
