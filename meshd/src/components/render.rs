//! Pure rendering: a [`RenderContext`] in, each component's command line, config files, environment,
//! the files it reads and how to probe it out. Every path points into the data directory (kubeadm's
//! layout); kubeconfigs are the ones `meshd init` / `meshd join` wrote, which reference the client
//! pair by path (`*-current.pem`, switched by rotation), so a restart picks up a renewed certificate.
//!
//! What holds for every rendering (the CFG checks of `audit-checks.md`):
//! * etcd: serving and peer pairs from the etcd CA, `--client-cert-auth` and `--peer-client-cert-auth`
//!   against the etcd CA, `--auto-tls` / `--peer-auto-tls` false, https URLs only (CFG-01..05);
//! * kube-apiserver: etcd over TLS with `apiserver-etcd-client` (CFG-06), kubelets verified with
//!   `--kubelet-certificate-authority` and called with `apiserver-kubelet-client` (CFG-07), serving
//!   pair and `--client-ca-file` (CFG-08), `--anonymous-auth=false` (CFG-10), `Node,RBAC` and
//!   `NodeRestriction` (CFG-11), the service-account key pair, the front-proxy / request-header flags;
//! * kubelet: meshd's CA-signed serving pair (never self-signed: `tlsCertFile` is set and
//!   `serverTLSBootstrap` off), `clientCAFile`, webhook authentication and authorization, anonymous
//!   off, `readOnlyPort: 0` (CFG-10..12); `rotateCertificates` is left at its default (off: meshd
//!   renews the kubelet's pairs itself), and `--hostname-override` is set although CIS 4.2.7 advises
//!   against it, because the node name must equal the certificate's `system:node:<name>` for the
//!   Node authorizer and NodeRestriction;
//! * controller-manager and scheduler: bound to 127.0.0.1, their kubeconfigs, `--root-ca-file`
//!   (CFG-13), and a CA-signed serving pair from the inventory (`controller-manager-serving`,
//!   `scheduler-serving`) instead of the self-signed one they would make (TLS-06);
//! * TLS 1.2 minimum and ECDHE + AEAD cipher suites everywhere a component serves TLS (CFG-09).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::{Component, RenderContext};
use crate::settings::Role;

/// Minimum TLS version of every component (Go's name).
pub const TLS_MIN_VERSION: &str = "VersionTLS12";

/// The TLS 1.2 cipher suites every component may use (Go's names): ECDHE key exchange and AEAD
/// ciphers only, the same set rustls offers (TLS 1.3 suites are not configurable in Go and are all
/// AEAD). Stricter than CIS 1.2.30, whose list still holds RSA key exchange.
pub const CIPHER_SUITES: [&str; 6] = [
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
];

/// What a file a component reads is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputKind {
    /// A certificate (or CA bundle): may be world-readable.
    Certificate,
    /// A private key (or a PEM holding one): 0600.
    Key,
    /// A kubeconfig: 0600.
    Kubeconfig,
    /// A config file meshd renders: 0600.
    Config,
}

/// A file a component reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Input {
    /// Absolute path.
    pub path: PathBuf,
    /// What it is.
    pub kind: InputKind,
}

/// A config file meshd writes for a component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    /// Absolute path (inside `<data-dir>/components/`).
    pub path: PathBuf,
    /// Contents.
    pub contents: String,
    /// File mode.
    pub mode: u32,
}

/// How `meshd run` probes a component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// An HTTPS GET.
    Https(HttpsProbe),
    /// Only that the process runs (kube-proxy serves no TLS endpoint: its health port is plain HTTP
    /// and bound to 127.0.0.1).
    Process,
}

/// An HTTPS GET probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsProbe {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The name (DNS name or IP) the server certificate must hold.
    pub server_name: String,
    /// The request path.
    pub path: String,
    /// The CA the server must chain to: every component serves a CA-signed certificate from the
    /// inventory, so none is probed without verification.
    pub ca: PathBuf,
    /// Client certificate and key presented.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Whether only a 200 counts (otherwise any HTTP answer over a verified TLS session does: kubelet
    /// answers 401/403 to an identity it does not authorize, which still proves it serves).
    pub require_ok: bool,
}

