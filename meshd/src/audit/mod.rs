//! `meshd audit`: one report of the TLS coverage of the cluster, with evidence.
//!
//! * [`tls_probe`] / [`hello`]: live handshakes (rustls for TLS 1.2/1.3 and the chain; hand-built
//!   ClientHellos for SSLv3–TLS 1.1 and weak suites), judged by [`tls_checks`] (TLS-01 … TLS-08);
//! * [`config`]: the components' configuration from rendered units / manifests and running
//!   processes (CFG-01 … CFG-13);
//! * [`inventory`]: the certificate inventory of the data directory (CRT-xx) and file modes (CFG-14);
//! * [`overlay`]: the WireGuard device against the registry, and the routes (NET-xx);
//! * [`output`]: table, JSON, JUnit, SARIF. The check IDs are those of audit-checks.md.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod endpoints;
pub mod hello;
pub mod inventory;
pub mod model;
pub mod output;
pub mod overlay;
pub mod tls_checks;
pub mod tls_probe;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use model::{Finding, Header, Report, Severity, Status};

/// What to audit, and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// Extra endpoints (`HOST:PORT[=component]`).
    pub targets: Vec<String>,
    /// Rendered component configuration directories (systemd units, static pod manifests).
    pub configs: Vec<PathBuf>,
    /// Read the command lines of running components from /proc.
    pub processes: bool,
    /// Probe the known endpoints of every registered node.
    pub registry: bool,
    /// The WireGuard interface.
    pub wg_interface: String,
    /// Per-endpoint probe timeout.
    pub timeout: Duration,
    /// How many endpoints are probed at once.
    pub concurrency: usize,
    /// Findings at or above this severity make the exit code 1.
    pub fail_on: Severity,
}

