//! The lab's world: hosts (the agent core of `dvs agent` on in-memory
//! ports and an endpoint on the in-memory underlay), VMs, the embedded
//! controller, and the virtual clock they all run on. A tick moves every
//! frame one hop, runs every agent and the controller, and advances the
//! clock; nothing waits on the system's clock.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use dvs_controller::client::{Command, Output};
use dvs_proto::api::{self, agent_message};
use dvs_proto::PortId;
use dvs_switch::agent::core::{desired_config, AgentCore, Desired, Outbound};
use dvs_switch::driver::attach::Attacher;
use dvs_switch::driver::datapath::Datapath;
use dvs_switch::driver::port::Uplink;
use dvs_switch::{Switch, SwitchConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, Ipv4Address};

use crate::control::{ctl_err, Control};
use crate::fabric::{Fabric, VirtualClock};
use crate::vm::{drain, feed, open_wire, send_echo, tcp_socket, MemPort, Vm, VmDevice, Wire};
use crate::{
    vm_mac, HostReport, LabError, LabOptions, MacLine, MigrationResult, PingResult, TcpResult,
};

/// The VLANs of the lab's VMs and their segments' VNIs.
pub const VLANS: [(u16, u32); 2] = [(10, 5010), (20, 5020)];
/// The UDP port of every host's tunnel endpoint.
const VXLAN_PORT: u16 = 4789;
/// What the clock charges for each frame a tick moved (a switch port's
/// receive, a datagram from the underlay, a VM stack's turn), and for a
/// tick in which none moved.
const FRAME_COST: Duration = Duration::from_micros(20);
const IDLE_TICK: Duration = Duration::from_micros(100);
/// How often the controller's timers run.
const TIMER_EVERY: Duration = Duration::from_secs(1);

/// A lab host: the agent core of `dvs agent` on in-memory ports (their
/// wires to the VMs).
struct Host {
    name: String,
    tunnel: IpAddr,
    core: AgentCore<MemPort>,
    attacher: Attacher,
    wires: BTreeMap<PortId, Rc<RefCell<Wire>>>,
}

pub struct Lab {
    clock: VirtualClock,
    /// The wall-clock time the lab began: virtual time 0.
    epoch: Duration,
    pub fabric: Fabric,
    hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub control: Control,
    /// TCP streams opened so far (each on its own ports).
    streams: u16,
    next_timers: Duration,
}

/// Where the hypervisor is in a migration of VM `vm` to host `to`.
struct Hypervisor {
    vm: usize,
    to: usize,
    step: Step,
    /// The migration, once begun.
    id: u64,
    /// When to read the migration's record next.
    next_check: Duration,
    /// How long the VM was paused.
    pause: Duration,
    /// When the migration was seen done.
    done_at: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// The VM runs; the migration begins at `until`.
    Running { until: Duration },
    /// Begun: waiting for it to sync.
    Begun,
    /// Stop-and-copy until `until`.
    Paused { until: Duration },
    /// Running at the destination: waiting for the migration to end.
    Resumed,
}

