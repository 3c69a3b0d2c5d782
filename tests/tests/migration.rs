//! Live migration on real kernels: a VM namespace whose NIC is a TAP of its
//! host's agent moves between hosts as a hypervisor moves a VM — the
//! destination's port is prepared (`dvs migrate start --wait`), the VM
//! pauses, its NIC becomes the destination's TAP with the same MAC and
//! addresses (its sockets stay), it resumes, and its first frame switches
//! the port over. Under a ping every 10 ms, an iperf3 TCP stream, a denied
//! UDP flow, a VLAN neighbour and a NetFlow-counted UDP flow, back and forth.
//! Then aborts at every phase, and `kill -9` of each party; and a DRS
//! burst — thirty-two VMs moving at once, eight from each of four hosts —
//! after which the evacuated host is drained and removed. A VM whose
//! address came from DHCP (dnsmasq) keeps it under IP source guard.

#![allow(clippy::unwrap_used)] // a test fails on the spot, saying where

use std::time::{Duration, Instant};

use dvs_tests::chassis::{Chassis, Move};
use dvs_tests::collector::Nfcapd;
use dvs_tests::netns::{e2e_ready, parse_ping, wait_for, CORE_IP};

const TOOLS: &[&str] = &[
    "ip",
    "ss",
    "ping",
    "iperf3",
    "nft",
    "nfcapd",
    "nfdump",
    "/usr/bin/python3",
];

const COLLECTOR: u16 = 2055;
const A_MAC: &str = "02:00:00:aa:00:01";
/// The shaped rate out of the moving VM (Mbit/s).
const RATE: f64 = 40.0;

/// The profiles; the moving VM's records its flows with `netflow` (applied
/// once the collector listens).
fn profiles(netflow: bool) -> String {
    let nf = if netflow {
        "netflow: { monitor: m, direction: both }\n"
    } else {
        ""
    };
    format!(
        "kind: NetflowMonitor\nname: m\nversion: ipfix\ncollectors: [\"{CORE_IP}:{COLLECTOR}\"]\nactive_timeout_s: 120\ninactive_timeout_s: 60\n---\n\
         kind: PortProfile\nname: web\nvlan: {{ mode: access, id: 10 }}\n\
         acl:\n  out:\n    - {{ action: deny, proto: udp, dst_port: 7777 }}\n    - {{ action: permit, proto: tcp, stateful: true }}\n    - {{ action: permit, proto: icmp, stateful: true }}\n    - {{ action: permit, proto: udp, stateful: true }}\n    - {{ action: permit, ethertype: arp }}\n  in:\n    - {{ action: permit, ethertype: arp }}\n    - {{ action: deny }}\n\
         qos:\n  out: {{ avg_mbps: {RATE}, shape: true }}\n\
         {nf}---\n\
         kind: PortProfile\nname: peer\nvlan: {{ mode: access, id: 10 }}\n---\n\
         kind: PortProfile\nname: other\nvlan: {{ mode: access, id: 20 }}\n"
    )
}

/// A 3-host chassis: `b` (VLAN 10) on h3, `c` (VLAN 20) on h2, and the TAP
/// VM `a` (profile web, VLAN 10) on h1.
fn chassis() -> Chassis {
    let mut c = Chassis::new(
        3,
        &profiles(false),
        &[
            ("b", 2, "10.30.0.2/24", "peer"),
            ("c", 1, "10.30.0.3/24", "other"),
        ],
    );
    c.add_tap_vm("a", 0, "10.30.0.1/24", "web", A_MAC);
    c
}

/// The packets an nft rule of `ns` counted (the rule's text names it).
fn nft_count(c: &Chassis, ns: &str, family_table: &str, rule: &str) -> u64 {
    let out = c.topo.sh(ns, &format!("nft list table {family_table}"));
    let line = out
        .lines()
        .find(|l| l.contains(rule))
        .unwrap_or_else(|| panic!("no nft rule `{rule}` in:\n{out}"));
    line.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in `{line}`"))
}

