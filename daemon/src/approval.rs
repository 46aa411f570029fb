//! On-site approval of each tunnel (`[consent] approve_tunnels = true`).
//!
//! A tunnel's connections wait (holding their connection slots, not yet connected to any
//! target) until someone at the site decides:
//!
//! - culvertd lists each waiting tunnel as `<approval_dir>/<tunnel>.waiting` (JSON: tunnel,
//!   operator, reason, since, until);
//! - a decision is a file next to it: `<tunnel>.approved` or `<tunnel>.refused`, empty or
//!   `{"by": ..., "why": ...}` (or plain text: who approved, or why refused). `culvertd consent
//!   approve|refuse` writes one; so can an HMI, a PLC's file drop, or a GPIO handler;
//! - nobody deciding within `approval_timeout_secs` refuses it.
//!
//! An approval holds for the tunnel's life (the "remote access allowed" switch can still end
//! it, [`crate::consent`]). A refusal resets its connections (audit reason `refused_on_site`).
//! Each step is in the audit trail (event `approval`). Towards culvert-relay, the state goes to
//! the relay ([`Reporter`]), which shows it to the operator ("waiting for on-site approval")
//! and closes a refused tunnel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::audit::Record;
use crate::config::Approval as Settings;
use crate::rules::{Gateway, Identity};

/// How often the approval directory is read.
const POLL: Duration = Duration::from_millis(500);
/// How often the state is told to the relay again (reports are QoS 0 and idempotent, so a
/// report lost with a broker connection, or a relay restart, is repaired by the next one).
const REPORT_EVERY: Duration = Duration::from_secs(15);
/// Largest decision file read.
const MAX_DECISION: u64 = 4096;
/// Longest `by` / `why` kept.
const MAX_TEXT: usize = 256;

/// Where a tunnel stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Waiting,
    Approved { by: String },
    Refused { by: String, why: String },
}

/// What a decision file may say.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct Decision {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    why: Option<String>,
}

/// What `<tunnel>.waiting` says.
#[derive(Deserialize, Serialize)]
pub struct Waiting {
    pub tunnel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub since: String,
    pub until: String,
}

/// Tells culvert-relay where a tunnel stands, over the gateway's MQTT connection
/// ([`culvert_protocol::on_site_topic`]). Only for tunnels a culvert relay announced: AWS IoT
/// Core would refuse a device publishing on a topic its policy does not allow.
#[derive(Clone)]
pub struct Reporter {
    pub client: AsyncClient,
    pub thing: String,
}

impl Reporter {
    fn report(&self, tunnel: &str, state: &State) {
        let (name, by, detail) = match state {
            State::Waiting => (
                "waiting",
                None,
                Some(format!(
                    "waiting for on-site approval (at the gateway: culvertd consent approve {tunnel})"
                )),
            ),
            State::Approved { by } => ("approved", Some(by.as_str()), None),
            State::Refused { by, why } => ("refused", Some(by.as_str()), Some(why.clone())),
        };
        let payload =
            serde_json::json!({"tunnelId": tunnel, "state": name, "by": by, "detail": detail});
        if let Err(e) = self.client.try_publish(
            culvert_protocol::on_site_topic(&self.thing),
            QoS::AtMostOnce,
            false,
            payload.to_string(),
        ) {
            // Repeated every REPORT_EVERY: the next one may pass.
            warn!(tunnel, error = %e, "could not queue the on-site approval report to the relay");
        }
    }
}

/// The file name a tunnel label gives, if it is safe as one (tunnel ids are; a token
/// fingerprint `token:…` is too).
fn stem(label: &str) -> Option<&str> {
    let ok = !label.is_empty()
        && label.len() <= 128
        && !label.starts_with('.')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
    ok.then_some(label)
}

/// Text from a decision file, made safe for the audit trail.
fn tidy(s: &str) -> String {
    culvert_protocol::tidy_text(s, MAX_TEXT)
}

/// Read a decision file: `None` while there is none.
fn read_decision(dir: &Path, stem: &str) -> Option<State> {
    for (suffix, approve) in [("approved", true), ("refused", false)] {
        let path = dir.join(format!("{stem}.{suffix}"));
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let text = if meta.len() <= MAX_DECISION {
            std::fs::read_to_string(&path).unwrap_or_default()
        } else {
            String::new()
        };
        let d = if text.trim_start().starts_with('{') {
            serde_json::from_str::<Decision>(&text).unwrap_or_default()
        } else if approve {
            Decision {
                by: Some(text.lines().next().unwrap_or("").to_owned()),
                why: None,
            }
        } else {
            Decision {
                by: None,
                why: Some(text.lines().next().unwrap_or("").to_owned()),
            }
        };
        let _ = std::fs::remove_file(&path);
        let by =
            d.by.map(|b| tidy(&b))
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| "on site".into());
        return Some(if approve {
            State::Approved { by }
        } else {
            let why = d
                .why
                .map(|w| tidy(&w))
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "refused on site".into());
            State::Refused { by, why }
        });
    }
    None
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Ask the site about tunnel `label`; the receiver follows the answer. The asking ends (and its
/// `.waiting` file goes) when the returned guard is dropped, with the tunnel.
pub fn ask(
    gw: Arc<Gateway>,
    settings: Settings,
    label: String,
    identity: Identity,
    reporter: Option<Reporter>,
) -> (watch::Receiver<State>, AskGuard) {
    let (tx, rx) = watch::channel(State::Waiting);
    let task = tokio::spawn(decide(
        gw,
        settings.clone(),
        label.clone(),
        identity,
        reporter,
        tx,
    ));
    let waiting = stem(&label).map(|s| settings.dir.join(format!("{s}.waiting")));
    (rx, AskGuard { task, waiting })
}

/// Ends the asking for a tunnel.
pub struct AskGuard {
    task: tokio::task::JoinHandle<()>,
    waiting: Option<PathBuf>,
}

impl Drop for AskGuard {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(w) = &self.waiting {
            let _ = std::fs::remove_file(w);
        }
    }
}

