//! Access tokens: 256-bit random secrets handed out once and stored only as SHA-256 hashes.
//! A presented token is hashed and looked up by its hash; the stored hash is then compared in
//! constant time. (Looking up by the hash of a high-entropy secret reveals nothing usable about
//! the secret through timing.)

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;

/// The SHA-256 of a secret (access token, client token or API key).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl TokenHash {
    pub fn of(secret: &str) -> TokenHash {
        let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenHash(out)
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

impl serde::Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TokenHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad token hash"))
    }
}

/// A new random secret: 32 bytes from the OS, base64url without padding (43 characters).
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random number generator failed");
    URL_SAFE_NO_PAD.encode(b)
}

pub use culvert_protocol::Secret;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hash_round_trips() {
        let a = new_secret();
        let b = new_secret();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        let h = TokenHash::of(&a);
        assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
        assert!(h.matches(&TokenHash::of(&a)));
        assert!(!h.matches(&TokenHash::of(&b)));
        assert_eq!(format!("{:?}", Secret::new(a)), "***");
    }
}
