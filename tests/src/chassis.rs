//! A chassis on real kernels for the end-to-end suite: `dvs controller` in
//! the core namespace (on [`CORE_IP`]), a `dvs agent` under it in each host
//! namespace, and VMs as namespaces whose NIC is one end of a veth pair
//! whose other end the agent attaches to (`--netdev`, so that the VM keeps
//! its interface when its host's agent restarts, as with a VMM's tap).
//! Everything goes through the `dvs` command line, as an admin would.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::netns::{dvs_bin, underlay, underlay_ip, wait_for, Topo, CORE_IP};

/// The controller's gRPC port.
pub const PORT: u16 = 7700;
/// The Prometheus port of the controller and of every agent.
pub const METRICS: u16 = 9100;

/// A VM of a [`Chassis`]: (name, host index, address with prefix, profile).
pub type VmDef = (&'static str, usize, &'static str, &'static str);

#[derive(Debug)]
pub struct Chassis {
    pub topo: Topo,
    pub core: String,
    pub hosts: Vec<String>,
    /// (name, namespace, address, port ID).
    pub vms: Vec<(String, String, String, String)>,
    /// VMs whose NIC is a TAP of their host's agent.
    pub taps: Vec<TapVm>,
    /// When the last [`Chassis::swap_nic`] resumed its VM: its new NIC
    /// came up (seen from inside the VM, which announced itself then).
    pub resumed_at: Option<std::time::SystemTime>,
    /// NIC moves so far (names the processes that watch them).
    swaps: usize,
    data_dir: PathBuf,
    /// Mutual TLS: the PKI directory (CA, controller and host certificates).
    pki: Option<PathBuf>,
}

impl Chassis {
    /// Start the controller, apply `profiles` (YAML), make the VMs and
    /// their ports, then start one agent per host and wait until every
    /// host runs the chassis's revision.
    pub fn new(hosts: usize, profiles: &str, vms: &[VmDef]) -> Self {
        Self::build(hosts, profiles, vms, false)
    }

    /// [`Chassis::new`] with mutual TLS between controller and agents
    /// (certificates made with `openssl`: a CA, the controller's for
    /// [`CORE_IP`], one per host naming it) and TLS for admin calls.
    pub fn new_tls(hosts: usize, profiles: &str, vms: &[VmDef]) -> Self {
        Self::build(hosts, profiles, vms, true)
    }

    fn build(hosts: usize, profiles: &str, vms: &[VmDef], tls: bool) -> Self {
        let mut topo = Topo::new();
        let (core, host_ns) = underlay(&mut topo, hosts);
        let data_dir = topo.dir.join("controller");
        let pki = tls.then(|| make_pki(&topo, hosts));
        let mut c = Chassis {
            topo,
            core,
            hosts: host_ns,
            vms: Vec::new(),
            taps: Vec::new(),
            resumed_at: None,
            swaps: 0,
            data_dir,
            pki,
        };
        c.start_controller();
        let file = c.topo.dir.join("profiles.yaml");
        std::fs::write(&file, profiles).expect("write profiles");
        c.ok(&["profile", "apply", "-f", &file.to_string_lossy()]);
        for (name, host, addr, profile) in vms {
            let ns = c.topo.add_ns(&format!("v{name}"));
            let (h, v) = (
                c.topo.name(&format!("n{name}")),
                c.topo.name(&format!("e{name}")),
            );
            let hns = c.hosts[*host].clone();
            c.topo.sh(
                "",
                &format!("ip link add {h} netns {hns} type veth peer name {v} netns {ns}"),
            );
            c.topo.sh(&hns, &format!("ip link set {h} up"));
            c.topo.sh(
                &ns,
                &format!("ip link set {v} name eth0 && ip link set eth0 up && ip addr add {addr} dev eth0"),
            );
            let mac = c
                .topo
                .sh(&ns, "cat /sys/class/net/eth0/address")
                .trim()
                .to_string();
            let id = c.create_port(name, &mac, profile, *host, ("--netdev", &h));
            let ip = addr.split('/').next().unwrap_or(addr).to_string();
            c.vms.push((name.to_string(), ns, ip, id));
        }
        for i in 0..hosts {
            c.start_agent(i);
        }
        c.wait_converged(Duration::from_secs(20));
        c
    }

    /// `dvs port create` of VM `vm` bound to host `host` on `attach`
    /// (`--tap NAME` or `--netdev NAME`); the port's ID.
    fn create_port(
        &self,
        vm: &str,
        mac: &str,
        profile: &str,
        host: usize,
        attach: (&str, &str),
    ) -> String {
        let host = format!("h{}", host + 1);
        self.ok(&[
            "port",
            "create",
            "--vm",
            vm,
            "--mac",
            mac,
            "--profile",
            profile,
            "--host",
            &host,
            attach.0,
            attach.1,
        ])
        .trim()
        .to_string()
    }

    pub fn url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{CORE_IP}:{PORT}")
    }

    /// A PKI file (`ca.pem`, `controller.pem`, `h1.key`, …).
    pub fn pki(&self, name: &str) -> String {
        self.pki
            .as_ref()
            .expect("a TLS chassis")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    pub fn start_controller(&mut self) {
        let bin = dvs_bin().to_string_lossy().into_owned();
        let listen = format!("{CORE_IP}:{PORT}");
        let dir = self.data_dir.to_string_lossy().into_owned();
        let core = self.core.clone();
        let metrics = format!("{CORE_IP}:{METRICS}");
        let mut argv = vec![
            "env",
            "DVS_LOG=info",
            &bin,
            "controller",
            "--listen",
            &listen,
            "--data-dir",
            &dir,
            "--metrics",
            &metrics,
        ];
        let tls: Vec<String> = if self.pki.is_some() {
            vec![
                "--tls-cert".into(),
                self.pki("controller.pem"),
                "--tls-key".into(),
                self.pki("controller.key"),
                "--tls-client-ca".into(),
                self.pki("ca.pem"),
            ]
        } else {
            Vec::new()
        };
        argv.extend(tls.iter().map(String::as_str));
        self.topo.spawn(&core, "controller", &argv);
        let up = wait_for(Duration::from_secs(10), || {
            self.topo
                .sh(&core, "ss -Hltn")
                .contains(&format!(":{PORT}"))
        });
        assert!(up, "the controller never listened:\n{}", self.topo.logs());
    }

    pub fn agent_label(i: usize) -> String {
        format!("agent-h{}", i + 1)
    }

    pub fn stats_file(&self, i: usize) -> PathBuf {
        self.topo.dir.join(format!("h{}-stats.json", i + 1))
    }

    pub fn start_agent(&mut self, i: usize) {
        let label = Self::agent_label(i);
        let host = format!("h{}", i + 1);
        self.start_agent_as(i, &label, &host, &host, &underlay_ip(i));
    }

    /// Start an agent in host `i`'s namespace that registers as `host`
    /// from `tunnel_ip`, with the certificate of `cert_of` on a TLS chassis.
    pub fn start_agent_as(
        &mut self,
        i: usize,
        label: &str,
        host: &str,
        cert_of: &str,
        tunnel_ip: &str,
    ) {
        let bin = dvs_bin().to_string_lossy().into_owned();
        let state = self.topo.dir.join(format!("{label}-state"));
        let stats = self.stats_file(i);
        let ns = self.hosts[i].clone();
        let url = self.url();
        let metrics = format!("{tunnel_ip}:{METRICS}");
        let (state, stats) = (
            state.to_string_lossy().into_owned(),
            stats.to_string_lossy().into_owned(),
        );
        let mut argv = vec![
            "env",
            "DVS_LOG=info",
            &bin,
            "agent",
            "--controller",
            &url,
            "--host",
            host,
            "--tunnel-ip",
            tunnel_ip,
            "--state-dir",
            &state,
            "--stats-file",
            &stats,
            "--metrics",
            &metrics,
        ];
        let tls: Vec<String> = if self.pki.is_some() {
            vec![
                "--tls-ca".into(),
                self.pki("ca.pem"),
                "--tls-cert".into(),
                self.pki(&format!("{cert_of}.pem")),
                "--tls-key".into(),
                self.pki(&format!("{cert_of}.key")),
            ]
        } else {
            Vec::new()
        };
        argv.extend(tls.iter().map(String::as_str));
        self.topo.spawn(&ns, label, &argv);
    }

    /// Run `dvs ARGS` against the controller (from the core namespace).
    pub fn dvs(&self, args: &[&str]) -> Output {
        let bin = dvs_bin().to_string_lossy().into_owned();
        let mut script = format!("{bin} --controller {}", self.url());
        if self.pki.is_some() {
            script.push_str(&format!(" --tls-ca {}", self.pki("ca.pem")));
        }
        for a in args {
            script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        self.topo.try_sh(&self.core, &script)
    }

    /// `dvs ARGS` that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.dvs(args);
        assert!(
            o.status.success(),
            "dvs {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.topo.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `dvs --output json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("--output json prints JSON")
    }

    /// Every host connected and running the chassis's latest revision.
    pub fn converged(&self) -> bool {
        let o = self.dvs(&["--output", "json", "show", "chassis"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
            return false;
        };
        let Some(mods) = v["modules"].as_array() else {
            return false;
        };
        mods.len() == self.hosts.len()
            && mods
                .iter()
                .all(|m| m["connected"] == true && m["acked_revision"] == m["desired_revision"])
    }

    pub fn wait_converged(&self, limit: Duration) {
        let ok = wait_for(limit, || self.converged());
        assert!(
            ok,
            "the hosts did not converge:\n{}\n{}",
            String::from_utf8_lossy(&self.dvs(&["show", "chassis"]).stdout),
            self.topo.logs()
        );
    }

    /// Apply `yaml` as a profile file and wait until every host runs it.
    pub fn apply(&self, yaml: &str) -> String {
        let file = self.topo.dir.join("edit.yaml");
        std::fs::write(&file, yaml).expect("write profiles");
        let out = self.ok(&["profile", "apply", "-f", &file.to_string_lossy()]);
        self.wait_converged(Duration::from_secs(20));
        out
    }

    pub fn vm(&self, name: &str) -> &(String, String, String, String) {
        self.vms
            .iter()
            .find(|v| v.0 == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The Prometheus text of the controller (`None`) or of host `i`'s agent.
    pub fn metrics(&self, host: Option<usize>) -> String {
        let ip = host.map_or_else(|| CORE_IP.to_string(), underlay_ip);
        let ns = host.map_or(self.core.as_str(), |i| self.hosts[i].as_str());
        self.topo.sh(
            ns,
            &format!(
                "/usr/bin/python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://{ip}:{METRICS}/metrics\").read().decode())'"
            ),
        )
    }

    /// Ping from VM `from` to VM `to`: (sent, received).
    pub fn ping(&self, from: &str, to: &str, count: u32) -> (u32, u32) {
        let o = self.topo.try_sh(
            &self.vm(from).1,
            &format!("ping -c {count} -i 0.2 -W 1 {}", self.vm(to).2),
        );
        crate::netns::parse_ping(&String::from_utf8_lossy(&o.stdout))
    }
}

/// A VM whose NIC is a TAP its host's agent opened, moved into the VM's
/// namespace as `eth0` (the kernel side of a TAP is the VM's NIC, as with
/// QEMU).
#[derive(Debug, Clone)]
pub struct TapVm {
    pub name: String,
    /// The TAP's name on every host.
    pub tap: String,
    pub host: usize,
    pub addr: String,
    pub mac: String,
}

impl TapVm {
    /// The commands that make the TAP in namespace `from` the VM's `eth0`
    /// in namespace `ns`, with its MAC and address, up.
    fn plug(&self, from: &str, ns: &str) -> String {
        format!(
            "ip -n {from} link set {tap} netns {ns} && ip -n {ns} link set {tap} name eth0 address {mac} && \
             ip -n {ns} addr add {addr} dev eth0 && ip -n {ns} link set eth0 up",
            tap = self.tap,
            mac = self.mac,
            addr = self.addr
        )
    }
}

/// How a VM's move went, as the test saw it.
#[derive(Debug, Clone)]
pub struct Move {
    pub migration: u64,
    /// The VM had no NIC this long (pause → move → resume).
    pub pause: Duration,
    /// The migration's record once done (`dvs migrate list --output json`).
    pub record: serde_json::Value,
}

impl Chassis {
    /// Add VM `name` on host `host` with a TAP NIC: its port is created
    /// bound to `--tap`, and once the agent made the TAP it becomes the
    /// VM's `eth0` with `mac` and `addr`.
    pub fn add_tap_vm(&mut self, name: &str, host: usize, addr: &str, profile: &str, mac: &str) {
        let ns = self.topo.add_ns(&format!("v{name}"));
        let tap = self.topo.name(&format!("t{name}"));
        let id = self.create_port(name, mac, profile, host, ("--tap", &tap));
        self.wait_converged(Duration::from_secs(20));
        let t = TapVm {
            name: name.to_string(),
            tap,
            host,
            addr: addr.to_string(),
            mac: mac.to_string(),
        };
        self.wait_tap(host, &t.tap);
        self.topo.sh("", &t.plug(&self.hosts[host], &ns));
        let ip = addr.split('/').next().unwrap_or(addr).to_string();
        self.vms.push((name.to_string(), ns, ip, id));
        self.taps.push(t);
    }

    /// `dvs migrate list --output json`.
    pub fn migrations(&self) -> Vec<serde_json::Value> {
        self.json(&["migrate", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn migration(&self, id: u64) -> serde_json::Value {
        self.migrations()
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no migration {id}"))
    }

    /// Wait until migration `id` is in `phase`; returns its record.
    pub fn wait_phase(&self, id: u64, phase: &str, limit: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let ok = wait_for(limit, || {
            last = self.migration(id);
            last["phase"] == phase
        });
        assert!(
            ok,
            "migration {id} did not reach {phase}: {last}
{}",
            self.topo.logs()
        );
        last
    }

    /// Begin migrating TAP VM `name` to host `to` and wait until the
    /// destination has its port with its policy; returns the migration.
    pub fn begin_move(&self, name: &str, to: usize) -> u64 {
        let t = self.tap_vm(name).clone();
        let id = self.vm(name).3.clone();
        let m = self.json(&[
            "migrate",
            "start",
            "--port",
            &id,
            "--to",
            &format!("h{}", to + 1),
            "--tap",
            &t.tap,
            "--wait",
        ]);
        let m = &m[0];
        assert_eq!(m["phase"], "syncing", "{m}");
        m["id"].as_u64().expect("a migration ID")
    }

    /// Move TAP VM `name`'s NIC to host `to`, as a hypervisor moves a VM:
    /// the destination's port is prepared first, then the VM pauses (its
    /// NIC leaves it), its NIC becomes the destination's TAP (same MAC and
    /// addresses: its sockets stay) and it resumes — its first frame
    /// switches the port over. Waits until the migration is done.
    pub fn move_vm(&mut self, name: &str, to: usize) -> Move {
        let migration = self.begin_move(name, to);
        let pause = self.swap_nic(name, to);
        let record = self.wait_phase(migration, "done", Duration::from_secs(10));
        Move {
            migration,
            pause,
            record,
        }
    }

    /// The pause → move → resume of [`Chassis::move_vm`]: the VM's NIC
    /// goes back to its host (if the source has not removed it already)
    /// and the TAP of host `to` becomes its NIC.
    pub fn swap_nic(&mut self, name: &str, to: usize) -> Duration {
        let i = self
            .taps
            .iter()
            .position(|t| t.name == name)
            .expect("a TAP VM");
        let t = self.taps[i].clone();
        let ns = self.vm(name).1.clone();
        let (src, dst) = (self.hosts[t.host].clone(), self.hosts[to].clone());
        self.wait_tap(to, &t.tap);
        // The VM resumes the moment its new NIC is up: a process already
        // running in it sees the old one go and the new one come up, and
        // announces the VM at once (QEMU's RARP), saying when (what the
        // announcement needs is loaded before it waits).
        self.swaps += 1;
        let label = format!("resume-{name}-{}", self.swaps);
        let script = format!(
            "import os, time\n{}\
             def nic():\n    try:\n        return (int(open(\"/sys/class/net/eth0/ifindex\").read()), int(open(\"/sys/class/net/eth0/flags\").read(), 16))\n    except OSError:\n        return (0, 0)\n\
             old = nic()[0]\nprint(\"ready\", flush=True)\n\
             while old and nic()[0] == old:\n    time.sleep(0.0002)\n\
             while not nic()[1] & 1:\n    time.sleep(0.0002)\n\
             t = time.time()\nannounce()\nprint(repr(t), flush=True)\n",
            dvs_lab::netns::rarp_announcer(&t.mac)
        );
        self.topo
            .spawn(&ns, &label, &["/usr/bin/python3", "-c", &script]);
        let ready = wait_for(Duration::from_secs(10), || {
            self.topo.log(&label).contains("ready")
        });
        assert!(ready, "{label}: {}", self.topo.log(&label));
        let start = std::time::Instant::now();
        self.topo.sh(
            "",
            &format!(
                "if ip -n {ns} link show eth0 >/dev/null 2>&1; then \
                   ip -n {ns} link set eth0 netns {src} && ip -n {src} link set eth0 name {tap}x; fi && {}",
                t.plug(&dst, &ns),
                tap = t.tap,
            ),
        );
        let pause = start.elapsed();
        let announced = wait_for(Duration::from_secs(5), || !self.topo.running(&label));
        assert!(announced, "{label} did not see the NIC come up");
        self.resumed_at = self
            .topo
            .log(&label)
            .lines()
            .last()
            .and_then(|l| l.trim().parse::<f64>().ok())
            .map(|t| std::time::UNIX_EPOCH + Duration::from_secs_f64(t));
        self.taps[i].host = to;
        pause
    }

    /// After the agent of TAP VM `name`'s host restarted (its TAP died
    /// with it, as a VMM's NIC would not): plug the new TAP in as `eth0`.
    pub fn replug(&mut self, name: &str) {
        let t = self.tap_vm(name).clone();
        let (ns, hns) = (self.vm(name).1.clone(), self.hosts[t.host].clone());
        self.wait_tap(t.host, &t.tap);
        self.topo.sh(
            "",
            &format!(
                "ip -n {ns} link del eth0 2>/dev/null; {}",
                t.plug(&hns, &ns)
            ),
        );
    }

    /// Wait until host `host`'s agent made TAP `tap`.
    fn wait_tap(&self, host: usize, tap: &str) {
        let hns = &self.hosts[host];
        let made = wait_for(Duration::from_secs(10), || {
            self.topo
                .try_sh(hns, &format!("ip link show {tap}"))
                .status
                .success()
        });
        assert!(
            made,
            "h{} has no TAP {tap}:\n{}",
            host + 1,
            self.topo.logs()
        );
    }

    /// Run libvirt's qemu hook as libvirt on host `host` would for TAP VM
    /// `name` (its domain XML on stdin); `dvs`'s stderr.
    pub fn libvirt_hook(&self, host: usize, name: &str, op: &str, sub: &str) -> String {
        let t = self.tap_vm(name);
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><devices><interface type='ethernet'>\
             <mac address='{}'/><target dev='{}' managed='no'/><model type='virtio'/>\
             </interface></devices></domain>",
            t.mac, t.tap
        );
        let file = self.topo.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        let bin = dvs_bin().to_string_lossy().into_owned();
        let o = self.topo.try_sh(
            &self.core,
            &format!(
                "{bin} --controller {} hook libvirt --host h{} {name} {op} {sub} - < {}",
                self.url(),
                host + 1,
                file.display()
            ),
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "the hook {op} {sub} failed: {err}");
        assert!(
            o.stdout.is_empty(),
            "libvirt would take stdout as the new XML"
        );
        err
    }

    pub fn tap_vm(&self, name: &str) -> &TapVm {
        self.taps
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no TAP VM {name}"))
    }
}

/// A CA, a certificate for the controller (IP SAN [`CORE_IP`]) and one per
/// host (DNS SAN `hN`), made with openssl in the topology's directory.
fn make_pki(topo: &Topo, hosts: usize) -> PathBuf {
    let dir = topo.dir.join("pki");
    std::fs::create_dir_all(&dir).expect("pki dir");
    let d = dir.to_string_lossy();
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let mut script = format!(
        "set -e; cd {d}; \
         openssl req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=dvs-test-ca 2>/dev/null; \
         openssl req {key} -keyout controller.key -out controller.csr -subj /CN=controller 2>/dev/null; \
         openssl x509 -req -in controller.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out controller.pem -days 2 \
           -extfile <(printf 'subjectAltName=IP:{CORE_IP}') 2>/dev/null; "
    );
    for i in 1..=hosts {
        script.push_str(&format!(
            "openssl req {key} -keyout h{i}.key -out h{i}.csr -subj /CN=h{i} 2>/dev/null; \
             openssl x509 -req -in h{i}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out h{i}.pem -days 2 \
               -extfile <(printf 'subjectAltName=DNS:h{i}') 2>/dev/null; "
        ));
    }
    topo.sh("", &script);
    dir
}
