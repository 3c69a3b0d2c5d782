//! The lab's VMs: smoltcp TCP/IP stacks, each on an in-memory wire to its
//! switch port, and the traffic they exchange (echo requests, TCP streams
//! of a checkable pattern).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::rc::Rc;

use dvs_proto::{MacAddr, PortId};
use dvs_switch::agent::config::PortSpec;
use dvs_switch::driver::port::{PortIo, RxMeta};
use dvs_switch::wire::VnetHdr;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address};

/// The ICMP identifier of echo requests to VM 0; VM `t`'s is this + `t`.
pub const ICMP_IDENT: u16 = 0x22;

/// Frames between a VM and its switch port.
#[derive(Debug, Default)]
pub struct Wire {
    pub to_vm: VecDeque<Vec<u8>>,
    pub from_vm: VecDeque<Vec<u8>>,
}

/// The switch side of an in-memory port.
#[derive(Debug)]
pub struct MemPort(pub Rc<RefCell<Wire>>);

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
pub struct VmDevice(pub Rc<RefCell<Wire>>);

pub struct VmRx(Vec<u8>);
pub struct VmTx(Rc<RefCell<Wire>>);

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

pub struct Vm {
    pub name: String,
    /// Its port, and the host whose port its NIC is plugged into.
    pub port: PortId,
    pub host: usize,
    /// Paused (a migration's stop-and-copy): not run.
    pub paused: bool,
    pub mac: MacAddr,
    pub vlan: u16,
    pub ip: Ipv4Address,
    pub dev: VmDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    /// One ICMP socket per other VM (index = the target VM's index).
    pub icmp: Vec<SocketHandle>,
    pub tcp: SocketHandle,
}

impl Vm {
    /// VM `name` with `mac` and `ip`/24 on `wire`, its stack seeded with
    /// `seed`, with an ICMP socket for each of `vms` VMs and a TCP socket.
    #[allow(clippy::too_many_arguments)] // a VM is these, named
    pub fn new(
        name: String,
        port: PortId,
        host: usize,
        mac: MacAddr,
        vlan: u16,
        ip: Ipv4Address,
        wire: Rc<RefCell<Wire>>,
        seed: u64,
        vms: usize,
    ) -> Self {
        let mut dev = VmDevice(wire);
        let mut cfg = Config::new(EthernetAddress(mac.0).into());
        cfg.random_seed = seed;
        let mut iface = Interface::new(cfg, &mut dev, SmolInstant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let icmp = (0..vms)
            .map(|t| {
                let buffer =
                    || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 1024]);
                let h = sockets.add(icmp::Socket::new(buffer(), buffer()));
                let _ = sockets
                    .get_mut::<icmp::Socket>(h)
                    .bind(icmp::Endpoint::Ident(ICMP_IDENT + t as u16));
                h
            })
            .collect();
        let tcp = sockets.add(tcp_socket());
        Vm {
            name,
            port,
            host,
            paused: false,
            mac,
            vlan,
            ip,
            dev,
            iface,
            sockets,
            icmp,
            tcp,
        }
    }
}

pub fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    )
}

/// A new in-memory port for `p` (its wire kept by port ID).
pub fn open_wire(wires: &mut BTreeMap<PortId, Rc<RefCell<Wire>>>, p: &PortSpec) -> MemPort {
    let w = Rc::new(RefCell::new(Wire::default()));
    wires.insert(p.port.id, w.clone());
    MemPort(w)
}

/// Send from `s` the pattern's bytes up to `upto`, as far as it takes them.
pub fn feed(s: &mut tcp::Socket, sent: &mut usize, upto: usize, chunk: &mut [u8]) {
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
pub fn drain(r: &mut tcp::Socket, got: &mut usize, intact: &mut bool) {
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

/// Byte `i` of every stream.
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

pub fn send_echo(vm: &mut Vm, target: usize, dst: Ipv4Address, seq: u16) {
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
