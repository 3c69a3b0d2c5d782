//! NetFlow v5, v9 and IPFIX from real agents to real collectors: VMs on two
//! hosts send known traffic (counted pings, UDP of known size, a TCP
//! transfer whose segments the VMs' kernels count), nfcapd stores what
//! dvs exports, nfdump must show every flow with exact packets and bytes on
//! the right interfaces and VLAN and no sequence failure, and tshark must
//! decode every export packet without a malformed mark.

#![allow(clippy::unwrap_used)] // a test fails on the spot, saying where

use std::collections::BTreeMap;
use std::time::Duration;

use dvs_tests::collector::{sequence_failures, Capture, NfRecord, Nfcapd};
use dvs_tests::netns::{e2e_ready, underlay_ip, wait_for, Fabric, VmSpec, CORE_IP};

const TOOLS: &[&str] = &[
    "ip",
    "ss",
    "sysctl",
    "/bin/kill",
    "ping",
    "nfcapd",
    "nfdump",
    "tshark",
    "/usr/bin/python3",
];

const COLLECTOR: u16 = 9995;
/// Nobody listens here: a collector that is down.
const DOWN: u16 = 9996;

fn vm(host: usize, name: &'static str, addr: &'static str) -> VmSpec {
    VmSpec {
        host,
        name,
        vlan: "{ mode: access, id: 10 }",
        addr: Some(addr),
        veth: false,
        acl: None,
        qos: None,
        security: None,
        netflow: Some("{ monitor: m }"),
    }
}

/// Sends UDP datagrams: argv = dst_ip dst_port src_port count size gap_s.
const UDP_SEND: &str = r#"
import socket, sys, time
ip, dport, sport, n, size, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
for _ in range(n):
    s.sendto(b"x" * size, (ip, dport))
    time.sleep(gap)
"#;

/// What a socket's kernel counted (struct tcp_info): segments out and
/// in (retransmissions included; a TSO frame in counts once), payload bytes
/// sent (retransmissions included) and retransmitted.
const TCP_INFO: &str = r#"
import socket, struct
def tcp_info(c):
    i = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    segs_out, segs_in = struct.unpack_from("II", i, 136)
    bytes_sent, bytes_retrans = struct.unpack_from("QQ", i, 200)
    return "%d %d %d %d" % (segs_out, segs_in, bytes_sent, bytes_retrans)
"#;

/// Receives UDP on 7000 and 7001, and TCP on 5001: reads to the end,
/// closes its side, and once the peer acknowledged that, writes its
/// socket's counts to argv[1].
const SINK: &str = r#"
import socket, sys, threading, time
def udp(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", p))
    while True: s.recv(65536)
for p in (7000, 7001):
    threading.Thread(target=udp, args=(p,), daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 5001)); t.listen(4)
while True:
    c, _ = t.accept()
    while c.recv(1 << 20): pass
    c.shutdown(socket.SHUT_WR); time.sleep(0.5)
    open(sys.argv[1], "w").write(tcp_info(c)); c.close()
"#;

