//! The driver around the switch core: reads frames from ports and the VXLAN
//! socket into one reusable buffer, runs [`Switch::process`], and sends each
//! output — tagging with a gathered write, encapsulating in the buffer's
//! headroom. No allocation per frame.
//!
//! Ports are anything that implements [`PortIo`]: TAP devices and AF_PACKET
//! sockets in the agent, in-memory queues in the lab.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::time::Duration;

use serde::Serialize;

use crate::counters::{MacCounters, PortCounters, TunnelCounters};
use crate::pipeline::{Egress, Ingress, Output, PortNo, Switch};
use crate::sys::StrippedTag;
use crate::wire::{self, vxlan};

/// Bytes kept free before every received frame: room to re-insert a tag the
/// kernel stripped and to write a VXLAN header in place.
pub const HEADROOM: usize = 64;
/// The largest frame or datagram read (a 64 KB GSO frame fits).
pub const MAX_READ: usize = 65_535 + 14 + 8 + 8;
/// Frames read from one source per wakeup before moving to the next.
pub const BATCH: usize = 64;

/// A port's device, as the driver sees it.
pub trait PortIo {
    /// Read one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, Option<StrippedTag>)>;
    /// Send one frame, gathered from `parts`.
    fn send(&mut self, parts: &[IoSlice<'_>]) -> io::Result<()>;
    /// The fd to wait on, when the port has one.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Whether received frames may carry checksums a sender's offload left
    /// unfinished (a raw socket on a veth or a VMM's tap does; a TAP without
    /// vnet headers does not).
    fn partial_checksums(&self) -> bool {
        false
    }
}

/// The VXLAN uplink: a UDP socket on the host's tunnel address.
#[derive(Debug)]
pub struct Uplink {
    pub socket: UdpSocket,
    /// The UDP port of remote tunnel endpoints.
    pub remote_port: u16,
}

/// One host's switch with its ports and uplink.
#[derive(Debug)]
pub struct Datapath<P> {
    pub switch: Switch,
    ports: Vec<Option<P>>,
    uplink: Option<Uplink>,
    buf: Vec<u8>,
    out: Vec<Output>,
}

impl<P: PortIo> Datapath<P> {
    pub fn new(switch: Switch, uplink: Option<Uplink>) -> Self {
        Self {
            switch,
            ports: Vec::new(),
            uplink,
            buf: vec![0; HEADROOM + MAX_READ],
            out: Vec::with_capacity(64),
        }
    }

    /// Attach the device of port `no` (already added to the switch).
    pub fn attach(&mut self, no: PortNo, io: P) {
        let i = usize::from(no.0);
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(io);
    }

    /// Detach and return the device of port `no`.
    pub fn detach(&mut self, no: PortNo) -> Option<P> {
        self.ports.get_mut(usize::from(no.0))?.take()
    }

    pub fn port_io(&mut self, no: PortNo) -> Option<&mut P> {
        self.ports.get_mut(usize::from(no.0))?.as_mut()
    }

    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref()
    }

    /// The fds to wait on: each port's (with its number), then the uplink's.
    pub fn fds(&self) -> Vec<(Option<PortNo>, RawFd)> {
        use std::os::fd::AsRawFd;
        let mut v: Vec<(Option<PortNo>, RawFd)> = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((Some(PortNo(i as u16)), p.as_ref()?.raw_fd()?)))
            .collect();
        if let Some(u) = &self.uplink {
            v.push((None, u.socket.as_raw_fd()));
        }
        v
    }

