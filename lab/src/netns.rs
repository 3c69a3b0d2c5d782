//! `dvs lab --netns`: the same lab with real parts — `dvs controller` in a
//! core namespace, a namespace per host joined to it by a veth on a bridge
//! (the underlay, 10.231.0.0/24) with one `dvs agent` process in each, and
//! VMs that are network namespaces whose NIC is a TAP their host's agent
//! made, with the kernel's own TCP/IP stack. The lab drives the controller
//! through the `dvs` command line, as an admin would. Root only.
//!
//! The same run as in process: every VM pings every other (replies only
//! within a VLAN), a TCP transfer between two hosts' VLAN 10 VMs (when
//! python3 is there to send and check it), then vm1 live-migrates to the
//! last host and back under a ping every 10 ms — begun through the admin
//! API, its NIC moved from the source's TAP to the destination's as a VMM
//! would (QEMU's RARP sent when python3 is there; otherwise the VM's first
//! frame announces it). Real time: a run takes about a minute, and is not
//! reproducible frame for frame.
//!
//! Everything is named with a per-run prefix and removed at the end, even
//! on failure: the processes (ended by PID), the namespaces, the files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dvs_proto::stats::Stats;

use dvs_switch::driver::sys;

use crate::world::{lab_profiles, VLANS};
use crate::{
    vm_mac, HostReport, LabError, LabOptions, MigrationResult, PingResult, Report, TcpResult,
};

/// The underlay: host i is .(i+1), the controller .254.
const UNDERLAY: &str = "10.231.0";
/// The controller's gRPC port.
const CONTROLLER_PORT: u16 = 7700;

fn err(what: impl std::fmt::Display) -> LabError {
    LabError::Netns(what.to_string())
}

