use super::*;
use crate::pipeline::PortState;
use crate::wire::vlan_tag;
use dvs_proto::{AclRule, RateLimit};
use proptest::prelude::*;

const T: Duration = Duration::from_secs(1);

fn v(n: u32) -> VlanId {
    VlanId::new(n).unwrap()
}

fn mac(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, n])
}

fn access(id: u32, name: &str, vlan: u32) -> PortConfig {
    PortConfig {
        id: PortId::new(id).unwrap(),
        name: name.into(),
        vlan: VlanMode::Access(v(vlan)),
        acl: PortAcl::default(),
        qos: Default::default(),
        security: Default::default(),
        netflow: None,
        mac: None,
    }
}

fn trunk(id: u32, name: &str, allowed: &[u32], native: Option<u32>) -> PortConfig {
    PortConfig {
        id: PortId::new(id).unwrap(),
        name: name.into(),
        vlan: VlanMode::trunk(allowed.iter().map(|a| v(*a)).collect(), native.map(v)).unwrap(),
        acl: PortAcl::default(),
        qos: Default::default(),
        security: Default::default(),
        netflow: None,
        mac: None,
    }
}

/// An Ethernet frame; `tags` are (TPID, TCI) pairs.
fn frame(dst: MacAddr, src: MacAddr, tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45; 46]);
    f
}

fn vxlan_packet(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = wire::vxlan::encode(Vni::new(u64::from(vni)).unwrap()).to_vec();
    p.extend_from_slice(inner);
    p
}

struct Rig {
    sw: Switch,
    out: Vec<Output>,
}

impl Rig {
    fn new(ports: Vec<PortConfig>) -> Self {
        let mut sw = Switch::new(SwitchConfig::default());
        for p in ports {
            sw.add_port(p).unwrap();
        }
        Rig {
            sw,
            out: Vec::new(),
        }
    }

    fn send(&mut self, ingress: Ingress, mut f: Vec<u8>) -> (Processed, Vec<u8>) {
        let p = self.sw.process(T, ingress, &mut f, &mut self.out);
        let normalised = f[p.frame.clone()].to_vec();
        (p, normalised)
    }

    fn send_from_port(&mut self, port: u16, f: Vec<u8>) -> Processed {
        self.send(Ingress::Port(PortNo(port)), f).0
    }

    fn egress(&self) -> Vec<Egress> {
        self.out.iter().map(|o| o.egress).collect()
    }

    fn drops(&self, port: u16, r: DropReason) -> u64 {
        self.sw.port(PortNo(port)).unwrap().1.drops.get(r)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn floods_within_the_vlan_then_forwards_learned_unicast() {
    let mut r = Rig::new(vec![
        access(1, "a", 10),
        access(2, "b", 10),
        access(3, "c", 20),
    ]);
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(
        r.egress(),
        vec![Egress::Port(PortNo(1))],
        "VLAN 20 gets nothing"
    );

    let p = r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
    assert_eq!(r.out[0].tag, None);

    // Unknown unicast floods, never to the ingress port.
    let p = r.send_from_port(0, frame(mac(9), mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(1))]);

    let (_, c) = r.sw.port(PortNo(1)).unwrap();
    assert_eq!((c.rx_frames, c.tx_frames), (1, 2));
    let (_, c) = r.sw.port(PortNo(2)).unwrap();
    assert_eq!((c.rx_frames, c.tx_frames), (0, 0));
}

#[test]
fn vlans_are_isolated_both_ways() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 20)]);
    // Each learns the other's MAC on its own VLAN only; nothing crosses.
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert!(r.out.is_empty());
    r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert!(r.out.is_empty());
    r.send_from_port(0, frame(mac(2), mac(1), &[]));
    assert!(r.out.is_empty());
}

#[test]
fn access_ports_drop_tagged_frames() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 10)]);
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 20)]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::TaggedOnAccess));
    let p = r.send_from_port(
        0,
        frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 10), (0x8100, 20)]),
    );
    assert_eq!(p.verdict, Verdict::Drop(DropReason::StackedTags));
    let p = r.send_from_port(
        0,
        frame(MacAddr::BROADCAST, mac(1), &[(0x88a8, 10), (0x8100, 20)]),
    );
    assert_eq!(p.verdict, Verdict::Drop(DropReason::StackedTags));
    assert!(r.out.is_empty());
    assert_eq!(r.drops(0, DropReason::TaggedOnAccess), 1);
    assert_eq!(r.drops(0, DropReason::StackedTags), 2);

    // A priority-only tag carries no VLAN: accepted and removed.
    let (p, f) = r.send(
        Ingress::Port(PortNo(0)),
        frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 5 << 13)]),
    );
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(f, frame(MacAddr::BROADCAST, mac(1), &[]));
}

#[test]
fn trunks_tag_untag_and_filter() {
    let mut r = Rig::new(vec![
        trunk(1, "t", &[10, 20], Some(10)),
        access(2, "a10", 10),
        access(3, "a20", 20),
        access(4, "a30", 30),
    ]);
    // Tagged 20 from the trunk: tag removed, goes to the VLAN 20 port only.
    let (p, f) = r.send(
        Ingress::Port(PortNo(0)),
        frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 3 << 13 | 20)]),
    );
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(p.vlan, Some(v(20)));
    assert_eq!(f, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(2))]);

    // Untagged from the trunk: native VLAN 10.
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(1))]);

    // Toward the trunk: VLAN 20 tagged, native untagged.
    r.send_from_port(2, frame(MacAddr::BROADCAST, mac(3), &[]));
    assert_eq!(r.out[0].egress, Egress::Port(PortNo(0)));
    assert_eq!(r.out[0].tag, Some(20));
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    assert_eq!(r.out[0].tag, None);

    // Not allowed, S-tag alone, stacked: dropped and counted.
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 30)]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::VlanNotAllowed));
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[(0x88a8, 20)]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::StackedTags));
    assert_eq!(r.drops(0, DropReason::VlanNotAllowed), 1);
}

#[test]
fn trunk_without_native_drops_untagged() {
    let mut r = Rig::new(vec![trunk(1, "t", &[10], None), access(2, "a", 10)]);
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::UntaggedNoNative));
}

#[test]
fn hairpin_is_dropped() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 10)]);
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(2), &[]));
    let p = r.send_from_port(0, frame(mac(2), mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::Hairpin));
}

fn with_segment(r: &mut Rig, vlan: u32, vni: u32, peers: &[&str]) {
    r.sw.set_segment(SegmentConfig {
        vlan: v(vlan),
        vni: Vni::new(u64::from(vni)).unwrap(),
        peers: peers.iter().map(|p| ip(p)).collect(),
    })
    .unwrap();
}

