//! The cross-platform WireGuard configuration protocol ("UAPI", <https://www.wireguard.com/xplatform/>)
//! and a client for it.
//!
//! The protocol is line-based `key=value` text over a Unix stream socket
//! (`/var/run/wireguard/<ifname>.sock`): `get=1` answers the device's state, `set=1` applies a change;
//! every answer ends with `errno=N` and an empty line. Keys are hex on the wire.
//!
//! The parsing and formatting functions are pure (text in, values out) and used by both sides: the
//! [`Uapi`] client here and the server in front of boringtun in [`super::Device`].

use std::io::{self, BufRead, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use zeroize::Zeroizing;

use super::key::{PresharedKey, PrivateKey, PublicKey};
use super::WgError;

/// Where userspace WireGuard implementations put their UAPI sockets (not per network namespace).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// `EIO`: the device could not do what was asked (also: its answer could not be read).
pub const EIO: i32 = 5;
/// `EINVAL`: a malformed or invalid request.
pub const EINVAL: i32 = 22;
/// `EPROTO`: a line that is not `key=value`.
pub const EPROTO: i32 = 71;
/// `EADDRINUSE`: the listen port could not be bound.
pub const EADDRINUSE: i32 = 98;
/// `ENOKEY`: a peer was added while the device has no private key.
pub const ENOKEY: i32 = 126;

/// Longest line accepted on the socket (a line holds one key and one value).
pub(crate) const MAX_LINE: u64 = 4096;
/// Largest request or response accepted (about 100,000 peers' worth of text).
pub(crate) const MAX_MESSAGE: usize = 64 << 20;

/// The path of the UAPI socket of an interface: `/var/run/wireguard/<ifname>.sock`.
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// A device's state, as `get=1` answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's public key (derived from `private_key`, or boringtun's `own_public_key`);
    /// `None` while the device has no private key.
    pub public_key: Option<PublicKey>,
    /// The UDP port it listens on (0 if not reported).
    pub listen_port: u16,
    /// The firewall mark on its packets, if any.
    pub fwmark: Option<u32>,
    /// Its peers, in the order the device listed them.
    pub peers: Vec<PeerInfo>,
}

impl DeviceInfo {
    /// The peer with this public key.
    pub fn peer(&self, key: &PublicKey) -> Option<&PeerInfo> {
        self.peers.iter().find(|p| &p.public_key == key)
    }
}

/// One peer in a [`DeviceInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Its preshared key, if one is set.
    pub preshared_key: Option<PresharedKey>,
    /// Its current endpoint (configured, or learned from its packets).
    pub endpoint: Option<SocketAddr>,
    /// The addresses it may send from and that are routed to it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds part of the last handshake time, since the Unix epoch (0: never).
    pub last_handshake_time_sec: u64,
    /// Nanoseconds part of the last handshake time.
    pub last_handshake_time_nsec: u32,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds (0: off).
    pub persistent_keepalive_interval: u16,
}

impl PeerInfo {
    /// A peer with only its key set (no endpoint, no allowed IPs, no handshake yet).
    pub fn new(public_key: PublicKey) -> Self {
        PeerInfo {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake_time_sec: 0,
            last_handshake_time_nsec: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive_interval: 0,
        }
    }

    /// The last handshake as a time, or `None` if there has been none.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        if self.last_handshake_time_sec == 0 && self.last_handshake_time_nsec == 0 {
            return None;
        }
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(
            self.last_handshake_time_sec,
            self.last_handshake_time_nsec,
        ))
    }
}

