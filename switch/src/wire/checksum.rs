//! Internet checksums: finishing what a sender's offload left undone.

use super::ETH_HLEN;

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
pub(super) fn sum16(b: &[u8]) -> u32 {
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

pub(super) fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
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