#[test]
fn floods_to_remote_hosts_and_learns_from_the_tunnel() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 20)]);
    with_segment(&mut r, 10, 5010, &["10.0.0.2", "10.0.0.3"]);
    let vni = Vni::new(5010).unwrap();

    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(
        r.egress(),
        vec![
            Egress::Tunnel {
                dst: ip("10.0.0.2"),
                vni
            },
            Egress::Tunnel {
                dst: ip("10.0.0.3"),
                vni
            },
        ]
    );

    // A frame from host 3: decapsulated, learned, delivered locally only.
    let src = ip("10.0.0.3");
    let (p, f) = r.send(
        Ingress::Tunnel { src },
        vxlan_packet(5010, &frame(mac(1), mac(7), &[])),
    );
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(f, frame(mac(1), mac(7), &[]));
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);

    // Unicast back goes to host 3 alone.
    r.send_from_port(0, frame(mac(7), mac(1), &[]));
    assert_eq!(r.egress(), vec![Egress::Tunnel { dst: src, vni }]);

    // Broadcast from the tunnel never goes back into it (split horizon).
    r.send(
        Ingress::Tunnel { src },
        vxlan_packet(5010, &frame(MacAddr::BROADCAST, mac(7), &[])),
    );
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
    let t = r.sw.tunnel_counters();
    assert_eq!((t.rx_packets, t.tx_packets), (2, 3));
}

#[test]
fn static_remote_macs_need_no_flooding() {
    let mut r = Rig::new(vec![access(1, "a", 10)]);
    with_segment(&mut r, 10, 5010, &["10.0.0.2", "10.0.0.3"]);
    r.sw.set_static_mac(v(10), mac(8), Location::Remote(ip("10.0.0.2")));
    let p = r.send_from_port(0, frame(mac(8), mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(r.out.len(), 1);
}

#[test]
fn bad_vxlan_is_counted_by_reason() {
    let mut r = Rig::new(vec![access(1, "a", 10)]);
    with_segment(&mut r, 10, 5010, &["10.0.0.2"]);
    let src = Ingress::Tunnel {
        src: ip("10.0.0.2"),
    };
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![8, 0, 0], DropReason::VxlanTruncated),
        (
            {
                let mut p = vxlan_packet(5010, &frame(mac(1), mac(2), &[]));
                p[0] = 0;
                p
            },
            DropReason::VxlanFlags,
        ),
        (
            vxlan_packet(5011, &frame(mac(1), mac(2), &[])),
            DropReason::UnknownVni,
        ),
        (vxlan_packet(5010, &[1, 2, 3]), DropReason::Runt),
        (
            vxlan_packet(5010, &frame(mac(1), mac(2), &[(0x8100, 10)])),
            DropReason::TaggedInTunnel,
        ),
        (
            vxlan_packet(5010, &frame(mac(1), MacAddr::BROADCAST, &[])),
            DropReason::InvalidSourceMac,
        ),
    ];
    for (pkt, reason) in cases {
        let (p, _) = r.send(src, pkt);
        assert_eq!(p.verdict, Verdict::Drop(reason));
        assert!(r.out.is_empty());
        assert_eq!(r.sw.tunnel_counters().drops.get(reason), 1, "{reason:?}");
    }
}

#[test]
fn runts_oversized_and_bad_sources_are_counted() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 10)]);
    assert_eq!(
        r.send_from_port(0, vec![0; 13]).verdict,
        Verdict::Drop(DropReason::Runt)
    );
    let mut f = frame(MacAddr::BROADCAST, mac(1), &[]);
    f.resize(SwitchConfig::default().max_frame + 1, 0);
    assert_eq!(
        r.send_from_port(0, f).verdict,
        Verdict::Drop(DropReason::Oversized)
    );
    let mut f = frame(MacAddr::BROADCAST, mac(1), &[]);
    f.truncate(15);
    f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    assert_eq!(
        r.send_from_port(0, f).verdict,
        Verdict::Drop(DropReason::TruncatedTag)
    );
    assert_eq!(
        r.send_from_port(0, frame(mac(2), MacAddr::ZERO, &[]))
            .verdict,
        Verdict::Drop(DropReason::InvalidSourceMac)
    );
    assert_eq!(
        r.send_from_port(9, frame(mac(2), mac(1), &[])).verdict,
        Verdict::Drop(DropReason::UnknownPort)
    );
    let (_, c) = r.sw.port(PortNo(0)).unwrap();
    assert_eq!((c.rx_frames, c.drops.total(), c.tx_frames), (4, 4, 0));
}

