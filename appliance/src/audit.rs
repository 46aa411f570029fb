//! A tamper-evident audit file: one JSON object per line, hash-chained.
//!
//! Each line ends with three fields the writer adds after the record's own:
//! `"seq"` (1, 2, … within a chain), `"prev"` (the previous line's hash; 64 zeros for the first
//! line of a new chain) and `"hash"`, the SHA-256 of the line's bytes up to the comma before
//! `"hash"`. Editing, removing or reordering a line therefore breaks either its own hash or the
//! next line's `prev`; [`verify`] finds where.
//!
//! What the chain cannot show: lines cut off the *end* of the newest file, or a file rewritten
//! from the point of an edit onwards by someone who can write it. Every line also goes to the
//! daemon's log (journald), so shipping that off the machine as it is written closes both.
//!
//! The file is opened for appending and re-opened when it was moved or deleted (logrotate's
//! default `create` mode) or truncated in place (`copytruncate` works through O_APPEND); the
//! chain carries on into the new file, so `verify old new` checks across a rotation. At start
//! the chain continues from the file's last complete line, or, when the file is new or empty,
//! from the last line of `FILE.1` (logrotate's name for the rotated file). A write error is logged, never
//! fatal; the chain does not advance past a line that was not written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;

const HASH_FIELD: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the chain stands: the last written line's sequence number and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Head {
    seq: u64,
    hash: String,
}

impl Head {
    fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Chain `record` (a JSON object, serialized) onto `head`: the line to write, and the new head.
fn chain(record: &str, head: &Head) -> Option<(String, Head)> {
    let body = record.trim_end().strip_suffix('}')?;
    let sep = if body.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    let seq = head.seq + 1;
    let hashed = format!("{body}{sep}\"seq\":{seq},\"prev\":\"{}\"", head.hash);
    let hash = sha256_hex(hashed.as_bytes());
    let line = format!("{hashed}{HASH_FIELD}{hash}\"}}");
    Some((line, Head { seq, hash }))
}

/// A line's own chain fields, checked against its hash: `(seq, prev, hash)`.
fn unchain(line: &str) -> Result<(u64, String, String), String> {
    if line.len() < HASH_SUFFIX_LEN || !line.is_char_boundary(line.len() - HASH_SUFFIX_LEN) {
        return Err("not a chained audit line (no hash at its end)".into());
    }
    let (hashed, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
    let hash = suffix
        .strip_prefix(HASH_FIELD)
        .and_then(|s| s.strip_suffix("\"}"))
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or("not a chained audit line (no hash at its end)")?;
    if sha256_hex(hashed.as_bytes()) != hash {
        return Err("the line was changed after it was written (its hash does not match)".into());
    }
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let seq = v["seq"].as_u64().ok_or("no seq")?;
    let prev = v["prev"].as_str().ok_or("no prev")?.to_owned();
    Ok((seq, prev, hash.to_owned()))
}

/// The head of the chain in an existing file: its last line that is a chained record
/// (looked for in the last 64 KiB, then 1 MiB, then 16 MiB).
fn head_of(f: &mut File) -> std::io::Result<Option<Head>> {
    let len = f.metadata()?.len();
    for window in [64u64 << 10, 1 << 20, 16 << 20] {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        f.take(window).read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        // The first line of a window that starts mid-file may be cut: not a candidate.
        let whole = if start > 0 {
            text.split_once('\n').map_or("", |(_, rest)| rest)
        } else {
            &text
        };
        let found = whole.lines().rev().find_map(|l| {
            let (seq, _, hash) = unchain(l).ok()?;
            Some(Head { seq, hash })
        });
        if found.is_some() || start == 0 {
            return Ok(found);
        }
    }
    Ok(None)
}

struct Sink {
    path: PathBuf,
    /// The open file, with the device and inode it had when opened.
    file: Option<(File, u64, u64)>,
}

/// An append-only, hash-chained audit file (none: the chain is kept, nothing is written).
pub struct AuditLog {
    inner: Mutex<(Option<Sink>, Option<Head>)>,
}

impl AuditLog {
    pub fn new(path: Option<&Path>) -> AuditLog {
        let a = AuditLog {
            inner: Mutex::new((None, None)),
        };
        a.set_file(path);
        a
    }

    /// Write to `path` from now on (none: nowhere).
    pub fn set_file(&self, path: Option<&Path>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0.as_ref().map(|s| s.path.as_path()) != path {
            g.0 = path.map(|p| Sink {
                path: p.to_owned(),
                file: None,
            });
        }
    }

    /// Open the file now (at start-up, before privileges are dropped), so that a file that
    /// cannot be written is reported at once.
    pub fn open(&self) -> Result<(), String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (sink, head) = &mut *g;
        let Some(sink) = sink.as_mut() else {
            return Ok(());
        };
        sink.reopen_if_stale(head)
            .map_err(|e| format!("audit file {}: {e}", sink.path.display()))
    }

    /// Chain `record` (one serialized JSON object) and append it. Returns the line as written
    /// (for the log), or the record unchanged when it was not a JSON object.
    pub fn append(&self, record: &str) -> String {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (sink, head) = &mut *g;
        let Some(sink) = sink.as_mut() else {
            let h = head.get_or_insert_with(Head::genesis);
            return match chain(record, h) {
                Some((line, next)) => {
                    *h = next;
                    line
                }
                None => record.to_owned(),
            };
        };
        if let Err(e) = sink.reopen_if_stale(head) {
            warn!(file = %sink.path.display(), error = %e, "cannot open the audit file; the record is in this log");
            return record.to_owned();
        }
        let h = head.get_or_insert_with(Head::genesis);
        let Some((line, next)) = chain(record, h) else {
            return record.to_owned();
        };
        let (f, _, _) = sink.file.as_mut().expect("opened above");
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // One write per record: appends from several writers never interleave.
        match f.write_all(&buf) {
            Ok(()) => *h = next,
            Err(e) => {
                warn!(file = %sink.path.display(), error = %e, "cannot write the audit file; the record is in this log");
                // Reopened (and a cut record ended) at the next write.
                sink.file = None;
            }
        }
        line
    }
}

impl Sink {
    fn reopen_if_stale(&mut self, head: &mut Option<Head>) -> std::io::Result<()> {
        // Re-open when the path now names another file (rotated) or none (deleted).
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let stale = match (&self.file, current) {
            (Some((_, dev, ino)), Some(now)) => (*dev, *ino) != now,
            _ => true,
        };
        if !stale {
            return Ok(());
        }
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let m = f.metadata()?;
        if head.is_none() && m.len() == 0 {
            // Started after a rotation: carry on from the rotated file (logrotate's FILE.1).
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            if let Ok(mut r) = File::open(&rotated) {
                *head = head_of(&mut r)?;
            }
        }
        if m.len() > 0 {
            // Carry on the file's chain (at start: from where the last run left it).
            if head.is_none() {
                *head = head_of(&mut f)?;
            }
            // A record cut short by an earlier failed write is ended before the next one.
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                f.write_all(b"\n")?;
            }
        }
        self.file = Some((f, m.dev(), m.ino()));
        Ok(())
    }
}

