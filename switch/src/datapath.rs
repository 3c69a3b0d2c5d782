//! The driver around the switch core: reads frames from ports and the VXLAN
//! socket into one reusable buffer, runs [`Switch::process`], and sends each
//! output — tagging with a gathered write, encapsulating in the buffer's
//! headroom. No allocation per frame.
//!
//! Ports are anything that implements [`PortIo`]: TAP devices and AF_PACKET
//! sockets in the agent, in-memory queues in the lab.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use serde::Serialize;

use crate::counters::{MacCounters, PortCounters, TunnelCounters};
use crate::pipeline::{Egress, Ingress, Output, PortNo, Switch};
use crate::sys::{self, StrippedTag};
use crate::wire::{self, vxlan, Coalescer, Segments, VnetHdr};

/// Bytes kept free before every received frame: room to re-insert a tag the
/// kernel stripped and to write a VXLAN header in place.
pub const HEADROOM: usize = 64;
/// The largest frame or datagram read (a 64 KB GSO frame fits).
pub const MAX_READ: usize = 65_535 + 14 + 8 + 8;
/// Frames read from one source per wakeup before moving to the next.
pub const BATCH: usize = 64;

/// What a port's read returned besides the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// Length of the frame now at the start of the buffer.
    pub len: usize,
    /// A VLAN tag the kernel took off (AF_PACKET); the driver puts it back.
    pub tag: Option<StrippedTag>,
    /// The virtio-net header of a port with offloads.
    pub vnet: Option<VnetHdr>,
}

