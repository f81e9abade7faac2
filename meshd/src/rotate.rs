//! Certificate rotation: `meshd rotate` (one pass, cron-friendly) and the daemon's planner (the same
//! pass, run continuously by `meshd run`).
//!
//! * **When**: [`decide`] (pure) applies `pki::renewal::plan_renewal` to every certificate this node
//!   holds: about 2/3 of the lifetime, with a jitter derived from the serial so that repeated runs
//!   agree. A certificate that is expired, does not match its key or does not chain to its CA is
//!   renewed at once; `--force NAME|all` renews regardless.
//! * **Control plane**: every leaf of its inventory (kubeadm's, the kubelet's and meshd's own) is
//!   renewed locally with the CA from the data directory: a new key, a new certificate, verified
//!   (key matches, chains to the CA), then written as a new version of the versioned store
//!   ([`pki::store::PairStore::write_version`]: one rename of `current` switches cert and key
//!   together). Kubeconfigs used by components reference `*-current.pem` through that link and need
//!   no rewrite; the kubeconfigs handed to people (`admin.conf`, `super-admin.conf`) embed their
//!   credential and are re-rendered and replaced atomically (temp file, fsync, rename), so a reader
//!   sees the old file or the new one, never a certificate beside a key that does not match.
//! * **Node**: its four certificates (kubelet client and serving, kube-proxy, meshd identity) are
//!   renewed together through `POST /v1/certs/renew`, authenticated by its current meshd identity
//!   certificate: new keys made here, CSRs sent, what comes back checked against the keys and the CA
//!   before anything is written. The control plane registers the new identity key in the same
//!   request, so the whole bundle is renewed when any of it is due.
//! * **Lock**: a pass holds the data directory's lock (`<data-dir>/.lock`, the one `meshd init` and
//!   `meshd join` take). A second run waits for it up to `--lock-timeout` (default 60 s), then plans
//!   again with what the first one wrote (so it normally finds nothing due and exits 0); if the lock
//!   is still held then, it exits 3 without touching anything.
//! * **Hooks**: `meshd.json` may map an entry id to a shell command (`"hooks": {"apiserver":
//!   "systemctl restart kube-apiserver"}`), run after that entry renewed, by whichever of `meshd
//!   rotate` or the daemon renewed it. A hook failure is reported (exit 4) but never undoes a
//!   renewal.
//! * **Events**: the daemon publishes the ids it renewed (or that it finds renewed by a `meshd rotate`
//!   run from cron) on a [`RotationEvents`] broadcast; `meshd run` reloads its API listener from it.
//!
//! Exit codes of `meshd rotate`: [`EXIT_OK`], [`EXIT_FAILED`], [`EXIT_USAGE`], [`EXIT_NO_LOCK`],
//! [`EXIT_HOOK_FAILED`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use pki::ca::CertificateAuthority;
use pki::inspect;
use pki::inventory::{self, CaId, CaSet, ClusterSettings, Entry, Output};
use pki::keys::{KeyAlgorithm, PrivateKey, SecretPem};
use pki::kubeconfig::{self, ClientCredential, KubeconfigSpec, PemSource};
use pki::renewal::{self, RenewalPolicy};
use pki::store::{self, PairLinks, PairStore};
use serde::Serialize;

use crate::api::NodeCerts;
use crate::material::{self, Found, Problem};
use crate::settings::{self, MeshdConfig, Role};

/// Every certificate renewed or not due (or nothing to do).
pub const EXIT_OK: u8 = 0;
/// At least one renewal failed (the others were done; the failed entry's old pair stays live).
pub const EXIT_FAILED: u8 = 1;
/// Bad command line (clap's own code for usage errors), e.g. `--force` naming no entry.
pub const EXIT_USAGE: u8 = 2;
/// The data directory's lock was not obtained in time, or the data directory or its settings or CAs
/// cannot be read: nothing was done.
pub const EXIT_NO_LOCK: u8 = 3;
/// Every renewal succeeded but a configured hook failed.
pub const EXIT_HOOK_FAILED: u8 = 4;

/// The ids of inventory entries renewed in one pass (`apiserver`, `meshd-api`, `kubelet.conf`...),
/// published by the daemon for whatever must reload (the API listener, the components supervisor).
pub type RotationEvents = tokio::sync::broadcast::Sender<Vec<String>>;

/// Shortest sleep of the daemon between passes.
pub const MIN_SLEEP: Duration = Duration::from_secs(1);
/// Longest sleep of the daemon between passes.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How often the daemon looks for versions renewed by someone else (`meshd rotate` from cron).
pub const WATCH_EVERY: Duration = Duration::from_secs(5);
/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Which entries to renew whatever their state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Force {
    /// None: only what is due.
    #[default]
    None,
    /// Every entry.
    All,
    /// These entry ids.
    Names(BTreeSet<String>),
}

impl Force {
    /// `--force` values: `all`, or entry ids separated by commas.
    pub fn parse(v: Option<&str>) -> Force {
        match v {
            None => Force::None,
            Some("all") => Force::All,
            Some(list) => Force::Names(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        }
    }

    fn wants(&self, id: &str) -> bool {
        match self {
            Force::None => false,
            Force::All => true,
            Force::Names(n) => n.contains(id),
        }
    }

    /// Names that are not among `ids` (a usage error).
    pub fn unknown<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let Force::Names(n) = self else {
            return Vec::new();
        };
        let known: BTreeSet<&str> = ids.into_iter().collect();
        n.iter()
            .filter(|x| !known.contains(x.as_str()))
            .cloned()
            .collect()
    }
}

/// Options of one pass.
#[derive(Clone, Debug)]
pub struct Options {
    /// Entries renewed regardless of their state.
    pub force: Force,
    /// Plan only: change nothing, run no hook.
    pub dry_run: bool,
    /// How long to wait for the data directory's lock.
    pub lock_timeout: Duration,
    /// Run the hooks of renewed entries.
    pub run_hooks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            force: Force::None,
            dry_run: false,
            lock_timeout: Duration::from_secs(60),
            run_hooks: true,
        }
    }
}

