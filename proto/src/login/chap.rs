//! CHAP with MD5 (RFC 1994 as profiled by RFC 7143 section 12.1.3).
//!
//! Target side: pick `CHAP_A=5`, issue `CHAP_I`/`CHAP_C` from caller-provided
//! random bytes, verify `CHAP_N`/`CHAP_R`, and for mutual CHAP answer the
//! initiator's own `CHAP_I`/`CHAP_C` with `CHAP_N`/`CHAP_R`. Initiator side
//! helpers exist for our load generator.
//!
//! Secret rules we enforce (RFC 7143 section 12.1.3): secrets are byte
//! strings of at least 12 bytes (96 bits; the RFC says an implementation
//! SHOULD NOT send a response with a shorter secret unless IPsec protects the
//! connection, and we never rely on IPsec) and at most 255 bytes (our own
//! bound, matching the longest simple text value an administrator could
//! type). The two directions of mutual CHAP must use different secrets (RFC
//! MUST). A challenge from the initiator identical to ours is refused as a
//! reflection attack (RFC MUST).

use md5::{Digest, Md5};
use thiserror::Error;

use super::text::{encode_hex, parse_binary, parse_number, split_list, TextPair};

/// CHAP algorithm number for MD5 (the only one RFC 7143 requires).
pub const CHAP_ALGORITHM_MD5: u8 = 5;

/// Length of the challenges we issue. RFC 1994 leaves it open; 16 random
/// bytes match the MD5 output size and are what common targets use.
pub const CHALLENGE_LEN_BYTES: usize = 16;

/// Shortest challenge we answer as initiator side or accept from an
/// initiator in mutual CHAP: short challenges make precomputed-response
/// attacks cheap.
pub const MIN_PEER_CHALLENGE_LEN_BYTES: usize = 16;

/// Longest challenge we accept from a peer (RFC 7143 caps CHAP_C at 1024 bytes).
pub const MAX_PEER_CHALLENGE_LEN_BYTES: usize = 1024;

/// MD5 response length.
pub const RESPONSE_LEN_BYTES: usize = 16;

/// Shortest secret we accept: 96 bits (RFC 7143 section 12.1.3).
pub const MIN_SECRET_LEN_BYTES: usize = 12;

/// Longest secret we accept.
pub const MAX_SECRET_LEN_BYTES: usize = 255;

/// Longest CHAP user name (CHAP_N is a simple text value).
pub const MAX_USER_LEN_BYTES: usize = 255;

/// CHAP failures. All of them end the login with "authentication failure".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChapError {
    /// Secret shorter than [`MIN_SECRET_LEN_BYTES`] (includes empty).
    #[error("CHAP secret shorter than {MIN_SECRET_LEN_BYTES} bytes")]
    SecretTooShort,
    /// Secret longer than [`MAX_SECRET_LEN_BYTES`].
    #[error("CHAP secret longer than {MAX_SECRET_LEN_BYTES} bytes")]
    SecretTooLong,
    /// User name empty or longer than [`MAX_USER_LEN_BYTES`].
    #[error("CHAP user name empty or too long")]
    BadUser,
    /// Mutual CHAP configured with the same secret in both directions.
    #[error("mutual CHAP secret equals the initiator secret")]
    SameSecretBothWays,
    /// The initiator offered no algorithm we support (we support MD5 only).
    #[error("no supported CHAP algorithm offered")]
    NoSupportedAlgorithm,
    /// A required CHAP key was not sent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// CHAP_I not a number in 0..=255.
    #[error("bad CHAP_I")]
    BadIdentifier,
    /// CHAP_C not decodable, too short or too long.
    #[error("bad CHAP_C")]
    BadChallenge,
    /// CHAP_R not decodable or not 16 bytes.
    #[error("bad CHAP_R")]
    BadResponse,
    /// CHAP_N does not name the configured user.
    #[error("unknown CHAP user")]
    UserMismatch,
    /// CHAP_R does not match the expected response.
    #[error("CHAP response mismatch")]
    ResponseMismatch,
    /// The initiator's challenge equals ours (reflection attack).
    #[error("initiator reflected our challenge")]
    ReflectedChallenge,
    /// The initiator asked for mutual CHAP but the target has no credentials.
    #[error("mutual CHAP requested but not configured")]
    MutualNotConfigured,
}

