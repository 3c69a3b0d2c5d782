use super::checksum::{fold, sum16};
use super::*;
use dvs_proto::{MacAddr, Vni};
use proptest::prelude::*;

fn frame(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn parses_untagged_single_and_double() {
    let v = EthView::parse(&frame(&[], 0x0800, &[0; 20])).unwrap();
    assert_eq!((v.outer, v.inner, v.ethertype), (None, None, 0x0800));
    assert_eq!(v.src.to_string(), "02:00:00:00:00:01");

    let v = EthView::parse(&frame(&[(0x8100, 0x6014)], 0x0806, &[0; 28])).unwrap();
    let t = v.outer.unwrap();
    assert_eq!((t.vid, t.pcp, v.ethertype), (20, 3, 0x0806));

    let v = EthView::parse(&frame(&[(0x88a8, 100), (0x8100, 10)], 0x0800, &[])).unwrap();
    assert_eq!(v.outer.unwrap().vid, 100);
    assert_eq!(v.inner.unwrap().vid, 10);
}

#[test]
fn rejects_runts_and_truncated_tags() {
    assert_eq!(EthView::parse(&[0; 13]), Err(WireError::Runt(13)));
    let mut f = frame(&[], 0x8100, &[0, 10]);
    assert_eq!(EthView::parse(&f), Err(WireError::TruncatedTag));
    f.truncate(14);
    assert_eq!(EthView::parse(&f), Err(WireError::TruncatedTag));
}

#[test]
fn vxlan_round_trip_and_errors() {
    let h = vxlan::encode(Vni::new(0x123456).unwrap());
    assert_eq!(h, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    let mut p = h.to_vec();
    p.extend_from_slice(&[1, 2, 3]);
    assert_eq!(vxlan::decode(&p).unwrap(), (0x123456, 8..11));
    assert_eq!(vxlan::decode(&p[..7]), Err(WireError::VxlanTruncated(7)));
    p[0] = 0;
    assert_eq!(vxlan::decode(&p), Err(WireError::VxlanFlags(0)));
    // reserved bits are ignored on receipt
    p[0] = 0x08 | 0x80;
    p[7] = 0xff;
    assert_eq!(vxlan::decode(&p).unwrap().0, 0x123456);
}

#[test]
fn rarp_is_a_broadcast_from_the_mac() {
    let mac = MacAddr([2, 1, 2, 3, 4, 5]);
    let f = announce::rarp(mac);
    let v = EthView::parse(&f).unwrap();
    assert!(v.dst.is_broadcast());
    assert_eq!((v.src, v.ethertype), (mac, 0x8035));
}

/// An IPv4/UDP frame with a correct checksum, built by etherparse.
fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(1234, 5678);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn tcp6_frame(payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6([1; 16], [2; 16], 64)
        .tcp(1234, 80, 7, 1000);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// Make the frame's L4 checksum look like a sender's offload left it.
fn make_partial(f: &mut [u8], l4: usize, off: usize, pseudo: u32) {
    f[l4 + off..l4 + off + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
}

#[test]
fn completes_partial_checksums_and_keeps_good_ones() {
    let good = udp_frame(b"hello, partial checksum");
    let mut f = good.clone();
    let pseudo = sum16(&f[26..34]) + 17 + (f.len() - 34) as u32;
    make_partial(&mut f, 34, 6, pseudo);
    assert_ne!(f, good);
    assert!(complete_partial_checksum(&mut f));
    assert_eq!(f, good);
    let mut again = good.clone();
    let _ = complete_partial_checksum(&mut again);
    assert_eq!(again, good, "a complete checksum is never changed");

    let good = tcp6_frame(&[7; 1000]);
    let mut f = good.clone();
    let pseudo = sum16(&f[22..54]) + 6 + (f.len() - 54) as u32;
    make_partial(&mut f, 54, 16, pseudo);
    assert!(complete_partial_checksum(&mut f));
    assert_eq!(f, good);
}

#[test]
fn vnet_header_round_trip_and_shift() {
    let h = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    assert_eq!(VnetHdr::decode(&h.encode()), h);
    let s = h.shifted(4);
    assert_eq!((s.hdr_len, s.csum_start, s.gso_size), (70, 38, 1448));
    assert!(h.is_gso() && h.needs_csum());
    assert!(!VnetHdr::default().is_gso());
}

/// A TCP/IPv4 GSO frame of `n` payload bytes with FIN|PSH|ACK set and a
/// partial checksum, as a kernel hands it to a TAP with offloads.
fn gso_frame(n: usize) -> Vec<u8> {
    gso_frame_with(n, true)
}

fn gso_frame_with(n: usize, fin: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let mut b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 5201, 1_000_000, 5000)
        .ack(77)
        .psh();
    if fin {
        b = b.fin();
    }
    let mut out = Vec::new();
    b.write(&mut out, &payload).unwrap();
    out
}

#[test]
fn software_tso_makes_valid_segments() {
    let f = gso_frame(4000);
    let mut out = Vec::new();
    let s = segment_tcp(&f, 1448, 8, &mut out).unwrap();
    assert_eq!(
        (s.count, s.block, s.last),
        (3, 8 + 54 + 1448, 8 + 54 + 4000 - 2 * 1448)
    );
    let mut payload = Vec::new();
    let mut off = 0;
    for i in 0..s.count {
        let len = if i + 1 == s.count { s.last } else { s.block };
        let seg = &out[off + 8..off + len];
        off += len;
        let p = etherparse::SlicedPacket::from_ethernet(seg).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        assert_eq!(usize::from(ip.header().total_len()), seg.len() - 14);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else {
            panic!("not TCP")
        };
        assert_eq!(tcp.sequence_number(), 1_000_000 + (i * 1448) as u32);
        let last = i + 1 == s.count;
        assert_eq!((tcp.fin(), tcp.psh(), tcp.ack()), (last, last, true));
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
            .unwrap();
        assert_eq!(tcp.checksum(), want, "segment {i}");
        payload.extend_from_slice(tcp.payload());
    }
    assert_eq!(payload, &f[54..]);
}

#[test]
fn segmentation_rejects_what_it_cannot_cut() {
    let mut out = Vec::new();
    assert_eq!(
        segment_tcp(&gso_frame(10), 0, 0, &mut out),
        Err(SegmentError::ZeroMss)
    );
    assert_eq!(
        segment_tcp(&udp_frame(b"x"), 1000, 0, &mut out),
        Err(SegmentError::NotTcp)
    );
    assert_eq!(
        segment_tcp(&gso_frame(10)[..40], 1000, 0, &mut out),
        Err(SegmentError::Truncated)
    );
}

#[test]
fn completes_a_checksum_at_its_offset() {
    let good = udp_frame(b"offload me");
    let mut f = good.clone();
    let pseudo = sum16(&f[26..34]) + 17 + (f.len() - 34) as u32;
    make_partial(&mut f, 34, 6, pseudo);
    assert!(complete_checksum_at(&mut f, 34, 6));
    assert_eq!(f, good);
    assert!(!complete_checksum_at(&mut f, 34, 100));
}

#[test]
fn coalescing_undoes_segmentation() {
    // A 10,000-byte GSO frame, cut like a NIC would, then coalesced.
    // ACK|PSH, no FIN (a FIN segment is never coalesced).
    let f = gso_frame_with(10_000, false);
    let mut segs = Vec::new();
    let s = segment_tcp(&f, 1448, 0, &mut segs).unwrap();
    let mut c = Coalescer::new();
    for i in 0..s.count {
        let len = if i + 1 == s.count { s.last } else { s.block };
        assert!(
            c.offer(&segs[i * s.block..i * s.block + len]),
            "segment {i}"
        );
    }
    let (merged, hdr) = c.take().unwrap();
    assert_eq!(merged.len(), f.len());
    assert_eq!(merged[47], 0x18, "PSH of the last segment kept");
    assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
    assert_eq!((hdr.gso_size, hdr.hdr_len, hdr.csum_start), (1448, 54, 34));
    // Payload and headers match the original, but for the checksum,
    // which is left partial for the receiver's offload.
    assert!(merged[54..] == f[54..], "payload differs");
    assert!(merged[..50] == f[..50], "headers differ");
    let mut done = merged.to_vec();
    assert!(complete_checksum_at(&mut done, 34, 16));
    assert!(
        done == f,
        "the completed checksum differs from the original"
    );
    assert!(c.is_empty());
}

#[test]
fn coalescing_refuses_gaps_other_flows_and_control_segments() {
    let f = gso_frame_with(3000, false);
    let mut segs = Vec::new();
    let s = segment_tcp(&f, 1000, 0, &mut segs).unwrap();
    let seg = |i: usize| segs[i * s.block..(i * s.block + s.block).min(segs.len())].to_vec();
    let mut c = Coalescer::new();
    assert!(c.offer(&seg(0)));
    assert!(!c.offer(&seg(2)), "a gap in sequence numbers");
    let mut other = seg(1);
    other[36] ^= 1; // another source port
    assert!(!c.offer(&other));
    let mut fin = seg(1);
    fin[47] |= 0x01;
    assert!(!c.offer(&fin));
    let mut syn = seg(1);
    syn[47] = 0x02;
    assert!(!c.offer(&syn));
    assert!(c.offer(&seg(1)));
    assert!(!c.offer(&udp_frame(b"not tcp")));
    let (m, h) = c.take().unwrap();
    assert_eq!((m.len(), h.gso_size), (54 + 2000, 1000));
    assert!(c.take().is_none());
    // A lone segment comes back untouched, without GSO.
    assert!(c.offer(&seg(0)));
    let (m, h) = c.take().unwrap();
    assert!(m == &seg(0)[..]);
    assert_eq!(h, VnetHdr::default());
}

#[test]
fn dscp_marks_keep_the_ipv4_checksum_right() {
    let mut f = udp_frame(b"mark me");
    assert!(set_dscp(&mut f, 26));
    let k = FlowKey::parse(&f, 1);
    assert_eq!(k.dscp, 26);
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..]).unwrap();
    assert_eq!(ip.to_header().calc_header_checksum(), ip.header_checksum());
    let mut f = tcp6_frame(b"x");
    assert!(set_dscp(&mut f, 46));
    assert_eq!(FlowKey::parse(&f, 1).dscp, 46);
    assert!(!set_dscp(
        &mut announce::rarp(MacAddr([2, 0, 0, 0, 0, 1])),
        1
    ));
}

#[test]
fn flow_keys_of_tcp_udp_icmp_and_arp() {
    let k = FlowKey::parse(&gso_frame(10), 10);
    assert_eq!(k.proto, Some(6));
    assert_eq!((k.src_port, k.dst_port), (40000, 5201));
    assert_eq!(k.tcp_flags & 0x19, 0x19);
    assert_eq!(k.dst_ip, Some("10.0.0.2".parse().unwrap()));
    let k = FlowKey::parse(&udp_frame(b"x"), 20);
    assert_eq!(
        (k.proto, k.src_port, k.dst_port, k.vlan),
        (Some(17), 1234, 5678, 20)
    );
    let k = FlowKey::parse(&tcp6_frame(b"x"), 1);
    assert_eq!((k.proto, k.dst_port), (Some(6), 80));
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    let k = FlowKey::parse(&icmp, 1);
    assert_eq!(
        (k.proto, k.src_port, k.dst_port, k.icmp_id),
        (Some(1), 8, 0, 7)
    );
    let k = FlowKey::parse(&announce::rarp(MacAddr([2, 1, 1, 1, 1, 1])), 1);
    assert_eq!((k.ethertype, k.proto, k.src_ip), (0x8035, None, None));
}

proptest! {
    #[test]
    fn flow_key_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>()) {
        let mut b = bytes;
        if b.len() > 14 {
            b[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            b[14] = if v6 { 0x60 } else { 0x45 };
        }
        let _ = FlowKey::parse(&b, 1);
    }

    #[test]
    fn coalescer_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..8)) {
        let mut c = Coalescer::new();
        for f in &frames {
            if !c.offer(f) {
                let _ = c.take();
                let _ = c.offer(f);
            }
        }
        let _ = c.take();
    }

    #[test]
    fn segmentation_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), mss in 0usize..300) {
        let mut out = Vec::new();
        let _ = segment_tcp(&bytes, mss, 8, &mut out);
    }

    #[test]
    fn segments_carry_the_payload_once(n in 0usize..5000, mss in 1usize..1500) {
        let f = gso_frame(n);
        let mut out = Vec::new();
        let s = segment_tcp(&f, mss, 0, &mut out).unwrap();
        prop_assert_eq!(s.count, n.div_ceil(mss).max(1));
        prop_assert_eq!(out.len(), (s.count - 1) * s.block + s.last);
        prop_assert_eq!(out.len() - s.count * 54, n);
    }

    #[test]
    fn completion_is_idempotent_on_good_frames(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let good = udp_frame(&payload);
        let mut f = good.clone();
        let _ = complete_partial_checksum(&mut f);
        prop_assert_eq!(f, good);
    }

    #[test]
    fn checksum_completion_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        if bytes.len() > 13 { bytes[12] = 0x08; bytes[13] = 0; }
        let _ = complete_partial_checksum(&mut bytes);
    }

    #[test]
    fn push_then_pop_restores_the_frame(
        vid in 0u16..4096, pcp in 0u8..8,
        payload in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let f = frame(&[], 0x0800, &payload);
        let mut buf = vec![0u8; 4];
        buf.extend_from_slice(&f);
        let start = push_tag(&mut buf, 4, 0x8100, tci(vid, pcp)).unwrap();
        prop_assert_eq!(start, 0);
        let v = EthView::parse(&buf[start..]).unwrap();
        prop_assert_eq!(v.outer, Some(Tag { tpid: 0x8100, vid, pcp }));
        prop_assert_eq!(v.ethertype, 0x0800);
        let start = pop_tag(&mut buf, start);
        prop_assert_eq!(&buf[start..], &f[..]);
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = EthView::parse(&bytes);
        let _ = vxlan::decode(&bytes);
        let mut b = bytes.clone();
        let _ = pop_tag(&mut b, 0);
        let _ = push_tag(&mut b, 4, 0x8100, 1);
    }
}
