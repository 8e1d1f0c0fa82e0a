//! Sealing, key derivation and proofs, all from `ring`.
//!
//! A sealed box is `| version u8 = 1 | nonce 12 | AES-256-GCM ciphertext + 16-byte tag |`;
//! the tag covers the ciphertext and the caller's associated data (which names what the
//! box is, so a box of one kind is never accepted as another). Nonces are random: a key
//! seals few boxes (tickets, handshake replies), far below the 2^32 random-nonce bound
//! of GCM. Frames in secure mode use counters instead (their own module).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::{hkdf, hmac};

use crate::AuthError;
use crate::secret::{SECRET_BYTES, Secret, fill_random};

const BOX_VERSION: u8 = 1;
pub const TAG_BYTES: usize = 16;
/// What sealing adds to a plaintext.
pub const BOX_OVERHEAD: usize = 1 + NONCE_LEN + TAG_BYTES;

fn aead_key(key: &Secret) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_bytes()).expect("32-byte key"))
}

/// Seals `plain` under `key`, bound to `aad`.
pub fn seal(key: &Secret, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let mut out = Vec::with_capacity(BOX_OVERHEAD + plain.len());
    out.push(BOX_VERSION);
    out.extend_from_slice(&nonce);
    let mut body = plain.to_vec();
    aead_key(key)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
        .expect("sealing cannot fail for in-memory buffers of sane size");
    out.extend_from_slice(&body);
    out
}

/// Opens a box sealed by [`seal`] with the same `key` and `aad`; `what` names it in the
/// error.
pub fn open(
    key: &Secret,
    aad: &[u8],
    sealed: &[u8],
    what: &'static str,
) -> Result<Vec<u8>, AuthError> {
    if sealed.len() < BOX_OVERHEAD {
        return Err(crate::malformed(
            what,
            format!("{} bytes, shorter than a sealed box", sealed.len()),
        ));
    }
    if sealed[0] != BOX_VERSION {
        return Err(crate::malformed(what, format!("sealed-box version {} is unknown", sealed[0])));
    }
    let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().expect("length checked");
    let mut body = sealed[1 + NONCE_LEN..].to_vec();
    let plain = aead_key(key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
        .map_err(|_| AuthError::Unsealable(what))?;
    let n = plain.len();
    body.truncate(n);
    Ok(body)
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Derives `out.len()` bytes from `key` for the purpose `label` and `context`
/// (HKDF-SHA256; the label keeps derivations for different purposes apart).
pub fn derive_bytes(key: &[u8], label: &[u8], context: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sluice-auth-v1").extract(key);
    let info = [label, context];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output of at most 255 blocks");
}

/// A secret derived from `key` (see [`derive_bytes`]).
pub fn derive(key: &Secret, label: &[u8], context: &[u8]) -> Secret {
    let mut b = [0u8; SECRET_BYTES];
    derive_bytes(key.as_bytes(), label, context, &mut b);
    Secret::from_bytes(b)
}

/// HMAC-SHA256 of the pieces, back to back, under `key`.
pub fn mac(key: &Secret, parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().try_into().expect("SHA-256 output is 32 bytes")
}

/// Checks a [`mac`] in constant time.
pub fn verify_mac(key: &Secret, parts: &[&[u8]], tag: &[u8]) -> bool {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    let msg: Vec<u8> = parts.concat();
    hmac::verify(&k, &msg, tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_boxes_open_only_with_their_key_and_label() {
        let k = Secret::generate();
        let b = seal(&k, b"ticket", b"hello");
        assert_eq!(b.len(), 5 + BOX_OVERHEAD);
        assert_eq!(open(&k, b"ticket", &b, "ticket").unwrap(), b"hello");
        assert_eq!(
            open(&Secret::generate(), b"ticket", &b, "ticket"),
            Err(AuthError::Unsealable("ticket"))
        );
        assert_eq!(open(&k, b"reply", &b, "ticket"), Err(AuthError::Unsealable("ticket")));
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x40;
            assert!(open(&k, b"ticket", &t, "ticket").is_err(), "flip at {i} accepted");
        }
        assert!(matches!(
            open(&k, b"ticket", &b[..10], "ticket"),
            Err(AuthError::Malformed { .. })
        ));
        assert_ne!(seal(&k, b"x", b"same"), seal(&k, b"x", b"same"), "fresh nonce per box");
    }

    #[test]
    fn derivation_and_macs() {
        let k = Secret::generate();
        assert_eq!(derive(&k, b"a", b"1"), derive(&k, b"a", b"1"));
        assert_ne!(derive(&k, b"a", b"1"), derive(&k, b"b", b"1"));
        assert_ne!(derive(&k, b"a", b"1"), derive(&k, b"a", b"2"));
        let t = mac(&k, &[b"ab", b"c"]);
        assert!(verify_mac(&k, &[b"a", b"bc"], &t));
        assert!(!verify_mac(&k, &[b"abd"], &t));
        assert!(!verify_mac(&Secret::generate(), &[b"abc"], &t));
    }

    /// Known answers computed independently (Python's hmac and hashlib, HKDF per RFC
    /// 5869 with our fixed salt): a change of the derivation would silently break every
    /// secure-mode peer and every stored proof.
    #[test]
    fn derivation_and_mac_match_known_answers() {
        let mut out = [0u8; 8];
        derive_bytes(&[7u8; 32], b"label", b"ctx", &mut out);
        assert_eq!(out, [0xc1, 0xc9, 0xac, 0xeb, 0x16, 0xde, 0x85, 0x72]);
        let t = mac(&Secret::from_bytes([9u8; 32]), &[b"a", b"bc"]);
        assert_eq!(t[..4], [0x5f, 0xbc, 0x0c, 0x76]);
        assert_eq!(t[28..], [0x5a, 0x4b, 0xdc, 0x23]);
    }
}
