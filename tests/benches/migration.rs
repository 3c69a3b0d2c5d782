//! 100 live migrations under load, on real kernels: the namespace chassis
//! of the end-to-end suite (controller, three agents, a VM namespace whose
//! NIC is a TAP), the VM streaming TCP to a peer with iperf3 and pinging it
//! every 10 ms while it moves between h1 and h2 as a hypervisor moves a VM
//! (prepare, pause, move the NIC, resume with QEMU's RARP). Then a port
//! with 10,000 tracked connections moves a few times: its snapshot's size
//! and how long the switchover takes with it.
//!
//! Per migration: blackout (what the VM's peers live through: its last
//! frame at the source to its first to a peer at the destination, from the
//! controller's timeline), begin → policy ready on the
//! destination, resume → first frame forwarded at the destination (what dvs
//! adds to the VM's own pause), switchover → done (stop, snapshot,
//! transfer, start), pings lost (gaps in `ping -D` replies, each assigned
//! to the migration it falls in).
//!
//! References (the issue's): vMotion's switchover goal of 500 ms; OVN users
//! report 5–10 lost pings per migration (ovs-issues #230).
//!
//! Run (root): `cargo bench -p dvs-tests --bench migration [-- MOVES]`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dvs_tests::chassis::Chassis;
use dvs_tests::netns::{e2e_ready, wait_for};

const A_MAC: &str = "02:00:00:bb:00:01";

