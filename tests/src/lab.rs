//! The in-process lab: N hosts, each a real [`Datapath`] with a VXLAN socket
//! on its own loopback address (127.0.0.10+i), joined as one fabric; two VMs
//! per host — smoltcp TCP/IP stacks on in-memory ports — one on VLAN 10 and
//! one on VLAN 20, all in one IP subnet so that any VLAN leak would show.
//!
//! A run: every VM pings every other VM (replies expected only within a
//! VLAN), then a TCP transfer between two hosts' VLAN 10 VMs; the report
//! holds the reachability matrix, the transfer, and every host's ports,
//! counters and MAC table.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use dvs_proto::{MacAddr, PortId, VlanId, VlanMode, Vni};
use dvs_switch::datapath::{Datapath, PortIo, PortStats, RxMeta, Uplink};
use dvs_switch::wire::VnetHdr;
use dvs_switch::{PortNo, SegmentConfig, Switch, SwitchConfig, TunnelCounters};
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
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            hosts: 2,
            tcp_bytes: 4 << 20,
            pings: 3,
            seed: 0x5eed,
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
}

/// The lab's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub hosts: Vec<HostReport>,
    pub pings: Vec<PingResult>,
    pub tcp: TcpResult,
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
        self.tcp.ok && self.pings.iter().all(|p| p.ok)
    }

    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dvs lab — {} hosts joined by VXLAN over loopback\n",
            self.hosts.len()
        );
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
    Ok(Report {
        hosts: lab.host_reports(),
        pings,
        tcp,
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
    vlan: u16,
    ip: Ipv4Address,
    dev: VmDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// One ICMP socket per other VM (index = the target VM's index).
    icmp: Vec<SocketHandle>,
    tcp: SocketHandle,
}

struct Host {
    name: String,
    tunnel: IpAddr,
    dp: Datapath<MemPort>,
    ports: Vec<PortNo>,
}

struct Lab {
    start: Instant,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
}

const VLANS: [(u16, u32); 2] = [(10, 5010), (20, 5020)];
const ICMP_IDENT: u16 = 0x22;

impl Lab {
    fn build(opts: &LabOptions) -> Result<Self, LabError> {
        let start = Instant::now();
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
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        let now = SmolInstant::from_millis(0);
        for (i, socket) in sockets.into_iter().enumerate() {
            let name = format!("h{}", i + 1);
            let mut sw = Switch::new(SwitchConfig::default());
            for (vlan, vni) in VLANS {
                let seg = SegmentConfig {
                    vlan: vid(vlan),
                    vni: Vni::new(u64::from(vni)).unwrap_or_else(|_| unreachable!()),
                    peers: tunnels
                        .iter()
                        .filter(|t| **t != tunnels[i])
                        .copied()
                        .collect(),
                };
                sw.set_segment(seg)
                    .map_err(|e| LabError::Switch(name.clone(), e))?;
            }
            let mut dp = Datapath::new(
                sw,
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
            let mut ports = Vec::new();
            for (j, (vlan, _)) in VLANS.iter().enumerate() {
                let n = vms.len() as u32 + 1;
                let vm_name = format!("vm{n}");
                let no = dp
                    .switch
                    .add_port(dvs_switch::PortConfig {
                        id: PortId::new(n).unwrap_or_else(|| unreachable!()),
                        name: vm_name.clone(),
                        vlan: VlanMode::Access(vid(*vlan)),
                        acl: dvs_switch::PortAcl::default(),
                        qos: Default::default(),
                        security: Default::default(),
                        netflow: None,
                    })
                    .map_err(|e| LabError::Switch(name.clone(), e))?;
                let wire = Rc::new(RefCell::new(Wire::default()));
                let _ = dp.attach(no, MemPort(wire.clone()));
                ports.push(no);
                let mac = [2, 0xd5, 0, 0, i as u8 + 1, j as u8 + 1];
                let ip = Ipv4Address::new(10, 0, 0, n as u8);
                let mut dev = VmDevice(wire);
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
                let tcp = sockets.add(tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 256 * 1024]),
                    tcp::SocketBuffer::new(vec![0; 256 * 1024]),
                ));
                vms.push(Vm {
                    name: vm_name,

                    vlan: *vlan,
                    ip,
                    dev,
                    iface,
                    sockets,
                    icmp,
                    tcp,
                });
            }
            hosts.push(Host {
                name,
                tunnel: tunnels[i],
                dp,
                ports,
            });
        }
        Ok(Lab { start, hosts, vms })
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Move every frame once: switches first, then VM stacks. Returns whether
    /// anything happened.
    fn step(&mut self) -> bool {
        let now = self.now();
        let mut busy = 0;
        for h in &mut self.hosts {
            for no in &h.ports {
                busy += h.dp.poll_port(now, *no).unwrap_or(0);
            }
            busy += h.dp.poll_uplink(now).unwrap_or(0);
            h.dp.handle_timeout(now);
        }
        let t = SmolInstant::from_micros(now.as_micros() as i64);
        for vm in &mut self.vms {
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
            while sent < bytes && s.can_send() {
                let n = (bytes - sent).min(chunk.len());
                for (k, c) in chunk[..n].iter_mut().enumerate() {
                    *c = pattern(sent + k);
                }
                match s.send_slice(&chunk[..n]) {
                    Ok(0) | Err(_) => break,
                    Ok(m) => sent += m,
                }
            }
            if sent == bytes {
                s.close();
            }
            let vm = &mut lab.vms[b];
            let r = vm.sockets.get_mut::<tcp::Socket>(vm.tcp);
            while r.can_recv() {
                let res = r.recv(|data| {
                    for (k, c) in data.iter().enumerate() {
                        if *c != pattern(got + k) {
                            intact = false;
                        }
                    }
                    (data.len(), data.len())
                });
                match res {
                    Ok(0) | Err(_) => break,
                    Ok(m) => got += m,
                }
            }
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

    fn host_reports(&self) -> Vec<HostReport> {
        let now = self.now();
        self.hosts
            .iter()
            .map(|h| {
                let stats = h.dp.stats(&h.name, now);
                HostReport {
                    name: h.name.clone(),
                    tunnel: h.tunnel.to_string(),
                    ports: stats.ports,
                    uplink: stats.tunnel,
                    macs: h
                        .dp
                        .switch
                        .mac_entries(now)
                        .into_iter()
                        .map(|e| MacLine {
                            vlan: e.vlan.get(),
                            mac: e.mac.to_string(),
                            at: match e.location {
                                dvs_switch::Location::Port(p) => h.dp.switch.port(p).map_or_else(
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

fn vid(v: u16) -> VlanId {
    VlanId::new(u32::from(v)).unwrap_or_else(|_| unreachable!())
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
        // Every host learned all four VMs, two of them behind the tunnel.
        for h in &r.hosts {
            assert_eq!(h.macs.len(), 4, "{text}");
            assert_eq!(
                h.macs.iter().filter(|m| m.at.starts_with("remote")).count(),
                2
            );
        }
        assert_eq!(vm_mac(0, 0).to_string(), "02:d5:00:00:01:01");
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
