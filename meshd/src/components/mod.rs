//! The Kubernetes components meshd drives: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler on a control plane; kubelet and kube-proxy on every node.
//!
//! Layout:
//! * this file: the component set, `components.json` ([`ComponentsConfig`]), the render context
//!   built from `meshd.json`, and which renewed inventory entry touches which component.
//! * [`render`]: pure functions from the context to each component's command line, config files and
//!   environment, with TLS everywhere (the CFG checks of `audit-checks.md`).
//! * [`forms`]: the same rendering as systemd units or static pod manifests (`meshd render`).
//! * [`supervisor`]: the pure state machine of `meshd run`'s supervision (ordering, backoff, reverse
//!   stop), unit-tested without processes.
//! * [`driver`]: the tokio driver that runs the machine with real processes, probes health over TLS,
//!   keeps a log per component and writes the status file `meshd status` reads.
//!
//! Supported Kubernetes versions: 1.28 to 1.31 (only flags and config fields present in all four are
//! rendered; `tests/data/flags/` holds the flag sets the tests check against). etcd: 3.4 and 3.5.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::{self, Role};

pub mod driver;
pub mod forms;
pub mod render;
pub mod supervisor;

pub use driver::{start, ComponentsHandle};

/// File name of the component configuration inside the data directory.
pub const CONFIG_FILE: &str = "components.json";
/// Directory (inside the data directory) of rendered config files, logs, etcd's data and the status
/// file.
pub const COMPONENTS_DIR: &str = "components";
/// The status file `meshd run` keeps and `meshd status` reads.
pub const STATUS_FILE: &str = "components/status.json";

