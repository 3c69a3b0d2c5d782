//! The host agent: one host's switch on real TAP devices, AF_PACKET
//! sockets and a VXLAN UDP socket, until SIGTERM — from a static file
//! (`dvs agent --config`) or under a controller.
//!
//! - [`core`]: the sans-IO agent core (desired state and datapath events
//!   in; port changes, acks, migration events and reports out) — run by
//!   [`run_with`] (`run`: the datapath thread's loop) and by the lab;
//! - [`config`]: the agent file, validated whole;
//! - [`migration`]: a host's part in a live migration;
//! - [`remote`]: the session with the controller (a transport: it carries
//!   messages between the controller and the core, and saves the state).
//!
//! Startup order keeps the "never forward without policy" rule: the switch is
//! configured whole first, then each port's device is opened and attached;
//! a device that cannot be opened stops startup with its name in the error.

pub mod config;
pub mod core;
pub mod migration;
pub mod remote;
mod run;

pub use run::{run, run_with, ControlLink};

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::agent::config::{AgentConfig, Attachment, PortSpec, StaticLocation, StaticMac};
use crate::driver::attach::{Attacher, Device};
use crate::driver::datapath::{self, Datapath};
use crate::driver::port::{PortIo, RxMeta, Uplink};
use crate::driver::sys::{self, PacketSocket};
use crate::pipeline::mactable::Location;
use crate::pipeline::{Switch, SwitchConfig};
use crate::wire::VnetHdr;
use crate::Error;

/// A port's device on a real host.
#[derive(Debug)]
pub enum HostPort {
    /// A TAP the agent created; it goes away when the agent exits. With
    /// `offloads`, frames carry virtio-net headers (checksum and TSO
    /// offloads pass through).
    Tap {
        file: File,
        offloads: bool,
        index: u32,
    },
    /// An interface somebody else made, through AF_PACKET with virtio-net
    /// headers (its owner's offloads pass through, GSO frames included).
    Packet(PacketSocket),
}

impl HostPort {
    /// Open the device `attach` names.
    ///
    /// # Errors
    /// [`Error::Io`] naming the device.
    pub fn open(attach: &Attachment) -> Result<Self, Error> {
        match attach {
            Attachment::Tap { name, offloads } => {
                let file = sys::open_tap(name, *offloads)
                    .map_err(|e| Error::io(format!("creating TAP `{name}`"), e))?;
                sys::set_link_up(name)
                    .map_err(|e| Error::io(format!("setting TAP `{name}` up"), e))?;
                Ok(HostPort::Tap {
                    file,
                    offloads: *offloads,
                    index: sys::ifindex(name).unwrap_or(0),
                })
            }
            Attachment::Netdev(name) => {
                Ok(HostPort::Packet(PacketSocket::open(name).map_err(|e| {
                    Error::io(format!("attaching to interface `{name}`"), e)
                })?))
            }
            Attachment::Unnamed => Err(Error::io(
                "attaching to the VMM's interface",
                io::Error::new(io::ErrorKind::NotFound, "the VMM has not named it yet"),
            )),
        }
    }
}

impl Device for HostPort {
    fn ifindex(&self) -> u32 {
        match self {
            HostPort::Tap { index, .. } => *index,
            HostPort::Packet(s) => s.ifindex(),
        }
    }
}

