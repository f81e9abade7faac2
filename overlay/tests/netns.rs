//! Network-namespace tests of the userspace WireGuard device.
//!
//! Two namespaces joined by a veth pair (underlay 10.231.0.1 / 10.231.0.2), each running the
//! `wg_node` example (the device behind meshd's UAPI server) with tunnel addresses 10.232.1.0 and
//! 10.232.2.0 and the route 10.232.0.0/16 through the tunnel, as a node's lease would give. Each
//! test runs once per data path (`--engine boringtun` and `--engine fast`).
//!
//! Needs root, `/dev/net/tun`, and `ip`, `wg` (wireguard-tools), `ping` (iputils-ping) and
//! `tcpdump`; runs in CI as root. `MESHD_SKIP_NETNS_TESTS=1` skips them (for unprivileged
//! development machines); otherwise a missing prerequisite fails the test, so that CI cannot
//! silently skip it.
//!
//! The nodes are the `wg_node` example binary. `cargo test -p meshd-overlay` builds it; a run
//! limited to this file (`--test netns`) does not rebuild it, so build it first
//! (`cargo build -p meshd-overlay --examples`) when the example or the library changed.
//!
//! Every test owns a [`Lab`]: namespaces, processes, sockets and files it created are removed when
//! it drops, also when the test fails. Names carry the test process id and a per-test tag, so runs
//! and tests never collide (the UAPI socket directory `/var/run/wireguard` is shared by all
//! namespaces, so interface names must be unique on the machine).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use overlay::link::Ip;
use overlay::wg::{DeviceUpdate, PeerUpdate, PublicKey, Uapi};

const UNDERLAY_A: &str = "10.231.0.1";
const UNDERLAY_B: &str = "10.231.0.2";
const TUNNEL_A: &str = "10.232.1.0";
const TUNNEL_B: &str = "10.232.2.0";
const PORT: u16 = 51820;

/// Whether to run; panics when a prerequisite is missing (unless skipping was asked for).
fn prerequisites() -> bool {
    if std::env::var_os("MESHD_SKIP_NETNS_TESTS").is_some_and(|v| v == "1") {
        eprintln!("MESHD_SKIP_NETNS_TESTS=1: skipping");
        return false;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "the namespace tests need root (or set MESHD_SKIP_NETNS_TESTS=1)"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the namespace tests need /dev/net/tun"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("wg", "wireguard-tools"),
        ("ping", "iputils-ping"),
        ("tcpdump", "tcpdump"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the namespace tests need `{tool}` (apt-get install {package})"
        );
    }
    true
}

/// `target/<profile>/examples/wg_node`, next to this test's `target/<profile>/deps/netns-*`.
fn wg_node() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let p = profile_dir.join("examples/wg_node");
    assert!(
        p.exists(),
        "{} is missing: `cargo test -p meshd-overlay` builds it (or `cargo build -p meshd-overlay --examples`)",
        p.display()
    );
    p
}

/// Runs a command, panics with its stderr if it fails.
fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn stdout(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(args).stdout).into_owned()
}

/// What a test created; everything is removed on drop, in reverse order of danger: processes
/// (SIGTERM, then SIGKILL), namespaces (which takes their interfaces along), sockets, files.
struct Lab {
    tag: String,
    dir: PathBuf,
    children: Vec<(String, Child)>,
    netns: Vec<String>,
    ifnames: Vec<String>,
    /// `wg_node --engine`.
    engine: &'static str,
}

