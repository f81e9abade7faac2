//! TLS-01 … TLS-08: one endpoint's probe, judged.

use std::path::Path;
use std::time::SystemTime;

use pki::inventory::CaId;

use super::catalog::*;
use super::endpoints::{Component, Endpoint};
use super::model::{Finding, Status};
use super::tls_probe::{ClientAuth, Probe, Transport};

/// The findings of one endpoint.
pub fn judge(
    ep: &Endpoint,
    p: &Probe,
    cas: &[(CaId, Vec<u8>)],
    data_dir: &Path,
    now: SystemTime,
) -> Vec<Finding> {
    let t = ep.label();
    let mut v = Vec::new();
    let not_tls = |v: &mut Vec<Finding>, why: &str| {
        for c in [TLS_02, TLS_03, TLS_04, TLS_05, TLS_06, TLS_07, TLS_08] {
            v.push(c.finding(Status::Skip, &t, why, "TLS"));
        }
    };
    match &p.transport {
        Transport::Refused(e) => {
            if ep.component == Component::KubeletReadOnly {
                v.push(TLS_01.finding(Status::Pass, &t, "closed (connection refused)", "closed"));
            } else if ep.explicit {
                v.push(TLS_01.finding(
                    Status::Error,
                    &t,
                    format!("target does not answer: {e}"),
                    "a TLS listener",
                ));
            } else {
                v.push(TLS_01.finding(
                    Status::Skip,
                    &t,
                    "nothing listens (connection refused)",
                    "a TLS listener",
                ));
            }
            return v;
        }
        Transport::Unknown(e) => {
            v.push(TLS_01.finding(Status::Error, &t, e.clone(), "a TLS listener"));
            not_tls(&mut v, "cannot run: the listener's protocol is unknown");
            return v;
        }
        Transport::PlainHttp(line) => {
            v.push(TLS_01.finding(
                Status::Fail,
                &t,
                format!("{} answers plaintext HTTP: {line}", ep.component.name()),
                if ep.component == Component::KubeletReadOnly {
                    "closed"
                } else {
                    "TLS"
                },
            ));
            not_tls(&mut v, "not TLS (see TLS-01)");
            return v;
        }
        Transport::NotTls(hex) => {
            v.push(TLS_01.finding(
                Status::Fail,
                &t,
                format!("answers a ClientHello with non-TLS bytes {hex}"),
                "TLS",
            ));
            not_tls(&mut v, "not TLS (see TLS-01)");
            return v;
        }
        Transport::Tls => {
            let expected = if ep.component == Component::KubeletReadOnly {
                "closed"
            } else {
                "TLS"
            };
            let st = if ep.component == Component::KubeletReadOnly {
                Status::Fail
            } else {
                Status::Pass
            };
            v.push(TLS_01.finding(st, &t, "answers a ClientHello with TLS", expected));
        }
    }

    // TLS-02
    let mut accepted = Vec::new();
    let mut errors = Vec::new();
    for (ver, r) in &p.legacy {
        match r {
            Ok(Some(suite)) => accepted.push(format!("{} ({suite})", ver.name())),
            Ok(None) => {}
            Err(e) => errors.push(format!("{}: {e}", ver.name())),
        }
    }
    let exp = "TLSv1.2 and TLSv1.3 only";
    let legacy_ev = serde_json::json!({
        "accepted_versions": p.legacy.iter().filter(|(_, r)| matches!(r, Ok(Some(_)))).map(|(v, _)| v.name()).collect::<Vec<_>>(),
        "refused_versions": p.legacy.iter().filter(|(_, r)| matches!(r, Ok(None))).map(|(v, _)| v.name()).collect::<Vec<_>>(),
    });
    v.push(
        if !accepted.is_empty() {
            TLS_02.finding(
                Status::Fail,
                &t,
                format!("accepts {}", accepted.join(", ")),
                exp,
            )
        } else if !errors.is_empty() || p.legacy.is_empty() {
            TLS_02.finding(Status::Error, &t, errors.join("; "), exp)
        } else {
            TLS_02.finding(Status::Pass, &t, "refuses SSLv3, TLSv1.0, TLSv1.1", exp)
        }
        .with_evidence(legacy_ev),
    );

    // TLS-03
    let exp = "ECDHE key exchange with an AEAD cipher only";
    let suites_ev = serde_json::json!({
        "accepted_weak_suites_tls1_2": p.weak_suites.as_ref().ok(),
        "negotiated": p.anonymous.negotiated.as_ref().map(|(v, s)| serde_json::json!({"version": v, "suite": s})),
    });
    v.push(
        match &p.weak_suites {
            Ok(w) if !w.is_empty() => {
                TLS_03.finding(Status::Fail, &t, format!("accepts {}", w.join(", ")), exp)
            }
            Ok(_) => TLS_03.finding(
                Status::Pass,
                &t,
                format!(
                "refuses every CBC, 3DES, RC4, NULL, EXPORT, static-RSA and DHE suite at TLSv1.2{}",
                p.anonymous
                    .negotiated
                    .as_ref()
                    .map(|(ver, s)| format!("; negotiates {s} over {ver}"))
                    .unwrap_or_default()
            ),
                exp,
            ),
            Err(e) => TLS_03.finding(Status::Error, &t, e.clone(), exp),
        }
        .with_evidence(suites_ev),
    );

    // TLS-04
    let mandated = ep.component.mtls_mandated();
    let exp = if mandated {
        "client certificate REQUIRED"
    } else if ep.component == Component::MeshdApi {
        "optional or required (/v1/join authenticates by token; every other route requires a client certificate)"
    } else {
        "recorded (mTLS not mandated for this component)"
    };
    let auth_ev = serde_json::json!({
        "client_auth": p.client_auth().ok().map(|a| match a {
            ClientAuth::Disabled => "DISABLED",
            ClientAuth::Optional => "OPTIONAL",
            ClientAuth::Required => "REQUIRED",
        }),
        "certificate_requested": p.anonymous.cert_requested,
    });
    v.push(
        match p.client_auth() {
            Ok(ClientAuth::Required) => TLS_04.finding(
                Status::Pass,
                &t,
                format!(
                    "client auth required ({})",
                    p.anonymous.rejected.clone().unwrap_or_default()
                ),
                exp,
            ),
            Ok(a) => {
                let obs = match a {
                    ClientAuth::Optional => {
                        format!(
                            "{} client auth optional: a client without a certificate is served",
                            ep.component.name()
                        )
                    }
                    _ => format!("{} asks for no client certificate", ep.component.name()),
                };
                let st = if mandated
                    || (ep.component == Component::MeshdApi && a == ClientAuth::Disabled)
                {
                    Status::Fail
                } else {
                    Status::Pass
                };
                TLS_04.finding(st, &t, obs, exp)
            }
            Err(e) => TLS_04.finding(Status::Error, &t, e, exp),
        }
        .with_evidence(auth_ev),
    );

    // TLS-05
    let exp = "a certificate from a foreign CA is refused";
    v.push(match (&p.foreign, p.client_auth()) {
        (_, Err(e)) => TLS_05.finding(
            Status::Error,
            &t,
            format!("cannot run without a working handshake: {e}"),
            exp,
        ),
        (_, Ok(ClientAuth::Disabled)) => TLS_05.finding(
            Status::Skip,
            &t,
            "no client certificates are asked for (see TLS-04)",
            exp,
        ),
        (None, _) => TLS_05.finding(Status::Skip, &t, "not probed", exp),
        (Some(h), _) if h.error.is_some() => {
            TLS_05.finding(Status::Error, &t, h.error.clone().unwrap_or_default(), exp)
        }
        (Some(h), _) => match &h.rejected {
            Some(r) => TLS_05.finding(Status::Pass, &t, format!("refused: {r}"), exp),
            None => TLS_05.finding(
                Status::Fail,
                &t,
                format!(
                    "{} accepted a client certificate from an untrusted CA",
                    ep.component.name()
                ),
                exp,
            ),
        },
    });

    // TLS-06 / 07 / 08 on the served leaf
    let Some(leaf) = p.anonymous.chain.first().or(p.raw_chain.first()) else {
        let why = p
            .anonymous
            .error
            .clone()
            .or(p.anonymous.rejected.clone())
            .unwrap_or_else(|| "no certificate received".into());
        for c in [TLS_06, TLS_07, TLS_08] {
            v.push(c.finding(Status::Error, &t, why.clone(), "a served certificate"));
        }
        return v;
    };
    let info = match pki::inspect::inspect_der(leaf) {
        Ok(i) => i,
        Err(e) => {
            for c in [TLS_06, TLS_07, TLS_08] {
                v.push(c.finding(
                    Status::Fail,
                    &t,
                    format!("unparsable certificate: {e}"),
                    "X.509",
                ));
            }
            return v;
        }
    };
    let who = format!(
        "serves {} (issuer {}, serial {})",
        info.subject, info.issuer, info.serial
    );
    v.push(chain_finding(ep, leaf, &info, cas, now, &who));
    v.push(san_finding(ep, &info, &t));
    v.push(disk_finding(ep, leaf, &info, data_dir, &t));
    v
}

