//! A one-peer WireGuard node: starts a [`overlay::wg::Device`], configures it over its UAPI socket,
//! assigns the tunnel address and routes, prints `ready <public key> <port>` and runs until
//! SIGTERM or SIGINT, then stops the device (removing interface and socket) and exits 0.
//!
//! Used by `tests/netns.rs` inside network namespaces (`ip netns exec NS wg_node ...`), and handy
//! for trying the device by hand:
//!
//! ```text
//! wg genkey > a.key
//! wg_node --ifname wga --private-key-file a.key --address 10.232.1.0 --route 10.232.0.0/16 \
//!   --peer-public-key <B's key> --peer-endpoint 10.231.0.2:51820 --peer-allowed-ip 10.232.2.0/24
//! ```
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use ipnet::IpNet;
use overlay::link::{self, Ip};
use overlay::wg::{Device, DeviceConfig, DeviceUpdate, PeerUpdate, PrivateKey, PublicKey, Uapi};

/// Run one WireGuard device with one peer until killed.
#[derive(Parser, Debug)]
struct Args {
    /// Interface name (must be unique on the machine: the UAPI socket directory is shared).
    #[arg(long)]
    ifname: String,
    /// File holding the private key in base64 (`wg genkey`).
    #[arg(long)]
    private_key_file: PathBuf,
    /// UDP port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Tunnel address, assigned as /32.
    #[arg(long)]
    address: IpAddr,
    /// Routes through the interface.
    #[arg(long)]
    route: Vec<IpNet>,
    /// The peer's public key (base64).
    #[arg(long)]
    peer_public_key: String,
    /// The peer's endpoint.
    #[arg(long)]
    peer_endpoint: Option<SocketAddr>,
    /// The peer's allowed IPs.
    #[arg(long)]
    peer_allowed_ip: Vec<IpNet>,
    /// Persistent keepalive, seconds (0: off).
    #[arg(long, default_value_t = 0)]
    keepalive: u16,
    /// Tunnel MTU (default: underlay MTU towards the peer's endpoint - 80, or 1420).
    #[arg(long)]
    mtu: Option<u32>,
    /// boringtun worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Data path: boringtun or fast.
    #[arg(long, default_value_t = overlay::wg::WgEngine::DEFAULT)]
    engine: overlay::wg::WgEngine,
    /// SO_RCVBUF/SO_SNDBUF to ask for (bytes; 0 leaves the kernel default).
    #[arg(long, default_value_t = overlay::wg::device::DEFAULT_SOCKET_BUFFER)]
    socket_buffer: usize,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("wg_node: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let key_text = zeroize::Zeroizing::new(std::fs::read_to_string(&args.private_key_file)?);
    let private_key = PrivateKey::from_base64(&key_text)?;
    let peer = PublicKey::from_base64(&args.peer_public_key)?;
    let ip = Ip::new();

    let mtu = match (args.mtu, args.peer_endpoint) {
        (Some(m), _) => m,
        (None, Some(e)) => link::tunnel_mtu(ip.underlay_mtu(e.ip())?),
        (None, None) => 1420,
    };

    // Start with a throwaway key, then set the real one and the peer over UAPI, as a daemon
    // reconfiguring a running device would. (The port is given at start: boringtun 0.7 leaks the
    // old sockets when a running device's port changes.)
    let mut cfg = DeviceConfig::new(PrivateKey::generate()?);
    cfg.listen_port = args.listen_port;
    cfg.mtu = Some(mtu);
    cfg.threads = args.threads;
    cfg.socket_buffer_bytes = args.socket_buffer;
    cfg.engine = args.engine;
    let device = Device::start(&args.ifname, cfg)?;

    let uapi = Uapi::connect(&args.ifname)?;
    uapi.set(&DeviceUpdate {
        private_key: Some(private_key.clone()),
        listen_port: Some(args.listen_port), // unchanged: nothing is sent for it
        peers: vec![PeerUpdate {
            endpoint: args.peer_endpoint,
            persistent_keepalive_interval: Some(args.keepalive),
            replace_allowed_ips: true,
            allowed_ips: args.peer_allowed_ip.clone(),
            ..PeerUpdate::upsert(peer)
        }],
        ..Default::default()
    })?;
    let info = uapi.get()?;
    if info.public_key != Some(private_key.public_key()) {
        return Err("the device does not report the key just set".into());
    }

    ip.add_address(&args.ifname, args.address)?;
    ip.set_up(&args.ifname)?;
    for r in &args.route {
        ip.route_replace(*r, &args.ifname)?;
    }
    eprintln!(
        "wg_node {}: mtu {mtu}, socket buffers {:?}",
        args.ifname,
        device.socket_buffers()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Signal handlers are in place: only now tell the caller we are ready.
        println!(
            "ready {} {}",
            private_key.public_key().to_base64(),
            info.listen_port
        );
        std::io::stdout().flush()?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    drop(device);
    eprintln!("wg_node {}: stopped", args.ifname);
    Ok(())
}
