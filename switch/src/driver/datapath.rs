//! The driver around the switch core, receive side: reads frames from ports
//! and the VXLAN socket into pooled buffers, runs [`Switch::process`], and
//! hands each switched frame to the [`transmit`](crate::driver::transmit) side —
//! inline, or on a thread of its own. No allocation per frame: buffers
//! circulate between the two sides.
//!
//! Ports are anything that implements [`PortIo`]: TAP devices and AF_PACKET
//! sockets in the agent, in-memory queues in the lab.

pub use dvs_proto::stats::{
    Attachment, AttachmentStats, ConnStats, DhcpBindingStats, MonitorStats, PortStats, Stats,
};
use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::driver::port::{PortIo, RxMeta, Underlay, Uplink, BATCH, HEADROOM, MAX_READ};
use crate::driver::transmit::{Job, Msg, Transmit, TxFailure};
use crate::flow::export::{Collectors, Exporter};
use crate::pipeline::{Egress, Ingress, PortNo, Switch};
use crate::wire::netflow::ExportClock;
use crate::wire::{self, VnetHdr};
use dvs_proto::RateLimit;

/// Buffers in flight between the receive and transmit sides.
const JOBS_IN_FLIGHT: usize = 64;
/// Jobs handed to the transmit thread at once (fewer wake-ups).
const HANDOVER: usize = 16;

/// Where switched frames go to be sent.
#[derive(Debug)]
enum Tx<P> {
    /// Sent on the receiving thread (the lab, tests).
    Inline(Transmit<P>),
    /// Sent by a transmit thread (the agent) under load; a frame that
    /// arrives alone while the thread has nothing in flight is sent inline,
    /// sparing it the hand-over latency.
    Thread {
        jobs: SyncSender<Msg<P>>,
        free: Receiver<Vec<Job>>,
        errors: Receiver<TxFailure>,
        /// Switched jobs not yet handed over.
        outbox: Vec<Job>,
        /// Free jobs given back.
        stash: Vec<Job>,
        in_flight: Arc<AtomicUsize>,
        inline: Transmit<P>,
        handle: Option<JoinHandle<()>>,
    },
    /// Moving between the two.
    Switching,
}

/// One host's switch with its ports and uplink.
///
/// The receive side lives here: it reads a frame into the current job's
/// buffer, switches it, and hands the job to the transmit side (inline, or
/// a thread after [`Datapath::spawn_transmit`]).
#[derive(Debug)]
pub struct Datapath<P> {
    pub switch: Switch,
    ports: Vec<Option<P>>,
    uplink: Option<Box<dyn Underlay>>,
    /// The job being filled by the next read.
    job: Job,
    /// A job kept back for reuse.
    spare: Option<Job>,
    tx: Tx<P>,
    /// Frames switched in the current batch.
    batch_pos: usize,
    /// The shaper of the traffic into each port, when it has one.
    shaped: Vec<Option<RateLimit>>,
    /// An exporter per NetFlow monitor the ports use.
    exporters: Vec<(Exporter, Collectors)>,
    /// The chassis number in exports and the address they come from.
    flow_domain: u32,
    flow_source: IpAddr,
    next_export: Duration,
    /// Each port's device, as the agent last found it.
    attachments: Vec<Option<Attachment>>,
}

/// How often ended flow records are exported.
const EXPORT_TICK: Duration = Duration::from_millis(200);

impl<P: PortIo> Datapath<P> {
    /// A datapath that sends on the calling thread.
    ///
    /// # Errors
    /// Cloning the uplink socket for the transmit side failed.
    pub fn new(switch: Switch, uplink: Option<Uplink>) -> io::Result<Self> {
        let (rx, tx_uplink) = match uplink {
            Some(u) => {
                let tx = u.try_clone()?;
                (Some(u.underlay), Some(tx))
            }
            None => (None, None),
        };
        Ok(Self {
            switch,
            ports: Vec::new(),
            uplink: rx,
            job: Job::new(),
            spare: None,
            tx: Tx::Inline(Transmit::new(tx_uplink)),
            batch_pos: 0,
            shaped: Vec::new(),
            exporters: Vec::new(),
            flow_domain: 1,
            flow_source: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            next_export: Duration::ZERO,
            attachments: Vec::new(),
        })
    }

