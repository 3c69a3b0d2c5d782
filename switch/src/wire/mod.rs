//! The packet bytes: the only module that reads or writes frames and imports
//! etherparse.
//!
//! Organisation: [`EthView`] is a compact, checked view of an Ethernet frame
//! (MACs, up to two VLAN tags, the ethertype after them); [`pop_tag`] and
//! [`vlan_tag`] edit 802.1Q tags; [`vxlan`] is the RFC 7348 header codec;
//! [`announce`] builds the RARP frames a switch sends for a VM.
//!
//! Untrusted input: every function here that takes bytes is safe on any
//! input — it returns an error for short or malformed bytes and never panics.

pub mod netflow;

use dvs_proto::{MacAddr, Vni};
use etherparse::{EtherType, Ethernet2HeaderSlice, SingleVlanHeaderSlice};

/// Ethernet header length without tags.
pub const ETH_HLEN: usize = 14;
/// Length of one 802.1Q/802.1ad tag.
pub const TAG_LEN: usize = 4;
/// Offset of the first ethertype (after the two MAC addresses).
pub const MACS_LEN: usize = 12;

/// TPIDs that start a VLAN tag: 802.1Q, 802.1ad (QinQ) and the old 0x9100.
pub fn is_tpid(ethertype: u16) -> bool {
    ethertype == EtherType::VLAN_TAGGED_FRAME.0
        || ethertype == EtherType::PROVIDER_BRIDGING.0
        || ethertype == EtherType::VLAN_DOUBLE_TAGGED_FRAME.0
}

/// Why bytes are not a frame (or a VXLAN packet) we can switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(usize),
    #[error("VLAN tag truncated")]
    TruncatedTag,
    #[error("VXLAN packet of {0} bytes is shorter than its 8-byte header")]
    VxlanTruncated(usize),
    #[error("VXLAN header has no I flag (flags {0:#04x})")]
    VxlanFlags(u8),
}

/// One VLAN tag as read from a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub tpid: u16,
    /// The 12-bit VLAN ID (0 = priority tag only).
    pub vid: u16,
    /// The 3-bit 802.1p priority.
    pub pcp: u8,
}

/// A checked view of an Ethernet frame's link layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthView {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// The outer tag, if the frame is tagged.
    pub outer: Option<Tag>,
    /// A second tag right after the outer one (QinQ), if any.
    pub inner: Option<Tag>,
    /// The ethertype after the tags we parsed.
    pub ethertype: u16,
}

impl EthView {
    /// Parse the link layer of `frame`.
    ///
    /// # Errors
    /// [`WireError::Runt`] below 14 bytes, [`WireError::TruncatedTag`] when a
    /// TPID announces a tag the frame does not hold.
    pub fn parse(frame: &[u8]) -> Result<Self, WireError> {
        let eth =
            Ethernet2HeaderSlice::from_slice(frame).map_err(|_| WireError::Runt(frame.len()))?;
        let mut view = EthView {
            dst: MacAddr(eth.destination()),
            src: MacAddr(eth.source()),
            outer: None,
            inner: None,
            ethertype: eth.ether_type().0,
        };
        if !is_tpid(view.ethertype) {
            return Ok(view);
        }
        let (outer, next) = read_tag(view.ethertype, &frame[MACS_LEN + 2..])?;
        view.outer = Some(outer);
        view.ethertype = next;
        if is_tpid(next) {
            let (inner, next) = read_tag(next, &frame[ETH_HLEN + TAG_LEN..])?;
            view.inner = Some(inner);
            view.ethertype = next;
        }
        Ok(view)
    }
}

/// Read the tag control info at the start of `rest` (the bytes after a TPID).
fn read_tag(tpid: u16, rest: &[u8]) -> Result<(Tag, u16), WireError> {
    let tag = SingleVlanHeaderSlice::from_slice(rest).map_err(|_| WireError::TruncatedTag)?;
    Ok((
        Tag {
            tpid,
            vid: tag.vlan_identifier().value(),
            pcp: tag.priority_code_point().value(),
        },
        tag.ether_type().0,
    ))
}

/// Remove the outer tag of the frame held in `buf[start..]`, in place, by
/// moving the two MAC addresses 4 bytes on. Returns the frame's new start.
///
/// Does nothing (returns `start`) when the frame has no complete tag.
pub fn pop_tag(buf: &mut [u8], start: usize) -> usize {
    let Some(frame) = buf.get(start..) else {
        return start;
    };
    if frame.len() < ETH_HLEN + TAG_LEN || !is_tpid(u16::from_be_bytes([frame[12], frame[13]])) {
        return start;
    }
    buf.copy_within(start..start + MACS_LEN, start + TAG_LEN);
    start + TAG_LEN
}

/// Insert a tag (`tpid`, `tci`) into the frame held in `buf[start..]`, in
/// place, using 4 bytes of headroom before `start`. Returns the new start, or
/// `None` without headroom or with a runt frame.
pub fn push_tag(buf: &mut [u8], start: usize, tpid: u16, tci: u16) -> Option<usize> {
    if start < TAG_LEN || buf.len() < start + ETH_HLEN {
        return None;
    }
    let new = start - TAG_LEN;
    buf.copy_within(start..start + MACS_LEN, new);
    let [a, b] = tpid.to_be_bytes();
    let [c, d] = tci.to_be_bytes();
    buf[new + MACS_LEN..new + MACS_LEN + TAG_LEN].copy_from_slice(&[a, b, c, d]);
    Some(new)
}

