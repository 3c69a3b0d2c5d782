//! The datapath thread of `dvs agent`: one loop that polls the ports, the
//! uplink, the link monitor and the session's wake socket, drives the
//! datapath and the agent core, and publishes the stats.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvs_proto::api;
use dvs_proto::stats::Stats;

use crate::agent::config::{AgentConfig, PortSpec};
use crate::agent::core::{self, AgentCore};
use crate::agent::{build, HostPort};
use crate::driver::attach::{Attacher, PROBE_EVERY};
use crate::driver::datapath::Datapath;
use crate::driver::sys;
use crate::pipeline::{PortNo, Switch};
use crate::Error;

/// How a controller-driven agent's datapath loop meets its session
/// thread ([`remote`](crate::agent::remote)).
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

/// What the metrics endpoint serves: the stats as last published, and the
/// controller revision that runs.
#[derive(Debug, Clone, Default)]
struct Published {
    stats: Arc<Mutex<Stats>>,
    revision: Arc<AtomicU64>,
}

impl Published {
    fn serve(&self, addr: SocketAddr, controlled: bool) -> Result<(), Error> {
        let p = self.clone();
        dvs_metrics::serve(addr, move || {
            let s = p.stats.lock().unwrap_or_else(|e| e.into_inner());
            let rev = controlled.then(|| p.revision.load(Ordering::Relaxed));
            dvs_metrics::agent(&s, rev)
        })
        .map(drop)
        .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))
    }
}

/// The fds the loop waits on — the ports' and the uplink's, then the
/// control link's, then the link monitor's — rebuilt only when ports come
/// or go.
struct Waits {
    wake: Option<RawFd>,
    links: Option<RawFd>,
    /// The datapath's fds, with the port each is (`None`: the uplink).
    fds: Vec<(Option<PortNo>, RawFd)>,
    pollfds: Vec<libc::pollfd>,
}

impl Waits {
    fn new(dp: &Datapath<HostPort>, wake: Option<RawFd>, links: Option<RawFd>) -> Self {
        let mut w = Waits {
            wake,
            links,
            fds: Vec::new(),
            pollfds: Vec::new(),
        };
        w.rebuild(dp);
        w
    }

    fn rebuild(&mut self, dp: &Datapath<HostPort>) {
        self.fds = dp.fds();
        self.pollfds = self
            .fds
            .iter()
            .map(|(_, fd)| *fd)
            .chain(self.wake)
            .chain(self.links)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
    }

    /// Wait until something is readable or `until` (or a timer of the
    /// switch or the attacher) comes; a shaped port whose frames must wait
    /// is not read until then.
    fn wait(
        &mut self,
        dp: &mut Datapath<HostPort>,
        attacher: &Attacher,
        now: Duration,
        until: Duration,
    ) -> Result<(), Error> {
        for pfd in &mut self.pollfds {
            pfd.events = libc::POLLIN;
            pfd.revents = 0;
        }
        let mut wait = dp
            .switch
            .poll_timeout()
            .min(until)
            .saturating_sub(now)
            .min(Duration::from_millis(200));
        if let Some(p) = attacher.poll_timeout() {
            wait = wait.min(p);
        }
        for (pfd, (port, _)) in self.pollfds.iter_mut().zip(&self.fds) {
            if let Some(w) = port.and_then(|no| dp.switch.port_wait(no, now)) {
                pfd.events = 0;
                wait = wait.min(w);
            }
        }
        // Round up to a tenth of a millisecond: waking a little late keeps
        // the shaper from spinning.
        let wait = Duration::from_micros(wait.as_micros().div_ceil(100) as u64 * 100);
        sys::poll(&mut self.pollfds, wait)
            .map(drop)
            .map_err(|e| Error::io("waiting for frames", e))
    }

    /// Switch what the ports and the uplink have, and take the link
    /// monitor's news. Returns whether ports' devices came or went.
    fn serve(
        &self,
        agent: &mut AgentCore<HostPort>,
        attacher: &mut Attacher,
        now: Duration,
        open: &mut impl FnMut(&PortSpec) -> Result<HostPort, Error>,
    ) -> bool {
        let mut changed = false;
        let (dp, cfg) = agent.parts();
        for (pfd, (port, _)) in self.pollfds.iter().zip(&self.fds) {
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
                    changed |= attacher.on_port_error(dp, &cfg.ports, *no, &e, open);
                }
                (Err(e), None) => tracing::warn!(error = %e, "reading the VXLAN socket"),
            }
        }
        if self.links.is_some() && self.pollfds.last().is_some_and(|p| p.revents != 0) {
            changed |= attacher.on_links(dp, &cfg.ports, open);
        }
        changed
    }
}