/// What a run made, removed on drop.
struct Topo {
    prefix: String,
    dir: PathBuf,
    children: Vec<(String, Child)>,
    namespaces: Vec<String>,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Topo {
    fn new() -> Result<Self, LabError> {
        let prefix = format!("dl{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("dvs-lab-netns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        Ok(Topo {
            prefix,
            dir,
            children: Vec::new(),
            namespaces: Vec::new(),
        })
    }

    /// Run `script` with `sh`; its stdout, or an error with its stderr.
    fn sh(&self, script: &str) -> Result<String, LabError> {
        let o = Command::new("sh")
            .args(["-c", script])
            .output()
            .map_err(|e| err(format!("running sh: {e}")))?;
        if !o.status.success() {
            return Err(err(format!(
                "`{script}` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn ok(&self, script: &str) -> bool {
        self.sh(script).is_ok()
    }

    /// Start `argv`, its output in a log file named `label`.
    fn spawn(&mut self, label: &str, argv: &[&str]) -> Result<(), LabError> {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))
            .map_err(|e| err(format!("creating the log of {label}: {e}")))?;
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .env("DVS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| err(e.to_string()))?)
            .stderr(log)
            .spawn()
            .map_err(|e| err(format!("starting {label} ({}): {e}", argv[0])))?;
        self.children.push((label.to_string(), child));
        Ok(())
    }

    /// The logs of every process, for an error report.
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(l, _)| {
                let text =
                    std::fs::read_to_string(self.dir.join(format!("{l}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {l}\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn add_ns(&mut self, short: &str) -> Result<String, LabError> {
        let ns = format!("{}{short}", self.prefix);
        // No IPv6: a host's kernel would send router solicitations on a
        // TAP made for an incoming VM (the agent counts them as
        // `foreign_wakeup` and switches nothing, but they are noise in
        // the lab's counters), and VMs would chatter.
        self.sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
        ))?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }
}

/// Wait up to `limit` for `f` (not past a SIGINT or SIGTERM).
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end && !sys::terminate_requested() {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// What `child` printed, once it ended; ended (killed) after `limit` or a
/// SIGINT or SIGTERM, with an error naming `what`.
fn wait_child(
    mut child: Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::Output, LabError> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end && !sys::terminate_requested() => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "{what} did not end within {} s (or the lab was interrupted)",
                    limit.as_secs()
                )));
            }
            Err(e) => return Err(err(format!("{what}: {e}"))),
        }
    }
    child
        .wait_with_output()
        .map_err(|e| err(format!("{what}: {e}")))
}

/// The underlay: a bridge in the core namespace `core` and a namespace per
/// host on it, host i at .(i+1); returns the hosts' namespaces.
fn underlay(topo: &mut Topo, core: &str, br: &str, hosts: usize) -> Result<Vec<String>, LabError> {
    let mut host_ns = Vec::new();
    for i in 0..hosts {
        let ns = topo.add_ns(&format!("h{}", i + 1))?;
        let (up, down) = (
            format!("{}u{}", topo.prefix, i + 1),
            format!("{}b{}", topo.prefix, i + 1),
        );
        topo.sh(&format!(
                "ip link add {up} mtu 1600 netns {ns} type veth peer name {down} mtu 1600 netns {core} && \
                 ip -n {core} link set {down} master {br} up && \
                 ip -n {ns} addr add {UNDERLAY}.{}/24 dev {up} && ip -n {ns} link set {up} up",
                i + 1
            ))?;
        host_ns.push(ns);
    }
    Ok(host_ns)
}

/// A VM: its namespace, TAP, address, and the host its NIC is on.
struct NsVm {
    name: String,
    port: String,
    ns: String,
    tap: String,
    mac: String,
    ip: String,
    vlan: u16,
    host: usize,
}

struct NetnsLab {
    topo: Topo,
    /// The `dvs` binary.
    bin: String,
    /// The core namespace (bridge, controller) and each host's.
    core: String,
    host_ns: Vec<String>,
    url: String,
    hosts: usize,
    vms: Vec<NsVm>,
    python: bool,
}

/// Run the lab on namespaces with the `dvs` binary at `dvs`.
///
/// # Errors
/// Not root, a missing tool, or a part that did not come up (with the
/// processes' logs).
pub fn run(opts: &LabOptions, dvs: &Path) -> Result<Report, LabError> {
    // Interrupted, the run ends through its cleanup.
    sys::catch_signals().map_err(|e| err(format!("catching signals: {e}")))?;
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| err(format!("running id: {e}")))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err(err(
            "--netns makes namespaces and TAP devices: run it as root",
        ));
    }
    for tool in ["ip", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(err(format!(
                "--netns needs `{tool}` (Debian: apt-get install iproute2 iputils-ping)"
            )));
        }
    }
    let mut lab = NetnsLab::start(opts, dvs)?;
    lab.run(opts).map_err(|e| lab.with_logs(e))
}

impl NetnsLab {
    fn start(opts: &LabOptions, dvs: &Path) -> Result<Self, LabError> {
        let mut topo = Topo::new()?;
        let bin = dvs.to_string_lossy().into_owned();
        let core = topo.add_ns("c")?;
        let br = format!("{}br", topo.prefix);
        topo.sh(&format!(
            "ip -n {core} link add {br} type bridge && ip -n {core} addr add {UNDERLAY}.254/24 dev {br} && \
             ip -n {core} link set {br} up"
        ))?;
        let host_ns = underlay(&mut topo, &core, &br, opts.hosts)?;
        let data = topo.dir.join("controller").to_string_lossy().into_owned();
        let listen = format!("{UNDERLAY}.254:{CONTROLLER_PORT}");
        topo.spawn(
            "controller",
            &[
                "ip",
                "netns",
                "exec",
                &core,
                &bin,
                "controller",
                "--listen",
                &listen,
                "--data-dir",
                &data,
            ],
        )?;
        let python = topo.ok("command -v python3");
        let mut lab = NetnsLab {
            topo,
            bin,
            core,
            host_ns,
            url: format!("http://{listen}"),
            hosts: opts.hosts,
            vms: Vec::new(),
            python,
        };
        let up = wait_for(Duration::from_secs(10), || {
            lab.admin(&["host", "list"], true).is_ok()
        });
        if !up {
            return Err(lab.with_logs(err("the controller did not come up")));
        }
        lab.create_ports()?;
        lab.start_agents()?;
        lab.plug_vms()?;
        Ok(lab)
    }

