//! Start-up check and recovery of the versioned pair store after a crash.
//!
//! The store's writes are atomic (stage, fsync, rename; `current` switched by one rename), so a crash
//! at any point leaves `current` on a complete version. What a crash can leave behind is garbage
//! (staged versions, temporary files and links) and, with storage that lost writes it had
//! acknowledged (a power cut under a disk lying about fsync, a restored backup, a hand), a `current`
//! that is missing, dangling or points at a damaged version. [`recover`] handles both, for every
//! entry of the store:
//!
//! * leftovers of interrupted writes are removed (in the store and in the directories meshd writes
//!   files to);
//! * the live pair (`current`) must exist, parse, hold a key that matches the certificate and a
//!   certificate signed by its CA (a CA: by itself), and its `tls.pem` must hold the same pair;
//! * when it does not, `current` is pointed at the newest other version that passes the same checks,
//!   and that is reported; when none does, it is reported and nothing is changed: recovery never
//!   deletes a version, so the last valid pair is never lost.
//!
//! Expiry is not checked: an expired pair is a rotation's business, not a crash's.
//!
//! Callers hold the data directory's lock ([`crate::init::lock_data_dir`]); [`recover_locked`]
//! takes it.

use std::path::{Path, PathBuf};

use pki::inventory::{self, CaId, Output};
use pki::keys::PrivateKey;
use pki::store::{self, PairLinks, PairStore, PublicPath};
use serde::Serialize;

use crate::settings::{self, Role};

/// Directories (relative to the data directory) where meshd writes single files atomically
/// (kubeconfigs, `meshd.json`, the WireGuard key, plain CA files of a node): an interrupted write
/// leaves a temporary file there.
pub const WRITE_DIRS: &[&str] = &[
    "",
    "pki",
    "pki/etcd",
    "pki/meshd",
    "kubelet/pki",
    "wireguard",
];