/// The decision for one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Renew now, for this reason.
    Renew(String),
    /// Valid and before its renewal point.
    NotDue,
}

/// What is known of a present certificate for [`decide`].
#[derive(Clone, Debug)]
pub struct CertState {
    /// NotBefore.
    pub not_before: SystemTime,
    /// NotAfter.
    pub not_after: SystemTime,
    /// Serial (hex): the jitter sample.
    pub serial: String,
    /// Problems other than its dates that make it unusable (key mismatch, wrong CA...), in words.
    pub broken: Option<String>,
}

/// When a certificate was issued, for the lifetime the planner divides (pure): meshd backdates
/// NotBefore by [`pki::ca::DEFAULT_BACKDATE`] against clock skew, which is not part of the lifetime
/// asked for. Without this, a 30-second leaf (NotBefore 5 min 30 s before NotAfter) would be due the
/// moment it is issued. A validity shorter than the backdate is taken as it is.
pub fn issued_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let backdate = pki::ca::DEFAULT_BACKDATE;
    match not_after.duration_since(not_before) {
        Ok(v) if v > backdate => not_before + backdate,
        _ => not_before,
    }
}

/// [`renewal::plan_renewal`] over the lifetime from [`issued_at`] with the default policy and the
/// serial's jitter: what `meshd rotate`, the daemon and `meshd certs check` agree on.
pub fn plan(
    not_before: SystemTime,
    not_after: SystemTime,
    serial: &str,
    now: SystemTime,
) -> renewal::RenewalPlan {
    let mut p = renewal::plan_renewal(
        issued_at(not_before, not_after),
        not_after,
        now,
        &RenewalPolicy::default(),
        renewal::jitter_from_serial(serial),
    );
    // Inside the backdate window the certificate is valid, merely not yet at its renewal point.
    if p.state == renewal::RenewalState::NotYetValid && now >= not_before {
        p.state = renewal::RenewalState::Valid;
    }
    p
}

/// Decides whether to renew a certificate now (pure). Returns the decision and its renewal point.
pub fn decide(c: &CertState, forced: bool, now: SystemTime) -> (Decision, SystemTime) {
    let plan = plan(c.not_before, c.not_after, &c.serial, now);
    let d = if forced {
        Decision::Renew("forced".into())
    } else if let Some(b) = &c.broken {
        Decision::Renew(b.clone())
    } else {
        match plan.state {
            renewal::RenewalState::Expired => {
                Decision::Renew(format!("expired on {}", pki::time::rfc3339(c.not_after)))
            }
            renewal::RenewalState::Due => {
                Decision::Renew(format!("due since {}", pki::time::rfc3339(plan.renew_at)))
            }
            renewal::RenewalState::Valid | renewal::RenewalState::NotYetValid => Decision::NotDue,
        }
    };
    (d, plan.renew_at)
}

/// How long the daemon sleeps before its next pass (pure): until the earliest renewal point, at
/// least [`MIN_SLEEP`] and at most [`MAX_SLEEP`].
pub fn sleep_until(next: Option<SystemTime>, now: SystemTime) -> Duration {
    let d = match next {
        Some(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
        None => MAX_SLEEP,
    };
    d.clamp(MIN_SLEEP, MAX_SLEEP)
}

/// The retry delay after `failures` consecutive failed passes (pure): 1 s doubling up to 5 min,
/// plus up to 25 % jitter from `jitter` in `[0, 1)`.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(MAX_BACKOFF);
    base + base.mul_f64(0.25 * jitter.clamp(0.0, 1.0))
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What happened to one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Renewed: a new key and certificate are live.
    Renewed {
        /// Why.
        reason: String,
        /// Serial of the certificate it replaced, if there was one.
        old_serial: Option<String>,
        /// Serial of the new certificate.
        new_serial: String,
        /// NotAfter of the new certificate, RFC 3339.
        new_not_after: String,
    },
    /// `--dry-run`: would be renewed.
    WouldRenew {
        /// Why.
        reason: String,
    },
    /// Valid and before its renewal point.
    NotDue,
    /// The renewal failed; the old pair (if any) stays live.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The result of a hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookResult {
    /// The command.
    pub command: String,
    /// Whether it exited 0.
    pub ok: bool,
    /// Its exit status and the end of its output.
    pub detail: String,
}

/// One entry of the report.
#[derive(Clone, Debug, Serialize)]
pub struct EntryResult {
    /// Inventory id.
    pub id: String,
    /// NotAfter of the certificate that was live before the pass, RFC 3339.
    pub not_after: Option<String>,
    /// Its renewal point, RFC 3339 (see [`plan`]).
    pub renew_at: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The hook run after the renewal, if one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookResult>,
}

/// The result of one pass.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The data directory.
    pub data_dir: PathBuf,
    /// `control-plane` or `node`.
    pub role: Role,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Per entry, in inventory order.
    pub entries: Vec<EntryResult>,
    /// The earliest renewal point of what is live after the pass, RFC 3339.
    pub next_renewal: Option<String>,
    /// The same, as a time.
    #[serde(skip)]
    pub next_renewal_at: Option<SystemTime>,
    /// What the start-up recovery run before planning repaired (leftovers of an interrupted write,
    /// roll-backs to the previous version of a pair that was not valid), and what a node's
    /// interrupted renewal completed (see [`crate::renew_pending`]).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub recovered: Vec<String>,
}