/// One component, rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// Which.
    pub component: Component,
    /// Arguments (without the binary).
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Config files to write before it starts.
    pub files: Vec<RenderedFile>,
    /// Every file it reads (certificates, keys, kubeconfigs, its config).
    pub inputs: Vec<Input>,
    /// Directories it writes.
    pub state_dirs: Vec<PathBuf>,
    /// Its log file under `meshd run`.
    pub log: PathBuf,
    /// How to probe it.
    pub health: Health,
}

impl Rendered {
    /// The value of `--flag` in the arguments (`--flag=value` form).
    pub fn flag(&self, name: &str) -> Option<&str> {
        let prefix = format!("--{name}=");
        self.args.iter().find_map(|a| a.strip_prefix(&prefix))
    }
}

/// Renders every component of the context's node (the `supervise` restriction ignored: an operator
/// rendering units wants them all).
pub fn render_all(ctx: &RenderContext) -> Result<Vec<Rendered>, String> {
    Component::for_role(ctx.role)
        .into_iter()
        .map(|c| render(ctx, c))
        .collect()
}

/// Renders component `c`.
pub fn render(ctx: &RenderContext, c: Component) -> Result<Rendered, String> {
    let mut b = Builder::new(ctx, c);
    match c {
        Component::Etcd => etcd(ctx, &mut b)?,
        Component::KubeApiserver => apiserver(ctx, &mut b)?,
        Component::KubeControllerManager => controller_manager(ctx, &mut b)?,
        Component::KubeScheduler => scheduler(ctx, &mut b)?,
        Component::Kubelet => kubelet(ctx, &mut b)?,
        Component::KubeProxy => kube_proxy(ctx, &mut b)?,
    }
    Ok(b.done())
}

struct Builder<'a> {
    ctx: &'a RenderContext,
    r: Rendered,
}

impl<'a> Builder<'a> {
    fn new(ctx: &'a RenderContext, c: Component) -> Self {
        let dir = ctx.path(&format!("{}/{}", super::COMPONENTS_DIR, c.name()));
        Builder {
            ctx,
            r: Rendered {
                component: c,
                args: vec![],
                env: vec![],
                files: vec![],
                inputs: vec![],
                state_dirs: vec![],
                log: dir.join(format!("{}.log", c.name())),
                health: Health::Process,
            },
        }
    }

    /// `--name=value`.
    fn arg(&mut self, name: &str, value: impl std::fmt::Display) {
        self.r.args.push(format!("--{name}={value}"));
    }

    /// `--name=<data-dir>/rel`, recording the file as an input of `kind`.
    fn file_arg(&mut self, name: &str, rel: &str, kind: InputKind) {
        let p = self.input(rel, kind);
        self.arg(name, p.display());
    }

    /// Records `<data-dir>/rel` as an input and returns its path.
    fn input(&mut self, rel: &str, kind: InputKind) -> PathBuf {
        let path = self.ctx.path(rel);
        if !self.r.inputs.iter().any(|i| i.path == path) {
            self.r.inputs.push(Input {
                path: path.clone(),
                kind,
            });
        }
        path
    }

    /// A config file under `components/<name>/`, recorded as an input; returns its path.
    fn config_file(&mut self, name: &str, contents: String) -> PathBuf {
        let rel = format!(
            "{}/{}/{name}",
            super::COMPONENTS_DIR,
            self.r.component.name()
        );
        let path = self.input(&rel, InputKind::Config);
        self.r.files.push(RenderedFile {
            path: path.clone(),
            contents,
            mode: pki::store::KEY_MODE,
        });
        path
    }

    fn done(self) -> Rendered {
        self.r
    }
}