/// The lab's port profiles: one per VLAN.
pub fn lab_profiles() -> String {
    VLANS
        .iter()
        .map(|(v, _)| {
            format!("kind: PortProfile\nname: vlan{v}\nvlan: {{ mode: access, id: {v} }}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

impl Lab {
    /// The controller with the lab's profiles and VMs' ports; every host
    /// registered, running the agent core on the state it got; a VM on
    /// every port.
    pub fn build(opts: &LabOptions) -> Result<Self, LabError> {
        let clock = VirtualClock::default();
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut control = Control::start(&clock, epoch)?;
        control.view(
            Command::ProfileApply {
                yaml: lab_profiles(),
                dry_run: false,
            },
            Output::Table,
        )?;
        for i in 0..opts.hosts {
            for (j, (vlan, _)) in VLANS.iter().enumerate() {
                let n = i * VLANS.len() + j + 1;
                control.view(
                    Command::PortCreate(api::CreatePortRequest {
                        vm: format!("vm{n}"),
                        mac: vm_mac(i, j).to_string(),
                        profile: format!("vlan{vlan}"),
                        host: format!("h{}", i + 1),
                        tap: format!("vm{n}"),
                        netdev: String::new(),
                        ips: Vec::new(),
                    }),
                    Output::Table,
                )?;
            }
        }
        let fabric = Fabric::new(opts.seed, opts.loss_ppm);
        // Every host registers as an agent and runs the agent core on an
        // empty switch; it takes its state (full, then the changes the
        // others' arrival made: their tunnel addresses, segment peers and
        // VM locations) as `dvs agent` does.
        let mut hosts = Vec::new();
        for i in 0..opts.hosts {
            let name = format!("h{}", i + 1);
            let tunnel = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8));
            control.register(&name, tunnel)?;
            let local = serde_json::json!({ "tunnel": { "local": tunnel.to_string(), "port": VXLAN_PORT } });
            let empty = desired_config(&name, &BTreeMap::new(), &local)
                .map_err(|e| LabError::Controller(format!("host {name}: {e}")))?;
            let uplink = Uplink {
                underlay: Box::new(fabric.endpoint(SocketAddr::new(tunnel, VXLAN_PORT))),
                remote_port: VXLAN_PORT,
            };
            let dp =
                Datapath::new(Switch::new(SwitchConfig::default()), Some(uplink)).map_err(|e| {
                    LabError::Switch(name.clone(), dvs_switch::Error::io("the uplink", e))
                })?;
            hosts.push(Host {
                name,
                tunnel,
                core: AgentCore::new(dp, empty, local, Desired::default(), epoch),
                attacher: Attacher::quiet(),
                wires: BTreeMap::new(),
            });
        }
        let mut lab = Lab {
            clock,
            epoch,
            fabric,
            hosts,
            vms: Vec::new(),
            control,
            streams: 0,
            next_timers: TIMER_EVERY,
        };
        lab.settle()?;
        let vms = opts.hosts * VLANS.len();
        for i in 0..opts.hosts {
            for spec in lab.hosts[i].core.config().ports.clone() {
                let n = spec.port.id.number();
                let vlan = spec.port.vlan.untagged_vlan().map_or(0, |v| v.get());
                let j = VLANS.iter().position(|(v, _)| *v == vlan).unwrap_or(0);
                let vm = Vm::new(
                    format!("vm{n}"),
                    spec.port.id,
                    i,
                    vm_mac(i, j),
                    vlan,
                    Ipv4Address::new(10, 0, 0, n as u8),
                    lab.hosts[i].wires[&spec.port.id].clone(),
                    opts.seed ^ u64::from(n),
                    vms,
                );
                lab.vms.push(vm);
            }
        }
        Ok(lab)
    }

    /// Run the hosts' agents until every host has its state and nothing
    /// has come for a moment.
    fn settle(&mut self) -> Result<(), LabError> {
        let deadline = self.now() + Duration::from_secs(10);
        let mut quiet = 0;
        while quiet < 3 {
            if self.now() > deadline {
                return Err(LabError::Controller(
                    "the hosts' states did not settle within 10 s".into(),
                ));
            }
            let any = self.agents();
            self.control.pump();
            self.clock.advance(Duration::from_millis(1));
            let all = self.hosts.iter().all(|h| h.core.revision() > 0);
            quiet = if any || !all { 0 } else { quiet + 1 };
        }
        Ok(())
    }

    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Every host's agent: what the controller sent goes to the agent
    /// core (a changed desired state is applied and acknowledged,
    /// migration commands carried out), and what the core has goes back:
    /// acks, migration events, reports. Returns whether anything came.
    fn agents(&mut self) -> bool {
        let now = self.now();
        let mut any = false;
        for (i, h) in self.hosts.iter_mut().enumerate() {
            let msgs = self.control.inbound(i);
            any |= !msgs.is_empty();
            for m in msgs {
                let wires = &mut h.wires;
                h.core
                    .on_controller(m, now, &mut h.attacher, |p| Ok(open_wire(wires, p)));
            }
            if h.core.take_changed() {
                let live: Vec<PortId> = h.core.config().ports.iter().map(|p| p.port.id).collect();
                h.wires.retain(|id, _| live.contains(id));
            }
            h.core.tick(now, self.epoch + now, &mut h.attacher);
            for o in h.core.take_outbound() {
                // The lab keeps no state directory: nothing is saved.
                if let Outbound::Send(m) = o {
                    self.control.send(i, m);
                }
            }
        }
        any
    }

    /// One tick: every frame one hop, every agent, the controller; then
    /// the clock moves on by what the frames cost. Returns whether frames
    /// moved.
    pub fn tick(&mut self) -> bool {
        let moved = self.step();
        self.agents();
        self.control.pump();
        if self.now() >= self.next_timers {
            self.next_timers += TIMER_EVERY;
            self.control.timers();
        }
        self.clock.advance(match moved {
            0 => IDLE_TICK,
            n => FRAME_COST * n as u32,
        });
        moved > 0
    }

    /// Move every frame once: switches first, then VM stacks. Returns how
    /// many moved (a VM stack's turn counts one).
    fn step(&mut self) -> usize {
        let now = self.now();
        let mut busy = 0;
        for h in &mut self.hosts {
            let (dp, cfg) = h.core.parts();
            for p in &cfg.ports {
                if let Some(no) = dp.switch.port_by_id(p.port.id) {
                    busy += dp.poll_port(now, no).unwrap_or(0);
                }
            }
            busy += dp.poll_uplink(now).unwrap_or(0);
            dp.handle_timeout(now);
        }
        let t = SmolInstant::from_micros(now.as_micros() as i64);
        for vm in self.vms.iter_mut().filter(|v| !v.paused) {
            let r = vm.iface.poll(t, &mut vm.dev, &mut vm.sockets);
            if r != smoltcp::iface::PollResult::None {
                busy += 1;
            }
        }
        busy
    }

    /// Tick for `d`, or until `until` says so.
    pub fn run_for(&mut self, d: Duration, mut until: impl FnMut(&mut Self) -> bool) {
        let end = self.now() + d;
        while self.now() < end {
            if until(self) {
                return;
            }
            self.tick();
        }
    }

    /// The controller's record of migration `id`.
    fn migration_record(&mut self, id: u64) -> Result<serde_json::Value, LabError> {
        use dvs_controller::client::{Command, Output};
        let text = self.control.view(Command::MigrateList, Output::Json)?;
        let all: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ctl_err("the migration list", e))?;
        all.as_array()
            .and_then(|a| a.iter().find(|m| m["id"] == id).cloned())
            .ok_or_else(|| LabError::Controller(format!("migration {id} is not listed")))
    }

    /// Live-migrate VM `vm` to host `to` while it streams TCP to VM `peer`
    /// (at most `window` bytes ahead of what arrived) and pings it every
    /// 10 ms, as a hypervisor would: begin (the destination prepares the
    /// port), pause the VM (stop-and-copy), plug its NIC into the
    /// destination's port, resume it (QEMU's RARP announcement); the stream
    /// ends 300 ms after the migration is done and must arrive whole.
    pub fn migrate(
        &mut self,
        vm: usize,
        to: usize,
        peer: usize,
        window: usize,
    ) -> Result<MigrationResult, LabError> {
        let from = self.vms[vm].host;
        self.streams += 1;
        let (tcp_port, dst) = (5300 + self.streams, self.vms[peer].ip);
        // A fresh TCP stream vm → peer.
        let (tx, rx) = {
            let a = self.vms[vm].sockets.add(tcp_socket());
            let b = self.vms[peer].sockets.add(tcp_socket());
            let _ = self.vms[peer]
                .sockets
                .get_mut::<tcp::Socket>(b)
                .listen(tcp_port);
            let v = &mut self.vms[vm];
            let cx = v.iface.context();
            let _ = v.sockets.get_mut::<tcp::Socket>(a).connect(
                cx,
                (IpAddress::Ipv4(dst), tcp_port),
                40000 + tcp_port,
            );
            (a, b)
        };
        let (mut sent, mut got, mut intact) = (0usize, 0usize, true);
        let n = self.vms.len();
        let (mut pings_sent, mut replies) = (0u32, vec![vec![0u16; n]; n]);
        let mut next_ping = self.now();
        let deadline = self.now() + Duration::from_secs(30);
        let mut hv = Hypervisor {
            vm,
            to,
            step: Step::Running {
                until: self.now() + Duration::from_millis(300),
            },
            id: 0,
            next_check: Duration::ZERO,
            pause: Duration::ZERO,
            done_at: None,
        };
        let mut chunk = vec![0u8; 16 * 1024];
        while self.now() < deadline {
            let now = self.now();
            self.tick();
            // Traffic.
            if !self.vms[vm].paused {
                let v = &mut self.vms[vm];
                let s = v.sockets.get_mut::<tcp::Socket>(tx);
                let ending = hv
                    .done_at
                    .is_some_and(|t| now > t + Duration::from_millis(300));
                let bytes = if ending { sent } else { got + window };
                if ending {
                    s.close();
                }
                feed(s, &mut sent, bytes, &mut chunk);
                if now >= next_ping {
                    pings_sent += 1;
                    let seq = pings_sent as u16;
                    send_echo(&mut self.vms[vm], peer, dst, seq);
                    next_ping = now + Duration::from_millis(10);
                }
            }
            {
                let v = &mut self.vms[peer];
                let r = v.sockets.get_mut::<tcp::Socket>(rx);
                drain(r, &mut got, &mut intact);
            }
            collect_replies(self, &mut replies);
            // The hypervisor's steps.
            self.hypervisor(&mut hv, now)?;
            if hv
                .done_at
                .is_some_and(|t| now > t + Duration::from_millis(300))
                && got == sent
            {
                break;
            }
        }
        let (record, pause) = (self.migration_record(hv.id)?, hv.pause);
        let lost = pings_sent.saturating_sub(u32::from(replies[vm][peer]));
        Ok(MigrationResult {
            vm: self.vms[vm].name.clone(),
            from: self.hosts[from].name.clone(),
            to: self.hosts[to].name.clone(),
            pause_ms: pause.as_secs_f64() * 1e3,
            pings_sent,
            pings_lost: lost,
            tcp_bytes: got,
            tcp_intact: intact && got == sent,
            ok: record["phase"] == "done"
                && intact
                && got == sent
                && got > 0
                && f64::from(lost) <= pause.as_secs_f64() * 100.0 + 5.0,
            record,
        })
    }

    /// [`Lab::migration_record`]; an aborted migration is an error.
    fn live_record(&mut self, id: u64) -> Result<serde_json::Value, LabError> {
        let m = self.migration_record(id)?;
        if m["phase"] == "aborted" {
            return Err(LabError::Controller(format!("migration aborted: {m}")));
        }
        Ok(m)
    }

    /// The hypervisor's next step of a migration, when its time came:
    /// begin (the destination prepares the port), pause the VM when the
    /// migration syncs (stop-and-copy), plug its NIC into the
    /// destination's port and resume it (QEMU's RARP), then watch the
    /// migration end.
    fn hypervisor(&mut self, hv: &mut Hypervisor, now: Duration) -> Result<(), LabError> {
        use dvs_controller::client::{Command, Output};
        const PAUSE: Duration = Duration::from_millis(20);
        let (vm, to) = (hv.vm, hv.to);
        let port = self.vms[vm].port;
        match hv.step {
            Step::Running { until } if now >= until => {
                let text = self.control.view(
                    Command::MigrateStart {
                        req: api::StartMigrationRequest {
                            port: port.to_string(),
                            to: self.hosts[to].name.clone(),
                            ..Default::default()
                        },
                        wait: false,
                    },
                    Output::Json,
                )?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| ctl_err("migrate start", e))?;
                hv.id = v[0]["id"].as_u64().unwrap_or(0);
                hv.step = Step::Begun;
            }
            Step::Begun if now >= hv.next_check => {
                hv.next_check = now + Duration::from_millis(5);
                if self.live_record(hv.id)?["phase"] == "syncing" {
                    // Stop-and-copy: the VM stops running.
                    self.vms[vm].paused = true;
                    hv.step = Step::Paused { until: now + PAUSE };
                }
            }
            Step::Paused { until } if now >= until => {
                // Its NIC is now the destination's port; it resumes and
                // QEMU announces it.
                let wire = self.hosts[to].wires.get(&port).cloned().ok_or_else(|| {
                    LabError::Controller(format!("{} has no port {port}", self.hosts[to].name))
                })?;
                let rarp = dvs_switch::wire::announce::rarp(self.vms[vm].mac);
                wire.borrow_mut().from_vm.push_back(rarp.to_vec());
                let v = &mut self.vms[vm];
                v.dev = VmDevice(wire);
                v.host = to;
                v.paused = false;
                hv.pause = PAUSE + (now - until);
                hv.step = Step::Resumed;
            }
            Step::Resumed if now >= hv.next_check => {
                hv.next_check = now + Duration::from_millis(20);
                let m = self.live_record(hv.id)?;
                if m["phase"] == "done" && m["first_frame_at_destination_ms"].is_number() {
                    hv.done_at.get_or_insert(now);
                }
            }
            _ => {}
        }
        Ok(())
    }

    #[allow(clippy::needless_range_loop)] // a VM-by-VM matrix reads best by index
    pub fn ping_all(&mut self, count: u16) -> Vec<PingResult> {
        let n = self.vms.len();
        let same = |lab: &Lab, a: usize, b: usize| a != b && lab.vms[a].vlan == lab.vms[b].vlan;
        // Warm-up, as on any host: resolve the same-VLAN neighbours first
        // (smoltcp sends at most one ARP request per second per VM).
        let mut warm = vec![vec![0u16; n]; n];
        let deadline = self.now() + Duration::from_secs(2 * n as u64);
        while self.now() < deadline {
            let mut pending = false;
            for a in 0..n {
                for b in 0..n {
                    if same(self, a, b) && warm[a][b] == 0 {
                        pending = true;
                        let dst = self.vms[b].ip;
                        send_echo(&mut self.vms[a], b, dst, 0);
                    }
                }
            }
            if !pending {
                break;
            }
            self.run_for(Duration::from_millis(250), |lab| {
                collect_replies(lab, &mut warm);
                false
            });
        }
        // Measured rounds to every other VM.
        let mut received = vec![vec![0u16; n]; n];
        for round in 1..=count {
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        let dst = self.vms[b].ip;
                        send_echo(&mut self.vms[a], b, dst, round);
                    }
                }
            }
            self.run_for(Duration::from_millis(200), |lab| {
                collect_replies(lab, &mut received);
                false
            });
        }
        let mut out = Vec::new();
        for a in 0..n {
            for b in 0..n {
                if a == b {
                    continue;
                }
                let same = same(self, a, b);
                let r = received[a][b];
                out.push(PingResult {
                    from: self.vms[a].name.clone(),
                    to: self.vms[b].name.clone(),
                    same_vlan: same,
                    sent: count,
                    received: r,
                    ok: if same { r == count } else { r == 0 },
                });
            }
        }
        out
    }

    /// Send `bytes` from the first VM of host `a_vm` to VM index `b_vm` over TCP.
    pub fn tcp_transfer(&mut self, a: usize, b: usize, bytes: usize) -> TcpResult {
        const PORT: u16 = 5201;
        let (from, to) = (self.vms[a].name.clone(), self.vms[b].name.clone());
        let dst = self.vms[b].ip;
        let started = self.now();
        {
            let vm = &mut self.vms[b];
            let _ = vm.sockets.get_mut::<tcp::Socket>(vm.tcp).listen(PORT);
        }
        {
            let vm = &mut self.vms[a];
            let cx = vm.iface.context();
            let _ = vm.sockets.get_mut::<tcp::Socket>(vm.tcp).connect(
                cx,
                (IpAddress::Ipv4(dst), PORT),
                49152,
            );
        }
        let mut sent = 0usize;
        let mut got = 0usize;
        let mut intact = true;
        let mut chunk = vec![0u8; 16 * 1024];
        self.run_for(Duration::from_secs(30), |lab| {
            let vm = &mut lab.vms[a];
            let s = vm.sockets.get_mut::<tcp::Socket>(vm.tcp);
            feed(s, &mut sent, bytes, &mut chunk);
            if sent == bytes {
                s.close();
            }
            let vm = &mut lab.vms[b];
            let r = vm.sockets.get_mut::<tcp::Socket>(vm.tcp);
            drain(r, &mut got, &mut intact);
            got >= bytes
        });
        let millis = (self.now() - started).as_millis() as u64;
        TcpResult {
            from,
            to,
            bytes_sent: sent,
            bytes_received: got,
            intact,
            millis,
            ok: got == bytes && intact,
        }
    }

    /// Every host reports its counters to the controller, as agents do;
    /// then the controller's chassis view, as JSON and as a table.
    pub fn chassis_view(&mut self) -> Result<(serde_json::Value, String), LabError> {
        use dvs_controller::client::{Command, Output};
        let now = self.now();
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            if let Ok(stats_json) = serde_json::to_string(&h.core.dp.stats(&h.name, now)) {
                self.control
                    .send(i, agent_message::Msg::Report(api::Report { stats_json }));
            }
            self.control.pump();
        }
        // Reports are taken in by the controller's session tasks.
        let mut json = serde_json::Value::Null;
        for _ in 0..50 {
            let text = self.control.view(Command::ShowChassis, Output::Json)?;
            json = serde_json::from_str(&text).map_err(|e| ctl_err("the chassis view", e))?;
            let up = json["interfaces"]
                .as_array()
                .is_some_and(|ps| ps.iter().all(|p| p["state"] == "up"));
            if up {
                break;
            }
            self.run_for(Duration::from_millis(20), |_| false);
        }
        let table = self.control.view(Command::ShowChassis, Output::Table)?;
        Ok((json, table))
    }

    pub fn host_reports(&self) -> Vec<HostReport> {
        let now = self.now();
        self.hosts
            .iter()
            .map(|h| {
                let dp = &h.core.dp;
                let stats = dp.stats(&h.name, now);
                HostReport {
                    name: h.name.clone(),
                    tunnel: h.tunnel.to_string(),
                    ports: stats.ports,
                    uplink: stats.tunnel,
                    macs: dp
                        .switch
                        .mac_entries(now)
                        .into_iter()
                        .map(|e| MacLine {
                            vlan: e.vlan.get(),
                            mac: e.mac.to_string(),
                            at: match e.location {
                                dvs_switch::Location::Port(p) => dp.switch.port(p).map_or_else(
                                    || format!("port {}", p.0),
                                    |(c, _)| format!("{} ({})", c.id, c.name),
                                ),
                                dvs_switch::Location::Remote(ip) => {
                                    let host = self
                                        .hosts
                                        .iter()
                                        .find(|o| o.tunnel == ip)
                                        .map_or("?", |o| o.name.as_str());
                                    format!("remote {host} ({ip})")
                                }
                            },
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

pub fn collect_replies(lab: &mut Lab, received: &mut [Vec<u16>]) {
    let ips: Vec<Ipv4Address> = lab.vms.iter().map(|v| v.ip).collect();
    for (a, vm) in lab.vms.iter_mut().enumerate() {
        for h in vm.icmp.clone() {
            let s = vm.sockets.get_mut::<icmp::Socket>(h);
            while let Ok((payload, from)) = s.recv() {
                let Ok(pkt) = Icmpv4Packet::new_checked(payload) else {
                    continue;
                };
                let Ok(Icmpv4Repr::EchoReply { .. }) =
                    Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default())
                else {
                    continue;
                };
                if let Some(b) = ips.iter().position(|ip| IpAddress::Ipv4(*ip) == from) {
                    received[a][b] += 1;
                }
            }
        }
    }
}
