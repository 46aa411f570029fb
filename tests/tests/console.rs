//! The web console in a real browser (Debian's chromium, headless, over CDP) and its security
//! with a real HTTP client (curl): log in, open a tunnel to a gateway from the page and carry
//! bytes through it, see the device and its targets, close it; a refused login and a
//! forbidden device show the relay's messages; cookies, CSRF, origin checks, the
//! Content-Security-Policy and the login limit.
//!
//! Screenshots of the main pages go to `target/console-screenshots/`; docs/screenshots/ holds
//! the committed copies (copy them over when the pages change on purpose).

use std::path::PathBuf;
use std::process::{Command, Output};

use culvert_e2e::browser::Browser;
use culvert_e2e::*;

/// Add an operator with a password; their API key.
fn add_operator(relay: &Relay, name: &str, role: &str, password: &str) -> String {
    let v = relay.api(&["operator", "add", name, "--role", role]);
    let out = relay
        .culvert()
        .env("CULVERT_PASSWORD", password)
        .args(["--json", "operator", "password", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    v["apiKey"].as_str().unwrap().to_owned()
}

fn console_url(relay: &Relay) -> String {
    relay
        .console
        .clone()
        .expect("the dev relay serves its console (CULVERT_CONSOLE in client.env)")
}

fn screenshots() -> PathBuf {
    workspace().join("target/console-screenshots")
}

/// Choose the terminal's kind, as the select does.
fn term_kind(b: &mut Browser, kind: &str) {
    b.eval(&format!(
        "(() => {{ const s = document.getElementById('term-kind'); s.value = '{kind}'; s.dispatchEvent(new Event('change')); }})()"
    ));
}

/// A dev relay; an operator (name, password) with a grant for `thing`'s `services`; and a
/// culvertd for `thing` serving them, with `health` reporting its targets every second (its
/// probes connect to them). The operator's API key too.
fn site(
    dir: &std::path::Path,
    (operator, password): (&str, &str),
    thing: &str,
    services: &[(&str, String)],
    health: bool,
) -> (Relay, Proc, String) {
    let relay = Relay::start(dir);
    let key = add_operator(&relay, operator, "operator", password);
    let names: Vec<&str> = services.iter().map(|(n, _)| *n).collect();
    relay.api(&[
        "operator",
        "grant",
        "add",
        operator,
        "--thing",
        thing,
        "--service",
        &names.join(","),
    ]);
    let device_password = relay.add_device(thing);
    let rules = mqtt_rules(dir, relay.mqtt.unwrap(), thing, &device_password, services);
    if health {
        let text = std::fs::read_to_string(&rules)
            .unwrap()
            .replace("[mqtt]\n", "[mqtt]\nhealth_report_secs = 1\n");
        std::fs::write(&rules, text).unwrap();
    }
    let gw = relay.mqtt_gateway(dir, &rules);
    wait_log(&gw, "subscribed");
    (relay, gw, key)
}

/// chromium on the console's Terminal page, logged in as (operator, password).
fn terminal_page(
    dir: &std::path::Path,
    relay: &Relay,
    (operator, password): (&str, &str),
) -> Browser {
    let mut b = Browser::launch(dir, &relay.dir.join("relay-state/server.pem"));
    b.open(&console_url(relay));
    log_in(&mut b, operator, password);
    b.wait_until(
        "the tunnels hub",
        "!document.getElementById('tunnels').hidden",
    );
    b.click("a[data-view='terminal']");
    b.wait_until(
        "the terminal form",
        "!document.getElementById('terminal').hidden",
    );
    b
}

fn log_in(b: &mut Browser, name: &str, password: &str) {
    b.wait_until("the login form", "!document.getElementById('login').hidden");
    b.type_into("#login-name", name);
    b.type_into("#login-password", password);
    b.click("#login-submit");
}

#[test]
fn an_operator_logs_in_opens_a_tunnel_to_a_gateway_uses_it_and_closes_it_in_a_real_browser() {
    let dir = scratch("console-browser");
    let password = "console-test-password-1";
    let (relay, _gw, ada_key) = site(
        &dir,
        ("ada", password),
        "robot-1",
        &[("ECHO", echo_server().to_string())],
        true,
    );
    let url = console_url(&relay);
    let admin_password = "console-admin-password";
    add_operator(&relay, "ida", "admin", admin_password);

    let mut b = Browser::launch(&dir, &relay.dir.join("relay-state/server.pem"));
    b.open(&url);
    b.screenshot(&screenshots().join("login.png"));

    // A wrong password: the relay's answer, on the form.
    log_in(&mut b, "ada", "not-her-password-at-all");
    b.wait_until(
        "the refusal on the login form",
        "!document.getElementById('login-error').hidden",
    );
    let refusal = b.text("#login-error");
    assert!(
        refusal.contains("not accepted") || refusal.contains("wrong"),
        "{refusal}"
    );
    assert!(!b.visible("#tunnels"), "a refused login shows no tunnels");

    log_in(&mut b, "ada", password);
    b.wait_until(
        "the tunnels hub",
        "!document.getElementById('tunnels').hidden",
    );
    assert_eq!(b.text("#who-name"), "ada");
    assert_eq!(b.text("#who-role"), "operator");
    // The script never sees the session: the cookie is HttpOnly.
    assert_eq!(b.eval("document.cookie"), Value::from(""));

    // Open a tunnel to the gateway from the page: the tokens are shown once.
    b.type_into("#open-thing", "robot-1");
    b.type_into("#open-services", "ECHO");
    b.type_into("#open-reason", "console test: checking the echo service");
    b.click("#open-submit");
    b.wait_until("the tokens", "!document.getElementById('tokens').hidden");
    let id = b.text("#tokens-id");
    let source = b.eval("document.getElementById('tokens-source').value");
    let source = source.as_str().unwrap().to_owned();
    assert!(source.len() > 20, "a source token is shown: {source:?}");
    assert!(
        b.text("#tokens-command").contains(&format!("-t {source}")),
        "the command to run is shown with the token"
    );
    let described = relay.describe(&id);
    assert_eq!(described["openedBy"], "ada", "{described}");
    assert_eq!(
        described["reason"], "console test: checking the echo service",
        "{described}"
    );
    // The device was told: its gateway connects, and the page shows it.
    relay.wait_side(&id, "destination", "CONNECTED");
    let row = format!("tr[data-tunnel='{id}']");
    b.wait_until(
        "the gateway shown connected",
        &format!("document.querySelector(\"{row} td.destination .badge.connected\") !== null"),
    );

    // The token from the page carries bytes to the device's service.
    let (_proxy, ports) = relay.proxy(&dir, &source, &["ECHO"]);
    assert!(echo_works(
        ports["ECHO"],
        b"through the tunnel the console opened"
    ));
    b.wait_until(
        "the operator's side shown connected",
        &format!("document.querySelector(\"{row} td.source .badge.connected\") !== null"),
    );
    b.screenshot(&screenshots().join("tunnels.png"));

    // The device view: online, and the gateway's report of its target.
    b.click("a[data-view='devices']");
    b.wait_until(
        "robot-1's target reported up",
        "(document.querySelector(\"tr[data-thing='robot-1']\") || {innerText: ''}).innerText.includes('ECHO') \
         && document.querySelector(\"tr[data-thing='robot-1']\").innerText.includes('online') \
         && document.querySelector(\"tr[data-thing='robot-1'] .badge.up\") !== null",
    );
    b.screenshot(&screenshots().join("devices.png"));

    // Close it from the page (the confirmation answered yes).
    b.click("a[data-view='tunnels']");
    b.wait_until(
        "the tunnel row",
        &format!("document.querySelector(\"{row}\") !== null"),
    );
    b.eval("window.confirm = () => true");
    b.click(&format!("{row} button.danger"));
    b.wait_until(
        "the tunnel gone from the open ones",
        &format!("document.querySelector(\"{row}\") === null"),
    );
    assert_eq!(relay.describe(&id)["status"], "CLOSED");

    // A device ada has no grant for: the relay's refusal, on the page.
    b.type_into("#open-thing", "robot-2");
    b.type_into("#open-services", "ECHO");
    b.click("#open-submit");
    b.wait_until(
        "the refusal",
        "document.getElementById('flash').innerText.includes('robot-2')",
    );
    let flash = b.text("#flash");
    assert!(
        flash.contains("Could not open the tunnel") && flash.contains("no grant for robot-2"),
        "{flash}"
    );
    assert!(
        !b.visible("a[data-view='audit']"),
        "the audit trail is an admin's page"
    );
    // So she asks for access (from her CLI).
    let out = relay
        .culvert()
        .env("CULVERT_API_KEY", &ada_key)
        .args([
            "access",
            "request",
            "--thing",
            "robot-2",
            "--service",
            "ECHO",
            "--for",
            "30",
            "--reason",
            "ticket 4711",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));

    // A tunnel opened in the session belongs to it.
    b.click("#tokens-done");
    b.type_into("#open-thing", "robot-1");
    b.type_into("#open-services", "ECHO");
    b.click("#open-submit");
    b.wait_until("the tokens", "!document.getElementById('tokens').hidden");
    let session_tunnel = b.text("#tokens-id");

    // Logging out ends the session at the relay: the cookie's key no longer works, and the
    // tunnel opened in it closes.
    b.click("#logout");
    b.wait_until("the login form", "!document.getElementById('login').hidden");
    let status = b.eval("fetch('/session').then(r => r.status)");
    assert_eq!(status, Value::from(401));
    assert_eq!(relay.describe(&session_tunnel)["status"], "CLOSED");

    // An admin approves ada's request on the page, and reads the audit trail.
    log_in(&mut b, "ida", admin_password);
    b.wait_until(
        "the tunnels hub",
        "!document.getElementById('tunnels').hidden",
    );
    b.click("a[data-view='requests']");
    b.wait_until(
        "ada's request",
        "document.getElementById('request-table').innerText.includes('ticket 4711')",
    );
    b.click("#request-table button");
    b.wait_until(
        "the request approved",
        "document.querySelector('#request-table .badge.approved') !== null",
    );
    let reach = relay
        .culvert()
        .env("CULVERT_API_KEY", &ada_key)
        .args([
            "--json",
            "tunnel",
            "open",
            "--thing",
            "robot-2",
            "--service",
            "ECHO",
        ])
        .output()
        .unwrap();
    assert!(
        reach.status.success(),
        "the approval lets ada in: {}",
        stderr_of(&reach)
    );
    b.click("a[data-view='audit']");
    b.wait_until(
        "the audit trail",
        "!document.getElementById('audit').hidden",
    );
    b.type_into("#audit-operator", "ada");
    b.type_into("#audit-event", "tunnel_open");
    b.click("#audit-submit");
    // Only what the filters ask: ada's three openings, the first with its reason.
    b.wait_until(
        "ada's three tunnels, and nothing else, in the audit trail",
        "[...document.querySelectorAll('#audit-table tbody tr')].every(r => r.dataset.event === 'tunnel_open') \
         && document.querySelectorAll('#audit-table tbody tr').length === 3",
    );
    assert!(b.text("#audit-table").contains("checking the echo service"));
    b.screenshot(&screenshots().join("audit.png"));

    // The relay's audit trail has the console's login, the opening and the refusal.
    let audit = audit_records(&relay.dir.join("relay-state/audit.jsonl"));
    let has = |f: &dyn Fn(&Value) -> bool| audit.iter().any(f);
    assert!(has(&|r| r["event"] == "login"
        && r["operator"] == "ada"
        && r["console"] == true));
    assert!(has(&|r| r["event"] == "login_refused" && r["name"] == "ada"));
    assert!(has(&|r| {
        r["event"] == "api"
            && r["operator"] == "ada"
            && r["path"] == "/tunnels"
            && r["status"] == 201
    }));
    assert!(has(&|r| r["event"] == "logout"
        && r["operator"] == "ada"
        && r["tunnelsClosed"][0] == session_tunnel.as_str()));
}

/// curl against the console, with `args`; the response head and body.
fn curl(relay: &Relay, args: &[&str]) -> (String, String) {
    let curl = require_tool("curl", "curl");
    let out: Output = Command::new(curl)
        .args(["-sS", "-D", "-", "--cacert"])
        .arg(&relay.ca)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", stderr_of(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[test]
fn console_cookies_csrf_origin_csp_and_the_login_limit_hold() {
    let dir = scratch("console-security");
    let relay = Relay::start(&dir);
    let url = console_url(&relay);
    let origin = url.trim_end_matches('/').to_owned();
    let password = "console-test-password-2";
    let otto_key = add_operator(&relay, "otto", "operator", password);
    relay.api(&[
        "operator",
        "grant",
        "add",
        "otto",
        "--thing",
        "cell-1",
        "--service",
        "ECHO",
    ]);

    // Every page: a strict Content-Security-Policy and its companions, no caching.
    let (head, body) = curl(&relay, &[&url]);
    assert_eq!(status(&head), 200);
    assert!(body.contains("<title>culvert console</title>"));
    assert!(
        !body.contains("<script>") && !body.contains("style="),
        "no inline code"
    );
    let csp = header(&head, "content-security-policy").expect("a CSP");
    for d in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(d), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    // Style elements apply only with the page's nonce, new on every load (the terminal's).
    let nonce = |csp: &str, body: &str| {
        let n = csp
            .split("'nonce-")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .expect("a style nonce")
            .to_owned();
        assert!(
            body.contains(&format!("content=\"{n}\"")),
            "the page has its nonce"
        );
        n
    };
    let first = nonce(csp, &body);
    let (head2, body2) = curl(&relay, &[&url]);
    assert_ne!(
        first,
        nonce(header(&head2, "content-security-policy").unwrap(), &body2)
    );
    assert_eq!(header(&head, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "cache-control"), Some("no-store"));
    let (head, _) = curl(&relay, &[&format!("{url}static/xterm.js")]);
    assert_eq!(status(&head), 200);
    assert_eq!(
        header(&head, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    let (head, _) = curl(&relay, &[&format!("{url}static/../../etc/passwd")]);
    assert_eq!(status(&head), 404);

    // A login from another site's page, or with no Origin at all, is refused.
    let login_body = format!(r#"{{"name":"otto","password":"{password}"}}"#);
    let login = |origin: Option<&str>| {
        let mut args = vec!["-X", "POST", "-H", "content-type: application/json"];
        let o;
        if let Some(x) = origin {
            o = format!("origin: {x}");
            args.extend(["-H", &o]);
        }
        let u = format!("{url}session");
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend(["--data".into(), login_body.clone(), u]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        curl(&relay, &refs)
    };
    assert_eq!(status(&login(Some("https://evil.example")).0), 403);
    assert_eq!(status(&login(None).0), 403);

    // A login from the console's own page: the session cookie, Secure, HttpOnly, Strict.
    let (head, body) = login(Some(&origin));
    assert_eq!(status(&head), 201, "{body}");
    let cookie = header(&head, "set-cookie").expect("a session cookie");
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(
            cookie.split(';').any(|a| a.trim() == attr),
            "{cookie} lacks {attr}"
        );
    }
    let v: Value = serde_json::from_str(&body).unwrap();
    let csrf = v["csrfToken"].as_str().unwrap().to_owned();
    assert!(
        !body.contains("apiKey"),
        "the key stays in the cookie: {body}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    // The page asks for its token again on every load: the same one for the same session.
    let (_, b) = curl(
        &relay,
        &[
            "-H",
            &format!("cookie: {session}"),
            &format!("{url}session"),
        ],
    );
    let again: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(again["csrfToken"], csrf.as_str());
    assert_eq!(again["name"], "otto");
    // A second login is another session, with a token of its own.
    let (head, body) = login(Some(&origin));
    assert_eq!(status(&head), 201, "{body}");
    let other: Value = serde_json::from_str(&body).unwrap();
    let other_csrf = other["csrfToken"].as_str().unwrap().to_owned();
    assert_ne!(csrf, other_csrf, "each session has its own CSRF token");

    // The API through the session: reads need the cookie only; changes need the origin and
    // the CSRF token as well.
    let cookie_h = format!("cookie: {session}");
    let (head, _) = curl(&relay, &[&format!("{url}api/v1/tunnels")]);
    assert_eq!(status(&head), 401, "no cookie, no API");
    let (head, body) = curl(&relay, &["-H", &cookie_h, &format!("{url}api/v1/tunnels")]);
    assert_eq!(status(&head), 200, "{body}");
    let open = r#"{"thingName":"cell-1","services":["ECHO"]}"#;
    let tunnels = format!("{url}api/v1/tunnels");
    let origin_h = format!("origin: {origin}");
    let csrf_h = format!("x-csrf-token: {csrf}");
    let post = |extra: &[&str]| {
        let mut a = vec![
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            &cookie_h,
        ];
        a.extend_from_slice(extra);
        a.extend(["--data", open, &tunnels]);
        curl(&relay, &a)
    };
    let (head, body) = post(&["-H", &origin_h]);
    assert_eq!(status(&head), 403, "no CSRF token: {body}");
    assert!(body.contains("CSRF"), "{body}");
    let (head, body) = post(&[
        "-H",
        &origin_h,
        "-H",
        &format!("x-csrf-token: {other_csrf}"),
    ]);
    assert_eq!(status(&head), 403, "another session's CSRF token: {body}");
    let (head, body) = post(&["-H", "origin: https://evil.example", "-H", &csrf_h]);
    assert_eq!(status(&head), 403, "another site's page: {body}");
    let (head, body) = post(&[
        "-H",
        &origin_h,
        "-H",
        &csrf_h,
        "-H",
        "sec-fetch-site: cross-site",
    ]);
    assert_eq!(status(&head), 403, "a cross-site fetch: {body}");
    let (head, body) = post(&["-H", &origin_h, "-H", &csrf_h]);
    assert_eq!(status(&head), 201, "{body}");
    assert_eq!(header(&head, "cache-control"), Some("no-store"));

    // A terminal's WebSocket from another site's page is refused before the upgrade.
    let (head, body) = curl(
        &relay,
        &[
            "-H",
            &cookie_h,
            "-H",
            "origin: https://evil.example",
            "-H",
            "connection: Upgrade",
            "-H",
            "upgrade: websocket",
            "-H",
            "sec-websocket-version: 13",
            "-H",
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
            &format!("{url}terminal?tunnel=x&service=TELNET&kind=telnet"),
        ],
    );
    assert_eq!(status(&head), 403, "{body}");

    // The relay's bootstrap API key is never a console session.
    let (head, _) = curl(
        &relay,
        &[
            "-H",
            &format!("cookie: culvert_session={}", relay.api_key),
            &format!("{url}session"),
        ],
    );
    assert_eq!(status(&head), 401);

    // Logins are limited per source address, whatever the password: after ten failures the
    // right one is refused too, with how long to wait.
    for _ in 0..10 {
        let wrong = r#"{"name":"otto","password":"wrong-password-guess"}"#;
        let (head, _) = curl(
            &relay,
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-H",
                &origin_h,
                "--data",
                wrong,
                &format!("{url}session"),
            ],
        );
        assert_eq!(status(&head), 401);
    }
    let (head, body) = login(Some(&origin));
    assert_eq!(status(&head), 429, "{body}");
    assert!(
        body.contains("too_many_logins") && body.contains("try again in"),
        "{body}"
    );
    // The refusals are audited; `culvert audit` (admins) reads them back, newest first.
    let v = relay.api(&["audit", "--event", "console_refused", "--limit", "500"]);
    let refused = v["records"].as_array().unwrap();
    assert!(
        refused.iter().any(|r| r["status"] == 403)
            && refused.iter().all(|r| r["event"] == "console_refused"),
        "{v}"
    );
    let out = relay
        .culvert()
        .args(["audit", "--event", "login_refused"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().count() >= 10, "{text}");
    assert!(text.lines().all(|l| l.contains("login_refused")), "{text}");
    let out = relay
        .culvert()
        .env("CULVERT_API_KEY", &otto_key)
        .args(["audit"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && stderr_of(&out).contains("reading the audit trail"),
        "an operator may not read the audit trail: {}",
        stderr_of(&out)
    );
}

/// A telnet-style console that counts its connections: it offers to echo and to suppress
/// go-ahead, echoes what is typed, and answers each line. What it received (negotiation
/// included) is kept.
fn telnet_console() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (g, c) = (got.clone(), count.clone());
    std::thread::spawn(move || {
        for s in l.incoming().take(8) {
            let Ok(mut s) = s else { continue };
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let g = g.clone();
            std::thread::spawn(move || {
                // IAC WILL ECHO, IAC WILL SGA, then the banner and a prompt.
                let _ = s.write_all(b"\xff\xfb\x01\xff\xfb\x03AS terminal ready\r\n>");
                let mut line = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    g.lock().unwrap().extend_from_slice(&buf[..n]);
                    for &b in &buf[..n] {
                        match b {
                            0xff | 0xfd | 0xfe | 0x01 | 0x03 if line.is_empty() && b >= 0xfd => {}
                            b'\r' => {}
                            b'\n' => {
                                let reply = format!(
                                    "\r\nyou said: {}\r\n>",
                                    String::from_utf8_lossy(&line)
                                );
                                let _ = s.write_all(reply.as_bytes());
                                line.clear();
                            }
                            b if b.is_ascii_graphic() || b == b' ' => {
                                line.push(b);
                                let _ = s.write_all(&[b]);
                            }
                            _ => {}
                        }
                    }
                }
            });
        }
    });
    (addr, got, count)
}

#[test]
fn a_telnet_console_in_the_browser_carries_typed_lines_to_the_device_and_its_answers_back() {
    let dir = scratch("console-terminal");
    let password = "console-test-password-3";
    let (target, received, connections) = telnet_console();
    let (relay, _gw, _) = site(
        &dir,
        ("kai", password),
        "robot-7",
        &[
            ("TELNET", target.to_string()),
            ("RAW", echo_server().to_string()),
        ],
        false,
    );

    let mut b = terminal_page(&dir, &relay, ("kai", password));
    b.type_into("#term-thing", "robot-7");
    b.type_into("#term-service", "TELNET");
    term_kind(&mut b, "telnet");
    b.type_into("#term-reason", "checking the AS terminal");
    b.click("#term-open");
    b.wait_until(
        "the terminal connected",
        "document.getElementById('term-status').innerText.startsWith('Connected')",
    );
    b.wait_until(
        "the console's banner on the screen",
        "(document.querySelector('#term-screen .xterm-rows') || {innerText: ''}).innerText.includes('AS terminal ready')",
    );
    // Typed at the keyboard, into the terminal.
    b.eval("document.querySelector('#term-screen textarea').focus()");
    b.command("Input.insertText", serde_json::json!({"text": "here 1"}));
    b.press_enter();
    b.wait_until(
        "the console's answer on the screen",
        "document.querySelector('#term-screen .xterm-rows').innerText.includes('you said: here 1')",
    );
    // The server echoed what was typed (it said WILL ECHO and was told DO), once.
    let screen = b.text("#term-screen .xterm-rows");
    assert_eq!(
        screen.matches("here 1").count(),
        2,
        "echo once, answer once: {screen}"
    );
    let got = received.lock().unwrap().clone();
    assert!(
        got.windows(3).any(|w| w == [0xff, 0xfd, 0x01])
            && got.windows(3).any(|w| w == [0xff, 0xfd, 0x03]),
        "the relay agreed to echo and SGA: {got:?}"
    );
    assert!(
        got.windows(8).any(|w| w == b"here 1\r\n"),
        "Enter arrives as CR LF: {got:?}"
    );
    b.screenshot(&screenshots().join("terminal.png"));
    assert_eq!(
        b.csp_violations(),
        Vec::<String>::new(),
        "the terminal works under the console's Content-Security-Policy"
    );
    let tunnel = relay.api(&["tunnel", "list"])["tunnels"][0].clone();
    let id = tunnel["tunnelId"].as_str().unwrap().to_owned();
    assert_eq!(tunnel["openedBy"], "kai");
    assert_eq!(tunnel["reason"], "checking the AS terminal");

    // A terminal's WebSocket without the session's CSRF token gets nowhere.
    let answer = b.eval(&format!(
        "new Promise(done => {{ const w = new WebSocket('wss://' + location.host + '/terminal?tunnel={id}&service=TELNET&kind=telnet'); \
         w.onopen = () => w.send(JSON.stringify({{token: 'not-a-token', csrf: 'not-the-token'}})); \
         w.onmessage = m => done(m.data); w.onerror = () => done('error'); }})"
    ));
    assert!(
        answer.as_str().unwrap_or_default().contains("CSRF"),
        "{answer}"
    );

    // Closing the terminal closes its tunnel; the console saw exactly one connection.
    b.click("#term-close");
    wait_for("the terminal's tunnel to close", || {
        (relay.describe(&id)["status"] == "CLOSED").then_some(())
    });
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A raw TCP console: bytes unchanged both ways (here, to an echo service).
    b.wait_until(
        "the terminal ready again",
        "!document.getElementById('term-open').disabled",
    );
    b.type_into("#term-service", "RAW");
    term_kind(&mut b, "raw");
    b.click("#term-open");
    b.wait_until(
        "the raw console connected",
        "document.getElementById('term-status').innerText.startsWith('Connected')",
    );
    b.eval("document.querySelector('#term-screen textarea').focus()");
    b.command("Input.insertText", serde_json::json!({"text": "raw 2"}));
    b.wait_until(
        "the echo on the screen",
        "document.querySelector('#term-screen .xterm-rows').innerText.includes('raw 2')",
    );
    b.click("#term-close");
    let audit = audit_records(&relay.dir.join("relay-state/audit.jsonl"));
    assert!(audit.iter().any(|r| {
        r["event"] == "console_terminal"
            && r["operator"] == "kai"
            && r["service"] == "TELNET"
            && r["kind"] == "telnet"
            && r["tunnel"] == id.as_str()
    }));
    wait_for("the terminal's end in the audit trail", || {
        audit_records(&relay.dir.join("relay-state/audit.jsonl"))
            .iter()
            .any(|r| r["event"] == "console_terminal_end" && r["tunnel"] == id.as_str())
            .then_some(())
    });
}

#[test]
fn an_ssh_console_in_the_browser_logs_in_with_a_key_pins_the_host_key_and_refuses_a_changed_one() {
    let dir = scratch("console-ssh");
    let sshd = Sshd::start(&dir);
    let password = "console-test-password-4";
    let (relay, _gw, _) = site(
        &dir,
        ("sam", password),
        "robot-9",
        &[("SSH", format!("127.0.0.1:{}", sshd.port))],
        false,
    );
    let key = std::fs::read_to_string(&sshd.client_key).unwrap();

    let mut b = terminal_page(&dir, &relay, ("sam", password));
    let open = |b: &mut Browser| {
        b.type_into("#term-thing", "robot-9");
        b.type_into("#term-service", "SSH");
        term_kind(b, "ssh");
        b.type_into("#term-user", &Sshd::user());
        b.type_into("#term-key", &key);
        b.click("#term-open");
    };
    open(&mut b);
    b.wait_until(
        "the SSH console connected",
        "document.getElementById('term-status').innerText.startsWith('Connected')",
    );
    assert!(
        b.text("#term-hostkey").contains("pinned for this device"),
        "{}",
        b.text("#term-hostkey")
    );
    assert_eq!(
        b.eval("document.getElementById('term-key').value"),
        Value::from(""),
        "the page keeps no key"
    );
    b.eval("document.querySelector('#term-screen textarea').focus()");
    b.command(
        "Input.insertText",
        serde_json::json!({"text": "echo console-$((6*7)); stty size"}),
    );
    b.press_enter();
    b.wait_until(
        "the shell's answer on the screen",
        "document.querySelector('#term-screen .xterm-rows').innerText.includes('console-42')",
    );
    // The pty has the terminal's size.
    let size = b.text("#term-screen .xterm-rows");
    let (rows, cols) = (
        b.eval("document.querySelectorAll('#term-screen .xterm-rows > div').length"),
        b.eval("Math.round(document.querySelector('#term-screen .xterm-screen').getBoundingClientRect().width)"),
    );
    let stty = size
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let r: u32 = it.next()?.parse().ok()?;
            let c: u32 = it.next()?.parse().ok()?;
            it.next().is_none().then_some((r, c))
        })
        .unwrap_or_else(|| panic!("no `stty size` answer on the screen: {size}"));
    assert_eq!(
        Value::from(stty.0),
        rows,
        "pty rows as the terminal's (width {cols})"
    );
    assert!(
        stty.1 > 80,
        "the pty is as wide as the page's terminal: {stty:?}"
    );
    b.screenshot(&screenshots().join("ssh.png"));

    // The host key is pinned for robot-9/SSH: the device's own.
    let pins = std::fs::read_to_string(relay.dir.join("relay-state/console-known-hosts")).unwrap();
    let host_pub = std::fs::read_to_string(dir.join("sshd/host_key.pub")).unwrap();
    let host_key = host_pub.split_whitespace().nth(1).unwrap();
    assert!(
        pins.starts_with("robot-9/SSH ssh-ed25519 ") && pins.contains(host_key),
        "{pins}"
    );
    b.click("#term-close");
    b.wait_until(
        "the terminal ready again",
        "!document.getElementById('term-open').disabled",
    );

    // Another key pinned for the device (as if it were an impostor's): refused, with both
    // fingerprints, and no login.
    let other = dir.join("other_key");
    run_ok(
        "ssh-keygen",
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other),
    );
    let other_pub = std::fs::read_to_string(dir.join("other_key.pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        relay.dir.join("relay-state/console-known-hosts"),
        format!("robot-9/SSH {}\n", other_pub.join(" ")),
    )
    .unwrap();
    open(&mut b);
    b.wait_until(
        "the refusal",
        "document.getElementById('term-status').innerText.includes('REFUSED')",
    );
    let status = b.text("#term-status");
    assert!(
        status.contains("host key of robot-9/SSH has changed")
            && status.matches("SHA256:").count() == 2,
        "{status}"
    );
    assert!(b.csp_violations().is_empty(), "{:?}", b.csp_violations());
    // The key the operator pasted is in no log or audit line of the relay.
    let secret_line = key.lines().nth(2).unwrap();
    let relay_log = std::fs::read_to_string(&relay.proc.log).unwrap();
    let audit = std::fs::read_to_string(relay.dir.join("relay-state/audit.jsonl")).unwrap();
    assert!(!relay_log.contains(secret_line) && !audit.contains(secret_line));
}
