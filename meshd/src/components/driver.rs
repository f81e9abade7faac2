//! The driver of `meshd run`'s supervision: runs the [`Supervisor`] machine with real processes
//! (tokio), probes each component over TLS, restarts what renewed certificates touch, sends each
//! component's output to `<data-dir>/components/<name>/<name>.log` and keeps
//! `<data-dir>/components/status.json` for `meshd status`.
//!
//! Supervision is on when `<data-dir>/components.json` exists (`{}` will do): a data directory
//! without it is left as it was before meshd drove components (operators who run the components
//! themselves, or a second meshd beside an etcd on 2379, are not disturbed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::render::{self, Health, HttpsProbe, Rendered};
use super::supervisor::{Action, Backoff, State, Supervisor};
use super::{Component, RenderContext};
use crate::api::server::log;

/// What `meshd run` keeps in `<data-dir>/components/status.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    /// Whether meshd supervises components in this data directory.
    pub supervised: bool,
    /// Why not, or other notes.
    pub note: Option<String>,
    /// When the file was written (RFC 3339).
    pub updated: String,
    /// The `meshd run` process.
    pub meshd_pid: u32,
    /// Every component of the node.
    pub components: Vec<ComponentStatus>,
}

/// One component in the status file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    /// Its name.
    pub name: String,
    /// `missing`, `waiting`, `starting`, `running`, `backoff`, `stopping` or `stopped`.
    pub state: String,
    /// Whether its latest probe passed (running only).
    pub healthy: Option<bool>,
    /// Its process id (running only).
    pub pid: Option<u32>,
    /// Its binary.
    pub binary: Option<String>,
    /// Restarts after an exit.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<String>,
    /// Why it is missing, what it waits for, when it restarts, why its probe failed.
    pub detail: Option<String>,
    /// Its log file.
    pub log: String,
}

/// Reads the status file of `data_dir`; `None` when there is none.
pub fn read_status(data_dir: &Path) -> Option<Result<StatusFile, String>> {
    let p = data_dir.join(super::STATUS_FILE);
    let text = std::fs::read_to_string(&p).ok()?;
    Some(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display())))
}

/// The component section of `meshd status`.
pub fn render_status(s: &StatusFile) -> String {
    let mut out = String::from("\ncomponents");
    if !s.supervised {
        out.push_str(&format!(
            ": not supervised ({})\n",
            s.note.clone().unwrap_or_default()
        ));
        return out;
    }
    let alive = Path::new(&format!("/proc/{}", s.meshd_pid)).exists();
    out.push_str(&format!(
        " (meshd run pid {}{}, updated {})\n{:<24} {:<9} {:<8} {:>8} {:>8}  DETAIL / LOG\n",
        s.meshd_pid,
        if alive {
            ""
        } else {
            " NOT RUNNING: the last state it recorded"
        },
        s.updated,
        "COMPONENT",
        "STATE",
        "HEALTHY",
        "PID",
        "RESTARTS"
    ));
    for c in &s.components {
        let healthy = match c.healthy {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        out.push_str(&format!(
            "{:<24} {:<9} {:<8} {:>8} {:>8}  {}\n{:<24} log: {}\n",
            c.name,
            c.state,
            healthy,
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.restarts,
            c.detail.clone().unwrap_or_default(),
            "",
            c.log
        ));
    }
    out
}

/// A running supervision; [`ComponentsHandle::stop`] stops every component in reverse order.
#[derive(Debug)]
pub struct ComponentsHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ComponentsHandle {
    /// Stops every component (reverse order, SIGTERM then SIGKILL after the grace period) and
    /// waits until they exited.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn write_status_file(data_dir: &Path, s: &StatusFile) {
    let path = data_dir.join(super::STATUS_FILE);
    let res = serde_json::to_vec_pretty(s)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            if let Some(parent) = path.parent() {
                pki::store::ensure_dir(parent).map_err(|e| e.to_string())?;
            }
            pki::store::write_atomic(&path, &bytes, 0o644).map_err(|e| e.to_string())
        });
    if let Err(e) = res {
        log(format!("components: cannot write {}: {e}", path.display()));
    }
}