/// The port's last reported counters (`dvs port show`): host and rx_frames.
fn reported(c: &Chassis, id: &str) -> (String, u64) {
    let p = c.json(&["port", "show", id]);
    (
        p["host"].as_str().unwrap_or_default().to_string(),
        p["stats"]["counters"]["rx_frames"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_vm_moves_back_and_forth_under_traffic_and_its_port_moves_with_it() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = chassis();
    let nfcapd = Nfcapd::start(&mut c.topo, &c.core.clone(), CORE_IP, COLLECTOR);
    c.apply(&profiles(true));
    let (a_ns, a_id) = (c.vm("a").1.clone(), c.vm("a").3.clone());
    let (b_ns, b_ip) = (c.vm("b").1.clone(), c.vm("b").2.clone());
    let (c_ns, c_ip) = (c.vm("c").1.clone(), c.vm("c").2.clone());
    assert_eq!(c.ping("a", "b", 3), (3, 3), "{}", c.topo.logs());

    // Counters at the receivers: the denied flow, the counted flow, and
    // anything from a in VLAN 20.
    c.topo.sh(
        &b_ns,
        "nft add table inet t && nft add chain inet t in '{ type filter hook input priority 0; }' && \
         nft add rule inet t in udp dport 7777 counter && nft add rule inet t in udp dport 6000 counter",
    );
    c.topo.sh(
        &c_ns,
        &format!(
            "nft add table netdev t && nft add chain netdev t in '{{ type filter hook ingress device eth0 priority 0; }}' && \
             nft add rule netdev t in ether saddr {A_MAC} counter"
        ),
    );
    c.topo
        .spawn(&b_ns, "iperf3-s", &["iperf3", "-s", "-p", "5201", "-1"]);
    assert!(wait_for(Duration::from_secs(5), || c
        .topo
        .sh(&b_ns, "ss -Hltn")
        .contains("5201")));

    // Traffic from a, for the whole run.
    let secs = 26;
    let w = secs.to_string();
    c.topo
        .spawn(&a_ns, "ping-b", &["ping", "-i", "0.01", "-w", &w, &b_ip]);
    c.topo
        .spawn(&a_ns, "ping-c", &["ping", "-i", "0.2", "-w", &w, &c_ip]);
    let t = (secs - 2).to_string();
    c.topo.spawn(
        &a_ns,
        "iperf3-c",
        &[
            "iperf3", "-c", &b_ip, "-p", "5201", "-t", &t, "-i", "1", "-J",
        ],
    );
    let denied = format!(
        "import socket,time\ns=socket.socket(2,2)\nend=time.time()+{t}\n\
         while time.time()<end:\n  try: s.sendto(b'x'*64,('{b_ip}',7777))\n  except OSError: pass\n  time.sleep(0.01)\n"
    );
    c.topo
        .spawn(&a_ns, "udp-denied", &["/usr/bin/python3", "-c", &denied]);
    // 1000 datagrams of 100 bytes, 20 ms apart, from one source port.
    let counted = format!(
        "import socket,time\ns=socket.socket(2,2)\ns.bind(('0.0.0.0',6001))\nok=0\n\
         for i in range(1000):\n  try:\n    s.sendto(b'y'*100,('{b_ip}',6000)); ok+=1\n  except OSError: pass\n  time.sleep(0.02)\nprint('sent',ok)\n"
    );
    c.topo
        .spawn(&a_ns, "udp-counted", &["/usr/bin/python3", "-c", &counted]);

    // Four moves, 4 s apart: h1 → h2 → h1 → h2 → h1.
    let started = Instant::now();
    let mut moves: Vec<Move> = Vec::new();
    let mut last_rx = 0;
    for (k, to) in [1usize, 0, 1, 0].into_iter().enumerate() {
        std::thread::sleep(Duration::from_secs(3));
        // Counters before the move, as the source last reported them.
        let before = reported(&c, &a_id);
        assert!(
            before.1 >= last_rx,
            "counters went back: {before:?} < {last_rx}"
        );
        let m = if k == 2 {
            // This one as libvirt drives it: the destination's hook at the
            // beginning of the incoming migration, then the VM moves and
            // resumes, then the source's hook as libvirt stops it there.
            let said = c.libvirt_hook(to, "a", "migrate", "begin");
            assert!(said.contains("policy in place on h2"), "{said}");
            c.libvirt_hook(to, "a", "prepare", "begin");
            let id = c.migrations().last().unwrap()["id"].as_u64().unwrap();
            let pause = c.swap_nic("a", to);
            let record = c.wait_phase(id, "done", Duration::from_secs(10));
            // libvirt's Confirm stops QEMU at the source: `stopped end`, then
            // `release end`.
            c.libvirt_hook(1 - to, "a", "stopped", "end");
            c.libvirt_hook(1 - to, "a", "release", "end");
            Move {
                migration: id,
                pause,
                record,
            }
        } else {
            c.move_vm("a", to)
        };
        eprintln!(
            "move {k} to h{}: pause {:?}, record {}",
            to + 1,
            m.pause,
            m.record
        );
        assert_eq!(m.record["to"], format!("h{}", to + 1));
        assert_eq!(m.record["trigger"], "first_frame", "{}", m.record);
        // The port continues on the destination: its counters do not
        // restart (the destination's first report holds the source's).
        let host = format!("h{}", to + 1);
        let mut after = (String::new(), 0);
        let moved = wait_for(Duration::from_secs(8), || {
            after = reported(&c, &a_id);
            after.0 == host && after.1 > 0
        });
        assert!(moved, "no report of the port from {host}: {after:?}");
        assert!(
            after.1 >= before.1,
            "move {k}: the port's counters restarted ({} after, {} before)",
            after.1,
            before.1
        );
        last_rx = after.1;
        moves.push(m);
    }
    eprintln!("moves done after {:?}", started.elapsed());

    // Let the traffic end.
    for l in ["iperf3-c", "ping-b", "ping-c", "udp-denied", "udp-counted"] {
        let done = wait_for(Duration::from_secs(secs + 10), || !c.topo.running(l));
        assert!(done, "{l} did not finish:\n{}", c.topo.log(l));
    }
    println!("{}", c.ok(&["migrate", "list"]));

    // The TCP stream survived every move, within the port's limit at
    // every second (the limit holds on each destination from its first
    // frame).
    let ip: serde_json::Value = serde_json::from_str(&c.topo.log("iperf3-c")).expect("iperf3 JSON");
    assert!(ip.get("error").is_none(), "iperf3 failed: {}", ip["error"]);
    let rx = ip["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let secs_rx = ip["end"]["sum_received"]["seconds"].as_f64().unwrap_or(1.0);
    assert!(rx > 0.0, "iperf3 received nothing");
    let mbps = rx * 8.0 / secs_rx / 1e6;
    eprintln!("TCP across 4 moves: {mbps:.1} Mbit/s average");
    assert!(mbps > RATE * 0.5, "the stream stalled: {mbps:.1} Mbit/s");
    // (The first second counts what filled the sender's socket buffer, not
    // what crossed the port.)
    for i in ip["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .skip(1)
    {
        let bps = i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6;
        assert!(
            bps <= RATE * 1.2,
            "a second at {bps:.1} Mbit/s: over the limit of {RATE}"
        );
    }

    // Ping loss is the pauses' (and the switchovers' few ms), nothing more.
    let (sent, got) = parse_ping(&c.topo.log("ping-b"));
    let pauses: f64 = moves.iter().map(|m| m.pause.as_secs_f64()).sum();
    let blackouts: Vec<f64> = moves
        .iter()
        .filter_map(|m| m.record["blackout_ms"].as_f64())
        .collect();
    eprintln!(
        "ping every 10 ms: {sent} sent, {} lost; pauses {:.0} ms in all; blackouts {blackouts:?} ms",
        sent - got,
        pauses * 1e3
    );
    assert!(sent > 1000, "ping sent only {sent}");
    let allowed = (pauses * 100.0).ceil() as u32 + 3 * moves.len() as u32;
    assert!(
        sent - got <= allowed,
        "{} pings lost for {:.0} ms of pauses (allowed {allowed})",
        sent - got,
        pauses * 1e3
    );

    // Policy held before, during and after: the denied flow never got
    // through, VLAN 20 never saw a frame from a.
    assert_eq!(nft_count(&c, &b_ns, "inet t", "dport 7777"), 0);
    assert_eq!(nft_count(&c, &c_ns, "netdev t", "ether saddr"), 0);
    assert_eq!(parse_ping(&c.topo.log("ping-c")).1, 0);

    // Collectors see each flow once: the counted flow's records, from
    // whichever host the port was on, add up to what b received.
    let received = nft_count(&c, &b_ns, "inet t", "dport 6000");
    let sent_ok: u64 = c
        .topo
        .log("udp-counted")
        .trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .expect("the counted flow's sender prints what it sent");
    assert!(
        received >= sent_ok * 9 / 10,
        "{received} of {sent_ok} arrived"
    );
    // The VM's new place reached b's host through the data plane (its
    // announcement from the destination), ahead of the controller's update.
    let h3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.stats_file(2)).unwrap_or_default())
            .unwrap_or_default();
    let ahead = h3["mac"]["announced_moves"].as_u64().unwrap_or(0);
    eprintln!("h3 moved a's entry ahead of the controller {ahead} times");
    assert!(ahead >= 1, "h3's MAC counters: {}", h3["mac"]);
    for i in 0..3 {
        c.topo.stop(&Chassis::agent_label(i));
    }
    let (records, _) = nfcapd.finish(&mut c.topo);
    let port_no: u32 = a_id.trim_start_matches("veth").parse().unwrap();
    let flow: Vec<_> = records
        .iter()
        .filter(|r| r.proto == 17 && r.dst_port == 6000 && r.src == "10.30.0.1")
        .collect();
    let packets: u64 = flow.iter().map(|r| r.packets).sum();
    eprintln!(
        "counted flow: {sent_ok} sent, {received} received, {packets} in {} records",
        flow.len()
    );
    assert!(flow.iter().all(|r| r.input == port_no), "{flow:?}");
    assert_eq!(
        packets, received,
        "nfdump's total is what b received: {flow:?}"
    );
}

/// After an abort or a crash: no migration under way, the port on `host`
/// only (the other host has no TAP for it), and the VM reaches b.
fn consistent(c: &Chassis, host: usize, other: usize, what: &str) {
    let a_id = c.vm("a").3.clone();
    let open: Vec<serde_json::Value> = c
        .migrations()
        .into_iter()
        .filter(|m| m["phase"] != "done" && m["phase"] != "aborted")
        .collect();
    assert!(open.is_empty(), "{what}: migrations still open: {open:?}");
    let p = c.json(&["port", "show", &a_id]);
    assert_eq!(p["host"], format!("h{}", host + 1), "{what}: {p}");
    let (tap, ons) = (c.tap_vm("a").tap.clone(), c.hosts[other].clone());
    let gone = wait_for(Duration::from_secs(10), || {
        !c.topo
            .try_sh(&ons, &format!("ip link show {tap}"))
            .status
            .success()
    });
    assert!(gone, "{what}: h{} still has the port's TAP", other + 1);
    let reach = wait_for(Duration::from_secs(10), || c.ping("a", "b", 2).1 == 2);
    assert!(reach, "{what}: a does not reach b\n{}", c.topo.logs());
}

#[test]
fn aborts_and_crashes_at_every_phase_end_in_one_consistent_state() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = chassis();
    let a_id = c.vm("a").3.clone();
    let (h1, h2) = (Chassis::agent_label(0), Chassis::agent_label(1));
    assert_eq!(c.ping("a", "b", 2), (2, 2), "{}", c.topo.logs());
    let start = |c: &Chassis| -> u64 {
        let tap = c.tap_vm("a").tap.clone();
        let m = c.json(&[
            "migrate", "start", "--port", &a_id, "--to", "h2", "--tap", &tap,
        ]);
        m[0]["id"].as_u64().unwrap()
    };
    let abort = |c: &Chassis, id: u64, why: &str| {
        let m = c.json(&["migrate", "abort", "--id", &id.to_string(), "--reason", why]);
        assert_eq!(m[0]["phase"], "aborted", "{m}");
        assert_eq!(m[0]["abort_reason"], why);
    };

    // Abort while preparing (the destination's agent is frozen: it cannot
    // install the port).
    c.topo.signal(&h2, "STOP");
    let id = start(&c);
    assert_eq!(c.migration(id)["phase"], "preparing");
    abort(&c, id, "admin: preparing");
    c.topo.signal(&h2, "CONT");
    consistent(&c, 0, 1, "abort while preparing");

    // Abort while syncing (the port waits in standby on h2).
    let id = c.begin_move("a", 1);
    abort(&c, id, "admin: syncing");
    consistent(&c, 0, 1, "abort while syncing");

    // Abort while switching: the VMM said the VM resumed, the source (frozen)
    // has not stopped yet; when it wakes it stops, then forwards again.
    let id = c.begin_move("a", 1);
    c.topo.signal(&h1, "STOP");
    let m = c.json(&["migrate", "activate", "--port", &a_id]);
    assert_eq!(m[0]["phase"], "switching", "{m}");
    abort(&c, id, "admin: switching");
    c.topo.signal(&h1, "CONT");
    consistent(&c, 0, 1, "abort while switching");

    // Abort while activating: the source stopped and handed over, the
    // destination (frozen) was told to start. The source takes the port
    // back only once the destination has dropped it — never both active.
    let id = c.begin_move("a", 1);
    c.topo.signal(&h2, "STOP");
    c.ok(&["migrate", "activate", "--id", &id.to_string()]);
    c.wait_phase(id, "activating", Duration::from_secs(5));
    abort(&c, id, "admin: activating");
    assert_eq!(
        c.ping("a", "b", 2).1,
        0,
        "the source resumed before the destination let go"
    );
    c.topo.signal(&h2, "CONT");
    let back = wait_for(Duration::from_secs(10), || c.ping("a", "b", 1).1 == 1);
    assert!(
        back,
        "the source did not take the port back\n{}",
        c.topo.logs()
    );
    consistent(&c, 0, 1, "abort while activating");

    // A refused second migration and a bad destination change nothing.
    let id = c.begin_move("a", 1);
    let o = c.dvs(&["migrate", "start", "--port", &a_id, "--to", "h3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "port {a_id} is migrating already (migration {id} to h2, syncing)"
        )),
        "{err}"
    );
    abort(&c, id, "admin");
    consistent(&c, 0, 1, "after a refused second migration");

    // kill -9 of the controller while syncing: on restart the migration
    // is aborted, the destination cleaned, the source never stopped.
    let id = c.begin_move("a", 1);
    c.topo.kill9("controller");
    c.start_controller();
    c.wait_converged(Duration::from_secs(20));
    let m = c.migration(id);
    assert_eq!(m["phase"], "aborted", "{m}");
    assert!(
        m["abort_reason"]
            .as_str()
            .unwrap()
            .contains("controller restarted"),
        "{m}"
    );
    consistent(&c, 0, 1, "controller killed while syncing");

    // kill -9 of the controller while activating: the source has stopped
    // and handed over; the restarted controller finishes the activation
    // with the state it kept once the destination is back.
    let id = c.begin_move("a", 1);
    c.topo.signal(&h2, "STOP");
    c.ok(&["migrate", "activate", "--id", &id.to_string()]);
    c.wait_phase(id, "activating", Duration::from_secs(5));
    c.topo.kill9("controller");
    c.start_controller();
    c.topo.signal(&h2, "CONT");
    let m = c.wait_phase(id, "done", Duration::from_secs(20));
    assert!(m["snapshot_bytes"].as_u64().unwrap() > 0, "{m}");
    // The VMM said it resumed and the VM had not spoken: the destination
    // announced it.
    assert_eq!(m["trigger"], "vmm_resumed");
    assert!(
        wait_for(Duration::from_secs(5), || c
            .topo
            .log(&h2)
            .contains("announcing the VM (RARP)")),
        "no announcement:\n{}",
        c.topo.log(&h2)
    );
    c.wait_converged(Duration::from_secs(20));
    c.swap_nic("a", 1);
    consistent(&c, 1, 0, "controller killed while activating");
    // Back to h1 for the rest.
    let m = c.move_vm("a", 0);
    assert_eq!(m.record["phase"], "done");
    consistent(&c, 0, 1, "moved back");

    // kill -9 of the destination's agent while syncing: aborted, the
    // source never stops (not one ping lost), the restarted agent is clean.
    let id = c.begin_move("a", 1);
    c.topo.kill9(&h2);
    let m = c.wait_phase(id, "aborted", Duration::from_secs(20));
    assert!(
        m["abort_reason"]
            .as_str()
            .unwrap()
            .contains("destination host h2"),
        "{m}"
    );
    assert_eq!(c.ping("a", "b", 3), (3, 3));
    c.start_agent(1);
    c.wait_converged(Duration::from_secs(20));
    consistent(&c, 0, 1, "destination killed while syncing");

    // kill -9 of the destination's agent while activating: aborted, the
    // source forwards again.
    let id = c.begin_move("a", 1);
    c.topo.signal(&h2, "STOP");
    c.ok(&["migrate", "activate", "--id", &id.to_string()]);
    c.wait_phase(id, "activating", Duration::from_secs(5));
    c.topo.kill9(&h2);
    c.wait_phase(id, "aborted", Duration::from_secs(20));
    c.start_agent(1);
    c.wait_converged(Duration::from_secs(20));
    consistent(&c, 0, 1, "destination killed while activating");

    // kill -9 of the source's agent while syncing, and while switching:
    // aborted; the source's agent restarts from its state with the port
    // forwarding (its TAP is plugged in again, as a VMM would).
    for (phase, freeze) in [("syncing", false), ("switching", true)] {
        let id = c.begin_move("a", 1);
        if freeze {
            c.topo.signal(&h1, "STOP");
            c.ok(&["migrate", "activate", "--id", &id.to_string()]);
            c.wait_phase(id, "switching", Duration::from_secs(5));
        }
        c.topo.kill9(&h1);
        let m = c.wait_phase(id, "aborted", Duration::from_secs(20));
        assert!(
            m["abort_reason"]
                .as_str()
                .unwrap()
                .contains("source host h1"),
            "{m}"
        );
        c.start_agent(0);
        c.wait_converged(Duration::from_secs(20));
        c.replug("a");
        consistent(&c, 0, 1, &format!("source killed while {phase}"));
    }

    // The other phases of each crash.
    // The controller while preparing (the destination frozen holds it
    // there) and while switching (the source frozen): aborted on restart.
    for (phase, frozen) in [("preparing", &h2), ("switching", &h1)] {
        let id = if phase == "preparing" {
            c.topo.signal(frozen, "STOP");
            start(&c)
        } else {
            let id = c.begin_move("a", 1);
            c.topo.signal(frozen, "STOP");
            c.ok(&["migrate", "activate", "--id", &id.to_string()]);
            id
        };
        c.wait_phase(id, phase, Duration::from_secs(5));
        c.topo.kill9("controller");
        c.start_controller();
        c.topo.signal(frozen, "CONT");
        c.wait_converged(Duration::from_secs(20));
        assert_eq!(c.migration(id)["phase"], "aborted");
        consistent(&c, 0, 1, &format!("controller killed while {phase}"));
    }
    // The destination while preparing and while switching: aborted, the
    // source forwards.
    for phase in ["preparing", "switching"] {
        let id = if phase == "preparing" {
            c.topo.signal(&h2, "STOP");
            start(&c)
        } else {
            let id = c.begin_move("a", 1);
            c.topo.signal(&h1, "STOP");
            c.ok(&["migrate", "activate", "--id", &id.to_string()]);
            id
        };
        c.wait_phase(id, phase, Duration::from_secs(5));
        c.topo.kill9(&h2);
        c.wait_phase(id, "aborted", Duration::from_secs(20));
        c.topo.signal(&h1, "CONT");
        c.start_agent(1);
        c.wait_converged(Duration::from_secs(20));
        consistent(&c, 0, 1, &format!("destination killed while {phase}"));
    }
    // The source while preparing: aborted.
    c.topo.signal(&h2, "STOP");
    let id = start(&c);
    c.wait_phase(id, "preparing", Duration::from_secs(5));
    c.topo.kill9(&h1);
    c.wait_phase(id, "aborted", Duration::from_secs(20));
    c.topo.signal(&h2, "CONT");
    c.start_agent(0);
    c.wait_converged(Duration::from_secs(20));
    c.replug("a");
    consistent(&c, 0, 1, "source killed while preparing");
    // The source while activating: it had stopped and handed over, so the
    // migration finishes without it; the VM runs on h2.
    let id = c.begin_move("a", 1);
    c.topo.signal(&h2, "STOP");
    c.ok(&["migrate", "activate", "--id", &id.to_string()]);
    c.wait_phase(id, "activating", Duration::from_secs(5));
    c.topo.kill9(&h1);
    c.topo.signal(&h2, "CONT");
    c.wait_phase(id, "done", Duration::from_secs(20));
    c.swap_nic("a", 1);
    c.start_agent(0);
    c.wait_converged(Duration::from_secs(20));
    consistent(&c, 1, 0, "source killed while activating");
    println!("{}", c.ok(&["migrate", "list"]));
}

