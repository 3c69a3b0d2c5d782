//! DHCP and router advertisements as the switch snoops them (RFC 2131,
//! RFC 8415, RFC 4861): which frames only a DHCP server or a router sends
//! — the rogue-server and router guards drop them from untrusted ports —
//! and the DHCPv4 fields that make, renew and end a VM's IP binding.
//!
//! Every function takes an untagged frame and is safe on any bytes: what
//! cannot be read is `None`. IPv6 extension headers are walked (eight at
//! most) the way [`FlowKey`](crate::wire::FlowKey) walks them ([`ip::l4`]), so a hop-by-hop or destination
//! options header does not hide a router advertisement; a non-first
//! fragment carries no upper-layer header and is no server message.

use std::net::Ipv4Addr;

use dvs_proto::MacAddr;

use crate::wire::{ip, ETH_HLEN};

/// UDP ports of DHCPv4 (server, client) and DHCPv6 (server, client).
const DHCP4: (u16, u16) = (67, 68);
const DHCP6: (u16, u16) = (547, 546);
/// ICMPv6 router advertisement.
const ROUTER_ADVERTISEMENT: u16 = 134;
/// The fixed part of a DHCPv4 message, then the magic cookie.
const BOOTP_LEN: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];

/// A message only a DHCP server or a router sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMessage {
    /// DHCPv4 from the server port to the client port (offer, ack, nak).
    Dhcp4,
    /// DHCPv6 from the server port to the client port (advertise, reply).
    Dhcp6,
    /// An ICMPv6 router advertisement.
    RouterAdvertisement,
}

/// What `frame` is, if it is a server's or a router's message. TCP and
/// other UDP traffic is told apart from the first header bytes, without a
/// full parse.
pub fn server_message(frame: &[u8]) -> Option<ServerMessage> {
    // The usual cases told from one byte: IPv4 not UDP, IPv6 with TCP
    // straight after the fixed header.
    match ethertype(frame)? {
        0x0800 if !udp4_at_a_glance(frame) => return None,
        0x86dd if *frame.get(ETH_HLEN + 6)? == 6 => return None,
        _ => {}
    }
    let (proto, l4) = ip::l4(frame)?;
    let v6 = ethertype(frame)? == 0x86dd;
    match proto {
        17 => {
            let (src, dst, _) = udp(l4)?;
            match (src, dst) {
                DHCP4 if !v6 => Some(ServerMessage::Dhcp4),
                DHCP6 if v6 => Some(ServerMessage::Dhcp6),
                _ => None,
            }
        }
        58 if l4.first() == Some(&(ROUTER_ADVERTISEMENT as u8)) => {
            Some(ServerMessage::RouterAdvertisement)
        }
        _ => None,
    }
}

/// The DHCPv4 message types the snooping acts on (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dhcp4Type {
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    /// Any other type (discover, offer, inform, …).
    Other(u8),
}

/// The fields of a DHCPv4 message a binding is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dhcp4 {
    pub kind: Dhcp4Type,
    /// The client's hardware address (`chaddr`, Ethernet only).
    pub chaddr: MacAddr,
    /// The client's current address (a release names it here).
    pub ciaddr: Ipv4Addr,
    /// The address the server gives (an ack).
    pub yiaddr: Ipv4Addr,
    /// Option 50: the address a client requests (or declines).
    pub requested: Option<Ipv4Addr>,
    /// Option 51: the lease, in seconds (`u32::MAX`: infinite).
    pub lease_s: Option<u32>,
}