fn cluster(ctx: &RenderContext) -> Result<&pki::inventory::ClusterSettings, String> {
    ctx.cluster.as_ref().ok_or_else(|| {
        "control-plane components need a control-plane data directory (`meshd init`)".to_string()
    })
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

fn https(ip: IpAddr, port: u16) -> String {
    format!("https://{}:{port}", host(ip))
}

fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    }
}

/// A YAML scalar: JSON's quoting is valid YAML.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn etcd(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    let s = cluster(ctx)?;
    let ip = s.advertise_address;
    let (cport, pport) = (ctx.config.etcd_client_port, ctx.config.etcd_peer_port);
    let lo = loopback(ip);
    let mut client_urls = vec![https(lo, cport)];
    if ip != lo {
        client_urls.push(https(ip, cport));
    }
    let data = ctx.path(&format!("{}/etcd/data", super::COMPONENTS_DIR));
    b.arg("name", &s.node_name);
    b.arg("data-dir", data.display());
    b.r.state_dirs.push(data);
    b.arg("listen-client-urls", client_urls.join(","));
    b.arg("advertise-client-urls", https(ip, cport));
    b.arg("listen-peer-urls", https(ip, pport));
    b.arg("initial-advertise-peer-urls", https(ip, pport));
    b.arg(
        "initial-cluster",
        format!("{}={}", s.node_name, https(ip, pport)),
    );
    b.arg("initial-cluster-state", "new");
    b.file_arg("cert-file", "pki/etcd/server.crt", InputKind::Certificate);
    b.file_arg("key-file", "pki/etcd/server.key", InputKind::Key);
    b.arg("client-cert-auth", "true");
    b.file_arg("trusted-ca-file", "pki/etcd/ca.crt", InputKind::Certificate);
    b.file_arg(
        "peer-cert-file",
        "pki/etcd/peer.crt",
        InputKind::Certificate,
    );
    b.file_arg("peer-key-file", "pki/etcd/peer.key", InputKind::Key);
    b.arg("peer-client-cert-auth", "true");
    b.file_arg(
        "peer-trusted-ca-file",
        "pki/etcd/ca.crt",
        InputKind::Certificate,
    );
    b.arg("auto-tls", "false");
    b.arg("peer-auto-tls", "false");
    b.arg("cipher-suites", CIPHER_SUITES.join(","));
    b.arg("snapshot-count", 10000);
    let ca = b.input("pki/etcd/ca.crt", InputKind::Certificate);
    // The probe's pair is meshd's, not etcd's: not an input of etcd itself.
    let cert = ctx.path("pki/etcd/healthcheck-client.crt");
    let key = ctx.path("pki/etcd/healthcheck-client.key");
    b.r.health = Health::Https(HttpsProbe {
        addr: SocketAddr::new(lo, cport),
        server_name: lo.to_string(),
        path: "/health".into(),
        ca,
        client: Some((cert, key)),
        require_ok: true,
    });
    Ok(())
}