/// A DRS burst and a host evacuated at once: thirty-two VMs move
/// together in a chassis of four hosts, eight leaving each host (h1 → h2,
/// h2 → h3, h3 → h4, h4 → h2) — all thirty-two prepared and pre-copied
/// before any moves, then every NIC moved — and each arrives with its
/// port; then h1, empty, is drained and, once its agent is stopped,
/// removed.
#[test]
fn thirty_two_vms_move_at_once_eight_from_each_host_then_the_empty_one_is_drained_and_removed() {
    if !e2e_ready(TOOLS) {
        return;
    }
    const PER_HOST: usize = 8;
    const HOSTS: usize = 4;
    let to = |h: usize| if h == HOSTS - 1 { 1 } else { h + 1 };
    let mut c = Chassis::new(
        HOSTS,
        "kind: PortProfile\nname: vlan10\nvlan: { mode: access, id: 10 }\n",
        &[("peer", 2, "10.30.1.1/16", "vlan10")],
    );
    let vms: Vec<(String, usize)> = (0..HOSTS)
        .flat_map(|h| (1..=PER_HOST).map(move |i| (format!("e{}x{i}", h + 1), h)))
        .collect();
    for (n, (name, h)) in vms.iter().enumerate() {
        let mac = format!("02:00:00:bb:{:02x}:{:02x}", h + 1, n + 1);
        c.add_tap_vm(name, *h, &format!("10.30.0.{}/16", n + 1), "vlan10", &mac);
    }
    for (name, _) in &vms {
        assert_eq!(c.ping("peer", name, 1).1, 1, "{name} before");
    }
    let started = Instant::now();
    let ids: Vec<u64> = vms
        .iter()
        .map(|(name, h)| c.begin_move(name, to(*h)))
        .collect();
    // All thirty-two under way together.
    let syncing = c
        .migrations()
        .iter()
        .filter(|m| m["phase"] == "syncing")
        .count();
    assert_eq!(syncing, vms.len(), "{:?}", c.migrations());
    for (name, h) in &vms {
        c.swap_nic(name, to(*h));
    }
    let mut triggers = Vec::new();
    for id in &ids {
        let m = c.wait_phase(*id, "done", Duration::from_secs(30));
        assert!(m["first_frame_at_destination_ms"].is_number(), "{m}");
        triggers.push(m["trigger"].as_str().unwrap_or("-").to_string());
    }
    let total = started.elapsed();
    // (The VMs are idle but for the moves: a blackout would measure their
    // quiet, not the switch; the migration benchmark measures those.)
    eprintln!(
        "{} concurrent migrations, {PER_HOST} from each of {HOSTS} hosts: all done {:.0} ms after the first began; triggers {triggers:?}",
        vms.len(),
        total.as_secs_f64() * 1e3
    );
    for (name, _) in &vms {
        assert_eq!(c.ping("peer", name, 1).1, 1, "{name} after");
    }
    let ports = c.json(&["port", "list"]);
    let on = |host: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["host"] == host)
            .count()
    };
    assert_eq!(
        [on("h1"), on("h2"), on("h3"), on("h4")],
        [0, 2 * PER_HOST, PER_HOST + 1, PER_HOST],
        "{ports}"
    );
    // Evacuated: drain it, and once its agent is stopped, remove it.
    c.ok(&["host", "drain", "h1"]);
    let hosts = c.json(&["host", "list"]);
    assert!(
        hosts
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "h1" && h["draining"] == true),
        "{hosts}"
    );
    let refused = c.dvs(&["port", "bind", "veth1", "--host", "h1", "--tap", "x1"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("draining"));
    c.topo.stop(&Chassis::agent_label(0));
    assert!(wait_for(Duration::from_secs(10), || c
        .dvs(&["host", "remove", "h1"])
        .status
        .success()));
    let hosts = c.json(&["host", "list"]);
    assert!(
        hosts.as_array().unwrap().iter().all(|h| h["name"] != "h1"),
        "{hosts}"
    );
}

