//! [`Device`]: a userspace WireGuard device on a TUN interface, with meshd's UAPI server in front
//! of it. Two data paths ([`WgEngine`]): meshd's own ([`super::fast`], the default: TUN and UDP
//! offloads around boringtun's `noise::Tunn`, configured in process by `Core`), or boringtun 0.7's
//! device loop (`DeviceHandle`), driven over its UAPI as described below.
//!
//! # Layout
//!
//! ```text
//!  wg(8), Uapi ──▶ /var/run/wireguard/<if>.sock ──▶ server thread ─┐
//!  Device::get/set (in process) ───────────────────────────────────┼─▶ Core ──socketpair──▶ boringtun
//!                                                                   │   (translates,      DeviceHandle
//!                                                                   │    serializes)      (n threads,
//!                                                                   │                      TUN + UDP)
//! ```
//!
//! boringtun is started with `DeviceConfig::uapi_fd` set to one end of a socket pair, so it does
//! not open its own UAPI socket; meshd's server owns the well-known path and forwards each request
//! through `Core` (private), which fixes what boringtun 0.7 gets wrong:
//!
//! * **Updating an existing peer** (`set` with a known `public_key`) hits a `panic!` in boringtun
//!   *while it holds its device write intent*: every device thread then blocks forever
//!   (cloudflare/boringtun#209). Core never sends that: an update that changes nothing is dropped
//!   (the session survives), one that changes something is sent as remove + add of the merged
//!   configuration (that peer's session and counters restart; boringtun cannot do better).
//! * **Several peers in one `set`**: boringtun's parser resets only the allowed IPs between peer
//!   sections, so `remove=true`, the endpoint, the keepalive and the preshared key of one peer
//!   leak into the next. Core sends one request per peer operation.
//! * **Handshake times**: boringtun reports the time *since* the last handshake where the protocol
//!   wants a Unix time, so `wg show` prints "55 years ago" (cloudflare/boringtun#447). Core
//!   converts.
//! * **Own key**: boringtun answers `own_public_key`, which `wg` ignores; Core answers the
//!   standard `private_key` (the socket is 0600, as wireguard-go's).
//! * **Peers before a key** panic boringtun; Device sets its key before anything else, and Core
//!   refuses peers while no key is set (`ENOKEY`).
//! * An allowed IP may sit on one peer only (as in the kernel): giving it to a peer takes it from
//!   the peer that had it.
//! * **Listen port changes leak** the previous UDP sockets in boringtun 0.7 (it registers a
//!   duplicate descriptor with its event loop and then unregisters the original, so the old
//!   sockets stay bound and polled). Device keeps boringtun's initial random port when
//!   [`DeviceConfig::listen_port`] is 0, and otherwise changes it once at start (leaking that
//!   one pair); avoid changing the port of a running device.
//! * boringtun stops reading a `set` at its first error and would answer the rest of the request
//!   later, desynchronising the stream: Core validates everything first, sends the listen port
//!   on its own after checking it can be bound, and drains stray answers after any error.
//!
//! In this mode boringtun installs no SIGINT/SIGTERM handler (it would otherwise take those
//! signals from the embedding daemon) and reads the interface MTU once, at start: see
//! [`DeviceConfig::mtu`].
//!
//! boringtun's per-peer *connected* UDP sockets are disabled: all traffic uses the listen sockets,
//! whose buffers [`super::sockbuf`] enlarges (SO_RCVBUF/SO_SNDBUF) and which send with Don't
//! Fragment clear, as the kernel's WireGuard does (no PMTU black hole on the underlay).