#[test]
fn config_changes_bump_the_generation_and_flush_the_port() {
    let mut r = Rig::new(vec![access(1, "a", 10), access(2, "b", 10)]);
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    let g = r.sw.generation();
    r.sw.set_port_vlan(PortNo(0), VlanMode::Access(v(20)))
        .unwrap();
    assert!(r.sw.generation() > g);
    assert!(r.sw.mac_entries(T).is_empty());
    assert!(matches!(
        r.sw.add_port(access(1, "z", 10)),
        Err(Error::DuplicatePort { .. })
    ));
    assert!(r
        .sw
        .set_segment(SegmentConfig {
            vlan: v(10),
            vni: Vni::new(7).unwrap(),
            peers: vec![]
        })
        .is_ok());
    let e =
        r.sw.set_segment(SegmentConfig {
            vlan: v(20),
            vni: Vni::new(7).unwrap(),
            peers: vec![],
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "VNI 7 is already used by VLAN 10: each segment needs its own VNI"
    );
}

#[test]
fn egress_tag_keeps_the_ingress_priority() {
    let mut r = Rig::new(vec![
        trunk(1, "t1", &[20], None),
        trunk(2, "t2", &[20], None),
    ]);
    r.send_from_port(
        0,
        frame(MacAddr::BROADCAST, mac(1), &[(0x8100, 5 << 13 | 20)]),
    );
    assert_eq!(r.out[0].tag, Some(5 << 13 | 20));
    let tag = vlan_tag(wire::tci(20, 5));
    assert_eq!(u16::from_be_bytes([tag[2], tag[3]]), 5 << 13 | 20);
}

proptest! {
    /// Random bytes on any ingress never panic; every frame is counted once as
    /// received and ends forwarded, flooded or dropped with a reason.
    #[test]
    fn random_bytes_never_panic_and_are_accounted(
        frames in proptest::collection::vec(
            (0u16..4, proptest::collection::vec(any::<u8>(), 0..120)), 1..60)
    ) {
        let mut r = Rig::new(vec![
            access(1, "a", 10),
            trunk(2, "t", &[10, 20], Some(10)),
            access(3, "c", 20),
        ]);
        with_segment(&mut r, 10, 1, &["10.0.0.2"]);
        let mut dropped = 0;
        for (port, bytes) in frames {
            let ingress = if port == 3 {
                Ingress::Tunnel { src: ip("10.0.0.2") }
            } else {
                Ingress::Port(PortNo(port))
            };
            let (p, f) = r.send(ingress, bytes);
            if let Verdict::Drop(_) = p.verdict {
                dropped += 1;
                prop_assert!(r.out.is_empty());
            } else {
                // Whatever got through is an untagged frame with a unicast source.
                let view = EthView::parse(&f).unwrap();
                prop_assert!(view.outer.is_none());
                prop_assert!(!view.src.is_multicast());
            }
        }
        let port_drops: u64 = r.sw.ports().map(|(_, _, c)| c.drops.total()).sum();
        prop_assert_eq!(port_drops + r.sw.tunnel_counters().drops.total(), dropped);
    }
}

fn ipv4_frame(dst: MacAddr, src: MacAddr, proto: u8, dport: u16) -> Vec<u8> {
    let mut f = frame(dst, src, &[]);
    // IPv4 header (20 bytes) + 4 bytes of L4 ports, over the 46-byte body.
    let body = &mut f[14..];
    body[..20].copy_from_slice(&[
        0x45, 0, 0, 46, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    body[20..22].copy_from_slice(&40000u16.to_be_bytes());
    body[22..24].copy_from_slice(&dport.to_be_bytes());
    f
}

fn rules(yaml: &str) -> Vec<AclRule> {
    let raw: Vec<dvs_proto::acl::RawRule> = serde_norway::from_str(yaml).unwrap();
    AclRule::list_from_raw(&raw, "test").unwrap()
}

#[test]
fn inbound_and_outbound_acls_filter_and_count() {
    let mut r = Rig::new(vec![access(1, "client", 10), access(2, "web", 10)]);
    r.sw
        .set_port_acl(
            PortNo(1),
            PortAcl {
                inbound: rules("[ { action: permit, proto: tcp, dst_port: 80 }, { action: permit, ethertype: arp } ]"),
                outbound: vec![],
            },
        )
        .unwrap();
    // Learn both MACs (ARP is permitted into `web`).
    let mut arp = frame(MacAddr::BROADCAST, mac(2), &[]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    r.send_from_port(1, arp);
    let mut arp = frame(MacAddr::BROADCAST, mac(1), &[]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(r.send_from_port(0, arp).verdict, Verdict::Flood);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(1))]);

    let p = r.send_from_port(0, ipv4_frame(mac(2), mac(1), 6, 80));
    assert_eq!(p.verdict, Verdict::Forward);
    let p = r.send_from_port(0, ipv4_frame(mac(2), mac(1), 6, 22));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::AclDeny));
    assert!(r.out.is_empty());
    let (_, web) = r.sw.port(PortNo(1)).unwrap();
    assert_eq!(web.tx_drops.get(DropReason::AclDeny), 1);
    assert_eq!(r.drops(0, DropReason::AclDeny), 1);
    let (inbound, outbound) = r.sw.port_acl_hits(PortNo(1));
    let hits: Vec<u64> = inbound.unwrap().iter().map(|h| h.hits).collect();
    assert_eq!(hits, vec![1, 1, 1]);
    assert!(outbound.is_none());

    // An outbound list on the web port: it may answer, not start anything.
    let g = r.sw.generation();
    r.sw.set_port_acl(
        PortNo(1),
        PortAcl {
            inbound: vec![],
            outbound: rules(
                "[ { action: permit, proto: tcp, tcp_flags: [ack] }, { action: deny } ]",
            ),
        },
    )
    .unwrap();
    assert!(r.sw.generation() > g);
    let mut syn = ipv4_frame(mac(1), mac(2), 6, 4000);
    syn[14 + 20 + 13] = 0x02;
    assert_eq!(
        r.send_from_port(1, syn).verdict,
        Verdict::Drop(DropReason::AclDeny)
    );
    let mut ack = ipv4_frame(mac(1), mac(2), 6, 4000);
    ack[14 + 20 + 13] = 0x10;
    assert_eq!(r.send_from_port(1, ack).verdict, Verdict::Forward);
    // The port's counters survive the policy change.
    let (_, web) = r.sw.port(PortNo(1)).unwrap();
    assert_eq!(web.tx_drops.get(DropReason::AclDeny), 1);
}

#[test]
fn a_flood_loses_only_the_copies_a_list_denies() {
    let mut r = Rig::new(vec![
        access(1, "a", 10),
        access(2, "b", 10),
        access(3, "c", 10),
    ]);
    r.sw.set_port_acl(
        PortNo(2),
        PortAcl {
            inbound: rules("[ { action: deny, ethertype: ipv4 }, { action: permit } ]"),
            outbound: vec![],
        },
    )
    .unwrap();
    let p = r.send_from_port(0, ipv4_frame(MacAddr::BROADCAST, mac(1), 17, 53));
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(1))]);
    assert_eq!(r.drops(0, DropReason::AclDeny), 0);
}

fn tcp_frame(
    dst: MacAddr,
    src: MacAddr,
    sip: u8,
    dip: u8,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut f = ipv4_frame(dst, src, 6, dport);
    f[14 + 15] = sip;
    f[14 + 19] = dip;
    f[14 + 20..14 + 22].copy_from_slice(&sport.to_be_bytes());
    f[14 + 20 + 13] = flags;
    f
}

#[test]
fn stateful_rules_let_replies_back_but_not_new_connections() {
    let mut r = Rig::new(vec![access(1, "vm", 10), access(2, "peer", 10)]);
    let policy = || {
        PortAcl {
        inbound: rules("[ { action: permit, ethertype: arp }, { action: deny } ]"),
        outbound: rules("[ { action: permit, proto: tcp, stateful: true }, { action: permit, ethertype: arp } ]"),
    }
    };
    r.sw.set_port_acl(PortNo(0), policy()).unwrap();
    // Both MACs learned.
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    // vm (10.0.0.1) opens a connection to peer (10.0.0.2):80.
    let syn = tcp_frame(mac(2), mac(1), 1, 2, 40000, 80, 0x02);
    assert_eq!(r.send_from_port(0, syn).verdict, Verdict::Forward);
    let synack = tcp_frame(mac(1), mac(2), 2, 1, 80, 40000, 0x12);
    assert_eq!(
        r.send_from_port(1, synack.clone()).verdict,
        Verdict::Forward,
        "the reply comes back"
    );
    // A connection opened by peer toward vm is refused.
    let inbound_syn = tcp_frame(mac(1), mac(2), 2, 1, 5555, 22, 0x02);
    assert_eq!(
        r.send_from_port(1, inbound_syn).verdict,
        Verdict::Drop(DropReason::AclDeny)
    );
    let ct = r.sw.port_conntrack(PortNo(0)).unwrap();
    assert_eq!((ct.len(), ct.counters().created), (1, 1));

    // The same policy again keeps the connection; one without the stateful
    // rule revokes it, and the reply is then refused.
    r.sw.set_port_acl(PortNo(0), policy()).unwrap();
    assert_eq!(
        r.send_from_port(1, synack.clone()).verdict,
        Verdict::Forward
    );
    r.sw.set_port_acl(
        PortNo(0),
        PortAcl {
            inbound: rules("[ { action: deny } ]"),
            outbound: rules("[ { action: permit, proto: tcp, stateful: true, dst_port: 443 } ]"),
        },
    )
    .unwrap();
    assert_eq!(
        r.sw.port_conntrack(PortNo(0)).unwrap().counters().revoked,
        1
    );
    assert_eq!(
        r.send_from_port(1, synack).verdict,
        Verdict::Drop(DropReason::AclDeny)
    );
}