    /// Through the command line: the lab's profiles, and a port per VM
    /// bound to its host on a TAP.
    fn create_ports(&mut self) -> Result<(), LabError> {
        let profiles = self.topo.dir.join("profiles.yaml");
        std::fs::write(&profiles, lab_profiles())
            .map_err(|e| err(format!("writing {}: {e}", profiles.display())))?;
        self.admin(
            &["profile", "apply", "-f", &profiles.to_string_lossy()],
            false,
        )?;
        for i in 0..self.hosts {
            for (j, (vlan, _)) in VLANS.iter().enumerate() {
                let n = i * VLANS.len() + j + 1;
                let tap = format!("{}t{n}", self.topo.prefix);
                let (vm, mac) = (format!("vm{n}"), vm_mac(i, j).to_string());
                let (profile, host) = (format!("vlan{vlan}"), format!("h{}", i + 1));
                let port = self.admin(
                    &[
                        "port",
                        "create",
                        "--vm",
                        &vm,
                        "--mac",
                        &mac,
                        "--profile",
                        &profile,
                        "--host",
                        &host,
                        "--tap",
                        &tap,
                    ],
                    false,
                )?;
                self.vms.push(NsVm {
                    name: vm,
                    port: port.lines().next().unwrap_or("").trim().to_string(),
                    ns: String::new(),
                    tap,
                    mac,
                    ip: format!("10.0.0.{n}"),
                    vlan: *vlan,
                    host: i,
                });
            }
        }
        Ok(())
    }

    /// A `dvs agent` in each host's namespace, under the controller.
    fn start_agents(&mut self) -> Result<(), LabError> {
        for i in 0..self.hosts {
            let dir = self.topo.dir.join(format!("h{}", i + 1));
            let stats = self.topo.dir.join(format!("h{}.json", i + 1));
            let (dir, stats) = (
                dir.to_string_lossy().into_owned(),
                stats.to_string_lossy().into_owned(),
            );
            let (host, tunnel) = (format!("h{}", i + 1), format!("{UNDERLAY}.{}", i + 1));
            let (ns, url, bin) = (self.host_ns[i].clone(), self.url.clone(), self.bin.clone());
            self.topo.spawn(
                &format!("agent-{host}"),
                &[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    &bin,
                    "--controller",
                    &url,
                    "agent",
                    "--host",
                    &host,
                    "--tunnel-ip",
                    &tunnel,
                    "--state-dir",
                    &dir,
                    "--stats-file",
                    &stats,
                ],
            )?;
        }
        Ok(())
    }

    /// Each VM's namespace, its NIC the TAP its host's agent made.
    fn plug_vms(&mut self) -> Result<(), LabError> {
        for k in 0..self.vms.len() {
            let (tap, hns) = (
                self.vms[k].tap.clone(),
                self.host_ns[self.vms[k].host].clone(),
            );
            if !wait_for(Duration::from_secs(15), || {
                self.topo.ok(&format!("ip -n {hns} link show {tap}"))
            }) {
                return Err(self.with_logs(err(format!("the agent of {hns} made no TAP {tap}"))));
            }
            let ns = self.topo.add_ns(&format!("v{}", k + 1))?;
            self.vms[k].ns = ns;
            self.topo.sh(&self.plug(k))?;
        }
        Ok(())
    }

    /// `e`, with the tail of every process's log.
    fn with_logs(&self, e: LabError) -> LabError {
        let logs = self.topo.logs();
        match e {
            LabError::Netns(m) => LabError::Netns(format!("{m}\n{logs}")),
            LabError::Controller(m) => LabError::Controller(format!("{m}\n{logs}")),
            e => e,
        }
    }