use std::collections::BTreeMap;
use std::io::{BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::IntoRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use zeroize::Zeroizing;

use super::fast;
use super::key::{PresharedKey, PrivateKey, PublicKey};
use super::sockbuf::{self, BufferReport};
use super::uapi::{self, DeviceInfo, DeviceUpdate, EADDRINUSE, EINVAL, EIO, ENOKEY, EPROTO};
use super::WgError;
use crate::link::{self, Ip};

/// Default size asked for the UDP socket buffers: 8 MiB each way.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;

/// How long Core waits for boringtun's answer, and the server for a client's request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a [`Device`].
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The device's private key (set before the device accepts any packet or peer).
    pub private_key: PrivateKey,
    /// UDP port (0: a random one). Default 51820.
    pub listen_port: u16,
    /// Interface MTU to set before boringtun opens the interface. boringtun (in the mode used
    /// here) reads the MTU once, at start, and never reads a larger packet from the interface:
    /// the MTU may be lowered later, but raising it above this value would truncate packets.
    /// `None`: the TUN default, 1500.
    pub mtu: Option<u32>,
    /// boringtun worker threads (each with its own TUN queue). Default 1: with more, packets of
    /// one flow decrypted by different threads reach the interface out of order and TCP takes
    /// the reordering for loss (on a 2-vCPU machine, 1 thread gave ~0.70 Gbit/s, 2 threads
    /// ~0.55, 4 threads ~0.55, with 2-4x the retransmits). More threads can pay off with many
    /// peers on many cores.
    pub threads: usize,
    /// Size asked for SO_RCVBUF and SO_SNDBUF of the UDP sockets (0: leave the kernel default).
    /// Default [`DEFAULT_SOCKET_BUFFER`].
    pub socket_buffer_bytes: usize,
    /// Which data path runs the device. Default [`WgEngine::DEFAULT`].
    pub engine: WgEngine,
}

/// The data path of a [`Device`]. Both speak the same protocol, behind the same UAPI server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgEngine {
    /// boringtun 0.7's own device loop (`DeviceHandle`): one packet per system call each way.
    Boringtun,
    /// meshd's data path around boringtun's `noise::Tunn` ([`super::fast`]): TUN with TCP
    /// segmentation offload, UDP GSO/GRO, coalescing on receive. `threads` does not apply
    /// (one data thread).
    Fast,
}

impl WgEngine {
    /// The engine used unless told otherwise.
    pub const DEFAULT: WgEngine = WgEngine::Fast;
}

impl std::str::FromStr for WgEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "boringtun" => Ok(WgEngine::Boringtun),
            "fast" => Ok(WgEngine::Fast),
            _ => Err(format!(
                "unknown WireGuard engine {s:?} (boringtun or fast)"
            )),
        }
    }
}

impl std::fmt::Display for WgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WgEngine::Boringtun => "boringtun",
            WgEngine::Fast => "fast",
        })
    }
}

impl DeviceConfig {
    /// The defaults, with this key.
    pub fn new(private_key: PrivateKey) -> Self {
        DeviceConfig {
            private_key,
            listen_port: 51820,
            mtu: None,
            threads: 1,
            socket_buffer_bytes: DEFAULT_SOCKET_BUFFER,
            engine: WgEngine::DEFAULT,
        }
    }
}