impl Report {
    /// Ids renewed in this pass.
    pub fn renewed(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Renewed { .. }))
            .map(|e| e.id.clone())
            .collect()
    }

    /// Entries whose renewal failed.
    pub fn failed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Failed { .. }))
            .count()
    }

    /// Hooks that failed.
    pub fn hooks_failed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.hook.as_ref().is_some_and(|h| !h.ok))
            .count()
    }

    /// The exit code of `meshd rotate` for this report.
    pub fn exit_code(&self) -> u8 {
        if self.failed() > 0 {
            EXIT_FAILED
        } else if self.hooks_failed() > 0 {
            EXIT_HOOK_FAILED
        } else {
            EXIT_OK
        }
    }

    /// One line per renewed (or, in a dry run, due) certificate, per failure and per failed hook;
    /// nothing when nothing was due.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .recovered
            .iter()
            .map(|r| format!("recovered: {r}"))
            .collect();
        for e in &self.entries {
            match &e.outcome {
                Outcome::Renewed {
                    reason,
                    old_serial,
                    new_serial,
                    new_not_after,
                } => out.push(format!(
                    "renewed {}: serial {} -> {new_serial}, valid until {new_not_after} ({reason})",
                    e.id,
                    old_serial.as_deref().unwrap_or("none"),
                )),
                Outcome::WouldRenew { reason } => {
                    out.push(format!("would renew {} ({reason})", e.id))
                }
                Outcome::Failed { reason } => {
                    out.push(format!("FAILED to renew {}: {reason}", e.id))
                }
                Outcome::NotDue => {}
            }
            if let Some(h) = &e.hook {
                if !h.ok {
                    out.push(format!(
                        "hook of {} failed: {}: {}",
                        e.id, h.command, h.detail
                    ));
                }
            }
        }
        out
    }
}

/// Errors that stop a pass before it renews anything.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// Another meshd holds the data directory's lock.
    #[error("{path}: still locked by another meshd after {waited:?} (another rotation, init or join is running); nothing done")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// How long this run waited.
        waited: Duration,
    },
    /// The data directory, its settings or its CAs cannot be read.
    #[error("{0:#}")]
    Unreadable(anyhow::Error),
    /// `--force` names entries this node does not hold.
    #[error("--force: no entry named {names} on this node (entries: {known}; or `all`)")]
    UnknownForce {
        /// The unknown names.
        names: String,
        /// The entries of this node.
        known: String,
    },
}

impl RotateError {
    /// The exit code of `meshd rotate` for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RotateError::UnknownForce { .. } => EXIT_USAGE,
            RotateError::Locked { .. } | RotateError::Unreadable(_) => EXIT_NO_LOCK,
        }
    }
}

/// The data directory's lock, held for one pass.
pub struct PassLock {
    _file: File,
}

