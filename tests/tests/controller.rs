//! The chassis on real kernels: `dvs controller` and a `dvs agent` per host
//! under it, driven through the `dvs` command line. A profile edit (an ACL
//! rule, a VLAN, a rate) reaches every bound port on every host and takes
//! effect on real traffic; traffic keeps flowing when the controller dies;
//! an agent restarted with the controller away forwards again from its saved
//! state; a restarted controller keeps every ID, and its agents reconnect
//! without flapping a port; a port bound to an interface that is not there
//! waits for it — across an agent restart, and whatever kind of device
//! comes under its name. IP source guard in a shared profile (the
//! DESIGN's) allows each port's own bindings (`dvs port set --ip`), and
//! what a real DHCP server (dnsmasq, on a trusted port) leased a real
//! client (busybox's udhcpc; for DHCPv6, ISC's dhclient); a rogue server
//! (busybox's udhcpd) is dropped.

#![allow(clippy::unwrap_used)] // a test fails on the spot, saying where

use std::time::Duration;

use dvs_tests::chassis::Chassis;
use dvs_tests::dhcp;
use dvs_tests::netns::{e2e_ready, wait_for};

const TOOLS: &[&str] = &["ip", "ss", "sysctl", "ping", "iperf3", "/usr/bin/python3"];

fn profiles(icmp: &str, web_vlan: u16, rate: &str) -> String {
    format!(
        "kind: PortProfile\nname: base\nvlan: {{ mode: access, id: {web_vlan} }}\n---\n\
         kind: PortProfile\nname: web\ninherit: base\n{rate}acl:\n  in:\n    - {{ action: {icmp}, proto: icmp }}\n    - {{ action: permit }}\n---\n\
         kind: PortProfile\nname: db\nvlan: {{ mode: access, id: 20 }}\n"
    )
}

