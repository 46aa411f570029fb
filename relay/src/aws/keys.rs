//! AWS access key pairs for the AWS control API ([`super`]).
//!
//! SigV4 is an HMAC: to check a signature the relay needs the caller's secret itself, not a
//! hash of it. Rather than keep every operator's secret in the store, the relay derives it:
//! `secret = HMAC-SHA256(relay AWS key, access key id)`, where the relay AWS key is 32 random
//! bytes in a file of its own (`aws.key_file`, default `aws-signing.key` in the state
//! directory, mode 0600, made on the first start). The store holds only which access key ids
//! exist, whose they are, and whether they are revoked or expired; a copy of the store alone
//! reveals no secret. Replacing the key file changes every secret at once (all AWS key pairs
//! must be issued anew); relays that share a store must share the file.
//!
//! Access key ids are `CKIA` and the 12 hex digits of the operator's key record (16 characters,
//! the shortest AWS allows; `CKIA` as AWS's long-term keys start `AKIA`). The dev relay's bootstrap
//! admin has one pair of its own, `CKID…`, derived from the bootstrap API key as well, so it
//! changes when that key does; it exists only with `--dev`, which writes it to `client.env`.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use ring::hmac;

const OPERATOR_PREFIX: &str = "CKIA";
const BOOTSTRAP_PREFIX: &str = "CKID";

pub struct AwsKeys {
    key: hmac::Key,
    /// The dev relay's bootstrap admin pair.
    bootstrap: Option<(String, String)>,
}

impl std::fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKeys")
            .field("bootstrap", &self.bootstrap.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl AwsKeys {
    pub fn from_bytes(bytes: &[u8; 32]) -> AwsKeys {
        AwsKeys {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
            bootstrap: None,
        }
    }

    /// The relay AWS key from `path`, made (32 random bytes, hex, mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<AwsKeys, String> {
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = decode_hex32(text.trim()).ok_or_else(|| {
                    format!(
                        "aws.key_file: {shown} does not hold 64 hex digits; restore it from a backup, \
                         or delete it to make a new one (every AWS key pair must then be issued anew)"
                    )
                })?;
                Ok(AwsKeys::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; 32] = rand::random();
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new();
                f.write(true).create(true).truncate(true);
                std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
                f.open(&tmp)
                    .and_then(|mut f| {
                        f.write_all(format!("{hex}\n").as_bytes())?;
                        f.sync_all()
                    })
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| format!("aws.key_file: cannot create {shown}: {e}"))?;
                tracing::info!(file = %shown, "made the relay's AWS key (secrets of AWS access key pairs derive from it)");
                Ok(AwsKeys::from_bytes(&bytes))
            }
            Err(e) => Err(format!("aws.key_file: cannot read {shown}: {e}")),
        }
    }

    /// Give the bootstrap admin (the relay's `api_key`) a pair: only the dev relay does.
    pub fn with_bootstrap(mut self, api_key: &str) -> AwsKeys {
        let tag = hmac::sign(&self.key, format!("bootstrap\0{api_key}").as_bytes());
        let hex: String = tag.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let id = format!("{BOOTSTRAP_PREFIX}{hex}");
        let secret = self.secret(&id);
        self.bootstrap = Some((id, secret));
        self
    }

    /// The bootstrap admin's pair, if it has one.
    pub fn bootstrap(&self) -> Option<(&str, &str)> {
        self.bootstrap
            .as_ref()
            .map(|(id, s)| (id.as_str(), s.as_str()))
    }

    /// The secret of access key `access_key_id`: 40 characters, as AWS's are.
    pub fn secret(&self, access_key_id: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            format!("culvert aws secret access key\0{access_key_id}").as_bytes(),
        );
        base64::engine::general_purpose::STANDARD.encode(&tag.as_ref()[..30])
    }
}

/// The access key id of operator key record `id` (12 hex digits).
pub fn access_key_id(id: &str) -> String {
    format!("{OPERATOR_PREFIX}{}", id.to_ascii_uppercase())
}

/// The key record id an operator's access key id names.
pub fn record_id(access_key_id: &str) -> Option<String> {
    let hex = access_key_id.strip_prefix(OPERATOR_PREFIX)?;
    (hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_derive_from_the_key_and_the_id_only() {
        let a = AwsKeys::from_bytes(&[7; 32]);
        let b = AwsKeys::from_bytes(&[8; 32]);
        let id = access_key_id("0123456789ab");
        assert_eq!(id, "CKIA0123456789AB");
        assert_eq!(record_id(&id).as_deref(), Some("0123456789ab"));
        assert_eq!(a.secret(&id).len(), 40);
        assert_eq!(a.secret(&id), AwsKeys::from_bytes(&[7; 32]).secret(&id));
        assert_ne!(a.secret(&id), b.secret(&id));
        assert_ne!(a.secret(&id), a.secret(&access_key_id("0123456789ac")));
        for bad in [
            "AKIA0123456789AB",
            "CKIA0123",
            "CKIA0123456789AZ",
            "CKID0123456789AB",
        ] {
            assert_eq!(record_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bootstrap_pair_follows_the_api_key_and_is_no_operator_id() {
        let k = || AwsKeys::from_bytes(&[7; 32]);
        assert!(k().bootstrap().is_none());
        let one = k().with_bootstrap("an api key of some length");
        let (id, secret) = one.bootstrap().unwrap();
        assert!(id.starts_with("CKID") && id.len() == 16, "{id}");
        assert_eq!(record_id(id), None);
        assert_eq!(secret, one.secret(id));
        let other = k().with_bootstrap("another api key of some length");
        assert_ne!(other.bootstrap().unwrap().0, id);
    }

    #[test]
    fn the_key_file_is_made_private_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("culvert-aws-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("aws-signing.key");
        let _ = std::fs::remove_file(&path);
        let made = AwsKeys::load_or_create(&path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = AwsKeys::load_or_create(&path).unwrap();
        assert_eq!(
            made.secret("CKIA000000000000"),
            again.secret("CKIA000000000000")
        );
        std::fs::write(&path, "not hex\n").unwrap();
        let e = AwsKeys::load_or_create(&path).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
