//! Session tickets sealed with configured keys (`session_ticket_keys`,
//! `session_ticket_keys_sds_secret_config`), so that several weir
//! instances, or one across restarts, resume each other's sessions.
//!
//! As Envoy: the first key seals new tickets, every key opens them (rotate
//! by putting the new key first and the old one second). The ticket format
//! is weir's own, not BoringSSL's (Envoy-issued tickets do not resume on
//! weir, nor the reverse):
//!
//! ```text
//! key name (16) | nonce (12) | AES-256-GCM( issued_at (8, big endian) | rustls session )
//! ```
//!
//! The AEAD key is HKDF-SHA256 over the key's 32 HMAC and 32 AES bytes
//! (info: the key name), so every configured byte counts. The additional
//! data is the key name and the context's session id (Envoy's session id
//! context: certificate names and issuers, validation settings, the filter
//! chain's server names), so a ticket sealed for one context does not open
//! in another that shares the keys.
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    hkdf,
    rand::{SecureRandom, SystemRandom},
};
use rustls::server::ProducesTickets;
use xds_client::config::SessionTicketKey;

/// Ticket lifetime without `session_timeout`: BoringSSL's default session
/// timeout (what Envoy's tickets get).
pub const DEFAULT_LIFETIME_SECS: u32 = 7200;

const NAME_LEN: usize = 16;
const TS_LEN: usize = 8;
const HKDF_SALT: &[u8] = b"weir session ticket key v1";

/// A [`ProducesTickets`] over configured keys, bound to one session context.
pub struct KeyTicketer {
    keys: Vec<([u8; NAME_LEN], LessSafeKey)>,
    context: [u8; 32],
    lifetime: u32,
    rng: SystemRandom,
}

impl std::fmt::Debug for KeyTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTicketer")
            .field("keys", &self.keys.len())
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl KeyTicketer {
    /// `keys` is never empty (the translator checks); `lifetime` in seconds.
    pub fn new(keys: &[SessionTicketKey], context: [u8; 32], lifetime: u32) -> KeyTicketer {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT);
        let keys = keys
            .iter()
            .map(|k| {
                let mut ikm = [0u8; 64];
                ikm[..32].copy_from_slice(&k.hmac);
                ikm[32..].copy_from_slice(&k.aes);
                let info = [&k.name[..]];
                let prk = salt.extract(&ikm);
                let okm = prk
                    .expand(&info, &AES_256_GCM)
                    .expect("32 bytes is a valid HKDF-SHA256 output length");
                (k.name, LessSafeKey::new(UnboundKey::from(okm)))
            })
            .collect();
        KeyTicketer {
            keys,
            context,
            lifetime: lifetime.max(1),
            rng: SystemRandom::new(),
        }
    }

    fn aad(&self, name: &[u8]) -> [u8; NAME_LEN + 32] {
        let mut aad = [0u8; NAME_LEN + 32];
        aad[..NAME_LEN].copy_from_slice(name);
        aad[NAME_LEN..].copy_from_slice(&self.context);
        aad
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ProducesTickets for KeyTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (name, key) = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out =
            Vec::with_capacity(NAME_LEN + NONCE_LEN + TS_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(name);
        out.extend_from_slice(&nonce);
        let mut sealed = Vec::with_capacity(TS_LEN + plain.len() + AES_256_GCM.tag_len());
        sealed.extend_from_slice(&unix_now().to_be_bytes());
        sealed.extend_from_slice(plain);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(name)),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (name, rest) = cipher.split_at_checked(NAME_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        // Any key may open it (rotation); an unknown name is a full handshake.
        let (_, key) = self.keys.iter().find(|(n, _)| n[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(self.aad(name)), &mut buf)
            .ok()?;
        let (ts, session) = plain.split_at_checked(TS_LEN)?;
        let issued = u64::from_be_bytes(ts.try_into().ok()?);
        let now = unix_now();
        // Expired (or issued in the future by a peer with a skewed clock
        // beyond the lifetime): not resumed.
        if now.saturating_sub(issued) > u64::from(self.lifetime)
            || issued.saturating_sub(now) > u64::from(self.lifetime)
        {
            return None;
        }
        Some(session.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SessionTicketKey {
        SessionTicketKey {
            name: [seed; 16],
            hmac: [seed.wrapping_add(1); 32],
            aes: [seed.wrapping_add(2); 32],
        }
    }

    #[test]
    fn seal_open_rotation_and_context() {
        let a = KeyTicketer::new(&[key(1)], [7; 32], 60);
        let t = a.encrypt(b"session").expect("sealed");
        assert_eq!(a.decrypt(&t).as_deref(), Some(&b"session"[..]));
        // Rotated: the old key second still opens it; new tickets use the new key.
        let rotated = KeyTicketer::new(&[key(2), key(1)], [7; 32], 60);
        assert_eq!(rotated.decrypt(&t).as_deref(), Some(&b"session"[..]));
        assert_eq!(&rotated.encrypt(b"x").expect("sealed")[..16], &[2u8; 16]);
        // Another key, or another context with the same key: no.
        assert!(KeyTicketer::new(&[key(3)], [7; 32], 60)
            .decrypt(&t)
            .is_none());
        assert!(KeyTicketer::new(&[key(1)], [8; 32], 60)
            .decrypt(&t)
            .is_none());
        // Tampering and truncation fail closed.
        let mut bad = t.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(a.decrypt(&bad).is_none());
        assert!(a.decrypt(&t[..20]).is_none());
        assert!(a.decrypt(&[]).is_none());
    }
}
