//! Pure packet work for the fast data path: the `virtio_net_hdr` that a TUN opened with
//! `IFF_VNET_HDR` puts before every packet, Internet checksums, splitting a TCP super-packet
//! (TSO, as read from the TUN) into MSS-sized segments, and coalescing decrypted in-order TCP
//! segments of one flow into a super-packet (GRO, as written to the TUN).
//!
//! The same work wireguard-go's `tun/offload_linux.go` does; nothing here touches a descriptor.
//! Every function takes packets from the TUN or the network as untrusted: malformed input gives
//! an error or is passed through unchanged, never a panic.

/// Length of `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), without `num_buffers`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is to be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (a flag or-ed into the type).
pub const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;
/// Largest IP packet: IPv4's total length (and, here, IPv6's payload length) is 16 bits.
pub const MAX_PACKET: usize = 65535;

/// `struct virtio_net_hdr` (little-endian fields: the TUN uses the host's byte order, and
/// virtio 1.0 little-endian, which is the same on the hosts meshd runs on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` or 0.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (IP + TCP) of a GSO packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO packet.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes; `None` if shorter.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Why a packet from the TUN could not be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The virtio header and the packet disagree (lengths, offsets, protocol).
    #[error("malformed offload packet: {0}")]
    Malformed(&'static str),
    /// A GSO type this device did not enable.
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
}

/// Ones' complement sum of `data` as big-endian 16-bit words (an odd last byte is the high byte
/// of a last word), added to `initial`, not folded.
pub fn sum_be(data: &[u8], initial: u64) -> u64 {
    // Native-endian 32-bit words summed into 64 bits, then folded: the ones' complement sum is
    // byte-order independent up to a final swap (RFC 1071, 2.B).
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    }
    let native = fold(acc);
    let mut s = initial + u64::from(u16::from_be(native));
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        s += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        s += u64::from(*last) << 8;
    }
    s
}

/// Folds a 64-bit ones' complement accumulator to 16 bits (not inverted).
pub fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum of `data` with `initial` (inverted, ready to store).
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum_be(data, initial))
}

/// The pseudo-header sum (not folded) for a transport segment of `len` bytes.
pub fn pseudo_sum(proto: u8, src: &[u8], dst: &[u8], len: usize) -> u64 {
    let s = sum_be(src, 0) + sum_be(dst, 0) + u64::from(proto);
    s + len as u64
}

/// The IP layer of a packet as the offload code needs it.
#[derive(Clone, Copy, Debug)]
struct IpInfo {
    v6: bool,
    /// IP header length (IPv6: 40; extension headers are not supported).
    hlen: usize,
    proto: u8,
}

fn ip_info(p: &[u8]) -> Option<IpInfo> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let hlen = usize::from(p[0] & 0x0f) * 4;
            (hlen >= 20 && p.len() >= hlen).then_some(IpInfo {
                v6: false,
                hlen,
                proto: p[9],
            })
        }
        6 if p.len() >= 40 => Some(IpInfo {
            v6: true,
            hlen: 40,
            proto: p[6],
        }),
        _ => None,
    }
}

/// Source and destination address bytes.
fn addrs(p: &[u8], v6: bool) -> (&[u8], &[u8]) {
    if v6 {
        (&p[8..24], &p[24..40])
    } else {
        (&p[12..16], &p[16..20])
    }
}

