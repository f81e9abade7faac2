//! CRT-01 … CRT-09 over the certificate inventory of the data directory (the rows of
//! `meshd certs check`, re-read for the facts the audit rates), and CFG-14 over the files' modes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::catalog::*;
use super::model::{Finding, Status};

const DAY: u64 = 86_400;
/// Longest leaf lifetime within policy (CRT-09).
const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(398 * DAY);

/// The thresholds of CRT-01 for a lifetime `l`: WARN under 30 days or 20 % of the lifetime
/// (whichever is more), FAIL under 7 days. For short-lived certificates (meshd renews at about 2/3
/// of the lifetime) both are capped at a share of the lifetime — WARN under 30 %, FAIL under 10 % —
/// so a 1-hour certificate that renews on time never shows.
pub fn expiry_thresholds(l: Duration) -> (Duration, Duration) {
    let warn = Duration::from_secs(30 * DAY)
        .max(l.mul_f64(0.2))
        .min(l.mul_f64(0.3));
    let fail = Duration::from_secs(7 * DAY).min(l.mul_f64(0.1));
    (warn, fail)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 2 * DAY {
        format!("{}d", s / DAY)
    } else if s >= 7200 {
        format!("{}h", s / 3600)
    } else if s >= 120 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The CRT findings of the data directory, or an ERROR finding when it cannot be read.
pub fn certificates(data_dir: &Path, now: SystemTime) -> Vec<Finding> {
    let rows = match crate::certs::check(data_dir, now) {
        Ok(r) => r,
        Err(e) => {
            return vec![CRT_08.finding(
                Status::Error,
                data_dir.display().to_string(),
                format!("cannot read the inventory: {e:#}"),
                "a readable meshd data directory",
            )]
        }
    };
    let mut v = Vec::new();
    let mut ca_ends: Vec<(String, SystemTime)> = Vec::new();
    let mut leaves: Vec<(String, String, SystemTime)> = Vec::new();
    let mut keys: Vec<(String, String, String, String)> = Vec::new();
    for r in &rows {
        let t = format!("{} {}", r.name, r.path.display());
        let has = |p: &str| {
            r.problems
                .iter()
                .filter(|x| x.contains(p))
                .cloned()
                .collect::<Vec<_>>()
        };
        if r.status == "missing" || r.status == "error" {
            v.push(CRT_08.finding(
                if r.status == "missing" {
                    Status::Warn
                } else {
                    Status::Fail
                },
                &t,
                r.problems.join("; "),
                "certificate and key present and parsable",
            ));
            continue;
        }
        let info = match std::fs::read_to_string(&r.path)
            .map_err(|e| e.to_string())
            .and_then(|s| cert_text(&s, &r.path))
            .and_then(|s| pki::inspect::inspect_pem(&s).map_err(|e| e.to_string()))
        {
            Ok(i) => i,
            Err(e) => {
                v.push(CRT_08.finding(Status::Fail, &t, e, "a parsable certificate"));
                continue;
            }
        };
        if r.is_ca {
            ca_ends.push((r.name.clone(), info.not_after));
        } else {
            leaves.push((t.clone(), r.ca.clone(), info.not_after));
            keys.push((
                t.clone(),
                r.ca.clone(),
                info.spki_sha256.clone(),
                info.serial.clone(),
            ));
        }
        // CRT-01
        let life = info.lifetime();
        let (warn, fail) = expiry_thresholds(life);
        let exp = format!(
            "more than {} left (WARN under {}, FAIL under {})",
            human(warn),
            human(warn),
            human(fail)
        );
        v.push(match info.not_after.duration_since(now) {
            Err(_) => CRT_01.finding(
                Status::Fail,
                &t,
                format!("expired at {}", pki::time::rfc3339(info.not_after)),
                exp,
            ),
            Ok(left) if left < fail => CRT_01.finding(
                Status::Fail,
                &t,
                format!(
                    "expires in {} ({})",
                    human(left),
                    pki::time::rfc3339(info.not_after)
                ),
                exp,
            ),
            Ok(left) if left < warn => CRT_01.finding(
                Status::Warn,
                &t,
                format!(
                    "expires in {} ({})",
                    human(left),
                    pki::time::rfc3339(info.not_after)
                ),
                exp,
            ),
            Ok(left) => CRT_01.finding(
                Status::Pass,
                &t,
                format!(
                    "{} left, until {}",
                    human(left),
                    pki::time::rfc3339(info.not_after)
                ),
                exp,
            ),
        });
        // CRT-02
        v.push(if now < info.not_before {
            CRT_02.finding(
                Status::Fail,
                &t,
                format!("not valid before {}", pki::time::rfc3339(info.not_before)),
                "valid now",
            )
        } else {
            CRT_02.finding(
                Status::Pass,
                &t,
                format!("valid since {}", pki::time::rfc3339(info.not_before)),
                "valid now",
            )
        });
        // CRT-03
        let k = &info.key;
        let strong = match k.algorithm.as_str() {
            "rsa" => k.bits >= 2048,
            "ecdsa-p256" | "ecdsa-p384" | "ed25519" => true,
            _ => false,
        };
        let sha1 = info
            .signature_algorithm
            .to_ascii_lowercase()
            .contains("sha1")
            || info.signature_algorithm.starts_with("1.2.840.113549.1.1.5")
            || info.signature_algorithm.starts_with("1.2.840.10045.4.1");
        v.push(CRT_03.finding(
            if strong && !sha1 {
                Status::Pass
            } else {
                Status::Fail
            },
            &t,
            format!(
                "{} {} bits, signature {}",
                k.algorithm, k.bits, info.signature_algorithm
            ),
            "RSA >= 2048, ECDSA P-256/P-384 or Ed25519; no SHA-1 signature",
        ));
        // CRT-06
        let wrong = has("does not chain");
        v.push(CRT_06.finding(
            if wrong.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            &t,
            if wrong.is_empty() {
                format!("chains to {}", r.ca)
            } else {
                wrong.join("; ")
            },
            format!("signed by {}", r.ca),
        ));
        // CRT-04 (identity), CRT-05 (SAN scope), CRT-07 (usage): the inventory's profile for the
        // role, as `certs check` compares it.
        let drift: Vec<String> = has("differs from the settings: ")
            .iter()
            .flat_map(|p| {
                p.trim_start_matches("differs from the settings: ")
                    .split("; ")
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let part = |pre: &[&str]| -> Vec<String> {
            drift
                .iter()
                .filter(|d| pre.iter().any(|p| d.starts_with(p)))
                .cloned()
                .collect()
        };
        if !r.is_ca {
            let id = part(&["CN ", "O "]);
            v.push(CRT_04.finding(
                if id.is_empty() {
                    Status::Pass
                } else {
                    Status::Fail
                },
                &t,
                if id.is_empty() {
                    format!(
                        "CN {:?} O {:?}",
                        info.common_name.as_deref().unwrap_or(""),
                        info.organizations
                    )
                } else {
                    id.join("; ")
                },
                "the identity of its role",
            ));
            let sans = part(&["DNS SANs", "IP SANs"]);
            v.push(CRT_05.finding(
                if sans.is_empty() {
                    Status::Pass
                } else {
                    Status::Fail
                },
                &t,
                if sans.is_empty() {
                    format!(
                        "DNS {:?} IP {:?}",
                        info.dns_names,
                        info.ip_addresses
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                    )
                } else {
                    sans.join("; ")
                },
                "SANs within the node's own names and addresses",
            ));
        }
        // CRT-07
        let mut usage = part(&["usage "]);
        usage.extend(has("not a CA"));
        if !r.is_ca && info.is_ca {
            usage.push("a leaf with CA:TRUE".into());
        }
        v.push(CRT_07.finding(
            if usage.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            &t,
            if usage.is_empty() {
                format!(
                    "KU {:?} EKU {:?} CA:{}",
                    info.key_usage, info.extended_key_usage, info.is_ca
                )
            } else {
                usage.join("; ")
            },
            "the role's identity and usages",
        ));
        // CRT-08
        let mut km = has("do not match");
        km.extend(has("unreadable private key"));
        v.push(CRT_08.finding(
            if km.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            &t,
            if km.is_empty() {
                "certificate and key match".into()
            } else {
                km.join("; ")
            },
            "certificate and key match",
        ));
        if !r.is_ca {
            v.push(if life > MAX_LEAF_LIFETIME {
                CRT_09.finding(
                    Status::Fail,
                    &t,
                    format!("lifetime {}", human(life)),
                    "leaf lifetime <= 398d",
                )
            } else {
                CRT_09.finding(
                    Status::Pass,
                    &t,
                    format!("lifetime {}", human(life)),
                    "leaf lifetime <= 398d",
                )
            });
        }
    }
    // CRT-10: no key shared between certificates (of this node: each node's keys are made on it),
    // no serial used twice under one CA.
    let mut shared = Vec::new();
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            if a.2 == b.2 {
                shared.push(format!(
                    "{} and {} share a key (SPKI sha256 {})",
                    a.0, b.0, a.2
                ));
            }
            if a.1 == b.1 && a.3 == b.3 {
                shared.push(format!(
                    "{} and {} share serial {} under {}",
                    a.0, b.0, a.3, a.1
                ));
            }
        }
    }
    if !keys.is_empty() {
        v.push(CRT_10.finding(
            if shared.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            data_dir.display().to_string(),
            if shared.is_empty() {
                format!(
                    "{} leaves: distinct keys, distinct serials per CA",
                    keys.len()
                )
            } else {
                shared.join("; ")
            },
            "a key of its own per certificate; unique serials per CA",
        ));
    }
    // CRT-09: the CA outlives its leaves.
    for (name, ca_end) in &ca_ends {
        let outlived: Vec<&String> = leaves
            .iter()
            .filter(|(_, ca, end)| ca == name && end > ca_end)
            .map(|(t, _, _)| t)
            .collect();
        v.push(CRT_09.finding(
            if outlived.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            format!("{name} (CA)"),
            if outlived.is_empty() {
                format!(
                    "outlives its leaves (until {})",
                    pki::time::rfc3339(*ca_end)
                )
            } else {
                format!(
                    "leaves outlive it: {}",
                    outlived
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            "the CA outlives its leaves",
        ));
    }
    v
}

/// The certificate PEM of a file: itself, or the client certificate a kubeconfig embeds or names.
pub fn cert_text(text: &str, path: &Path) -> Result<String, String> {
    if text.contains("-----BEGIN CERTIFICATE-----") {
        return Ok(text.to_owned());
    }
    match pki::kubeconfig::client_cert_of(text, path).map_err(|e| e.to_string())? {
        pki::kubeconfig::ClientCertRef::Embedded(pem) => Ok(pem),
        pki::kubeconfig::ClientCertRef::File(p) => {
            std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
        }
    }
}

/// Whether a file holds secrets: a private key or a kubeconfig.
fn is_secret(p: &Path, data_dir: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == "public.key" {
        return false; // the WireGuard public key
    }
    if name.ends_with(".key") {
        return true;
    }
    if name.ends_with(".conf") && p.parent() == Some(data_dir) {
        return true;
    }
    if name.ends_with(".pem") {
        return std::fs::read_to_string(p)
            .map(|s| s.contains("PRIVATE KEY"))
            .unwrap_or(false);
    }
    false
}

/// CFG-14 (and the WireGuard key of NET-06): every key and kubeconfig of the data directory is a
/// regular file with mode 0600 (no group/other bits) owned by root. Symlinks are followed to their
/// target, which is checked where it lives.
pub fn file_modes(data_dir: &Path) -> Vec<Finding> {
    let mut v = Vec::new();
    let mut stack: Vec<PathBuf> = vec![data_dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            v.push(CFG_14.finding(
                Status::Error,
                d.display().to_string(),
                "unreadable directory",
                "readable",
            ));
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(ft) if ft.is_dir() => stack.push(p),
                Ok(ft) if ft.is_file() => files.push(p),
                _ => {}
            }
        }
    }
    files.sort();
    let mut bad = 0;
    let mut checked = 0;
    for p in files {
        if !is_secret(&p, data_dir) {
            continue;
        }
        checked += 1;
        let Ok(md) = std::fs::metadata(&p) else {
            continue;
        };
        let mode = md.mode() & 0o7777;
        let mut problems = Vec::new();
        if mode & 0o077 != 0 {
            problems.push(format!("mode {mode:04o}"));
        }
        if md.uid() != 0 {
            problems.push(format!("owner uid {}", md.uid()));
        }
        if !problems.is_empty() {
            bad += 1;
            v.push(CFG_14.finding(
                Status::Fail,
                p.display().to_string(),
                problems.join(", "),
                "mode 0600 (or stricter), owner root",
            ));
        }
    }
    if bad == 0 {
        v.push(CFG_14.finding(
            if checked > 0 {
                Status::Pass
            } else {
                Status::Skip
            },
            data_dir.display().to_string(),
            format!("{checked} key and kubeconfig files: all 0600 or stricter, owned by root"),
            "mode 0600 (or stricter), owner root",
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let (w, f) = expiry_thresholds(Duration::from_secs(365 * DAY));
        assert_eq!(w, Duration::from_secs(365 * DAY).mul_f64(0.2));
        assert_eq!(f, Duration::from_secs(7 * DAY));
        let (w, f) = expiry_thresholds(Duration::from_secs(90 * DAY));
        assert_eq!(w, Duration::from_secs(27 * DAY));
        assert_eq!(f, Duration::from_secs(7 * DAY));
        let (w, f) = expiry_thresholds(Duration::from_secs(3600));
        assert_eq!((w.as_secs(), f.as_secs()), (1080, 360));
    }
}