#[test]
fn a_port_saved_on_one_switch_continues_on_another() {
    let policy = || PortAcl {
        inbound: rules("[ { action: permit, ethertype: arp }, { action: deny } ]"),
        outbound: rules("[ { action: permit, proto: tcp, stateful: true }, { action: permit } ]"),
    };
    let qos = PortQos {
        outbound: Some(RateLimit {
            avg_bps: 8_000_000,
            peak_bps: None,
            burst_bytes: 100_000,
            shape: false,
            queue_bytes: 0,
        }),
        ..PortQos::default()
    };
    let rig = || {
        let mut r = Rig::new(vec![access(1, "vm", 10), access(2, "peer", 10)]);
        r.sw.set_port_acl(PortNo(0), policy()).unwrap();
        r.sw.set_port_qos(PortNo(0), qos).unwrap();
        r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
        r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
        r
    };
    let mut a = rig();
    assert_eq!(
        a.send_from_port(0, tcp_frame(mac(2), mac(1), 1, 2, 40000, 80, 0x02))
            .verdict,
        Verdict::Forward
    );
    let state = a.sw.save_port(PortNo(0), T).unwrap();
    assert_eq!(state.conntrack.len(), 1);
    // The state survives a trip through its serialised form.
    let json = serde_json::to_string(&state).unwrap();
    let state: PortState = serde_json::from_str(&json).unwrap();

    let mut b = rig();
    b.sw.restore_port(PortNo(0), &state, T * 100).unwrap();
    let (_, c) = b.sw.port(PortNo(0)).unwrap();
    assert_eq!(c.rx_frames, 2, "counters continue");
    let mut synack = tcp_frame(mac(1), mac(2), 2, 1, 80, 40000, 0x12);
    let p =
        b.sw.process(T * 100, Ingress::Port(PortNo(1)), &mut synack, &mut b.out);
    assert_eq!(
        p.verdict,
        Verdict::Forward,
        "the tracked connection's reply passes on b"
    );
    let hits = b.sw.port_acl_hits(PortNo(0)).1.unwrap();
    assert_eq!(hits[0].hits, 1, "rule hits continue");
}

fn monitored(id: u32, name: &str, direction: dvs_proto::FlowDirection) -> PortConfig {
    PortConfig {
        netflow: Some(PortNetflow {
            monitor: dvs_proto::NetflowMonitor {
                name: "m".into(),
                version: dvs_proto::FlowVersion::Ipfix,
                collectors: vec!["127.0.0.1:4739".parse().unwrap()],
                active_timeout: Duration::from_secs(60),
                inactive_timeout: Duration::from_secs(15),
                sampling: 1,
                max_flows: 1000,
                template_refresh: Duration::from_secs(30),
            },
            direction,
        }),
        ..access(id, name, 10)
    }
}

fn ended(r: &mut Rig) -> Vec<crate::flow::FlowRecord> {
    r.sw.monitors_mut()
        .tables_mut()
        .iter_mut()
        .flat_map(|t| std::mem::take(&mut t.pending))
        .collect()
}

#[test]
fn flows_are_recorded_where_the_ports_say_and_only_past_their_policy() {
    use crate::flow::{Direction, EndReason};
    use dvs_proto::FlowDirection;
    let mut r = Rig::new(vec![
        monitored(7, "a", FlowDirection::Both),
        monitored(8, "b", FlowDirection::In),
        access(9, "c", 10),
    ]);
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    r.send_from_port(2, frame(MacAddr::BROADCAST, mac(3), &[]));
    ended(&mut r);
    r.sw.handle_timeout(T * 100);
    ended(&mut r);
    // Three UDP packets a → b, one ICMP echo (type 8) a → c.
    for _ in 0..3 {
        r.send_from_port(0, ipv4_frame(mac(2), mac(1), 17, 53));
    }
    let mut echo = ipv4_frame(mac(3), mac(1), 1, 0);
    echo[14 + 20] = 8;
    echo[14 + 21] = 0;
    r.send_from_port(0, echo);
    // b only records what comes in: its UDP reply is not counted.
    r.send_from_port(1, ipv4_frame(mac(1), mac(2), 17, 40000));
    // A denied frame from a is not counted.
    r.sw.set_port_acl(
        PortNo(0),
        PortAcl {
            outbound: rules("[ { action: deny, proto: tcp } , { action: permit } ]"),
            ..PortAcl::default()
        },
    )
    .unwrap();
    r.send_from_port(0, tcp_frame(mac(2), mac(1), 1, 2, 1000, 80, 0x02));
    r.sw.handle_timeout(T * 200);
    let mut recs = ended(&mut r);
    recs.sort_by_key(|x| (x.id.port, x.id.dir == Direction::ToVm, x.id.proto));
    let got: Vec<_> = recs
        .iter()
        .map(|x| {
            (
                x.id.port,
                x.id.dir,
                x.id.proto,
                x.id.dst_port,
                x.packets,
                x.octets,
                x.end,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (7, Direction::FromVm, 1, 8 << 8, 1, 46, EndReason::Idle),
            (7, Direction::FromVm, 17, 53, 3, 138, EndReason::Idle),
            (7, Direction::ToVm, 17, 40000, 1, 46, EndReason::Idle),
            (8, Direction::ToVm, 17, 53, 3, 138, EndReason::Idle),
        ]
    );
    // A port that goes takes its open records with it, exported.
    r.send_from_port(0, ipv4_frame(mac(2), mac(1), 17, 53));
    r.sw.remove_port(PortNo(0));
    let recs = ended(&mut r);
    assert!(recs
        .iter()
        .any(|x| x.id.port == 7 && x.end == EndReason::Forced));
}

#[test]
fn a_tso_frame_counts_as_the_segments_it_becomes() {
    let mut r = Rig::new(vec![
        monitored(7, "a", dvs_proto::FlowDirection::Both),
        access(8, "b", 10),
    ]);
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    // 20 + 20 bytes of headers and 10,000 bytes of payload, MSS 1448.
    let mut f = tcp_frame(mac(2), mac(1), 1, 2, 40000, 80, 0x10);
    f.truncate(14 + 40);
    f[14 + 20 + 12] = 0x50;
    f.extend(std::iter::repeat_n(0u8, 10_000));
    f[16..18].copy_from_slice(&10_040u16.to_be_bytes());
    r.sw.process_gso(T, Ingress::Port(PortNo(0)), &mut f, 1448, &mut r.out);
    r.sw.handle_timeout(T * 100);
    let recs: Vec<_> = ended(&mut r)
        .into_iter()
        .filter(|x| x.id.proto == 6)
        .collect();
    assert_eq!(recs.len(), 1);
    // ceil(10000 / 1448) = 7 segments, each with its 40 bytes of headers.
    assert_eq!((recs[0].packets, recs[0].octets), (7, 10_000 + 7 * 40));
}

#[test]
fn a_standby_port_has_its_policy_but_forwards_nothing_until_activated() {
    let mut r = Rig::new(vec![access(1, "vm", 10), access(2, "peer", 10)]);
    r.sw.set_port_standby(PortNo(0), true).unwrap();
    // Nothing goes to it...
    let p = r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Flood);
    assert!(r.egress().is_empty());
    assert_eq!(
        r.sw.port(PortNo(0))
            .unwrap()
            .1
            .tx_drops
            .get(DropReason::Standby),
        1
    );
    // ...nothing comes from it, and its first frame is reported: the VM
    // runs here.
    assert!(r.sw.take_standby_wakeups().is_empty());
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::Standby));
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(r.sw.take_standby_wakeups(), vec![PortNo(0)]);
    assert!(r.sw.take_standby_wakeups().is_empty());
    // Its small frames wait for the activation (up to a bound); the rest
    // are dropped and counted.
    for _ in 0..MAX_HELD {
        r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    }
    assert_eq!(r.drops(0, DropReason::Standby), 2);
    let held = r.sw.take_held(PortNo(0));
    assert_eq!(held.len(), MAX_HELD);
    assert!(r.sw.take_held(PortNo(0)).is_empty());
    // Activated, it forwards.
    r.sw.set_port_standby(PortNo(0), false).unwrap();
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Flood);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(1))]);
}

