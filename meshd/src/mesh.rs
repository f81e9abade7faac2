//! The WireGuard mesh on a node: the userspace device, its address, MTU and route, subnet.env and the
//! CNI conflist, and the reconciler that keeps the device's peers equal to the registry — by diff,
//! one node's change at a time, never touching unchanged peers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net};
use overlay::link::{self, Ip};
use overlay::peers::{self, DesiredPeer, PeerChange};
use overlay::wg::{Device, DeviceConfig, DeviceUpdate, PeerUpdate, PrivateKey, PublicKey};

use crate::api::server::log;
use crate::api::PeerEvent;
use crate::registry::NodeRecord;

/// How the mesh is set up on this node.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// WireGuard interface name (distinct per node when several share one machine).
    pub ifname: String,
    /// Tunnel MTU; `None`: underlay MTU − 80.
    pub mtu: Option<u32>,
    /// Persistent keepalive towards every peer, seconds (0 = off; 25 behind NAT).
    pub keepalive: u16,
    /// The WireGuard data path.
    pub engine: overlay::wg::WgEngine,
    /// Where to write flannel's subnet.env (`None`: not written).
    pub subnet_env: Option<PathBuf>,
    /// Where to write the CNI conflist (`None`: not written).
    pub cni_conf: Option<PathBuf>,
    /// The CNI bridge's name.
    pub cni_bridge: String,
}

/// The mesh of one node: its device and what has been applied to it.
pub struct Mesh {
    device: Device,
    me: String,
    network: Ipv4Net,
    /// This node's subnet (its network address is the device's address).
    subnet: Ipv4Net,
    /// Where subnet.env and the conflist go.
    subnet_env: Option<PathBuf>,
    cni_conf: Option<PathBuf>,
    cni_bridge: String,
    keepalive: u16,
    applied: BTreeMap<String, DesiredPeer>,
    /// The tunnel MTU in use.
    pub mtu: u32,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("ifname", &self.device.name())
            .field("peers", &self.applied.len())
            .finish_non_exhaustive()
    }
}

/// The peer the registry describes for `node`.
pub fn desired(node: &NodeRecord, keepalive: u16) -> DesiredPeer {
    DesiredPeer {
        node: node.name.clone(),
        public_key: node.wireguard_public_key.clone(),
        endpoint: Some(node.endpoint),
        allowed_ips: vec![node.subnet],
        persistent_keepalive: keepalive,
    }
}

fn key(b64: &str) -> anyhow::Result<PublicKey> {
    PublicKey::from_base64(b64).with_context(|| format!("WireGuard key {b64:?}"))
}

/// The device operations for `changes`.
pub fn to_updates(changes: &[PeerChange]) -> anyhow::Result<Vec<PeerUpdate>> {
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        out.push(match c {
            PeerChange::Add(d) => {
                let mut u = PeerUpdate::upsert(key(&d.public_key)?);
                u.endpoint = d.endpoint;
                u.persistent_keepalive_interval = Some(d.persistent_keepalive);
                u.replace_allowed_ips = true;
                u.allowed_ips = d.allowed_ips.iter().map(|n| IpNet::V4(*n)).collect();
                u
            }
            PeerChange::Remove { public_key, .. } => PeerUpdate::remove(key(public_key)?),
            PeerChange::Update {
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
                ..
            } => {
                let mut u = PeerUpdate::upsert(key(public_key)?);
                u.update_only = true;
                u.endpoint = *endpoint;
                u.persistent_keepalive_interval = *persistent_keepalive;
                if let Some(ips) = allowed_ips {
                    u.replace_allowed_ips = true;
                    u.allowed_ips = ips.iter().map(|n| IpNet::V4(*n)).collect();
                }
                u
            }
        });
    }
    Ok(out)
}

