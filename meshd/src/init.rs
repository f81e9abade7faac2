//! `meshd init`: create, or complete, the control-plane inventory in kubeadm's layout.
//!
//! Idempotent: every CA and every valid certificate that fits the settings is kept; only what is
//! missing, expired or no longer fits (e.g. a new API server SAN) is issued. A CA is never replaced:
//! a CA certificate without its key (or the reverse), a corrupt CA, or an insecure CA key stops init
//! with the file named. Leftovers of an interrupted run are cleaned up and the directory completed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use pki::ca::CertificateAuthority;
use pki::inventory::{self, CaId, CaSet, ClusterSettings, Entry, Output};
use pki::keys::{PrivateKey, SecretPem};
use pki::kubeconfig::{self, ClientCredential, KubeconfigSpec, PemSource};
use pki::store::{self, PairStore};
use serde::Serialize;

use crate::material::{self, Found, Problem};
use crate::settings;

/// What init did with one item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "reason", rename_all = "kebab-case")]
pub enum Action {
    /// Newly created.
    Created,
    /// Present and valid: left alone.
    Kept,
    /// Present but replaced, for the reason given.
    Reissued(String),
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct ReportItem {
    /// Inventory name (`ca`, `apiserver`, `admin.conf`, `sa`...).
    pub name: String,
    /// The main file.
    pub path: PathBuf,
    /// What happened.
    #[serde(flatten)]
    pub action: Action,
}

/// What `meshd init` did.
#[derive(Clone, Debug, Serialize)]
pub struct InitReport {
    /// The data directory (absolute).
    pub data_dir: PathBuf,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo: the pin `meshd join --ca-hash` takes.
    pub ca_hash: String,
    /// Temporary files of an interrupted run that were removed.
    pub cleaned_up: usize,
    /// Per item.
    pub items: Vec<ReportItem>,
}

/// Holds the data directory's lock file for the lifetime of the value.
pub struct DataDirLock {
    _file: File,
}

/// Takes the exclusive lock of a data directory (waits for another meshd holding it).
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let p = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("{}: cannot open lock file", p.display()))?;
    file.lock()
        .with_context(|| format!("{}: cannot lock", p.display()))?;
    Ok(DataDirLock { _file: file })
}

/// Runs init for `settings` in `data_dir` at time `now`.
pub fn init(
    data_dir: &Path,
    s: &ClusterSettings,
    store_cfg: &settings::StoreConfig,
    now: SystemTime,
) -> anyhow::Result<InitReport> {
    if let Err(errs) = s.validate() {
        bail!("invalid settings:\n  - {}", errs.join("\n  - "));
    }
    store::ensure_dir(data_dir)?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let mut cleaned_up = 0;
    for d in ["", "pki", "pki/etcd", "pki/meshd", "kubelet/pki"] {
        cleaned_up += store::cleanup_tmp_files(&data_dir.join(d))?;
    }
    // Staged versions and half-made links inside the store, also of entries that are kept.
    cleaned_up += PairStore::new(&data_dir).cleanup_all_tmp()?;
    // Refuse a corrupt settings file rather than overwrite it, and never turn a joined node into a
    // control plane.
    if let Some(prev) = settings::load_config(&data_dir)? {
        if prev.role == settings::Role::Node {
            bail!(
                "{} belongs to a node joined to {}; `meshd init` is for a new control plane (use another --data-dir)",
                data_dir.display(),
                prev.joined.map(|j| j.server).unwrap_or_default()
            );
        }
    }
    if store_cfg.kind == settings::StoreKind::Etcd && store_cfg.etcd_endpoints.is_empty() {
        bail!("--store etcd needs --etcd-endpoints https://HOST:PORT[,...]");
    }
    settings::save_config(
        &data_dir,
        &settings::MeshdConfig {
            version: settings::FORMAT_VERSION,
            role: settings::Role::ControlPlane,
            cluster: Some(s.clone()),
            store: store_cfg.clone(),
            joined: None,
        },
    )?;

    let mut items = Vec::new();
    let store = PairStore::new(&data_dir);
    let alg = s.key_algorithm;
    let ca_life = Duration::from_secs(s.ca_lifetime_secs);
    let mut created_cas = Vec::new();
    let mut cas = Vec::new();
    for id in CaId::ALL {
        let (ca, action) = load_or_create_ca(&data_dir, &store, id, alg, ca_life, now)?;
        if action == Action::Created {
            created_cas.push(id);
        }
        items.push(ReportItem {
            name: id.name().into(),
            path: data_dir.join(id.links().cert.unwrap_or_default()),
            action,
        });
        cas.push(ca);
    }
    let mut it = cas.into_iter();
    let (Some(cluster), Some(etcd), Some(front_proxy)) = (it.next(), it.next(), it.next()) else {
        bail!("internal error: CA set incomplete");
    };
    let cas = CaSet {
        cluster,
        etcd,
        front_proxy,
    };

    for entry in inventory::control_plane_entries(s)? {
        let action = ensure_entry(&data_dir, &store, &entry, &cas, s, &created_cas, now)?;
        items.push(ReportItem {
            name: entry.id.into(),
            path: data_dir.join(main_file(&entry)),
            action,
        });
    }
    items.push(ensure_sa(&data_dir, alg)?);
    let (_, created) = crate::wgkey::ensure(&data_dir)?;
    items.push(ReportItem {
        name: "wireguard".into(),
        path: crate::wgkey::private_path(&data_dir),
        action: if created {
            Action::Created
        } else {
            Action::Kept
        },
    });

    Ok(InitReport {
        ca_hash: format!("sha256:{}", cas.cluster.spki_sha256()),
        data_dir,
        cleaned_up,
        items,
    })
}