impl Lab {
    fn new(test: &str, engine: &'static str) -> Lab {
        let tag = format!("{}{test}", std::process::id());
        let dir = std::env::temp_dir().join(format!("meshd-netns-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Lab {
            tag,
            dir,
            children: Vec::new(),
            netns: Vec::new(),
            ifnames: Vec::new(),
            engine,
        }
    }

    /// A name unique to this test run: `<prefix><pid><test><suffix>` (keep it within 15 bytes).
    fn name(&self, prefix: &str, suffix: &str) -> String {
        let n = format!("{prefix}{}{suffix}", self.tag);
        assert!(n.len() <= 15, "name {n} too long for an interface");
        n
    }

    fn netns(&mut self, suffix: &str) -> String {
        let ns = self.name("mwt", suffix);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns]);
        self.netns.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        // No IPv6 chatter (router solicitations etc.) in the captures.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", key]);
        }
        ns
    }

    /// Two namespaces joined by a veth pair (`veth0` in each) with the given MTU.
    fn pair(&mut self, mtu: u32) -> (String, String) {
        let (a, b) = (self.netns("a"), self.netns("b"));
        let (va, vb) = (self.name("mv", "a"), self.name("mv", "b"));
        run(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        for (ns, v, addr) in [(&a, &va, UNDERLAY_A), (&b, &vb, UNDERLAY_B)] {
            run(&["ip", "link", "set", v, "netns", ns]);
            run(&["ip", "-n", ns, "link", "set", v, "name", "veth0"]);
            run(&[
                "ip",
                "-n",
                ns,
                "link",
                "set",
                "veth0",
                "mtu",
                &mtu.to_string(),
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "address",
                "add",
                &format!("{addr}/24"),
                "dev",
                "veth0",
            ]);
            run(&["ip", "-n", ns, "link", "set", "veth0", "up"]);
        }
        (a, b)
    }

    /// A key pair made by wireguard-tools (an implementation independent of ours).
    fn keypair(&self, name: &str) -> (PathBuf, String) {
        let path = self.dir.join(format!("{name}.key"));
        let private = stdout(&["wg", "genkey"]);
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("key file");
            f.write_all(private.as_bytes()).expect("write key");
        }
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(&path).expect("key file"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        let mut public = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().expect("stdout"), &mut public)
            .expect("wg pubkey output");
        assert!(child.wait().expect("wg pubkey").success());
        (path, public.trim().to_string())
    }

    /// Starts `cmd` (already prefixed with `ip netns exec NS` if needed) and remembers it.
    fn spawn(&mut self, what: &str, cmd: &mut Command) -> usize {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        self.children.push((what.to_string(), child));
        self.children.len() - 1
    }

    /// Starts `wg_node` in `ns`; waits for its `ready <pubkey> <port>` line and returns the key.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        ns: &str,
        ifname: &str,
        key: &Path,
        address: &str,
        peer: &str,
        peer_endpoint: &str,
        peer_allowed: &str,
    ) -> (usize, String) {
        self.ifnames.push(ifname.to_string());
        let bin = wg_node();
        let idx = self.spawn(
            &format!("wg_node {ifname}"),
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&bin)
                .args(["--engine", self.engine])
                .args(["--ifname", ifname, "--private-key-file"])
                .arg(key)
                .args(["--address", address, "--route", "10.232.0.0/16"])
                .args(["--peer-public-key", peer, "--peer-endpoint", peer_endpoint])
                .args(["--peer-allowed-ip", peer_allowed])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let line = self.first_line(idx, Duration::from_secs(20));
        let mut parts = line.split_whitespace();
        assert_eq!(
            parts.next(),
            Some("ready"),
            "wg_node {ifname} said {line:?}"
        );
        let public = parts.next().unwrap_or_default().to_string();
        assert_eq!(parts.next(), Some(PORT.to_string().as_str()));
        (idx, public)
    }

    /// The first stdout line of a child, or a panic with its stderr if none comes in time.
    fn first_line(&mut self, idx: usize, timeout: Duration) -> String {
        let (what, child) = &mut self.children[idx];
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(timeout) {
            Ok(line) if !line.is_empty() => line.trim().to_string(),
            _ => {
                let what = what.clone();
                let err = self.stop(idx);
                panic!("{what} did not get ready: {err}");
            }
        }
    }

    /// SIGTERM to a child, SIGKILL after 5 s; returns its stderr (if piped and not yet taken).
    fn stop(&mut self, idx: usize) -> String {
        let (_, child) = &mut self.children[idx];
        terminate(child);
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }
}

