//! Access-control lists compiled for the datapath.
//!
//! [`Acl::compile`] turns validated [`AclRule`]s into flat records of
//! integer masks and ranges (MACs as u64, IPv4 as u32, IPv6 as u128), and
//! [`Acl::evaluate`] finds the first rule that matches a [`FlowKey`] — the
//! same answer as reading the rules top to bottom (a property test holds the
//! two together). No rule matching means deny, as on every switch. Each rule
//! has a hit counter; so does the implicit deny.
//!
//! Direction is seen from the VM, as in vSphere's port filters: a port's `in`
//! list filters traffic going into the VM, its `out` list traffic the VM
//! sends.

pub use dvs_proto::stats::RuleHits;
use std::net::IpAddr;

use dvs_proto::acl::{AclRule, Action};
use ipnetwork::IpNetwork;
use rustc_hash::FxHashMap;

use crate::wire::FlowKey;

/// A compiled list with its counters and its decision cache.
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Vec<Compiled>,
    /// Rules for one protocol and one destination port, by (proto, port):
    /// a packet can only match those of its own pair, plus `others`.
    by_port: FxHashMap<(u8, u16), Vec<u32>>,
    /// Every other rule, in order.
    others: Vec<u32>,
    source: Vec<AclRule>,
    hits: Vec<u64>,
    default_hits: u64,
    /// Exact-match cache from a packet's key to the index of the rule that
    /// decided it (`NO_RULE`: the implicit deny). A policy change builds a
    /// new `Acl`, so the cache never outlives the rules it cached.
    cache: FxHashMap<FlowKey, u32>,
}

/// Cache entries kept before the cache starts over.
const CACHE_MAX: usize = 8192;
const NO_RULE: u32 = u32::MAX;

/// The outcome of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The matching rule's index; `None` for the implicit deny.
    pub rule: Option<usize>,
    pub stateful: bool,
}

#[derive(Debug, Clone, Copy)]
enum Ip {
    Any,
    V4 { addr: u32, mask: u32 },
    V6 { addr: u128, mask: u128 },
}

#[derive(Debug, Clone, Copy)]
struct Compiled {
    action: Action,
    stateful: bool,
    src_mac: Option<u64>,
    dst_mac: Option<u64>,
    ethertype: Option<u16>,
    vlan: Option<u16>,
    src: Ip,
    dst: Ip,
    proto: Option<u8>,
    src_port: (u16, u16),
    dst_port: (u16, u16),
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    tcp: (u8, u8),
    /// The rule names an L3/L4 field: it cannot match a non-IP frame.
    needs_ip: bool,
}

