//! WireGuard keys: X25519 public and private keys and preshared keys.
//!
//! meshd writes keys in base64 (as `wg genkey` prints them); the UAPI protocol writes them in hex.
//! Both conversions are here. Secret keys live in [`PrivateKey`] and [`PresharedKey`]: zeroized on
//! drop, `<redacted>` in `Debug`, no `Display`, and their text forms come back in
//! [`Zeroizing`] strings.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use zeroize::Zeroizing;

use super::WgError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn decode_base64(s: &str) -> Option<Zeroizing<[u8; 32]>> {
    let s = s.trim();
    // 32 bytes are 44 base64 characters with padding; refuse anything longer before decoding.
    if s.len() != 44 {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    let mut buf = Zeroizing::new([0u8; 33]);
    let n = B64.decode_slice(s, buf.as_mut()).ok()?;
    if n != 32 {
        return None;
    }
    out.copy_from_slice(&buf[..32]);
    Some(out)
}

fn decode_hex(s: &str) -> Option<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s.trim(), out.as_mut()).ok()?;
    Some(out)
}

/// A WireGuard (X25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the base64 form (`wg pubkey`'s output; surrounding whitespace is ignored).
    pub fn from_base64(s: &str) -> Result<Self, WgError> {
        decode_base64(s).map(|b| PublicKey(*b)).ok_or_else(|| {
            WgError::Key(format!(
                "public key {s:?} is not 32 bytes of base64 (44 characters, as `wg pubkey` prints)"
            ))
        })
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Parses the hex form used by the UAPI protocol.
    pub fn from_hex(s: &str) -> Result<Self, WgError> {
        decode_hex(s)
            .map(|b| PublicKey(*b))
            .ok_or_else(|| WgError::Key(format!("public key {s:?} is not 64 hex digits")))
    }

    /// The hex form used by the UAPI protocol.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    /// Base64, as `wg` prints public keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = WgError;
    /// Parses base64.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

/// A WireGuard (X25519) private key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// A new random key from the system's random source (ring's `SystemRandom`), clamped as
    /// `wg genkey` clamps.
    pub fn generate() -> Result<Self, WgError> {
        use ring::rand::SecureRandom as _;
        let mut b = Zeroizing::new([0u8; 32]);
        ring::rand::SystemRandom::new()
            .fill(b.as_mut())
            .map_err(|_| WgError::Key("the system random source failed".into()))?;
        b[0] &= 248;
        b[31] = (b[31] & 127) | 64;
        Ok(PrivateKey(b))
    }

    /// The key from its 32 bytes (clamping happens when it is used, as in WireGuard).
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        PrivateKey(bytes)
    }

    /// The key's 32 bytes. Handle with care.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the base64 form (`wg genkey`'s output, e.g. a key file's content; surrounding
    /// whitespace is ignored). The error never repeats the input.
    pub fn from_base64(s: &str) -> Result<Self, WgError> {
        decode_base64(s).map(PrivateKey).ok_or_else(|| {
            WgError::Key(
                "private key is not 32 bytes of base64 (44 characters, as `wg genkey` prints)"
                    .into(),
            )
        })
    }

    /// The base64 form.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(*self.0))
    }

    /// Parses the hex form used by the UAPI protocol. The error never repeats the input.
    pub fn from_hex(s: &str) -> Result<Self, WgError> {
        decode_hex(s)
            .map(PrivateKey)
            .ok_or_else(|| WgError::Key("private key is not 64 hex digits".into()))
    }

    /// The hex form used by the UAPI protocol.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        PublicKey(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A WireGuard preshared key (optional extra symmetric key per peer). Zeroized on drop; never
/// printed.
#[derive(Clone)]
pub struct PresharedKey(Zeroizing<[u8; 32]>);

impl PresharedKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        PresharedKey(bytes)
    }

    /// The key's 32 bytes. Handle with care.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether this is the all-zero key, which the UAPI protocol uses for "no preshared key".
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    /// Parses the base64 form (`wg genpsk`'s output). The error never repeats the input.
    pub fn from_base64(s: &str) -> Result<Self, WgError> {
        decode_base64(s)
            .map(PresharedKey)
            .ok_or_else(|| WgError::Key("preshared key is not 32 bytes of base64".into()))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(*self.0))
    }

    /// Parses the hex form used by the UAPI protocol. The error never repeats the input.
    pub fn from_hex(s: &str) -> Result<Self, WgError> {
        decode_hex(s)
            .map(PresharedKey)
            .ok_or_else(|| WgError::Key("preshared key is not 64 hex digits".into()))
    }

    /// The hex form used by the UAPI protocol.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }
}

impl PartialEq for PresharedKey {
    /// Compares every byte (no early exit on the first difference).
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for PresharedKey {}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A key pair as `wg genkey | tee priv | wg pubkey` printed it.
    const PRIV: &str = "WOqxtQssJ9kxWkS2zSktfzt0M3rhWWlK1Ojfz6pS60o=";
    const PUB: &str = "aT3Spbocv0Ky1yySfEmO9H4a4B9lLKTxwsysb9PRgF8=";

    #[test]
    fn base64_and_hex_round_trip() {
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(k.to_base64().as_str(), PRIV);
        let h = k.to_hex();
        assert_eq!(h.len(), 64);
        assert_eq!(PrivateKey::from_hex(&h).unwrap().to_base64().as_str(), PRIV);
        let p = k.public_key();
        assert_eq!(PublicKey::from_hex(&p.to_hex()).unwrap(), p);
        assert_eq!(PublicKey::from_base64(&p.to_base64()).unwrap(), p);
        assert_eq!(p.to_string(), p.to_base64());
        assert_eq!(format!("{:?}", k), "PrivateKey(<redacted>)");
    }

    #[test]
    fn derives_public_key_like_wg() {
        // `wg pubkey` of PRIV (checked against wireguard-tools when writing this test).
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(k.public_key().to_base64(), PUB);
    }

    #[test]
    fn rejects_bad_keys_without_echoing_secrets() {
        assert!(PublicKey::from_base64("abc").is_err());
        assert!(PublicKey::from_base64(&"A".repeat(44)).is_err()); // 33 bytes, no padding
        assert!(PublicKey::from_hex(&"0".repeat(63)).is_err());
        assert!(PublicKey::from_hex(&"g".repeat(64)).is_err());
        let secret = "not-a-key-but-secret-looking-text-1234567890";
        let e = PrivateKey::from_base64(secret).unwrap_err().to_string();
        assert!(!e.contains(secret), "{e}");
        let e = PrivateKey::from_hex(secret).unwrap_err().to_string();
        assert!(!e.contains(secret), "{e}");
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a.expose_bytes(), b.expose_bytes());
        assert_eq!(a.expose_bytes()[0] & 7, 0);
        assert_eq!(a.expose_bytes()[31] & 0xc0, 0x40);
    }

    #[test]
    fn preshared_zero() {
        let z = PresharedKey::from_hex(&"0".repeat(64)).unwrap();
        assert!(z.is_zero());
        assert_eq!(format!("{z:?}"), "PresharedKey(<redacted>)");
    }
}