/// SIGTERM, wait up to 5 s, then SIGKILL. Returns the exit status if it was collected.
fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            terminate(child);
        }
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // A node killed with SIGKILL leaves its socket behind.
        for ifname in &self.ifnames {
            let _ = std::fs::remove_file(overlay::wg::uapi::socket_path(ifname));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One peer line of `wg show IF dump`.
#[derive(Debug)]
struct DumpPeer {
    public_key: String,
    endpoint: String,
    allowed_ips: String,
    handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// `wg show IFNAME dump` in `ns`: the interface's public key and its peers.
fn wg_dump(ns: &str, ifname: &str) -> (String, Vec<DumpPeer>) {
    let text = stdout(&["ip", "netns", "exec", ns, "wg", "show", ifname, "dump"]);
    let mut lines = text.lines();
    let iface: Vec<&str> = lines.next().expect("interface line").split('\t').collect();
    let peers = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "peer line {l:?}");
            DumpPeer {
                public_key: f[0].into(),
                endpoint: f[2].into(),
                allowed_ips: f[3].into(),
                handshake: f[4].parse().expect("handshake"),
                rx: f[5].parse().expect("rx"),
                tx: f[6].parse().expect("tx"),
                keepalive: f[7].into(),
            }
        })
        .collect();
    (iface[1].to_string(), peers)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn ping(ns: &str, dst: &str, extra: &[&str]) -> Output {
    let mut args = vec!["ip", "netns", "exec", ns, "ping", "-n", "-q", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(dst);
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("ping")
}

fn assert_ping(ns: &str, dst: &str, extra: &[&str]) {
    let out = ping(ns, dst, extra);
    assert!(
        out.status.success(),
        "ping {dst} from {ns} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ping_crosses_the_tunnel_encrypted_and_wg_show_reports_it() {
    ping_crosses_the_tunnel(Lab::new("p", "boringtun"));
}

#[test]
fn fast_engine_ping_crosses_the_tunnel_encrypted_and_wg_show_reports_it() {
    ping_crosses_the_tunnel(Lab::new("pf", "fast"));
}

fn ping_crosses_the_tunnel(mut lab: Lab) {
    if !prerequisites() {
        return;
    }
    let (a, b) = lab.pair(1500);
    let (if_a, if_b) = (lab.name("mw", "a"), lab.name("mw", "b"));
    let (key_a, pub_a) = lab.keypair("a");
    let (key_b, pub_b) = lab.keypair("b");
    let end_a = format!("{UNDERLAY_A}:{PORT}");
    let end_b = format!("{UNDERLAY_B}:{PORT}");
    let (node_a, said_a) = lab.node(&a, &if_a, &key_a, TUNNEL_A, &pub_b, &end_b, "10.232.2.0/24");
    let (_node_b, said_b) = lab.node(&b, &if_b, &key_b, TUNNEL_B, &pub_a, &end_a, "10.232.1.0/24");
    // Our key derivation agrees with wireguard-tools'.
    assert_eq!(
        (said_a.as_str(), said_b.as_str()),
        (pub_a.as_str(), pub_b.as_str())
    );
    // Tunnel MTU = underlay MTU (1500) - 80.
    assert_eq!(Ip::in_netns(&a).link_mtu(&if_a).unwrap(), 1420);

    // Capture the underlay on A while traffic flows.
    let pcap = lab.dir.join("underlay.pcap");
    let dump_idx = lab.spawn(
        "tcpdump",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                "tcpdump",
                "-i",
                "veth0",
                "-n",
                "-U",
                "--immediate-mode",
                "-w",
            ])
            .arg(&pcap)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    // tcpdump says "listening on veth0" on stderr once the capture runs; the rest of its stderr
    // (its packet counts) is kept for the failure messages.
    let tcpdump_err = {
        let err = lab.children[dump_idx].1.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let rest = std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut r, &mut rest);
            rest
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("tcpdump did not start");
        assert!(line.contains("listening on"), "tcpdump: {line}");
        rest
    };

    assert_ping(&a, TUNNEL_B, &["-c", "5", "-i", "0.2"]);
    assert_ping(&b, TUNNEL_A, &["-c", "3", "-i", "0.2"]);

    // wg show (wireguard-tools, over our UAPI socket) lists the peer with a recent handshake.
    let (own, peers) = wg_dump(&a, &if_a);
    assert_eq!(own, pub_a);
    assert_eq!(peers.len(), 1, "{peers:?}");
    let p = &peers[0];
    assert_eq!(p.public_key, pub_b);
    assert_eq!(p.endpoint, end_b);
    assert_eq!(p.allowed_ips, "10.232.2.0/24");
    let now = now_secs();
    assert!(
        p.handshake + 60 >= now && p.handshake <= now + 2,
        "handshake at {} is not recent (now {now}); boringtun#447 is back?",
        p.handshake
    );
    assert!(p.rx > 0 && p.tx > 0, "{p:?}");
    let human = stdout(&["ip", "netns", "exec", &a, "wg", "show", &if_a]);
    assert!(human.contains(&format!("peer: {pub_b}")), "{human}");
    assert!(human.contains("latest handshake:"), "{human}");
    assert!(!human.contains("year"), "{human}");
    // Counters grow with traffic.
    assert_ping(&a, TUNNEL_B, &["-c", "3", "-i", "0.2"]);
    let (_, again) = wg_dump(&a, &if_a);
    assert!(
        again[0].rx > p.rx && again[0].tx > p.tx,
        "{again:?} after {p:?}"
    );
    // B sees A.
    let (_, peers_b) = wg_dump(&b, &if_b);
    assert_eq!(peers_b.len(), 1);
    assert_eq!(peers_b[0].public_key, pub_a);

    // The capture holds only WireGuard's UDP between the underlay addresses.
    let pid = rustix::process::Pid::from_child(&lab.children[dump_idx].1);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    terminate(&mut lab.children[dump_idx].1);
    let tcpdump_err = tcpdump_err.join().unwrap_or_default();
    let pcap_s = pcap.to_str().expect("utf-8 path");
    let text = stdout(&["tcpdump", "-r", pcap_s, "-n", "-nn", "-q"]);
    let fwd = format!("{UNDERLAY_A}.{PORT} > {UNDERLAY_B}.{PORT}");
    let back = format!("{UNDERLAY_B}.{PORT} > {UNDERLAY_A}.{PORT}");
    let mut udp = 0;
    for line in text.lines() {
        assert!(!line.contains("10.232."), "tunnel address in clear: {line}");
        assert!(!line.contains("ICMP"), "ICMP in clear: {line}");
        if line.contains(" ARP") {
            continue;
        }
        assert!(
            (line.contains(&fwd) || line.contains(&back)) && line.contains("UDP"),
            "unexpected packet on the underlay: {line}"
        );
        udp += 1;
    }
    // 11 echo requests and replies, plus the handshake.
    assert!(
        udp >= 22,
        "only {udp} WireGuard packets captured:\n{text}\ntcpdump: {tcpdump_err}"
    );

    // A clean stop removes the UAPI socket and the interface.
    let status = terminate(&mut lab.children[node_a].1).expect("wg_node a status");
    assert!(status.success(), "wg_node a exited with {status}");
    assert!(
        !overlay::wg::uapi::socket_path(&if_a).exists(),
        "socket left behind"
    );
    assert!(!Ip::in_netns(&a).link_exists(&if_a).unwrap());
}