/// The DHCPv4 message in `frame` (UDP between ports 67 and 68), if it is
/// one with Ethernet addresses and a type.
pub fn dhcp4(frame: &[u8]) -> Option<Dhcp4> {
    let m = dhcp_payload(frame, 0x0800, DHCP4)?;
    let fixed = m.get(..BOOTP_LEN + 4)?;
    // htype 1 (Ethernet), hlen 6, and the magic cookie.
    if fixed[1] != 1 || fixed[2] != 6 || fixed[BOOTP_LEN..] != COOKIE {
        return None;
    }
    let v4 = |o: usize| Ipv4Addr::new(fixed[o], fixed[o + 1], fixed[o + 2], fixed[o + 3]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&fixed[28..34]);
    let (mut kind, mut requested, mut lease_s) = (None, None, None);
    let mut opts = &m[BOOTP_LEN + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => {
                opts = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        match (code, value) {
            (53, [t]) => {
                kind = Some(match t {
                    3 => Dhcp4Type::Request,
                    4 => Dhcp4Type::Decline,
                    5 => Dhcp4Type::Ack,
                    6 => Dhcp4Type::Nak,
                    7 => Dhcp4Type::Release,
                    t => Dhcp4Type::Other(*t),
                })
            }
            (50, [a, b, c, d]) => requested = Some(Ipv4Addr::new(*a, *b, *c, *d)),
            (51, [a, b, c, d]) => lease_s = Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => {}
        }
        opts = &rest[usize::from(len)..];
    }
    Some(Dhcp4 {
        kind: kind?,
        chaddr: MacAddr(chaddr),
        ciaddr: v4(12),
        yiaddr: v4(16),
        requested,
        lease_s,
    })
}

/// The DHCPv6 message types the snooping acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dhcp6Type {
    Reply,
    Release,
    Decline,
    Other(u8),
}

/// The addresses of a DHCPv6 message's IA_NA options (RFC 8415 21.4,
/// 21.6): each with its valid lifetime in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp6 {
    pub kind: Dhcp6Type,
    pub addrs: Vec<(std::net::Ipv6Addr, u32)>,
}

/// The DHCPv6 message in `frame` (UDP between ports 546 and 547, either
/// way), if its options read whole.
pub fn dhcp6(frame: &[u8]) -> Option<Dhcp6> {
    let msg = dhcp_payload(frame, 0x86dd, DHCP6)?;
    let (&t, rest) = msg.split_first()?;
    let kind = match t {
        7 => Dhcp6Type::Reply,
        8 => Dhcp6Type::Release,
        9 => Dhcp6Type::Decline,
        t => Dhcp6Type::Other(t),
    };
    let mut addrs = Vec::new();
    for (code, ia) in options6(rest.get(3..)?)? {
        // IA_NA: IAID, T1, T2, then its own options.
        if code == 3 {
            for (c, a) in options6(ia.get(12..)?)? {
                if c == 5 {
                    let a = a.get(..24)?;
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&a[..16]);
                    let valid = u32::from_be_bytes([a[20], a[21], a[22], a[23]]);
                    addrs.push((std::net::Ipv6Addr::from(ip), valid));
                }
            }
        }
    }
    Some(Dhcp6 { kind, addrs })
}

/// DHCPv6 options (code, value) of `bytes`, or `None` if one runs past
/// the end.
fn options6(mut bytes: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let h = bytes.get(..4)?;
        let (code, len) = (
            u16::from_be_bytes([h[0], h[1]]),
            usize::from(u16::from_be_bytes([h[2], h[3]])),
        );
        out.push((code, bytes.get(4..4 + len)?));
        bytes = &bytes[4 + len..];
    }
    Some(out)
}

/// Is `frame` an IPv4 UDP datagram from the DHCP client port to the
/// server port (`to_server`), or the other way?
pub fn is_dhcp4(frame: &[u8], to_server: bool) -> bool {
    let want = if to_server { (DHCP4.1, DHCP4.0) } else { DHCP4 };
    ethertype(frame) == Some(0x0800)
        && udp4_at_a_glance(frame)
        && ip::l4(frame)
            .filter(|(proto, _)| *proto == 17)
            .and_then(|(_, l4)| udp(l4))
            .is_some_and(|(s, d, _)| (s, d) == want)
}

