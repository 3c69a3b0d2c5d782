//! IP and L4 headers: the flow key the ACLs, connection tracking and flow
//! tables read, L3 metering of (GSO) frames, DSCP marking.

use dvs_proto::MacAddr;

use super::checksum::fold;
use super::ETH_HLEN;

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

/// The IP protocol and its bytes (after IPv6 extension headers, to the end
/// of the frame) of an untagged IPv4 or IPv6 frame; `None` for other
/// frames and for non-first fragments. Safe on any bytes: the headers are
/// walked as [`FlowKey::parse`] walks them.
pub fn l4(frame: &[u8]) -> Option<(u8, &[u8])> {
    let mut k = FlowKey::parse(&[], 0);
    let ip = frame.get(ETH_HLEN..)?;
    let l4 = match frame.get(12..14)? {
        [0x08, 0x00] => parse_ipv4(ip, &mut k),
        [0x86, 0xdd] => parse_ipv6(ip, &mut k),
        _ => None,
    }?;
    Some((k.proto?, l4))
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
