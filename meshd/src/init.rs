//! `meshd init`: create, or complete, the control-plane inventory in kubeadm's layout.
//!
//! Idempotent: every CA and every valid certificate that fits the settings is kept; only what is
//! missing, expired or no longer fits (e.g. a new API server SAN) is issued. A CA is never replaced:
//! a CA certificate without its key (or the reverse), a corrupt CA, or an insecure CA key stops init
//! with the file named. Leftovers of an interrupted run are cleaned up and the directory completed:
//! links of the versioned store that an interrupted run (or a hand) removed are restored.
//!
//! Pairs found as plain files (a kubeadm directory) are read in place: init never turns them into
//! links unless it reissues them. A corrupt or mismatched leaf is left alone; init completes every
//! other item, then fails listing every file it refused to touch.
//!
//! `meshd.json` is written last, only when init succeeded; the store, its etcd endpoints, the node
//! name and the cluster CIDR of an initialized directory are never changed by a re-run.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use pki::ca::CertificateAuthority;
use pki::inventory::{self, CaId, CaSet, ClusterSettings, Entry, Output};
use pki::keys::{PrivateKey, SecretPem};
use pki::kubeconfig::{self, ClientCredential, KubeconfigSpec, PemSource};
use pki::store::{self, PairLinks, PairStore};
use serde::Serialize;

use crate::material::{self, Found, Material, Problem};
use crate::settings::{self, StoreConfig, StoreKind};

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
    /// Present, valid and kept (the same credential), but what exposes it was brought up to date,
    /// for the reason given: a missing link restored, a kubeconfig re-rendered for new settings.
    Updated(String),
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

/// The store options of `meshd init`. `None` keeps what `meshd.json` records (on a first init: the
/// embedded store).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// `--store`.
    pub kind: Option<StoreKind>,
    /// `--etcd-endpoints`.
    pub etcd_endpoints: Option<Vec<String>>,
}

/// Runs init for `settings` in `data_dir` at time `now`.
///
/// Fails, changing nothing, when `s` would change the store, the etcd endpoints, the node name or the
/// cluster CIDR recorded in `meshd.json`. Fails after completing every other item when some files
/// are unusable (corrupt, mismatched), listing each with its reason. Writes `meshd.json` only on
/// success.
pub fn init(
    data_dir: &Path,
    s: &ClusterSettings,
    store_opts: &StoreOptions,
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
    // Refuse a corrupt settings file rather than overwrite it, never turn a joined node into a
    // control plane, and never change what the rest of the cluster depends on.
    let prev = settings::load_config(&data_dir)?;
    if let Some(prev) = &prev {
        if prev.role == settings::Role::Node {
            bail!(
                "{} belongs to a node joined to {}; `meshd init` is for a new control plane (use another --data-dir)",
                data_dir.display(),
                prev.joined.as_ref().map(|j| j.server.as_str()).unwrap_or_default()
            );
        }
    }
    let store_cfg = resolve_store(&data_dir, prev.as_ref(), s, store_opts)?;

    // Start-up recovery: leftovers of an interrupted run (temporary files, staged versions and
    // half-made links, also of entries that are kept) are removed, and a live pair that is not
    // valid falls back to the newest valid version. (Missing links are restored, and reported, by
    // init itself below.)
    let recovered = crate::recover::recover_store(&data_dir)?;
    let cleaned_up = crate::recover::leftovers_removed(&recovered);
    crate::recover::log_all("init", &recovered);

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

    let ctx = Ctx {
        data_dir: &data_dir,
        store: &store,
        cas: &cas,
        s,
        created_cas: &created_cas,
        now,
    };
    let mut refused = Vec::new();
    for entry in inventory::control_plane_entries(s)? {
        match ensure_entry(&ctx, &entry)? {
            Ok(action) => items.push(ReportItem {
                name: entry.id.into(),
                path: data_dir.join(main_file(&entry)),
                action,
            }),
            Err(why) => refused.push(why),
        }
    }
    match ensure_sa(&data_dir, alg)? {
        Ok(item) => items.push(item),
        Err(why) => refused.push(why),
    }
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

    if !refused.is_empty() {
        let done = |f: fn(&Action) -> bool| items.iter().filter(|i| f(&i.action)).count();
        bail!(
            "refused to touch {} file(s); fix each as its reason says, or remove it (with its key) to have it reissued:\n  - {}\n\
             every other item is complete ({} created, {} reissued, {} updated, {} kept); {} was not updated",
            refused.len(),
            refused.join("\n  - "),
            done(|a| *a == Action::Created),
            done(|a| matches!(a, Action::Reissued(_))),
            done(|a| matches!(a, Action::Updated(_))),
            done(|a| *a == Action::Kept),
            settings::SETTINGS_FILE
        );
    }

    // Last, now that the directory matches them: the settings.
    let cfg = settings::MeshdConfig {
        version: settings::FORMAT_VERSION,
        role: settings::Role::ControlPlane,
        cluster: Some(s.clone()),
        store: store_cfg,
        joined: None,
        // Rotation hooks are the operator's: a re-run keeps them.
        hooks: prev.as_ref().map(|p| p.hooks.clone()).unwrap_or_default(),
    };
    if prev.as_ref() != Some(&cfg) {
        settings::save_config(&data_dir, &cfg)?;
    }

    Ok(InitReport {
        ca_hash: format!("sha256:{}", cas.cluster.spki_sha256()),
        data_dir,
        cleaned_up,
        items,
    })
}

