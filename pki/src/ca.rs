//! Certificate authorities and leaf profiles: creating a CA, loading one, issuing a leaf for a public
//! key under a profile. The profile alone decides key usage, EKU and basic constraints.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::Serialize;

use crate::error::{PkiError, Result};
use crate::inspect::{self, CertInfo};
use crate::keys::{KeyAlgorithm, PrivateKey};

/// What a leaf certificate is for: its extended key usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// TLS server only (`serverAuth`).
    Server,
    /// TLS client only (`clientAuth`).
    Client,
    /// Both (`serverAuth`, `clientAuth`): etcd server and peer certificates.
    ServerAndClient,
}

impl Usage {
    fn ekus(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }
}

/// The identity and usage of a leaf: one row of the certificate inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeafProfile {
    /// Subject CN (the Kubernetes user name for client certificates).
    pub common_name: String,
    /// Subject O values (the Kubernetes groups).
    pub organizations: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// Extended key usage.
    pub usage: Usage,
}

/// How long a certificate lives and how far its start is backdated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Requested lifetime, counted from `now` (the backdate comes on top).
    pub lifetime: Duration,
    /// How far NotBefore is set before `now`, against clock skew.
    pub backdate: Duration,
}

/// Default backdate of NotBefore: 5 minutes.
pub const DEFAULT_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Default CA lifetime: 10 years.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);

/// Computes (not_before, not_after) for a leaf: backdated start, lifetime from `now`, capped so the leaf
/// never outlives its CA. Pure.
pub fn leaf_window(
    now: SystemTime,
    validity: Validity,
    ca_not_after: SystemTime,
) -> Result<(SystemTime, SystemTime)> {
    let not_before = now.checked_sub(validity.backdate).unwrap_or(now);
    let wanted = now
        .checked_add(validity.lifetime)
        .ok_or(PkiError::Invalid {
            what: "lifetime",
            reason: "too large".into(),
        })?;
    let not_after = wanted.min(ca_not_after);
    if not_after <= now {
        return Err(PkiError::Ca {
            name: String::new(),
            reason: "the CA has expired; it cannot issue (rotate the CA first)".into(),
        });
    }
    Ok((not_before, not_after))
}

fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Crypto("the system random source failed".into()))?;
    // Positive, and always 16 bytes long when DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn dn(common_name: &str, organizations: &[String]) -> Result<DistinguishedName> {
    // rcgen keeps one value per attribute type; no inventory row has more than one O.
    if organizations.len() > 1 {
        return Err(PkiError::Invalid {
            what: "subject O",
            reason: format!("at most one organization per certificate, got {organizations:?}"),
        });
    }
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    Ok(dn)
}

fn sans(profile: &LeafProfile) -> Result<Vec<SanType>> {
    let mut out = Vec::with_capacity(profile.dns_names.len() + profile.ip_addresses.len());
    for d in &profile.dns_names {
        let name = d.clone().try_into().map_err(|_| PkiError::Invalid {
            what: "DNS name",
            reason: format!("{d:?} is not a valid DNS name"),
        })?;
        out.push(SanType::DnsName(name));
    }
    for ip in &profile.ip_addresses {
        out.push(SanType::IpAddress(*ip));
    }
    Ok(out)
}

/// A certificate just issued.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// PEM encoding.
    pub pem: String,
    /// DER encoding.
    pub der: Vec<u8>,
}

