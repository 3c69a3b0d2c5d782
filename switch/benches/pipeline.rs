#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::unwrap_used)]
//! The switch core alone: frames per second through `Switch::process` for 64
//! and 1500-byte frames on the known-unicast (hit) path, the flood path and
//! the VXLAN decapsulation path, and the heap allocations each frame costs.
//!
//! Also: policy (ACLs, connection tracking), flow accounting at 1k–1M open
//! flows with the heap cost of a flow record, and NetFlow/IPFIX export
//! records/s.
//!
//! Run: `cargo bench -p dvs-switch --bench pipeline` (criterion prints
//! `thrpt` in elements/s = frames/s or records/s; the allocation table
//! prints first). One group: `… -- flows`, `… -- export`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dvs_proto::{MacAddr, PortId, VlanId, VlanMode, Vni};
use dvs_switch::{wire, Ingress, PortAcl, PortConfig, PortNo, SegmentConfig, Switch, SwitchConfig};

/// Counts every allocation (to prove the steady state allocates nothing)
/// and the bytes live (to weigh a table entry).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts calls and bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(n as u64, Ordering::Relaxed);
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn mac(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, n])
}

fn vlan(n: u32) -> VlanId {
    VlanId::new(n).unwrap()
}

/// Four VLAN 10 ports (one a trunk), each owning its VM's MAC, a segment
/// with two remote hosts, and the MACs of ports 0 and 1 learned.
fn switch() -> Switch {
    switch_with(SwitchConfig::default())
}

fn switch_with(cfg: SwitchConfig) -> Switch {
    let mut sw = Switch::new(cfg);
    for i in 1..=4u32 {
        let mode = if i == 4 {
            VlanMode::trunk([vlan(10), vlan(20)].into_iter().collect(), None).unwrap()
        } else {
            VlanMode::Access(vlan(10))
        };
        sw.add_port(PortConfig {
            id: PortId::new(i).unwrap(),
            name: format!("p{i}"),
            vlan: mode,
            acl: PortAcl::default(),
            qos: Default::default(),
            security: Default::default(),
            netflow: None,
            // Each port owns its VM's MAC, as under a controller.
            mac: Some(mac(i as u8)),
        })
        .unwrap();
    }
    sw.set_segment(SegmentConfig {
        vlan: vlan(10),
        vni: Vni::new(5010).unwrap(),
        peers: vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()],
    })
    .unwrap();
    let mut out = Vec::new();
    for p in 0..2u16 {
        let mut f = frame(MacAddr::BROADCAST, mac(p as u8 + 1), 64);
        sw.process(Duration::ZERO, Ingress::Port(PortNo(p)), &mut f, &mut out);
    }
    sw
}

fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

struct Case {
    name: String,
    ingress: Ingress,
    bytes: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let remote: IpAddr = "10.0.0.2".parse().unwrap();
    let mut v = Vec::new();
    for len in [64usize, 1500] {
        v.push(Case {
            name: format!("hit/{len}B"),
            ingress: Ingress::Port(PortNo(0)),
            bytes: frame(mac(2), mac(1), len),
        });
        v.push(Case {
            name: format!("flood/{len}B"),
            ingress: Ingress::Port(PortNo(0)),
            bytes: frame(MacAddr::BROADCAST, mac(1), len),
        });
        let mut p = wire::vxlan::encode(Vni::new(5010).unwrap()).to_vec();
        p.extend_from_slice(&frame(mac(1), mac(9), len));
        v.push(Case {
            name: format!("vxlan-in/{len}B"),
            ingress: Ingress::Tunnel { src: remote },
            bytes: p,
        });
    }
    v
}