/// A validated CHAP identity: user name plus secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    user: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for ChapCredentials {
    // Never print secrets into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ChapCredentials {
    /// Validates and builds credentials (see the module doc for the rules).
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self, ChapError> {
        let user = user.into();
        let secret = secret.into();
        if user.is_empty() || user.len() > MAX_USER_LEN_BYTES || user.contains('\0') {
            return Err(ChapError::BadUser);
        }
        if secret.len() < MIN_SECRET_LEN_BYTES {
            return Err(ChapError::SecretTooShort);
        }
        if secret.len() > MAX_SECRET_LEN_BYTES {
            return Err(ChapError::SecretTooLong);
        }
        Ok(Self { user, secret })
    }

    /// The CHAP user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

/// Computes the CHAP MD5 response: `MD5(identifier || secret || challenge)`.
pub fn chap_md5_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; RESPONSE_LEN_BYTES] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares two byte strings in time independent of where they differ, so a
/// network attacker cannot learn a response prefix by timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Picks MD5 from an initiator's `CHAP_A` list, if offered.
pub fn select_algorithm(chap_a: &str) -> Option<u8> {
    split_list(chap_a)
        .filter_map(|v| parse_number(v).ok())
        .find(|&v| v == u64::from(CHAP_ALGORITHM_MD5))
        .map(|_| CHAP_ALGORITHM_MD5)
}

fn parse_identifier(s: &str) -> Result<u8, ChapError> {
    parse_number(s)
        .ok()
        .and_then(|n| u8::try_from(n).ok())
        .ok_or(ChapError::BadIdentifier)
}

fn parse_peer_challenge(s: &str) -> Result<Vec<u8>, ChapError> {
    let c = parse_binary(s, MAX_PEER_CHALLENGE_LEN_BYTES).map_err(|_| ChapError::BadChallenge)?;
    if c.len() < MIN_PEER_CHALLENGE_LEN_BYTES {
        return Err(ChapError::BadChallenge);
    }
    Ok(c)
}

fn parse_response(s: &str) -> Result<[u8; RESPONSE_LEN_BYTES], ChapError> {
    let r = parse_binary(s, RESPONSE_LEN_BYTES).map_err(|_| ChapError::BadResponse)?;
    r.try_into().map_err(|_| ChapError::BadResponse)
}

/// Random input for one CHAP exchange; the caller draws it from a CSPRNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChapEntropy {
    /// CHAP_I we will send.
    pub id: u8,
    /// CHAP_C we will send.
    pub challenge: [u8; CHALLENGE_LEN_BYTES],
}

/// The keys the initiator sent in its CHAP response step.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChapAnswer<'a> {
    /// CHAP_N.
    pub name: Option<&'a str>,
    /// CHAP_R.
    pub response: Option<&'a str>,
    /// CHAP_I (mutual CHAP only).
    pub id: Option<&'a str>,
    /// CHAP_C (mutual CHAP only).
    pub challenge: Option<&'a str>,
}

impl<'a> ChapAnswer<'a> {
    /// Collects the CHAP_N/R/I/C keys from a pair list.
    pub fn from_pairs(pairs: &'a [TextPair]) -> Self {
        let get = |k: &str| super::text::find(pairs, k);
        Self {
            name: get("CHAP_N"),
            response: get("CHAP_R"),
            id: get("CHAP_I"),
            challenge: get("CHAP_C"),
        }
    }
}

/// Target-side CHAP for one login.
#[derive(Debug, Clone)]
pub struct ChapTarget {
    expected: ChapCredentials,
    mutual: Option<ChapCredentials>,
    entropy: ChapEntropy,
}

impl ChapTarget {
    /// Sets up target-side CHAP. `expected` is what the initiator must prove;
    /// `mutual` is what we prove if the initiator asks.
    pub fn new(
        expected: ChapCredentials,
        mutual: Option<ChapCredentials>,
        entropy: ChapEntropy,
    ) -> Result<Self, ChapError> {
        if let Some(m) = &mutual {
            if constant_time_eq(&m.secret, &expected.secret) {
                return Err(ChapError::SameSecretBothWays);
            }
        }
        Ok(Self {
            expected,
            mutual,
            entropy,
        })
    }

