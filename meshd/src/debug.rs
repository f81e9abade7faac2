//! `meshd debug ...` (hidden from help): helpers for the crash tests.
//!
//! * `reissue-all` re-issues every control-plane leaf the way a rotation does (new key, new
//!   certificate, written as a new version through [`PairStore`], embedded kubeconfigs rewritten
//!   atomically), without looking at expiry. The crash tests kill it at every failpoint.
//! * `recover` runs the start-up recovery ([`crate::recover`]) alone.
//! * `failpoints` says whether this build has failpoints and lists them.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use pki::ca::CertificateAuthority;
use pki::inventory::{self, CaId, CaSet, Output};
use pki::keys::PrivateKey;
use pki::store::{self, PairStore};
use serde::Serialize;

use crate::material::{self, Found};
use crate::settings::{self, Role};

/// One re-issued entry.
#[derive(Clone, Debug, Serialize)]
pub struct Reissued {
    /// Inventory id.
    pub id: String,
    /// The store version now live (`None` for an embedded kubeconfig, which has no versions).
    pub version: Option<u64>,
    /// Serial number of the new certificate (hex).
    pub serial: String,
}

fn load_ca(data_dir: &Path, id: CaId) -> anyhow::Result<CertificateAuthority> {
    match material::read_ca(data_dir, id)? {
        Found::Present(m) => {
            let key = PrivateKey::from_pem_bundle(m.key_pem.expose())
                .with_context(|| m.key_path.display().to_string())?;
            Ok(CertificateAuthority::from_parts(m.cert_pem, key)
                .with_context(|| m.cert_path.display().to_string())?)
        }
        _ => bail!("the {} CA is missing; run `meshd init`", id.name()),
    }
}

/// Re-issues every control-plane leaf of `data_dir` at `now`, under the data directory's lock.
/// Stops at the first error (the entries done so far keep their new pair, the others their old).
pub fn reissue_all(data_dir: &Path, now: SystemTime) -> anyhow::Result<Vec<Reissued>> {
    let _lock = crate::init::lock_data_dir(data_dir)?;
    let cfg = settings::require_config(data_dir)?;
    let s = match (cfg.role, cfg.cluster) {
        (Role::ControlPlane, Some(s)) => s,
        _ => bail!("{}: not a control plane", data_dir.display()),
    };
    let cas = CaSet {
        cluster: load_ca(data_dir, CaId::Cluster)?,
        etcd: load_ca(data_dir, CaId::Etcd)?,
        front_proxy: load_ca(data_dir, CaId::FrontProxy)?,
    };
    let st = PairStore::new(data_dir);
    let mut out = Vec::new();
    for entry in inventory::control_plane_entries(&s)? {
        let issued = inventory::issue_entry(&entry, &cas, s.key_algorithm, s.leaf_validity(), now)?;
        let key_pem = issued.key.to_pem();
        let version = match &entry.output {
            Output::Kubeconfig {
                file, embed: true, ..
            } => {
                let text =
                    crate::init::render_embedded(&s, &entry, &cas, &issued.cert.pem, &key_pem);
                let path: PathBuf = data_dir.join(file);
                store::write_atomic(&path, text.expose().as_bytes(), store::KEY_MODE)
                    .with_context(|| format!("{}: re-issuing", entry.id))?;
                None
            }
            Output::Pair(links) | Output::Kubeconfig { links, .. } => Some(
                st.write_pair(entry.id, &issued.cert.pem, &key_pem, links)
                    .with_context(|| format!("{}: re-issuing", entry.id))?,
            ),
        };
        let serial = pki::inspect::inspect_pem(&issued.cert.pem)
            .map(|i| i.serial)
            .unwrap_or_default();
        out.push(Reissued {
            id: entry.id.to_owned(),
            version,
            serial,
        });
    }
    Ok(out)
}