/// Completes a partial checksum (`F_NEEDS_CSUM` without GSO): the field holds the pseudo-header
/// sum; the checksum of `csum_start..` is computed over it.
pub fn complete_checksum(p: &mut [u8], h: &VnetHdr) -> Result<(), OffloadError> {
    let start = usize::from(h.csum_start);
    let at = start + usize::from(h.csum_offset);
    if at + 2 > p.len() {
        return Err(OffloadError::Malformed("checksum offset beyond the packet"));
    }
    let initial = u16::from_be_bytes([p[at], p[at + 1]]);
    p[at] = 0;
    p[at + 1] = 0;
    let c = checksum(&p[start..], u64::from(initial));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Splits the TCP super-packet `p` (described by `h`, as read from the TUN) into segments of at
/// most `h.gso_size` payload bytes, each a complete IP packet with its own IP length, IPv4 ID and
/// header checksum, sequence number, flags (CWR on the first only, FIN/PSH on the last only)
/// and TCP checksum. Calls `emit` with each, in order. A packet without GSO is passed whole
/// (its checksum completed if `F_NEEDS_CSUM`).
pub fn split(
    p: &mut [u8],
    h: &VnetHdr,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let gso = h.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if h.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(p, h)?;
        }
        emit(p);
        return Ok(());
    }
    if gso != GSO_TCPV4 && gso != GSO_TCPV6 {
        return Err(OffloadError::UnsupportedGso(h.gso_type));
    }
    let ip = ip_info(p).ok_or(OffloadError::Malformed("not an IP packet"))?;
    if ip.v6 != (gso == GSO_TCPV6) || ip.proto != PROTO_TCP {
        return Err(OffloadError::Malformed(
            "GSO type does not match the packet",
        ));
    }
    let iph = usize::from(h.csum_start);
    if iph != ip.hlen || iph + 20 > p.len() {
        return Err(OffloadError::Malformed("csum_start is not the TCP header"));
    }
    let tcph = usize::from(p[iph + 12] >> 4) * 4;
    let hdr_len = iph + tcph;
    if tcph < 20 || hdr_len > p.len() {
        return Err(OffloadError::Malformed("TCP header length"));
    }
    let mss = usize::from(h.gso_size);
    if mss == 0 {
        return Err(OffloadError::Malformed("gso_size 0"));
    }
    let (src, dst) = addrs(p, ip.v6);
    let (src, dst) = (src.to_vec(), dst.to_vec());
    let seq0 = u32::from_be_bytes([p[iph + 4], p[iph + 5], p[iph + 6], p[iph + 7]]);
    let id0 = u16::from_be_bytes([p[4], p[5]]);
    let flags0 = p[iph + 13];
    let payload = p.len() - hdr_len;
    let mut off = 0usize;
    let mut i = 0usize;
    loop {
        let n = mss.min(payload - off);
        let last = off + n >= payload;
        scratch.clear();
        scratch.extend_from_slice(&p[..hdr_len]);
        scratch.extend_from_slice(&p[hdr_len + off..hdr_len + off + n]);
        let seg = &mut scratch[..];
        let total = hdr_len + n;
        if ip.v6 {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10] = 0;
            seg[11] = 0;
            let c = checksum(&seg[..iph], 0);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        seg[iph + 4..iph + 8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
        let mut fl = flags0;
        if !last {
            fl &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            fl &= !TCP_CWR;
        }
        seg[iph + 13] = fl;
        seg[iph + 16] = 0;
        seg[iph + 17] = 0;
        let c = checksum(&seg[iph..], pseudo_sum(PROTO_TCP, &src, &dst, total - iph));
        seg[iph + 16..iph + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
        off += n;
        i += 1;
        if last {
            return Ok(());
        }
    }
}

/// One output packet of [`Gro`]: a buffer starting with room for the virtio header.
#[derive(Debug)]
struct Item {
    buf: Vec<u8>,
    /// Coalescable TCP: header lengths and the segment size; `None` for anything else.
    tcp: Option<TcpItem>,
}

#[derive(Debug, Clone, Copy)]
struct TcpItem {
    v6: bool,
    iph: usize,
    tcph: usize,
    /// Payload length of the first segment (all but the last merged one have it).
    gso_size: usize,
    /// Sequence number expected next.
    next_seq: u32,
    merged: usize,
    /// A shorter (final) segment or PSH was appended: nothing may follow.
    closed: bool,
}

/// Most buffers [`Gro`] keeps for reuse (each up to [`MAX_PACKET`] bytes of capacity).
const POOL_MAX: usize = 64;

/// Coalesces the packets of a receive batch (GRO): consecutive in-order TCP segments of one flow
/// (same addresses, ports, acknowledgment number, IP and TCP options) become one super-packet
/// with a GSO virtio header; everything else passes unchanged (with an empty virtio header).
/// Packets keep their order within a flow.
#[derive(Debug, Default)]
pub struct Gro {
    items: Vec<Item>,
    /// Recycled buffers.
    pool: Vec<Vec<u8>>,
}

impl Gro {
    /// An empty batch.
    pub fn new() -> Gro {
        Gro::default()
    }

    /// Packets waiting for [`Gro::flush`].
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No packet waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds a decrypted IP packet to the batch.
    pub fn push(&mut self, p: &[u8]) {
        let tcp = tcp_candidate(p);
        if let Some((ip, tcph, seq, pay, psh)) = tcp {
            // The most recent item of this flow only: merging behind a later packet of the same
            // flow would reorder.
            if let Some(idx) = self.items.iter().rposition(|it| same_flow(it, p, ip)) {
                if self.try_append(idx, p, ip, tcph, seq, pay, psh) {
                    return;
                }
            }
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        buf.extend_from_slice(p);
        let tcp = tcp.map(|(ip, tcph, seq, pay, psh)| TcpItem {
            v6: ip.v6,
            iph: ip.hlen,
            tcph,
            gso_size: pay,
            next_seq: seq.wrapping_add(pay as u32),
            merged: 0,
            closed: psh,
        });
        self.items.push(Item { buf, tcp });
    }

    #[allow(clippy::too_many_arguments)]
    fn try_append(
        &mut self,
        idx: usize,
        p: &[u8],
        ip: IpInfo,
        tcph: usize,
        seq: u32,
        pay: usize,
        psh: bool,
    ) -> bool {
        let it = &mut self.items[idx];
        let Some(t) = it.tcp.as_mut() else {
            return false;
        };
        let head = &it.buf[VNET_HDR_LEN..];
        let hl = ip.hlen + tcph;
        if t.closed
            || t.v6 != ip.v6
            || t.iph != ip.hlen
            || t.tcph != tcph
            || seq != t.next_seq
            || pay > t.gso_size
            || head.len() + pay > MAX_PACKET
            || !ip_headers_match(head, p, ip)
            // TCP options (timestamps) must be identical.
            || head[ip.hlen + 20..hl] != p[ip.hlen + 20..hl]
            || !tcp_checksum_ok(p, ip)
            || (t.merged == 0 && !tcp_checksum_ok(head, ip))
        {
            return false;
        }
        it.buf.extend_from_slice(&p[hl..]);
        t.next_seq = seq.wrapping_add(pay as u32);
        t.merged += 1;
        if pay < t.gso_size || psh {
            t.closed = true;
        }
        if psh {
            it.buf[VNET_HDR_LEN + ip.hlen + 13] |= TCP_PSH;
        }
        true
    }

    /// Finalises every item's headers and hands each frame (virtio header + packet) to `write`,
    /// in order; the batch is then empty.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8])) {
        for mut it in self.items.drain(..) {
            match it.tcp {
                Some(t) if t.merged > 0 => {
                    let p = &mut it.buf[VNET_HDR_LEN..];
                    let len = p.len();
                    if t.v6 {
                        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
                    } else {
                        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                        p[10] = 0;
                        p[11] = 0;
                        let c = checksum(&p[..t.iph], 0);
                        p[10..12].copy_from_slice(&c.to_be_bytes());
                    }
                    let (src, dst) = addrs(p, t.v6);
                    let ps = fold(pseudo_sum(PROTO_TCP, src, dst, len - t.iph));
                    p[t.iph + 16..t.iph + 18].copy_from_slice(&ps.to_be_bytes());
                    let h = VnetHdr {
                        flags: F_NEEDS_CSUM,
                        gso_type: if t.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                        hdr_len: (t.iph + t.tcph) as u16,
                        gso_size: t.gso_size as u16,
                        csum_start: t.iph as u16,
                        csum_offset: 16,
                    };
                    it.buf[..VNET_HDR_LEN].copy_from_slice(&h.encode());
                }
                _ => {} // the header is already zero (GSO_NONE, no flags)
            }
            write(&it.buf);
            // Bounded: a batch may hold a thousand small packets, and a recycled buffer keeps
            // the capacity of the largest super-packet it ever held.
            if self.pool.len() < POOL_MAX {
                self.pool.push(it.buf);
            }
        }
    }
}

/// A TCP packet that may be coalesced: (ip, tcp header length, seq, payload length, PSH).
fn tcp_candidate(p: &[u8]) -> Option<(IpInfo, usize, u32, usize, bool)> {
    let ip = ip_info(p)?;
    if ip.proto != PROTO_TCP {
        return None;
    }
    if ip.v6 {
        if usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 != p.len() {
            return None;
        }
    } else {
        if ip.hlen != 20 || usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
            return None;
        }
        // Fragments (MF or an offset) are not coalesced.
        if p[6] & 0x20 != 0 || (u16::from_be_bytes([p[6], p[7]]) & 0x1fff) != 0 {
            return None;
        }
    }
    let t = ip.hlen;
    if p.len() < t + 20 {
        return None;
    }
    let tcph = usize::from(p[t + 12] >> 4) * 4;
    if tcph < 20 || p.len() < t + tcph {
        return None;
    }
    let flags = p[t + 13];
    let psh = match flags {
        TCP_ACK => false,
        f if f == TCP_ACK | TCP_PSH => true,
        _ => return None,
    };
    let pay = p.len() - t - tcph;
    if pay == 0 {
        return None;
    }
    let seq = u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]]);
    Some((ip, tcph, seq, pay, psh))
}

