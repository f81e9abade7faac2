//! A node whose certificates expired while it was offline, and `meshd join --rejoin`.
//!
//! An expired node certificate no longer authenticates the node (the control plane's TLS refuses
//! it), so the node cannot renew with it. [`check_node_certificate`] says so before any network
//! call, with the command that fixes it. `meshd join --rejoin` then gets new certificates for the
//! same node (same name, addresses, subnet and WireGuard key) with a new bootstrap token and a proof
//! that this machine still holds the node's registered identity key (see
//! `api/server/rejoin.rs` for the server's side): a signature by that key over
//! [`rejoin_message`].
//!
//! Crash safety: the new identity key is written to [`pending_identity_path`] before the request, so a
//! crash after the control plane bound the node to it, but before the certificates were written,
//! does not orphan the node: the next `--rejoin` (with a new token) proves with that key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context};
use base64::Engine;
use hyper::Method;
use pki::inventory::{self, Output};
use pki::keys::{KeyAlgorithm, PrivateKey};
use pki::store::{self, PairStore};
use serde::{Deserialize, Serialize};

use crate::api::client::{ApiClient, ClientError};
use crate::api::{InfoResponse, JoinResponse, NodeCerts, NodeCsrs};
use crate::join::{JoinSummary, MAX_CLOCK_SKEW};
use crate::material::{self, Found};
use crate::settings::{self, Role};
use crate::tls::{self, PinnedCaVerifier};

/// `POST /v1/join/rejoin`. `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
pub struct RejoinRequest {
    /// A bootstrap token, `id.secret` (consumed like a join's).
    pub token: String,
    /// The registered node's name.
    pub node_name: String,
    /// The node's registered identity key: its DER SubjectPublicKeyInfo, base64.
    pub identity_spki: String,
    /// A signature by that key over [`rejoin_message`], base64.
    pub proof: String,
    /// New CSRs (new keys), as for a join.
    pub csrs: NodeCsrs,
}

impl std::fmt::Debug for RejoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejoinRequest")
            .field("token", &"<redacted>")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// What the node's identity key signs: the cluster CA's pin (hex SHA-256 of its
/// SubjectPublicKeyInfo), the token id, the node name and the SHA-256 of each new CSR. Bound to one
/// cluster, one single-use token and these very CSRs, a proof cannot be replayed or moved to other
/// keys.
pub fn rejoin_message(
    ca_spki_sha256: &str,
    token_id: &str,
    node: &str,
    csrs: &NodeCsrs,
) -> Vec<u8> {
    let h = |s: &str| hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()));
    format!(
        "meshd-rejoin-v1\nca:{ca_spki_sha256}\ntoken:{token_id}\nnode:{node}\nkubelet-client:{}\nkubelet-serving:{}\nkube-proxy:{}\nnode-identity:{}\n",
        h(&csrs.kubelet_client),
        h(&csrs.kubelet_serving),
        h(&csrs.kube_proxy),
        h(&csrs.node_identity)
    )
    .into_bytes()
}

/// The node identity pair of a joined node's data directory, with its name and server.
fn node_identity(data_dir: &Path) -> anyhow::Result<(settings::JoinedNode, material::Material)> {
    let cfg = settings::require_config(data_dir)?;
    let (Role::Node, Some(j)) = (cfg.role, cfg.joined) else {
        bail!(
            "{} is not a joined node's data directory (`meshd join --rejoin` restores a node that joined before)",
            data_dir.display()
        );
    };
    let e = inventory::node_identity_entry(&j.name);
    let Output::Pair(links) = e.output else {
        bail!("internal error: meshd-node is not a pair");
    };
    match material::read_pair(data_dir, e.id, &links)? {
        Found::Present(m) => Ok((j, m)),
        _ => bail!(
            "{}: the node's identity certificate and key are missing: this machine cannot prove it \
             is node {:?}; remove the node on the control plane (`meshd node remove {}`) and join anew",
            data_dir.join(links.cert.unwrap_or_default()).display(),
            j.name,
            j.name
        ),
    }
}

/// On a joined node: fails, before any network call, when the node's identity certificate has
/// expired, saying when and what to run. Nothing to check on a control plane.
pub fn check_node_certificate(data_dir: &Path, now: SystemTime) -> anyhow::Result<()> {
    match settings::load_config(data_dir)? {
        Some(c) if c.role == Role::Node => {}
        _ => return Ok(()),
    }
    let (j, m) = node_identity(data_dir)?;
    let info = pki::inspect::inspect_pem(&m.cert_pem)
        .with_context(|| m.cert_path.display().to_string())?;
    if info.not_after < now {
        bail!(
            "your node certificate expired at {} ({}); the control plane no longer accepts it, so \
             this node cannot renew it. Get a new token (`meshd token create` on the control plane) \
             and run `meshd join --rejoin --server {} --token <TOKEN> --ca-hash <CA-HASH> --data-dir {}`",
            pki::time::rfc3339(info.not_after),
            m.cert_path.display(),
            j.server,
            data_dir.display()
        );
    }
    Ok(())
}