/// Takes `<data-dir>/.lock` (shared with `meshd init` and `meshd join`), polling every 50 ms for at
/// most `timeout`.
pub async fn lock(data_dir: &Path, timeout: Duration) -> Result<PassLock, RotateError> {
    let p = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("{}: cannot open the lock file", p.display()))
        .map_err(RotateError::Unreadable)?;
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(PassLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(RotateError::Unreadable(
                    anyhow::Error::from(e).context(format!("{}: cannot lock", p.display())),
                ))
            }
        }
        if start.elapsed() >= timeout {
            return Err(RotateError::Locked {
                path: p,
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The entries a node holds, by its role.
pub fn entries_of(cfg: &MeshdConfig) -> anyhow::Result<Vec<Entry>> {
    match cfg.role {
        Role::ControlPlane => {
            let s = cfg
                .cluster
                .as_ref()
                .context("meshd.json: a control plane without cluster settings")?;
            Ok(inventory::control_plane_entries(s)?)
        }
        Role::Node => {
            let j = cfg
                .joined
                .as_ref()
                .context("meshd.json: a node without its join record")?;
            Ok(inventory::node_entries(&j.name, &j.addresses))
        }
    }
}

/// Runs one pass over `data_dir` at `now`: takes the lock, plans, renews, runs hooks.
pub async fn rotate(data_dir: &Path, opts: &Options) -> Result<Report, RotateError> {
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("{}: cannot open the data directory", data_dir.display()))
        .map_err(RotateError::Unreadable)?;
    let cfg = settings::require_config(&data_dir).map_err(|e| RotateError::Unreadable(e.into()))?;
    let entries = entries_of(&cfg).map_err(RotateError::Unreadable)?;
    let unknown = opts.force.unknown(entries.iter().map(|e| e.id));
    if !unknown.is_empty() {
        return Err(RotateError::UnknownForce {
            names: unknown.join(", "),
            known: entries.iter().map(|e| e.id).collect::<Vec<_>>().join(", "),
        });
    }
    // A dry run changes nothing, so it takes no lock either (it may read a pair mid-rotation: the
    // store's single rename makes that the old pair or the new one).
    let _lock = if opts.dry_run {
        None
    } else {
        Some(lock(&data_dir, opts.lock_timeout).await?)
    };
    // Under the lock: first repair what a crashed run left (the start-up recovery `meshd run` and
    // `meshd init` run), then, on a node, complete a renewal interrupted after the control plane's
    // answer; then plan with what is live.
    let mut recovered = Vec::new();
    if !opts.dry_run {
        let rs = crate::recover::recover(&data_dir)
            .context("start-up recovery")
            .map_err(RotateError::Unreadable)?;
        recovered.extend(rs.iter().map(|r| r.to_string()));
        if cfg.role == Role::Node {
            match crate::renew_pending::complete(&data_dir).await {
                Ok(Some(done)) => recovered.push(done),
                Ok(None) => {}
                // Reported; the pass goes on (a renewal may still work, or say why not).
                Err(e) => recovered.push(format!("an interrupted renewal: {e:#}")),
            }
        }
    }
    let mut report = match cfg.role {
        Role::ControlPlane => control_plane_pass(&data_dir, &cfg, &entries, opts)?,
        Role::Node => node_pass(&data_dir, &entries, opts).await?,
    };
    report.recovered = recovered;
    if opts.run_hooks && !opts.dry_run {
        run_hooks(&cfg, &mut report).await;
    }
    Ok(report)
}

/// What was found for one entry before the pass.
struct Planned {
    entry: Entry,
    /// The live certificate's state, when there is one.
    state: Option<CertState>,
    /// Whether its files are the store's links (`false`: plain files read in place, replaced by
    /// links when renewed, as `meshd init` does on a reissue).
    managed: bool,
    decision: Result<Decision, String>,
    renew_at: Option<SystemTime>,
}

fn plan_entry(
    data_dir: &Path,
    entry: &Entry,
    ca_der: &[u8],
    force: &Force,
    now: SystemTime,
) -> Planned {
    let forced = force.wants(entry.id);
    let mut p = Planned {
        entry: entry.clone(),
        state: None,
        managed: true,
        decision: Ok(Decision::NotDue),
        renew_at: None,
    };
    let m = match material::read_entry(data_dir, entry) {
        Ok(Found::Present(m)) => m,
        Ok(Found::Missing { path }) => {
            p.decision = Err(format!(
                "{} does not exist: run `meshd init` (control plane) to complete the data directory",
                path.display()
            ));
            return p;
        }
        Ok(Found::Partial { present, missing }) => {
            p.decision = Err(format!(
                "{} exists but {} does not: run `meshd init` to complete the data directory",
                present.display(),
                missing.display()
            ));
            return p;
        }
        Err(e) => {
            p.decision = Err(e.to_string());
            return p;
        }
    };
    p.managed = m.managed;
    let a = match material::assess(&m, Some(ca_der), None, now) {
        Ok(a) => a,
        Err(e) => {
            // Unparseable: renewal replaces it.
            p.decision = Ok(Decision::Renew(format!("unreadable certificate: {e}")));
            return p;
        }
    };
    let broken = a
        .problems
        .iter()
        .find(|x| {
            matches!(
                x,
                Problem::KeyMismatch(_) | Problem::BadKey(_) | Problem::WrongCa(_)
            )
        })
        .map(|x| x.to_string());
    let st = CertState {
        not_before: a.info.not_before,
        not_after: a.info.not_after,
        serial: a.info.serial.clone(),
        broken,
    };
    let (d, at) = decide(&st, forced, now);
    p.decision = Ok(d);
    p.renew_at = Some(at);
    p.state = Some(st);
    p
}

fn result_of(p: &Planned, outcome: Outcome) -> EntryResult {
    EntryResult {
        id: p.entry.id.to_string(),
        not_after: p.state.as_ref().map(|s| pki::time::rfc3339(s.not_after)),
        renew_at: p.renew_at.map(pki::time::rfc3339),
        outcome,
        hook: None,
    }
}

fn renewed(p: &Planned, reason: String, cert_der: &[u8]) -> anyhow::Result<(Outcome, SystemTime)> {
    let info = inspect::inspect_der(cert_der)?;
    let plan = plan(
        info.not_before,
        info.not_after,
        &info.serial,
        SystemTime::now(),
    );
    Ok((
        Outcome::Renewed {
            reason,
            old_serial: p.state.as_ref().map(|s| s.serial.clone()),
            new_serial: info.serial,
            new_not_after: pki::time::rfc3339(info.not_after),
        },
        plan.renew_at,
    ))
}

fn load_cas(data_dir: &Path) -> anyhow::Result<CaSet> {
    let load = |id: CaId| -> anyhow::Result<CertificateAuthority> {
        match material::read_ca(data_dir, id)? {
            Found::Present(m) => {
                let key = PrivateKey::from_pem_bundle(m.key_pem.expose())
                    .with_context(|| m.key_path.display().to_string())?;
                Ok(CertificateAuthority::from_parts(m.cert_pem, key)
                    .with_context(|| m.cert_path.display().to_string())?)
            }
            _ => anyhow::bail!(
                "{}: the {} CA is missing; run `meshd init`",
                data_dir.join(id.links().cert.unwrap_or_default()).display(),
                id.name()
            ),
        }
    };
    Ok(CaSet {
        cluster: load(CaId::Cluster)?,
        etcd: load(CaId::Etcd)?,
        front_proxy: load(CaId::FrontProxy)?,
    })
}

fn links_of(entry: &Entry) -> PairLinks {
    match &entry.output {
        Output::Pair(l) => l.clone(),
        Output::Kubeconfig { links, .. } => links.clone(),
    }
}

/// Makes a new version of `entry` live: a pair through the versioned store (links restored, or plain
/// files replaced by links), an embedded kubeconfig by one atomic file replacement.
fn write_entry(
    data_dir: &Path,
    p: &Planned,
    cert_pem: &str,
    key_pem: &SecretPem,
    embed: Option<(&ClusterSettings, &str)>,
) -> anyhow::Result<()> {
    let entry = &p.entry;
    match (&entry.output, embed) {
        (
            Output::Kubeconfig {
                file, embed: true, ..
            },
            Some((s, ca_pem)),
        ) => {
            let text = kubeconfig::render(&KubeconfigSpec {
                cluster_name: &s.cluster_name,
                server: &s.apiserver_url(),
                ca: PemSource::Embedded(ca_pem),
                user: &entry.profile.common_name,
                credential: ClientCredential::Embedded { cert_pem, key_pem },
            });
            store::write_atomic(
                &data_dir.join(file),
                text.expose().as_bytes(),
                store::KEY_MODE,
            )?;
        }
        (Output::Kubeconfig { embed: true, .. }, None) => {
            anyhow::bail!("internal error: an embedded kubeconfig without its settings")
        }
        _ => {
            let pairs = PairStore::new(data_dir);
            let links = links_of(entry);
            if p.managed {
                // Refuse before writing when something else took a public path meanwhile.
                pairs.check_links(entry.id, &links)?;
            }
            pairs.write_version(entry.id, cert_pem, key_pem)?;
            if p.managed {
                pairs.ensure_links(entry.id, &links)?;
            } else {
                pairs.replace_with_links(entry.id, &links)?;
            }
        }
    }
    Ok(())
}

/// Makes `cert_pem` and `key_pem` the live pair of `entry` (a node's entry: no embedded
/// kubeconfig), as a renewal writes it; `managed`: whether its files are the store's links.
pub(crate) fn install_pair(
    data_dir: &Path,
    entry: &Entry,
    managed: bool,
    cert_pem: &str,
    key_pem: &SecretPem,
) -> anyhow::Result<()> {
    let p = Planned {
        entry: entry.clone(),
        state: None,
        managed,
        decision: Ok(Decision::NotDue),
        renew_at: None,
    };
    write_entry(data_dir, &p, cert_pem, key_pem, None)
}

/// Checks a certificate issued for `key` against the key and its CA before it is written.
pub(crate) fn verify_issued(
    cert_pem: &str,
    key: &PrivateKey,
    ca_der: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let der = inspect::pem_to_der(cert_pem)?;
    if !inspect::key_matches(&der, key)? {
        anyhow::bail!("the issued certificate does not carry this node's new key; nothing written");
    }
    if let Err(e) = inspect::verify_signed_by(&der, ca_der)? {
        anyhow::bail!("the issued certificate does not chain to its CA ({e}); nothing written");
    }
    Ok(der)
}

fn next_of(results: &[(EntryResult, Option<SystemTime>)]) -> Option<SystemTime> {
    results.iter().filter_map(|(_, t)| *t).min()
}

fn finish(
    data_dir: &Path,
    role: Role,
    dry_run: bool,
    results: Vec<(EntryResult, Option<SystemTime>)>,
) -> Report {
    let next = next_of(&results);
    Report {
        data_dir: data_dir.to_path_buf(),
        role,
        dry_run,
        entries: results.into_iter().map(|(r, _)| r).collect(),
        next_renewal: next.map(pki::time::rfc3339),
        next_renewal_at: next,
        recovered: Vec::new(),
    }
}

fn control_plane_pass(
    data_dir: &Path,
    cfg: &MeshdConfig,
    entries: &[Entry],
    opts: &Options,
) -> Result<Report, RotateError> {
    let s = cfg
        .cluster
        .as_ref()
        .context("meshd.json: a control plane without cluster settings")
        .map_err(RotateError::Unreadable)?;
    let cas = load_cas(data_dir).map_err(RotateError::Unreadable)?;
    // Leftovers of an interrupted write (a crashed pass) go first.
    PairStore::new(data_dir)
        .cleanup_all_tmp()
        .map_err(|e| RotateError::Unreadable(e.into()))?;
    let now = SystemTime::now();
    let mut results = Vec::new();
    for entry in entries {
        let ca = cas.get(entry.signer);
        let p = plan_entry(data_dir, entry, ca.cert_der(), &opts.force, now);
        let (outcome, next) = match &p.decision {
            Err(why) => (
                Outcome::Failed {
                    reason: why.clone(),
                },
                None,
            ),
            Ok(Decision::NotDue) => (Outcome::NotDue, p.renew_at),
            Ok(Decision::Renew(reason)) if opts.dry_run => (
                Outcome::WouldRenew {
                    reason: reason.clone(),
                },
                p.renew_at,
            ),
            Ok(Decision::Renew(reason)) => {
                match renew_locally(data_dir, &p, &cas, s, reason.clone()) {
                    Ok((o, at)) => (o, Some(at)),
                    Err(e) => (
                        Outcome::Failed {
                            reason: format!("{e:#}"),
                        },
                        // Retry soon: the daemon backs off on failures.
                        p.renew_at,
                    ),
                }
            }
        };
        results.push((result_of(&p, outcome), next));
    }
    Ok(finish(data_dir, Role::ControlPlane, opts.dry_run, results))
}

fn renew_locally(
    data_dir: &Path,
    p: &Planned,
    cas: &CaSet,
    s: &ClusterSettings,
    reason: String,
) -> anyhow::Result<(Outcome, SystemTime)> {
    let entry = &p.entry;
    let issued = inventory::issue_entry(
        entry,
        cas,
        s.key_algorithm,
        s.leaf_validity(),
        SystemTime::now(),
    )?;
    let ca = cas.get(entry.signer);
    let der = verify_issued(&issued.cert.pem, &issued.key, ca.cert_der())?;
    let key_pem = issued.key.to_pem();
    write_entry(
        data_dir,
        p,
        &issued.cert.pem,
        &key_pem,
        Some((s, cas.cluster.cert_pem())),
    )?;
    renewed(p, reason, &der)
}

async fn node_pass(
    data_dir: &Path,
    entries: &[Entry],
    opts: &Options,
) -> Result<Report, RotateError> {
    let ca_path = data_dir.join("pki/ca.crt");
    let ca_der = store::read_text(&ca_path)
        .map_err(anyhow::Error::from)
        .and_then(|t| Ok(inspect::pem_to_der(&t)?))
        .with_context(|| format!("{}: the cluster CA", ca_path.display()))
        .map_err(RotateError::Unreadable)?;
    PairStore::new(data_dir)
        .cleanup_all_tmp()
        .map_err(|e| RotateError::Unreadable(e.into()))?;
    let now = SystemTime::now();
    let planned: Vec<Planned> = entries
        .iter()
        .map(|e| plan_entry(data_dir, e, &ca_der, &opts.force, now))
        .collect();
    let due = planned
        .iter()
        .any(|p| matches!(p.decision, Ok(Decision::Renew(_))));
    let identity_broken = planned
        .iter()
        .find(|p| p.entry.id == "meshd-node")
        .is_none_or(|p| p.decision.is_err());
    let mut results = Vec::new();
    if !due || opts.dry_run {
        for p in &planned {
            let o = match &p.decision {
                Err(why) => Outcome::Failed {
                    reason: why.clone(),
                },
                Ok(Decision::NotDue) => Outcome::NotDue,
                Ok(Decision::Renew(r)) => Outcome::WouldRenew { reason: r.clone() },
            };
            results.push((result_of(p, o), p.renew_at));
        }
        return Ok(finish(data_dir, Role::Node, opts.dry_run, results));
    }
    let bundle = if identity_broken {
        Err(anyhow::anyhow!(
            "the node's meshd identity (pki/meshd/node.crt) is unusable, so the control plane cannot authenticate a renewal: restore it, or join again (`meshd join --rejoin`)"
        ))
    } else {
        renew_bundle(data_dir, &planned, &ca_der).await
    };
    match bundle {
        Ok(done) => {
            for (p, r) in planned.iter().zip(done) {
                let (o, at) = match r {
                    Ok(x) => (x.0, Some(x.1)),
                    Err(e) => (
                        Outcome::Failed {
                            reason: format!("{e:#}"),
                        },
                        p.renew_at,
                    ),
                };
                results.push((result_of(p, o), at));
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            for p in &planned {
                let o = match &p.decision {
                    Ok(Decision::NotDue) => Outcome::NotDue,
                    _ => Outcome::Failed {
                        reason: why.clone(),
                    },
                };
                results.push((result_of(p, o), p.renew_at));
            }
        }
    }
    Ok(finish(data_dir, Role::Node, false, results))
}

type Done = anyhow::Result<(Outcome, SystemTime)>;

/// Renews the node's bundle through the API; one result per planned entry (in order).
async fn renew_bundle(
    data_dir: &Path,
    planned: &[Planned],
    ca_der: &[u8],
) -> anyhow::Result<Vec<Done>> {
    let find = |id: &str| {
        planned
            .iter()
            .find(|p| p.entry.id == id)
            .with_context(|| format!("internal error: no node entry {id}"))
    };
    if crate::renew_pending::exists(data_dir) {
        anyhow::bail!(
            "{}: an earlier renewal is not completed yet (the control plane could not be asked for it); not starting another",
            crate::renew_pending::path(data_dir).display()
        );
    }
    let mut keys = Vec::new();
    let mut csrs = Vec::new();
    for id in NodeCerts::IDS {
        let p = find(id)?;
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        csrs.push(pki::csr::build_csr(&p.entry.profile, &k)?);
        keys.push(k);
    }
    // The keys are on disk before the control plane binds the node to the new identity: a crash
    // after its answer is completed by the next pass (see [`crate::renew_pending`]).
    crate::renew_pending::keep(data_dir, &keys)?;
    let req = crate::api::NodeCsrs {
        kubelet_client: csrs[0].clone(),
        kubelet_serving: csrs[1].clone(),
        kube_proxy: csrs[2].clone(),
        node_identity: csrs[3].clone(),
    };
    // Authenticated by the current identity certificate (read now, from the store).
    let client = crate::join::node_client(data_dir)?;
    let certs: crate::api::NodeCerts = match client
        .call(hyper::Method::POST, "/v1/certs/renew", Some(&req))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            // Refused (4xx): the control plane bound nothing to these keys. Otherwise (no answer,
            // 5xx) it may have: the next pass asks it (`GET /v1/certs/last`).
            if matches!(
                e,
                crate::api::client::ClientError::Status {
                    status: 400..=499,
                    ..
                }
            ) {
                let _ = crate::renew_pending::discard(data_dir);
            }
            return Err(anyhow::Error::from(e).context("POST /v1/certs/renew"));
        }
    };
    pki::failpoint!("rotate::node_after_response");
    let got = certs.in_order();
    // Check everything before writing anything.
    let mut ders = Vec::new();
    for ((id, cert), key) in NodeCerts::IDS.iter().zip(got).zip(&keys) {
        ders.push(verify_issued(cert, key, ca_der).with_context(|| id.to_string())?);
    }
    let mut by_id: BTreeMap<&str, Done> = BTreeMap::new();
    // The identity first: from now on the control plane accepts only the new one.
    for i in [3usize, 0, 1, 2] {
        let id = NodeCerts::IDS[i];
        let p = find(id)?;
        let reason = match &p.decision {
            Ok(Decision::Renew(r)) => r.clone(),
            _ => "renewed with the node's bundle".to_string(),
        };
        let r = write_entry(data_dir, p, got[i], &keys[i].to_pem(), None)
            .and_then(|()| renewed(p, reason, &ders[i]));
        by_id.insert(id, r);
    }
    if by_id.values().all(|r| r.is_ok()) {
        // Everything is live: the kept keys are no longer needed. (Left in place when a write
        // failed: the next pass installs the rest of the bundle.)
        if let Err(e) = crate::renew_pending::discard(data_dir) {
            log(format!("rotation: {e:#}"));
        }
    }
    Ok(planned
        .iter()
        .map(|p| {
            by_id
                .remove(p.entry.id)
                .unwrap_or_else(|| Err(anyhow::anyhow!("not part of the node's bundle")))
        })
        .collect())
}

/// Runs the configured hook of every renewed entry and records its result.
pub async fn run_hooks(cfg: &MeshdConfig, report: &mut Report) {
    for e in &mut report.entries {
        if !matches!(e.outcome, Outcome::Renewed { .. }) {
            continue;
        }
        let Some(cmd) = cfg.hooks.get(&e.id) else {
            continue;
        };
        e.hook = Some(run_hook(cmd, &e.id, &report.data_dir).await);
    }
}

async fn run_hook(cmd: &str, id: &str, data_dir: &Path) -> HookResult {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("MESHD_RENEWED", id)
        .env("MESHD_DATA_DIR", data_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let (ok, detail) = match tokio::time::timeout(HOOK_TIMEOUT, child).await {
        Err(_) => (
            false,
            format!("still running after {HOOK_TIMEOUT:?}; killed"),
        ),
        Ok(Err(e)) => (false, format!("cannot run sh: {e}")),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            (out.status.success(), format!("{}; {}", out.status, tail))
        }
    };
    HookResult {
        command: cmd.to_owned(),
        ok,
        detail,
    }
}

/// The live version of every entry (`None`: not in the store), to notice renewals made by another
/// process.
pub fn live_versions(data_dir: &Path, entries: &[Entry]) -> BTreeMap<String, Option<u64>> {
    let pairs = PairStore::new(data_dir);
    entries
        .iter()
        .map(|e| (e.id.to_string(), pairs.current_version(e.id).ok().flatten()))
        .collect()
}

/// Entries whose live version differs between two snapshots of [`live_versions`].
pub fn changed(
    before: &BTreeMap<String, Option<u64>>,
    after: &BTreeMap<String, Option<u64>>,
) -> Vec<String> {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

fn log(msg: impl std::fmt::Display) {
    crate::api::server::log(msg);
}

fn jitter_sample() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The daemon's planner (`meshd run`): a pass whenever the earliest renewal point is reached, a
/// jittered backoff after a failed pass, one log line per renewal, and the ids renewed (by this
/// task, or by a `meshd rotate` run meanwhile) published on `events`. Runs until `shutdown` is true.
pub async fn daemon(
    data_dir: PathBuf,
    events: RotationEvents,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let opts = Options {
        // The daemon never waits long for the lock: a `meshd rotate` holding it is doing the work.
        lock_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let entries = match settings::require_config(&data_dir)
        .map_err(anyhow::Error::from)
        .and_then(|c| entries_of(&c))
    {
        Ok(e) => e,
        Err(e) => {
            log(format!("rotation: disabled: {e:#}"));
            return;
        }
    };
    let mut seen = live_versions(&data_dir, &entries);
    let mut failures: u32 = 0;
    loop {
        let wait = match rotate(&data_dir, &opts).await {
            Ok(report) => {
                for line in report.summary_lines() {
                    log(format!("rotation: {line}"));
                }
                let now = SystemTime::now();
                if report.failed() > 0 {
                    failures += 1;
                    let b = backoff(failures, jitter_sample());
                    log(format!(
                        "rotation: {} renewal(s) failed; retrying in {:.1}s",
                        report.failed(),
                        b.as_secs_f64()
                    ));
                    b
                } else {
                    failures = 0;
                    sleep_until(report.next_renewal_at, now)
                }
            }
            Err(e) => {
                failures += 1;
                let b = backoff(failures, jitter_sample());
                log(format!(
                    "rotation: {e}; retrying in {:.1}s",
                    b.as_secs_f64()
                ));
                b
            }
        };
        // Publish what changed since the last look (this pass, or another process).
        let now_versions = live_versions(&data_dir, &entries);
        let ids = changed(&seen, &now_versions);
        seen = now_versions;
        if !ids.is_empty() {
            let _ = events.send(ids);
        }
        // Sleep until the next pass, looking now and then for renewals made by someone else.
        let until = tokio::time::Instant::now() + wait;
        loop {
            let step = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(WATCH_EVERY);
            if step.is_zero() {
                break;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(step) => {}
            }
            let v = live_versions(&data_dir, &entries);
            let ids = changed(&seen, &v);
            seen = v;
            if !ids.is_empty() {
                log(format!(
                    "rotation: renewed by another process: {}",
                    ids.join(", ")
                ));
                let _ = events.send(ids);
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// The API listener's TLS configuration from the live `meshd-api` pair and the cluster CA.
pub fn api_server_config(
    data_dir: &Path,
    ca_pem: &str,
) -> anyhow::Result<(std::sync::Arc<rustls::ServerConfig>, String)> {
    let links = PairLinks {
        cert: Some("pki/meshd/api-server.crt".into()),
        key: Some("pki/meshd/api-server.key".into()),
        combined: None,
    };
    let m = match material::read_pair(data_dir, "meshd-api", &links)? {
        Found::Present(m) => m,
        _ => anyhow::bail!(
            "{}: missing; run `meshd init` again",
            data_dir.join("pki/meshd/api-server.crt").display()
        ),
    };
    let serial = inspect::inspect_pem(&m.cert_pem)?.serial;
    let chain = format!("{}{}", m.cert_pem, ca_pem);
    Ok((
        crate::tls::server_config(&chain, m.key_pem.expose(), ca_pem)?,
        serial,
    ))
}

/// Reloads the API listener whenever `meshd-api` renewed: builds the new `ServerConfig` and publishes
/// it on `tls`, which the listener reads for every new connection. Connections already open keep
/// their session; new handshakes get the new certificate. A configuration that cannot be built is
/// logged and the listener keeps the one it has.
pub async fn reload_api_listener(
    data_dir: PathBuf,
    ca_pem: String,
    mut events: tokio::sync::broadcast::Receiver<Vec<String>>,
    tls: tokio::sync::watch::Sender<std::sync::Arc<rustls::ServerConfig>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let reload = match events.recv().await {
            Ok(ids) => ids.iter().any(|i| i == "meshd-api"),
            // Missed events: reload to be sure.
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if !reload {
            continue;
        }
        match api_server_config(&data_dir, &ca_pem) {
            Ok((cfg, serial)) => {
                let _ = tls.send(cfg);
                log(format!(
                    "meshd API: new connections get the renewed certificate (serial {serial})"
                ));
            }
            Err(e) => log(format!(
                "meshd API: keeping the current certificate, the renewed one cannot be loaded: {e:#}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn cert(nb: u64, na: u64) -> CertState {
        CertState {
            not_before: t(nb),
            not_after: t(na),
            serial: "01ab".into(),
            broken: None,
        }
    }

    #[test]
    fn decide_follows_the_planner_and_force_and_breakage() {
        let c = cert(0, 3000);
        let (d, at) = decide(&c, false, t(100));
        assert_eq!(d, Decision::NotDue);
        // The 5 min backdate aside: 300 s + 2/3 of 2700 s ± 5 %.
        let at = at.duration_since(t(0)).unwrap().as_secs();
        assert!((1960..=2240).contains(&at), "{at}");
        assert!(
            matches!(decide(&c, false, t(2300)).0, Decision::Renew(r) if r.starts_with("due since"))
        );
        assert!(
            matches!(decide(&c, false, t(3001)).0, Decision::Renew(r) if r.starts_with("expired"))
        );
        assert_eq!(decide(&c, true, t(100)).0, Decision::Renew("forced".into()));
        let mut b = c.clone();
        b.broken = Some("certificate and key do not match".into());
        assert_eq!(
            decide(&b, false, t(100)).0,
            Decision::Renew("certificate and key do not match".into())
        );
        // Not yet valid (clock skew): not renewed by the planner.
        assert_eq!(decide(&cert(500, 3000), false, t(100)).0, Decision::NotDue);
    }

    #[test]
    fn the_backdate_is_not_part_of_the_lifetime() {
        // A 30 s leaf backdated 5 min: renewed about 20 s after issue, not at once.
        let issued = 1000;
        let c = cert(issued - 300, issued + 30);
        assert_eq!(issued_at(c.not_before, c.not_after), t(issued));
        assert_eq!(decide(&c, false, t(issued + 1)).0, Decision::NotDue);
        let at = decide(&c, false, t(issued + 1)).1;
        let secs = at.duration_since(t(issued)).unwrap().as_secs_f64();
        assert!((18.0..=22.0).contains(&secs), "{secs}");
        assert!(matches!(
            decide(&c, false, t(issued + 25)).0,
            Decision::Renew(_)
        ));
        // Valid but inside the backdate window: not due, not an error.
        assert_eq!(decide(&c, false, t(issued - 10)).0, Decision::NotDue);
        // A validity shorter than the backdate is taken whole.
        assert_eq!(issued_at(t(0), t(60)), t(0));
    }

    #[test]
    fn sleeps_are_bounded() {
        assert_eq!(sleep_until(Some(t(10)), t(100)), MIN_SLEEP);
        assert_eq!(sleep_until(Some(t(100)), t(100)), MIN_SLEEP);
        assert_eq!(sleep_until(Some(t(130)), t(100)), Duration::from_secs(30));
        assert_eq!(sleep_until(Some(t(100_000)), t(100)), MAX_SLEEP);
        assert_eq!(sleep_until(None, t(100)), MAX_SLEEP);
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(4, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(30, 0.0), MAX_BACKOFF);
        let j = backoff(3, 0.999);
        assert!(
            j > Duration::from_secs(4) && j < Duration::from_secs(5),
            "{j:?}"
        );
        assert!(backoff(30, 1.0) <= MAX_BACKOFF + MAX_BACKOFF / 4);
    }

    #[test]
    fn force_parses_and_names_unknown_entries() {
        assert_eq!(Force::parse(None), Force::None);
        assert_eq!(Force::parse(Some("all")), Force::All);
        let f = Force::parse(Some("apiserver, etcd-server,"));
        assert!(f.wants("apiserver") && f.wants("etcd-server") && !f.wants("admin.conf"));
        assert_eq!(
            f.unknown(["apiserver", "x"]),
            vec!["etcd-server".to_string()]
        );
        assert!(Force::All.unknown(["a"]).is_empty());
    }

    fn entry(id: &str, outcome: Outcome, hook: Option<bool>) -> EntryResult {
        EntryResult {
            id: id.into(),
            not_after: None,
            renew_at: None,
            outcome,
            hook: hook.map(|ok| HookResult {
                command: "true".into(),
                ok,
                detail: String::new(),
            }),
        }
    }

    fn report(entries: Vec<EntryResult>) -> Report {
        Report {
            data_dir: "/d".into(),
            role: Role::ControlPlane,
            dry_run: false,
            entries,
            next_renewal: None,
            next_renewal_at: None,
            recovered: Vec::new(),
        }
    }

    fn renewed_outcome() -> Outcome {
        Outcome::Renewed {
            reason: "due".into(),
            old_serial: Some("01".into()),
            new_serial: "02".into(),
            new_not_after: "2030-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn exit_codes_and_summary() {
        let quiet = report(vec![entry("a", Outcome::NotDue, None)]);
        assert_eq!(quiet.exit_code(), EXIT_OK);
        assert!(
            quiet.summary_lines().is_empty(),
            "quiet when nothing is due"
        );
        let ok = report(vec![
            entry("a", renewed_outcome(), Some(true)),
            entry("b", Outcome::NotDue, None),
        ]);
        assert_eq!(ok.exit_code(), EXIT_OK);
        assert_eq!(ok.renewed(), vec!["a".to_string()]);
        assert_eq!(ok.summary_lines().len(), 1);
        assert!(ok.summary_lines()[0].contains("renewed a: serial 01 -> 02"));
        let hook = report(vec![entry("a", renewed_outcome(), Some(false))]);
        assert_eq!(hook.exit_code(), EXIT_HOOK_FAILED);
        let failed = report(vec![
            entry("a", renewed_outcome(), Some(false)),
            entry(
                "b",
                Outcome::Failed {
                    reason: "disk full".into(),
                },
                None,
            ),
        ]);
        assert_eq!(failed.exit_code(), EXIT_FAILED);
        assert_eq!(failed.summary_lines().len(), 3);
    }

    #[test]
    fn changed_versions_are_noticed() {
        let a: BTreeMap<String, Option<u64>> =
            [("x".to_string(), Some(1)), ("y".to_string(), Some(2))].into();
        let mut b = a.clone();
        assert!(changed(&a, &b).is_empty());
        b.insert("y".into(), Some(3));
        assert_eq!(changed(&a, &b), vec!["y".to_string()]);
    }
}
