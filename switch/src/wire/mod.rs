//! The packet bytes: the only module that reads or writes frames and imports
//! etherparse. A file per protocol:
//!
//! - [`ethernet`]: [`EthView`], a compact, checked view of an Ethernet frame
//!   (MACs, up to two VLAN tags, the ethertype after them), and 802.1Q tag
//!   edits ([`pop_tag`], [`push_tag`], [`vlan_tag`]);
//! - [`vxlan`]: the RFC 7348 header codec;
//! - [`ip`]: the [`FlowKey`] policy and flow accounting read, L3 metering,
//!   DSCP marking;
//! - [`checksum`]: finishing checksums offloads left undone;
//! - [`dhcp`]: DHCP and router advertisements as the switch snoops them;
//! - [`virtio`]: the virtio-net header of TAP devices ([`VnetHdr`]);
//! - [`offload`]: software TSO ([`segment_tcp`]) and GRO ([`Coalescer`]);
//! - [`announce`]: the RARP frames a switch sends for a VM;
//! - [`netflow`]: NetFlow v5/v9 and IPFIX messages.
//!
//! Untrusted input: every function here that takes bytes is safe on any
//! input — it returns an error for short or malformed bytes and never panics.

pub mod announce;
pub mod checksum;
pub mod dhcp;
pub mod ethernet;
pub mod ip;
pub mod netflow;
pub mod offload;
pub mod virtio;
pub mod vxlan;

pub use checksum::{complete_checksum_at, complete_partial_checksum};
pub use ethernet::{
    is_tpid, pop_tag, push_tag, tci, vlan_tag, EthView, Tag, ETH_HLEN, MACS_LEN, TAG_LEN,
};
#[cfg(test)]
pub(crate) use ip::ipv4_key;
pub use ip::{l3_meter, set_dscp, FlowKey, L3Meter};
pub use offload::{segment_tcp, Coalescer, SegmentError, Segments};
pub use virtio::VnetHdr;

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

#[cfg(test)]
mod tests;
