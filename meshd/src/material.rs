//! What the data directory holds for each CA and inventory entry, and how it measures up: the shared
//! ground of `meshd init` (which completes it) and `meshd certs check` (which reports on it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use pki::ca::{LeafProfile, Usage};
use pki::inspect::{self, CertInfo};
use pki::inventory::{CaId, Entry, Output};
use pki::keys::{PrivateKey, SecretPem};
use pki::kubeconfig::{self, ClientCertRef};
use pki::store::{self, PairLinks, PairStore, PublicPath};
use pki::PkiError;

/// A certificate with its key, as found on disk.
#[derive(Debug)]
pub struct Material {
    /// Where the certificate was read from.
    pub cert_path: PathBuf,
    /// Where the key was read from.
    pub key_path: PathBuf,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Key PEM.
    pub key_pem: SecretPem,
    /// Whether it was read from the versioned store (`pki/.store/<id>/current`), whose links meshd
    /// maintains. `false` for plain files (a kubeadm directory) and embedded kubeconfig credentials:
    /// those are read in place and never replaced by links.
    pub managed: bool,
    /// Public paths of a managed pair that do not exist (an interrupted run, a link removed by hand):
    /// the store holds the pair, `meshd init` restores the links.
    pub missing_links: Vec<PathBuf>,
}