#[test]
fn a_trunks_learned_macs_move_with_the_port() {
    let mut a = Rig::new(vec![trunk(1, "fw", &[10, 20], None), access(2, "peer", 10)]);
    let tagged = |vid: u16, src: u8| frame(MacAddr::BROADCAST, mac(src), &[(0x8100, vid)]);
    a.send_from_port(0, tagged(10, 7));
    a.send_from_port(0, tagged(20, 8));
    let state = a.sw.save_port(PortNo(0), T).unwrap();
    assert_eq!(state.learned_macs.len(), 2);
    let json = serde_json::to_string(&state).unwrap();
    let state: PortState = serde_json::from_str(&json).unwrap();
    let mut b = Rig::new(vec![access(2, "peer", 10), trunk(1, "fw", &[10], None)]);
    b.sw.restore_port(PortNo(1), &state, T * 2).unwrap();
    // VLAN 10's VM is known behind the moved trunk at once; VLAN 20 is no
    // longer on the trunk there.
    let p = b.send_from_port(0, frame(mac(7), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(b.egress(), vec![Egress::Port(PortNo(1))]);
    assert_eq!(
        b.sw.mac_entries(T * 2).len(),
        2,
        "VM 7 and the peer, not VM 8"
    );
}

#[test]
fn the_underlay_is_not_trusted() {
    let mut vm = access(1, "vm", 10);
    vm.mac = Some(mac(1));
    let mut r = Rig::new(vec![vm, access(2, "b", 10)]);
    with_segment(&mut r, 10, 5010, &["10.0.0.2"]);
    r.sw.set_tunnel_peers(vec![ip("10.0.0.9")]);
    let from = |a: &str| Ingress::Tunnel { src: ip(a) };
    // VXLAN from an address that is no tunnel endpoint of the chassis.
    let (p, _) = r.send(
        from("10.0.0.66"),
        vxlan_packet(5010, &frame(MacAddr::BROADCAST, mac(7), &[])),
    );
    assert_eq!(p.verdict, Verdict::Drop(DropReason::UnknownPeer));
    assert!(r.out.is_empty());
    assert_eq!(r.sw.tunnel_counters().drops.get(DropReason::UnknownPeer), 1);
    assert!(r.sw.mac_entries(T).is_empty(), "nothing learned from it");
    // A listed endpoint that is no segment's peer is one of the chassis.
    let (p, _) = r.send(
        from("10.0.0.9"),
        vxlan_packet(5010, &frame(MacAddr::BROADCAST, mac(8), &[])),
    );
    assert_eq!(p.verdict, Verdict::Flood);
    // A peer forging the VM's own MAC: dropped, the VM's entry stays.
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    let (p, _) = r.send(
        from("10.0.0.2"),
        vxlan_packet(5010, &frame(mac(2), mac(1), &[])),
    );
    assert_eq!(p.verdict, Verdict::Drop(DropReason::MacOwned));
    assert!(r.out.is_empty());
    // So is another port using it.
    let p = r.send_from_port(1, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::MacOwned));
    assert_eq!(r.sw.mac_counters().owned_refused, 2);
    let p = r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
    // A port in standby (its VM runs elsewhere: a migration) owns nothing.
    r.sw.set_port_standby(PortNo(0), true).unwrap();
    let (p, _) = r.send(
        from("10.0.0.2"),
        vxlan_packet(5010, &frame(mac(2), mac(1), &[])),
    );
    assert_eq!(p.verdict, Verdict::Forward);
    let p = r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(
        r.egress(),
        vec![Egress::Tunnel {
            dst: ip("10.0.0.2"),
            vni: Vni::new(5010).unwrap()
        }]
    );
    // Active again, it owns its MAC at once: what was learned of it
    // elsewhere meanwhile is forgotten, and the peer may not refresh it.
    r.sw.set_port_standby(PortNo(0), false).unwrap();
    let (p, _) = r.send(
        from("10.0.0.2"),
        vxlan_packet(5010, &frame(mac(2), mac(1), &[])),
    );
    assert_eq!(p.verdict, Verdict::Drop(DropReason::MacOwned));
    let p = r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Flood, "unknown until the VM speaks");
}

#[test]
fn only_the_vms_own_mac_wakes_a_standby_port() {
    let vm = PortConfig {
        mac: Some(mac(1)),
        ..access(1, "vm", 10)
    };
    let mut r = Rig::new(vec![vm, access(2, "peer", 10)]);
    r.sw.set_port_standby(PortNo(0), true).unwrap();
    // Something else on the VM's port: no switchover, nothing held, counted.
    let p = r.send_from_port(0, frame(MacAddr::BROADCAST, mac(7), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::ForeignWakeup));
    assert!(r.sw.take_standby_wakeups().is_empty());
    assert!(r.sw.take_held(PortNo(0)).is_empty());
    assert_eq!(r.drops(0, DropReason::ForeignWakeup), 1);
    // The VM itself: it runs here.
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    assert_eq!(r.sw.take_standby_wakeups(), vec![PortNo(0)]);
    assert_eq!(r.sw.take_held(PortNo(0)).len(), 1);
}

