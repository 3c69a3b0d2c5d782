//! The in-process lab: an embedded controller (its store in a temporary
//! directory, its gRPC services on a loopback port) and N hosts under it,
//! each a real [`Datapath`] with a VXLAN socket on its own loopback address
//! (127.0.0.10+i), joined as one fabric; two VMs per host — smoltcp TCP/IP
//! stacks on in-memory ports — one on VLAN 10 and one on VLAN 20, all in one
//! IP subnet so that any VLAN leak would show.
//!
//! The controller gets the lab's port profiles and VM ports through its
//! admin API; each host registers over the agent API and runs the agent
//! core of `dvs agent` ([`AgentCore`]) on its in-memory ports: it takes its
//! state (full, then the deltas the other hosts' arrival caused), checks it
//! as an agent file and runs it, acknowledges it, carries out migration
//! commands and reports its counters.
//!
//! A run: every VM pings every other VM (replies expected only within a
//! VLAN), then a TCP transfer between two hosts' VLAN 10 VMs; the report
//! holds the controller's chassis view, the reachability matrix, the
//! transfer, and every host's ports, counters and MAC table.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use dvs_proto::api::{self, agent_message};
use dvs_proto::stats::PortStats;
use dvs_proto::PortId;
use dvs_proto::{MacAddr, VlanMode};
use dvs_switch::agent::config::PortSpec;
use dvs_switch::agent::core::{desired_config, AgentCore, Desired, Outbound};
use dvs_switch::driver::attach::Attacher;
use dvs_switch::driver::datapath::Datapath;
use dvs_switch::driver::port::{PortIo, RxMeta, Uplink};
use dvs_switch::wire::VnetHdr;
use dvs_switch::{Switch, SwitchConfig, TunnelCounters};
use serde::Serialize;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address};

/// What to run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Bytes moved by the TCP transfer.
    pub tcp_bytes: usize,
    /// Echo requests from each VM to each other VM.
    pub pings: u16,
    /// Seed for the VMs' stacks (TCP initial sequence numbers, ports).
    pub seed: u64,
    /// Live migrations of vm1 (to the last host and back, alternately).
    pub migrations: usize,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            hosts: 2,
            tcp_bytes: 4 << 20,
            pings: 3,
            seed: 0x5eed,
            migrations: 2,
        }
    }
}

/// Errors that stop the lab before it reports.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("binding the VXLAN socket of host {host} to {addr}")]
    Bind {
        host: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("configuring the switch of host {0}")]
    Switch(String, #[source] dvs_switch::Error),
    #[error("the lab needs 2 to 8 hosts, not {0}")]
    Hosts(usize),
    #[error("the lab's controller: {0}")]
    Controller(String),
}