fn main_file(e: &Entry) -> PathBuf {
    match &e.output {
        Output::Pair(l) => l.cert.clone().or(l.combined.clone()).unwrap_or_default(),
        Output::Kubeconfig { file, .. } => file.clone(),
    }
}

fn load_or_create_ca(
    data_dir: &Path,
    store: &PairStore,
    id: CaId,
    alg: pki::keys::KeyAlgorithm,
    lifetime: Duration,
    now: SystemTime,
) -> anyhow::Result<(CertificateAuthority, Action)> {
    match material::read_ca(data_dir, id)? {
        Found::Missing { .. } => {
            let ca = CertificateAuthority::create(id.common_name(), alg, lifetime, now)?;
            store.write_pair(id.name(), ca.cert_pem(), &ca.key().to_pem(), &id.links())?;
            Ok((ca, Action::Created))
        }
        Found::Partial { present, missing } => bail!(
            "{} exists but {} is missing. meshd never replaces a CA silently: restore the missing file, \
             or remove {} deliberately to create a new {} CA (every certificate it signed must then be reissued)",
            present.display(),
            missing.display(),
            present.display(),
            id.name()
        ),
        Found::Present(m) => {
            let a = material::assess(&m, None, None, now)?;
            if let Some(p) = a.problems.first() {
                match p {
                    Problem::Expired => bail!(
                        "{}: the {} CA expired on {}; meshd does not replace a CA silently (CA rotation is an explicit operation)",
                        m.cert_path.display(),
                        id.name(),
                        pki::time::rfc3339(a.info.not_after)
                    ),
                    Problem::NotYetValid => bail!(
                        "{}: the {} CA is not valid before {}: is this machine's clock right?",
                        m.cert_path.display(),
                        id.name(),
                        pki::time::rfc3339(a.info.not_before)
                    ),
                    other => bail!("{}: {other}", m.cert_path.display()),
                }
            }
            let key = PrivateKey::from_pem_bundle(m.key_pem.expose())
                .with_context(|| m.key_path.display().to_string())?;
            let ca = CertificateAuthority::from_parts(m.cert_pem.clone(), key)
                .with_context(|| m.cert_path.display().to_string())?;
            // A CA found as plain files (e.g. from kubeadm) is left where it is: meshd reads it in place.
            Ok((ca, Action::Kept))
        }
    }
}

