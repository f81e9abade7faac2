//! TLS configuration for the meshd API, with the *ring* provider only.
//!
//! * Server: TLS 1.3 and TLS 1.2 (rustls offers only ECDHE + AEAD suites for 1.2), the certificate
//!   chain `[leaf, CA]` so a joining node can find the CA it pinned, and optional client certificates
//!   verified against the cluster CA (joins come without one; every other call is authorized by it).
//! * Client with a CA pin ([`PinnedCaVerifier`]): before the node trusts anything, the CA in the
//!   server's chain must hash (SHA-256 of its SubjectPublicKeyInfo) to `--ca-hash`, and the server
//!   certificate must verify under that CA for the dialled name. The join token is only sent over a
//!   connection that passed this check.
//! * Client with a known CA and a client certificate (mTLS) for every later call.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input could not be used.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The one crypto provider meshd uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Parses every certificate of a PEM bundle.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let ders = pki::inspect::pem_to_ders(pem).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })?;
    if ders.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no certificate".into(),
        });
    }
    Ok(ders.into_iter().map(CertificateDer::from).collect())
}

/// Parses the private key of a PEM document.
pub fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let blocks = ::pem::parse_many(pem).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })?;
    let block = blocks
        .into_iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or(TlsError::Pem {
            what,
            reason: "no PRIVATE KEY block".into(),
        })?;
    let der = block.into_contents();
    PrivateKeyDer::try_from(der).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem("CA certificate", ca_pem)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Rustls(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The API server's configuration: `chain_pem` (leaf then CA), its key, and client certificates
/// verified against `client_ca_pem` when presented.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs_from_pem("server certificate", chain_pem)?,
            key_from_pem("server key", key_pem)?,
        )
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The subject CN of the meshd API's server certificate.
pub const API_SERVER_CN: &str = "meshd-api";

/// The cluster CA also signs node serving certificates; a client of the meshd API accepts only the
/// API's own certificate (CN `meshd-api`), so a node certificate naming the same address can never
/// stand in for the control plane.
fn check_api_server_identity(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let info = pki::inspect::inspect_der(end_entity)
        .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
    if info.common_name.as_deref() != Some(API_SERVER_CN) {
        return Err(rustls::Error::General(format!(
            "the server certificate is for {:?}, not the meshd API ({API_SERVER_CN})",
            info.common_name.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Verifies the meshd API's certificate under the cluster CA, then checks it is the API's own.
#[derive(Debug)]
struct ApiServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ApiServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_api_server_identity(end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client of the meshd API: trusts `ca_pem` for the API's own certificate only (CN `meshd-api`)
/// and presents `cert_pem`/`key_pem` (mTLS).
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ApiServerVerifier { inner }))
        .with_client_auth_cert(
            certs_from_pem("client certificate", cert_pem)?,
            key_from_pem("client key", key_pem)?,
        )
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts a server only when a CA in its chain matches the pin and the server certificate verifies
/// under that CA for the dialled name. Remembers the CA it matched.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin_sha256: [u8; 32],
    algs: WebPkiSupportedAlgorithms,
    matched_ca: Mutex<Option<Vec<u8>>>,
}

impl PinnedCaVerifier {
    /// A verifier for the pin `sha256:<64 hex>` (or the bare hex).
    pub fn new(pin: &str) -> Result<Self, String> {
        let hex_part = pin.strip_prefix("sha256:").unwrap_or(pin);
        let bytes = hex::decode(hex_part)
            .map_err(|_| format!("--ca-hash {pin:?}: expected sha256:<64 hex digits>"))?;
        let pin_sha256: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("--ca-hash {pin:?}: expected sha256:<64 hex digits>"))?;
        Ok(PinnedCaVerifier {
            pin_sha256,
            algs: provider().signature_verification_algorithms,
            matched_ca: Mutex::new(None),
        })
    }

    /// The DER of the CA that matched the pin, once a handshake passed.
    pub fn matched_ca(&self) -> Option<Vec<u8>> {
        self.matched_ca.lock().ok().and_then(|g| g.clone())
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        for cand in intermediates {
            let Ok(info) = pki::inspect::inspect_der(cand) else {
                continue;
            };
            let digest = ::ring::digest::digest(&::ring::digest::SHA256, &info.spki_der);
            if digest.as_ref() != self.pin_sha256 || !info.is_ca {
                continue;
            }
            let mut roots = RootCertStore::empty();
            roots
                .add(cand.clone().into_owned())
                .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
            check_api_server_identity(end_entity)?;
            if let Ok(mut g) = self.matched_ca.lock() {
                *g = Some(cand.to_vec());
            }
            return Ok(ok);
        }
        Err(rustls::Error::General(
            "the server's CA does not match --ca-hash: not the cluster you meant (or a man in the middle); nothing was sent".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration that trusts only the pinned CA (no client certificate).
pub fn pinned_client_config(
    verifier: Arc<PinnedCaVerifier>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
