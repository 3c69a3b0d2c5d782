//! Access-control rules, as admins write them in port profiles, validated.
//!
//! ```yaml
//! acl:
//!   in:
//!     - { action: permit, proto: tcp, dst_port: 80, stateful: true }
//!     - { action: permit, proto: tcp, dst_port: "8000-8080", src: 10.0.0.0/8 }
//!     - { action: permit, proto: icmp, icmp_type: 8 }
//!     - { action: deny, proto: tcp, tcp_flags: [syn, "!ack"] }
//!     - { action: deny }
//! ```
//!
//! A rule matches when every field it names matches; the first matching rule
//! decides; a list that matches nothing denies (the implicit last rule of
//! every switch vendor). [`AclRule::from_raw`] turns the file form into a
//! rule or an error that names the rule and the field.

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::{Error, MacAddr, VlanId};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Permit,
    Deny,
}

/// An IP protocol number, written by name where it has a common one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpProto(pub u8);

impl IpProto {
    pub const ICMP: IpProto = IpProto(1);
    pub const TCP: IpProto = IpProto(6);
    pub const UDP: IpProto = IpProto(17);
    pub const ICMPV6: IpProto = IpProto(58);

    fn has_ports(self) -> bool {
        self == Self::TCP || self == Self::UDP
    }

    fn is_icmp(self) -> bool {
        self == Self::ICMP || self == Self::ICMPV6
    }
}

impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ICMP => f.write_str("icmp"),
            Self::TCP => f.write_str("tcp"),
            Self::UDP => f.write_str("udp"),
            Self::ICMPV6 => f.write_str("icmpv6"),
            IpProto(n) => write!(f, "{n}"),
        }
    }
}

/// An inclusive range of L4 ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// TCP flags that must be set (`set`) among those examined (`mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpFlags {
    pub set: u8,
    pub mask: u8,
}

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;

    pub fn matches(&self, flags: u8) -> bool {
        flags & self.mask == self.set
    }
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AclRule {
    pub action: Action,
    pub src_mac: Option<MacAddr>,
    pub dst_mac: Option<MacAddr>,
    pub ethertype: Option<u16>,
    pub vlan: Option<VlanId>,
    pub src: Option<IpNetwork>,
    pub dst: Option<IpNetwork>,
    pub proto: Option<IpProto>,
    pub src_port: Option<PortRange>,
    pub dst_port: Option<PortRange>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub tcp_flags: Option<TcpFlags>,
    /// Permit the return traffic of connections this rule lets through
    /// (connection tracking), while new connections the other way still
    /// meet the rules.
    pub stateful: bool,
}

impl AclRule {
    /// A rule that matches everything.
    pub fn any(action: Action) -> Self {
        AclRule {
            action,
            src_mac: None,
            dst_mac: None,
            ethertype: None,
            vlan: None,
            src: None,
            dst: None,
            proto: None,
            src_port: None,
            dst_port: None,
            icmp_type: None,
            icmp_code: None,
            tcp_flags: None,
            stateful: false,
        }
    }

