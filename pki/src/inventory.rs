//! The certificate inventory of a Kubernetes node, row by row as `cert-inventory.md` lists it, in
//! kubeadm's file layout. Pure: settings in, entries (identity, signer, files) out.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ca::{CertificateAuthority, IssuedCert, LeafProfile, Usage, Validity};
use crate::error::{PkiError, Result};
use crate::keys::{KeyAlgorithm, PrivateKey};
use crate::store::PairLinks;

/// The three certificate authorities. They are never shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaId {
    /// The cluster CA (`pki/ca.crt`, CN `kubernetes`).
    Cluster,
    /// The etcd CA (`pki/etcd/ca.crt`, CN `etcd-ca`).
    Etcd,
    /// The front-proxy CA (`pki/front-proxy-ca.crt`, CN `front-proxy-ca`).
    FrontProxy,
}

impl CaId {
    /// All CAs, in the order they are created.
    pub const ALL: [CaId; 3] = [CaId::Cluster, CaId::Etcd, CaId::FrontProxy];

    /// kubeadm's name for it (`ca`, `etcd-ca`, `front-proxy-ca`).
    pub fn name(self) -> &'static str {
        match self {
            CaId::Cluster => "ca",
            CaId::Etcd => "etcd-ca",
            CaId::FrontProxy => "front-proxy-ca",
        }
    }

    /// Its subject CN.
    pub fn common_name(self) -> &'static str {
        match self {
            CaId::Cluster => "kubernetes",
            CaId::Etcd => "etcd-ca",
            CaId::FrontProxy => "front-proxy-ca",
        }
    }

    /// Certificate and key paths relative to the data directory.
    pub fn links(self) -> PairLinks {
        let (c, k) = match self {
            CaId::Cluster => ("pki/ca.crt", "pki/ca.key"),
            CaId::Etcd => ("pki/etcd/ca.crt", "pki/etcd/ca.key"),
            CaId::FrontProxy => ("pki/front-proxy-ca.crt", "pki/front-proxy-ca.key"),
        };
        PairLinks {
            cert: Some(c.into()),
            key: Some(k.into()),
            combined: None,
        }
    }
}

/// Cluster-wide settings that decide names, addresses and lifetimes. Persisted by `meshd init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Cluster name (kubeconfig cluster entry).
    pub cluster_name: String,
    /// This node's name.
    pub node_name: String,
    /// The address this node advertises (API server, etcd, meshd API).
    pub advertise_address: IpAddr,
    /// The API server's port.
    pub apiserver_port: u16,
    /// The Service CIDR; its first address is the `kubernetes` Service IP.
    pub service_cidr: IpNet,
    /// The pod network.
    pub cluster_cidr: IpNet,
    /// The cluster DNS domain.
    pub cluster_domain: String,
    /// Extra API server SANs (DNS names or IPs).
    pub apiserver_cert_sans: Vec<String>,
    /// Extra addresses etcd peers may connect from (added to the peer certificate's IP SANs).
    #[serde(default)]
    pub etcd_peer_addresses: Vec<IpAddr>,
    /// The meshd API port.
    #[serde(default = "default_api_port")]
    pub api_port: u16,
    /// Key algorithm of new keys.
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of new leaf certificates, seconds.
    pub leaf_lifetime_secs: u64,
    /// Lifetime of new CAs, seconds.
    pub ca_lifetime_secs: u64,
}

fn default_api_port() -> u16 {
    7443
}

/// Default leaf lifetime: 90 days (renewed at about 60).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(90 * 86400);
/// Longest leaf lifetime a setting may ask for: 1 year, kubeadm's default.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(366 * 86400);