/// A certificate authority: its certificate and signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    info: CertInfo,
    key: PrivateKey,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.info.subject)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed CA with a fresh key.
    pub fn create(
        common_name: &str,
        alg: KeyAlgorithm,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Self> {
        let key = PrivateKey::generate(alg)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        params.serial_number = Some(random_serial()?);
        let (nb, na) = leaf_window(
            now,
            Validity {
                lifetime,
                backdate: DEFAULT_BACKDATE,
            },
            SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799), // 9999-12-31
        )?;
        params.not_before = crate::time::to_offset(nb);
        params.not_after = crate::time::to_offset(na);
        let cert = params.self_signed(key.pair()).map_err(PkiError::crypto)?;
        Self::from_parts(cert.pem(), key)
    }

    /// Loads a CA from its certificate PEM and private key. Checks CA:TRUE and that the key matches.
    pub fn from_parts(cert_pem: String, key: PrivateKey) -> Result<Self> {
        let cert_der = inspect::pem_to_der(&cert_pem)?;
        let info = inspect::inspect_der(&cert_der)?;
        let name = info
            .common_name
            .clone()
            .unwrap_or_else(|| info.subject.clone());
        if !info.is_ca {
            return Err(PkiError::Ca {
                name,
                reason: "the certificate is not a CA (basic constraints CA:FALSE or missing)"
                    .into(),
            });
        }
        if !inspect::key_matches(&cert_der, &key)? {
            return Err(PkiError::KeyMismatch {
                what: format!("CA {name}"),
            });
        }
        let signer = key.duplicate()?;
        let der = rustls_pki_types::CertificateDer::from(cert_der.clone());
        let issuer =
            Issuer::from_ca_cert_der(&der, signer.into_pair()).map_err(|e| PkiError::Ca {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            info,
            key,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// What the CA certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The CA's private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// SHA-256 of the CA's SubjectPublicKeyInfo (the `--ca-hash` pin), lower-case hex.
    pub fn spki_sha256(&self) -> &str {
        &self.info.spki_sha256
    }

    /// Issues a leaf for `subject_spki_der` under `profile`.
    ///
    /// Leaves are CA:FALSE; key usage is `digitalSignature` (plus `keyEncipherment` for RSA keys);
    /// EKU comes from the profile. NotBefore is backdated and NotAfter never passes the CA's.
    pub fn issue(
        &self,
        profile: &LeafProfile,
        subject_spki_der: &[u8],
        validity: Validity,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let (nb, na) = leaf_window(now, validity, self.info.not_after).map_err(|e| match e {
            PkiError::Ca { reason, .. } => PkiError::Ca {
                name: self.info.common_name.clone().unwrap_or_default(),
                reason,
            },
            other => other,
        })?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(subject_spki_der).map_err(|e| {
            PkiError::PolicyViolation {
                field: "public key",
                reason: format!("unsupported public key: {e}"),
            }
        })?;
        let rsa = inspect_spki_is_rsa(subject_spki_der);
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&profile.common_name, &profile.organizations)?;
        params.subject_alt_names = sans(profile)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if rsa {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = profile.usage.ekus();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = crate::time::to_offset(nb);
        params.not_after = crate::time::to_offset(na);
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(PkiError::crypto)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            der: cert.der().to_vec(),
        })
    }
}

fn inspect_spki_is_rsa(spki_der: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map(|(_, spki)| {
            spki.algorithm.algorithm == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
        })
        .unwrap_or(false)
}

impl PrivateKey {
    pub(crate) fn into_pair(self) -> KeyPair {
        self.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn leaf_window_backdates_and_caps_at_ca_expiry() {
        let v = Validity {
            lifetime: Duration::from_secs(3600),
            backdate: DEFAULT_BACKDATE,
        };
        let (nb, na) = leaf_window(now(), v, now() + Duration::from_secs(7200)).unwrap();
        assert_eq!(nb, now() - DEFAULT_BACKDATE);
        assert_eq!(na, now() + Duration::from_secs(3600));
        let (_, na) = leaf_window(now(), v, now() + Duration::from_secs(60)).unwrap();
        assert_eq!(na, now() + Duration::from_secs(60));
        assert!(leaf_window(now(), v, now()).is_err());
    }

    #[test]
    fn ca_issues_a_leaf_that_chains_and_has_the_profile() {
        let ca = CertificateAuthority::create(
            "kubernetes",
            KeyAlgorithm::EcdsaP256,
            DEFAULT_CA_LIFETIME,
            now(),
        )
        .unwrap();
        assert!(ca.info().is_ca);
        assert_eq!(ca.info().common_name.as_deref(), Some("kubernetes"));
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let profile = LeafProfile {
            common_name: "kube-apiserver".into(),
            organizations: vec!["kubeadm:cluster-admins".into()],
            dns_names: vec!["kubernetes".into()],
            ip_addresses: vec!["10.96.0.1".parse().unwrap()],
            usage: Usage::Server,
        };
        let v = Validity {
            lifetime: Duration::from_secs(86400),
            backdate: DEFAULT_BACKDATE,
        };
        let leaf = ca
            .issue(&profile, &key.public_key_spki_der(), v, now())
            .unwrap();
        let info = inspect::inspect_der(&leaf.der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("kube-apiserver"));
        assert_eq!(info.organizations, vec!["kubeadm:cluster-admins"]);
        assert_eq!(info.dns_names, vec!["kubernetes"]);
        assert_eq!(info.extended_key_usage, vec!["serverAuth"]);
        assert_eq!(info.key_usage, vec!["digitalSignature"]);
        assert!(!info.is_ca);
        assert_eq!(info.serial.len(), 32);
        assert!(inspect::verify_signed_by(&leaf.der, ca.cert_der())
            .unwrap()
            .is_ok());
        assert!(inspect::key_matches(&leaf.der, &key).unwrap());
        let other = CertificateAuthority::create(
            "etcd-ca",
            KeyAlgorithm::EcdsaP256,
            DEFAULT_CA_LIFETIME,
            now(),
        )
        .unwrap();
        assert!(inspect::verify_signed_by(&leaf.der, other.cert_der())
            .unwrap()
            .is_err());
    }

    #[test]
    fn loading_a_ca_with_the_wrong_key_fails() {
        let ca =
            CertificateAuthority::create("x", KeyAlgorithm::EcdsaP256, DEFAULT_CA_LIFETIME, now())
                .unwrap();
        let wrong = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let err = CertificateAuthority::from_parts(ca.cert_pem().to_owned(), wrong).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    }
}
