#!/usr/bin/python3
"""Two VMs (network namespaces) talking through dvs, a Linux bridge and Open
vSwitch's userspace datapath — on one host and across two hosts — measured
in alternated rounds in one run: iperf3 TCP single stream, UDP 64-byte
received packets per second, ping RTT. Prints the medians and the ratios.

Run as root through bench/netns-bench.sh (it installs the tools and builds
dvs in release mode). Everything it creates is named `dvsb-*` and removed at
the end, even on failure. Traffic stays inside its own namespaces.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

OFFLOADS = os.environ.get("DVS_OFFLOADS", "true")
PREFIX = f"dvsb{os.getpid() % 10000}"
NAMESPACES = []
PROCS = []
PIDFILES = []
# The switch processes behind each path, by the client VM's namespace.
SWITCH_PIDS = {}


def sh(cmd, ns=None, check=True, capture=True, timeout=120):
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["bash", "-c", cmd]
    r = subprocess.run(argv, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"in {ns or 'root'}: `{cmd}` failed:\n{r.stdout}{r.stderr}")
    return r.stdout if capture else ""


def add_ns(short):
    ns = f"{PREFIX}-{short}"
    sh(f"ip netns add {ns}")
    NAMESPACES.append(ns)
    sh("ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
       "net.ipv6.conf.default.disable_ipv6=1", ns)
    return ns


def spawn(argv, ns, log):
    p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=open(log, "w"),
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    PROCS.append(p)
    return p


def wait_link(ns, name, limit=10):
    end = time.time() + limit
    while time.time() < end:
        if subprocess.run(["ip", "-n", ns, "link", "show", name],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} never appeared in {ns}")


def vm_from_link(ns_from, link, vm_short, addr, mtu=1500):
    """Move `link` from ns_from into a new VM namespace as eth0 with addr."""
    vm = add_ns(vm_short)
    sh(f"ip link set {link} netns {vm}", ns_from)
    sh(f"ip link set {link} name eth0 && ip link set eth0 mtu {mtu} up && "
       f"ip addr add {addr}/24 dev eth0", vm)
    return vm


def underlay(hosts):
    """Host namespaces joined by a core bridge; returns [(ns, ip, dev)]."""
    core = add_ns(hosts[0] + "core")
    sh("ip link add br0 type bridge && ip link set br0 up", core)
    out = []
    for i, short in enumerate(hosts):
        ns = add_ns(short)
        u, c = f"{short}u{i}"[-15:], f"{short}c{i}"[-15:]
        sh(f"ip link add {u} mtu 1600 netns {ns} type veth peer name {c} mtu 1600 netns {core}")
        sh(f"ip link set {c} master br0 up", core)
        ip = f"10.98.0.{i + 1}"
        sh(f"ip addr add {ip}/24 dev {u} && ip link set {u} up", ns)
        out.append((ns, ip, u))
    return out


# The policy of the "dvs + policy" path: 100 ACL rules before a stateful
# permit on both ports, and a rate limit far above what the path carries (so
# that the cost of the checks shows, not the limit).
POLICY_PROFILE = """profiles:
  - kind: PortProfile
    name: guarded
    vlan: { mode: access, id: 10 }
    acl:
      out:
%s
        - { action: permit, proto: tcp, stateful: true }
        - { action: permit, proto: udp, stateful: true }
        - { action: permit, proto: icmp, stateful: true }
        - { action: permit, ethertype: arp }
        - { action: deny }
      in:
%s
        - { action: permit, proto: tcp, stateful: true }
        - { action: permit, proto: udp, stateful: true }
        - { action: permit, proto: icmp, stateful: true }
        - { action: permit, ethertype: arp }
        - { action: deny }
    qos: { in: { avg_mbps: 40000 }, out: { avg_mbps: 40000 } }