impl PortIo for HostPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<RxMeta> {
        match self {
            HostPort::Tap {
                file,
                offloads: false,
                ..
            } => Ok(RxMeta {
                len: file.read(buf)?,
                ..RxMeta::default()
            }),
            HostPort::Tap {
                file,
                offloads: true,
                ..
            } => {
                let mut hdr = [0u8; VnetHdr::LEN];
                let n = sys::readv(
                    file.as_raw_fd(),
                    &mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)],
                )?;
                Ok(RxMeta {
                    len: n.saturating_sub(VnetHdr::LEN),
                    tag: None,
                    vnet: Some(VnetHdr::decode(&hdr)),
                })
            }
            HostPort::Packet(s) => {
                let mut hdr = [0u8; VnetHdr::BASE_LEN];
                let (len, tag) = s.recv(&mut hdr, buf)?;
                Ok(RxMeta {
                    len,
                    tag,
                    vnet: Some(VnetHdr::decode(&hdr)),
                })
            }
        }
    }

    fn send(&mut self, vnet: Option<&VnetHdr>, parts: &[IoSlice<'_>]) -> io::Result<()> {
        let hdr = vnet.copied().unwrap_or_default().encode();
        let with_hdr = |len: usize| {
            let mut v = [IoSlice::new(&[]); 4];
            v[0] = IoSlice::new(&hdr[..len]);
            let n = parts.len().min(3);
            v[1..=n].copy_from_slice(&parts[..n]);
            (v, n + 1)
        };
        match self {
            HostPort::Tap {
                file,
                offloads: true,
                ..
            } => {
                let (v, n) = with_hdr(VnetHdr::LEN);
                sys::writev(file.as_raw_fd(), &v[..n]).map(drop)
            }
            HostPort::Tap {
                file,
                offloads: false,
                ..
            } => sys::writev(file.as_raw_fd(), parts).map(drop),
            HostPort::Packet(s) => {
                let (v, n) = with_hdr(VnetHdr::BASE_LEN);
                s.send(&v[..n]).map(drop)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            HostPort::Tap {
                file,
                offloads,
                index,
            } => HostPort::Tap {
                file: file.try_clone()?,
                offloads: *offloads,
                index: *index,
            },
            HostPort::Packet(s) => HostPort::Packet(s.try_clone()?),
        })
    }

    fn offloads(&self) -> bool {
        matches!(
            self,
            HostPort::Tap { offloads: true, .. } | HostPort::Packet(_)
        )
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(match self {
            HostPort::Tap { file, .. } => file.as_raw_fd(),
            HostPort::Packet(s) => s.as_raw_fd(),
        })
    }
}

/// Build the host's datapath from a validated file: switch first, devices
/// after.
///
/// # Errors
/// [`Error::Io`] for a device or socket that cannot be opened.
pub fn build(cfg: &AgentConfig, attacher: &mut Attacher) -> Result<Datapath<HostPort>, Error> {
    let mut sw = Switch::new(SwitchConfig {
        mac_table: cfg.mac_table,
        ..SwitchConfig::default()
    });
    for s in &cfg.segments {
        sw.set_segment(s.clone())?;
    }
    sw.set_private_vlans(cfg.private_vlans.clone());
    sw.set_tunnel_peers(cfg.tunnel_peers.clone());
    let uplink = match cfg.tunnel {
        Some(t) => Some(Uplink::bind(SocketAddr::new(t.local, t.port), t.port)?),
        None => None,
    };
    let mut dp = Datapath::new(sw, uplink).map_err(|e| Error::io("cloning the VXLAN socket", e))?;
    dp.set_flow_identity(cfg.chassis_id, flow_source(cfg));
    let mut open = |p: &PortSpec| HostPort::open(&p.attach);
    for p in &cfg.ports {
        add_port(&mut dp, p, &mut open, attacher)?;
    }
    for m in &cfg.static_macs {
        set_static_mac(&mut dp, m);
    }
    Ok(dp)
}

/// Add a port to the switch (its policy first), then attach its device: a
/// TAP the agent cannot create takes the port away again; a VMM's
/// interface that does not exist yet leaves the port waiting for it.
fn add_port<P: PortIo + Device>(
    dp: &mut Datapath<P>,
    p: &PortSpec,
    open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    attacher: &mut Attacher,
) -> Result<(), Error> {
    let no = dp.switch.add_port(p.port.clone())?;
    // Standby before the device is attached, as its item says: not one
    // frame before its mode is decided (`Migrations` owns it from here).
    dp.switch.set_port_standby(no, p.standby)?;
    if let Attachment::Tap { name, .. } = &p.attach {
        let io = match open(p) {
            Ok(io) => io,
            Err(e) => {
                dp.switch.remove_port(no);
                return Err(e);
            }
        };
        let ifindex = io.ifindex();
        if let Err(e) = dp.attach(no, io) {
            dp.switch.remove_port(no);
            return Err(Error::io(format!("duplicating the handle of `{name}`"), e));
        }
        let device = name.clone();
        dp.set_attachment(no, Some(datapath::Attachment::Attached { device, ifindex }));
    } else {
        attacher.attach(dp, no, p, open);
    }
    tracing::info!(port = %p.port.id, name = %p.port.name, attach = ?p.attach, vlan = ?p.port.vlan, "port up");
    Ok(())
}