impl ClusterSettings {
    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> std::result::Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if !is_dns_label_seq(&self.node_name) {
            errs.push(format!(
                "node name {:?} must be a lower-case DNS name (a-z, 0-9, '-', '.')",
                self.node_name
            ));
        }
        if !is_dns_label_seq(&self.cluster_domain) {
            errs.push(format!(
                "cluster domain {:?} is not a DNS name",
                self.cluster_domain
            ));
        }
        if self.cluster_name.is_empty() || self.cluster_name.len() > 253 {
            errs.push("cluster name must be 1 to 253 characters".into());
        }
        if self.advertise_address.is_unspecified() || self.advertise_address.is_multicast() {
            errs.push(format!(
                "advertise address {} must be a unicast address of this node",
                self.advertise_address
            ));
        }
        if self.service_cidr.addr() != self.service_cidr.network() {
            errs.push(format!(
                "service CIDR {} has host bits set (did you mean {}?)",
                self.service_cidr,
                self.service_cidr.trunc()
            ));
        }
        if self.cluster_cidr.addr() != self.cluster_cidr.network() {
            errs.push(format!(
                "cluster CIDR {} has host bits set (did you mean {}?)",
                self.cluster_cidr,
                self.cluster_cidr.trunc()
            ));
        }
        if self.service_cidr.contains(&self.cluster_cidr.network())
            || self.cluster_cidr.contains(&self.service_cidr.network())
        {
            errs.push(format!(
                "service CIDR {} and cluster CIDR {} overlap",
                self.service_cidr, self.cluster_cidr
            ));
        }
        if self.service_cidr.hosts().nth(1).is_none() {
            errs.push(format!("service CIDR {} is too small", self.service_cidr));
        }
        for san in &self.apiserver_cert_sans {
            if san.parse::<IpAddr>().is_err() && !is_dns_san(san) {
                errs.push(format!(
                    "API server SAN {san:?} is neither an IP address nor a DNS name"
                ));
            }
        }
        let leaf = Duration::from_secs(self.leaf_lifetime_secs);
        if leaf < Duration::from_secs(10) || leaf > MAX_LEAF_LIFETIME {
            errs.push(format!(
                "leaf lifetime {}s must be between 10s and {}s",
                self.leaf_lifetime_secs,
                MAX_LEAF_LIFETIME.as_secs()
            ));
        }
        if self.ca_lifetime_secs <= self.leaf_lifetime_secs {
            errs.push("CA lifetime must be longer than the leaf lifetime".into());
        }
        if self.apiserver_port == 0 || self.api_port == 0 {
            errs.push("ports must be non-zero".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The first address of the Service CIDR (the `kubernetes` Service, e.g. 10.96.0.1).
    pub fn apiserver_service_ip(&self) -> Result<IpAddr> {
        self.service_cidr.hosts().next().ok_or(PkiError::Invalid {
            what: "service CIDR",
            reason: format!("{} has no host addresses", self.service_cidr),
        })
    }

    /// The API server URL for kubeconfigs.
    pub fn apiserver_url(&self) -> String {
        match self.advertise_address {
            IpAddr::V4(a) => format!("https://{a}:{}", self.apiserver_port),
            IpAddr::V6(a) => format!("https://[{a}]:{}", self.apiserver_port),
        }
    }

    /// Lifetime and backdate of new leaves.
    pub fn leaf_validity(&self) -> Validity {
        Validity {
            lifetime: Duration::from_secs(self.leaf_lifetime_secs),
            backdate: crate::ca::DEFAULT_BACKDATE,
        }
    }
}

/// Whether `s` is a lower-case DNS name (labels of a-z, 0-9 and '-', not starting or ending with
/// '-', at most 63 characters each, 253 in all): what node names and the cluster domain must be.
pub fn is_dns_label_seq(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_dns_san(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    is_dns_label_seq(&s.to_ascii_lowercase())
}

/// How an entry is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A versioned pair with these public links.
    Pair(PairLinks),
    /// A kubeconfig file (relative path). `embed`: cert and key inside the file (for people);
    /// otherwise the pair is stored with `links` and the kubeconfig references `links.combined`.
    Kubeconfig {
        /// The kubeconfig file, relative to the data directory.
        file: PathBuf,
        /// Embed cert and key data.
        embed: bool,
        /// The pair's links when not embedded.
        links: PairLinks,
    },
}

/// One leaf of the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Stable id, kubeadm's name where kubeadm has one (`apiserver`, `admin.conf`, `etcd-server`...).
    pub id: &'static str,
    /// The CA that signs it.
    pub signer: CaId,
    /// Its identity and usage.
    pub profile: LeafProfile,
    /// Where it lives.
    pub output: Output,
}

fn pair(cert: &str, key: &str) -> Output {
    Output::Pair(PairLinks {
        cert: Some(cert.into()),
        key: Some(key.into()),
        combined: None,
    })
}

fn client(cn: &str, orgs: &[&str]) -> LeafProfile {
    LeafProfile {
        common_name: cn.into(),
        organizations: orgs.iter().map(|s| s.to_string()).collect(),
        dns_names: vec![],
        ip_addresses: vec![],
        usage: Usage::Client,
    }
}

fn kubeconfig_ref(file: &str, combined: &str) -> Output {
    Output::Kubeconfig {
        file: file.into(),
        embed: false,
        links: PairLinks {
            cert: None,
            key: None,
            combined: Some(combined.into()),
        },
    }
}

fn kubeconfig_embedded(file: &str) -> Output {
    Output::Kubeconfig {
        file: file.into(),
        embed: true,
        links: PairLinks::default(),
    }
}

/// The kubelet's entries for node `node_name` with `addresses`: its client identity (kubelet.conf) and
/// its CA-signed serving certificate.
pub fn kubelet_entries(node_name: &str, addresses: &[IpAddr]) -> Vec<Entry> {
    let node_cn = format!("system:node:{node_name}");
    vec![
        Entry {
            id: "kubelet.conf",
            signer: CaId::Cluster,
            profile: LeafProfile {
                common_name: node_cn.clone(),
                organizations: vec!["system:nodes".into()],
                dns_names: vec![],
                ip_addresses: vec![],
                usage: Usage::Client,
            },
            output: kubeconfig_ref("kubelet.conf", "kubelet/pki/kubelet-client-current.pem"),
        },
        Entry {
            id: "kubelet-serving",
            signer: CaId::Cluster,
            profile: LeafProfile {
                common_name: node_cn,
                organizations: vec!["system:nodes".into()],
                dns_names: vec![node_name.to_string()],
                ip_addresses: addresses.to_vec(),
                usage: Usage::Server,
            },
            output: Output::Pair(PairLinks {
                cert: Some("kubelet/pki/kubelet.crt".into()),
                key: Some("kubelet/pki/kubelet.key".into()),
                combined: Some("kubelet/pki/kubelet-server-current.pem".into()),
            }),
        },
        Entry {
            id: "kube-proxy.conf",
            signer: CaId::Cluster,
            profile: client("system:kube-proxy", &["system:node-proxier"]),
            output: kubeconfig_ref("kube-proxy.conf", "pki/kube-proxy-client-current.pem"),
        },
    ]
}

/// meshd's own identity for node `node_name`: the client certificate it calls the meshd API with.
pub fn node_identity_entry(node_name: &str) -> Entry {
    Entry {
        id: "meshd-node",
        signer: CaId::Cluster,
        profile: LeafProfile {
            common_name: format!("system:node:{node_name}"),
            organizations: vec!["system:nodes".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
        },
        output: Output::Pair(PairLinks {
            cert: Some("pki/meshd/node.crt".into()),
            key: Some("pki/meshd/node.key".into()),
            combined: Some("pki/meshd/node-current.pem".into()),
        }),
    }
}

/// Every leaf a joined (worker) node holds: kubelet client and serving, kube-proxy, meshd identity.
pub fn node_entries(node_name: &str, addresses: &[IpAddr]) -> Vec<Entry> {
    let mut v = kubelet_entries(node_name, addresses);
    v.push(node_identity_entry(node_name));
    v
}

/// Every leaf a control-plane node needs, in kubeadm's layout plus meshd's own.
pub fn control_plane_entries(s: &ClusterSettings) -> Result<Vec<Entry>> {
    let node = s.node_name.clone();
    let adv = s.advertise_address;
    let mut api_dns = vec![
        node.clone(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        format!("kubernetes.default.svc.{}", s.cluster_domain),
    ];
    let mut api_ips = vec![s.apiserver_service_ip()?, adv];
    for san in &s.apiserver_cert_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => api_ips.push(ip),
            Err(_) => api_dns.push(san.to_ascii_lowercase()),
        }
    }
    dedup(&mut api_dns);
    dedup(&mut api_ips);
    let loopbacks: [IpAddr; 2] = [
        "127.0.0.1".parse().map_err(|_| bad_ip())?,
        "::1".parse().map_err(|_| bad_ip())?,
    ];
    let mut etcd_ips = vec![adv, loopbacks[0], loopbacks[1]];
    dedup(&mut etcd_ips);
    let mut peer_ips = etcd_ips.clone();
    peer_ips.extend(s.etcd_peer_addresses.iter().copied());
    dedup(&mut peer_ips);
    let etcd_dns = vec![node.clone(), "localhost".to_string()];
    // The meshd API is dialled at the advertise address, or at the names and addresses operators
    // add for the API server (a NAT address, a DNS name).
    let mut meshd_ips = vec![adv, loopbacks[0]];
    let mut meshd_dns = vec![node.clone(), "localhost".to_string()];
    for san in &s.apiserver_cert_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => meshd_ips.push(ip),
            Err(_) => meshd_dns.push(san.to_ascii_lowercase()),
        }
    }
    dedup(&mut meshd_ips);
    dedup(&mut meshd_dns);

    let mut v = vec![
        Entry {
            id: "apiserver",
            signer: CaId::Cluster,
            profile: LeafProfile {
                common_name: "kube-apiserver".into(),
                organizations: vec![],
                dns_names: api_dns,
                ip_addresses: api_ips,
                usage: Usage::Server,
            },
            output: pair("pki/apiserver.crt", "pki/apiserver.key"),
        },
        Entry {
            id: "apiserver-kubelet-client",
            signer: CaId::Cluster,
            profile: client("kube-apiserver-kubelet-client", &["kubeadm:cluster-admins"]),
            output: pair(
                "pki/apiserver-kubelet-client.crt",
                "pki/apiserver-kubelet-client.key",
            ),
        },
        Entry {
            id: "apiserver-etcd-client",
            signer: CaId::Etcd,
            profile: client("kube-apiserver-etcd-client", &[]),
            output: pair(
                "pki/apiserver-etcd-client.crt",
                "pki/apiserver-etcd-client.key",
            ),
        },
        Entry {
            id: "front-proxy-client",
            signer: CaId::FrontProxy,
            profile: client("front-proxy-client", &[]),
            output: pair("pki/front-proxy-client.crt", "pki/front-proxy-client.key"),
        },
        Entry {
            id: "etcd-server",
            signer: CaId::Etcd,
            profile: LeafProfile {
                common_name: node.clone(),
                organizations: vec![],
                dns_names: etcd_dns.clone(),
                ip_addresses: etcd_ips,
                usage: Usage::ServerAndClient,
            },
            output: pair("pki/etcd/server.crt", "pki/etcd/server.key"),
        },
        Entry {
            id: "etcd-peer",
            signer: CaId::Etcd,
            profile: LeafProfile {
                common_name: node.clone(),
                organizations: vec![],
                dns_names: etcd_dns,
                ip_addresses: peer_ips,
                usage: Usage::ServerAndClient,
            },
            output: pair("pki/etcd/peer.crt", "pki/etcd/peer.key"),
        },
        Entry {
            id: "etcd-healthcheck-client",
            signer: CaId::Etcd,
            profile: client("kube-etcd-healthcheck-client", &[]),
            output: pair(
                "pki/etcd/healthcheck-client.crt",
                "pki/etcd/healthcheck-client.key",
            ),
        },
        Entry {
            id: "admin.conf",
            signer: CaId::Cluster,
            profile: client("kubernetes-admin", &["kubeadm:cluster-admins"]),
            output: kubeconfig_embedded("admin.conf"),
        },
        Entry {
            id: "super-admin.conf",
            signer: CaId::Cluster,
            profile: client("kubernetes-super-admin", &["system:masters"]),
            output: kubeconfig_embedded("super-admin.conf"),
        },
        Entry {
            id: "controller-manager.conf",
            signer: CaId::Cluster,
            profile: client("system:kube-controller-manager", &[]),
            output: kubeconfig_ref(
                "controller-manager.conf",
                "pki/controller-manager-client-current.pem",
            ),
        },
        Entry {
            id: "scheduler.conf",
            signer: CaId::Cluster,
            profile: client("system:kube-scheduler", &[]),
            output: kubeconfig_ref("scheduler.conf", "pki/scheduler-client-current.pem"),
        },
        // The controller-manager's and the scheduler's serving certificates (10257, 10259): without
        // `--tls-cert-file` they make a self-signed one at start, which no client can verify. They
        // bind 127.0.0.1, so the names are the loopback ones and the node name.
        Entry {
            id: "controller-manager-serving",
            signer: CaId::Cluster,
            profile: loopback_server("kube-controller-manager", &node, loopbacks[0]),
            output: pair(
                "pki/controller-manager-server.crt",
                "pki/controller-manager-server.key",
            ),
        },
        Entry {
            id: "scheduler-serving",
            signer: CaId::Cluster,
            profile: loopback_server("kube-scheduler", &node, loopbacks[0]),
            output: pair("pki/scheduler-server.crt", "pki/scheduler-server.key"),
        },
    ];
    v.extend(kubelet_entries(&node, &[adv]));
    v.extend([
        Entry {
            id: "meshd-api",
            signer: CaId::Cluster,
            profile: LeafProfile {
                common_name: "meshd-api".into(),
                organizations: vec![],
                dns_names: meshd_dns,
                ip_addresses: meshd_ips,
                usage: Usage::Server,
            },
            output: pair("pki/meshd/api-server.crt", "pki/meshd/api-server.key"),
        },
        Entry {
            id: "meshd-admin",
            signer: CaId::Cluster,
            profile: client("meshd-admin", &["meshd:admins"]),
            output: pair("pki/meshd/admin-client.crt", "pki/meshd/admin-client.key"),
        },
        Entry {
            id: "meshd-etcd-client",
            signer: CaId::Etcd,
            profile: client("meshd", &[]),
            output: pair("pki/etcd/meshd-client.crt", "pki/etcd/meshd-client.key"),
        },
        Entry {
            id: "flannel-etcd-client",
            signer: CaId::Etcd,
            profile: client("flannel", &[]),
            output: pair("pki/etcd/flannel-client.crt", "pki/etcd/flannel-client.key"),
        },
    ]);
    Ok(v)
}

