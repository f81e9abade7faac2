//! Inspection of certificates (x509-parser) into the facts `certs check` and the audit need, and
//! the independent checks built on them: chain-to-CA and cert/key match.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::error::{PkiError, Result};

/// The public key of a certificate, as the audit rates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// `ecdsa-p256`, `ecdsa-p384`, `rsa`, `ed25519` or `other:<oid>`.
    pub algorithm: String,
    /// Key size in bits (0 when unknown).
    pub bits: u32,
}

/// Everything meshd reads from one certificate.
#[derive(Clone, Debug, Serialize)]
pub struct CertInfo {
    /// Subject DN in RFC 4514-like form.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// Subject organizations (Kubernetes groups).
    pub organizations: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Key usage flags (`digitalSignature`, `keyCertSign`, ...).
    pub key_usage: Vec<String>,
    /// Extended key usages (`serverAuth`, `clientAuth`, or dotted OIDs).
    pub extended_key_usage: Vec<String>,
    /// Basic constraints CA flag.
    pub is_ca: bool,
    /// Start of validity.
    #[serde(serialize_with = "ser_time")]
    pub not_before: SystemTime,
    /// End of validity.
    #[serde(serialize_with = "ser_time")]
    pub not_after: SystemTime,
    /// The public key.
    pub key: KeyInfo,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// SHA-256 of the DER SubjectPublicKeyInfo, lower-case hex (the CA pin format).
    pub spki_sha256: String,
    /// Signature algorithm OID or name.
    pub signature_algorithm: String,
    /// DER SubjectPublicKeyInfo (not serialized).
    #[serde(skip)]
    pub spki_der: Vec<u8>,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&crate::time::rfc3339(*t))
}

impl CertInfo {
    /// Lifetime (not_after - not_before).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Whether `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now <= self.not_after
    }

    /// Whether the certificate allows `serverAuth`.
    pub fn has_server_auth(&self) -> bool {
        self.extended_key_usage.iter().any(|e| e == "serverAuth")
    }

    /// Whether the certificate allows `clientAuth`.
    pub fn has_client_auth(&self) -> bool {
        self.extended_key_usage.iter().any(|e| e == "clientAuth")
    }
}

/// Decodes the first `CERTIFICATE` block of a PEM document to DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let blocks = pem::parse_many(pem).map_err(|e| PkiError::Parse {
        what: "certificate PEM",
        reason: e.to_string(),
    })?;
    blocks
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .ok_or(PkiError::Parse {
            what: "certificate PEM",
            reason: "no CERTIFICATE block found".into(),
        })
}