fn set_static_mac<P: PortIo>(dp: &mut Datapath<P>, m: &StaticMac) {
    let loc = match &m.at {
        StaticLocation::Remote(ip) => Location::Remote(*ip),
        StaticLocation::Port(name) => match dp.switch.port_by_name(name) {
            Some(no) => Location::Port(no),
            None => return, // validated: cannot happen
        },
    };
    dp.switch
        .set_static_mac_moving(m.vlan, m.mac, loc, m.moving_to);
}

/// Flow exports leave from the tunnel address (the host's address on the
/// fabric), as a switch's exports leave from its source interface.
fn flow_source(cfg: &AgentConfig) -> std::net::IpAddr {
    cfg.tunnel
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |t| {
            t.local
        })
}

/// The ATTACHED events of migrations' ports among `ports` (just attached
/// at `wall`).
fn attached_events<P: PortIo>(
    dp: &Datapath<P>,
    specs: &[PortSpec],
    ports: Vec<crate::PortNo>,
    wall: Duration,
) -> Vec<migration::Event> {
    ports
        .into_iter()
        .filter_map(|no| {
            let (cfg, _) = dp.switch.port(no)?;
            let s = specs.iter().find(|s| s.port.id == cfg.id)?;
            Some(migration::Event::Attached {
                port: cfg.id,
                migration: s.migration?,
                device: s.attach.device()?.to_string(),
                at: wall,
            })
        })
        .collect()
}

/// Apply a new configuration to the running switch, changing only what
/// differs: each port's VLAN, access lists, rate limits, security, NetFlow
/// monitor, device and MAC (frames see the old or the new policy, never a
/// mix; traffic the change does not concern keeps flowing), ports added
/// and removed, segments, tunnel peers, static MACs and the chassis number
/// of flow exports.
/// Ports whose device cannot be opened are left out and named in the
/// error; the rest is applied. A new tunnel address needs a restart.
///
/// New ports are opened with `open` (TAP and AF_PACKET devices in the
/// agent, in-memory queues in the lab).
///
/// # Errors
/// What could not be applied, one item per problem.
pub fn apply_with<P: PortIo + Device>(
    dp: &mut Datapath<P>,
    cfg: &mut AgentConfig,
    new: AgentConfig,
    now: Duration,
    attacher: &mut Attacher,
    mut open: impl FnMut(&PortSpec) -> Result<P, Error>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let (running, changed) = apply_ports(dp, cfg, &new, now, attacher, &mut open, &mut problems);
    if new.tunnel != cfg.tunnel {
        problems.push("the tunnel address changed: restart the agent to apply it".into());
    }
    apply_fabric(dp, cfg, &new, &mut problems);
    tracing::info!(
        ports_changed = changed,
        problems = problems.len(),
        "configuration applied"
    );
    // What runs now: the new file, but for the ports (what was applied)
    // and the tunnel (which needs a restart).
    let tunnel = cfg.tunnel;
    *cfg = AgentConfig {
        ports: running,
        tunnel,
        ..new
    };
    if problems.is_empty() {
        Ok(())
    } else {
        for p in &problems {
            tracing::error!("{p}");
        }
        Err(problems.join("; "))
    }
}