/// What was found for one item.
#[derive(Debug)]
pub enum Found {
    /// Nothing: neither certificate nor key.
    Missing {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// One half without the other (an interrupted write, or a file removed by hand).
    Partial {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// Both halves.
    Present(Material),
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok() && p.exists()
}

/// Reads a pair exposed at `links` (cert + key files, or one combined file).
///
/// The pair is read from the versioned store (both halves from one version, [`Material::managed`])
/// when the store has a current version for `id` and every public path is either missing or a
/// symlink into `pki/.store/<id>/`: a crash between two link renames, or a link removed by hand,
/// then still finds the pair, and `meshd init` restores the missing links. Anything else at a public
/// path (plain files of a kubeadm directory, a symlink elsewhere) is read in place.
pub fn read_pair(data_dir: &Path, id: &str, links: &PairLinks) -> Result<Found, PkiError> {
    let (Some(cert_rel), Some(key_rel)) = (&links.cert, &links.key) else {
        return read_combined(data_dir, id, links);
    };
    let cert_path = data_dir.join(cert_rel);
    let key_path = data_dir.join(key_rel);
    if let Some(m) = read_managed(data_dir, id, links, &cert_path, &key_path)? {
        return Ok(Found::Present(m));
    }
    match (exists(&cert_path), exists(&key_path)) {
        (false, false) => Ok(Found::Missing { path: cert_path }),
        (true, false) => Ok(Found::Partial {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Ok(Found::Partial {
            present: key_path,
            missing: cert_path,
        }),
        (true, true) => {
            let key_pem = store::read_key_file(&key_path)?;
            let cert_pem = store::read_text(&cert_path)?;
            Ok(Found::Present(Material {
                cert_path,
                key_path,
                cert_pem,
                key_pem,
                managed: false,
                missing_links: Vec::new(),
            }))
        }
    }
}

/// The current version of `id` from the store, when the store has one and every public path of
/// `links` is missing or a symlink into the entry's store directory; `None` otherwise.
fn read_managed(
    data_dir: &Path,
    id: &str,
    links: &PairLinks,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Option<Material>, PkiError> {
    let store = PairStore::new(data_dir);
    let Some(v) = store.current_version(id)? else {
        return Ok(None);
    };
    let mut missing_links = Vec::new();
    for (rel, state) in store.link_states(id, links)? {
        match state {
            PublicPath::Missing => missing_links.push(data_dir.join(rel)),
            PublicPath::Linked | PublicPath::IntoEntry(_) => {}
            PublicPath::File | PublicPath::Foreign(_) | PublicPath::Directory => return Ok(None),
        }
    }
    // Name the file the operator knows (`pki/ca.key`), not the version it points at:
    // `chmod 600 pki/ca.key` follows the link. (When that link is missing, the store's file.)
    let key_known = exists(key_path);
    let p = store.read_version(id, v).map_err(|e| match e {
        PkiError::InsecureKeyMode { mode, .. } if key_known => PkiError::InsecureKeyMode {
            path: key_path.to_path_buf(),
            mode,
        },
        PkiError::KeyOwner {
            owner, expected, ..
        } if key_known => PkiError::KeyOwner {
            path: key_path.to_path_buf(),
            owner,
            expected,
        },
        other => other,
    })?;
    Ok(Some(Material {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        cert_pem: p.cert_pem,
        key_pem: p.key_pem,
        managed: true,
        missing_links,
    }))
}

fn read_combined(data_dir: &Path, id: &str, links: &PairLinks) -> Result<Found, PkiError> {
    let Some(rel) = &links.combined else {
        return Err(PkiError::Invalid {
            what: "inventory entry",
            reason: "no file to read".into(),
        });
    };
    let path = data_dir.join(rel);
    if let Some(m) = read_managed(data_dir, id, links, &path, &path)? {
        return Ok(Found::Present(m));
    }
    if !exists(&path) {
        return Ok(Found::Missing { path });
    }
    let text = store::read_key_file(&path)?;
    let cert_pem = cert_block(text.expose(), &path)?;
    Ok(Found::Present(Material {
        cert_path: path.clone(),
        key_path: path,
        cert_pem,
        key_pem: text,
        managed: false,
        missing_links: Vec::new(),
    }))
}

fn cert_block(text: &str, path: &Path) -> Result<String, PkiError> {
    let der = inspect::pem_to_der(text).map_err(|e| PkiError::bad_file(path, e.to_string()))?;
    Ok(pem::encode(&pem::Pem::new("CERTIFICATE", der)))
}

/// Reads what the data directory holds for `entry`.
pub fn read_entry(data_dir: &Path, entry: &Entry) -> Result<Found, PkiError> {
    match &entry.output {
        Output::Pair(links) => read_pair(data_dir, entry.id, links),
        Output::Kubeconfig {
            file,
            embed: false,
            links,
        } => {
            let kc = data_dir.join(file);
            match read_pair(data_dir, entry.id, links)? {
                Found::Present(m) => Ok(Found::Present(m)),
                Found::Missing { .. } if exists(&kc) => {
                    // A kubeconfig written by another tool may embed its credential.
                    read_kubeconfig(&kc)
                }
                other => Ok(other),
            }
        }
        Output::Kubeconfig {
            file, embed: true, ..
        } => {
            let kc = data_dir.join(file);
            if !exists(&kc) {
                return Ok(Found::Missing { path: kc });
            }
            read_kubeconfig(&kc)
        }
    }
}

fn read_kubeconfig(kc: &Path) -> Result<Found, PkiError> {
    let text = store::read_key_file(kc)?;
    match kubeconfig::client_cert_of(text.expose(), kc)? {
        ClientCertRef::Embedded(cert_pem) => {
            let key_pem = kubeconfig::client_key_data_of(text.expose(), kc)?.ok_or_else(|| {
                PkiError::bad_file(kc, "embeds a client certificate but no client-key-data")
            })?;
            Ok(Found::Present(Material {
                cert_path: kc.to_path_buf(),
                key_path: kc.to_path_buf(),
                cert_pem,
                key_pem,
                managed: false,
                missing_links: Vec::new(),
            }))
        }
        ClientCertRef::File(p) => {
            if !exists(&p) {
                return Ok(Found::Partial {
                    present: kc.to_path_buf(),
                    missing: p,
                });
            }
            let t = store::read_key_file(&p)?;
            let cert_pem = cert_block(t.expose(), &p)?;
            Ok(Found::Present(Material {
                cert_path: p.clone(),
                key_path: p,
                cert_pem,
                key_pem: t,
                managed: false,
                missing_links: Vec::new(),
            }))
        }
    }
}

/// Reads a CA's certificate and key.
pub fn read_ca(data_dir: &Path, ca: CaId) -> Result<Found, PkiError> {
    read_pair(data_dir, ca.name(), &ca.links())
}

/// Something wrong with a certificate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum Problem {
    /// Past NotAfter.
    Expired,
    /// Before NotBefore.
    NotYetValid,
    /// Not signed by the CA it must chain to.
    WrongCa(String),
    /// The key (at the given path) does not belong to the certificate.
    KeyMismatch(String),
    /// The key cannot be parsed.
    BadKey(String),
    /// Identity, SANs or usage differ from what the settings call for.
    ProfileDiffers(String),
    /// A CA certificate that is not a CA.
    NotACa,
}

impl Problem {
    /// Whether it makes `certs check` fail (everything but a profile drift, which `init` fixes).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Problem::ProfileDiffers(_))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Expired => f.write_str("expired"),
            Problem::NotYetValid => f.write_str("not yet valid"),
            Problem::WrongCa(s) => write!(f, "does not chain to its CA: {s}"),
            Problem::KeyMismatch(k) => write!(f, "certificate and key do not match (key: {k})"),
            Problem::BadKey(s) => write!(f, "unreadable private key: {s}"),
            Problem::ProfileDiffers(s) => write!(f, "differs from the settings: {s}"),
            Problem::NotACa => f.write_str("not a CA certificate"),
        }
    }
}

/// A parsed certificate and its problems.
#[derive(Debug)]
pub struct Assessment {
    /// What the certificate says.
    pub info: CertInfo,
    /// DER of the certificate.
    pub der: Vec<u8>,
    /// What is wrong with it (empty when all is well).
    pub problems: Vec<Problem>,
}

/// Parses `m` (errors name the file) and lists its problems against its CA and expected profile.
pub fn assess(
    m: &Material,
    ca_der: Option<&[u8]>,
    expected: Option<&LeafProfile>,
    now: SystemTime,
) -> Result<Assessment, PkiError> {
    let der = inspect::pem_to_der(&m.cert_pem)
        .map_err(|e| PkiError::bad_file(&m.cert_path, e.to_string()))?;
    let info =
        inspect::inspect_der(&der).map_err(|e| PkiError::bad_file(&m.cert_path, e.to_string()))?;
    let mut problems = Vec::new();
    if now > info.not_after {
        problems.push(Problem::Expired);
    }
    if now < info.not_before {
        problems.push(Problem::NotYetValid);
    }
    match PrivateKey::from_pem_bundle(m.key_pem.expose()) {
        Ok(k) => {
            if !inspect::key_matches(&der, &k)? {
                problems.push(Problem::KeyMismatch(m.key_path.display().to_string()));
            }
        }
        Err(e) => problems.push(Problem::BadKey(format!("{}: {e}", m.key_path.display()))),
    }
    match ca_der {
        Some(ca) => {
            if let Err(e) = inspect::verify_signed_by(&der, ca)? {
                problems.push(Problem::WrongCa(e.to_string()));
            }
        }
        None => {
            if !info.is_ca {
                problems.push(Problem::NotACa);
            } else if let Err(e) = inspect::verify_signed_by(&der, &der)? {
                problems.push(Problem::WrongCa(format!("self-signature: {e}")));
            }
        }
    }
    if let Some(p) = expected {
        if let Some(d) = profile_diff(&info, p) {
            problems.push(Problem::ProfileDiffers(d));
        }
    }
    Ok(Assessment {
        info,
        der,
        problems,
    })
}

/// How a certificate differs from a profile, if it does.
pub fn profile_diff(info: &CertInfo, p: &LeafProfile) -> Option<String> {
    let mut d = Vec::new();
    if info.common_name.as_deref() != Some(p.common_name.as_str()) {
        d.push(format!(
            "CN {:?}, want {:?}",
            info.common_name.as_deref().unwrap_or(""),
            p.common_name
        ));
    }
    let set = |v: &[String]| {
        v.iter()
            .map(|s| s.to_ascii_lowercase())
            .collect::<BTreeSet<_>>()
    };
    if set(&info.organizations) != set(&p.organizations) {
        d.push(format!(
            "O {:?}, want {:?}",
            info.organizations, p.organizations
        ));
    }
    if set(&info.dns_names) != set(&p.dns_names) {
        d.push(format!(
            "DNS SANs {:?}, want {:?}",
            info.dns_names, p.dns_names
        ));
    }
    let ips = |v: &[std::net::IpAddr]| v.iter().copied().collect::<BTreeSet<_>>();
    if ips(&info.ip_addresses) != ips(&p.ip_addresses) {
        d.push(format!(
            "IP SANs {:?}, want {:?}",
            info.ip_addresses, p.ip_addresses
        ));
    }
    let (server, client) = match p.usage {
        Usage::Server => (true, false),
        Usage::Client => (false, true),
        Usage::ServerAndClient => (true, true),
    };
    if info.has_server_auth() != server || info.has_client_auth() != client || info.is_ca {
        d.push(format!(
            "usage {:?}{}, want {:?}",
            info.extended_key_usage,
            if info.is_ca { " CA:TRUE" } else { "" },
            p.usage
        ));
    }
    if d.is_empty() {
        None
    } else {
        Some(d.join("; "))
    }
}
