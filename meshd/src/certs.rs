//! `meshd certs check`: one row per CA and per certificate of the inventory, in the spirit of
//! `kubeadm certs check-expiration`, with the chain and key checks kubeadm does not do.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use pki::inventory::{self, CaId, ClusterSettings, Entry};
use serde::Serialize;

use crate::material::{self, Found};
use crate::settings;

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Inventory name (`ca`, `apiserver`, `admin.conf`...).
    pub name: String,
    /// The file holding the certificate.
    pub path: PathBuf,
    /// Subject DN.
    pub subject: Option<String>,
    /// Issuer DN.
    pub issuer: Option<String>,
    /// Start of validity, RFC 3339.
    pub not_before: Option<String>,
    /// End of validity, RFC 3339.
    pub not_after: Option<String>,
    /// Seconds from now until `not_after` (negative once expired).
    pub residual_seconds: Option<i64>,
    /// When meshd will renew it, RFC 3339 (leaves only).
    pub renew_at: Option<String>,
    /// Whether this is a CA.
    pub is_ca: bool,
    /// The CA that signs it (a CA signs itself).
    pub ca: String,
    /// Serial, hex.
    pub serial: Option<String>,
    /// Key algorithm.
    pub key_algorithm: Option<String>,
    /// `ok`, or the first problem's kind (`missing`, `expired`, `not-yet-valid`, `wrong-ca`, `error`...).
    pub status: String,
    /// Every problem found, in words.
    pub problems: Vec<String>,
}

impl Row {
    /// Whether this row makes the check fail.
    pub fn failed(&self) -> bool {
        self.status != "ok"
    }
}

fn empty_row(name: &str, path: PathBuf, is_ca: bool, ca: &str) -> Row {
    Row {
        name: name.into(),
        path,
        subject: None,
        issuer: None,
        not_before: None,
        not_after: None,
        residual_seconds: None,
        renew_at: None,
        is_ca,
        ca: ca.into(),
        serial: None,
        key_algorithm: None,
        status: "ok".into(),
        problems: vec![],
    }
}

fn status_of(p: &material::Problem) -> &'static str {
    use material::Problem::*;
    match p {
        Expired => "expired",
        NotYetValid => "not-yet-valid",
        WrongCa(_) => "wrong-ca",
        KeyMismatch(_) => "key-mismatch",
        BadKey(_) => "bad-key",
        ProfileDiffers(_) => "ok",
        NotACa => "not-a-ca",
    }
}

fn fill(
    row: &mut Row,
    found: Result<Found, pki::PkiError>,
    ca_der: Option<&[u8]>,
    expected: Option<&pki::ca::LeafProfile>,
    now: SystemTime,
) -> Option<Vec<u8>> {
    let m = match found {
        Ok(Found::Present(m)) => m,
        Ok(Found::Missing { path }) => {
            row.status = "missing".into();
            row.problems
                .push(format!("{} does not exist", path.display()));
            return None;
        }
        Ok(Found::Partial { present, missing }) => {
            row.status = "missing".into();
            row.problems.push(format!(
                "{} exists but {} does not",
                present.display(),
                missing.display()
            ));
            return None;
        }
        Err(e) => {
            row.status = "error".into();
            row.problems.push(e.to_string());
            return None;
        }
    };
    row.path = m.cert_path.clone();
    let a = match material::assess(&m, ca_der, expected, now) {
        Ok(a) => a,
        Err(e) => {
            row.status = "error".into();
            row.problems.push(e.to_string());
            return None;
        }
    };
    row.subject = Some(a.info.subject.clone());
    row.issuer = Some(a.info.issuer.clone());
    row.not_before = Some(pki::time::rfc3339(a.info.not_before));
    row.not_after = Some(pki::time::rfc3339(a.info.not_after));
    row.residual_seconds = Some(pki::time::seconds_until(a.info.not_after, now));
    row.serial = Some(a.info.serial.clone());
    row.key_algorithm = Some(a.info.key.algorithm.clone());
    if !row.is_ca {
        // The same renewal point as `meshd rotate` and the daemon.
        let plan = crate::rotate::plan(a.info.not_before, a.info.not_after, &a.info.serial, now);
        row.renew_at = Some(pki::time::rfc3339(plan.renew_at));
    }
    for p in &a.problems {
        if p.is_failure() && row.status == "ok" {
            row.status = status_of(p).into();
        }
        row.problems.push(p.to_string());
    }
    // The store holds the pair, but a consumer looking for it by its usual path finds nothing.
    for p in &m.missing_links {
        if row.status == "ok" {
            row.status = "missing".into();
        }
        row.problems.push(format!(
            "{} does not exist (the versioned store holds the pair: `meshd init` restores the link)",
            p.display()
        ));
    }
    Some(a.der)
}

