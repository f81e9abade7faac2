//! Hand-built ClientHellos and a ServerHello / alert parser: how the audit offers what rustls never
//! will (SSLv3, TLS 1.0 and 1.1, CBC / 3DES / RC4 / NULL / EXPORT / static-RSA suites) and reads what
//! the server picks. Only the first flight of the server is read; no key exchange is ever completed.
//!
//! Formats: RFC 5246 §6.2 (records), §7.4.1.2 (ClientHello), §7.4.1.3 (ServerHello); RFC 6101 for
//! SSLv3; extensions from RFC 6066 (SNI), RFC 8422 (groups, point formats), RFC 5246 §7.4.1.4.1
//! (signature_algorithms).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A protocol version as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Version {
    /// SSL 3.0 (0x0300).
    Ssl3,
    /// TLS 1.0 (0x0301).
    Tls10,
    /// TLS 1.1 (0x0302).
    Tls11,
    /// TLS 1.2 (0x0303).
    Tls12,
}

impl Version {
    /// The two version bytes.
    pub fn wire(self) -> u16 {
        match self {
            Version::Ssl3 => 0x0300,
            Version::Tls10 => 0x0301,
            Version::Tls11 => 0x0302,
            Version::Tls12 => 0x0303,
        }
    }

    /// The name sslyze and openssl print.
    pub fn name(self) -> &'static str {
        match self {
            Version::Ssl3 => "SSLv3",
            Version::Tls10 => "TLSv1.0",
            Version::Tls11 => "TLSv1.1",
            Version::Tls12 => "TLSv1.2",
        }
    }

    /// The legacy versions TLS-02 forbids.
    pub const LEGACY: [Version; 3] = [Version::Ssl3, Version::Tls10, Version::Tls11];
}

/// A cipher suite the probes know by name.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// IANA code point.
    pub code: u16,
    /// IANA name (the names sslyze reports).
    pub name: &'static str,
}

macro_rules! suites {
    ($($code:literal $name:ident),* $(,)?) => {
        /// Every TLS ≤ 1.2 suite the probes offer, by IANA name.
        pub const SUITES: &[Suite] = &[$(Suite { code: $code, name: stringify!($name) }),*];
    };
}

