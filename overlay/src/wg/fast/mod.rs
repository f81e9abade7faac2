//! meshd's own WireGuard data path around boringtun's protocol state machine
//! ([`boringtun::noise::Tunn`]), instead of boringtun's device loop: the `fast` engine of
//! [`super::Device`].
//!
//! One data thread per device owns the descriptors and does, per wake-up:
//!
//! * **TUN → network**: one `read` from a TUN opened with `IFF_VNET_HDR` and TCP segmentation
//!   offload returns a TCP super-packet of up to 64 KiB; [`offload::split`] cuts it into
//!   MTU-sized segments (fixing IP/TCP headers and checksums), each is encrypted by the peer's
//!   `Tunn` (chosen by allowed IPs), and the datagrams leave in one `sendmsg` with `UDP_SEGMENT`
//!   (UDP GSO).
//! * **network → TUN**: one `recvmsg` on a socket with `UDP_GRO` returns many datagrams of one
//!   sender; each is decrypted (the peer found by its receiver index, or for a handshake
//!   initiation by its static key), checked against the peer's allowed IPs, and consecutive
//!   in-order TCP segments of a flow are coalesced ([`offload::Gro`]) into one super-packet
//!   written to the TUN with a GSO virtio header.
//! * **timers**: every 250 ms each peer's `update_timers` (handshake retries, rekey, keepalive,
//!   session expiry); every second the handshake rate limiter is reset.
//!
//! Configuration ([`Engine::get`], [`Engine::set`], from meshd's UAPI server) shares the state
//! with the data thread through one mutex, taken by the data thread per batch. Semantics are the
//! kernel's, as planned by [`super::device::plan_peers`], applied in place: a peer whose
//! configuration does not change keeps its session; changing endpoint or allowed IPs keeps it
//! too; only a new preshared key or keepalive interval restarts that peer's session. The
//! endpoint follows the source of the last authenticated packet (roaming).

pub mod offload;
mod sys;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::device::allowed_ips::AllowedIps;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::device::{plan_peers, PeerConfig};
use super::key::{PrivateKey, PublicKey};
use super::uapi::{DeviceInfo, DeviceUpdate, PeerInfo, EADDRINUSE, EINVAL, EIO, ENOKEY};
use offload::{Gro, VnetHdr, VNET_HDR_LEN};
use sys::{Tun, Udp, Waker};

/// Handshakes per second before cookies are required (boringtun's device uses the same).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest frame read from or written to the TUN: virtio header + 64 KiB packet.
const FRAME: usize = VNET_HDR_LEN + 65535;
/// Most datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes in one UDP GSO send (an IP datagram's limit, less headers).
const MAX_GSO_BYTES: usize = 65000;
/// Frames read from the TUN or receive calls per socket before looking at the others.
const BURST: usize = 32;
const TICK: Duration = Duration::from_millis(250);
/// WireGuard message types (the first byte of a datagram).
const HANDSHAKE_RESPONSE: u8 = 2;
const DATA: u8 = 4;

/// One peer: its protocol state and configuration.
struct Peer {
    tunn: Tunn,
    /// Index in the receiver-index space (`Tunn` sessions carry `index << 8 | n`).
    index: u32,
    cfg: PeerConfig,
    /// Current endpoint: configured, or learned from the last authenticated packet.
    endpoint: Option<SocketAddr>,
    /// Unix time of the latest handshake seen, kept when the session itself is gone (expired,
    /// or cleared by a key change): `wg show` reports it as the kernel does.
    last_handshake: Option<Duration>,
    /// Bytes counted by earlier `Tunn`s of this peer (replaced by a configuration change).
    rx_base: u64,
    tx_base: u64,
}

impl Peer {
    /// Records the latest handshake time while `tunn` knows it.
    fn note_handshake(&mut self, now: Duration) {
        if let (Some(since), ..) = self.tunn.stats() {
            self.last_handshake = Some(now.saturating_sub(since));
        }
    }

    /// (rx, tx) bytes over the peer's life.
    fn bytes(&self) -> (u64, u64) {
        let (_, tx, rx, _, _) = self.tunn.stats();
        (self.rx_base + rx as u64, self.tx_base + tx as u64)
    }
}

/// The current Unix time.
fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The key material, present once a private key is set.
struct Identity {
    key: PrivateKey,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
}

