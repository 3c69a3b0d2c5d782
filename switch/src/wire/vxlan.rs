//! VXLAN (RFC 7348): 8 bytes before the inner Ethernet frame.
//!
//! ```text
//!  0               1               2               3
//! |R|R|R|R|I|R|R|R|           Reserved (24)                       |
//! |            VXLAN Network Identifier (24)      | Reserved (8)  |
//! ```

use dvs_proto::Vni;

use super::WireError;

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