/// Received Mbit/s of a TCP stream from VM `from` to VM `to`.
fn tcp_mbps(c: &mut Chassis, from: &str, to: &str) -> f64 {
    let (to_ns, ip) = (c.vm(to).1.clone(), c.vm(to).2.clone());
    let from_ns = c.vm(from).1.clone();
    c.topo
        .spawn(&to_ns, "iperf3-s", &["iperf3", "-s", "-p", "5201", "-1"]);
    assert!(wait_for(Duration::from_secs(5), || c
        .topo
        .sh(&to_ns, "ss -Hltn")
        .contains("5201")));
    let o = c
        .topo
        .sh(&from_ns, &format!("iperf3 -c {ip} -p 5201 -t 3 -J"));
    c.topo.stop("iperf3-s");
    let v: serde_json::Value = serde_json::from_str(&o).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

#[test]
fn a_profile_edit_reaches_every_host_and_takes_effect() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = Chassis::new(
        2,
        &profiles("permit", 10, ""),
        &[
            ("a", 0, "10.10.0.1/24", "web"),
            ("b", 1, "10.10.0.2/24", "web"),
            ("d", 1, "10.10.0.4/24", "db"),
        ],
    );
    assert_eq!(c.ping("a", "b", 3), (3, 3), "{}", c.topo.logs());
    assert_eq!(c.ping("a", "d", 2).1, 0, "VLAN 10 and VLAN 20 are apart");
    // The IDs the admin got are the chassis's interfaces.
    let ports = c.json(&["port", "list"]);
    let ids: Vec<&str> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["veth1", "veth2", "veth3"]);

    // An ACL rule: ICMP into the VMs is denied on both hosts.
    let out = c.apply(&profiles("deny", 10, ""));
    assert!(out.contains("profile web: version 1 → 2 (acl)"), "{out}");
    assert_eq!(c.ping("a", "b", 3).1, 0, "the deny holds on every host");
    // The drops show in the chassis view once the host reports.
    assert!(wait_for(Duration::from_secs(6), || {
        let p = c.json(&["port", "show", "veth2"]);
        p["stats"]["counters"]["tx_drops"]["acl_deny"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    }));

    // Prometheus: the controller shows every host converged and the drops
    // its hosts reported; each agent shows the revision it runs.
    let m = c.metrics(None);
    assert!(
        m.contains("dvs_host_connected{host=\"h1\",module=\"3\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("dvs_port_tx_drops_total{host=\"h2\",port=\"veth2\",reason=\"acl_deny\"}"),
        "{m}"
    );
    let rev = c.json(&["show", "chassis"])["revision"].as_u64().unwrap();
    let a1 = c.metrics(Some(0));
    assert!(
        a1.contains(&format!("dvs_agent_revision{{host=\"h1\"}} {rev}")),
        "{a1}"
    );

    // A VLAN: `base` moves to VLAN 20, and `web` with it.
    c.apply(&profiles("permit", 20, ""));
    // (The VMs' neighbour entries for d failed while it was apart: the
    // first ARP may take a retry.)
    assert!(
        wait_for(Duration::from_secs(5), || c.ping("a", "d", 1) == (1, 1)),
        "web is on VLAN 20 now"
    );
    assert_eq!(c.ping("a", "d", 3), (3, 3));
    assert_eq!(c.ping("a", "b", 2), (2, 2));
    let a = c.json(&["port", "show", "veth1"]);
    assert_eq!(a["vlan"], "access 20");
    assert_eq!(a["state"], "up");

    // A rate: what a web VM sends is shaped to 20 Mbit/s.
    let before = tcp_mbps(&mut c, "a", "b");
    c.apply(&profiles(
        "permit",
        20,
        "qos: { out: { avg_mbps: 20, shape: true } }\n",
    ));
    let after = tcp_mbps(&mut c, "a", "b");
    eprintln!("TCP a→b: {before:.0} Mbit/s, then {after:.1} Mbit/s under a 20 Mbit/s rate");
    assert!(before > 60.0, "{before}");
    assert!((10.0..=24.0).contains(&after), "{after}");
}

#[test]
fn the_chassis_survives_its_controller_and_agent_restarts() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = Chassis::new(
        2,
        &profiles("permit", 10, ""),
        &[
            ("a", 0, "10.10.0.1/24", "web"),
            ("b", 1, "10.10.0.2/24", "web"),
        ],
    );
    assert_eq!(c.ping("a", "b", 3), (3, 3), "{}", c.topo.logs());
    let before = c.json(&["port", "list"]);

    // The controller crashes: traffic keeps flowing.
    c.topo.kill9("controller");
    assert_eq!(c.ping("a", "b", 5), (5, 5), "headless");

    // An agent restarts while the controller is away: it runs its ports
    // from its saved state.
    let label = Chassis::agent_label(1);
    c.topo.stop(&label);
    c.start_agent(1);
    assert!(
        wait_for(Duration::from_secs(10), || c.ping("a", "b", 1) == (1, 1)),
        "h2 did not forward from its saved state:\n{}",
        c.topo.log(&label)
    );
    let rx_before = stats_rx(&c, 0, "veth1");

    // The controller comes back on the same store: same IDs, same state;
    // the agents reconnect and nothing is re-plumbed.
    c.start_controller();
    c.wait_converged(Duration::from_secs(20));
    let after = c.json(&["port", "list"]);
    let key = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].clone(),
                    p["vm"].clone(),
                    p["mac"].clone(),
                    p["host"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&before), key(&after));
    let hosts = c.json(&["host", "list"]);
    let modules: Vec<u64> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["module"].as_u64().unwrap())
        .collect();
    assert_eq!(modules, vec![3, 4]);
    assert_eq!(c.ping("a", "b", 3), (3, 3));
    // Counters went on: the port was not removed and re-added.
    assert!(stats_rx(&c, 0, "veth1") >= rx_before);
    assert!(
        !c.topo
            .log(&Chassis::agent_label(0))
            .contains("port removed"),
        "{}",
        c.topo.log(&Chassis::agent_label(0))
    );
}

#[test]
fn with_mutual_tls_only_an_agent_holding_its_hosts_certificate_joins() {
    if !e2e_ready(&[TOOLS, &["openssl"]].concat()) {
        return;
    }
    let mut c = Chassis::new_tls(
        2,
        &profiles("permit", 10, ""),
        &[
            ("a", 0, "10.10.0.1/24", "web"),
            ("b", 1, "10.10.0.2/24", "web"),
        ],
    );
    assert_eq!(c.ping("a", "b", 3), (3, 3), "{}", c.topo.logs());
    // An agent on h1 that claims to be h2 (with h1's certificate) is refused.
    c.start_agent_as(0, "impostor", "h2", "h1", "127.0.0.1");
    wait_log(
        &c,
        "impostor",
        "the client certificate does not name host h2",
        10,
    );
    c.topo.stop("impostor");
    assert!(c.converged(), "the real h2 is untouched");
    // Admin calls need the CA to trust the controller.
    let bin = dvs_tests::netns::dvs_bin();
    let o = c.topo.try_sh(
        &c.core,
        &format!("{} --controller {} port list", bin.display(), c.url()),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot reach the controller"),
        "{err}"
    );
}

/// A port's rx_frames in host `i`'s stats file.
fn stats_rx(c: &Chassis, i: usize, id: &str) -> u64 {
    let text = std::fs::read_to_string(c.stats_file(i)).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == id))
        .and_then(|p| p["counters"]["rx_frames"].as_u64())
        .unwrap_or(0)
}

