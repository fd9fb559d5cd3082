//! Mutual challenge-response authentication of the replica link with a pre-shared key.
//!
//! After both sides exchanged [`crate::wire::Message::Hello`] (node ids), each sends an
//! `AuthChallenge` with a fresh 32-byte nonce, then an `AuthResponse` whose MAC is
//!
//! ```text
//! HMAC-SHA256(psk, label(prover role) || len(initiator id) || initiator id
//!                  || len(acceptor id) || acceptor id || initiator nonce || acceptor nonce)
//! ```
//!
//! The role label (the side that connected is the initiator) keeps one side's MAC from being
//! reflected back as the other's; both nonces make every MAC fresh, and both node ids bind it to this
//! pair. MACs are compared in constant time. Data flows only after both responses verified.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest accepted pre-shared key: anything shorter is guessable offline from one transcript.
pub const PSK_BYTES_MIN: usize = 16;
/// Longest accepted pre-shared key.
pub const PSK_BYTES_MAX: usize = 1024;

/// Which end of the TCP connection a party is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that connected.
    Initiator,
    /// The side that accepted.
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Initiator => b"twinsan-replica-v1 initiator",
            Role::Acceptor => b"twinsan-replica-v1 acceptor",
        }
    }
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The peer's MAC does not verify: wrong key, or a tampered/replayed exchange.
    #[error("peer failed to prove knowledge of the pre-shared key")]
    BadMac,
    /// The pre-shared key is outside the accepted length.
    #[error("pre-shared key must be {PSK_BYTES_MIN}..={PSK_BYTES_MAX} bytes, got {0}")]
    BadKeyLength(usize),
    /// The peer sent our own nonce back (reflection attempt).
    #[error("peer echoed our nonce")]
    ReflectedNonce,
    /// A node id is over 64 bytes.
    #[error("node id too long")]
    NodeIdTooLong,
}

/// Everything both sides agree on once hellos and challenges were exchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    /// Node id of the side that connected.
    pub initiator_id: String,
    /// Node id of the side that accepted.
    pub acceptor_id: String,
    /// The initiator's nonce.
    pub initiator_nonce: [u8; 32],
    /// The acceptor's nonce.
    pub acceptor_nonce: [u8; 32],
}

impl Transcript {
    fn keyed(&self, psk: &[u8], prover: Role) -> Result<Hmac<Sha256>, AuthError> {
        if !(PSK_BYTES_MIN..=PSK_BYTES_MAX).contains(&psk.len()) {
            return Err(AuthError::BadKeyLength(psk.len()));
        }
        if self.initiator_nonce == self.acceptor_nonce {
            return Err(AuthError::ReflectedNonce);
        }
        let max = crate::wire::NODE_ID_BYTES_MAX;
        if self.initiator_id.len() > max || self.acceptor_id.len() > max {
            return Err(AuthError::NodeIdTooLong);
        }
        let mut mac =
            Hmac::<Sha256>::new_from_slice(psk).map_err(|_| AuthError::BadKeyLength(psk.len()))?;
        mac.update(prover.label());
        for id in [&self.initiator_id, &self.acceptor_id] {
            // Length prefixes keep ("ab","c") and ("a","bc") from producing the same input.
            mac.update(&[id.len() as u8]);
            mac.update(id.as_bytes());
        }
        mac.update(&self.initiator_nonce);
        mac.update(&self.acceptor_nonce);
        Ok(mac)
    }

    /// The MAC that `prover` sends in its `AuthResponse`.
    pub fn mac(&self, psk: &[u8], prover: Role) -> Result<[u8; 32], AuthError> {
        Ok(self.keyed(psk, prover)?.finalize().into_bytes().into())
    }

    /// Verifies the MAC the peer (acting as `prover`) sent, in constant time.
    pub fn verify(&self, psk: &[u8], prover: Role, mac: &[u8; 32]) -> Result<(), AuthError> {
        self.keyed(psk, prover)?
            .verify_slice(mac)
            .map_err(|_| AuthError::BadMac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            initiator_id: "node-a".into(),
            acceptor_id: "node-b".into(),
            initiator_nonce: [1; 32],
            acceptor_nonce: [2; 32],
        }
    }

    const KEY: &[u8] = b"correct horse battery staple";

    #[test]
    fn mutual_success() {
        let t = transcript();
        let from_initiator = t.mac(KEY, Role::Initiator).unwrap();
        let from_acceptor = t.mac(KEY, Role::Acceptor).unwrap();
        assert_ne!(from_initiator, from_acceptor);
        t.verify(KEY, Role::Initiator, &from_initiator).unwrap();
        t.verify(KEY, Role::Acceptor, &from_acceptor).unwrap();
    }

    #[test]
    fn wrong_key_fails() {
        let t = transcript();
        let mac = t.mac(b"the wrong key, 16+ bytes", Role::Initiator).unwrap();
        assert_eq!(t.verify(KEY, Role::Initiator, &mac), Err(AuthError::BadMac));
    }

    #[test]
    fn reflection_and_tampering_fail() {
        let t = transcript();
        let mac = t.mac(KEY, Role::Acceptor).unwrap();
        // A MAC made for one role does not pass as the other's.
        assert_eq!(t.verify(KEY, Role::Initiator, &mac), Err(AuthError::BadMac));
        let mut other = t.clone();
        other.acceptor_nonce[0] ^= 1;
        assert_eq!(
            other.verify(KEY, Role::Acceptor, &mac),
            Err(AuthError::BadMac)
        );
        let mut renamed = t.clone();
        renamed.initiator_id = "node-c".into();
        assert_eq!(
            renamed.verify(KEY, Role::Acceptor, &mac),
            Err(AuthError::BadMac)
        );
        let mut echoed = t;
        echoed.acceptor_nonce = echoed.initiator_nonce;
        assert_eq!(
            echoed.mac(KEY, Role::Acceptor),
            Err(AuthError::ReflectedNonce)
        );
    }

    #[test]
    fn short_key_refused() {
        assert_eq!(
            transcript().mac(b"short", Role::Initiator),
            Err(AuthError::BadKeyLength(5))
        );
    }
}