    /// Answers the initiator's `CHAP_A` list: `CHAP_A=5`, `CHAP_I`, `CHAP_C`.
    pub fn challenge(&self, chap_a: &str) -> Result<Vec<TextPair>, ChapError> {
        select_algorithm(chap_a).ok_or(ChapError::NoSupportedAlgorithm)?;
        Ok(vec![
            TextPair::new("CHAP_A", CHAP_ALGORITHM_MD5.to_string()),
            TextPair::new("CHAP_I", self.entropy.id.to_string()),
            TextPair::new("CHAP_C", encode_hex(&self.entropy.challenge)),
        ])
    }

    /// Verifies the initiator's answer. On success returns the pairs to send
    /// back: empty for one-way CHAP, `CHAP_N` + `CHAP_R` for mutual CHAP.
    pub fn verify(&self, answer: &ChapAnswer<'_>) -> Result<Vec<TextPair>, ChapError> {
        let name = answer.name.ok_or(ChapError::Missing("CHAP_N"))?;
        let response = answer.response.ok_or(ChapError::Missing("CHAP_R"))?;
        let response = parse_response(response)?;
        let expected = chap_md5_response(
            self.entropy.id,
            &self.expected.secret,
            &self.entropy.challenge,
        );
        // Evaluate both checks before branching so that a wrong user name and
        // a wrong response take the same path.
        let user_ok = constant_time_eq(name.as_bytes(), self.expected.user.as_bytes());
        let resp_ok = constant_time_eq(&response, &expected);
        if !user_ok {
            return Err(ChapError::UserMismatch);
        }
        if !resp_ok {
            return Err(ChapError::ResponseMismatch);
        }
        match (answer.id, answer.challenge) {
            (None, None) => Ok(Vec::new()),
            (Some(_), None) => Err(ChapError::Missing("CHAP_C")),
            (None, Some(_)) => Err(ChapError::Missing("CHAP_I")),
            (Some(id), Some(challenge)) => {
                let mutual = self.mutual.as_ref().ok_or(ChapError::MutualNotConfigured)?;
                let id = parse_identifier(id)?;
                let challenge = parse_peer_challenge(challenge)?;
                if constant_time_eq(&challenge, &self.entropy.challenge) {
                    return Err(ChapError::ReflectedChallenge);
                }
                let r = chap_md5_response(id, &mutual.secret, &challenge);
                Ok(vec![
                    TextPair::new("CHAP_N", mutual.user.clone()),
                    TextPair::new("CHAP_R", encode_hex(&r)),
                ])
            }
        }
    }
}

/// Initiator-side CHAP (for our load generator).
#[derive(Debug, Clone)]
pub struct ChapInitiator {
    creds: ChapCredentials,
    /// Target credentials and our challenge, for mutual CHAP.
    mutual: Option<(ChapCredentials, ChapEntropy)>,
}

impl ChapInitiator {
    /// One-way (`mutual = None`) or mutual CHAP as initiator. For mutual CHAP
    /// pass the target's expected credentials and fresh random entropy.
    pub fn new(
        creds: ChapCredentials,
        mutual: Option<(ChapCredentials, ChapEntropy)>,
    ) -> Result<Self, ChapError> {
        if let Some((m, _)) = &mutual {
            if constant_time_eq(&m.secret, &creds.secret) {
                return Err(ChapError::SameSecretBothWays);
            }
        }
        Ok(Self { creds, mutual })
    }

    /// Whether the target is authenticated too (mutual CHAP).
    pub fn is_mutual(&self) -> bool {
        self.mutual.is_some()
    }

    /// Answers the target's `CHAP_A`/`CHAP_I`/`CHAP_C`: returns `CHAP_N`,
    /// `CHAP_R` and, for mutual CHAP, our `CHAP_I`/`CHAP_C`.
    pub fn respond(
        &self,
        chap_a: &str,
        chap_i: &str,
        chap_c: &str,
    ) -> Result<Vec<TextPair>, ChapError> {
        if parse_number(chap_a).ok() != Some(u64::from(CHAP_ALGORITHM_MD5)) {
            return Err(ChapError::NoSupportedAlgorithm);
        }
        let id = parse_identifier(chap_i)?;
        let challenge = parse_peer_challenge(chap_c)?;
        let r = chap_md5_response(id, &self.creds.secret, &challenge);
        let mut out = vec![
            TextPair::new("CHAP_N", self.creds.user.clone()),
            TextPair::new("CHAP_R", encode_hex(&r)),
        ];
        if let Some((_, e)) = &self.mutual {
            if constant_time_eq(&e.challenge, &challenge) {
                return Err(ChapError::ReflectedChallenge);
            }
            out.push(TextPair::new("CHAP_I", e.id.to_string()));
            out.push(TextPair::new("CHAP_C", encode_hex(&e.challenge)));
        }
        Ok(out)
    }

