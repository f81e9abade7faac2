//! `meshd status`: the registry as the control plane sees it, and this node's WireGuard device as
//! the device reports it (over the UAPI socket, like `wg show`).

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::registry::NodeRecord;

/// One node of the report.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Pod subnet.
    pub subnet: String,
    /// Registered WireGuard endpoint.
    pub endpoint: String,
    /// Whether it is this node.
    pub is_self: bool,
    /// Whether it is a control-plane node.
    pub control_plane: bool,
    /// Whether this node's device has it as a peer (`None` for itself).
    pub peer: Option<bool>,
    /// The endpoint the device currently uses (learned by roaming, or the registered one).
    pub current_endpoint: Option<String>,
    /// Latest handshake, RFC 3339.
    pub latest_handshake: Option<String>,
    /// Seconds since the latest handshake.
    pub handshake_age_seconds: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: Option<u64>,
    /// Bytes sent to it.
    pub tx_bytes: Option<u64>,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// This node's name.
    pub node: String,
    /// The interface.
    pub interface: String,
    /// Whether the interface's UAPI socket answered.
    pub device_up: bool,
    /// Why it did not, if it did not.
    pub device_error: Option<String>,
    /// Every registered node.
    pub nodes: Vec<NodeStatus>,
    /// Peers on the device that no registered node has (should be none).
    pub unknown_peers: Vec<String>,
}

/// Builds the report for the node whose data directory is `data_dir`.
pub async fn status(data_dir: &Path, ifname: &str) -> anyhow::Result<Status> {
    let cfg = crate::settings::require_config(data_dir)?;
    let me = match (&cfg.cluster, &cfg.joined) {
        (_, Some(j)) => j.name.clone(),
        (Some(c), None) => c.node_name.clone(),
        _ => String::new(),
    };
    let client = crate::join::node_client(data_dir)?;
    let nodes: Vec<NodeRecord> = client
        .call(hyper::Method::GET, "/v1/nodes", None::<&()>)
        .await?;
    let dev = overlay::wg::Uapi::connect(ifname).and_then(|u| u.get());
    let now = SystemTime::now();
    let (device_up, device_error, info) = match dev {
        Ok(i) => (true, None, Some(i)),
        Err(e) => (false, Some(e.to_string()), None),
    };
    let mut out = Vec::new();
    for n in &nodes {
        let is_self = n.name == me;
        let peer = info.as_ref().and_then(|i| {
            overlay::wg::PublicKey::from_base64(&n.wireguard_public_key)
                .ok()
                .and_then(|k| i.peer(&k).cloned())
        });
        let hs = peer.as_ref().and_then(|p| p.last_handshake());
        out.push(NodeStatus {
            name: n.name.clone(),
            subnet: n.subnet.to_string(),
            endpoint: n.endpoint.to_string(),
            is_self,
            control_plane: n.control_plane,
            peer: (!is_self && info.is_some()).then_some(peer.is_some()),
            current_endpoint: peer
                .as_ref()
                .and_then(|p| p.endpoint.map(|e| e.to_string())),
            latest_handshake: hs.map(pki::time::rfc3339),
            handshake_age_seconds: hs
                .and_then(|h| now.duration_since(h).ok())
                .map(|d| d.as_secs()),
            rx_bytes: peer.as_ref().map(|p| p.rx_bytes),
            tx_bytes: peer.as_ref().map(|p| p.tx_bytes),
        });
    }
    let unknown_peers = info
        .as_ref()
        .map(|i| {
            i.peers
                .iter()
                .map(|p| p.public_key.to_base64())
                .filter(|k| !nodes.iter().any(|n| &n.wireguard_public_key == k))
                .collect()
        })
        .unwrap_or_default();
    Ok(Status {
        node: me,
        interface: ifname.to_owned(),
        device_up,
        device_error,
        nodes: out,
        unknown_peers,
    })
}

/// The report as a table.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "node {}  interface {}: {}\n\n{:<20} {:<18} {:<22} {:<7} {:<20} {:>12} {:>12}\n",
        s.node,
        s.interface,
        if s.device_up {
            "up".to_string()
        } else {
            format!("DOWN ({})", s.device_error.clone().unwrap_or_default())
        },
        "NODE",
        "SUBNET",
        "ENDPOINT",
        "PEER",
        "LATEST HANDSHAKE",
        "RX BYTES",
        "TX BYTES"
    );
    for n in &s.nodes {
        let peer = if n.is_self {
            "(self)".to_string()
        } else {
            match n.peer {
                Some(true) => "yes".into(),
                Some(false) => "MISSING".into(),
                None => "-".into(),
            }
        };
        let hs = match n.handshake_age_seconds {
            Some(a) => format!("{a}s ago"),
            None if n.is_self => "".into(),
            None => "never".into(),
        };
        out.push_str(&format!(
            "{:<20} {:<18} {:<22} {:<7} {:<20} {:>12} {:>12}\n",
            n.name,
            n.subnet,
            n.current_endpoint
                .clone()
                .unwrap_or_else(|| n.endpoint.clone()),
            peer,
            hs,
            n.rx_bytes.map(|b| b.to_string()).unwrap_or_default(),
            n.tx_bytes.map(|b| b.to_string()).unwrap_or_default()
        ));
    }
    for k in &s.unknown_peers {
        out.push_str(&format!("unknown peer on the device: {k}\n"));
    }
    out
}