/// Every `CERTIFICATE` block of a PEM document (a bundle), as DER.
pub fn pem_to_ders(pem: &str) -> Result<Vec<Vec<u8>>> {
    let blocks = pem::parse_many(pem).map_err(|e| PkiError::Parse {
        what: "certificate PEM",
        reason: e.to_string(),
    })?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse {
        what: "certificate",
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(PkiError::Parse {
            what: "certificate",
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Parses a PEM certificate (the first CERTIFICATE block).
pub fn inspect_pem(pem: &str) -> Result<CertInfo> {
    inspect_der(&pem_to_der(pem)?)
}

/// Parses a DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo> {
    let cert = parse(der)?;
    let tbs = &cert.tbs_certificate;
    let common_name = tbs
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let organizations = tbs
        .subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let mut key_usage = Vec::new();
    let mut extended_key_usage = Vec::new();
    let mut is_ca = false;
    for ext in tbs.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                        GeneralName::IPAddress(b) => {
                            if let Some(ip) = ip_from_bytes(b) {
                                ip_addresses.push(ip);
                            }
                        }
                        _ => {}
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                let names = [
                    (ku.digital_signature(), "digitalSignature"),
                    (ku.non_repudiation(), "nonRepudiation"),
                    (ku.key_encipherment(), "keyEncipherment"),
                    (ku.data_encipherment(), "dataEncipherment"),
                    (ku.key_agreement(), "keyAgreement"),
                    (ku.key_cert_sign(), "keyCertSign"),
                    (ku.crl_sign(), "cRLSign"),
                    (ku.encipher_only(), "encipherOnly"),
                    (ku.decipher_only(), "decipherOnly"),
                ];
                key_usage = names
                    .iter()
                    .filter(|(set, _)| *set)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let names = [
                    (eku.any, "any"),
                    (eku.server_auth, "serverAuth"),
                    (eku.client_auth, "clientAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ];
                extended_key_usage = names
                    .iter()
                    .filter(|(set, _)| *set)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
                extended_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            _ => {}
        }
    }
    let spki = tbs.public_key();
    let key = key_info(spki);
    Ok(CertInfo {
        subject: tbs.subject.to_string(),
        issuer: tbs.issuer.to_string(),
        common_name,
        organizations,
        dns_names,
        ip_addresses,
        key_usage,
        extended_key_usage,
        is_ca,
        not_before: to_system_time(tbs.validity.not_before),
        not_after: to_system_time(tbs.validity.not_after),
        key,
        serial: hex::encode(tbs.raw_serial()),
        spki_sha256: crate::keys::spki_sha256_hex(spki.raw),
        signature_algorithm: cert.signature_algorithm.algorithm.to_id_string(),
        spki_der: spki.raw.to_vec(),
    })
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(crate) fn key_info(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> KeyInfo {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => KeyInfo {
                algorithm: "ecdsa-p256".into(),
                bits: 256,
            },
            Some(c) if c == OID_NIST_EC_P384 => KeyInfo {
                algorithm: "ecdsa-p384".into(),
                bits: 384,
            },
            Some(c) => KeyInfo {
                algorithm: format!("ecdsa-{}", c.to_id_string()),
                bits: 0,
            },
            None => KeyInfo {
                algorithm: "ecdsa-unknown-curve".into(),
                bits: 0,
            },
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size() as u32,
            _ => 0,
        };
        return KeyInfo {
            algorithm: "rsa".into(),
            bits,
        };
    }
    if *alg == OID_SIG_ED25519 {
        return KeyInfo {
            algorithm: "ed25519".into(),
            bits: 256,
        };
    }
    KeyInfo {
        algorithm: format!("other:{}", alg.to_id_string()),
        bits: 0,
    }
}

/// Why a certificate does not chain to a CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The certificate's issuer DN is not the CA's subject DN.
    IssuerMismatch {
        /// Issuer named by the certificate.
        issuer: String,
        /// Subject of the CA it was checked against.
        ca_subject: String,
    },
    /// The names match but the CA's key did not make the signature.
    BadSignature,
    /// The candidate CA is not a CA certificate.
    NotACa,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::IssuerMismatch { issuer, ca_subject } => {
                write!(f, "issued by \"{issuer}\", not by \"{ca_subject}\"")
            }
            ChainError::BadSignature => f.write_str("signature does not verify with the CA's key"),
            ChainError::NotACa => f.write_str("the issuer certificate is not a CA (CA:FALSE)"),
        }
    }
}

/// Checks that `cert_der` was issued and signed by the CA certificate `ca_der`.
pub fn verify_signed_by(
    cert_der: &[u8],
    ca_der: &[u8],
) -> Result<std::result::Result<(), ChainError>> {
    let cert = parse(cert_der)?;
    let ca = parse(ca_der)?;
    if !ca.is_ca() {
        return Ok(Err(ChainError::NotACa));
    }
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Ok(Err(ChainError::IssuerMismatch {
            issuer: cert.issuer().to_string(),
            ca_subject: ca.subject().to_string(),
        }));
    }
    Ok(match cert.verify_signature(Some(ca.public_key())) {
        Ok(()) => Ok(()),
        Err(_) => Err(ChainError::BadSignature),
    })
}

/// Whether the private key belongs to the certificate (same SubjectPublicKeyInfo).
pub fn key_matches(cert_der: &[u8], key: &crate::keys::PrivateKey) -> Result<bool> {
    let cert = parse(cert_der)?;
    Ok(cert.public_key().raw == key.public_key_spki_der().as_slice())
}