    /// `dvs ARGS` against the controller, run in the core namespace as an
    /// admin would; what it prints.
    fn admin(&self, args: &[&str], json: bool) -> Result<String, LabError> {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.core,
                &self.bin,
                "--controller",
                &self.url,
                "--output",
            ])
            .arg(if json { "json" } else { "table" })
            .args(args)
            .output()
            .map_err(|e| err(format!("running dvs: {e}")))?;
        if !o.status.success() {
            return Err(LabError::Controller(format!(
                "dvs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The commands that make VM `k`'s TAP (in its host's namespace) its
    /// `eth0`, with its MAC and address, up.
    fn plug(&self, k: usize) -> String {
        let v = &self.vms[k];
        format!(
            "ip -n {from} link set {tap} netns {ns} && ip -n {ns} link set {tap} name eth0 address {mac} && \
             ip -n {ns} addr add {ip}/24 dev eth0 && ip -n {ns} link set eth0 up",
            from = self.host_ns[v.host],
            tap = v.tap,
            ns = v.ns,
            mac = v.mac,
            ip = v.ip
        )
    }

    fn run(&mut self, opts: &LabOptions) -> Result<Report, LabError> {
        let converged = wait_for(Duration::from_secs(15), || {
            self.admin(&["show", "chassis"], true)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    v["interfaces"]
                        .as_array()
                        .map(|ps| ps.iter().all(|p| p["state"] == "up"))
                })
                .unwrap_or(false)
        });
        if !converged {
            return Err(err("the ports did not come up within 15 s"));
        }
        let pings = self.ping_all(opts.pings)?;
        let tcp = self.tcp(0, 2, opts.tcp_bytes)?;
        let mut migrations = Vec::new();
        let last = self.hosts - 1;
        for k in 0..opts.migrations {
            let to = if k % 2 == 0 { last } else { 0 };
            migrations.push(self.migrate(0, to, 2)?);
        }
        // The agents' stats files are written every second.
        std::thread::sleep(Duration::from_millis(1200));
        let json = self.admin(&["show", "chassis"], true)?;
        let chassis =
            serde_json::from_str(&json).map_err(|e| err(format!("the chassis view: {e}")))?;
        Ok(Report {
            netns: true,
            seed: opts.seed,
            loss_ppm: 0,
            fabric: Default::default(),
            virtual_ms: 0,
            chassis,
            chassis_table: self.admin(&["show", "chassis"], false)?,
            hosts: self.host_reports()?,
            pings,
            tcp,
            migrations,
            migrations_table: self.admin(&["migrate", "list"], false)?,
        })
    }

    /// Every VM pings every other, all at once; replies expected within a
    /// VLAN only.
    fn ping_all(&self, count: u16) -> Result<Vec<PingResult>, LabError> {
        let mut running = Vec::new();
        for (a, va) in self.vms.iter().enumerate() {
            for (b, vb) in self.vms.iter().enumerate().filter(|(b, _)| *b != a) {
                let child = Command::new("ip")
                    .args(["netns", "exec", &va.ns, "ping", "-n", "-q", "-c"])
                    .arg(count.to_string())
                    .args(["-i", "0.2", "-W", "1", &vb.ip])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| err(format!("running ping: {e}")))?;
                running.push((a, b, child));
            }
        }
        let mut out = Vec::new();
        for (a, b, child) in running {
            let o = child
                .wait_with_output()
                .map_err(|e| err(format!("ping: {e}")))?;
            let received = received_of(&String::from_utf8_lossy(&o.stdout));
            let same = self.vms[a].vlan == self.vms[b].vlan;
            out.push(PingResult {
                from: self.vms[a].name.clone(),
                to: self.vms[b].name.clone(),
                same_vlan: same,
                sent: count,
                received,
                ok: if same {
                    received == count
                } else {
                    received == 0
                },
            });
        }
        Ok(out)
    }

    /// `bytes` of the pattern from VM `a` to VM `b` over the kernels' TCP,
    /// checked on arrival (needs python3 in the VMs' namespaces).
    fn tcp(&self, a: usize, b: usize, bytes: usize) -> Result<TcpResult, LabError> {
        let (from, to) = (self.vms[a].name.clone(), self.vms[b].name.clone());
        if !self.python {
            return Ok(TcpResult {
                from,
                to,
                bytes_sent: 0,
                bytes_received: 0,
                intact: false,
                millis: 0,
                // Not run, not failed: the report says so.
                ok: true,
            });
        }
        let recv = format!(
            "import socket\nl=socket.socket();l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             l.bind(('{ip}',5201));l.listen(1);c,_=l.accept();n=0;ok=True\n\
             while True:\n d=c.recv(65536)\n if not d: break\n ok=ok and d==bytes((n+k)%251 for k in range(len(d)))\n n+=len(d)\n\
             print(n, ok)",
            ip = self.vms[b].ip
        );
        let send = format!(
            "import socket,time\nfor _ in range(50):\n try:\n  s=socket.create_connection(('{ip}',5201));break\n except OSError: time.sleep(0.1)\n\
             p=bytes(k%251 for k in range(251*256))\nn=0\nwhile n<{bytes}:\n m=min({bytes}-n,251*256)\n s.sendall(p[:m]);n+=m\ns.close()",
            ip = self.vms[b].ip
        );
        let started = Instant::now();
        let receiver = Command::new("ip")
            .args(["netns", "exec", &self.vms[b].ns, "python3", "-c", &recv])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("running python3: {e}")))?;
        std::thread::sleep(Duration::from_millis(200));
        let sender = Command::new("ip")
            .args(["netns", "exec", &self.vms[a].ns, "python3", "-c", &send])
            .spawn()
            .map_err(|e| err(format!("running python3: {e}")))?;
        // The receiver ends with the stream; if the sender failed, at once.
        let sent = wait_child(sender, Duration::from_secs(60), "the TCP sender");
        let wait = if sent.is_ok() { 10 } else { 0 };
        let got = wait_child(receiver, Duration::from_secs(wait), "the TCP receiver");
        let (sent, o) = (sent?.status, got?);
        let text = String::from_utf8_lossy(&o.stdout);
        let mut words = text.split_whitespace();
        let got: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let intact = words.next() == Some("True");
        Ok(TcpResult {
            from,
            to,
            bytes_sent: if sent.success() { bytes } else { 0 },
            bytes_received: got,
            intact,
            millis: started.elapsed().as_millis() as u64,
            ok: sent.success() && got == bytes && intact,
        })
    }

    /// Live-migrate VM `vm` to host `to` under a ping every 10 ms to VM
    /// `peer`: begin (the destination prepares the port and its TAP),
    /// pause (the NIC leaves the source's TAP), the destination's TAP
    /// becomes the NIC, resume (RARP).
    fn migrate(&mut self, vm: usize, to: usize, peer: usize) -> Result<MigrationResult, LabError> {
        let from = self.vms[vm].host;
        let pinger = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.vms[vm].ns,
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
                "-c",
                "300",
                "-W",
                "1",
            ])
            .arg(&self.vms[peer].ip)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("running ping: {e}")))?;
        std::thread::sleep(Duration::from_millis(300));
        let (port, dest) = (self.vms[vm].port.clone(), format!("h{}", to + 1));
        let text = self.admin(
            &["migrate", "start", "--port", &port, "--to", &dest, "--wait"],
            true,
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("migrate start: {e}")))?;
        let id = v[0]["id"].as_u64().unwrap_or(0);
        let (tap, dst) = (self.vms[vm].tap.clone(), self.host_ns[to].clone());
        if !wait_for(Duration::from_secs(10), || {
            self.topo.ok(&format!("ip -n {dst} link show {tap}"))
        }) {
            return Err(err(format!(
                "h{} made no TAP {tap} for the migration",
                to + 1
            )));
        }
        let (ns, src) = (self.vms[vm].ns.clone(), self.host_ns[from].clone());
        let paused = Instant::now();
        // The old NIC goes back to its host under a name of its own; its
        // agent removes it once the port left that host.
        let old = format!("{}o{id}", self.topo.prefix);
        self.vms[vm].host = to;
        self.topo.sh(&format!(
            "ip -n {ns} link set eth0 down && ip -n {ns} link set eth0 name {old} && \
             ip -n {ns} link set {old} netns {src} && {}",
            self.plug(vm)
        ))?;
        let pause = paused.elapsed();
        if self.python {
            let _ = self.topo.sh(&format!(
                "ip netns exec {ns} python3 -c '{}'",
                rarp_script(&self.vms[vm].mac)
            ));
        }
        let done = wait_for(Duration::from_secs(10), || {
            self.record(id).is_ok_and(|m| m["phase"] == "done")
        });
        let o = wait_child(pinger, Duration::from_secs(30), "ping")?;
        let received = u32::from(received_of(&String::from_utf8_lossy(&o.stdout)));
        let record = self.record(id)?;
        let lost = 300u32.saturating_sub(received);
        Ok(MigrationResult {
            vm: self.vms[vm].name.clone(),
            from: format!("h{}", from + 1),
            to: format!("h{}", to + 1),
            pause_ms: pause.as_secs_f64() * 1e3,
            pings_sent: 300,
            pings_lost: lost,
            tcp_bytes: 0,
            tcp_intact: true,
            ok: done
                && record["phase"] == "done"
                && f64::from(lost) <= pause.as_secs_f64() * 100.0 + 10.0,
            record,
        })
    }

    fn record(&self, id: u64) -> Result<serde_json::Value, LabError> {
        let text = self.admin(&["migrate", "list"], true)?;
        let all: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("the migration list: {e}")))?;
        all.as_array()
            .and_then(|a| a.iter().find(|m| m["id"] == id).cloned())
            .ok_or_else(|| err(format!("migration {id} is not listed")))
    }

    /// Each host's ports and tunnel, from its agent's stats file.
    fn host_reports(&self) -> Result<Vec<HostReport>, LabError> {
        (0..self.hosts)
            .map(|i| {
                let path = self.topo.dir.join(format!("h{}.json", i + 1));
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
                let s: Stats = serde_json::from_str(&text)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
                Ok(HostReport {
                    name: s.host,
                    tunnel: format!("{UNDERLAY}.{}", i + 1),
                    ports: s.ports,
                    uplink: s.tunnel,
                    // The agent's stats file counts them (mac_entries),
                    // it does not list them.
                    macs: Vec::new(),
                })
            })
            .collect()
    }
}