/// The 4 bytes of an 802.1Q tag (TPID 0x8100) with `tci`, to insert after
/// the MAC addresses.
pub fn vlan_tag(tci: u16) -> [u8; TAG_LEN] {
    let [a, b] = EtherType::VLAN_TAGGED_FRAME.0.to_be_bytes();
    let [c, d] = tci.to_be_bytes();
    [a, b, c, d]
}

/// A tag control field from its parts.
pub fn tci(vid: u16, pcp: u8) -> u16 {
    (u16::from(pcp & 7) << 13) | (vid & 0x0fff)
}

/// VXLAN (RFC 7348): 8 bytes before the inner Ethernet frame.
///
/// ```text
///  0               1               2               3
/// |R|R|R|R|I|R|R|R|           Reserved (24)                       |
/// |            VXLAN Network Identifier (24)      | Reserved (8)  |
/// ```
pub mod vxlan {
    use super::{Vni, WireError};

    pub const HEADER_LEN: usize = 8;
    /// The IANA port.
    pub const PORT: u16 = 4789;
    const FLAG_I: u8 = 0x08;

    /// The header for `vni`: I flag set, reserved bits zero.
    pub fn encode(vni: Vni) -> [u8; HEADER_LEN] {
        let v = vni.get().to_be_bytes();
        [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
    }

    /// Split a UDP payload into the raw 24-bit VNI and the inner frame.
    ///
    /// Reserved bits are ignored on receipt, as the RFC says; the VNI is not
    /// checked against configuration here.
    ///
    /// # Errors
    /// [`WireError::VxlanTruncated`] below 8 bytes, [`WireError::VxlanFlags`]
    /// without the I flag.
    pub fn decode(payload: &[u8]) -> Result<(u32, core::ops::Range<usize>), WireError> {
        let Some(h) = payload.get(..HEADER_LEN) else {
            return Err(WireError::VxlanTruncated(payload.len()));
        };
        if h[0] & FLAG_I == 0 {
            return Err(WireError::VxlanFlags(h[0]));
        }
        let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
        Ok((vni, HEADER_LEN..payload.len()))
    }
}

/// Finish a TCP or UDP checksum that a sender's offload left unfinished.
///
/// A kernel that offloads checksums writes only the pseudo-header sum into
/// the checksum field and leaves the rest to the NIC. Over virtual links
/// (veth, virtio) such frames can reach a switch's UDP or packet socket as
/// they are. This recognises the pattern (checksum field == the folded
/// pseudo-header sum) in the untagged IPv4/IPv6 `frame` and completes the
/// checksum in place; returns whether it did. Recomputing a checksum that
/// was already complete gives the same value, so a chance match is harmless.
///
/// Safe on any bytes: frames it does not understand are left alone.
pub fn complete_partial_checksum(frame: &mut [u8]) -> bool {
    let Some(et) = frame.get(12..14) else {
        return false;
    };
    let (l4, proto, len, pseudo) = match u16::from_be_bytes([et[0], et[1]]) {
        0x0800 => {
            let Some(ip) = frame.get(ETH_HLEN..ETH_HLEN + 20) else {
                return false;
            };
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || frag != 0 {
                return false;
            }
            let proto = ip[9];
            let len = total - ihl;
            let mut sum = sum16(&ip[12..20]);
            sum += u32::from(proto) + len as u32;
            (ETH_HLEN + ihl, proto, len, sum)
        }
        0x86dd => {
            let Some(ip) = frame.get(ETH_HLEN..ETH_HLEN + 40) else {
                return false;
            };
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let proto = ip[6];
            let mut sum = sum16(&ip[8..40]);
            sum += u32::from(proto) + len as u32;
            (ETH_HLEN + 40, proto, len, sum)
        }
        _ => return false,
    };
    let off = match proto {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let Some(seg) = frame.get_mut(l4..l4 + len) else {
        return false;
    };
    if seg.len() < off + 2 {
        return false;
    }
    let field = u16::from_be_bytes([seg[off], seg[off + 1]]);
    if field != fold(pseudo) {
        return false;
    }
    let mut c = !fold(sum16(seg));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    seg[off..off + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// The ones'-complement sum of `b` as 16-bit big-endian words, unfolded.
fn sum16(b: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    let mut chunks = b.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The virtio-net header a TAP with `IFF_VNET_HDR` puts before each frame
/// (12 bytes: `struct virtio_net_hdr_mrg_rxbuf`, little-endian).
///
/// It carries offload work the sender left undone: a checksum to finish
/// (`NEEDS_CSUM` at `csum_start` + `csum_offset`) and, for GSO frames of up
/// to 64 KB, the segment size to cut the TCP payload into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// With `num_buffers` (TAP with `TUNSETVNETHDRSZ` 12).
    pub const LEN: usize = 12;
    /// Without it (`struct virtio_net_hdr`, AF_PACKET's `PACKET_VNET_HDR`).
    pub const BASE_LEN: usize = 10;
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_ECN: u8 = 0x80;

    /// Read the header from the first 10 bytes of `b` (all zero when `b` is
    /// shorter).
    pub fn decode(b: &[u8]) -> Self {
        let Some(b) = b.get(..Self::BASE_LEN) else {
            return Self::default();
        };
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// A GSO frame (TCP over IPv4 or IPv6) that must be segmented before it
    /// goes anywhere that cannot take it whole.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }

    /// The same header for the frame with `delta` bytes inserted (positive)
    /// or removed (negative) before the L3 header (a VLAN tag).
    pub fn shifted(&self, delta: i32) -> Self {
        let sh = |v: u16| {
            if v == 0 {
                0
            } else {
                (i32::from(v) + delta).clamp(0, 0xffff) as u16
            }
        };
        VnetHdr {
            hdr_len: sh(self.hdr_len),
            csum_start: if self.needs_csum() {
                sh(self.csum_start)
            } else {
                self.csum_start
            },
            ..*self
        }
    }
}

/// Finish the checksum a sender left to the NIC: the ones'-complement sum
/// from `start` to the end of `frame`, stored at `start + offset`. Returns
/// false (and changes nothing) when the positions do not fit the frame.
pub fn complete_checksum_at(frame: &mut [u8], start: usize, offset: usize) -> bool {
    if start + offset + 2 > frame.len() {
        return false;
    }
    let c = !fold(sum16(&frame[start..]));
    frame[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Why a GSO frame cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("not an untagged IPv4/IPv6 TCP frame")]
    NotTcp,
    #[error("segment size 0")]
    ZeroMss,
    #[error("headers run past the frame")]
    Truncated,
}

/// How [`segment_tcp`] laid out its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Bytes of each block (prefix + frame); the last may be shorter.
    pub block: usize,
    /// Number of blocks.
    pub count: usize,
    /// Length of the last block.
    pub last: usize,
}

/// Software TSO: cut the TCP payload of the untagged GSO `frame` into
/// segments of at most `mss` bytes, each a complete frame (IP lengths, IPv4
/// ID and header checksum, TCP sequence number, flags and checksum fixed).
///
/// Blocks are appended to `out` back to back, each starting with `prefix`
/// bytes left zero for the caller (room for a VXLAN header), so that a
/// kernel can send them with UDP GSO. `out` is cleared first; it does not
/// shrink, so a reused vector stops allocating.
///
/// # Errors
/// [`SegmentError`] for frames that are not TCP over IPv4/IPv6 or whose
/// headers do not fit.
pub fn segment_tcp(
    frame: &[u8],
    mss: usize,
    prefix: usize,
    out: &mut Vec<u8>,
) -> Result<Segments, SegmentError> {
    out.clear();
    if mss == 0 {
        return Err(SegmentError::ZeroMss);
    }
    let et = frame.get(12..14).ok_or(SegmentError::Truncated)?;
    let (v4, l4) = match u16::from_be_bytes([et[0], et[1]]) {
        0x0800 => {
            let ihl = usize::from(*frame.get(ETH_HLEN).ok_or(SegmentError::Truncated)? & 0x0f) * 4;
            if frame.get(ETH_HLEN + 9) != Some(&6) || ihl < 20 {
                return Err(SegmentError::NotTcp);
            }
            (true, ETH_HLEN + ihl)
        }
        0x86dd => {
            if frame.get(ETH_HLEN + 6) != Some(&6) {
                return Err(SegmentError::NotTcp);
            }
            (false, ETH_HLEN + 40)
        }
        _ => return Err(SegmentError::NotTcp),
    };
    let doff = usize::from(*frame.get(l4 + 12).ok_or(SegmentError::Truncated)? >> 4) * 4;
    let hlen = l4 + doff;
    if doff < 20 || hlen > frame.len() {
        return Err(SegmentError::Truncated);
    }
    let payload = &frame[hlen..];
    let count = payload.len().div_ceil(mss).max(1);
    let block = prefix + hlen + mss.min(payload.len());
    let seq0 = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let id0 = u16::from_be_bytes([frame[ETH_HLEN + 4], frame[ETH_HLEN + 5]]);
    let flags0 = frame[l4 + 13];
    let mut last = block;
    for (i, chunk) in payload.chunks(mss).enumerate().chain(
        // A GSO frame without payload still yields its one segment.
        (payload.is_empty()).then_some((0, &payload[..0])),
    ) {
        let at = out.len();
        out.resize(at + prefix, 0);
        out.extend_from_slice(&frame[..hlen]);
        out.extend_from_slice(chunk);
        let f = &mut out[at + prefix..];
        let l3_len = hlen - ETH_HLEN + chunk.len();
        if v4 {
            f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&(l3_len as u16).to_be_bytes());
            f[ETH_HLEN + 4..ETH_HLEN + 6]
                .copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&f[ETH_HLEN..l4]));
            f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&((l3_len - 40) as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let is_last = i + 1 == count;
        // FIN and PSH only on the last segment, CWR only on the first.
        let mut flags = flags0;
        if !is_last {
            flags &= !(0x01 | 0x08);
        }
        if i > 0 {
            flags &= !0x80;
        }
        f[l4 + 13] = flags;
        // Checksum: pseudo-header + segment, field zeroed first.
        f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let tcp_len = (hlen - l4 + chunk.len()) as u32;
        let pseudo = if v4 {
            sum16(&f[ETH_HLEN + 12..ETH_HLEN + 20])
        } else {
            sum16(&f[ETH_HLEN + 8..ETH_HLEN + 40])
        } + 6
            + tcp_len;
        let c = !fold(pseudo + sum16(&f[l4..]));
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        last = prefix + hlen + chunk.len();
    }
    Ok(Segments { block, count, last })
}

/// Receive-side coalescing (a small GRO): consecutive TCP segments of one
/// flow become one GSO frame with a virtio-net header, so that a port with
/// offloads takes 64 KB in one write instead of 44.
///
/// The rules follow the kernel's GRO: identical Ethernet, IP and TCP headers
/// except lengths, IPv4 ID, checksums and sequence number; contiguous
/// sequence numbers; only ACK (and PSH, which ends the train); no segment
/// larger than the first; no IP options or fragments.
#[derive(Debug)]
pub struct Coalescer {
    buf: Vec<u8>,
    held: Option<Held>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    v4: bool,
    l4: usize,
    hlen: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// The largest coalesced frame (an IP packet of at most 64 KB).
    pub const MAX: usize = ETH_HLEN + 65_535;

    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(Self::MAX),
            held: None,
        }
    }

    /// Is a frame held?
    pub fn is_empty(&self) -> bool {
        self.held.is_none()
    }

    /// Offer the next untagged frame. Returns true when it was taken (held
    /// as the start of a train, or appended to the one held); false when it
    /// cannot join — then the caller takes the held frame out and offers
    /// again, or sends this one as it is.
    pub fn offer(&mut self, frame: &[u8]) -> bool {
        let Some(seg) = tcp_segment(frame) else {
            return false;
        };
        match self.held {
            None => {
                self.buf.clear();
                self.buf.extend_from_slice(frame);
                self.held = Some(Held {
                    v4: seg.v4,
                    l4: seg.l4,
                    hlen: seg.hlen,
                    mss: frame.len() - seg.hlen,
                    next_seq: seg.seq.wrapping_add((frame.len() - seg.hlen) as u32),
                    segments: 1,
                    closed: seg.psh,
                });
                true
            }
            Some(h) => {
                let payload = frame.len() - seg.hlen;
                if h.closed
                    || seg.v4 != h.v4
                    || seg.hlen != h.hlen
                    || seg.seq != h.next_seq
                    || payload > h.mss
                    || self.buf.len() + payload > Self::MAX
                    || !same_headers(&self.buf[..h.hlen], &frame[..h.hlen], h.v4, h.l4)
                {
                    return false;
                }
                self.buf.extend_from_slice(&frame[seg.hlen..]);
                if seg.psh {
                    self.buf[h.l4 + 13] |= 0x08;
                }
                self.held = Some(Held {
                    next_seq: h.next_seq.wrapping_add(payload as u32),
                    segments: h.segments + 1,
                    closed: seg.psh || payload < h.mss,
                    ..h
                });
                true
            }
        }
    }

    /// Take the held frame out: one GSO frame with its virtio-net header,
    /// or the single frame as it came (header all zero).
    pub fn take(&mut self) -> Option<(&[u8], VnetHdr)> {
        let h = self.held.take()?;
        if h.segments == 1 {
            return Some((&self.buf, VnetHdr::default()));
        }
        let f = &mut self.buf[..];
        let l3_len = f.len() - ETH_HLEN;
        let tcp_len = (f.len() - h.l4) as u32;
        let pseudo = if h.v4 {
            f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&(l3_len as u16).to_be_bytes());
            f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&f[ETH_HLEN..h.l4]));
            f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
            sum16(&f[ETH_HLEN + 12..ETH_HLEN + 20])
        } else {
            f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&((l3_len - 40) as u16).to_be_bytes());
            sum16(&f[ETH_HLEN + 8..ETH_HLEN + 40])
        } + 6
            + tcp_len;
        f[h.l4 + 16..h.l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        let hdr = VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: if h.v4 {
                VnetHdr::GSO_TCPV4
            } else {
                VnetHdr::GSO_TCPV6
            },
            hdr_len: h.hlen as u16,
            gso_size: h.mss as u16,
            csum_start: h.l4 as u16,
            csum_offset: 16,
        };
        Some((&self.buf, hdr))
    }
}