/// What recovery did (or could not do) for one item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Recovery {
    /// Temporary files or staged versions of interrupted writes were removed.
    RemovedLeftovers {
        /// Where (a store entry's directory, or a directory of atomic writes).
        dir: PathBuf,
        /// How many.
        count: usize,
    },
    /// The live pair of `id` was not valid; `current` now points at version `to`.
    RolledBack {
        /// Store entry.
        id: String,
        /// The version `current` pointed at (`None`: no `current` at all).
        from: Option<u64>,
        /// The version now live.
        to: u64,
        /// What was wrong with the old one.
        reason: String,
    },
    /// Public paths of `id` (links through `current`) that were missing were made again (a crash
    /// before a link was made, or a link removed by hand). Only missing paths are made: a file or
    /// another link in the way is never replaced.
    RestoredLinks {
        /// Store entry.
        id: String,
        /// The paths made.
        paths: Vec<PathBuf>,
    },
    /// The live pair of `id` is not valid and no other version is: nothing was changed (run
    /// `meshd init` on a control plane to reissue it, or `meshd join --rejoin` on a node).
    NoValidPair {
        /// Store entry.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

impl Recovery {
    /// Whether the entry is left without a valid pair.
    pub fn is_failure(&self) -> bool {
        matches!(self, Recovery::NoValidPair { .. })
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recovery::RemovedLeftovers { dir, count } => write!(
                f,
                "{}: removed {count} leftover(s) of an interrupted write",
                dir.display()
            ),
            Recovery::RolledBack {
                id,
                from,
                to,
                reason,
            } => write!(
                f,
                "{id}: the live pair (version {}) was not valid ({reason}); rolled back to version {to}",
                from.map(|v| v.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
            Recovery::RestoredLinks { id, paths } => write!(
                f,
                "{id}: restored the missing link(s) {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Recovery::NoValidPair { id, reason } => write!(
                f,
                "{id}: no valid pair ({reason}) and no valid earlier version; left as is"
            ),
        }
    }
}

/// Which CA must have signed an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signer {
    /// A CA: itself.
    SelfSigned,
    /// One of the cluster's CAs.
    Ca(CaId),
    /// Not known from the settings: any CA of the data directory.
    Any,
}

/// The signer and public paths of each entry the settings know of.
fn signers(data_dir: &Path) -> Vec<(String, Signer, Option<PairLinks>)> {
    let mut out: Vec<(String, Signer, Option<PairLinks>)> = CaId::ALL
        .iter()
        .map(|c| (c.name().to_owned(), Signer::SelfSigned, Some(c.links())))
        .collect();
    // A corrupt meshd.json is reported by the command itself; recovery checks chains against
    // every CA then.
    let Ok(Some(cfg)) = settings::load_config(data_dir) else {
        return out;
    };
    let entries = match (cfg.role, &cfg.cluster, &cfg.joined) {
        (Role::ControlPlane, Some(s), _) => inventory::control_plane_entries(s).unwrap_or_default(),
        (Role::Node, _, Some(j)) => inventory::node_entries(&j.name, &j.addresses),
        _ => Vec::new(),
    };
    out.extend(entries.into_iter().map(|e| {
        let links = match e.output {
            Output::Pair(l) => Some(l),
            Output::Kubeconfig {
                embed: false,
                links,
                ..
            } => Some(links),
            Output::Kubeconfig { embed: true, .. } => None,
        };
        (e.id.to_owned(), Signer::Ca(e.signer), links)
    }));
    out
}

/// The certificate (DER) of each CA the data directory holds (through its public path, so after
/// the CA's own recovery).
fn ca_certs(data_dir: &Path) -> Vec<(CaId, Vec<u8>)> {
    CaId::ALL
        .iter()
        .filter_map(|c| {
            let rel = c.links().cert?;
            let text = store::read_text(&data_dir.join(rel)).ok()?;
            let der = pki::inspect::pem_to_der(&text).ok()?;
            Some((*c, der))
        })
        .collect()
}

/// Checks version `v` of `id`: complete, parseable, key matching, signed by its CA, `tls.pem`
/// consistent. The reason when it is not.
fn check_version(
    st: &PairStore,
    id: &str,
    v: u64,
    signer: Signer,
    cas: &[(CaId, Vec<u8>)],
) -> Result<(), String> {
    let dir = st.entry_dir(id).join(v.to_string());
    let read =
        |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
    let cert_bytes = read("tls.crt")?;
    let key_bytes = zeroize::Zeroizing::new(read("tls.key")?);
    let pem_bytes = zeroize::Zeroizing::new(read("tls.pem")?);
    let cert_pem = std::str::from_utf8(&cert_bytes).map_err(|_| "tls.crt: not text".to_string())?;
    let key_pem = std::str::from_utf8(&key_bytes).map_err(|_| "tls.key: not text".to_string())?;
    let der = pki::inspect::pem_to_der(cert_pem).map_err(|e| format!("tls.crt: {e}"))?;
    pki::inspect::inspect_der(&der).map_err(|e| format!("tls.crt: {e}"))?;
    let key = PrivateKey::from_pem_bundle(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    match pki::inspect::key_matches(&der, &key) {
        Ok(true) => {}
        Ok(false) => return Err("the key does not match the certificate".into()),
        Err(e) => return Err(format!("tls.crt: {e}")),
    }
    let mut both = zeroize::Zeroizing::new(String::from(cert_pem));
    if !both.ends_with('\n') {
        both.push('\n');
    }
    both.push_str(key_pem);
    if pem_bytes.as_slice() != both.as_bytes() {
        return Err("tls.pem does not hold this certificate and key".into());
    }
    let candidates: Vec<&[u8]> = match signer {
        Signer::SelfSigned => vec![der.as_slice()],
        Signer::Ca(c) => cas
            .iter()
            .filter(|(id, _)| *id == c)
            .map(|(_, d)| d.as_slice())
            .collect(),
        Signer::Any => cas.iter().map(|(_, d)| d.as_slice()).collect(),
    };
    if candidates.is_empty() {
        return Err(match signer {
            Signer::Ca(c) => format!("its CA {} is missing", c.name()),
            _ => "no CA certificate to check it against".into(),
        });
    }
    let mut why = String::new();
    for ca in candidates {
        match pki::inspect::verify_signed_by(&der, ca) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => why = e.to_string(),
            Err(e) => why = e.to_string(),
        }
    }
    Err(format!("not signed by its CA: {why}"))
}

/// Checks and repairs one entry.
fn recover_entry(
    st: &PairStore,
    id: &str,
    signer: Signer,
    cas: &[(CaId, Vec<u8>)],
    out: &mut Vec<Recovery>,
) -> anyhow::Result<()> {
    let removed = st.cleanup_tmp(id)?;
    if removed > 0 {
        out.push(Recovery::RemovedLeftovers {
            dir: st.entry_dir(id),
            count: removed,
        });
    }
    let versions = st.versions(id)?;
    let current = st.current_version(id)?;
    let reason = match current {
        Some(v) if versions.contains(&v) => match check_version(st, id, v, signer, cas) {
            Ok(()) => return Ok(()),
            Err(why) => why,
        },
        Some(v) => format!("`current` points at version {v}, which does not exist"),
        None if versions.is_empty() => return Ok(()),
        None => "no `current` link".into(),
    };
    // The newest other version that is valid.
    let fallback = versions
        .iter()
        .rev()
        .copied()
        .filter(|v| Some(*v) != current)
        .find(|v| check_version(st, id, *v, signer, cas).is_ok());
    match fallback {
        Some(to) => {
            st.point_current(id, to)?;
            out.push(Recovery::RolledBack {
                id: id.to_owned(),
                from: current,
                to,
                reason,
            });
        }
        None => out.push(Recovery::NoValidPair {
            id: id.to_owned(),
            reason,
        }),
    }
    Ok(())
}

/// Makes the missing public paths of `id` when the store has a live pair for it and every other
/// public path is meshd's link (nothing in the way is ever replaced; that is `meshd init`'s call).
fn restore_links(
    st: &PairStore,
    id: &str,
    links: &PairLinks,
    out: &mut Vec<Recovery>,
) -> anyhow::Result<()> {
    if st.current_version(id)?.is_none() {
        return Ok(());
    }
    let states = st.link_states(id, links)?;
    let missing: Vec<PathBuf> = states
        .iter()
        .filter(|(_, s)| *s == PublicPath::Missing)
        .map(|(p, _)| st.data_dir().join(p))
        .collect();
    let others_linked = states
        .iter()
        .all(|(_, s)| matches!(s, PublicPath::Missing | PublicPath::Linked));
    if missing.is_empty() || !others_linked {
        return Ok(());
    }
    st.ensure_links(id, links)?;
    out.push(Recovery::RestoredLinks {
        id: id.to_owned(),
        paths: missing,
    });
    Ok(())
}

/// Checks every entry of the store of `data_dir` and repairs what a crash can leave (see the module
/// documentation). The caller holds the data directory's lock. Returns what was done; an empty list
/// when all was well.
///
/// Errors: I/O errors reading the store or switching `current` (with the path).
pub fn recover(data_dir: &Path) -> anyhow::Result<Vec<Recovery>> {
    recover_with(data_dir, true)
}

/// [`recover`] without restoring missing links: for `meshd init`, which restores them itself and
/// reports each in its own report.
pub(crate) fn recover_store(data_dir: &Path) -> anyhow::Result<Vec<Recovery>> {
    recover_with(data_dir, false)
}

fn recover_with(data_dir: &Path, links: bool) -> anyhow::Result<Vec<Recovery>> {
    let mut out = Vec::new();
    for d in WRITE_DIRS {
        let dir = data_dir.join(d);
        let count = store::cleanup_tmp_files(&dir)?;
        if count > 0 {
            out.push(Recovery::RemovedLeftovers { dir, count });
        }
    }
    let st = PairStore::new(data_dir);
    let known = signers(data_dir);
    let signer_of = |id: &str| {
        known
            .iter()
            .find(|(k, _, _)| k == id)
            .map(|(_, s, _)| *s)
            .unwrap_or(Signer::Any)
    };
    let ids = st.entries()?;
    // CAs first: the leaves are checked against the CAs' live certificates.
    let (cas_ids, leaves): (Vec<&String>, Vec<&String>) = ids
        .iter()
        .partition(|id| signer_of(id) == Signer::SelfSigned);
    for id in cas_ids {
        recover_entry(&st, id, Signer::SelfSigned, &[], &mut out)?;
    }
    let cas = ca_certs(data_dir);
    for id in leaves {
        recover_entry(&st, id, signer_of(id), &cas, &mut out)?;
    }
    for (id, _, l) in known.iter().filter(|_| links) {
        if let Some(l) = l {
            restore_links(&st, id, l, &mut out)?;
        }
    }
    Ok(out)
}

/// [`recover`] under the data directory's lock (waits for a running `meshd init`, `rotate`, ...).
pub fn recover_locked(data_dir: &Path) -> anyhow::Result<Vec<Recovery>> {
    let _lock = crate::init::lock_data_dir(data_dir)?;
    recover(data_dir)
}

/// How many leftovers `rs` removed.
pub fn leftovers_removed(rs: &[Recovery]) -> usize {
    rs.iter()
        .map(|r| match r {
            Recovery::RemovedLeftovers { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

/// Logs each roll-back and each entry left without a valid pair to stderr (the daemon's log), with
/// `what` as prefix (removed leftovers are routine and not logged).
pub fn log_all(what: &str, rs: &[Recovery]) {
    for r in rs {
        if !matches!(r, Recovery::RemovedLeftovers { .. }) {
            eprintln!("meshd {what}: start-up recovery: {r}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pki::ca::{CertificateAuthority, LeafProfile, Usage, Validity};
    use pki::keys::KeyAlgorithm;
    use std::fs;
    use std::time::{Duration, SystemTime};

    struct Fixture {
        dir: tempfile::TempDir,
        ca: CertificateAuthority,
    }

    fn links(id: &str) -> PairLinks {
        PairLinks {
            cert: Some(format!("pki/{id}.crt").into()),
            key: Some(format!("pki/{id}.key").into()),
            combined: None,
        }
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let now = SystemTime::now();
            let ca = CertificateAuthority::create(
                "kubernetes",
                KeyAlgorithm::EcdsaP256,
                Duration::from_secs(86400),
                now,
            )
            .unwrap();
            let st = PairStore::new(dir.path());
            st.write_pair(
                "ca",
                ca.cert_pem(),
                &ca.key().to_pem(),
                &CaId::Cluster.links(),
            )
            .unwrap();
            Fixture { dir, ca }
        }

        fn store(&self) -> PairStore {
            PairStore::new(self.dir.path())
        }

        /// Issues a leaf for `id` with `ca` and writes it as a new version.
        fn issue_with(&self, ca: &CertificateAuthority, id: &str) -> u64 {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
            let profile = LeafProfile {
                common_name: id.into(),
                organizations: vec![],
                dns_names: vec![],
                ip_addresses: vec![],
                usage: Usage::Client,
            };
            let cert = ca
                .issue(
                    &profile,
                    &key.public_key_spki_der(),
                    Validity {
                        lifetime: Duration::from_secs(3600),
                        backdate: pki::ca::DEFAULT_BACKDATE,
                    },
                    SystemTime::now(),
                )
                .unwrap();
            self.store()
                .write_pair(id, &cert.pem, &key.to_pem(), &links(id))
                .unwrap()
        }

        fn issue(&self, id: &str) -> u64 {
            self.issue_with(&self.ca, id)
        }

        fn version_file(&self, id: &str, v: u64, f: &str) -> PathBuf {
            self.store().entry_dir(id).join(v.to_string()).join(f)
        }

        fn live_cert(&self, id: &str) -> String {
            fs::read_to_string(self.dir.path().join(format!("pki/{id}.crt"))).unwrap()
        }
    }

    #[test]
    fn an_intact_store_is_left_alone() {
        let f = Fixture::new();
        f.issue("apiserver");
        f.issue("apiserver");
        assert_eq!(recover(f.dir.path()).unwrap(), vec![]);
        assert_eq!(f.store().current_version("apiserver").unwrap(), Some(2));
    }

    #[test]
    fn a_truncated_live_certificate_rolls_back_to_the_previous_version() {
        let f = Fixture::new();
        f.issue("apiserver");
        let old = f.live_cert("apiserver");
        f.issue("apiserver");
        let p = f.version_file("apiserver", 2, "tls.crt");
        let text = fs::read_to_string(&p).unwrap();
        fs::write(&p, &text[..text.len() / 2]).unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert!(
            matches!(&r[..], [Recovery::RolledBack { id, from: Some(2), to: 1, reason }] if id == "apiserver" && reason.contains("tls.crt")),
            "{r:?}"
        );
        assert_eq!(f.live_cert("apiserver"), old);
        // Nothing deleted: the damaged version is still there for a post-mortem.
        assert!(p.exists());
        assert_eq!(recover(f.dir.path()).unwrap(), vec![]);
    }

    #[test]
    fn a_mismatched_key_a_foreign_signature_or_a_torn_pem_roll_back() {
        let f = Fixture::new();
        // Key of another pair.
        f.issue("a");
        f.issue("a");
        f.issue("b");
        fs::copy(
            f.version_file("b", 1, "tls.key"),
            f.version_file("a", 2, "tls.key"),
        )
        .unwrap();
        // Signed by another CA.
        f.issue("c");
        let other = CertificateAuthority::create(
            "kubernetes",
            KeyAlgorithm::EcdsaP256,
            Duration::from_secs(86400),
            SystemTime::now(),
        )
        .unwrap();
        f.issue_with(&other, "c");
        // tls.pem of another version.
        f.issue("d");
        f.issue("d");
        fs::copy(
            f.version_file("d", 1, "tls.pem"),
            f.version_file("d", 2, "tls.pem"),
        )
        .unwrap();
        let r = recover(f.dir.path()).unwrap();
        let reasons: Vec<(String, String)> = r
            .iter()
            .map(|x| match x {
                Recovery::RolledBack {
                    id,
                    from: Some(2),
                    to: 1,
                    reason,
                } => (id.clone(), reason.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 3, "{r:?}");
        assert!(reasons[0].0 == "a" && reasons[0].1.contains("key does not match"));
        assert!(reasons[1].0 == "c" && reasons[1].1.contains("not signed by its CA"));
        assert!(reasons[2].0 == "d" && reasons[2].1.contains("tls.pem"));
        for id in ["a", "c", "d"] {
            assert_eq!(f.store().current_version(id).unwrap(), Some(1));
        }
    }

    #[test]
    fn a_dangling_or_missing_current_points_at_the_newest_valid_version() {
        let f = Fixture::new();
        f.issue("x");
        f.issue("x");
        let entry = f.store().entry_dir("x");
        // A `current` that points at a version that is gone.
        fs::remove_file(entry.join("current")).unwrap();
        std::os::unix::fs::symlink("7", entry.join("current")).unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert!(
            matches!(
                &r[..],
                [Recovery::RolledBack {
                    from: Some(7),
                    to: 2,
                    ..
                }]
            ),
            "{r:?}"
        );
        // No `current` at all.
        fs::remove_file(entry.join("current")).unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert!(
            matches!(
                &r[..],
                [Recovery::RolledBack {
                    from: None,
                    to: 2,
                    ..
                }]
            ),
            "{r:?}"
        );
        // The newest valid one is taken, skipping a damaged one.
        f.issue("x"); // 3, prunes 1
        f.issue("x"); // 4, prunes 2
        fs::write(f.version_file("x", 3, "tls.key"), "garbage").unwrap();
        fs::write(f.version_file("x", 4, "tls.crt"), "").unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert!(matches!(&r[..], [Recovery::NoValidPair { .. }]), "{r:?}");
        assert_eq!(f.store().current_version("x").unwrap(), Some(4));
        assert_eq!(
            f.store().versions("x").unwrap(),
            vec![3, 4],
            "nothing deleted"
        );
    }

    #[test]
    fn a_damaged_ca_rolls_back_before_its_leaves_are_checked() {
        let f = Fixture::new();
        f.issue("leaf");
        // A second version of the CA (same CA), then damage it.
        f.store()
            .write_pair(
                "ca",
                f.ca.cert_pem(),
                &f.ca.key().to_pem(),
                &CaId::Cluster.links(),
            )
            .unwrap();
        fs::write(
            f.version_file("ca", 2, "tls.crt"),
            "-----BEGIN CERTIFICATE-----\n",
        )
        .unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert!(
            matches!(&r[..], [Recovery::RolledBack { id, to: 1, .. }] if id == "ca"),
            "the leaf checks out against the rolled-back CA: {r:?}"
        );
    }

    #[test]
    fn missing_links_of_a_ca_are_restored_and_nothing_in_the_way_is_replaced() {
        let f = Fixture::new();
        let crt = f.dir.path().join("pki/ca.crt");
        let key = f.dir.path().join("pki/ca.key");
        fs::remove_file(&crt).unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert_eq!(
            r,
            vec![Recovery::RestoredLinks {
                id: "ca".into(),
                paths: vec![crt.clone()],
            }]
        );
        assert_eq!(fs::read_to_string(&crt).unwrap(), f.ca.cert_pem());
        // A plain file in place of the other half: left alone (init's business), nothing made.
        fs::remove_file(&crt).unwrap();
        fs::remove_file(&key).unwrap();
        fs::write(&key, "plain").unwrap();
        assert_eq!(recover(f.dir.path()).unwrap(), vec![]);
        assert!(!crt.exists());
        assert_eq!(fs::read_to_string(&key).unwrap(), "plain");
    }

    #[test]
    fn leftovers_are_removed_everywhere() {
        let f = Fixture::new();
        f.issue("x");
        let entry = f.store().entry_dir("x");
        fs::create_dir(entry.join(".tmp-stage-1-0-ab")).unwrap();
        fs::write(entry.join(".tmp-stage-1-0-ab/tls.crt"), "half").unwrap();
        std::os::unix::fs::symlink("9", entry.join(".tmp-current-1-1-cd")).unwrap();
        fs::write(f.dir.path().join(".tmp-meshd.json-1-2-ef"), "{").unwrap();
        let r = recover(f.dir.path()).unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r
            .iter()
            .all(|x| matches!(x, Recovery::RemovedLeftovers { .. })));
        assert_eq!(fs::read_dir(&entry).unwrap().count(), 2, "1 and current");
        assert_eq!(recover(f.dir.path()).unwrap(), vec![]);
    }
}
