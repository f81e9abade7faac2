//! `meshd audit` options and the command: run, print, exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::model::Severity;

/// Report format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON: a header (versions, node, time), a summary, one record per check × target.
    Json,
    /// JUnit XML (one testcase per finding), for CI.
    Junit,
    /// SARIF 2.1.0, for code-scanning dashboards.
    Sarif,
}

/// `meshd audit` options.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    /// Data directory.
    pub dir: crate::cli::DataDir,
    /// Also probe this endpoint: HOST:PORT[=component] (etcd, etcd-peer, apiserver, kubelet,
    /// kubelet-readonly, controller-manager, scheduler, meshd-api). Repeatable.
    #[arg(long = "target", value_name = "HOST:PORT[=COMPONENT]")]
    pub targets: Vec<String>,
    /// Rendered component configuration to check (a directory of systemd units and/or static pod
    /// manifests, as `meshd render --out DIR` writes). Repeatable.
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dirs: Vec<PathBuf>,
    /// Do not read the command lines of running components from /proc.
    #[arg(long)]
    pub no_processes: bool,
    /// Do not probe the registered nodes (only --target endpoints and local checks).
    #[arg(long)]
    pub no_registry: bool,
    /// The WireGuard interface of `meshd run`.
    #[arg(long, default_value = "meshd0")]
    pub wg_interface: String,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Exit 1 when a finding is at or above this severity.
    #[arg(long, value_enum, default_value_t = Severity::High)]
    pub fail_on: Severity,
    /// Per-endpoint timeout of each probe (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s")]
    pub timeout: String,
    /// Table: list every PASS row (by default the passing certificate and configuration rows are
    /// folded into one per check).
    #[arg(long, short)]
    pub verbose: bool,
    /// How many endpoints are probed at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("--timeout {s}: {e}"));
    }
    pki::time::parse_duration(s).map_err(|e| format!("--timeout {s}: {e}"))
}

fn print(s: &str) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().write_all(s.as_bytes()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// Runs `meshd audit`: exit 0 clean, 1 findings at or above `--fail-on`, 2 usage error, 3 the audit
/// is incomplete (a check could not run).
pub fn run(a: AuditArgs) -> anyhow::Result<ExitCode> {
    let usage = |m: String| {
        eprintln!("error: {m}");
        Ok(ExitCode::from(2))
    };
    let timeout = match parse_timeout(&a.timeout) {
        Ok(t) if !t.is_zero() => t,
        Ok(_) => return usage("--timeout must be positive".into()),
        Err(e) => return usage(e),
    };
    if a.concurrency == 0 {
        return usage("--concurrency must be at least 1".into());
    }
    for t in &a.targets {
        if let Err(e) = super::endpoints::parse_target(t) {
            return usage(e);
        }
    }
    for d in &a.config_dirs {
        if !d.is_dir() {
            return usage(format!("--config-dir {}: not a directory", d.display()));
        }
    }
    if !a.dir.data_dir.is_dir() {
        return usage(format!(
            "--data-dir {}: not a directory",
            a.dir.data_dir.display()
        ));
    }
    let o = super::Options {
        data_dir: a.dir.data_dir.clone(),
        targets: a.targets.clone(),
        configs: a.config_dirs.clone(),
        processes: !a.no_processes,
        registry: !a.no_registry,
        wg_interface: a.wg_interface.clone(),
        timeout,
        concurrency: a.concurrency,
        fail_on: a.fail_on,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(super::run(&o));
    let text = match a.output {
        Format::Table => super::output::table(&report, a.verbose),
        Format::Json => super::output::json(&report) + "\n",
        Format::Junit => super::output::junit(&report),
        Format::Sarif => super::output::sarif(&report) + "\n",
    };
    print(&text);
    Ok(ExitCode::from(report.exit_code()))
}