/// Sends argv[3] bytes over TCP to argv[1]:argv[2] from port 45000, then
/// prints its socket's counts once both sides closed.
const TCP_SEND: &str = r#"
import socket, sys, time
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("0.0.0.0", 45000)); c.connect((sys.argv[1], int(sys.argv[2])))
c.sendall(b"y" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
time.sleep(0.5)
print(tcp_info(c)); c.close()
"#;

/// Counts of one TCP socket (see [`TCP_INFO`]).
#[derive(Debug, Clone, Copy)]
struct TcpCounts {
    segs_out: u64,
    segs_in: u64,
    bytes_sent: u64,
    bytes_retrans: u64,
}

fn tcp_counts(text: &str) -> TcpCounts {
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect();
    assert_eq!(v.len(), 4, "tcp_info: {text}");
    TcpCounts {
        segs_out: v[0],
        segs_in: v[1],
        bytes_sent: v[2],
        bytes_retrans: v[3],
    }
}

/// Key: (proto, src, src port, dst, dst port, in, out) → (records, packets, bytes, VLANs).
type Flows = BTreeMap<(u8, String, u16, String, u16, u32, u32), (u64, u64, u64, Vec<u16>)>;

fn by_flow(records: &[NfRecord]) -> Flows {
    let mut m = Flows::new();
    for r in records {
        let e = m
            .entry((
                r.proto,
                r.src.clone(),
                r.src_port,
                r.dst.clone(),
                r.dst_port,
                r.input,
                r.output,
            ))
            .or_default();
        e.0 += 1;
        e.1 += r.packets;
        e.2 += r.bytes;
        if !e.3.contains(&r.vlan) {
            e.3.push(r.vlan);
        }
    }
    m
}

/// VMs `a` (host 1) and `b` (host 2) recording their flows with the
/// monitors of `monitors`, nfcapd and a tshark capture in the core.
fn two_hosts(monitors: &str) -> (Fabric, (Nfcapd, Capture)) {
    Fabric::new_with(
        2,
        &[vm(0, "a", "10.10.0.1/24"), vm(1, "b", "10.10.0.2/24")],
        &[],
        monitors,
        |topo, core| {
            let n = Nfcapd::start(topo, core, CORE_IP, COLLECTOR);
            let c = Capture::start(topo, core, "br0", COLLECTOR, &underlay_ip(0));
            (n, c)
        },
    )
}

fn exports_to_nfdump(version: &str) {
    if !e2e_ready(TOOLS) {
        return;
    }
    let v5 = version == "v5";
    let monitors = format!(
        "chassis_id: 5\nmonitors:\n  - {{ name: m, version: {version}, collectors: [\"{CORE_IP}:{COLLECTOR}\", \"{CORE_IP}:{DOWN}\"], active_timeout_s: 2, inactive_timeout_s: 30 }}\n"
    );
    let (mut f, (nfcapd, capture)) = two_hosts(&monitors);
    let (a, b) = (f.vm("a").ns.clone(), f.vm("b").ns.clone());
    for (name, text) in [
        ("udp_send.py", UDP_SEND.to_string()),
        ("sink.py", format!("{TCP_INFO}{SINK}")),
        ("tcp_send.py", format!("{TCP_INFO}{TCP_SEND}")),
    ] {
        std::fs::write(f.topo.dir.join(name), text).expect("write script");
    }
    let script = |n: &str| f.topo.dir.join(n).to_string_lossy().into_owned();
    let (udp_send, sink, tcp_send) = (
        script("udp_send.py"),
        script("sink.py"),
        script("tcp_send.py"),
    );
    let sink_out = f.topo.dir.join("sink.out").to_string_lossy().into_owned();
    f.topo
        .spawn(&b, "sink", &["/usr/bin/python3", &sink, &sink_out]);
    assert!(wait_for(Duration::from_secs(5), || f
        .topo
        .sh(&b, "ss -Hltn")
        .contains(":5001")));

    // 7 pings of 100 bytes: 7 × 128 bytes of IP each way.
    let (sent, got) = {
        let o = f.topo.try_sh(&a, "ping -c 7 -i 0.2 -s 100 -W 1 10.10.0.2");
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(&o.stdout))
    };
    assert_eq!((sent, got), (7, 7), "{}", f.topo.logs());
    // 40 UDP datagrams of 1000 bytes: 40 × 1028 bytes of IP.
    f.topo.sh(
        &a,
        &format!("/usr/bin/python3 {udp_send} 10.10.0.2 7000 6000 40 1000 0.005"),
    );
    // A TCP transfer of 1 MB; the VMs' kernels count the segments.
    let tcp_a = tcp_counts(&f.topo.sh(
        &a,
        &format!("/usr/bin/python3 {tcp_send} 10.10.0.2 5001 1000000"),
    ));
    assert!(wait_for(Duration::from_secs(5), || std::fs::metadata(
        &sink_out
    )
    .is_ok_and(|m| m.len() > 0)));
    let tcp_b = tcp_counts(&std::fs::read_to_string(&sink_out).expect("sink's counts"));
    eprintln!("TCP sender {tcp_a:?}, receiver {tcp_b:?}");
    // A long flow: 50 datagrams of 200 bytes over 5 s, across active timeouts of 2 s.
    f.topo.sh(
        &a,
        &format!("/usr/bin/python3 {udp_send} 10.10.0.2 7001 6001 50 200 0.1"),
    );

    // The agents stop: their open records are exported at once.
    for i in 0..2 {
        let label = f.hosts[i].label.clone();
        let st = f.topo.stop(&label);
        assert!(
            st.is_some_and(|s| s.success()),
            "agent {i}: {st:?}\n{}",
            f.topo.logs()
        );
    }
    // The collector that is down cost failed sends, counted; nothing blocked.
    for i in 0..2 {
        let s = f.stats(i);
        let m = &s["netflow"][0];
        assert_eq!(m["name"], "m", "{s}");
        assert!(m["export"]["records"].as_u64().unwrap() > 0, "{m}");
        assert!(m["export"]["send_errors"].as_u64().unwrap() > 0, "{m}");
        assert!(
            m["collectors"][1]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused")),
            "{m}"
        );
        assert_eq!(m["flows"]["evicted"], 0, "{m}");
    }
    let decoded = capture.finish(&mut f.topo);
    let (records, exporters) = nfcapd.finish(&mut f.topo);
    eprintln!("{decoded:?}\n{exporters}");
    let flows = by_flow(&records);
    for (k, v) in &flows {
        eprintln!("{k:?} -> {v:?}");
    }

    // tshark decodes every export packet, none malformed.
    assert!(decoded.packets >= 2, "{decoded:?}");
    assert_eq!(decoded.cflow, decoded.packets, "{decoded:?}");
    assert_eq!(decoded.malformed, 0, "{decoded:?}");
    assert!(decoded.problems.is_empty(), "{decoded:?}");
    // nfdump saw both exporters with no sequence failure.
    assert_eq!(sequence_failures(&exporters), Some(0), "{exporters}");

    let vlan = if v5 { 0 } else { 10 };
    let (ip_a, ip_b) = ("10.10.0.1".to_string(), "10.10.0.2".to_string());
    // (proto, src, sport, dst, dport) → expected (packets, bytes) on a's port
    // leaving the VM (in = 1) and on b's port entering it (out = 2).
    let one_way = |proto: u8, sport: u16, dport: u16, pkts: u64, bytes: u64| {
        for (i, o) in [(1, 0), (0, 2)] {
            let key = (proto, ip_a.clone(), sport, ip_b.clone(), dport, i, o);
            let got = flows
                .get(&key)
                .unwrap_or_else(|| panic!("no record of {key:?}"));
            assert_eq!((got.1, got.2), (pkts, bytes), "{key:?}: {got:?}");
            assert_eq!(got.3, vec![vlan], "{key:?}");
        }
    };
    one_way(1, 0, 8 << 8, 7, 7 * 128);
    one_way(17, 6000, 7000, 40, 40 * 1028);
    one_way(17, 6001, 7001, 50, 50 * 228);
    // The long flow came in several records, every active timeout.
    let long = &flows[&(17, ip_a.clone(), 6001, ip_b.clone(), 7001, 1, 0)];
    assert!(long.0 >= 2, "the 5 s flow was exported once: {long:?}");
    // Replies: echo replies from b.
    let reply = &flows[&(1, ip_b.clone(), 0, ip_a.clone(), 0, 2, 0)];
    assert_eq!((reply.1, reply.2), (7, 7 * 128));
    // TCP, counted against the sockets' own counts: segments (a TSO frame
    // counts as the segments it becomes) and IP bytes — headers are
    // 20 + 40 bytes on SYN and SYN-ACK, 20 + 32 (timestamps) on every other
    // segment while nothing is lost (losses add SACK options).
    let tcp = |i: u32, o: u32, from_a: bool| {
        let key = if from_a {
            (6, ip_a.clone(), 45000, ip_b.clone(), 5001, i, o)
        } else {
            (6, ip_b.clone(), 5001, ip_a.clone(), 45000, i, o)
        };
        flows
            .get(&key)
            .unwrap_or_else(|| panic!("no record of {key:?}"))
            .clone()
    };
    let hdrs = |segs: u64| 60 + (segs - 1) * 52;
    let lossless = tcp_a.bytes_retrans == 0;
    // What a sent, at a's port.
    let got = tcp(1, 0, true);
    assert_eq!(got.1, tcp_a.segs_out, "TCP a→b packets leaving a: {got:?}");
    if lossless {
        assert_eq!(got.2, tcp_a.bytes_sent + hdrs(tcp_a.segs_out), "{got:?}");
    }
    // What reached b, at b's port: all of it when nothing was lost (b's
    // kernel cannot say: it counts a TSO frame from its NIC as one).
    let got = tcp(0, 2, true);
    if lossless {
        assert_eq!(got.1, tcp_a.segs_out, "TCP a→b packets reaching b: {got:?}");
        assert_eq!(got.2, 1_000_000 + hdrs(tcp_a.segs_out), "{got:?}");
    } else {
        assert!(got.1 <= tcp_a.segs_out, "{got:?}");
    }
    // And the ACKs back; b's socket does not count the SYN-ACK, which its
    // listening socket sent.
    let got = tcp(2, 0, false);
    assert_eq!(
        got.1,
        tcp_b.segs_out + 1,
        "TCP b→a packets leaving b: {got:?}"
    );
    let got_a = tcp(0, 1, false);
    assert_eq!(
        got_a.1, tcp_a.segs_in,
        "TCP b→a packets reaching a: {got_a:?}"
    );
    if lossless {
        assert_eq!(got.2, hdrs(tcp_b.segs_out + 1), "{got:?}");
        assert_eq!(got_a.2, hdrs(tcp_a.segs_in), "{got_a:?}");
    }
}