/// What VM `a` runs for [`the_destination_forwards_before_the_controller_hears_of_it`]:
/// a UDP conversation from port 40001 with `b`'s port 9, opened now, and a
/// port (40003) it talks to no one from; what arrives on either is printed.
const LISTENER: &str = r#"
import select, socket
talk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); talk.bind(("", 40001))
quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); quiet.bind(("", 40003))
talk.sendto(b"hi", ("10.30.0.2", 9))
print("sent", flush=True)
while True:
    ready, _, _ = select.select([talk, quiet], [], [], 60)
    if not ready:
        break
    for s in ready:
        data, _ = s.recvfrom(100)
        print("got", s.getsockname()[1], data.decode(), flush=True)
"#;

/// `b` answers `a`'s conversation and tries one `a` never opened.
const ANSWER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", 9))
s.sendto(b"reply", ("10.30.0.1", 40001))
s.sendto(b"unasked", ("10.30.0.1", 40003))
"#;

/// Host `i`'s switchover counter `name` (its stats file).
fn switchover(c: &Chassis, i: usize, name: &str) -> u64 {
    let text = std::fs::read_to_string(c.stats_file(i)).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["switchover"][name].as_u64().unwrap_or(0)
}

/// The destination forwards the moment the VM runs there, from the
/// pre-copy, without the controller: with the controller frozen (it hears
/// nothing), the VM reaches its peer from h2 at once. A reply on a
/// connection the VM opened after the pre-copy waits for the source's last
/// state and is admitted when it lands; one of no connection is refused.
/// Then the controller dies after the destination started unheard (the
/// restarted one finishes the migration), and the source dies before its
/// handover (the destination keeps the pre-copy's state, the migration
/// finishes).
#[test]
fn the_destination_forwards_before_the_controller_hears_of_it() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = chassis();
    assert_eq!(c.ping("a", "b", 2), (2, 2), "{}", c.topo.logs());
    let (a_ns, b_ns) = (c.vm("a").1.clone(), c.vm("b").1.clone());
    let h1 = Chassis::agent_label(0);
    let pre_copied = |c: &Chassis, id: u64| {
        let ok = wait_for(Duration::from_secs(10), || {
            c.migration(id)["base_snapshot_bytes"].as_u64().unwrap_or(0) > 0
        });
        assert!(ok, "no pre-copy: {}", c.migration(id));
    };

    // Frames only the source's last state admits wait for it.
    let id = c.begin_move("a", 1);
    pre_copied(&c, id);
    c.topo
        .spawn(&a_ns, "listener", &["/usr/bin/python3", "-c", LISTENER]);
    assert!(wait_for(Duration::from_secs(5), || c
        .topo
        .log("listener")
        .contains("sent")));
    c.topo.signal("controller", "STOP");
    c.swap_nic("a", 1);
    let (_, replies) = c.ping("a", "b", 3);
    assert!(
        replies >= 2,
        "a does not reach b from h2 while the controller is frozen: {replies}/3\n{}",
        c.topo.logs()
    );
    c.topo.sh(&b_ns, &format!("/usr/bin/python3 -c '{ANSWER}'"));
    std::thread::sleep(Duration::from_millis(200));
    let log = c.topo.log("listener");
    assert!(
        !log.contains("got"),
        "admitted before the state came: {log}"
    );
    c.topo.signal("controller", "CONT");
    let m = c.wait_phase(id, "done", Duration::from_secs(20));
    assert!(m["destination_started_ms"].is_number(), "{m}");
    assert!(
        wait_for(Duration::from_secs(5), || c
            .topo
            .log("listener")
            .contains("got 40001 reply")),
        "the held reply was not admitted: {}\n{}",
        c.topo.log("listener"),
        c.topo.logs()
    );
    assert!(
        wait_for(Duration::from_secs(5), || switchover(&c, 1, "refused") >= 1),
        "nothing refused"
    );
    assert!(!c.topo.log("listener").contains("unasked"));
    assert!(switchover(&c, 1, "held") >= 2 && switchover(&c, 1, "admitted") >= 1);
    consistent(&c, 1, 0, "held frames");

    // The controller dies after the destination started, before it heard.
    c.move_vm("a", 0);
    consistent(&c, 0, 1, "moved back");
    let id = c.begin_move("a", 1);
    pre_copied(&c, id);
    c.topo.signal("controller", "STOP");
    c.swap_nic("a", 1);
    assert!(c.ping("a", "b", 3).1 >= 2, "{}", c.topo.logs());
    c.topo.kill9("controller");
    c.start_controller();
    let m = c.wait_phase(id, "done", Duration::from_secs(30));
    assert!(m["destination_started_ms"].is_number(), "{m}");
    c.wait_converged(Duration::from_secs(20));
    consistent(&c, 1, 0, "controller killed after the destination started");

    // The source dies before its handover.
    c.move_vm("a", 0);
    consistent(&c, 0, 1, "moved back again");
    let id = c.begin_move("a", 1);
    pre_copied(&c, id);
    c.topo.signal(&h1, "STOP");
    c.swap_nic("a", 1);
    assert!(c.ping("a", "b", 3).1 >= 2, "{}", c.topo.logs());
    c.wait_phase(id, "switching", Duration::from_secs(5));
    c.topo.kill9(&h1);
    let m = c.wait_phase(id, "done", Duration::from_secs(20));
    assert_eq!(m["snapshot_bytes"], 0, "no handover: {m}");
    c.start_agent(0);
    c.wait_converged(Duration::from_secs(20));
    consistent(&c, 1, 0, "source killed after the destination started");
}

