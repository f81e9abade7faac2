//! The peer set as a diff (innernet's `PeerDiff`): what the registry wants versus what the WireGuard
//! device has, as a list of changes applied incrementally. Pure.
//!
//! Rules (overlay.md):
//! * unchanged peers are left alone (their sessions live on);
//! * an endpoint is written only when the *registry's* endpoint changed since it was last applied, so
//!   an endpoint WireGuard learned by roaming is never overwritten by stale data (squat/kilo#34);
//! * a node whose key changed is replaced: the old peer removed and the new one added with its
//!   AllowedIPs in one step (an IP range may sit on one peer only);
//! * a node gone from the registry loses its peer;
//! * per registry event the work is one node's, whatever the cluster size ([`change_for`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// A peer as the registry describes it (one per remote node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredPeer {
    /// The node's name.
    pub node: String,
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Its registered endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Its pod subnet (and mesh address inside it).
    pub allowed_ips: Vec<Ipv4Net>,
    /// Persistent keepalive, seconds (0 = off).
    pub persistent_keepalive: u16,
}

/// A change to the device's peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Add a new peer with everything.
    Add(DesiredPeer),
    /// Remove the peer with this key.
    Remove {
        /// The node it belonged to.
        node: String,
        /// Its public key.
        public_key: String,
    },
    /// Change some fields of an existing peer (same key): `None` fields are left as they are.
    Update {
        /// The node.
        node: String,
        /// Its public key.
        public_key: String,
        /// A new endpoint (only when the registry's endpoint changed).
        endpoint: Option<SocketAddr>,
        /// New AllowedIPs (replacing the old set).
        allowed_ips: Option<Vec<Ipv4Net>>,
        /// A new keepalive.
        persistent_keepalive: Option<u16>,
    },
}

/// The change that brings the peer of `node` from `applied` (what was last applied for it, `None` if
/// it has no peer) to `desired` (`None` if the node is gone). `None` when nothing changes.
pub fn change_for(applied: Option<&DesiredPeer>, desired: Option<&DesiredPeer>) -> Vec<PeerChange> {
    match (applied, desired) {
        (None, None) => vec![],
        (None, Some(d)) => vec![PeerChange::Add(d.clone())],
        (Some(a), None) => vec![PeerChange::Remove {
            node: a.node.clone(),
            public_key: a.public_key.clone(),
        }],
        (Some(a), Some(d)) if a.public_key != d.public_key => vec![
            PeerChange::Remove {
                node: a.node.clone(),
                public_key: a.public_key.clone(),
            },
            PeerChange::Add(d.clone()),
        ],
        (Some(a), Some(d)) => {
            let endpoint = (a.endpoint != d.endpoint).then_some(d.endpoint).flatten();
            let mut a_ips = a.allowed_ips.clone();
            let mut d_ips = d.allowed_ips.clone();
            a_ips.sort();
            d_ips.sort();
            let allowed_ips = (a_ips != d_ips).then(|| d.allowed_ips.clone());
            let persistent_keepalive = (a.persistent_keepalive != d.persistent_keepalive)
                .then_some(d.persistent_keepalive);
            if endpoint.is_none() && allowed_ips.is_none() && persistent_keepalive.is_none() {
                vec![]
            } else {
                vec![PeerChange::Update {
                    node: d.node.clone(),
                    public_key: d.public_key.clone(),
                    endpoint,
                    allowed_ips,
                    persistent_keepalive,
                }]
            }
        }
    }
}

/// The full diff between what was applied and what is desired, both keyed by node name (used at
/// start and after a re-list). Removals come first, so an AllowedIPs range moving between peers is
/// freed before it is claimed.
pub fn diff(
    applied: &BTreeMap<String, DesiredPeer>,
    desired: &BTreeMap<String, DesiredPeer>,
) -> Vec<PeerChange> {
    let mut removes = Vec::new();
    let mut rest = Vec::new();
    for (node, a) in applied {
        if !desired.contains_key(node) {
            removes.extend(change_for(Some(a), None));
        }
    }
    for (node, d) in desired {
        for c in change_for(applied.get(node), Some(d)) {
            match c {
                PeerChange::Remove { .. } => removes.push(c),
                other => rest.push(other),
            }
        }
    }
    removes.extend(rest);
    removes
}

