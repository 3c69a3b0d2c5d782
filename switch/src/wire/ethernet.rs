//! Ethernet and 802.1Q: the checked view of a frame's link layer, and tag
//! edits in place.

use dvs_proto::MacAddr;
use etherparse::{EtherType, Ethernet2HeaderSlice, SingleVlanHeaderSlice};

use super::WireError;

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