/// Writes flannel's subnet.env and the CNI conflist for `subnet` (where asked for).
fn write_node_files(
    subnet_env: Option<&std::path::Path>,
    cni_conf: Option<&std::path::Path>,
    cni_bridge: &str,
    network: Ipv4Net,
    subnet: Ipv4Net,
    mtu: u32,
) -> anyhow::Result<()> {
    let mtu16 = u16::try_from(mtu).unwrap_or(u16::MAX);
    if let Some(p) = subnet_env {
        pki::store::write_atomic(
            p,
            overlay::subnet_env(network, subnet, mtu16, true).as_bytes(),
            0o644,
        )?;
    }
    if let Some(p) = cni_conf {
        pki::store::write_atomic(
            p,
            overlay::cni::conflist(network, subnet, mtu16, cni_bridge, None).as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Sends one datagram into the tunnel towards each peer's mesh address, so the device starts the
/// handshakes now instead of when the first packet comes (after a restart, peers still hold the old
/// session and their packets are dropped until a new handshake: ~15 s if nobody initiates it).
fn kick_handshakes(peers: &[&DesiredPeer]) {
    let Ok(sock) = std::net::UdpSocket::bind(("0.0.0.0", 0)) else {
        return;
    };
    for p in peers {
        if let Some(net) = p.allowed_ips.first() {
            // The discard port of the peer's own tunnel address: nothing listens, nothing answers.
            let _ = sock.send_to(&[0u8], (net.network(), 9));
        }
    }
}

impl Mesh {
    /// Brings up the device for node `me` (its record gives subnet and endpoint port) in `network`,
    /// with `underlay_peer` used to find the underlay interface and its MTU. Writes subnet.env and
    /// the CNI conflist.
    pub fn start(
        opts: &MeshOptions,
        private_key: PrivateKey,
        me: &NodeRecord,
        network: Ipv4Net,
        underlay_peer: IpAddr,
    ) -> anyhow::Result<Mesh> {
        let ip = Ip::new();
        let mtu = match opts.mtu {
            Some(m) => m,
            None => {
                link::tunnel_mtu(ip.underlay_mtu_for(underlay_peer).with_context(|| {
                    format!("detecting the underlay MTU towards {underlay_peer}")
                })?)
            }
        };
        // The pod network is IPv4 (the cluster CIDR must be): a tunnel on a 1280-byte underlay
        // (1200) is fine; below IPv4's 576 nothing is.
        if mtu < link::IPV4_MIN_MTU {
            bail!(
                "tunnel MTU {mtu} is below {} (IPv4's minimum datagram size); set --mtu or fix the underlay",
                link::IPV4_MIN_MTU
            );
        }
        let mut cfg = DeviceConfig::new(private_key);
        cfg.listen_port = me.endpoint.port();
        cfg.mtu = Some(mtu);
        cfg.engine = opts.engine;
        let device = Device::start(&opts.ifname, cfg)
            .with_context(|| format!("starting WireGuard interface {}", opts.ifname))?;
        ip.add_address(&opts.ifname, IpAddr::V4(me.subnet.network()))?;
        ip.set_mtu(&opts.ifname, mtu)?;
        ip.set_up(&opts.ifname)?;
        ip.route_replace(IpNet::V4(network), &opts.ifname)?;
        write_node_files(
            opts.subnet_env.as_deref(),
            opts.cni_conf.as_deref(),
            &opts.cni_bridge,
            network,
            me.subnet,
            mtu,
        )?;
        log(format!(
            "mesh: {} up, address {}/32, MTU {mtu}, route {network} via it, UDP port {}",
            opts.ifname,
            me.subnet.network(),
            me.endpoint.port()
        ));
        Ok(Mesh {
            device,
            me: me.name.clone(),
            network,
            subnet: me.subnet,
            subnet_env: opts.subnet_env.clone(),
            cni_conf: opts.cni_conf.clone(),
            cni_bridge: opts.cni_bridge.clone(),
            keepalive: opts.keepalive,
            applied: BTreeMap::new(),
            mtu,
        })
    }

    /// Moves this node to `subnet` (its lease expired and the subnet went to another node, see
    /// `POST /v1/lease/renew`): the device's address, subnet.env and the conflist follow; the
    /// peers learn the new subnet from the registry. Pods attached before keep their old
    /// addresses, as with flannel: they need restarting.
    pub fn readdress(&mut self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let ip = Ip::new();
        let ifname = self.device.name().to_string();
        ip.add_address(&ifname, IpAddr::V4(subnet.network()))?;
        ip.delete_address(&ifname, IpAddr::V4(self.subnet.network()))?;
        // Deleting the primary address may take the route with it.
        ip.route_replace(IpNet::V4(self.network), &ifname)?;
        write_node_files(
            self.subnet_env.as_deref(),
            self.cni_conf.as_deref(),
            &self.cni_bridge,
            self.network,
            subnet,
            self.mtu,
        )?;
        log(format!(
            "mesh: this node's subnet moved from {} to {subnet}: {ifname} re-addressed, subnet.env and the conflist rewritten; pods started before keep addresses of {} and need restarting",
            self.subnet, self.subnet
        ));
        self.subnet = subnet;
        Ok(())
    }

    /// This node's subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The device's interface name.
    pub fn ifname(&self) -> &str {
        self.device.name()
    }

    /// The peers currently applied, by node name.
    pub fn applied(&self) -> &BTreeMap<String, DesiredPeer> {
        &self.applied
    }

    /// Applies one registry event; returns how many peer changes it caused.
    pub fn handle(&mut self, ev: &PeerEvent) -> anyhow::Result<usize> {
        let changes = match ev {
            PeerEvent::Heartbeat => return Ok(0),
            PeerEvent::Snapshot { nodes, .. } => {
                let want: BTreeMap<String, DesiredPeer> = nodes
                    .iter()
                    .filter(|n| n.name != self.me && self.network.contains(&n.subnet.network()))
                    .map(|n| (n.name.clone(), desired(n, self.keepalive)))
                    .collect();
                peers::diff(&self.applied, &want)
            }
            PeerEvent::Put { node, .. } => {
                if node.name == self.me {
                    if node.subnet != self.subnet && self.network.contains(&node.subnet.network()) {
                        self.readdress(node.subnet)?;
                    }
                    return Ok(0);
                }
                peers::change_for(
                    self.applied.get(&node.name),
                    Some(&desired(node, self.keepalive)),
                )
            }
            PeerEvent::Delete { name, .. } => peers::change_for(self.applied.get(name), None),
        };
        if changes.is_empty() {
            return Ok(0);
        }
        let update = DeviceUpdate {
            peers: to_updates(&changes)?,
            ..Default::default()
        };
        self.device
            .set(&update)
            .with_context(|| format!("configuring {}", self.device.name()))?;
        peers::record(&mut self.applied, &changes);
        let added: Vec<&DesiredPeer> = changes
            .iter()
            .filter_map(|c| match c {
                PeerChange::Add(d) => Some(d),
                _ => None,
            })
            .collect();
        kick_handshakes(&added);
        for c in &changes {
            match c {
                PeerChange::Add(d) => log(format!(
                    "mesh: peer {} added ({})",
                    d.node,
                    d.allowed_ips
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )),
                PeerChange::Remove { node, .. } => log(format!("mesh: peer {node} removed")),
                PeerChange::Update { node, .. } => log(format!("mesh: peer {node} updated")),
            }
        }
        Ok(changes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn peer() -> DesiredPeer {
        DesiredPeer {
            node: "n1".into(),
            public_key: K1.into(),
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: vec!["10.244.1.0/24".parse().unwrap()],
            persistent_keepalive: 25,
        }
    }

    #[test]
    fn changes_become_device_operations() {
        let add = to_updates(&[PeerChange::Add(peer())]).unwrap();
        assert_eq!(add.len(), 1);
        assert!(!add[0].remove && !add[0].update_only && add[0].replace_allowed_ips);
        assert_eq!(add[0].endpoint, peer().endpoint);
        assert_eq!(add[0].persistent_keepalive_interval, Some(25));
        assert_eq!(
            add[0].allowed_ips,
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );

        let rm = to_updates(&[PeerChange::Remove {
            node: "n1".into(),
            public_key: K1.into(),
        }])
        .unwrap();
        assert!(rm[0].remove);

        // An endpoint-only update touches nothing else (no AllowedIPs replacement, no keepalive).
        let up = to_updates(&[PeerChange::Update {
            node: "n1".into(),
            public_key: K1.into(),
            endpoint: Some("198.51.100.1:51820".parse().unwrap()),
            allowed_ips: None,
            persistent_keepalive: None,
        }])
        .unwrap();
        assert!(up[0].update_only && !up[0].replace_allowed_ips && up[0].allowed_ips.is_empty());
        assert_eq!(up[0].persistent_keepalive_interval, None);

        assert!(to_updates(&[PeerChange::Remove {
            node: "x".into(),
            public_key: "bad".into()
        }])
        .is_err());
    }
}
