//! Dropping root. Under systemd the unit's `User=` does this (and is preferred); a daemon started
//! as root by hand, or by an init without that, drops to its configured user itself, after it
//! has read its keys and bound its ports.

use nix::unistd::{Uid, User, getuid, setgid, setgroups, setuid};

/// If running as root and `user` is set, become that user (its primary group, no supplementary
/// groups). Returns what happened, for the log.
pub fn drop_to(user: Option<&str>) -> Result<Option<String>, String> {
    if !getuid().is_root() {
        return Ok(None);
    }
    let Some(name) = user else {
        return Ok(Some(
            "running as root: set daemon.user to drop to an unprivileged user".into(),
        ));
    };
    let u = User::from_name(name)
        .map_err(|e| format!("looking up user {name:?}: {e}"))?
        .ok_or_else(|| format!("user {name:?} does not exist (create it, or unset daemon.user)"))?;
    if u.uid.is_root() {
        return Err(format!("daemon.user {name:?} is root"));
    }
    setgroups(&[u.gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(u.gid).map_err(|e| format!("setgid({}): {e}", u.gid))?;
    setuid(u.uid).map_err(|e| format!("setuid({}): {e}", u.uid))?;
    // Make sure there is no way back.
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err("could regain root after dropping privileges".into());
    }
    Ok(Some(format!(
        "dropped privileges to {name} (uid {}, gid {})",
        u.uid, u.gid
    )))
}
