//! Ports meet their devices: the agent's reconciliation of each port with
//! the interface it names, driven by the kernel's link notifications
//! (rtnetlink), not by polling.
//!
//! A port is installed with its policy first and attached after. A VMM's
//! interface (`netdev`) often does not exist yet — libvirt creates its TAP
//! after `prepare begin` and after `migrate begin` — so the port *waits*:
//! it attaches the moment the interface appears, detaches when it goes,
//! and attaches again when it comes back (a new interface index: libvirt
//! deletes a VM's TAP when it stops and makes it again when it starts).
//! The switch's port, with its counters, connections and the rest of its
//! state, stays through all of it; only the device changes.
//!
//! ## Knowing that a VM runs here without a frame from it
//!
//! After a live migration a quiet guest (QEMU's `announce-rounds=0`, or a
//! VMM that does not announce) sends nothing, yet its peers can reach it
//! only once the port forwards. QEMU reads its TAP only while the VM runs:
//! while it waits for an incoming migration its tap backend takes at most
//! one frame and queues it (`qemu_net_queue_send` holds it while the VM
//! does not run, and `tap_send` stops reading), and a TAP counts a frame as
//! transmitted when its reader takes it (`tun_put_user`). So a migration's
//! destination, once its standby port is attached to a TAP, writes two
//! *probe* frames into it and watches the TAP's `tx_packets`: when both
//! were taken, the VM runs here, and the port wakes as if the VM had
//! spoken. A probe goes to a locally administered unicast MAC that is not
//! the VM's, with the IEEE local experimental ethertype 0x88B5: virtio-net
//! in QEMU drops it (not the guest's address), a promiscuous guest ignores
//! it. Only TAPs are probed (a veth counts frames when they are sent).

use std::collections::BTreeSet;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::Duration;

use crate::agent::config::{Attachment as Spec, PortSpec};
use crate::driver::datapath::{Attachment, Datapath};
use crate::driver::netlink::LinkEvent;
use crate::driver::port::PortIo;
use crate::driver::sys::LinkMonitor;
use crate::pipeline::PortNo;
use crate::wire::VnetHdr;
use crate::Error;

/// Probe frames written into a standby TAP (see the module doc).
const PROBES: u64 = 2;
/// How often a probed TAP's counter is read: how late, at most, a quiet
/// VM's port wakes after its VMM reads the TAP (one netlink query a port,
/// only while its migration's destination waits for the VM).
pub const PROBE_EVERY: Duration = Duration::from_micros(500);
/// The ethertype of a probe: IEEE 802 local experimental 1.
const PROBE_ETHERTYPE: u16 = 0x88b5;

/// What a port's device is, for attaching it again.
pub trait Device {
    /// The interface index the device was opened on (0: not known).
    fn ifindex(&self) -> u32;
}

/// The agent's side of attachments: the link notifications and the probes.
#[derive(Debug)]
pub struct Attacher {
    monitor: Option<LinkMonitor>,
    query: Option<LinkMonitor>,
    /// Ports being probed: (port, interface, tx_packets before the probes).
    probes: Vec<(PortNo, u32, u64)>,
    /// (port, interface, migration) already probed or found not a TAP.
    probed: BTreeSet<(PortNo, u32, u64)>,
    /// Ports attached since the last [`Attacher::take_attached`].
    attached: Vec<PortNo>,
    /// Ports whose VMM read their TAP since the last [`Attacher::take_read`].
    read: Vec<PortNo>,
}

impl Default for Attacher {
    fn default() -> Self {
        Self::new()
    }
}

impl Attacher {
    /// Listen to the kernel's link notifications. Without them (no
    /// rtnetlink here) ports attach only when they are applied.
    pub fn new() -> Self {
        let monitor = LinkMonitor::subscribe()
            .map_err(|e| tracing::warn!(error = %e, "no link notifications: interfaces that appear later will not be attached"))
            .ok();
        Attacher {
            monitor,
            query: LinkMonitor::query().ok(),
            ..Self::quiet()
        }
    }

    /// An attacher that hears nothing (the lab: its ports are in memory).
    pub fn quiet() -> Self {
        Attacher {
            monitor: None,
            query: None,
            probes: Vec::new(),
            probed: BTreeSet::new(),
            attached: Vec::new(),
            read: Vec::new(),
        }
    }

    /// The fd to wait on for link notifications.
    pub fn fd(&self) -> Option<RawFd> {
        self.monitor.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// How soon [`Attacher::tick`] wants to run again.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (!self.probes.is_empty()).then_some(PROBE_EVERY)
    }