/// Runs the audit. Never fails as a whole: what cannot be checked becomes an ERROR finding.
pub async fn run(o: &Options) -> Report {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut findings: Vec<Finding> = Vec::new();
    let cfg = crate::settings::load_config(&o.data_dir);
    let (me, apiserver_port, api_port) = match &cfg {
        Ok(Some(c)) => match (&c.cluster, &c.joined) {
            (_, Some(j)) => (
                j.name.clone(),
                6443,
                crate::api::client::split_host_port(&j.server).map(|(_, p)| p),
            ),
            (Some(s), None) => (s.node_name.clone(), s.apiserver_port, Some(s.api_port)),
            _ => (String::new(), 6443, None),
        },
        _ => (String::new(), 6443, None),
    };
    if let Err(e) = &cfg {
        findings.push(catalog::CRT_08.finding(
            Status::Error,
            o.data_dir.display().to_string(),
            format!("meshd.json: {e}"),
            "readable settings",
        ));
    }

    // The registry (control plane: its own API; node: the control plane's).
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    if o.registry {
        match registry(&o.data_dir, o.timeout).await {
            Ok(n) => nodes = n,
            Err(e) => {
                let why = format!("cannot list the registered nodes: {e:#}");
                findings.push(catalog::TLS_01.finding(
                    Status::Error,
                    "registry",
                    why.clone(),
                    "the registry's nodes",
                ));
                findings.push(catalog::NET_01.finding(
                    Status::Error,
                    "registry",
                    why,
                    "the registry's nodes",
                ));
            }
        }
        for n in &nodes {
            endpoints.extend(endpoints::node_endpoints(n, &me, apiserver_port, api_port));
        }
    }
    for t in &o.targets {
        match endpoints::parse_target(t) {
            Ok(mut ep) => {
                ep.local = ep.addr.ip().is_loopback()
                    || nodes
                        .iter()
                        .any(|n| n.name == me && n.addresses.contains(&ep.addr.ip()));
                if let Some(n) = nodes.iter().find(|n| n.addresses.contains(&ep.addr.ip())) {
                    ep.node = n.name.clone();
                }
                endpoints.retain(|e| e.addr != ep.addr);
                endpoints.push(ep);
            }
            Err(e) => findings.push(catalog::TLS_01.finding(
                Status::Error,
                t.clone(),
                e,
                "HOST:PORT[=component]",
            )),
        }
    }

    // Live probes, bounded.
    let cas = Arc::new(endpoints::cas(&o.data_dir));
    let foreign = tls_probe::foreign_client_cert().ok();
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for ep in endpoints {
        let sem = sem.clone();
        let cas = cas.clone();
        let foreign = foreign.clone();
        let timeout = o.timeout;
        let dd = o.data_dir.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let p = tls_probe::probe(ep.addr, &ep.host, timeout, foreign).await;
            tls_checks::judge(&ep, &p, &cas, &dd, SystemTime::now())
        });
    }

    // Offline checks while the probes run.
    let dd = o.data_dir.clone();
    let configs = o.configs.clone();
    let processes = o.processes;
    let offline = tokio::task::spawn_blocking(move || offline_checks(&dd, &configs, processes));
    let dd = o.data_dir.clone();
    let ifname = o.wg_interface.clone();
    let nodes2 = nodes.clone();
    let me2 = me.clone();
    let registry_ok = o.registry && !nodes.is_empty();
    let no_registry = !o.registry;
    let net = tokio::task::spawn_blocking(move || {
        if registry_ok {
            overlay::judge(&dd, &me2, &ifname, &nodes2)
        } else if no_registry {
            use catalog::*;
            [NET_01, NET_02, NET_03, NET_04, NET_05, NET_06, NET_07]
                .iter()
                .map(|c| {
                    c.finding(
                        Status::Skip,
                        format!("{me2}/{ifname}"),
                        "--no-registry: the overlay is judged against the registry",
                        "the registry's nodes",
                    )
                })
                .collect()
        } else {
            Vec::new()
        }
    });

    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(f) => findings.extend(f),
            Err(e) => findings.push(catalog::TLS_01.finding(
                Status::Error,
                "probe",
                format!("probe task failed: {e}"),
                "a probe result",
            )),
        }
    }
    match offline.await {
        Ok(f) => findings.extend(f),
        Err(e) => findings.push(catalog::CRT_08.finding(
            Status::Error,
            "inventory",
            format!("task failed: {e}"),
            "a result",
        )),
    }
    match net.await {
        Ok(f) => findings.extend(f),
        Err(e) => findings.push(catalog::NET_01.finding(
            Status::Error,
            "overlay",
            format!("task failed: {e}"),
            "a result",
        )),
    }
    let header = Header {
        meshd_version: env!("CARGO_PKG_VERSION"),
        format_version: 1,
        node: me,
        data_dir: o.data_dir.display().to_string(),
        started: pki::time::rfc3339(started),
        duration_ms: t0.elapsed().as_millis() as u64,
        fail_on: o.fail_on,
    };
    Report::new(header, findings)
}

/// Certificates, file modes and component configuration: what needs no network.
pub fn offline_checks(data_dir: &Path, configs: &[PathBuf], processes: bool) -> Vec<Finding> {
    let mut v = inventory::certificates(data_dir, SystemTime::now());
    v.extend(inventory::file_modes(data_dir));
    let cluster_ca = data_dir.join("pki/ca.crt");
    let cluster_ca = cluster_ca.exists().then_some(cluster_ca);
    let mut comps = Vec::new();
    for d in configs {
        let (c, errs) = config::read_dir(d);
        if c.is_empty() && errs.is_empty() {
            v.push(catalog::CFG_01.finding(
                Status::Error,
                d.display().to_string(),
                "no component configuration found (systemd units or static pod manifests)",
                "rendered component configuration",
            ));
        }
        for (p, e) in errs {
            v.push(catalog::CFG_01.finding(
                Status::Error,
                p.display().to_string(),
                e,
                "a readable file",
            ));
        }
        comps.extend(c);
    }
    if processes {
        comps.extend(config::running());
    }
    for c in &comps {
        v.extend(config::judge(c, cluster_ca.as_deref()));
    }
    v
}

async fn registry(
    data_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<Vec<crate::registry::NodeRecord>> {
    let client = crate::join::node_client(data_dir)?;
    let nodes = tokio::time::timeout(
        timeout.max(Duration::from_secs(5)),
        client.call(hyper::Method::GET, "/v1/nodes", None::<&()>),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the meshd API did not answer within {timeout:?}"))??;
    Ok(nodes)
}