    /// Validate the file form of a rule; `at` names it in errors (e.g.
    /// "acl.in[2]").
    ///
    /// # Errors
    /// [`Error::Rule`] naming the rule, the field and what would be valid.
    pub fn from_raw(raw: &RawRule, at: &str) -> Result<Self, Error> {
        let bad = |field: &str, msg: String| Error::Rule {
            at: at.to_string(),
            field: field.to_string(),
            msg,
        };
        let action = match raw.action.as_str() {
            "permit" | "allow" => Action::Permit,
            "deny" | "drop" => Action::Deny,
            other => {
                return Err(bad(
                    "action",
                    format!("unknown action `{other}`: expected permit or deny"),
                ))
            }
        };
        let mac = |field: &str, v: &Option<String>| -> Result<Option<MacAddr>, Error> {
            v.as_deref()
                .map(|s| s.parse::<MacAddr>().map_err(|e| bad(field, e.to_string())))
                .transpose()
        };
        let net = |field: &str, v: &Option<String>| -> Result<Option<IpNetwork>, Error> {
            v.as_deref()
                .map(|s| parse_net(s).map_err(|m| bad(field, m)))
                .transpose()
        };
        let proto = raw
            .proto
            .as_ref()
            .map(|p| parse_proto(p).map_err(|m| bad("proto", m)))
            .transpose()?;
        let ports = |field: &str, v: &Option<NumOrText>| -> Result<Option<PortRange>, Error> {
            let Some(v) = v else { return Ok(None) };
            if !proto.is_some_and(IpProto::has_ports) {
                return Err(bad(field, "ports need `proto: tcp` or `proto: udp`".into()));
            }
            parse_ports(v).map(Some).map_err(|m| bad(field, m))
        };
        let byte = |field: &str, v: Option<u64>| -> Result<Option<u8>, Error> {
            let Some(v) = v else { return Ok(None) };
            if !proto.is_some_and(IpProto::is_icmp) {
                return Err(bad(
                    field,
                    "ICMP fields need `proto: icmp` or `proto: icmpv6`".into(),
                ));
            }
            u8::try_from(v)
                .map(Some)
                .map_err(|_| bad(field, format!("{v} is out of range 0..=255")))
        };
        let vlan = raw
            .vlan
            .map(|v| VlanId::new(v).map_err(|e| bad("vlan", e.to_string())))
            .transpose()?;
        let ethertype = raw
            .ethertype
            .as_ref()
            .map(|e| parse_ethertype(e).map_err(|m| bad("ethertype", m)))
            .transpose()?;
        let tcp_flags = match &raw.tcp_flags {
            None => None,
            Some(_) if proto != Some(IpProto::TCP) => {
                return Err(bad("tcp_flags", "TCP flags need `proto: tcp`".into()))
            }
            Some(list) => Some(parse_flags(list).map_err(|m| bad("tcp_flags", m))?),
        };
        let src = net("src", &raw.src)?;
        let dst = net("dst", &raw.dst)?;
        if let (Some(s), Some(d)) = (src, dst) {
            if s.is_ipv4() != d.is_ipv4() {
                return Err(bad(
                    "dst",
                    format!("{d} and src {s} are of different IP versions"),
                ));
            }
        }
        if raw.stateful && action != Action::Permit {
            return Err(bad("stateful", "only a permit rule can be stateful".into()));
        }
        Ok(AclRule {
            action,
            src_mac: mac("src_mac", &raw.src_mac)?,
            dst_mac: mac("dst_mac", &raw.dst_mac)?,
            ethertype,
            vlan,
            src,
            dst,
            proto,
            src_port: ports("src_port", &raw.src_port)?,
            dst_port: ports("dst_port", &raw.dst_port)?,
            icmp_type: byte("icmp_type", raw.icmp_type)?,
            icmp_code: byte("icmp_code", raw.icmp_code)?,
            tcp_flags,
            stateful: raw.stateful,
        })
    }

    /// Validate a list of rules; `at` names the list (e.g. "acl.in").
    ///
    /// # Errors
    /// The first invalid rule, named `at[i]`.
    pub fn list_from_raw(raw: &[RawRule], at: &str) -> Result<Vec<Self>, Error> {
        raw.iter()
            .enumerate()
            .map(|(i, r)| AclRule::from_raw(r, &format!("{at}[{i}]")))
            .collect()
    }

    /// Does an IP packet's address fall in this rule's `src`/`dst`?
    pub fn net_contains(net: &Option<IpNetwork>, ip: Option<IpAddr>) -> bool {
        match (net, ip) {
            (None, _) => true,
            (Some(n), Some(ip)) => n.contains(ip),
            (Some(_), None) => false,
        }
    }
}

