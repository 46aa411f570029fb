//! Process limits a long-running daemon sets for itself.

/// The soft open-file limit of this process, after raising it to the hard limit. A daemon holds
/// one descriptor per connection, and the usual soft default (1024) would cap it there long
/// before the hard limit (systemd's default is 524288; the units set `LimitNOFILE=`). Go's
/// runtime does the same at start-up.
pub fn raise_open_file_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard))
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() =>
        {
            usize::try_from(hard).unwrap_or(usize::MAX)
        }
        Ok((soft, _)) => usize::try_from(soft).unwrap_or(usize::MAX),
        Err(_) => 1024,
    }
}

/// The hard open-file limit: what [`raise_open_file_limit`] raises the soft limit to.
pub fn open_file_hard_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| usize::try_from(hard).unwrap_or(usize::MAX))
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit};
        let got = super::raise_open_file_limit();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(got as u64, soft);
    }
}