/// A guarded VM (IP source guard, no static binding) whose address came
/// from DHCP — dnsmasq on a trusted port of a third host, the VM's own
/// udhcpc — live-migrates: the snooped binding moves with its port, so
/// the VM still uses its address at the destination, and its new host
/// reports the binding.
#[test]
fn a_dhcp_binding_moves_with_its_vm() {
    if !e2e_ready(&["ip", "ping", "/usr/bin/python3", "dnsmasq", "/bin/busybox"]) {
        return;
    }
    let mut c = Chassis::new(
        3,
        "kind: PortProfile\nname: server\nvlan: { mode: access, id: 10 }\ndhcp_snooping: { trusted: true }\n---\n\
         kind: PortProfile\nname: guarded\nvlan: { mode: access, id: 10 }\nsecurity: { ip_source_guard: true }\n",
        &[("srv", 2, "10.61.0.1/24", "server")],
    );
    const MAC: &str = "02:00:00:cc:00:01";
    c.add_tap_vm("g", 0, "10.61.0.55/24", "guarded", MAC);
    let ns_srv = c.vm("srv").1.clone();
    let (ns_g, g) = (c.vm("g").1.clone(), c.vm("g").3.clone());
    dvs_tests::dhcp::dnsmasq(
        &mut c.topo,
        &ns_srv,
        "dnsmasq",
        "10.61.0.50,10.61.0.60,255.255.255.0,600",
        &[&format!("--dhcp-host={MAC},10.61.0.55")],
    );
    c.topo.sh(&ns_g, "ip -4 addr flush dev eth0");
    assert_eq!(dvs_tests::dhcp::lease(&c.topo, &ns_g, ""), "10.61.0.55");
    let ping = |c: &Chassis| {
        let o = c.topo.try_sh(&ns_g, "ping -c 3 -i 0.2 -W 1 10.61.0.1");
        parse_ping(&String::from_utf8_lossy(&o.stdout)).1
    };
    assert_eq!(ping(&c), 3, "on h1, from its lease");
    let id = c.begin_move("g", 1);
    c.swap_nic("g", 1);
    c.wait_phase(id, "done", Duration::from_secs(20));
    assert_eq!(ping(&c), 3, "on h2, the binding came along");
    let reported = || {
        c.json(&["show", "ip", "bindings"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .any(|r| r["port"] == g.as_str() && r["host"] == "h2" && r["source"] == "dhcp")
    };
    assert!(
        wait_for(Duration::from_secs(5), reported),
        "{}",
        c.ok(&["show", "ip", "bindings"])
    );
}