struct State {
    id: Option<Identity>,
    port: u16,
    fwmark: Option<u32>,
    udp4: Udp,
    udp6: Option<Udp>,
    /// Sockets replaced by a port change, closed by the data thread once it no longer polls them.
    retired: Vec<Udp>,
    peers: BTreeMap<PublicKey, Peer>,
    by_index: HashMap<u32, PublicKey>,
    routes: AllowedIps<PublicKey>,
    next_index: u32,
    buffer_bytes: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Configuration calls waiting for `state`: the data thread, which takes the lock again
    /// right after releasing it when busy, lets them in first (a mutex is not fair).
    waiting: AtomicUsize,
    stop: AtomicBool,
    /// Wakes the data thread (stop, new sockets).
    wake: Waker,
}

impl Shared {
    /// Called by the data thread before it takes the lock: waits while a configuration call
    /// waits for it, so that `wg show` or a peer update gets in under full load too.
    fn let_config_in(&self) {
        while self.waiting.load(Ordering::SeqCst) > 0 && !self.stop.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }
}

/// A running fast-path device: the TUN interface, its UDP sockets and the data thread. Dropping
/// it stops the thread and closes everything (the interface disappears).
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn bind_pair(port: u16, buffer: usize) -> io::Result<(Udp, Option<Udp>)> {
    let udp4 = Udp::bind(false, port, buffer)?;
    let port = udp4.local_port()?;
    // IPv6 is optional (a namespace may have it disabled); on the same port as IPv4.
    let udp6 = Udp::bind(true, port, buffer).ok();
    Ok((udp4, udp6))
}

impl Engine {
    /// Creates the TUN interface `name` (in the calling thread's network namespace) with
    /// offloads, binds the UDP sockets on `port` (0: a random one) and starts the data thread.
    /// No key and no peer yet: [`Engine::set`] gives them.
    pub fn start(name: &str, port: u16, buffer_bytes: usize) -> io::Result<Engine> {
        let tun = Tun::open(name)?;
        let (udp4, udp6) = bind_pair(port, buffer_bytes)?;
        let port = udp4.local_port()?;
        let wake = Waker::new()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(udp4, udp6, port, buffer_bytes)),
            waiting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            wake,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wg-{name}"))
            .spawn(move || DataPath::new(tun).run(&s))?;
        Ok(Engine {
            shared,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, i32> {
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = self.shared.state.lock();
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        guard.map_err(|_| EIO)
    }

    fn wake(&self) {
        self.shared.wake.wake();
    }

    /// The private key, if set.
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.lock().ok()?.id.as_ref().map(|i| i.key.clone())
    }

    /// The device's state, with Unix handshake times.
    pub fn get(&self) -> Result<DeviceInfo, i32> {
        Ok(self.lock()?.info(unix_now()))
    }

    /// Applies a change (kernel semantics). Returns the new listen port if it changed.
    pub fn set(&self, u: &DeviceUpdate) -> Result<Option<u16>, i32> {
        let mut st = self.lock()?;
        let st = &mut *st;
        if let Some(k) = &u.private_key {
            if k.expose_bytes().iter().all(|b| *b == 0) {
                return Err(EINVAL);
            }
            let changed = st
                .id
                .as_ref()
                .is_none_or(|i| i.key.public_key() != k.public_key());
            if changed {
                st.set_identity(Identity::new(k, HANDSHAKE_RATE_LIMIT));
            }
        }
        let mut new_port = None;
        if let Some(port) = u.listen_port {
            if port == 0 || port != st.port {
                let (udp4, udp6) = bind_pair(port, st.buffer_bytes).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        EADDRINUSE
                    } else {
                        e.raw_os_error().unwrap_or(EIO)
                    }
                })?;
                st.port = udp4.local_port().map_err(|_| EIO)?;
                let old4 = std::mem::replace(&mut st.udp4, udp4);
                st.retired.push(old4);
                if let Some(old6) = std::mem::replace(&mut st.udp6, udp6) {
                    st.retired.push(old6);
                }
                if let Some(mark) = st.fwmark {
                    set_mark(st, mark)?;
                }
                new_port = Some(st.port);
                self.wake();
            }
        }
        if let Some(mark) = u.fwmark {
            st.fwmark = (mark != 0).then_some(mark);
            set_mark(st, mark)?;
        }
        if u.replace_peers || !u.peers.is_empty() {
            let own = st.id.as_ref().map(|i| i.key.public_key());
            let current: BTreeMap<PublicKey, PeerConfig> = st
                .peers
                .iter()
                .map(|(k, p)| {
                    let mut c = p.cfg.clone();
                    c.endpoint = p.endpoint;
                    (*k, c)
                })
                .collect();
            let plan = plan_peers(&current, own, u);
            if !plan.add.is_empty() && st.id.is_none() {
                return Err(ENOKEY);
            }
            let adding: std::collections::BTreeSet<PublicKey> =
                plan.add.iter().map(|(k, _)| *k).collect();
            let mut gone: Vec<PublicKey> = plan
                .remove
                .iter()
                .filter(|k| !adding.contains(k))
                .copied()
                .collect();
            if plan.replace_peers {
                gone.extend(st.peers.keys().filter(|k| !adding.contains(k)).copied());
            }
            for k in gone {
                st.remove_peer(&k);
            }
            for (k, cfg) in plan.add {
                st.upsert_peer(k, cfg);
            }
        }
        Ok(new_port)
    }
}

