//! Secrets: 256 random bits, zeroed when dropped, compared in constant time, never
//! printed by `Debug`.
//!
//! Text form (keyrings, `sluice auth print-key`): base64 of
//! `| version u8 = 1 | 32 secret bytes | crc32c of the first 33 bytes, le32 |`, so a key
//! mangled on its way through a terminal is reported as such instead of as a wrong key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

pub const SECRET_BYTES: usize = 32;
const TEXT_VERSION: u8 = 1;
const TEXT_BYTES: usize = 1 + SECRET_BYTES + 4;

#[derive(Clone)]
pub struct Secret([u8; SECRET_BYTES]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    #[error("not base64")]
    NotBase64,
    #[error("{0} bytes long, a key is {TEXT_BYTES}")]
    WrongLength(usize),
    #[error("key format version {0} is not known to this build")]
    UnknownVersion(u8),
    #[error("checksum mismatch: the key was mistyped or truncated")]
    BadCrc,
}

impl Secret {
    /// A fresh random secret.
    pub fn generate() -> Secret {
        let mut b = [0u8; SECRET_BYTES];
        fill_random(&mut b);
        Secret(b)
    }

    pub fn from_bytes(b: [u8; SECRET_BYTES]) -> Secret {
        Secret(b)
    }

    pub fn as_bytes(&self) -> &[u8; SECRET_BYTES] {
        &self.0
    }

    /// The text form (see the module documentation).
    pub fn encode(&self) -> String {
        let mut raw = [0u8; TEXT_BYTES];
        raw[0] = TEXT_VERSION;
        raw[1..1 + SECRET_BYTES].copy_from_slice(&self.0);
        let crc = crc32c::crc32c(&raw[..1 + SECRET_BYTES]);
        raw[1 + SECRET_BYTES..].copy_from_slice(&crc.to_le_bytes());
        let s = STANDARD.encode(raw);
        raw.zeroize();
        s
    }

    pub fn decode(text: &str) -> Result<Secret, BadKey> {
        let mut raw = STANDARD.decode(text.trim()).map_err(|_| BadKey::NotBase64)?;
        let r = Self::from_raw(&raw);
        raw.zeroize();
        r
    }

    fn from_raw(raw: &[u8]) -> Result<Secret, BadKey> {
        if raw.len() != TEXT_BYTES {
            return Err(BadKey::WrongLength(raw.len()));
        }
        let want = u32::from_le_bytes(raw[1 + SECRET_BYTES..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&raw[..1 + SECRET_BYTES]) != want {
            return Err(BadKey::BadCrc);
        }
        if raw[0] != TEXT_VERSION {
            return Err(BadKey::UnknownVersion(raw[0]));
        }
        let mut b = [0u8; SECRET_BYTES];
        b.copy_from_slice(&raw[1..1 + SECRET_BYTES]);
        Ok(Secret(b))
    }
}

/// Fills `buf` from the operating system's generator.
pub fn fill_random(buf: &mut [u8]) {
    // The system generator fails only if the kernel cannot supply randomness at all;
    // continuing without it would mint guessable keys.
    SystemRandom::new().fill(buf).expect("the system random generator failed");
}

/// A random 64-bit number (challenges, nonces, global ids).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b)
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{SECRET_BYTES} secret bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Secret, E> {
                let b: [u8; SECRET_BYTES] =
                    v.try_into().map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Secret(b))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fresh_secrets_differ_and_never_print() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn mangled_text_is_reported_as_such() {
        let s = Secret::generate();
        let text = s.encode();
        assert_eq!(Secret::decode(&text).unwrap(), s);
        assert_eq!(Secret::decode(&format!("  {text}\n")).unwrap(), s);
        assert_eq!(Secret::decode("not base64!"), Err(BadKey::NotBase64));
        assert_eq!(Secret::decode(&text[..text.len() - 8]), Err(BadKey::WrongLength(33)));
        // One character changed: the crc catches it.
        let mut chars: Vec<char> = text.chars().collect();
        chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
        let mangled: String = chars.into_iter().collect();
        assert_eq!(Secret::decode(&mangled), Err(BadKey::BadCrc));
    }

    proptest! {
        #[test]
        fn text_form_round_trips(b in any::<[u8; SECRET_BYTES]>()) {
            let s = Secret::from_bytes(b);
            prop_assert_eq!(Secret::decode(&s.encode()).unwrap(), s.clone());
            let bin = postcard::to_allocvec(&s).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Secret>(&bin).unwrap(), s);
        }

        #[test]
        fn decoding_garbage_never_panics(t in ".{0,80}") {
            let _ = Secret::decode(&t);
        }
    }
}