/// A serving profile for a component bound to the loopback: DNS `localhost` and the node name, IP
/// `loopback`.
fn loopback_server(cn: &str, node: &str, loopback: IpAddr) -> LeafProfile {
    LeafProfile {
        common_name: cn.into(),
        organizations: vec![],
        dns_names: vec!["localhost".into(), node.to_string()],
        ip_addresses: vec![loopback],
        usage: Usage::Server,
    }
}

fn bad_ip() -> PkiError {
    PkiError::Invalid {
        what: "address",
        reason: "loopback literal".into(),
    }
}

fn dedup<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v.drain(..) {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    *v = out;
}

/// The three CAs, loaded or created.
#[derive(Debug)]
pub struct CaSet {
    /// The cluster CA.
    pub cluster: CertificateAuthority,
    /// The etcd CA.
    pub etcd: CertificateAuthority,
    /// The front-proxy CA.
    pub front_proxy: CertificateAuthority,
}

impl CaSet {
    /// Creates three new CAs.
    pub fn create(alg: KeyAlgorithm, lifetime: Duration, now: SystemTime) -> Result<Self> {
        Ok(CaSet {
            cluster: CertificateAuthority::create(CaId::Cluster.common_name(), alg, lifetime, now)?,
            etcd: CertificateAuthority::create(CaId::Etcd.common_name(), alg, lifetime, now)?,
            front_proxy: CertificateAuthority::create(
                CaId::FrontProxy.common_name(),
                alg,
                lifetime,
                now,
            )?,
        })
    }