fn set_mark(st: &State, mark: u32) -> Result<(), i32> {
    let socks = std::iter::once(&st.udp4).chain(st.udp6.as_ref());
    for s in socks {
        s.set_mark(mark)
            .map_err(|e| e.raw_os_error().unwrap_or(EIO))?;
    }
    Ok(())
}

/// A random start for peer indices (24 bits), so that indices differ across restarts.
fn first_index() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

impl Identity {
    /// The identity of `key`, with a handshake rate limiter of `limit` per second.
    fn new(key: &PrivateKey, limit: u64) -> Identity {
        let secret = x25519::StaticSecret::from(*key.expose_bytes());
        let public = x25519::PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, limit));
        Identity {
            key: key.clone(),
            secret,
            public,
            limiter,
        }
    }
}

impl State {
    /// A device without key or peer on the given sockets.
    fn new(udp4: Udp, udp6: Option<Udp>, port: u16, buffer_bytes: usize) -> State {
        State {
            id: None,
            port,
            fwmark: None,
            udp4,
            udp6,
            retired: Vec::new(),
            peers: BTreeMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
            next_index: first_index(),
            buffer_bytes,
        }
    }

    /// The device's state at Unix time `now`.
    fn info(&mut self, now: Duration) -> DeviceInfo {
        let peers = self
            .peers
            .iter_mut()
            .map(|(k, p)| {
                p.note_handshake(now);
                let at = p.last_handshake.unwrap_or_default();
                let (rx, tx) = p.bytes();
                PeerInfo {
                    public_key: *k,
                    preshared_key: p.cfg.preshared_key.clone(),
                    endpoint: p.endpoint,
                    allowed_ips: p.cfg.allowed_ips.clone(),
                    last_handshake_time_sec: at.as_secs(),
                    last_handshake_time_nsec: at.subsec_nanos(),
                    rx_bytes: rx,
                    tx_bytes: tx,
                    persistent_keepalive_interval: p.cfg.keepalive,
                }
            })
            .collect();
        DeviceInfo {
            public_key: self.id.as_ref().map(|i| i.key.public_key()),
            listen_port: self.port,
            fwmark: self.fwmark,
            peers,
        }
    }

    /// Switches every peer to a new private key. A peer with the new public key is removed (the
    /// kernel's rule: a device is never its own peer).
    fn set_identity(&mut self, id: Identity) {
        self.remove_peer(&id.key.public_key());
        let now = unix_now();
        for p in self.peers.values_mut() {
            p.note_handshake(now);
            p.tunn
                .set_static_private(id.secret.clone(), id.public, Some(id.limiter.clone()));
        }
        self.id = Some(id);
    }

    fn remove_peer(&mut self, k: &PublicKey) {
        if let Some(p) = self.peers.remove(k) {
            self.by_index.remove(&p.index);
            self.routes.remove(&|v: &PublicKey| v == k);
        }
    }