/// Two switches with the stateful port of [`a_port_saved_on_one_switch_continues_on_another`]:
/// the source `a` (the VM opened one connection before the pre-copy and
/// one after), the destination `b` started from the pre-copy.
fn switched_over() -> (Rig, Rig, PortState, PortState) {
    let policy = || PortAcl {
        inbound: rules("[ { action: permit, ethertype: arp }, { action: deny } ]"),
        outbound: rules("[ { action: permit, proto: tcp, stateful: true }, { action: permit } ]"),
    };
    let rig = || {
        let mut r = Rig::new(vec![access(1, "vm", 10), access(2, "peer", 10)]);
        r.sw.set_port_acl(PortNo(0), policy()).unwrap();
        r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
        r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
        r
    };
    let mut a = rig();
    a.send_from_port(0, tcp_frame(mac(2), mac(1), 1, 2, 40000, 80, 0x02));
    let base = a.sw.save_port(PortNo(0), T).unwrap();
    a.send_from_port(0, tcp_frame(mac(2), mac(1), 1, 2, 40001, 80, 0x02));
    let last = a.sw.save_port(PortNo(0), T).unwrap();
    let mut b = rig();
    b.sw.restore_port(PortNo(0), &base, T).unwrap();
    b.sw.await_state(PortNo(0), T).unwrap();
    (a, b, base, last)
}

#[test]
fn a_reply_only_the_sources_last_state_admits_waits_for_it() {
    let (_, mut b, base, last) = switched_over();
    let tx = |r: &Rig| {
        r.sw.port(PortNo(0))
            .unwrap()
            .1
            .tx_drops
            .get(DropReason::AclDeny)
    };
    let before = tx(&b);
    // The connection the pre-copy has passes at once.
    let old = tcp_frame(mac(1), mac(2), 2, 1, 80, 40000, 0x12);
    assert_eq!(b.send_from_port(1, old).verdict, Verdict::Forward);
    // A reply on the one opened after it waits; so does one of no
    // connection; a frame of no connection at all (not IP) is refused.
    let new = tcp_frame(mac(1), mac(2), 2, 1, 80, 40001, 0x12);
    let stranger = tcp_frame(mac(1), mac(2), 2, 1, 5555, 22, 0x02);
    for f in [new.clone(), stranger] {
        assert_eq!(
            b.send_from_port(1, f).verdict,
            Verdict::Drop(DropReason::AclDeny)
        );
    }
    let mut not_ip = frame(mac(1), mac(2), &[]);
    not_ip[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    b.send_from_port(1, not_ip);
    let c = b.sw.switchover_counters().clone();
    assert_eq!((c.held, c.admitted, c.refused), (2, 0, 0), "{c:?}");
    assert_eq!(tx(&b), before + 1, "only the non-IP frame is refused yet");
    // The state lands: the reply it admits is let go, the other refused.
    let released = b.sw.merge_port(PortNo(0), &last, &base, T * 2).unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].frame, new);
    assert_eq!(released[0].out.egress, Egress::Port(PortNo(0)));
    let c = b.sw.switchover_counters().clone();
    assert_eq!((c.admitted, c.refused), (1, 1), "{c:?}");
    assert_eq!(tx(&b), before + 2);
    assert!(!b.sw.port_awaiting(PortNo(0)));
    // Nothing waits any more: a stranger is refused at once.
    let stranger = tcp_frame(mac(1), mac(2), 2, 1, 5556, 22, 0x02);
    b.send_from_port(1, stranger);
    assert_eq!(b.sw.switchover_counters().held, 2);
    // Counters: what the source counted after the pre-copy is added.
    let (_, counters) = b.sw.port(PortNo(0)).unwrap();
    assert_eq!(counters.rx_frames, last.counters.rx_frames);
    assert_eq!(b.sw.port_conntrack(PortNo(0)).unwrap().len(), 2);
}

#[test]
fn a_held_frame_is_judged_when_its_wait_ends_and_the_hold_is_bounded() {
    let (_, mut b, _, _) = switched_over();
    for i in 0..switchover::MAX_WAITING as u16 + 3 {
        let f = tcp_frame(mac(1), mac(2), 2, 1, 80, 41000 + i, 0x12);
        b.send_from_port(1, f);
    }
    let c = b.sw.switchover_counters().clone();
    assert_eq!((c.held, c.overflow), (switchover::MAX_WAITING as u64, 3));
    assert!(b.sw.take_due(T + switchover::STATE_WAIT / 2).is_empty());
    assert_eq!(b.sw.switchover_counters().refused, 0);
    assert!(b.sw.take_due(T + switchover::STATE_WAIT).is_empty());
    assert_eq!(
        b.sw.switchover_counters().refused,
        switchover::MAX_WAITING as u64,
        "judged on what the port knows: no such connection"
    );
}

#[test]
fn a_source_copies_its_vms_frames_to_the_destination_but_not_back() {
    let mut r = Rig::new(vec![access(1, "vm", 10), access(2, "peer", 10)]);
    with_segment(&mut r, 10, 5010, &["10.0.0.2", "10.0.0.3"]);
    r.send_from_port(0, frame(MacAddr::BROADCAST, mac(1), &[]));
    r.sw.set_port_copy(PortNo(0), Some(ip("10.0.0.2"))).unwrap();
    let vni = Vni::new(5010).unwrap();
    r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(
        r.egress(),
        vec![
            Egress::Port(PortNo(0)),
            Egress::Tunnel {
                dst: ip("10.0.0.2"),
                vni
            }
        ]
    );
    // From the third host: copied too; from the destination: not back.
    for (src, copies) in [("10.0.0.3", 2), ("10.0.0.2", 1)] {
        r.send(
            Ingress::Tunnel { src: ip(src) },
            vxlan_packet(5010, &frame(mac(1), mac(9), &[])),
        );
        assert_eq!(r.out.len(), copies, "from {src}: {:?}", r.out);
    }
    assert_eq!(r.sw.switchover_counters().relayed, 2);
    r.sw.set_port_copy(PortNo(0), None).unwrap();
    r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
}

