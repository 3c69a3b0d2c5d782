//! The static agent: one host's switch from an [`AgentConfig`], on real TAP
//! devices, AF_PACKET sockets and a VXLAN UDP socket, until SIGTERM.
//!
//! Startup order keeps the "never forward without policy" rule: the switch is
//! configured whole first, then each port's device is opened and attached;
//! a device that cannot be opened stops startup with its name in the error.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{AgentConfig, Attachment, StaticLocation};
use crate::datapath::{Datapath, PortIo, RxMeta, Uplink};
use crate::mactable::Location;
use crate::pipeline::{Switch, SwitchConfig};
use crate::sys::{self, PacketSocket};
use crate::wire::VnetHdr;
use crate::Error;

/// A port's device on a real host.
#[derive(Debug)]
pub enum HostPort {
    /// A TAP the agent created; it goes away when the agent exits. With
    /// `offloads`, frames carry virtio-net headers (checksum and TSO
    /// offloads pass through).
    Tap { file: File, offloads: bool },
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
                })
            }
            Attachment::Netdev(name) => {
                Ok(HostPort::Packet(PacketSocket::open(name).map_err(|e| {
                    Error::io(format!("attaching to interface `{name}`"), e)
                })?))
            }
        }
    }
}

impl PortIo for HostPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<RxMeta> {
        match self {
            HostPort::Tap {
                file,
                offloads: false,
            } => Ok(RxMeta {
                len: file.read(buf)?,
                ..RxMeta::default()
            }),
            HostPort::Tap {
                file,
                offloads: true,
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
            } => {
                let (v, n) = with_hdr(VnetHdr::LEN);
                sys::writev(file.as_raw_fd(), &v[..n]).map(drop)
            }
            HostPort::Tap {
                file,
                offloads: false,
            } => sys::writev(file.as_raw_fd(), parts).map(drop),
            HostPort::Packet(s) => {
                let (v, n) = with_hdr(VnetHdr::BASE_LEN);
                s.send(&v[..n]).map(drop)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            HostPort::Tap { file, offloads } => HostPort::Tap {
                file: file.try_clone()?,
                offloads: *offloads,
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
pub fn build(cfg: &AgentConfig) -> Result<Datapath<HostPort>, Error> {
    let mut sw = Switch::new(SwitchConfig {
        mac_table: cfg.mac_table,
        ..SwitchConfig::default()
    });
    for s in &cfg.segments {
        sw.set_segment(s.clone())?;
    }
    let mut nos = Vec::new();
    for p in &cfg.ports {
        nos.push(sw.add_port(p.port.clone())?);
    }
    for m in &cfg.static_macs {
        let loc = match &m.at {
            StaticLocation::Remote(ip) => Location::Remote(*ip),
            StaticLocation::Port(name) => match sw.port_by_name(name) {
                Some(no) => Location::Port(no),
                None => continue, // validated: cannot happen
            },
        };
        sw.set_static_mac(m.vlan, m.mac, loc);
    }
    let uplink = match cfg.tunnel {
        Some(t) => Some(Uplink::bind(SocketAddr::new(t.local, t.port), t.port)?),
        None => None,
    };
    let mut dp = Datapath::new(sw, uplink).map_err(|e| Error::io("cloning the VXLAN socket", e))?;
    dp.set_flow_identity(cfg.chassis_id, flow_source(cfg));
    for (p, no) in cfg.ports.iter().zip(nos) {
        let name = match &p.attach {
            Attachment::Tap { name, .. } | Attachment::Netdev(name) => name,
        };
        dp.attach(no, HostPort::open(&p.attach)?)
            .map_err(|e| Error::io(format!("duplicating the handle of `{name}`"), e))?;
        tracing::info!(port = %p.port.id, name = %p.port.name, attach = ?p.attach, vlan = ?p.port.vlan, "port up");
    }
    Ok(dp)
}

/// Flow exports leave from the tunnel address (the host's address on the
/// fabric), as a switch's exports leave from its source interface.
fn flow_source(cfg: &AgentConfig) -> std::net::IpAddr {
    cfg.tunnel
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |t| {
            t.local
        })
}

/// Run the agent of `cfg` until SIGTERM or SIGINT.
///
/// # Errors
/// Startup errors (see [`build`]) and fatal device errors.
pub fn run(cfg: &AgentConfig, path: Option<&Path>) -> Result<(), Error> {
    sys::catch_signals().map_err(|e| Error::io("installing signal handlers", e))?;
    let mut cfg = cfg.clone();
    let mut dp = build(&cfg)?;
    let start = Instant::now();
    dp.spawn_transmit(start)
        .map_err(|e| Error::io("starting the transmit thread", e))?;
    tracing::info!(host = %cfg.host, ports = cfg.ports.len(), segments = cfg.segments.len(), "agent running");
    let fds = dp.fds();
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(_, fd)| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut next_stats = Duration::ZERO;
    while !sys::terminate_requested() {
        let now = start.elapsed();
        let wait = dp
            .switch
            .poll_timeout()
            .min(next_stats)
            .saturating_sub(now)
            .min(Duration::from_millis(200));
        // A shaped port whose frames must wait is not read until then.
        let mut wait = wait;
        for (pfd, (port, _)) in pollfds.iter_mut().zip(&fds) {
            pfd.events = libc::POLLIN;
            if let Some(no) = port {
                if let Some(w) = dp.switch.port_wait(*no, now) {
                    pfd.events = 0;
                    wait = wait.min(w);
                }
            }
        }
        // Round up: waking a little late keeps the shaper from spinning.
        let ms = wait.as_micros().div_ceil(1000) as i32;
        sys::poll(&mut pollfds, ms).map_err(|e| Error::io("waiting for frames", e))?;
        let now = start.elapsed();
        for (pfd, (port, _)) in pollfds.iter_mut().zip(&fds) {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            let r = match port {
                Some(no) => dp.poll_port(now, *no),
                None => dp.poll_uplink(now),
            };
            if let Err(e) = r {
                let what = match port {
                    Some(no) => format!("reading port {}", no.0),
                    None => "reading the VXLAN socket".to_string(),
                };
                tracing::warn!(error = %e, "{what}");
            }
        }
        dp.handle_timeout(now);
        if sys::take_reload_request() {
            if let Some(path) = path {
                reload(&mut dp, &mut cfg, path, now);
            }
        }
        if now >= next_stats {
            if let Some(path) = &cfg.stats_file {
                write_stats(&dp, &cfg.host, now, path);
            }
            next_stats = now + Duration::from_secs(1);
        }
    }
    let now = start.elapsed();
    // Open flow records end with the agent: collectors get them now.
    dp.flush_flows(now);
    if let Some(path) = &cfg.stats_file {
        write_stats(&dp, &cfg.host, now, path);
    }
    tracing::info!(host = %cfg.host, "agent stopped");
    Ok(())
}

/// Re-read the agent file after SIGHUP and apply what changed to the
/// running switch: each port's VLAN, access lists, rate limits, security
/// and NetFlow monitor (frames see the old or the new policy, never a mix;
/// traffic the change does not concern keeps flowing), the segments and the
/// chassis number of flow exports. A file that does not validate
/// changes nothing. Ports added or removed, or a new tunnel address, need a
/// restart; the agent says so and keeps the rest.
fn reload(dp: &mut Datapath<HostPort>, cfg: &mut AgentConfig, path: &Path, now: Duration) {
    let new = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the running configuration stays");
            return;
        }
    };
    let mut applied = 0;
    for p in &new.ports {
        let Some(old) = cfg.ports.iter_mut().find(|o| o.port.name == p.port.name) else {
            tracing::warn!(port = %p.port.name, "new port: restart the agent to add it");
            continue;
        };
        if old.attach != p.attach || old.port.id != p.port.id {
            tracing::warn!(port = %p.port.name, "device or ID changed: restart the agent to apply");
            continue;
        }
        let Some(no) = dp.switch.port_by_name(&p.port.name) else {
            continue;
        };
        let r = (|| {
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
            Ok::<(), Error>(())
        })();
        match r {
            Ok(()) if old.port != p.port => {
                applied += 1;
                old.port = p.port.clone();
            }
            Ok(()) => {}
            Err(e) => tracing::error!(port = %p.port.name, error = %e, "policy not applied"),
        }
    }
    for o in &cfg.ports {
        if !new.ports.iter().any(|p| p.port.name == o.port.name) {
            tracing::warn!(port = %o.port.name, "port gone from the file: restart the agent to remove it");
        }
    }
    if new.tunnel != cfg.tunnel {
        tracing::warn!("tunnel address changed: restart the agent to apply");
    }
    if new.chassis_id != cfg.chassis_id {
        dp.set_flow_identity(new.chassis_id, flow_source(cfg));
    }
    for s in &new.segments {
        if !cfg.segments.contains(s) {
            if let Err(e) = dp.switch.set_segment(s.clone()) {
                tracing::error!(vlan = %s.vlan, error = %e, "segment not applied");
            }
        }
    }
    for s in &cfg.segments {
        if !new.segments.iter().any(|n| n.vlan == s.vlan) {
            dp.switch.remove_segment(s.vlan);
        }
    }
    tracing::info!(ports_changed = applied, "configuration reloaded");
    // What runs now: the new file, but for the ports and the tunnel, which
    // hold what was applied (the rest needs a restart).
    let ports = std::mem::take(&mut cfg.ports);
    let tunnel = cfg.tunnel;
    *cfg = AgentConfig {
        ports,
        tunnel,
        ..new
    };
}

/// Write the stats as JSON, atomically (temporary file, then rename).
fn write_stats(dp: &Datapath<HostPort>, host: &str, now: Duration, path: &Path) {
    let stats = dp.stats(host, now);
    let tmp = path.with_extension("tmp");
    let r = serde_json::to_vec_pretty(&stats)
        .map_err(io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::warn!(error = %e, path = %path.display(), "cannot write stats");
    }
}