fn apiserver(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    let s = cluster(ctx)?;
    let ip = s.advertise_address;
    b.arg("advertise-address", ip);
    b.arg("secure-port", s.apiserver_port);
    b.arg("allow-privileged", "true");
    b.arg("anonymous-auth", "false");
    b.arg("authorization-mode", "Node,RBAC");
    b.arg("enable-admission-plugins", "NodeRestriction");
    b.arg("profiling", "false");
    b.file_arg("client-ca-file", "pki/ca.crt", InputKind::Certificate);
    b.file_arg("tls-cert-file", "pki/apiserver.crt", InputKind::Certificate);
    b.file_arg("tls-private-key-file", "pki/apiserver.key", InputKind::Key);
    b.arg("tls-min-version", TLS_MIN_VERSION);
    b.arg("tls-cipher-suites", CIPHER_SUITES.join(","));
    b.arg(
        "etcd-servers",
        https(loopback(ip), ctx.config.etcd_client_port),
    );
    b.file_arg("etcd-cafile", "pki/etcd/ca.crt", InputKind::Certificate);
    b.file_arg(
        "etcd-certfile",
        "pki/apiserver-etcd-client.crt",
        InputKind::Certificate,
    );
    b.file_arg(
        "etcd-keyfile",
        "pki/apiserver-etcd-client.key",
        InputKind::Key,
    );
    b.file_arg(
        "kubelet-client-certificate",
        "pki/apiserver-kubelet-client.crt",
        InputKind::Certificate,
    );
    b.file_arg(
        "kubelet-client-key",
        "pki/apiserver-kubelet-client.key",
        InputKind::Key,
    );
    b.file_arg(
        "kubelet-certificate-authority",
        "pki/ca.crt",
        InputKind::Certificate,
    );
    b.arg(
        "kubelet-preferred-address-types",
        "InternalIP,ExternalIP,Hostname",
    );
    b.file_arg(
        "proxy-client-cert-file",
        "pki/front-proxy-client.crt",
        InputKind::Certificate,
    );
    b.file_arg(
        "proxy-client-key-file",
        "pki/front-proxy-client.key",
        InputKind::Key,
    );
    b.file_arg(
        "requestheader-client-ca-file",
        "pki/front-proxy-ca.crt",
        InputKind::Certificate,
    );
    b.arg("requestheader-allowed-names", "front-proxy-client");
    b.arg("requestheader-extra-headers-prefix", "X-Remote-Extra-");
    b.arg("requestheader-group-headers", "X-Remote-Group");
    b.arg("requestheader-username-headers", "X-Remote-User");
    b.arg(
        "service-account-issuer",
        format!("https://kubernetes.default.svc.{}", s.cluster_domain),
    );
    b.file_arg(
        "service-account-key-file",
        "pki/sa.pub",
        InputKind::Certificate,
    );
    b.file_arg(
        "service-account-signing-key-file",
        "pki/sa.key",
        InputKind::Key,
    );
    b.arg("service-cluster-ip-range", s.service_cidr);
    let ca = b.input("pki/ca.crt", InputKind::Certificate);
    // meshd probes with its own admin identity: /livez is open to every authenticated user
    // (system:public-info-viewer), anonymous requests are refused.
    let cert = ctx.path("pki/meshd/admin-client.crt");
    let key = ctx.path("pki/meshd/admin-client.key");
    b.r.health = Health::Https(HttpsProbe {
        addr: SocketAddr::new(ip, s.apiserver_port),
        server_name: ip.to_string(),
        path: "/livez".into(),
        ca,
        client: Some((cert, key)),
        require_ok: true,
    });
    Ok(())
}

/// Flags the controller-manager and the scheduler share: their kubeconfig for the API, for
/// delegated authentication and authorization; loopback binding; their CA-signed serving pair
/// (`serving`: the inventory's `<name>-server` files) and TLS policy.
fn delegated(b: &mut Builder, kubeconfig: &str, serving: &str, port: u16) {
    b.file_arg("kubeconfig", kubeconfig, InputKind::Kubeconfig);
    b.file_arg(
        "authentication-kubeconfig",
        kubeconfig,
        InputKind::Kubeconfig,
    );
    b.file_arg(
        "authorization-kubeconfig",
        kubeconfig,
        InputKind::Kubeconfig,
    );
    b.arg("bind-address", "127.0.0.1");
    b.arg("secure-port", port);
    b.file_arg("client-ca-file", "pki/ca.crt", InputKind::Certificate);
    b.file_arg(
        "requestheader-client-ca-file",
        "pki/front-proxy-ca.crt",
        InputKind::Certificate,
    );
    b.arg("leader-elect", "true");
    b.arg("profiling", "false");
    b.file_arg(
        "tls-cert-file",
        &format!("pki/{serving}.crt"),
        InputKind::Certificate,
    );
    b.file_arg(
        "tls-private-key-file",
        &format!("pki/{serving}.key"),
        InputKind::Key,
    );
    b.arg("tls-min-version", TLS_MIN_VERSION);
    b.arg("tls-cipher-suites", CIPHER_SUITES.join(","));
    let ca = b.input("pki/ca.crt", InputKind::Certificate);
    b.r.health = Health::Https(HttpsProbe {
        addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port),
        server_name: "127.0.0.1".into(),
        path: "/healthz".into(),
        ca,
        client: None,
        require_ok: true,
    });
}