    /// Note where port `no`'s device stands (views and stats show it).
    pub fn set_attachment(&mut self, no: PortNo, a: Option<Attachment>) {
        let i = usize::from(no.0);
        if self.attachments.len() <= i {
            self.attachments.resize(i + 1, None);
        }
        self.attachments[i] = a;
    }

    /// Where port `no`'s device stands.
    pub fn attachment(&self, no: PortNo) -> Option<&Attachment> {
        self.attachments.get(usize::from(no.0))?.as_ref()
    }

    /// Attach the device of port `no` (already added to the switch); the
    /// transmit side gets a clone of the handle.
    ///
    /// # Errors
    /// Cloning the handle failed.
    pub fn attach(&mut self, no: PortNo, io: P) -> io::Result<()> {
        let tx = io.try_clone()?;
        if let Tx::Thread { inline, .. } = &mut self.tx {
            inline.attach(no, io.try_clone()?);
        }
        let i = usize::from(no.0);
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(io);
        match &mut self.tx {
            Tx::Inline(t) => t.attach(no, tx),
            Tx::Thread { jobs, .. } => {
                let _ = jobs.send(Msg::Attach(no, tx));
            }
            Tx::Switching => {}
        }
        self.sync_shaper(no, Duration::ZERO);
        Ok(())
    }

    /// Change a port's rate limits (see [`Switch::set_port_qos`]) and its
    /// shaper on the transmit side.
    ///
    /// # Errors
    /// [`crate::Error::UnknownPortNo`].
    pub fn set_port_qos(
        &mut self,
        no: PortNo,
        qos: crate::PortQos,
        now: Duration,
    ) -> Result<(), crate::Error> {
        self.switch.set_port_qos(no, qos)?;
        self.sync_shaper(no, now);
        Ok(())
    }

    /// Give the transmit side the shaper the switch has for traffic into
    /// port `no`.
    fn sync_shaper(&mut self, no: PortNo, now: Duration) {
        let limit = self.switch.port_inbound_shaper(no);
        let i = usize::from(no.0);
        if self.shaped.len() <= i {
            self.shaped.resize(i + 1, None);
        }
        self.shaped[i] = limit;
        match &mut self.tx {
            Tx::Inline(t) => t.set_shaper(no, limit, now),
            Tx::Thread { jobs, .. } => {
                let _ = jobs.send(Msg::Shaper(no, limit, now));
            }
            Tx::Switching => {}
        }
    }

    /// Does a copy of the current job go to a shaped port?
    fn to_shaped_port(&self) -> bool {
        let shaped = |no: PortNo| {
            self.shaped
                .get(usize::from(no.0))
                .is_some_and(Option::is_some)
        };
        self.shaped.iter().any(Option::is_some)
            && self.job.out.iter().any(|o| match o.egress {
                Egress::Port(p) => shaped(p),
                Egress::Tunnel { .. } => false,
            })
    }

    /// Detach and return the device of port `no`.
    pub fn detach(&mut self, no: PortNo) -> Option<P> {
        match &mut self.tx {
            Tx::Inline(t) => {
                t.detach(no);
            }
            Tx::Thread { jobs, inline, .. } => {
                inline.flush();
                inline.detach(no);
                let _ = jobs.send(Msg::Detach(no));
            }
            Tx::Switching => {}
        }
        self.ports.get_mut(usize::from(no.0))?.take()
    }

    pub fn port_io(&mut self, no: PortNo) -> Option<&mut P> {
        self.ports.get_mut(usize::from(no.0))?.as_mut()
    }