/// The lab's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The embedded controller's view (`dvs show chassis --output json`).
    pub chassis: serde_json::Value,
    /// The same as `dvs show chassis` prints it.
    #[serde(skip)]
    pub chassis_table: String,
    pub hosts: Vec<HostReport>,
    pub pings: Vec<PingResult>,
    pub tcp: TcpResult,
    pub migrations: Vec<MigrationResult>,
    /// `dvs migrate list` as it prints.
    #[serde(skip)]
    pub migrations_table: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub name: String,
    pub tunnel: String,
    pub ports: Vec<PortStats>,
    pub uplink: TunnelCounters,
    pub macs: Vec<MacLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MacLine {
    pub vlan: u16,
    pub mac: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PingResult {
    pub from: String,
    pub to: String,
    pub same_vlan: bool,
    pub sent: u16,
    pub received: u16,
    /// Replies expected (same VLAN) and none missing, or none expected and
    /// none received.
    pub ok: bool,
}

/// A live migration under traffic, as the lab saw it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationResult {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// How long the VM was paused (its stop-and-copy).
    pub pause_ms: f64,
    /// Pings every 10 ms to a peer for the whole migration.
    pub pings_sent: u32,
    pub pings_lost: u32,
    /// The TCP stream to the peer that ran across it.
    pub tcp_bytes: usize,
    pub tcp_intact: bool,
    /// The controller's record: phase and timeline (`dvs migrate list`).
    pub record: serde_json::Value,
    /// Done, the stream intact, and no more pings lost than the pause's.
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpResult {
    pub from: String,
    pub to: String,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// The received bytes match the pattern sent.
    pub intact: bool,
    pub millis: u64,
    pub ok: bool,
}

impl Report {
    /// Every check passed.
    pub fn ok(&self) -> bool {
        self.tcp.ok && self.pings.iter().all(|p| p.ok) && self.migrations.iter().all(|m| m.ok)
    }

    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dvs lab — an embedded controller and {} hosts joined by VXLAN over loopback\n",
            self.hosts.len()
        );
        let _ = writeln!(s, "{}", self.chassis_table);
        for h in &self.hosts {
            let _ = writeln!(s, "module {} (tunnel {})", h.name, h.tunnel);
            let _ = writeln!(
                s,
                "  {:<8} {:<8} {:<10} {:>9} {:>9} {:>9} {:>9}  drops",
                "port", "name", "vlan", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes"
            );
            for p in &h.ports {
                let c = &p.counters;
                let drops: Vec<String> =
                    c.drops.nonzero().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    s,
                    "  {:<8} {:<8} {:<10} {:>9} {:>9} {:>9} {:>9}  {}",
                    p.id,
                    p.name,
                    p.vlan,
                    c.rx_frames,
                    c.rx_bytes,
                    c.tx_frames,
                    c.tx_bytes,
                    if drops.is_empty() {
                        "-".into()
                    } else {
                        drops.join(",")
                    }
                );
            }
            let u = &h.uplink;
            let _ = writeln!(
                s,
                "  vxlan    rx {} pkts / {} B, tx {} pkts / {} B, drops {}",
                u.rx_packets,
                u.rx_bytes,
                u.tx_packets,
                u.tx_bytes,
                u.drops.total()
            );
            let _ = writeln!(s, "  MAC table:");
            for m in &h.macs {
                let _ = writeln!(s, "    vlan {:<5} {}  {}", m.vlan, m.mac, m.at);
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "reachability (ping, {} requests each):",
            self.pings.first().map_or(0, |p| p.sent)
        );
        for p in &self.pings {
            let _ = writeln!(
                s,
                "  {:<8} -> {:<8} {:<14} {}/{} replies  {}",
                p.from,
                p.to,
                if p.same_vlan {
                    "same VLAN"
                } else {
                    "other VLAN"
                },
                p.received,
                p.sent,
                if p.ok { "ok" } else { "FAIL" }
            );
        }
        let t = &self.tcp;
        let _ = writeln!(
            s,
            "\nTCP {} -> {}: {} of {} bytes in {} ms, {} — {}",
            t.from,
            t.to,
            t.bytes_received,
            t.bytes_sent,
            t.millis,
            if t.intact { "intact" } else { "CORRUPT" },
            if t.ok { "ok" } else { "FAIL" }
        );
        if !self.migrations.is_empty() {
            let _ = writeln!(
                s,
                "\nlive migrations, each under a TCP stream and a ping every 10 ms (dvs migrate list):\n{}",
                self.migrations_table
            );
        }
        for m in &self.migrations {
            let r = &m.record;
            let ms = |k: &str| {
                r[k].as_f64()
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"))
            };
            let _ = writeln!(
                s,
                "  {} {} -> {}: policy ready {}, switchover {} ({}), last frame at source {}, first at destination {}, blackout {}; VM paused {:.1} ms; pings {}/{} lost; TCP {} B {} — {}",
                m.vm,
                m.from,
                m.to,
                ms("policy_ready_ms"),
                ms("switchover_ms"),
                r["trigger"].as_str().unwrap_or("-"),
                ms("last_frame_at_source_ms"),
                ms("first_frame_at_destination_ms"),
                ms("blackout_ms"),
                m.pause_ms,
                m.pings_lost,
                m.pings_sent,
                m.tcp_bytes,
                if m.tcp_intact { "intact" } else { "CORRUPT" },
                if m.ok { "ok" } else { "FAIL" }
            );
        }
        let _ = writeln!(
            s,
            "\nresult: {}",
            if self.ok() {
                "all checks passed"
            } else {
                "FAILED"
            }
        );
        s
    }
}

