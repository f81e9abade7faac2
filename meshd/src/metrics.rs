//! Prometheus metrics of `meshd run` (`--metrics-listen`, loopback by default):
//!
//! * every certificate of the data directory, in x509-certificate-exporter's names and labels:
//!   `x509_cert_not_after`, `x509_cert_not_before` (Unix seconds), `x509_cert_expired` (0/1), with
//!   `serial_number` (decimal), `subject_CN`, `subject_O`, `issuer_CN`, `issuer_O`, `filename`,
//!   `filepath`; `x509_read_errors` counts the files that could not be read;
//! * per WireGuard peer, `wireguard_latest_handshake_seconds{interface,public_key}` (Unix seconds, 0
//!   = never), as prometheus_wireguard_exporter names it, plus rx/tx byte counters;
//! * the audit's local checks (certificates, file modes, running components):
//!   `meshd_audit_check_failed{check,severity,target}` = 1 per FAIL / WARN finding and
//!   `meshd_audit_checks{status}` per status.
//!
//! Everything is computed at scrape time from the disk and the device: nothing to keep in sync.
//! The listener is plain HTTP without authentication, which is why it binds the loopback by default:
//! the metrics name every certificate and peer of the node (a map of the cluster), and a node-local
//! Prometheus agent or a `kubectl port-forward`-style tunnel is the intended reader.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::audit::model::Status;

/// Escapes a label value (backslash, double quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// A hex serial as a decimal string (the exporter's format), for serials of any length.
pub fn hex_to_decimal(hex: &str) -> String {
    let mut digits: Vec<u8> = vec![0]; // little-endian base 10
    for c in hex.chars() {
        let Some(v) = c.to_digit(16) else { continue };
        let mut carry = v;
        for d in digits.iter_mut() {
            let x = *d as u32 * 16 + carry;
            *d = (x % 10) as u8;
            carry = x / 10;
        }
        while carry > 0 {
            digits.push((carry % 10) as u8);
            carry /= 10;
        }
    }
    while digits.len() > 1 && digits.last() == Some(&0) {
        digits.pop();
    }
    digits.iter().rev().map(|d| char::from(b'0' + d)).collect()
}

fn first_field(dn: &str, key: &str) -> String {
    dn.split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
        .to_owned()
}

