//! The host agent: one host's switch on real TAP devices, AF_PACKET
//! sockets and a VXLAN UDP socket, until SIGTERM — from a static file
//! (`dvs agent --config`) or under a controller.
//!
//! - [`core`]: the sans-IO agent core (desired state and datapath events
//!   in; port changes, acks, migration events and reports out) — run by
//!   [`run_with`] here and by the lab;
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

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::config::{AgentConfig, Attachment, PortSpec, StaticLocation, StaticMac};
use crate::driver::attach::{Attacher, Device};
use crate::driver::datapath::{self, Datapath};
use crate::driver::port::{PortIo, RxMeta, Uplink};
use crate::driver::sys::{self, PacketSocket};
use crate::pipeline::mactable::Location;
use crate::pipeline::{Switch, SwitchConfig};
use crate::wire::VnetHdr;
use crate::Error;
use dvs_proto::api;

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
    dp.switch.set_static_mac(m.vlan, m.mac, loc);
}

/// Flow exports leave from the tunnel address (the host's address on the
/// fabric), as a switch's exports leave from its source interface.
fn flow_source(cfg: &AgentConfig) -> std::net::IpAddr {
    cfg.tunnel
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |t| {
            t.local
        })
}

/// How a controller-driven agent's datapath loop meets its session
/// thread ([`remote`]).
#[derive(Debug)]
pub struct ControlLink {
    /// The controller's messages.
    pub inbound: std::sync::mpsc::Receiver<api::ControllerMessage>,
    /// Readable when a message waits (the session writes a byte).
    pub wake: std::os::unix::net::UnixStream,
    /// What the core sends and saves, in order.
    pub outbound: tokio::sync::mpsc::UnboundedSender<core::Outbound>,
    /// The desired state the agent started from (saved by a previous run).
    pub desired: core::Desired,
    /// The host's own settings the controller's items go with.
    pub local: serde_json::Value,
}

/// Run the agent of `cfg` until SIGTERM or SIGINT; with `path`, SIGHUP
/// re-reads that file.
///
/// # Errors
/// Startup errors (see [`build`]) and fatal device errors.
pub fn run(cfg: &AgentConfig, path: Option<&Path>) -> Result<(), Error> {
    run_with(cfg, path, None, None)
}