/// The store configuration of this run: what `meshd.json` records (a re-run), or the options with
/// the embedded store by default (a first init). Refuses, naming each setting with its recorded and
/// requested values, to change the store kind, the etcd endpoints, the node name or the cluster CIDR
/// of an initialized directory.
fn resolve_store(
    data_dir: &Path,
    prev: Option<&settings::MeshdConfig>,
    s: &ClusterSettings,
    opts: &StoreOptions,
) -> anyhow::Result<StoreConfig> {
    let file = settings::path(data_dir);
    let mut refusals = Vec::new();
    let mut refuse = |setting: &str, old: String, new: String, why: &str| {
        refusals.push(format!(
            "{setting}: {old} (recorded), {new} (requested): {why}"
        ));
    };
    let cfg = match prev {
        Some(prev) => {
            let old = &prev.store;
            if let Some(kind) = opts.kind {
                if kind != old.kind {
                    refuse(
                        "store kind",
                        old.kind.to_string(),
                        kind.to_string(),
                        "the cluster state (tokens, nodes, subnet leases) lives in the recorded store; leave out --store to keep it",
                    );
                }
            }
            if let Some(eps) = &opts.etcd_endpoints {
                if sorted(eps) != sorted(&old.etcd_endpoints) {
                    refuse(
                        "etcd endpoints",
                        list(&old.etcd_endpoints),
                        list(eps),
                        "leave out --etcd-endpoints to keep them (to move to other members of the same etcd cluster, edit meshd.json deliberately)",
                    );
                }
            }
            if let Some(c) = &prev.cluster {
                if c.node_name != s.node_name {
                    refuse(
                        "node name",
                        c.node_name.clone(),
                        s.node_name.clone(),
                        &format!("certificates, node registration and subnet lease belong to {}; pass --node-name {}", c.node_name, c.node_name),
                    );
                }
                if c.cluster_cidr != s.cluster_cidr {
                    refuse(
                        "cluster CIDR",
                        c.cluster_cidr.to_string(),
                        s.cluster_cidr.to_string(),
                        &format!("every node's subnet lease is allocated from it; pass --cluster-cidr {}", c.cluster_cidr),
                    );
                }
            }
            old.clone()
        }
        None => {
            let kind = opts.kind.unwrap_or_default();
            let etcd_endpoints = opts.etcd_endpoints.clone().unwrap_or_default();
            if kind == StoreKind::Embedded && !etcd_endpoints.is_empty() {
                bail!("--etcd-endpoints is for --store etcd; the embedded store keeps the cluster state in state.redb");
            }
            StoreConfig {
                kind,
                etcd_endpoints,
                prefix: overlay::DEFAULT_PREFIX.to_string(),
            }
        }
    };
    if !refusals.is_empty() {
        bail!(
            "{} is already initialized ({}); refusing to change (nothing was changed):\n  - {}",
            data_dir.display(),
            file.display(),
            refusals.join("\n  - ")
        );
    }
    if cfg.kind == StoreKind::Etcd && cfg.etcd_endpoints.is_empty() {
        bail!("--store etcd needs --etcd-endpoints https://HOST:PORT[,...]");
    }
    Ok(cfg)
}