suites! {
    0xc02b TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    0xc02c TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    0xc02f TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    0xc030 TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    0xcca8 TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    0xcca9 TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    0xc0ac TLS_ECDHE_ECDSA_WITH_AES_128_CCM,
    0xc0ad TLS_ECDHE_ECDSA_WITH_AES_256_CCM,
    0xc0ae TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
    0xc0af TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8,
    0xc05c TLS_ECDHE_ECDSA_WITH_ARIA_128_GCM_SHA256,
    0xc05d TLS_ECDHE_ECDSA_WITH_ARIA_256_GCM_SHA384,
    0xc060 TLS_ECDHE_RSA_WITH_ARIA_128_GCM_SHA256,
    0xc061 TLS_ECDHE_RSA_WITH_ARIA_256_GCM_SHA384,
    0xc009 TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
    0xc00a TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
    0xc023 TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256,
    0xc024 TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384,
    0xc013 TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA,
    0xc014 TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA,
    0xc027 TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
    0xc028 TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384,
    0xc072 TLS_ECDHE_ECDSA_WITH_CAMELLIA_128_CBC_SHA256,
    0xc073 TLS_ECDHE_ECDSA_WITH_CAMELLIA_256_CBC_SHA384,
    0xc076 TLS_ECDHE_RSA_WITH_CAMELLIA_128_CBC_SHA256,
    0xc077 TLS_ECDHE_RSA_WITH_CAMELLIA_256_CBC_SHA384,
    0xc008 TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA,
    0xc012 TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA,
    0xc007 TLS_ECDHE_ECDSA_WITH_RC4_128_SHA,
    0xc011 TLS_ECDHE_RSA_WITH_RC4_128_SHA,
    0xc006 TLS_ECDHE_ECDSA_WITH_NULL_SHA,
    0xc010 TLS_ECDHE_RSA_WITH_NULL_SHA,
    0x009e TLS_DHE_RSA_WITH_AES_128_GCM_SHA256,
    0x009f TLS_DHE_RSA_WITH_AES_256_GCM_SHA384,
    0xccaa TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    0x0033 TLS_DHE_RSA_WITH_AES_128_CBC_SHA,
    0x0039 TLS_DHE_RSA_WITH_AES_256_CBC_SHA,
    0x0067 TLS_DHE_RSA_WITH_AES_128_CBC_SHA256,
    0x006b TLS_DHE_RSA_WITH_AES_256_CBC_SHA256,
    0x0016 TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA,
    0x0045 TLS_DHE_RSA_WITH_CAMELLIA_128_CBC_SHA,
    0x0088 TLS_DHE_RSA_WITH_CAMELLIA_256_CBC_SHA,
    0x009c TLS_RSA_WITH_AES_128_GCM_SHA256,
    0x009d TLS_RSA_WITH_AES_256_GCM_SHA384,
    0x002f TLS_RSA_WITH_AES_128_CBC_SHA,
    0x0035 TLS_RSA_WITH_AES_256_CBC_SHA,
    0x003c TLS_RSA_WITH_AES_128_CBC_SHA256,
    0x003d TLS_RSA_WITH_AES_256_CBC_SHA256,
    0x0041 TLS_RSA_WITH_CAMELLIA_128_CBC_SHA,
    0x0084 TLS_RSA_WITH_CAMELLIA_256_CBC_SHA,
    0x0096 TLS_RSA_WITH_SEED_CBC_SHA,
    0xc09c TLS_RSA_WITH_AES_128_CCM,
    0xc09d TLS_RSA_WITH_AES_256_CCM,
    0x000a TLS_RSA_WITH_3DES_EDE_CBC_SHA,
    0x0005 TLS_RSA_WITH_RC4_128_SHA,
    0x0004 TLS_RSA_WITH_RC4_128_MD5,
    0x0009 TLS_RSA_WITH_DES_CBC_SHA,
    0x0001 TLS_RSA_WITH_NULL_MD5,
    0x0002 TLS_RSA_WITH_NULL_SHA,
    0x003b TLS_RSA_WITH_NULL_SHA256,
    0x0003 TLS_RSA_EXPORT_WITH_RC4_40_MD5,
    0x0008 TLS_RSA_EXPORT_WITH_DES40_CBC_SHA,
    0x0014 TLS_DHE_RSA_EXPORT_WITH_DES40_CBC_SHA,
    0xc0a0 TLS_RSA_WITH_AES_128_CCM_8,
    0xc0a1 TLS_RSA_WITH_AES_256_CCM_8,
    0x00ff TLS_EMPTY_RENEGOTIATION_INFO_SCSV,
}

/// The name of suite `code` (`0x1234` when unknown).
pub fn suite_name(code: u16) -> String {
    SUITES
        .iter()
        .find(|s| s.code == code)
        .map(|s| s.name.to_owned())
        .unwrap_or_else(|| format!("0x{code:04x}"))
}

/// Whether a suite meets meshd's policy (TLS-03): an ephemeral ECDH key exchange and an AEAD cipher.
/// Stricter than CIS 1.2.30, whose list still holds 3DES and CBC.
pub fn is_strong(name: &str) -> bool {
    name.starts_with("TLS_ECDHE_")
        && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305") || name.ends_with("_CCM"))
}

/// Every real suite (not the SCSV) outside the policy.
pub fn weak_suites() -> Vec<u16> {
    SUITES
        .iter()
        .filter(|s| s.code != 0x00ff && !is_strong(s.name))
        .map(|s| s.code)
        .collect()
}