/// The state of port `id` as `dvs port show` reports it: its attachment.
fn attachment(c: &Chassis, id: &str) -> String {
    c.json(&["port", "show", id])["attachment"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Wait until port `id`'s attachment reads `want`.
fn wait_attachment(c: &Chassis, id: &str, want: &str) {
    let ok = wait_for(Duration::from_secs(10), || attachment(c, id) == want);
    assert!(ok, "port {id}: `{}`, not `{want}`", attachment(c, id));
}

/// A veth `dev` in host namespace `host` whose other end is the NIC of VM
/// namespace `vm` (MAC 02:00:00:00:0e:01, 10.10.0.9/24).
fn plug_veth(c: &Chassis, host: &str, dev: &str, vm: &str) {
    c.topo.sh(
        "",
        &format!("ip link add {dev} netns {host} type veth peer name eth0 netns {vm}"),
    );
    c.topo.sh(host, &format!("ip link set {dev} up"));
    c.topo.sh(
        vm,
        "ip link set eth0 address 02:00:00:00:0e:01 up && ip addr add 10.10.0.9/24 dev eth0",
    );
}

#[test]
fn a_port_waits_for_its_interface_across_agent_restarts_and_device_kinds() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let mut c = Chassis::new(
        1,
        &profiles("permit", 10, ""),
        &[("a", 0, "10.10.0.1/24", "web")],
    );
    let h1 = c.hosts[0].clone();
    let dev = c.topo.name("w0");
    // Bound to an interface that does not exist: the host applies it (its
    // policy is in place) and the port waits, saying for what.
    let id = c
        .ok(&[
            "port",
            "create",
            "--vm",
            "w",
            "--mac",
            "02:00:00:00:0e:01",
            "--profile",
            "web",
            "--host",
            "h1",
            "--netdev",
            &dev,
        ])
        .trim()
        .to_string();
    c.wait_converged(Duration::from_secs(10));
    let waiting = format!("waiting for interface {dev}");
    wait_attachment(&c, &id, &waiting);
    // A veth comes under that name: attached, and the VM behind it pings.
    let vm = c.topo.add_ns("vw");
    plug_veth(&c, &h1, &dev, &vm);
    wait_attachment(&c, &id, "attached");
    let ping = |c: &Chassis| {
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(
            &c.topo
                .try_sh(&c.vm("a").1, "ping -c 3 -i 0.2 -W 1 10.10.0.9")
                .stdout,
        ))
    };
    assert_eq!(ping(&c), (3, 3), "{}", c.topo.logs());
    // The agent restarts while the interface is gone: it starts with the
    // port waiting (from its saved state) and attaches when it is back.
    c.topo.stop(&Chassis::agent_label(0));
    c.topo.sh(&h1, &format!("ip link del {dev}"));
    c.start_agent(0);
    c.wait_converged(Duration::from_secs(10));
    wait_attachment(&c, &id, &waiting);
    plug_veth(&c, &h1, &dev, &vm);
    wait_attachment(&c, &id, "attached");
    assert_eq!(ping(&c), (3, 3), "{}", c.topo.logs());
    // The name comes back as another kind of device (a TAP where a veth
    // was): attached the same way.
    c.topo.sh(&h1, &format!("ip link del {dev}"));
    wait_attachment(&c, &id, &format!("interface {dev} gone"));
    c.topo.sh(
        &h1,
        &format!("ip tuntap add {dev} mode tap && ip link set {dev} up"),
    );
    wait_attachment(&c, &id, "attached");
}

/// `dvs lab --netns`: the lab with real parts — a controller process, an
/// agent process per host, VMs as namespaces with the kernel's stack — runs
/// its checks and leaves nothing behind.
#[test]
fn the_namespace_lab_runs_on_real_agents_and_cleans_up() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let child = std::process::Command::new(dvs_tests::netns::dvs_bin())
        .args(["lab", "--netns", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["netns"], true);
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2);
    assert!(
        v["pings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["ok"] == true),
        "{out}"
    );
    assert_eq!(v["tcp"]["bytes_received"], 4 << 20, "{out}");
    assert_eq!(v["tcp"]["intact"], true, "{out}");
    let moves = v["migrations"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{out}");
    for m in moves {
        assert_eq!(m["record"]["phase"], "done", "{out}");
        assert!(m["record"]["blackout_ms"].as_f64().is_some(), "{out}");
    }
    // Its namespaces and TAPs (named by its PID) are gone.
    let prefix = format!("dl{}", pid % 100_000);
    let left = std::process::Command::new("sh")
        .args(["-c", "ip netns list; ip -o link"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&prefix), "left behind: {left}");
}

/// Wait up to `secs` for process `label`'s log to say `text`; fail with
/// the log.
fn wait_log(c: &Chassis, label: &str, text: &str, secs: u64) {
    assert!(
        wait_for(Duration::from_secs(secs), || c
            .topo
            .log(label)
            .contains(text)),
        "{label} never said `{text}`:\n{}",
        c.topo.log(label)
    );
}

/// Port `id`'s drop counter `reason` in host `i`'s stats file.
fn port_drops(c: &Chassis, i: usize, id: &str, reason: &str) -> u64 {
    let text = std::fs::read_to_string(c.stats_file(i)).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == id))
        .and_then(|p| p["counters"]["drops"][reason].as_u64())
        .unwrap_or(0)
}

