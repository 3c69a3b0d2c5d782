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

    proptest! {
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
