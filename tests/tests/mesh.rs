//! The WireGuard mesh end to end, as `deploy/lab.sh` builds it, on this one machine: every node is a
//! network namespace running the real `meshd run` (the control plane after `meshd init`, the others
//! after `meshd token create` + `meshd join`), joined by veths to a bridge in an underlay namespace
//! (or, for the MTU and NAT tests, to routed segments of it: different link MTUs, a narrow hop
//! that sends no ICMP, a NAT namespace with nftables masquerade),
//! and every node has a pod namespace wired by the real CNI plugins (`bridge`, `host-local`,
//! `portmap` from containernetworking-plugins in /usr/lib/cni) run from the conflist meshd wrote.
//! Checked with real tools: `ping`, `wg show` (wireguard-tools, over meshd's UAPI socket), `tcpdump`
//! on the underlay, and TCP between pods.
//!
//! Needs root, `/dev/net/tun`, `ip`, `wg`, `tcpdump`, `ping` and the CNI plugins
//! (`deploy/install-deps.sh`); CI runs it as root. `MESHD_SKIP_NETNS_TESTS=1` skips it on an
//! unprivileged development machine; otherwise a missing prerequisite fails the test.
//!
//! Every test owns a [`Cluster`]: its namespaces, processes, CNI attachments, UAPI sockets and files
//! are removed when it drops, also when the test fails (the nodes' logs are printed first then).
//! Names carry the test process id and a per-test tag (interface names stay within 15 bytes: the
//! UAPI socket directory `/var/run/wireguard` is shared by all namespaces). The tests take a lock so
//! that only one cluster runs at a time: they measure times (2 s budgets) on a 2-core machine.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use meshd_e2e::{free_port, meshd_bin, netns_do, require_tool, run};

/// The Debian package's plugin directory.
const CNI_PATH: &str = "/usr/lib/cni";
/// Every node's WireGuard port (the `meshd join --wireguard-port` default).
const WG_PORT: u16 = 51820;
/// The underlay: `<UNDERLAY>.1` is the control plane, `<UNDERLAY>.1K` node `nK`.
const UNDERLAY: &str = "10.215.0";
const UNDERLAY_MTU: u32 = 1500;
/// What `meshd init` configures by default: no address of it may cross the underlay in clear.
const CLUSTER_PREFIX: &str = "10.244.";
/// Bytes per TCP transfer between pods.
const TRANSFER_BYTES: usize = 12 << 20;
/// Written at the start of every 4 KiB of a transfer: the capture must never contain it.
const CANARY: &[u8] = b"<meshd-canary:pod-payload-in-clear>";
/// The budget for a change to take effect (a join, a removal, a restart).
const BUDGET: Duration = Duration::from_secs(2);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether to run; panics when a prerequisite is missing (unless skipping was asked for).
fn prerequisites() -> bool {
    if std::env::var_os("MESHD_SKIP_NETNS_TESTS").is_some_and(|v| v == "1") {
        eprintln!("MESHD_SKIP_NETNS_TESTS=1: skipping");
        return false;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "the mesh tests need root (or set MESHD_SKIP_NETNS_TESTS=1)"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the mesh tests need /dev/net/tun"
    );
    require_tool("ip", "iproute2");
    require_tool("wg", "wireguard-tools");
    require_tool("tcpdump", "tcpdump");
    require_tool("ping", "iputils-ping");
    for plugin in ["bridge", "host-local", "portmap"] {
        assert!(
            Path::new(CNI_PATH).join(plugin).exists(),
            "{CNI_PATH}/{plugin} is missing: apt-get install containernetworking-plugins (deploy/install-deps.sh does this)"
        );
    }
    true
}

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `args`, panics with its output unless it succeeds; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(out.status.success(), "{args:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec NS args...`.
fn in_ns(ns: &str, args: &[&str]) -> Output {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

fn in_ns_ok(ns: &str, args: &[&str]) -> String {
    let out = in_ns(ns, args);
    assert!(
        out.status.success(),
        "in {ns}: {args:?} failed: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `sig` to a child and waits for it (SIGKILL after 5 s). Returns its status if collected.
fn signal_and_wait(
    child: &mut Child,
    sig: rustix::process::Signal,
) -> Option<std::process::ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, sig);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    signal_and_wait(child, rustix::process::Signal::TERM)
}

/// One ping per `(pod namespace, destination)`, all at once; true for each that got its answer.
fn ping_all(probes: &[(String, String)], wait: &str) -> Vec<bool> {
    let children: Vec<Child> = probes
        .iter()
        .map(|(ns, dst)| {
            Command::new("ip")
                .args([
                    "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", wait, dst,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ping")
        })
        .collect();
    children
        .into_iter()
        .map(|mut c| c.wait().is_ok_and(|s| s.success()))
        .collect()
}

/// Probes until every probe answers in one round; returns the time that took, or after `timeout`
/// the probes that still failed.
fn until_all_answer(
    probes: &[(String, String)],
    timeout: Duration,
) -> Result<Duration, Vec<(String, String)>> {
    let start = Instant::now();
    loop {
        let res = ping_all(probes, "0.25");
        if res.iter().all(|&ok| ok) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(probes
                .iter()
                .zip(res)
                .filter(|(_, ok)| !ok)
                .map(|(p, _)| p.clone())
                .collect());
        }
    }
}

/// One peer line of `wg show IF dump`.
#[derive(Clone, Debug)]
struct DumpPeer {
    endpoint: String,
    allowed_ips: String,
    handshake: u64,
    rx: u64,
    tx: u64,
    /// Persistent keepalive, seconds ("off" when none).
    keepalive: String,
}

/// `wg show IF dump` in `ns`: the interface's public key, listen port and peers by public key.
fn wg_dump(ns: &str, ifname: &str) -> (String, String, BTreeMap<String, DumpPeer>) {
    let text = in_ns_ok(ns, &["wg", "show", ifname, "dump"]);
    let mut lines = text.lines();
    let iface: Vec<&str> = lines.next().expect("interface line").split('\t').collect();
    assert_eq!(iface.len(), 4, "interface line of {ifname}: {iface:?}");
    let peers = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "peer line {l:?}");
            (
                f[0].to_string(),
                DumpPeer {
                    endpoint: f[2].into(),
                    allowed_ips: f[3].into(),
                    handshake: f[4].parse().expect("handshake"),
                    rx: f[5].parse().expect("rx"),
                    tx: f[6].parse().expect("tx"),
                    keepalive: f[7].into(),
                },
            )
        })
        .collect();
    (iface[1].to_string(), iface[2].to_string(), peers)
}

/// A value of a `KEY=VALUE` file.
fn env_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// the cluster
// ---------------------------------------------------------------------------------------------

struct Node {
    name: String,
    /// The node's namespace.
    ns: String,
    /// Its pod's namespace.
    pod_ns: String,
    ifname: String,
    /// Underlay address.
    addr: String,
    /// `<cluster dir>/<name>`: `data/`, `subnet.env`, `10-meshd.conflist`, `meshd.log`.
    dir: PathBuf,
    meshd: Option<Child>,
    /// The conflist the pod was added with, and the ADD result (for DEL).
    cni: Option<(serde_json::Value, Option<serde_json::Value>)>,
    pod_ip: Option<String>,
}