/// [`run`], taking new configurations from a controller through `link`,
/// and serving Prometheus metrics at `metrics`.
///
/// # Errors
/// Startup errors (see [`build`]) and fatal device errors.
pub fn run_with(
    cfg: &AgentConfig,
    path: Option<&Path>,
    link: Option<ControlLink>,
    metrics: Option<SocketAddr>,
) -> Result<(), Error> {
    sys::catch_signals().map_err(|e| Error::io("installing signal handlers", e))?;
    let stats = std::sync::Arc::new(std::sync::Mutex::new(dvs_proto::stats::Stats::default()));
    let revision = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(addr) = metrics {
        let (stats, revision) = (stats.clone(), revision.clone());
        let controlled = link.is_some();
        dvs_metrics::serve(addr, move || {
            let s = stats.lock().unwrap_or_else(|p| p.into_inner());
            let rev = controlled.then(|| revision.load(std::sync::atomic::Ordering::Relaxed));
            dvs_metrics::agent(&s, rev)
        })
        .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?;
    }
    // Listening to link changes first: an interface that appears while the
    // ports are being set up is not missed.
    let mut attacher = Attacher::new();
    let mut dp = build(cfg, &mut attacher)?;
    let start = Instant::now();
    dp.spawn_transmit(start)
        .map_err(|e| Error::io("starting the transmit thread", e))?;
    tracing::info!(host = %cfg.host, ports = cfg.ports.len(), segments = cfg.segments.len(), "agent running");
    if let Some(l) = &link {
        l.wake
            .set_nonblocking(true)
            .map_err(|e| Error::io("setting the control link non-blocking", e))?;
    }
    // Migration times are reported on the wall clock (hosts' clocks are
    // synchronised; the controller compares them).
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    };
    let (local, desired) = link
        .as_ref()
        .map(|l| (l.local.clone(), l.desired.clone()))
        .unwrap_or_default();
    let mut agent = core::AgentCore::new(
        dp,
        cfg.clone(),
        local,
        desired,
        wall().saturating_sub(start.elapsed()),
    );
    // The fds to wait on, rebuilt only when ports come or go: the ports'
    // and the uplink's, then the control link's, then the link monitor's.
    let wake_fd = link.as_ref().map(|l| l.wake.as_raw_fd());
    let links_fd = attacher.fd();
    let poll_set = |fds: &[(Option<crate::PortNo>, RawFd)]| -> Vec<libc::pollfd> {
        fds.iter()
            .map(|(_, fd)| *fd)
            .chain(wake_fd)
            .chain(links_fd)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect()
    };
    let mut fds = agent.dp.fds();
    let mut pollfds = poll_set(&fds);
    let mut next_stats = Duration::ZERO;
    let mut next_probe = Duration::ZERO;
    let mut open = |p: &PortSpec| HostPort::open(&p.attach);
    while !sys::terminate_requested() {
        for pfd in &mut pollfds {
            pfd.events = libc::POLLIN;
            pfd.revents = 0;
        }
        let now = start.elapsed();
        let dp = &mut agent.dp;
        let mut wait = dp
            .switch
            .poll_timeout()
            .min(next_stats)
            .saturating_sub(now)
            .min(Duration::from_millis(200));
        if let Some(p) = attacher.poll_timeout() {
            wait = wait.min(p);
        }
        // A shaped port whose frames must wait is not read until then.
        for (pfd, (port, _)) in pollfds.iter_mut().zip(&fds) {
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
        let mut changed = false;
        let (dp, cfg_now) = agent.parts();
        let ports = &cfg_now.ports;
        for (pfd, (port, _)) in pollfds.iter().zip(&fds) {
            if pfd.revents == 0 {
                continue;
            }
            let r = match port {
                Some(no) => dp.poll_port(now, *no),
                None => dp.poll_uplink(now),
            };
            match (r, port) {
                (Ok(_), _) => {}
                (Err(e), Some(no)) => {
                    changed |= attacher.on_port_error(dp, ports, *no, &e, &mut open);
                }
                (Err(e), None) => tracing::warn!(error = %e, "reading the VXLAN socket"),
            }
        }
        if links_fd.is_some() && pollfds.last().is_some_and(|p| p.revents != 0) {
            changed |= attacher.on_links(dp, ports, &mut open);
        }
        if now >= next_probe {
            attacher.tick(dp, ports);
            next_probe = now + crate::driver::attach::PROBE_EVERY;
        }
        dp.handle_timeout(now);
        report_flaps(&mut dp.switch);
        if sys::take_reload_request() {
            if let Some(path) = path {
                match AgentConfig::load(path) {
                    // Applied in part or whole: ports may have come or gone.
                    Ok(new) => {
                        let _ = agent.apply_file(new, now, &mut attacher, &mut open);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; the running configuration stays");
                    }
                }
            }
        }
        if let Some(l) = &link {
            let mut byte = [0u8; 64];
            while (&l.wake).read(&mut byte).is_ok_and(|n| n > 0) {}
            while let Ok(m) = l.inbound.try_recv() {
                agent.on_controller(m, now, &mut attacher, &mut open);
            }
            agent.tick(now, wall(), &mut attacher);
            for o in agent.take_outbound() {
                let _ = l.outbound.send(o);
            }
            revision.store(agent.revision(), std::sync::atomic::Ordering::Relaxed);
        } else {
            attacher.take_attached();
            attacher.take_read();
        }
        if changed | agent.take_changed() {
            fds = agent.dp.fds();
            pollfds = poll_set(&fds);
        }
        if now >= next_stats {
            let cfg = agent.config();
            if let Some(path) = &cfg.stats_file {
                write_stats(&agent.dp, &cfg.host, now, path);
            }
            if metrics.is_some() {
                *stats.lock().unwrap_or_else(|p| p.into_inner()) = agent.dp.stats(&cfg.host, now);
            }
            next_stats = now + Duration::from_secs(1);
        }
    }
    let now = start.elapsed();
    // Open flow records end with the agent: collectors get them now.
    agent.dp.flush_flows(now);
    let cfg = agent.config();
    if let Some(path) = &cfg.stats_file {
        write_stats(&agent.dp, &cfg.host, now, path);
    }
    tracing::info!(host = %cfg.host, "agent stopped");
    Ok(())
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
            match add_port(dp, p, &mut open, attacher) {
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
            attacher.attach(dp, no, p, &mut open);
            changed += 1;
        }
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
            if old.port.mac != p.port.mac {
                dp.switch.set_port_mac(no, p.port.mac)?;
            }
            Ok::<(), Error>(())
        })();
        match r {
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
    if new.tunnel != cfg.tunnel {
        problems.push("the tunnel address changed: restart the agent to apply it".into());
    }
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
    for m in &cfg.static_macs {
        if !new.static_macs.contains(m) {
            dp.switch.remove_mac(m.vlan, m.mac);
        }
    }
    for m in &new.static_macs {
        if !cfg.static_macs.contains(m) {
            set_static_mac(dp, m);
        }
    }
    if new.chassis_id != cfg.chassis_id {
        dp.set_flow_identity(new.chassis_id, flow_source(cfg));
    }
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

/// Log the MAC table entries that began to flap (a loop, or two senders
/// fighting over one MAC): each is held where it was for a while.
fn report_flaps(sw: &mut Switch) {
    for f in sw.take_flaps() {
        tracing::warn!(
            vlan = f.vlan.get(),
            mac = %f.mac,
            at = ?f.at,
            refused = ?f.refused,
            hold_s = crate::pipeline::mactable::MOVE_HOLD.as_secs(),
            "MAC flapping: held where it is, further moves refused"
        );
    }
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
