//! One endpoint, probed: does it speak TLS, which legacy versions and weak suites it accepts (raw
//! ClientHellos, [`super::hello`]), the chain it serves, and whether it demands a client certificate
//! (rustls, with a verifier that records instead of rejecting).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hello::{self, Answer, Version};

/// What the first bytes say about the listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Nothing listens (connection refused).
    Refused(String),
    /// It answered a ClientHello with TLS.
    Tls,
    /// It answered in plaintext HTTP (the status line).
    PlainHttp(String),
    /// It answered with bytes that are neither TLS nor HTTP (hex of the first ones).
    NotTls(String),
    /// It could not be probed (timeout, reset, silent).
    Unknown(String),
}

/// How the server treats a client that sends no certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ClientAuth {
    /// No CertificateRequest.
    Disabled,
    /// A CertificateRequest, but the server goes on without a certificate.
    Optional,
    /// The server refuses a client without a certificate.
    Required,
}

/// A rustls handshake's outcome.
#[derive(Clone, Debug, Default)]
pub struct Handshake {
    /// The served chain (leaf first), recorded even when the handshake then failed.
    pub chain: Vec<Vec<u8>>,
    /// Negotiated version and suite, when the handshake completed.
    pub negotiated: Option<(String, String)>,
    /// Whether the server sent a CertificateRequest.
    pub cert_requested: bool,
    /// The handshake's or the first read's error: the server's rejection.
    pub rejected: Option<String>,
    /// Set when the outcome is unknown (could not connect, timed out before the handshake).
    pub error: Option<String>,
}

/// Everything learnt about one endpoint.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The transport verdict.
    pub transport: Transport,
    /// Per legacy version: accepted (with the suite), refused, or the probe's error.
    pub legacy: Vec<(Version, Result<Option<String>, String>)>,
    /// Weak suites accepted at TLS 1.2 (names), or the probe's error.
    pub weak_suites: Result<Vec<String>, String>,
    /// The handshake without a client certificate.
    pub anonymous: Handshake,
    /// The handshake with a certificate from a throwaway foreign CA (`None` when not tried).
    pub foreign: Option<Handshake>,
    /// The chain seen in the clear by a raw ClientHello (TLS ≤ 1.2), for servers rustls cannot
    /// talk to (legacy versions only).
    pub raw_chain: Vec<Vec<u8>>,
    /// Whether a raw (TLS ≤ 1.2) first flight held a CertificateRequest (`None`: no raw flight).
    pub raw_cert_request: Option<bool>,
}

impl Probe {
    /// The client-auth verdict, or why there is none.
    pub fn client_auth(&self) -> Result<ClientAuth, String> {
        let h = &self.anonymous;
        if let Some(e) = &h.error {
            return Err(e.clone());
        }
        match (h.cert_requested, &h.rejected) {
            (false, None) => Ok(ClientAuth::Disabled),
            (true, None) => Ok(ClientAuth::Optional),
            (true, Some(_)) => Ok(ClientAuth::Required),
            // rustls could not talk to it (a legacy-only server), but a raw first flight showed
            // no CertificateRequest: the server never asks.
            (false, Some(_)) if self.raw_cert_request == Some(false) => Ok(ClientAuth::Disabled),
            (false, Some(r)) => Err(format!(
                "the handshake failed without a certificate request: {r}"
            )),
        }
    }
}

