//! `meshd join`, on the joining node: check the server's CA against the pin before revealing
//! anything, make every private key here, send CSRs, and write what comes back.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use hyper::Method;
use pki::csr;
use pki::inventory::{self, Entry, Output};
use pki::keys::{KeyAlgorithm, PrivateKey};
use pki::kubeconfig::{self, ClientCredential, KubeconfigSpec, PemSource};
use pki::store::{self, PairStore};
use serde::Serialize;

use crate::api::client::ApiClient;
use crate::api::{InfoResponse, JoinRequest, JoinResponse, NodeCerts, NodeCsrs};
use crate::settings::{self, JoinedNode, MeshdConfig, Role};
use crate::tls::{self, PinnedCaVerifier};

/// Largest clock difference tolerated between node and control plane (certificates are backdated
/// 5 minutes; beyond this they could be "not yet valid" here).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(4 * 60);

/// Options of `meshd join`. `Debug` leaves the token out.
#[derive(Clone)]
pub struct JoinOptions {
    /// Data directory of this node.
    pub data_dir: PathBuf,
    /// The control plane's meshd API, `host:port`.
    pub server: String,
    /// `id.secret`.
    pub token: String,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo.
    pub ca_hash: String,
    /// This node's name.
    pub node_name: String,
    /// This node's address.
    pub advertise_address: IpAddr,
    /// WireGuard UDP port.
    pub wireguard_port: u16,
    /// WireGuard endpoint other nodes use (default: advertise address and port).
    pub endpoint: Option<SocketAddr>,
}

impl std::fmt::Debug for JoinOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinOptions")
            .field("data_dir", &self.data_dir)
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .field("node_name", &self.node_name)
            .field("advertise_address", &self.advertise_address)
            .finish_non_exhaustive()
    }
}

/// What join did.
#[derive(Clone, Debug, Serialize)]
pub struct JoinSummary {
    /// Node name.
    pub node_name: String,
    /// Pod subnet.
    pub subnet: String,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// WireGuard public key.
    pub wireguard_public_key: String,
}

fn entry<'a>(entries: &'a [Entry], id: &str) -> anyhow::Result<&'a Entry> {
    entries
        .iter()
        .find(|e| e.id == id)
        .with_context(|| format!("internal error: no inventory entry {id}"))
}

