//! A node's certificate renewal that survives a crash between the control plane's answer and
//! writing it.
//!
//! `POST /v1/certs/renew` binds the node to its new identity key in the same write that issues the
//! bundle, so a node killed after that write but before it stored the answer would keep a valid old
//! identity that no longer speaks for it. To heal without an operator:
//!
//! 1. before the request the node writes its four new keys aside ([`keep`]: `pki/meshd/
//!    renew-pending.keys`, mode 0600, one atomic write), and removes them once the bundle is live
//!    ([`discard`]);
//! 2. the control plane keeps the bundle it issued, and the identity it replaced, in the node's
//!    registry record ([`crate::registry::LastRenewal`]); `GET /v1/certs/last` hands that bundle, and
//!    nothing else, to the previous identity while the bundle's identity certificate is valid;
//! 3. the next pass of `meshd rotate` or of the daemon finds the kept keys ([`complete`]), fetches the
//!    bundle with the identity it holds, checks that every certificate carries its kept key and
//!    chains to the CA, and installs the four pairs. When the control plane kept no bundle for those
//!    keys (the crash came before it answered), the keys are discarded and the node renews as usual.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pki::inspect;
use pki::inventory;
use pki::keys::{PrivateKey, SecretPem};
use pki::store;

use crate::api::client::ClientError;
use crate::api::NodeCerts;
use crate::material::{self, Found};
use crate::settings::{self, Role};

/// The node's entries in the order of [`NodeCerts`] (and of the kept keys).
pub const IDS: [&str; 4] = NodeCerts::IDS;

/// Where a node keeps the keys of a renewal in flight.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("pki/meshd/renew-pending.keys")
}

/// Writes the four new keys (in [`IDS`] order) aside before the renewal request.
pub fn keep(data_dir: &Path, keys: &[PrivateKey]) -> anyhow::Result<()> {
    if keys.len() != IDS.len() {
        bail!(
            "internal error: {} keys for {} entries",
            keys.len(),
            IDS.len()
        );
    }
    let mut text = String::new();
    for (id, k) in IDS.iter().zip(keys) {
        text.push_str("# ");
        text.push_str(id);
        text.push('\n');
        text.push_str(k.to_pem().expose());
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    let text = SecretPem::new(text);
    let p = path(data_dir);
    store::write_atomic(&p, text.expose().as_bytes(), store::KEY_MODE)
        .with_context(|| format!("{}: keeping the new keys aside", p.display()))?;
    Ok(())
}

/// Removes the kept keys (once the bundle is live, or when no renewal was bound to them).
pub fn discard(data_dir: &Path) -> anyhow::Result<()> {
    let p = path(data_dir);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot remove", p.display())),
    }
    if let Some(d) = p.parent() {
        store::sync_dir(d)?;
    }
    Ok(())
}

/// Whether keys of an unfinished renewal are kept.
pub fn exists(data_dir: &Path) -> bool {
    std::fs::symlink_metadata(path(data_dir)).is_ok()
}

/// Parses the kept keys (pure): one `# <id>` line then a PEM key, per entry of [`IDS`], in order.
pub fn parse(text: &str) -> anyhow::Result<Vec<PrivateKey>> {
    let mut keys = Vec::new();
    let mut sections = text.split("# ").filter(|s| !s.trim().is_empty());
    for id in IDS {
        let s = sections
            .next()
            .with_context(|| format!("no key for {id}"))?;
        let (name, pem) = s
            .split_once('\n')
            .with_context(|| format!("{id}: no key"))?;
        if name.trim() != id {
            bail!("expected the key of {id}, found {:?}", name.trim());
        }
        keys.push(PrivateKey::from_pem(pem).with_context(|| format!("the key of {id}"))?);
    }
    if sections.next().is_some() {
        bail!("more than {} keys", IDS.len());
    }
    Ok(keys)
}

