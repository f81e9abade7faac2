//! The command line: one `Subcommand` enum, doc comments as help text.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pki::inventory::ClusterSettings;
use pki::keys::KeyAlgorithm;

/// `println!` that ends the process quietly, with the status a SIGPIPE would give (141), when stdout
/// is closed (`meshd status | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
        }
    }};
}

/// `print!` with the same treatment of a closed stdout.
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
        }
    }};
}

/// meshd: PKI, join, rotation, WireGuard overlay and TLS audit for Kubernetes clusters on networks you
/// do not own.
#[derive(Debug, Parser)]
#[command(name = "meshd", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The data directory option, shared by every command.
#[derive(Debug, Args)]
pub struct DataDir {
    /// meshd's data directory (kubeadm's layout: `pki/`, kubeconfigs beside it).
    #[arg(long, env = "MESHD_DATA_DIR", default_value = "/var/lib/meshd")]
    pub data_dir: PathBuf,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create (or complete) the control-plane certificate inventory, kubeconfigs and service-account
    /// keys. Safe to run again: keeps every CA and valid certificate, creates only what is missing.
    Init(Box<InitArgs>),
    /// Certificate commands.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the daemon. On the control plane: serve the meshd API (joins, renewals, tokens).
    Run(RunArgs),
    /// Renew every certificate past its renewal point (about 2/3 of its lifetime), once: locally with
    /// the CA on a control plane, through the meshd API on a node. Cron-friendly: quiet when nothing
    /// is due, one line per renewed certificate. Exit codes: 0 nothing due or all renewed; 1 a renewal
    /// failed; 2 usage error; 3 lock not obtained in time, or the data directory cannot be read
    /// (nothing done); 4 renewed, but a hook failed.
    Rotate(RotateArgs),
    /// Bootstrap tokens for `meshd join` (talks to the local `meshd run` with the admin certificate).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Join this machine to a cluster: checks the control plane against --ca-hash before it sends
    /// anything, makes every private key here, and writes the certificates it gets back.
    Join(Box<JoinArgs>),
    /// Registered nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Render the Kubernetes components' configuration (TLS everywhere, from meshd's PKI) as systemd
    /// units or static pod manifests into --out; their config files go into the data directory.
    Render {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// The form.
        #[arg(long, value_enum)]
        format: crate::components::forms::Form,
        /// Where to write the units or manifests.
        #[arg(long)]
        out: PathBuf,
        /// Output format of the report.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Helpers for the crash tests (hidden).
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
    /// TLS audit of the cluster: live handshakes with every known endpoint, component
    /// configuration, certificate inventory and the overlay. Exit 0 clean, 1 findings at or above
    /// --fail-on, 2 usage error, 3 incomplete.
    Audit(Box<crate::audit::cli::AuditArgs>),
    /// This node's mesh: registered nodes and subnets, and the WireGuard peers with their latest
    /// handshake and transfer counters; the Kubernetes components `meshd run` supervises, with
    /// their logs.
    Status {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// The WireGuard interface `meshd run` uses.
        #[arg(long, default_value = "meshd0")]
        wg_interface: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

impl std::fmt::Debug for JoinArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinArgs")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// `meshd run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    /// Data directory.
    pub dir: DataDir,
    /// Listen on this address instead of the advertise address and API port.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// WireGuard interface name (nodes sharing one machine need distinct names: the UAPI socket
    /// directory is not per network namespace).
    #[arg(long, default_value = "meshd0")]
    pub wg_interface: String,
    /// Tunnel MTU (default: the underlay's MTU − 80).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Persistent keepalive towards every peer, seconds (25 for nodes behind NAT; 0 = off).
    #[arg(long, default_value_t = 0)]
    pub keepalive: u16,
    /// WireGuard data path: `fast` (meshd's own, with TUN and UDP offloads) or `boringtun`
    /// (boringtun's device loop).
    #[arg(long, default_value_t = overlay::wg::WgEngine::DEFAULT)]
    pub wg_engine: overlay::wg::WgEngine,
    /// Where to write flannel's subnet.env.
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    pub subnet_env: std::path::PathBuf,
    /// Where to write the CNI network configuration.
    #[arg(long, default_value = "/etc/cni/net.d/10-meshd.conflist")]
    pub cni_conf: std::path::PathBuf,
    /// The CNI bridge's name.
    #[arg(long, default_value = "cni0")]
    pub cni_bridge: String,
    /// Run without the WireGuard mesh (API and leases only).
    #[arg(long)]
    pub no_mesh: bool,
    /// Serve Prometheus metrics (certificate expiry, peer handshakes, failed local audit checks)
    /// on this address; `off` for none. Loopback by default: the endpoint has no authentication.
    #[arg(long, default_value = "127.0.0.1:9641", value_parser = parse_metrics_listen)]
    pub metrics_listen: MetricsListen,
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Clone, Debug)]
pub struct MetricsListen(pub Option<std::net::SocketAddr>);

fn parse_metrics_listen(s: &str) -> Result<MetricsListen, String> {
    if s == "off" {
        return Ok(MetricsListen(None));
    }
    s.parse()
        .map(|a| MetricsListen(Some(a)))
        .map_err(|e| format!("{s}: {e} (HOST:PORT or off)"))
}

/// `meshd rotate` options.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    /// Data directory.
    pub dir: DataDir,
    /// Show what would be renewed; change nothing, run no hook.
    #[arg(long)]
    pub dry_run: bool,
    /// Renew these entries (comma-separated ids, e.g. `apiserver,etcd-server`) or `all`, due or not.
    #[arg(long, value_name = "NAME|all")]
    pub force: Option<String>,
    /// How long to wait for another meshd holding the data directory's lock (exit 3 after that).
    #[arg(long, default_value = "60s")]
    pub lock_timeout: String,
    /// Output format (`json`: the whole report, every entry).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `meshd token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print the `meshd join` command that uses it.
    Create {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Lifetime (e.g. 24h, 30m).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many nodes it may admit (default: 1).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Free text shown by `token list`.
        #[arg(long, default_value = "")]
        description: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Revoke a token by its id (the part before the dot).
    Revoke {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Token id.
        id: String,
    },
}

/// `meshd node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List registered nodes.
    List {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Deregister a node and release its subnet.
    Remove {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Node name.
        name: String,
    },
}

/// `meshd join` options. `Debug` leaves the token out.
#[derive(Args)]
pub struct JoinArgs {
    #[command(flatten)]
    /// Data directory of this node.
    pub dir: DataDir,
    /// The control plane's meshd API (HOST:PORT).
    #[arg(long)]
    pub server: String,
    /// The bootstrap token (`meshd token create` prints it).
    #[arg(long, env = "MESHD_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// sha256:<hex> of the cluster CA's public key (`meshd token create` prints it).
    #[arg(long)]
    pub ca_hash: String,
    /// This node's name.
    #[arg(long, required_unless_present = "rejoin")]
    pub node_name: Option<String>,
    /// This node's address.
    #[arg(long, required_unless_present = "rejoin")]
    pub advertise_address: Option<IpAddr>,
    /// Restore a node that joined before (from its data directory) whose certificates expired
    /// while it was offline: new certificates for the same name, subnet and WireGuard key, with a
    /// new token and a proof that this machine holds the node's registered identity key.
    #[arg(long, conflicts_with_all = ["node_name", "advertise_address", "endpoint"])]
    pub rejoin: bool,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    pub wireguard_port: u16,
    /// WireGuard endpoint other nodes send to, when it differs from the advertise address (NAT).
    #[arg(long)]
    pub endpoint: Option<std::net::SocketAddr>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `meshd debug ...` (hidden; see `crate::debug`).
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Run the start-up recovery alone; exits 1 when an entry is left without a valid pair.
    Recover {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Whether this build has failpoints, and their names (JSON).
    Failpoints,
}

/// `meshd certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// One row per certificate and CA: expiry, residual time, signing CA, chain and key checks.
    /// Exits 1 when any certificate is missing, expired, not yet valid, or does not chain to its CA.
    Check {
        #[command(flatten)]
        /// Data directory.
        dir: DataDir,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

/// `meshd init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    /// Data directory.
    pub dir: DataDir,
    /// Have `meshd run` supervise the Kubernetes components (etcd first; every component whose
    /// binary is found): writes `components.json` with the defaults (`{}`) unless one exists.
    #[arg(long)]
    pub components: bool,
    /// This node's name (lower-case DNS name).
    #[arg(long)]
    pub node_name: String,
    /// The address other nodes and clients reach this node at.
    #[arg(long)]
    pub advertise_address: IpAddr,
    /// The API server's port.
    #[arg(long, default_value_t = 6443)]
    pub apiserver_port: u16,
    /// The Service CIDR; its first address goes into the API server certificate.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: ipnet::IpNet,
    /// The pod network.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: ipnet::IpNet,
    /// The cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Extra API server certificate SANs, comma-separated (DNS names or IPs).
    #[arg(long, value_delimiter = ',')]
    pub apiserver_cert_sans: Vec<String>,
    /// Extra addresses etcd peers connect from, comma-separated (etcd checks a peer's source IP
    /// against its certificate).
    #[arg(long, value_delimiter = ',')]
    pub etcd_peer_addresses: Vec<IpAddr>,
    /// The cluster's name in kubeconfigs.
    #[arg(long, default_value = "kubernetes")]
    pub cluster_name: String,
    /// The meshd API port.
    #[arg(long, default_value_t = 7443)]
    pub api_port: u16,
    /// Lifetime of leaf certificates (e.g. 90d, 30d, 12h). meshd renews at about 2/3 of it.
    #[arg(long, default_value = "90d")]
    pub cert_lifetime: String,
    /// Lifetime of new CAs.
    #[arg(long, default_value = "10y")]
    pub ca_lifetime: String,
    /// Key type of new keys: ecdsa-p256 (default) or ecdsa-p384.
    #[arg(long, default_value = "ecdsa-p256")]
    pub key_type: String,
    /// Where the cluster state lives: a file in the data directory (embedded, the default of a first
    /// init), or etcd. A re-run keeps what meshd.json records and refuses to change it.
    #[arg(long, value_enum)]
    pub store: Option<crate::settings::StoreKind>,
    /// etcd endpoints (https://HOST:PORT, comma-separated) for `--store etcd`; meshd authenticates
    /// with `pki/etcd/meshd-client.crt`. A re-run keeps the recorded ones and refuses to change them.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Output format of the report.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

impl InitArgs {
    fn settings(&self) -> anyhow::Result<ClusterSettings> {
        let leaf = pki::time::parse_duration(&self.cert_lifetime).context("--cert-lifetime")?;
        let ca = pki::time::parse_duration(&self.ca_lifetime).context("--ca-lifetime")?;
        let key_algorithm: KeyAlgorithm = self.key_type.parse().context("--key-type")?;
        Ok(ClusterSettings {
            cluster_name: self.cluster_name.clone(),
            node_name: self.node_name.clone(),
            advertise_address: self.advertise_address,
            apiserver_port: self.apiserver_port,
            service_cidr: self.service_cidr,
            cluster_cidr: self.cluster_cidr,
            cluster_domain: self.cluster_domain.clone(),
            apiserver_cert_sans: self.apiserver_cert_sans.clone(),
            etcd_peer_addresses: self.etcd_peer_addresses.clone(),
            api_port: self.api_port,
            key_algorithm,
            leaf_lifetime_secs: leaf.as_secs(),
            ca_lifetime_secs: ca.as_secs(),
        })
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init(args) => {
            let s = args.settings()?;
            let store = crate::init::StoreOptions {
                kind: args.store,
                etcd_endpoints: args.etcd_endpoints.clone(),
            };
            let report = crate::init::init(&args.dir.data_dir, &s, &store, SystemTime::now())?;
            if args.components {
                let path = args.dir.data_dir.join(crate::components::CONFIG_FILE);
                if !path.exists() {
                    pki::store::write_atomic(&path, b"{}\n", 0o600)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                // An existing file (perhaps edited) is kept; it must still be valid.
                crate::components::load_config(&args.dir.data_dir).map_err(anyhow::Error::msg)?;
            }
            match args.output {
                OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&report)?),
                OutputFormat::Table => out_raw!("{}", render_init(&report)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Check { dir, output }) => {
            let rows = crate::certs::check(&dir.data_dir, SystemTime::now())?;
            match output {
                OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&rows)?),
                OutputFormat::Table => {
                    out_raw!("{}", crate::certs::render_table(&rows, &dir.data_dir))
                }
            }
            let failed = rows.iter().filter(|r| r.failed()).count();
            if failed > 0 {
                eprintln!("{failed} of {} certificates failed the check", rows.len());
                Ok(ExitCode::from(1))
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Render {
            dir,
            format,
            out,
            output,
        } => {
            let r = crate::components::forms::render_to(&dir.data_dir, format, &out)?;
            match output {
                OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&r)?),
                OutputFormat::Table => {
                    for p in r.written.iter().chain(&r.config_files) {
                        out!("wrote {}", p.display());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Debug(cmd) => run_debug(cmd),
        Command::Audit(a) => crate::audit::cli::run(*a),
        other => run_async(other),
    }
}

fn run_debug(cmd: DebugCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DebugCommand::Recover { dir, output } => {
            let rs = crate::recover::recover_locked(&dir.data_dir)?;
            match output {
                OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&rs)?),
                OutputFormat::Table => {
                    for r in &rs {
                        out!("{r}");
                    }
                }
            }
            if rs.iter().any(|r| r.is_failure()) {
                return Ok(ExitCode::from(1));
            }
        }
        DebugCommand::Failpoints => out!(
            "{}",
            serde_json::json!({
                "enabled": pki::failpoints::ENABLED,
                "failpoints": pki::failpoints::ALL,
            })
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_async(cmd: Command) -> anyhow::Result<ExitCode> {
    use hyper::Method;
    let rt = runtime()?;
    rt.block_on(async move {
        match cmd {
            Command::Run(a) => {
                let mesh = (!a.no_mesh).then(|| crate::mesh::MeshOptions {
                    ifname: a.wg_interface.clone(),
                    mtu: a.mtu,
                    keepalive: a.keepalive,
                    engine: a.wg_engine,
                    subnet_env: Some(a.subnet_env.clone()),
                    cni_conf: Some(a.cni_conf.clone()),
                    cni_bridge: a.cni_bridge.clone(),
                });
                crate::metrics::spawn(a.metrics_listen.0, &a.dir.data_dir, (!a.no_mesh).then(|| a.wg_interface.clone()));
                crate::run::run_control_plane(&a.dir.data_dir, a.listen, mesh, crate::run::shutdown_signal()).await?;
            }
            Command::Join(a) => {
                let r = if a.rejoin {
                    crate::rejoin::rejoin(&crate::rejoin::RejoinOptions {
                        data_dir: a.dir.data_dir.clone(),
                        server: a.server.clone(),
                        token: a.token.clone(),
                        ca_hash: a.ca_hash.clone(),
                    })
                    .await?
                } else {
                    let o = crate::join::JoinOptions {
                        data_dir: a.dir.data_dir.clone(),
                        server: a.server.clone(),
                        token: a.token.clone(),
                        ca_hash: a.ca_hash.clone(),
                        node_name: a.node_name.clone().context("--node-name is required")?,
                        advertise_address: a.advertise_address.context("--advertise-address is required")?,
                        wireguard_port: a.wireguard_port,
                        endpoint: a.endpoint,
                    };
                    crate::join::join(&o).await?
                };
                match a.output {
                    OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&r)?),
                    OutputFormat::Table => {
                        out!("{} as node {} with pod subnet {}", if a.rejoin { "rejoined" } else { "joined" }, r.node_name, r.subnet);
                        out!("WireGuard public key: {}", r.wireguard_public_key);
                        for f in &r.files {
                            out!("wrote {}", f.display());
                        }
                    }
                }
            }
            Command::Token(TokenCommand::Create { dir, ttl, uses, description, output }) => {
                let ttl = pki::time::parse_duration(&ttl).context("--ttl")?;
                let client = crate::join::node_client(&dir.data_dir)?;
                let req = crate::api::TokenCreateRequest { ttl_secs: ttl.as_secs(), uses: Some(uses), description };
                let r: crate::api::TokenCreateResponse = client.call(Method::POST, "/v1/tokens", Some(&req)).await?;
                let cmd = format!(
                    "meshd join --server {} --token {} --ca-hash {} --node-name <NAME> --advertise-address <IP> --data-dir /var/lib/meshd",
                    r.server, r.token, r.ca_hash
                );
                match output {
                    OutputFormat::Json => {
                        let mut v = serde_json::to_value(&r)?;
                        v["join_command"] = serde_json::Value::String(cmd);
                        out!("{}", serde_json::to_string_pretty(&v)?);
                    }
                    OutputFormat::Table => {
                        out!("token:   {}\nexpires: {}\nuses:    {uses}\n\nOn the new node, run:\n  {cmd}", r.token, r.expires);
                    }
                }
            }
            Command::Token(TokenCommand::List { dir, output }) => {
                let client = crate::join::node_client(&dir.data_dir)?;
                let r: Vec<crate::api::TokenInfo> = client.call(Method::GET, "/v1/tokens", None::<&()>).await?;
                match output {
                    OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&r)?),
                    OutputFormat::Table => {
                        out!("{:<8} {:<22} {:<10} {:<6} DESCRIPTION", "ID", "EXPIRES", "USES LEFT", "USED");
                        for t in r {
                            out!("{:<8} {:<22} {:<10} {:<6} {}", t.id, t.expires, if t.revoked { "revoked".to_string() } else { t.uses_left.map(|u| u.to_string()).unwrap_or("unlimited".into()) }, t.used, t.description);
                        }
                    }
                }
            }
            Command::Token(TokenCommand::Revoke { dir, id }) => {
                let client = crate::join::node_client(&dir.data_dir)?;
                let _: serde_json::Value = client.call(Method::DELETE, &format!("/v1/tokens/{id}"), None::<&()>).await?;
                out!("token {id} revoked");
            }
            Command::Node(NodeCommand::List { dir, output }) => {
                let client = crate::join::node_client(&dir.data_dir)?;
                let r: Vec<crate::registry::NodeRecord> = client.call(Method::GET, "/v1/nodes", None::<&()>).await?;
                match output {
                    OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&r)?),
                    OutputFormat::Table => {
                        out!("{:<20} {:<18} {:<22} WIREGUARD KEY", "NAME", "SUBNET", "ENDPOINT");
                        for n in r {
                            out!("{:<20} {:<18} {:<22} {}", n.name, n.subnet.to_string(), n.endpoint.to_string(), n.wireguard_public_key);
                        }
                    }
                }
            }
            Command::Node(NodeCommand::Remove { dir, name }) => {
                let client = crate::join::node_client(&dir.data_dir)?;
                let _: serde_json::Value = client.call(Method::DELETE, &format!("/v1/nodes/{name}"), None::<&()>).await?;
                out!("node {name} removed; its subnet is released");
            }
            Command::Status { dir, wg_interface, output } => {
                // The components' part is local (the status file `meshd run` keeps): shown even
                // when the API does not answer.
                let comps = crate::components::driver::read_status(&dir.data_dir).transpose().map_err(anyhow::Error::msg)?;
                let st = crate::status::status(&dir.data_dir, &wg_interface).await;
                match output {
                    OutputFormat::Json => {
                        let mut v = match &st {
                            Ok(st) => serde_json::to_value(st)?,
                            Err(_) => serde_json::json!({}),
                        };
                        v["components"] = serde_json::to_value(&comps)?;
                        if st.is_ok() || comps.is_some() {
                            out!("{}", serde_json::to_string_pretty(&v)?);
                        }
                    }
                    OutputFormat::Table => {
                        if let Ok(st) = &st {
                            out_raw!("{}", crate::status::render(st));
                        }
                        if let Some(c) = &comps {
                            out_raw!("{}", crate::components::driver::render_status(c));
                        }
                    }
                }
                st?;
            }
            Command::Rotate(a) => return rotate_command(a).await,
            Command::Init(_) | Command::Certs(_) | Command::Render { .. } | Command::Debug(_) | Command::Audit(_) => anyhow::bail!("internal error: not an async command"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `meshd rotate`: the exit code is the report's (see [`crate::rotate`]); errors print to stderr.
async fn rotate_command(a: RotateArgs) -> anyhow::Result<ExitCode> {
    use crate::rotate;
    let lock_timeout = match pki::time::parse_duration(&a.lock_timeout) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --lock-timeout: {e}");
            return Ok(ExitCode::from(rotate::EXIT_USAGE));
        }
    };
    let opts = rotate::Options {
        force: rotate::Force::parse(a.force.as_deref()),
        dry_run: a.dry_run,
        lock_timeout,
        run_hooks: true,
    };
    match rotate::rotate(&a.dir.data_dir, &opts).await {
        Ok(report) => {
            match a.output {
                OutputFormat::Json => out!("{}", serde_json::to_string_pretty(&report)?),
                OutputFormat::Table => {
                    for line in report.summary_lines() {
                        out!("{line}");
                    }
                }
            }
            Ok(ExitCode::from(report.exit_code()))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

fn render_init(r: &crate::init::InitReport) -> String {
    use crate::init::Action;
    let mut out = String::new();
    if r.cleaned_up > 0 {
        out.push_str(&format!(
            "removed {} leftover temporary file(s) of an interrupted run\n",
            r.cleaned_up
        ));
    }
    for it in &r.items {
        let rel = it
            .path
            .strip_prefix(&r.data_dir)
            .unwrap_or(&it.path)
            .display();
        let line = match &it.action {
            Action::Created => format!("created   {:<26} {rel}", it.name),
            Action::Kept => format!("kept      {:<26} {rel}", it.name),
            Action::Reissued(why) => format!("reissued  {:<26} {rel} ({why})", it.name),
            Action::Updated(why) => format!("updated   {:<26} {rel} ({why})", it.name),
        };
        out.push_str(&line);
        out.push('\n');
    }
    let created = r
        .items
        .iter()
        .filter(|i| i.action == Action::Created)
        .count();
    let reissued = r
        .items
        .iter()
        .filter(|i| matches!(i.action, Action::Reissued(_)))
        .count();
    let updated = r
        .items
        .iter()
        .filter(|i| matches!(i.action, Action::Updated(_)))
        .count();
    let kept = r.items.len() - created - reissued - updated;
    out.push_str(&format!(
        "\n{}: {created} created, {reissued} reissued, {updated} updated, {kept} kept\ncluster CA pin (for `meshd join --ca-hash`): {}\n",
        r.data_dir.display(),
        r.ca_hash
    ));
    out
}