fn allocations_per_frame() {
    const N: u64 = 100_000;
    println!("\nallocations per frame (after warm-up, {N} frames each):");
    for c in cases() {
        let mut sw = switch();
        let mut out = Vec::new();
        let mut buf = c.bytes.clone();
        for _ in 0..100 {
            sw.process(Duration::from_secs(1), c.ingress, &mut buf, &mut out);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for i in 0..N {
            buf.copy_from_slice(&c.bytes);
            let now = Duration::from_micros(1_000_000 + i);
            black_box(sw.process(now, c.ingress, &mut buf, &mut out));
        }
        let per = (ALLOCS.load(Ordering::Relaxed) - before) as f64 / N as f64;
        println!(
            "  {:<16} {per:.4} ({} outputs per frame)",
            c.name,
            out.len()
        );
    }
    println!();
}

/// A TCP/IPv4 frame from 10.0.<src>.1:<sport> to 10.1.0.1:80.
fn tcp_frame(dst: MacAddr, src: MacAddr, src_net: u8, sport: u16, flags: u8) -> Vec<u8> {
    let mut f = frame(dst, src, 64);
    f[14..34].copy_from_slice(&[
        0x45, 0, 0, 50, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, src_net, 1, 10, 1, 0, 1,
    ]);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[34 + 13] = flags;
    f[34 + 12] = 0x50;
    f
}

/// `n` rules that the benchmark's traffic never matches, then the permit it
/// does match: the worst case for a first-match scan.
fn acl_rules(n: usize) -> Vec<dvs_proto::AclRule> {
    use dvs_proto::acl::{IpProto, PortRange};
    use dvs_proto::{AclRule, Action};
    let mut v: Vec<AclRule> = (0..n)
        .map(|i| AclRule {
            proto: Some(IpProto::TCP),
            dst_port: Some(PortRange {
                lo: 1000 + i as u16,
                hi: 1000 + i as u16,
            }),
            ..AclRule::any(Action::Deny)
        })
        .collect();
    v.push(AclRule {
        proto: Some(IpProto::TCP),
        ..AclRule::any(Action::Permit)
    });
    v
}

fn policy_switch(acl: PortAcl) -> Switch {
    let mut sw = switch_with(SwitchConfig {
        conntrack_max: 1 << 17,
        ..SwitchConfig::default()
    });
    sw.set_port_acl(PortNo(1), acl).unwrap();
    sw
}

/// Frames/s through ACLs of growing length (one flow: the decision cache
/// hits; 64k flows: it mostly misses and the rules are scanned), and
/// through a stateful port that tracks 100k connections.
fn bench_policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(1));
    for n in [0usize, 10, 100, 1000] {
        let acl = if n == 0 {
            PortAcl::default()
        } else {
            PortAcl {
                inbound: acl_rules(n),
                outbound: vec![],
            }
        };
        for (label, flows) in [("1-flow", 1u32), ("64k-flows", 65_536)] {
            let mut sw = policy_switch(acl.clone());
            let mut out = Vec::with_capacity(16);
            let frames: Vec<Vec<u8>> = (0..flows.min(4096))
                .map(|i| tcp_frame(mac(2), mac(1), (i % 256) as u8, (i * 16 + 1) as u16, 0x10))
                .collect();
            let mut i = 0usize;
            let mut buf = frames[0].clone();
            let mut t = 1_000_000u64;
            g.bench_function(format!("acl-{n}-rules/{label}"), |b| {
                b.iter(|| {
                    t += 1;
                    i = (i + 1) % frames.len();
                    buf.copy_from_slice(&frames[i]);
                    if flows > 1 {
                        // A fresh source port each frame: a new flow for the cache.
                        buf[34..36].copy_from_slice(&((t as u16) | 1).to_be_bytes());
                    }
                    black_box(sw.process(
                        Duration::from_micros(t),
                        Ingress::Port(PortNo(0)),
                        &mut buf,
                        &mut out,
                    ))
                })
            });
        }
    }

    // Stateful: port 1 opens 100k connections (stateful outbound permit,
    // inbound deny); the replies of all of them are then switched in turn.
    let stateful = || PortAcl {
        inbound: vec![dvs_proto::AclRule::any(dvs_proto::Action::Deny)],
        outbound: vec![dvs_proto::AclRule {
            stateful: true,
            ..acl_rules(0).remove(0)
        }],
    };
    let mut sw = policy_switch(stateful());
    let mut out = Vec::new();
    const CONNS: u32 = 100_000;
    let live_before = LIVE.load(Ordering::Relaxed);
    for i in 0..CONNS {
        let mut syn = tcp_frame(mac(1), mac(2), (i >> 16) as u8, i as u16, 0x02);
        // From port 1 (the stateful VM): swap the addresses' roles.
        syn[26..30].copy_from_slice(&[10, 1, 0, 1]);
        syn[30..34].copy_from_slice(&[10, 0, (i >> 16) as u8, 1]);
        syn[34..36].copy_from_slice(&80u16.to_be_bytes());
        syn[36..38].copy_from_slice(&(i as u16).to_be_bytes());
        sw.process(
            Duration::from_secs(1),
            Ingress::Port(PortNo(1)),
            &mut syn,
            &mut out,
        );
    }
    let entries = sw.port_conntrack(PortNo(1)).map_or(0, |c| c.len());
    let bytes = LIVE.load(Ordering::Relaxed) - live_before;
    println!(
        "\nconntrack: {entries} connections tracked, {} bytes of heap each (table included)\n",
        bytes / entries.max(1) as u64
    );
    let replies: Vec<Vec<u8>> = (0..CONNS)
        .step_by(7)
        .map(|i| tcp_frame(mac(2), mac(1), (i >> 16) as u8, i as u16, 0x10))
        .collect();
    let mut i = 0usize;
    let mut buf = replies[0].clone();
    g.bench_function("stateful-100k-conns/replies", |b| {
        b.iter(|| {
            i = (i + 1) % replies.len();
            buf.copy_from_slice(&replies[i]);
            black_box(sw.process(
                Duration::from_secs(2),
                Ingress::Port(PortNo(0)),
                &mut buf,
                &mut out,
            ))
        })
    });
    g.finish();
}

