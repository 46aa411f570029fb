//! The audit trail: one JSON line per connection start and end (and per HTTP request), written
//! to the file the configuration names and to the log (target `culvertd::audit`).
//!
//! The file is hash-chained and survives log rotation without a signal
//! ([`culvert_appliance::audit`]; `culvertd audit verify FILE…` checks it). A write error is
//! logged, never fatal: the connection it describes goes on.

use std::path::Path;
use std::time::Duration;

use culvert_appliance::audit::AuditLog;
use serde::Serialize;
use tracing::{info, warn};

/// Why a connection ended, or was never made, and how an HTTP request went: the one set of
/// reasons the audit trail, the metrics' `reason` label and the code all use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The operator's side (or the tunnel) ended it.
    ClientClosed,
    /// The tunnel dropped and the connection could not be resumed (the hold time ran out, or
    /// the other side no longer had it).
    TunnelLost,
    TargetClosed,
    IdleTimeout,
    /// The ACL refused the target's address.
    Denied,
    /// A connection limit or rate.
    Limit,
    /// The target takes one connection at a time and has one (a serial port).
    InUse,
    /// No rule for the service.
    NoRule,
    ConnectFailed,
    ConnectTimeout,
    /// It arrived while culvertd was draining.
    Shutdown,
    /// The site's "remote access allowed" switch was off when it arrived.
    NoConsent,
    /// The switch was turned off while it was open.
    ConsentWithdrawn,
    /// The tunnel was refused on site (`[consent] approve_tunnels`), or nobody approved it in time.
    RefusedOnSite,
    /// Requests: answered by the upstream.
    Ok,
    /// Requests: upgraded (WebSocket).
    Upgraded,
    /// Requests: no route matched.
    NoRoute,
    /// Requests: the upstream failed.
    Error,
    /// Requests: the protocol's parser refused it before any rule saw it (HTTP), or the
    /// bytes were not the rule's protocol (Modbus/TCP).
    Rejected,
    /// Requests: the rule does not allow it (a read-only Modbus rule and a write).
    Refused,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::TunnelLost => "tunnel_lost",
            EndReason::TargetClosed => "target_closed",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::InUse => "in_use",
            EndReason::Denied => "denied",
            EndReason::Limit => "limit",
            EndReason::NoRule => "no_rule",
            EndReason::ConnectFailed => "connect_failed",
            EndReason::ConnectTimeout => "connect_timeout",
            EndReason::Shutdown => "shutdown",
            EndReason::NoConsent => "no_consent",
            EndReason::ConsentWithdrawn => "consent_withdrawn",
            EndReason::RefusedOnSite => "refused_on_site",
            EndReason::Ok => "ok",
            EndReason::Upgraded => "upgraded",
            EndReason::NoRoute => "no_route",
            EndReason::Error => "error",
            EndReason::Rejected => "rejected",
            EndReason::Refused => "refused",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit record. `None` fields are left out.
#[derive(Serialize, Default, Debug, Clone)]
pub struct Record {
    /// RFC 3339, UTC, filled in by [`Audit::record`].
    pub ts: String,
    /// `start`, `end` or `request`.
    pub event: &'static str,
    /// The tunnel: its id when the notification named it, else `token:` and a fingerprint.
    pub tunnel: String,
    /// Who opened the tunnel, and why (as the relay's notification said).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_reason: Option<String>,
    pub service: String,
    /// The tunnel connection (stream id / connection id).
    pub conn: String,
    /// The rule that decided: `services.SSH`, `services.WEB.routes[1]`.
    pub rule: String,
    /// The configured target or upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The address connected to (or refused), after resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_target: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_from_target: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why it ended (or, for requests, how it went).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP: the response's status. Modbus: the exception code a refused request got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Modbus: the unit id a request addressed, and the first register (or coil) it named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register: Option<u16>,
}

impl Record {
    pub fn duration(mut self, d: Duration) -> Record {
        self.duration_ms = Some(d.as_millis() as u64);
        self
    }
}

/// Where audit records go: the hash-chained file ([`culvert_appliance::audit`]) and the log.
/// Cheap to share; the file is re-targeted on reload.
pub struct Audit {
    log: AuditLog,
}

impl Audit {
    pub fn new(path: Option<&Path>) -> Audit {
        Audit {
            log: AuditLog::new(path),
        }
    }

    /// Write to `path` from now on (none: the log only).
    pub fn set_file(&self, path: Option<&Path>) {
        self.log.set_file(path);
    }

    /// Open the file now (at start-up, before privileges are dropped), so that a file that
    /// cannot be written is reported at once.
    pub fn open(&self) -> Result<(), String> {
        self.log.open()
    }

    pub fn record(&self, mut r: Record) {
        r.ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = match serde_json::to_string(&r) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        let line = self.log.append(&line);
        info!(target: "culvertd::audit", "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_rotation() {
        let dir = std::env::temp_dir().join(format!("culvertd-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let a = Audit::new(Some(&path));
        let rec = |s: &str| Record {
            event: "start",
            service: s.into(),
            ..Record::default()
        };
        a.record(rec("one"));
        std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
        a.record(rec("two"));
        std::fs::remove_file(&path).unwrap();
        a.record(rec("three"));
        // A record cut short (disk full, say) does not swallow the next one.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"cut")
            .unwrap();
        a.set_file(None);
        a.set_file(Some(&path));
        a.record(rec("four"));
        let old = std::fs::read_to_string(dir.join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("\"one\"") && !old.contains("\"two\""), "{old}");
        assert!(
            new.contains("\"three\"") && new.lines().count() == 3,
            "{new}"
        );
        assert!(new.lines().nth(2).unwrap().contains("\"four\""), "{new}");
        let v: serde_json::Value = serde_json::from_str(new.lines().next().unwrap()).unwrap();
        assert_eq!(v["event"], "start");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("address").is_none());
        assert_eq!(v["seq"], 3, "the chain carries on across the rotation");
        // The deleted file held seq 2: the current one continues the chain after it.
        let checked = culvert_appliance::audit::verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(
            (checked.first_seq, checked.records, checked.cut.len()),
            (3, 2, 1)
        );
        let files = [dir.join("audit.jsonl.1"), path.clone()];
        assert!(culvert_appliance::audit::verify(&files).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
