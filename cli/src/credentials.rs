//! `culvert login`: the relay, CA and API key saved for the commands that follow, in
//! `$CULVERT_CREDENTIALS`, else `$XDG_CONFIG_HOME/culvert/credentials.json`, else
//! `~/.config/culvert/credentials.json`, readable by the user alone (0600); on Windows
//! `%APPDATA%\culvert\credentials.json`, which the user profile's ACL protects.
//!
//! What the command line or the environment gives (`--relay`, `--api-key`, `CULVERT_*`) wins
//! over the saved values.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Credentials {
    pub relay: String,
    pub api_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Who the key belongs to, as the relay said at login (for `culvert whoami` offline).
    #[serde(default)]
    pub operator: String,
}

impl Credentials {
    /// Where the file is (or would be).
    pub fn path() -> Option<PathBuf> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(p) = env("CULVERT_CREDENTIALS") {
            return Some(PathBuf::from(p));
        }
        let base = env("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".config")))
            .or_else(|| env("APPDATA").map(PathBuf::from))?;
        Some(base.join("culvert").join("credentials.json"))
    }

    /// The saved credentials; none when there is no file. A file that cannot be read or parsed
    /// is an error naming it.
    pub fn load() -> Result<Option<Credentials>, String> {
        let Some(path) = Self::path() else {
            return Ok(None);
        };
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                format!(
                    "{}: {e}; log in again (culvert login) or delete it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write the file, creating it readable by this user alone.
    pub fn save(&self) -> Result<PathBuf, String> {
        let path = Self::path().ok_or("no home directory: set CULVERT_CREDENTIALS to a file")?;
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = open_private(&tmp).map_err(fail)?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        f.write_all(&text).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        Ok(path)
    }

    /// Forget the saved credentials. False if there were none.
    pub fn remove() -> Result<bool, String> {
        let Some(path) = Self::path() else {
            return Ok(false);
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(unix)]
fn open_private(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
}

#[cfg(not(unix))]
fn open_private(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
}

/// Read a secret (an API key, a password) from the terminal without echo, or one line of
/// stdin when it is not one.
pub fn read_secret(prompt: &str, what: &str) -> Result<String, String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let _echo = if tty { EchoOff::new() } else { None };
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the {what}: {e}"))?;
    if tty {
        eprintln!();
    }
    let key = line.trim().to_owned();
    if key.is_empty() {
        return Err(format!("no {what} given"));
    }
    Ok(key)
}

/// Terminal echo turned off until dropped.
struct EchoOff {
    #[cfg(unix)]
    saved: nix::sys::termios::Termios,
}

impl EchoOff {
    #[cfg(unix)]
    fn new() -> Option<EchoOff> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).ok()?;
        Some(EchoOff { saved })
    }

    #[cfg(not(unix))]
    fn new() -> Option<EchoOff> {
        None
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                &self.saved,
            );
        }
    }
}