impl Node {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn data_str(&self) -> String {
        self.data().to_str().expect("utf-8 path").to_string()
    }
    fn subnet_env(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    fn conflist(&self) -> PathBuf {
        self.dir.join("10-meshd.conflist")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("meshd.log")
    }
    fn pod_ip(&self) -> String {
        self.pod_ip.clone().expect("the node has a pod")
    }
    fn public_key(&self) -> String {
        in_ns_ok(&self.ns, &["wg", "show", &self.ifname, "public-key"])
            .trim()
            .to_string()
    }
    fn subnet(&self) -> String {
        let text = std::fs::read_to_string(self.subnet_env()).expect("subnet.env");
        env_value(&text, "FLANNEL_SUBNET").expect("FLANNEL_SUBNET")
    }
}

/// A control plane and nodes in namespaces, with pods; removed on drop.
struct Cluster {
    tag: String,
    dir: PathBuf,
    underlay: String,
    api_port: u16,
    nodes: Vec<Node>,
    /// Every namespace made, in order.
    netns: Vec<String>,
    /// Other processes (tcpdump, background pings).
    extra: Vec<(String, Child)>,
    /// (token, CA pin) from `meshd token create`.
    token: Option<(String, String)>,
    /// How each node reaches the underlay (default [`Attach::Bridge`]).
    attach: BTreeMap<String, Attach>,
    /// Extra `meshd run` arguments per node.
    run_args: BTreeMap<String, Vec<String>>,
}

/// How a node reaches the underlay. The underlay namespace is both a bridge (`br0`, the shared
/// segment `<UNDERLAY>.0/24`) and a router (forwarding on) for the routed segments.
#[derive(Clone, Copy, Debug)]
enum Attach {
    /// On the shared bridge, at `<UNDERLAY>.1` (cp) or `<UNDERLAY>.1K` (nK), MTU [`UNDERLAY_MTU`].
    Bridge,
    /// At `10.216.K.2` on a segment of its own (the router is `.1`) whose link has MTU `mtu`.
    /// `wan: Some(m)`: a second router sits between the segment and the underlay router, on a
    /// link of MTU `m`, and neither router sends ICMP errors about UDP packets: a path whose MTU
    /// is lower than both ends' links, with "fragmentation needed" dropped (a PMTU black hole
    /// for the tunnel).
    Routed { mtu: u32, wan: Option<u32> },
    /// At `192.168.K.2` behind a NAT namespace (nftables masquerade) whose outside address is
    /// `10.216.K.2` on a segment of the underlay router: the node's own address is unreachable
    /// from the others.
    Nat,
}

/// K of node `cp` (0) or `nK`.
fn segment(name: &str) -> u32 {
    match name {
        "cp" => 0,
        n => n[1..]
            .parse::<u32>()
            .expect("node names are cp, n1, n2, ..."),
    }
}

/// A veth pair `a_if` in `a_ns` and `b_if` in `b_ns`, both with `mtu`, both up.
fn veth(a_ns: &str, a_if: &str, b_ns: &str, b_if: &str, mtu: u32) {
    let mtu = mtu.to_string();
    ok(&[
        "ip", "-n", a_ns, "link", "add", a_if, "mtu", &mtu, "type", "veth", "peer", "name", b_if,
        "mtu", &mtu, "netns", b_ns,
    ]);
    ok(&["ip", "-n", a_ns, "link", "set", a_if, "up"]);
    ok(&["ip", "-n", b_ns, "link", "set", b_if, "up"]);
}

fn address(ns: &str, ifname: &str, cidr: &str) {
    ok(&["ip", "-n", ns, "address", "add", cidr, "dev", ifname]);
}

/// Loads an nftables ruleset into `ns`.
fn nft(ns: &str, ruleset: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ruleset.as_bytes())
        .expect("nft ruleset");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft in {ns}: {}", describe(&out));
}

/// Drops every ICMP "destination unreachable" (so also "fragmentation needed") the namespace
/// would send about a UDP packet (the quoted IP header's protocol byte, 8 + 9 bytes into the ICMP
/// message, is 17): WireGuard's packets get no PMTU feedback, while TCP (the meshd API) still does.
const NO_ICMP_ERRORS: &str = "table inet meshdtest {
  chain out {
    type filter hook output priority filter; policy accept;
    icmp type destination-unreachable @th,136,8 17 drop
  }
}
";

