//! The relay's audit trail: one JSON line per control action (every authenticated API call and
//! what it changed, every refused credential) and per data-plane attach or refused handshake,
//! hash-chained ([`culvert_appliance::audit`]) in `audit.jsonl` in the state directory (or the
//! configuration's `audit_file`), and logged under the target `culvert_relay::audit`.
//! `culvert-relay audit verify FILE…` checks a file.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use culvert_appliance::audit::AuditLog;
use serde_json::{Map, Value};

pub struct Audit {
    log: AuditLog,
    /// The file written (none: only the log), for [`Audit::recent`].
    path: Option<PathBuf>,
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
            path: Some(path.to_owned()),
            refusals: Default::default(),
        })
    }

    /// Write nowhere but the log (tests of the router alone).
    pub fn log_only() -> Audit {
        Audit {
            log: AuditLog::new(None),
            path: None,
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

    /// The newest records of the current audit file that `keep` accepts, newest first, at most
    /// `limit`; read backwards from the end, [`SCAN_LIMIT`] bytes at most (`true`: the scan
    /// stopped there, older records were not looked at). Rotated files are not read.
    pub fn recent(
        &self,
        keep: impl Fn(&Value) -> bool,
        limit: usize,
    ) -> std::io::Result<(Vec<Value>, bool)> {
        let Some(path) = &self.path else {
            return Ok((Vec::new(), false));
        };
        read_backwards(path, keep, limit, SCAN_LIMIT)
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

/// Bytes of the audit file one query reads at most.
pub const SCAN_LIMIT: u64 = 64 << 20;
/// A line longer than this is skipped (no record the relay writes comes near it).
const MAX_LINE: usize = 1 << 20;

/// Up to `limit` records of `path` that `keep` accepts, from the end backwards, reading at most
/// `scan_limit` bytes; `true` when the limit stopped the scan before the file's start.
fn read_backwards(
    path: &Path,
    keep: impl Fn(&Value) -> bool,
    limit: usize,
    scan_limit: u64,
) -> std::io::Result<(Vec<Value>, bool)> {
    const CHUNK: u64 = 64 * 1024;
    let mut f = std::fs::File::open(path)?;
    let mut pos = f.metadata()?.len();
    let stop = pos.saturating_sub(scan_limit);
    // The start of a line whose beginning is in a chunk not read yet.
    let mut carry: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    while pos > stop && out.len() < limit {
        let n = CHUNK.min(pos - stop);
        pos -= n;
        f.seek(SeekFrom::Start(pos))?;
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf)?;
        buf.extend_from_slice(&carry);
        let mut lines: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
        // Unless this chunk starts the file, its first piece may be the end of a longer line.
        let first = if pos > 0 { lines.remove(0) } else { &[][..] };
        for line in lines.iter().rev() {
            if line.is_empty() || line.len() > MAX_LINE {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(line)
                && keep(&v)
            {
                out.push(v);
                if out.len() >= limit {
                    break;
                }
            }
        }
        carry = if first.len() > MAX_LINE {
            Vec::new()
        } else {
            first.to_vec()
        };
    }
    let cut = pos > 0 && out.len() < limit;
    Ok((out, cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_matching_records_come_first_across_chunks_and_the_scan_is_bounded() {
        let dir = std::env::temp_dir().join(format!("culvert-audit-recent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let a = Audit::open(&path).unwrap();
        // Long enough that records straddle the 64 KiB chunks.
        let pad = "x".repeat(700);
        for i in 0..400 {
            let who = if i % 2 == 0 { "ada" } else { "bob" };
            a.record(
                "api",
                serde_json::json!({"operator": who, "n": i, "pad": pad}),
            );
        }
        let (ada, cut) = a.recent(|v| v["operator"] == "ada", 1000).unwrap();
        assert!(!cut);
        let ns: Vec<i64> = ada.iter().map(|v| v["n"].as_i64().unwrap()).collect();
        assert_eq!(
            ns,
            (0..400).rev().filter(|i| i % 2 == 0).collect::<Vec<i64>>()
        );
        let (three, _) = a.recent(|_| true, 3).unwrap();
        assert_eq!(
            three
                .iter()
                .map(|v| v["n"].as_i64().unwrap())
                .collect::<Vec<_>>(),
            [399, 398, 397]
        );
        // A scan limit below the file's size stops early and says so.
        let (some, cut) = read_backwards(&path, |_| true, 1000, 100_000).unwrap();
        assert!(
            cut && !some.is_empty() && some.len() < 400,
            "{}",
            some.len()
        );
        assert_eq!(some[0]["n"], 399);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