#[test]
fn dhcp_snooping_guards_servers_and_binds_what_the_server_gave() {
    use crate::wire::dhcp::build::{dhcp4_msg, udp4_frame};
    use std::net::Ipv4Addr;
    let mut server = access(1, "server", 10);
    server.security.dhcp_trusted = true;
    let mut vm = access(2, "vm", 10);
    vm.mac = Some(mac(2));
    vm.security.ip_source_guard = true;
    let rogue = access(3, "rogue", 10);
    let mut r = Rig::new(vec![server, vm, rogue]);
    let ack = |lease: u32| {
        dhcp4_msg(
            2,
            5,
            mac(2),
            [0; 4],
            [10, 0, 0, 7],
            &[(51, &lease.to_be_bytes())],
        )
    };
    let from_vm = |src: [u8; 4]| udp4_frame(mac(2), src, 5000, 5001, b"hi");
    // A rogue server's ack: dropped, counted; it binds nothing.
    let p = r.send_from_port(2, udp4_frame(mac(3), [10, 0, 0, 3], 67, 68, &ack(60)));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::DhcpServer));
    assert_eq!(r.drops(2, DropReason::DhcpServer), 1);
    let p = r.send_from_port(1, from_vm([10, 0, 0, 7]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::SpoofedIp));
    // The trusted server's ack reaches the VM and binds the address.
    r.send_from_port(0, udp4_frame(mac(1), [10, 0, 0, 1], 67, 68, &ack(60)));
    assert!(
        r.egress().contains(&Egress::Port(PortNo(1))),
        "{:?}",
        r.egress()
    );
    let p = r.send_from_port(1, from_vm([10, 0, 0, 7]));
    assert!(
        matches!(p.verdict, Verdict::Flood | Verdict::Forward),
        "{p:?}"
    );
    let p = r.send_from_port(1, from_vm([10, 0, 0, 8]));
    assert_eq!(
        p.verdict,
        Verdict::Drop(DropReason::SpoofedIp),
        "only that one"
    );
    // Saved with the port's state, and taken by another switch.
    let st = r.sw.save_port(PortNo(1), T).unwrap();
    assert_eq!(
        st.dhcp_bindings,
        [(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)), mac(2), 60_000)]
    );
    let mut other = Rig::new(vec![{
        let mut p = access(2, "vm", 10);
        p.mac = Some(mac(2));
        p.security.ip_source_guard = true;
        p
    }]);
    other.sw.restore_port(PortNo(0), &st, T).unwrap();
    let p = other.send_from_port(0, from_vm([10, 0, 0, 7]));
    assert!(
        matches!(p.verdict, Verdict::Flood | Verdict::Forward),
        "{p:?}"
    );
    // The lease ends: refused again.
    let mut f = from_vm([10, 0, 0, 7]);
    let later = T + Duration::from_secs(61);
    let p =
        r.sw.process(later, Ingress::Port(PortNo(1)), &mut f, &mut r.out);
    assert_eq!(p.verdict, Verdict::Drop(DropReason::SpoofedIp));
    // Bound again, then released by the VM: refused.
    r.send_from_port(0, udp4_frame(mac(1), [10, 0, 0, 1], 67, 68, &ack(3600)));
    let release = dhcp4_msg(1, 7, mac(2), [10, 0, 0, 7], [0; 4], &[]);
    let p = r.send_from_port(1, udp4_frame(mac(2), [10, 0, 0, 7], 68, 67, &release));
    assert!(
        matches!(p.verdict, Verdict::Flood | Verdict::Forward),
        "{p:?}"
    );
    let p = r.send_from_port(1, from_vm([10, 0, 0, 7]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::SpoofedIp));
    // A malformed DHCP message is passed on, counted, and binds nothing.
    let mut bad = ack(3600);
    bad.truncate(200);
    r.send_from_port(0, udp4_frame(mac(1), [10, 0, 0, 1], 67, 68, &bad));
    let p = r.send_from_port(1, from_vm([10, 0, 0, 7]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::SpoofedIp));
    assert_eq!(
        *r.sw.dhcp_counters(),
        dvs_proto::stats::DhcpCounters {
            bound: 2,
            ended: 1,
            malformed: 1
        }
    );
    // A router advertisement from an untrusted port: dropped.
    let mut ra = vec![0x33, 0x33, 0, 0, 0, 1, 2, 0, 0, 0, 0, 3, 0x86, 0xdd];
    ra.extend([0x60, 0, 0, 0, 0, 16, 58, 255]);
    ra.extend([0xfe, 0x80].iter().chain(&[0u8; 14]));
    ra.extend([0xff, 0x02].iter().chain(&[0u8; 13]).chain(&[1u8]));
    ra.extend([134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
    let p = r.send_from_port(2, ra.clone());
    assert_eq!(p.verdict, Verdict::Drop(DropReason::RouterAdvertisement));
    ra[11] = 1;
    let p = r.send_from_port(0, ra);
    assert!(
        matches!(p.verdict, Verdict::Flood | Verdict::Forward),
        "trusted: {p:?}"
    );
}

/// A pvlan-host mode of private VLAN 100 ([`pvlans`]).
fn host(secondary: u32) -> VlanMode {
    VlanMode::PvlanHost {
        primary: v(100),
        secondary: v(secondary),
    }
}

fn pvlan_port(id: u32, name: &str, mode: VlanMode) -> PortConfig {
    PortConfig {
        vlan: mode,
        ..access(id, name, 1)
    }
}

/// Private VLAN 100: isolated 101, communities 102 and 103.
fn pvlans() -> PrivateVlans {
    use dvs_proto::pvlan::PrivateVlan;
    PrivateVlans::new(vec![(
        "test".into(),
        PrivateVlan {
            primary: v(100),
            isolated: Some(v(101)),
            community: vec![v(102), v(103)],
        },
    )])
    .unwrap()
}

#[test]
fn private_vlans_keep_isolated_and_community_ports_apart() {
    // 0 promiscuous, 1-2 isolated, 3-4 community 102, 5 community 103,
    // 6 a trunk toward a PVLAN-aware upstream.
    let mut r = Rig::new(vec![
        pvlan_port(1, "router", VlanMode::PvlanPromiscuous { primary: v(100) }),
        pvlan_port(2, "i1", host(101)),
        pvlan_port(3, "i2", host(101)),
        pvlan_port(4, "c1", host(102)),
        pvlan_port(5, "c2", host(102)),
        pvlan_port(6, "d1", host(103)),
        trunk(7, "up", &[100, 101, 102, 103], None),
    ]);
    // Undeclared, the pvlan ports forward nothing.
    let p = r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::PrivateVlan));
    r.sw.set_private_vlans(pvlans());
    let ports = |r: &Rig| -> Vec<u16> {
        r.out
            .iter()
            .filter_map(|o| match o.egress {
                Egress::Port(p) => Some(p.0),
                Egress::Tunnel { .. } => None,
            })
            .collect()
    };
    // Who hears a broadcast from each port (and the trunk's tag).
    let heard: Vec<(u16, Vec<u16>)> = (0..6)
        .map(|p| {
            r.send_from_port(p, frame(MacAddr::BROADCAST, mac(p as u8 + 1), &[]));
            (p, ports(&r))
        })
        .collect();
    assert_eq!(
        heard,
        vec![
            (0, vec![1, 2, 3, 4, 5, 6]),
            (1, vec![0, 6]),
            (2, vec![0, 6]),
            (3, vec![0, 4, 6]),
            (4, vec![0, 3, 6]),
            (5, vec![0, 6]),
        ]
    );
    // The trunk carries each frame with the VLAN it was sent in.
    r.send_from_port(3, frame(MacAddr::BROADCAST, mac(4), &[]));
    let up = r.out.iter().find(|o| o.egress == Egress::Port(PortNo(6)));
    assert_eq!(up.unwrap().tag, Some(102));
    // Unicast: one MAC table for the whole private VLAN, the same rules.
    let p = r.send_from_port(1, frame(mac(3), mac(2), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::PrivateVlan));
    assert_eq!(r.drops(1, DropReason::PrivateVlan), 2);
    let p = r.send_from_port(3, frame(mac(6), mac(4), &[]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::PrivateVlan));
    let p = r.send_from_port(3, frame(mac(5), mac(4), &[]));
    assert_eq!((p.verdict, ports(&r)), (Verdict::Forward, vec![4]));
    let p = r.send_from_port(1, frame(mac(1), mac(2), &[]));
    assert_eq!((p.verdict, ports(&r)), (Verdict::Forward, vec![0]));
    let p = r.send_from_port(0, frame(mac(2), mac(1), &[]));
    assert_eq!((p.verdict, ports(&r)), (Verdict::Forward, vec![1]));
    assert_eq!(
        p.vlan,
        Some(v(100)),
        "a promiscuous port sends in the primary"
    );
    // From the upstream: tagged with a secondary, it is that secondary's.
    let p = r.send_from_port(6, frame(mac(2), mac(20), &[(0x8100, 101)]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::PrivateVlan));
    let p = r.send_from_port(6, frame(mac(2), mac(20), &[(0x8100, 100)]));
    assert_eq!((p.verdict, ports(&r)), (Verdict::Forward, vec![1]));
    // An isolated VM reaches the upstream router, tagged 101.
    let p = r.send_from_port(1, frame(mac(20), mac(2), &[]));
    assert_eq!((p.verdict, p.vlan), (Verdict::Forward, Some(v(101))));
    assert_eq!(r.out[0].tag, Some(101));
    let e = r.sw.mac_entries(T);
    assert!(e.iter().all(|m| m.vlan == v(100)), "{e:?}");
    // A tagged frame on a pvlan port is a hop attempt.
    let p = r.send_from_port(1, frame(mac(1), mac(2), &[(0x8100, 100)]));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::TaggedOnAccess));
}