struct TcpSeg {
    v4: bool,
    l4: usize,
    hlen: usize,
    seq: u32,
    psh: bool,
}

/// A TCP data segment that may be coalesced: no IP options or fragments,
/// flags ACK (+PSH) only, some payload, no trailing bytes.
fn tcp_segment(f: &[u8]) -> Option<TcpSeg> {
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (v4, l4) = match et {
        0x0800 => {
            let ip = f.get(ETH_HLEN..ETH_HLEN + 20)?;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ip[0] != 0x45 || ip[9] != 6 || frag != 0 || ETH_HLEN + total != f.len() {
                return None;
            }
            (true, ETH_HLEN + 20)
        }
        0x86dd => {
            let ip = f.get(ETH_HLEN..ETH_HLEN + 40)?;
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip[0] >> 4 != 6 || ip[6] != 6 || ETH_HLEN + 40 + plen != f.len() {
                return None;
            }
            (false, ETH_HLEN + 40)
        }
        _ => return None,
    };
    let tcp = f.get(l4..l4 + 20)?;
    let hlen = l4 + usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    if hlen < l4 + 20 || hlen >= f.len() || flags & !0x08 != 0x10 {
        return None;
    }
    Some(TcpSeg {
        v4,
        l4,
        hlen,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        psh: flags & 0x08 != 0,
    })
}