/// The profile of `../shared/DESIGN.md`, as written there (its mirror
/// session aside): `security: { mac_limit: 1, ip_source_guard: true }`
/// in a profile many VMs share, each VM's own address bound to its port.
const DESIGN_PROFILE: &str = "kind: PortProfile\nname: base\nvlan: { mode: access, id: 10 }\n---\n\
kind: PortProfile\nname: web\ninherit: base\nvlan: { mode: access, id: 10 }\n\
acl:\n  in:\n    - { action: permit, proto: tcp, dst_port: 80, stateful: true }\n    - { action: permit, proto: icmp }\n    - { action: deny }\n\
qos:\n  in:  { avg_mbps: 100, peak_mbps: 200, burst_kb: 512 }\n  out: { avg_mbps: 100 }\n  mark: { dscp: 26, pcp: 3 }\n\
security: { mac_limit: 1, ip_source_guard: true }\nnetflow: { monitor: default }\n---\n\
kind: NetflowMonitor\nname: default\nversion: ipfix\ncollectors: [ \"127.0.0.1:4739\" ]\nactive_timeout_s: 60\ninactive_timeout_s: 15\nsampling: 1\n";

/// IP source guard with the port's own bindings: the DESIGN's profile
/// applies; a guarded VM without bindings sends no IP at all (fail
/// closed); bound (`dvs port set --ip`), it reaches its peer from that
/// address only — another source address is dropped and counted — and a
/// second binding lets that one through too. An address bound to another
/// port of the VLAN is refused naming it; a non-address is refused.
#[test]
fn ip_source_guard_allows_the_ports_own_bindings() {
    if !e2e_ready(TOOLS) {
        return;
    }
    let c = Chassis::new(
        2,
        DESIGN_PROFILE,
        &[
            ("a", 0, "10.50.0.1/24", "web"),
            ("b", 1, "10.50.0.2/24", "base"),
        ],
    );
    let a = c.vm("a").3.clone();
    let b = c.vm("b").3.clone();
    // The profile's `in` list ends in a deny, which ARP into the VM meets
    // too: the two know each other's MACs.
    let (ns_a, ns_b) = (c.vm("a").1.clone(), c.vm("b").1.clone());
    let mac = |ns: &str| {
        c.topo
            .sh(ns, "cat /sys/class/net/eth0/address")
            .trim()
            .to_string()
    };
    let (mac_a, mac_b) = (mac(&ns_a), mac(&ns_b));
    c.topo.sh(
        &ns_a,
        &format!("ip neigh replace 10.50.0.2 lladdr {mac_b} dev eth0 nud permanent"),
    );
    c.topo.sh(
        &ns_b,
        &format!("ip neigh replace 10.50.0.1 lladdr {mac_a} dev eth0 nud permanent"),
    );
    c.topo.sh(
        &ns_b,
        &format!("ip neigh replace 10.50.0.99 lladdr {mac_a} dev eth0 nud permanent"),
    );
    assert_eq!(c.ping("a", "b", 2).1, 0, "no bindings: a sends no IP");
    assert!(
        wait_for(Duration::from_secs(5), || port_drops(
            &c,
            0,
            &a,
            "spoofed_ip"
        ) >= 2),
        "spoofed_ip {}",
        port_drops(&c, 0, &a, "spoofed_ip")
    );
    let shown = c.ok(&["port", "set", &a, "--ip", "10.50.0.1"]);
    assert!(shown.contains("IP bindings: 10.50.0.1 (static)"), "{shown}");
    assert_eq!(
        c.json(&["port", "show", &a])["ips"],
        serde_json::json!(["10.50.0.1"])
    );
    c.wait_converged(Duration::from_secs(20));
    assert_eq!(c.ping("a", "b", 3).1, 3, "a from its bound address");
    // Another source address on a's NIC: dropped at a's port, counted.
    let ip_b = c.vm("b").2.clone();
    c.topo.sh(&ns_a, "ip addr add 10.50.0.99/24 dev eth0");
    let before = port_drops(&c, 0, &a, "spoofed_ip");
    let o = c.topo.try_sh(
        &ns_a,
        &format!("ping -c 3 -i 0.2 -W 1 -I 10.50.0.99 {ip_b}"),
    );
    assert_eq!(
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(&o.stdout)).1,
        0
    );
    assert!(
        wait_for(Duration::from_secs(5), || port_drops(
            &c,
            0,
            &a,
            "spoofed_ip"
        ) >= before + 3),
        "spoofed_ip {} → {}",
        before,
        port_drops(&c, 0, &a, "spoofed_ip")
    );
    // Bound too, it goes through.
    c.ok(&["port", "set", &a, "--ip", "10.50.0.1", "--ip", "10.50.0.99"]);
    c.wait_converged(Duration::from_secs(20));
    let o = c.topo.try_sh(
        &ns_a,
        &format!("ping -c 3 -i 0.2 -W 1 -I 10.50.0.99 {ip_b}"),
    );
    assert_eq!(
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(&o.stdout)).1,
        3
    );
    // Bad input: refused, naming what is wrong; nothing changes.
    let taken = c.dvs(&["port", "set", &b, "--ip", "10.50.0.99"]);
    assert!(!taken.status.success());
    let why = String::from_utf8_lossy(&taken.stderr);
    assert!(
        why.contains(&format!("bound to port {a}")) && why.contains("VLAN 10"),
        "{why}"
    );
    let bad = c.dvs(&["port", "set", &b, "--ip", "10.50.0.300"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not an IP address"));
    assert_eq!(c.json(&["port", "show", &b])["ips"], serde_json::json!([]));
    // Chassis-wide, with where each came from.
    let all = c.json(&["show", "ip", "bindings"]);
    let rows: Vec<(&str, &str, &str)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ip"].as_str().unwrap(),
                r["port"].as_str().unwrap(),
                r["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("10.50.0.1", a.as_str(), "static"),
            ("10.50.0.99", a.as_str(), "static")
        ],
        "{all}"
    );
    assert!(c.ok(&["show", "ip", "bindings"]).contains("10.50.0.99"));
    assert_eq!(c.ping("b", "a", 2).1, 2, "b is unguarded");
}