async fn decide(
    gw: Arc<Gateway>,
    settings: Settings,
    label: String,
    identity: Identity,
    reporter: Option<Reporter>,
    tx: watch::Sender<State>,
) {
    let record = |detail: String| {
        gw.audit.record(Record {
            event: "approval",
            tunnel: label.clone(),
            operator: identity.operator.clone(),
            operator_reason: identity.reason.clone(),
            detail: Some(detail),
            ..Record::default()
        });
    };
    let decided = |state: State| {
        match &state {
            State::Approved { by } => {
                info!(tunnel = %label, %by, "approved on site");
                record(format!("approved on site by {by}"));
            }
            State::Refused { by, why } => {
                warn!(tunnel = %label, %by, %why, "refused on site");
                record(format!("refused on site by {by}: {why}"));
            }
            State::Waiting => {}
        }
        if let Some(r) = &reporter {
            r.report(&label, &state);
        }
        tx.send_replace(state);
    };
    let Some(stem) = stem(&label) else {
        decided(State::Refused {
            by: "culvertd".into(),
            why: format!("the tunnel's label {label:?} cannot name an approval file"),
        });
        return;
    };
    let dir = settings.dir.clone();
    let now = time::OffsetDateTime::now_utc();
    let waiting = Waiting {
        tunnel: label.clone(),
        operator: identity.operator.clone(),
        reason: identity.reason.clone(),
        since: rfc3339(now),
        until: rfc3339(now + settings.timeout),
    };
    // Group-writable: whoever may decide (the culvert group) drops decisions in it. A directory
    // culvertd creates gets 0770 whatever the umask (the unit's is 0027); one the site made keeps
    // the modes the site gave it.
    let listed = {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let existed = dir.is_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o770)
            .create(&dir)
            .and_then(|()| {
                if existed {
                    Ok(())
                } else {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))
                }
            })
    }
    .and_then(|()| {
        // Old decisions do not count: only one made while this tunnel waits.
        for suffix in ["approved", "refused"] {
            let _ = std::fs::remove_file(dir.join(format!("{stem}.{suffix}")));
        }
        let tmp = dir.join(format!(".{stem}.waiting.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&waiting).unwrap_or_default(),
        )?;
        std::fs::rename(&tmp, dir.join(format!("{stem}.waiting")))
    });
    if let Err(e) = listed {
        decided(State::Refused {
            by: "culvertd".into(),
            why: format!(
                "cannot list the tunnel for approval in {}: {e}",
                dir.display()
            ),
        });
        return;
    }
    info!(tunnel = %label, operator = ?identity.operator, dir = %dir.display(), "tunnel waits for on-site approval: culvertd consent approve {label}");
    record(format!(
        "waiting for on-site approval (culvertd consent approve {label}; {} s)",
        settings.timeout.as_secs()
    ));
    if let Some(r) = &reporter {
        r.report(&label, &State::Waiting);
    }
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let mut poll = tokio::time::interval(POLL);
    let mut report =
        tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
    let state = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break State::Refused {
                by: "culvertd".into(),
                why: format!("nobody on site approved it within {} s", settings.timeout.as_secs()),
            },
            _ = report.tick() => if let Some(r) = &reporter {
                r.report(&label, &State::Waiting);
            },
            _ = poll.tick() => {
                let (d, s) = (dir.clone(), stem.to_owned());
                if let Ok(Some(state)) = tokio::task::spawn_blocking(move || read_decision(&d, &s)).await {
                    break state;
                }
            }
        }
    };
    let _ = std::fs::remove_file(dir.join(format!("{stem}.waiting")));
    decided(state.clone());
    // The relay hears the outcome again now and then, for as long as the tunnel lasts.
    if let Some(r) = &reporter {
        loop {
            report.tick().await;
            r.report(&label, &state);
        }
    }
}

