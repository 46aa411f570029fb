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
    /// Refusals of unauthenticated requests recorded in the current second, and those left
    /// out since the last one written: a flood of bad requests must not fill the disk.
    refusals: std::sync::Mutex<(u64, u32, u64)>,
}

/// Refusals written per second at most; the rest are counted into the next one written.
const REFUSALS_PER_SEC: u32 = 20;

/// Text from a request (a path), bounded for the audit line.
pub fn clip(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Audit {
    /// Open (or create) the audit file now, so that one that cannot be written stops the start.
    pub fn open(path: &Path) -> Result<Audit, String> {
        let log = AuditLog::new(Some(path));
        log.open()?;
        Ok(Audit {
            log,
            refusals: Default::default(),
        })
    }

    /// Write nowhere but the log (tests of the router alone).
    pub fn log_only() -> Audit {
        Audit {
            log: AuditLog::new(None),
            refusals: Default::default(),
        }
    }

    /// Record a refusal of a request no credential vouches for, at most
    /// [`REFUSALS_PER_SEC`] a second; the first one written after a burst says how many were
    /// left out (`unrecorded_before`).
    pub fn refusal(&self, event: &str, mut fields: Value) {
        let second = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        let left_out = {
            let mut g = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let (at, n, skipped) = &mut *g;
            if *at != second {
                (*at, *n) = (second, 0);
            }
            if *n >= REFUSALS_PER_SEC {
                *skipped += 1;
                return;
            }
            *n += 1;
            std::mem::take(skipped)
        };
        if left_out > 0 {
            fields["unrecorded_before"] = Value::from(left_out);
        }
        self.record(event, fields);
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
