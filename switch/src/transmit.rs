//! The transmit half of the driver: everything that happens to a switched
//! frame after [`Switch::process`](crate::Switch::process) decided where it
//! goes — tagging with a gathered write, passing virtio-net offloads through
//! or finishing them (software TSO, checksums), VXLAN encapsulation with UDP
//! GSO batching, and coalescing TCP segments from the tunnel into GSO frames.
//!
//! It runs inline (the lab, tests) or on a thread of its own (the agent),
//! where it takes [`Job`]s — a received buffer, its frame and its outputs —
//! and hands the buffers back for reuse, so that reading, switching and
//! the kernel's receive work for the destination VM run on two cores.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;

use crate::datapath::{PortIo, Uplink, HEADROOM, MAX_READ};
use crate::pipeline::{Egress, Output, PortNo};
use crate::sys;
use crate::wire::{self, vxlan, Coalescer, Segments, VnetHdr};

/// The most datagrams one UDP GSO send carries, and their total size.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// A switched frame on its way out: the buffer it was received in, where
/// the frame lies in it, its offload state and its outputs.
#[derive(Debug)]
pub struct Job {
    pub buf: Vec<u8>,
    pub frame: Range<usize>,
    pub vnet: Option<VnetHdr>,
    pub out: Vec<Output>,
    /// The frame came from the tunnel (a candidate for coalescing).
    pub from_tunnel: bool,
}

impl Job {
    pub fn new() -> Self {
        Job {
            buf: vec![0; HEADROOM + MAX_READ],
            frame: 0..0,
            vnet: None,
            out: Vec::with_capacity(64),
            from_tunnel: false,
        }
    }
}

impl Default for Job {
    fn default() -> Self {
        Self::new()
    }
}

/// What the receive side tells the transmit thread.
#[derive(Debug)]
pub enum Msg<P> {
    /// Switched frames, in order. The vector comes back on the free channel
    /// holding the sent jobs, so that neither jobs nor vectors are allocated
    /// in steady state.
    Frames(Vec<Job>),
    Attach(PortNo, P),
    Detach(PortNo),
}

/// The transmit side: the ports' send handles, the uplink, scratch space.
#[derive(Debug)]
pub struct Transmit<P> {
    ports: Vec<Option<P>>,
    uplink: Option<Uplink>,
    /// Segments of the current GSO frame, each with 8 bytes of VXLAN room.
    segs: Vec<u8>,
    /// TCP segments from the tunnel being merged for one port with offloads.
    gro: Coalescer,
    gro_dest: Option<Output>,
    /// VXLAN datagrams of equal size for one destination, sent together with
    /// UDP GSO at the end of a batch.
    txq: TxQueue,
    /// Sends that failed, for the switch's counters.
    pub errors: Vec<TxFailure>,
}

/// Where a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxFailure {
    Port(PortNo),
    Tunnel,
}

impl From<Egress> for TxFailure {
    fn from(e: Egress) -> Self {
        match e {
            Egress::Port(no) => TxFailure::Port(no),
            Egress::Tunnel { .. } => TxFailure::Tunnel,
        }
    }
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

impl<P: PortIo> Transmit<P> {
    pub fn new(uplink: Option<Uplink>) -> Self {
        Self {
            ports: Vec::new(),
            uplink,
            segs: Vec::with_capacity(2 * MAX_READ),
            gro: Coalescer::new(),
            gro_dest: None,
            txq: TxQueue {
                buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_READ),
                ..TxQueue::default()
            },
            errors: Vec::new(),
        }
    }