fn profiles() -> String {
    "kind: PortProfile\nname: web\nvlan: { mode: access, id: 10 }\n\
     acl:\n  out:\n    - { action: permit, proto: tcp, stateful: true }\n    - { action: permit, proto: icmp, stateful: true }\n    - { action: permit, proto: udp, stateful: true }\n    - { action: permit, ethertype: arp }\n  in:\n    - { action: permit, ethertype: arp }\n    - { action: deny }\n---\n\
     kind: PortProfile\nname: peer\nvlan: { mode: access, id: 10 }\n"
        .to_string()
}

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One migration as measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    begin: f64,
    blackout_ms: f64,
    policy_ready_ms: f64,
    switchover_to_done_ms: f64,
    pause_ms: f64,
    /// Resume → first frame forwarded at the destination.
    added_ms: f64,
    lost: u32,
    snapshot_bytes: u64,
    base_bytes: u64,
    connections: u64,
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Move VM `a` to host `to` and measure it.
fn migrate(c: &mut Chassis, to: usize) -> Sample {
    let begin = unix();
    let id = c.begin_move("a", to);
    let pause = c.swap_nic("a", to);
    let resumed = c
        .resumed_at
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(f64::NAN, |d| d.as_secs_f64());
    let mut m = c.wait_phase(id, "done", Duration::from_secs(20));
    wait_for(Duration::from_secs(5), || {
        m = c.migration(id);
        m["first_frame_at_destination_ms"].is_number()
    });
    let begin_us = m["begin_unix_us"].as_f64().unwrap() / 1e6;
    Sample {
        begin,
        blackout_ms: f(&m, "blackout_ms"),
        policy_ready_ms: f(&m, "policy_ready_ms"),
        switchover_to_done_ms: f(&m, "done_ms") - f(&m, "switchover_ms"),
        pause_ms: pause.as_secs_f64() * 1e3,
        added_ms: (begin_us + f(&m, "first_frame_at_destination_ms") / 1e3 - resumed) * 1e3,
        lost: 0,
        snapshot_bytes: m["snapshot_bytes"].as_u64().unwrap_or(0),
        base_bytes: m["base_snapshot_bytes"].as_u64().unwrap_or(0),
        connections: m["connections"].as_u64().unwrap_or(0),
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Assign the pings `ping -D` did not get back to the migrations they fall
/// in (a gap belongs to the last migration begun before its reply).
fn assign_losses(ping_log: &str, samples: &mut [Sample]) -> (u32, u32) {
    let mut last: Option<u32> = None;
    let (mut sent, mut lost) = (0, 0);
    for line in ping_log.lines() {
        let (Some(ts), Some(seq)) = (
            line.strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .and_then(|t| t.parse::<f64>().ok()),
            line.split("icmp_seq=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u32>().ok()),
        ) else {
            continue;
        };
        if !line.contains("bytes from") {
            continue;
        }
        if let Some(p) = last {
            if seq > p + 1 {
                let gap = seq - p - 1;
                lost += gap;
                if let Some(s) = samples.iter_mut().rev().find(|s| s.begin <= ts) {
                    s.lost += gap;
                }
            }
        }
        sent = sent.max(seq);
        last = Some(seq);
    }
    (sent, lost)
}

fn main() {
    if !e2e_ready(&["ip", "ping", "iperf3", "/usr/bin/python3"]) {
        return;
    }
    let moves: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let mut c = Chassis::new(3, &profiles(), &[("b", 2, "10.40.0.2/24", "peer")]);
    c.add_tap_vm("a", 0, "10.40.0.1/24", "web", A_MAC);
    let (a_ns, b_ns, b_ip) = (
        c.vm("a").1.clone(),
        c.vm("b").1.clone(),
        c.vm("b").2.clone(),
    );
    c.topo
        .spawn(&b_ns, "iperf3-s", &["iperf3", "-s", "-p", "5201"]);
    assert!(wait_for(Duration::from_secs(5), || c
        .topo
        .sh(&b_ns, "ss -Hltn")
        .contains("5201")));
    // Load: a TCP stream as fast as it goes, and a ping every 10 ms.
    c.topo.spawn(
        &a_ns,
        "iperf3-c",
        &["iperf3", "-c", &b_ip, "-p", "5201", "-t", "3600"],
    );
    c.topo
        .spawn(&a_ns, "ping", &["ping", "-D", "-i", "0.01", &b_ip]);
    std::thread::sleep(Duration::from_secs(2));

    let mut samples = Vec::new();
    for k in 0..moves {
        samples.push(migrate(&mut c, if k % 2 == 0 { 1 } else { 0 }));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stream_alive = c.topo.running("iperf3-c");
    c.topo.stop("iperf3-c");

    // A port with 10,000 tracked connections (one UDP datagram to each of
    // 10,000 ports of b, through the stateful rule), moved 5 times.
    c.topo.sh(
        &a_ns,
        &format!(
            "/usr/bin/python3 -c 'import socket,time\ns=socket.socket(2,2)\nfor p in range(10000):\n  s.sendto(b\"x\",(\"{b_ip}\",20000+p))\n  if p % 200 == 199: time.sleep(0.005)'"
        ),
    );
    let at = usize::from(!moves.is_multiple_of(2));
    let mut big = Vec::new();
    for k in 0..5 {
        big.push(migrate(&mut c, if (k + at) % 2 == 0 { 1 } else { 0 }));
    }
    c.topo.signal("ping", "INT");
    wait_for(Duration::from_secs(5), || !c.topo.running("ping"));
    let n = samples.len();
    samples.extend(big);
    let (pings, _) = assign_losses(&c.topo.log("ping"), &mut samples);
    let big = samples.split_off(n);
    let lost: u32 = samples.iter().map(|s| s.lost).sum();

    let col = |f: fn(&Sample) -> f64, v: &[Sample]| v.iter().map(f).collect::<Vec<f64>>();
    let row = |name: &str, v: Vec<f64>| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            pct(v.clone(), 0.5),
            pct(v.clone(), 0.99),
            pct(v, 1.0)
        );
    };
    println!(
        "\n{} migrations of a VM under an iperf3 TCP stream and a ping every 10 ms (3-host namespace chassis, this machine):\n",
        samples.len()
    );
    println!("| per migration | median | p99 | max |\n|---|---|---|---|");
    row(
        "blackout, ms (the VM's last frame at the source → its first to a peer at the destination)",
        col(|s| s.blackout_ms, &samples),
    );
    row(
        "VM pause (the NIC's move), ms",
        col(|s| s.pause_ms, &samples),
    );
    row(
        "resume → first frame forwarded at the destination, ms",
        col(|s| s.added_ms, &samples),
    );
    row(
        "begin → policy ready on the destination, ms",
        col(|s| s.policy_ready_ms, &samples),
    );
    row(
        "switchover → done (stop, snapshot, transfer, start), ms",
        col(|s| s.switchover_to_done_ms, &samples),
    );
    row(
        "pings lost (10 ms apart)",
        samples.iter().map(|s| f64::from(s.lost)).collect(),
    );
    println!(
        "\npings: {pings} sent in all; {lost} lost during these migrations ({:.2} per migration); the TCP stream {} all {} migrations",
        f64::from(lost) / samples.len() as f64,
        if stream_alive { "survived" } else { "DID NOT survive" },
        samples.len()
    );
    println!(
        "\nthe port with its tracked connections, moved {} times:\n",
        big.len()
    );
    println!("| per migration | median | p99 | max |\n|---|---|---|---|");
    row(
        "tracked connections handed over",
        col(|s| s.connections as f64, &big),
    );
    row(
        "pre-copy snapshot (sent while the port forwards), KB",
        col(|s| s.base_bytes as f64 / 1e3, &big),
    );
    row(
        "handover at the switchover (a delta of it), KB",
        col(|s| s.snapshot_bytes as f64 / 1e3, &big),
    );
    row(
        "switchover → done, ms",
        col(|s| s.switchover_to_done_ms, &big),
    );
    row("blackout, ms", col(|s| s.blackout_ms, &big));
    row(
        "pings lost",
        big.iter().map(|s| f64::from(s.lost)).collect(),
    );
    println!(
        "\nreferences: vMotion's switchover goal 500 ms; OVN users report 5–10 lost pings per migration (ovs-issues #230)"
    );
}