impl Acl {
    /// Compile `rules` (first match wins, no match denies).
    pub fn compile(rules: &[AclRule]) -> Self {
        let mut by_port: FxHashMap<(u8, u16), Vec<u32>> = FxHashMap::default();
        let mut others = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            match (r.proto, r.dst_port) {
                (Some(p), Some(d)) if d.lo == d.hi => {
                    by_port.entry((p.0, d.lo)).or_default().push(i as u32)
                }
                _ => others.push(i as u32),
            }
        }
        Acl {
            by_port,
            others,
            rules: rules.iter().map(compile_rule).collect(),
            source: rules.to_vec(),
            hits: vec![0; rules.len()],
            default_hits: 0,
            cache: FxHashMap::default(),
        }
    }

    pub fn rules(&self) -> &[AclRule] {
        &self.source
    }

    /// The first rule matching `key`, without counting.
    pub fn evaluate(&self, key: &FlowKey) -> Decision {
        let exact: &[u32] = match key.proto {
            Some(p) => self
                .by_port
                .get(&(p, key.dst_port))
                .map_or(&[], Vec::as_slice),
            None => &[],
        };
        // Walk both candidate lists in rule order; the first match decides.
        let (mut a, mut b) = (exact.iter().peekable(), self.others.iter().peekable());
        let first = loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => break None,
            };
            if let Some(&i) = next {
                if self.rules[i as usize].matches(key) {
                    break Some(i as usize);
                }
            }
        };
        match first {
            Some(i) => Decision {
                action: self.rules[i].action,
                rule: Some(i),
                stateful: self.rules[i].stateful,
            },
            None => Decision {
                action: Action::Deny,
                rule: None,
                stateful: false,
            },
        }
    }

    /// [`Acl::evaluate`] through the decision cache, counting the hit.
    pub fn check(&mut self, key: &FlowKey) -> Decision {
        let idx = match self.cache.get(key) {
            Some(i) => *i,
            None => {
                let i = self.evaluate(key).rule.map_or(NO_RULE, |i| i as u32);
                if self.cache.len() >= CACHE_MAX {
                    self.cache.clear();
                }
                self.cache.insert(*key, i);
                i
            }
        };
        match self.rules.get(idx as usize) {
            Some(r) => {
                self.hits[idx as usize] += 1;
                Decision {
                    action: r.action,
                    rule: Some(idx as usize),
                    stateful: r.stateful,
                }
            }
            None => {
                self.default_hits += 1;
                Decision {
                    action: Action::Deny,
                    rule: None,
                    stateful: false,
                }
            }
        }
    }

    /// Hit counters, the implicit deny last.
    pub fn hits(&self) -> Vec<RuleHits> {
        self.rules
            .iter()
            .zip(&self.hits)
            .enumerate()
            .map(|(i, (r, h))| RuleHits {
                index: Some(i),
                action: r.action,
                hits: *h,
            })
            .chain(std::iter::once(RuleHits {
                index: None,
                action: Action::Deny,
                hits: self.default_hits,
            }))
            .collect()
    }

    /// The counters as a plain vector (implicit deny last), for saving.
    pub fn save_hits(&self) -> Vec<u64> {
        let mut v = self.hits.clone();
        v.push(self.default_hits);
        v
    }

    /// Add what grew between two readings (`then`, `now`) of the same
    /// list's counters elsewhere; readings of another list are ignored.
    pub fn add_hits_growth(&mut self, then: &[u64], now: &[u64]) -> bool {
        let n = self.hits.len();
        if then.len() != n + 1 || now.len() != n + 1 {
            return false;
        }
        for (i, h) in self.hits.iter_mut().enumerate() {
            *h += now[i].saturating_sub(then[i]);
        }
        self.default_hits += now[n].saturating_sub(then[n]);
        true
    }

    /// Restore counters saved from a list with the same rules; counters of
    /// another list are ignored (the rules they counted are gone).
    pub fn restore_hits(&mut self, saved: &[u64]) -> bool {
        if saved.len() != self.hits.len() + 1 {
            return false;
        }
        let n = self.hits.len();
        self.hits.copy_from_slice(&saved[..n]);
        self.default_hits = saved[n];
        true
    }
}

fn compile_rule(r: &AclRule) -> Compiled {
    let ip = |n: &Option<IpNetwork>| match n {
        None => Ip::Any,
        Some(IpNetwork::V4(n)) => {
            let mask = if n.prefix() == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(n.prefix()))
            };
            Ip::V4 {
                addr: u32::from(n.network()) & mask,
                mask,
            }
        }
        Some(IpNetwork::V6(n)) => {
            let mask = if n.prefix() == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(n.prefix()))
            };
            Ip::V6 {
                addr: u128::from(n.network()) & mask,
                mask,
            }
        }
    };
    let range = |p: Option<dvs_proto::acl::PortRange>| p.map_or((0, u16::MAX), |p| (p.lo, p.hi));
    Compiled {
        action: r.action,
        stateful: r.stateful,
        src_mac: r.src_mac.map(|m| m.to_u64()),
        dst_mac: r.dst_mac.map(|m| m.to_u64()),
        ethertype: r.ethertype,
        vlan: r.vlan.map(|v| v.get()),
        src: ip(&r.src),
        dst: ip(&r.dst),
        proto: r.proto.map(|p| p.0),
        src_port: range(r.src_port),
        dst_port: range(r.dst_port),
        icmp_type: r.icmp_type,
        icmp_code: r.icmp_code,
        tcp: r.tcp_flags.map_or((0, 0), |f| (f.set, f.mask)),
        needs_ip: r.src.is_some() || r.dst.is_some() || r.proto.is_some(),
    }
}

impl Compiled {
    fn matches(&self, k: &FlowKey) -> bool {
        if self.needs_ip && k.proto.is_none() {
            return false;
        }
        self.src_mac.is_none_or(|m| m == k.src_mac.to_u64())
            && self.dst_mac.is_none_or(|m| m == k.dst_mac.to_u64())
            && self.ethertype.is_none_or(|e| e == k.ethertype)
            && self.vlan.is_none_or(|v| v == k.vlan)
            && ip_matches(self.src, k.src_ip)
            && ip_matches(self.dst, k.dst_ip)
            && self.proto.is_none_or(|p| Some(p) == k.proto)
            && (self.src_port.0..=self.src_port.1).contains(&k.src_port)
            && (self.dst_port.0..=self.dst_port.1).contains(&k.dst_port)
            && self.icmp_type.is_none_or(|t| u16::from(t) == k.src_port)
            && self.icmp_code.is_none_or(|c| u16::from(c) == k.dst_port)
            && k.tcp_flags & self.tcp.1 == self.tcp.0
    }
}