fn ensure_entry(
    data_dir: &Path,
    store: &PairStore,
    entry: &Entry,
    cas: &CaSet,
    s: &ClusterSettings,
    created_cas: &[CaId],
    now: SystemTime,
) -> anyhow::Result<Action> {
    let ca = cas.get(entry.signer);
    let reason = match material::read_entry(data_dir, entry)? {
        Found::Missing { .. } => None,
        Found::Partial { present, missing } => Some(format!(
            "{} had no {}",
            present.display(),
            missing.display()
        )),
        Found::Present(m) => {
            let a = material::assess(&m, Some(ca.cert_der()), Some(&entry.profile), now)?;
            let mut reason = None;
            if let Some(p) = a.problems.first() {
                match p {
                    Problem::Expired | Problem::NotYetValid | Problem::ProfileDiffers(_) => {
                        reason = Some(p.to_string());
                    }
                    Problem::WrongCa(_) if created_cas.contains(&entry.signer) => {
                        reason = Some(format!("its CA {} was newly created", entry.signer.name()));
                    }
                    other => bail!(
                        "{}: {other}. init does not overwrite it: remove it (and its key) to have it reissued",
                        m.cert_path.display()
                    ),
                }
            }
            match reason {
                None => {
                    ensure_kubeconfig_file(data_dir, entry, s)?;
                    store.ensure_links(entry.id, &links_of(entry))?;
                    return Ok(Action::Kept);
                }
                r => r,
            }
        }
    };
    let issued = inventory::issue_entry(entry, cas, s.key_algorithm, s.leaf_validity(), now)?;
    let key_pem = issued.key.to_pem();
    match &entry.output {
        Output::Pair(links) => {
            store.write_pair(entry.id, &issued.cert.pem, &key_pem, links)?;
        }
        Output::Kubeconfig {
            file, embed: true, ..
        } => {
            let ca_pem = cas.cluster.cert_pem();
            let text = kubeconfig::render(&KubeconfigSpec {
                cluster_name: &s.cluster_name,
                server: &s.apiserver_url(),
                ca: PemSource::Embedded(ca_pem),
                user: &entry.profile.common_name,
                credential: ClientCredential::Embedded {
                    cert_pem: &issued.cert.pem,
                    key_pem: &key_pem,
                },
            });
            store::write_atomic(
                &data_dir.join(file),
                text.expose().as_bytes(),
                store::KEY_MODE,
            )?;
        }
        Output::Kubeconfig {
            embed: false,
            links,
            ..
        } => {
            store.write_pair(entry.id, &issued.cert.pem, &key_pem, links)?;
            ensure_kubeconfig_file(data_dir, entry, s)?;
        }
    }
    Ok(match reason {
        None => Action::Created,
        Some(r) => Action::Reissued(r),
    })
}

fn links_of(entry: &Entry) -> pki::store::PairLinks {
    match &entry.output {
        Output::Pair(l) => l.clone(),
        Output::Kubeconfig { links, .. } => links.clone(),
    }
}

/// Writes a component kubeconfig that references its credential by path (only when its content
/// changes, so a re-run rewrites nothing).
fn ensure_kubeconfig_file(
    data_dir: &Path,
    entry: &Entry,
    s: &ClusterSettings,
) -> anyhow::Result<()> {
    let Output::Kubeconfig {
        file,
        embed: false,
        links,
    } = &entry.output
    else {
        return Ok(());
    };
    let Some(combined) = &links.combined else {
        return Ok(());
    };
    let cred = data_dir.join(combined);
    let ca = data_dir.join(CaId::Cluster.links().cert.unwrap_or_default());
    let text: SecretPem = kubeconfig::render(&KubeconfigSpec {
        cluster_name: &s.cluster_name,
        server: &s.apiserver_url(),
        ca: PemSource::File(&ca),
        user: &entry.profile.common_name,
        credential: ClientCredential::Files {
            cert: &cred,
            key: &cred,
        },
    });
    let path = data_dir.join(file);
    if std::fs::read(&path).ok().as_deref() == Some(text.expose().as_bytes()) {
        return Ok(());
    }
    store::write_atomic(&path, text.expose().as_bytes(), store::KEY_MODE)?;
    Ok(())
}

fn ensure_sa(data_dir: &Path, alg: pki::keys::KeyAlgorithm) -> anyhow::Result<ReportItem> {
    let key_path = data_dir.join("pki/sa.key");
    let pub_path = data_dir.join("pki/sa.pub");
    let item = |action| ReportItem {
        name: "sa".into(),
        path: key_path.clone(),
        action,
    };
    if key_path.exists() {
        let pem = store::read_key_file(&key_path)?;
        let key = PrivateKey::from_pem_bundle(pem.expose())
            .with_context(|| key_path.display().to_string())?;
        let want = key.public_key_pem();
        let have = std::fs::read_to_string(&pub_path).ok();
        if have.as_deref() == Some(want.as_str()) {
            return Ok(item(Action::Kept));
        }
        if let Some(have) = have {
            if !have.trim().is_empty() {
                bail!(
                    "{} does not hold the public half of {}: restore the matching pair (service-account tokens depend on it)",
                    pub_path.display(),
                    key_path.display()
                );
            }
        }
        store::write_atomic(&pub_path, want.as_bytes(), store::CERT_MODE)?;
        return Ok(item(Action::Reissued(
            "sa.pub was missing; derived from sa.key".into(),
        )));
    }
    if pub_path.exists() {
        bail!(
            "{} exists but {} is missing: a new key would invalidate every service-account token; restore sa.key, or remove sa.pub deliberately",
            pub_path.display(),
            key_path.display()
        );
    }
    let key = PrivateKey::generate(alg)?;
    // Key first: a crash between the two writes leaves sa.key alone, from which the next run
    // derives sa.pub.
    store::write_atomic(&key_path, key.to_pem().expose().as_bytes(), store::KEY_MODE)?;
    store::write_atomic(&pub_path, key.public_key_pem().as_bytes(), store::CERT_MODE)?;
    Ok(item(Action::Created))
}
