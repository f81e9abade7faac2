//! The command line: one `Subcommand` enum, doc comments as help text.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pki::inventory::ClusterSettings;
use pki::keys::KeyAlgorithm;

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
            let report = crate::init::init(&args.dir.data_dir, &s, SystemTime::now())?;
            match args.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                OutputFormat::Table => print!("{}", render_init(&report)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Check { dir, output }) => {
            let rows = crate::certs::check(&dir.data_dir, SystemTime::now())?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                OutputFormat::Table => {
                    print!("{}", crate::certs::render_table(&rows, &dir.data_dir))
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
    let kept = r.items.len() - created - reissued;
    out.push_str(&format!(
        "\n{}: {created} created, {reissued} reissued, {kept} kept\ncluster CA pin (for `meshd join --ca-hash`): {}\n",
        r.data_dir.display(),
        r.ca_hash
    ));
    out
}
