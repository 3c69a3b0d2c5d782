//! Network-namespace topologies for the end-to-end suite: hosts joined by a
//! core bridge, `dvs agent` per host, VMs as namespaces whose interface is a
//! TAP of their host's agent, and peers built from the kernel's own vxlan and
//! bridge devices.
//!
//! Everything is named with a per-run prefix and removed on drop — agents
//! (killed by PID), namespaces (with every link in them) and files — even
//! when a test fails.
//!
//! Traffic stays inside the namespaces a [`Topo`] made.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Whether the end-to-end suite can run here. Under CI (`CI=true`) a missing
/// privilege or tool is a failure; elsewhere the test says loudly that it is
/// skipped and returns `false`.
pub fn e2e_ready(tools: &[&str]) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY-free check: root is uid 0 as reported by `id -u`.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| !have_tool(t))
        .map(|t| (*t).to_string())
        .collect();
    if !root {
        missing.insert(0, "root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "end-to-end test needs {} — run the suite as root via `scripts/test`, which installs the tools",
        missing.join(", ")
    );
    if ci {
        panic!("{msg} (CI=true: a skip is a failure)");
    }
    eprintln!("\n!!!!! SKIPPED: {msg}\n");
    false
}

fn have_tool(t: &str) -> bool {
    if t.starts_with('/') {
        return Path::new(t).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {t}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `dvs` binary under test: `$DVS_BIN`, or `target/<profile>/dvs` next to
/// the test executable.
pub fn dvs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DVS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = dir.join("dvs");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --bins`, as scripts/test does) or set DVS_BIN",
        bin.display()
    );
    bin
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces, processes and files with one unique prefix.
#[derive(Debug)]
pub struct Topo {
    /// 5 hex digits unique to this run and topology.
    pub id: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Topo {
    pub fn new() -> Self {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:05x}", (std::process::id() * 16 + n) & 0xfffff);
        let dir = std::env::temp_dir().join(format!("dvs-e2e-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        Topo {
            id,
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A name with this topology's prefix (short enough for an interface).
    pub fn name(&self, short: &str) -> String {
        let n = format!("d{}{short}", self.id);
        assert!(n.len() <= 15, "interface name {n} is too long");
        n
    }

    /// Create namespace `short` (loopback up, IPv6 off so that DAD/MLD noise
    /// stays out of the counters); returns its full name.
    pub fn add_ns(&mut self, short: &str) -> String {
        let ns = format!("dvs-{}-{short}", self.id);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        self.sh(
            &ns,
            "ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        );
        ns
    }

    /// Run `script` with bash inside `ns`; panics with its output on failure.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        let o = self.try_sh(ns, script);
        assert!(
            o.status.success(),
            "in {ns}: `{script}` failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run `script` with bash inside `ns` (empty: the caller's namespace).
    pub fn try_sh(&self, ns: &str, script: &str) -> Output {
        let mut c = if ns.is_empty() {
            Command::new("bash")
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "bash"]);
            c
        };
        c.args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("spawn bash")
    }

    /// Start a long-running process inside `ns`, logging to `<dir>/<label>.log`.
    /// It is killed when the topology drops.
    pub fn spawn(&mut self, ns: &str, label: &str, argv: &[&str]) -> u32 {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log"))).expect("log file");
        let err = log.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn process in namespace");
        let pid = child.id();
        self.children.push((label.to_string(), child));
        pid
    }

    /// Stop the process `label` with SIGTERM and wait for it; returns its
    /// exit status (None if it had to be killed).
    pub fn stop(&mut self, label: &str) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|(l, _)| l == label)?;
        let (_, mut child) = self.children.remove(i);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Kill process `label` with SIGKILL (a crash) and reap it.
    pub fn kill9(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Send process `label` signal `sig` (`STOP`, `CONT`, …).
    pub fn signal(&self, label: &str, sig: &str) {
        if let Some(pid) = self.pid(label) {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), pid.to_string()])
                .status();
        }
    }

    /// The PID of process `label`.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c.id())
    }

    /// Is the process `label` still running?
    pub fn running(&mut self, label: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(l, _)| l == label)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (l, _) in &self.children {
            let _ = writeln!(s, "----- {l}.log\n{}", self.log(l));
        }
        s
    }
}

impl Default for Topo {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}

fn run(argv: &[&str]) {
    let o = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("spawn command");
    assert!(
        o.status.success(),
        "`{}` failed: {}",
        argv.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Wait until `f` holds, checking every 50 ms, for at most `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VM of a [`Fabric`].
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Index of the host (0-based) the VM's port is on.
    pub host: usize,
    /// Short name (a letter or two).
    pub name: &'static str,
    /// The port's VLAN mode as YAML, e.g. `{ mode: access, id: 10 }`.
    pub vlan: &'static str,
    /// The VM's address with prefix, if it has one.
    pub addr: Option<&'static str>,
    /// Attach through a veth pair the test makes (`netdev:` in the agent
    /// file, AF_PACKET) instead of a TAP the agent creates.
    pub veth: bool,
    /// The port's `acl:` as YAML (e.g. `{ in: [ ... ] }`), if any.
    pub acl: Option<&'static str>,
    /// The port's `qos:` as YAML (e.g. `{ in: { avg_mbps: 50 } }`), if any.
    pub qos: Option<&'static str>,
    /// The port's `security:` as YAML, if any.
    pub security: Option<&'static str>,
    /// The port's `netflow:` as YAML (e.g. `{ monitor: m }`), if any.
    pub netflow: Option<&'static str>,
}

/// A VM that lives in a namespace, its NIC named `eth0`.
#[derive(Debug, Clone)]
pub struct Vm {
    pub ns: String,
    pub mac: String,
    pub ip: Option<String>,
    pub host: usize,
}

/// A host that runs `dvs agent`.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub label: String,
    /// The agent's file (rewrite it, then [`Fabric::reload`]).
    pub config: PathBuf,
    pub underlay: String,
    pub stats: PathBuf,
}

