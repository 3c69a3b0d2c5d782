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

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use dvs_proto::RateLimit;

use crate::policy::qos::Policer;
use std::sync::Arc;

use crate::driver::port::{PortIo, Uplink, HEADROOM, MAX_READ};
use crate::pipeline::{Egress, Output, PortNo};
use crate::wire::{self, vxlan, Coalescer, Segments, VnetHdr};

/// The most datagrams one UDP GSO send carries, and their total size.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// A switched frame on its way out: the buffer it was received in, where
/// the frame lies in it, its offload state and its outputs.
#[derive(Debug)]
pub struct Job {
    /// When it was switched (the shapers' clock).
    pub now: Duration,
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
            now: Duration::ZERO,
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
    /// Shape the traffic into a port (`None`: stop), at the given time.
    Shaper(PortNo, Option<RateLimit>, Duration),
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
    /// Shapers of traffic into VMs, by port number.
    shapers: Vec<Option<InShaper>>,
}

/// A shaper of the traffic into one VM: the port's buckets and a
/// byte-bounded queue of the frames that wait for them.
#[derive(Debug)]
struct InShaper {
    bucket: Policer,
    queue: VecDeque<Held>,
    bytes: usize,
    max_bytes: usize,
    /// Buffers of frames already sent, for the next ones to wait in.
    pool: Vec<Vec<u8>>,
}

impl InShaper {
    /// The head of the queue, when its time has come (charged to the
    /// buckets).
    fn take(&mut self, now: Duration) -> Option<Held> {
        let len = self.queue.front()?.buf.len();
        if self.bucket.wait(now).is_some() {
            return None;
        }
        self.bucket.charge(now, len);
        self.bytes -= len;
        self.queue.pop_front()
    }

    fn new(limit: RateLimit, now: Duration) -> Self {
        InShaper {
            bucket: Policer::new(limit, now),
            queue: VecDeque::new(),
            bytes: 0,
            max_bytes: limit.queue_bytes as usize,
            pool: Vec::new(),
        }
    }
}

/// A frame waiting for its port's shaper.
#[derive(Debug)]
struct Held {
    buf: Vec<u8>,
    vnet: Option<VnetHdr>,
    tag: Option<u16>,
}

