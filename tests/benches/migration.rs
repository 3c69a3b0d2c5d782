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
//! Then a real guest: a QEMU (TCG) guest moved as libvirt moves it (the
//! hook in libvirt's order, `migrate` over a unix socket, `cont` at the
//! destination) between two hosts of the chassis, under a ping every 1 ms
//! and a TCP echo stream from a peer on a third host, QEMU's announcements
//! on and off in turn; and, in the same run, the same guest moved between
//! two TAPs of one Linux bridge — the reference. Per migration: QEMU's
//! downtime (`query-migrate`), the peer's largest gap between replies,
//! their difference (what the switch adds to the VM's own pause), dvs's
//! timeline blackout, and — from a listener on the destination's TAP, by
//! the kernel's timestamps — `cont` → the first echo request the switch
//! put into the VM's TAP and → the VM's first reply out of it (what the
//! switch delivered, apart from the guest's own answer); medians and p99
//! per mode.
//!
//! Run (root): `cargo bench -p dvs-tests --bench migration [-- MOVES]
//! [qemu=N] [only=netns|qemu]` (MOVES: namespace migrations, default 100;
//! N: QEMU migrations per announcement mode, default 12).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dvs_tests::chassis::Chassis;
use dvs_tests::guestmove::{self, window_loss, Moved};
use dvs_tests::netns::{e2e_ready, wait_for};
use dvs_tests::qemu::Guest;

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
    /// First frame forwarded at the destination → the controller heard
    /// the VM runs there (positive: the destination did not wait for it).
    ahead_ms: f64,
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
        ahead_ms: f(&m, "switchover_ms") - f(&m, "first_frame_at_destination_ms"),
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |k: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(k).map(str::to_string))
    };
    let only = arg("only=");
    if only.as_deref() != Some("qemu") {
        namespace_part(args.iter().find_map(|a| a.parse().ok()).unwrap_or(100));
        concurrent_part();
    }
    if only.as_deref() != Some("netns") {
        let n = arg("qemu=").and_then(|n| n.parse().ok()).unwrap_or(12);
        qemu_part(n);
    }
}