#[test]
fn private_vlans_span_hosts_each_frame_in_its_senders_vni() {
    let mut r = Rig::new(vec![
        pvlan_port(1, "router", VlanMode::PvlanPromiscuous { primary: v(100) }),
        pvlan_port(2, "i1", host(101)),
        pvlan_port(3, "c1", host(102)),
    ]);
    r.sw.set_private_vlans(pvlans());
    for (vlan, vni) in [(100, 10100), (101, 10101), (102, 10102), (103, 10103)] {
        with_segment(&mut r, vlan, vni, &["10.0.0.2"]);
    }
    let peer = ip("10.0.0.2");
    let vni = |n| Vni::new(n).unwrap();
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    assert_eq!(
        r.egress(),
        vec![
            Egress::Port(PortNo(0)),
            Egress::Tunnel {
                dst: peer,
                vni: vni(10101)
            }
        ]
    );
    // From the other host: an isolated VM there reaches the promiscuous
    // port only; a promiscuous one reaches all; a community VM its own.
    let from = Ingress::Tunnel { src: peer };
    r.send(
        from,
        vxlan_packet(10101, &frame(MacAddr::BROADCAST, mac(9), &[])),
    );
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
    let (p, _) = r.send(from, vxlan_packet(10101, &frame(mac(2), mac(9), &[])));
    assert_eq!(p.verdict, Verdict::Drop(DropReason::PrivateVlan));
    r.send(
        from,
        vxlan_packet(10100, &frame(MacAddr::BROADCAST, mac(8), &[])),
    );
    assert_eq!(
        r.egress(),
        vec![
            Egress::Port(PortNo(0)),
            Egress::Port(PortNo(1)),
            Egress::Port(PortNo(2))
        ]
    );
    r.send(
        from,
        vxlan_packet(10102, &frame(MacAddr::BROADCAST, mac(7), &[])),
    );
    assert_eq!(
        r.egress(),
        vec![Egress::Port(PortNo(0)), Egress::Port(PortNo(2))]
    );
    r.send(
        from,
        vxlan_packet(10103, &frame(MacAddr::BROADCAST, mac(6), &[])),
    );
    assert_eq!(r.egress(), vec![Egress::Port(PortNo(0))]);
    // A VM there, learned from its VNI, is reached in the sender's VNI.
    let (p, _) = r.send(Ingress::Port(PortNo(2)), frame(mac(7), mac(3), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(
        r.egress(),
        vec![Egress::Tunnel {
            dst: peer,
            vni: vni(10102)
        }]
    );
    // A static entry given on a secondary lands in the primary's table.
    r.sw.set_static_mac(v(101), mac(30), Location::Remote(peer));
    let (p, _) = r.send(Ingress::Port(PortNo(0)), frame(mac(30), mac(1), &[]));
    assert_eq!(p.verdict, Verdict::Forward);
    assert_eq!(
        r.egress(),
        vec![Egress::Tunnel {
            dst: peer,
            vni: vni(10100)
        }]
    );
}

#[test]
fn a_private_vlans_flow_records_carry_the_senders_vlan() {
    use crate::flow::Direction;
    use dvs_proto::FlowDirection;
    let mut r = Rig::new(vec![
        PortConfig {
            vlan: host(101),
            ..monitored(7, "i", FlowDirection::Both)
        },
        PortConfig {
            vlan: VlanMode::PvlanPromiscuous { primary: v(100) },
            ..monitored(8, "r", FlowDirection::Both)
        },
    ]);
    r.sw.set_private_vlans(pvlans());
    r.send_from_port(1, frame(MacAddr::BROADCAST, mac(2), &[]));
    r.send_from_port(0, ipv4_frame(mac(2), mac(1), 17, 53));
    r.send_from_port(1, ipv4_frame(mac(1), mac(2), 17, 40000));
    ended(&mut r);
    r.sw.handle_timeout(T * 200);
    let mut got: Vec<_> = ended(&mut r)
        .iter()
        .filter(|x| x.id.proto == 17)
        .map(|x| (x.id.port, x.id.dir, x.id.vlan))
        .collect();
    got.sort();
    // The isolated VM's flow is VLAN 101 both where it leaves and where it
    // arrives; the promiscuous port's reply is the primary's, 100.
    assert_eq!(
        got,
        vec![
            (7, Direction::FromVm, 101),
            (7, Direction::ToVm, 100),
            (8, Direction::FromVm, 100),
            (8, Direction::ToVm, 101),
        ]
    );
}
