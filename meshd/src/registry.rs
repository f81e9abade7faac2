//! meshd's node records (`/meshd/nodes/<name>`, versioned JSON): names, addresses, WireGuard keys,
//! endpoints and subnets. The peer set of the mesh follows these records.

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Store prefix of node records.
pub const PREFIX: &str = "/meshd/nodes/";
/// Format version of [`NodeRecord`].
pub const RECORD_VERSION: u32 = 1;

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Format version.
    pub version: u32,
    /// Node name (its certificates say `system:node:<name>`).
    pub name: String,
    /// The node's addresses (its kubelet serving certificate may name exactly these).
    pub addresses: Vec<IpAddr>,
    /// WireGuard public key, base64 as `wg pubkey` prints it.
    pub wireguard_public_key: String,
    /// WireGuard endpoint (address and UDP port) peers send to.
    pub endpoint: SocketAddr,
    /// The node's pod subnet.
    pub subnet: Ipv4Net,
    /// Whether it is a control-plane node.
    #[serde(default)]
    pub control_plane: bool,
    /// Registration time, Unix seconds.
    pub registered: u64,
    /// SHA-256 of the SubjectPublicKeyInfo of the node's meshd identity certificate: only a
    /// certificate with this key speaks for the node (a removed node's, or a kubelet's certificate
    /// with the same name, does not).
    #[serde(default)]
    pub identity_sha256: String,
    /// The last bundle a certificate renewal issued to the node, kept so that a node that crashed
    /// between the control plane's answer and writing it can still fetch it (see
    /// [`LastRenewal`]). Never sent to peers ([`NodeRecord::for_peers`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_renewal: Option<Box<LastRenewal>>,
}

/// What `POST /v1/certs/renew` issued last, in the node's record: the renewal binds the node to its
/// new identity key in the same write, so a node killed before it wrote the answer holds only its
/// previous identity. That identity may fetch this bundle (and nothing else) with
/// `GET /v1/certs/last`, as long as the bundle's identity certificate is valid; the node installs it
/// with the keys it kept aside before the request. Certificates are public: the bundle is useless
/// without those keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRenewal {
    /// SHA-256 of the SubjectPublicKeyInfo of the identity the renewal replaced.
    pub previous_identity_sha256: String,
    /// The certificates issued (PEM).
    pub certs: crate::api::NodeCerts,
    /// When, Unix seconds.
    pub issued: u64,
}

impl NodeRecord {
    /// The record as peers and listings see it: without [`NodeRecord::last_renewal`].
    pub fn for_peers(mut self) -> NodeRecord {
        self.last_renewal = None;
        self
    }
}

/// Store prefix of address claims: each node address belongs to one node.
pub const ADDRESSES_PREFIX: &str = "/meshd/addresses/";

/// The store key claiming address `ip` for a node.
pub fn address_key(ip: &IpAddr) -> String {
    format!("{ADDRESSES_PREFIX}{ip}")
}

/// The store key of node `name`.
pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Checks a WireGuard public key: base64 of exactly 32 bytes.
pub fn validate_wireguard_key(s: &str) -> Result<(), String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|_| format!("WireGuard public key {s:?} is not base64"))?;
    if bytes.len() != 32 {
        return Err(format!(
            "WireGuard public key decodes to {} bytes, expected 32",
            bytes.len()
        ));
    }
    Ok(())
}

/// Checks a node name: a lower-case DNS name of at most 63 characters per label, 253 in all.
pub fn validate_node_name(s: &str) -> Result<(), String> {
    if pki::inventory::is_dns_label_seq(s) {
        Ok(())
    } else {
        Err(format!(
            "node name {s:?} must be a lower-case DNS name (a-z, 0-9, '-', '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(validate_wireguard_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        assert!(validate_wireguard_key("AAAA").is_err());
        assert!(validate_wireguard_key("not base64!").is_err());
        assert!(validate_node_name("node-1.example").is_ok());
        for bad in ["", "Node", "-a", "a_b", &"a".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn records_without_a_kept_renewal_still_parse_and_peers_never_see_one() {
        let old = r#"{"version":1,"name":"n1","addresses":["10.0.0.1"],"wireguard_public_key":"k",
            "endpoint":"10.0.0.1:51820","subnet":"10.244.1.0/24","registered":1,"identity_sha256":"aa"}"#;
        let mut rec: NodeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.last_renewal, None);
        assert!(!serde_json::to_string(&rec)
            .unwrap()
            .contains("last_renewal"));
        rec.last_renewal = Some(Box::new(LastRenewal {
            previous_identity_sha256: "bb".into(),
            certs: crate::api::NodeCerts {
                kubelet_client: "c1".into(),
                kubelet_serving: "c2".into(),
                kube_proxy: "c3".into(),
                node_identity: "c4".into(),
            },
            issued: 2,
        }));
        let stored = serde_json::to_string(&rec).unwrap();
        let back: NodeRecord = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, rec);
        let public = back.for_peers();
        assert_eq!(public.last_renewal, None);
        assert_eq!(public.identity_sha256, "aa");
    }
}