/// Replies in `ping -q`'s summary ("3 packets transmitted, 3 received").
fn received_of(out: &str) -> u16 {
    out.lines()
        .find(|l| l.contains("transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|w| w.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A Python script sending, on `eth0`, the RARP announcement QEMU sends
/// for a NIC of MAC `mac` when a VM resumes after a migration.
pub fn rarp_script(mac: &str) -> String {
    format!("{}announce()\n", rarp_announcer(mac))
}

/// Python that loads what the RARP announcement of MAC `mac` needs and
/// defines `announce()`, which sends it on `eth0` (bound when called: the
/// NIC may not be there yet). A script that times the announcement runs
/// this before it waits: importing `socket` takes tens of ms on a busy
/// machine.
pub fn rarp_announcer(mac: &str) -> String {
    let m = mac.replace(':', "");
    format!(
        "import socket\n\
         def announce():\n    \
             s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((\"eth0\", 0))\n    \
             m = bytes.fromhex(\"{m}\")\n    \
             s.send(b\"\\xff\" * 6 + m + b\"\\x80\\x35\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x03\" + m + bytes(4) + m + bytes(4) + bytes(18))\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rarp_script_is_python_that_builds_qemus_frame() {
        // Run with `socket` replaced: the frame it would send on eth0.
        let fake = "import sys, types\n\
             class S:\n    def __init__(self, *a): pass\n    def bind(self, a): assert a == ('eth0', 0)\n    def send(self, b): print(b.hex())\n\
             sys.modules['socket'] = types.SimpleNamespace(socket=S, AF_PACKET=17, SOCK_RAW=3)\n";
        let script = format!("{fake}{}", rarp_script("52:54:00:d0:00:07"));
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mac = "525400d00007";
        let want = format!(
            "ffffffffffff{mac}80350001080006040003{mac}00000000{mac}00000000{}\n",
            "00".repeat(18)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    }

    #[test]
    fn ping_summaries_are_read() {
        let out = "--- 10.0.0.3 ping statistics ---\n3 packets transmitted, 2 received, 33% packet loss, time 402ms\n";
        assert_eq!(received_of(out), 2);
        assert_eq!(received_of("garbage"), 0);
    }
}