fn monitor(version: dvs_proto::FlowVersion, max_flows: usize) -> dvs_proto::NetflowMonitor {
    dvs_proto::NetflowMonitor {
        name: "m".into(),
        version,
        collectors: vec!["127.0.0.1:9".parse().unwrap()],
        active_timeout: Duration::from_secs(60),
        inactive_timeout: Duration::from_secs(15),
        sampling: 1,
        max_flows,
        template_refresh: Duration::from_secs(30),
    }
}

/// The TCP frame of flow `i` (source 10.0.<i/65536>.1, source port i).
fn flow_frame(base: &[u8], i: u32, buf: &mut [u8]) {
    buf.copy_from_slice(base);
    buf[28] = (i >> 16) as u8;
    buf[34..36].copy_from_slice(&(i as u16).to_be_bytes());
}

/// Send one frame of each of flows 0..n from port 0.
fn open_flows(sw: &mut Switch, base: &[u8], n: u32) {
    let mut out = Vec::new();
    let mut buf = base.to_vec();
    for i in 0..n {
        flow_frame(base, i, &mut buf);
        sw.process(
            Duration::from_secs(1),
            Ingress::Port(PortNo(0)),
            &mut buf,
            &mut out,
        );
    }
}

/// Frames/s with flow accounting off, then on — every port monitored, so a
/// frame between two VMs updates two records: the sender's (from the VM)
/// and the receiver's (into the VM) — with 1k, 100k and 1M flows open;
/// the heap bytes per open record; and export records/s per version.
fn bench_flows(c: &mut Criterion) {
    use dvs_proto::{FlowDirection, FlowVersion};
    use dvs_switch::flow::export::{Collectors, Exporter};
    use dvs_switch::wire::netflow::ExportClock;
    use dvs_switch::PortNetflow;

    let mut g = c.benchmark_group("flows");
    g.throughput(Throughput::Elements(1));
    let base = tcp_frame(mac(2), mac(1), 0, 1, 0x10);
    for (label, n, on) in [
        ("off/1k-flows", 1_000u32, false),
        ("on/1k-flows", 1_000, true),
        ("off/1M-flows", 1 << 20, false),
        ("on/100k-flows", 100_000, true),
        ("on/1M-flows", 1 << 20, true),
    ] {
        let mut sw = switch();
        if on {
            for p in [0, 1] {
                sw.set_port_netflow(
                    PortNo(p),
                    Some(PortNetflow {
                        monitor: monitor(FlowVersion::Ipfix, 4 << 20),
                        direction: FlowDirection::Both,
                    }),
                )
                .unwrap();
            }
        }
        let mut out = Vec::with_capacity(16);
        let mut buf = base.clone();
        let live_before = LIVE.load(Ordering::Relaxed);
        open_flows(&mut sw, &base, n);
        let open: usize = sw.monitors().tables().iter().map(|t| t.table.len()).sum();
        if on {
            let bytes = LIVE.load(Ordering::Relaxed) - live_before;
            println!(
                "\nflows: {n} flows open as {open} records, {} bytes of heap per record (table included)\n",
                bytes / open.max(1) as u64,
            );
        }
        let mut i = 0u32;
        let mut t = 1_000_000u64;
        g.bench_function(label, |b| {
            b.iter(|| {
                t += 1;
                i = (i + 7919) % n;
                flow_frame(&base, i, &mut buf);
                black_box(sw.process(
                    Duration::from_micros(t),
                    Ingress::Port(PortNo(0)),
                    &mut buf,
                    &mut out,
                ))
            })
        });
        if on {
            // Every record idle at once: the longest a timer pass holds the
            // switching thread, and the whole expiry (clearing the ended
            // records between passes included, as the exporter would).
            let t0 = std::time::Instant::now();
            let mut passes = 1;
            let mut longest = Duration::ZERO;
            let mut last = t0;
            while sw.monitors_mut().expire(Duration::from_secs(1000)) {
                longest = longest.max(last.elapsed());
                // The exporter takes the ended records between passes.
                for t in sw.monitors_mut().tables_mut() {
                    t.pending.clear();
                }
                last = std::time::Instant::now();
                passes += 1;
            }
            longest = longest.max(last.elapsed());
            println!(
                "\nflows: {open} idle records expired in {passes} timer passes, {:.1} ms in all, {:.2} ms the longest pass\n",
                t0.elapsed().as_secs_f64() * 1e3,
                longest.as_secs_f64() * 1e3
            );
        }
    }
    g.finish();

    // Export: records/s encoded into messages, and sent on a real UDP
    // socket to a local collector port.
    let mut sw = switch();
    sw.set_port_netflow(
        PortNo(0),
        Some(PortNetflow {
            monitor: monitor(FlowVersion::Ipfix, 1 << 20),
            direction: FlowDirection::Out,
        }),
    )
    .unwrap();
    open_flows(&mut sw, &base, 10_000);
    sw.monitors_mut().flush_all();
    let records = std::mem::take(&mut sw.monitors_mut().tables_mut()[0].pending);
    let mut g = c.benchmark_group("export");
    g.throughput(Throughput::Elements(records.len() as u64));
    let clock = ExportClock {
        uptime_ms: 2_000,
        unix_ms: 1_700_000_000_000,
    };
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = sink.local_addr().unwrap();
    for version in [FlowVersion::V5, FlowVersion::V9, FlowVersion::Ipfix] {
        let m = monitor(version, 1 << 20);
        let mut x = Exporter::new(&m, 1, "127.0.0.1".parse().unwrap());
        let mut now = Duration::ZERO;
        g.bench_function(format!("{version}/encode"), |b| {
            b.iter(|| {
                now += Duration::from_millis(1);
                x.export(now, clock, &records, |m| {
                    black_box(m);
                    dvs_switch::flow::export::SendResult { sent: 1, failed: 0 }
                });
            })
        });
        let mut cs = Collectors::new(&[to], "127.0.0.1".parse().unwrap());
        g.bench_function(format!("{version}/encode+send"), |b| {
            b.iter(|| {
                now += Duration::from_millis(1);
                x.export(now, clock, &records, |m| cs.send(m));
            })
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    allocations_per_frame();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));
    for case in cases() {
        let mut sw = switch();
        let mut out = Vec::with_capacity(16);
        let mut buf = case.bytes.clone();
        let mut t = 1_000_000u64;
        g.bench_function(&case.name, |b| {
            b.iter(|| {
                t += 1;
                black_box(sw.process(Duration::from_micros(t), case.ingress, &mut buf, &mut out))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench, bench_policy, bench_flows
}
criterion_main!(benches);