/// Probes `addr` (dialled as `host`). `foreign` is a client certificate from a CA the cluster does
/// not know (TLS-05); `None` skips that probe.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
    foreign: Option<Arc<CertifiedKey>>,
) -> Probe {
    let (transport, mut raw_chain) = transport(addr, host, timeout).await;
    let mut p = Probe {
        transport: transport.clone(),
        legacy: Vec::new(),
        weak_suites: Err("not TLS".into()),
        anonymous: Handshake::default(),
        foreign: None,
        raw_chain: Vec::new(),
        raw_cert_request: None,
    };
    if transport != Transport::Tls {
        return p;
    }
    for v in Version::LEGACY {
        let h = hello::client_hello(v, &hello::legacy_suites(), Some(host));
        let r = match hello::exchange(addr, &h, timeout).await {
            Ok(Answer::ServerHello {
                version,
                suite,
                certs,
                cert_request,
            }) if version == v.wire() => {
                if raw_chain.is_empty() {
                    raw_chain = certs;
                }
                p.raw_cert_request = Some(p.raw_cert_request.unwrap_or(false) || cert_request);
                Ok(Some(hello::suite_name(suite)))
            }
            Ok(Answer::ServerHello { .. } | Answer::Alert(..) | Answer::Closed) => Ok(None),
            Ok(Answer::NotTls(b)) => Err(format!("non-TLS answer {}", hex::encode(b))),
            Err(e) => Err(e),
        };
        p.legacy.push((v, r));
    }
    p.raw_chain = raw_chain;
    p.weak_suites = weak_suites(addr, host, timeout).await;
    p.anonymous = handshake(addr, host, timeout, None).await;
    if foreign.is_some() {
        p.foreign = Some(handshake(addr, host, timeout, foreign).await);
    }
    p
}

/// TLS-01's question: a ClientHello first, then (when that got nothing) an HTTP request.
async fn transport(addr: SocketAddr, host: &str, timeout: Duration) -> (Transport, Vec<Vec<u8>>) {
    let t = transport_inner(addr, host, timeout).await;
    (t.0, t.1)
}

async fn transport_inner(
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
) -> (Transport, Vec<Vec<u8>>) {
    let all: Vec<u16> = hello::SUITES
        .iter()
        .map(|s| s.code)
        .filter(|c| *c != 0x00ff)
        .collect();
    let h = hello::client_hello(Version::Tls12, &all, Some(host));
    let first = match hello::exchange(addr, &h, timeout).await {
        Ok(Answer::ServerHello { certs, .. }) => return (Transport::Tls, certs),
        Ok(Answer::Alert(..)) => return (Transport::Tls, Vec::new()),
        Ok(Answer::NotTls(b)) => return (classify_plain(&b), Vec::new()),
        Ok(Answer::Closed) => "closed the connection on a ClientHello".to_string(),
        Err(e) if e.contains("Connection refused") => return (Transport::Refused(e), Vec::new()),
        Err(e) => e,
    };
    // Silent or closed: ask in HTTP.
    let t = match http_probe(addr, host, timeout).await {
        Ok(b) if !b.is_empty() => classify_plain(&b),
        Ok(_) => Transport::Unknown(format!("{first}; an HTTP request got no answer either")),
        Err(e) => Transport::Unknown(format!("{first}; HTTP request: {e}")),
    };
    (t, Vec::new())
}

fn classify_plain(b: &[u8]) -> Transport {
    if b.starts_with(b"HTTP/") {
        let line = b
            .split(|c| *c == b'\r' || *c == b'\n')
            .next()
            .unwrap_or_default();
        Transport::PlainHttp(String::from_utf8_lossy(line).into_owned())
    } else {
        Transport::NotTls(hex::encode(&b[..b.len().min(16)]))
    }
}