/// One Kubernetes component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// etcd (control plane).
    Etcd,
    /// kube-apiserver (control plane).
    KubeApiserver,
    /// kube-controller-manager (control plane).
    KubeControllerManager,
    /// kube-scheduler (control plane).
    KubeScheduler,
    /// kubelet (every node).
    Kubelet,
    /// kube-proxy (every node).
    KubeProxy,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 6] = [
        Component::Etcd,
        Component::KubeApiserver,
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::Kubelet,
        Component::KubeProxy,
    ];

    /// Its name, which is also its binary's name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::KubeApiserver => "kube-apiserver",
            Component::KubeControllerManager => "kube-controller-manager",
            Component::KubeScheduler => "kube-scheduler",
            Component::Kubelet => "kubelet",
            Component::KubeProxy => "kube-proxy",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The components a node of `role` runs.
    pub fn for_role(role: Role) -> Vec<Component> {
        match role {
            Role::ControlPlane => Component::ALL.to_vec(),
            Role::Node => vec![Component::Kubelet, Component::KubeProxy],
        }
    }

    /// What must be up (and healthy) before it starts: etcd → kube-apiserver → the rest.
    pub fn depends_on(self) -> &'static [Component] {
        match self {
            Component::Etcd => &[],
            Component::KubeApiserver => &[Component::Etcd],
            _ => &[Component::KubeApiserver],
        }
    }

    /// Whether it runs only on a control plane.
    pub fn control_plane_only(self) -> bool {
        !matches!(self, Component::Kubelet | Component::KubeProxy)
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a component needs when an inventory entry it uses is renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationAction {
    /// Restart it: it reads the file only at start.
    Restart,
    /// Nothing: it re-reads the file by itself (etcd loads its serving and peer pair on every new
    /// connection; the Kubernetes control-plane components their serving pair, see
    /// [`rotation_targets`]).
    Reloads,
}

/// Which components use inventory entry `id` (the ids of `pki::inventory`, and the CA names `ca`,
/// `etcd-ca`, `front-proxy-ca`), and what each needs when it is renewed.
///
/// etcd reloads its serving and peer certificates on every new TLS connection but not its trusted CA
/// (etcd-io/etcd#11555, `cert-inventory.md`): a new etcd CA needs a restart.
///
/// kube-apiserver, kube-controller-manager and kube-scheduler serve through k8s.io/apiserver's
/// `SecureServingOptions`, which wraps `--tls-cert-file`/`--tls-private-key-file` in a
/// `dynamiccertificates.DynamicCertKeyPairContent`: since Kubernetes 1.17 the serving pair is re-read
/// when the files change and at least every minute ("Kube-apiserver now reloads serving certificates
/// from disk every minute to allow rotation without restarting the server process",
/// kubernetes/kubernetes#84200, CHANGELOG-1.17; client-CA bundles likewise, #83579). So their serving
/// renewals (`apiserver`, `controller-manager-serving`, `scheduler-serving`) need no restart; meshd
/// renews at about 2/3 of the lifetime, far more than a minute before the old pair expires (with the
/// default 90-day lifetime; a lifetime under a few minutes, a test setting, could outrun the
/// one-minute re-read). The apiserver's client pairs (kubelet, etcd, front-proxy) and every
/// kubeconfig are kept as restarts: they are not read through that mechanism in every supported
/// version, and a CA change restarts everything that trusts it.
pub fn rotation_targets(id: &str) -> Vec<(Component, RotationAction)> {
    use Component::*;
    use RotationAction::*;
    match id {
        "etcd-server" | "etcd-peer" => vec![(Etcd, Reloads)],
        "etcd-ca" => vec![(Etcd, Restart), (KubeApiserver, Restart)],
        "apiserver" => vec![(KubeApiserver, Reloads)],
        "apiserver-kubelet-client" | "apiserver-etcd-client" | "front-proxy-client" => {
            vec![(KubeApiserver, Restart)]
        }
        "controller-manager-serving" => vec![(KubeControllerManager, Reloads)],
        "scheduler-serving" => vec![(KubeScheduler, Reloads)],
        "front-proxy-ca" => vec![
            (KubeApiserver, Restart),
            (KubeControllerManager, Restart),
            (KubeScheduler, Restart),
        ],
        "ca" => vec![
            (KubeApiserver, Restart),
            (KubeControllerManager, Restart),
            (KubeScheduler, Restart),
            (Kubelet, Restart),
            (KubeProxy, Restart),
        ],
        "controller-manager.conf" => vec![(KubeControllerManager, Restart)],
        "scheduler.conf" => vec![(KubeScheduler, Restart)],
        "kubelet.conf" | "kubelet-serving" => vec![(Kubelet, Restart)],
        "kube-proxy.conf" => vec![(KubeProxy, Restart)],
        // etcd-healthcheck-client: meshd's own probe reads it on every probe. The rest (admin.conf,
        // meshd's own certificates) are not used by a component.
        _ => vec![],
    }
}

/// The components to restart after the entries `ids` were renewed, deduplicated, in start order.
pub fn restarts_for(ids: &[String]) -> Vec<Component> {
    let mut out: Vec<Component> = ids
        .iter()
        .flat_map(|id| rotation_targets(id))
        .filter(|(_, a)| *a == RotationAction::Restart)
        .map(|(c, _)| c)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `<data-dir>/components.json`: how `meshd run` supervises the components and what `meshd render`
/// puts in their configuration. Every field has a default, so `{}` is a valid file; without the
/// file, `meshd run` supervises nothing (operators running the components themselves, or beside
/// another etcd on 2379, are not disturbed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComponentsConfig {
    /// Binary path per component name (`"etcd": "/usr/bin/etcd"`); a component not listed is
    /// looked up on `PATH`.
    pub binaries: BTreeMap<String, PathBuf>,
    /// Which components to supervise (names); default: every component of the node's role.
    pub supervise: Option<Vec<String>>,
    /// etcd's client port.
    pub etcd_client_port: u16,
    /// etcd's peer port.
    pub etcd_peer_port: u16,
    /// kubelet's HTTPS port.
    pub kubelet_port: u16,
    /// kube-controller-manager's HTTPS port (bound to 127.0.0.1).
    pub controller_manager_port: u16,
    /// kube-scheduler's HTTPS port (bound to 127.0.0.1).
    pub scheduler_port: u16,
    /// The container runtime's CRI endpoint (kubelet).
    pub container_runtime_endpoint: String,
    /// kubelet's cgroup driver.
    pub cgroup_driver: String,
    /// kubelet's static pod directory.
    pub static_pod_path: PathBuf,
    /// The cluster DNS domain on a joined node (a control plane takes its own setting).
    pub cluster_domain: String,
    /// Cluster DNS server addresses for kubelet (default on a control plane: the 10th address of the
    /// Service CIDR, kubeadm's choice; none on a joined node unless set).
    pub cluster_dns: Vec<IpAddr>,
    /// Kubernetes version of the images in static pod manifests.
    pub kubernetes_version: String,
    /// etcd image tag in static pod manifests.
    pub etcd_image_tag: String,
    /// Image registry of static pod manifests.
    pub image_registry: String,
    /// First restart delay, milliseconds.
    pub backoff_initial_ms: u64,
    /// Longest restart delay, milliseconds.
    pub backoff_max_ms: u64,
    /// A component that ran this long (seconds) before it exited restarts with the first delay again.
    pub backoff_reset_after_secs: u64,
    /// Seconds between health probes.
    pub probe_interval_secs: u64,
    /// Seconds a stopping component gets after SIGTERM before SIGKILL.
    pub stop_grace_secs: u64,
}

impl Default for ComponentsConfig {
    fn default() -> Self {
        ComponentsConfig {
            binaries: BTreeMap::new(),
            supervise: None,
            etcd_client_port: 2379,
            etcd_peer_port: 2380,
            kubelet_port: 10250,
            controller_manager_port: 10257,
            scheduler_port: 10259,
            container_runtime_endpoint: "unix:///run/containerd/containerd.sock".into(),
            cgroup_driver: "systemd".into(),
            static_pod_path: PathBuf::from("/etc/kubernetes/manifests"),
            cluster_domain: "cluster.local".into(),
            cluster_dns: vec![],
            kubernetes_version: "v1.31.0".into(),
            etcd_image_tag: "3.5.15-0".into(),
            image_registry: "registry.k8s.io".into(),
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
            backoff_reset_after_secs: 60,
            probe_interval_secs: 2,
            stop_grace_secs: 10,
        }
    }
}

impl ComponentsConfig {
    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        for name in self.binaries.keys() {
            if Component::from_name(name).is_none() {
                errs.push(format!("binaries: unknown component {name:?}"));
            }
        }
        for name in self.supervise.iter().flatten() {
            if Component::from_name(name).is_none() {
                errs.push(format!("supervise: unknown component {name:?}"));
            }
        }
        for (what, p) in [
            ("etcd_client_port", self.etcd_client_port),
            ("etcd_peer_port", self.etcd_peer_port),
            ("kubelet_port", self.kubelet_port),
            ("controller_manager_port", self.controller_manager_port),
            ("scheduler_port", self.scheduler_port),
        ] {
            if p == 0 {
                errs.push(format!("{what} must be non-zero"));
            }
        }
        if self.etcd_client_port == self.etcd_peer_port {
            errs.push("etcd_client_port and etcd_peer_port must differ".into());
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            errs.push("backoff_initial_ms must be > 0 and at most backoff_max_ms".into());
        }
        if self.probe_interval_secs == 0 {
            errs.push("probe_interval_secs must be > 0".into());
        }
        if !pki::inventory::is_dns_label_seq(&self.cluster_domain) {
            errs.push(format!(
                "cluster_domain {:?} is not a DNS name",
                self.cluster_domain
            ));
        }
        for (what, v) in [
            (
                "container_runtime_endpoint",
                &self.container_runtime_endpoint,
            ),
            ("cgroup_driver", &self.cgroup_driver),
            ("kubernetes_version", &self.kubernetes_version),
            ("etcd_image_tag", &self.etcd_image_tag),
            ("image_registry", &self.image_registry),
        ] {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errs.push(format!("{what} must be non-empty, without spaces"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// Errors loading what rendering needs.
#[derive(Debug, thiserror::Error)]
pub enum ComponentsError {
    /// `meshd.json` could not be read.
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// `components.json` could not be read.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `components.json` is not valid.
    #[error("{path}: invalid component configuration:\n  - {}", errors.join("\n  - "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<String>,
    },
    /// `meshd.json` lacks what a role needs.
    #[error("{0}")]
    Incomplete(String),
}

/// Reads `components.json`; `Ok(None)` when there is none.
pub fn load_config(data_dir: &Path) -> Result<Option<ComponentsConfig>, ComponentsError> {
    let path = data_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ComponentsError::Io {
                path,
                reason: e.to_string(),
            })
        }
    };
    let cfg: ComponentsConfig =
        serde_json::from_str(&text).map_err(|e| ComponentsError::Invalid {
            path: path.clone(),
            errors: vec![e.to_string()],
        })?;
    cfg.validate()
        .map_err(|errors| ComponentsError::Invalid { path, errors })?;
    Ok(Some(cfg))
}

/// Everything rendering needs, read from `meshd.json` and `components.json`. Rendering itself is
/// pure: context in, command lines and files out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderContext {
    /// The data directory, absolute (every rendered path is inside it).
    pub data_dir: PathBuf,
    /// The node's role.
    pub role: Role,
    /// The node's name.
    pub node_name: String,
    /// The node's address (advertised by etcd and the API server, kubelet's node IP).
    pub node_ip: IpAddr,
    /// The API server URL.
    pub apiserver_url: String,
    /// Cluster settings (control plane only).
    pub cluster: Option<pki::inventory::ClusterSettings>,
    /// The pod network.
    pub cluster_cidr: ipnet::IpNet,
    /// The component configuration.
    pub config: ComponentsConfig,
}

