//! Route-netlink link messages, sans-IO: what the kernel says when an
//! interface appears, changes or goes (`RTM_NEWLINK` / `RTM_DELLINK`), and
//! the `RTM_GETLINK` request that asks for one interface's counters. The
//! socket is [`crate::driver::sys::LinkMonitor`]'s; this module only reads and
//! writes bytes, and never panics on them (a message that does not parse
//! is skipped).
//!
//! Layout (`include/uapi/linux/netlink.h`, `rtnetlink.h`, `if_link.h`): a
//! 16-byte `nlmsghdr` (length, type, flags, sequence, port), a 16-byte
//! `ifinfomsg` (family, type, index, flags, change), then attributes of
//! 4-byte `rtattr` headers (length, type) aligned to 4 bytes.

/// `RTM_NEWLINK`: an interface appeared or changed.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_DELLINK`: an interface went away.
pub const RTM_DELLINK: u16 = 17;
/// `RTM_GETLINK`: ask for an interface.
pub const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_STATS64: u16 = 23;
const IFLA_INFO_KIND: u16 = 1;
const HDR: usize = 16;
const IFINFO: usize = 16;

/// What one link message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Interface `index` named `name` exists (new, or changed); `kind` is
    /// its driver's kind when the kernel says (`tun`, `veth`, `bridge`, …).
    Present {
        index: u32,
        name: String,
        kind: Option<String>,
        /// `IFF_UP`.
        up: bool,
        /// `tx_packets` of its counters, when the message carries them.
        tx_packets: Option<u64>,
    },
    /// Interface `index` named `name` is gone.
    Gone { index: u32, name: String },
    /// The kernel reported an error for our request (negative errno).
    Error(i32),
}

/// The link messages in one datagram from a route-netlink socket.
pub fn parse(buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HDR <= buf.len() {
        let len = u32_at(buf, at) as usize;
        let ty = u16_at(buf, at + 4);
        if len < HDR || at + len > buf.len() {
            break;
        }
        let msg = &buf[at + HDR..at + len];
        match ty {
            RTM_NEWLINK | RTM_DELLINK => {
                if let Some(e) = link(ty, msg) {
                    out.push(e);
                }
            }
            NLMSG_ERROR if msg.len() >= 4 => {
                let errno = u32_at(msg, 0) as i32;
                if errno != 0 {
                    out.push(LinkEvent::Error(errno));
                }
            }
            NLMSG_DONE => break,
            _ => {}
        }
        at += align(len);
    }
    out
}

/// An `RTM_GETLINK` request for interface `index`, with sequence `seq`.
pub fn get_link(index: u32, seq: u32) -> [u8; HDR + IFINFO] {
    let mut m = [0u8; HDR + IFINFO];
    m[0..4].copy_from_slice(&((HDR + IFINFO) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, index.
    m[HDR + 4..HDR + 8].copy_from_slice(&index.to_ne_bytes());
    m
}

fn link(ty: u16, msg: &[u8]) -> Option<LinkEvent> {
    if msg.len() < IFINFO {
        return None;
    }
    let index = u32_at(msg, 4);
    let flags = u32_at(msg, 8);
    let (mut name, mut kind, mut tx_packets) = (None, None, None);
    for (t, v) in attrs(&msg[IFINFO..]) {
        match t {
            IFLA_IFNAME => name = Some(c_string(v)),
            IFLA_LINKINFO => {
                kind = attrs(v)
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, k)| c_string(k));
            }
            // struct rtnl_link_stats64: rx_packets, tx_packets, …
            IFLA_STATS64 if v.len() >= 16 => tx_packets = Some(u64_at(v, 8)),
            _ => {}
        }
    }
    let name = name?;
    Some(if ty == RTM_DELLINK {
        LinkEvent::Gone { index, name }
    } else {
        LinkEvent::Present {
            index,
            name,
            kind,
            up: flags & 1 != 0,
            tx_packets,
        }
    })
}

/// The attributes in `buf`: (type without the nested/byte-order bits, value).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = usize::from(u16_at(buf, at));
        let ty = u16_at(buf, at + 2) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let v = &buf[at + 4..at + len];
        at += align(len);
        Some((ty, v))
    })
}

fn c_string(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(v);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(ty: u16, index: u32, flags: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = HDR + IFINFO + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn new_and_deleted_links_are_read() {
        let mut stats = vec![0u8; 200];
        stats[8..16].copy_from_slice(&7u64.to_ne_bytes());
        let info = attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"tun\0"));
        let mut buf = message(
            RTM_NEWLINK,
            12,
            1,
            &[
                attr(IFLA_IFNAME, b"vnet3\0"),
                info,
                attr(IFLA_STATS64, &stats),
            ],
        );
        buf.extend(message(RTM_DELLINK, 9, 0, &[attr(IFLA_IFNAME, b"vnet1\0")]));
        assert_eq!(
            parse(&buf),
            vec![
                LinkEvent::Present {
                    index: 12,
                    name: "vnet3".into(),
                    kind: Some("tun".into()),
                    up: true,
                    tx_packets: Some(7),
                },
                LinkEvent::Gone {
                    index: 9,
                    name: "vnet1".into()
                }
            ]
        );
    }

    #[test]
    fn broken_messages_are_skipped_without_panicking() {
        let good = message(RTM_NEWLINK, 3, 0, &[attr(IFLA_IFNAME, b"a\0")]);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        // An attribute whose length runs past the message.
        let mut bad = good.clone();
        bad[HDR + IFINFO] = 200;
        assert!(parse(&bad).is_empty());
        // No name: not a link we can match.
        assert!(parse(&message(RTM_NEWLINK, 3, 0, &[])).is_empty());
        for seed in 0u8..=255 {
            let noise: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(31) ^ seed.rotate_left(3))
                .collect();
            let _ = parse(&noise);
        }
    }

    #[test]
    fn a_request_names_its_interface() {
        let r = get_link(42, 5);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u16_at(&r, 4), RTM_GETLINK);
        assert_eq!(u32_at(&r, HDR + 4), 42);
    }
}