/// A rule as written in a file; see [`AclRule::from_raw`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub action: String,
    #[serde(default)]
    pub src_mac: Option<String>,
    #[serde(default)]
    pub dst_mac: Option<String>,
    #[serde(default)]
    pub ethertype: Option<NumOrText>,
    #[serde(default)]
    pub vlan: Option<u32>,
    #[serde(default)]
    pub src: Option<String>,
    #[serde(default)]
    pub dst: Option<String>,
    #[serde(default)]
    pub proto: Option<NumOrText>,
    #[serde(default)]
    pub src_port: Option<NumOrText>,
    #[serde(default)]
    pub dst_port: Option<NumOrText>,
    #[serde(default)]
    pub icmp_type: Option<u64>,
    #[serde(default)]
    pub icmp_code: Option<u64>,
    #[serde(default)]
    pub tcp_flags: Option<Vec<String>>,
    #[serde(default)]
    pub stateful: bool,
}

/// A field that may be a number or a word (`80` or `"8000-8080"`, `6` or
/// `tcp`, `0x0800` or `ipv4`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NumOrText {
    Num(u64),
    Text(String),
}

fn parse_net(s: &str) -> Result<IpNetwork, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address or prefix like 10.0.0.0/8"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length /{l} in `{s}` is out of range 0..={max}"))?,
    };
    IpNetwork::new(ip, len).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_proto(p: &NumOrText) -> Result<IpProto, String> {
    match p {
        NumOrText::Num(n) => u8::try_from(*n)
            .map(IpProto)
            .map_err(|_| format!("protocol {n} is out of range 0..=255")),
        NumOrText::Text(t) => match t.to_ascii_lowercase().as_str() {
            "tcp" => Ok(IpProto::TCP),
            "udp" => Ok(IpProto::UDP),
            "icmp" => Ok(IpProto::ICMP),
            "icmpv6" | "ipv6-icmp" => Ok(IpProto::ICMPV6),
            other => other.parse::<u8>().map(IpProto).map_err(|_| {
                format!(
                    "unknown protocol `{t}`: expected tcp, udp, icmp, icmpv6 or a number 0..=255"
                )
            }),
        },
    }
}

fn parse_ports(v: &NumOrText) -> Result<PortRange, String> {
    let one = |s: &str| -> Result<u16, String> {
        let n: u64 = s.trim().parse().map_err(|_| {
            format!("`{s}` is not a port: expected 0..=65535 or a range like 8000-8080")
        })?;
        u16::try_from(n).map_err(|_| format!("port {n} is out of range 0..=65535"))
    };
    let (lo, hi) = match v {
        NumOrText::Num(n) => {
            let p = u16::try_from(*n).map_err(|_| format!("port {n} is out of range 0..=65535"))?;
            (p, p)
        }
        NumOrText::Text(t) => match t.split_once('-') {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let p = one(t)?;
                (p, p)
            }
        },
    };
    if lo > hi {
        return Err(format!(
            "port range {lo}-{hi} is empty: write the low port first"
        ));
    }
    Ok(PortRange { lo, hi })
}

fn parse_ethertype(e: &NumOrText) -> Result<u16, String> {
    match e {
        NumOrText::Num(n) => {
            u16::try_from(*n).map_err(|_| format!("ethertype {n} is out of range 0..=0xffff"))
        }
        NumOrText::Text(t) => match t.to_ascii_lowercase().as_str() {
            "ipv4" => Ok(0x0800),
            "ipv6" => Ok(0x86dd),
            "arp" => Ok(0x0806),
            "rarp" => Ok(0x8035),
            other => {
                let hex = other.strip_prefix("0x").unwrap_or(other);
                u16::from_str_radix(hex, 16).map_err(|_| {
                    format!("unknown ethertype `{t}`: expected ipv4, ipv6, arp, rarp or a number like 0x88cc")
                })
            }
        },
    }
}

