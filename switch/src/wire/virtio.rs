//! The virtio-net header of TAP devices opened with `IFF_VNET_HDR`.

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