fn ip_matches(rule: Ip, addr: Option<IpAddr>) -> bool {
    match (rule, addr) {
        (Ip::Any, _) => true,
        (Ip::V4 { addr, mask }, Some(IpAddr::V4(a))) => u32::from(a) & mask == addr,
        (Ip::V6 { addr, mask }, Some(IpAddr::V6(a))) => u128::from(a) & mask == addr,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_proto::acl::{IpProto, PortRange, TcpFlags};
    use dvs_proto::{MacAddr, VlanId};
    use proptest::prelude::*;

    /// First-match evaluation straight from the rules' meaning.
    fn naive(rules: &[AclRule], k: &FlowKey) -> Option<usize> {
        rules.iter().position(|r| {
            let l3 = r.src.is_some() || r.dst.is_some() || r.proto.is_some();
            let is_icmp_key = matches!(k.proto, Some(1) | Some(58));
            (!l3 || k.proto.is_some())
                && r.src_mac.is_none_or(|m| m == k.src_mac)
                && r.dst_mac.is_none_or(|m| m == k.dst_mac)
                && r.ethertype.is_none_or(|e| e == k.ethertype)
                && r.vlan.is_none_or(|v| v.get() == k.vlan)
                && AclRule::net_contains(&r.src, k.src_ip)
                && AclRule::net_contains(&r.dst, k.dst_ip)
                && r.proto.is_none_or(|p| Some(p.0) == k.proto)
                && r.src_port.is_none_or(|p| p.contains(k.src_port))
                && r.dst_port.is_none_or(|p| p.contains(k.dst_port))
                && r.icmp_type
                    .is_none_or(|t| is_icmp_key && u16::from(t) == k.src_port)
                && r.icmp_code
                    .is_none_or(|c| is_icmp_key && u16::from(c) == k.dst_port)
                && r.tcp_flags.is_none_or(|f| f.matches(k.tcp_flags))
        })
    }

    fn key(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> FlowKey {
        let flags = if proto == 6 { TcpFlags::SYN } else { 0 };
        crate::wire::ipv4_key(proto, (src, sport), (dst, dport), flags)
    }

    fn tcp_to(port: u16) -> AclRule {
        AclRule {
            proto: Some(IpProto::TCP),
            dst_port: Some(PortRange { lo: port, hi: port }),
            ..AclRule::any(Action::Permit)
        }
    }

    #[test]
    fn first_match_wins_and_nothing_matching_denies() {
        let mut acl = Acl::compile(&[
            tcp_to(80),
            AclRule {
                proto: Some(IpProto::ICMP),
                ..AclRule::any(Action::Permit)
            },
            AclRule {
                dst: Some("10.0.0.0/8".parse().unwrap()),
                ..AclRule::any(Action::Deny)
            },
            AclRule::any(Action::Permit),
        ]);
        let d = acl.check(&key(6, [1, 1, 1, 1], [10, 0, 0, 2], 4000, 80));
        assert_eq!((d.action, d.rule), (Action::Permit, Some(0)));
        let d = acl.check(&key(6, [1, 1, 1, 1], [10, 0, 0, 2], 4000, 22));
        assert_eq!((d.action, d.rule), (Action::Deny, Some(2)));
        let d = acl.check(&key(17, [1, 1, 1, 1], [192, 168, 0, 1], 4000, 22));
        assert_eq!((d.action, d.rule), (Action::Permit, Some(3)));
        let hits: Vec<u64> = acl.hits().iter().map(|h| h.hits).collect();
        assert_eq!(hits, vec![1, 0, 1, 1, 0]);

        let mut only_web = Acl::compile(&[tcp_to(80)]);
        let d = only_web.check(&key(17, [1, 1, 1, 1], [10, 0, 0, 2], 4000, 80));
        assert_eq!((d.action, d.rule), (Action::Deny, None));
        assert_eq!(only_web.hits().last().unwrap().hits, 1);
        let saved = only_web.save_hits();
        let mut again = Acl::compile(&[tcp_to(80)]);
        assert!(again.restore_hits(&saved));
        assert_eq!(again.save_hits(), saved);
        assert!(!Acl::compile(&[]).restore_hits(&saved));
    }

    #[test]
    fn non_ip_frames_meet_only_l2_rules() {
        let acl = Acl::compile(&[
            AclRule {
                proto: Some(IpProto::TCP),
                ..AclRule::any(Action::Permit)
            },
            AclRule {
                ethertype: Some(0x0806),
                ..AclRule::any(Action::Permit)
            },
        ]);
        let mut arp = key(0, [0; 4], [0; 4], 0, 0);
        arp.ethertype = 0x0806;
        arp.proto = None;
        arp.src_ip = None;
        arp.dst_ip = None;
        assert_eq!(acl.evaluate(&arp).rule, Some(1));
    }

    fn arb_rule() -> impl Strategy<Value = AclRule> {
        (
            any::<bool>(),
            proptest::option::of(0u8..3),
            proptest::option::of((0u8..4, 0u8..=32)),
            proptest::option::of((0u8..4, 0u8..=32)),
            proptest::option::of((0u16..6, 0u16..6)),
            proptest::option::of(0u16..6),
            proptest::option::of(prop_oneof![Just(10u32), Just(20)]),
            proptest::option::of((0u8..4, 0u8..4)),
        )
            .prop_map(|(permit, proto, src, dst, dport, sport, vlan, flags)| {
                let proto = proto.map(|p| [IpProto::TCP, IpProto::UDP, IpProto::ICMP][p as usize]);
                let net = |(a, len): (u8, u8)| {
                    Some(IpNetwork::new(IpAddr::from([10, a, 0, 0]), len).unwrap())
                };
                let ports = proto.is_some_and(|p| p != IpProto::ICMP);
                AclRule {
                    src: src.and_then(net),
                    dst: dst.and_then(net),
                    proto,
                    dst_port: dport.filter(|_| ports).map(|(a, b)| PortRange {
                        lo: a.min(b),
                        hi: a.max(b),
                    }),
                    src_port: sport.filter(|_| ports).map(|p| PortRange { lo: p, hi: p }),
                    icmp_type: sport
                        .filter(|_| proto == Some(IpProto::ICMP))
                        .map(|t| t as u8),
                    vlan: vlan.map(|v| VlanId::new(v).unwrap()),
                    tcp_flags: flags.filter(|_| proto == Some(IpProto::TCP)).map(|(s, m)| {
                        TcpFlags {
                            set: s & m,
                            mask: m,
                        }
                    }),
                    ..AclRule::any(if permit { Action::Permit } else { Action::Deny })
                }
            })
    }

    fn arb_key() -> impl Strategy<Value = FlowKey> {
        (
            prop_oneof![Just(None), Just(Some(6u8)), Just(Some(17)), Just(Some(1))],
            (0u8..4, 0u8..4, 0u8..4),
            (0u8..4, 0u8..4, 0u8..4),
            0u16..6,
            0u16..6,
            prop_oneof![Just(10u16), Just(20)],
            0u8..4,
        )
            .prop_map(
                |(proto, (s1, s2, s3), (d1, d2, d3), sp, dp, vlan, flags)| FlowKey {
                    src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                    dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
                    ethertype: if proto.is_some() { 0x0800 } else { 0x0806 },
                    vlan,
                    src_ip: proto.map(|_| IpAddr::from([10, s1, s2 * 64, s3])),
                    dst_ip: proto.map(|_| IpAddr::from([10, d1, d2 * 64, d3])),
                    proto,
                    src_port: if proto.is_some() { sp } else { 0 },
                    dst_port: if proto.is_some() { dp } else { 0 },
                    tcp_flags: if proto == Some(6) { flags } else { 0 },
                    icmp_id: 0,
                    dscp: 0,
                },
            )
    }

    proptest! {
        /// The compiled classifier and first-match reading of the rules
        /// agree on every key.
        #[test]
        fn compiled_equals_naive(
            rules in proptest::collection::vec(arb_rule(), 0..20),
            keys in proptest::collection::vec(arb_key(), 1..30),
        ) {
            let mut acl = Acl::compile(&rules);
            for k in &keys {
                prop_assert_eq!(acl.evaluate(k).rule, naive(&rules, k), "key {:?}", k);
                // Twice through the cache: the same answer.
                prop_assert_eq!(acl.check(k).rule, naive(&rules, k));
                prop_assert_eq!(acl.check(k).rule, naive(&rules, k));
            }
        }
    }
}
