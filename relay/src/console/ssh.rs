//! SSH consoles: the relay is the SSH client (russh), over the terminal's tunnel connection.
//!
//! The operator's password or private key comes in the terminal's first message, is used for
//! the one login and never stored or logged. The device's host key is pinned per thing and
//! service on first use, in `console-known-hosts` in the state directory (one line each:
//! `THING/SERVICE ALGORITHM BASE64`, OpenSSH's public-key text), and shown to the operator;
//! a different key later is refused with both fingerprints. An admin who knows the device was
//! re-installed deletes its line.
//!
//! russh's client ignores the window its handler asks for (russh issue #770) and defaults to
//! 2 MiB, which lets a flood of pty output bank megabytes after Ctrl-C; the window here is
//! 256 KiB, as for an interactive session.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::SinkExt;
use russh::ChannelMsg;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use serde::Deserialize;
use serde_json::json;

/// The channel window: what the device may send ahead of the page.
const WINDOW: u32 = 256 * 1024;
/// The SSH handshake and login must be done this soon.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How the operator logs in on the device (from the terminal's first message).
#[derive(Deserialize, Default)]
pub struct Login {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    /// A private key, OpenSSH or PuTTY text.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub passphrase: Option<String>,
    #[serde(default)]
    pub cols: Option<u32>,
    #[serde(default)]
    pub rows: Option<u32>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The pinned host keys, in `console-known-hosts`.
pub struct KnownHosts {
    path: PathBuf,
    lock: Mutex<()>,
}

impl KnownHosts {
    pub fn new(path: PathBuf) -> KnownHosts {
        KnownHosts {
            path,
            lock: Mutex::new(()),
        }
    }

    /// The key pinned for `thing`/`service`, if any.
    pub fn get(&self, thing: &str, service: &str) -> Option<PublicKey> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let name = format!("{thing}/{service} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&name))
            .and_then(|k| PublicKey::from_openssh(k.trim()).ok())
    }