/// A running userspace WireGuard device: a TUN interface, its UDP socket(s), and its UAPI socket
/// `/var/run/wireguard/<name>.sock`. Dropping it stops the device, removes the interface and
/// the socket.
///
/// The interface is created in the network namespace of the calling thread; it is down, without
/// address or route: use [`crate::link::Ip`] for those.
///
/// All methods block (process spawns, socket I/O with a 10 s limit): from async code, call them
/// on a blocking thread (`tokio::task::spawn_blocking`).
pub struct Device {
    name: String,
    socket_path: PathBuf,
    /// Inode of the socket we created, so that drop never removes another daemon's socket.
    socket_ino: Option<u64>,
    core: Arc<Core>,
    listener: Option<UnixListener>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    handle: Option<boringtun::device::DeviceHandle>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Creates the TUN interface `name`, starts boringtun on it with `cfg.threads` threads, sets
    /// the private key and listen port, enlarges the UDP buffers, and serves UAPI on
    /// `/var/run/wireguard/<name>.sock`.
    ///
    /// Fails if the interface already exists here, or if another live device answers on that
    /// socket path (the directory is shared by every network namespace of the machine).
    pub fn start(name: &str, cfg: DeviceConfig) -> Result<Device, WgError> {
        link::validate_ifname(name)?;
        if cfg.threads == 0 {
            return Err(WgError::Device {
                name: name.into(),
                message: "threads must be at least 1".into(),
            });
        }
        let socket_path = uapi::socket_path(name);
        if UnixStream::connect(&socket_path).is_ok() {
            return Err(WgError::SocketInUse { path: socket_path });
        }
        let ip = Ip::new();
        if ip.link_exists(name)? {
            return Err(WgError::InterfaceExists(name.into()));
        }
        let dev_err = |message: String| WgError::Device {
            name: name.into(),
            message,
        };

        let (backend, handle) = match cfg.engine {
            WgEngine::Boringtun => {
                // A first queue of the (multi-queue) TUN interface, so that its MTU can be set
                // before boringtun opens it and reads the MTU. Closed once boringtun holds its
                // own queues.
                let holder = boringtun::device::tun::TunSocket::new(name)
                    .map_err(|e| dev_err(format!("creating the TUN interface: {e}")))?;
                if let Some(mtu) = cfg.mtu {
                    ip.set_mtu(name, mtu)?;
                }
                let (ours, theirs) = UnixStream::pair().map_err(|source| WgError::Io {
                    path: socket_path.clone(),
                    source,
                })?;
                let bcfg = boringtun::device::DeviceConfig {
                    n_threads: cfg.threads,
                    use_connected_socket: false,
                    use_multi_queue: true,
                    // boringtun takes ownership of this descriptor (and closes it when it stops).
                    uapi_fd: theirs.into_raw_fd(),
                };
                let handle = boringtun::device::DeviceHandle::new(name, bcfg)
                    .map_err(|e| dev_err(format!("starting boringtun: {e}")))?;
                drop(holder);
                let backend = BtBackend::new(ours).map_err(|source| WgError::Io {
                    path: socket_path.clone(),
                    source,
                })?;
                (Backend::Boringtun(backend), Some(handle))
            }
            WgEngine::Fast => {
                let engine = fast::Engine::start(name, cfg.listen_port, cfg.socket_buffer_bytes)
                    .map_err(|e| {
                        dev_err(format!(
                            "starting the fast data path (TUN with offloads, UDP GSO/GRO): {e}; \
                             the boringtun engine needs less of the kernel"
                        ))
                    })?;
                if let Some(mtu) = cfg.mtu {
                    ip.set_mtu(name, mtu)?;
                }
                (Backend::Fast(Some(engine)), None)
            }
        };
        let core = Arc::new(Core::new(backend, cfg.socket_buffer_bytes));
        // From here on, Drop cleans up whatever was started.
        let mut dev = Device {
            name: name.into(),
            socket_path,
            socket_ino: None,
            core,
            listener: None,
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
            handle,
        };
        // The key first: boringtun panics on packets or peers before it has one.
        dev.set(&DeviceUpdate {
            private_key: Some(cfg.private_key),
            ..Default::default()
        })?;
        if cfg.listen_port != 0 && cfg.engine == WgEngine::Boringtun {
            dev.set(&DeviceUpdate {
                listen_port: Some(cfg.listen_port),
                ..Default::default()
            })?;
        }
        dev.core.tune_buffers();

        let listener = bind_socket(&dev.socket_path)?;
        dev.socket_ino = std::fs::metadata(&dev.socket_path).ok().map(|m| m.ino());
        let accept = listener.try_clone().map_err(|source| WgError::Io {
            path: dev.socket_path.clone(),
            source,
        })?;
        dev.listener = Some(listener);
        let (core, stop) = (dev.core.clone(), dev.stop.clone());
        dev.server = Some(
            std::thread::Builder::new()
                .name(format!("uapi-{name}"))
                .spawn(move || serve(accept, &core, &stop))
                .map_err(|e| dev_err(format!("starting the UAPI thread: {e}")))?,
        );
        Ok(dev)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UAPI socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The device's public key.
    pub fn public_key(&self) -> Result<PublicKey, WgError> {
        self.get()?.public_key.ok_or(WgError::Errno {
            op: "get",
            errno: ENOKEY,
        })
    }

    /// The device's state, as `get=1` over the socket would answer it (without the socket).
    pub fn get(&self) -> Result<DeviceInfo, WgError> {
        self.core
            .get()
            .map_err(|errno| WgError::Errno { op: "get", errno })
    }

    /// Applies a change, as `set=1` over the socket would (without the socket).
    pub fn set(&self, update: &DeviceUpdate) -> Result<(), WgError> {
        self.core
            .set(update)
            .map_err(|errno| WgError::Errno { op: "set", errno })
    }

    /// The UDP sockets found at the last buffer sizing and their buffer sizes.
    pub fn socket_buffers(&self) -> Option<BufferReport> {
        self.core.report.lock().ok().and_then(|r| r.clone())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the server's accept() (Linux returns EINVAL from accept on a shut-down socket).
        if let Some(l) = &self.listener {
            let _ = rustix::net::shutdown(l, rustix::net::Shutdown::Both);
        }
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        if let Some(ino) = self.socket_ino {
            if std::fs::metadata(&self.socket_path).map(|m| m.ino()).ok() == Some(ino) {
                let _ = std::fs::remove_file(&self.socket_path);
            }
        }
        // End of stream on boringtun's UAPI descriptor makes every boringtun thread exit.
        self.core.shutdown();
        if let Some(mut handle) = self.handle.take() {
            // Joined on a helper thread with a deadline: a wedged boringtun must not hang the
            // caller's drop. Dropping the handle then closes the TUN queues (the interface goes).
            let (tx, rx) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("wg-stop".into())
                .spawn(move || {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handle.wait();
                        drop(handle);
                    }));
                    let _ = tx.send(());
                });
            if spawned.is_ok() {
                let _ = rx.recv_timeout(Duration::from_secs(5));
            }
        }
    }
}