/// Every real suite usable below TLS 1.2 (no GCM / CCM / ChaCha20 / SHA-256 MACs).
pub fn legacy_suites() -> Vec<u16> {
    SUITES
        .iter()
        .filter(|s| {
            s.code != 0x00ff
                && !s.name.contains("GCM")
                && !s.name.contains("CCM")
                && !s.name.contains("CHACHA")
                && !s.name.ends_with("SHA256")
                && !s.name.ends_with("SHA384")
        })
        .map(|s| s.code)
        .collect()
}

/// Builds a ClientHello record for `version` offering `suites`.
pub fn client_hello(version: Version, suites: &[u16], sni: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(512);
    body.extend_from_slice(&version.wire().to_be_bytes());
    let mut random = [0u8; 32];
    // The random needs no secrecy here (the handshake is never completed), only uniqueness.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    body.extend_from_slice(&random);
    body.push(0); // session id
    let mut cs: Vec<u16> = suites.to_vec();
    cs.push(0x00ff); // renegotiation SCSV: some servers want it before they talk legacy
    body.extend_from_slice(&((cs.len() * 2) as u16).to_be_bytes());
    for c in cs {
        body.extend_from_slice(&c.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
    if version != Version::Ssl3 {
        let mut ext = Vec::new();
        if let Some(name) = sni.filter(|n| n.parse::<std::net::IpAddr>().is_err()) {
            let n = name.as_bytes();
            let mut sn = Vec::new();
            sn.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
            sn.push(0);
            sn.extend_from_slice(&(n.len() as u16).to_be_bytes());
            sn.extend_from_slice(n);
            push_ext(&mut ext, 0x0000, &sn);
        }
        // supported_groups: x25519, secp256r1, secp384r1, secp521r1, ffdhe2048
        push_ext(
            &mut ext,
            0x000a,
            &[
                0, 10, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18, 0x00, 0x19, 0x01, 0x00,
            ],
        );
        // ec_point_formats: uncompressed
        push_ext(&mut ext, 0x000b, &[1, 0]);
        if version == Version::Tls12 {
            // signature_algorithms, SHA-1 variants included so legacy servers can answer
            let algs: [u16; 11] = [
                0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0201,
                0x0203,
            ];
            let mut sa = Vec::new();
            sa.extend_from_slice(&((algs.len() * 2) as u16).to_be_bytes());
            for a in algs {
                sa.extend_from_slice(&a.to_be_bytes());
            }
            push_ext(&mut ext, 0x000d, &sa);
        }
        // extended_master_secret, renegotiation_info (empty)
        push_ext(&mut ext, 0x0017, &[]);
        push_ext(&mut ext, 0xff01, &[0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
    }
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let record_version = if version == Version::Ssl3 {
        0x0300u16
    } else {
        0x0301
    };
    let mut rec = vec![0x16];
    rec.extend_from_slice(&record_version.to_be_bytes());
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// What the server answered to a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A ServerHello with this version and suite; `cert_request` when the rest of the first flight
    /// (readable in the clear up to TLS 1.2) held a CertificateRequest.
    ServerHello {
        /// Negotiated version (wire value).
        version: u16,
        /// Chosen suite.
        suite: u16,
        /// Whether a CertificateRequest was seen in the first flight.
        cert_request: bool,
        /// The Certificate message's chain (TLS ≤ 1.2 sends it in the clear), leaf first.
        certs: Vec<Vec<u8>>,
    },
    /// A TLS alert (level, description).
    Alert(u8, u8),
    /// The connection closed (or reset) before any byte came.
    Closed,
    /// Bytes that are not TLS (up to 64 of them).
    NotTls(Vec<u8>),
}

/// Parses the server's first bytes. `Ok(None)` = need more bytes.
pub fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x16 && buf[0] != 0x15 {
        return Ok(Some(Answer::NotTls(buf[..buf.len().min(64)].to_vec())));
    }
    if buf.len() >= 2 && buf[1] != 0x03 {
        return Ok(Some(Answer::NotTls(buf[..buf.len().min(64)].to_vec())));
    }
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf[0] == 0x15 {
        if buf.len() < 7 {
            return Ok(None);
        }
        return Ok(Some(Answer::Alert(buf[5], buf[6])));
    }
    // Handshake records: gather handshake messages across records until ServerHelloDone (TLS ≤ 1.2)
    // or the end of what came in the ServerHello's record (TLS 1.3 encrypts the rest).
    let mut hs = Vec::new();
    let mut pos = 0;
    let mut complete_records = 0;
    while pos + 5 <= buf.len() {
        let t = buf[pos];
        let l = u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]) as usize;
        if pos + 5 + l > buf.len() {
            break;
        }
        if t == 0x16 {
            hs.extend_from_slice(&buf[pos + 5..pos + 5 + l]);
        } else {
            // change_cipher_spec or an alert after the hello: the plaintext flight ended
            hs.push(0xff);
            break;
        }
        complete_records += 1;
        pos += 5 + l;
    }
    if complete_records == 0 {
        let _ = len;
        return Ok(None);
    }
    // Walk handshake messages.
    let mut i = 0;
    let mut hello: Option<(u16, u16)> = None;
    let mut cert_request = false;
    let mut certs = Vec::new();
    while i + 4 <= hs.len() {
        let t = hs[i];
        if t == 0xff {
            break;
        }
        let l = u32::from_be_bytes([0, hs[i + 1], hs[i + 2], hs[i + 3]]) as usize;
        if i + 4 + l > hs.len() {
            return Ok(None);
        }
        let m = &hs[i + 4..i + 4 + l];
        match t {
            2 => {
                if m.len() < 35 {
                    return Err("short ServerHello".into());
                }
                let v = u16::from_be_bytes([m[0], m[1]]);
                let sid = m[34] as usize;
                if m.len() < 35 + sid + 2 {
                    return Err("short ServerHello".into());
                }
                let suite = u16::from_be_bytes([m[35 + sid], m[36 + sid]]);
                let v = supported_version_ext(&m[37 + sid..]).unwrap_or(v);
                if v >= 0x0304 {
                    return Ok(Some(Answer::ServerHello {
                        version: v,
                        suite,
                        cert_request: false,
                        certs: Vec::new(),
                    }));
                }
                hello = Some((v, suite));
            }
            11 => certs = parse_certificates(m),
            13 => cert_request = true,
            14 => {
                // ServerHelloDone: the flight is complete
                if let Some((version, suite)) = hello {
                    return Ok(Some(Answer::ServerHello {
                        version,
                        suite,
                        cert_request,
                        certs,
                    }));
                }
            }
            _ => {}
        }
        i += 4 + l;
    }
    Ok(None)
}

/// The DER certificates of a Certificate message body (RFC 5246 §7.4.2).
fn parse_certificates(m: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if m.len() < 3 {
        return out;
    }
    let total = u32::from_be_bytes([0, m[0], m[1], m[2]]) as usize;
    let mut c = &m[3..m.len().min(3 + total)];
    while c.len() >= 3 {
        let l = u32::from_be_bytes([0, c[0], c[1], c[2]]) as usize;
        if c.len() < 3 + l {
            break;
        }
        out.push(c[3..3 + l].to_vec());
        c = &c[3 + l..];
    }
    out
}

/// The supported_versions extension of a ServerHello (TLS 1.3), if present.
fn supported_version_ext(rest: &[u8]) -> Option<u16> {
    // compression method (1), then extensions
    if rest.len() < 3 {
        return None;
    }
    let ext_len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
    let mut e = &rest[3..rest.len().min(3 + ext_len)];
    while e.len() >= 4 {
        let t = u16::from_be_bytes([e[0], e[1]]);
        let l = u16::from_be_bytes([e[2], e[3]]) as usize;
        if e.len() < 4 + l {
            return None;
        }
        if t == 0x002b && l == 2 {
            return Some(u16::from_be_bytes([e[4], e[5]]));
        }
        e = &e[4 + l..];
    }
    None
}

/// Sends `hello` to `addr` and reads the answer, within `timeout`. `Err` = could not connect or the
/// server said nothing parseable in time.
pub async fn exchange(
    addr: std::net::SocketAddr,
    hello: &[u8],
    timeout: Duration,
) -> Result<Answer, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(hello)
            .await
            .map_err(|e| format!("write to {addr}: {e}"))?;
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut chunk = [0u8; 8192];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if buf.is_empty() && is_reset(&e) => return Ok(Answer::Closed),
                Err(e) => return Err(format!("read from {addr}: {e}")),
            };
            if n == 0 {
                if buf.is_empty() {
                    return Ok(Answer::Closed);
                }
                return match parse_answer(&buf)? {
                    Some(a) => Ok(a),
                    // A server that closes after a partial flight: take the hello if there was one.
                    None => Err(format!(
                        "{addr} closed after {} bytes of an incomplete TLS flight",
                        buf.len()
                    )),
                };
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(a) = parse_answer(&buf)? {
                return Ok(a);
            }
            if buf.len() > 256 * 1024 {
                return Err(format!("{addr}: first TLS flight over 256 KiB"));
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no answer within {timeout:?}")),
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn parse_answer_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_answer(&b);
            let mut rec = vec![0x16, 3, 3];
            rec.extend_from_slice(&b);
            let _ = parse_answer(&rec);
            let mut hs = vec![0x16, 3, 3, (b.len() >> 8) as u8, b.len() as u8, 2];
            hs.extend_from_slice(&b);
            let _ = parse_answer(&hs);
        }
    }

    #[test]
    fn hello_lengths_are_consistent() {
        for v in [
            Version::Ssl3,
            Version::Tls10,
            Version::Tls11,
            Version::Tls12,
        ] {
            let h = client_hello(v, &weak_suites(), Some("etcd.example"));
            assert_eq!(h[0], 0x16);
            let rec = u16::from_be_bytes([h[3], h[4]]) as usize;
            assert_eq!(rec + 5, h.len());
            let hs = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
            assert_eq!(hs + 4, rec);
            assert_eq!(u16::from_be_bytes([h[9], h[10]]), v.wire());
        }
    }

    #[test]
    fn policy() {
        assert!(is_strong("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"));
        assert!(is_strong("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"));
        assert!(!is_strong("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"));
        assert!(!is_strong("TLS_RSA_WITH_AES_128_GCM_SHA256"));
        assert!(!is_strong("TLS_RSA_WITH_3DES_EDE_CBC_SHA"));
        assert!(!is_strong("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"));
    }

    #[test]
    fn parses_hello_flight_and_alert() {
        // ServerHello (TLS 1.2, suite c013, empty session id) + CertificateRequest + ServerHelloDone
        let mut sh = vec![0x03, 0x03];
        sh.extend_from_slice(&[0u8; 32]);
        sh.push(0);
        sh.extend_from_slice(&[0xc0, 0x13, 0]);
        let mut hs = vec![2, 0, 0, sh.len() as u8];
        hs.extend_from_slice(&sh);
        hs.extend_from_slice(&[13, 0, 0, 1, 0]);
        hs.extend_from_slice(&[14, 0, 0, 0]);
        let mut rec = vec![0x16, 3, 3, 0, hs.len() as u8];
        rec.extend_from_slice(&hs);
        assert_eq!(parse_answer(&rec[..20]).unwrap(), None);
        assert_eq!(
            parse_answer(&rec).unwrap(),
            Some(Answer::ServerHello {
                version: 0x0303,
                suite: 0xc013,
                cert_request: true,
                certs: vec![]
            })
        );
        assert_eq!(
            parse_answer(&[0x15, 3, 1, 0, 2, 2, 70]).unwrap(),
            Some(Answer::Alert(2, 70))
        );
        assert!(matches!(
            parse_answer(b"HTTP/1.1 400 Bad Request\r\n").unwrap(),
            Some(Answer::NotTls(_))
        ));
    }
}
