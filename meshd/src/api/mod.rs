//! The meshd API: JSON over HTTP/1.1 over TLS (rustls), served by `meshd run` on the control plane.
//!
//! | call | authenticated by |
//! |---|---|
//! | `GET /v1/info` | nothing (server time and cluster name; only after the client checked the CA pin) |
//! | `POST /v1/join` | a bootstrap token in the body |
//! | `POST /v1/join/rejoin` | a bootstrap token and a signature by the node's registered identity key (its certificate may have expired) |
//! | `POST /v1/lease/renew`, `POST /v1/certs/renew`, `GET /v1/nodes`, `GET /v1/peers/watch` | the node's client certificate (`system:node:<name>`, O `system:nodes`) |
//! | `GET /v1/certs/last` | the node's registered identity, or the one its last renewal replaced (while that bundle is valid) |
//! | `POST/GET /v1/tokens`, `DELETE /v1/tokens/<id>`, `DELETE /v1/nodes/<name>` | an admin client certificate (O `meshd:admins`) |
//!
//! Request bodies are capped at [`MAX_BODY`] before parsing.

use std::net::{IpAddr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::registry::NodeRecord;

pub mod client;
pub mod server;

/// Largest request body accepted, checked before parsing.
pub const MAX_BODY: usize = 64 * 1024;
/// The organization of admin client certificates.
pub const ADMIN_GROUP: &str = "meshd:admins";

/// `GET /v1/info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoResponse {
    /// Cluster name.
    pub cluster_name: String,
    /// The server's clock, Unix seconds (the node refuses to join on a large skew).
    pub server_time: u64,
    /// API version.
    pub api_version: String,
}

/// The CSRs a joining node sends (PEM).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeCsrs {
    /// kubelet client (`system:node:<name>`, O `system:nodes`).
    pub kubelet_client: String,
    /// kubelet serving (same identity; SANs: the node's name and addresses).
    pub kubelet_serving: String,
    /// kube-proxy (`system:kube-proxy`, O `system:node-proxier`).
    pub kube_proxy: String,
    /// meshd node identity (`system:node:<name>`, O `system:nodes`), for every later API call.
    pub node_identity: String,
}

/// The certificates issued for [`NodeCsrs`] (PEM), same fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCerts {
    /// kubelet client.
    pub kubelet_client: String,
    /// kubelet serving.
    pub kubelet_serving: String,
    /// kube-proxy.
    pub kube_proxy: String,
    /// meshd node identity.
    pub node_identity: String,
}

impl NodeCerts {
    /// The inventory entry ids of a node's bundle, in the order of the fields (and of the CSRs and
    /// keys a node makes for it).
    pub const IDS: [&'static str; 4] = [
        "kubelet.conf",
        "kubelet-serving",
        "kube-proxy.conf",
        "meshd-node",
    ];

    /// The four certificates, in [`NodeCerts::IDS`] order.
    pub fn in_order(&self) -> [&str; 4] {
        [
            &self.kubelet_client,
            &self.kubelet_serving,
            &self.kube_proxy,
            &self.node_identity,
        ]
    }
}

/// `POST /v1/join`. `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// `id.secret`.
    pub token: String,
    /// The node's name.
    pub node_name: String,
    /// The node's addresses.
    pub addresses: Vec<IpAddr>,
    /// Its WireGuard public key (base64).
    pub wireguard_public_key: String,
    /// Its WireGuard endpoint.
    pub endpoint: SocketAddr,
    /// Its CSRs.
    pub csrs: NodeCsrs,
}

/// The answer to a join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The node as registered.
    pub node: NodeRecord,
    /// Its certificates.
    pub certs: NodeCerts,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The node's pod subnet.
    pub subnet: Ipv4Net,
    /// The network configuration (flannel's format).
    pub network: overlay::NetworkConfig,
    /// The API server URL for kubeconfigs.
    pub apiserver_url: String,
    /// The cluster name.
    pub cluster_name: String,
}

/// One line of the `GET /v1/peers/watch` stream (newline-delimited JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PeerEvent {
    /// Every registered node at `revision` (sent first, and again after the server had to re-list).
    Snapshot {
        /// Store revision of the listing.
        revision: i64,
        /// The nodes.
        nodes: Vec<NodeRecord>,
    },
    /// A node was registered or changed.
    Put {
        /// Store revision.
        revision: i64,
        /// Its new record.
        node: NodeRecord,
    },
    /// A node was removed.
    Delete {
        /// Store revision.
        revision: i64,
        /// Its name.
        name: String,
    },
    /// Nothing happened for a while; the stream is alive.
    Heartbeat,
}

/// `POST /v1/lease/renew`: the node's current subnet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewLeaseRequest {
    /// The subnet the node holds.
    pub subnet: Ipv4Net,
}

/// The answer to a lease renewal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewLeaseResponse {
    /// The subnet the node holds now (differs when the old lease expired and was reassigned).
    pub subnet: Ipv4Net,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    /// Lifetime, seconds.
    pub ttl_secs: u64,
    /// Uses (`None`: unlimited until expiry).
    pub uses: Option<u32>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown. `Debug` leaves it out.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenCreateResponse {
    /// `id.secret`.
    pub token: String,
    /// The CA pin, `sha256:<hex>`.
    pub ca_hash: String,
    /// The API address to join (`host:port`).
    pub server: String,
    /// Expiry, RFC 3339.
    pub expires: String,
}

/// A token as listed (no secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Id.
    pub id: String,
    /// Description.
    pub description: String,
    /// Expiry, RFC 3339.
    pub expires: String,
    /// Remaining uses, `None` = unlimited.
    pub uses_left: Option<u32>,
    /// Nodes admitted.
    pub used: u32,
    /// Revoked (kept until it expires).
    #[serde(default)]
    pub revoked: bool,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token", &"<redacted>")
            .field("node_name", &self.node_name)
            .field("addresses", &self.addresses)
            .field("wireguard_public_key", &self.wireguard_public_key)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TokenCreateResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCreateResponse")
            .field("token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .field("server", &self.server)
            .field("expires", &self.expires)
            .finish()
    }
}