fn sorted(v: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = v.iter().map(String::as_str).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(",")
    }
}

fn main_file(e: &Entry) -> PathBuf {
    match &e.output {
        Output::Pair(l) => l.cert.clone().or(l.combined.clone()).unwrap_or_default(),
        Output::Kubeconfig { file, .. } => file.clone(),
    }
}

/// Paths relative to the data directory, for messages.
fn rel_list(data_dir: &Path, paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.strip_prefix(data_dir).unwrap_or(p).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Restores the missing links of a managed pair; the reason to report, if it restored any.
fn restore_links(
    data_dir: &Path,
    store: &PairStore,
    id: &str,
    links: &PairLinks,
    m: &Material,
) -> anyhow::Result<Option<String>> {
    if !m.managed || m.missing_links.is_empty() {
        return Ok(None);
    }
    store.ensure_links(id, links)?;
    Ok(Some(format!(
        "restored {} (link to the stored pair)",
        rel_list(data_dir, &m.missing_links)
    )))
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
            // A CA found as plain files (e.g. from kubeadm) is left where it is: meshd reads it in
            // place. A stored CA gets back a link an interrupted run did not make.
            let action = match restore_links(data_dir, store, id.name(), &id.links(), &m)? {
                Some(why) => Action::Updated(why),
                None => Action::Kept,
            };
            Ok((ca, action))
        }
    }
}

/// What every entry of one run shares.
struct Ctx<'a> {
    data_dir: &'a Path,
    store: &'a PairStore,
    cas: &'a CaSet,
    s: &'a ClusterSettings,
    created_cas: &'a [CaId],
    now: SystemTime,
}

/// Completes one entry. `Ok(Err(why))`: a file init refuses to touch (named in `why`), left alone;
/// `Err`: a failure that stops init (writing failed).
fn ensure_entry(ctx: &Ctx<'_>, entry: &Entry) -> anyhow::Result<Result<Action, String>> {
    let data_dir = ctx.data_dir;
    let ca = ctx.cas.get(entry.signer);
    let found = match material::read_entry(data_dir, entry) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e.to_string())),
    };
    // Whether what is there now are files in place (not the store's links) that a reissue replaces.
    let mut replace = false;
    let reason = match found {
        Found::Missing { .. } => None,
        Found::Partial { present, missing } => {
            replace = true;
            Some(format!(
                "{} had no {}",
                present.display(),
                missing.display()
            ))
        }
        Found::Present(m) => {
            let a = match material::assess(&m, Some(ca.cert_der()), Some(&entry.profile), ctx.now) {
                Ok(a) => a,
                Err(e) => return Ok(Err(e.to_string())),
            };
            let reason = match a.problems.first() {
                None => None,
                Some(
                    p @ (Problem::Expired | Problem::NotYetValid | Problem::ProfileDiffers(_)),
                ) => Some(p.to_string()),
                Some(Problem::WrongCa(_)) if ctx.created_cas.contains(&entry.signer) => {
                    Some(format!("its CA {} was newly created", entry.signer.name()))
                }
                Some(other) => {
                    return Ok(Err(format!(
                        "{}: {other}; init does not overwrite it",
                        m.cert_path.display()
                    )))
                }
            };
            match reason {
                None => return keep(ctx, entry, &m).map(Ok),
                Some(r) => {
                    replace = !m.managed;
                    Some(r)
                }
            }
        }
    };
    let links = links_of(entry);
    if !replace {
        // Something in the way of a link (a file beside a missing pair): refuse before writing.
        if let Err(e) = ctx.store.check_links(entry.id, &links) {
            return Ok(Err(e.to_string()));
        }
    }
    let s = ctx.s;
    let issued =
        inventory::issue_entry(entry, ctx.cas, s.key_algorithm, s.leaf_validity(), ctx.now)?;
    let key_pem = issued.key.to_pem();
    match &entry.output {
        Output::Kubeconfig {
            file, embed: true, ..
        } => {
            let text = render_embedded(s, entry, ctx.cas, &issued.cert.pem, &key_pem);
            store::write_atomic(
                &data_dir.join(file),
                text.expose().as_bytes(),
                store::KEY_MODE,
            )?;
        }
        Output::Pair(_) | Output::Kubeconfig { embed: false, .. } => {
            ctx.store
                .write_version(entry.id, &issued.cert.pem, &key_pem)?;
            if replace {
                // The pair found in place is being reissued: its files give way to the links.
                ctx.store.replace_with_links(entry.id, &links)?;
            } else {
                ctx.store.ensure_links(entry.id, &links)?;
            }
            ensure_kubeconfig_file(data_dir, entry, s)?;
        }
    }
    Ok(Ok(match reason {
        None => Action::Created,
        Some(r) => Action::Reissued(r),
    }))
}