fn chain_finding(
    ep: &Endpoint,
    leaf: &[u8],
    info: &pki::inspect::CertInfo,
    cas: &[(CaId, Vec<u8>)],
    now: SystemTime,
    who: &str,
) -> Finding {
    let t = ep.label();
    let wanted: Vec<&(CaId, Vec<u8>)> = match ep.component.ca() {
        Some(id) => cas.iter().filter(|(c, _)| *c == id).collect(),
        None => cas.iter().collect(),
    };
    let exp = match ep.component.ca() {
        Some(id) => format!("a chain to the {} CA ({})", id.name(), id.common_name()),
        None => "a chain to one of the cluster's CAs".into(),
    };
    if wanted.is_empty() {
        return TLS_06.finding(
            Status::Skip,
            &t,
            format!("{who}; the data directory holds no such CA to verify against"),
            exp,
        );
    }
    for (id, ca) in &wanted {
        if let Ok(Ok(())) = pki::inspect::verify_signed_by(leaf, ca) {
            if !info.is_valid_at(now) {
                return TLS_06.finding(
                    Status::Fail,
                    &t,
                    format!(
                        "{who}: signed by {} but outside its validity ({} .. {})",
                        id.name(),
                        pki::time::rfc3339(info.not_before),
                        pki::time::rfc3339(info.not_after)
                    ),
                    exp,
                );
            }
            if !info.has_server_auth() {
                return TLS_06.finding(
                    Status::Fail,
                    &t,
                    format!("{who}: signed by {} but without serverAuth", id.name()),
                    exp,
                );
            }
            return TLS_06.finding(
                Status::Pass,
                &t,
                format!("{who}: verifies to {}", id.name()),
                exp,
            );
        }
    }
    let self_signed = info.subject == info.issuer
        && matches!(pki::inspect::verify_signed_by(leaf, leaf), Ok(Ok(())));
    let other = cas
        .iter()
        .find(|(_, ca)| matches!(pki::inspect::verify_signed_by(leaf, ca), Ok(Ok(()))))
        .map(|(id, _)| format!(" (signed by the {} CA instead)", id.name()))
        .unwrap_or_default();
    TLS_06.finding(
        Status::Fail,
        &t,
        format!(
            "{} {}{other}",
            ep.component.name(),
            if self_signed {
                format!("serves self-signed {}", info.subject)
            } else {
                format!("{who}, which does not verify to the expected CA")
            }
        ),
        exp,
    )
}