/// Options of `meshd join --rejoin`. `Debug` leaves the token out.
#[derive(Clone)]
pub struct RejoinOptions {
    /// The node's data directory (its `meshd.json` names the node).
    pub data_dir: PathBuf,
    /// The control plane's meshd API, `host:port`.
    pub server: String,
    /// A new bootstrap token.
    pub token: String,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo.
    pub ca_hash: String,
}

impl std::fmt::Debug for RejoinOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejoinOptions")
            .field("data_dir", &self.data_dir)
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .finish()
    }
}

/// Where a rejoin (see [`rejoin`]) keeps its new node identity key from before the request that binds
/// the node to it until its certificate is written. After a crash in between, `meshd join --rejoin`
/// proves with this key when the one in use is no longer registered. (A renewal through
/// `/v1/certs/renew` keeps its keys in [`crate::renew_pending::path`]; a rejoin proves with that
/// identity key too.)
pub fn pending_identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("pki/meshd/identity-pending.key")
}

const IDS: [&str; 4] = NodeCerts::IDS;

/// Restores a registered node's certificates (see the module documentation). Writes nothing unless
/// the control plane issued every certificate and each one checks out against the pinned CA.
pub async fn rejoin(o: &RejoinOptions) -> anyhow::Result<JoinSummary> {
    let token =
        crate::tokens::Token::parse(&o.token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    let verifier = Arc::new(PinnedCaVerifier::new(&o.ca_hash).map_err(|e| anyhow::anyhow!(e))?);
    let data_dir = o
        .data_dir
        .canonicalize()
        .with_context(|| o.data_dir.display().to_string())?;
    let _lock = crate::init::lock_data_dir(&data_dir)?;
    let recovered = crate::recover::recover(&data_dir)?;
    crate::recover::log_all("join --rejoin", &recovered);
    let (j, identity) = node_identity(&data_dir)?;
    let old_key = PrivateKey::from_pem_bundle(identity.key_pem.expose())
        .with_context(|| identity.key_path.display().to_string())?;
    let (_, wg_public) = crate::wgkey::load(&data_dir)?;

    let client = ApiClient::new(&o.server, tls::pinned_client_config(verifier.clone())?)?;
    let info: InfoResponse = client
        .call(Method::GET, "/v1/info", None::<&()>)
        .await
        .context("checking the control plane against --ca-hash")?;
    let ours = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skew = ours.abs_diff(info.server_time);
    if skew > MAX_CLOCK_SKEW.as_secs() {
        bail!(
            "this node's clock differs from the control plane's by {skew} s (more than {} s): fix the clocks (NTP) and rejoin",
            MAX_CLOCK_SKEW.as_secs()
        );
    }
    let Some(pinned_ca) = verifier.matched_ca() else {
        bail!("internal error: handshake passed without a pinned CA");
    };
    let ca_pin = pki::inspect::inspect_der(&pinned_ca)?.spki_sha256;

    let entries = inventory::node_entries(&j.name, &j.addresses);
    let entry = |id: &str| {
        entries
            .iter()
            .find(|e| e.id == id)
            .with_context(|| format!("internal error: no inventory entry {id}"))
    };
    // The new identity key is on disk before the control plane may bind the node to it: a crash
    // after the control plane's transaction but before the certificates are written leaves the
    // node holding its registered key, and the next rejoin proves with it.
    let pending = pending_identity_path(&data_dir);
    let pending_before = match std::fs::symlink_metadata(&pending) {
        Ok(_) => Some(
            PrivateKey::from_pem(store::read_key_file(&pending)?.expose())
                .with_context(|| pending.display().to_string())?,
        ),
        Err(_) => None,
    };
    let new_identity = match &pending_before {
        Some(k) => PrivateKey::from_pem(k.to_pem().expose())?,
        None => {
            let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
            store::write_atomic(&pending, k.to_pem().expose().as_bytes(), store::KEY_MODE)?;
            k
        }
    };
    let mut keys = Vec::new();
    let mut csrs = Vec::new();
    for id in IDS {
        let k = if id == "meshd-node" {
            PrivateKey::from_pem(new_identity.to_pem().expose())?
        } else {
            PrivateKey::generate(KeyAlgorithm::EcdsaP256)?
        };
        csrs.push(pki::csr::build_csr(&entry(id)?.profile, &k)?);
        keys.push(k);
    }
    let csrs = NodeCsrs {
        kubelet_client: csrs[0].clone(),
        kubelet_serving: csrs[1].clone(),
        kube_proxy: csrs[2].clone(),
        node_identity: csrs[3].clone(),
    };
    let msg = rejoin_message(&ca_pin, &token.id, &j.name, &csrs);
    let b64 = base64::engine::general_purpose::STANDARD;
    // The key the registry knows: the identity key in use, or the one an interrupted rejoin had
    // already bound the node to. A refused proof leaves the token unused, so the second try is free.
    // Or the identity a renewal interrupted after the control plane's answer had bound it to (when
    // the bundle kept for it expired before the node came back).
    let renewal_identity = if crate::renew_pending::exists(&data_dir) {
        store::read_key_file(&crate::renew_pending::path(&data_dir))
            .ok()
            .and_then(|t| crate::renew_pending::parse(t.expose()).ok())
            .and_then(|mut k| k.pop())
    } else {
        None
    };
    let provers: Vec<&PrivateKey> = std::iter::once(&old_key)
        .chain(&pending_before)
        .chain(&renewal_identity)
        .collect();
    let mut resp: Option<JoinResponse> = None;
    for (i, prover) in provers.iter().enumerate() {
        let req = RejoinRequest {
            token: o.token.clone(),
            node_name: j.name.clone(),
            identity_spki: b64.encode(prover.public_key_spki_der()),
            proof: b64.encode(pki::proof::sign(prover, &msg)?),
            csrs: csrs.clone(),
        };
        match client
            .call::<JoinResponse>(Method::POST, "/v1/join/rejoin", Some(&req))
            .await
        {
            Ok(r) => {
                resp = Some(r);
                break;
            }
            Err(ClientError::Status {
                status: 403,
                message,
            }) if message.starts_with("rejoin refused") && i + 1 < provers.len() => continue,
            Err(e) => return Err(e).context("rejoin"),
        }
    }
    let Some(resp) = resp else {
        bail!("internal error: no rejoin answer");
    };

    // Check what came back before writing anything.
    let ca_der = pki::inspect::pem_to_der(&resp.ca_pem)?;
    if ca_der != pinned_ca {
        bail!("the control plane returned a CA other than the one pinned by --ca-hash; nothing written");
    }
    let certs = resp.certs.in_order();
    for ((id, cert), key) in IDS.iter().zip(certs).zip(&keys) {
        crate::rotate::verify_issued(cert, key, &ca_der).with_context(|| id.to_string())?;
    }
    if resp.node.wireguard_public_key != wg_public {
        bail!(
            "the control plane registers WireGuard key {} for node {}, not this node's {}; nothing written",
            resp.node.wireguard_public_key,
            j.name,
            wg_public
        );
    }

    pki::failpoint!("rejoin::before_write");
    let mut files = Vec::new();
    let ca_path = data_dir.join("pki/ca.crt");
    store::write_atomic(&ca_path, resp.ca_pem.as_bytes(), store::CERT_MODE)?;
    let pairs = PairStore::new(&data_dir);
    for ((id, cert), key) in IDS.iter().zip(certs).zip(&keys) {
        let e = entry(id)?;
        // A new version; the expired one stays as the previous version.
        files.extend(crate::join::write_node_entry(
            &data_dir,
            &pairs,
            e,
            cert,
            key,
            &resp.cluster_name,
            &resp.apiserver_url,
            &ca_path,
        )?);
    }
    let mut cfg = settings::require_config(&data_dir)?;
    if let Some(jn) = cfg.joined.as_mut() {
        jn.server = o.server.clone();
        jn.subnet = resp.subnet;
        jn.network = resp.network.clone();
        jn.apiserver_url = resp.apiserver_url.clone();
        jn.cluster_name = resp.cluster_name.clone();
    }
    settings::save_config(&data_dir, &cfg)?;
    files.push(settings::path(&data_dir));
    // The new identity key is now the live pair's: the pending copy goes, and so do the keys of a
    // renewal that will never complete.
    std::fs::remove_file(&pending).with_context(|| pending.display().to_string())?;
    crate::renew_pending::discard(&data_dir)?;
    store::sync_dir(pending.parent().unwrap_or(&data_dir))?;
    Ok(JoinSummary {
        node_name: j.name,
        subnet: resp.subnet.to_string(),
        files,
        wireguard_public_key: wg_public,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csrs(x: &str) -> NodeCsrs {
        NodeCsrs {
            kubelet_client: format!("{x}1"),
            kubelet_serving: format!("{x}2"),
            kube_proxy: format!("{x}3"),
            node_identity: format!("{x}4"),
        }
    }

    #[test]
    fn the_message_binds_cluster_token_node_and_every_csr() {
        let base = rejoin_message("ca", "abcdef", "n1", &csrs("a"));
        assert_ne!(base, rejoin_message("cb", "abcdef", "n1", &csrs("a")));
        assert_ne!(base, rejoin_message("ca", "abcdeg", "n1", &csrs("a")));
        assert_ne!(base, rejoin_message("ca", "abcdef", "n2", &csrs("a")));
        let mut c = csrs("a");
        c.node_identity.push('x');
        assert_ne!(base, rejoin_message("ca", "abcdef", "n1", &c));
        // A name cannot smuggle a field of its own.
        assert_ne!(
            rejoin_message("ca", "abcdef", "n1\ntoken:x", &csrs("a")),
            rejoin_message("ca", "abcdef", "n1", &csrs("a"))
        );
    }
}
