//! PKCS#10 certificate signing requests: parsing with a verified self-signature, and signing under a
//! caller-supplied policy. Identity comes from the policy (the authenticated channel), never from the
//! request; CSR extensions other than the requested SANs are ignored, and the SANs are only checked
//! against what the policy allows.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::ca::{CertificateAuthority, IssuedCert, LeafProfile, Usage, Validity};
use crate::error::{PkiError, Result};
use crate::inspect::KeyInfo;

/// Size limits applied before and while parsing a request.
#[derive(Clone, Copy, Debug)]
pub struct CsrLimits {
    /// Maximum DER size of the request.
    pub max_der_bytes: usize,
    /// Maximum number of subject alternative names.
    pub max_sans: usize,
    /// Maximum number of requested extensions.
    pub max_extensions: usize,
}

impl Default for CsrLimits {
    fn default() -> Self {
        CsrLimits {
            max_der_bytes: 16 * 1024,
            max_sans: 32,
            max_extensions: 16,
        }
    }
}

/// A parsed CSR whose self-signature has been verified.
#[derive(Clone, Debug)]
pub struct Csr {
    /// The request's subject CN, if any.
    pub common_name: Option<String>,
    /// The request's subject O values.
    pub organizations: Vec<String>,
    /// Requested DNS SANs.
    pub dns_names: Vec<String>,
    /// Requested IP SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// The public key, DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The public key's algorithm and size.
    pub key: KeyInfo,
}

fn bad(reason: impl Into<String>) -> PkiError {
    PkiError::BadCsr(reason.into())
}

/// Parses a PEM `CERTIFICATE REQUEST`.
pub fn parse_csr_pem(pem_text: &str, limits: &CsrLimits) -> Result<Csr> {
    // base64 is 4/3 of DER plus line breaks and armour.
    if pem_text.len() > limits.max_der_bytes * 3 / 2 + 256 {
        return Err(bad(format!(
            "request is larger than {} bytes",
            limits.max_der_bytes
        )));
    }
    let block = pem::parse(pem_text).map_err(|e| bad(format!("not PEM: {e}")))?;
    if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
            block.tag()
        )));
    }
    parse_csr_der(block.contents(), limits)
}