/// Where a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxFailure {
    Port(PortNo),
    Tunnel,
    /// A frame for a shaped port found its queue full.
    QueueFull(PortNo),
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
            shapers: Vec::new(),
        }
    }

    /// A second transmit side over clones of the same handles (for a
    /// thread), with scratch space of its own.
    ///
    /// # Errors
    /// Cloning a handle failed.
    pub fn try_clone(&self) -> io::Result<Self> {
        let uplink = match &self.uplink {
            Some(u) => Some(u.try_clone()?),
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
        clock: Instant,
    ) {
        loop {
            let msg = match jobs.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    self.flush();
                    let now = clock.elapsed();
                    self.release(now);
                    self.report(&errors);
                    // Wake for the next held frame, or sleep until a job.
                    let next = match self.next_release(now) {
                        Some(w) => jobs.recv_timeout(w.max(Duration::from_micros(50))),
                        None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match next {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
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
                    self.release(clock.elapsed());
                }
                Msg::Attach(no, io) => self.attach(no, io),
                Msg::Shaper(no, limit, now) => self.set_shaper(no, limit, now),
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
            if let Egress::Port(no) = o.egress {
                if self.shaper_of(no).is_some() && !self.shaper_admits(no, job.now, job.frame.len())
                {
                    self.hold(no, o.tag, &job.buf[job.frame.clone()], vnet);
                    continue;
                }
            }
            let frame = job.frame.clone();
            if let Err(e) = self.send_one(o, &mut job.buf, frame, &mut vnet, &mut segments) {
                tracing::debug!(error = %e, egress = ?o.egress, "send failed");
                self.errors.push(o.egress.into());
            }
        }
    }

    /// Shape what goes to port `no` with `limit` (`None`: no shaping); what
    /// waits is sent first.
    pub fn set_shaper(&mut self, no: PortNo, limit: Option<RateLimit>, now: Duration) {
        self.release(now);
        let i = usize::from(no.0);
        if self.shapers.len() <= i {
            self.shapers.resize_with(i + 1, || None);
        }
        match (limit, self.shapers[i].as_mut()) {
            (Some(l), Some(s)) if s.bucket.limit() == l => {}
            (Some(l), _) => {
                let held = self.shapers[i].take().map(|s| s.queue).unwrap_or_default();
                let mut s = InShaper::new(l, now);
                for h in held {
                    s.bytes += h.buf.len();
                    s.queue.push_back(h);
                }
                self.shapers[i] = Some(s);
            }
            (None, _) => {
                // Nothing may stay held: send what waits.
                if let Some(mut s) = self.shapers[i].take() {
                    while let Some(h) = s.queue.pop_front() {
                        self.send_held(no, h);
                    }
                }
            }
        }
    }

    fn shaper_of(&mut self, no: PortNo) -> Option<&mut InShaper> {
        self.shapers.get_mut(usize::from(no.0))?.as_mut()
    }

    /// May a frame of `len` bytes to shaped port `no` go now? Charges it if
    /// so (nothing may overtake what waits).
    fn shaper_admits(&mut self, no: PortNo, now: Duration, len: usize) -> bool {
        let Some(s) = self.shaper_of(no) else {
            return true;
        };
        if !s.queue.is_empty() || s.bucket.wait(now).is_some() {
            return false;
        }
        s.bucket.charge(now, len);
        true
    }

    /// Keep a copy of a frame for shaped port `no`, or count it dropped when
    /// the queue is full.
    fn hold(&mut self, no: PortNo, tag: Option<u16>, frame: &[u8], vnet: Option<VnetHdr>) {
        let Some(s) = self
            .shapers
            .get_mut(usize::from(no.0))
            .and_then(Option::as_mut)
        else {
            return;
        };
        if s.bytes + frame.len() > s.max_bytes {
            self.errors.push(TxFailure::QueueFull(no));
            return;
        }
        let mut buf = s.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        s.bytes += buf.len();
        s.queue.push_back(Held { buf, vnet, tag });
    }

    /// Send the held frames whose time has come.
    pub fn release(&mut self, now: Duration) {
        for i in 0..self.shapers.len() {
            let no = PortNo(i as u16);
            while let Some(h) = self.shapers[i].as_mut().and_then(|s| s.take(now)) {
                self.send_held(no, h);
            }
        }
    }

    /// How long until held frames may go (`None`: nothing is held).
    pub fn next_release(&mut self, now: Duration) -> Option<Duration> {
        self.shapers
            .iter_mut()
            .flatten()
            .filter(|s| !s.queue.is_empty())
            .map(|s| s.bucket.wait(now).unwrap_or(Duration::ZERO))
            .min()
    }

    fn send_held(&mut self, no: PortNo, mut h: Held) {
        let o = Output {
            egress: Egress::Port(no),
            tag: h.tag,
        };
        let len = h.buf.len();
        let mut vnet = h.vnet;
        if let Err(e) = self.send_one(o, &mut h.buf, 0..len, &mut vnet, &mut None) {
            tracing::debug!(error = %e, port = no.0, "send of a held frame failed");
            self.errors.push(o.egress.into());
        }
        if let Some(Some(s)) = self.shapers.get_mut(usize::from(no.0)) {
            if s.pool.len() < 64 {
                s.pool.push(h.buf);
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
            [o @ Output {
                egress: Egress::Port(no),
                ..
            }] if self.offloads(o.egress)
                && self
                    .shapers
                    .get(usize::from(no.0))
                    .is_none_or(Option::is_none) =>
            {
                *o
            }
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
        buf: &mut [u8],
        frame: Range<usize>,
        vnet: &mut Option<VnetHdr>,
        segments: &mut Option<Segments>,
    ) -> io::Result<()> {
        let to_offload_port = self.offloads(o.egress);
        if !to_offload_port {
            if let Some(h) = *vnet {
                if h.is_gso() {
                    if segments.is_none() {
                        let seg = wire::segment_tcp(
                            &buf[frame.clone()],
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
                        &mut buf[frame.clone()],
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
                send_tagged(io, hdr.as_ref(), &buf[frame], o.tag)
            }
            Egress::Tunnel { dst, vni } => {
                let Some(u) = &self.uplink else {
                    return Err(io::Error::from(io::ErrorKind::NotConnected));
                };
                let dst = SocketAddr::new(dst, u.remote_port);
                self.queue_tunnel(dst, &vxlan::encode(vni), &buf[frame])
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
            u.underlay.send(&q.buf, dst)
        } else {
            u.underlay.send_segmented(&q.buf, q.block, dst)
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
                        u.underlay.send(chunk, dst)?;
                    } else {
                        u.underlay.send_segmented(chunk, s.block, dst)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::port::RxMeta;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A port that records what it is sent.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Rc<RefCell<Vec<usize>>>);

    impl PortIo for Recorder {
        fn recv(&mut self, _: &mut [u8]) -> io::Result<RxMeta> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn send(&mut self, _: Option<&VnetHdr>, parts: &[IoSlice<'_>]) -> io::Result<()> {
            self.0
                .borrow_mut()
                .push(parts.iter().map(|p| p.len()).sum());
            Ok(())
        }
        fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn try_clone(&self) -> io::Result<Self> {
            Ok(self.clone())
        }
    }

    fn job(now: Duration, len: usize) -> Job {
        let mut j = Job::new();
        j.now = now;
        j.frame = HEADROOM..HEADROOM + len;
        j.out.push(Output {
            egress: Egress::Port(PortNo(0)),
            tag: None,
        });
        j
    }

    #[test]
    fn a_shaped_port_gets_its_frames_at_the_rate_and_overflow_is_counted() {
        let port = Recorder::default();
        let mut t = Transmit::new(None);
        t.attach(PortNo(0), port.clone());
        // 1.2 Mbit/s = 150 kB/s, 3 kB burst, 15 kB queue.
        let limit = RateLimit {
            avg_bps: 1_200_000,
            peak_bps: None,
            burst_bytes: 3000,
            shape: true,
            queue_bytes: 15_000,
        };
        t.set_shaper(PortNo(0), Some(limit), Duration::ZERO);
        // Twenty 1500-byte frames at once: the burst lets two leave, ten
        // wait (15 kB), eight overflow.
        for _ in 0..20 {
            t.send(&mut job(Duration::ZERO, 1500));
        }
        assert_eq!(port.0.borrow().len(), 2, "the burst");
        let full = t
            .errors
            .iter()
            .filter(|e| **e == TxFailure::QueueFull(PortNo(0)))
            .count();
        assert_eq!(full, 8);
        // The rest leaves at 150 kB/s: one 1500-byte frame per 10 ms.
        assert!(t.next_release(Duration::ZERO).is_some());
        // Released whenever it says so, as the transmit thread does.
        let mut now = Duration::ZERO;
        while now < Duration::from_millis(50) {
            now += t.next_release(now).unwrap_or(Duration::from_millis(1));
            t.release(now);
        }
        let after_50ms = port.0.borrow().len();
        assert!(
            (6..=8).contains(&after_50ms),
            "{after_50ms} frames after 50 ms"
        );
        while let Some(w) = t.next_release(now) {
            now += w;
            t.release(now);
        }
        assert_eq!(port.0.borrow().len(), 12);
        let now = now.max(Duration::from_secs(1));
        assert_eq!(t.next_release(now), None);
        // Removing the shaper sends nothing twice and holds nothing back.
        t.send(&mut job(now, 1500));
        t.set_shaper(PortNo(0), None, now);
        t.send(&mut job(now, 1500));
        assert_eq!(port.0.borrow().len(), 14);
    }
}
