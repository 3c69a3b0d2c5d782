//! Segmentation offloads done in software: TSO (a GSO frame cut into
//! segments) and GRO (TCP segments from the tunnel coalesced into one GSO
//! frame).

use super::checksum::{fold, sum16};
use super::{VnetHdr, ETH_HLEN};

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