    /// A second transmit side over clones of the same handles (for a
    /// thread), with scratch space of its own.
    ///
    /// # Errors
    /// Cloning a handle failed.
    pub fn try_clone(&self) -> io::Result<Self> {
        let uplink = match &self.uplink {
            Some(u) => Some(Uplink {
                socket: u.socket.try_clone()?,
                remote_port: u.remote_port,
            }),
            None => None,
        };
        let mut t = Transmit::new(uplink);
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(p) = p {
                t.attach(PortNo(i as u16), p.try_clone()?);
            }
        }
        Ok(t)
    }

    pub fn attach(&mut self, no: PortNo, io: P) {
        let i = usize::from(no.0);
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(io);
    }

    pub fn detach(&mut self, no: PortNo) -> Option<P> {
        self.ports.get_mut(usize::from(no.0))?.take()
    }

    /// Run the transmit side on the calling thread until the receive side
    /// hangs up: take jobs, send them, give their buffers back; flush
    /// batches whenever no job is waiting.
    ///
    /// `in_flight` counts the jobs handed over and not yet sent; it drops to
    /// zero only once everything is out (batches flushed), so that the
    /// receive side may then send on its own without reordering.
    pub fn serve(
        mut self,
        jobs: Receiver<Msg<P>>,
        free: SyncSender<Vec<Job>>,
        errors: SyncSender<TxFailure>,
        in_flight: Arc<AtomicUsize>,
    ) {
        loop {
            let msg = match jobs.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    self.flush();
                    self.report(&errors);
                    match jobs.recv() {
                        Ok(m) => m,
                        Err(_) => return,
                    }
                }
                Err(TryRecvError::Disconnected) => return,
            };
            match msg {
                Msg::Frames(mut batch) => {
                    for job in &mut batch {
                        self.send(job);
                        job.out.clear();
                    }
                    let n = batch.len();
                    if in_flight.load(Ordering::Acquire) == n {
                        self.flush();
                    }
                    in_flight.fetch_sub(n, Ordering::Release);
                    // The receive side may be gone; the buffers are then dropped.
                    let _ = free.try_send(batch);
                }
                Msg::Attach(no, io) => self.attach(no, io),
                Msg::Detach(no) => {
                    self.flush();
                    self.detach(no);
                }
            }
        }
    }

    fn report(&mut self, errors: &SyncSender<TxFailure>) {
        for e in self.errors.drain(..) {
            let _ = errors.try_send(e);
        }
    }

    /// Send every output of `job`.
    pub fn send(&mut self, job: &mut Job) {
        if job.from_tunnel && self.coalesce(job) {
            return;
        }
        let mut vnet = job.vnet;
        let mut segments = None;
        for i in 0..job.out.len() {
            let o = job.out[i];
            if let Err(e) = self.send_one(o, job, &mut vnet, &mut segments) {
                tracing::debug!(error = %e, egress = ?o.egress, "send failed");
                self.errors.push(o.egress.into());
            }
        }
    }

    /// Send what batches hold: the coalesced frame and the queued datagrams.
    pub fn flush(&mut self) {
        self.flush_gro();
        if let Err(e) = self.send_txq() {
            tracing::debug!(error = %e, "VXLAN send failed");
            self.errors.push(TxFailure::Tunnel);
        }
    }

    fn offloads(&self, egress: Egress) -> bool {
        match egress {
            Egress::Port(no) => self
                .ports
                .get(usize::from(no.0))
                .and_then(Option::as_ref)
                .is_some_and(PortIo::offloads),
            Egress::Tunnel { .. } => false,
        }
    }

    /// Offer a frame from the tunnel to the coalescer when it goes to one
    /// port with offloads alone; true when the coalescer took it. Anything
    /// else first flushes what is held, so that frames stay in order.
    fn coalesce(&mut self, job: &Job) -> bool {
        let dest = match job.out.as_slice() {
            [o] if matches!(o.egress, Egress::Port(_)) && self.offloads(o.egress) => *o,
            _ => {
                self.flush_gro();
                return false;
            }
        };
        let frame = &job.buf[job.frame.clone()];
        if self.gro_dest == Some(dest) && self.gro.offer(frame) {
            return true;
        }
        self.flush_gro();
        if self.gro.offer(frame) {
            self.gro_dest = Some(dest);
            return true;
        }
        false
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
            self.errors.push(dest.egress.into());
        }
    }

    /// Send one output. `vnet` is the frame's offload state (a checksum is
    /// finished in place at most once); `segments` the frame cut for
    /// destinations without offloads (done at most once).
    fn send_one(
        &mut self,
        o: Output,
        job: &mut Job,
        vnet: &mut Option<VnetHdr>,
        segments: &mut Option<Segments>,
    ) -> io::Result<()> {
        let frame = job.frame.clone();
        let to_offload_port = self.offloads(o.egress);
        if !to_offload_port {
            if let Some(h) = *vnet {
                if h.is_gso() {
                    if segments.is_none() {
                        let seg = wire::segment_tcp(
                            &job.buf[frame.clone()],
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
                    wire::complete_checksum_at(
                        &mut job.buf[frame.clone()],
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
                send_tagged(io, hdr.as_ref(), &job.buf[frame], o.tag)
            }
            Egress::Tunnel { dst, vni } => {
                let Some(u) = &self.uplink else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let dst = SocketAddr::new(dst, u.remote_port);
                self.queue_tunnel(dst, &vxlan::encode(vni), &job.buf[frame])
            }
        }
    }

    /// Queue one VXLAN datagram (`vxlan_hdr` + `frame`) for `dst`, sending
    /// what is queued first when it cannot join.
    fn queue_tunnel(
        &mut self,
        dst: SocketAddr,
        vxlan_hdr: &[u8; vxlan::HEADER_LEN],
        frame: &[u8],
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
            r = self.send_txq();
            self.txq.dst = Some(dst);
            self.txq.block = len;
        }
        let q = &mut self.txq;
        q.buf.extend_from_slice(vxlan_hdr);
        q.buf.extend_from_slice(frame);
        q.count += 1;
        q.closed = len < q.block;
        r
    }

    fn send_txq(&mut self) -> io::Result<()> {
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
                self.send_txq()?;
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