/// A valid entry is kept. A managed pair gets back its missing links and its component kubeconfig
/// is re-rendered when the settings changed; an embedded kubeconfig is re-rendered (same credential)
/// when its server, cluster name or CA is stale. Plain files are left exactly as they are.
fn keep(ctx: &Ctx<'_>, entry: &Entry, m: &Material) -> anyhow::Result<Action> {
    let mut updates = Vec::new();
    if m.managed {
        if let Some(why) = restore_links(ctx.data_dir, ctx.store, entry.id, &links_of(entry), m)? {
            updates.push(why);
        }
        if let Some(why) = ensure_kubeconfig_file(ctx.data_dir, entry, ctx.s)? {
            updates.push(why);
        }
    }
    if let Some(why) = refresh_embedded_kubeconfig(ctx, entry, m)? {
        updates.push(why);
    }
    Ok(if updates.is_empty() {
        Action::Kept
    } else {
        Action::Updated(updates.join("; "))
    })
}

fn links_of(entry: &Entry) -> PairLinks {
    match &entry.output {
        Output::Pair(l) => l.clone(),
        Output::Kubeconfig { links, .. } => links.clone(),
    }
}

/// A kubeconfig for people: cluster CA, client certificate and key embedded.
pub(crate) fn render_embedded(
    s: &ClusterSettings,
    entry: &Entry,
    cas: &CaSet,
    cert_pem: &str,
    key_pem: &SecretPem,
) -> SecretPem {
    kubeconfig::render(&KubeconfigSpec {
        cluster_name: &s.cluster_name,
        server: &s.apiserver_url(),
        ca: PemSource::Embedded(cas.cluster.cert_pem()),
        user: &entry.profile.common_name,
        credential: ClientCredential::Embedded { cert_pem, key_pem },
    })
}

/// Re-renders a kept embedded kubeconfig (`admin.conf`, `super-admin.conf`) with its own credential
/// and the current settings. Rewritten atomically when its server URL, cluster name or embedded CA
/// is stale; the reason is returned. A file that differs only in form (written by kubeadm, say) but
/// holds the current values is read in place and left alone.
fn refresh_embedded_kubeconfig(
    ctx: &Ctx<'_>,
    entry: &Entry,
    m: &Material,
) -> anyhow::Result<Option<String>> {
    let Output::Kubeconfig {
        file, embed: true, ..
    } = &entry.output
    else {
        return Ok(None);
    };
    let path = ctx.data_dir.join(file);
    let want = render_embedded(ctx.s, entry, ctx.cas, &m.cert_pem, &m.key_pem);
    let have = store::read_key_file(&path)?;
    if have.expose() == want.expose() {
        return Ok(None);
    }
    let stale = stale_fields(have.expose(), ctx.s, Some(ctx.cas.cluster.cert_pem()));
    if stale.is_empty() {
        return Ok(None);
    }
    store::write_atomic(&path, want.expose().as_bytes(), store::KEY_MODE)?;
    Ok(Some(format!(
        "{}; rewritten with the same credential",
        stale.join("; ")
    )))
}

/// What in a kubeconfig no longer matches the settings: its server URL, its cluster name (the
/// context's `cluster:`), its embedded CA.
fn stale_fields(text: &str, s: &ClusterSettings, ca_pem: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let url = s.apiserver_url();
    match field(text, "server") {
        Some(v) if v == url => {}
        Some(v) => out.push(format!("server URL changed from {v} to {url}")),
        None => out.push(format!("no server URL (want {url})")),
    }
    if let Some(v) = field(text, "cluster") {
        if v != s.cluster_name {
            out.push(format!(
                "cluster name changed from {v} to {}",
                s.cluster_name
            ));
        }
    }
    if let (Some(ca), Some(v)) = (ca_pem, field(text, "certificate-authority-data")) {
        use base64::Engine;
        if v.trim() != base64::engine::general_purpose::STANDARD.encode(ca.as_bytes()) {
            out.push("the embedded CA is not pki/ca.crt".into());
        }
    }
    out
}