    fn alloc_index(&mut self) -> u32 {
        loop {
            let i = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    fn new_tunn(&self, k: &PublicKey, cfg: &PeerConfig, index: u32) -> Option<Tunn> {
        let id = self.id.as_ref()?;
        Some(Tunn::new(
            id.secret.clone(),
            x25519::PublicKey::from(*k.as_bytes()),
            cfg.preshared_key.as_ref().map(|p| *p.expose_bytes()),
            (cfg.keepalive != 0).then_some(cfg.keepalive),
            index,
            Some(id.limiter.clone()),
        ))
    }

    /// Adds a peer, or updates it in place keeping its session when possible.
    fn upsert_peer(&mut self, k: PublicKey, cfg: PeerConfig) {
        let restart = match self.peers.get(&k) {
            None => true,
            Some(p) => p.cfg.preshared_key != cfg.preshared_key || p.cfg.keepalive != cfg.keepalive,
        };
        if restart {
            // What `wg show` reports survives the new session: endpoint, handshake, counters.
            let now = unix_now();
            let (old_endpoint, last_handshake, (rx_base, tx_base)) = match self.peers.get_mut(&k) {
                Some(p) => {
                    p.note_handshake(now);
                    (p.endpoint, p.last_handshake, p.bytes())
                }
                None => (None, None, (0, 0)),
            };
            self.remove_peer(&k);
            let index = self.alloc_index();
            let Some(tunn) = self.new_tunn(&k, &cfg, index) else {
                return;
            };
            self.by_index.insert(index, k);
            self.peers.insert(
                k,
                Peer {
                    tunn,
                    index,
                    endpoint: cfg.endpoint.or(old_endpoint),
                    cfg: cfg.clone(),
                    last_handshake,
                    rx_base,
                    tx_base,
                },
            );
        } else if let Some(p) = self.peers.get_mut(&k) {
            if cfg.endpoint.is_some() {
                p.endpoint = cfg.endpoint;
            }
            p.cfg = cfg.clone();
        }
        self.routes.remove(&|v: &PublicKey| *v == k);
        for net in &cfg.allowed_ips {
            self.routes
                .insert(net.addr(), u32::from(net.prefix_len()), k);
        }
    }
}

/// The data thread's buffers.
struct DataPath {
    tun: Tun,
    /// The interface was deleted: its descriptor is no longer polled.
    tun_gone: bool,
    frame: Vec<u8>,
    scratch: Vec<u8>,
    /// Encrypted datagrams, back to back, and their lengths.
    out: Vec<u8>,
    out_lens: Vec<usize>,
    recv: Vec<u8>,
    dec: Vec<u8>,
    gro: Gro,
    /// Replies (handshake responses, cookies, queued packets) to send after a receive batch.
    replies: Vec<(Vec<u8>, SocketAddr)>,
}

impl DataPath {
    fn new(tun: Tun) -> DataPath {
        DataPath {
            tun,
            tun_gone: false,
            frame: vec![0; FRAME],
            scratch: Vec::with_capacity(FRAME),
            out: Vec::with_capacity(2 * FRAME),
            out_lens: Vec::with_capacity(128),
            recv: vec![0; 65536],
            dec: vec![0; 65536],
            gro: Gro::new(),
            replies: Vec::new(),
        }
    }

    fn run(mut self, sh: &Shared) {
        let mut next_tick = Instant::now() + TICK;
        let mut next_limiter_reset = Instant::now() + Duration::from_secs(1);
        while !sh.stop.load(Ordering::SeqCst) {
            sh.let_config_in();
            let (fd4, fd6) = match sh.state.lock() {
                Ok(mut st) => {
                    st.retired.clear();
                    (
                        st.udp4.as_fd().as_raw_fd(),
                        st.udp6
                            .as_ref()
                            .map(|u| u.as_fd().as_raw_fd())
                            .unwrap_or(-1),
                    )
                }
                Err(_) => return,
            };
            let timeout = next_tick
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(250) as i32;
            // The sockets stay open during the call: one replaced meanwhile is only retired,
            // and closed after the wake-up that follows.
            let tun_fd = if self.tun_gone {
                -1
            } else {
                self.tun.as_fd().as_raw_fd()
            };
            let ready =
                sys::poll_readable([tun_fd, fd4, fd6, sh.wake.as_fd().as_raw_fd()], timeout);
            if ready[3] {
                sh.wake.clear();
            }
            sh.let_config_in();
            let Ok(mut st) = sh.state.lock() else { return };
            if ready[0] {
                self.tun_to_network(&mut st);
            }
            if ready[1] {
                self.network_to_tun(&mut st, false);
            }
            if ready[2] {
                self.network_to_tun(&mut st, true);
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.timers(&mut st);
            }
            if now >= next_limiter_reset {
                next_limiter_reset = now + Duration::from_secs(1);
                if let Some(id) = &st.id {
                    id.limiter.reset_count();
                }
            }
        }
    }

    /// Reads frames from the TUN, encrypts them and sends the datagrams.
    fn tun_to_network(&mut self, st: &mut State) {
        for _ in 0..BURST {
            let n = match self.tun.read(&mut self.frame) {
                Ok(n) => n,
                Err(e) => {
                    // EBADFD: the interface was deleted under us (`ip link del`); the descriptor
                    // now polls as always in error. Stop polling it rather than spin.
                    if e.raw_os_error() == Some(libc::EBADFD) {
                        self.tun_gone = true;
                    }
                    return; // WouldBlock, or one packet the kernel could not give
                }
            };
            if n <= VNET_HDR_LEN {
                continue;
            }
            let Some(h) = VnetHdr::parse(&self.frame) else {
                continue;
            };
            let pkt = &mut self.frame[VNET_HDR_LEN..n];
            let Some(dst) = Tunn::dst_address(pkt) else {
                continue;
            };
            let Some(k) = st.routes.find(dst).copied() else {
                continue;
            };
            let Some(peer) = st.peers.get_mut(&k) else {
                continue;
            };
            self.out.clear();
            self.out_lens.clear();
            let (out, lens, tunn) = (&mut self.out, &mut self.out_lens, &mut peer.tunn);
            let res = offload::split(pkt, &h, &mut self.scratch, |seg| {
                let start = out.len();
                out.resize(start + (seg.len() + 32).max(148), 0);
                match tunn.encapsulate(seg, &mut out[start..]) {
                    TunnResult::WriteToNetwork(d) => {
                        let l = d.len();
                        out.truncate(start + l);
                        lens.push(l);
                    }
                    _ => out.truncate(start),
                }
            });
            if res.is_err() {
                continue;
            }
            if let Some(ep) = peer.endpoint {
                send_batch(st, &self.out, &self.out_lens, ep);
            }
        }
    }

    /// Receives datagrams, decrypts them and writes the packets (coalesced) to the TUN.
    fn network_to_tun(&mut self, st: &mut State, v6: bool) {
        for _ in 0..BURST {
            let sock = if v6 { st.udp6.as_ref() } else { Some(&st.udp4) };
            let Some(sock) = sock else { return };
            let (n, seg, from) = match sock.recv(&mut self.recv) {
                Ok(r) => r,
                Err(_) => break,
            };
            let seg = seg.max(1);
            let mut off = 0;
            while off < n {
                let end = (off + seg).min(n);
                self.datagram(st, off, end, from);
                off = end;
            }
            // Packets of one recv are one sender's burst: write them out before the next, so
            // that a queue never grows beyond one GRO batch.
            let tun = &self.tun;
            self.gro.flush(|f| {
                let _ = tun.write(f);
            });
            for (d, to) in self.replies.drain(..) {
                send_batch(st, &d, &[d.len()], to);
            }
        }
    }

    fn datagram(&mut self, st: &mut State, start: usize, end: usize, from: SocketAddr) {
        receive(
            st,
            &self.recv[start..end],
            from,
            &mut self.dec,
            &mut self.gro,
            &mut self.replies,
        );
    }

    fn timers(&mut self, st: &mut State) {
        let mut sends = Vec::new();
        let now = unix_now();
        for p in st.peers.values_mut() {
            // Before the timers may expire the session (and with it boringtun's handshake time).
            p.note_handshake(now);
            if let TunnResult::WriteToNetwork(d) = p.tunn.update_timers(&mut self.dec) {
                if let Some(ep) = p.endpoint {
                    sends.push((d.to_vec(), ep));
                }
            }
        }
        for (d, ep) in sends {
            send_batch(st, &d, &[d.len()], ep);
        }
    }
}

/// Handles one datagram from `from`: decrypts it with the sending peer's session, queues the
/// packet for the TUN (if its source is among that peer's allowed IPs) and the replies
/// (handshake responses, cookies, packets queued during the handshake), and moves the peer's
/// endpoint to `from` only when the datagram was authenticated.
fn receive(
    st: &mut State,
    d: &[u8],
    from: SocketAddr,
    dec: &mut [u8],
    gro: &mut Gro,
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    let Ok(packet) = Tunn::parse_incoming_packet(d) else {
        return;
    };
    let key = match &packet {
        Packet::HandshakeInit(p) => {
            let Some(id) = &st.id else { return };
            // mac1, and under load the cookie, before the Diffie-Hellman that finds the peer
            // (as boringtun's device does). `decapsulate` checks again and counts the
            // handshake a second time: under a flood, cookies are asked for at half the rate.
            let mut cookie = [0u8; 64];
            match id.limiter.verify_packet(Some(from.ip()), d, &mut cookie) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(c)) => {
                    replies.push((c.to_vec(), from));
                    return;
                }
                Err(_) => return,
            }
            match parse_handshake_anon(&id.secret, &id.public, p) {
                Ok(hh) => PublicKey::from_bytes(hh.peer_static_public),
                Err(_) => return,
            }
        }
        Packet::HandshakeResponse(p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
            Some(k) => *k,
            None => return,
        },
        Packet::PacketCookieReply(p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
            Some(k) => *k,
            None => return,
        },
        Packet::PacketData(p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
            Some(k) => *k,
            None => return,
        },
    };
    let is_data = matches!(packet, Packet::PacketData(_));
    let Some(peer) = st.peers.get_mut(&key) else {
        return;
    };
    // Whether the datagram proved to come from the peer: a data packet (or keepalive) that
    // decrypted, or a handshake message that produced the next protocol message. A cookie reply
    // (received, or sent by `decapsulate`'s rate limiter for a handshake message it did not
    // process) authenticates nothing: an unverified handshake initiation must not move the
    // endpoint (the kernel's rule too).
    let authenticated = match peer.tunn.decapsulate(Some(from.ip()), d, dec) {
        TunnResult::Done => is_data,
        TunnResult::Err(_) => false,
        TunnResult::WriteToNetwork(r) => {
            let reply_type = r.first().copied();
            replies.push((r.to_vec(), from));
            // A handshake response (to an initiation), or the keepalive that confirms one.
            let ok = matches!(reply_type, Some(HANDSHAKE_RESPONSE) | Some(DATA));
            if ok {
                // Packets queued while the handshake was under way.
                while let TunnResult::WriteToNetwork(q) = peer.tunn.decapsulate(None, &[], dec) {
                    replies.push((q.to_vec(), from));
                }
            }
            ok
        }
        TunnResult::WriteToTunnelV4(p, src) => {
            if st.routes.find(IpAddr::V4(src)) == Some(&key) {
                gro.push(p);
            }
            true
        }
        TunnResult::WriteToTunnelV6(p, src) => {
            if st.routes.find(IpAddr::V6(src)) == Some(&key) {
                gro.push(p);
            }
            true
        }
    };
    // Authenticated: the peer is at this address now (roaming).
    if authenticated {
        if let Some(peer) = st.peers.get_mut(&key) {
            peer.endpoint = Some(from);
        }
    }
}