/// Parses a DER PKCS#10 request and verifies its self-signature.
pub fn parse_csr_der(der: &[u8], limits: &CsrLimits) -> Result<Csr> {
    if der.len() > limits.max_der_bytes {
        return Err(bad(format!(
            "request is {} bytes, the limit is {}",
            der.len(),
            limits.max_der_bytes
        )));
    }
    let (rest, req) = X509CertificationRequest::from_der(der)
        .map_err(|e| bad(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request"));
    }
    let info = &req.certification_request_info;
    // A weak RSA key is named as such: ring cannot verify signatures of RSA keys under 2048 bits, so
    // without this check the refusal would blame the signature ("altered") instead of the key.
    let key = crate::inspect::key_info(&info.subject_pki);
    if key.algorithm == "rsa" && key.bits < 2048 {
        return Err(PkiError::PolicyViolation {
            field: "public key",
            reason: format!("RSA key of {} bits; at least 2048 are required", key.bits),
        });
    }
    req.verify_signature()
        .map_err(|e| bad(format!("self-signature does not verify ({e}): the request was altered or its algorithm is not supported")))?;
    let common_name = match info.subject.iter_common_name().count() {
        0 => None,
        1 => info
            .subject
            .iter_common_name()
            .next()
            .map(|cn| {
                cn.as_str()
                    .map(str::to_owned)
                    .map_err(|_| bad("subject CN is not a string"))
            })
            .transpose()?,
        _ => return Err(bad("subject has more than one CN")),
    };
    let organizations = info
        .subject
        .iter_organization()
        .map(|o| {
            o.as_str()
                .map(str::to_owned)
                .map_err(|_| bad("subject O is not a string"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    if let Some(exts) = req.requested_extensions() {
        let exts: Vec<_> = exts.collect();
        if exts.len() > limits.max_extensions {
            return Err(bad(format!(
                "{} extensions requested, the limit is {}",
                exts.len(),
                limits.max_extensions
            )));
        }
        for ext in exts {
            // Only the SAN request is read; every other extension (CA:TRUE, key usage, EKU, ...) is
            // ignored: the profile alone decides those.
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if dns_names.len() + ip_addresses.len() >= limits.max_sans {
                        return Err(bad(format!(
                            "more than {} subject alternative names",
                            limits.max_sans
                        )));
                    }
                    match name {
                        GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                        GeneralName::IPAddress(b) => match b.len() {
                            4 => ip_addresses.push(IpAddr::from(
                                <[u8; 4]>::try_from(*b).map_err(|_| bad("bad IP SAN"))?,
                            )),
                            16 => ip_addresses.push(IpAddr::from(
                                <[u8; 16]>::try_from(*b).map_err(|_| bad("bad IP SAN"))?,
                            )),
                            n => return Err(bad(format!("IP SAN of {n} bytes"))),
                        },
                        other => {
                            return Err(PkiError::PolicyViolation {
                                field: "SAN",
                                reason: format!(
                                    "only DNS and IP SANs may be requested, got {other:?}"
                                ),
                            })
                        }
                    }
                }
            }
        }
    }
    let spki = &info.subject_pki;
    Ok(Csr {
        common_name,
        organizations,
        dns_names,
        ip_addresses,
        spki_der: spki.raw.to_vec(),
        key,
    })
}

/// What a caller allows one request to get: the identity established by the authenticated channel,
/// the SANs it may hold, the usage and the lifetime.
#[derive(Clone, Debug)]
pub struct SigningPolicy {
    /// The only subject CN that will be signed.
    pub common_name: String,
    /// The exact subject O set that will be signed.
    pub organizations: Vec<String>,
    /// DNS names the request may ask for.
    pub allowed_dns_names: Vec<String>,
    /// IP addresses the request may ask for.
    pub allowed_ip_addresses: Vec<IpAddr>,
    /// The EKU of the issued certificate.
    pub usage: Usage,
    /// Refuse a request with no SAN (serving certificates need one).
    pub require_san: bool,
    /// Lifetime of the issued certificate.
    pub lifetime: Duration,
    /// Upper bound on `lifetime` (cluster policy).
    pub max_lifetime: Duration,
    /// NotBefore backdate.
    pub backdate: Duration,
}

/// Checks a parsed CSR against `policy` and returns the profile to issue under. Pure.
pub fn authorize(csr: &Csr, policy: &SigningPolicy) -> Result<LeafProfile> {
    match (csr.key.algorithm.as_str(), csr.key.bits) {
        ("ecdsa-p256", _) | ("ecdsa-p384", _) => {}
        ("rsa", bits) if bits >= 2048 => {}
        ("rsa", bits) => {
            return Err(PkiError::PolicyViolation {
                field: "public key",
                reason: format!("RSA key of {bits} bits; at least 2048 are required"),
            })
        }
        (alg, _) => {
            return Err(PkiError::PolicyViolation {
                field: "public key",
                reason: format!(
                    "{alg} keys are not accepted (use ECDSA P-256, P-384 or RSA >= 2048)"
                ),
            })
        }
    }
    if csr.common_name.as_deref() != Some(policy.common_name.as_str()) {
        return Err(PkiError::PolicyViolation {
            field: "subject CN",
            reason: format!(
                "requested {:?}, this identity may only get {:?}",
                csr.common_name.as_deref().unwrap_or(""),
                policy.common_name
            ),
        });
    }
    let mut want = csr.organizations.clone();
    want.sort();
    want.dedup();
    let mut allowed = policy.organizations.clone();
    allowed.sort();
    allowed.dedup();
    if want != allowed {
        return Err(PkiError::PolicyViolation {
            field: "subject O",
            reason: format!("requested {want:?}, this identity may only get {allowed:?}"),
        });
    }
    for d in &csr.dns_names {
        if !policy
            .allowed_dns_names
            .iter()
            .any(|a| a.eq_ignore_ascii_case(d))
        {
            return Err(PkiError::PolicyViolation {
                field: "DNS SAN",
                reason: format!(
                    "{d:?} is not one of this identity's names {:?}",
                    policy.allowed_dns_names
                ),
            });
        }
    }
    for ip in &csr.ip_addresses {
        if !policy.allowed_ip_addresses.contains(ip) {
            return Err(PkiError::PolicyViolation {
                field: "IP SAN",
                reason: format!(
                    "{ip} is not one of this identity's addresses {:?}",
                    policy.allowed_ip_addresses
                ),
            });
        }
    }
    if policy.require_san && csr.dns_names.is_empty() && csr.ip_addresses.is_empty() {
        return Err(PkiError::PolicyViolation {
            field: "SAN",
            reason: "a serving certificate needs at least one DNS or IP SAN".into(),
        });
    }
    if policy.lifetime > policy.max_lifetime {
        return Err(PkiError::Invalid {
            what: "lifetime",
            reason: format!(
                "{}s exceeds the policy maximum of {}s",
                policy.lifetime.as_secs(),
                policy.max_lifetime.as_secs()
            ),
        });
    }
    let mut dns_names = csr.dns_names.clone();
    dns_names.dedup();
    let mut ip_addresses = csr.ip_addresses.clone();
    ip_addresses.dedup();
    Ok(LeafProfile {
        common_name: policy.common_name.clone(),
        organizations: allowed,
        dns_names,
        ip_addresses,
        usage: policy.usage,
    })
}

/// Signs a verified CSR under `policy`: [`authorize`], then issue with the CA.
pub fn sign_csr(
    ca: &CertificateAuthority,
    csr: &Csr,
    policy: &SigningPolicy,
    now: SystemTime,
) -> Result<IssuedCert> {
    let profile = authorize(csr, policy)?;
    ca.issue(
        &profile,
        &csr.spki_der,
        Validity {
            lifetime: policy.lifetime.min(policy.max_lifetime),
            backdate: policy.backdate,
        },
        now,
    )
}

/// Builds a CSR for `profile` signed by `key` (what a joining node sends), PEM.
pub fn build_csr(profile: &LeafProfile, key: &crate::keys::PrivateKey) -> Result<String> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    for o in &profile.organizations {
        dn.push(rcgen::DnType::OrganizationName, o.as_str());
    }
    dn.push(rcgen::DnType::CommonName, profile.common_name.as_str());
    params.distinguished_name = dn;
    for d in &profile.dns_names {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName(d.clone().try_into().map_err(
                |_| PkiError::Invalid {
                    what: "DNS name",
                    reason: format!("{d:?}"),
                },
            )?));
    }
    for ip in &profile.ip_addresses {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    let csr = params
        .serialize_request(key.pair())
        .map_err(PkiError::crypto)?;
    csr.pem().map_err(PkiError::crypto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::DEFAULT_CA_LIFETIME;
    use crate::keys::{KeyAlgorithm, PrivateKey};

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn node_policy() -> SigningPolicy {
        SigningPolicy {
            common_name: "system:node:n1".into(),
            organizations: vec!["system:nodes".into()],
            allowed_dns_names: vec!["n1".into()],
            allowed_ip_addresses: vec!["192.0.2.1".parse().unwrap()],
            usage: Usage::Server,
            require_san: true,
            lifetime: Duration::from_secs(86400),
            max_lifetime: Duration::from_secs(30 * 86400),
            backdate: crate::ca::DEFAULT_BACKDATE,
        }
    }

    fn profile(cn: &str, dns: &[&str], ips: &[&str]) -> LeafProfile {
        LeafProfile {
            common_name: cn.into(),
            organizations: vec!["system:nodes".into()],
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
            usage: Usage::Server,
        }
    }

    fn csr_for(p: &LeafProfile) -> Csr {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        parse_csr_pem(&build_csr(p, &key).unwrap(), &CsrLimits::default()).unwrap()
    }

    #[test]
    fn signs_an_allowed_request() {
        let ca = CertificateAuthority::create(
            "kubernetes",
            KeyAlgorithm::EcdsaP256,
            DEFAULT_CA_LIFETIME,
            now(),
        )
        .unwrap();
        let csr = csr_for(&profile("system:node:n1", &["n1"], &["192.0.2.1"]));
        let cert = sign_csr(&ca, &csr, &node_policy(), now()).unwrap();
        let info = crate::inspect::inspect_der(&cert.der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("system:node:n1"));
        assert_eq!(info.organizations, vec!["system:nodes"]);
        assert_eq!(info.dns_names, vec!["n1"]);
        assert_eq!(
            info.ip_addresses,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.spki_der, csr.spki_der);
        assert_eq!(info.not_before, now() - crate::ca::DEFAULT_BACKDATE);
    }

    #[test]
    fn refusals_name_the_field() {
        let pol = node_policy();
        let cases = [
            (profile("system:node:n2", &["n1"], &[]), "subject CN"),
            (profile("system:node:n1", &["n2"], &[]), "DNS SAN"),
            (
                profile("system:node:n1", &["n1"], &["192.0.2.99"]),
                "IP SAN",
            ),
            (profile("system:node:n1", &[], &[]), "SAN"),
        ];
        for (p, field) in cases {
            match authorize(&csr_for(&p), &pol) {
                Err(PkiError::PolicyViolation { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected refusal of {field}, got {other:?}"),
            }
        }
        let mut p = profile("system:node:n1", &["n1"], &[]);
        p.organizations = vec!["system:masters".into()];
        assert!(matches!(
            authorize(&csr_for(&p), &pol),
            Err(PkiError::PolicyViolation {
                field: "subject O",
                ..
            })
        ));
    }

    #[test]
    fn csr_extensions_cannot_make_a_ca() {
        // A request asking for CA:TRUE and codeSigning: the profile decides, the request is ignored.
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["n1".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let pem = params.serialize_request(key.pair()).unwrap().pem().unwrap();
        let csr = parse_csr_pem(&pem, &CsrLimits::default()).unwrap();
        let ca = CertificateAuthority::create(
            "kubernetes",
            KeyAlgorithm::EcdsaP256,
            DEFAULT_CA_LIFETIME,
            now(),
        )
        .unwrap();
        let cert = sign_csr(&ca, &csr, &node_policy(), now()).unwrap();
        let info = crate::inspect::inspect_der(&cert.der).unwrap();
        assert!(!info.is_ca);
        assert_eq!(info.extended_key_usage, vec!["serverAuth"]);
        assert_eq!(info.key_usage, vec!["digitalSignature"]);
    }

    #[test]
    fn malformed_and_tampered_requests_are_refused() {
        let lim = CsrLimits::default();
        assert!(parse_csr_pem("not pem", &lim).is_err());
        assert!(parse_csr_pem(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &lim
        )
        .is_err());
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let pem = build_csr(&profile("system:node:n1", &["n1"], &[]), &key).unwrap();
        let mut der = pem::parse(&pem).unwrap().into_contents();
        // Flip a byte inside the subject CN ("n1" -> "n2"): the signature must no longer verify.
        let pos = der.windows(2).rposition(|w| w == b"n1").unwrap();
        der[pos + 1] = b'2';
        assert!(matches!(
            parse_csr_der(&der, &lim),
            Err(PkiError::BadCsr(_))
        ));
        // Oversized.
        let big = vec![0u8; lim.max_der_bytes + 1];
        assert!(parse_csr_der(&big, &lim).is_err());
        // Too many SANs.
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let pem = build_csr(&profile("system:node:n1", &names, &[]), &key).unwrap();
        assert!(parse_csr_pem(&pem, &lim).is_err());
        // Arbitrary bytes never panic.
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = parse_csr_der(&junk, &lim);
        }
    }
}