/// Headers equal except lengths, IPv4 ID and checksum, TCP sequence, PSH and
/// checksum.
fn same_headers(a: &[u8], b: &[u8], v4: bool, l4: usize) -> bool {
    let ip_same = if v4 {
        a[..ETH_HLEN + 2] == b[..ETH_HLEN + 2]
            && a[ETH_HLEN + 6..ETH_HLEN + 10] == b[ETH_HLEN + 6..ETH_HLEN + 10]
            && a[ETH_HLEN + 12..l4] == b[ETH_HLEN + 12..l4]
    } else {
        a[..ETH_HLEN + 4] == b[..ETH_HLEN + 4] && a[ETH_HLEN + 6..l4] == b[ETH_HLEN + 6..l4]
    };
    ip_same
        && a[l4..l4 + 4] == b[l4..l4 + 4]
        && a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
        && a[l4 + 13] & !0x08 == b[l4 + 13] & !0x08
        && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
        && a[l4 + 18..] == b[l4 + 18..]
}

/// Set the DSCP of the IPv4 or IPv6 packet in the untagged `frame` (the
/// IPv4 header checksum is updated); returns whether it did.
pub fn set_dscp(frame: &mut [u8], dscp: u8) -> bool {
    let et = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match et {
        Some(0x0800) => {
            let Some(h) = frame.get_mut(ETH_HLEN..ETH_HLEN + 20) else {
                return false;
            };
            if h[0] >> 4 != 4 {
                return false;
            }
            let old = u16::from_be_bytes([h[0], h[1]]);
            h[1] = (dscp << 2) | (h[1] & 0x03);
            let new = u16::from_be_bytes([h[0], h[1]]);
            // RFC 1624: HC' = ~(~HC + ~m + m')
            let hc = u16::from_be_bytes([h[10], h[11]]);
            let sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
            let c = !fold(sum);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            true
        }
        Some(0x86dd) => {
            let Some(h) = frame.get_mut(ETH_HLEN..ETH_HLEN + 2) else {
                return false;
            };
            if h[0] >> 4 != 6 {
                return false;
            }
            h[0] = (h[0] & 0xf0) | (dscp >> 2);
            h[1] = ((dscp & 0x03) << 6) | (h[1] & 0x3f);
            true
        }
        _ => false,
    }
}