/// Hosts joined by a core bridge, a dvs agent on each, VMs on their TAPs;
/// optionally one host made of the kernel's vxlan + bridge ("kernel host").
#[derive(Debug)]
pub struct Fabric {
    pub topo: Topo,
    pub hosts: Vec<Host>,
    pub vms: Vec<(&'static str, Vm)>,
    /// The kernel host's namespace, if any.
    pub kernel_host: Option<String>,
}

/// The segments every fabric has: VLAN → VNI.
pub const SEGMENTS: [(u16, u32); 2] = [(10, 5010), (20, 5020)];

/// The core namespace's own address on the underlay: where a fabric's
/// collectors (nfcapd, …) listen, as on a management network.
pub const CORE_IP: &str = "10.99.0.100";

/// Host `i`'s address on the underlay (0-based).
pub fn underlay_ip(i: usize) -> String {
    format!("10.99.0.{}", i + 1)
}

/// A core namespace with bridge `br0` (address [`CORE_IP`]) and `n` host
/// namespaces joined to it; returns their names.
pub fn underlay(topo: &mut Topo, n: usize) -> (String, Vec<String>) {
    let core = topo.add_ns("core");
    topo.sh(
        &core,
        &format!(
            "ip link add br0 type bridge && ip addr add {CORE_IP}/24 dev br0 && ip link set br0 up"
        ),
    );
    let mut host_ns = Vec::new();
    for i in 0..n {
        let ns = topo.add_ns(&format!("h{}", i + 1));
        let (u, c) = (topo.name(&format!("u{i}")), topo.name(&format!("c{i}")));
        topo.sh(
            "",
            &format!(
                "ip link add {u} mtu 1600 netns {ns} type veth peer name {c} mtu 1600 netns {core}"
            ),
        );
        topo.sh(&core, &format!("ip link set {c} master br0 up"));
        topo.sh(
            &ns,
            &format!(
                "ip addr add {}/24 dev {u} && ip link set {u} up",
                underlay_ip(i)
            ),
        );
        host_ns.push(ns);
    }
    (core, host_ns)
}

impl Fabric {
    /// Build `hosts` dvs hosts (and, with `kernel_vms`, one kernel vxlan host
    /// whose VMs are given as (name, VLAN, address)), then the VMs.
    pub fn new(
        hosts: usize,
        vms: &[VmSpec],
        kernel_vms: &[(&'static str, u16, &'static str)],
    ) -> Self {
        Self::new_with(hosts, vms, kernel_vms, "", |_, _| ()).0
    }