/// The wall clock: migration times are reported on it (hosts' clocks are
/// synchronised; the controller compares them).
fn wall() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
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
    let published = Published::default();
    if let Some(addr) = metrics {
        published.serve(addr, link.is_some())?;
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
    let (local, desired) = link
        .as_ref()
        .map(|l| (l.local.clone(), l.desired.clone()))
        .unwrap_or_default();
    let epoch = wall().saturating_sub(start.elapsed());
    let mut agent = AgentCore::new(dp, cfg.clone(), local, desired, epoch);
    let wake_fd = link.as_ref().map(|l| l.wake.as_raw_fd());
    let mut waits = Waits::new(&agent.dp, wake_fd, attacher.fd());
    let (mut next_stats, mut next_probe) = (Duration::ZERO, Duration::ZERO);
    let mut open = |p: &PortSpec| HostPort::open(&p.attach);
    while !sys::terminate_requested() {
        waits.wait(&mut agent.dp, &attacher, start.elapsed(), next_stats)?;
        let now = start.elapsed();
        let mut changed = waits.serve(&mut agent, &mut attacher, now, &mut open);
        let (dp, cfg_now) = agent.parts();
        if now >= next_probe {
            attacher.tick(dp, &cfg_now.ports);
            next_probe = now + PROBE_EVERY;
        }
        dp.handle_timeout(now);
        report_flaps(&mut dp.switch);
        if sys::take_reload_request() {
            reload(&mut agent, path, now, &mut attacher, &mut open);
        }
        match &link {
            Some(l) => follow(&mut agent, l, now, &mut attacher, &mut open, &published),
            None => {
                attacher.take_attached();
                attacher.take_read();
            }
        }
        changed |= agent.take_changed();
        if changed {
            waits.rebuild(&agent.dp);
        }
        if now >= next_stats {
            publish(&agent, now, metrics.is_some().then_some(&published));
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

/// SIGHUP: the static file again, applied in part or whole (ports may
/// come or go); a file that does not validate changes nothing.
fn reload(
    agent: &mut AgentCore<HostPort>,
    path: Option<&Path>,
    now: Duration,
    attacher: &mut Attacher,
    open: &mut impl FnMut(&PortSpec) -> Result<HostPort, Error>,
) {
    let Some(path) = path else { return };
    match AgentConfig::load(path) {
        Ok(new) => {
            let _ = agent.apply_file(new, now, attacher, open);
        }
        Err(e) => tracing::error!(error = %e, "reload refused; the running configuration stays"),
    }
}

/// The controller's side: what the session brought goes to the core, the
/// core's time passes, what it has goes back out.
fn follow(
    agent: &mut AgentCore<HostPort>,
    l: &ControlLink,
    now: Duration,
    attacher: &mut Attacher,
    open: &mut impl FnMut(&PortSpec) -> Result<HostPort, Error>,
    published: &Published,
) {
    let mut byte = [0u8; 64];
    while (&l.wake).read(&mut byte).is_ok_and(|n| n > 0) {}
    while let Ok(m) = l.inbound.try_recv() {
        agent.on_controller(m, now, attacher, &mut *open);
    }
    agent.tick(now, wall(), attacher);
    for o in agent.take_outbound() {
        let _ = l.outbound.send(o);
    }
    published
        .revision
        .store(agent.revision(), Ordering::Relaxed);
}

/// The stats to the stats file and the metrics endpoint (when served).
fn publish(agent: &AgentCore<HostPort>, now: Duration, metrics: Option<&Published>) {
    let cfg = agent.config();
    if let Some(path) = &cfg.stats_file {
        write_stats(&agent.dp, &cfg.host, now, path);
    }
    if let Some(p) = metrics {
        *p.stats.lock().unwrap_or_else(|e| e.into_inner()) = agent.dp.stats(&cfg.host, now);
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