/// Sends back-to-back datagrams of the given lengths to `to`, as few GSO sends as the rule
/// allows (a run of equal lengths, possibly ending with one shorter datagram).
fn send_batch(st: &mut State, data: &[u8], lens: &[usize], to: SocketAddr) {
    let sock = match to {
        SocketAddr::V4(_) => &mut st.udp4,
        SocketAddr::V6(_) => match st.udp6.as_mut() {
            Some(s) => s,
            None => return,
        },
    };
    let mut off = 0;
    for (segment, total) in gso_groups(lens) {
        let _ = sock.send(&data[off..off + total], segment, to);
        off += total;
    }
}

/// Groups back-to-back datagrams of the given lengths into UDP GSO sends: each group is a run of
/// datagrams of its first one's length, possibly ending with one shorter datagram, at most
/// [`MAX_GSO_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`] bytes (one datagram always makes a
/// group). Returns (segment size, total bytes) per group, in order.
fn gso_groups(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let size = lens[i];
        let mut total = size;
        let mut j = i + 1;
        while j < lens.len()
            && j - i < MAX_GSO_SEGMENTS
            && total + lens[j] <= MAX_GSO_BYTES
            && lens[j] <= size
        {
            total += lens[j];
            j += 1;
            if lens[j - 1] < size {
                break;
            }
        }
        groups.push((size, total));
        i = j;
    }
    groups
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::PresharedKey;
    use super::*;

    /// A device (state only, no TUN) with `limit` handshakes per second, and a remote peer's
    /// `Tunn` configured with it as its peer. The device knows the peer with `allowed`, at
    /// `endpoint`.
    struct Pair {
        st: State,
        remote: Tunn,
        remote_key: PublicKey,
        remote_private: PrivateKey,
        dec: Vec<u8>,
        gro: Gro,
        replies: Vec<(Vec<u8>, SocketAddr)>,
    }

    const ENDPOINT: &str = "192.0.2.1:51820";
    const ELSEWHERE: &str = "198.51.100.7:40000";

    fn pair(limit: u64, allowed: &[&str]) -> Pair {
        let (udp4, udp6) = bind_pair(0, 0).unwrap();
        let mut st = State::new(udp4, udp6, 0, 0);
        let own = PrivateKey::generate().unwrap();
        st.set_identity(Identity::new(&own, limit));
        let rk = PrivateKey::generate().unwrap();
        let remote_key = rk.public_key();
        st.upsert_peer(
            remote_key,
            PeerConfig {
                preshared_key: None,
                endpoint: Some(ENDPOINT.parse().unwrap()),
                allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
                keepalive: 0,
            },
        );
        let remote = Tunn::new(
            x25519::StaticSecret::from(*rk.expose_bytes()),
            x25519::PublicKey::from(*own.public_key().as_bytes()),
            None,
            None,
            7,
            None,
        );
        Pair {
            st,
            remote,
            remote_key,
            remote_private: rk,
            dec: vec![0; 65536],
            gro: Gro::new(),
            replies: Vec::new(),
        }
    }

    impl Pair {
        fn deliver(&mut self, d: &[u8], from: &str) {
            receive(
                &mut self.st,
                d,
                from.parse().unwrap(),
                &mut self.dec,
                &mut self.gro,
                &mut self.replies,
            );
        }

        fn endpoint(&self) -> Option<SocketAddr> {
            self.st.peers.get(&self.remote_key).and_then(|p| p.endpoint)
        }

        fn initiation(&mut self) -> Vec<u8> {
            let mut b = vec![0u8; 256];
            match self.remote.format_handshake_initiation(&mut b, true) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("no initiation"),
            }
        }

        /// A full handshake from ENDPOINT; returns nothing, the session is up both ways.
        fn handshake(&mut self) {
            let init = self.initiation();
            self.deliver(&init, ENDPOINT);
            let (resp, _) = self.replies.pop().expect("a handshake response");
            let mut b = vec![0u8; 256];
            match self.remote.decapsulate(None, &resp, &mut b) {
                TunnResult::WriteToNetwork(k) => {
                    let k = k.to_vec();
                    self.deliver(&k, ENDPOINT);
                }
                _ => panic!("handshake not completed"),
            }
            self.replies.clear();
        }

        fn data(&mut self, packet: &[u8]) -> Vec<u8> {
            let mut b = vec![0u8; packet.len() + 64];
            match self.remote.encapsulate(packet, &mut b) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("no session"),
            }
        }

        fn delivered(&mut self) -> usize {
            let mut n = 0;
            self.gro.flush(|_| n += 1);
            n
        }
    }

    /// An IPv4 ICMP packet from `src`.
    fn icmp_from(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let c = offload::checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn wg_show_keeps_the_handshake_time_and_counters_across_session_resets() {
        let mut t = pair(100, &["10.0.1.0/24"]);
        let info = t.st.info(unix_now());
        assert_eq!(info.peers[0].last_handshake_time_sec, 0);
        t.handshake();
        let d = t.data(&icmp_from([10, 0, 1, 5]));
        t.deliver(&d, ENDPOINT);
        let before = t.st.info(unix_now()).peers[0].clone();
        assert!(before.last_handshake_time_sec > 0);
        assert!(before.rx_bytes > 0);
        // A key change clears the sessions (boringtun forgets the handshake time) ...
        let own = PrivateKey::generate().unwrap();
        t.st.set_identity(Identity::new(&own, 100));
        let after = t.st.info(unix_now()).peers[0].clone();
        assert_eq!(
            after.last_handshake_time_sec,
            before.last_handshake_time_sec
        );
        // ... and a new preshared key restarts the peer's `Tunn`: counters go on.
        let k = t.remote_key;
        let mut cfg = t.st.peers[&k].cfg.clone();
        cfg.preshared_key = Some(PresharedKey::from_bytes(zeroize::Zeroizing::new([7; 32])));
        t.st.upsert_peer(k, cfg);
        let again = t.st.info(unix_now()).peers[0].clone();
        assert_eq!(again.rx_bytes, before.rx_bytes);
        assert_eq!(
            again.last_handshake_time_sec,
            before.last_handshake_time_sec
        );
    }

    #[test]
    fn taking_a_peers_key_removes_that_peer() {
        let mut t = pair(100, &["10.0.1.0/24"]);
        let k = t.remote_private.clone();
        t.st.set_identity(Identity::new(&k, 100));
        assert!(t.st.peers.is_empty());
        assert!(t.st.by_index.is_empty());
        assert_eq!(t.st.routes.find("10.0.1.1".parse().unwrap()), None);
    }

    #[test]
    fn a_handshake_answered_with_a_cookie_does_not_move_the_endpoint() {
        // Limit 1: the device's own check passes the first initiation, `decapsulate`'s check
        // (the second count) is under load and answers with a cookie reply.
        let mut t = pair(1, &["10.0.1.0/24"]);
        let init = t.initiation();
        t.deliver(&init, ELSEWHERE);
        assert_eq!(t.replies.len(), 1);
        assert_eq!(t.replies[0].0[0], 3, "a cookie reply");
        assert_eq!(t.endpoint(), Some(ENDPOINT.parse().unwrap()));
    }

    #[test]
    fn authenticated_packets_move_the_endpoint_and_sources_are_checked() {
        let mut t = pair(100, &["10.0.1.0/24"]);
        t.handshake();
        // Allowed source, from a new address: delivered, endpoint follows.
        let d = t.data(&icmp_from([10, 0, 1, 5]));
        t.deliver(&d, ELSEWHERE);
        assert_eq!(t.delivered(), 1);
        assert_eq!(t.endpoint(), Some(ELSEWHERE.parse().unwrap()));
        // A source outside the peer's allowed IPs: dropped.
        let d = t.data(&icmp_from([10, 0, 2, 5]));
        t.deliver(&d, ELSEWHERE);
        assert_eq!(t.delivered(), 0);
        // Garbage claiming the session: dropped, endpoint unchanged.
        let mut d = t.data(&icmp_from([10, 0, 1, 5]));
        let last = d.len() - 1;
        d[last] ^= 1;
        t.deliver(&d, ENDPOINT);
        assert_eq!(t.delivered(), 0);
        assert_eq!(t.endpoint(), Some(ELSEWHERE.parse().unwrap()));
        // A removed peer's session is gone.
        let d = t.data(&icmp_from([10, 0, 1, 5]));
        let k = t.remote_key;
        t.st.remove_peer(&k);
        t.deliver(&d, ENDPOINT);
        assert_eq!(t.delivered(), 0);
    }

    #[test]
    fn gso_groups_follow_the_kernel_rule() {
        assert_eq!(gso_groups(&[]), vec![]);
        assert_eq!(gso_groups(&[100]), vec![(100, 100)]);
        // Equal sizes, then a shorter last one: one send.
        assert_eq!(gso_groups(&[100, 100, 60]), vec![(100, 260)]);
        // Nothing may follow a shorter datagram; a longer one starts a new group.
        assert_eq!(
            gso_groups(&[100, 60, 100, 148, 100]),
            vec![(100, 160), (100, 100), (148, 248)]
        );
        // Limits: segments and bytes.
        let many = vec![1000; 70];
        let g = gso_groups(&many);
        assert_eq!(g[0], (1000, 64_000));
        assert_eq!(g[1], (1000, 6_000));
        let big = vec![1452; 50];
        let g = gso_groups(&big);
        assert!(g.iter().all(|(_, t)| *t <= MAX_GSO_BYTES));
        assert_eq!(g.iter().map(|(_, t)| t).sum::<usize>(), 1452 * 50);
    }
}