/// What [`verify`] found in a set of files that holds an intact chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The first record's `seq`: 1 when the files start a chain, more when they continue one
    /// whose earlier files were not given.
    pub first_seq: u64,
    /// Lines left by a failed write (a cut record), skipped because the chain runs past them.
    pub cut: Vec<String>,
    /// The last record's hash (compare it with the copy shipped off the machine).
    pub head: String,
}

/// Check the chain through `files`, oldest first (rotated files, then the current one). The
/// error names the file and line where it breaks, and how.
pub fn verify(files: &[PathBuf]) -> Result<Verified, String> {
    let mut head: Option<Head> = None;
    let mut first_seq = None;
    let mut records = 0;
    let mut cut = Vec::new();
    let mut pending_cut = None;
    for path in files {
        let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let at = format!("{} line {}", path.display(), i + 1);
            if line.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let (seq, prev, hash) = match unchain(&text) {
                Ok(c) => c,
                // A fragment that does not end a JSON object is what a failed write leaves;
                // the next line's `prev` still has to link to the last good one.
                // Before any record, a fragment could as well be an edited first line.
                Err(_) if head.is_some() && !text.trim_end().ends_with('}') => {
                    if let Some(earlier) = pending_cut.replace(at.clone()) {
                        return Err(format!("{earlier}: incomplete record, followed by another"));
                    }
                    continue;
                }
                Err(e) => return Err(format!("{at}: {e}")),
            };
            match &head {
                None => {
                    if seq == 1 && prev != GENESIS {
                        return Err(format!("{at}: seq 1 must start a chain (prev of zeros)"));
                    }
                    first_seq = Some(seq);
                }
                Some(h) => {
                    if prev != h.hash {
                        return Err(format!(
                            "{at}: does not follow the line before it (seq {} → {seq}): a line \
                             was removed, inserted or reordered here",
                            h.seq
                        ));
                    }
                    if seq != h.seq + 1 {
                        return Err(format!(
                            "{at}: seq {seq} after {}: the chain was restarted or spliced",
                            h.seq
                        ));
                    }
                }
            }
            records += 1;
            head = Some(Head { seq, hash });
            cut.extend(pending_cut.take());
        }
    }
    if let Some(at) = pending_cut {
        return Err(format!(
            "{at}: the last line is incomplete: a record cut short by a failed write, or edited"
        ));
    }
    let head = head.ok_or("no audit records in the files given")?;
    Ok(Verified {
        records,
        first_seq: first_seq.unwrap_or(1),
        cut,
        head: head.hash,
    })
}

