//! A real browser for the web console's tests: Debian's chromium, headless, driven over the
//! Chrome DevTools Protocol (CDP) on a WebSocket.
//!
//! The tests need a handful of CDP commands (open a page, evaluate a script, insert text,
//! take a screenshot), sent as JSON over the WebSocket client the suite already has
//! (tokio-tungstenite). The CDP crates (chromiumoxide, headless_chrome) generate bindings for
//! the whole protocol, a large build for four commands; a WebDriver client would need
//! chromedriver beside chromium, a second program to keep in step.
//!
//! The relay's certificate is trusted by its public key only
//! (`--ignore-certificate-errors-spki-list`, with a user-data directory of the test's own), so
//! the page is a secure context with `Secure` cookies, as with a CA the operator installed.
//! Every wait is bounded and says what did not happen.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{KillOnDrop, WAIT, require_tool, wait_for};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    _chromium: KillOnDrop,
    rt: tokio::runtime::Runtime,
    ws: Ws,
    session: String,
    next_id: u64,
    pub dir: PathBuf,
}

/// The base64 SHA-256 of the public key of the first certificate in PEM file `cert` (what
/// chromium's `--ignore-certificate-errors-spki-list` takes), by the openssl command.
fn spki_hash(cert: &Path) -> String {
    let openssl = require_tool("openssl", "openssl");
    let sh = format!(
        "{o} x509 -in '{c}' -pubkey -noout | {o} pkey -pubin -outform der | {o} dgst -sha256 -binary | {o} base64 -A",
        o = openssl.display(),
        c = cert.display()
    );
    let out = Command::new("sh").args(["-c", &sh]).output().unwrap();
    assert!(
        out.status.success(),
        "openssl could not hash {}: {}",
        cert.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Browser {
    /// Start chromium (headless, a new profile in `dir`) trusting the certificate in PEM file
    /// `server_cert`, with one empty page.
    pub fn launch(dir: &Path, server_cert: &Path) -> Browser {
        let chromium = require_tool("/usr/bin/chromium", "chromium");
        let profile = dir.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        // Without the background-networking flags chromium keeps trying to reach Google's
        // hosts, which this machine's closed network refuses.
        let child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1280,860",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!(
                "--ignore-certificate-errors-spki-list={}",
                spki_hash(server_cert)
            ))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let chromium = KillOnDrop(child);
        // chromium writes its DevTools port and browser path here once it listens.
        let endpoint = wait_for("chromium to write DevToolsActivePort", || {
            let t = std::fs::read_to_string(profile.join("DevToolsActivePort")).ok()?;
            let mut lines = t.lines();
            let port = lines.next()?.trim().parse::<u16>().ok()?;
            let path = lines.next()?.trim().to_owned();
            Some(format!("ws://127.0.0.1:{port}{path}"))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (ws, _) = rt
            .block_on(tokio_tungstenite::connect_async(endpoint.as_str()))
            .unwrap_or_else(|e| panic!("cannot reach chromium's DevTools at {endpoint}: {e}"));
        let mut b = Browser {
            _chromium: chromium,
            rt,
            ws,
            session: String::new(),
            next_id: 0,
            dir: dir.to_owned(),
        };
        let target = b.command("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = b.command(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.command("Page.enable", json!({}));
        // Every Content-Security-Policy violation of every page, for `csp_violations`.
        b.command(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', e => window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || '') + ' ' + (e.sample || '')));"}),
        );
        b
    }

    /// Send a CDP command (to the page, once attached) and return its result.
    pub fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let ws = &mut self.ws;
        self.rt.block_on(async {
            ws.send(Message::text(msg.to_string())).await.unwrap();
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let m = tokio::time::timeout_at(deadline, ws.next())
                    .await
                    .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                    .unwrap_or_else(|| panic!("chromium closed DevTools during {method}"))
                    .unwrap();
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                // Events (no id) and answers to other commands are skipped.
                if v["id"] != id {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    panic!("CDP {method} failed: {e}");
                }
                return v["result"].clone();
            }
        })
    }

    /// Load `url` and wait for the document to be complete.
    pub fn open(&mut self, url: &str) {
        let r = self.command("Page.navigate", json!({"url": url}));
        if let Some(e) = r.get("errorText") {
            panic!("chromium could not open {url}: {e}");
        }
        self.wait_until(
            &format!("{url} to load"),
            "document.readyState === 'complete'",
        );
    }

    /// Evaluate `expression` in the page (a promise is awaited) and return its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.command(
            "Runtime.evaluate",
            json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page threw evaluating {expression:?}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Wait until `condition` (a script expression) is true in the page.
    pub fn wait_until(&mut self, what: &str, condition: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.eval(&format!("Boolean({condition})")) == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the page: {what} ({condition}); the page says: {}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The visible text of the first element matching CSS `selector` ("" when none).
    pub fn text(&mut self, selector: &str) -> String {
        let v = self.eval(&format!(
            "(document.querySelector({s}) || {{innerText: ''}}).innerText",
            s = json!(selector)
        ));
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Whether the element matching `selector` exists and is shown.
    pub fn visible(&mut self, selector: &str) -> bool {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); return !!e && e.offsetParent !== null; }})()",
            s = json!(selector)
        )) == json!(true)
    }

    /// Type `text` into the input matching `selector`, as keyboard input (it replaces what was
    /// there).
    pub fn type_into(&mut self, selector: &str, text: &str) {
        let found = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return false; e.focus(); e.select && e.select(); return true; }})()",
            s = json!(selector)
        ));
        assert_eq!(found, json!(true), "no input {selector} on the page");
        self.command("Input.insertText", json!({"text": text}));
    }

    /// Press Enter in the focused element, as the keyboard does.
    pub fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            self.command(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": if kind == "keyDown" { "\r" } else { "" }}),
            );
        }
    }

    /// What the page's Content-Security-Policy refused since it loaded.
    pub fn csp_violations(&mut self) -> Vec<String> {
        let v = self.eval("window.__cspViolations || []");
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Click the element matching `selector`.
    pub fn click(&mut self, selector: &str) {
        let found = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return false; e.click(); return true; }})()",
            s = json!(selector)
        ));
        assert_eq!(found, json!(true), "nothing to click at {selector}");
    }

    /// A PNG of the page as shown, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.command("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}