/// Binds the UAPI socket at `path`, 0600, without a window in which it is reachable with other
/// permissions: bound in a private 0700 directory, then renamed into place.
fn bind_socket(path: &Path) -> Result<UnixListener, WgError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| WgError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new(uapi::SOCKET_DIR));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io(dir))?;
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("wg");
    let tmp_dir = dir.join(format!(".{file}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(io(&tmp_dir))?;
    let tmp = tmp_dir.join("sock");
    let result = (|| {
        let l = UnixListener::bind(&tmp).map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp_dir);
    result
}

/// Serves UAPI connections until `stop`.
fn serve(listener: UnixListener, core: &Core, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(s) => serve_connection(core, s),
            // E.g. EMFILE: do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Answers the requests of one connection (several may follow each other), until it closes.
fn serve_connection(core: &Core, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    loop {
        let Ok(Some(cmd)) = uapi::read_line(&mut reader) else {
            return;
        };
        let is_get = match cmd.as_str() {
            "get=1" => true,
            "set=1" => false,
            "" => continue,
            _ => {
                let _ = writer.write_all(format!("errno={EINVAL}\n\n").as_bytes());
                return;
            }
        };
        // The request's lines, up to the empty line.
        let mut body = Zeroizing::new(String::new());
        loop {
            match uapi::read_line(&mut reader) {
                Ok(Some(l)) if l.is_empty() => break,
                Ok(Some(l)) if body.len() + l.len() < uapi::MAX_MESSAGE => {
                    body.push_str(&l);
                    body.push('\n');
                }
                // Too large, cut short, or timed out: the framing is lost.
                _ => {
                    let _ = writer.write_all(format!("errno={EPROTO}\n\n").as_bytes());
                    return;
                }
            }
        }
        let answer = if is_get {
            if !body.is_empty() {
                Zeroizing::new(format!("errno={EINVAL}\n\n"))
            } else {
                match core.get_with_key() {
                    Ok((info, key)) => {
                        let mut a = uapi::format_device_info(&info, key.as_ref());
                        a.push_str("errno=0\n\n");
                        a
                    }
                    Err(errno) => Zeroizing::new(format!("errno={errno}\n\n")),
                }
            }
        } else {
            let errno = match uapi::parse_device_update(&body) {
                Err(WgError::Protocol(m)) if m.contains("not key=value") => EPROTO,
                Err(_) => EINVAL,
                Ok(u) => core.set(&u).err().unwrap_or(0),
            };
            Zeroizing::new(format!("errno={errno}\n\n"))
        };
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The configuration part of a peer (what `set` controls), normalised for comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerConfig {
    pub(crate) preshared_key: Option<PresharedKey>,
    pub(crate) endpoint: Option<SocketAddr>,
    /// Network addresses (host bits cleared), sorted, without duplicates.
    pub(crate) allowed_ips: Vec<IpNet>,
    pub(crate) keepalive: u16,
}

fn normalise(ips: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = ips.into_iter().map(|n| n.trunc()).collect();
    v.sort();
    v.dedup();
    v
}

/// What to send to boringtun for one `set` request's peer part.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerPlan {
    pub(crate) replace_peers: bool,
    /// Peers to remove (including those re-added below with a changed configuration).
    pub(crate) remove: Vec<PublicKey>,
    /// Peers to add, with their whole configuration.
    pub(crate) add: Vec<(PublicKey, PeerConfig)>,
}

impl PeerPlan {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        !self.replace_peers && self.remove.is_empty() && self.add.is_empty()
    }

    /// The `set=1` requests for boringtun, one per operation: boringtun cannot update a peer in
    /// place, and within one request it carries `remove`, `endpoint`, keepalive and preshared key
    /// over from one peer section to the next (its parser resets only the allowed IPs).
    fn requests(&self) -> Vec<Zeroizing<String>> {
        use std::fmt::Write as _;
        let mut out = Vec::new();
        if self.replace_peers {
            out.push(Zeroizing::new("set=1\nreplace_peers=true\n\n".to_string()));
        }
        for k in &self.remove {
            out.push(Zeroizing::new(format!(
                "set=1\npublic_key={}\nremove=true\n\n",
                k.to_hex()
            )));
        }
        for (k, c) in &self.add {
            let mut s = Zeroizing::new(String::from("set=1\n"));
            let _ = writeln!(s, "public_key={}", k.to_hex());
            if let Some(psk) = &c.preshared_key {
                let _ = writeln!(s, "preshared_key={}", psk.to_hex().as_str());
            }
            if let Some(e) = c.endpoint {
                let _ = writeln!(s, "endpoint={e}");
            }
            if c.keepalive != 0 {
                let _ = writeln!(s, "persistent_keepalive_interval={}", c.keepalive);
            }
            for a in &c.allowed_ips {
                let _ = writeln!(s, "allowed_ip={a}");
            }
            s.push('\n');
            out.push(s);
        }
        out
    }
}

/// Plans the peer part of `update` against the current peers (pure). Semantics as the kernel's:
/// unknown peers are added (unless `update_only`), known peers updated (fields not given keep
/// their value; allowed IPs are added to unless `replace_allowed_ips`), removals of unknown peers
/// are ignored, a peer with the device's own key is ignored, and an allowed IP given to a peer is
/// taken from any other peer. Peers whose configuration does not change are not touched.
pub(crate) fn plan_peers(
    current: &BTreeMap<PublicKey, PeerConfig>,
    own: Option<PublicKey>,
    update: &DeviceUpdate,
) -> PeerPlan {
    let mut next = if update.replace_peers {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for p in &update.peers {
        if Some(p.public_key) == own {
            continue;
        }
        if p.remove {
            next.remove(&p.public_key);
            continue;
        }
        let merged = match next.get(&p.public_key) {
            None if p.update_only => continue,
            None => PeerConfig {
                preshared_key: p.preshared_key.clone().filter(|k| !k.is_zero()),
                endpoint: p.endpoint,
                allowed_ips: normalise(p.allowed_ips.iter().copied()),
                keepalive: p.persistent_keepalive_interval.unwrap_or(0),
            },
            Some(cur) => PeerConfig {
                preshared_key: match &p.preshared_key {
                    Some(k) if k.is_zero() => None,
                    Some(k) => Some(k.clone()),
                    None => cur.preshared_key.clone(),
                },
                endpoint: p.endpoint.or(cur.endpoint),
                allowed_ips: if p.replace_allowed_ips {
                    normalise(p.allowed_ips.iter().copied())
                } else {
                    normalise(cur.allowed_ips.iter().chain(&p.allowed_ips).copied())
                },
                keepalive: p.persistent_keepalive_interval.unwrap_or(cur.keepalive),
            },
        };
        // One peer per allowed IP: take this peer's IPs from the others.
        for (k, other) in next.iter_mut() {
            if *k != p.public_key {
                other
                    .allowed_ips
                    .retain(|a| !merged.allowed_ips.contains(a));
            }
        }
        next.insert(p.public_key, merged);
    }
    let mut plan = PeerPlan {
        replace_peers: update.replace_peers,
        ..Default::default()
    };
    let base = if update.replace_peers {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for (k, old) in &base {
        match next.get(k) {
            None => plan.remove.push(*k),
            Some(new) if new != old => {
                plan.remove.push(*k);
                plan.add.push((*k, new.clone()));
            }
            Some(_) => {}
        }
    }
    for (k, new) in &next {
        if !base.contains_key(k) {
            plan.add.push((*k, new.clone()));
        }
    }
    plan
}

/// What Core drives: boringtun's device over its UAPI descriptor, or the fast engine in process.
enum Backend {
    Boringtun(BtBackend),
    /// `None` once shut down.
    Fast(Option<fast::Engine>),
}

impl Backend {
    fn get(&mut self) -> Result<DeviceInfo, i32> {
        match self {
            Backend::Boringtun(b) => b.get(),
            Backend::Fast(Some(e)) => e.get(),
            Backend::Fast(None) => Err(EIO),
        }
    }

    fn set(&mut self, u: &DeviceUpdate) -> Result<Option<u16>, i32> {
        match self {
            Backend::Boringtun(b) => b.set(u),
            Backend::Fast(Some(e)) => {
                if let Some(port) = u.listen_port {
                    if port != 0 && !port_is_free(port) && e.get()?.listen_port != port {
                        return Err(EADDRINUSE);
                    }
                }
                e.set(u)
            }
            Backend::Fast(None) => Err(EIO),
        }
    }

    fn private_key(&self) -> Option<PrivateKey> {
        match self {
            Backend::Boringtun(b) => b.private_key.clone(),
            Backend::Fast(Some(e)) => e.private_key(),
            Backend::Fast(None) => None,
        }
    }

    fn shutdown(&mut self) {
        match self {
            // End of stream on boringtun's UAPI descriptor makes every boringtun thread exit.
            Backend::Boringtun(b) => {
                let _ = b.writer.shutdown(std::net::Shutdown::Both);
            }
            // Stops the data thread and closes the TUN and the sockets.
            Backend::Fast(e) => drop(e.take()),
        }
    }
}

/// The connection to boringtun's UAPI descriptor, and what boringtun does not keep for us.
struct BtBackend {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    private_key: Option<PrivateKey>,
    /// The stream lost its framing (timeout, garbage): every request now fails with EIO.
    broken: bool,
}

impl BtBackend {
    fn new(stream: UnixStream) -> std::io::Result<BtBackend> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(BtBackend {
            writer: stream,
            reader,
            private_key: None,
            broken: false,
        })
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Zeroizing<String>, i32> {
        if self.broken {
            return Err(EIO);
        }
        let result = self
            .writer
            .write_all(request)
            .and_then(|()| uapi::read_answer(&mut self.reader));
        match result {
            Ok((body, 0)) => Ok(body),
            Ok((_, errno)) => {
                self.drain();
                Err(errno)
            }
            Err(_) => {
                self.broken = true;
                Err(EIO)
            }
        }
    }

    /// After boringtun refused a request, the unread rest of it may produce stray answers:
    /// discard whatever arrives within a short while.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        let _ = self
            .writer
            .set_read_timeout(Some(Duration::from_millis(100)));
        let mut junk = self.reader.buffer().len();
        loop {
            match self.reader.get_mut().read(&mut buf) {
                Ok(0) => {
                    self.broken = true;
                    break;
                }
                Ok(n) => junk += n,
                Err(_) => break,
            }
        }
        let _ = self.writer.set_read_timeout(Some(IO_TIMEOUT));
        if junk > 0 {
            // Data sitting in the BufReader is also stale.
            match self.writer.try_clone() {
                Ok(s) => self.reader = BufReader::new(s),
                Err(_) => self.broken = true,
            }
        }
    }

    /// boringtun's state, with handshake times converted to Unix times.
    fn get(&mut self) -> Result<DeviceInfo, i32> {
        // Without the empty line the protocol asks for: boringtun does not read it, and on this
        // long-lived stream it would be taken for the next (invalid) request.
        let body = self.exchange(b"get=1\n")?;
        let mut info = uapi::parse_device_info(&body).map_err(|_| {
            self.broken = true;
            EIO
        })?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        for p in &mut info.peers {
            if p.last_handshake_time_sec == 0 && p.last_handshake_time_nsec == 0 {
                continue;
            }
            // boringtun's value is the time since the handshake (boringtun#447).
            let since = Duration::new(p.last_handshake_time_sec, p.last_handshake_time_nsec);
            let at = now.saturating_sub(since);
            p.last_handshake_time_sec = at.as_secs();
            p.last_handshake_time_nsec = at.subsec_nanos();
        }
        Ok(info)
    }

    fn set(&mut self, u: &DeviceUpdate) -> Result<Option<u16>, i32> {
        let mut new_port = None;
        if let Some(k) = &u.private_key {
            if k.expose_bytes().iter().all(|b| *b == 0) {
                // "Remove the private key": boringtun cannot run without one.
                return Err(EINVAL);
            }
            let changed = self
                .private_key
                .as_ref()
                .is_none_or(|cur| cur.public_key() != k.public_key());
            if changed {
                let mut req = Zeroizing::new(String::from("set=1\nprivate_key="));
                req.push_str(&k.to_hex());
                req.push_str("\n\n");
                self.exchange(req.as_bytes())?;
                self.private_key = Some(k.clone());
            }
        }
        if let Some(port) = u.listen_port {
            let current = self.get()?.listen_port;
            if port == 0 || port != current {
                if port != 0 && !port_is_free(port) {
                    return Err(EADDRINUSE);
                }
                self.exchange(format!("set=1\nlisten_port={port}\n\n").as_bytes())?;
                new_port = Some(self.get()?.listen_port);
            }
        }
        if let Some(mark) = u.fwmark {
            self.exchange(format!("set=1\nfwmark={mark}\n\n").as_bytes())?;
        }
        if u.replace_peers || !u.peers.is_empty() {
            let own = self.private_key.as_ref().map(PrivateKey::public_key);
            let current: BTreeMap<PublicKey, PeerConfig> = self
                .get()?
                .peers
                .into_iter()
                .map(|p| {
                    (
                        p.public_key,
                        PeerConfig {
                            preshared_key: p.preshared_key,
                            endpoint: p.endpoint,
                            allowed_ips: normalise(p.allowed_ips),
                            keepalive: p.persistent_keepalive_interval,
                        },
                    )
                })
                .collect();
            let plan = plan_peers(&current, own, u);
            if !plan.add.is_empty() && own.is_none() {
                return Err(ENOKEY);
            }
            for req in plan.requests() {
                self.exchange(req.as_bytes())?;
            }
        }
        Ok(new_port)
    }
}

/// Whether nothing holds this UDP port (bound without SO_REUSEADDR, so that any holder conflicts).
fn port_is_free(port: u16) -> bool {
    std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Serializes access to boringtun and holds what the server and in-process callers share.
struct Core {
    backend: Mutex<Backend>,
    buffer_bytes: usize,
    report: Mutex<Option<BufferReport>>,
}

impl Core {
    fn new(backend: Backend, buffer_bytes: usize) -> Core {
        Core {
            backend: Mutex::new(backend),
            buffer_bytes,
            report: Mutex::new(None),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Backend>, i32> {
        // A panic while holding the lock leaves the stream in an unknown state.
        self.backend.lock().map_err(|_| EIO)
    }

    fn get(&self) -> Result<DeviceInfo, i32> {
        self.lock()?.get()
    }

    fn get_with_key(&self) -> Result<(DeviceInfo, Option<PrivateKey>), i32> {
        let mut b = self.lock()?;
        let info = b.get()?;
        Ok((info, b.private_key()))
    }

    fn set(&self, u: &DeviceUpdate) -> Result<(), i32> {
        let new_port = self.lock()?.set(u)?;
        if new_port.is_some() {
            self.tune_buffers();
        }
        Ok(())
    }

    /// Sizes the buffers of the UDP sockets on the current listen port (unless asked not to) and
    /// clears Don't Fragment on them (see [`sockbuf`]).
    fn tune_buffers(&self) {
        let Ok(info) = self.get() else { return };
        let report = sockbuf::tune(info.listen_port, self.buffer_bytes).ok();
        if let Ok(mut r) = self.report.lock() {
            *r = report;
        }
    }

    fn shutdown(&self) {
        let mut b = match self.backend.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        b.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::uapi::PeerUpdate;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn cfg(ips: &[&str], endpoint: Option<&str>, keepalive: u16) -> PeerConfig {
        PeerConfig {
            preshared_key: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: normalise(ips.iter().map(|i| i.parse().unwrap())),
            keepalive,
        }
    }

    fn update(peers: Vec<PeerUpdate>) -> DeviceUpdate {
        DeviceUpdate {
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn unchanged_peers_are_not_touched() {
        let cur = BTreeMap::from([(key(1), cfg(&["10.0.1.0/24"], Some("1.2.3.4:51820"), 0))]);
        // Same endpoint and IPs, given again.
        let u = update(vec![PeerUpdate {
            endpoint: Some("1.2.3.4:51820".parse().unwrap()),
            replace_allowed_ips: true,
            allowed_ips: vec!["10.0.1.7/24".parse().unwrap()],
            ..PeerUpdate::upsert(key(1))
        }]);
        assert!(plan_peers(&cur, None, &u).is_empty());
        // Nothing given at all.
        assert!(plan_peers(&cur, None, &update(vec![PeerUpdate::upsert(key(1))])).is_empty());
    }

    #[test]
    fn changed_peer_is_removed_and_re_added_merged() {
        let cur = BTreeMap::from([(key(1), cfg(&["10.0.1.0/24"], Some("1.2.3.4:51820"), 0))]);
        let u = update(vec![PeerUpdate {
            persistent_keepalive_interval: Some(25),
            allowed_ips: vec!["10.0.9.0/24".parse().unwrap()],
            ..PeerUpdate::upsert(key(1))
        }]);
        let plan = plan_peers(&cur, None, &u);
        assert_eq!(plan.remove, vec![key(1)]);
        assert_eq!(
            plan.add,
            vec![(
                key(1),
                cfg(&["10.0.1.0/24", "10.0.9.0/24"], Some("1.2.3.4:51820"), 25)
            )]
        );
        let reqs = plan.requests();
        let k = key(1).to_hex();
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            reqs[0].as_str(),
            format!("set=1\npublic_key={k}\nremove=true\n\n")
        );
        assert_eq!(
            reqs[1].as_str(),
            format!(
                "set=1\npublic_key={k}\nendpoint=1.2.3.4:51820\n\
                 persistent_keepalive_interval=25\nallowed_ip=10.0.1.0/24\nallowed_ip=10.0.9.0/24\n\n"
            )
        );
    }

    #[test]
    fn add_remove_update_only_and_own_key() {
        let cur = BTreeMap::from([(key(1), cfg(&["10.0.1.0/24"], None, 0))]);
        let u = update(vec![
            PeerUpdate::remove(key(1)),
            PeerUpdate::remove(key(7)), // unknown: ignored
            PeerUpdate {
                update_only: true,
                ..PeerUpdate::upsert(key(2))
            },
            PeerUpdate {
                allowed_ips: vec!["10.0.3.0/24".parse().unwrap()],
                ..PeerUpdate::upsert(key(3))
            },
            PeerUpdate::upsert(key(9)), // our own key
        ]);
        let plan = plan_peers(&cur, Some(key(9)), &u);
        assert_eq!(plan.remove, vec![key(1)]);
        assert_eq!(plan.add, vec![(key(3), cfg(&["10.0.3.0/24"], None, 0))]);
    }

    #[test]
    fn allowed_ip_moves_between_peers() {
        let cur = BTreeMap::from([
            (key(1), cfg(&["10.0.1.0/24", "10.0.5.0/24"], None, 0)),
            (key(2), cfg(&["10.0.2.0/24"], None, 0)),
            (key(3), cfg(&["10.0.3.0/24"], None, 0)),
        ]);
        let u = update(vec![PeerUpdate {
            allowed_ips: vec!["10.0.5.0/24".parse().unwrap()],
            ..PeerUpdate::upsert(key(2))
        }]);
        let plan = plan_peers(&cur, None, &u);
        assert_eq!(plan.remove, vec![key(1), key(2)]);
        assert_eq!(
            plan.add,
            vec![
                (key(1), cfg(&["10.0.1.0/24"], None, 0)),
                (key(2), cfg(&["10.0.2.0/24", "10.0.5.0/24"], None, 0)),
            ]
        );
    }

    #[test]
    fn replace_peers_re_adds_everything_given() {
        let cur = BTreeMap::from([(key(1), cfg(&["10.0.1.0/24"], None, 0))]);
        let u = DeviceUpdate {
            replace_peers: true,
            peers: vec![PeerUpdate {
                allowed_ips: vec!["10.0.1.0/24".parse().unwrap()],
                ..PeerUpdate::upsert(key(1))
            }],
            ..Default::default()
        };
        let plan = plan_peers(&cur, None, &u);
        assert!(plan.replace_peers);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.add, vec![(key(1), cfg(&["10.0.1.0/24"], None, 0))]);
    }

    #[test]
    fn preshared_key_zero_removes_it() {
        let psk = PresharedKey::from_bytes(Zeroizing::new([7; 32]));
        let mut c = cfg(&[], None, 0);
        c.preshared_key = Some(psk.clone());
        let cur = BTreeMap::from([(key(1), c)]);
        let keep = update(vec![PeerUpdate::upsert(key(1))]);
        assert!(plan_peers(&cur, None, &keep).is_empty());
        let clear = update(vec![PeerUpdate {
            preshared_key: Some(PresharedKey::from_bytes(Zeroizing::new([0; 32]))),
            ..PeerUpdate::upsert(key(1))
        }]);
        let plan = plan_peers(&cur, None, &clear);
        assert_eq!(plan.add, vec![(key(1), cfg(&[], None, 0))]);
    }
}