impl RenderContext {
    /// Builds the context of the data directory `data_dir`, with `components.json` or its defaults.
    pub fn load(data_dir: &Path) -> Result<RenderContext, ComponentsError> {
        let config = load_config(data_dir)?.unwrap_or_default();
        Self::with_config(data_dir, config)
    }

    /// Builds the context of `data_dir` with `config`.
    pub fn with_config(
        data_dir: &Path,
        config: ComponentsConfig,
    ) -> Result<RenderContext, ComponentsError> {
        let data_dir = std::path::absolute(data_dir).map_err(|e| ComponentsError::Io {
            path: data_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let cfg = settings::require_config(&data_dir)?;
        match (cfg.role, &cfg.cluster, &cfg.joined) {
            (Role::ControlPlane, Some(s), _) => Ok(RenderContext {
                role: Role::ControlPlane,
                node_name: s.node_name.clone(),
                node_ip: s.advertise_address,
                apiserver_url: s.apiserver_url(),
                cluster_cidr: s.cluster_cidr,
                cluster: Some(s.clone()),
                data_dir,
                config,
            }),
            (Role::Node, _, Some(j)) => Ok(RenderContext {
                role: Role::Node,
                node_name: j.name.clone(),
                node_ip: j.addresses.first().copied().ok_or_else(|| {
                    ComponentsError::Incomplete("meshd.json: the joined node has no address".into())
                })?,
                apiserver_url: j.apiserver_url.clone(),
                cluster_cidr: ipnet::IpNet::V4(j.network.network),
                cluster: None,
                data_dir,
                config,
            }),
            _ => Err(ComponentsError::Incomplete(format!(
                "{}: neither control-plane settings nor a joined node; run `meshd init` or `meshd join`",
                settings::path(&data_dir).display()
            ))),
        }
    }

    /// `rel` inside the data directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.data_dir.join(rel)
    }

    /// The components this node runs, restricted to `supervise` when it is set.
    pub fn components(&self) -> Vec<Component> {
        Component::for_role(self.role)
            .into_iter()
            .filter(|c| match &self.config.supervise {
                Some(list) => list.iter().any(|n| n == c.name()),
                None => true,
            })
            .collect()
    }

    /// Where component `c`'s binary is: the configured path, or the first match on `PATH`. `None`
    /// when neither has it.
    pub fn binary(&self, c: Component) -> Result<PathBuf, String> {
        if let Some(p) = self.config.binaries.get(c.name()) {
            return if is_executable(p) {
                Ok(p.clone())
            } else {
                Err(format!(
                    "{}: configured in {CONFIG_FILE}, but not an executable file",
                    p.display()
                ))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(c.name()))
            .find(|p| is_executable(p))
            .ok_or_else(|| {
                format!(
                    "{} not found on PATH and not configured in {CONFIG_FILE}",
                    c.name()
                )
            })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_mapping_restarts_only_what_needs_it() {
        assert_eq!(restarts_for(&["etcd-server".into()]), vec![]);
        assert_eq!(
            restarts_for(&["etcd-ca".into(), "apiserver".into()]),
            vec![Component::Etcd, Component::KubeApiserver]
        );
        // Serving pairs the Kubernetes components reload by themselves.
        assert_eq!(
            restarts_for(&[
                "apiserver".into(),
                "controller-manager-serving".into(),
                "scheduler-serving".into()
            ]),
            vec![]
        );
        assert_eq!(
            restarts_for(&["apiserver".into(), "apiserver-etcd-client".into()]),
            vec![Component::KubeApiserver]
        );
        assert_eq!(
            restarts_for(&["kubelet-serving".into(), "kube-proxy.conf".into()]),
            vec![Component::Kubelet, Component::KubeProxy]
        );
        assert_eq!(restarts_for(&["admin.conf".into()]), vec![]);
        // Every entry of a control plane's inventory that a component reads is mapped.
        let s = crate::components::render::tests::settings();
        for e in pki::inventory::control_plane_entries(&s).unwrap() {
            let unused = matches!(
                e.id,
                "admin.conf"
                    | "super-admin.conf"
                    | "meshd-api"
                    | "meshd-admin"
                    | "meshd-etcd-client"
                    | "flannel-etcd-client"
                    | "etcd-healthcheck-client"
            );
            assert_eq!(rotation_targets(e.id).is_empty(), unused, "{}", e.id);
        }
    }

    #[test]
    fn config_validation_reports_everything() {
        let c = ComponentsConfig {
            binaries: [("kubectl".to_string(), PathBuf::from("/x"))].into(),
            etcd_client_port: 0,
            backoff_initial_ms: 0,
            cluster_domain: "Bad Domain".into(),
            ..Default::default()
        };
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(ComponentsConfig::default().validate().is_ok());
        let parsed: ComponentsConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, ComponentsConfig::default());
        assert!(serde_json::from_str::<ComponentsConfig>(r#"{"etcd_port": 1}"#).is_err());
    }
}