    /// Switch up to [`BATCH`] frames waiting on port `no`; returns how many.
    ///
    /// # Errors
    /// A read error other than `WouldBlock` (the port's device failed).
    pub fn poll_port(&mut self, now: Duration, no: PortNo) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                return Ok(n);
            };
            let (len, tag) = match io.recv(&mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // Too big for the buffer: the pipeline counts it as oversized.
                    (self.buf.len() - HEADROOM, None)
                }
                Err(e) => return Err(e),
            };
            n += 1;
            let mut start = HEADROOM;
            if let Some(t) = tag {
                start = wire::push_tag(&mut self.buf, start, t.tpid, t.tci).unwrap_or(start);
            }
            let end = HEADROOM + len;
            self.switch_frame(now, Ingress::Port(no), start, end);
        }
        Ok(n)
    }

    /// Switch up to [`BATCH`] VXLAN packets waiting on the uplink.
    ///
    /// # Errors
    /// A receive error other than `WouldBlock`.
    pub fn poll_uplink(&mut self, now: Duration) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            let Some(u) = &self.uplink else { return Ok(n) };
            let (len, from) = match u.socket.recv_from(&mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) => return Err(e),
            };
            n += 1;
            self.switch_frame(
                now,
                Ingress::Tunnel { src: from.ip() },
                HEADROOM,
                HEADROOM + len,
            );
        }
        Ok(n)
    }

    /// Inject a frame as if it came from `ingress` (announcements, tests).
    pub fn inject(&mut self, now: Duration, ingress: Ingress, frame: &[u8]) {
        let len = frame.len().min(MAX_READ);
        self.buf[HEADROOM..HEADROOM + len].copy_from_slice(&frame[..len]);
        self.switch_frame(now, ingress, HEADROOM, HEADROOM + len);
    }

    fn switch_frame(&mut self, now: Duration, ingress: Ingress, start: usize, end: usize) {
        let p = self
            .switch
            .process(now, ingress, &mut self.buf[start..end], &mut self.out);
        let frame = start + p.frame.start..start + p.frame.end;
        if let crate::pipeline::Verdict::Drop(reason) = p.verdict {
            tracing::debug!(?ingress, ?reason, len = end - start, "drop");
        }
        if self.out.is_empty() {
            return;
        }
        let partial = match ingress {
            Ingress::Tunnel { .. } => true,
            Ingress::Port(no) => self
                .ports
                .get(usize::from(no.0))
                .and_then(Option::as_ref)
                .is_some_and(PortIo::partial_checksums),
        };
        if partial && wire::complete_partial_checksum(&mut self.buf[frame.clone()]) {
            self.switch.note_csum_completed(ingress);
        }
        for i in 0..self.out.len() {
            let o = self.out[i];
            if let Err(e) = self.send_one(o, frame.clone()) {
                tracing::debug!(error = %e, egress = ?o.egress, "send failed");
                self.switch.note_tx_error(o.egress);
            }
        }
    }

    fn send_one(&mut self, o: Output, frame: std::ops::Range<usize>) -> io::Result<()> {
        match o.egress {
            Egress::Port(no) => {
                let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let f = &self.buf[frame];
                match o.tag {
                    None => io.send(&[IoSlice::new(f)]),
                    Some(tci) => {
                        let tag = wire::vlan_tag(tci);
                        io.send(&[
                            IoSlice::new(&f[..wire::MACS_LEN]),
                            IoSlice::new(&tag),
                            IoSlice::new(&f[wire::MACS_LEN..]),
                        ])
                    }
                }
            }
            Egress::Tunnel { dst, vni } => {
                let Some(u) = &self.uplink else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                // The frame always starts at least HEADROOM - 4 bytes in.
                let h = frame.start - vxlan::HEADER_LEN;
                self.buf[h..frame.start].copy_from_slice(&vxlan::encode(vni));
                u.socket
                    .send_to(&self.buf[h..frame.end], SocketAddr::new(dst, u.remote_port))?;
                Ok(())
            }
        }
    }

    /// Everything the switch counts, for stats files and views.
    pub fn stats(&self, host: &str, now: Duration) -> Stats {
        let sw = &self.switch;
        Stats {
            host: host.to_string(),
            uptime_s: now.as_secs_f64(),
            generation: sw.generation(),
            ports: sw
                .ports()
                .map(|(no, cfg, c)| PortStats {
                    no: no.0,
                    id: cfg.id.to_string(),
                    name: cfg.name.clone(),
                    vlan: match &cfg.vlan {
                        dvs_proto::VlanMode::Access(v) => format!("access {v}"),
                        dvs_proto::VlanMode::Trunk { allowed, native } => match native {
                            Some(n) => format!("trunk {allowed} native {n}"),
                            None => format!("trunk {allowed}"),
                        },
                    },
                    counters: c.clone(),
                })
                .collect(),
            tunnel: sw.tunnel_counters().clone(),
            mac: sw.mac_counters().clone(),
            mac_entries: sw.mac_entries(now).len(),
        }
    }
}

/// A snapshot of a host's counters.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub host: String,
    pub uptime_s: f64,
    /// The switch's configuration generation.
    pub generation: u64,
    pub ports: Vec<PortStats>,
    pub tunnel: TunnelCounters,
    pub mac: MacCounters,
    /// Entries in the MAC table now.
    pub mac_entries: usize,
}

/// One port's line of [`Stats`].
#[derive(Debug, Clone, Serialize)]
pub struct PortStats {
    pub no: u16,
    pub id: String,
    pub name: String,
    pub vlan: String,
    pub counters: PortCounters,
}