/// DHCP snooping with real DHCP software: dnsmasq serves on a trusted
/// port, busybox's udhcpd is a rogue server on an untrusted one, and a
/// guarded VM (IP source guard, no static binding) takes a lease with
/// busybox's udhcpc. The rogue's offers are dropped and counted, the VM
/// gets dnsmasq's address and can use it (and no other); once it releases
/// the lease, that address is refused too.
#[test]
fn dhcp_snooping_binds_dnsmasqs_lease_and_drops_a_rogue_server() {
    if !e2e_ready(&["ip", "ping", "dnsmasq", "/bin/busybox"]) {
        return;
    }
    let profiles = "kind: PortProfile\nname: server\nvlan: { mode: access, id: 10 }\ndhcp_snooping: { trusted: true }\n---\n\
        kind: PortProfile\nname: guarded\nvlan: { mode: access, id: 10 }\nsecurity: { ip_source_guard: true }\n---\n\
        kind: PortProfile\nname: plain\nvlan: { mode: access, id: 10 }\n";
    let mut c = Chassis::new(
        2,
        profiles,
        &[
            ("srv", 0, "10.60.0.1/24", "server"),
            ("cl", 1, "10.60.0.250/24", "guarded"),
            ("rogue", 1, "10.60.0.2/24", "plain"),
        ],
    );
    let (ns_srv, ns_cl, ns_rogue) = (
        c.vm("srv").1.clone(),
        c.vm("cl").1.clone(),
        c.vm("rogue").1.clone(),
    );
    let (cl, rogue) = (c.vm("cl").3.clone(), c.vm("rogue").3.clone());
    c.topo.sh(&ns_cl, "ip -4 addr flush dev eth0");
    let dir = c.topo.dir.clone();
    let conf = dir.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.99.0.10\nend 10.99.0.20\ninterface eth0\nlease_file {}\nopt subnet 255.255.255.0\n",
            dir.join("rogue.leases").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("rogue.leases"), b"").unwrap();
    c.topo.spawn(
        &ns_rogue,
        "udhcpd",
        &["/bin/busybox", "udhcpd", "-f", &conf.to_string_lossy()],
    );
    dhcp::dnsmasq(
        &mut c.topo,
        &ns_srv,
        "dnsmasq",
        "10.60.0.50,10.60.0.60,255.255.255.0,300",
        &[],
    );
    let script = dhcp::udhcpc_script(&c.topo);
    let leased = dhcp::lease(&c.topo, &ns_cl, "");
    assert!(
        leased.starts_with("10.60.0."),
        "dnsmasq's address, not the rogue's: {leased}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || port_drops(
            &c,
            1,
            &rogue,
            "dhcp_server"
        ) >= 1),
        "the rogue's offers: {}",
        c.topo.log("udhcpd")
    );
    // The leased address works; another one does not.
    let ping = |c: &Chassis, from: &str| {
        let o = c.topo.try_sh(
            &ns_cl,
            &format!("ping -c 3 -i 0.2 -W 1 -I {from} 10.60.0.1"),
        );
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(&o.stdout)).1
    };
    assert_eq!(ping(&c, &leased), 3, "from the leased {leased}");
    let bound = || {
        let text = std::fs::read_to_string(c.stats_file(1)).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["dhcp"]["bound"].as_u64().unwrap_or(0) >= 1
    };
    assert!(
        wait_for(Duration::from_secs(5), bound),
        "h2 counts the binding"
    );
    // Chassis-wide, as its host reports it (once a second).
    let snooped = || {
        c.json(&["show", "ip", "bindings"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .any(|r| {
                r["ip"] == leased.as_str() && r["port"] == cl.as_str() && r["source"] == "dhcp"
            })
    };
    assert!(
        wait_for(Duration::from_secs(5), snooped),
        "{}",
        c.ok(&["show", "ip", "bindings"])
    );
    let shown = c.ok(&["port", "show", &cl]);
    assert!(
        shown.contains(&format!("IP bindings: {leased} (dhcp, ")),
        "{shown}"
    );
    c.topo.sh(&ns_cl, "ip addr add 10.60.0.99/24 dev eth0");
    let before = port_drops(&c, 1, &cl, "spoofed_ip");
    assert_eq!(ping(&c, "10.60.0.99"), 0);
    assert!(wait_for(Duration::from_secs(5), || port_drops(
        &c,
        1,
        &cl,
        "spoofed_ip"
    ) >= before + 3));
    // A running client renews, then releases (busybox udhcpc's SIGUSR2):
    // the address is the VM's no more.
    c.topo.sh(&ns_cl, "ip addr del 10.60.0.99/24 dev eth0");
    let script_path = script.to_string_lossy().to_string();
    c.topo.spawn(
        &ns_cl,
        "udhcpc",
        &[
            "/bin/busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            &script_path,
        ],
    );
    wait_log(&c, "udhcpc", "obtained", 15);
    assert_eq!(ping(&c, &leased), 3, "renewed");
    c.topo.signal("udhcpc", "USR2");
    wait_log(&c, "udhcpc", "unicasting a release", 5);
    c.topo.stop("udhcpc");
    assert!(wait_for(Duration::from_secs(5), || c
        .topo
        .log("dnsmasq")
        .contains("DHCPRELEASE")));
    c.topo
        .sh(&ns_cl, &format!("ip addr add {leased}/24 dev eth0"));
    assert_eq!(ping(&c, &leased), 0, "released");
}

/// DHCPv6 snooping with real software: dnsmasq leases a guarded VM an
/// IPv6 address (IA_NA) that ISC's dhclient asks for; IP source guard then
/// lets the VM use that address and no other.
#[test]
fn dhcpv6_snooping_binds_the_address_dnsmasq_leased() {
    if !e2e_ready(&["ip", "ping", "dnsmasq", "dhclient"]) {
        return;
    }
    let profiles = "kind: PortProfile\nname: server\nvlan: { mode: access, id: 10 }\ndhcp_snooping: { trusted: true }\n---\n\
        kind: PortProfile\nname: guarded\nvlan: { mode: access, id: 10 }\nsecurity: { ip_source_guard: true }\n";
    let mut c = Chassis::new(
        2,
        profiles,
        &[
            ("srv", 0, "10.62.0.1/24", "server"),
            ("cl", 1, "10.62.0.250/24", "guarded"),
        ],
    );
    let (ns_srv, ns_cl) = (c.vm("srv").1.clone(), c.vm("cl").1.clone());
    let cl = c.vm("cl").3.clone();
    // (The harness's VMs have IPv6 off: no stray router solicitations.)
    for ns in [&ns_srv, &ns_cl] {
        c.topo
            .sh(ns, "sysctl -qw net.ipv6.conf.eth0.disable_ipv6=0");
    }
    c.topo
        .sh(&ns_srv, "ip -6 addr add 2001:db8:62::1/64 dev eth0 nodad");
    // Both link-local addresses past duplicate address detection.
    for ns in [&ns_srv, &ns_cl] {
        assert!(wait_for(Duration::from_secs(10), || c
            .topo
            .sh(ns, "ip -6 addr show dev eth0 tentative")
            .trim()
            .is_empty()));
    }
    dhcp::dnsmasq(
        &mut c.topo,
        &ns_srv,
        "dnsmasq",
        "10.62.0.50,10.62.0.60,255.255.255.0,300",
        &["--dhcp-range=2001:db8:62::100,2001:db8:62::1ff,64,600"],
    );
    let leases = c.topo.dir.join("dhclient6.leases");
    let leases_s = leases.to_string_lossy().to_string();
    let pid = c
        .topo
        .dir
        .join("dhclient6.pid")
        .to_string_lossy()
        .to_string();
    c.topo.spawn(
        &ns_cl,
        "dhclient",
        &[
            "dhclient",
            "-6",
            "-d",
            "-v",
            "-sf",
            "/bin/true",
            "-lf",
            &leases_s,
            "-pf",
            &pid,
            "eth0",
        ],
    );
    let leased = || {
        let text = std::fs::read_to_string(&leases).unwrap_or_default();
        text.split("iaaddr ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    assert!(
        wait_for(Duration::from_secs(20), || leased().is_some()),
        "no lease: {}\n{}",
        c.topo.log("dhclient"),
        c.topo.log("dnsmasq")
    );
    c.topo.stop("dhclient");
    let ip = leased().unwrap();
    assert!(ip.starts_with("2001:db8:62::"), "{ip}");
    // dhclient was told not to configure it (-sf /bin/true): the VM does.
    c.topo
        .sh(&ns_cl, &format!("ip -6 addr add {ip}/64 dev eth0 nodad"));
    c.topo
        .sh(&ns_cl, "ip -6 addr add 2001:db8:62::99/64 dev eth0 nodad");
    let ping = |from: &str| {
        let o = c.topo.try_sh(
            &ns_cl,
            &format!("ping -6 -c 3 -i 0.2 -W 1 -I {from} 2001:db8:62::1"),
        );
        dvs_tests::netns::parse_ping(&String::from_utf8_lossy(&o.stdout)).1
    };
    assert_eq!(ping(&ip), 3, "from the leased {ip}");
    let before = port_drops(&c, 1, &cl, "spoofed_ip");
    assert_eq!(ping("2001:db8:62::99"), 0, "another address");
    assert!(wait_for(Duration::from_secs(5), || port_drops(
        &c,
        1,
        &cl,
        "spoofed_ip"
    ) >= before + 3));
}

/// The private VLAN of the e2e test: primary 100, isolated 101,
/// communities 102 (blue) and 103 (green), and a profile per role.
const PVLAN_DOCS: &str =
    "kind: PrivateVlan\nname: tenants\nprimary: 100\nisolated: 101\ncommunity: [102, 103]\n---\n\
kind: PortProfile\nname: router\nvlan: { mode: pvlan-promiscuous, primary: 100 }\n---\n\
kind: PortProfile\nname: isolated\nvlan: { mode: pvlan-host, primary: 100, secondary: 101 }\n---\n\
kind: PortProfile\nname: blue\nvlan: { mode: pvlan-host, primary: 100, secondary: 102 }\n---\n\
kind: PortProfile\nname: green\nvlan: { mode: pvlan-host, primary: 100, secondary: 103 }\n";

/// Frames from each MAC that reached namespace `ns`'s eth0, by the nft
/// netdev ingress counters [`pvlan_counters`] set up.
fn frames_from(c: &Chassis, ns: &str) -> std::collections::BTreeMap<String, u64> {
    let text = c.topo.sh(ns, "nft list table netdev pvlan");
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "saddr")?;
            let n = w.iter().position(|x| *x == "packets")?;
            Some((w.get(at + 1)?.to_string(), w.get(n + 1)?.parse().ok()?))
        })
        .collect()
}