impl Cluster {
    fn new(test: &str) -> Cluster {
        let tag = format!("{}{test}", std::process::id());
        let dir = std::env::temp_dir().join(format!("meshd-mesh-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut c = Cluster {
            underlay: String::new(),
            tag,
            dir,
            api_port: free_port(),
            nodes: Vec::new(),
            netns: Vec::new(),
            extra: Vec::new(),
            token: None,
            attach: BTreeMap::new(),
            run_args: BTreeMap::new(),
        };
        c.underlay = c.netns("ul");
        ok(&[
            "ip",
            "-n",
            &c.underlay,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ]);
        ok(&["ip", "-n", &c.underlay, "link", "set", "br0", "up"]);
        in_ns_ok(&c.underlay, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        c
    }

    fn netns(&mut self, suffix: &str) -> String {
        let ns = format!("mm{}-{suffix}", self.tag);
        let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        ok(&["ip", "netns", "add", &ns]);
        self.netns.push(ns.clone());
        ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        // No IPv6 chatter (router solicitations, ...) on the underlay capture.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            in_ns_ok(&ns, &["sysctl", "-qw", key]);
        }
        ns
    }

    fn cp(&self) -> &Node {
        &self.nodes[0]
    }

    fn node(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `meshd ARGS` in the node's namespace.
    fn meshd(&self, idx: usize, args: &[&str]) -> Output {
        let bin = meshd_bin();
        let mut full = vec![bin.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        in_ns(&self.nodes[idx].ns, &full)
    }

    fn meshd_ok(&self, idx: usize, args: &[&str]) -> String {
        let out = self.meshd(idx, args);
        assert!(
            out.status.success(),
            "meshd {args:?} on {} failed: {}",
            self.nodes[idx].name,
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A node namespace and its pod namespace, on the underlay (`eth0`), forwarding on.
    fn add_node(&mut self, name: &str) -> usize {
        let ns = self.netns(name);
        let pod_ns = self.netns(&format!("{name}-pod"));
        let ifname = format!("mm{}{name}", self.tag);
        assert!(ifname.len() <= 15, "interface name {ifname} too long");
        let attach = self.attach.get(name).copied().unwrap_or(Attach::Bridge);
        let addr = match attach {
            Attach::Bridge => self.bridged(name, &ns),
            Attach::Routed { mtu, wan } => self.routed(name, &ns, mtu, wan),
            Attach::Nat => self.natted(name, &ns),
        };
        in_ns_ok(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        self.nodes.push(Node {
            name: name.to_string(),
            ns,
            pod_ns,
            ifname,
            addr,
            dir,
            meshd: None,
            cni: None,
            pod_ip: None,
        });
        self.nodes.len() - 1
    }

    /// Wires `ns` to the bridge; returns its address.
    fn bridged(&mut self, name: &str, ns: &str) -> String {
        let addr = match name {
            "cp" => format!("{UNDERLAY}.1"),
            n => format!("{UNDERLAY}.{}", 10 + segment(n)),
        };
        let ul_if = format!("ul-{name}");
        ok(&[
            "ip",
            "-n",
            &self.underlay,
            "link",
            "add",
            &ul_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ]);
        ok(&[
            "ip",
            "-n",
            &self.underlay,
            "link",
            "set",
            &ul_if,
            "master",
            "br0",
            "up",
        ]);
        ok(&[
            "ip",
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            "mtu",
            &UNDERLAY_MTU.to_string(),
        ]);
        address(ns, "eth0", &format!("{addr}/24"));
        ok(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        addr
    }

    /// Wires `ns` to a routed segment of its own (see [`Attach::Routed`]); returns its address.
    fn routed(&mut self, name: &str, ns: &str, mtu: u32, wan: Option<u32>) -> String {
        let k = segment(name);
        let ul = self.underlay.clone();
        match wan {
            None => {
                veth(&ul, &format!("r-{name}"), ns, "eth0", mtu);
                address(&ul, &format!("r-{name}"), &format!("10.216.{k}.1/24"));
            }
            Some(wan_mtu) => {
                let wns = self.netns(&format!("{name}-wan"));
                veth(&ul, &format!("w-{name}"), &wns, "up0", wan_mtu);
                address(&ul, &format!("w-{name}"), &format!("10.217.{k}.1/24"));
                address(&wns, "up0", &format!("10.217.{k}.2/24"));
                veth(&wns, "down0", ns, "eth0", mtu);
                address(&wns, "down0", &format!("10.216.{k}.1/24"));
                ok(&[
                    "ip",
                    "-n",
                    &ul,
                    "route",
                    "add",
                    &format!("10.216.{k}.0/24"),
                    "via",
                    &format!("10.217.{k}.2"),
                ]);
                ok(&[
                    "ip",
                    "-n",
                    &wns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.217.{k}.1"),
                ]);
                in_ns_ok(&wns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
                // Neither router tells the ends that a UDP packet was too big.
                nft(&wns, NO_ICMP_ERRORS);
                nft(&ul, NO_ICMP_ERRORS);
            }
        }
        let addr = format!("10.216.{k}.2");
        address(ns, "eth0", &format!("{addr}/24"));
        ok(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.216.{k}.1"),
        ]);
        addr
    }

    /// Wires `ns` behind a NAT namespace (see [`Attach::Nat`]); returns its (private) address.
    fn natted(&mut self, name: &str, ns: &str) -> String {
        let k = segment(name);
        let ul = self.underlay.clone();
        let nat = self.netns(&format!("{name}-nat"));
        veth(&ul, &format!("r-{name}"), &nat, "wan0", UNDERLAY_MTU);
        address(&ul, &format!("r-{name}"), &format!("10.216.{k}.1/24"));
        address(&nat, "wan0", &format!("10.216.{k}.2/24"));
        veth(&nat, "lan0", ns, "eth0", UNDERLAY_MTU);
        address(&nat, "lan0", &format!("192.168.{k}.1/24"));
        ok(&[
            "ip",
            "-n",
            &nat,
            "route",
            "add",
            "default",
            "via",
            &format!("10.216.{k}.1"),
        ]);
        in_ns_ok(&nat, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        nft(
            &nat,
            "table ip meshdnat {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" masquerade
  }
}
",
        );
        // UDP mappings expire after 3 s without traffic (Linux: 30 s, 120 s once replied; NAT
        // boxes on rented networks often less), so that the test sees what keepalive is for.
        for key in [
            "net.netfilter.nf_conntrack_udp_timeout=3",
            "net.netfilter.nf_conntrack_udp_timeout_stream=3",
        ] {
            in_ns_ok(&nat, &["sysctl", "-qw", key]);
        }
        let addr = format!("192.168.{k}.2");
        address(ns, "eth0", &format!("{addr}/24"));
        ok(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("192.168.{k}.1"),
        ]);
        addr
    }

    /// Starts `meshd run` on a node (its log appended to `meshd.log`); returns when it is ready.
    fn start(&mut self, idx: usize) -> Duration {
        let t0 = Instant::now();
        let n = &self.nodes[idx];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.log())
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(meshd_bin())
            .args([
                "run",
                "--data-dir",
                &n.data_str(),
                "--wg-interface",
                &n.ifname,
            ])
            .arg("--subnet-env")
            .arg(n.subnet_env())
            .arg("--cni-conf")
            .arg(n.conflist())
            .args(self.run_args.get(&n.name).into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("meshd run");
        self.nodes[idx].meshd = Some(child);
        self.wait_ready(idx);
        t0.elapsed()
    }

    /// Waits (20 s at most) until the node's interface is up and subnet.env and the conflist exist.
    fn wait_ready(&mut self, idx: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = &mut self.nodes[idx];
            let up = run(Command::new("ip").args(["-n", &n.ns, "link", "show", &n.ifname]))
                .status
                .success();
            if up && n.subnet_env().exists() && n.conflist().exists() {
                return;
            }
            let exited = n.meshd.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(n.log()).unwrap_or_default();
                panic!(
                    "meshd run on {} did not get ready ({}); its log:\n{log}",
                    n.name,
                    exited.map_or("timeout".to_string(), |s| format!("exited: {s}"))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops a node's `meshd run` with `sig` and waits for it.
    fn stop(
        &mut self,
        idx: usize,
        sig: rustix::process::Signal,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[idx].meshd.take().expect("meshd runs");
        signal_and_wait(&mut child, sig)
    }

    /// `meshd init` + `meshd run` on the control plane, and a token for the joins.
    fn control_plane(&mut self) {
        let idx = self.add_node("cp");
        let (addr, data) = (self.cp().addr.clone(), self.cp().data_str());
        let port = self.api_port.to_string();
        self.meshd_ok(
            idx,
            &[
                "init",
                "--data-dir",
                &data,
                "--node-name",
                "cp",
                "--advertise-address",
                &addr,
                "--api-port",
                &port,
            ],
        );
        self.start(idx);
        // The API listens once it answers a connection.
        let api: SocketAddr = format!("{addr}:{port}").parse().expect("addr");
        let ns = self.cp().ns.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !netns_do(&ns, move || {
            TcpStream::connect_timeout(&api, Duration::from_millis(200)).is_ok()
        }) {
            assert!(
                Instant::now() < deadline,
                "the meshd API on {api} did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let json = self.meshd_ok(
            idx,
            &[
                "token",
                "create",
                "--data-dir",
                &data,
                "--uses",
                "20",
                "--ttl",
                "1h",
                "--output",
                "json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&json).expect("token JSON");
        self.token = Some((
            v["token"].as_str().expect("token").to_string(),
            v["ca_hash"].as_str().expect("ca_hash").to_string(),
        ));
    }

    /// Makes node `name`, joins it (`meshd join` in its namespace) and starts `meshd run` there.
    fn join(&mut self, name: &str) -> usize {
        let idx = self.enroll(name);
        self.start(idx);
        idx
    }

    /// Makes node `name` and joins it (`meshd join` in its namespace), without starting it.
    fn enroll(&mut self, name: &str) -> usize {
        let idx = self.add_node(name);
        let (token, hash) = self.token.clone().expect("control plane first");
        let server = format!("{}:{}", self.cp().addr, self.api_port);
        let (addr, data) = (self.nodes[idx].addr.clone(), self.nodes[idx].data_str());
        self.meshd_ok(
            idx,
            &[
                "join",
                "--server",
                &server,
                "--token",
                &token,
                "--ca-hash",
                &hash,
                "--node-name",
                name,
                "--advertise-address",
                &addr,
                "--data-dir",
                &data,
            ],
        );
        idx
    }

    /// A control plane, `workers` nodes, and a pod on every node.
    fn build(test: &str, workers: usize) -> Cluster {
        let mut c = Cluster::new(test);
        c.control_plane();
        for i in 1..=workers {
            c.join(&format!("n{i}"));
        }
        for idx in 0..c.nodes.len() {
            c.pod(idx);
        }
        c
    }

    /// Wires the node's pod with the plugins of the conflist meshd wrote, as a runtime does.
    fn pod(&mut self, idx: usize) {
        let text = std::fs::read_to_string(self.nodes[idx].conflist()).expect("conflist");
        let conf: serde_json::Value = serde_json::from_str(&text).expect("conflist JSON");
        self.nodes[idx].cni = Some((conf.clone(), None));
        let result = cni(&self.nodes[idx], "ADD", &conf, None)
            .unwrap_or_else(|e| panic!("CNI ADD on {}: {e}", self.nodes[idx].name));
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no address in the CNI result {result}"))
            .to_string();
        self.nodes[idx].pod_ip = Some(ip);
        self.nodes[idx].cni = Some((conf, Some(result)));
    }

    /// Every ordered pair of distinct pods, as ping probes `(source pod namespace, destination)`.
    fn all_pairs(&self, among: &[usize]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for &a in among {
            for &b in among {
                if a != b {
                    out.push((self.nodes[a].pod_ns.clone(), self.nodes[b].pod_ip()));
                }
            }
        }
        out
    }

    /// Starts a bounded background process in `ns`, remembered for the drop.
    fn spawn_in(&mut self, what: &str, ns: &str, args: &[&str], stderr: Stdio) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.extra.push((what.to_string(), child));
        self.extra.len() - 1
    }

    /// Starts tcpdump on every interface of the underlay namespace, inbound only (so every packet
    /// once, as it enters the underlay from its node); returns once it captures.
    fn start_capture(&mut self) -> Capture {
        let pcap = self.dir.join("underlay.pcap");
        let ul = self.underlay.clone();
        let pcap_s = pcap.to_str().expect("utf-8").to_string();
        let idx = self.spawn_in(
            "tcpdump",
            &ul,
            &[
                "tcpdump", "-i", "any", "-Q", "in", "-n", "-B", "65536", "-w", &pcap_s,
            ],
            Stdio::piped(),
        );
        let err = self.extra[idx].1.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let rest = std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut all = String::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                all.push_str(&line);
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                line.clear();
            }
            all
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("tcpdump did not start");
        Capture {
            idx,
            pcap,
            stderr: rest,
        }
    }

    /// Stops the capture; returns its text (`tcpdump -r -n -q`), its bytes and tcpdump's stderr.
    fn stop_capture(&mut self, cap: Capture) -> (String, Vec<u8>, String) {
        signal_and_wait(&mut self.extra[cap.idx].1, rustix::process::Signal::INT);
        let err = cap.stderr.join().unwrap_or_default();
        let pcap_s = cap.pcap.to_str().expect("utf-8");
        let text = ok(&["tcpdump", "-r", pcap_s, "-n", "-nn", "-q"]);
        let bytes = std::fs::read(&cap.pcap).expect("pcap");
        (text, bytes, err)
    }

    /// Node names by WireGuard public key, as the control plane's registry has them.
    fn registry(&self) -> BTreeMap<String, serde_json::Value> {
        let data = self.cp().data_str();
        let json = self.meshd_ok(
            0,
            &["node", "list", "--data-dir", &data, "--output", "json"],
        );
        let v: Vec<serde_json::Value> = serde_json::from_str(&json).expect("node list JSON");
        v.into_iter()
            .map(|n| (n["name"].as_str().expect("name").to_string(), n))
            .collect()
    }
}

struct Capture {
    idx: usize,
    pcap: PathBuf,
    stderr: JoinHandle<String>,
}

/// Runs the conflist's plugins against the node's pod (CNI 0.4: ADD in order, each given the
/// previous result; DEL in reverse order with the ADD result). Returns the last result.
fn cni(
    node: &Node,
    command: &str,
    conf: &serde_json::Value,
    add_result: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let plugins = conf["plugins"]
        .as_array()
        .ok_or("no plugins in the conflist")?;
    let mut order: Vec<&serde_json::Value> = plugins.iter().collect();
    if command == "DEL" {
        order.reverse();
    }
    let mut prev = add_result.cloned();
    for p in order {
        let mut cfg = p.clone();
        cfg["cniVersion"] = conf["cniVersion"].clone();
        cfg["name"] = conf["name"].clone();
        if let Some(r) = &prev {
            cfg["prevResult"] = r.clone();
        }
        let ty = cfg["type"]
            .as_str()
            .ok_or("a plugin without type")?
            .to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(Path::new(CNI_PATH).join(&ty))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &node.pod_ns)
            .env("CNI_NETNS", format!("/var/run/netns/{}", node.pod_ns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{ty}: {e}"))?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(cfg.to_string().as_bytes())
            .map_err(|e| format!("{ty}: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("{ty}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "plugin {ty} ({command}) failed: {}",
                describe(&out)
            ));
        }
        if command == "ADD" {
            prev = Some(
                serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("{ty}: result not JSON ({e}): {}", describe(&out)))?,
            );
        }
    }
    Ok(prev.unwrap_or(serde_json::Value::Null))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(n.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- meshd run on {} (last lines of {}):",
                    n.name,
                    n.log().display()
                );
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for (_, child) in self.extra.iter_mut().rev() {
            terminate(child);
        }
        for n in self.nodes.iter_mut().rev() {
            if let Some(mut c) = n.meshd.take() {
                terminate(&mut c);
            }
        }
        // CNI DEL releases the pods' host-local addresses.
        for n in self.nodes.iter().rev() {
            if let Some((conf, result)) = &n.cni {
                if let Err(e) = cni(n, "DEL", conf, result.as_ref()) {
                    eprintln!("CNI DEL on {}: {e}", n.name);
                }
            }
        }
        for ns in self.netns.iter().rev() {
            // Anything still running in our namespaces was started by this test.
            let pids = run(Command::new("ip").args(["netns", "pids", ns]));
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = pid.parse::<i32>() {
                    if let Some(p) = rustix::process::Pid::from_raw(p) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                }
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        // A meshd killed with SIGKILL leaves its UAPI socket behind.
        for n in &self.nodes {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", n.ifname));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// traffic
// ---------------------------------------------------------------------------------------------

/// The payload of a transfer: pseudo-random bytes with [`CANARY`] at every 4 KiB.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        if out.len() % 4096 == 0 {
            out.extend_from_slice(CANARY);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A transfer of `payload` from the pod `from` to a listener in the pod `to` (TCP `port`), on
/// background threads: `join` gives (bytes received, SHA-256 sent, SHA-256 received, duration).
fn transfer(
    from_ns: &str,
    to_ns: &str,
    to_ip: &str,
    port: u16,
    payload: Vec<u8>,
) -> JoinHandle<(usize, String, String, Duration)> {
    let addr: SocketAddr = format!("{to_ip}:{port}").parse().expect("address");
    let listener = netns_do(to_ns, move || {
        TcpListener::bind(addr).expect("bind in the pod")
    });
    let from_ns = from_ns.to_string();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let receiver = std::thread::spawn(move || {
            listener.set_nonblocking(true).expect("nonblocking");
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no connection within 30 s");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0;
            loop {
                let n = stream.read(&mut buf).expect("receiving");
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
                total += n;
            }
            (total, hex(ctx.finish().as_ref()))
        });
        let mut stream = netns_do(&from_ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
        });
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let sent = hex(ring::digest::digest(&ring::digest::SHA256, &payload).as_ref());
        for chunk in payload.chunks(64 << 10) {
            stream.write_all(chunk).expect("sending");
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let (total, received) = receiver.join().expect("receiver");
        (total, sent, received, t0.elapsed())
    })
}

/// The capture holds only WireGuard (UDP between underlay addresses, port [`WG_PORT`] on both
/// sides), the meshd API's TLS (TCP to or from the API port of the control plane) and ARP; no
/// cluster address and no payload in clear. Returns the number of WireGuard packets.
/// Returns the WireGuard datagrams captured and the sum of their UDP lengths (a UDP GSO send is
/// captured once, as one packet whose length covers all its datagrams).
fn check_capture(
    text: &str,
    bytes: &[u8],
    cp_addr: &str,
    api_port: u16,
    tcpdump: &str,
) -> (usize, usize) {
    let mut wireguard = 0;
    let mut wireguard_bytes = 0;
    for line in text.lines() {
        assert!(
            !line.contains(CLUSTER_PREFIX),
            "a cluster (pod or tunnel) address crossed the underlay in clear: {line}"
        );
        if line.contains(" ARP") {
            continue;
        }
        let ip = line
            .find(" IP ")
            .map(|i| &line[i + 4..])
            .unwrap_or_else(|| panic!("not IPv4 on the underlay: {line}"));
        // "A.B.C.D.P > E.F.G.H.Q: UDP, length N" or "...: tcp N"
        let (src, rest) = ip.split_once(" > ").unwrap_or_else(|| panic!("{line}"));
        let (dst, proto) = rest.split_once(": ").unwrap_or_else(|| panic!("{line}"));
        if proto.starts_with("igmp") && dst.starts_with("224.0.0.") {
            continue; // link-local multicast membership reports (no payload, no cluster address)
        }
        let split = |hp: &str| -> (String, u16) {
            let (h, p) = hp
                .rsplit_once('.')
                .unwrap_or_else(|| panic!("no port: {line}"));
            (
                h.to_string(),
                p.parse().unwrap_or_else(|_| panic!("no port: {line}")),
            )
        };
        let ((sh, sp), (dh, dp)) = (split(src), split(dst));
        let underlay = |h: &str| h.starts_with(&format!("{UNDERLAY}."));
        if proto.starts_with("UDP")
            && sp == WG_PORT
            && dp == WG_PORT
            && underlay(&sh)
            && underlay(&dh)
        {
            wireguard += 1;
            wireguard_bytes += proto
                .rsplit_once("length ")
                .and_then(|(_, n)| n.trim().parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no UDP length: {line}"));
        } else if proto.starts_with("tcp")
            && ((dh == cp_addr && dp == api_port) || (sh == cp_addr && sp == api_port))
        {
            // the control path: TLS to the meshd API
        } else {
            panic!("unexpected packet on the underlay: {line}");
        }
    }
    assert!(
        !bytes.windows(CANARY.len()).any(|w| w == CANARY),
        "pod payload crossed the underlay in clear (the canary is in the capture)"
    );
    assert!(
        wireguard > 0,
        "no WireGuard packet captured; tcpdump: {tcpdump}"
    );
    (wireguard, wireguard_bytes)
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

/// Three nodes: every pod reaches the others (ping; 12 MiB over TCP with matching SHA-256), the
/// underlay carries only WireGuard (and the API's TLS), `wg show` lists exactly the other nodes.
#[test]
fn three_nodes_pods_reach_each_other_only_through_wireguard() {
    let _serial = serial();
    if !prerequisites() {
        return;
    }
    let t_all = Instant::now();
    let mut c = Cluster::build("a", 2);
    eprintln!("cluster of 3 with pods up in {:?}", t_all.elapsed());
    let registry = c.registry();
    assert_eq!(
        registry.keys().cloned().collect::<BTreeSet<_>>(),
        ["cp", "n1", "n2"].map(String::from).into_iter().collect(),
        "{registry:?}"
    );

    // Each node's interface, as the brief says: subnet's network address /32, MTU = underlay - 80,
    // one route for the cluster network through it; subnet.env and the conflist agree.
    for n in &c.nodes {
        let subnet = registry[&n.name]["subnet"]
            .as_str()
            .expect("subnet")
            .to_string();
        let (net, len) = subnet.split_once('/').expect("subnet/len");
        let env = std::fs::read_to_string(n.subnet_env()).expect("subnet.env");
        let conf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(n.conflist()).expect("conflist"))
                .expect("conflist JSON");
        let link = in_ns_ok(&n.ns, &["ip", "-j", "link", "show", &n.ifname]);
        let link: serde_json::Value = serde_json::from_str(&link).expect("ip -j link");
        let mtu = UNDERLAY_MTU - 80;
        assert_eq!(
            (
                link[0]["mtu"].as_u64(),
                env_value(&env, "FLANNEL_MTU"),
                conf["plugins"][0]["mtu"].as_u64()
            ),
            (Some(u64::from(mtu)), Some(mtu.to_string()), Some(u64::from(mtu))),
            "{}: tunnel MTU (interface, subnet.env, conflist) is not the underlay's {UNDERLAY_MTU} - 80",
            n.name
        );
        let first = {
            let mut o: Vec<u8> = net.split('.').map(|x| x.parse().expect("octet")).collect();
            o[3] += 1;
            format!("{}.{}.{}.{}/{len}", o[0], o[1], o[2], o[3])
        };
        assert_eq!(
            env_value(&env, "FLANNEL_SUBNET"),
            Some(first),
            "{}: {env}",
            n.name
        );
        let addrs = in_ns_ok(
            &n.ns,
            &["ip", "-4", "-o", "address", "show", "dev", &n.ifname],
        );
        assert!(
            addrs.contains(&format!("inet {net}/32")),
            "{}: {addrs}",
            n.name
        );
        let route = in_ns_ok(&n.ns, &["ip", "route", "show", "10.244.0.0/16"]);
        assert!(
            route.contains(&format!("dev {}", n.ifname)),
            "{}: {route}",
            n.name
        );
        assert!(
            n.pod_ip().starts_with(&net[..net.rfind('.').expect("dot")]),
            "{}: pod {} outside {subnet}",
            n.name,
            n.pod_ip()
        );
    }

    // (a) + (b): capture the underlay while the pods ping each other and move 2 x 12 MiB.
    let cap = c.start_capture();
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let probes = c.all_pairs(&all);
    let t = Instant::now();
    let res = ping_all(&probes, "3");
    let failed: Vec<_> = probes.iter().zip(&res).filter(|(_, ok)| !**ok).collect();
    assert!(failed.is_empty(), "pods without an answer: {failed:?}");
    eprintln!("6 pod-to-pod pings answered in {:?}", t.elapsed());
    let (cp, n1, n2) = (c.node("cp"), c.node("n1"), c.node("n2"));
    let x = transfer(
        &c.nodes[cp].pod_ns,
        &c.nodes[n1].pod_ns,
        &c.nodes[n1].pod_ip(),
        9000,
        payload(TRANSFER_BYTES, 1),
    );
    let y = transfer(
        &c.nodes[n1].pod_ns,
        &c.nodes[n2].pod_ns,
        &c.nodes[n2].pod_ip(),
        9001,
        payload(TRANSFER_BYTES, 2),
    );
    for (what, h) in [("cp -> n1", x), ("n1 -> n2", y)] {
        let (got, sent, received, took) = h.join().expect("transfer");
        assert_eq!(got, TRANSFER_BYTES, "{what}: bytes received");
        assert_eq!(received, sent, "{what}: SHA-256 differs");
        eprintln!(
            "{what}: {TRANSFER_BYTES} bytes in {took:?} ({:.0} Mbit/s), sha256 {sent}",
            TRANSFER_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
    }
    let (text, bytes, tcpdump) = c.stop_capture(cap);
    let (wg, wg_bytes) = check_capture(&text, &bytes, &c.cp().addr, c.api_port, &tcpdump);
    // Every packet is captured once, as it enters the underlay from its node: the transfers' bytes
    // are all there (in WireGuard datagrams, several to a captured packet when sent with UDP GSO),
    // or in packets counted as dropped by the kernel (at most 64 KiB each); and most packets are
    // there (the canary is checked on what was captured).
    let dropped: usize = tcpdump
        .lines()
        .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop count from tcpdump: {tcpdump}"));
    assert!(
        wg_bytes + dropped * 65536 >= 2 * TRANSFER_BYTES && dropped * 10 <= wg,
        "{wg} WireGuard packets ({wg_bytes} bytes) captured, {dropped} dropped, for 2 x {TRANSFER_BYTES} bytes: {tcpdump}"
    );
    eprintln!(
        "capture: {wg} WireGuard packets ({wg_bytes} bytes), nothing else but the API's TLS and ARP; {}",
        tcpdump.trim().replace('\n', "; ")
    );

    // (c) wg show on every node: exactly the other nodes' keys, their endpoints and subnets,
    // recent handshakes, traffic both ways; the device's key is the registered one.
    let now = now_secs();
    for n in &c.nodes {
        let (own, port, peers) = wg_dump(&n.ns, &n.ifname);
        let me = &registry[&n.name];
        assert_eq!(
            own,
            me["wireguard_public_key"].as_str().expect("key"),
            "{}",
            n.name
        );
        assert_eq!(port, WG_PORT.to_string(), "{}: listen port", n.name);
        let expected: BTreeSet<String> = registry
            .values()
            .filter(|r| r["name"] != n.name.as_str())
            .map(|r| r["wireguard_public_key"].as_str().expect("key").to_string())
            .collect();
        assert_eq!(
            peers.keys().cloned().collect::<BTreeSet<_>>(),
            expected,
            "{}: peers are not exactly the other nodes",
            n.name
        );
        for r in registry.values().filter(|r| r["name"] != n.name.as_str()) {
            let p = &peers[r["wireguard_public_key"].as_str().expect("key")];
            let name = r["name"].as_str().expect("name");
            let other = &c.nodes[c.node(name)];
            assert_eq!(
                p.endpoint,
                format!("{}:{WG_PORT}", other.addr),
                "{} -> {name}",
                n.name
            );
            assert!(
                p.allowed_ips
                    .split(',')
                    .any(|a| a == r["subnet"].as_str().expect("subnet")),
                "{} -> {name}: allowed ips {} lack {}",
                n.name,
                p.allowed_ips,
                r["subnet"]
            );
            assert!(
                p.handshake > 0 && p.handshake + 60 >= now && p.handshake <= now + 1,
                "{} -> {name}: latest handshake {} is not recent (now {now})",
                n.name,
                p.handshake
            );
            assert!(p.rx > 0 && p.tx > 0, "{} -> {name}: {p:?}", n.name);
        }
    }

    // meshd status (JSON) on a node agrees: every other node a peer with a handshake.
    let n1n = &c.nodes[n1];
    let out = c.meshd_ok(
        n1,
        &[
            "status",
            "--data-dir",
            &n1n.data_str(),
            "--wg-interface",
            &n1n.ifname,
            "--output",
            "json",
        ],
    );
    let st: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(st["device_up"], true, "{st}");
    for node in st["nodes"].as_array().expect("nodes") {
        if node["is_self"] == true {
            continue;
        }
        assert_eq!(node["peer"], true, "{node}");
        assert!(node["latest_handshake"].is_string(), "{node}");
        assert!(node["rx_bytes"].as_u64() > Some(0), "{node}");
    }
    assert_eq!(
        st["unknown_peers"].as_array().map(Vec::len),
        Some(0),
        "{st}"
    );
    eprintln!("test a: {:?}", t_all.elapsed());
}

/// A fourth node joins while traffic flows: sessions of unchanged peers are kept, the new node
/// is reachable within 2 s; `meshd node remove` takes it out of every peer set within 2 s.
#[test]
fn a_join_keeps_sessions_and_a_removed_node_leaves_every_peer_set() {
    let _serial = serial();
    if !prerequisites() {
        return;
    }
    let t_all = Instant::now();
    let mut c = Cluster::build("j", 2);
    let old: Vec<usize> = (0..3).collect();
    let probes = c.all_pairs(&old);
    until_all_answer(&probes, Duration::from_secs(5))
        .unwrap_or_else(|f| panic!("pods without an answer: {f:?}"));
    // Traffic over every pair of nodes, in both directions, all along.
    let mut pingers = Vec::new();
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let (ns, dst) = (c.nodes[a].pod_ns.clone(), c.nodes[b].pod_ip());
        let what = format!("ping {} -> {}", c.nodes[a].name, c.nodes[b].name);
        pingers.push(c.spawn_in(
            &what,
            &ns,
            &["ping", "-n", "-q", "-i", "0.1", "-w", "60", &dst],
            Stdio::piped(),
        ));
    }
    // Handshakes are then at least 2 s old: a new one would show.
    std::thread::sleep(Duration::from_millis(2500));
    let before: Vec<_> = old
        .iter()
        .map(|&i| wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname).2)
        .collect();
    for (i, peers) in before.iter().enumerate() {
        assert_eq!(peers.len(), 2, "{}: {peers:?}", c.nodes[i].name);
    }

    // n3 joins.
    let t_join = Instant::now();
    let n3 = c.enroll("n3");
    let joined = t_join.elapsed();
    let ready = c.start(n3);
    let t_ready = Instant::now();
    c.pod(n3);
    let key3 = c.nodes[n3].public_key();
    let cni_took = t_ready.elapsed();
    let mut probes3 = Vec::new();
    for &i in &old {
        probes3.push((c.nodes[i].pod_ns.clone(), c.nodes[n3].pod_ip()));
        probes3.push((c.nodes[n3].pod_ns.clone(), c.nodes[i].pod_ip()));
    }
    let reach = until_all_answer(&probes3, Duration::from_secs(10))
        .unwrap_or_else(|f| panic!("the new node's pod not reachable within 10 s: {f:?}"));
    let since_ready = t_ready.elapsed();
    let peer_sets: Vec<bool> = old
        .iter()
        .map(|&i| {
            wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname)
                .2
                .contains_key(&key3)
        })
        .collect();
    eprintln!(
        "n3: meshd join {joined:?}; meshd run ready in {ready:?}; CNI ADD {cni_took:?}; every pod <-> n3's pod answered {reach:?} later ({:?} after n3's meshd started)",
        ready + since_ready
    );
    assert_eq!(peer_sets, [true, true, true], "n3 missing from a peer set");
    assert!(
        ready + since_ready <= BUDGET,
        "n3 reachable only {:?} after its meshd started (ready after {ready:?}; budget {BUDGET:?})",
        ready + since_ready
    );

    // Unchanged peers kept their sessions: same latest handshake, counters still growing.
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<_> = old
        .iter()
        .map(|&i| wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname).2)
        .collect();
    for (i, peers) in before.iter().enumerate() {
        for (key, b) in peers {
            let a = after[i]
                .get(key)
                .unwrap_or_else(|| panic!("{}: peer {key} gone after the join", c.nodes[i].name));
            assert!(
                a.handshake.abs_diff(b.handshake) <= 1,
                "{}: peer {key} made a new handshake across the join ({} -> {})",
                c.nodes[i].name,
                b.handshake,
                a.handshake
            );
            assert!(
                a.rx > b.rx && a.tx > b.tx,
                "{}: peer {key} counters did not grow across the join: {b:?} -> {a:?}",
                c.nodes[i].name
            );
        }
    }

    // n3 is removed: gone from every peer set within 2 s.
    let cp_data = c.cp().data_str();
    let t_remove = Instant::now();
    c.meshd_ok(0, &["node", "remove", "--data-dir", &cp_data, "n3"]);
    let removed = loop {
        let still: Vec<String> = old
            .iter()
            .filter(|&&i| {
                wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname)
                    .2
                    .contains_key(&key3)
            })
            .map(|&i| c.nodes[i].name.clone())
            .collect();
        if still.is_empty() {
            break t_remove.elapsed();
        }
        assert!(
            t_remove.elapsed() <= BUDGET,
            "n3 still a peer of {still:?} {:?} after `meshd node remove`",
            t_remove.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("n3 left every peer set {removed:?} after `meshd node remove`");
    assert!(!c.registry().contains_key("n3"), "n3 still registered");
    // The others are unaffected: same sessions, still growing (pings go every 100 ms).
    std::thread::sleep(Duration::from_millis(400));
    let last: Vec<_> = old
        .iter()
        .map(|&i| wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname).2)
        .collect();
    for (i, peers) in before.iter().enumerate() {
        assert_eq!(last[i].len(), 2, "{}: {:?}", c.nodes[i].name, last[i]);
        for (key, b) in peers {
            let a = &last[i][key];
            assert!(
                a.handshake.abs_diff(b.handshake) <= 1 && a.rx > after[i][key].rx,
                "{}: peer {key} disturbed by the removal: {b:?}, after the join {:?}, after the removal {a:?}",
                c.nodes[i].name,
                after[i][key]
            );
        }
    }
    // The background pings lost nothing (an echo in flight when they are stopped aside).
    for idx in pingers {
        signal_and_wait(&mut c.extra[idx].1, rustix::process::Signal::INT);
        let mut out = String::new();
        if let Some(mut s) = c.extra[idx].1.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let what = &c.extra[idx].0;
        let stats = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("{what}: {out}"));
        let nums: Vec<u64> = stats
            .split(',')
            .take(2)
            .map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("count")
            })
            .collect();
        eprintln!("{what}: {stats}");
        assert!(
            nums[1] + 1 >= nums[0] && nums[0] > 20,
            "{what} lost packets: {stats}"
        );
    }
    eprintln!("test d: {:?}", t_all.elapsed());
}

/// meshd restarts on a node (SIGTERM, then SIGKILL): the tunnel is back within 2 s, with the same
/// key and subnet, for traffic towards the restarted node as well as from it.
#[test]
fn a_restarted_node_is_back_within_two_seconds_with_its_key_and_subnet() {
    let _serial = serial();
    if !prerequisites() {
        return;
    }
    let t_all = Instant::now();
    let mut c = Cluster::build("r", 2);
    let all: Vec<usize> = (0..3).collect();
    until_all_answer(&c.all_pairs(&all), Duration::from_secs(5))
        .unwrap_or_else(|f| panic!("pods without an answer: {f:?}"));
    let n1 = c.node("n1");
    let key = c.nodes[n1].public_key();
    let subnet = c.nodes[n1].subnet();
    let addrs = in_ns_ok(
        &c.nodes[n1].ns,
        &[
            "ip",
            "-4",
            "-o",
            "address",
            "show",
            "dev",
            &c.nodes[n1].ifname,
        ],
    );
    let addr = addrs
        .split_whitespace()
        .nth(3)
        .expect("address")
        .to_string();
    let reg = c.registry()["n1"].clone();
    let mut late = Vec::new();
    for (sig, name) in [
        (rustix::process::Signal::TERM, "SIGTERM"),
        (rustix::process::Signal::KILL, "SIGKILL"),
    ] {
        let st = c.stop(n1, sig).expect("meshd exited");
        eprintln!("meshd on n1 stopped by {name}: {st}");
        let ns = c.nodes[n1].ns.clone();
        let ifname = c.nodes[n1].ifname.clone();
        assert!(
            !run(Command::new("ip").args(["-n", &ns, "link", "show", &ifname]))
                .status
                .success(),
            "{ifname} still there after {name}"
        );
        let t0 = Instant::now();
        let ready = c.start(n1);
        // Towards the restarted node first: only its peers send, it must still be reachable.
        let inbound: Vec<(String, String)> = [0, 2]
            .iter()
            .map(|&i| (c.nodes[i].pod_ns.clone(), c.nodes[n1].pod_ip()))
            .collect();
        // (20 s at most, to tell how long it really takes when it is late.)
        let back_in = until_all_answer(&inbound, Duration::from_secs(20));
        let t_in = t0.elapsed();
        let outbound: Vec<(String, String)> = [0, 2]
            .iter()
            .map(|&i| (c.nodes[n1].pod_ns.clone(), c.nodes[i].pod_ip()))
            .collect();
        until_all_answer(&outbound, Duration::from_secs(10))
            .unwrap_or_else(|f| panic!("after {name}: n1's pod cannot reach {f:?}"));
        eprintln!(
            "after {name}: meshd ready in {ready:?}; pods on cp and n2 reach n1's pod {t_in:?} after the start ({back_in:?})"
        );
        if back_in.is_err() || t_in > BUDGET {
            late.push(format!(
                "after {name}: pods on cp and n2 reached n1's pod only {t_in:?} after meshd started ({back_in:?})"
            ));
        }
        let n = &c.nodes[n1];
        assert_eq!(n.public_key(), key, "after {name}: another WireGuard key");
        assert_eq!(n.subnet(), subnet, "after {name}: another subnet");
        let addrs = in_ns_ok(
            &n.ns,
            &["ip", "-4", "-o", "address", "show", "dev", &n.ifname],
        );
        assert!(
            addrs.contains(&format!("inet {addr}")),
            "after {name}: {addrs}"
        );
        let reg_now = c.registry()["n1"].clone();
        assert_eq!(
            (
                &reg_now["wireguard_public_key"],
                &reg_now["subnet"],
                &reg_now["endpoint"]
            ),
            (
                &reg["wireguard_public_key"],
                &reg["subnet"],
                &reg["endpoint"]
            ),
            "after {name}: the registry changed"
        );
        for &i in &[0, 2] {
            let (_, _, peers) = wg_dump(&c.nodes[i].ns, &c.nodes[i].ifname);
            let p = peers
                .get(&key)
                .unwrap_or_else(|| panic!("{}: n1 not a peer", c.nodes[i].name));
            assert_eq!(p.endpoint, format!("{}:{WG_PORT}", c.nodes[n1].addr));
        }
    }
    eprintln!("test e: {:?}", t_all.elapsed());
    assert!(
        late.is_empty(),
        "the tunnel was not back within {BUDGET:?}: {late:#?}"
    );
}

/// The tunnel MTU a node's meshd must choose on a path of `link_mtu`: interface, subnet.env and
/// conflist agree on `link_mtu - 80`.
fn assert_tunnel_mtu(n: &Node, link_mtu: u32) {
    let link = in_ns_ok(&n.ns, &["ip", "-j", "link", "show", &n.ifname]);
    let link: serde_json::Value = serde_json::from_str(&link).expect("ip -j link");
    let env = std::fs::read_to_string(n.subnet_env()).expect("subnet.env");
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(n.conflist()).expect("conflist"))
            .expect("conflist JSON");
    let mtu = link_mtu - 80;
    assert_eq!(
        (
            link[0]["mtu"].as_u64(),
            env_value(&env, "FLANNEL_MTU"),
            conf["plugins"][0]["mtu"].as_u64()
        ),
        (
            Some(u64::from(mtu)),
            Some(mtu.to_string()),
            Some(u64::from(mtu))
        ),
        "{}: tunnel MTU (interface, subnet.env, conflist) is not its underlay's {link_mtu} - 80",
        n.name
    );
}

/// Runs the transfers at once and checks every byte arrived intact.
fn transfers_intact(c: &Cluster, pairs: &[(&str, &str)], first_port: u16) {
    let handles: Vec<_> = pairs
        .iter()
        .enumerate()
        .map(|(i, (from, to))| {
            let (a, b) = (&c.nodes[c.node(from)], &c.nodes[c.node(to)]);
            let h = transfer(
                &a.pod_ns,
                &b.pod_ns,
                &b.pod_ip(),
                first_port + i as u16,
                payload(TRANSFER_BYTES, 10 + i as u64),
            );
            (format!("{from} -> {to}"), h)
        })
        .collect();
    for (what, h) in handles {
        let (got, sent, received, took) = h.join().expect("transfer");
        assert_eq!(got, TRANSFER_BYTES, "{what}: bytes received");
        assert_eq!(received, sent, "{what}: SHA-256 differs");
        eprintln!(
            "{what}: {TRANSFER_BYTES} bytes in {took:?} ({:.0} Mbit/s), sha256 matches",
            TRANSFER_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
    }
}

/// Underlays of different MTUs: nodes on links of 1500, 1400 and 1280 bytes, and one on a 1500
/// link behind a 1280 hop whose routers send no ICMP (a path MTU black hole). Every node's tunnel
/// MTU follows its own link; full-size pings (Don't Fragment clear) and 12 MiB TCP transfers
/// between pods cross every pair of them, the black-holed path included: meshd sends its
/// encapsulated packets with DF clear, as the kernel's WireGuard does, so the narrow hop
/// fragments them instead of dropping them.
#[test]
fn underlays_with_different_mtus_carry_full_size_packets_without_a_black_hole() {
    let _serial = serial();
    if !prerequisites() {
        return;
    }
    require_tool("nft", "nftables");
    let t_all = Instant::now();
    let mut c = Cluster::new("u");
    let links = [
        ("cp", 1500, None),
        ("n1", 1400, None),
        ("n2", 1280, None),
        ("n3", 1500, Some(1280)),
    ];
    for (name, mtu, wan) in links {
        c.attach
            .insert(name.to_string(), Attach::Routed { mtu, wan });
    }
    c.control_plane();
    for (name, _, _) in &links[1..] {
        c.join(name);
    }
    for idx in 0..c.nodes.len() {
        c.pod(idx);
    }
    // A node's underlay MTU is its link's, or the path MTU towards the control plane when the
    // kernel knows a lower one (n3 learns it during its join: the API's TCP gets the ICMP that
    // WireGuard's UDP does not).
    let cp_addr = c.cp().addr.clone();
    for (name, mtu, wan) in links {
        let n = &c.nodes[c.node(name)];
        let route = in_ns_ok(&n.ns, &["ip", "route", "get", &cp_addr]);
        let path = route
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .and_then(|m| m.parse::<u32>().ok());
        if wan.is_some() {
            eprintln!("{name}: route to the control plane: {}", route.trim());
        }
        assert_tunnel_mtu(n, path.map_or(mtu, |p| p.min(mtu)));
    }
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    until_all_answer(&c.all_pairs(&all), Duration::from_secs(10))
        .unwrap_or_else(|f| panic!("pods without an answer: {f:?}"));

    // Full-size pings from every pod: as large as the sender's pod interface allows, DF clear,
    // so that they need fragmenting wherever the path is narrower (n2's link, n3's 1280 hop).
    let mut failed = Vec::new();
    for a in &all {
        for b in &all {
            if a == b {
                continue;
            }
            let size = (links[*a].1 - 80 - 28).to_string();
            let (from, to) = (&c.nodes[*a], &c.nodes[*b]);
            let out = in_ns(
                &from.pod_ns,
                &[
                    "ping",
                    "-n",
                    "-q",
                    "-M",
                    "dont",
                    "-s",
                    &size,
                    "-c",
                    "2",
                    "-W",
                    "3",
                    &to.pod_ip(),
                ],
            );
            if !out.status.success() {
                failed.push(format!("{} -> {} ({size} bytes)", from.name, to.name));
            }
        }
    }
    assert!(failed.is_empty(), "full-size pings lost: {failed:?}");

    // TCP through each narrow place, both directions on the black-holed path.
    transfers_intact(
        &c,
        &[("cp", "n3"), ("n3", "n1"), ("n1", "n2"), ("n2", "cp")],
        9100,
    );
    eprintln!("test u: {:?}", t_all.elapsed());
}

/// A node behind NAT (nftables masquerade; its own address is unreachable from the others; UDP
/// mappings expire after 3 s) joins with `meshd run --keepalive 2`: its pod reaches every other
/// pod and is reached from them, also after a silence longer than the NAT's timeout; the others
/// learn its endpoint from its packets (the NAT's outside address) and keep it when the registry
/// changes (a later join); its peers carry the keepalive.
#[test]
fn a_node_behind_nat_is_in_the_mesh_with_keepalive() {
    let _serial = serial();
    if !prerequisites() {
        return;
    }
    require_tool("nft", "nftables");
    let t_all = Instant::now();
    let mut c = Cluster::new("t");
    for name in ["cp", "n1", "n3"] {
        c.attach.insert(
            name.to_string(),
            Attach::Routed {
                mtu: UNDERLAY_MTU,
                wan: None,
            },
        );
    }
    c.attach.insert("n2".into(), Attach::Nat);
    c.run_args
        .insert("n2".into(), vec!["--keepalive".into(), "2".into()]);
    c.control_plane();
    c.join("n1");
    c.join("n2");
    for idx in 0..c.nodes.len() {
        c.pod(idx);
    }
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let took = until_all_answer(&c.all_pairs(&all), Duration::from_secs(15))
        .unwrap_or_else(|f| panic!("pods without an answer: {f:?}"));
    eprintln!("every pod answered every pod {took:?} after the NAT'd node started");
    transfers_intact(&c, &[("cp", "n2"), ("n2", "n1")], 9200);

    let n2_key = c.nodes[c.node("n2")].public_key();
    let registry = c.registry();
    assert_eq!(
        registry["n2"]["endpoint"].as_str(),
        Some(format!("192.168.2.2:{WG_PORT}").as_str()),
        "the NAT'd node registers its own (private) address: {}",
        registry["n2"]
    );
    let check_learned = |c: &Cluster, names: &[&str]| {
        for name in names {
            let n = &c.nodes[c.node(name)];
            let (_, _, peers) = wg_dump(&n.ns, &n.ifname);
            let p = &peers[&n2_key];
            assert!(
                p.endpoint.starts_with("10.216.2.2:"),
                "{name}: the endpoint of the NAT'd node is {} (not its NAT's outside address)",
                p.endpoint
            );
            assert_eq!(p.keepalive, "off", "{name} -> n2: {p:?}");
        }
    };
    check_learned(&c, &["cp", "n1"]);
    let n2 = &c.nodes[c.node("n2")];
    let (_, _, peers) = wg_dump(&n2.ns, &n2.ifname);
    assert_eq!(peers.len(), 2, "{peers:?}");
    for p in peers.values() {
        assert_eq!(p.keepalive, "2", "n2's peers: {p:?}");
    }

    // Silence longer than the NAT's UDP timeout: only the keepalive keeps the mapping, so that
    // the others can still reach the NAT'd node first.
    std::thread::sleep(Duration::from_secs(7));
    let inbound: Vec<(String, String)> = ["cp", "n1"]
        .iter()
        .map(|n| {
            (
                c.nodes[c.node(n)].pod_ns.clone(),
                c.nodes[c.node("n2")].pod_ip(),
            )
        })
        .collect();
    let res = ping_all(&inbound, "2");
    assert!(
        res.iter().all(|&ok| ok),
        "after 7 s of silence the NAT'd node is unreachable: {inbound:?} -> {res:?}"
    );

    // A later join changes the registry: the endpoints learned from the NAT'd node stay, and the
    // new node reaches it as soon as the NAT'd node greets it.
    c.join("n3");
    let n3 = c.node("n3");
    c.pod(n3);
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    until_all_answer(&c.all_pairs(&all), Duration::from_secs(15))
        .unwrap_or_else(|f| panic!("pods without an answer after n3 joined: {f:?}"));
    check_learned(&c, &["cp", "n1", "n3"]);
    eprintln!("test t: {:?}", t_all.elapsed());
}
