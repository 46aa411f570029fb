//! The relay's audit trail: one JSON line per control action (every authenticated API call and
//! what it changed, every refused credential) and per data-plane attach or refused handshake,
//! hash-chained ([`culvert_appliance::audit`]) in `audit.jsonl` in the state directory (or the
//! configuration's `audit_file`), and logged under the target `culvert_relay::audit`.
//! `culvert-relay audit verify FILE…` checks a file.

use std::path::Path;

use culvert_appliance::audit::AuditLog;
use serde_json::{Map, Value};

pub struct Audit {
    log: AuditLog,
}

impl Audit {
    /// Open (or create) the audit file now, so that one that cannot be written stops the start.
    pub fn open(path: &Path) -> Result<Audit, String> {
        let log = AuditLog::new(Some(path));
        log.open()?;
        Ok(Audit { log })
    }

    /// Write nowhere but the log (tests of the router alone).
    pub fn log_only() -> Audit {
        Audit {
            log: AuditLog::new(None),
        }
    }

    /// Record `event` with its fields (`None` values are left out).
    pub fn record(&self, event: &str, fields: Value) {
        let mut m = Map::new();
        m.insert(
            "ts".into(),
            Value::String(
                time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ),
        );
        m.insert("event".into(), Value::String(event.to_owned()));
        if let Value::Object(f) = fields {
            m.extend(f.into_iter().filter(|(_, v)| !v.is_null()));
        }
        let line = self.log.append(&Value::Object(m).to_string());
        tracing::info!(target: "culvert_relay::audit", "{line}");
    }
}
