//! The kernel interfaces of the fast data path: a TUN opened with `IFF_VNET_HDR` and TCP
//! segmentation offload, and UDP sockets with `UDP_SEGMENT` (GSO) on send and `UDP_GRO` on
//! receive. The only `unsafe` of the fast path is here, each block with its reason.

#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use super::offload::VNET_HDR_LEN;

/// `UDP_SEGMENT` (linux/udp.h): the segment size of a GSO send.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams.
const UDP_GRO: libc::c_int = 104;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A TUN interface whose packets carry a `virtio_net_hdr` and may be TCP super-packets.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name` with offloads enabled; non-blocking.
    /// The interface disappears when the descriptor closes.
    pub fn open(name: &str) -> io::Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        // SAFETY: a plain open(2) of a constant NUL-terminated path.
        let raw = cvt(unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        })?;
        // SAFETY: `raw` was just returned by open(2) and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is, for the duration
        // of the call only.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })?;
        let offload = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags).
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offload as libc::c_ulong,
            )
        })?;
        Ok(Tun { fd })
    }

    /// Reads one frame (virtio header + packet); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::io::read(&self.fd, buf)?)
    }

    /// Writes one frame (virtio header + packet).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        Ok(rustix::io::write(&self.fd, frame)?)
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A UDP socket of the device (one per address family).
#[derive(Debug)]
pub struct Udp {
    fd: OwnedFd,
    v6: bool,
    /// The kernel accepted `UDP_SEGMENT` sends so far.
    pub gso: bool,
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one int, passed by pointer with its size, valid for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &v as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

impl Udp {
    /// A socket bound to `port` (0: any) on all addresses of the family, with receive GRO (when
    /// the kernel has it), Don't Fragment cleared and, if `buffer` > 0, SO_RCVBUF/SO_SNDBUF
    /// raised (SO_*BUFFORCE first: we are root).
    pub fn bind(v6: bool, port: u16, buffer: usize) -> io::Result<Udp> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: socket(2) with constant arguments.
        let raw = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if v6 {
            setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
            setsockopt_int(
                &fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DONT,
            )?;
        } else {
            setsockopt_int(
                &fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            )?;
        }
        if buffer > 0 {
            let b = libc::c_int::try_from(buffer).unwrap_or(libc::c_int::MAX);
            for (force, plain) in [
                (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
                (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            ] {
                if setsockopt_int(&fd, libc::SOL_SOCKET, force, b).is_err() {
                    let _ = setsockopt_int(&fd, libc::SOL_SOCKET, plain, b);
                }
            }
        }
        let _ = setsockopt_int(&fd, libc::SOL_UDP, UDP_GRO, 1);
        let addr = if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        };
        let (ss, len) = sockaddr(addr);
        // SAFETY: `ss` holds a sockaddr of `len` bytes, valid for the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        })?;
        Ok(Udp { fd, v6, gso: true })
    }

    /// The bound port.
    pub fn local_port(&self) -> io::Result<u16> {
        let a = rustix::net::getsockname(&self.fd)?;
        let a: SocketAddr = a
            .try_into()
            .map_err(|_| io::Error::other("not an IP socket"))?;
        Ok(a.port())
    }

    /// Sets SO_MARK (0 clears it).
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        setsockopt_int(
            &self.fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    }

    /// Receives datagrams without blocking: returns the bytes (several datagrams of
    /// `segment` bytes each, the last possibly shorter, when the kernel coalesced them; `segment`
    /// is the whole length otherwise) and the sender.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        // SAFETY: plain old data, zero is valid.
        let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: plain old data, zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = &mut ss as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` (name, one iovec over `buf`, control) is valid and
        // large enough for the lengths given, for the duration of the call.
        let n =
            cvt_size(unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
        let mut segment = n;
        // SAFETY: CMSG_* walk the control buffer the kernel just filled, within
        // msg_controllen; the UDP_GRO payload is one int.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if v > 0 {
                        segment = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let from = from_sockaddr(&ss).ok_or_else(|| io::Error::other("unknown address family"))?;
        Ok((n, segment, from))
    }

    /// Sends `data` to `to`: with `segment` < `data.len()`, as datagrams of `segment` bytes (the
    /// last possibly shorter) in one system call (UDP GSO), falling back to one call per
    /// datagram if the kernel refuses GSO. Blocks while the send buffer is full.
    pub fn send(&mut self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        let to = match (to, self.v6) {
            (SocketAddr::V4(_), true) | (SocketAddr::V6(_), false) => {
                return Err(io::Error::other("address family mismatch"))
            }
            _ => to,
        };
        if segment >= data.len() || !self.gso {
            for d in data.chunks(segment.max(1)) {
                self.sendmsg(d, None, to)?;
            }
            return Ok(());
        }
        match self.sendmsg(data, Some(segment as u16), to) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT)
                ) =>
            {
                // No GSO here (or not for this route): one datagram per call from now on.
                self.gso = false;
                for d in data.chunks(segment) {
                    self.sendmsg(d, None, to)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn sendmsg(&self, data: &[u8], segment: Option<u16>, to: SocketAddr) -> io::Result<()> {
        let (ss, len) = sockaddr(to);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: plain old data, zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = &ss as *const _ as *mut libc::c_void;
        msg.msg_namelen = len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(seg) = segment {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: CMSG_SPACE is a pure size computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            // SAFETY: the control buffer (32 bytes, 8-aligned) holds one cmsghdr with a u16
            // payload (CMSG_SPACE(2) = 24 bytes); CMSG_FIRSTHDR is non-null for that length.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
            }
        }
        loop {
            // SAFETY: name, iovec (over `data`, only read) and control are valid for the call.
            let r = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            match cvt_size(r) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Udp {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An eventfd to wake a thread blocked in [`poll`].
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A non-blocking eventfd.
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd(2) with constant flags; the result is checked before use.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Makes the descriptor readable.
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Makes it unreadable again.
    pub fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut b);
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` (raw descriptors, -1 to skip a slot) is readable or `timeout_ms`
/// passes; returns which are readable (or in error). The caller keeps the descriptors open
/// during the call.
pub fn poll_readable<const N: usize>(fds: [libc::c_int; N], timeout_ms: i32) -> [bool; N] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `p` is a valid array of N pollfd for the call; poll only reads fd/events and
    // writes revents. A descriptor closed meanwhile gives POLLNVAL, not undefined behaviour.
    let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if r <= 0 {
        return [false; N];
    }
    p.map(|x| x.revents != 0)
}