fn controller_manager(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    let s = cluster(ctx)?;
    delegated(
        b,
        "controller-manager.conf",
        "controller-manager-server",
        ctx.config.controller_manager_port,
    );
    b.file_arg("root-ca-file", "pki/ca.crt", InputKind::Certificate);
    b.file_arg(
        "service-account-private-key-file",
        "pki/sa.key",
        InputKind::Key,
    );
    b.arg("use-service-account-credentials", "true");
    b.arg("cluster-name", &s.cluster_name);
    b.arg("service-cluster-ip-range", s.service_cidr);
    // meshd allocates pod subnets (leases) and signs node certificates itself: the
    // controller-manager gets neither the job nor the cluster CA's key.
    b.arg("allocate-node-cidrs", "false");
    b.arg("cluster-cidr", s.cluster_cidr);
    Ok(())
}

fn scheduler(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    cluster(ctx)?;
    delegated(
        b,
        "scheduler.conf",
        "scheduler-server",
        ctx.config.scheduler_port,
    );
    Ok(())
}

/// The kubelet's cluster DNS: configured, or on a control plane the 10th address of the Service
/// CIDR (kubeadm's choice, 10.96.0.10).
fn cluster_dns(ctx: &RenderContext) -> Vec<IpAddr> {
    if !ctx.config.cluster_dns.is_empty() {
        return ctx.config.cluster_dns.clone();
    }
    ctx.cluster
        .as_ref()
        .and_then(|s| s.service_cidr.hosts().nth(9))
        .into_iter()
        .collect()
}

fn kubelet(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    let c = &ctx.config;
    let ca = b.input("pki/ca.crt", InputKind::Certificate);
    let cert = b.input("kubelet/pki/kubelet.crt", InputKind::Certificate);
    let key = b.input("kubelet/pki/kubelet.key", InputKind::Key);
    let domain = ctx
        .cluster
        .as_ref()
        .map(|s| s.cluster_domain.clone())
        .unwrap_or_else(|| c.cluster_domain.clone());
    let dns: Vec<String> = cluster_dns(ctx)
        .iter()
        .map(|ip| format!("  - {}\n", q(&ip.to_string())))
        .collect();
    let ciphers: String = CIPHER_SUITES.iter().map(|s| format!("  - {s}\n")).collect();
    let yaml = format!(
        "# Rendered by meshd from its PKI: do not edit (meshd rewrites it).\n\
         apiVersion: kubelet.config.k8s.io/v1beta1\n\
         kind: KubeletConfiguration\n\
         authentication:\n\
         \x20 anonymous:\n\
         \x20   enabled: false\n\
         \x20 webhook:\n\
         \x20   enabled: true\n\
         \x20   cacheTTL: 2m0s\n\
         \x20 x509:\n\
         \x20   clientCAFile: {ca}\n\
         authorization:\n\
         \x20 mode: Webhook\n\
         \x20 webhook:\n\
         \x20   cacheAuthorizedTTL: 5m0s\n\
         \x20   cacheUnauthorizedTTL: 30s\n\
         port: {port}\n\
         readOnlyPort: 0\n\
         healthzPort: 0\n\
         tlsCertFile: {cert}\n\
         tlsPrivateKeyFile: {key}\n\
         tlsMinVersion: {TLS_MIN_VERSION}\n\
         tlsCipherSuites:\n{ciphers}\
         serverTLSBootstrap: false\n\
         clusterDomain: {domain}\n\
         clusterDNS:{dns_open}\n{dns}\
         staticPodPath: {spp}\n\
         containerRuntimeEndpoint: {cre}\n\
         cgroupDriver: {cgd}\n",
        ca = q(&ca.to_string_lossy()),
        port = c.kubelet_port,
        cert = q(&cert.to_string_lossy()),
        key = q(&key.to_string_lossy()),
        domain = q(&domain),
        dns_open = if dns.is_empty() { " []" } else { "" },
        dns = dns.concat(),
        spp = q(&c.static_pod_path.to_string_lossy()),
        cre = q(&c.container_runtime_endpoint),
        cgd = q(&c.cgroup_driver),
    );
    let config = b.config_file("config.yaml", yaml);
    b.arg("config", config.display());
    b.file_arg("kubeconfig", "kubelet.conf", InputKind::Kubeconfig);
    b.input("kubelet/pki/kubelet-client-current.pem", InputKind::Key);
    b.arg("hostname-override", &ctx.node_name);
    b.arg("node-ip", ctx.node_ip);
    let client = match ctx.role {
        // The API server's own identity towards kubelets.
        Role::ControlPlane => Some((
            ctx.path("pki/apiserver-kubelet-client.crt"),
            ctx.path("pki/apiserver-kubelet-client.key"),
        )),
        Role::Node => None,
    };
    b.r.health = Health::Https(HttpsProbe {
        addr: SocketAddr::new(ctx.node_ip, c.kubelet_port),
        server_name: ctx.node_ip.to_string(),
        path: "/healthz".into(),
        ca,
        client,
        require_ok: false,
    });
    Ok(())
}

