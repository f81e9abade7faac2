//! Bootstrap tokens in kubeadm's form (`[a-z0-9]{6}.[a-z0-9]{16}`): generation, parsing, the stored
//! record (the secret only as a SHA-256 hash) and the pure admission check.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Store prefix of token records.
pub const PREFIX: &str = "/meshd/tokens/";
/// Format version of [`TokenRecord`].
pub const RECORD_VERSION: u32 = 1;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A token: a public id and a secret. The secret is zeroized on drop and never printed by `Debug`.
pub struct Token {
    /// The public part (6 characters), the record's key.
    pub id: String,
    secret: Zeroizing<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

/// Why a token string is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed token: expected the form [a-z0-9]{{6}}.[a-z0-9]{{16}}")]
pub struct MalformedToken;

fn random_string(n: usize) -> Result<String, String> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        rng.fill(&mut buf)
            .map_err(|_| "the system random source failed".to_string())?;
        for b in buf {
            // Rejection sampling: 252 = 7 * 36, so every character is equally likely.
            if b < 252 && out.len() < n {
                out.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    Ok(out)
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Result<Token, String> {
        Ok(Token {
            id: random_string(6)?,
            secret: Zeroizing::new(random_string(16)?),
        })
    }

    /// Parses `id.secret`.
    pub fn parse(s: &str) -> Result<Token, MalformedToken> {
        let (id, secret) = s.trim().split_once('.').ok_or(MalformedToken)?;
        let ok = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| ALPHABET.contains(&b));
        if !ok(id, 6) || !ok(secret, 16) {
            return Err(MalformedToken);
        }
        Ok(Token {
            id: id.to_owned(),
            secret: Zeroizing::new(secret.to_owned()),
        })
    }

    /// The full token text (`id.secret`). Handle with care.
    pub fn expose(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{}.{}", self.id, self.secret.as_str()))
    }

    /// SHA-256 of the secret, hex: what the store keeps.
    pub fn secret_hash(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.secret.as_bytes(),
        ))
    }
}

/// A token as stored (`/meshd/tokens/<id>`), without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Format version.
    pub version: u32,
    /// The token id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Remaining uses; `None` = unlimited until expiry.
    pub uses_left: Option<u32>,
    /// How many nodes it admitted.
    #[serde(default)]
    pub used: u32,
    /// Revoked by an operator (kept until it expires, so the log can say why a join was refused).
    #[serde(default)]
    pub revoked: bool,
}

/// Why a token was refused. The caller only ever sees a generic message; this goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No record with that id (never existed, or cleaned up after expiry).
    #[error("unknown token")]
    Unknown,
    /// Revoked by an operator.
    #[error("revoked token")]
    Revoked,
    /// Past its expiry.
    #[error("expired token")]
    Expired,
    /// The secret does not match.
    #[error("wrong token secret")]
    WrongSecret,
    /// No uses left.
    #[error("token already used up")]
    UsedUp,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenRecord {
    /// The record of a new token.
    pub fn new(
        token: &Token,
        ttl: Duration,
        uses: Option<u32>,
        description: &str,
        now: SystemTime,
    ) -> Self {
        TokenRecord {
            version: RECORD_VERSION,
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            description: description.to_owned(),
            created: unix(now),
            expires: unix(now).saturating_add(ttl.as_secs()),
            uses_left: uses,
            used: 0,
            revoked: false,
        }
    }

    /// Whether `token` may join now (the secret compared in constant time). Pure.
    pub fn admit(&self, token: &Token, now: SystemTime) -> Result<(), Refusal> {
        let want = self.secret_sha256.as_bytes();
        let got = token.secret_hash();
        if token.id != self.id || want.ct_eq(got.as_bytes()).unwrap_u8() != 1 {
            return Err(Refusal::WrongSecret);
        }
        if self.revoked {
            return Err(Refusal::Revoked);
        }
        if unix(now) >= self.expires {
            return Err(Refusal::Expired);
        }
        if self.uses_left == Some(0) {
            return Err(Refusal::UsedUp);
        }
        Ok(())
    }

    /// The record after one more use.
    pub fn consumed(&self) -> TokenRecord {
        let mut r = self.clone();
        r.uses_left = r.uses_left.map(|u| u.saturating_sub(1));
        r.used = r.used.saturating_add(1);
        r
    }
}

/// The store key of token `id`.
pub fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn generated_tokens_have_kubeadms_form_and_parse_back() {
        for _ in 0..200 {
            let t = Token::generate().unwrap();
            let s = t.expose();
            let (id, secret) = s.split_once('.').unwrap();
            assert_eq!((id.len(), secret.len()), (6, 16));
            let back = Token::parse(&s).unwrap();
            assert_eq!(back.secret_hash(), t.secret_hash());
        }
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdefg",
            "abc-ef.0123456789abcdef",
        ] {
            assert_eq!(Token::parse(bad).unwrap_err(), MalformedToken, "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        assert_eq!(format!("{t:?}"), "Token(abcdef.<redacted>)");
    }

    #[test]
    fn admission() {
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        let r = TokenRecord::new(&t, Duration::from_secs(60), Some(1), "x", now());
        assert!(!serde_json::to_string(&r)
            .unwrap()
            .contains("0123456789abcdef"));
        assert_eq!(r.admit(&t, now()), Ok(()));
        assert_eq!(
            r.admit(&t, now() + Duration::from_secs(60)),
            Err(Refusal::Expired)
        );
        let wrong = Token::parse("abcdef.0123456789abcdee").unwrap();
        assert_eq!(r.admit(&wrong, now()), Err(Refusal::WrongSecret));
        let used = r.consumed();
        assert_eq!((used.uses_left, used.used), (Some(0), 1));
        assert_eq!(used.admit(&t, now()), Err(Refusal::UsedUp));
        let unlimited = TokenRecord::new(&t, Duration::from_secs(60), None, "", now()).consumed();
        assert_eq!(unlimited.admit(&t, now()), Ok(()));
        let mut revoked = r.clone();
        revoked.revoked = true;
        assert_eq!(revoked.admit(&t, now()), Err(Refusal::Revoked));
    }
}