#[test]
fn peer_updates_keep_the_device_working_and_mtu_follows_the_underlay() {
    peer_updates(Lab::new("u", "boringtun"));
}

#[test]
fn fast_engine_peer_updates_keep_the_device_working_and_mtu_follows_the_underlay() {
    peer_updates(Lab::new("uf", "fast"));
}

fn peer_updates(mut lab: Lab) {
    if !prerequisites() {
        return;
    }
    let (a, b) = lab.pair(1400);
    let (if_a, if_b) = (lab.name("mw", "a"), lab.name("mw", "b"));
    let (key_a, pub_a) = lab.keypair("a");
    let (key_b, pub_b) = lab.keypair("b");
    let end_a = format!("{UNDERLAY_A}:{PORT}");
    let end_b = format!("{UNDERLAY_B}:{PORT}");
    lab.node(&a, &if_a, &key_a, TUNNEL_A, &pub_b, &end_b, "10.232.2.0/24");
    lab.node(&b, &if_b, &key_b, TUNNEL_B, &pub_a, &end_a, "10.232.1.0/24");

    // Underlay 1400 → tunnel 1320; a full-size packet with DF set goes through.
    assert_eq!(Ip::in_netns(&a).link_mtu(&if_a).unwrap(), 1320);
    assert_ping(
        &a,
        TUNNEL_B,
        &["-c", "2", "-i", "0.2", "-M", "do", "-s", "1292"],
    );

    // Re-applying the same configuration (with wg, and with our client) keeps the session.
    let (_, before) = wg_dump(&a, &if_a);
    let uapi = Uapi::connect(&if_a).expect("uapi");
    let peer_b = PublicKey::from_base64(&pub_b).unwrap();
    run(&[
        "ip",
        "netns",
        "exec",
        &a,
        "wg",
        "set",
        &if_a,
        "peer",
        &pub_b,
        "endpoint",
        &end_b,
        "allowed-ips",
        "10.232.2.0/24",
    ]);
    uapi.set(&DeviceUpdate {
        peers: vec![PeerUpdate {
            endpoint: Some(end_b.parse::<SocketAddr>().unwrap()),
            ..PeerUpdate::upsert(peer_b)
        }],
        ..Default::default()
    })
    .unwrap();
    let (_, after) = wg_dump(&a, &if_a);
    assert!(
        after[0].handshake.abs_diff(before[0].handshake) <= 1
            && after[0].rx >= before[0].rx
            && after[0].tx >= before[0].tx,
        "a no-op set reset the session: {before:?} -> {after:?}"
    );

    // Updating an existing peer in place would deadlock boringtun 0.7 (#209); through our UAPI
    // server it works, and the device keeps answering and forwarding.
    run(&[
        "ip",
        "netns",
        "exec",
        &a,
        "wg",
        "set",
        &if_a,
        "peer",
        &pub_b,
        "persistent-keepalive",
        "25",
    ]);
    let (_, peers) = wg_dump(&a, &if_a);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].keepalive, "25");
    assert_eq!(peers[0].endpoint, end_b, "the update lost the endpoint");
    assert_eq!(peers[0].allowed_ips, "10.232.2.0/24");
    assert_ping(&a, TUNNEL_B, &["-c", "2", "-i", "0.2"]);

    // Several peers in one request: boringtun would carry one peer's settings into the next.
    let (_, k1) = lab.keypair("x1");
    let (_, k2) = lab.keypair("x2");
    run(&[
        "ip",
        "netns",
        "exec",
        &a,
        "wg",
        "set",
        &if_a,
        "peer",
        &k1,
        "endpoint",
        "10.231.0.77:51820",
        "persistent-keepalive",
        "7",
        "allowed-ips",
        "10.232.77.0/24",
        "peer",
        &k2,
        "allowed-ips",
        "10.232.78.0/24",
    ]);
    let info = uapi.get().unwrap();
    assert_eq!(info.peers.len(), 3, "{info:?}");
    let p1 = info
        .peer(&PublicKey::from_base64(&k1).unwrap())
        .expect("x1");
    let p2 = info
        .peer(&PublicKey::from_base64(&k2).unwrap())
        .expect("x2");
    assert_eq!(p1.persistent_keepalive_interval, 7);
    assert_eq!(p1.endpoint, Some("10.231.0.77:51820".parse().unwrap()));
    assert_eq!(p2.endpoint, None, "x1's endpoint leaked into x2");
    assert_eq!(p2.persistent_keepalive_interval, 0);
    // Removal, with our client.
    uapi.set(&DeviceUpdate {
        peers: vec![
            PeerUpdate::remove(PublicKey::from_base64(&k1).unwrap()),
            PeerUpdate::remove(PublicKey::from_base64(&k2).unwrap()),
        ],
        ..Default::default()
    })
    .unwrap();
    let info = uapi.get().unwrap();
    assert_eq!(info.peers.len(), 1, "{info:?}");
    assert_ping(&a, TUNNEL_B, &["-c", "2", "-i", "0.2"]);

    // A second device with the same interface name, in another namespace, is refused: the socket
    // directory is shared by all namespaces.
    let c = lab.netns("c");
    let out = Command::new("ip")
        .args(["netns", "exec", &c])
        .arg(wg_node())
        .args(["--engine", lab.engine])
        .args(["--ifname", &if_a, "--private-key-file"])
        .arg(&key_a)
        .args(["--address", "10.232.3.0", "--peer-public-key", &pub_b])
        .output()
        .expect("wg_node c");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shared by all network namespaces"), "{err}");
    // ... and the first device still answers.
    assert_eq!(uapi.get().unwrap().peers.len(), 1);
}