/// Wait until the tunnel is approved: `Err(why)` if it was refused.
pub async fn approved(mut rx: watch::Receiver<State>) -> Result<(), String> {
    loop {
        match &*rx.borrow_and_update() {
            State::Approved { .. } => return Ok(()),
            State::Refused { by, why } => return Err(format!("refused on site by {by}: {why}")),
            State::Waiting => {}
        }
        if rx.changed().await.is_err() {
            return Err("the tunnel ended before anyone on site decided".into());
        }
    }
}

/// `culvertd consent …`: what a person at the site runs.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List the tunnels waiting for on-site approval.
    List,
    /// Approve a waiting tunnel (with no id: the only one waiting).
    Approve {
        tunnel: Option<String>,
        /// Who approves (default: $SUDO_USER or $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Refuse a waiting tunnel (with no id: the only one waiting).
    Refuse {
        tunnel: Option<String>,
        /// Why (the operator is shown it).
        #[arg(long)]
        why: Option<String>,
        #[arg(long)]
        by: Option<String>,
    },
}

/// The tunnels waiting in `dir`, oldest first.
pub fn waiting_in(dir: &Path) -> Result<Vec<Waiting>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "{}: {e} (is culvertd running with [consent] approve_tunnels = true?)",
            dir.display()
        )
    })?;
    let mut out: Vec<Waiting> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".waiting"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by(|a, b| a.since.cmp(&b.since));
    Ok(out)
}

impl Command {
    /// Run against the approval directory `dir`.
    pub fn run(&self, dir: &Path) -> Result<(), String> {
        let waiting = waiting_in(dir)?;
        let (tunnel, approve, by, why) = match self {
            Command::List => {
                if waiting.is_empty() {
                    println!("no tunnel is waiting for on-site approval");
                }
                for w in &waiting {
                    println!(
                        "{}  operator {}  reason {}  waiting since {} (refused at {})",
                        w.tunnel,
                        w.operator.as_deref().unwrap_or("-"),
                        w.reason
                            .as_deref()
                            .map(|r| format!("{r:?}"))
                            .unwrap_or("-".into()),
                        w.since,
                        w.until
                    );
                }
                return Ok(());
            }
            Command::Approve { tunnel, by } => (tunnel, true, by, &None),
            Command::Refuse { tunnel, why, by } => (tunnel, false, by, why),
        };
        let tunnel = match (tunnel, waiting.as_slice()) {
            (Some(t), _) => t.clone(),
            (None, [one]) => one.tunnel.clone(),
            (None, []) => return Err("no tunnel is waiting for on-site approval".into()),
            (None, many) => {
                return Err(format!(
                    "{} tunnels are waiting; name one: {}",
                    many.len(),
                    many.iter()
                        .map(|w| w.tunnel.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        };
        let by = by.clone().or_else(|| {
            ["SUDO_USER", "USER"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        });
        let suffix = write_decision(dir, &waiting, &tunnel, approve, by, why.clone())?;
        println!("tunnel {tunnel} {suffix}");
        Ok(())
    }
}

/// Drop the decision on `tunnel` (one of `waiting`) in `dir`; what it became.
pub fn write_decision(
    dir: &Path,
    waiting: &[Waiting],
    tunnel: &str,
    approve: bool,
    by: Option<String>,
    why: Option<String>,
) -> Result<&'static str, String> {
    let Some(stem) = stem(tunnel) else {
        return Err(format!("{tunnel:?} is not a tunnel id"));
    };
    if !waiting.iter().any(|w| w.tunnel == tunnel) {
        return Err(format!(
            "tunnel {tunnel} is not waiting for approval (`culvertd consent list` shows those that are)"
        ));
    }
    let d = Decision { by, why };
    let suffix = if approve { "approved" } else { "refused" };
    let tmp = dir.join(format!(".{stem}.{suffix}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&d).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, dir.join(format!("{stem}.{suffix}"))))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_labels_name_files() {
        assert_eq!(stem("Ab-12_x"), Some("Ab-12_x"));
        assert_eq!(stem("token:0a1b"), Some("token:0a1b"));
        for bad in ["", "../x", ".hidden", "a/b", "a b", &"x".repeat(200)] {
            assert_eq!(stem(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decision_files_say_who_and_why_in_json_or_plain_text() {
        let dir = std::env::temp_dir().join(format!("culvertd-approval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_decision(&dir, "t1"), None);
        std::fs::write(dir.join("t1.approved"), "").unwrap();
        assert_eq!(
            read_decision(&dir, "t1"),
            Some(State::Approved {
                by: "on site".into()
            })
        );
        assert!(
            !dir.join("t1.approved").exists(),
            "a decision is taken once"
        );
        std::fs::write(dir.join("t2.refused"), "robot is running\nmore").unwrap();
        assert_eq!(
            read_decision(&dir, "t2"),
            Some(State::Refused {
                by: "on site".into(),
                why: "robot is running".into()
            })
        );
        std::fs::write(dir.join("t3.approved"), r#"{"by":"shift\u001b[2Jlead"}"#).unwrap();
        assert_eq!(
            read_decision(&dir, "t3"),
            Some(State::Approved {
                by: "shift?[2Jlead".into()
            })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