    /// [`Fabric::new`] with `host_yaml` added to every agent's file (e.g.
    /// `monitors:`) and `before_agents` run in the core namespace (bridge
    /// `br0`, address [`CORE_IP`]) before any agent starts — to start a
    /// collector, say; what it returns comes back with the fabric.
    pub fn new_with<T>(
        hosts: usize,
        vms: &[VmSpec],
        kernel_vms: &[(&'static str, u16, &'static str)],
        host_yaml: &str,
        before_agents: impl FnOnce(&mut Topo, &str) -> T,
    ) -> (Self, T) {
        let mut topo = Topo::new();
        let n_all = hosts + usize::from(!kernel_vms.is_empty());
        let (core, host_ns) = underlay(&mut topo, n_all);
        let mut fabric = Fabric {
            topo,
            hosts: Vec::new(),
            vms: Vec::new(),
            kernel_host: None,
        };
        if !kernel_vms.is_empty() {
            fabric.build_kernel_host(&host_ns[hosts], hosts, kernel_vms);
        }
        let peers_of = |i: usize| -> String {
            (0..n_all)
                .filter(|j| *j != i)
                .map(underlay_ip)
                .collect::<Vec<_>>()
                .join(", ")
        };
        // VMs on veth pairs exist before their agent attaches to them.
        for vm in vms.iter().filter(|v| v.veth) {
            let host = &host_ns[vm.host];
            let ns = fabric.topo.add_ns(&format!("v{}", vm.name));
            let (h, v) = (
                fabric.topo.name(&format!("n{}", vm.name)),
                fabric.topo.name(&format!("e{}", vm.name)),
            );
            fabric.topo.sh(
                "",
                &format!("ip link add {h} netns {host} type veth peer name {v} netns {ns}"),
            );
            fabric.topo.sh(host, &format!("ip link set {h} up"));
            fabric.adopt_nic(vm.name, vm.host, ns, &v, vm.addr);
        }
        let before = before_agents(&mut fabric.topo, &core);
        for (i, ns) in host_ns.iter().take(hosts).enumerate() {
            let label = format!("agent-h{}", i + 1);
            let stats = fabric.topo.dir.join(format!("h{}-stats.json", i + 1));
            let mut y = format!(
                "host: h{}\ntunnel: {{ local: {} }}\nstats_file: {}\nsegments:\n",
                i + 1,
                underlay_ip(i),
                stats.display()
            );
            y.insert_str(0, host_yaml);
            for (vlan, vni) in SEGMENTS {
                let _ = writeln!(
                    y,
                    "  - {{ vlan: {vlan}, vni: {vni}, peers: [{}] }}",
                    peers_of(i)
                );
            }
            y.push_str("ports:\n");
            for (k, vm) in vms.iter().enumerate().filter(|(_, v)| v.host == i) {
                let dev = if vm.veth {
                    format!("netdev: {}", fabric.topo.name(&format!("n{}", vm.name)))
                } else {
                    format!("tap: {}", fabric.topo.name(&format!("t{}", vm.name)))
                };
                let acl = vm.acl.map(|a| format!(", acl: {a}")).unwrap_or_default()
                    + &vm.qos.map(|q| format!(", qos: {q}")).unwrap_or_default()
                    + &vm
                        .security
                        .map(|s| format!(", security: {s}"))
                        .unwrap_or_default()
                    + &vm
                        .netflow
                        .map(|n| format!(", netflow: {n}"))
                        .unwrap_or_default();
                let _ = writeln!(
                    y,
                    "  - {{ id: {}, name: {}, {dev}, vlan: {}{acl} }}",
                    k + 1,
                    vm.name,
                    vm.vlan
                );
            }
            let cfg = fabric.topo.dir.join(format!("h{}.yaml", i + 1));
            std::fs::write(&cfg, &y).expect("write agent config");
            let bin = dvs_bin();
            let (bin, cfg_s) = (
                bin.to_string_lossy().into_owned(),
                cfg.to_string_lossy().into_owned(),
            );
            fabric.topo.spawn(
                ns,
                &label,
                &["env", "DVS_LOG=info", &bin, "agent", "--config", &cfg_s],
            );
            fabric.hosts.push(Host {
                ns: ns.clone(),
                label,
                config: cfg.clone(),
                underlay: underlay_ip(i),
                stats,
            });
        }
        for vm in vms.iter().filter(|v| !v.veth) {
            let host = fabric.hosts[vm.host].clone();
            let tap = fabric.topo.name(&format!("t{}", vm.name));
            let ok = wait_for(Duration::from_secs(10), || {
                fabric
                    .topo
                    .try_sh(&host.ns, &format!("ip link show {tap}"))
                    .status
                    .success()
            });
            assert!(
                ok,
                "agent on {} never created TAP {tap}:\n{}",
                host.ns,
                fabric.topo.logs()
            );
            let ns = fabric.topo.add_ns(&format!("v{}", vm.name));
            fabric
                .topo
                .sh(&host.ns, &format!("ip link set {tap} netns {ns}"));
            fabric.adopt_nic(vm.name, vm.host, ns, &tap, vm.addr);
        }
        (fabric, before)
    }