    /// Read the link notifications and attach, detach or re-attach the
    /// ports they concern; true when a port's device changed.
    pub fn on_links<P: PortIo + Device>(
        &mut self,
        dp: &mut Datapath<P>,
        specs: &[PortSpec],
        open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    ) -> bool {
        let Some(m) = self.monitor.as_mut() else {
            return false;
        };
        let events = match m.read() {
            Ok(e) => e,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // The kernel dropped notifications: look at every port.
                tracing::warn!("link notifications were lost; checking every port's interface");
                return self.recheck(dp, specs, open);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading link notifications");
                return false;
            }
        };
        let mut changed = false;
        // Only a VMM's interfaces: a TAP the agent made is the agent's, and
        // its netdev may move to another namespace (a VM's) and stay good.
        let vmm = |s: &&PortSpec, name: &str| matches!(&s.attach, Spec::Netdev(n) if n == name);
        for e in events {
            match e {
                LinkEvent::Present { index, name, .. } => {
                    for s in specs.iter().filter(|s| vmm(s, &name)) {
                        let Some(no) = dp.switch.port_by_name(&s.port.name) else {
                            continue;
                        };
                        let current = dp.port_io(no).map(|io| io.ifindex());
                        if current == Some(index) {
                            continue;
                        }
                        changed |= self.attach(dp, no, s, open);
                    }
                }
                LinkEvent::Gone { index, name } => {
                    for s in specs.iter().filter(|s| vmm(s, &name)) {
                        let Some(no) = dp.switch.port_by_name(&s.port.name) else {
                            continue;
                        };
                        if dp.port_io(no).is_some_and(|io| io.ifindex() == index) {
                            self.gone(dp, no, &name);
                            changed = true;
                        }
                    }
                }
                LinkEvent::Error(_) => {}
            }
        }
        changed
    }

    /// A port's device failed a read: if its interface is gone or was
    /// re-created, detach (and re-attach); true when its device changed.
    pub fn on_port_error<P: PortIo + Device>(
        &mut self,
        dp: &mut Datapath<P>,
        specs: &[PortSpec],
        no: PortNo,
        error: &io::Error,
        open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    ) -> bool {
        let Some(s) = dp
            .switch
            .port(no)
            .and_then(|(cfg, _)| specs.iter().find(|s| s.port.id == cfg.id))
        else {
            return false;
        };
        let Spec::Netdev(dev) = &s.attach else {
            tracing::warn!(port = %s.port.id, error = %error, "reading the port's TAP");
            return false;
        };
        let now_index = crate::driver::sys::ifindex(dev).ok();
        let had = dp.port_io(no).map(|io| io.ifindex());
        if now_index.is_some() && now_index == had {
            // Still the same interface (set down, say): keep it.
            tracing::warn!(port = %s.port.id, device = dev, error = %error, "reading the port's interface");
            return false;
        }
        let dev = dev.to_string();
        self.gone(dp, no, &dev);
        if now_index.is_some() {
            self.attach(dp, no, s, open);
        }
        true
    }

    /// Attach every port that waits for an interface that exists now.
    pub fn recheck<P: PortIo + Device>(
        &mut self,
        dp: &mut Datapath<P>,
        specs: &[PortSpec],
        open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    ) -> bool {
        let mut changed = false;
        for s in specs {
            let (Some(dev), Some(no)) = (s.attach.device(), dp.switch.port_by_name(&s.port.name))
            else {
                continue;
            };
            let now_index = crate::driver::sys::ifindex(dev).ok();
            let had = dp.port_io(no).map(|io| io.ifindex());
            if now_index == had || matches!(s.attach, Spec::Tap { .. }) {
                continue;
            }
            let dev = dev.to_string();
            if had.is_some() {
                self.gone(dp, no, &dev);
            }
            if now_index.is_some() {
                self.attach(dp, no, s, open);
            }
            changed = true;
        }
        changed
    }

    /// Open port `no`'s device and attach it (its old one, if any, goes);
    /// a device that does not exist leaves the port waiting. True when the
    /// port's device changed.
    pub fn attach<P: PortIo + Device>(
        &mut self,
        dp: &mut Datapath<P>,
        no: PortNo,
        s: &PortSpec,
        open: &mut impl FnMut(&PortSpec) -> Result<P, Error>,
    ) -> bool {
        let had = dp.detach(no).is_some();
        // A device that went away stays "gone" (not "waiting") until it is back.
        let was_gone = had || matches!(dp.attachment(no), Some(Attachment::Gone { .. }));
        let Some(dev) = s.attach.device().map(str::to_string) else {
            dp.set_attachment(no, Some(Attachment::Waiting { device: None }));
            return had;
        };
        match open(s) {
            Ok(io) => {
                let ifindex = io.ifindex();
                if let Err(e) = dp.attach(no, io) {
                    let error = format!("duplicating its handle: {e}");
                    dp.set_attachment(no, Some(Attachment::Failed { device: dev, error }));
                    return had;
                }
                tracing::info!(port = %s.port.id, device = %dev, ifindex, "port attached to its interface");
                dp.set_attachment(
                    no,
                    Some(Attachment::Attached {
                        device: dev,
                        ifindex,
                    }),
                );
                self.attached.push(no);
                true
            }
            Err(e) if absent(&e) => {
                tracing::info!(port = %s.port.id, device = %dev, "port waits for its interface");
                let a = if was_gone && dp.attachment(no).and_then(device_of) == Some(dev.as_str()) {
                    Attachment::Gone { device: dev }
                } else {
                    Attachment::Waiting { device: Some(dev) }
                };
                dp.set_attachment(no, Some(a));
                had
            }
            Err(e) => {
                tracing::error!(port = %s.port.id, device = %dev, error = %e, "cannot attach the port");
                dp.set_attachment(
                    no,
                    Some(Attachment::Failed {
                        device: dev,
                        error: e.to_string(),
                    }),
                );
                had
            }
        }
    }

    fn gone<P: PortIo>(&mut self, dp: &mut Datapath<P>, no: PortNo, dev: &str) {
        dp.detach(no);
        self.probes.retain(|(p, ..)| *p != no);
        tracing::info!(port = ?no, device = dev, "the port's interface is gone; waiting for it");
        dp.set_attachment(
            no,
            Some(Attachment::Gone {
                device: dev.to_string(),
            }),
        );
    }

    /// Ports attached since the last call.
    pub fn take_attached(&mut self) -> Vec<PortNo> {
        std::mem::take(&mut self.attached)
    }

    /// Ports whose VMM was seen reading their TAP since the last call.
    pub fn take_read(&mut self) -> Vec<PortNo> {
        std::mem::take(&mut self.read)
    }

    /// Probe the TAPs of migrations' standby ports, and wake those whose
    /// VMM took the probes (see the module doc).
    pub fn tick<P: PortIo + Device>(&mut self, dp: &mut Datapath<P>, specs: &[PortSpec]) {
        let Some(q) = self.query.as_mut() else {
            return;
        };
        // Nothing to probe or watch (the usual case): no work, no allocation.
        let migrating = |s: &PortSpec| s.standby && s.migration.is_some();
        if self.probes.is_empty() && self.probed.is_empty() && !specs.iter().any(migrating) {
            return;
        }
        for s in specs {
            let (true, Some(m), Spec::Netdev(_)) = (s.standby, s.migration, &s.attach) else {
                continue;
            };
            let Some(no) = dp.switch.port_by_name(&s.port.name) else {
                continue;
            };
            if !dp.switch.port_standby(no) {
                continue;
            }
            let Some(index) = dp.port_io(no).map(|io| io.ifindex()) else {
                continue;
            };
            if !self.probed.insert((no, index, m)) {
                continue;
            }
            let Ok(LinkEvent::Present {
                kind, tx_packets, ..
            }) = q.link(index)
            else {
                continue;
            };
            if kind.as_deref() != Some("tun") {
                continue;
            }
            let base = tx_packets.unwrap_or(0);
            let frame = probe_frame(s);
            let sent = dp.port_io(no).is_some_and(|io| {
                (0..PROBES).all(|_| {
                    let hdr = io.offloads().then(VnetHdr::default);
                    io.send(hdr.as_ref(), &[IoSlice::new(&frame)]).is_ok()
                })
            });
            if sent {
                tracing::info!(port = %s.port.id, ifindex = index, "probing the TAP: the VM runs here once its VMM reads it");
                self.probes.push((no, index, base));
            }
        }
        let mut woken = Vec::new();
        self.probes.retain(|&(no, index, base)| {
            if !dp.switch.port_standby(no) {
                return false;
            }
            match q.link(index) {
                Ok(LinkEvent::Present {
                    tx_packets: Some(n),
                    ..
                }) if n >= base + PROBES => {
                    woken.push(no);
                    false
                }
                Ok(_) => true,
                Err(_) => false,
            }
        });
        for no in woken {
            tracing::info!(port = ?no, "the VMM reads the port's TAP: the VM runs here");
            dp.switch.wake_port(no);
            self.read.push(no);
        }
        // Forget probes of ports that left standby or went away.
        let live: BTreeSet<PortNo> = specs
            .iter()
            .filter(|s| s.standby)
            .filter_map(|s| dp.switch.port_by_name(&s.port.name))
            .collect();
        self.probed.retain(|(no, ..)| live.contains(no));
    }
}