/// Same addresses, ports and acknowledgment number (the flow key of wireguard-go's GRO).
fn same_flow(it: &Item, p: &[u8], ip: IpInfo) -> bool {
    let Some(t) = it.tcp else { return false };
    let head = &it.buf[VNET_HDR_LEN..];
    if t.v6 != ip.v6 || t.iph != ip.hlen {
        return false;
    }
    let (hs, hd) = addrs(head, t.v6);
    let (ps, pd) = addrs(p, ip.v6);
    let o = ip.hlen;
    hs == ps && hd == pd && head[o..o + 4] == p[o..o + 4] && head[o + 8..o + 12] == p[o + 8..o + 12]
}

/// IP fields that must agree for packets to be merged (TOS/traffic class, DF, TTL/hop limit).
fn ip_headers_match(a: &[u8], b: &[u8], ip: IpInfo) -> bool {
    if ip.v6 {
        // Version, traffic class and flow label; hop limit.
        a[0..4] == b[0..4] && a[7] == b[7]
    } else {
        a[1] == b[1] && a[6] == b[6] && a[8] == b[8]
    }
}

fn tcp_checksum_ok(p: &[u8], ip: IpInfo) -> bool {
    let (src, dst) = addrs(p, ip.v6);
    let t = ip.hlen;
    fold(sum_be(
        &p[t..],
        pseudo_sum(PROTO_TCP, src, dst, p.len() - t),
    )) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 the slow way.
    fn naive_checksum(data: &[u8], initial: u64) -> u16 {
        let mut s = initial;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            s += u64::from(w);
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// An IPv4/TCP packet with valid checksums.
    fn tcp4(seq: u32, ack: u32, flags: u8, opts: &[u8], payload: &[u8], id: u16) -> Vec<u8> {
        let tcph = 20 + opts.len();
        let total = 20 + tcph + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 1, 10]);
        p[16..20].copy_from_slice(&[10, 0, 2, 10]);
        let c = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&ack.to_be_bytes());
        p[32] = ((tcph / 4) as u8) << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..40 + opts.len()].copy_from_slice(opts);
        p[20 + tcph..].copy_from_slice(payload);
        let c = checksum(
            &p[20..],
            pseudo_sum(PROTO_TCP, &p[12..16], &p[16..20], total - 20),
        );
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp6(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let total = 40 + 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[48..52].copy_from_slice(&7u32.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        p[60..].copy_from_slice(payload);
        let c = checksum(
            &p[40..],
            pseudo_sum(PROTO_TCP, &p[8..24], &p[24..40], total - 40),
        );
        p[56..58].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn ip4_ok(p: &[u8]) -> bool {
        fold(sum_be(&p[..20], 0)) == 0xffff
    }

    /// A super-packet as the TUN gives it: TCP checksum field = pseudo-header sum (partial).
    fn tso_input(v6: bool, payload: &[u8], mss: u16, flags: u8) -> (Vec<u8>, VnetHdr) {
        let mut p = if v6 {
            tcp6(1000, flags, payload)
        } else {
            tcp4(
                1000,
                7,
                flags,
                &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                payload,
                100,
            )
        };
        let ip = ip_info(&p).unwrap();
        let (s, d) = addrs(&p, v6);
        let ps = fold(pseudo_sum(PROTO_TCP, s, d, p.len() - ip.hlen));
        p[ip.hlen + 16..ip.hlen + 18].copy_from_slice(&ps.to_be_bytes());
        let tcph = usize::from(p[ip.hlen + 12] >> 4) * 4;
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip.hlen + tcph) as u16,
            gso_size: mss,
            csum_start: ip.hlen as u16,
            csum_offset: 16,
        };
        (p, h)
    }

    #[test]
    fn vnet_header_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1368,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.encode();
        assert_eq!(b, [1, 1, 52, 0, 0x58, 5, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn checksum_known_value() {
        // The IPv4 header example of RFC 1071's readers: 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h, 0), 0xb861);
    }

    #[test]
    fn split_ipv4_segments_are_valid_tcp() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let (mut p, h) = tso_input(false, &payload, 1400, TCP_ACK | TCP_PSH);
        let mut segs = Vec::new();
        split(&mut p, &h, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), 4);
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = ip_info(s).unwrap();
            assert!(ip4_ok(s));
            assert!(tcp_checksum_ok(s, ip));
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 100 + i as u16);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let psh = s[33] & TCP_PSH != 0;
            assert_eq!(psh, i == 3);
            got.extend_from_slice(&s[52..]);
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn split_rejects_inconsistent_headers() {
        let (mut p, mut h) = tso_input(false, &[1; 3000], 1400, TCP_ACK);
        h.csum_start = 60;
        assert!(split(&mut p, &h, &mut Vec::new(), |_| {}).is_err());
        let (mut p, mut h) = tso_input(false, &[1; 3000], 1400, TCP_ACK);
        h.gso_size = 0;
        assert!(split(&mut p, &h, &mut Vec::new(), |_| {}).is_err());
        let (mut p, mut h) = tso_input(false, &[1; 3000], 1400, TCP_ACK);
        h.gso_type = GSO_TCPV6;
        assert!(split(&mut p, &h, &mut Vec::new(), |_| {}).is_err());
        let (mut p, mut h) = tso_input(false, &[1; 3000], 1400, TCP_ACK);
        h.gso_type = 3; // UDP (UFO): not enabled
        assert!(split(&mut p, &h, &mut Vec::new(), |_| {}).is_err());
        let mut short = vec![0x45u8; 30];
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(split(&mut short, &h, &mut Vec::new(), |_| {}).is_err());
    }

    #[test]
    fn split_without_gso_completes_the_checksum() {
        let (mut p, mut h) = tso_input(false, &[9; 300], 1400, TCP_ACK);
        h.gso_type = GSO_NONE;
        let mut out = Vec::new();
        split(&mut p, &h, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
        assert_eq!(out.len(), 1);
        assert!(tcp_checksum_ok(&out[0], ip_info(&out[0]).unwrap()));
    }

    #[test]
    fn gro_merges_in_order_and_keeps_others() {
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let mut g = Gro::new();
        g.push(&tcp4(1000, 5, TCP_ACK, &opts, &[1; 1000], 1));
        g.push(&tcp4(2000, 5, TCP_ACK, &opts, &[2; 1000], 2));
        // A different ack: another flow key, not merged.
        g.push(&tcp4(3000, 6, TCP_ACK, &opts, &[3; 1000], 3));
        // An ICMP packet.
        let mut icmp = tcp4(0, 0, TCP_ACK, &[], &[0; 8], 4);
        icmp[9] = 1;
        g.push(&icmp);
        // Out of order (a gap): not merged.
        g.push(&tcp4(9000, 5, TCP_ACK, &opts, &[4; 1000], 5));
        assert_eq!(g.len(), 4);
        let mut frames = Vec::new();
        g.flush(|f| frames.push(f.to_vec()));
        assert!(g.is_empty());
        let h = VnetHdr::parse(&frames[0]).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.gso_size, 1000);
        assert_eq!(h.hdr_len, 52);
        let p = &frames[0][VNET_HDR_LEN..];
        assert_eq!(p.len(), 52 + 2000);
        assert!(ip4_ok(p));
        assert_eq!(&p[52..1052], &[1; 1000][..]);
        assert_eq!(&p[1052..], &[2; 1000][..]);
        for f in &frames[1..] {
            assert_eq!(VnetHdr::parse(f).unwrap(), VnetHdr::default());
        }
    }

    #[test]
    fn gro_stops_after_a_short_or_psh_segment_and_on_bad_checksum() {
        let mut g = Gro::new();
        g.push(&tcp4(0, 5, TCP_ACK, &[], &[1; 100], 1));
        g.push(&tcp4(100, 5, TCP_ACK | TCP_PSH, &[], &[1; 50], 2));
        g.push(&tcp4(150, 5, TCP_ACK, &[], &[1; 100], 3));
        assert_eq!(g.len(), 2);
        let mut frames = Vec::new();
        g.flush(|f| frames.push(f.to_vec()));
        assert_eq!(frames[0][VNET_HDR_LEN + 33] & TCP_PSH, TCP_PSH);

        let mut bad = tcp4(100, 5, TCP_ACK, &[], &[1; 100], 2);
        bad[60] ^= 0xff;
        g.push(&tcp4(0, 5, TCP_ACK, &[], &[1; 100], 1));
        g.push(&bad);
        assert_eq!(g.len(), 2);
        g.flush(|_| {});
    }

    #[test]
    fn gro_ipv6() {
        let mut g = Gro::new();
        for i in 0..3u32 {
            g.push(&tcp6(i * 500, TCP_ACK, &[i as u8; 500]));
        }
        assert_eq!(g.len(), 1);
        let mut frames = Vec::new();
        g.flush(|f| frames.push(f.to_vec()));
        let h = VnetHdr::parse(&frames[0]).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV6);
        assert_eq!(frames[0].len(), VNET_HDR_LEN + 60 + 1500);
    }

    #[test]
    fn gro_keeps_a_bounded_pool() {
        let mut g = Gro::new();
        let mut icmp = tcp4(0, 0, TCP_ACK, &[], &[0; 8], 4);
        icmp[9] = 1;
        for _ in 0..1000 {
            g.push(&icmp);
        }
        let mut n = 0;
        g.flush(|_| n += 1);
        assert_eq!(n, 1000);
        assert!(g.pool.len() <= POOL_MAX);
    }

    /// What the kernel does with a GSO frame we write: segments it, completing each checksum.
    fn kernel_segments(frame: &[u8]) -> Vec<Vec<u8>> {
        let h = VnetHdr::parse(frame).unwrap();
        let mut p = frame[VNET_HDR_LEN..].to_vec();
        if h.gso_type == GSO_NONE {
            return vec![p];
        }
        // The field holds the pseudo-header sum over the whole length; re-seed it per segment
        // as split() expects (the same partial form the TUN gives on the way out).
        let mut out = Vec::new();
        split(&mut p, &h, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
        out
    }

    proptest! {
        #[test]
        fn checksum_matches_naive(data in proptest::collection::vec(any::<u8>(), 0..3000), init in 0u64..0x1_0000_0000) {
            prop_assert_eq!(checksum(&data, init), naive_checksum(&data, init));
        }

        /// split then GRO gives back the original stream: one super-packet whose segments
        /// (segmented again) carry the same bytes with valid checksums.
        #[test]
        fn split_then_coalesce_round_trips(len in 1usize..20000, mss in 500u16..1500, v6 in any::<bool>(), psh in any::<bool>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let (mut p, h) = tso_input(v6, &payload, mss, flags);
            let mut segs = Vec::new();
            split(&mut p, &h, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
            prop_assert_eq!(segs.len(), len.div_ceil(usize::from(mss)));
            let mut g = Gro::new();
            for s in &segs {
                prop_assert!(tcp_checksum_ok(s, ip_info(s).unwrap()));
                g.push(s);
            }
            prop_assert_eq!(g.len(), 1);
            let mut frames = Vec::new();
            g.flush(|f| frames.push(f.to_vec()));
            let again = kernel_segments(&frames[0]);
            prop_assert_eq!(again.len(), segs.len());
            for (a, b) in again.iter().zip(&segs) {
                let ip = ip_info(a).unwrap();
                prop_assert!(tcp_checksum_ok(a, ip));
                // Same payload and sequence numbers (IPv4 IDs may differ).
                let hl = ip.hlen + usize::from(a[ip.hlen + 12] >> 4) * 4;
                prop_assert_eq!(&a[hl..], &b[hl..]);
                prop_assert_eq!(&a[ip.hlen + 4..ip.hlen + 8], &b[ip.hlen + 4..ip.hlen + 8]);
            }
        }

        /// Arbitrary bytes with arbitrary virtio headers never panic.
        #[test]
        fn garbage_never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..400), hb in proptest::array::uniform10(any::<u8>())) {
            let h = VnetHdr::parse(&hb).unwrap();
            let _ = split(&mut data, &h, &mut Vec::new(), |_| {});
            let mut g = Gro::new();
            g.push(&data);
            g.push(&data);
            g.flush(|_| {});
        }
    }
}