/// Runs the join.
pub async fn join(o: &JoinOptions) -> anyhow::Result<JoinSummary> {
    crate::registry::validate_node_name(&o.node_name)
        .map_err(|e| anyhow::anyhow!("--node-name: {e}"))?;
    crate::tokens::Token::parse(&o.token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    let verifier = Arc::new(PinnedCaVerifier::new(&o.ca_hash).map_err(|e| anyhow::anyhow!(e))?);
    if let Some(prev) = settings::load_config(&o.data_dir)? {
        match prev.role {
            Role::Node => bail!(
                "{} already belongs to node {:?}, joined to {}: nothing done (a node joins once; if its certificates expired, use `meshd join --rejoin`)",
                o.data_dir.display(),
                prev.joined.as_ref().map(|j| j.name.as_str()).unwrap_or(""),
                prev.joined.as_ref().map(|j| j.server.as_str()).unwrap_or("")
            ),
            Role::ControlPlane => bail!(
                "{} holds a control plane (`meshd init` ran there); join from another data directory",
                o.data_dir.display()
            ),
        }
    }
    store::ensure_dir(&o.data_dir)?;
    let data_dir = o
        .data_dir
        .canonicalize()
        .with_context(|| o.data_dir.display().to_string())?;
    let _lock = crate::init::lock_data_dir(&data_dir)?;

    let client = ApiClient::new(&o.server, tls::pinned_client_config(verifier.clone())?)?;
    // First call: proves the pin (nothing secret is sent) and compares clocks.
    let info: InfoResponse = client
        .call(Method::GET, "/v1/info", None::<&()>)
        .await
        .context("checking the control plane against --ca-hash")?;
    let now = SystemTime::now();
    let ours = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skew = ours.abs_diff(info.server_time);
    if skew > MAX_CLOCK_SKEW.as_secs() {
        bail!(
            "this node's clock differs from the control plane's by {skew} s (more than {} s): fix the clocks (NTP) and join again",
            MAX_CLOCK_SKEW.as_secs()
        );
    }
    let Some(pinned_ca) = verifier.matched_ca() else {
        bail!("internal error: handshake passed without a pinned CA");
    };

    let addresses = vec![o.advertise_address];
    let entries = inventory::node_entries(&o.node_name, &addresses);
    let ids = NodeCerts::IDS;
    let mut keys = Vec::new();
    let mut csrs = Vec::new();
    for id in ids {
        let e = entry(&entries, id)?;
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        csrs.push(csr::build_csr(&e.profile, &k)?);
        keys.push(k);
    }
    let wg_path = data_dir.join("wireguard/private.key");
    let (wg_private, wg_public) = crate::wgkey::generate()?;
    let endpoint = o
        .endpoint
        .unwrap_or(SocketAddr::new(o.advertise_address, o.wireguard_port));
    let req = JoinRequest {
        token: o.token.clone(),
        node_name: o.node_name.clone(),
        addresses: addresses.clone(),
        wireguard_public_key: wg_public.clone(),
        endpoint,
        csrs: NodeCsrs {
            kubelet_client: csrs[0].clone(),
            kubelet_serving: csrs[1].clone(),
            kube_proxy: csrs[2].clone(),
            node_identity: csrs[3].clone(),
        },
    };
    let resp: JoinResponse = client
        .call(Method::POST, "/v1/join", Some(&req))
        .await
        .context("join")?;

    // Check what came back with our own eyes before writing anything.
    let ca_der = pki::inspect::pem_to_der(&resp.ca_pem)?;
    if ca_der != pinned_ca {
        bail!("the control plane returned a CA other than the one pinned by --ca-hash; nothing written");
    }
    let certs = resp.certs.in_order();
    for ((id, cert), key) in ids.iter().zip(certs).zip(&keys) {
        crate::rotate::verify_issued(cert, key, &ca_der).with_context(|| id.to_string())?;
    }

    let mut files = Vec::new();
    let ca_path = data_dir.join("pki/ca.crt");
    store::write_atomic(&ca_path, resp.ca_pem.as_bytes(), store::CERT_MODE)?;
    files.push(ca_path.clone());
    let pairs = PairStore::new(&data_dir);
    for ((id, cert), key) in ids.iter().zip(certs).zip(&keys) {
        let e = entry(&entries, id)?;
        files.extend(write_node_entry(
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
    store::write_atomic(&wg_path, wg_private.expose().as_bytes(), store::KEY_MODE)?;
    store::write_atomic(
        &data_dir.join("wireguard/public.key"),
        format!("{wg_public}\n").as_bytes(),
        store::CERT_MODE,
    )?;
    files.push(wg_path);
    // Last: the marker that this directory belongs to a joined node.
    settings::save_config(
        &data_dir,
        &MeshdConfig {
            version: settings::FORMAT_VERSION,
            role: Role::Node,
            cluster: None,
            store: Default::default(),
            joined: Some(JoinedNode {
                name: o.node_name.clone(),
                server: o.server.clone(),
                addresses,
                endpoint,
                subnet: resp.subnet,
                network: resp.network.clone(),
                apiserver_url: resp.apiserver_url.clone(),
                cluster_name: resp.cluster_name.clone(),
            }),
            hooks: Default::default(),
        },
    )?;
    files.push(settings::path(&data_dir));
    Ok(JoinSummary {
        node_name: o.node_name.clone(),
        subnet: resp.subnet.to_string(),
        files,
        wireguard_public_key: wg_public,
    })
}

/// Writes one certificate of a node's bundle: a new version of its pair (the previous one stays as
/// the previous version) and, for an entry that has one, the kubeconfig that references it. Returns
/// the file a person would look at (the kubeconfig or the certificate). Shared by `join` and
/// `join --rejoin`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_node_entry(
    data_dir: &Path,
    pairs: &PairStore,
    e: &Entry,
    cert_pem: &str,
    key: &PrivateKey,
    cluster_name: &str,
    apiserver_url: &str,
    ca_path: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    let links = match &e.output {
        Output::Pair(l) | Output::Kubeconfig { links: l, .. } => l.clone(),
    };
    pairs.write_pair(e.id, cert_pem, &key.to_pem(), &links)?;
    if let Output::Kubeconfig { file, links, .. } = &e.output {
        let cred = data_dir.join(links.combined.clone().unwrap_or_default());
        let text = kubeconfig::render(&KubeconfigSpec {
            cluster_name,
            server: apiserver_url,
            ca: PemSource::File(ca_path),
            user: &e.profile.common_name,
            credential: ClientCredential::Files {
                cert: &cred,
                key: &cred,
            },
        });
        let p = data_dir.join(file);
        store::write_atomic(&p, text.expose().as_bytes(), store::KEY_MODE)?;
        return Ok(Some(p));
    }
    Ok(links.cert.as_ref().map(|c| data_dir.join(c)))
}

/// An mTLS client of the control plane for a joined node (its node identity) or a control plane's
/// admin (its `meshd-admin` certificate).
pub fn node_client(data_dir: &Path) -> anyhow::Result<ApiClient> {
    let cfg = settings::require_config(data_dir)?;
    // An expired node certificate is refused by the control plane: say so before dialling it.
    crate::rejoin::check_node_certificate(data_dir, SystemTime::now())?;
    let ca = store::read_text(&data_dir.join("pki/ca.crt"))?;
    let (server, id, links) = match cfg.role {
        Role::Node => {
            let j = cfg
                .joined
                .context("meshd.json: a node without its join record")?;
            let e = inventory::node_identity_entry(&j.name);
            (j.server, e.id, e.output)
        }
        Role::ControlPlane => {
            let s = cfg
                .cluster
                .context("meshd.json: a control plane without cluster settings")?;
            let server = match s.advertise_address {
                IpAddr::V4(a) => format!("{a}:{}", s.api_port),
                IpAddr::V6(a) => format!("[{a}]:{}", s.api_port),
            };
            let e = inventory::control_plane_entries(&s)?
                .into_iter()
                .find(|e| e.id == "meshd-admin")
                .context("internal error: no meshd-admin entry")?;
            (server, e.id, e.output)
        }
    };
    let Output::Pair(links) = links else {
        bail!("internal error: {id} is not a pair");
    };
    let m = match crate::material::read_pair(data_dir, id, &links)? {
        crate::material::Found::Present(m) => m,
        _ => bail!(
            "{}: missing; run `meshd init` again to complete the data directory",
            data_dir.join(links.cert.unwrap_or_default()).display()
        ),
    };
    let tls = tls::client_config(&ca, &m.cert_pem, m.key_pem.expose())?;
    Ok(ApiClient::new(&server, tls)?)
}