fn namespace_part(moves: usize) {
    if !e2e_ready(&["ip", "ping", "iperf3", "/usr/bin/python3"]) {
        return;
    }
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
        "first frame forwarded at the destination → the controller hears of the switchover, ms",
        col(|s| s.ahead_ms, &samples),
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

const GUEST_MAC: &str = "52:54:00:d0:00:07";

fn guest() -> Guest {
    Guest {
        name: "g1".into(),
        mac: GUEST_MAC.into(),
        addr: "10.40.0.5/24".into(),
    }
}

/// One QEMU migration's figures, ms.
#[derive(Debug, Clone, Copy)]
struct Fig {
    /// What the switch added to QEMU's downtime: the peer's largest gap
    /// minus it.
    added: f64,
    gap: f64,
    downtime: f64,
    /// dvs's timeline blackout (the bridge: none).
    blackout: f64,
    /// The destination's `cont` returned → the peer's first reply after it.
    to_reply: f64,
    /// `cont` returned → the destination's port started forwarding on
    /// the VM's own signal (dvs's timeline; none when it waited for the
    /// controller, and for the bridge).
    to_forward: f64,
    /// `cont` returned → the first echo request put into the VM's TAP
    /// (negative: it waited there when the VM resumed).
    to_tap: f64,
    /// `cont` returned → the VM's first reply out of its TAP.
    from_tap: f64,
}

fn figures(m: &Moved, replies: &[(f64, u64)]) -> Fig {
    let (_, gap) = window_loss(replies, m.window);
    let rec = |k: &str| m.record.as_ref().and_then(|r| r[k].as_f64());
    let first_reply = replies
        .iter()
        .find(|(t, _)| *t >= m.resumed)
        .map_or(f64::NAN, |(t, _)| *t);
    let started = rec("begin_unix_us")
        .zip(rec("destination_started_ms"))
        .map_or(f64::NAN, |(b, f)| b / 1e6 + f / 1e3);
    let (to_tap, from_tap) = guestmove::tap_times(&m.tap, m.window.0, m.resumed);
    Fig {
        to_tap,
        from_tap,
        added: gap - m.downtime,
        gap,
        downtime: m.downtime,
        blackout: rec("blackout_ms").unwrap_or(f64::NAN),
        to_reply: (first_reply - m.resumed) * 1e3,
        to_forward: (started - m.resumed) * 1e3,
    }
}

/// The real-guest part: `per_mode` migrations with QEMU's announcements
/// and as many without, on dvs and on a Linux bridge.
fn qemu_part(per_mode: usize) {
    if !e2e_ready(&[
        "ip",
        "ping",
        "/usr/bin/python3",
        "qemu-system-x86_64",
        "/bin/busybox",
        "cpio",
    ]) {
        return;
    }
    let g = guest();
    let profiles = "kind: PortProfile\nname: guest\nvlan: { mode: access, id: 10 }\n\
         acl:\n  in:\n    - { action: permit, ethertype: arp }\n    - { action: permit, proto: icmp }\n    - { action: permit, proto: tcp, dst_port: 7 }\n    - { action: deny }\n---\n\
         kind: PortProfile\nname: peer\nvlan: { mode: access, id: 10 }\n";
    let mut c = Chassis::new(3, profiles, &[("p", 2, "10.40.0.100/24", "peer")]);
    c.ok(&[
        "port",
        "create",
        "--vm",
        &g.name,
        "--mac",
        GUEST_MAC,
        "--profile",
        "guest",
    ]);
    let tap0 = c.topo.name("m0");
    let mut q = guestmove::start(&mut c, &g, 0, "qemu-0", &tap0);
    let p_ns = c.vm("p").1.clone();
    assert!(
        wait_for(Duration::from_secs(15), || c
            .topo
            .try_sh(&p_ns, &format!("ping -c 1 -W 1 {}", g.ip()))
            .status
            .success()),
        "the guest is unreachable:\n{}",
        c.topo.logs()
    );
    let stop = c.topo.dir.join("stop-traffic");
    c.topo
        .spawn(&p_ns, "ping", &["ping", "-D", "-i", "0.001", g.ip()]);
    let echo = guestmove::echo_client(g.ip(), &stop);
    c.topo
        .spawn(&p_ns, "echo", &["/usr/bin/python3", "-c", &echo]);
    std::thread::sleep(Duration::from_secs(2));
    // Announcements on for two moves (there and back), off for two, …
    let modes: Vec<bool> = (0..2 * per_mode).map(|k| (k / 2) % 2 == 0).collect();
    let mut moves = Vec::new();
    let mut at = 0;
    let mut crashed = None;
    for (n, announce) in modes.iter().copied().enumerate() {
        let to = 1 - at;
        let settle = Duration::from_millis(1000);
        let (next, m) = guestmove::libvirt_move(&mut c, &g, q, at, to, n + 1, announce, settle);
        q = next;
        at = to;
        // The guest answers from where it went, or its kernel died there
        // (TCG guests under this load do, now and then, with either build
        // of dvs): the moves so far are the figures.
        let back = wait_for(Duration::from_secs(5), || {
            c.topo
                .try_sh(&p_ns, &format!("ping -c 1 -W 1 {}", g.ip()))
                .status
                .success()
        });
        if !back {
            let console =
                std::fs::read_to_string(c.topo.dir.join(format!("qemu-m{}.console", n + 1)))
                    .unwrap_or_default();
            let why = console
                .lines()
                .find(|l| l.contains("BUG") || l.contains("panic"))
                .unwrap_or("no kernel message")
                .to_string();
            crashed = Some((n + 1, why));
            break;
        }
        moves.push(m);
    }
    std::fs::write(&stop, b"").expect("write the stop file");
    wait_for(Duration::from_secs(15), || !c.topo.running("echo"));
    c.topo.signal("ping", "INT");
    wait_for(Duration::from_secs(5), || !c.topo.running("ping"));
    let replies = guestmove::replies(&c.topo.log("ping"));
    let echo_out = c.topo.log("echo");
    q.quit(&mut c.topo, &c.hosts[at].clone());
    drop(c);
    let bridge = guestmove::bridge_reference(&g, &modes[..moves.len()], "0.001");
    if let Some((n, why)) = &crashed {
        println!("\nthe guest stopped answering after move {n} (its console: {why}); the figures are of the {} moves before", moves.len());
    }

    println!(
        "\n{} live migrations of a QEMU (TCG) guest as libvirt makes them, under a ping every 1 ms and a TCP echo every 10 ms from a peer (dvs: a 3-host chassis, the peer on the third; bridge: two TAPs of one Linux bridge, the peer on it), this machine:\n",
        moves.len()
    );
    println!("| # | path | announce | QEMU downtime ms | peer's largest gap ms | gap − downtime ms | `cont` → first reply ms | `cont` → destination port started ms | `cont` → first request into the TAP ms | `cont` → first reply out of it ms | dvs blackout ms | trigger |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let on_off = |a: bool| if a { "on" } else { "off" };
    let ms = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.1}")
        }
    };
    let dvs_moves = moves
        .iter()
        .enumerate()
        .map(|(n, m)| ("dvs", n, m, &replies[..]));
    let bridge_moves = (bridge.iter().enumerate()).map(|(n, (m, rep))| ("bridge", n, m, &rep[..]));
    let mut rows: Vec<(&str, bool, Fig)> = Vec::new();
    for (path, n, m, rep) in dvs_moves.chain(bridge_moves) {
        let f = figures(m, rep);
        let trigger = m.record.as_ref().and_then(|r| r["trigger"].as_str());
        println!(
            "| {} | {path} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
            n + 1,
            on_off(m.announce),
            f.downtime,
            f.gap,
            f.added,
            ms(f.to_reply),
            ms(f.to_forward),
            ms(f.to_tap),
            ms(f.from_tap),
            ms(f.blackout),
            trigger.unwrap_or("-"),
        );
        rows.push((path, m.announce, f));
    }
    println!(
        "\nTCP echo (dvs): {}",
        echo_out.lines().last().unwrap_or("-")
    );
    println!("\n| announce | path | downtime median | gap median | gap − downtime median | p99 | `cont` → first reply median | `cont` → first request into the TAP median | p99 | `cont` → first reply out of it median | dvs blackout median | p99 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for announce in [true, false] {
        let mut added = Vec::new();
        for path in ["dvs", "bridge"] {
            let sel: Vec<Fig> = rows
                .iter()
                .filter(|r| r.0 == path && r.1 == announce)
                .map(|r| r.2)
                .collect();
            let col = |k: fn(&Fig) -> f64| sel.iter().map(k).collect::<Vec<f64>>();
            let (a, b) = (col(|x| x.added), col(|x| x.blackout));
            let tap = col(|x| x.to_tap);
            println!(
                "| {} | {path} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
                on_off(announce),
                guestmove::median(col(|x| x.downtime)),
                guestmove::median(col(|x| x.gap)),
                guestmove::median(a.clone()),
                pct(a.clone(), 0.99),
                ms(guestmove::median(col(|x| x.to_reply))),
                ms(guestmove::median(tap.clone())),
                ms(pct(tap, 0.99)),
                ms(guestmove::median(col(|x| x.from_tap))),
                // The bridge has no timeline: its blackouts are NaN, "-".
                ms(guestmove::median(b.clone())),
                ms(pct(b, 0.99)),
            );
            added.push((guestmove::median(a.clone()), pct(a, 0.99)));
        }
        println!(
            "| {} | dvs − bridge | | | {:+.1} | {:+.1} | | | | | | |",
            on_off(announce),
            added[0].0 - added[1].0,
            added[0].1 - added[1].1
        );
    }
    println!(
        "\ntargets: what dvs adds ≤ what the bridge adds + 1 ms (median), + 5 ms (p99), both modes"
    );
    println!("(the peer's gap is the pinger's too: iputils ping sends one request per 10 ms, its MININTERVAL, while replies are outstanding; the TAP columns time what the switch delivered, by the kernel's timestamps on the destination's TAP)");
}