/// A port's device, as the driver sees it.
pub trait PortIo {
    /// Read one frame into `buf`; `WouldBlock` when none is waiting,
    /// `InvalidData` when it did not fit.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<RxMeta>;
    /// Send one frame gathered from `parts`. `vnet` is `Some` exactly when
    /// the port [`offloads`](PortIo::offloads).
    fn send(&mut self, vnet: Option<&VnetHdr>, parts: &[IoSlice<'_>]) -> io::Result<()>;
    /// The fd to wait on, when the port has one.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Whether received frames may carry checksums a sender's offload left
    /// unfinished without saying so (a raw socket on a veth or a VMM's tap
    /// does; a TAP with or without virtio-net headers does not).
    fn partial_checksums(&self) -> bool {
        false
    }
    /// Whether the port takes and gives virtio-net headers: checksum-partial
    /// and 64 KB GSO frames pass through it whole.
    fn offloads(&self) -> bool {
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

impl Uplink {
    /// Bind the tunnel endpoint at `local`, non-blocking, with UDP GRO on.
    ///
    /// # Errors
    /// The socket errors, with the address in the message.
    pub fn bind(local: SocketAddr, remote_port: u16) -> Result<Self, crate::Error> {
        let socket = UdpSocket::bind(local)
            .map_err(|e| crate::Error::io(format!("binding the VXLAN socket to {local}"), e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| crate::Error::io("setting the VXLAN socket non-blocking", e))?;
        sys::enable_udp_gro(socket.as_raw_fd())
            .map_err(|e| crate::Error::io("enabling UDP GRO on the VXLAN socket", e))?;
        Ok(Self {
            socket,
            remote_port,
        })
    }
}

/// The most datagrams one UDP GSO send carries, and their total size.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// One host's switch with its ports and uplink.
#[derive(Debug)]
pub struct Datapath<P> {
    pub switch: Switch,
    ports: Vec<Option<P>>,
    uplink: Option<Uplink>,
    buf: Vec<u8>,
    out: Vec<Output>,
    /// Segments of the current GSO frame, each with 8 bytes of VXLAN room.
    segs: Vec<u8>,
    /// TCP segments from the tunnel being merged for one port with offloads.
    gro: Coalescer,
    gro_dest: Option<Output>,
    /// VXLAN datagrams of equal size for one destination, sent together
    /// with UDP GSO when the read batch ends.
    txq: TxQueue,
}

/// Datagrams waiting to leave the uplink in one UDP GSO send.
#[derive(Debug, Default)]
struct TxQueue {
    buf: Vec<u8>,
    dst: Option<SocketAddr>,
    /// Size of each datagram (all equal but possibly the last).
    block: usize,
    count: usize,
    /// A shorter datagram ended the train: nothing more may join.
    closed: bool,
}

impl<P: PortIo> Datapath<P> {
    pub fn new(switch: Switch, uplink: Option<Uplink>) -> Self {
        Self {
            switch,
            ports: Vec::new(),
            uplink,
            buf: vec![0; HEADROOM + MAX_READ],
            out: Vec::with_capacity(64),
            segs: Vec::with_capacity(2 * MAX_READ),
            gro: Coalescer::new(),
            gro_dest: None,
            txq: TxQueue {
                buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_READ),
                ..TxQueue::default()
            },
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
        let r = self.switch_port_batch(now, no);
        self.flush_tx();
        r
    }

    fn switch_port_batch(&mut self, now: Duration, no: PortNo) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                return Ok(n);
            };
            let meta = match io.recv(&mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // Too big for the buffer: the pipeline counts it as oversized.
                    RxMeta {
                        len: self.buf.len() - HEADROOM,
                        ..RxMeta::default()
                    }
                }
                Err(e) => return Err(e),
            };
            n += 1;
            let mut start = HEADROOM;
            let mut vnet = meta.vnet;
            if let Some(t) = meta.tag {
                start = wire::push_tag(&mut self.buf, start, t.tpid, t.tci).unwrap_or(start);
                vnet = vnet.map(|h| h.shifted(wire::TAG_LEN as i32));
            }
            let end = HEADROOM + meta.len;
            self.switch_frame(now, Ingress::Port(no), start, end, vnet);
        }
        Ok(n)
    }

    /// Queue one VXLAN datagram (`vxlan` header + `frame`) for `dst`,
    /// sending what is queued first when it cannot join.
    fn queue_tunnel(
        &mut self,
        dst: SocketAddr,
        vxlan_hdr: &[u8; 8],
        frame: Range<usize>,
    ) -> io::Result<()> {
        let len = vxlan::HEADER_LEN + frame.len();
        let q = &self.txq;
        let joins = q.dst == Some(dst)
            && !q.closed
            && len <= q.block
            && q.count < GSO_MAX_SEGMENTS
            && q.buf.len() + len <= GSO_MAX_BYTES;
        let mut r = Ok(());
        if !joins {
            r = self.send_tx();
            self.txq.dst = Some(dst);
            self.txq.block = len;
        }
        let q = &mut self.txq;
        q.buf.extend_from_slice(vxlan_hdr);
        q.buf.extend_from_slice(&self.buf[frame]);
        q.count += 1;
        q.closed = len < q.block;
        r
    }

    /// Send the queued datagrams, counting a failure against the tunnel.
    fn flush_tx(&mut self) {
        if let Err(e) = self.send_tx() {
            tracing::debug!(error = %e, "VXLAN send failed");
            self.switch.note_tunnel_tx_error();
        }
    }

    fn send_tx(&mut self) -> io::Result<()> {
        let q = &mut self.txq;
        let (Some(dst), Some(u)) = (q.dst, &self.uplink) else {
            q.buf.clear();
            q.count = 0;
            return Ok(());
        };
        let r = if q.count == 1 {
            u.socket.send_to(&q.buf, dst).map(drop)
        } else {
            sys::send_gso(u.socket.as_raw_fd(), &q.buf, q.block as u16, dst).map(drop)
        };
        q.buf.clear();
        q.count = 0;
        q.dst = None;
        q.closed = false;
        r
    }

    /// Switch up to [`BATCH`] receives from the uplink (each may hold
    /// several datagrams coalesced by UDP GRO).
    ///
    /// # Errors
    /// A receive error other than `WouldBlock`.
    pub fn poll_uplink(&mut self, now: Duration) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            let Some(u) = &self.uplink else { return Ok(n) };
            let (len, from, seg) =
                match sys::recv_gro(u.socket.as_raw_fd(), &mut self.buf[HEADROOM..]) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                    Err(e) => return Err(e),
                };
            n += 1;
            let ingress = Ingress::Tunnel { src: from.ip() };
            let seg = seg.unwrap_or(len).max(1);
            let mut at = HEADROOM;
            while at < HEADROOM + len {
                let end = (at + seg).min(HEADROOM + len);
                self.switch_frame(now, ingress, at, end, None);
                at = end;
            }
        }
        self.flush_gro();
        Ok(n)
    }

    /// Send the frame the coalescer holds, if any.
    fn flush_gro(&mut self) {
        let Some(dest) = self.gro_dest.take() else {
            return;
        };
        let Some((frame, hdr)) = self.gro.take() else {
            return;
        };
        let Egress::Port(no) = dest.egress else {
            return;
        };
        let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
            return;
        };
        let hdr = if dest.tag.is_some() {
            hdr.shifted(wire::TAG_LEN as i32)
        } else {
            hdr
        };
        if let Err(e) = send_tagged(io, Some(&hdr), frame, dest.tag) {
            tracing::debug!(error = %e, port = no.0, "send of a coalesced frame failed");
            self.switch.note_tx_error(dest.egress);
        }
    }

    /// Offer a frame from the tunnel to the coalescer when it goes to one
    /// port with offloads alone; true when the coalescer took it. Anything
    /// else first flushes what is held, so that frames stay in order.
    fn coalesce(&mut self, frame: Range<usize>) -> bool {
        let dest = match self.out.as_slice() {
            [o @ Output {
                egress: Egress::Port(no),
                ..
            }] if self
                .ports
                .get(usize::from(no.0))
                .and_then(Option::as_ref)
                .is_some_and(PortIo::offloads) =>
            {
                *o
            }
            _ => {
                self.flush_gro();
                return false;
            }
        };
        if self.gro_dest == Some(dest) && self.gro.offer(&self.buf[frame.clone()]) {
            return true;
        }
        self.flush_gro();
        if self.gro.offer(&self.buf[frame]) {
            self.gro_dest = Some(dest);
            return true;
        }
        false
    }

    /// Inject a frame as if it came from `ingress` (announcements, tests).
    pub fn inject(&mut self, now: Duration, ingress: Ingress, frame: &[u8]) {
        let len = frame.len().min(MAX_READ);
        self.buf[HEADROOM..HEADROOM + len].copy_from_slice(&frame[..len]);
        self.switch_frame(now, ingress, HEADROOM, HEADROOM + len, None);
        self.flush_tx();
    }

    fn switch_frame(
        &mut self,
        now: Duration,
        ingress: Ingress,
        start: usize,
        end: usize,
        vnet: Option<VnetHdr>,
    ) {
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
        // Offsets in the virtio-net header follow the tags the pipeline removed.
        let removed = (end - start) - frame.len();
        let mut vnet = vnet.map(|h| h.shifted(-(removed as i32)));
        if vnet.is_none() {
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
        }
        if matches!(ingress, Ingress::Tunnel { .. }) && self.coalesce(frame.clone()) {
            return;
        }
        let mut segments = None;
        for i in 0..self.out.len() {
            let o = self.out[i];
            if let Err(e) = self.send_one(o, frame.clone(), &mut vnet, &mut segments) {
                tracing::debug!(error = %e, egress = ?o.egress, "send failed");
                self.switch.note_tx_error(o.egress);
            }
        }
    }

    /// Send one output. `vnet` is the frame's offload state (a checksum is
    /// finished in place at most once); `segments` the frame cut for
    /// destinations without offloads (done at most once).
    fn send_one(
        &mut self,
        o: Output,
        frame: Range<usize>,
        vnet: &mut Option<VnetHdr>,
        segments: &mut Option<Segments>,
    ) -> io::Result<()> {
        let to_offload_port = match o.egress {
            Egress::Port(no) => self
                .ports
                .get(usize::from(no.0))
                .and_then(Option::as_ref)
                .is_some_and(PortIo::offloads),
            Egress::Tunnel { .. } => false,
        };
        if !to_offload_port {
            if let Some(h) = *vnet {
                if h.is_gso() {
                    if segments.is_none() {
                        let seg = wire::segment_tcp(
                            &self.buf[frame.clone()],
                            usize::from(h.gso_size),
                            vxlan::HEADER_LEN,
                            &mut self.segs,
                        )
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        *segments = Some(seg);
                    }
                    return self.send_segments(o, segments.unwrap_or_else(|| unreachable!()));
                }
                if h.needs_csum() {
                    let f = &mut self.buf[frame.clone()];
                    wire::complete_checksum_at(
                        f,
                        usize::from(h.csum_start),
                        usize::from(h.csum_offset),
                    );
                    *vnet = Some(VnetHdr {
                        flags: VnetHdr::F_DATA_VALID,
                        ..h
                    });
                }
            }
        }
        match o.egress {
            Egress::Port(no) => {
                let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let hdr = to_offload_port.then(|| {
                    let h = vnet.unwrap_or_default();
                    if o.tag.is_some() {
                        h.shifted(wire::TAG_LEN as i32)
                    } else {
                        h
                    }
                });
                send_tagged(io, hdr.as_ref(), &self.buf[frame], o.tag)
            }
            Egress::Tunnel { dst, vni } => {
                let Some(u) = &self.uplink else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let dst = SocketAddr::new(dst, u.remote_port);
                self.queue_tunnel(dst, &vxlan::encode(vni), frame)
            }
        }
    }

    /// Send the segments of a GSO frame to one output that cannot take it
    /// whole: a port without offloads (one write each) or the tunnel (UDP
    /// GSO: one system call for up to 64 datagrams).
    fn send_segments(&mut self, o: Output, s: Segments) -> io::Result<()> {
        let block_range = |i: usize| {
            let len = if i + 1 == s.count { s.last } else { s.block };
            i * s.block..i * s.block + len
        };
        match o.egress {
            Egress::Port(no) => {
                let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                for i in 0..s.count {
                    let b = block_range(i);
                    send_tagged(
                        io,
                        None,
                        &self.segs[b.start + vxlan::HEADER_LEN..b.end],
                        o.tag,
                    )?;
                }
                Ok(())
            }
            Egress::Tunnel { dst, vni } => {
                // What is queued for the tunnel goes first: order is kept.
                self.flush_tx();
                let Some(u) = &self.uplink else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let hdr = vxlan::encode(vni);
                for i in 0..s.count {
                    let b = block_range(i);
                    self.segs[b.start..b.start + vxlan::HEADER_LEN].copy_from_slice(&hdr);
                }
                let dst = SocketAddr::new(dst, u.remote_port);
                let per_call = (GSO_MAX_BYTES / s.block).clamp(1, GSO_MAX_SEGMENTS);
                let mut i = 0;
                while i < s.count {
                    let n = per_call.min(s.count - i);
                    let bytes = block_range(i).start..block_range(i + n - 1).end;
                    let chunk = &self.segs[bytes];
                    if n == 1 {
                        u.socket.send_to(chunk, dst)?;
                    } else {
                        sys::send_gso(u.socket.as_raw_fd(), chunk, s.block as u16, dst)?;
                    }
                    i += n;
                }
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

/// Write `frame` to `io`, inserting an 802.1Q tag with TCI `tag` after the
/// MACs when given, and the virtio-net header `hdr` before it when given.
fn send_tagged<P: PortIo>(
    io: &mut P,
    hdr: Option<&VnetHdr>,
    frame: &[u8],
    tag: Option<u16>,
) -> io::Result<()> {
    match tag {
        None => io.send(hdr, &[IoSlice::new(frame)]),
        Some(tci) => {
            let t = wire::vlan_tag(tci);
            let split = wire::MACS_LEN.min(frame.len());
            io.send(
                hdr,
                &[
                    IoSlice::new(&frame[..split]),
                    IoSlice::new(&t),
                    IoSlice::new(&frame[split..]),
                ],
            )
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