    /// Pin `key` for `thing`/`service` (appending to the file).
    pub fn pin(&self, thing: &str, service: &str, key: &PublicKey) -> std::io::Result<()> {
        use std::io::Write;
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let openssh = key
            .to_openssh()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Algorithm and key only: no comment.
        let text = openssh
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{thing}/{service} {text}")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the handler saw of the server's key.
#[derive(Default)]
struct Seen {
    key: Option<PublicKey>,
}

struct Client {
    pinned: Option<PublicKey>,
    seen: Arc<Mutex<Seen>>,
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server else {
            // Host certificates: not supported yet; pin plain keys.
            return Ok(false);
        };
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).key = Some(key.clone());
        Ok(match &self.pinned {
            Some(p) => p.key_data() == key.key_data(),
            None => true,
        })
    }
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

async fn say(page: &mut WebSocket, v: serde_json::Value) {
    let _ = page.send(Message::Text(v.to_string().into())).await;
}

/// Log in on the device over `stream` and carry a shell's pty between it and the page until
/// one of them ends; why it ended.
pub async fn run<S>(
    mut page: WebSocket,
    stream: S,
    login: Login,
    pins: &KnownHosts,
    thing: &str,
    service: &str,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if login.user.is_empty() || (login.password.is_none() && login.key.is_none()) {
        let m = "an SSH console needs a user and a password or a private key";
        say(&mut page, json!({"error": m})).await;
        return m.into();
    }
    let pinned = pins.get(thing, service);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = Arc::new(russh::client::Config {
        window_size: WINDOW,
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    let client = Client {
        pinned: pinned.clone(),
        seen: seen.clone(),
    };
    let mut session = match tokio::time::timeout(
        LOGIN_TIMEOUT,
        russh::client::connect_stream(config, stream, client),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let presented = seen.lock().unwrap_or_else(|e| e.into_inner()).key.clone();
            let m = match (&pinned, presented) {
                (Some(p), Some(k)) if p.key_data() != k.key_data() => format!(
                    "REFUSED: the host key of {thing}/{service} has changed: pinned {}, presented {}. \
                     Someone may be in the middle, or the device was re-installed: if you know it was, \
                     an admin deletes the line \"{thing}/{service} …\" from {} on the relay",
                    fingerprint(p),
                    fingerprint(&k),
                    pins.path().display()
                ),
                _ => format!("the SSH handshake with {thing}/{service} failed: {e}"),
            };
            say(&mut page, json!({"error": m})).await;
            return m;
        }
        Err(_) => {
            let m = format!(
                "the SSH handshake with {thing}/{service} took longer than {LOGIN_TIMEOUT:?}"
            );
            say(&mut page, json!({"error": m})).await;
            return m;
        }
    };
    let key = seen.lock().unwrap_or_else(|e| e.into_inner()).key.clone();
    if let Some(k) = &key {
        let first = pinned.is_none();
        if first && let Err(e) = pins.pin(thing, service, k) {
            tracing::warn!(error = %e, path = %pins.path().display(), "cannot pin a device's SSH host key");
        }
        say(
            &mut page,
            json!({"hostKey": fingerprint(k), "pinned": if first { "now" } else { "before" }}),
        )
        .await;
    }
    let auth = tokio::time::timeout(LOGIN_TIMEOUT, async {
        match (&login.key, &login.password) {
            (Some(text), _) => {
                let k = russh::keys::decode_secret_key(text, login.passphrase.as_deref())
                    .map_err(|e| format!("the private key cannot be read: {e}"))?;
                let hash = session
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| e.to_string())?
                    .flatten();
                session
                    .authenticate_publickey(
                        login.user.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(k), hash),
                    )
                    .await
                    .map_err(|e| e.to_string())
            }
            (None, Some(pw)) => session
                .authenticate_password(login.user.clone(), pw.clone())
                .await
                .map_err(|e| e.to_string()),
            (None, None) => Err("no credential".to_owned()),
        }
    })
    .await;
    match auth {
        Ok(Ok(r)) if r.success() => {}
        Ok(Ok(_)) => {
            let m = format!(
                "{thing}/{service} refused the login as {:?}: check the user and the password or key",
                login.user
            );
            say(&mut page, json!({"error": m})).await;
            return m;
        }
        Ok(Err(e)) => {
            let m = format!("the SSH login failed: {e}");
            say(&mut page, json!({"error": m})).await;
            return m;
        }
        Err(_) => {
            let m = format!("the SSH login took longer than {LOGIN_TIMEOUT:?}");
            say(&mut page, json!({"error": m})).await;
            return m;
        }
    }
    let (cols, rows) = (
        login.cols.unwrap_or(80).clamp(1, 1000),
        login.rows.unwrap_or(24).clamp(1, 1000),
    );
    // The credential is not kept a moment longer than the login.
    drop(login);
    let mut channel = match session.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            let m = format!("the device opened no session: {e}");
            say(&mut page, json!({"error": m})).await;
            return m;
        }
    };
    if let Err(e) = channel
        .request_pty(false, "xterm-256color", cols, rows, 0, 0, &[])
        .await
        .and(channel.request_shell(false).await)
    {
        let m = format!("the device gave no shell: {e}");
        say(&mut page, json!({"error": m})).await;
        return m;
    }
    say(&mut page, json!({"status": "connected"})).await;
    let why = loop {
        tokio::select! {
            m = page.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if channel.data(&b[..]).await.is_err() {
                        break "the device's session ended".to_owned();
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                        && let Some([c, r]) = v["resize"].as_array().map(|a| [a.first().and_then(|x| x.as_u64()), a.get(1).and_then(|x| x.as_u64())])
                        && let (Some(c), Some(r)) = (c, r)
                    {
                        let (c, r) = (c.clamp(1, 1000) as u32, r.clamp(1, 1000) as u32);
                        let _ = channel.window_change(c, r, 0, 0).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    break "the operator closed the terminal".to_owned();
                }
                Some(Ok(_)) => {}
            },
            m = channel.wait() => match m {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    if page.send(Message::Binary(data.to_vec().into())).await.is_err() {
                        break "the page went away".to_owned();
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let m = format!("the shell exited with status {exit_status}");
                    say(&mut page, json!({"closed": m})).await;
                    break m;
                }
                Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => {
                    let m = "the device closed the session".to_owned();
                    say(&mut page, json!({"closed": m})).await;
                    break m;
                }
                Some(_) => {}
            },
        }
    };
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    let _ = page.close().await;
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_key_is_found_for_its_thing_and_service_only() {
        let dir = std::env::temp_dir().join(format!("culvert-known-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pins = KnownHosts::new(dir.join("console-known-hosts"));
        let _ = std::fs::remove_file(pins.path());
        let key = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a comment",
        )
        .unwrap();
        assert!(pins.get("robot-1", "SSH").is_none());
        pins.pin("robot-1", "SSH", &key).unwrap();
        let text = std::fs::read_to_string(pins.path()).unwrap();
        assert_eq!(
            text,
            "robot-1/SSH ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
        );
        assert_eq!(
            pins.get("robot-1", "SSH").unwrap().key_data(),
            key.key_data()
        );
        assert!(pins.get("robot-1", "SSH2").is_none());
        assert!(pins.get("robot-10", "SSH").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