/// The header fields that ACLs (and later flow accounting and QoS) look at.
///
/// For ICMP and ICMPv6, `src_port` holds the type and `dst_port` the code.
/// Fields a frame does not have are `None` or zero: a non-IP frame has no
/// addresses; a non-first fragment has no ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FlowKey {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub ethertype: u16,
    /// The VLAN the pipeline classified the frame into.
    pub vlan: u16,
    pub src_ip: Option<std::net::IpAddr>,
    pub dst_ip: Option<std::net::IpAddr>,
    /// The IP protocol (after IPv6 extension headers); `None` for non-IP.
    pub proto: Option<u8>,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// The identifier of an ICMP/ICMPv6 echo request or reply (else 0).
    pub icmp_id: u16,
    /// The DSCP of the IP header.
    pub dscp: u8,
}

impl FlowKey {
    /// Read the key of the untagged `frame` on `vlan`. Safe on any bytes:
    /// what cannot be read stays empty.
    pub fn parse(frame: &[u8], vlan: u16) -> Self {
        let mac = |r: std::ops::Range<usize>| {
            let mut m = [0u8; 6];
            if let Some(b) = frame.get(r) {
                m.copy_from_slice(b);
            }
            MacAddr(m)
        };
        let ethertype = frame
            .get(12..14)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        let mut k = FlowKey {
            dst_mac: mac(0..6),
            src_mac: mac(6..12),
            ethertype,
            vlan,
            src_ip: None,
            dst_ip: None,
            proto: None,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp_id: 0,
            dscp: 0,
        };
        let ip = frame.get(ETH_HLEN..).unwrap_or(&[]);
        let l4 = match ethertype {
            0x0800 => parse_ipv4(ip, &mut k),
            0x86dd => parse_ipv6(ip, &mut k),
            _ => None,
        };
        if let (Some(proto), Some(l4)) = (k.proto, l4) {
            match proto {
                6 | 17 | 132 => {
                    if let Some(p) = l4.get(..4) {
                        k.src_port = u16::from_be_bytes([p[0], p[1]]);
                        k.dst_port = u16::from_be_bytes([p[2], p[3]]);
                    }
                    if proto == 6 {
                        k.tcp_flags = l4.get(13).copied().unwrap_or(0);
                    }
                }
                1 | 58 => {
                    if let Some(p) = l4.get(..2) {
                        k.src_port = u16::from(p[0]);
                        k.dst_port = u16::from(p[1]);
                    }
                    if matches!(k.src_port, 0 | 8 | 128 | 129) {
                        k.icmp_id = l4.get(4..6).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                    }
                }
                _ => {}
            }
        }
        k
    }
}

/// What a frame adds to its flow record: packets, L3 octets (IP total
/// length, as NetFlow counts), and the IP ToS / traffic class byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L3Meter {
    pub packets: u64,
    pub octets: u64,
    pub tos: u8,
}

/// Measure the untagged IP `frame` for flow accounting; `None` for non-IP.
/// A TCP frame with `gso_size` > 0 (a 64 KB TSO frame from a VM) counts as
/// the segments it becomes on the wire, each with its own headers.
pub fn l3_meter(frame: &[u8], gso_size: u16) -> Option<L3Meter> {
    let ip = frame.get(ETH_HLEN..)?;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (tos, iph, l3, proto) = match ethertype {
        0x0800 => {
            let h = ip.get(..20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            // 0 (BIG TCP) or more than arrived: count what arrived.
            let l3 = if total < ihl || total > ip.len() {
                ip.len()
            } else {
                total
            };
            (h[1], ihl, l3, h[9])
        }
        0x86dd => {
            let h = ip.get(..40)?;
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let l3 = if payload == 0 || 40 + payload > ip.len() {
                ip.len()
            } else {
                40 + payload
            };
            ((h[0] << 4) | (h[1] >> 4), 40, l3, h[6])
        }
        _ => return None,
    };
    let mut m = L3Meter {
        packets: 1,
        octets: l3 as u64,
        tos,
    };
    if gso_size > 0 && proto == 6 {
        let doff = usize::from(ip.get(iph + 12).copied().unwrap_or(0x50) >> 4) * 4;
        let hdrs = iph + doff;
        let payload = l3.saturating_sub(hdrs);
        let segs = payload.div_ceil(usize::from(gso_size)).max(1);
        m.packets = segs as u64;
        m.octets += ((segs - 1) * hdrs) as u64;
    }
    Some(m)
}

/// A key for an IPv4 packet between two fixed MACs on VLAN 10 (tests).
#[cfg(test)]
pub(crate) fn ipv4_key(proto: u8, src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> FlowKey {
    FlowKey {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        ethertype: 0x0800,
        vlan: 10,
        src_ip: Some(std::net::IpAddr::from(src.0)),
        dst_ip: Some(std::net::IpAddr::from(dst.0)),
        proto: Some(proto),
        src_port: src.1,
        dst_port: dst.1,
        tcp_flags: flags,
        icmp_id: 0,
        dscp: 0,
    }
}

/// Fill the IPv4 fields; returns the L4 bytes unless this is a non-first
/// fragment.
fn parse_ipv4<'a>(ip: &'a [u8], k: &mut FlowKey) -> Option<&'a [u8]> {
    let h = ip.get(..20)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    k.dscp = h[1] >> 2;
    k.proto = Some(h[9]);
    k.src_ip = Some(std::net::IpAddr::from([h[12], h[13], h[14], h[15]]));
    k.dst_ip = Some(std::net::IpAddr::from([h[16], h[17], h[18], h[19]]));
    let offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if offset != 0 || ihl < 20 {
        return None;
    }
    ip.get(ihl..)
}