#[test]
fn netflow_v5_reaches_nfdump_with_exact_counts() {
    exports_to_nfdump("v5");
}

#[test]
fn netflow_v9_reaches_nfdump_with_exact_counts() {
    exports_to_nfdump("v9");
}

#[test]
fn ipfix_reaches_nfdump_with_exact_counts() {
    exports_to_nfdump("ipfix");
}

/// An export that lasts several template refreshes (templates and the
/// options record every second, records every second): nfdump and
/// tshark's sequence analysis both see every sequence number they expect.
fn sequence_holds_over_template_refreshes(version: &str) {
    if !e2e_ready(TOOLS) {
        return;
    }
    let monitors = format!(
        "monitors:\n  - {{ name: m, version: {version}, collectors: [\"{CORE_IP}:{COLLECTOR}\"], active_timeout_s: 1, inactive_timeout_s: 1, template_refresh_s: 1 }}\n"
    );
    let (mut f, (nfcapd, capture)) = two_hosts(&monitors);
    let a = f.vm("a").ns.clone();
    std::fs::write(f.topo.dir.join("udp_send.py"), UDP_SEND).expect("write script");
    let send = f
        .topo
        .dir
        .join("udp_send.py")
        .to_string_lossy()
        .into_owned();
    // 6 s of two flows (and their replies' absence: UDP one way).
    f.topo.sh(
        &a,
        &format!(
            "/usr/bin/python3 {send} 10.10.0.2 7000 6000 60 100 0.1 & \
             /usr/bin/python3 {send} 10.10.0.2 7001 6001 60 100 0.1; wait"
        ),
    );
    let templates: Vec<u64> = (0..2)
        .map(|i| {
            f.stats(i)["netflow"][0]["export"]["template_messages"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    for i in 0..2 {
        let label = f.hosts[i].label.clone();
        f.topo.stop(&label);
    }
    let decoded = capture.finish(&mut f.topo);
    let (records, exporters) = nfcapd.finish(&mut f.topo);
    eprintln!("{version}: template messages {templates:?}; {decoded:?}\n{exporters}");
    assert!(
        templates[0] >= 4,
        "fewer than 3 template refreshes: {templates:?}"
    );
    assert_eq!(sequence_failures(&exporters), Some(0), "{exporters}");
    assert!(decoded.problems.is_empty(), "{decoded:?}");
    assert_eq!(decoded.malformed, 0, "{decoded:?}");
    let sent: u64 = records
        .iter()
        .filter(|r| r.proto == 17 && r.input == 1)
        .map(|r| r.packets)
        .sum();
    assert_eq!(sent, 120, "{records:?}");
}

#[test]
fn netflow_v9_sequence_holds_over_template_refreshes() {
    sequence_holds_over_template_refreshes("v9");
}

#[test]
fn ipfix_sequence_holds_over_template_refreshes() {
    sequence_holds_over_template_refreshes("ipfix");
}
