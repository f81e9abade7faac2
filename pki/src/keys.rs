//! Private keys: generation, PEM import/export, and the secret newtypes that keep them out of logs.

use std::fmt;

use rcgen::{KeyPair, PublicKeyData};
use zeroize::Zeroizing;

use crate::error::{PkiError, Result};

/// A PEM document that holds secret material (a private key, or a kubeconfig embedding one).
///
/// The buffer is zeroized on drop and `Debug` prints `<redacted>`.
#[derive(Clone)]
pub struct SecretPem(Zeroizing<String>);

impl SecretPem {
    /// Wraps a string that holds secret material.
    pub fn new(s: String) -> Self {
        SecretPem(Zeroizing::new(s))
    }

    /// The secret text. Handle with care: never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// The key algorithms meshd issues keys for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256: the default for every certificate.
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcdsaP384,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ecdsa-p256" | "p256" => Ok(KeyAlgorithm::EcdsaP256),
            "ecdsa-p384" | "p384" => Ok(KeyAlgorithm::EcdsaP384),
            other => Err(PkiError::Invalid {
                what: "key type",
                reason: format!("{other:?} (supported: ecdsa-p256, ecdsa-p384)"),
            }),
        }
    }
}

/// A private key with its public half. Its serialized form is zeroized when dropped.
pub struct PrivateKey {
    pair: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.pair.algorithm())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    /// Generates a fresh key from the operating system's random source.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self> {
        let pair = KeyPair::generate_for(alg.rcgen()).map_err(PkiError::crypto)?;
        Ok(PrivateKey { pair })
    }

    /// Parses a PKCS#8 (or SEC1/PKCS#1, as rcgen supports them) PEM private key.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let pair = KeyPair::from_pem(pem).map_err(|e| PkiError::Parse {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(PrivateKey { pair })
    }

    /// Finds the private key block in a PEM bundle (e.g. a `-current.pem` holding cert and key).
    pub fn from_pem_bundle(text: &str) -> Result<Self> {
        let blocks = pem::parse_many(text).map_err(|e| PkiError::Parse {
            what: "private key",
            reason: e.to_string(),
        })?;
        let block = blocks
            .into_iter()
            .find(|b| b.tag().ends_with("PRIVATE KEY"))
            .ok_or(PkiError::Parse {
                what: "private key",
                reason: "no PRIVATE KEY block found".into(),
            })?;
        let der = Zeroizing::new(block.into_contents());
        let pair = KeyPair::try_from(der.as_slice()).map_err(|e| PkiError::Parse {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(PrivateKey { pair })
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> SecretPem {
        SecretPem::new(self.pair.serialize_pem())
    }

    /// The DER-encoded SubjectPublicKeyInfo of the public half.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// The public half as a PEM `PUBLIC KEY` block (what `sa.pub` holds).
    pub fn public_key_pem(&self) -> String {
        self.pair.public_key_pem()
    }

    pub(crate) fn into_inner(self) -> KeyPair {
        self.pair
    }

    pub(crate) fn pair(&self) -> &KeyPair {
        &self.pair
    }

    /// A second, independent copy (the CA needs one owned by its rcgen issuer).
    pub(crate) fn duplicate(&self) -> Result<Self> {
        PrivateKey::from_pem(self.to_pem().expose())
    }
}

/// SHA-256 of a DER SubjectPublicKeyInfo, lower-case hex: the form of `--ca-hash sha256:...`.
pub fn spki_sha256_hex(spki_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, spki_der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_key() {
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let pem = k.to_pem();
        let body: String = pem.expose().lines().nth(1).unwrap().to_string();
        assert!(!format!("{k:?}").contains(&body));
        assert_eq!(format!("{pem:?}"), "SecretPem(<redacted>)");
    }

    #[test]
    fn pem_roundtrip_keeps_the_public_key() {
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let k2 = PrivateKey::from_pem(k.to_pem().expose()).unwrap();
        assert_eq!(k.public_key_spki_der(), k2.public_key_spki_der());
        let k3 = k.duplicate().unwrap();
        assert_eq!(k.public_key_spki_der(), k3.public_key_spki_der());
    }

    #[test]
    fn garbage_key_is_an_error_not_a_panic() {
        assert!(PrivateKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
        assert!(PrivateKey::from_pem("").is_err());
    }
}
