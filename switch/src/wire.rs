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

    proptest! {
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