    fn build_kernel_host(
        &mut self,
        ns: &str,
        index: usize,
        vms: &[(&'static str, u16, &'static str)],
    ) {
        self.topo
            .sh(ns, "ip link add br0 type bridge && ip link set br0 up");
        for (vlan, vni) in SEGMENTS {
            if !vms.iter().any(|v| v.1 == vlan) {
                continue;
            }
            let vx = format!("vx{vlan}");
            let br = format!("br{vlan}");
            let mut s = format!(
                "ip link add {br} type bridge && ip link set {br} up && \
                 ip link add {vx} type vxlan id {vni} dstport 4789 local {} dev {} && \
                 ip link set {vx} mtu 1500 master {br} up",
                underlay_ip(index),
                self.topo.name(&format!("u{index}"))
            );
            for j in 0..index {
                let _ = write!(
                    s,
                    " && bridge fdb append 00:00:00:00:00:00 dev {vx} dst {}",
                    underlay_ip(j)
                );
            }
            self.topo.sh(ns, &s);
        }
        for (name, vlan, addr) in vms {
            let vm_ns = self.topo.add_ns(&format!("v{name}"));
            let (a, b) = (
                self.topo.name(&format!("k{name}")),
                self.topo.name(&format!("e{name}")),
            );
            self.topo.sh(
                "",
                &format!("ip link add {a} netns {ns} type veth peer name {b} netns {vm_ns}"),
            );
            self.topo
                .sh(ns, &format!("ip link set {a} master br{vlan} up"));
            self.adopt_nic(name, index, vm_ns, &b, Some(addr));
        }
        self.kernel_host = Some(ns.to_string());
    }

    /// Make `link` (already in namespace `ns`) the NIC `eth0` of VM `name`
    /// on host `host`, with `addr`, and record the VM.
    fn adopt_nic(
        &mut self,
        name: &'static str,
        host: usize,
        ns: String,
        link: &str,
        addr: Option<&'static str>,
    ) {
        let mut script = format!("ip link set {link} name eth0 && ip link set eth0 mtu 1500 up");
        if let Some(a) = addr {
            let _ = write!(script, " && ip addr add {a} dev eth0");
        }
        self.topo.sh(&ns, &script);
        let mac = self
            .topo
            .sh(&ns, "cat /sys/class/net/eth0/address")
            .trim()
            .to_string();
        let ip = addr.map(|a| a.split('/').next().unwrap_or(a).to_string());
        self.vms.push((name, Vm { ns, mac, ip, host }));
    }

    /// Edit host `i`'s agent file with `edit` and send the agent SIGHUP.
    pub fn reload(&self, i: usize, edit: impl FnOnce(String) -> String) {
        let h = &self.hosts[i];
        let text = std::fs::read_to_string(&h.config).expect("read the agent file");
        std::fs::write(&h.config, edit(text)).expect("write the agent file");
        let pid = self.topo.pid(&h.label).expect("the agent runs");
        let ok = Command::new("/bin/kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not send SIGHUP to the agent");
    }

    pub fn vm(&self, name: &str) -> &Vm {
        &self
            .vms
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
            .1
    }

    /// The latest stats file of host `i` (written every second by the agent).
    pub fn stats(&self, i: usize) -> serde_json::Value {
        let p = &self.hosts[i].stats;
        let text = std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("reading {}: {e}\n{}", p.display(), self.topo.logs()));
        serde_json::from_str(&text).expect("stats file is JSON")
    }

    /// A counter of port `port` (by name) on host `i`, e.g. `rx_frames` or
    /// `drops.stacked_tags` (0 when absent).
    pub fn port_counter(&self, i: usize, port: &str, path: &str) -> u64 {
        let s = self.stats(i);
        let Some(p) = s["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == port))
        else {
            return 0;
        };
        let mut v = &p["counters"];
        for k in path.split('.') {
            v = &v[k];
        }
        v.as_u64().unwrap_or(0)
    }

    /// Ping from VM `from` to `to_ip`: (sent, received).
    pub fn ping(&self, from: &str, to_ip: &str, count: u32) -> (u32, u32) {
        let o = self.topo.try_sh(
            &self.vm(from).ns,
            &format!("ping -c {count} -i 0.2 -W 1 {to_ip}"),
        );
        parse_ping(&String::from_utf8_lossy(&o.stdout))
    }

    /// An interface counter of VM `vm`'s eth0 (e.g. `rx_packets`).
    pub fn nic_counter(&self, vm: &str, name: &str) -> u64 {
        self.topo
            .sh(
                &self.vm(vm).ns,
                &format!("cat /sys/class/net/eth0/statistics/{name}"),
            )
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

/// (transmitted, received) from ping's summary line.
pub fn parse_ping(out: &str) -> (u32, u32) {
    for line in out.lines() {
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            if nums.len() >= 2 {
                return (nums[0], nums[1]);
            }
        }
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
                   --- 10.0.0.2 ping statistics ---\n\
                   5 packets transmitted, 4 received, 20% packet loss, time 801ms\n";
        assert_eq!(parse_ping(out), (5, 4));
        assert_eq!(parse_ping(""), (0, 0));
    }
}