fn parse_flags(list: &[String]) -> Result<TcpFlags, String> {
    let mut f = TcpFlags { set: 0, mask: 0 };
    for item in list {
        let (neg, name) = match item.strip_prefix('!') {
            Some(n) => (true, n),
            None => (false, item.as_str()),
        };
        let bit = match name.to_ascii_lowercase().as_str() {
            "fin" => TcpFlags::FIN,
            "syn" => TcpFlags::SYN,
            "rst" => TcpFlags::RST,
            "psh" => TcpFlags::PSH,
            "ack" => TcpFlags::ACK,
            "urg" => TcpFlags::URG,
            _ => {
                return Err(format!(
                    "unknown TCP flag `{item}`: expected fin, syn, rst, psh, ack, urg, each optionally with `!`"
                ))
            }
        };
        f.mask |= bit;
        if !neg {
            f.set |= bit;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Result<AclRule, Error> {
        let raw: RawRule = serde_norway::from_str(yaml).unwrap();
        AclRule::from_raw(&raw, "acl.in[0]")
    }

    fn err(yaml: &str) -> String {
        rule(yaml).unwrap_err().to_string()
    }

    #[test]
    fn rules_in_the_design_parse() {
        let r = rule("{ action: permit, proto: tcp, dst_port: 80, stateful: true }").unwrap();
        assert_eq!(r.proto, Some(IpProto::TCP));
        assert_eq!(r.dst_port, Some(PortRange { lo: 80, hi: 80 }));
        assert!(r.stateful);
        let r = rule("{ action: permit, proto: icmp }").unwrap();
        assert_eq!(r.proto, Some(IpProto::ICMP));
        assert_eq!(
            rule("{ action: deny }").unwrap(),
            AclRule::any(Action::Deny)
        );
        let r = rule(
            "{ action: permit, proto: tcp, src: 10.0.0.0/8, dst: 10.1.2.3, src_port: \"1024-65535\", tcp_flags: [syn, \"!ack\"] }",
        )
        .unwrap();
        assert_eq!(
            r.src_port,
            Some(PortRange {
                lo: 1024,
                hi: 65535
            })
        );
        assert_eq!(r.dst.unwrap().prefix(), 32);
        assert_eq!(
            r.tcp_flags,
            Some(TcpFlags {
                set: TcpFlags::SYN,
                mask: TcpFlags::SYN | TcpFlags::ACK
            })
        );
        let r = rule("{ action: deny, ethertype: arp, vlan: 20, src_mac: \"02:00:00:00:00:01\" }")
            .unwrap();
        assert_eq!((r.ethertype, r.vlan.unwrap().get()), (Some(0x0806), 20));
    }

    #[test]
    fn bad_rules_name_the_rule_the_field_and_the_valid_range() {
        assert_eq!(
            err("{ action: permit, proto: tcp, dst_port: 70000 }"),
            "acl.in[0], dst_port: port 70000 is out of range 0..=65535"
        );
        assert_eq!(
            err("{ action: permit, dst: 10.0.0.0/33 }"),
            "acl.in[0], dst: prefix length /33 in `10.0.0.0/33` is out of range 0..=32"
        );
        assert_eq!(
            err("{ action: permit, vlan: 4095 }"),
            "acl.in[0], vlan: VLAN 4095 is out of range 1..=4094"
        );
        assert_eq!(
            err("{ action: allowx }"),
            "acl.in[0], action: unknown action `allowx`: expected permit or deny"
        );
        assert!(err("{ action: permit, dst_port: 80 }").contains("ports need `proto: tcp`"));
        assert!(err("{ action: permit, proto: tcp, icmp_type: 8 }").contains("ICMP fields need"));
        assert!(err("{ action: permit, proto: tcp, dst_port: \"90-80\" }").contains("is empty"));
        assert!(err("{ action: deny, stateful: true }").contains("only a permit rule"));
        assert!(err("{ action: permit, proto: gre2 }").contains("unknown protocol `gre2`"));
        assert!(err("{ action: permit, src: 10.0.0.0/8, dst: \"::1\" }")
            .contains("different IP versions"));
        assert!(
            err("{ action: permit, proto: tcp, tcp_flags: [syn, bogus] }")
                .contains("unknown TCP flag `bogus`")
        );
    }
}