async fn http_probe(addr: SocketAddr, host: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        buf.truncate(n);
        Ok(buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Enumerates the weak suites the server accepts at TLS 1.2: offer them all, strike out the one it
/// picks, repeat until it refuses.
async fn weak_suites(
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let mut offered = hello::weak_suites();
    let mut accepted = Vec::new();
    for _ in 0..hello::SUITES.len() {
        let h = hello::client_hello(Version::Tls12, &offered, Some(host));
        match hello::exchange(addr, &h, timeout).await? {
            Answer::ServerHello {
                version: 0x0303,
                suite,
                ..
            } => {
                let Some(i) = offered.iter().position(|c| *c == suite) else {
                    return Err(format!(
                        "the server chose suite 0x{suite:04x}, which was not offered"
                    ));
                };
                offered.remove(i);
                accepted.push(hello::suite_name(suite));
                if offered.is_empty() {
                    break;
                }
            }
            Answer::ServerHello { .. } | Answer::Alert(..) | Answer::Closed => break,
            Answer::NotTls(b) => return Err(format!("non-TLS answer {}", hex::encode(b))),
        }
    }
    Ok(accepted)
}

/// A verifier that records the chain and accepts it: the checks judge it afterwards, against the CA
/// each component must chain to. Handshake signatures are still verified.
#[derive(Debug)]
struct Recorder {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut c) = self.chain.lock() {
            c.clear();
            c.push(end_entity.to_vec());
            c.extend(intermediates.iter().map(|i| i.to_vec()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Records whether the server asked for a client certificate, and answers with `cert` (or none).
#[derive(Debug)]
struct AskRecorder {
    asked: AtomicBool,
    cert: Option<Arc<CertifiedKey>>,
}

impl ResolvesClientCert for AskRecorder {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::SeqCst);
        self.cert.clone()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.2/1.3 handshake with rustls, then one HTTP request: a server that demands a certificate
/// refuses during the handshake (TLS 1.2) or right after it (TLS 1.3, where the client finishes
/// first), with an alert.
pub async fn handshake(
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
    cert: Option<Arc<CertifiedKey>>,
) -> Handshake {
    let provider = crate::tls::provider();
    let recorder = Arc::new(Recorder {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let asker = Arc::new(AskRecorder {
        asked: AtomicBool::new(false),
        cert,
    });
    let mut out = Handshake::default();
    let cfg = match ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_client_cert_resolver(asker.clone()),
        Err(e) => {
            out.error = Some(format!("TLS client: {e}"));
            return out;
        }
    };
    let name = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => match ServerName::try_from(host.to_owned()) {
            Ok(n) => n,
            Err(e) => {
                out.error = Some(format!("{host}: not a server name: {e}"));
                return out;
            }
        },
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let result = tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| (false, format!("connect {addr}: {e}")))?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| (true, format!("handshake: {e}")))?;
        {
            let (_, c) = tls.get_ref();
            let v = c
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned();
            let s = c
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or("?")
                .to_owned();
            out.negotiated = Some((v, s));
        }
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes())
            .await
            .map_err(|e| (true, format!("after the handshake: {e}")))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err((true, "closed the connection without answering".to_string())),
            Ok(_) => Ok(()),
            Err(e) => Err((true, format!("after the handshake: {e}"))),
        }
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err((true, e))) => out.rejected = Some(e),
        Ok(Err((false, e))) => out.error = Some(e),
        Err(_) if out.negotiated.is_some() => {
            // Handshake done and no rejection within the timeout: the server is waiting for us.
        }
        Err(_) => out.error = Some(format!("no TLS handshake within {timeout:?}")),
    }
    if let Ok(c) = recorder.chain.lock() {
        out.chain = c.clone();
    }
    out.cert_requested = asker.asked.load(Ordering::SeqCst);
    out
}

/// A throwaway CA and a client certificate it signs, for TLS-05.
pub fn foreign_client_cert() -> Result<Arc<CertifiedKey>, String> {
    use pki::ca::{CertificateAuthority, LeafProfile, Usage, Validity};
    use pki::keys::{KeyAlgorithm, PrivateKey};
    let now = std::time::SystemTime::now();
    let ca = CertificateAuthority::create(
        "meshd-audit foreign CA",
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(3600),
        now,
    )
    .map_err(|e| e.to_string())?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| e.to_string())?;
    let profile = LeafProfile {
        common_name: "system:node:meshd-audit-foreign".into(),
        organizations: vec!["system:nodes".into()],
        dns_names: vec![],
        ip_addresses: vec![],
        usage: Usage::Client,
    };
    let spki = key.public_key_spki_der();
    let issued = ca
        .issue(
            &profile,
            &spki,
            Validity {
                lifetime: Duration::from_secs(3600),
                backdate: Duration::from_secs(60),
            },
            now,
        )
        .map_err(|e| e.to_string())?;
    let certs = crate::tls::certs_from_pem("foreign client certificate", &issued.pem)
        .map_err(|e| e.to_string())?;
    let key_der = crate::tls::key_from_pem("foreign client key", key.to_pem().expose())
        .map_err(|e| e.to_string())?;
    let signer = crate::tls::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}