/// Eight VMs leave one host at once under traffic (a peer on a third host
/// pings each every 10 ms): all eight prepared and pre-copied together,
/// then every NIC moved; each one's blackout and pings lost, and the total.
fn concurrent_part() {
    if !e2e_ready(&["ip", "ping", "/usr/bin/python3"]) {
        return;
    }
    const N: usize = 8;
    let mut c = Chassis::new(
        3,
        "kind: PortProfile\nname: vlan10\nvlan: { mode: access, id: 10 }\n",
        &[("peer", 2, "10.50.0.100/24", "vlan10")],
    );
    for i in 1..=N {
        let mac = format!("02:00:00:cc:00:{i:02x}");
        c.add_tap_vm(
            &format!("e{i}"),
            0,
            &format!("10.50.0.{i}/24"),
            "vlan10",
            &mac,
        );
    }
    let peer_ns = c.vm("peer").1.clone();
    for i in 1..=N {
        let ip = format!("10.50.0.{i}");
        assert!(wait_for(Duration::from_secs(10), || c
            .ping("peer", &format!("e{i}"), 1)
            .1
            == 1));
        c.topo.spawn(
            &peer_ns,
            &format!("ping{i}"),
            &["ping", "-D", "-i", "0.01", &ip],
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let t0 = std::time::Instant::now();
    let ids: Vec<u64> = (1..=N).map(|i| c.begin_move(&format!("e{i}"), 1)).collect();
    for i in 1..=N {
        c.swap_nic(&format!("e{i}"), 1);
    }
    let records: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            let mut m = c.wait_phase(*id, "done", Duration::from_secs(30));
            wait_for(Duration::from_secs(5), || {
                m = c.migration(*id);
                m["blackout_ms"].is_number()
            });
            m
        })
        .collect();
    let total = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    println!("\n{N} VMs leave h1 for h2 at once, each pinged every 10 ms from a third host:\n");
    println!("| VM | blackout ms | pings lost | trigger |\n|---|---|---|---|");
    let mut blackouts = Vec::new();
    for (i, m) in records.iter().enumerate() {
        let label = format!("ping{}", i + 1);
        c.topo.signal(&label, "INT");
        wait_for(Duration::from_secs(5), || !c.topo.running(&label));
        let mut one = [Sample {
            begin: 0.0,
            ..Sample::default()
        }];
        assign_losses(&c.topo.log(&label), &mut one);
        let b = f(m, "blackout_ms");
        blackouts.push(b);
        println!(
            "| e{} | {b:.1} | {} | {} |",
            i + 1,
            one[0].lost,
            m["trigger"].as_str().unwrap_or("-")
        );
    }
    println!(
        "\nall {N} done {:.0} ms after the first began; blackout median {:.1} ms, max {:.1} ms",
        total.as_secs_f64() * 1e3,
        pct(blackouts.clone(), 0.5),
        pct(blackouts, 1.0)
    );
}
