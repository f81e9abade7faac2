//! Shared harness of meshd's end-to-end tests: finding the `meshd` binary, running real programs,
//! free loopback ports, and child processes that are killed when the test ends, pass or fail.
//!
//! The tests need real tools (openssl, etcd, kubectl): `deploy/test.sh` installs them. A missing tool
//! fails the test with the package to install; nothing is skipped silently.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `meshd` binary built alongside the tests (`MESHD_BIN` overrides).
pub fn meshd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHD_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/meshd
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("meshd");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p meshd`, or run the suite with `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// Fails with a clear message when `tool` is not installed.
pub fn require_tool(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is not installed: apt-get install {package} (deploy/test.sh does this)"
    );
}

/// Runs a command and returns its output (never panics on a non-zero exit).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `meshd` with `args`.
pub fn meshd(args: &[&str]) -> Output {
    run(Command::new(meshd_bin()).args(args))
}

/// Runs `meshd` with `args` and asserts success; returns stdout.
pub fn meshd_ok(args: &[&str]) -> String {
    let out = meshd(args);
    assert!(
        out.status.success(),
        "meshd {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a temp data dir and runs `meshd init` in it for node `node` advertising `addr`.
pub fn init_dir(node: &str, addr: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("meshd-e2e-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path").to_owned();
    let mut args = vec![
        "init",
        "--data-dir",
        &d,
        "--node-name",
        node,
        "--advertise-address",
        addr,
    ];
    args.extend_from_slice(extra);
    meshd_ok(&args);
    dir
}

/// A free TCP port on 127.0.0.1 (bound and released; callers bind it again soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing running.
pub struct ChildGuard {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout/stderr sent to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> ChildGuard {
        let f = std::fs::File::create(log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard {
            child,
            name: name.to_owned(),
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a new thread inside the network namespace `ns` (`ip netns add` made it: its handle
/// is `/var/run/netns/<ns>`); sockets made there stay in that namespace. Panics (in the caller) if
/// the namespace cannot be entered, or with `f`'s own panic.
pub fn netns_do<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsFd as _;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