/// Completes a renewal interrupted after the control plane's answer (see the module
/// documentation). The caller holds the data directory's lock. `Ok(None)`: nothing was kept;
/// `Ok(Some(what))`: what was done. An error (the control plane unreachable...) keeps the keys for
/// the next pass.
pub async fn complete(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let p = path(data_dir);
    if !exists(data_dir) {
        return Ok(None);
    }
    let keys = match store::read_key_file(&p)
        .map_err(anyhow::Error::from)
        .and_then(|t| parse(t.expose()))
    {
        Ok(k) => k,
        Err(e) => {
            discard(data_dir)?;
            return Ok(Some(format!(
                "{}: discarded unreadable keys of an interrupted renewal ({e:#})",
                p.display()
            )));
        }
    };
    let cfg = settings::require_config(data_dir)?;
    let j = match (cfg.role, &cfg.joined) {
        (Role::Node, Some(j)) => j.clone(),
        _ => bail!("{}: not a joined node", data_dir.display()),
    };
    let ca_path = data_dir.join("pki/ca.crt");
    let ca_der = inspect::pem_to_der(&store::read_text(&ca_path)?)
        .with_context(|| format!("{}: the cluster CA", ca_path.display()))?;
    // Authenticated by the identity the node holds: the previous one when the crash came before
    // the identity was written, the new one when it came after.
    let client = crate::join::node_client(data_dir)?;
    let certs: NodeCerts = match client
        .call::<NodeCerts>(hyper::Method::GET, "/v1/certs/last", None::<&()>)
        .await
    {
        Ok(c) => c,
        Err(ClientError::Status { status: 404, .. }) => {
            discard(data_dir)?;
            return Ok(Some(
                "discarded the keys of an interrupted renewal the control plane never answered"
                    .into(),
            ));
        }
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context("GET /v1/certs/last (completing an interrupted renewal)"))
        }
    };
    let got = certs.in_order();
    let mut matching = 0;
    for (cert, key) in got.iter().zip(&keys) {
        let der = inspect::pem_to_der(cert)?;
        if inspect::key_matches(&der, key)? {
            matching += 1;
        }
    }
    if matching == 0 {
        // The kept bundle is an earlier renewal's: these keys were never bound.
        discard(data_dir)?;
        return Ok(Some(
            "discarded the keys of an interrupted renewal the control plane never answered".into(),
        ));
    }
    // Check everything before writing anything.
    for ((id, cert), key) in IDS.iter().zip(got).zip(&keys) {
        crate::rotate::verify_issued(cert, key, &ca_der)
            .with_context(|| format!("{id}: the control plane's last renewal"))?;
    }
    let entries = inventory::node_entries(&j.name, &j.addresses);
    let mut installed = Vec::new();
    // The identity first, as a renewal writes it.
    for i in [3usize, 0, 1, 2] {
        let id = IDS[i];
        let entry = entries
            .iter()
            .find(|e| e.id == id)
            .with_context(|| format!("internal error: no node entry {id}"))?;
        let (live, managed) = match material::read_entry(data_dir, entry)? {
            Found::Present(m) => (Some(m.cert_pem.clone()), m.managed),
            _ => (None, true),
        };
        if live.as_deref().map(str::trim) == Some(got[i].trim()) {
            continue;
        }
        crate::rotate::install_pair(data_dir, entry, managed, got[i], &keys[i].to_pem())
            .with_context(|| format!("{id}: installing the last renewal"))?;
        installed.push(id);
    }
    discard(data_dir)?;
    Ok(Some(format!(
        "completed a renewal interrupted after the control plane's answer: installed {}",
        if installed.is_empty() {
            "nothing (all was live)".to_string()
        } else {
            installed.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pki::keys::KeyAlgorithm;

    #[test]
    fn kept_keys_round_trip_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pki/meshd")).unwrap();
        let keys: Vec<PrivateKey> = (0..4)
            .map(|_| PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap())
            .collect();
        assert!(!exists(dir.path()));
        keep(dir.path(), &keys).unwrap();
        assert!(exists(dir.path()));
        let text = store::read_key_file(&path(dir.path())).unwrap();
        let back = parse(text.expose()).unwrap();
        for (a, b) in keys.iter().zip(&back) {
            assert_eq!(a.public_key_spki_der(), b.public_key_spki_der());
        }
        assert!(parse("").is_err());
        assert!(parse(&text.expose().replace("# kubelet-serving", "# other")).is_err());
        assert!(parse(&format!("{}# extra\nx\n", text.expose())).is_err());
        assert!(keep(dir.path(), &keys[..3]).is_err());
        discard(dir.path()).unwrap();
        assert!(!exists(dir.path()));
        discard(dir.path()).unwrap();
    }
}
