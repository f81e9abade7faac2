//! Sizing the UDP socket buffers of the boringtun device, and clearing Don't Fragment on them.
//!
//! boringtun 0.7 creates its UDP sockets inside `DeviceHandle` and offers no hook to set socket
//! options on them. They are in this process, though: this module finds them by listing
//! `/proc/self/fd`, obtains a duplicate of each socket descriptor with `pidfd_getfd` on our own
//! process (safe code, no raw descriptor juggling), keeps the UDP sockets bound to the device's
//! listen port, and sets `SO_RCVBUF`/`SO_SNDBUF` on them. A duplicate refers to the same socket,
//! so the option applies to boringtun's socket.
//!
//! Why: in a network namespace `net.core.rmem_default` cannot be changed and the default receive
//! buffer (~200 KiB) overflows under TCP bursts through the tunnel; the drops show up as TCP
//! retransmits (see the design notes, anchors.md). The `*FORCE` variants (root or
//! `CAP_NET_ADMIN`) go beyond `net.core.rmem_max`; without the capability the plain options
//! apply, capped by the kernel.
//!
//! The same pass sets `IP_MTU_DISCOVER` to `IP_PMTUDISC_DONT` on the IPv4 sockets, as the kernel's
//! WireGuard does for its encapsulated packets (it sends them with DF clear): an encapsulated
//! packet too large for some hop of the underlay is fragmented by that hop instead of dropped.
//! With Linux's default (`IP_PMTUDISC_WANT`, DF set) such a packet is dropped and only an ICMP
//! "fragmentation needed" lets the sender adapt; on a path whose middleboxes drop that ICMP (common
//! on rented networks) every full-size packet disappears: a PMTU black hole that stalls TCP between
//! pods. IPv6 routers never fragment; there the sender fragments to the path MTU it learns.

use std::net::SocketAddr;

use rustix::net::sockopt;

/// What [`tune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferReport {
    /// The sockets found (UDP, bound to the listen port; each once, though boringtun holds some
    /// under two descriptors), with the receive and send buffer sizes
    /// the kernel reports after the change (the kernel doubles the requested value for its
    /// bookkeeping).
    pub sockets: Vec<(SocketAddr, usize, usize)>,
    /// Whether the forced options (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`) were accepted.
    pub forced: bool,
    /// How many IPv4 sockets now send with Don't Fragment clear (`IP_PMTUDISC_DONT`).
    pub df_cleared: usize,
}

/// Sets the send and receive buffers of every UDP socket of this process bound to `port` to
/// `bytes` (0: leaves them alone), and clears Don't Fragment on the IPv4 ones. Returns what it
/// found; an empty report if no such socket exists.
pub fn tune(port: u16, bytes: usize) -> std::io::Result<BufferReport> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )?;
    let mut report = BufferReport {
        forced: true,
        ..Default::default()
    };
    // boringtun holds some sockets under two descriptors: count each socket once.
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // Only sockets; the link target reads "socket:[inode]".
        match std::fs::read_link(entry.path()) {
            Ok(t) if t.to_string_lossy().starts_with("socket:") => {}
            _ => continue,
        }
        // The descriptor may have been closed (or reused) meanwhile: every check below is on the
        // duplicate we hold, so at worst we skip it or tune another UDP socket on our port.
        let Ok(dup) =
            rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        if sockopt::socket_type(&dup).ok() != Some(rustix::net::SocketType::DGRAM) {
            continue;
        }
        let Some(local) = rustix::net::getsockname(&dup)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok())
        else {
            continue;
        };
        if local.port() != port {
            continue;
        }
        match rustix::fs::fstat(&dup) {
            Ok(st) if seen.insert(st.st_ino) => {}
            _ => continue,
        }
        if local.is_ipv4()
            && sockopt::set_ip_mtu_discover(&dup, sockopt::Ipv4PathMtuDiscovery::DONT).is_ok()
        {
            report.df_cleared += 1;
        }
        if bytes == 0 {
            report.forced = false;
        } else if !(sockopt::set_socket_recv_buffer_size_force(&dup, bytes).is_ok()
            && sockopt::set_socket_send_buffer_size_force(&dup, bytes).is_ok())
        {
            report.forced = false;
            sockopt::set_socket_recv_buffer_size(&dup, bytes)?;
            sockopt::set_socket_send_buffer_size(&dup, bytes)?;
        }
        report.sockets.push((
            local,
            sockopt::socket_recv_buffer_size(&dup)?,
            sockopt::socket_send_buffer_size(&dup)?,
        ));
    }
    if report.sockets.is_empty() {
        report.forced = false;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunes_a_udp_socket_of_this_process() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let r = tune(port, 4 << 20).unwrap();
        assert_eq!(r.sockets.len(), 1, "{r:?}");
        let (addr, rcv, snd) = r.sockets[0];
        assert_eq!(addr.port(), port);
        // Without CAP_NET_ADMIN the kernel caps at rmem_max; with it, we get 2 x 4 MiB.
        if r.forced {
            assert!(rcv >= 4 << 20 && snd >= 4 << 20, "{r:?}");
        }
        // The original socket sees the change.
        assert_eq!(sockopt::socket_recv_buffer_size(&s).unwrap(), rcv);
        // And sends with Don't Fragment clear (the default would be WANT: DF set).
        assert_eq!(r.df_cleared, 1, "{r:?}");
        assert_eq!(
            sockopt::ip_mtu_discover(&s).unwrap(),
            sockopt::Ipv4PathMtuDiscovery::DONT
        );
    }

    #[test]
    fn zero_bytes_leaves_the_buffers_but_clears_df() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = sockopt::socket_recv_buffer_size(&s).unwrap();
        let r = tune(s.local_addr().unwrap().port(), 0).unwrap();
        assert_eq!(sockopt::socket_recv_buffer_size(&s).unwrap(), before);
        assert!(!r.forced);
        assert_eq!(r.df_cleared, 1, "{r:?}");
    }
}
