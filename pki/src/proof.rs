//! Proof of possession of a private key: a signature over a message, checked against a public key
//! (a DER SubjectPublicKeyInfo) that was registered earlier. `meshd join --rejoin` uses it: a node
//! whose certificate expired proves with its old identity key that it is the node the registry
//! knows, even though that key's certificate no longer authenticates it.
//!
//! ECDSA P-256/SHA-256 and P-384/SHA-384 (the key types meshd issues), ASN.1 DER signatures.

use rcgen::SigningKey;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::{PkiError, Result};
use crate::keys::PrivateKey;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Signs `msg` with `key`.
pub fn sign(key: &PrivateKey, msg: &[u8]) -> Result<Vec<u8>> {
    key.pair().sign(msg).map_err(PkiError::crypto)
}

/// Whether `sig` is a signature of `msg` by the key whose SubjectPublicKeyInfo is `spki_der`.
/// Errors: an unparseable SubjectPublicKeyInfo, or a key type meshd does not issue.
pub fn verify(spki_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<bool> {
    let bad = |reason: String| PkiError::Parse {
        what: "public key",
        reason,
    };
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing data after the SubjectPublicKeyInfo".into()));
    }
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY {
        return Err(bad(format!(
            "algorithm {} is not an EC key",
            spki.algorithm.algorithm.to_id_string()
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string())
        .unwrap_or_default();
    let alg: &'static dyn ring::signature::VerificationAlgorithm = match curve.as_str() {
        OID_P256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        OID_P384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        other => return Err(bad(format!("unsupported curve {other:?}"))),
    };
    let key = ring::signature::UnparsedPublicKey::new(alg, &spki.subject_public_key.data);
    Ok(key.verify(msg, sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyAlgorithm;

    #[test]
    fn a_signature_verifies_with_its_key_only() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
            let k = PrivateKey::generate(alg).unwrap();
            let other = PrivateKey::generate(alg).unwrap();
            let sig = sign(&k, b"message").unwrap();
            assert!(verify(&k.public_key_spki_der(), b"message", &sig).unwrap());
            assert!(!verify(&k.public_key_spki_der(), b"messagE", &sig).unwrap());
            assert!(!verify(&other.public_key_spki_der(), b"message", &sig).unwrap());
            assert!(!verify(&k.public_key_spki_der(), b"message", &sig[1..]).unwrap());
        }
        assert!(verify(b"garbage", b"m", b"s").is_err());
    }
}