/// A change to a device, as `set=1` carries it. Fields left `None`/empty/`false` are not changed.
#[derive(Clone, Debug, Default)]
pub struct DeviceUpdate {
    /// New private key.
    pub private_key: Option<PrivateKey>,
    /// New listen port (0: a random one).
    pub listen_port: Option<u16>,
    /// New firewall mark (0: none).
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers`.
    pub replace_peers: bool,
    /// Per-peer operations, applied in order.
    pub peers: Vec<PeerUpdate>,
}

/// One peer operation in a [`DeviceUpdate`]: add or update the peer, or remove it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    /// Which peer.
    pub public_key: PublicKey,
    /// Remove the peer (every other field is then ignored).
    pub remove: bool,
    /// Only update an existing peer; do not create it.
    pub update_only: bool,
    /// New preshared key (the all-zero key removes it).
    pub preshared_key: Option<PresharedKey>,
    /// New endpoint.
    pub endpoint: Option<SocketAddr>,
    /// New persistent keepalive interval in seconds (0: off).
    pub persistent_keepalive_interval: Option<u16>,
    /// Replace the peer's allowed IPs by `allowed_ips` instead of adding to them.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add (or to set, with `replace_allowed_ips`).
    pub allowed_ips: Vec<IpNet>,
}

impl PeerUpdate {
    /// An add-or-update of this peer that changes nothing yet; set the fields to change.
    pub fn upsert(public_key: PublicKey) -> Self {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }

    /// The removal of this peer.
    pub fn remove(public_key: PublicKey) -> Self {
        PeerUpdate {
            remove: true,
            ..Self::upsert(public_key)
        }
    }
}

fn protocol(msg: impl Into<String>) -> WgError {
    WgError::Protocol(msg.into())
}

fn split_line(line: &str) -> Result<(&str, &str), WgError> {
    line.split_once('=')
        .ok_or_else(|| protocol(format!("line {line:?} is not key=value")))
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, WgError> {
    value
        .parse()
        .map_err(|_| protocol(format!("{key}={value:?} is not a valid number")))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, WgError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(protocol(format!("{key}={value:?} is not true or false"))),
    }
}

fn parse_endpoint(value: &str) -> Result<SocketAddr, WgError> {
    value
        .parse()
        .map_err(|_| protocol(format!("endpoint={value:?} is not an IP address and port")))
}

fn parse_allowed_ip(value: &str) -> Result<IpNet, WgError> {
    value
        .parse()
        .map_err(|_| protocol(format!("allowed_ip={value:?} is not an address/prefix")))
}

/// Parses the body of a `get=1` answer (the `key=value` lines before `errno=`).
///
/// Lenient where the protocol lets implementations differ: unknown keys are skipped, and
/// boringtun's `own_public_key` is accepted beside the standard `private_key` (from which the
/// public key is derived; the private key itself is not kept).
pub fn parse_device_info(body: &str) -> Result<DeviceInfo, WgError> {
    let mut info = DeviceInfo::default();
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        let (key, value) = split_line(line)?;
        if key == "public_key" {
            info.peers.push(PeerInfo::new(
                PublicKey::from_hex(value)
                    .map_err(|e| protocol(format!("peer public_key: {e}")))?,
            ));
            continue;
        }
        match info.peers.last_mut() {
            None => match key {
                "private_key" => {
                    let k = PrivateKey::from_hex(value)?;
                    info.public_key = Some(k.public_key());
                }
                "own_public_key" => info.public_key = Some(PublicKey::from_hex(value)?),
                "listen_port" => info.listen_port = parse_num(key, value)?,
                "fwmark" => {
                    let m: u32 = parse_num(key, value)?;
                    info.fwmark = (m != 0).then_some(m);
                }
                "errno" => return Err(protocol("errno inside a get body")),
                _ => {}
            },
            Some(peer) => match key {
                "preshared_key" => {
                    let k = PresharedKey::from_hex(value)?;
                    peer.preshared_key = (!k.is_zero()).then_some(k);
                }
                "protocol_version" if value != "1" => {
                    return Err(protocol(format!("unsupported protocol_version={value}")));
                }
                "protocol_version" => {}
                "endpoint" => peer.endpoint = Some(parse_endpoint(value)?),
                "allowed_ip" => peer.allowed_ips.push(parse_allowed_ip(value)?),
                "last_handshake_time_sec" => peer.last_handshake_time_sec = parse_num(key, value)?,
                "last_handshake_time_nsec" => {
                    let ns: u32 = parse_num(key, value)?;
                    if ns >= 1_000_000_000 {
                        return Err(protocol(format!("{key}={value} is not below 10^9")));
                    }
                    peer.last_handshake_time_nsec = ns;
                }
                "rx_bytes" => peer.rx_bytes = parse_num(key, value)?,
                "tx_bytes" => peer.tx_bytes = parse_num(key, value)?,
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive_interval = parse_num(key, value)?
                }
                "errno" => return Err(protocol("errno inside a get body")),
                _ => {}
            },
        }
    }
    Ok(info)
}

/// Formats the body of a `get=1` answer (without `errno=`), in the order wireguard-go writes it.
/// `private_key` is written when given (the spec's form; `wg` derives the public key from it),
/// otherwise nothing identifies the device's own key.
pub fn format_device_info(
    info: &DeviceInfo,
    private_key: Option<&PrivateKey>,
) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut s = Zeroizing::new(String::new());
    // Writing to a String cannot fail.
    if let Some(k) = private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex().as_str());
    }
    if info.listen_port != 0 {
        let _ = writeln!(s, "listen_port={}", info.listen_port);
    }
    if let Some(m) = info.fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    for p in &info.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", k.to_hex().as_str());
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let _ = writeln!(s, "last_handshake_time_sec={}", p.last_handshake_time_sec);
        let _ = writeln!(s, "last_handshake_time_nsec={}", p.last_handshake_time_nsec);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_interval
        );
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
    }
    s
}

/// Parses the body of a `set=1` request (the lines after `set=1`, up to the empty line).
///
/// Strict, as the spec asks of implementations: an unknown key, a device key after the first
/// peer, or a peer key before any `public_key` is an error.
pub fn parse_device_update(body: &str) -> Result<DeviceUpdate, WgError> {
    let mut u = DeviceUpdate::default();
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        let (key, value) = split_line(line)?;
        if key == "public_key" {
            u.peers.push(PeerUpdate::upsert(
                PublicKey::from_hex(value)
                    .map_err(|e| protocol(format!("peer public_key: {e}")))?,
            ));
            continue;
        }
        match u.peers.last_mut() {
            None => match key {
                "private_key" => u.private_key = Some(PrivateKey::from_hex(value)?),
                "listen_port" => u.listen_port = Some(parse_num(key, value)?),
                "fwmark" => u.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => u.replace_peers = parse_bool(key, value)?,
                _ => return Err(protocol(format!("unknown device key {key:?}"))),
            },
            Some(p) => match key {
                "remove" => p.remove = parse_bool(key, value)?,
                "update_only" => p.update_only = parse_bool(key, value)?,
                "preshared_key" => p.preshared_key = Some(PresharedKey::from_hex(value)?),
                "endpoint" => p.endpoint = Some(parse_endpoint(value)?),
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive_interval = Some(parse_num(key, value)?)
                }
                "replace_allowed_ips" => p.replace_allowed_ips = parse_bool(key, value)?,
                "allowed_ip" => p.allowed_ips.push(parse_allowed_ip(value)?),
                "protocol_version" if value != "1" => {
                    return Err(protocol(format!("unsupported protocol_version={value}")));
                }
                "protocol_version" => {}
                _ => {
                    return Err(protocol(format!(
                        "unknown or misplaced key {key:?} in a peer section"
                    )))
                }
            },
        }
    }
    Ok(u)
}

/// Formats the body of a `set=1` request (without `set=1` and the final empty line).
pub fn format_device_update(u: &DeviceUpdate) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut s = Zeroizing::new(String::new());
    if let Some(k) = &u.private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex().as_str());
    }
    if let Some(p) = u.listen_port {
        let _ = writeln!(s, "listen_port={p}");
    }
    if let Some(m) = u.fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    if u.replace_peers {
        let _ = writeln!(s, "replace_peers=true");
    }
    for p in &u.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if p.remove {
            let _ = writeln!(s, "remove=true");
            continue;
        }
        if p.update_only {
            let _ = writeln!(s, "update_only=true");
        }
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", k.to_hex().as_str());
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        if let Some(k) = p.persistent_keepalive_interval {
            let _ = writeln!(s, "persistent_keepalive_interval={k}");
        }
        if p.replace_allowed_ips {
            let _ = writeln!(s, "replace_allowed_ips=true");
        }
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
    }
    s
}

/// Reads one line of at most [`MAX_LINE`] bytes, without its `\n`. `Ok(None)` at end of stream.
pub(crate) fn read_line(r: &mut impl BufRead) -> io::Result<Option<Zeroizing<String>>> {
    let mut line = Zeroizing::new(String::new());
    let n = r.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut short",
        ));
    }
    line.pop();
    Ok(Some(line))
}

/// Reads an answer: `key=value` lines, then `errno=N`, then an empty line. Returns the body (the
/// lines before `errno=`) and N.
pub(crate) fn read_answer(r: &mut impl BufRead) -> io::Result<(Zeroizing<String>, i32)> {
    let mut body = Zeroizing::new(String::new());
    loop {
        let line = read_line(r)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "answer ended before errno=")
        })?;
        if let Some(n) = line.strip_prefix("errno=") {
            let errno = n.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad errno line {n:?}"))
            })?;
            // The empty line that ends the answer (some implementations close instead).
            match read_line(r)? {
                None => {}
                Some(l) if l.is_empty() => {}
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "errno= not followed by an empty line",
                    ))
                }
            }
            return Ok((body, errno));
        }
        if body.len() + line.len() + 1 > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too large",
            ));
        }
        body.push_str(&line);
        body.push('\n');
    }
}

/// A client of a device's UAPI socket. Each request opens its own connection, as `wg` does.
#[derive(Clone, Debug)]
pub struct Uapi {
    path: PathBuf,
    timeout: Duration,
}

impl Uapi {
    /// The client for interface `ifname` (`/var/run/wireguard/<ifname>.sock`); checks that a
    /// device answers there.
    pub fn connect(ifname: &str) -> Result<Self, WgError> {
        crate::link::validate_ifname(ifname)?;
        let u = Self::at_path(socket_path(ifname));
        u.open()?;
        Ok(u)
    }

    /// The client for a socket at another path (does not connect yet).
    pub fn at_path(path: impl Into<PathBuf>) -> Self {
        Uapi {
            path: path.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets how long to wait for the device's answer (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<UnixStream, WgError> {
        let io_err = |source| WgError::Io {
            path: self.path.clone(),
            source,
        };
        let s = UnixStream::connect(&self.path).map_err(io_err)?;
        s.set_read_timeout(Some(self.timeout)).map_err(io_err)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io_err)?;
        Ok(s)
    }

    fn exchange(&self, op: &'static str, request: &[u8]) -> Result<Zeroizing<String>, WgError> {
        let io_err = |source| WgError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = self.open()?;
        s.write_all(request).map_err(io_err)?;
        let mut r = BufReader::new(&s);
        let (body, errno) = read_answer(&mut r).map_err(io_err)?;
        if errno != 0 {
            return Err(WgError::Errno { op, errno });
        }
        Ok(body)
    }

    /// `get=1`: the device's state.
    pub fn get(&self) -> Result<DeviceInfo, WgError> {
        let body = self.exchange("get", b"get=1\n\n")?;
        parse_device_info(&body)
    }

    /// `set=1`: applies a change.
    pub fn set(&self, update: &DeviceUpdate) -> Result<(), WgError> {
        let body = format_device_update(update);
        let mut req = Zeroizing::new(String::with_capacity(body.len() + 8));
        req.push_str("set=1\n");
        req.push_str(&body);
        req.push('\n');
        self.exchange("set", req.as_bytes()).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PRIV: &str = "a8dac1d8a70a751f0f699fb14ba1cff7b79cf4fbd8f09f44b6e4ba6b3e9a4d1b";

    /// A `get=1` body as the spec's example and wireguard-go write it.
    const SAMPLE_GET: &str = "\
private_key=a8dac1d8a70a751f0f699fb14ba1cff7b79cf4fbd8f09f44b6e4ba6b3e9a4d1b
listen_port=12912
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52
protocol_version=1
endpoint=[abcd:23::33%2]:51820
last_handshake_time_sec=1700000000
last_handshake_time_nsec=123456789
tx_bytes=38333
rx_bytes=2224
persistent_keepalive_interval=0
allowed_ip=192.168.4.4/32
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceae6ae9e6101
endpoint=182.122.22.19:3233
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=111
allowed_ip=192.168.4.6/32
allowed_ip=10.0.0.0/8
";

    #[test]
    fn parses_get_sample() {
        let info = parse_device_info(SAMPLE_GET).unwrap();
        let own = PrivateKey::from_hex(PRIV).unwrap().public_key();
        assert_eq!(info.public_key, Some(own));
        assert_eq!(info.listen_port, 12912);
        assert_eq!(info.fwmark, None);
        assert_eq!(info.peers.len(), 2);
        let p = &info.peers[0];
        assert_eq!(p.public_key, PublicKey::from_hex(K2).unwrap());
        assert!(p.preshared_key.is_some());
        assert_eq!(p.endpoint.unwrap().port(), 51820);
        assert_eq!(
            p.allowed_ips,
            vec!["192.168.4.4/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(p.last_handshake_time_sec, 1_700_000_000);
        assert_eq!(p.last_handshake_time_nsec, 123_456_789);
        assert_eq!(
            p.last_handshake(),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789))
        );
        assert_eq!((p.tx_bytes, p.rx_bytes), (38333, 2224));
        let q = &info.peers[1];
        assert_eq!(q.last_handshake(), None);
        assert_eq!(q.persistent_keepalive_interval, 111);
        assert_eq!(q.allowed_ips.len(), 2);
        assert_eq!(q.endpoint, Some("182.122.22.19:3233".parse().unwrap()));
    }

    #[test]
    fn get_round_trip() {
        let info = parse_device_info(SAMPLE_GET).unwrap();
        let k = PrivateKey::from_hex(PRIV).unwrap();
        let text = format_device_info(&info, Some(&k));
        assert_eq!(parse_device_info(&text).unwrap(), info);
        // Without the private key, the device's own key is simply absent.
        let text = format_device_info(&info, None);
        assert!(!text.contains("private_key"));
        assert_eq!(parse_device_info(&text).unwrap().public_key, None);
    }

    #[test]
    fn parses_boringtun_own_public_key_and_skips_unknown_keys() {
        let body = format!("own_public_key={K1}\nlisten_port=7\nfuture_key=1\npublic_key={K2}\nfuture_peer_key=x\nrx_bytes=5\n");
        let info = parse_device_info(&body).unwrap();
        assert_eq!(info.public_key, Some(PublicKey::from_hex(K1).unwrap()));
        assert_eq!(info.peers[0].rx_bytes, 5);
    }

    #[test]
    fn rejects_malformed_get() {
        for bad in [
            "listen_port".to_string(),
            "listen_port=70000".into(),
            format!("public_key={}", &K1[..10]),
            format!("public_key={K1}\nendpoint=nowhere"),
            format!("public_key={K1}\nallowed_ip=10.0.0.1"),
            format!("public_key={K1}\nlast_handshake_time_nsec=1000000000"),
            format!("public_key={K1}\nprotocol_version=2"),
            format!("public_key={K1}\nrx_bytes=-1"),
            "errno=0".into(),
        ] {
            assert!(parse_device_info(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn set_round_trip_and_exact_text() {
        let u = DeviceUpdate {
            private_key: Some(PrivateKey::from_hex(PRIV).unwrap()),
            listen_port: Some(51820),
            fwmark: None,
            replace_peers: false,
            peers: vec![
                PeerUpdate {
                    endpoint: Some("10.0.0.2:51820".parse().unwrap()),
                    persistent_keepalive_interval: Some(25),
                    replace_allowed_ips: true,
                    allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
                    ..PeerUpdate::upsert(PublicKey::from_hex(K1).unwrap())
                },
                PeerUpdate::remove(PublicKey::from_hex(K2).unwrap()),
            ],
        };
        let text = format_device_update(&u);
        assert_eq!(
            text.as_str(),
            format!(
                "private_key={PRIV}\nlisten_port=51820\npublic_key={K1}\nendpoint=10.0.0.2:51820\n\
                 persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.244.2.0/24\n\
                 public_key={K2}\nremove=true\n"
            )
        );
        let back = parse_device_update(&text).unwrap();
        assert_eq!(back.peers, u.peers);
        assert_eq!(back.listen_port, Some(51820));
        assert_eq!(
            back.private_key.unwrap().expose_bytes(),
            u.private_key.unwrap().expose_bytes()
        );
    }

    #[test]
    fn parses_wg_set_request() {
        // What `wg set wg0 listen-port 51820 peer <K1> allowed-ips 10.1.0.0/16 endpoint ...` sends.
        let body = format!(
            "listen_port=51820\npublic_key={K1}\nendpoint=10.0.0.2:51820\nreplace_allowed_ips=true\n\
             allowed_ip=10.1.0.0/16\nupdate_only=false\nprotocol_version=1\n"
        );
        let u = parse_device_update(&body).unwrap();
        assert_eq!(u.listen_port, Some(51820));
        assert!(u.peers[0].replace_allowed_ips);
        assert!(!u.peers[0].update_only);
    }

    #[test]
    fn rejects_malformed_set() {
        for bad in [
            "nonsense=1".to_string(),
            "listen_port=x".into(),
            "replace_peers=yes".into(),
            "remove=true".into(),
            format!("public_key={K1}\nlisten_port=1"),
            format!("public_key={K1}\nremove=1"),
            format!("public_key={K1}\nallowed_ip=300.0.0.0/8"),
            format!("public_key={K1}\npreshared_key=00"),
            "private_key=zz".into(),
        ] {
            assert!(parse_device_update(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_answers() {
        let mut r = io::Cursor::new(b"listen_port=1\nerrno=0\n\n".to_vec());
        let (body, errno) = read_answer(&mut r).unwrap();
        assert_eq!((body.as_str(), errno), ("listen_port=1\n", 0));
        let mut r = io::Cursor::new(b"errno=22\n\n".to_vec());
        assert_eq!(read_answer(&mut r).unwrap().1, 22);
        let mut r = io::Cursor::new(b"listen_port=1\n".to_vec());
        assert!(read_answer(&mut r).is_err());
        let mut r = io::Cursor::new(b"errno=x\n\n".to_vec());
        assert!(read_answer(&mut r).is_err());
        let mut long = vec![b'a'; MAX_LINE as usize + 10];
        long.push(b'\n');
        assert!(read_answer(&mut io::Cursor::new(long)).is_err());
    }
}