""" % tuple("\n".join(f"        - {{ action: deny, proto: tcp, dst_port: {1000 + i} }}" for i in range(100))
            for _ in range(2))


# The "dvs + NetFlow" path: both ports recorded both ways by an IPFIX
# monitor exporting to nfcapd in the host's namespace.
NETFLOW_MONITOR = """monitors:
  - { name: m, version: ipfix, collectors: ["127.0.0.1:2055"], active_timeout_s: 10, inactive_timeout_s: 5 }
"""


def dvs_agent(dvs, host_ns, name, local, peers, taps, workdir, profile=None):
    cfg = os.path.join(workdir, f"{name}.yaml")
    lines = [f"host: {name}"]
    if profile == "netflow":
        lines.append(NETFLOW_MONITOR)
        if shutil.which("nfcapd"):
            nfdir = os.path.join(workdir, "nfcapd")
            os.makedirs(nfdir, exist_ok=True)
            spawn(["nfcapd", "-w", nfdir, "-b", "127.0.0.1", "-p", "2055"], host_ns,
                  os.path.join(workdir, "nfcapd.log"))
    elif profile:
        lines.append(POLICY_PROFILE)
    if local:
        lines.append(f"tunnel: {{ local: {local} }}")
        lines.append("segments:")
        lines.append(f"  - {{ vlan: 10, vni: 5010, peers: [{', '.join(peers)}] }}")
    lines.append("ports:")
    for i, tap in enumerate(taps):
        policy = "vlan: { mode: access, id: 10 }"
        if profile == "netflow":
            policy += ", netflow: { monitor: m }"
        elif profile:
            policy = f"profile: {profile}"
        lines.append(f"  - {{ id: {i + 1}, name: p{i}, tap: {tap}, offloads: {OFFLOADS}, {policy} }}")
    open(cfg, "w").write("\n".join(lines) + "\n")
    p = spawn([dvs, "agent", "--config", cfg], host_ns, os.path.join(workdir, f"{name}.log"))
    for t in taps:
        wait_link(host_ns, t)
    return p.pid


def build_dvs_same(dvs, workdir, profile=None):
    tag = {"guarded": "dvsp", "netflow": "dvsn"}.get(profile, "dvs1")
    h = add_ns(tag)
    taps = [f"{PREFIX}{tag[-1]}a", f"{PREFIX}{tag[-1]}b"]
    pid = dvs_agent(dvs, h, f"{tag}-same", None, [], taps, workdir, profile)
    a = vm_from_link(h, taps[0], f"{tag}a", "10.10.0.1")
    b = vm_from_link(h, taps[1], f"{tag}b", "10.10.0.2")
    SWITCH_PIDS[a] = [pid]
    return a, b, "10.10.0.2"


def build_dvs_cross(dvs, workdir):
    (h1, ip1, _), (h2, ip2, _) = underlay(["dvsx1", "dvsx2"])
    t1, t2 = f"{PREFIX}xa", f"{PREFIX}xb"
    pids = [dvs_agent(dvs, h1, "dvs-x1", ip1, [ip2], [t1], workdir),
            dvs_agent(dvs, h2, "dvs-x2", ip2, [ip1], [t2], workdir)]
    a = vm_from_link(h1, t1, "dvsxa", "10.10.0.1")
    b = vm_from_link(h2, t2, "dvsxb", "10.10.0.2")
    SWITCH_PIDS[a] = pids
    return a, b, "10.10.0.2"


def build_bridge_same(_dvs, _workdir):
    h = add_ns("br1")
    sh("ip link add br0 type bridge && ip link set br0 up", h)
    vms = []
    for i, s in enumerate("ab"):
        vm = add_ns(f"br1{s}")
        sh(f"ip link add h{s} netns {h} type veth peer name eth0 netns {vm}")
        sh(f"ip link set h{s} master br0 up", h)
        sh(f"ip addr add 10.10.0.{i + 1}/24 dev eth0 && ip link set eth0 up", vm)
        vms.append(vm)
    return vms[0], vms[1], "10.10.0.2"


def build_bridge_cross(_dvs, _workdir):
    hosts = underlay(["brx1", "brx2"])
    vms = []
    for i, (h, ip, dev) in enumerate(hosts):
        other = hosts[1 - i][1]
        sh("ip link add br0 type bridge && ip link set br0 up && "
           f"ip link add vx0 type vxlan id 5010 dstport 4789 local {ip} dev {dev} && "
           "ip link set vx0 mtu 1500 master br0 up && "
           f"bridge fdb append 00:00:00:00:00:00 dev vx0 dst {other}", h)
        vm = add_ns(f"brx{'ab'[i]}")
        sh(f"ip link add hv netns {h} type veth peer name eth0 netns {vm}")
        sh("ip link set hv master br0 up", h)
        sh(f"ip addr add 10.10.0.{i + 1}/24 dev eth0 && ip link set eth0 up", vm)
        vms.append(vm)
    return vms[0], vms[1], "10.10.0.2"


def start_ovs(h, run, tso=False):
    """A private ovsdb-server + ovs-vswitchd inside namespace h (the PEERS.md
    recipe); returns the ovs-vsctl command prefix."""
    os.makedirs(run, exist_ok=True)
    env = f"OVS_RUNDIR={run} OVS_DBDIR={run} OVS_LOGDIR={run} OVS_PKGDATADIR=/usr/share/openvswitch"
    db = f"unix:{run}/db.sock"
    sh(f"ovsdb-tool create {run}/conf.db /usr/share/openvswitch/vswitch.ovsschema")
    sh(f"{env} ovsdb-server --remote=punix:{run}/db.sock --pidfile={run}/ovsdb.pid "
       f"--detach --log-file={run}/ovsdb.log {run}/conf.db", h)
    PIDFILES.append(f"{run}/ovsdb.pid")
    sh(f"{env} ovs-vsctl --db={db} --no-wait init", h)
    if tso:
        sh(f"{env} ovs-vsctl --db={db} --no-wait set Open_vSwitch . "
           "other_config:userspace-tso-enable=true", h)
    sh(f"{env} ovs-vswitchd {db} --pidfile={run}/vswitchd.pid --detach "
       f"--log-file={run}/vswitchd.log", h)
    PIDFILES.append(f"{run}/vswitchd.pid")
    pid = int(open(f"{run}/vswitchd.pid").read().strip())
    return f"{env} ovs-vsctl --db={db}", pid


def build_ovs_cross(_dvs, workdir):
    """OVS userspace tunnelling: br-phy holds the underlay veth and the
    host's IP, br-int the VM's internal port and a VXLAN port."""
    hosts = underlay(["ovsx1", "ovsx2"])
    vms = []
    pids = []
    for i, (h, ip, dev) in enumerate(hosts):
        other = hosts[1 - i][1]
        vsctl, pid = start_ovs(h, os.path.join(workdir, f"ovsx{i}"))
        pids.append(pid)
        sh(f"{vsctl} add-br br-phy -- set bridge br-phy datapath_type=netdev "
           f"-- add-port br-phy {dev}", h)
        sh(f"ip addr flush dev {dev} && ip addr add {ip}/24 dev br-phy && "
           "ip link set br-phy mtu 1600 up", h)
        p = f"ovsx{i}p"
        sh(f"{vsctl} add-br br-int -- set bridge br-int datapath_type=netdev "
           f"-- add-port br-int vx0 -- set interface vx0 type=vxlan "
           f"options:remote_ip={other} options:key=5010 "
           f"-- add-port br-int {p} -- set interface {p} type=internal", h)
        wait_link(h, p)
        vms.append(vm_from_link(h, p, f"ovsx{'ab'[i]}", f"10.10.0.{i + 1}"))
    SWITCH_PIDS[vms[0]] = pids
    return vms[0], vms[1], "10.10.0.2"


def build_ovs(tso, workdir):
    tag = "ovst" if tso else "ovs"
    h = add_ns(tag)
    vsctl, pid = start_ovs(h, os.path.join(workdir, tag), tso)
    sh(f"{vsctl} add-br br0 -- set bridge br0 datapath_type=netdev", h)
    vms = []
    for i, s in enumerate("ab"):
        p = f"{tag}p{s}"
        sh(f"{vsctl} add-port br0 {p} -- set interface {p} type=internal", h)
        wait_link(h, p)
        vms.append(vm_from_link(h, p, f"{tag}{s}", f"10.10.0.{i + 1}"))
    SWITCH_PIDS[vms[0]] = [pid]
    return vms[0], vms[1], "10.10.0.2"


def measure_tcp(a, b, ip, secs):
    srv = spawn(["iperf3", "-s", "-p", "5201", "-1"], b, os.devnull)
    time.sleep(0.3)
    try:
        out = sh(f"iperf3 -c {ip} -p 5201 -t {secs} -J", a, timeout=secs + 30)
        j = json.loads(out)
        return {"TCP Gbit/s": j["end"]["sum_received"]["bits_per_second"] / 1e9}
    finally:
        srv.wait(timeout=10)


def ip_in_receives(ns):
    out = sh("nstat -az IpInReceives", ns)
    for line in out.splitlines():
        if line.startswith("IpInReceives"):
            return int(line.split()[1])
    return 0


def measure_udp(a, b, ip, secs):
    """UDP 64-byte flood: sent (the client's count, as PEERS.md's figures),
    delivered into the receiving VM's IP stack (its IpInReceives), and read
    by the receiving application (sent - lost)."""
    srv = spawn(["iperf3", "-s", "-p", "5202", "-1"], b, os.devnull)
    time.sleep(0.3)
    try:
        before = ip_in_receives(b)
        out = sh(f"iperf3 -c {ip} -p 5202 -u -b 0 -l 64 -t {secs} -J", a, timeout=secs + 30)
        delivered = ip_in_receives(b) - before
        s = json.loads(out)["end"]["sum"]
        return {
            "UDP sent kpps": s["packets"] / s["seconds"] / 1e3,
            "UDP delivered kpps": delivered / s["seconds"] / 1e3,
            "UDP app-rx kpps": (s["packets"] - s.get("lost_packets", 0)) / s["seconds"] / 1e3,
        }
    finally:
        srv.wait(timeout=10)


def cpu_ticks(pids):
    """User + system CPU ticks of whole processes (all their threads)."""
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def measure_cpu(a, b, ip, secs):
    """CPU the switch processes spend per packet of a UDP 64-byte stream at
    a fixed 100 kpps (nothing dropped): the switch's own efficiency, apart
    from how a flood shares the cores. Kernel switches have no process to
    charge, so the column stays empty for them."""
    pids = SWITCH_PIDS.get(a)
    if not pids:
        return {}
    srv = spawn(["iperf3", "-s", "-p", "5203", "-1"], b, os.devnull)
    time.sleep(0.3)
    try:
        before = cpu_ticks(pids)
        out = sh(f"iperf3 -c {ip} -p 5203 -u -b 51.2M -l 64 -t {secs} -J", a, timeout=secs + 30)
        ticks = cpu_ticks(pids) - before
        packets = json.loads(out)["end"]["sum"]["packets"]
        return {"switch CPU us/pkt": ticks / os.sysconf("SC_CLK_TCK") / packets * 1e6}
    finally:
        srv.wait(timeout=10)


def measure_rtt(a, _b, ip, _secs):
    out = sh(f"ping -c 50 -i 0.01 -q {ip}", a, timeout=60)
    for line in out.splitlines():
        if line.startswith("rtt") or line.startswith("round-trip"):
            return {"RTT ms": float(line.split("=")[1].split("/")[1])}
    raise RuntimeError(f"no RTT in ping output:\n{out}")


PATHS = [
    ("dvs, same host", build_dvs_same),
    ("dvs + policy (200 ACL rules, stateful, rate limit), same host",
     lambda d, w: build_dvs_same(d, w, "guarded")),
    ("dvs + NetFlow (IPFIX, both ports both ways), same host",
     lambda d, w: build_dvs_same(d, w, "netflow")),
    ("Linux bridge, same host", build_bridge_same),
    ("OVS userspace, same host", lambda d, w: build_ovs(False, w)),
    ("OVS userspace + TSO, same host", lambda d, w: build_ovs(True, w)),
    ("dvs, across hosts (VXLAN)", build_dvs_cross),
    ("Linux bridge + vxlan, across hosts", build_bridge_cross),
    ("OVS userspace + vxlan, across hosts", build_ovs_cross),
]
MEASURES = [measure_tcp, measure_udp, measure_cpu, measure_rtt]
COLUMNS = ["TCP Gbit/s", "UDP sent kpps", "UDP delivered kpps", "UDP app-rx kpps",
           "switch CPU us/pkt", "RTT ms"]
LOWER_IS_BETTER = {"RTT ms", "switch CPU us/pkt"}


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.terminate()
    for p in PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    for pf in PIDFILES:
        try:
            pid = int(open(pf).read().strip())
            os.kill(pid, 15)
        except (OSError, ValueError):
            pass
    for ns in reversed(NAMESPACES):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main():
    # SIGTERM and SIGINT still run the cleanup in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=3, help="seconds per iperf3 test")
    ap.add_argument("--dvs", default=os.environ.get("DVS_BIN", "target/release/dvs"))
    ap.add_argument("--only", help="comma-separated path numbers (1-based) to run")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON too")
    args = ap.parse_args()
    dvs = os.path.abspath(args.dvs)
    paths = PATHS
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        paths = [p for i, p in enumerate(PATHS, 1) if i in keep]
    workdir = tempfile.mkdtemp(prefix="dvs-bench-")
    results = {name: {c: [] for c in COLUMNS} for name, _ in paths}
    try:
        built = [(name, build(dvs, workdir)) for name, build in paths]
        for _name, (a, _b, ip) in built:
            sh(f"ping -c 3 -i 0.2 -W 2 {ip}", a)
        for r in range(args.rounds):
            for name, (a, b, ip) in built:
                for fn in MEASURES:
                    for c, v in fn(a, b, ip, args.secs).items():
                        results[name][c].append(v)
                print(f"round {r + 1}: {name}: " + ", ".join(
                    f"{c} {results[name][c][-1]:.3f}" for c in COLUMNS if results[name][c]),
                    file=sys.stderr)
    finally:
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    med = {n: {c: statistics.median(v) if v else None for c, v in cs.items()}
           for n, cs in results.items()}
    print(f"\nmedians of {args.rounds} alternated rounds (iperf3 {args.secs} s, ping 50 x 10 ms)\n")
    print("| path | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for n, cs in med.items():
        cells = ["-" if cs[c] is None else f"{cs[c]:.3f}" if c in LOWER_IS_BETTER else
                 (f"{cs[c]:.2f}" if "Gbit" in c else f"{cs[c]:.0f}") for c in COLUMNS]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nratios dvs / reference (above 1 is better for dvs; RTT inverted):")
    variants = ("dvs + policy (200 ACL rules, stateful, rate limit), same host",
                "dvs + NetFlow (IPFIX, both ports both ways), same host")
    for d in ("dvs, same host", "dvs, across hosts (VXLAN)") + variants:
        if d not in med:
            continue
        for ref in med:
            if ref == d or ("across" in ref) != ("across" in d):
                continue
            if ref.startswith("dvs") and (d not in variants or ref in variants):
                continue
            parts = []
            for c in COLUMNS:
                if not med[ref][c] or not med[d][c]:
                    continue
                x = med[ref][c] / med[d][c] if c in LOWER_IS_BETTER else med[d][c] / med[ref][c]
                parts.append(f"{c} x{x:.2f}")
            print(f"  {d} vs {ref}: " + ", ".join(parts))
    if args.json:
        print(json.dumps(med, indent=2))


if __name__ == "__main__":
    main()