    /// Checks the target's mutual-CHAP answer (no-op success for one-way).
    pub fn verify_target(
        &self,
        chap_n: Option<&str>,
        chap_r: Option<&str>,
    ) -> Result<(), ChapError> {
        let Some((target, e)) = &self.mutual else {
            return Ok(());
        };
        let name = chap_n.ok_or(ChapError::Missing("CHAP_N"))?;
        let r = parse_response(chap_r.ok_or(ChapError::Missing("CHAP_R"))?)?;
        let expected = chap_md5_response(e.id, &target.secret, &e.challenge);
        let user_ok = constant_time_eq(name.as_bytes(), target.user.as_bytes());
        let resp_ok = constant_time_eq(&r, &expected);
        if !user_ok {
            return Err(ChapError::UserMismatch);
        }
        if !resp_ok {
            return Err(ChapError::ResponseMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(u: &str, s: &str) -> ChapCredentials {
        ChapCredentials::new(u, s.as_bytes()).unwrap()
    }

    const E1: ChapEntropy = ChapEntropy {
        id: 7,
        challenge: [0x11; CHALLENGE_LEN_BYTES],
    };
    const E2: ChapEntropy = ChapEntropy {
        id: 200,
        challenge: [0x22; CHALLENGE_LEN_BYTES],
    };

    #[test]
    fn md5_known_answer() {
        // MD5 of the empty string is a fixed, well-known value; with id and
        // secret empty-ish we check the concatenation order instead.
        let r = chap_md5_response(1, b"ab", b"cd");
        let mut h = Md5::new();
        h.update(b"\x01abcd");
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want);
        let empty: [u8; 16] = Md5::new().finalize().into();
        assert_eq!(encode_hex(&empty), "0xd41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn secret_rules() {
        assert_eq!(
            ChapCredentials::new("u", b"".to_vec()),
            Err(ChapError::SecretTooShort)
        );
        assert_eq!(
            ChapCredentials::new("u", b"elevenbytes".to_vec()),
            Err(ChapError::SecretTooShort)
        );
        assert!(ChapCredentials::new("u", b"twelve-bytes".to_vec()).is_ok());
        assert_eq!(
            ChapCredentials::new("u", vec![1u8; 256]),
            Err(ChapError::SecretTooLong)
        );
        assert_eq!(
            ChapCredentials::new("", b"twelve-bytes".to_vec()),
            Err(ChapError::BadUser)
        );
        let c = creds("u", "twelve-bytes");
        assert_eq!(
            ChapTarget::new(c.clone(), Some(creds("t", "twelve-bytes")), E1).err(),
            Some(ChapError::SameSecretBothWays)
        );
        assert!(!format!("{c:?}").contains("twelve"));
    }

    #[test]
    fn algorithm_selection() {
        assert_eq!(select_algorithm("5"), Some(5));
        assert_eq!(select_algorithm("7,6,5"), Some(5));
        assert_eq!(select_algorithm("0x5"), Some(5));
        assert_eq!(select_algorithm("7,6"), None);
        assert_eq!(select_algorithm(""), None);
        let t = ChapTarget::new(creds("u", "secret-secret"), None, E1).unwrap();
        assert_eq!(t.challenge("6"), Err(ChapError::NoSupportedAlgorithm));
        let c = t.challenge("5").unwrap();
        assert_eq!(c[0], TextPair::new("CHAP_A", "5"));
        assert_eq!(c[1], TextPair::new("CHAP_I", "7"));
        assert_eq!(c[2].value, encode_hex(&[0x11; 16]));
    }

    fn run_one_way(
        target_secret: &str,
        initiator_secret: &str,
    ) -> Result<Vec<TextPair>, ChapError> {
        let t = ChapTarget::new(creds("alice", target_secret), None, E1).unwrap();
        let c = t.challenge("5").unwrap();
        let i = ChapInitiator::new(creds("alice", initiator_secret), None).unwrap();
        let r = i.respond(&c[0].value, &c[1].value, &c[2].value).unwrap();
        t.verify(&ChapAnswer::from_pairs(&r))
    }

    #[test]
    fn one_way_right_and_wrong() {
        assert_eq!(run_one_way("secret-secret", "secret-secret"), Ok(vec![]));
        assert_eq!(
            run_one_way("secret-secret", "secret-wrong!"),
            Err(ChapError::ResponseMismatch)
        );
    }

    #[test]
    fn wrong_user_and_malformed_response() {
        let t = ChapTarget::new(creds("alice", "secret-secret"), None, E1).unwrap();
        let good = encode_hex(&chap_md5_response(7, b"secret-secret", &[0x11; 16]));
        let a = ChapAnswer {
            name: Some("bob"),
            response: Some(&good),
            ..Default::default()
        };
        assert_eq!(t.verify(&a), Err(ChapError::UserMismatch));
        let a = ChapAnswer {
            name: Some("alice"),
            response: Some("0x1234"),
            ..Default::default()
        };
        assert_eq!(t.verify(&a), Err(ChapError::BadResponse));
        let a = ChapAnswer {
            name: Some("alice"),
            ..Default::default()
        };
        assert_eq!(t.verify(&a), Err(ChapError::Missing("CHAP_R")));
        // Upper-case hex and base64 encodings of the right answer both pass.
        let upper = format!("0X{}", good[2..].to_uppercase());
        let a = ChapAnswer {
            name: Some("alice"),
            response: Some(&upper),
            ..Default::default()
        };
        assert_eq!(t.verify(&a), Ok(vec![]));
        let raw = chap_md5_response(7, b"secret-secret", &[0x11; 16]);
        let b64 = format!("0b{}", base64_encode(&raw));
        let a = ChapAnswer {
            name: Some("alice"),
            response: Some(&b64),
            ..Default::default()
        };
        assert_eq!(t.verify(&a), Ok(vec![]));
    }

    fn base64_encode(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn mutual_right_wrong_and_reflection() {
        let t = ChapTarget::new(
            creds("alice", "initiator-secret"),
            Some(creds("target", "target-secret!")),
            E1,
        )
        .unwrap();
        let c = t.challenge("5").unwrap();
        let i = ChapInitiator::new(
            creds("alice", "initiator-secret"),
            Some((creds("target", "target-secret!"), E2)),
        )
        .unwrap();
        let r = i.respond(&c[0].value, &c[1].value, &c[2].value).unwrap();
        let back = t.verify(&ChapAnswer::from_pairs(&r)).unwrap();
        assert_eq!(back[0], TextPair::new("CHAP_N", "target"));
        assert_eq!(
            i.verify_target(Some(&back[0].value), Some(&back[1].value)),
            Ok(())
        );
        // An initiator expecting a different target secret rejects the target.
        let i2 = ChapInitiator::new(
            creds("alice", "initiator-secret"),
            Some((creds("target", "other-secret!!"), E2)),
        )
        .unwrap();
        assert_eq!(
            i2.verify_target(Some(&back[0].value), Some(&back[1].value)),
            Err(ChapError::ResponseMismatch)
        );
        // Reflection: the initiator sends our own challenge back.
        let mut r2 = r.clone();
        r2[3].value = c[2].value.clone();
        assert_eq!(
            t.verify(&ChapAnswer::from_pairs(&r2)),
            Err(ChapError::ReflectedChallenge)
        );
        // Short challenge.
        r2[3].value = "0x0102".into();
        assert_eq!(
            t.verify(&ChapAnswer::from_pairs(&r2)),
            Err(ChapError::BadChallenge)
        );
        // Bad identifier.
        let mut r3 = r.clone();
        r3[2].value = "256".into();
        assert_eq!(
            t.verify(&ChapAnswer::from_pairs(&r3)),
            Err(ChapError::BadIdentifier)
        );
        // Mutual requested but not configured.
        let t1 = ChapTarget::new(creds("alice", "initiator-secret"), None, E1).unwrap();
        assert_eq!(
            t1.verify(&ChapAnswer::from_pairs(&r)),
            Err(ChapError::MutualNotConfigured)
        );
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