/// The device an attachment names.
fn device_of(a: &Attachment) -> Option<&str> {
    match a {
        Attachment::Attached { device, .. }
        | Attachment::Gone { device }
        | Attachment::Failed { device, .. } => Some(device),
        Attachment::Waiting { device } => device.as_deref(),
    }
}

/// Whether opening a device failed because it does not exist (yet).
fn absent(e: &Error) -> bool {
    match e {
        Error::Io { cause, .. } => {
            cause.kind() == io::ErrorKind::NotFound
                || matches!(cause.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
        }
        _ => false,
    }
}

/// A probe for port `s`'s TAP: to a locally administered MAC that is not
/// the VM's, ethertype 0x88B5, "dvs probe" and the port ID.
fn probe_frame(s: &PortSpec) -> Vec<u8> {
    let vm = s.port.mac.map(|m| m.0).unwrap_or_default();
    // Not the VM's MAC: flip a bit of its last octet.
    let mut dst = [0x02, 0x64, 0x76, 0x73, 0x00, 0x00];
    dst[5] = vm[5] ^ 0x01;
    let src = [0x02, 0x64, 0x76, 0x73, 0x00, 0x01];
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(b"dvs probe ");
    f.extend_from_slice(s.port.id.to_string().as_bytes());
    f.resize(60, 0);
    f
}