/// Renders every metric of the node whose data directory is `data_dir` and WireGuard interface is
/// `ifname` (none: no mesh).
pub fn render(data_dir: &Path, ifname: Option<&str>) -> String {
    let now = SystemTime::now();
    let mut out = String::new();
    let mut not_after = String::new();
    let mut not_before = String::new();
    let mut expired = String::new();
    let mut errors = 0u64;
    match crate::certs::check(data_dir, now) {
        Ok(rows) => {
            for r in rows {
                let info = std::fs::read_to_string(&r.path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| crate::audit::inventory::cert_text(&t, &r.path))
                    .and_then(|t| pki::inspect::inspect_pem(&t).map_err(|e| e.to_string()));
                let Ok(info) = info else {
                    errors += 1;
                    continue;
                };
                let labels = format!(
                    "filename=\"{}\",filepath=\"{}\",issuer_CN=\"{}\",issuer_O=\"{}\",serial_number=\"{}\",subject_CN=\"{}\",subject_O=\"{}\"",
                    esc(&r.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()),
                    esc(&r.path.display().to_string()),
                    esc(&first_field(&info.issuer, "CN")),
                    esc(&first_field(&info.issuer, "O")),
                    hex_to_decimal(&info.serial),
                    esc(info.common_name.as_deref().unwrap_or("")),
                    esc(&info.organizations.join(",")),
                );
                let _ = writeln!(
                    not_after,
                    "x509_cert_not_after{{{labels}}} {}",
                    unix(info.not_after)
                );
                let _ = writeln!(
                    not_before,
                    "x509_cert_not_before{{{labels}}} {}",
                    unix(info.not_before)
                );
                let _ = writeln!(
                    expired,
                    "x509_cert_expired{{{labels}}} {}",
                    u8::from(now > info.not_after)
                );
            }
        }
        Err(_) => errors += 1,
    }
    out.push_str("# HELP x509_cert_not_after Unix timestamp of the certificate's NotAfter.\n# TYPE x509_cert_not_after gauge\n");
    out.push_str(&not_after);
    out.push_str("# HELP x509_cert_not_before Unix timestamp of the certificate's NotBefore.\n# TYPE x509_cert_not_before gauge\n");
    out.push_str(&not_before);
    out.push_str("# HELP x509_cert_expired 1 if the certificate has expired.\n# TYPE x509_cert_expired gauge\n");
    out.push_str(&expired);
    let _ = writeln!(out, "# HELP x509_read_errors Certificate files that could not be read or parsed.\n# TYPE x509_read_errors gauge\nx509_read_errors {errors}");

    if let Some(ifname) = ifname {
        out.push_str("# HELP wireguard_latest_handshake_seconds Unix timestamp of the latest handshake with the peer (0: never).\n# TYPE wireguard_latest_handshake_seconds gauge\n");
        let mut bytes = String::new();
        let dev = overlay::wg::Uapi::connect(ifname).and_then(|u| u.get());
        let up = dev.is_ok();
        if let Ok(info) = dev {
            for p in &info.peers {
                let l = format!(
                    "interface=\"{}\",public_key=\"{}\"",
                    esc(ifname),
                    esc(&p.public_key.to_base64())
                );
                let _ = writeln!(
                    out,
                    "wireguard_latest_handshake_seconds{{{l}}} {}",
                    p.last_handshake_time_sec
                );
                let _ = writeln!(
                    bytes,
                    "wireguard_received_bytes_total{{{l}}} {}",
                    p.rx_bytes
                );
                let _ = writeln!(bytes, "wireguard_sent_bytes_total{{{l}}} {}", p.tx_bytes);
            }
        }
        out.push_str("# HELP wireguard_received_bytes_total Bytes received from the peer.\n# TYPE wireguard_received_bytes_total counter\n# HELP wireguard_sent_bytes_total Bytes sent to the peer.\n# TYPE wireguard_sent_bytes_total counter\n");
        out.push_str(&bytes);
        let _ = writeln!(out, "# HELP meshd_wireguard_device_up 1 if the WireGuard device answers on its UAPI socket.\n# TYPE meshd_wireguard_device_up gauge\nmeshd_wireguard_device_up{{interface=\"{}\"}} {}", esc(ifname), u8::from(up));
    }

    let findings = crate::audit::offline_checks(data_dir, &[], true);
    out.push_str("# HELP meshd_audit_check_failed 1 per local audit finding that is FAIL or WARN (certificates, file modes, running components).\n# TYPE meshd_audit_check_failed gauge\n");
    let mut counts = std::collections::BTreeMap::new();
    for f in &findings {
        *counts.entry(f.status.as_str()).or_insert(0u64) += 1;
        if matches!(f.status, Status::Fail | Status::Warn) {
            let _ = writeln!(
                out,
                "meshd_audit_check_failed{{check=\"{}\",severity=\"{}\",status=\"{}\",target=\"{}\"}} 1",
                f.id,
                f.severity.as_str(),
                f.status.as_str(),
                esc(&f.target)
            );
        }
    }
    out.push_str("# HELP meshd_audit_checks Local audit findings by status.\n# TYPE meshd_audit_checks gauge\n");
    for s in ["PASS", "WARN", "FAIL", "SKIP", "ERROR"] {
        let _ = writeln!(
            out,
            "meshd_audit_checks{{status=\"{s}\"}} {}",
            counts.get(s).unwrap_or(&0)
        );
    }
    out
}

/// Serves `GET /metrics` on `addr` until the process ends. A bind failure is logged, not fatal: the
/// daemon's job is the mesh, not the metrics.
pub fn spawn(addr: Option<SocketAddr>, data_dir: &Path, ifname: Option<String>) {
    let Some(addr) = addr else { return };
    let data_dir: PathBuf = data_dir.to_path_buf();
    tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                crate::api::server::log(format!(
                    "metrics: cannot listen on {addr}: {e}; serving none"
                ));
                return;
            }
        };
        crate::api::server::log(format!("metrics listening on http://{addr}/metrics"));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let dd = data_dir.clone();
            let ifn = ifname.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let dd = dd.clone();
                        let ifn = ifn.clone();
                        async move {
                            let resp = if req.uri().path() == "/metrics" {
                                let body = tokio::task::spawn_blocking(move || {
                                    render(&dd, ifn.as_deref())
                                })
                                .await
                                .unwrap_or_default();
                                hyper::Response::builder()
                                    .header(
                                        "content-type",
                                        "text/plain; version=0.0.4; charset=utf-8",
                                    )
                                    .body(Full::new(Bytes::from(body)))
                            } else {
                                hyper::Response::builder().status(404).body(Full::new(
                                    Bytes::from_static(b"not found; try /metrics\n"),
                                ))
                            };
                            resp
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn serials_in_decimal() {
        assert_eq!(super::hex_to_decimal("ff"), "255");
        assert_eq!(super::hex_to_decimal("00"), "0");
        assert_eq!(
            super::hex_to_decimal("76fc4af1be8fd9de4b734a20517865ae"),
            "158158882362244742838756843112787109294"
        );
    }
}