fn san_finding(ep: &Endpoint, info: &pki::inspect::CertInfo, t: &str) -> Finding {
    let exp = format!("{} in the SANs", ep.host);
    let ok = match ep.host.parse::<std::net::IpAddr>() {
        Ok(ip) => info.ip_addresses.contains(&ip),
        Err(_) => info.dns_names.iter().any(|d| dns_match(d, &ep.host)),
    };
    let sans = format!(
        "SANs DNS {:?} IP {:?}",
        info.dns_names,
        info.ip_addresses
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
    );
    if ok {
        TLS_07.finding(Status::Pass, t, sans, exp)
    } else {
        TLS_07.finding(
            Status::Fail,
            t,
            format!(
                "{} cert lacks {} SAN {}; {sans}",
                ep.component.name(),
                if ep.host.parse::<std::net::IpAddr>().is_ok() {
                    "IP"
                } else {
                    "DNS"
                },
                ep.host
            ),
            exp,
        )
    }
}

fn dns_match(pattern: &str, host: &str) -> bool {
    let (p, h) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    if let Some(rest) = p.strip_prefix("*.") {
        return h
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest);
    }
    p == h
}

fn disk_finding(
    ep: &Endpoint,
    leaf: &[u8],
    info: &pki::inspect::CertInfo,
    data_dir: &Path,
    t: &str,
) -> Finding {
    let exp = "the certificate on disk";
    let Some(rel) = ep.component.disk_cert() else {
        return TLS_08.finding(
            Status::Skip,
            t,
            "no certificate on disk for this component",
            exp,
        );
    };
    if !ep.local {
        return TLS_08.finding(
            Status::Skip,
            t,
            "another node: its disk is audited there",
            exp,
        );
    }
    let path = data_dir.join(rel);
    let disk = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => return TLS_08.finding(Status::Skip, t, format!("{}: {e}", path.display()), exp),
    };
    let der = match pki::inspect::pem_to_der(&disk) {
        Ok(d) => d,
        Err(e) => return TLS_08.finding(Status::Error, t, format!("{}: {e}", path.display()), exp),
    };
    if der == leaf {
        TLS_08.finding(
            Status::Pass,
            t,
            format!(
                "serves serial {}, the one in {}",
                info.serial,
                path.display()
            ),
            exp,
        )
    } else {
        let disk_serial = pki::inspect::inspect_der(&der)
            .map(|i| i.serial)
            .unwrap_or_else(|_| "?".into());
        TLS_08.finding(
            Status::Fail,
            t,
            format!(
                "serves serial {}; {} has serial {disk_serial}",
                info.serial,
                path.display()
            ),
            exp,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wildcards() {
        assert!(super::dns_match("*.example.com", "a.example.com"));
        assert!(!super::dns_match("*.example.com", "a.b.example.com"));
        assert!(super::dns_match("Node-1", "node-1"));
    }
}