/// The first block-style `key: value` of a kubeconfig with a non-empty scalar value.
fn field(text: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}:");
    text.lines().find_map(|l| {
        let v = l
            .trim_start()
            .trim_start_matches("- ")
            .strip_prefix(prefix.as_str())?
            .trim();
        if v.is_empty() {
            None
        } else if v.starts_with('"') {
            serde_json::from_str::<String>(v).ok()
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
            Some(inner.replace("''", "'"))
        } else {
            Some(v.to_string())
        }
    })
}

/// Writes a component kubeconfig that references its credential by path, only when its content
/// changes (so a re-run rewrites nothing); the reason when it wrote.
fn ensure_kubeconfig_file(
    data_dir: &Path,
    entry: &Entry,
    s: &ClusterSettings,
) -> anyhow::Result<Option<String>> {
    let Output::Kubeconfig {
        file,
        embed: false,
        links,
    } = &entry.output
    else {
        return Ok(None);
    };
    let Some(combined) = &links.combined else {
        return Ok(None);
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
    let have = match std::fs::read(&path) {
        Ok(b) => Some(zeroize::Zeroizing::new(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(pki::PkiError::io(&path, e).into()),
    };
    let why = match &have {
        Some(b) if b.as_slice() == text.expose().as_bytes() => return Ok(None),
        Some(b) => {
            let stale = stale_fields(&String::from_utf8_lossy(b), s, None);
            if stale.is_empty() {
                format!("{} was out of date; rewritten", file.display())
            } else {
                format!("{}; {} rewritten", stale.join("; "), file.display())
            }
        }
        None => format!("{} was missing; rewritten", file.display()),
    };
    store::write_atomic(&path, text.expose().as_bytes(), store::KEY_MODE)?;
    Ok(Some(why))
}

/// `sa.key` and `sa.pub`. `Ok(Err(why))`: a file init refuses to touch.
fn ensure_sa(
    data_dir: &Path,
    alg: pki::keys::KeyAlgorithm,
) -> anyhow::Result<Result<ReportItem, String>> {
    let key_path = data_dir.join("pki/sa.key");
    let pub_path = data_dir.join("pki/sa.pub");
    let item = |action| {
        Ok(ReportItem {
            name: "sa".into(),
            path: key_path.clone(),
            action,
        })
    };
    if key_path.exists() {
        let key = match store::read_key_file(&key_path)
            .map_err(anyhow::Error::from)
            .and_then(|pem| {
                PrivateKey::from_pem_bundle(pem.expose())
                    .with_context(|| key_path.display().to_string())
            }) {
            Ok(k) => k,
            Err(e) => return Ok(Err(format!("{e:#}"))),
        };
        let want = key.public_key_pem();
        let have = std::fs::read_to_string(&pub_path).ok();
        if have.as_deref() == Some(want.as_str()) {
            return Ok(item(Action::Kept));
        }
        if let Some(have) = have {
            if !have.trim().is_empty() {
                return Ok(Err(format!(
                    "{} does not hold the public half of {}: restore the matching pair (service-account tokens depend on it)",
                    pub_path.display(),
                    key_path.display()
                )));
            }
        }
        store::write_atomic(&pub_path, want.as_bytes(), store::CERT_MODE)?;
        return Ok(item(Action::Reissued(
            "sa.pub was missing; derived from sa.key".into(),
        )));
    }
    if pub_path.exists() {
        return Ok(Err(format!(
            "{} exists but {} is missing: a new key would invalidate every service-account token; restore sa.key, or remove sa.pub deliberately",
            pub_path.display(),
            key_path.display()
        )));
    }
    let key = PrivateKey::generate(alg)?;
    // Key first: a crash between the two writes leaves sa.key alone, from which the next run
    // derives sa.pub.
    store::write_atomic(&key_path, key.to_pem().expose().as_bytes(), store::KEY_MODE)?;
    store::write_atomic(&pub_path, key.public_key_pem().as_bytes(), store::CERT_MODE)?;
    Ok(item(Action::Created))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ClusterSettings {
        ClusterSettings {
            cluster_name: "kubernetes".into(),
            node_name: "cp1".into(),
            advertise_address: "192.0.2.10".parse().expect("ip"),
            apiserver_port: 6443,
            service_cidr: "10.96.0.0/12".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            cluster_domain: "cluster.local".into(),
            apiserver_cert_sans: vec![],
            etcd_peer_addresses: vec![],
            api_port: 7443,
            key_algorithm: pki::keys::KeyAlgorithm::EcdsaP256,
            leaf_lifetime_secs: 90 * 86400,
            ca_lifetime_secs: 3650 * 86400,
        }
    }

    fn recorded(kind: StoreKind, eps: &[&str]) -> settings::MeshdConfig {
        settings::MeshdConfig {
            version: settings::FORMAT_VERSION,
            role: settings::Role::ControlPlane,
            cluster: Some(settings()),
            store: StoreConfig {
                kind,
                etcd_endpoints: eps.iter().map(|s| s.to_string()).collect(),
                prefix: overlay::DEFAULT_PREFIX.to_string(),
            },
            joined: None,
            hooks: Default::default(),
        }
    }

    fn opts(kind: Option<StoreKind>, eps: Option<&[&str]>) -> StoreOptions {
        StoreOptions {
            kind,
            etcd_endpoints: eps.map(|e| e.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn the_store_defaults_to_embedded_only_on_a_first_init() {
        let d = Path::new("/x");
        let s = settings();
        let first = resolve_store(d, None, &s, &StoreOptions::default()).expect("first");
        assert_eq!(first.kind, StoreKind::Embedded);
        assert!(resolve_store(d, None, &s, &opts(Some(StoreKind::Etcd), None)).is_err());
        assert!(resolve_store(d, None, &s, &opts(None, Some(&["https://e:2379"]))).is_err());

        let prev = recorded(StoreKind::Etcd, &["https://a:2379", "https://b:2379"]);
        let kept = resolve_store(d, Some(&prev), &s, &StoreOptions::default()).expect("kept");
        assert_eq!(kept, prev.store);
        // The same endpoints in another order are the same endpoints.
        let same = opts(
            Some(StoreKind::Etcd),
            Some(&["https://b:2379", "https://a:2379"]),
        );
        assert_eq!(
            resolve_store(d, Some(&prev), &s, &same).expect("same"),
            prev.store
        );
    }

    #[test]
    fn a_rerun_refuses_each_change_naming_old_and_new() {
        let d = Path::new("/data");
        let prev = recorded(StoreKind::Etcd, &["https://a:2379"]);
        let mut s = settings();
        s.node_name = "cp2".into();
        s.cluster_cidr = "10.245.0.0/16".parse().expect("cidr");
        let e = resolve_store(
            d,
            Some(&prev),
            &s,
            &opts(Some(StoreKind::Embedded), Some(&["https://z:2379"])),
        )
        .expect_err("refused")
        .to_string();
        for want in [
            "/data/meshd.json",
            "store kind: etcd (recorded), embedded (requested)",
            "etcd endpoints: https://a:2379 (recorded), https://z:2379 (requested)",
            "node name: cp1 (recorded), cp2 (requested)",
            "cluster CIDR: 10.244.0.0/16 (recorded), 10.245.0.0/16 (requested)",
        ] {
            assert!(e.contains(want), "no {want:?} in {e}");
        }
    }

    #[test]
    fn stale_fields_ignore_form_and_name_what_changed() {
        let s = settings();
        // kubeadm's form of the same values: nothing stale.
        let kubeadm = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Q0E=\n    server: https://192.0.2.10:6443\n  name: kubernetes\ncontexts:\n- context:\n    cluster: kubernetes\n    user: kubernetes-admin\n  name: kubernetes-admin@kubernetes\n";
        assert_eq!(stale_fields(kubeadm, &s, Some("CA")), Vec::<String>::new());
        let mut moved = s.clone();
        moved.apiserver_port = 7000;
        moved.cluster_name = "prod".into();
        let stale = stale_fields(kubeadm, &moved, Some("other CA"));
        assert_eq!(stale.len(), 3, "{stale:?}");
        assert!(stale[0].contains("https://192.0.2.10:6443") && stale[0].contains(":7000"));
        assert!(stale[1].contains("cluster name changed from kubernetes to prod"));
        assert!(stale[2].contains("embedded CA"));
    }
}