/// The daemons' `audit` subcommand: `culvertd audit verify FILE…`, `culvert-relay audit …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Work with the audit file.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files (rotated ones first, oldest first, then the current
    /// one): exit 0 if intact, 1 with the file and line where it breaks.
    Verify {
        /// Require the files to start the chain (seq 1): nothing removed before them.
        #[arg(long)]
        from_start: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

impl Command {
    pub fn run(&self) -> std::process::ExitCode {
        match self {
            Command::Audit {
                command: AuditCommand::Verify { files, from_start },
            } => verify_command(files, *from_start),
        }
    }
}

/// `<program> audit verify FILE…`: print what [`verify`] found; exit 0 if intact, 1 if not.
pub fn verify_command(files: &[PathBuf], from_start: bool) -> std::process::ExitCode {
    match verify(files) {
        Ok(v) if from_start && v.first_seq != 1 => {
            eprintln!(
                "audit NOT intact from the start: the first record is seq {}, so {} earlier \
                 record(s) are not in the files given (removed, or in older rotated files)",
                v.first_seq,
                v.first_seq - 1
            );
            std::process::ExitCode::FAILURE
        }
        Ok(v) => {
            let from = if v.first_seq == 1 {
                "from the start of the chain".to_owned()
            } else {
                format!(
                    "continuing a chain at seq {} (give the rotated files too, oldest first, to \
                     check from its start; --from-start requires it)",
                    v.first_seq
                )
            };
            println!(
                "audit OK: {} records, {from}; last hash {}",
                v.records, v.head
            );
            for c in &v.cut {
                println!(
                    "  note: {c} is a record cut short by a failed write; the chain runs past it"
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("audit NOT intact: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("culvert-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_chain_survives_rotation_and_restarts_and_verifies() {
        let d = dir("rotate");
        let path = d.join("audit.jsonl");
        let a = AuditLog::new(Some(&path));
        a.append(r#"{"event":"one"}"#);
        std::fs::rename(&path, d.join("audit.jsonl.1")).unwrap();
        a.append(r#"{"event":"two"}"#);
        // A restart carries on the file's chain.
        drop(a);
        let a = AuditLog::new(Some(&path));
        let line = a.append(r#"{"event":"three","n":3}"#);
        assert!(
            line.starts_with(r#"{"event":"three","n":3,"seq":3,"prev":""#),
            "{line}"
        );
        let all = [d.join("audit.jsonl.1"), path.clone()];
        let v = verify(&all).unwrap();
        assert_eq!((v.records, v.first_seq), (3, 1));
        // The newest file alone continues a chain.
        assert_eq!(verify(std::slice::from_ref(&path)).unwrap().first_seq, 2);
        // Out of order, the files do not verify.
        assert!(verify(&[path.clone(), d.join("audit.jsonl.1")]).is_err());
        // Stopped, rotated, started: the new file goes on from the rotated one.
        drop(a);
        std::fs::rename(&path, d.join("audit.jsonl.1")).unwrap();
        let a = AuditLog::new(Some(&path));
        a.open().unwrap();
        let line = a.append(r#"{"event":"four"}"#);
        assert!(line.contains(r#""seq":4,"#), "{line}");
        let v = verify(&[d.join("audit.jsonl.1"), path.clone()]).unwrap();
        assert_eq!((v.records, v.first_seq), (3, 2));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_one_byte_edit_and_every_removed_line_is_detected() {
        let d = dir("tamper");
        let path = d.join("audit.jsonl");
        let a = AuditLog::new(Some(&path));
        for i in 0..4 {
            a.append(&format!(r#"{{"event":"e{i}","who":"alice"}}"#));
        }
        let good = std::fs::read(&path).unwrap();
        assert!(verify(std::slice::from_ref(&path)).is_ok());
        for at in 0..good.len() {
            if good[at] == b'\n' {
                continue;
            }
            let mut bad = good.clone();
            bad[at] = if bad[at] == b'a' { b'b' } else { b'a' };
            std::fs::write(&path, &bad).unwrap();
            assert!(
                verify(std::slice::from_ref(&path)).is_err(),
                "an edit at byte {at} went unnoticed"
            );
        }
        let text = String::from_utf8(good).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for skip in 1..lines.len() - 1 {
            let cut: Vec<&str> = (0..lines.len())
                .filter(|i| *i != skip)
                .map(|i| lines[i])
                .collect();
            std::fs::write(&path, cut.join("\n") + "\n").unwrap();
            let e = verify(std::slice::from_ref(&path)).unwrap_err();
            assert!(e.contains(&format!("line {}", skip + 1)), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_record_cut_by_a_failed_write_is_ended_and_the_chain_runs_past_it() {
        let d = dir("cut");
        let path = d.join("audit.jsonl");
        let a = AuditLog::new(Some(&path));
        a.append(r#"{"event":"one"}"#);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"cut")
            .unwrap();
        a.set_file(None);
        a.set_file(Some(&path));
        a.append(r#"{"event":"two"}"#);
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!((v.records, v.cut.len()), (2, 1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