    /// The CA with id `id`.
    pub fn get(&self, id: CaId) -> &CertificateAuthority {
        match id {
            CaId::Cluster => &self.cluster,
            CaId::Etcd => &self.etcd,
            CaId::FrontProxy => &self.front_proxy,
        }
    }
}

/// A freshly issued entry: its new key and certificate.
#[derive(Debug)]
pub struct IssuedEntry {
    /// The key, made here.
    pub key: PrivateKey,
    /// The certificate.
    pub cert: IssuedCert,
}

/// Makes a key and issues the certificate for one entry.
pub fn issue_entry(
    entry: &Entry,
    cas: &CaSet,
    alg: KeyAlgorithm,
    validity: Validity,
    now: SystemTime,
) -> Result<IssuedEntry> {
    let key = PrivateKey::generate(alg)?;
    let cert =
        cas.get(entry.signer)
            .issue(&entry.profile, &key.public_key_spki_der(), validity, now)?;
    Ok(IssuedEntry { key, cert })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn settings() -> ClusterSettings {
        ClusterSettings {
            cluster_name: "kubernetes".into(),
            node_name: "cp1".into(),
            advertise_address: "192.0.2.10".parse().unwrap(),
            apiserver_port: 6443,
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            apiserver_cert_sans: vec!["api.example.com".into(), "198.51.100.7".into()],
            etcd_peer_addresses: vec![],
            api_port: 7443,
            key_algorithm: KeyAlgorithm::EcdsaP256,
            leaf_lifetime_secs: DEFAULT_LEAF_LIFETIME.as_secs(),
            ca_lifetime_secs: crate::ca::DEFAULT_CA_LIFETIME.as_secs(),
        }
    }

    #[test]
    fn apiserver_sans_follow_the_inventory() {
        let e = control_plane_entries(&settings()).unwrap();
        let api = e.iter().find(|e| e.id == "apiserver").unwrap();
        assert_eq!(
            api.profile.dns_names,
            vec![
                "cp1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "api.example.com"
            ]
        );
        let ips: Vec<String> = api
            .profile
            .ip_addresses
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, vec!["10.96.0.1", "192.0.2.10", "198.51.100.7"]);
        let ids: Vec<_> = e.iter().map(|e| e.id).collect();
        for want in [
            "apiserver-kubelet-client",
            "apiserver-etcd-client",
            "front-proxy-client",
            "etcd-server",
            "etcd-peer",
            "etcd-healthcheck-client",
            "admin.conf",
            "super-admin.conf",
            "controller-manager.conf",
            "scheduler.conf",
            "controller-manager-serving",
            "scheduler-serving",
            "kubelet.conf",
            "kubelet-serving",
            "kube-proxy.conf",
        ] {
            assert!(ids.contains(&want), "{want} missing");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "ids are unique");
    }

    #[test]
    fn controller_manager_and_scheduler_serve_ca_signed_loopback_certificates() {
        let e = control_plane_entries(&settings()).unwrap();
        for (id, cn, cert) in [
            (
                "controller-manager-serving",
                "kube-controller-manager",
                "pki/controller-manager-server.crt",
            ),
            (
                "scheduler-serving",
                "kube-scheduler",
                "pki/scheduler-server.crt",
            ),
        ] {
            let x = e.iter().find(|x| x.id == id).unwrap();
            assert_eq!(x.signer, CaId::Cluster);
            assert_eq!(x.profile.common_name, cn);
            assert_eq!(x.profile.usage, Usage::Server);
            assert_eq!(x.profile.dns_names, vec!["localhost", "cp1"]);
            let ips: Vec<String> = x
                .profile
                .ip_addresses
                .iter()
                .map(|i| i.to_string())
                .collect();
            assert_eq!(ips, vec!["127.0.0.1"]);
            let Output::Pair(l) = &x.output else {
                panic!("{id} is a pair")
            };
            assert_eq!(l.cert.as_deref(), Some(std::path::Path::new(cert)));
        }
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let mut s = settings();
        s.node_name = "Bad_Name".into();
        s.service_cidr = "10.244.0.0/16".parse().unwrap();
        s.apiserver_cert_sans = vec!["not a name".into()];
        s.leaf_lifetime_secs = 5;
        let errs = s.validate().unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(settings().validate().is_ok());
    }
}