/// Run the lab and report.
///
/// # Errors
/// [`LabError`] when the fabric cannot be set up (a socket cannot be bound).
pub fn run(opts: LabOptions) -> Result<Report, LabError> {
    if !(2..=8).contains(&opts.hosts) {
        return Err(LabError::Hosts(opts.hosts));
    }
    let mut lab = Lab::build(&opts)?;
    let pings = lab.ping_all(opts.pings);
    let tcp = lab.tcp_transfer(0, 2, opts.tcp_bytes);
    // vm1 (h1, VLAN 10) moves to the last host and back, streaming to
    // VLAN 10's VM on h2.
    let mut migrations = Vec::new();
    let last = opts.hosts - 1;
    for k in 0..opts.migrations {
        let to = if k % 2 == 0 { last } else { 0 };
        migrations.push(lab.migrate(0, to, 2, 256 * 1024)?);
    }
    let migrations_table = lab.control.view(
        dvs_controller::client::Command::MigrateList,
        dvs_controller::client::Output::Table,
    )?;
    let (chassis, chassis_table) = lab.chassis_view()?;
    Ok(Report {
        chassis,
        chassis_table,
        hosts: lab.host_reports(),
        pings,
        tcp,
        migrations,
        migrations_table,
    })
}

/// Frames between a VM and its switch port.
#[derive(Debug, Default)]
struct Wire {
    to_vm: VecDeque<Vec<u8>>,
    from_vm: VecDeque<Vec<u8>>,
}

/// The switch side of an in-memory port.
#[derive(Debug)]
struct MemPort(Rc<RefCell<Wire>>);

impl dvs_switch::driver::attach::Device for MemPort {
    fn ifindex(&self) -> u32 {
        0
    }
}

impl PortIo for MemPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<RxMeta> {
        let Some(f) = self.0.borrow_mut().from_vm.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(RxMeta {
            len: n,
            ..RxMeta::default()
        })
    }

    fn send(&mut self, _: Option<&VnetHdr>, parts: &[IoSlice<'_>]) -> io::Result<()> {
        let mut w = self.0.borrow_mut();
        if w.to_vm.len() >= 1024 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        w.to_vm
            .push_back(parts.iter().flat_map(|p| p.iter().copied()).collect());
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(MemPort(self.0.clone()))
    }
}

/// The VM side of an in-memory port (a smoltcp device).
struct VmDevice(Rc<RefCell<Wire>>);

struct VmRx(Vec<u8>);
struct VmTx(Rc<RefCell<Wire>>);

impl phy::RxToken for VmRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for VmTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.borrow_mut().from_vm.push_back(buf);
        r
    }
}

impl Device for VmDevice {
    type RxToken<'a> = VmRx;
    type TxToken<'a> = VmTx;