/// Fill the IPv6 fields, skipping extension headers; returns the L4 bytes
/// unless this is a non-first fragment.
fn parse_ipv6<'a>(ip: &'a [u8], k: &mut FlowKey) -> Option<&'a [u8]> {
    let h = ip.get(..40)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    k.dscp = ((h[0] & 0x0f) << 2) | (h[1] >> 6);
    let addr = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        std::net::IpAddr::from(a)
    };
    k.src_ip = Some(addr(&h[8..24]));
    k.dst_ip = Some(addr(&h[24..40]));
    let mut next = h[6];
    let mut at = 40;
    for _ in 0..8 {
        let ext = ip.get(at..at + 8);
        match (next, ext) {
            (0 | 43 | 60, Some(e)) => {
                next = e[0];
                at += (usize::from(e[1]) + 1) * 8;
            }
            (51, Some(e)) => {
                next = e[0];
                at += (usize::from(e[1]) + 2) * 4;
            }
            (44, Some(e)) => {
                next = e[0];
                k.proto = Some(next);
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    return None;
                }
                at += 8;
            }
            _ => break,
        }
    }
    k.proto = Some(next);
    ip.get(at..)
}

/// Announcement frames a switch sends on a VM's behalf.
pub mod announce {
    use super::MacAddr;

    /// Length of a RARP frame without padding.
    pub const RARP_LEN: usize = 42;

