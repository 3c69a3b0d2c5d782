#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::unwrap_used)]
//! The switch core alone: frames per second through `Switch::process` for 64
//! and 1500-byte frames on the known-unicast (hit) path, the flood path and
//! the VXLAN decapsulation path, and the heap allocations each frame costs.
//!
//! Run: `cargo bench -p dvs-switch --bench pipeline` (criterion prints
//! `thrpt` in elements/s = frames/s; the allocation table prints first).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dvs_proto::{MacAddr, PortId, VlanId, VlanMode, Vni};
use dvs_switch::{wire, Ingress, PortAcl, PortConfig, PortNo, SegmentConfig, Switch, SwitchConfig};

/// Counts every allocation, to prove the steady state allocates nothing.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
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

/// Four VLAN 10 ports (one a trunk), a segment with two remote hosts, and
/// the MACs of ports 0 and 1 learned.
fn switch() -> Switch {
    let mut sw = Switch::new(SwitchConfig::default());
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
    targets = bench
}
criterion_main!(benches);