/// Applies `changes` to the record of what is applied (after the device accepted them).
pub fn record(applied: &mut BTreeMap<String, DesiredPeer>, changes: &[PeerChange]) {
    for c in changes {
        match c {
            PeerChange::Add(d) => {
                applied.insert(d.node.clone(), d.clone());
            }
            PeerChange::Remove { node, public_key } => {
                if applied.get(node).map(|p| &p.public_key) == Some(public_key) {
                    applied.remove(node);
                }
            }
            PeerChange::Update {
                node,
                endpoint,
                allowed_ips,
                persistent_keepalive,
                ..
            } => {
                if let Some(p) = applied.get_mut(node) {
                    if let Some(e) = endpoint {
                        p.endpoint = Some(*e);
                    }
                    if let Some(ips) = allowed_ips {
                        p.allowed_ips = ips.clone();
                    }
                    if let Some(k) = persistent_keepalive {
                        p.persistent_keepalive = *k;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, key: &str, ep: &str, net: &str) -> DesiredPeer {
        DesiredPeer {
            node: node.into(),
            public_key: key.into(),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: vec![net.parse().unwrap()],
            persistent_keepalive: 0,
        }
    }

    fn map(ps: &[DesiredPeer]) -> BTreeMap<String, DesiredPeer> {
        ps.iter().map(|p| (p.node.clone(), p.clone())).collect()
    }

    #[test]
    fn unchanged_peers_are_left_alone() {
        let a = map(&[peer("n1", "K1", "192.0.2.1:51820", "10.244.1.0/24")]);
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn add_remove_and_key_change() {
        let applied = map(&[
            peer("n1", "K1", "192.0.2.1:51820", "10.244.1.0/24"),
            peer("n2", "K2", "192.0.2.2:51820", "10.244.2.0/24"),
        ]);
        let desired = map(&[
            peer("n1", "K1new", "192.0.2.1:51820", "10.244.1.0/24"),
            peer("n3", "K3", "192.0.2.3:51820", "10.244.3.0/24"),
        ]);
        let d = diff(&applied, &desired);
        // Removals first: n2, and n1's old key; then n1's new key and n3.
        assert_eq!(
            d,
            vec![
                PeerChange::Remove {
                    node: "n2".into(),
                    public_key: "K2".into()
                },
                PeerChange::Remove {
                    node: "n1".into(),
                    public_key: "K1".into()
                },
                PeerChange::Add(desired["n1"].clone()),
                PeerChange::Add(desired["n3"].clone()),
            ]
        );
        let mut rec = applied.clone();
        record(&mut rec, &d);
        assert_eq!(rec, desired);
    }

    #[test]
    fn endpoint_written_only_when_the_registry_changed_it() {
        let applied = peer("n1", "K1", "192.0.2.1:51820", "10.244.1.0/24");
        // Same registry data: nothing, even if the device roamed elsewhere meanwhile.
        assert!(change_for(Some(&applied), Some(&applied)).is_empty());
        let moved = peer("n1", "K1", "198.51.100.9:51820", "10.244.1.0/24");
        assert_eq!(
            change_for(Some(&applied), Some(&moved)),
            vec![PeerChange::Update {
                node: "n1".into(),
                public_key: "K1".into(),
                endpoint: Some("198.51.100.9:51820".parse().unwrap()),
                allowed_ips: None,
                persistent_keepalive: None,
            }]
        );
        let resubnetted = peer("n1", "K1", "192.0.2.1:51820", "10.244.9.0/24");
        assert!(matches!(
            change_for(Some(&applied), Some(&resubnetted)).as_slice(),
            [PeerChange::Update {
                endpoint: None,
                allowed_ips: Some(_),
                ..
            }]
        ));
    }

    #[test]
    fn per_event_work_touches_one_peer() {
        // 1000 peers applied; one node changes: one change, computed from that node alone.
        let applied: BTreeMap<_, _> = (0..1000)
            .map(|i| {
                let p = peer(
                    &format!("n{i}"),
                    &format!("K{i}"),
                    "192.0.2.1:51820",
                    "10.244.1.0/24",
                );
                (p.node.clone(), p)
            })
            .collect();
        let changed = peer("n7", "K7", "192.0.2.77:51820", "10.244.1.0/24");
        assert_eq!(change_for(applied.get("n7"), Some(&changed)).len(), 1);
        assert_eq!(change_for(applied.get("n7"), None).len(), 1);
    }
}
