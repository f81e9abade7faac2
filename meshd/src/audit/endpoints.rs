//! Which endpoints the audit dials: every known port of every registered node, plus `--target`s.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use pki::inventory::CaId;

/// A Kubernetes (or meshd) component behind a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Component {
    /// etcd client port (2379).
    Etcd,
    /// etcd peer port (2380).
    EtcdPeer,
    /// kube-apiserver (6443).
    Apiserver,
    /// kubelet (10250).
    Kubelet,
    /// kubelet read-only port (10255): must be closed.
    KubeletReadOnly,
    /// kube-controller-manager (10257).
    ControllerManager,
    /// kube-scheduler (10259).
    Scheduler,
    /// meshd's own API.
    MeshdApi,
    /// Anything else (`--target` without a known component).
    Other(String),
}

impl Component {
    /// Parses the `=component` of a `--target`.
    pub fn parse(s: &str) -> Component {
        match s {
            "etcd" => Component::Etcd,
            "etcd-peer" => Component::EtcdPeer,
            "apiserver" | "kube-apiserver" => Component::Apiserver,
            "kubelet" => Component::Kubelet,
            "kubelet-readonly" | "kubelet-read-only" => Component::KubeletReadOnly,
            "controller-manager" | "kube-controller-manager" => Component::ControllerManager,
            "scheduler" | "kube-scheduler" => Component::Scheduler,
            "meshd" | "meshd-api" => Component::MeshdApi,
            other => Component::Other(other.to_owned()),
        }
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        match self {
            Component::Etcd => "etcd",
            Component::EtcdPeer => "etcd-peer",
            Component::Apiserver => "apiserver",
            Component::Kubelet => "kubelet",
            Component::KubeletReadOnly => "kubelet-readonly",
            Component::ControllerManager => "controller-manager",
            Component::Scheduler => "scheduler",
            Component::MeshdApi => "meshd-api",
            Component::Other(s) => s,
        }
    }

    /// The CA its serving chain must verify to (`None`: any CA of the cluster).
    pub fn ca(&self) -> Option<CaId> {
        match self {
            Component::Etcd | Component::EtcdPeer => Some(CaId::Etcd),
            Component::Other(_) => None,
            _ => Some(CaId::Cluster),
        }
    }

    /// Whether the component must require a client certificate (TLS-04). meshd's API is not in
    /// the list: `/v1/join` authenticates by bootstrap token before the node has a certificate,
    /// and every other route refuses a request without one.
    pub fn mtls_mandated(&self) -> bool {
        matches!(
            self,
            Component::Etcd | Component::EtcdPeer | Component::Kubelet
        )
    }

    /// Where the data directory keeps the certificate it should serve (TLS-08).
    pub fn disk_cert(&self) -> Option<&'static str> {
        match self {
            Component::Etcd => Some("pki/etcd/server.crt"),
            Component::EtcdPeer => Some("pki/etcd/peer.crt"),
            Component::Apiserver => Some("pki/apiserver.crt"),
            Component::Kubelet => Some("kubelet/pki/kubelet.crt"),
            Component::ControllerManager => Some("pki/controller-manager-server.crt"),
            Component::Scheduler => Some("pki/scheduler-server.crt"),
            Component::MeshdApi => Some("pki/meshd/api-server.crt"),
            _ => None,
        }
    }
}

/// One endpoint to probe.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The node it belongs to (`-` for a bare `--target`).
    pub node: String,
    /// What listens there.
    pub component: Component,
    /// The host as dialled (an IP or a DNS name): what must be in the SANs.
    pub host: String,
    /// The address.
    pub addr: SocketAddr,
    /// Named on the command line: not answering is an ERROR, not "nothing listens".
    pub explicit: bool,
    /// On this node: the served certificate can be compared with the disk (TLS-08).
    pub local: bool,
}

impl Endpoint {
    /// `node/component host:port`.
    pub fn label(&self) -> String {
        format!("{}/{} {}", self.node, self.component.name(), self.addr)
    }
}

/// Parses `HOST:PORT[=component]` (an IPv6 host in brackets). DNS names are resolved now.
pub fn parse_target(s: &str) -> Result<Endpoint, String> {
    let (hp, comp) = match s.split_once('=') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let (host, port) = crate::api::client::split_host_port(hp)
        .ok_or_else(|| format!("--target {s}: expected HOST:PORT[=component]"))?;
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| format!("--target {s}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("--target {s}: {host} has no address"))?,
    };
    let component = match comp {
        Some(c) => Component::parse(c),
        None => known_port(port, 0).unwrap_or(Component::Other("unknown".into())),
    };
    Ok(Endpoint {
        node: "-".into(),
        component,
        host: host.to_owned(),
        addr,
        explicit: true,
        local: false,
    })
}

/// The component a well-known port belongs to (`api_port`: meshd's).
pub fn known_port(port: u16, api_port: u16) -> Option<Component> {
    Some(match port {
        2379 => Component::Etcd,
        2380 => Component::EtcdPeer,
        6443 => Component::Apiserver,
        10250 => Component::Kubelet,
        10255 => Component::KubeletReadOnly,
        10257 => Component::ControllerManager,
        10259 => Component::Scheduler,
        p if p == api_port && p != 0 => Component::MeshdApi,
        _ => return None,
    })
}

/// The known endpoints of a registered node.
pub fn node_endpoints(
    node: &crate::registry::NodeRecord,
    self_name: &str,
    apiserver_port: u16,
    api_port: Option<u16>,
) -> Vec<Endpoint> {
    let mut ports: Vec<(u16, Component)> = vec![
        (10250, Component::Kubelet),
        (10255, Component::KubeletReadOnly),
    ];
    if node.control_plane {
        ports.extend([
            (2379, Component::Etcd),
            (2380, Component::EtcdPeer),
            (apiserver_port, Component::Apiserver),
            (10257, Component::ControllerManager),
            (10259, Component::Scheduler),
        ]);
        if let Some(p) = api_port {
            ports.push((p, Component::MeshdApi));
        }
    }
    let mut out = Vec::new();
    for ip in &node.addresses {
        for (port, c) in &ports {
            out.push(Endpoint {
                node: node.name.clone(),
                component: c.clone(),
                host: ip.to_string(),
                addr: SocketAddr::new(*ip, *port),
                explicit: false,
                local: node.name == self_name,
            });
        }
    }
    out
}

/// The cluster's CA certificates in the data directory (DER), by CA.
pub fn cas(data_dir: &Path) -> Vec<(CaId, Vec<u8>)> {
    let mut v = Vec::new();
    for id in CaId::ALL {
        let Some(rel) = id.links().cert else { continue };
        if let Ok(text) = std::fs::read_to_string(data_dir.join(rel)) {
            if let Ok(der) = pki::inspect::pem_to_der(&text) {
                v.push((id, der));
            }
        }
    }
    v
}