/// The ports of `new` where `cfg`'s run: gone ones removed, new ones
/// added, the rest changed where they differ. Returns the ports that run
/// now (a port whose change failed runs as it was) and how many changed;
/// what failed goes to `problems`.
fn apply_ports<P: PortIo + Device>(
    dp: &mut Datapath<P>,
    cfg: &AgentConfig,
    new: &AgentConfig,
    now: Duration,
    attacher: &mut Attacher,
    open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    problems: &mut Vec<String>,
) -> (Vec<PortSpec>, usize) {
    let mut changed = 0;
    // Ports gone, or whose ID changed, leave first (a port whose device
    // changed keeps its state and changes device below).
    for old in &cfg.ports {
        let keep = new
            .ports
            .iter()
            .any(|p| p.port.name == old.port.name && p.port.id == old.port.id);
        if !keep {
            if let Some(no) = dp.switch.port_by_name(&old.port.name) {
                dp.detach(no);
                dp.set_attachment(no, None);
                dp.switch.remove_port(no);
                changed += 1;
                tracing::info!(port = %old.port.id, name = %old.port.name, "port removed");
            }
        }
    }
    let mut running = Vec::new();
    for p in &new.ports {
        let Some(no) = dp.switch.port_by_name(&p.port.name) else {
            match add_port(dp, p, open, attacher) {
                Ok(()) => {
                    changed += 1;
                    running.push(p.clone());
                }
                Err(e) => problems.push(format!("port {} ({}): {e}", p.port.id, p.port.name)),
            }
            continue;
        };
        let Some(old) = cfg.ports.iter().find(|o| o.port.name == p.port.name) else {
            continue;
        };
        if old.attach != p.attach {
            // The same port on another device (a VMM named its interface,
            // or made another): its policy and state stay.
            tracing::info!(port = %p.port.id, from = ?old.attach, to = ?p.attach, "the port changes device");
            attacher.attach(dp, no, p, open);
            changed += 1;
        }
        match change_port(dp, no, old, p, now) {
            Ok(()) => {
                if old.port != p.port {
                    changed += 1;
                }
                running.push(p.clone());
            }
            Err(e) => {
                problems.push(format!("port {} ({}): {e}", p.port.id, p.port.name));
                running.push(PortSpec {
                    attach: p.attach.clone(),
                    ..old.clone()
                });
            }
        }
    }
    (running, changed)
}

/// Port `no`'s policy, where `p` differs from `old`.
fn change_port<P: PortIo>(
    dp: &mut Datapath<P>,
    no: crate::PortNo,
    old: &PortSpec,
    p: &PortSpec,
    now: Duration,
) -> Result<(), Error> {
    if old.port.vlan != p.port.vlan {
        dp.switch.set_port_vlan(no, p.port.vlan.clone())?;
    }
    if old.port.acl != p.port.acl {
        dp.switch.set_port_acl(no, p.port.acl.clone())?;
    }
    if old.port.qos != p.port.qos {
        dp.set_port_qos(no, p.port.qos, now)?;
    }
    if old.port.security != p.port.security {
        dp.switch.set_port_security(no, p.port.security.clone())?;
    }
    if old.port.netflow != p.port.netflow {
        dp.switch.set_port_netflow(no, p.port.netflow.clone())?;
    }
    if old.port.mac != p.port.mac {
        dp.switch.set_port_mac(no, p.port.mac)?;
    }
    Ok(())
}

/// What joins the host to the others, where `new` differs from `cfg`:
/// segments, tunnel peers, static MACs, the flow exports' identity.
fn apply_fabric<P: PortIo>(
    dp: &mut Datapath<P>,
    cfg: &AgentConfig,
    new: &AgentConfig,
    problems: &mut Vec<String>,
) {
    for s in &new.segments {
        if !cfg.segments.contains(s) {
            if let Err(e) = dp.switch.set_segment(s.clone()) {
                problems.push(format!("segment VLAN {}: {e}", s.vlan));
            }
        }
    }
    for s in &cfg.segments {
        if !new.segments.iter().any(|n| n.vlan == s.vlan) {
            dp.switch.remove_segment(s.vlan);
        }
    }
    if new.tunnel_peers != cfg.tunnel_peers {
        dp.switch.set_tunnel_peers(new.tunnel_peers.clone());
    }
    // New private VLANs move VLANs to other MAC tables: every static entry
    // is placed again, in the table it now belongs to.
    let pvlans_changed = new.private_vlans != cfg.private_vlans;
    for m in &cfg.static_macs {
        if pvlans_changed || !new.static_macs.contains(m) {
            dp.switch.remove_mac(m.vlan, m.mac);
        }
    }
    dp.switch.set_private_vlans(new.private_vlans.clone());
    for m in &new.static_macs {
        if pvlans_changed || !cfg.static_macs.contains(m) {
            set_static_mac(dp, m);
        }
    }
    if new.chassis_id != cfg.chassis_id {
        dp.set_flow_identity(new.chassis_id, flow_source(cfg));
    }
}