fn kube_proxy(ctx: &RenderContext, b: &mut Builder) -> Result<(), String> {
    let kubeconfig = b.input("kube-proxy.conf", InputKind::Kubeconfig);
    b.input("pki/kube-proxy-client-current.pem", InputKind::Key);
    let yaml = format!(
        "# Rendered by meshd: do not edit (meshd rewrites it).\n\
         apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         clientConnection:\n\
         \x20 kubeconfig: {kc}\n\
         hostnameOverride: {node}\n\
         clusterCIDR: {cidr}\n\
         mode: iptables\n\
         bindAddress: 0.0.0.0\n\
         healthzBindAddress: 127.0.0.1:10256\n\
         metricsBindAddress: 127.0.0.1:10249\n",
        kc = q(&kubeconfig.to_string_lossy()),
        node = q(&ctx.node_name),
        cidr = q(&ctx.cluster_cidr.to_string()),
    );
    let config = b.config_file("config.yaml", yaml);
    b.arg("config", config.display());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::components::ComponentsConfig;
    use pki::inventory::ClusterSettings;

    pub(crate) fn settings() -> ClusterSettings {
        ClusterSettings {
            cluster_name: "kubernetes".into(),
            node_name: "cp1".into(),
            advertise_address: "192.0.2.10".parse().unwrap(),
            apiserver_port: 6443,
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            apiserver_cert_sans: vec![],
            etcd_peer_addresses: vec![],
            api_port: 7443,
            key_algorithm: pki::keys::KeyAlgorithm::EcdsaP256,
            leaf_lifetime_secs: 86400,
            ca_lifetime_secs: 10 * 86400,
        }
    }

    pub(crate) fn ctx() -> RenderContext {
        let s = settings();
        RenderContext {
            data_dir: "/var/lib/meshd".into(),
            role: Role::ControlPlane,
            node_name: s.node_name.clone(),
            node_ip: s.advertise_address,
            apiserver_url: s.apiserver_url(),
            cluster_cidr: s.cluster_cidr,
            cluster: Some(s),
            config: ComponentsConfig::default(),
        }
    }

    #[test]
    fn etcd_requires_client_and_peer_certs_from_its_ca() {
        let r = render(&ctx(), Component::Etcd).unwrap();
        assert_eq!(r.flag("client-cert-auth"), Some("true"));
        assert_eq!(r.flag("peer-client-cert-auth"), Some("true"));
        assert_eq!(r.flag("auto-tls"), Some("false"));
        assert_eq!(r.flag("peer-auto-tls"), Some("false"));
        assert_eq!(
            r.flag("trusted-ca-file"),
            Some("/var/lib/meshd/pki/etcd/ca.crt")
        );
        assert_eq!(
            r.flag("listen-client-urls"),
            Some("https://127.0.0.1:2379,https://192.0.2.10:2379")
        );
        for a in &r.args {
            assert!(!a.contains("http://"), "plaintext URL in {a}");
        }
        let Health::Https(p) = &r.health else {
            panic!("etcd is probed over TLS")
        };
        assert_eq!(p.path, "/health");
        assert!(p.client.is_some());
    }

    #[test]
    fn apiserver_verifies_kubelets_and_etcd() {
        let r = render(&ctx(), Component::KubeApiserver).unwrap();
        assert_eq!(r.flag("anonymous-auth"), Some("false"));
        assert_eq!(r.flag("authorization-mode"), Some("Node,RBAC"));
        assert_eq!(r.flag("enable-admission-plugins"), Some("NodeRestriction"));
        assert_eq!(
            r.flag("kubelet-certificate-authority"),
            Some("/var/lib/meshd/pki/ca.crt")
        );
        assert_eq!(r.flag("etcd-servers"), Some("https://127.0.0.1:2379"));
        assert_eq!(r.flag("tls-min-version"), Some("VersionTLS12"));
    }

    #[test]
    fn controller_manager_and_scheduler_serve_the_inventory_pairs_verified_by_the_ca() {
        for (c, pair) in [
            (
                Component::KubeControllerManager,
                "controller-manager-server",
            ),
            (Component::KubeScheduler, "scheduler-server"),
        ] {
            let r = render(&ctx(), c).unwrap();
            let cert = format!("/var/lib/meshd/pki/{pair}.crt");
            let key = format!("/var/lib/meshd/pki/{pair}.key");
            assert_eq!(r.flag("tls-cert-file"), Some(cert.as_str()));
            assert_eq!(r.flag("tls-private-key-file"), Some(key.as_str()));
            assert!(r
                .inputs
                .iter()
                .any(|i| i.path.to_str() == Some(key.as_str()) && i.kind == InputKind::Key));
            let Health::Https(p) = &r.health else {
                panic!("{c} is probed over TLS")
            };
            assert_eq!(p.ca, std::path::Path::new("/var/lib/meshd/pki/ca.crt"));
        }
    }

    #[test]
    fn ipv6_urls_are_bracketed() {
        let mut c = ctx();
        if let Some(s) = c.cluster.as_mut() {
            s.advertise_address = "2001:db8::10".parse().unwrap();
        }
        let r = render(&c, Component::Etcd).unwrap();
        assert_eq!(
            r.flag("listen-client-urls"),
            Some("https://[::1]:2379,https://[2001:db8::10]:2379")
        );
    }

    #[test]
    fn kubelet_config_has_no_anonymous_or_read_only_port() {
        let r = render(&ctx(), Component::Kubelet).unwrap();
        let y = &r.files[0].contents;
        for want in [
            "readOnlyPort: 0\n",
            "  anonymous:\n    enabled: false\n",
            "  mode: Webhook\n",
            "tlsCertFile: \"/var/lib/meshd/kubelet/pki/kubelet.crt\"\n",
            "clientCAFile: \"/var/lib/meshd/pki/ca.crt\"\n",
            "serverTLSBootstrap: false\n",
            "clusterDNS:\n  - \"10.96.0.10\"\n",
        ] {
            assert!(y.contains(want), "{want:?} missing from\n{y}");
        }
        assert_eq!(r.files[0].mode, 0o600);
    }

    #[test]
    fn worker_nodes_render_kubelet_and_proxy_only() {
        let mut c = ctx();
        c.role = Role::Node;
        c.cluster = None;
        let all = render_all(&c).unwrap();
        let names: Vec<_> = all.iter().map(|r| r.component).collect();
        assert_eq!(names, vec![Component::Kubelet, Component::KubeProxy]);
        assert!(render(&c, Component::Etcd).is_err());
        // No DNS address known on a joined node unless configured.
        assert!(all[0].files[0].contents.contains("clusterDNS: []\n"));
    }
}