    /// A RARP "request reverse" broadcast from `mac`, as QEMU sends after a
    /// migration so that switches learn where the VM now is.
    pub fn rarp(mac: MacAddr) -> [u8; RARP_LEN] {
        let mut f = [0u8; RARP_LEN];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac.0);
        f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
        // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 3 (request reverse)
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]);
        f[22..28].copy_from_slice(&mac.0);
        f[32..38].copy_from_slice(&mac.0);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        for (tpid, tci) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn parses_untagged_single_and_double() {
        let v = EthView::parse(&frame(&[], 0x0800, &[0; 20])).unwrap();
        assert_eq!((v.outer, v.inner, v.ethertype), (None, None, 0x0800));
        assert_eq!(v.src.to_string(), "02:00:00:00:00:01");

        let v = EthView::parse(&frame(&[(0x8100, 0x6014)], 0x0806, &[0; 28])).unwrap();
        let t = v.outer.unwrap();
        assert_eq!((t.vid, t.pcp, v.ethertype), (20, 3, 0x0806));

        let v = EthView::parse(&frame(&[(0x88a8, 100), (0x8100, 10)], 0x0800, &[])).unwrap();
        assert_eq!(v.outer.unwrap().vid, 100);
        assert_eq!(v.inner.unwrap().vid, 10);
    }

    #[test]
    fn rejects_runts_and_truncated_tags() {
        assert_eq!(EthView::parse(&[0; 13]), Err(WireError::Runt(13)));
        let mut f = frame(&[], 0x8100, &[0, 10]);
        assert_eq!(EthView::parse(&f), Err(WireError::TruncatedTag));
        f.truncate(14);
        assert_eq!(EthView::parse(&f), Err(WireError::TruncatedTag));
    }

    #[test]
    fn vxlan_round_trip_and_errors() {
        let h = vxlan::encode(Vni::new(0x123456).unwrap());
        assert_eq!(h, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut p = h.to_vec();
        p.extend_from_slice(&[1, 2, 3]);
        assert_eq!(vxlan::decode(&p).unwrap(), (0x123456, 8..11));
        assert_eq!(vxlan::decode(&p[..7]), Err(WireError::VxlanTruncated(7)));
        p[0] = 0;
        assert_eq!(vxlan::decode(&p), Err(WireError::VxlanFlags(0)));
        // reserved bits are ignored on receipt
        p[0] = 0x08 | 0x80;
        p[7] = 0xff;
        assert_eq!(vxlan::decode(&p).unwrap().0, 0x123456);
    }

    #[test]
    fn rarp_is_a_broadcast_from_the_mac() {
        let mac = MacAddr([2, 1, 2, 3, 4, 5]);
        let f = announce::rarp(mac);
        let v = EthView::parse(&f).unwrap();
        assert!(v.dst.is_broadcast());
        assert_eq!((v.src, v.ethertype), (mac, 0x8035));
    }

    /// An IPv4/UDP frame with a correct checksum, built by etherparse.
    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1234, 5678);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn tcp6_frame(payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([1; 16], [2; 16], 64)
            .tcp(1234, 80, 7, 1000);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// Make the frame's L4 checksum look like a sender's offload left it.
    fn make_partial(f: &mut [u8], l4: usize, off: usize, pseudo: u32) {
        f[l4 + off..l4 + off + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    }

    #[test]
    fn completes_partial_checksums_and_keeps_good_ones() {
        let good = udp_frame(b"hello, partial checksum");
        let mut f = good.clone();
        let pseudo = sum16(&f[26..34]) + 17 + (f.len() - 34) as u32;
        make_partial(&mut f, 34, 6, pseudo);
        assert_ne!(f, good);
        assert!(complete_partial_checksum(&mut f));
        assert_eq!(f, good);
        let mut again = good.clone();
        let _ = complete_partial_checksum(&mut again);
        assert_eq!(again, good, "a complete checksum is never changed");

        let good = tcp6_frame(&[7; 1000]);
        let mut f = good.clone();
        let pseudo = sum16(&f[22..54]) + 6 + (f.len() - 54) as u32;
        make_partial(&mut f, 54, 16, pseudo);
        assert!(complete_partial_checksum(&mut f));
        assert_eq!(f, good);
    }

    #[test]
    fn vnet_header_round_trip_and_shift() {
        let h = VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.encode()), h);
        let s = h.shifted(4);
        assert_eq!((s.hdr_len, s.csum_start, s.gso_size), (70, 38, 1448));
        assert!(h.is_gso() && h.needs_csum());
        assert!(!VnetHdr::default().is_gso());
    }

    /// A TCP/IPv4 GSO frame of `n` payload bytes with FIN|PSH|ACK set and a
    /// partial checksum, as a kernel hands it to a TAP with offloads.
    fn gso_frame(n: usize) -> Vec<u8> {
        gso_frame_with(n, true)
    }

    fn gso_frame_with(n: usize, fin: bool) -> Vec<u8> {
        let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let mut b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 5201, 1_000_000, 5000)
            .ack(77)
            .psh();
        if fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    #[test]
    fn software_tso_makes_valid_segments() {
        let f = gso_frame(4000);
        let mut out = Vec::new();
        let s = segment_tcp(&f, 1448, 8, &mut out).unwrap();
        assert_eq!(
            (s.count, s.block, s.last),
            (3, 8 + 54 + 1448, 8 + 54 + 4000 - 2 * 1448)
        );
        let mut payload = Vec::new();
        let mut off = 0;
        for i in 0..s.count {
            let len = if i + 1 == s.count { s.last } else { s.block };
            let seg = &out[off + 8..off + len];
            off += len;
            let p = etherparse::SlicedPacket::from_ethernet(seg).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!("not IPv4")
            };
            assert_eq!(usize::from(ip.header().total_len()), seg.len() - 14);
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else {
                panic!("not TCP")
            };
            assert_eq!(tcp.sequence_number(), 1_000_000 + (i * 1448) as u32);
            let last = i + 1 == s.count;
            assert_eq!((tcp.fin(), tcp.psh(), tcp.ack()), (last, last, true));
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "segment {i}");
            payload.extend_from_slice(tcp.payload());
        }
        assert_eq!(payload, &f[54..]);
    }

    #[test]
    fn segmentation_rejects_what_it_cannot_cut() {
        let mut out = Vec::new();
        assert_eq!(
            segment_tcp(&gso_frame(10), 0, 0, &mut out),
            Err(SegmentError::ZeroMss)
        );
        assert_eq!(
            segment_tcp(&udp_frame(b"x"), 1000, 0, &mut out),
            Err(SegmentError::NotTcp)
        );
        assert_eq!(
            segment_tcp(&gso_frame(10)[..40], 1000, 0, &mut out),
            Err(SegmentError::Truncated)
        );
    }

    #[test]
    fn completes_a_checksum_at_its_offset() {
        let good = udp_frame(b"offload me");
        let mut f = good.clone();
        let pseudo = sum16(&f[26..34]) + 17 + (f.len() - 34) as u32;
        make_partial(&mut f, 34, 6, pseudo);
        assert!(complete_checksum_at(&mut f, 34, 6));
        assert_eq!(f, good);
        assert!(!complete_checksum_at(&mut f, 34, 100));
    }

    #[test]
    fn coalescing_undoes_segmentation() {
        // A 10,000-byte GSO frame, cut like a NIC would, then coalesced.
        // ACK|PSH, no FIN (a FIN segment is never coalesced).
        let f = gso_frame_with(10_000, false);
        let mut segs = Vec::new();
        let s = segment_tcp(&f, 1448, 0, &mut segs).unwrap();
        let mut c = Coalescer::new();
        for i in 0..s.count {
            let len = if i + 1 == s.count { s.last } else { s.block };
            assert!(
                c.offer(&segs[i * s.block..i * s.block + len]),
                "segment {i}"
            );
        }
        let (merged, hdr) = c.take().unwrap();
        assert_eq!(merged.len(), f.len());
        assert_eq!(merged[47], 0x18, "PSH of the last segment kept");
        assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
        assert_eq!((hdr.gso_size, hdr.hdr_len, hdr.csum_start), (1448, 54, 34));
        // Payload and headers match the original, but for the checksum,
        // which is left partial for the receiver's offload.
        assert!(merged[54..] == f[54..], "payload differs");
        assert!(merged[..50] == f[..50], "headers differ");
        let mut done = merged.to_vec();
        assert!(complete_checksum_at(&mut done, 34, 16));
        assert!(
            done == f,
            "the completed checksum differs from the original"
        );
        assert!(c.is_empty());
    }

    #[test]
    fn coalescing_refuses_gaps_other_flows_and_control_segments() {
        let f = gso_frame_with(3000, false);
        let mut segs = Vec::new();
        let s = segment_tcp(&f, 1000, 0, &mut segs).unwrap();
        let seg = |i: usize| segs[i * s.block..(i * s.block + s.block).min(segs.len())].to_vec();
        let mut c = Coalescer::new();
        assert!(c.offer(&seg(0)));
        assert!(!c.offer(&seg(2)), "a gap in sequence numbers");
        let mut other = seg(1);
        other[36] ^= 1; // another source port
        assert!(!c.offer(&other));
        let mut fin = seg(1);
        fin[47] |= 0x01;
        assert!(!c.offer(&fin));
        let mut syn = seg(1);
        syn[47] = 0x02;
        assert!(!c.offer(&syn));
        assert!(c.offer(&seg(1)));
        assert!(!c.offer(&udp_frame(b"not tcp")));
        let (m, h) = c.take().unwrap();
        assert_eq!((m.len(), h.gso_size), (54 + 2000, 1000));
        assert!(c.take().is_none());
        // A lone segment comes back untouched, without GSO.
        assert!(c.offer(&seg(0)));
        let (m, h) = c.take().unwrap();
        assert!(m == &seg(0)[..]);
        assert_eq!(h, VnetHdr::default());
    }

    #[test]
    fn dscp_marks_keep_the_ipv4_checksum_right() {
        let mut f = udp_frame(b"mark me");
        assert!(set_dscp(&mut f, 26));
        let k = FlowKey::parse(&f, 1);
        assert_eq!(k.dscp, 26);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..]).unwrap();
        assert_eq!(ip.to_header().calc_header_checksum(), ip.header_checksum());
        let mut f = tcp6_frame(b"x");
        assert!(set_dscp(&mut f, 46));
        assert_eq!(FlowKey::parse(&f, 1).dscp, 46);
        assert!(!set_dscp(
            &mut announce::rarp(MacAddr([2, 0, 0, 0, 0, 1])),
            1
        ));
    }

    #[test]
    fn flow_keys_of_tcp_udp_icmp_and_arp() {
        let k = FlowKey::parse(&gso_frame(10), 10);
        assert_eq!(k.proto, Some(6));
        assert_eq!((k.src_port, k.dst_port), (40000, 5201));
        assert_eq!(k.tcp_flags & 0x19, 0x19);
        assert_eq!(k.dst_ip, Some("10.0.0.2".parse().unwrap()));
        let k = FlowKey::parse(&udp_frame(b"x"), 20);
        assert_eq!(
            (k.proto, k.src_port, k.dst_port, k.vlan),
            (Some(17), 1234, 5678, 20)
        );
        let k = FlowKey::parse(&tcp6_frame(b"x"), 1);
        assert_eq!((k.proto, k.dst_port), (Some(6), 80));
        let mut icmp = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut icmp, b"ping")
            .unwrap();
        let k = FlowKey::parse(&icmp, 1);
        assert_eq!(
            (k.proto, k.src_port, k.dst_port, k.icmp_id),
            (Some(1), 8, 0, 7)
        );
        let k = FlowKey::parse(&announce::rarp(MacAddr([2, 1, 1, 1, 1, 1])), 1);
        assert_eq!((k.ethertype, k.proto, k.src_ip), (0x8035, None, None));
    }

    proptest! {
        #[test]
        fn flow_key_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>()) {
            let mut b = bytes;
            if b.len() > 14 {
                b[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
                b[14] = if v6 { 0x60 } else { 0x45 };
            }
            let _ = FlowKey::parse(&b, 1);
        }

        #[test]
        fn coalescer_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..8)) {
            let mut c = Coalescer::new();
            for f in &frames {
                if !c.offer(f) {
                    let _ = c.take();
                    let _ = c.offer(f);
                }
            }
            let _ = c.take();
        }

        #[test]
        fn segmentation_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), mss in 0usize..300) {
            let mut out = Vec::new();
            let _ = segment_tcp(&bytes, mss, 8, &mut out);
        }

        #[test]
        fn segments_carry_the_payload_once(n in 0usize..5000, mss in 1usize..1500) {
            let f = gso_frame(n);
            let mut out = Vec::new();
            let s = segment_tcp(&f, mss, 0, &mut out).unwrap();
            prop_assert_eq!(s.count, n.div_ceil(mss).max(1));
            prop_assert_eq!(out.len(), (s.count - 1) * s.block + s.last);
            prop_assert_eq!(out.len() - s.count * 54, n);
        }

        #[test]
        fn completion_is_idempotent_on_good_frames(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let good = udp_frame(&payload);
            let mut f = good.clone();
            let _ = complete_partial_checksum(&mut f);
            prop_assert_eq!(f, good);
        }

        #[test]
        fn checksum_completion_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if bytes.len() > 13 { bytes[12] = 0x08; bytes[13] = 0; }
            let _ = complete_partial_checksum(&mut bytes);
        }

        #[test]
        fn push_then_pop_restores_the_frame(
            vid in 0u16..4096, pcp in 0u8..8,
            payload in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let f = frame(&[], 0x0800, &payload);
            let mut buf = vec![0u8; 4];
            buf.extend_from_slice(&f);
            let start = push_tag(&mut buf, 4, 0x8100, tci(vid, pcp)).unwrap();
            prop_assert_eq!(start, 0);
            let v = EthView::parse(&buf[start..]).unwrap();
            prop_assert_eq!(v.outer, Some(Tag { tpid: 0x8100, vid, pcp }));
            prop_assert_eq!(v.ethertype, 0x0800);
            let start = pop_tag(&mut buf, start);
            prop_assert_eq!(&buf[start..], &f[..]);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = EthView::parse(&bytes);
            let _ = vxlan::decode(&bytes);
            let mut b = bytes.clone();
            let _ = pop_tag(&mut b, 0);
            let _ = push_tag(&mut b, 4, 0x8100, 1);
        }
    }
}