/// The IPv4 header's protocol byte says UDP (the full walk follows).
fn udp4_at_a_glance(frame: &[u8]) -> bool {
    frame.get(ETH_HLEN + 9) == Some(&17)
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// The UDP payload of `frame` of `ethertype` between the DHCP `ports`
/// (server, client), either way.
fn dhcp_payload(frame: &[u8], ethertype_: u16, ports: (u16, u16)) -> Option<&[u8]> {
    if ethertype(frame)? != ethertype_ {
        return None;
    }
    let (17, l4) = ip::l4(frame)? else {
        return None;
    };
    let (src, dst, payload) = udp(l4)?;
    ((src, dst) == ports || (dst, src) == ports).then_some(payload)
}

/// The ports of a UDP header and its payload, as long as the header says
/// (Ethernet padding left out).
fn udp(l4: &[u8]) -> Option<(u16, u16, &[u8])> {
    let h = l4.get(..8)?;
    let len = usize::from(u16::from_be_bytes([h[4], h[5]])).clamp(8, l4.len());
    Some((
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
        &l4[8..len],
    ))
}

/// Frames for tests: DHCPv4 over Ethernet/IPv4/UDP.
#[cfg(test)]
pub(crate) mod build {
    use super::{BOOTP_LEN, COOKIE};
    use dvs_proto::MacAddr;

    /// A broadcast Ethernet/IPv4/UDP frame from `mac` and `ip`, port `src`
    /// to port `dst`, with `payload` (checksums are not checked here).
    pub fn udp4_frame(mac: MacAddr, ip: [u8; 4], src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(mac.0);
        f.extend([0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend([0x45, 0]);
        f.extend(total.to_be_bytes());
        f.extend([0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend(ip);
        f.extend([255, 255, 255, 255]);
        f.extend(src.to_be_bytes());
        f.extend(dst.to_be_bytes());
        f.extend((8 + payload.len() as u16).to_be_bytes());
        f.extend([0, 0]);
        f.extend(payload);
        f
    }

    /// A DHCPv4 message (`op` 1: client, 2: server) of type `kind` for
    /// client `mac`, giving `yiaddr`, naming `ciaddr`, with `options`
    /// (code, value) after the type.
    pub fn dhcp4_msg(
        op: u8,
        kind: u8,
        mac: MacAddr,
        ciaddr: [u8; 4],
        yiaddr: [u8; 4],
        options: &[(u8, &[u8])],
    ) -> Vec<u8> {
        let mut m = vec![0u8; BOOTP_LEN];
        m[0] = op;
        (m[1], m[2]) = (1, 6);
        m[12..16].copy_from_slice(&ciaddr);
        m[16..20].copy_from_slice(&yiaddr);
        m[28..34].copy_from_slice(&mac.0);
        m.extend(COOKIE);
        m.extend([53, 1, kind]);
        for (code, v) in options {
            m.push(*code);
            m.push(v.len() as u8);
            m.extend(*v);
        }
        m.push(255);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::build::{dhcp4_msg, udp4_frame};
    use super::*;

    const VM: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

    #[test]
    fn an_ack_gives_the_address_the_lease_and_the_client() {
        let ack = dhcp4_msg(
            2,
            5,
            VM,
            [0; 4],
            [10, 0, 0, 7],
            &[(51, &3600u32.to_be_bytes()), (0, &[])],
        );
        let f = udp4_frame(SERVER, [10, 0, 0, 1], 67, 68, &ack);
        assert_eq!(server_message(&f), Some(ServerMessage::Dhcp4));
        let d = dhcp4(&f).unwrap();
        assert_eq!(
            (d.kind, d.chaddr, d.yiaddr, d.lease_s),
            (Dhcp4Type::Ack, VM, Ipv4Addr::new(10, 0, 0, 7), Some(3600))
        );
        let decline = dhcp4_msg(1, 4, VM, [0; 4], [0; 4], &[(50, &[10, 0, 0, 7])]);
        let f = udp4_frame(VM, [0; 4], 68, 67, &decline);
        assert_eq!(server_message(&f), None, "a client's message");
        let d = dhcp4(&f).unwrap();
        assert_eq!(
            (d.kind, d.requested),
            (Dhcp4Type::Decline, Some(Ipv4Addr::new(10, 0, 0, 7)))
        );
    }

    #[test]
    fn other_traffic_is_no_server_message() {
        assert_eq!(
            server_message(&udp4_frame(VM, [10, 0, 0, 7], 5353, 5353, b"x")),
            None
        );
        assert_eq!(
            server_message(&udp4_frame(VM, [10, 0, 0, 7], 68, 67, b"x")),
            None
        );
        assert_eq!(
            dhcp4(&udp4_frame(SERVER, [10, 0, 0, 1], 67, 68, b"too short")),
            None
        );
        // A router advertisement, behind a hop-by-hop options header.
        let mut ra = vec![0x33, 0x33, 0, 0, 0, 1, 2, 0, 0, 0, 0, 9, 0x86, 0xdd];
        ra.extend([0x60, 0, 0, 0, 0, 24, 0, 255]);
        ra.extend([0xfe, 0x80].iter().chain(&[0u8; 14]));
        ra.extend([0xff, 0x02].iter().chain(&[0u8; 13]).chain(&[1u8]));
        ra.extend([58, 0, 5, 2, 0, 0, 1, 0]);
        ra.extend([134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            server_message(&ra),
            Some(ServerMessage::RouterAdvertisement)
        );
        ra[ETH_HLEN + 40 + 8] = 133;
        assert_eq!(server_message(&ra), None, "a router solicitation");
    }

    /// An Ethernet/IPv6/UDP frame from the DHCPv6 server port to the
    /// client port carrying `msg`.
    fn reply6(msg: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 9, 0x86, 0xdd];
        let len = (8 + msg.len()) as u16;
        f.extend([0x60, 0, 0, 0]);
        f.extend(len.to_be_bytes());
        f.extend([17, 64]);
        f.extend([0xfe, 0x80].iter().chain(&[0u8; 13]).chain(&[9u8]));
        f.extend([0xfe, 0x80].iter().chain(&[0u8; 13]).chain(&[1u8]));
        f.extend(547u16.to_be_bytes());
        f.extend(546u16.to_be_bytes());
        f.extend(len.to_be_bytes());
        f.extend([0, 0]);
        f.extend(msg);
        f
    }

    #[test]
    fn a_dhcpv6_reply_gives_its_ia_na_addresses() {
        let addr: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let mut iaaddr = addr.octets().to_vec();
        iaaddr.extend(300u32.to_be_bytes());
        iaaddr.extend(600u32.to_be_bytes());
        let mut ia = vec![0, 0, 0, 1, 0, 0, 0, 100, 0, 0, 0, 200];
        ia.extend([0, 5, 0, 24]);
        ia.extend(&iaaddr);
        let mut msg = vec![7, 1, 2, 3];
        msg.extend([0, 1, 0, 4, 0, 3, 0, 1]); // a client ID, skipped
        msg.extend([0, 3]);
        msg.extend((ia.len() as u16).to_be_bytes());
        msg.extend(&ia);
        let f = reply6(&msg);
        assert_eq!(server_message(&f), Some(ServerMessage::Dhcp6));
        assert_eq!(
            dhcp6(&f),
            Some(Dhcp6 {
                kind: Dhcp6Type::Reply,
                addrs: vec![(addr, 600)]
            })
        );
        // An option running past the end: not read.
        let mut cut = msg.clone();
        cut.truncate(msg.len() - 3);
        assert_eq!(dhcp6(&reply6(&cut)), None);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_safe(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = server_message(&bytes);
            let _ = dhcp4(&bytes);
            let _ = dhcp6(&bytes);
            let _ = dhcp6(&reply6(&bytes));
            // As the payload of a DHCP frame too.
            let _ = dhcp4(&udp4_frame(SERVER, [10, 0, 0, 1], 67, 68, &bytes));
        }
    }
}
