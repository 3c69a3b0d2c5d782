//! Announcement frames a switch sends on a VM's behalf.

use dvs_proto::MacAddr;

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