    /// The fds to wait on: each port's (with its number), then the uplink's.
    pub fn fds(&self) -> Vec<(Option<PortNo>, RawFd)> {
        let mut v: Vec<(Option<PortNo>, RawFd)> = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((Some(PortNo(i as u16)), p.as_ref()?.raw_fd()?)))
            .collect();
        if let Some(fd) = self.uplink.as_ref().and_then(|u| u.raw_fd()) {
            v.push((None, fd));
        }
        v
    }

    /// Set what flow exports say about their origin: the chassis number
    /// (v9 source ID, IPFIX observation domain) and the address they are
    /// sent from (the host's tunnel address; unspecified: the kernel picks).
    pub fn set_flow_identity(&mut self, domain: u32, source: IpAddr) {
        self.flow_domain = domain;
        self.flow_source = source;
        self.exporters.clear();
    }

    /// Export the flow records the switch ended (and templates when due).
    fn export_flows(&mut self, now: Duration) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let clock = ExportClock {
            uptime_ms: now.as_millis() as u64,
            unix_ms,
        };
        let (domain, source) = (self.flow_domain, self.flow_source);
        for t in self.switch.monitors_mut().tables_mut() {
            let i = match self
                .exporters
                .iter()
                .position(|(x, _)| x.monitor().name == t.monitor.name)
            {
                Some(i) if *self.exporters[i].0.monitor() == t.monitor => i,
                found => {
                    // New, or its settings changed: start afresh (templates first).
                    let x = Exporter::new(&t.monitor, domain, source);
                    let c = Collectors::new(&t.monitor.collectors, source);
                    match found {
                        Some(i) => {
                            self.exporters[i] = (x, c);
                            i
                        }
                        None => {
                            self.exporters.push((x, c));
                            self.exporters.len() - 1
                        }
                    }
                }
            };
            let (x, c) = &mut self.exporters[i];
            x.export(now, clock, &t.pending, |m| c.send(m));
            t.pending.clear();
        }
    }

    /// End every open flow record and export it (the datapath stops).
    pub fn flush_flows(&mut self, now: Duration) {
        self.switch.monitors_mut().flush_all();
        self.export_flows(now);
    }

    /// Run timers due at `now` and collect the transmit side's failures
    /// into the switch's counters.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.switch.handle_timeout(now);
        if now >= self.next_export && !self.switch.monitors().tables().is_empty() {
            self.export_flows(now);
            self.next_export = now + EXPORT_TICK;
        }
        if let Tx::Inline(t) = &mut self.tx {
            t.release(now);
        }
        let failures: Vec<TxFailure> = match &mut self.tx {
            Tx::Inline(t) => t.errors.drain(..).collect(),
            Tx::Thread { errors, inline, .. } => {
                inline.errors.drain(..).chain(errors.try_iter()).collect()
            }
            Tx::Switching => Vec::new(),
        };
        for f in failures {
            match f {
                TxFailure::Port(no) => self.switch.note_tx_error(Egress::Port(no)),
                TxFailure::Tunnel => self.switch.note_tunnel_tx_error(),
                TxFailure::QueueFull(no) => self
                    .switch
                    .note_tx_drop(no, crate::DropReason::ShaperQueueFull),
            }
        }
    }

    /// Switch up to [`BATCH`] frames waiting on port `no`; returns how many.
    ///
    /// # Errors
    /// A read error other than `WouldBlock` (the port's device failed).
    pub fn poll_port(&mut self, now: Duration, no: PortNo) -> io::Result<usize> {
        self.batch_pos = 0;
        let r = self.switch_port_batch(now, no);
        self.end_batch();
        r
    }

    fn switch_port_batch(&mut self, now: Duration, no: PortNo) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            // A shaped port's frames wait in its device until they conform.
            if self.switch.port_wait(no, now).is_some() {
                return Ok(n);
            }
            let Some(Some(io)) = self.ports.get_mut(usize::from(no.0)) else {
                return Ok(n);
            };
            let buf = &mut self.job.buf;
            let meta = match io.recv(&mut buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // Too big for the buffer: the pipeline counts it as oversized.
                    RxMeta {
                        len: buf.len() - HEADROOM,
                        ..RxMeta::default()
                    }
                }
                Err(e) => return Err(e),
            };
            n += 1;
            let mut start = HEADROOM;
            let mut vnet = meta.vnet;
            if let Some(t) = meta.tag {
                start = wire::push_tag(buf, start, t.tpid, t.tci).unwrap_or(start);
                vnet = vnet.map(|h| h.shifted(wire::TAG_LEN as i32));
            }
            let end = HEADROOM + meta.len;
            self.switch_frame(now, Ingress::Port(no), start..end, vnet);
        }
        Ok(n)
    }

    /// Switch up to [`BATCH`] receives from the uplink (each may hold
    /// several datagrams coalesced by UDP GRO).
    ///
    /// # Errors
    /// A receive error other than `WouldBlock`.
    pub fn poll_uplink(&mut self, now: Duration) -> io::Result<usize> {
        self.batch_pos = 0;
        let r = self.switch_uplink_batch(now);
        self.end_batch();
        r
    }

    fn switch_uplink_batch(&mut self, now: Duration) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            let Some(u) = &self.uplink else { return Ok(n) };
            let (len, from, seg) = match u.recv(&mut self.job.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) => return Err(e),
            };
            n += 1;
            let ingress = Ingress::Tunnel { src: from.ip() };
            let seg = seg.unwrap_or(len).max(1);
            if seg >= len || !matches!(self.tx, Tx::Thread { .. }) {
                // Inline, datagrams are switched where they lie.
                let mut at = HEADROOM;
                while at < HEADROOM + len {
                    let end = (at + seg).min(HEADROOM + len);
                    self.switch_frame(now, ingress, at..end, None);
                    at = end;
                }
                continue;
            }
            // To the transmit thread, each datagram goes in a job of its own.
            let next = self.next_job();
            let train = std::mem::replace(&mut self.job, next);
            let mut at = HEADROOM;
            while at < HEADROOM + len {
                let end = (at + seg).min(HEADROOM + len);
                let d = end - at;
                self.job.buf[HEADROOM..HEADROOM + d].copy_from_slice(&train.buf[at..end]);
                self.switch_frame(now, ingress, HEADROOM..HEADROOM + d, None);
                at = end;
            }
            self.spare = Some(train);
        }
        Ok(n)
    }

    /// Inject a frame as if it came from `ingress` (announcements, tests).
    pub fn inject(&mut self, now: Duration, ingress: Ingress, frame: &[u8]) {
        self.batch_pos = 0;
        let len = frame.len().min(MAX_READ);
        self.job.buf[HEADROOM..HEADROOM + len].copy_from_slice(&frame[..len]);
        self.switch_frame(now, ingress, HEADROOM..HEADROOM + len, None);
        self.end_batch();
    }

    fn switch_frame(
        &mut self,
        now: Duration,
        ingress: Ingress,
        range: Range<usize>,
        vnet: Option<VnetHdr>,
    ) {
        let (start, end) = (range.start, range.end);
        let job = &mut self.job;
        // A TSO frame's segments are what flow records count.
        let gso = vnet
            .filter(|h| h.gso_type & !VnetHdr::GSO_ECN != VnetHdr::GSO_NONE)
            .map_or(0, |h| h.gso_size);
        let p = self
            .switch
            .process_gso(now, ingress, &mut job.buf[start..end], gso, &mut job.out);
        let frame = start + p.frame.start..start + p.frame.end;
        if let crate::pipeline::Verdict::Drop(reason) = p.verdict {
            tracing::debug!(?ingress, ?reason, len = end - start, "drop");
        }
        if job.out.is_empty() {
            return;
        }
        // Offsets in the virtio-net header follow the tags the pipeline removed.
        let removed = (end - start) - frame.len();
        job.vnet = vnet.map(|h| h.shifted(-(removed as i32)));
        // Ports say what their sender left unfinished (virtio-net headers);
        // a kernel on a virtual underlay may hand VXLAN payloads over with
        // checksums left partial and say nothing.
        if matches!(ingress, Ingress::Tunnel { .. })
            && wire::complete_partial_checksum(&mut job.buf[frame.clone()])
        {
            self.switch.note_tunnel_csum_completed();
        }
        job.frame = frame;
        job.now = now;
        job.from_tunnel = matches!(ingress, Ingress::Tunnel { .. });
        self.transmit();
    }

    /// Send frames the switch held and now lets go (a migrated port's
    /// state came: [`crate::pipeline::switchover`]), each as its output
    /// says.
    pub fn send_released(
        &mut self,
        now: Duration,
        frames: Vec<crate::pipeline::switchover::Release>,
    ) {
        for r in frames {
            self.batch_pos = 0;
            let len = r.frame.len().min(MAX_READ);
            let job = &mut self.job;
            job.buf[HEADROOM..HEADROOM + len].copy_from_slice(&r.frame[..len]);
            job.out.clear();
            job.out.push(r.out);
            job.vnet = None;
            job.frame = HEADROOM..HEADROOM + len;
            job.now = now;
            job.from_tunnel = false;
            self.transmit();
            self.end_batch();
        }
    }

    /// Send the job's frame to its outputs.
    fn transmit(&mut self) {
        // A lone frame may be sent inline, unless a copy is for a shaped
        // port: those always go through the transmit thread, whose queue
        // keeps them in order.
        let lone = self.batch_pos == 0 && !self.to_shaped_port();
        self.batch_pos += 1;
        match &mut self.tx {
            Tx::Inline(t) => {
                t.send(&mut self.job);
                self.job.out.clear();
            }
            Tx::Thread {
                inline, in_flight, ..
            } if lone && in_flight.load(Ordering::Acquire) == 0 => {
                inline.send(&mut self.job);
                self.job.out.clear();
            }
            Tx::Thread { inline, .. } => {
                // What went inline leaves before anything is handed over.
                inline.flush();
                let next = self.next_job();
                let job = std::mem::replace(&mut self.job, next);
                if let Tx::Thread { outbox, .. } = &mut self.tx {
                    outbox.push(job);
                    if outbox.len() >= HANDOVER {
                        self.hand_over();
                    }
                }
            }
            Tx::Switching => self.job.out.clear(),
        }
    }

    /// An empty job: the spare, one the transmit thread gave back (waiting
    /// for it when all are in flight), or a new one.
    fn next_job(&mut self) -> Job {
        if let Some(j) = self.spare.take() {
            return j;
        }
        let Tx::Thread { stash, .. } = &mut self.tx else {
            return Job::new();
        };
        if let Some(j) = stash.pop() {
            return j;
        }
        // Out of jobs: what waits in the outbox goes first, then wait for a
        // batch to come back.
        self.hand_over();
        let Tx::Thread { stash, free, .. } = &mut self.tx else {
            return Job::new();
        };
        match free.recv() {
            Ok(mut batch) => {
                let j = batch.pop().unwrap_or_default();
                stash.append(&mut batch);
                j
            }
            Err(_) => Job::new(),
        }
    }

    /// Hand the outbox to the transmit thread.
    fn hand_over(&mut self) {
        let Tx::Thread {
            outbox,
            jobs,
            in_flight,
            free,
            stash,
            ..
        } = &mut self.tx
        else {
            return;
        };
        if outbox.is_empty() {
            return;
        }
        // The next outbox: an empty vector that came back, or a new one.
        let next = match free.try_recv() {
            Ok(mut batch) => {
                stash.append(&mut batch);
                batch
            }
            Err(_) => Vec::with_capacity(HANDOVER),
        };
        let batch = std::mem::replace(outbox, next);
        in_flight.fetch_add(batch.len(), Ordering::AcqRel);
        let _ = jobs.send(Msg::Frames(batch));
    }

    /// Move the transmit side to a thread of its own: from now on a frame is
    /// read and switched here while the previous one is being sent there.
    ///
    /// # Errors
    /// The thread could not be started.
    /// `clock` is the instant the caller's `now` counts from.
    pub fn spawn_transmit(&mut self, clock: std::time::Instant) -> io::Result<()>
    where
        P: Send + 'static,
    {
        let Tx::Inline(mut inline) = std::mem::replace(&mut self.tx, Tx::Switching) else {
            return Ok(());
        };
        // The thread gets a transmit side of its own; the inline one stays.
        let t = inline.try_clone()?;
        inline.flush();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        let (jobs_tx, jobs_rx) = sync_channel(JOBS_IN_FLIGHT + 64);
        let (free_tx, free_rx) = sync_channel(JOBS_IN_FLIGHT);
        let (err_tx, err_rx) = sync_channel(1024);
        let stash: Vec<Job> = (1..JOBS_IN_FLIGHT).map(|_| Job::new()).collect();
        let handle = std::thread::Builder::new()
            .name("dvs-transmit".into())
            .spawn(move || t.serve(jobs_rx, free_tx, err_tx, counter, clock))?;
        self.tx = Tx::Thread {
            jobs: jobs_tx,
            free: free_rx,
            errors: err_rx,
            outbox: Vec::with_capacity(HANDOVER),
            stash,
            in_flight,
            inline,
            handle: Some(handle),
        };
        // The inline side shapes nothing from now on; the thread does.
        for i in 0..self.shaped.len() {
            let no = PortNo(i as u16);
            let limit = self.shaped[i];
            if let Tx::Thread { jobs, inline, .. } = &mut self.tx {
                inline.set_shaper(no, None, clock.elapsed());
                let _ = jobs.send(Msg::Shaper(no, limit, clock.elapsed()));
            }
        }
        Ok(())
    }

    /// The end of a batch: hand over the outbox; send what the inline
    /// side's batches hold.
    fn end_batch(&mut self) {
        self.hand_over();
        match &mut self.tx {
            Tx::Inline(t) | Tx::Thread { inline: t, .. } => t.flush(),
            Tx::Switching => {}
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
                    vlan: cfg.vlan.summary(),
                    counters: c.clone(),
                    acl_in: sw.port_acl_hits(no).0,
                    acl_out: sw.port_acl_hits(no).1,
                    police_in: sw.port_policers(no).0,
                    police_out: sw.port_policers(no).1,
                    conntrack: sw.port_conntrack(no).map(|ct| ConnStats {
                        entries: ct.len(),
                        counters: ct.counters().clone(),
                    }),
                    attachment: self.attachment(no).map(|a| AttachmentStats {
                        detail: a.to_string(),
                        state: a.clone(),
                    }),
                    dhcp_bindings: sw
                        .port_dhcp_bindings(no, now)
                        .into_iter()
                        .map(|(ip, mac, left)| DhcpBindingStats {
                            ip,
                            mac,
                            expires_in_s: left.as_secs(),
                        })
                        .collect(),
                })
                .collect(),
            tunnel: sw.tunnel_counters().clone(),
            mac: sw.mac_counters().clone(),
            mac_entries: sw.mac_entries(now).len(),
            netflow: sw
                .monitors()
                .tables()
                .iter()
                .map(|t| {
                    let x = self
                        .exporters
                        .iter()
                        .find(|(x, _)| x.monitor().name == t.monitor.name);
                    MonitorStats {
                        name: t.monitor.name.clone(),
                        version: t.monitor.version.to_string(),
                        collectors: x.map(|(_, c)| c.status()).unwrap_or_default(),
                        open_flows: t.table.len(),
                        flows: *t.table.counters(),
                        export: x.map(|(x, _)| x.counters().clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            switchover: sw.switchover_counters().clone(),
            dhcp: sw.dhcp_counters().clone(),
        }
    }
}

impl<P> Drop for Datapath<P> {
    fn drop(&mut self) {
        if let Tx::Thread {
            jobs,
            handle: Some(h),
            ..
        } = std::mem::replace(&mut self.tx, Tx::Switching)
        {
            // Closing the job channel ends the thread.
            drop(jobs);
            let _ = h.join();
        }
    }
}