/// Checks a joined node: the cluster CA certificate (its key never leaves the control plane) and the
/// node's own certificates.
fn check_node(
    data_dir: &Path,
    j: &settings::JoinedNode,
    now: SystemTime,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let ca_path = data_dir.join("pki/ca.crt");
    let mut row = empty_row("ca", ca_path.clone(), true, "ca");
    let ca_der = match pki::store::read_text(&ca_path).and_then(|t| {
        pki::inspect::pem_to_der(&t).map_err(|e| pki::PkiError::bad_file(&ca_path, e.to_string()))
    }) {
        Ok(der) => match pki::inspect::inspect_der(&der) {
            Ok(info) => {
                row.subject = Some(info.subject.clone());
                row.issuer = Some(info.issuer.clone());
                row.not_before = Some(pki::time::rfc3339(info.not_before));
                row.not_after = Some(pki::time::rfc3339(info.not_after));
                row.residual_seconds = Some(pki::time::seconds_until(info.not_after, now));
                row.serial = Some(info.serial.clone());
                row.key_algorithm = Some(info.key.algorithm.clone());
                // The same checks as a control plane's CA rows, its key aside (it never leaves the
                // control plane).
                let mut problems = Vec::new();
                if !info.is_ca {
                    problems.push(material::Problem::NotACa);
                } else {
                    match pki::inspect::verify_signed_by(&der, &der) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => problems
                            .push(material::Problem::WrongCa(format!("self-signature: {e}"))),
                        Err(e) => problems
                            .push(material::Problem::WrongCa(format!("self-signature: {e}"))),
                    }
                }
                if now > info.not_after {
                    problems.push(material::Problem::Expired);
                }
                if now < info.not_before {
                    problems.push(material::Problem::NotYetValid);
                }
                for p in &problems {
                    if row.status == "ok" {
                        row.status = status_of(p).into();
                    }
                    row.problems.push(p.to_string());
                }
                Some(der)
            }
            Err(e) => {
                row.status = "error".into();
                row.problems.push(format!("{}: {e}", ca_path.display()));
                None
            }
        },
        Err(e) => {
            row.status = "error".into();
            row.problems.push(e.to_string());
            None
        }
    };
    rows.push(row);
    for e in inventory::node_entries(&j.name, &j.addresses) {
        let mut row = empty_row(e.id, data_dir.join(main_file(&e)), false, e.signer.name());
        fill(
            &mut row,
            material::read_entry(data_dir, &e),
            ca_der.as_deref(),
            Some(&e.profile),
            now,
        );
        if ca_der.is_none() {
            row.status = "wrong-ca".into();
            row.problems
                .push("cannot verify the chain: the cluster CA certificate is unusable".into());
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Checks every CA and certificate of the data directory at time `now`.
///
/// A directory that does not exist, or holds neither `meshd.json` nor any certificate of the
/// inventory, is an error ("… is not a meshd data directory"), not a report of missing rows.
pub fn check(data_dir: &Path, now: SystemTime) -> anyhow::Result<Vec<Row>> {
    if !data_dir.is_dir() {
        anyhow::bail!(
            "{} is not a meshd data directory: {}",
            data_dir.display(),
            if data_dir.exists() {
                "not a directory"
            } else {
                "it does not exist"
            }
        );
    }
    let cfg = settings::load_config(data_dir)?;
    if let Some(cfg) = &cfg {
        if let (settings::Role::Node, Some(j)) = (cfg.role, &cfg.joined) {
            return check_node(data_dir, j, now);
        }
    }
    let (rows, found_any) = check_control_plane(data_dir, now)?;
    if cfg.is_none() && !found_any {
        anyhow::bail!(
            "{} is not a meshd data directory: it holds no {} and none of the inventory's certificates              (run `meshd init` or `meshd join`, or pass the right --data-dir)",
            data_dir.display(),
            settings::SETTINGS_FILE
        );
    }
    Ok(rows)
}

/// The rows of a control plane, and whether any file of the inventory was found at all.
fn check_control_plane(data_dir: &Path, now: SystemTime) -> anyhow::Result<(Vec<Row>, bool)> {
    let mut found_any = false;
    let mut seen = |f: Result<Found, pki::PkiError>| {
        found_any |= !matches!(f, Ok(Found::Missing { .. }));
        f
    };
    let s = settings::load(data_dir)?;
    let have_settings = s.is_some();
    let s = s.unwrap_or_else(placeholder_settings);
    let mut rows = Vec::new();
    let mut ca_ders: Vec<(CaId, Option<Vec<u8>>)> = Vec::new();
    for id in CaId::ALL {
        let mut row = empty_row(
            id.name(),
            data_dir.join(id.links().cert.unwrap_or_default()),
            true,
            id.name(),
        );
        let der = fill(
            &mut row,
            seen(material::read_ca(data_dir, id)),
            None,
            None,
            now,
        );
        ca_ders.push((id, der));
        rows.push(row);
    }
    let entries: Vec<Entry> = inventory::control_plane_entries(&s)?;
    for e in &entries {
        let ca_der = ca_ders
            .iter()
            .find(|(id, _)| *id == e.signer)
            .and_then(|(_, d)| d.as_deref());
        let mut row = empty_row(e.id, data_dir.join(main_file(e)), false, e.signer.name());
        let expected = have_settings.then_some(&e.profile);
        match ca_der {
            Some(ca) => {
                fill(
                    &mut row,
                    seen(material::read_entry(data_dir, e)),
                    Some(ca),
                    expected,
                    now,
                );
            }
            None => {
                fill(
                    &mut row,
                    seen(material::read_entry(data_dir, e)),
                    None,
                    expected,
                    now,
                );
                // Without its CA the chain cannot be checked: that is a failure, not a pass.
                row.problems.retain(|p| !p.contains("not a CA"));
                row.problems.push(format!(
                    "cannot verify the chain: CA {} is unusable",
                    e.signer.name()
                ));
                row.status = "wrong-ca".into();
            }
        }
        rows.push(row);
    }
    Ok((rows, found_any))
}

fn main_file(e: &Entry) -> PathBuf {
    match &e.output {
        inventory::Output::Pair(l) => l.cert.clone().or(l.combined.clone()).unwrap_or_default(),
        inventory::Output::Kubeconfig { file, .. } => file.clone(),
    }
}

fn placeholder_settings() -> ClusterSettings {
    ClusterSettings {
        cluster_name: "kubernetes".into(),
        node_name: "node".into(),
        advertise_address: std::net::IpAddr::from([127, 0, 0, 1]),
        apiserver_port: 6443,
        service_cidr: ipnet::IpNet::from(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_default(),
        ),
        cluster_cidr: ipnet::IpNet::from(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16).unwrap_or_default(),
        ),
        cluster_domain: "cluster.local".into(),
        apiserver_cert_sans: vec![],
        etcd_peer_addresses: vec![],
        api_port: 7443,
        key_algorithm: pki::keys::KeyAlgorithm::EcdsaP256,
        leaf_lifetime_secs: inventory::DEFAULT_LEAF_LIFETIME.as_secs(),
        ca_lifetime_secs: pki::ca::DEFAULT_CA_LIFETIME.as_secs(),
    }
}

/// Renders the rows as two tables (certificates, then CAs), like kubeadm.
pub fn render_table(rows: &[Row], data_dir: &Path) -> String {
    let rel = |p: &Path| p.strip_prefix(data_dir).unwrap_or(p).display().to_string();
    let expires = |r: &Row| {
        r.not_after
            .as_deref()
            .map(|s| s.replace('T', " ").replace('Z', " UTC"))
            .unwrap_or_else(|| "-".into())
    };
    let residual = |r: &Row| {
        r.residual_seconds
            .map(|s| {
                if s < 0 {
                    "expired".to_string()
                } else {
                    pki::time::human_duration(s)
                }
            })
            .unwrap_or_else(|| "-".into())
    };
    let status = |r: &Row| {
        if r.problems.is_empty() || !r.failed() {
            r.status.clone()
        } else {
            format!("{}: {}", r.status, r.problems.join("; "))
        }
    };
    let mut out = String::new();
    let leaves: Vec<Vec<String>> = rows
        .iter()
        .filter(|r| !r.is_ca)
        .map(|r| {
            vec![
                r.name.clone(),
                rel(&r.path),
                expires(r),
                residual(r),
                r.ca.clone(),
                status(r),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "CERTIFICATE",
            "FILE",
            "EXPIRES",
            "RESIDUAL TIME",
            "CERTIFICATE AUTHORITY",
            "STATUS",
        ],
        &leaves,
    );
    out.push('\n');
    let cas: Vec<Vec<String>> = rows
        .iter()
        .filter(|r| r.is_ca)
        .map(|r| {
            vec![
                r.name.clone(),
                rel(&r.path),
                expires(r),
                residual(r),
                status(r),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "CERTIFICATE AUTHORITY",
            "FILE",
            "EXPIRES",
            "RESIDUAL TIME",
            "STATUS",
        ],
        &cas,
    );
    out
}

fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let n = head.len();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n - 1) {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 < n {
                s.push_str(&format!("{c:<width$}   ", width = w[i]));
            } else {
                s.push_str(c);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(head.to_vec()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A joined node's data directory holding `ca_pem` as its cluster CA.
    fn node_dir(ca_pem: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg: settings::MeshdConfig = serde_json::from_value(serde_json::json!({
            "version": settings::FORMAT_VERSION,
            "role": "node",
            "joined": {
                "name": "n1",
                "server": "127.0.0.1:7443",
                "addresses": ["127.0.0.2"],
                "endpoint": "127.0.0.2:51820",
                "subnet": "10.244.5.0/24",
                "network": {
                    "Network": "10.244.0.0/16",
                    "SubnetLen": 24,
                    "SubnetMin": "10.244.1.0",
                    "SubnetMax": "10.244.255.0",
                    "Backend": {"Type": "wireguard"}
                },
                "apiserver_url": "https://127.0.0.1:6443",
                "cluster_name": "kubernetes"
            }
        }))
        .expect("meshd.json");
        settings::save_config(d.path(), &cfg).expect("save");
        pki::store::write_atomic(
            &d.path().join("pki/ca.crt"),
            ca_pem.as_bytes(),
            pki::store::CERT_MODE,
        )
        .expect("ca.crt");
        d
    }

    fn ca(now: SystemTime) -> pki::ca::CertificateAuthority {
        pki::ca::CertificateAuthority::create(
            "kubernetes",
            pki::keys::KeyAlgorithm::EcdsaP256,
            pki::ca::DEFAULT_CA_LIFETIME,
            now,
        )
        .expect("CA")
    }

    fn ca_row(d: &Path) -> Row {
        let rows = check(d, SystemTime::now()).expect("check");
        rows.into_iter().find(|r| r.name == "ca").expect("a CA row")
    }

    #[test]
    fn a_worker_ca_row_flags_not_yet_valid_and_a_bad_self_signature() {
        let now = SystemTime::now();
        let good = node_dir(ca(now).cert_pem());
        let r = ca_row(good.path());
        assert_eq!((r.status.as_str(), r.problems.len()), ("ok", 0), "{r:?}");

        let future = node_dir(ca(now + Duration::from_secs(86400)).cert_pem());
        let r = ca_row(future.path());
        assert_eq!(r.status, "not-yet-valid", "{r:?}");
        assert!(r.failed());

        // Same certificate, one bit of its signature flipped: still parses, no longer self-signed.
        let c = ca(now);
        let mut der = c.cert_der().to_vec();
        if let Some(last) = der.last_mut() {
            *last ^= 1;
        }
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der));
        let bad = node_dir(&pem);
        let r = ca_row(bad.path());
        assert_eq!(r.status, "wrong-ca", "{r:?}");
        assert!(
            r.problems.iter().any(|p| p.contains("self-signature")),
            "{r:?}"
        );
    }

    #[test]
    fn a_directory_without_settings_or_certificates_is_not_a_data_directory() {
        let d = tempfile::tempdir().expect("tempdir");
        for dir in [d.path().to_path_buf(), d.path().join("missing")] {
            let e = check(&dir, SystemTime::now()).expect_err("not a data directory");
            assert!(
                e.to_string().contains("is not a meshd data directory"),
                "{e}"
            );
        }
        // One certificate is enough to get the report of what is missing.
        pki::store::write_atomic(
            &d.path().join("pki/ca.crt"),
            ca(SystemTime::now()).cert_pem().as_bytes(),
            pki::store::CERT_MODE,
        )
        .expect("ca.crt");
        let rows = check(d.path(), SystemTime::now()).expect("rows");
        assert!(rows.iter().any(|r| r.status == "missing"));
    }
}