/// Starts supervising the components of `data_dir` (when it has a `components.json`), restarting
/// those that use an entry named on `renewed`. Returns at once; the components start in the
/// background.
pub async fn start(
    data_dir: &Path,
    renewed: Option<broadcast::Receiver<Vec<String>>>,
) -> anyhow::Result<ComponentsHandle> {
    let Some(config) = super::load_config(data_dir)? else {
        let note = format!(
            "no {} in the data directory; write one (`{{}}` will do) to have `meshd run` supervise the components",
            super::CONFIG_FILE
        );
        log(format!("components: not supervised: {note}"));
        write_status_file(
            data_dir,
            &StatusFile {
                supervised: false,
                note: Some(note),
                updated: pki::time::rfc3339(SystemTime::now()),
                meshd_pid: std::process::id(),
                components: vec![],
            },
        );
        return Ok(ComponentsHandle {
            stop: None,
            task: None,
        });
    };
    let ctx = RenderContext::with_config(data_dir, config)?;
    stop_leftovers(
        &ctx.data_dir,
        Duration::from_secs(ctx.config.stop_grace_secs),
    )
    .await;
    let mut rendered = BTreeMap::new();
    let mut binaries = BTreeMap::new();
    let mut units = Vec::new();
    for c in ctx.components() {
        let r = render::render(&ctx, c).map_err(|e| anyhow::anyhow!("{c}: {e}"))?;
        let present = match ctx.binary(c) {
            Ok(p) => {
                binaries.insert(c, p);
                Ok(())
            }
            Err(why) => {
                log(format!("components: {c} is not supervised: {why}"));
                Err(why)
            }
        };
        units.push((c, present));
        rendered.insert(c, r);
    }
    let backoff = Backoff {
        initial: Duration::from_millis(ctx.config.backoff_initial_ms),
        max: Duration::from_millis(ctx.config.backoff_max_ms),
        reset_after: Duration::from_secs(ctx.config.backoff_reset_after_secs),
    };
    let (events_tx, events_rx) = mpsc::channel(64);
    let driver = Driver {
        sup: Supervisor::new(units, backoff),
        probe_every: Duration::from_secs(ctx.config.probe_interval_secs),
        grace: Duration::from_secs(ctx.config.stop_grace_secs),
        ctx,
        rendered,
        binaries,
        procs: BTreeMap::new(),
        probe_errors: BTreeMap::new(),
        probing: BTreeMap::new(),
        generation: 0,
        events_tx,
        last_status: None,
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(driver.run(events_rx, stop_rx, renewed));
    Ok(ComponentsHandle {
        stop: Some(stop_tx),
        task: Some(task),
    })
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Stops the components an earlier `meshd run` of this data directory left running (it was killed
/// with SIGKILL, so it could not stop them): they hold the ports the new ones need. A process counts
/// as one only if the status file recorded its pid and its command line runs the recorded binary
/// with arguments inside this data directory; anything else with a reused pid is left alone.
async fn stop_leftovers(data_dir: &Path, grace: Duration) {
    let Some(Ok(prev)) = read_status(data_dir) else {
        return;
    };
    let dir = data_dir.to_string_lossy().into_owned();
    for c in prev.components {
        let (Some(pid), Some(binary)) = (c.pid, c.binary.as_deref()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args.first().map(String::as_str) == Some(binary)
            && args.iter().skip(1).any(|a| a.contains(&dir));
        if !ours || !running(pid) {
            continue;
        }
        log(format!(
            "components: {} (pid {pid}) of an earlier meshd run still runs: stopping it",
            c.name
        ));
        signal(pid, rustix::process::Signal::TERM);
        let deadline = tokio::time::Instant::now() + grace;
        while running(pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if running(pid) {
            signal(pid, rustix::process::Signal::KILL);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while running(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[derive(Debug)]
enum Event {
    Exited(Component, u64, String),
    Probed(Component, u64, Result<(), String>),
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    generation: u64,
    /// When SIGKILL follows the SIGTERM already sent.
    kill_at: Option<tokio::time::Instant>,
}

struct Driver {
    ctx: RenderContext,
    sup: Supervisor,
    rendered: BTreeMap<Component, Rendered>,
    binaries: BTreeMap<Component, PathBuf>,
    procs: BTreeMap<Component, Proc>,
    probe_errors: BTreeMap<Component, String>,
    probing: BTreeMap<Component, u64>,
    generation: u64,
    events_tx: mpsc::Sender<Event>,
    probe_every: Duration,
    grace: Duration,
    last_status: Option<Vec<ComponentStatus>>,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut stop: oneshot::Receiver<()>,
        mut renewed: Option<broadcast::Receiver<Vec<String>>>,
    ) {
        let mut probe_tick = tokio::time::interval(self.probe_every);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            for a in self.sup.poll(std::time::Instant::now()) {
                match a {
                    Action::Start(c) => self.spawn(c).await,
                    Action::Stop(c) => self.terminate(c),
                }
            }
            self.publish();
            if self.sup.finished() {
                break;
            }
            let deadline = self
                .sup
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .into_iter()
                .chain(self.procs.values().filter_map(|p| p.kill_at))
                .min();
            tokio::select! {
                Some(ev) = events.recv() => self.handle(ev),
                _ = probe_tick.tick() => self.probe_all(),
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => self.kill_overdue(),
                ids = async {
                    match renewed.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ids {
                    Ok(ids) => {
                        let cs = super::restarts_for(&ids);
                        if !cs.is_empty() {
                            let names: Vec<&str> = cs.iter().map(|c| c.name()).collect();
                            log(format!(
                                "components: certificates renewed ({}): restarting {}",
                                ids.join(", "),
                                names.join(", ")
                            ));
                        }
                        self.sup.rotated(&cs);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Renewals were missed: restart everything that reads certificates at start.
                        log(format!("components: missed {n} renewal notices: restarting every component"));
                        self.sup.rotated(&Component::ALL);
                    }
                    Err(broadcast::error::RecvError::Closed) => renewed = None,
                },
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    log("components: stopping in reverse order");
                    self.sup.shutdown();
                }
            }
        }
        log("components: every component stopped");
    }

    fn handle(&mut self, ev: Event) {
        let now = std::time::Instant::now();
        match ev {
            Event::Exited(c, generation, how) => {
                if self.procs.get(&c).map(|p| p.generation) != Some(generation) {
                    return;
                }
                self.procs.remove(&c);
                self.probe_errors.remove(&c);
                log(format!("components: {c} exited ({how})"));
                self.sup.exited(c, now, how);
                if let Some(u) = self.sup.unit(c) {
                    if let State::Backoff { until } = u.state {
                        log(format!(
                            "components: restarting {c} in {:.1}s (restart {})",
                            until.saturating_duration_since(now).as_secs_f64(),
                            u.restarts
                        ));
                    }
                }
            }
            Event::Probed(c, generation, res) => {
                self.probing.remove(&c);
                if self.procs.get(&c).map(|p| p.generation) != Some(generation) {
                    return;
                }
                let was = matches!(
                    self.sup.unit(c).map(|u| &u.state),
                    Some(State::Running { healthy: true, .. })
                );
                match res {
                    Ok(()) => {
                        if !was {
                            log(format!("components: {c} is healthy"));
                        }
                        self.probe_errors.remove(&c);
                        self.sup.probed(c, true);
                    }
                    Err(e) => {
                        if was {
                            log(format!("components: {c} probe failed: {e}"));
                        }
                        self.probe_errors.insert(c, e);
                        self.sup.probed(c, false);
                    }
                }
            }
        }
    }

    /// Writes the config files, opens the log, and spawns `c`.
    async fn spawn(&mut self, c: Component) {
        let now = std::time::Instant::now();
        let (Some(r), Some(bin)) = (self.rendered.get(&c), self.binaries.get(&c)) else {
            self.sup
                .start_failed(c, now, "internal error: not rendered".into());
            return;
        };
        match prepare(r).and_then(|f| spawn_process(bin, r, f)) {
            Ok(mut child) => {
                let Some(pid) = child.id() else {
                    self.sup.start_failed(c, now, "exited at once".into());
                    return;
                };
                self.generation += 1;
                let generation = self.generation;
                self.procs.insert(
                    c,
                    Proc {
                        pid,
                        generation,
                        kill_at: None,
                    },
                );
                self.sup.started(c, now);
                log(format!(
                    "components: started {c} (pid {pid}), log {}",
                    r.log.display()
                ));
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let how = match child.wait().await {
                        Ok(st) => st.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    let _ = tx.send(Event::Exited(c, generation, how)).await;
                });
            }
            Err(e) => {
                let why = format!("{e:#}");
                log(format!("components: cannot start {c}: {why}"));
                append_log(&r.log, &format!("meshd: cannot start {c}: {why}\n"));
                self.sup.start_failed(c, now, why);
            }
        }
    }

    fn terminate(&mut self, c: Component) {
        if let Some(p) = self.procs.get_mut(&c) {
            log(format!("components: stopping {c} (pid {})", p.pid));
            signal(p.pid, rustix::process::Signal::TERM);
            p.kill_at = Some(tokio::time::Instant::now() + self.grace);
        }
    }

    fn kill_overdue(&mut self) {
        let now = tokio::time::Instant::now();
        for (c, p) in self.procs.iter_mut() {
            if p.kill_at.is_some_and(|k| k <= now) {
                log(format!(
                    "components: {c} (pid {}) did not stop in time: SIGKILL",
                    p.pid
                ));
                signal(p.pid, rustix::process::Signal::KILL);
                p.kill_at = None;
            }
        }
    }

    fn probe_all(&mut self) {
        for (c, p) in &self.procs {
            if self.probing.contains_key(c) {
                continue;
            }
            let Some(r) = self.rendered.get(c) else {
                continue;
            };
            let (c, generation, health) = (*c, p.generation, r.health.clone());
            self.probing.insert(c, generation);
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let res = match health {
                    Health::Process => Ok(()),
                    Health::Https(p) => {
                        match tokio::time::timeout(Duration::from_secs(5), probe(&p)).await {
                            Ok(r) => r,
                            Err(_) => Err(format!("https://{}{}: no answer in 5s", p.addr, p.path)),
                        }
                    }
                };
                let _ = tx.send(Event::Probed(c, generation, res)).await;
            });
        }
    }

    fn publish(&mut self) {
        let now = std::time::Instant::now();
        let comps: Vec<ComponentStatus> = self
            .sup
            .units()
            .iter()
            .map(|u| {
                let c = u.component;
                let (state, healthy, detail) = match &u.state {
                    State::Missing(why) => ("missing", None, Some(why.clone())),
                    State::Waiting => {
                        let w: Vec<String> = self
                            .sup
                            .waiting_for(c)
                            .iter()
                            .map(|d| {
                                let missing = matches!(
                                    self.sup.unit(*d).map(|u| &u.state),
                                    Some(State::Missing(_))
                                );
                                format!("{d}{}", if missing { " (missing)" } else { "" })
                            })
                            .collect();
                        (
                            "waiting",
                            None,
                            Some(format!("waiting for {}", w.join(", "))),
                        )
                    }
                    State::Starting => ("starting", None, None),
                    State::Running { healthy, .. } => (
                        "running",
                        Some(*healthy),
                        self.probe_errors.get(&c).cloned(),
                    ),
                    State::Backoff { until } => (
                        "backoff",
                        None,
                        Some(format!(
                            "restarting in {}s",
                            until.saturating_duration_since(now).as_secs() + 1
                        )),
                    ),
                    State::Stopping { .. } => ("stopping", None, None),
                    State::Stopped => ("stopped", None, None),
                };
                ComponentStatus {
                    name: c.name().into(),
                    state: state.into(),
                    healthy,
                    pid: self.procs.get(&c).map(|p| p.pid),
                    binary: self.binaries.get(&c).map(|b| b.display().to_string()),
                    restarts: u.restarts,
                    last_exit: u.last_exit.clone(),
                    detail,
                    log: self
                        .rendered
                        .get(&c)
                        .map(|r| r.log.display().to_string())
                        .unwrap_or_default(),
                }
            })
            .collect();
        // Backoff countdowns change every second; write on real changes only.
        let key: Vec<ComponentStatus> = comps
            .iter()
            .cloned()
            .map(|mut c| {
                if c.state == "backoff" {
                    c.detail = None;
                }
                c
            })
            .collect();
        if self.last_status.as_ref() == Some(&key) {
            return;
        }
        self.last_status = Some(key);
        write_status_file(
            &self.ctx.data_dir,
            &StatusFile {
                supervised: true,
                note: None,
                updated: pki::time::rfc3339(SystemTime::now()),
                meshd_pid: std::process::id(),
                components: comps,
            },
        );
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Writes `r`'s config files, makes its state and log directories, and opens its log for appending.
fn prepare(r: &Rendered) -> anyhow::Result<std::fs::File> {
    for f in &r.files {
        if let Some(parent) = f.path.parent() {
            pki::store::ensure_dir(parent)?;
        }
        pki::store::write_atomic(&f.path, f.contents.as_bytes(), f.mode)?;
    }
    for d in &r.state_dirs {
        pki::store::ensure_dir(d)?;
    }
    if let Some(parent) = r.log.parent() {
        pki::store::ensure_dir(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&r.log)
        .with_context(|| format!("{}: cannot open the log", r.log.display()))?;
    use std::io::Write;
    writeln!(
        f,
        "meshd: starting {} at {}",
        r.component,
        pki::time::rfc3339(SystemTime::now())
    )
    .with_context(|| r.log.display().to_string())?;
    Ok(f)
}

fn spawn_process(
    bin: &Path,
    r: &Rendered,
    log: std::fs::File,
) -> anyhow::Result<tokio::process::Child> {
    let err = log.try_clone().context("log file")?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(&r.args)
        .envs(r.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        // If meshd itself dies, tokio reaps what it can; stop() is the orderly way.
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("{}: cannot execute", bin.display()))
}

/// The TLS client configuration of probe `p`: its CA (files read on every probe, so a renewed
/// client certificate is used at once) and client pair.
fn probe_tls(p: &HttpsProbe) -> Result<rustls::ClientConfig, String> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let pem = pki::store::read_text(&p.ca).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::certs_from_pem("CA", &pem).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", p.ca.display()))?;
    }
    let builder = builder.with_root_certificates(roots);
    match &p.client {
        Some((cert, key)) => {
            let cert_pem = pki::store::read_text(cert).map_err(|e| e.to_string())?;
            let key_pem = pki::store::read_key_file(key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(
                    crate::tls::certs_from_pem("client certificate", &cert_pem)
                        .map_err(|e| e.to_string())?,
                    crate::tls::key_from_pem("client key", key_pem.expose())
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// One HTTPS GET: `Ok` when the server's certificate verified and it answered (with 200 when the
/// probe requires it).
pub async fn probe(p: &HttpsProbe) -> Result<(), String> {
    let url = format!("https://{}{}", p.addr, p.path);
    let cfg = probe_tls(p)?;
    let name = rustls_pki_types::ServerName::try_from(p.server_name.clone())
        .map_err(|e| format!("{url}: server name {}: {e}", p.server_name))?;
    let tcp = tokio::net::TcpStream::connect(p.addr)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: meshd\r\nConnection: close\r\n\r\n",
        p.path, p.addr
    );
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut buf = Vec::new();
    let _ = (&mut tls).take(16 * 1024).read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: no HTTP answer"))?;
    if p.require_ok && status != 200 {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        let body: String = body.chars().take(200).collect();
        return Err(format!("{url}: HTTP {status} {body}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    async fn wait_etcd(dir: &Path, not: Option<u32>) -> ComponentStatus {
        for _ in 0..600 {
            if let Some(Ok(s)) = read_status(dir) {
                if let Some(c) = s.components.iter().find(|c| c.name == "etcd") {
                    if c.state == "running" && c.healthy == Some(true) && c.pid != not {
                        return c.clone();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd not healthy: {:?}\n{}",
            read_status(dir),
            std::fs::read_to_string(dir.join("components/etcd/etcd.log")).unwrap_or_default()
        );
    }

    /// The driver with a real etcd (Debian's etcd-server, installed by deploy/install-deps.sh):
    /// a renewed etcd CA restarts etcd at once (not counted as a crash), a renewed serving
    /// certificate does not touch it, and stop() ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewed_entries_restart_the_components_that_use_them() {
        assert!(
            std::process::Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok(),
            "etcd is missing: run deploy/install-deps.sh (package etcd-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut s = crate::components::render::tests::settings();
        s.advertise_address = "127.0.0.1".parse().unwrap();
        crate::init::init(d, &s, &Default::default(), SystemTime::now()).unwrap();
        let cfg = serde_json::json!({
            "etcd_client_port": free_port(),
            "etcd_peer_port": free_port(),
            "supervise": ["etcd"],
            "backoff_initial_ms": 200,
            "probe_interval_secs": 1,
        });
        std::fs::write(d.join(crate::components::CONFIG_FILE), cfg.to_string()).unwrap();
        let (tx, rx) = broadcast::channel(8);
        let handle = start(d, Some(rx)).await.unwrap();
        let first = wait_etcd(d, None).await;
        tx.send(vec!["etcd-ca".to_string()]).unwrap();
        let second = wait_etcd(d, first.pid).await;
        assert_eq!(second.restarts, 0, "a rotation restart is not a crash");
        assert_eq!(second.last_exit.as_deref(), Some("signal: 15 (SIGTERM)"));
        let starts = std::fs::read_to_string(&second.log)
            .unwrap()
            .matches("meshd: starting etcd")
            .count();
        assert_eq!(starts, 2);
        handle.stop().await;
        let last = read_status(d).unwrap().unwrap();
        assert_eq!(last.components[0].state, "stopped");
        let pid = second.pid.unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "etcd still runs after stop()"
        );
    }
}