    fn receive(&mut self, _: SmolInstant) -> Option<(VmRx, VmTx)> {
        let f = self.0.borrow_mut().to_vm.pop_front()?;
        Some((VmRx(f), VmTx(self.0.clone())))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<VmTx> {
        Some(VmTx(self.0.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Vm {
    name: String,
    /// Its port, and the host whose port its NIC is plugged into.
    port: PortId,
    host: usize,
    /// Paused (a migration's stop-and-copy): not run.
    paused: bool,
    mac: MacAddr,
    vlan: u16,
    ip: Ipv4Address,
    dev: VmDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// One ICMP socket per other VM (index = the target VM's index).
    icmp: Vec<SocketHandle>,
    tcp: SocketHandle,
}

/// A lab host: the agent core of `dvs agent` on in-memory ports (their
/// wires to the VMs).
struct Host {
    name: String,
    tunnel: IpAddr,
    core: AgentCore<MemPort>,
    attacher: Attacher,
    wires: BTreeMap<PortId, Rc<RefCell<Wire>>>,
}

struct Lab {
    start: Instant,
    /// The wall-clock time of `start`.
    epoch: Duration,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    control: Control,
    /// TCP streams opened so far (each on its own ports).
    streams: u16,
}

const VLANS: [(u16, u32); 2] = [(10, 5010), (20, 5020)];
const ICMP_IDENT: u16 = 0x22;

/// An agent session of a lab host: what it sends, and what it receives
/// (kept open, so that the host stays connected).
struct Session {
    tx: tokio::sync::mpsc::Sender<api::AgentMessage>,
    /// What the controller sends (a task of the runtime reads the stream).
    inbound: std::sync::mpsc::Receiver<api::ControllerMessage>,
}

/// The lab's embedded controller and its hosts' sessions.
struct Control {
    rt: tokio::runtime::Runtime,
    url: String,
    dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    sessions: Vec<Session>,
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.sessions.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctl_err(what: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Controller(format!("{what}: {e}"))
}

/// The lab's port profiles: one per VLAN.
fn lab_profiles() -> String {
    VLANS
        .iter()
        .map(|(v, _)| {
            format!("kind: PortProfile\nname: vlan{v}\nvlan: {{ mode: access, id: {v} }}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

impl Control {
    /// Start a controller on a loopback port with a fresh store, apply the
    /// lab's profiles and create its VMs' ports, bound to their hosts.
    fn start(hosts: usize) -> Result<Self, LabError> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dvs-lab-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| ctl_err("starting the controller's runtime", e))?;
        let controller = dvs_controller::server::Controller::open(&dir)
            .map_err(|e| ctl_err("opening the controller's store", e))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| ctl_err("binding the controller", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ctl_err("binding the controller", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(dvs_controller::server::serve_on(
            controller,
            listener,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        let c = Control {
            rt,
            url: format!("http://{addr}"),
            dir,
            stop: Some(stop),
            sessions: Vec::new(),
        };
        c.view(
            dvs_controller::client::Command::ProfileApply {
                yaml: lab_profiles(),
                dry_run: false,
            },
            dvs_controller::client::Output::Table,
        )?;
        for i in 0..hosts {
            for (j, (vlan, _)) in VLANS.iter().enumerate() {
                let n = i * VLANS.len() + j + 1;
                c.view(
                    dvs_controller::client::Command::PortCreate(api::CreatePortRequest {
                        vm: format!("vm{n}"),
                        mac: vm_mac(i, j).to_string(),
                        profile: format!("vlan{vlan}"),
                        host: format!("h{}", i + 1),
                        tap: format!("vm{n}"),
                        netdev: String::new(),
                    }),
                    dvs_controller::client::Output::Table,
                )?;
            }
        }
        Ok(c)
    }

    fn view(
        &self,
        cmd: dvs_controller::client::Command,
        out: dvs_controller::client::Output,
    ) -> Result<String, LabError> {
        self.rt
            .block_on(dvs_controller::client::run(&self.url, None, None, cmd, out))
            .map_err(|e| ctl_err("the controller", e))
    }

    /// Host `name` registers as an agent from `tunnel` and gets its state.
    fn register(&mut self, name: &str, tunnel: IpAddr) -> Result<(), LabError> {
        let url = self.url.clone();
        let (name, tunnel) = (name.to_string(), tunnel.to_string());
        let (fwd, inbound) = std::sync::mpsc::channel();
        let s = self.rt.block_on(async move {
            let mut client = api::agent_client::AgentClient::connect(url)
                .await
                .map_err(|e| ctl_err("connecting to the controller", e))?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let _ = tx
                .send(api::AgentMessage {
                    msg: Some(agent_message::Msg::Register(api::Register {
                        host: name,
                        tunnel_ip: tunnel,
                        revision: 0,
                    })),
                })
                .await;
            let mut stream = client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|s| ctl_err("registering", s.message()))?
                .into_inner();
            tokio::spawn(async move {
                while let Ok(Some(m)) = stream.message().await {
                    if fwd.send(m).is_err() {
                        return;
                    }
                }
            });
            Ok::<_, LabError>(Session { tx, inbound })
        })?;
        self.sessions.push(s);
        Ok(())
    }

    /// Send host `i`'s agent message.
    fn send(&self, i: usize, m: agent_message::Msg) {
        let tx = self.sessions[i].tx.clone();
        self.rt.block_on(async move {
            let _ = tx.send(api::AgentMessage { msg: Some(m) }).await;
        });
    }
}

impl Lab {
    fn build(opts: &LabOptions) -> Result<Self, LabError> {
        let start = Instant::now();
        let mut control = Control::start(opts.hosts)?;
        let tunnels: Vec<IpAddr> = (0..opts.hosts)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8)))
            .collect();
        // One UDP port for the whole fabric, free on every host's address.
        let mut sockets = Vec::new();
        let mut port = 0;
        for (i, t) in tunnels.iter().enumerate() {
            let addr = SocketAddr::new(*t, port);
            let s = UdpSocket::bind(addr).map_err(|source| LabError::Bind {
                host: format!("h{}", i + 1),
                addr,
                source,
            })?;
            if port == 0 {
                port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            }
            s.set_nonblocking(true).map_err(|source| LabError::Bind {
                host: format!("h{}", i + 1),
                addr,
                source,
            })?;
            sockets.push(s);
        }
        // Every host registers as an agent and runs the agent core on an
        // empty switch; it takes its state (full, then the changes the
        // others' arrival made: their tunnel addresses, segment peers and
        // VM locations) as `dvs agent` does.
        for (i, t) in tunnels.iter().enumerate() {
            control.register(&format!("h{}", i + 1), *t)?;
        }
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(start.elapsed());
        let mut hosts = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let name = format!("h{}", i + 1);
            let local =
                serde_json::json!({ "tunnel": { "local": tunnels[i].to_string(), "port": port } });
            let empty = desired_config(&name, &BTreeMap::new(), &local)
                .map_err(|e| LabError::Controller(format!("host {name}: {e}")))?;
            let dp = Datapath::new(
                Switch::new(SwitchConfig::default()),
                Some(Uplink {
                    socket,
                    remote_port: port,
                }),
            )
            .map_err(|source| LabError::Bind {
                host: name.clone(),
                addr: SocketAddr::new(tunnels[i], port),
                source,
            })?;
            hosts.push(Host {
                name,
                tunnel: tunnels[i],
                core: AgentCore::new(dp, empty, local, Desired::default(), epoch),
                attacher: Attacher::quiet(),
                wires: BTreeMap::new(),
            });
        }
        let mut lab = Lab {
            start,
            epoch,
            hosts,
            vms: Vec::new(),
            control,
            streams: 0,
        };
        lab.settle()?;
        let now = SmolInstant::from_millis(0);
        for i in 0..opts.hosts {
            for spec in lab.hosts[i].core.config().ports.clone() {
                let n = spec.port.id.number();
                let vm_name = format!("vm{n}");
                let vlan = match &spec.port.vlan {
                    VlanMode::Access(v) => v.get(),
                    VlanMode::Trunk { native, .. } => native.map_or(0, |v| v.get()),
                };
                let j = VLANS.iter().position(|(v, _)| *v == vlan).unwrap_or(0);
                let mac = vm_mac(i, j).0;
                let ip = Ipv4Address::new(10, 0, 0, n as u8);
                let mut dev = VmDevice(lab.hosts[i].wires[&spec.port.id].clone());
                let mut cfg = Config::new(EthernetAddress(mac).into());
                cfg.random_seed = opts.seed ^ u64::from(n);
                let mut iface = Interface::new(cfg, &mut dev, now);
                iface.update_ip_addrs(|a| {
                    let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
                });
                let mut sockets = SocketSet::new(Vec::new());
                let icmp = (0..opts.hosts * VLANS.len())
                    .map(|t| {
                        let h = sockets.add(icmp::Socket::new(
                            icmp::PacketBuffer::new(
                                vec![icmp::PacketMetadata::EMPTY; 8],
                                vec![0; 1024],
                            ),
                            icmp::PacketBuffer::new(
                                vec![icmp::PacketMetadata::EMPTY; 8],
                                vec![0; 1024],
                            ),
                        ));
                        let _ = sockets
                            .get_mut::<icmp::Socket>(h)
                            .bind(icmp::Endpoint::Ident(ICMP_IDENT + t as u16));
                        h
                    })
                    .collect();
                let tcp = sockets.add(tcp_socket());
                lab.vms.push(Vm {
                    name: vm_name,
                    port: spec.port.id,
                    host: i,
                    paused: false,
                    mac: MacAddr(mac),
                    vlan,
                    ip,
                    dev,
                    iface,
                    sockets,
                    icmp,
                    tcp,
                });
            }
        }
        Ok(lab)
    }

    /// Run the hosts' agents until every host has its state and nothing
    /// has come for a moment.
    fn settle(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut quiet = 0;
        while quiet < 3 {
            if Instant::now() > deadline {
                return Err(LabError::Controller(
                    "the hosts' states did not settle within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
            let mut any = false;
            for i in 0..self.hosts.len() {
                any |= self.agent(i);
            }
            let all = self.hosts.iter().all(|h| h.core.revision() > 0);
            quiet = if any || !all { 0 } else { quiet + 1 };
        }
        Ok(())
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Host `i`'s agent: what the controller sent goes to the agent core
    /// (a changed desired state is applied and acknowledged, migration
    /// commands carried out), and what the core has goes back: acks,
    /// migration events, reports. Returns whether anything came.
    fn agent(&mut self, i: usize) -> bool {
        let now = self.now();
        let msgs: Vec<_> = self.control.sessions[i].inbound.try_iter().collect();
        let any = !msgs.is_empty();
        let h = &mut self.hosts[i];
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
        any
    }

    /// The controller's record of migration `id`.
    fn migration_record(&self, id: u64) -> Result<serde_json::Value, LabError> {
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
    fn migrate(
        &mut self,
        vm: usize,
        to: usize,
        peer: usize,
        window: usize,
    ) -> Result<MigrationResult, LabError> {
        use dvs_controller::client::{Command, Output};
        const PAUSE: Duration = Duration::from_millis(20);
        let port = self.vms[vm].port;
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
        let began = self.now() + Duration::from_millis(300);
        let deadline = self.now() + Duration::from_secs(30);
        let mut id = None;
        let mut step = 0u8;
        let mut resume_at = Duration::ZERO;
        let mut done_at = None;
        let mut pause = Duration::ZERO;
        let mut next_check = Duration::ZERO;
        let mut chunk = vec![0u8; 16 * 1024];
        while self.now() < deadline {
            let now = self.now();
            if !self.step() {
                std::thread::sleep(Duration::from_micros(100));
            }
            for i in 0..self.hosts.len() {
                self.agent(i);
            }
            // Traffic.
            if !self.vms[vm].paused {
                let v = &mut self.vms[vm];
                let s = v.sockets.get_mut::<tcp::Socket>(tx);
                let ending = done_at.is_some_and(|t| now > t + Duration::from_millis(300));
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
            match step {
                0 if now >= began => {
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
                    id = v[0]["id"].as_u64();
                    step = 1;
                }
                1 if now >= next_check => {
                    next_check = now + Duration::from_millis(5);
                    let m = self.migration_record(id.unwrap_or(0))?;
                    if m["phase"] == "syncing" {
                        // Stop-and-copy: the VM stops running.
                        self.vms[vm].paused = true;
                        resume_at = now + PAUSE;
                        step = 2;
                    } else if m["phase"] == "aborted" {
                        return Err(LabError::Controller(format!("migration aborted: {m}")));
                    }
                }
                2 if now >= resume_at => {
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
                    pause = PAUSE + (now - resume_at);
                    step = 3;
                }
                3 if now >= next_check => {
                    next_check = now + Duration::from_millis(20);
                    let m = self.migration_record(id.unwrap_or(0))?;
                    if m["phase"] == "done" && m["first_frame_at_destination_ms"].is_number() {
                        done_at.get_or_insert(now);
                    }
                    if m["phase"] == "aborted" {
                        return Err(LabError::Controller(format!("migration aborted: {m}")));
                    }
                }
                _ => {}
            }
            if done_at.is_some_and(|t| now > t + Duration::from_millis(300)) && got == sent {
                break;
            }
        }
        let record = self.migration_record(id.unwrap_or(0))?;
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

    /// Move every frame once: switches first, then VM stacks. Returns whether
    /// anything happened.
    fn step(&mut self) -> bool {
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
        busy > 0
    }

    fn run_for(&mut self, d: Duration, mut until: impl FnMut(&mut Self) -> bool) {
        let end = self.now() + d;
        while self.now() < end {
            if until(self) {
                return;
            }
            if !self.step() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    #[allow(clippy::needless_range_loop)] // a VM-by-VM matrix reads best by index
    fn ping_all(&mut self, count: u16) -> Vec<PingResult> {
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
    fn tcp_transfer(&mut self, a: usize, b: usize, bytes: usize) -> TcpResult {
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
    fn chassis_view(&mut self) -> Result<(serde_json::Value, String), LabError> {
        use dvs_controller::client::{Command, Output};
        let now = self.now();
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            if let Ok(stats_json) = serde_json::to_string(&h.core.dp.stats(&h.name, now)) {
                self.control
                    .send(i, agent_message::Msg::Report(api::Report { stats_json }));
            }
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
            std::thread::sleep(Duration::from_millis(20));
        }
        let table = self.control.view(Command::ShowChassis, Output::Table)?;
        Ok((json, table))
    }

    fn host_reports(&self) -> Vec<HostReport> {
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

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    )
}

/// A new in-memory port for `p` (its wire kept by port ID).
fn open_wire(wires: &mut BTreeMap<PortId, Rc<RefCell<Wire>>>, p: &PortSpec) -> MemPort {
    let w = Rc::new(RefCell::new(Wire::default()));
    wires.insert(p.port.id, w.clone());
    MemPort(w)
}

/// Host `name`'s desired state as an agent file, checked.
fn feed(s: &mut tcp::Socket, sent: &mut usize, upto: usize, chunk: &mut [u8]) {
    while *sent < upto && s.can_send() {
        let n = (upto - *sent).min(chunk.len());
        for (k, c) in chunk[..n].iter_mut().enumerate() {
            *c = pattern(*sent + k);
        }
        match s.send_slice(&chunk[..n]) {
            Ok(0) | Err(_) => break,
            Ok(m) => *sent += m,
        }
    }
}

/// Read what `r` has, checking it against the pattern.
fn drain(r: &mut tcp::Socket, got: &mut usize, intact: &mut bool) {
    while r.can_recv() {
        let res = r.recv(|data| {
            for (k, c) in data.iter().enumerate() {
                *intact &= *c == pattern(*got + k);
            }
            (data.len(), data.len())
        });
        match res {
            Ok(0) | Err(_) => break,
            Ok(m) => *got += m,
        }
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn send_echo(vm: &mut Vm, target: usize, dst: Ipv4Address, seq: u16) {
    let repr = Icmpv4Repr::EchoRequest {
        ident: ICMP_IDENT + target as u16,
        seq_no: seq,
        data: b"dvs-lab-ping",
    };
    let s = vm.sockets.get_mut::<icmp::Socket>(vm.icmp[target]);
    if let Ok(buf) = s.send(repr.buffer_len(), IpAddress::Ipv4(dst)) {
        let mut pkt = Icmpv4Packet::new_unchecked(buf);
        repr.emit(&mut pkt, &ChecksumCapabilities::default());
    }
}

fn collect_replies(lab: &mut Lab, received: &mut [Vec<u16>]) {
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

/// The VMs' MACs, for tests.
pub fn vm_mac(host: usize, index: usize) -> MacAddr {
    MacAddr([2, 0xd5, 0, 0, host as u8 + 1, index as u8 + 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hosts_ping_within_vlans_only_and_move_tcp() {
        let r = run(LabOptions {
            tcp_bytes: 1 << 20,
            ..LabOptions::default()
        })
        .unwrap();
        let text = r.render();
        assert!(r.ok(), "{text}");
        // Each host's VLAN 10 VM reached the other host's through VXLAN.
        assert!(r
            .hosts
            .iter()
            .all(|h| h.uplink.rx_packets > 0 && h.uplink.tx_packets > 0));
        // Nothing crossed VLANs: the VLAN 20 VMs never heard the VLAN 10 VMs' pings.
        for p in r.pings.iter().filter(|p| !p.same_vlan) {
            assert_eq!(p.received, 0, "{text}");
        }
        // The controller saw both hosts converge and every port up.
        let mods = r.chassis["modules"].as_array().unwrap();
        assert_eq!(mods.len(), 2, "{text}");
        assert!(
            mods.iter()
                .all(|m| m["connected"] == true && m["acked_revision"] == m["desired_revision"]),
            "{text}"
        );
        let ports = r.chassis["interfaces"].as_array().unwrap();
        assert_eq!(ports.len(), 4);
        assert!(ports.iter().all(|p| p["state"] == "up"), "{text}");
        assert!(text.contains("veth1"), "{text}");
        // Every host knows all four VMs, two of them behind the tunnel.
        for h in &r.hosts {
            assert_eq!(h.macs.len(), 4, "{text}");
            assert_eq!(
                h.macs.iter().filter(|m| m.at.starts_with("remote")).count(),
                2
            );
        }
        assert_eq!(vm_mac(0, 0).to_string(), "02:d5:00:00:01:01");
        // vm1 went to h2 and back under traffic; the stream arrived whole,
        // and the port, with its counters, is on h1 again.
        assert_eq!(r.migrations.len(), 2, "{text}");
        for m in &r.migrations {
            assert_eq!(m.record["phase"], "done", "{text}");
            assert_eq!(m.record["trigger"], "first_frame", "{text}");
            assert!(m.tcp_intact && m.tcp_bytes > 0, "{text}");
        }
        assert_eq!(r.chassis["interfaces"][0]["host"], "h1", "{text}");
        let vm1 = &r.hosts[0]
            .ports
            .iter()
            .find(|p| p.id == "veth1")
            .unwrap()
            .counters;
        assert!(vm1.rx_frames > 1000, "counters carried over: {text}");
        assert!(text.contains("live migrations"), "{text}");
    }

    #[test]
    fn three_hosts_flood_by_head_end_replication() {
        let r = run(LabOptions {
            hosts: 3,
            tcp_bytes: 64 * 1024,
            pings: 2,
            ..LabOptions::default()
        })
        .unwrap();
        assert!(r.ok(), "{}", r.render());
        assert_eq!(r.pings.len(), 6 * 5);
    }
}