/// Private VLANs across two hosts, on real kernels: a promiscuous
/// "router" reaches everyone and everyone reaches it; isolated VMs reach
/// only it — not each other, on one host or across hosts; community VMs
/// reach their community (across hosts too) and the router, not the other
/// community. Pings in every direction say who reaches whom; nft counters
/// on every VM's NIC show that not one frame (ARP broadcasts included)
/// crossed where it must not. A unicast forced onto a forbidden path is
/// dropped and counted (`private_vlan`). Trunk tagging (no 802.1Q devices
/// here) is covered by the pipeline's unit test.
#[test]
fn private_vlans_keep_isolated_and_community_vms_apart_across_hosts() {
    if !e2e_ready(&["ip", "ping", "nft", "/usr/bin/python3"]) {
        return;
    }
    let vms: &[dvs_tests::chassis::VmDef] = &[
        ("r", 0, "10.62.0.1/24", "router"),
        ("i1", 0, "10.62.0.11/24", "isolated"),
        ("i2", 1, "10.62.0.12/24", "isolated"),
        ("i3", 0, "10.62.0.13/24", "isolated"),
        ("b1", 0, "10.62.0.21/24", "blue"),
        ("b2", 1, "10.62.0.22/24", "blue"),
        ("g1", 1, "10.62.0.31/24", "green"),
    ];
    let c = Chassis::new(2, PVLAN_DOCS, vms);
    let names: Vec<&str> = vms.iter().map(|v| v.0).collect();
    let role = |n: &str| vms.iter().find(|v| v.0 == n).unwrap().3;
    let allowed = |x: &str, y: &str| {
        let (a, b) = (role(x), role(y));
        a == "router" || b == "router" || (a == b && a != "isolated")
    };
    let mac = |n: &str| {
        c.topo
            .sh(&c.vm(n).1, "cat /sys/class/net/eth0/address")
            .trim()
            .to_string()
    };
    let macs: Vec<String> = names.iter().map(|n| mac(n)).collect();
    for (i, n) in names.iter().enumerate() {
        let mut rules = String::new();
        for (j, m) in macs.iter().enumerate() {
            if i != j {
                rules.push_str(&format!(
                    "add rule netdev pvlan in ether saddr {m} counter\n"
                ));
            }
        }
        c.topo.sh(
            &c.vm(n).1,
            &format!(
                "nft -f - <<'NFT'\nadd table netdev pvlan\n\
                 add chain netdev pvlan in {{ type filter hook ingress device eth0 priority 0; }}\n{rules}NFT"
            ),
        );
    }
    let shown = c.ok(&["port", "show", &c.vm("i1").3]);
    assert!(shown.contains("pvlan-host 100/101"), "{shown}");
    // Every VM pings every other, all at once per sender.
    let mut got = Vec::new();
    for x in &names {
        let script: String = names
            .iter()
            .filter(|y| *y != x)
            .map(|y| {
                format!(
                    "(echo {y} $(ping -c 3 -i 0.2 -W 1 {} | grep -o '[0-9]* received')) &\n",
                    c.vm(y).2
                )
            })
            .collect::<String>()
            + "wait\n";
        for line in c.topo.sh(&c.vm(x).1, &script).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let [y, n, ..] = w[..] {
                got.push((x.to_string(), y.to_string(), n.parse::<u32>().unwrap_or(0)));
            }
        }
    }
    assert_eq!(got.len(), names.len() * (names.len() - 1), "{got:?}");
    for (x, y, n) in &got {
        if allowed(x, y) {
            assert!(
                *n >= 2,
                "{x} → {y} is allowed, got {n} of 3 replies: {got:?}"
            );
        } else {
            assert_eq!(*n, 0, "{x} → {y} must not cross: {got:?}");
        }
    }
    // Not one frame crossed a forbidden pair, in either direction.
    for (i, y) in names.iter().enumerate() {
        let seen = frames_from(&c, &c.vm(y).1);
        for (j, x) in names.iter().enumerate() {
            if i == j {
                continue;
            }
            let n = seen.get(&macs[j]).copied().unwrap_or(0);
            if allowed(x, y) {
                assert!(n > 0, "{y} counted nothing from {x}: {seen:?}");
            } else {
                assert_eq!(n, 0, "{y} got {n} frames from {x}: {seen:?}");
            }
        }
    }
    // A unicast forced at a forbidden port (b1 knows i1's MAC) is dropped
    // at b1's port, on the same host, and counted.
    let b1 = c.vm("b1").3.clone();
    c.topo.sh(
        &c.vm("b1").1,
        &format!(
            "ip neigh replace 10.62.0.11 lladdr {} dev eth0 nud permanent",
            macs[1]
        ),
    );
    assert_eq!(c.ping("b1", "i1", 3).1, 0);
    assert!(
        wait_for(Duration::from_secs(5), || port_drops(
            &c,
            0,
            &b1,
            "private_vlan"
        ) >= 3),
        "private_vlan drops on b1: {}",
        port_drops(&c, 0, &b1, "private_vlan")
    );
    // Bad input names what is wrong and changes nothing.
    let bad = c.topo.dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: PrivateVlan\nname: other\nprimary: 200\nisolated: 101\n",
    )
    .unwrap();
    let o = c.dvs(&["profile", "apply", "-f", &bad.to_string_lossy()]);
    assert!(!o.status.success());
    let why = String::from_utf8_lossy(&o.stderr);
    assert!(
        why.contains("VLAN 101 is already the isolated VLAN of private VLAN")
            && why.contains("`other`")
            && why.contains("`tenants`"),
        "{why}"
    );
    let o = c.dvs(&["profile", "delete", "tenants"]);
    let why = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && why.contains("private VLAN `tenants` is in use"),
        "{why}"
    );
    assert_eq!(c.ping("r", "i2", 2).1, 2, "still as it was");
}
