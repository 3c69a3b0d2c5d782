//! A host's part in a live migration (the controller coordinates it:
//! `dvs_migrate::protocol`). The destination installs the port in standby
//! from its profile (`standby: true` in its item: policy in place, nothing
//! forwarded) and keeps the source's pre-copy; the source, from the
//! pre-copy on, copies frames for the VM to the destination. The moment
//! the VM is heard at the destination (its own frame, or its VMM reading
//! the NIC), the destination starts the port from the pre-copy and
//! forwards, without waiting for anyone. The source, told to stop, puts
//! its port in standby, sends frames for the VM's MAC to the destination
//! and hands the port's state over (counters, rule hits, buckets,
//! connections, sticky and learned MACs, open flow records — taken, so
//! that only the destination exports them); the destination merges it
//! into what it runs (or, if it had not started, starts from it) and the
//! frames that waited for it are judged (`pipeline::switchover`). An
//! abort makes the source forward again.
//!
//! A port's mode ([`PortMode`]: forwarding, forwarding and copying its VM's
//! frames to the destination, in standby, or stopped with its VM's frames
//! redirected) has one owner, [`Migrations`]: it follows the
//! port's item, with two exceptions that only commands make — a source
//! told to sync keeps copying, and one told to stop stays stopped, until a
//! full state or a resume (a profile change changes neither), and a destination started by its
//! migration's command forwards even while its item still says standby
//! (the controller moves the port's binding right after). The switch's
//! standby flag is only ever set from the mode ([`Migrations::enter`]), but
//! when a port is added: in standby if its item says so, before its device
//! is attached — not one frame without its mode decided.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::api;
use dvs_proto::{AclRule, Action, MacAddr, PortId, VlanId, VlanMode};

use crate::agent::config::{AgentConfig, PortSpec};
use crate::driver::datapath::Datapath;
use crate::driver::port::PortIo;
use crate::pipeline::{Ingress, PortAcl, PortConfig, PortNo, PortState, Switch, SwitchConfig};
use crate::policy::conntrack::{ConnKey, SavedConn};
use crate::wire;
use crate::wire::FlowKey;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

/// A port's state in flight: whole (the pre-copy, or a handover without
/// one), or what changed since the pre-copy (a delta).
pub type Snapshot = dvs_migrate::snapshot::Snapshot<Transfer>;

/// What a snapshot carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// The port's state; in a delta its `conntrack` holds only the
    /// connections new or changed since the base.
    pub state: PortState,
    /// Delta: connections gone since the base (their first packet).
    #[serde(default)]
    pub gone: Vec<FlowKey>,
    /// Delta: how long after the base it was taken (the base's idle times
    /// grow by it).
    #[serde(default)]
    pub since_base: Duration,
}

impl Transfer {
    /// The whole state: this delta applied to `base` (a whole one).
    pub fn merged(self, base: Transfer) -> PortState {
        let key = |c: &SavedConn| ConnKey::of(&c.first);
        // Replaced (changed) or gone: the base's entry goes.
        let drop: FxHashSet<ConnKey> = self
            .gone
            .iter()
            .filter_map(ConnKey::of)
            .chain(self.state.conntrack.iter().filter_map(key))
            .collect();
        let mut conntrack: Vec<SavedConn> = base
            .state
            .conntrack
            .into_iter()
            .filter(|c| key(c).is_some_and(|k| !drop.contains(&k)))
            .map(|mut c| {
                c.idle += self.since_base;
                c
            })
            .collect();
        conntrack.extend(self.state.conntrack);
        PortState {
            conntrack,
            ..self.state
        }
    }
}

/// A migration event of `kind` about `port`.
pub fn event(migration: u64, port: &str, kind: api::migration_event::Kind) -> api::MigrationEvent {
    api::MigrationEvent {
        migration,
        port: port.to_string(),
        kind: kind as i32,
        ..api::MigrationEvent::default()
    }
}

/// The message that reports a datapath's migration event.
pub fn report(e: Event) -> api::MigrationEvent {
    use api::migration_event::Kind;
    match e {
        Event::Wakeup {
            port,
            migration,
            nic_read,
            started,
        } => api::MigrationEvent {
            nic_read,
            started: started.is_some(),
            at_us: us(started),
            ..event(migration.unwrap_or(0), &port.to_string(), Kind::Wakeup)
        },
        Event::FirstForwarded {
            migration,
            from_vm,
            to_vm,
            to_peer,
        } => api::MigrationEvent {
            at_us: us(from_vm),
            at_to_vm_us: us(to_vm),
            to_peer_us: us(to_peer),
            ..event(migration, "", Kind::FirstForwarded)
        },
        Event::Attached {
            port,
            migration,
            device,
            at,
        } => api::MigrationEvent {
            at_us: us(Some(at)),
            device,
            ..event(migration, &port.to_string(), Kind::Attached)
        },
    }
}

fn us(t: Option<Duration>) -> u64 {
    t.map_or(0, |d| d.as_micros() as u64)
}

/// The STOPPED events that carry a source's handover: its snapshot in
/// chunks, each with the time of the source's last frame.
///
/// # Errors
/// The state is over the snapshot's size bound.
pub fn stopped_events(
    migration: u64,
    port: PortId,
    h: Handover,
) -> Result<Vec<api::MigrationEvent>, String> {
    let (connections, flows) = (h.connections as u64, h.transfer.state.flows.len() as u64);
    let (at_us, at_to_vm_us) = (us(h.last_from_vm), us(h.last_to_vm));
    let (kind, seq) = if h.delta {
        (dvs_migrate::snapshot::Kind::Delta, 1)
    } else {
        (dvs_migrate::snapshot::Kind::Full, 0)
    };
    let mut events = snapshot_events(
        migration,
        port,
        seq,
        kind,
        h.transfer,
        api::migration_event::Kind::Stopped,
    )?;
    for e in &mut events {
        (e.at_us, e.at_to_vm_us) = (at_us, at_to_vm_us);
        (e.connections, e.flows) = (connections, flows);
    }
    Ok(events)
}

/// The SYNCED events of a pre-copy: the whole state in chunks.
///
/// # Errors
/// The state is over the snapshot's size bound.
pub fn synced_events(
    migration: u64,
    port: PortId,
    state: PortState,
) -> Result<Vec<api::MigrationEvent>, String> {
    let t = Transfer {
        state,
        gone: Vec::new(),
        since_base: Duration::ZERO,
    };
    let connections = t.state.conntrack.len() as u64;
    let mut events = snapshot_events(
        migration,
        port,
        0,
        dvs_migrate::snapshot::Kind::Full,
        t,
        api::migration_event::Kind::Synced,
    )?;
    for e in &mut events {
        e.connections = connections;
    }
    Ok(events)
}

fn snapshot_events(
    migration: u64,
    port: PortId,
    seq: u32,
    kind: dvs_migrate::snapshot::Kind,
    state: Transfer,
    event_kind: api::migration_event::Kind,
) -> Result<Vec<api::MigrationEvent>, String> {
    let bytes = Snapshot {
        port,
        migration,
        seq,
        kind,
        state,
    }
    .encode()
    .map_err(|e| e.to_string())?;
    let name = port.to_string();
    Ok(dvs_migrate::snapshot::pieces(&bytes)
        .map(|(c, more)| api::MigrationEvent {
            chunk: c.to_vec(),
            more,
            ..event(migration, &name, event_kind)
        })
        .collect())
}

/// A snapshot of `port` for `migration`, checked.
///
/// # Errors
/// The snapshot is broken (the reason), or of another port or migration.
pub fn read_snapshot(bytes: &[u8], migration: u64, port: PortId) -> Result<Snapshot, String> {
    match Snapshot::decode(bytes) {
        Ok(s) if s.port == port && s.migration == migration => Ok(s),
        Ok(s) => Err(format!(
            "the snapshot is of port {} (migration {}), not {port} ({migration})",
            s.port, s.migration
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The state a destination starts `port` from: the snapshot of a START —
/// whole, or a delta applied to the pre-copy `base`.
///
/// # Errors
/// The snapshot is broken (the reason), of another port, or a delta
/// without its base.
pub fn started_state(
    bytes: &[u8],
    migration: u64,
    port: PortId,
    base: Option<Snapshot>,
) -> Result<PortState, String> {
    let s = read_snapshot(bytes, migration, port)?;
    match (s.kind, base) {
        (dvs_migrate::snapshot::Kind::Full, _) => Ok(s.state.state),
        (dvs_migrate::snapshot::Kind::Delta, Some(b)) => Ok(s.state.merged(b.state)),
        (dvs_migrate::snapshot::Kind::Delta, None) => Err(format!(
            "a delta for migration {migration} came without its pre-copy snapshot"
        )),
    }
}

/// A destination's incoming snapshots: chunks put together, pre-copies
/// kept until their delta comes.
#[derive(Debug, Default)]
pub struct Inbox {
    partial: BTreeMap<(u64, i32), Vec<u8>>,
    bases: BTreeMap<u64, Snapshot>,
}

/// What a PRESYNC or START chunk came to.
#[derive(Debug)]
pub enum Inbound {
    /// More chunks to come.
    More,
    /// A pre-copy is kept.
    Based,
    /// The state to start the port from.
    Start(Box<PortState>),
    /// The snapshot is refused (the reason).
    Failed(String),
}

impl Inbox {
    /// The pre-copy kept for `migration`, if it came.
    pub fn base(&self, migration: u64) -> Option<&PortState> {
        self.bases.get(&migration).map(|s| &s.state.state)
    }

    /// Take a PRESYNC or START chunk of `c` for `port`.
    pub fn take(&mut self, c: &api::MigrationCommand, port: PortId) -> Inbound {
        let key = (c.migration, c.op);
        self.partial
            .entry(key)
            .or_default()
            .extend_from_slice(&c.chunk);
        if c.more {
            return Inbound::More;
        }
        let bytes = self.partial.remove(&key).unwrap_or_default();
        if c.op == api::migration_command::Op::Presync as i32 {
            return match read_snapshot(&bytes, c.migration, port) {
                Ok(s) => {
                    self.bases.insert(c.migration, s);
                    Inbound::Based
                }
                Err(e) => Inbound::Failed(format!("the pre-copy: {e}")),
            };
        }
        let base = self.bases.remove(&c.migration);
        match started_state(&bytes, c.migration, port, base) {
            Ok(s) => Inbound::Start(Box::new(s)),
            Err(e) => Inbound::Failed(e),
        }
    }
}

/// What the source hands over when it stops.
#[derive(Debug, Clone)]
pub struct Handover {
    /// The state, or what changed since the pre-copy (`delta`).
    pub transfer: Transfer,
    pub delta: bool,
    /// Tracked connections in the whole state.
    pub connections: usize,
    /// When the source last forwarded a frame from the VM, and last sent
    /// one to it (wall clock, since the Unix epoch).
    pub last_from_vm: Option<Duration>,
    pub last_to_vm: Option<Duration>,
}

/// What a host's datapath reports on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The VM sent a frame on a port in standby, or (`nic_read`) its VMM
    /// read the port's interface: it runs here now. `started`: the port
    /// forwards from the pre-copy since then (wall clock).
    Wakeup {
        port: PortId,
        migration: Option<u64>,
        nic_read: bool,
        started: Option<Duration>,
    },
    /// A started port forwarded its first frame from the VM, to it, or
    /// from it to one peer (unicast: not an announcement) — wall clock,
    /// reported as each happens.
    FirstForwarded {
        migration: u64,
        from_vm: Option<Duration>,
        to_vm: Option<Duration>,
        to_peer: Option<Duration>,
    },
    /// A migration's destination port has its interface `device` (at `at`,
    /// wall clock).
    Attached {
        port: PortId,
        migration: u64,
        device: String,
        at: Duration,
    },
}

/// The migration state of one datapath.
#[derive(Debug, Default)]
pub struct Migrations {
    /// The wall-clock time of the datapath clock's zero.
    epoch: Duration,
    /// Migrations whose destination port was started (by command, or on
    /// its own from the pre-copy).
    started: BTreeSet<u64>,
    /// Migrations whose destination port started from the pre-copy on its
    /// own and awaits the source's last state.
    early: BTreeMap<u64, Early>,
    /// Each port's mode, where it is not [`PortMode::Active`].
    modes: BTreeMap<PortId, PortMode>,
    /// The open flow records stopped ports handed over (theirs again if
    /// the migration is aborted).
    taken_flows: BTreeMap<PortId, Vec<crate::flow::SavedFlow>>,
    /// Pre-copies taken: their migration, when, and the connections then.
    bases: BTreeMap<PortId, (u64, Duration, Vec<SavedConn>)>,
    /// Started ports whose first forwarded frames are awaited: since
    /// when, and whether each way (from, to the VM) was reported.
    awaiting: Vec<Awaiting>,
    /// Redirects of ports that left, kept a while.
    lingering: Vec<Linger>,
}

/// What a port does, and why.
///
/// | mode, then →        | item: standby (m)          | item: forwarding | SYNC (m)     | STOP (m)    | START (m) | RESUME (m)    |
/// |---------------------|----------------------------|------------------|--------------|-------------|-----------|---------------|
/// | `Active`            | `Standby` unless m started | —                | `Copying`    | `Stopped`   | `Active`  | —             |
/// | `Copying` (m)       | `Standby`                  | `Active` on a full state only | — | `Stopped` | —      | `Active`      |
/// | `Standby`           | —                          | `Active`         | —            | `Stopped`   | `Active`  | —             |
/// | `Stopped` (m)       | —                          | `Active` on a full state only | — | — | `Active` | `Active` |
///
/// And a `Standby` port whose VM is heard (its frame, its VMM reading the
/// NIC) goes `Active` at once when its migration's pre-copy is here: it
/// starts from it, as if started (its START then merges the source's
/// last state).
///
/// Leaving `Stopped` undoes the stop: the redirect goes, the handed-over
/// flow records come back. Entering `Copying` has the switch copy frames
/// for the VM to the destination, leaving it stops that. Entering a mode
/// that forwards switches the frames the VM sent meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMode {
    /// Forwarding.
    Active,
    /// A migration's source after its pre-copy: forwarding, and sending a
    /// copy of every frame for the VM to the destination (`to`), where the
    /// VM may start any time.
    Copying { migration: u64, to: IpAddr },
    /// Installed with its policy, forwarding nothing: a migration's
    /// destination before its start.
    Standby { migration: Option<u64> },
    /// A migration's source after its stop: forwarding nothing, frames for
    /// its VM's MAC (`redirect`: on that VLAN) sent to the destination.
    Stopped {
        migration: u64,
        redirect: Option<(VlanId, MacAddr)>,
    },
}

impl PortMode {
    fn forwards(&self) -> bool {
        matches!(self, PortMode::Active | PortMode::Copying { .. })
    }
}

/// A destination port started from the pre-copy, before the source's
/// last state came.
#[derive(Debug)]
struct Early {
    port: PortId,
    /// The pre-copy it started from: what the source's last state is
    /// compared with.
    base: PortState,
    /// When (wall clock), and what its standby dropped before.
    at: Duration,
    dropped: u64,
}

/// How long a stopped source keeps redirecting the VM's frames after its
/// port left: while the other hosts apply the VM's new location.
pub const REDIRECT_GRACE: Duration = Duration::from_secs(3);

/// A redirect kept after its port left (and whether its segment was put
/// back for it).
#[derive(Debug)]
struct Linger {
    vlan: VlanId,
    mac: MacAddr,
    segment: bool,
    until: Duration,
}

#[derive(Debug)]
struct Awaiting {
    migration: u64,
    no: PortNo,
    since: Duration,
    /// Reported: the first frame from the VM, to it, its first to a peer.
    from_vm: bool,
    to_vm: bool,
    to_peer: bool,
}

/// What changed in `state` since the pre-copy's connections `base`, taken
/// `since` before.
fn delta(state: PortState, base: &[SavedConn], since: Duration) -> Transfer {
    // Unchanged: the same connection, its last packet as long ago as then
    // (plus the time since).
    let seen: FxHashMap<ConnKey, &SavedConn> = base
        .iter()
        .filter_map(|c| Some((ConnKey::of(&c.first)?, c)))
        .collect();
    let mut now_keys = FxHashSet::default();
    let mut changed = Vec::new();
    for c in state.conntrack.iter() {
        let Some(k) = ConnKey::of(&c.first) else {
            continue;
        };
        now_keys.insert(k);
        let same = seen.get(&k).is_some_and(|b| {
            b.origin == c.origin
                && b.state == c.state
                && b.fin == c.fin
                && (b.idle + since).abs_diff(c.idle) < Duration::from_millis(1)
        });
        if !same {
            changed.push(c.clone());
        }
    }
    let gone = seen
        .iter()
        .filter(|(k, _)| !now_keys.contains(k))
        .map(|(_, c)| c.first)
        .collect();
    Transfer {
        state: PortState {
            conntrack: changed,
            ..state
        },
        gone,
        // At least a nanosecond: a delta is told by it.
        since_base: since.max(Duration::from_nanos(1)),
    }
}

/// Switch the frames port `no`'s VM sent while it waited, now that it
/// forwards (with its policy, as any frame).
fn release_held<P: PortIo>(dp: &mut Datapath<P>, no: PortNo, now: Duration) {
    for f in dp.switch.take_held(no) {
        dp.inject(now, Ingress::Port(no), &f);
    }
}

/// The VLAN a port's VM's own MAC lives in.
fn home_vlan(sw: &Switch, no: PortNo) -> Option<VlanId> {
    sw.port(no)?.0.vlan.untagged_vlan()
}

impl Migrations {
    /// `epoch`: the wall-clock time (since the Unix epoch) at which the
    /// datapath's clock read zero.
    pub fn new(epoch: Duration) -> Self {
        Migrations {
            epoch,
            ..Migrations::default()
        }
    }

    /// Carry out the controller's migration command `c` on this host's
    /// datapath (`specs`: the ports it runs; `inbox`: snapshots arriving
    /// in chunks). Returns the events to report; what cannot be done is a
    /// FAILED event with the reason.
    pub fn carry_out<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        specs: &[PortSpec],
        inbox: &mut Inbox,
        c: &api::MigrationCommand,
        now: Duration,
    ) -> Vec<api::MigrationEvent> {
        use api::migration_command::Op;
        use api::migration_event::Kind;
        let m = c.migration;
        let fail = |error: String| {
            tracing::error!(migration = m, port = %c.port, %error, "migration command failed");
            vec![api::MigrationEvent {
                error,
                ..event(m, &c.port, Kind::Failed)
            }]
        };
        let Ok(port) = c.port.parse::<PortId>() else {
            return fail(format!("`{}` is not a port ID", c.port));
        };
        let mac = specs
            .iter()
            .find(|s| s.port.id == port)
            .and_then(|s| s.port.mac);
        match Op::try_from(c.op).unwrap_or(Op::Unspecified) {
            Op::Stop => {
                let redirect = c.redirect.parse().ok();
                self.stop(dp, m, port, mac, redirect, now)
                    .and_then(|h| stopped_events(m, port, h))
                    .unwrap_or_else(fail)
            }
            Op::Sync => {
                let copy_to = c.redirect.parse().ok();
                self.sync(dp, m, port, copy_to, now)
                    .and_then(|state| synced_events(m, port, state))
                    .unwrap_or_else(fail)
            }
            Op::Presync | Op::Start => {
                let state = match inbox.take(c, port) {
                    Inbound::More | Inbound::Based => return Vec::new(),
                    Inbound::Failed(e) => return fail(e),
                    Inbound::Start(s) => s,
                };
                match self.start(dp, m, port, &state, now) {
                    Ok(dropped) => vec![api::MigrationEvent {
                        dropped,
                        ..event(m, &c.port, Kind::Started)
                    }],
                    Err(e) => fail(e),
                }
            }
            Op::Resume => {
                if matches!(self.modes.get(&port), Some(PortMode::Stopped { migration, .. } | PortMode::Copying { migration, .. }) if *migration == m)
                {
                    self.enter(dp, port, PortMode::Active, now);
                }
                Vec::new()
            }
            Op::Announce => {
                if let (Some(no), Some(mac)) = (dp.switch.port_by_id(port), mac) {
                    tracing::info!(%port, %mac, "announcing the VM (RARP)");
                    dp.inject(now, Ingress::Port(no), &wire::announce::rarp(mac));
                }
                Vec::new()
            }
            Op::Unspecified => fail(format!("unknown migration operation {}", c.op)),
        }
    }

    /// The pre-copy of port `id`; from now on frames for its VM go to
    /// the destination `copy_to` too (the VM may start there any time).
    fn sync<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        migration: u64,
        id: PortId,
        copy_to: Option<IpAddr>,
        now: Duration,
    ) -> Result<PortState, String> {
        let no = dp
            .switch
            .port_by_id(id)
            .ok_or_else(|| format!("port {id} is not on this host"))?;
        if let Some(to) = copy_to {
            self.enter(dp, id, PortMode::Copying { migration, to }, now);
        }
        let sw = &mut dp.switch;
        let mut state = sw
            .save_port(no, now)
            .ok_or_else(|| format!("port {id} is not on this host"))?;
        // Open flow records go with the handover only (taken then).
        state.flows.clear();
        self.bases
            .insert(id, (migration, now, state.conntrack.clone()));
        Ok(state)
    }

    fn stop<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        migration: u64,
        id: PortId,
        mac: Option<MacAddr>,
        redirect: Option<IpAddr>,
        now: Duration,
    ) -> Result<Handover, String> {
        let no = dp
            .switch
            .port_by_id(id)
            .ok_or_else(|| format!("port {id} is not on this host"))?;
        // Stopped already (told again after a controller's restart): the
        // flow records it handed over go again.
        let taken_before = match self.modes.get(&id) {
            Some(PortMode::Stopped { migration: m, .. }) if *m == migration => {
                self.taken_flows.remove(&id).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        // Forwarding nothing from here on; the state is taken after.
        let stopped = |redirect| PortMode::Stopped {
            migration,
            redirect,
        };
        self.enter(dp, id, stopped(None), now);
        let sw = &mut dp.switch;
        let mut state = sw
            .save_port(no, now)
            .ok_or_else(|| format!("port {id} is not on this host"))?;
        state.flows = sw.take_port_flows(no, now);
        state.flows.extend(taken_before);
        let connections = state.conntrack.len();
        let last = sw.port_last_frames(no);
        let (last_from_vm, last_to_vm) = (last.from_vm, last.to_vm);
        let transfer = match self.bases.remove(&id).filter(|b| b.0 == migration) {
            Some((_, then, base)) => delta(state, &base, now.saturating_sub(then)),
            None => Transfer {
                state,
                gone: Vec::new(),
                since_base: Duration::ZERO,
            },
        };
        let is_delta = transfer.since_base > Duration::ZERO;
        let mut redirected = None;
        if let (Some(ip), Some(mac), Some(vlan)) = (redirect, mac, home_vlan(sw, no)) {
            sw.set_redirect(vlan, mac, ip);
            redirected = Some((vlan, mac));
        }
        self.modes.insert(id, stopped(redirected));
        self.taken_flows.insert(id, transfer.state.flows.clone());
        tracing::info!(port = %id, migration, conns = connections, changed = transfer.state.conntrack.len(), delta = is_delta, flows = transfer.state.flows.len(), "port stopped for its migration");
        Ok(Handover {
            transfer,
            delta: is_delta,
            connections,
            last_from_vm: last_from_vm.map(|t| self.epoch + t),
            last_to_vm: last_to_vm.map(|t| self.epoch + t),
        })
    }

    fn start<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        migration: u64,
        id: PortId,
        state: &PortState,
        now: Duration,
    ) -> Result<u64, String> {
        if let Some(e) = self.early.remove(&migration) {
            // It forwards already: the source's last state merges in, and
            // the frames only it could admit are judged.
            let no = dp
                .switch
                .port_by_id(e.port)
                .ok_or_else(|| format!("port {id} is not on this host any more"))?;
            let released = dp
                .switch
                .merge_port(no, state, &e.base, now)
                .map_err(|e| e.to_string())?;
            let n = released.len();
            dp.send_released(now, released);
            tracing::info!(port = %id, migration, released = n, "the source's last state merged into the port started from the pre-copy");
            return Ok(e.dropped);
        }
        if self.started.contains(&migration) {
            // Again (a restarted controller finishing the activation).
            return Ok(0);
        }
        let dropped = self.run_from(dp, migration, id, state, false, now)?;
        tracing::info!(port = %id, migration, "port started from its migration's state");
        Ok(dropped)
    }

    /// Port `id` of `migration` forwards from `state` now (`early`: the
    /// pre-copy, the source's last state to come); returns the frames its
    /// standby dropped before.
    fn run_from<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        migration: u64,
        id: PortId,
        state: &PortState,
        early: bool,
        now: Duration,
    ) -> Result<u64, String> {
        let sw = &mut dp.switch;
        let no = sw
            .port_by_id(id)
            .ok_or_else(|| format!("port {id} is not on this host: it was not prepared"))?;
        let dropped = sw.port(no).map_or(0, |(_, c)| {
            c.drops.get(crate::DropReason::Standby) + c.tx_drops.get(crate::DropReason::Standby)
        });
        sw.restore_port(no, state, now).map_err(|e| e.to_string())?;
        if early {
            sw.await_state(no, now).map_err(|e| e.to_string())?;
        }
        self.started.insert(migration);
        self.enter(dp, id, PortMode::Active, now);
        self.awaiting.push(Awaiting {
            migration,
            no,
            since: now,
            from_vm: false,
            to_vm: false,
            to_peer: false,
        });
        Ok(dropped)
    }

    /// Start standby port `id` of `migration` from its pre-copy `base`
    /// now that its VM runs here, without waiting for the source.
    fn start_early<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        migration: u64,
        id: PortId,
        base: PortState,
        now: Duration,
    ) -> Result<Duration, String> {
        let dropped = self.run_from(dp, migration, id, &base, true, now)?;
        let at = self.epoch + now;
        self.early.insert(
            migration,
            Early {
                port: id,
                base,
                at,
                dropped,
            },
        );
        tracing::info!(port = %id, migration, "the VM runs here: port started from the pre-copy");
        Ok(at)
    }

    /// The migrations whose destination port started from the pre-copy
    /// here and still awaits the source's last state, as the wakeups that
    /// said so (told again to a controller after a reconnection).
    pub fn early_starts(&self) -> Vec<Event> {
        self.early
            .iter()
            .map(|(m, e)| Event::Wakeup {
                port: e.port,
                migration: Some(*m),
                nic_read: false,
                started: Some(e.at),
            })
            .collect()
    }

    /// Put port `id` in `mode` — the one place a port's mode changes
    /// (see [`PortMode`]): the switch's standby flag and copy follow it;
    /// leaving `Stopped` undoes the stop; entering a mode that forwards
    /// switches the frames the VM sent while it waited.
    pub fn enter<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        id: PortId,
        mode: PortMode,
        now: Duration,
    ) {
        let before = self.modes.remove(&id).unwrap_or(PortMode::Active);
        let no = dp.switch.port_by_id(id);
        if let PortMode::Stopped { redirect, .. } = &before {
            if !matches!(mode, PortMode::Stopped { .. }) {
                if let Some((vlan, mac)) = redirect {
                    dp.switch.remove_mac(*vlan, *mac);
                }
                let flows = self.taken_flows.remove(&id).unwrap_or_default();
                if let Some(no) = no {
                    dp.switch.restore_port_flows(no, &flows, now);
                }
            }
        }
        if let Some(no) = no {
            let copy_to = |m: &PortMode| match m {
                PortMode::Copying { to, .. } => Some(*to),
                _ => None,
            };
            if copy_to(&mode) != copy_to(&before) {
                let _ = dp.switch.set_port_copy(no, copy_to(&mode));
            }
            let standby = !mode.forwards();
            if dp.switch.port_standby(no) != standby {
                let _ = dp.switch.set_port_standby(no, standby);
                if !standby {
                    release_held(dp, no, now);
                }
            }
        }
        if mode != before {
            tracing::info!(port = %id, ?before, ?mode, "port mode");
        }
        if mode != PortMode::Active {
            self.modes.insert(id, mode);
        }
    }

    /// The mode a port's item asks for, given its mode now and what
    /// commands did (`resync`: a full state, after which a stopped source
    /// whose item forwards forwards again).
    fn wanted(&self, p: &PortSpec, now: &PortMode, resync: bool) -> PortMode {
        let started = p.migration.is_some_and(|m| self.started.contains(&m));
        match (p.standby, now) {
            (true, PortMode::Stopped { .. }) => now.clone(),
            (true, _) if started => PortMode::Active,
            (true, _) => PortMode::Standby {
                migration: p.migration,
            },
            // A source keeps copying or stays stopped until a command, or
            // a full state after a reconnection (the controller may have
            // ended its migration without telling it), says otherwise.
            (false, PortMode::Stopped { .. } | PortMode::Copying { .. }) if !resync => now.clone(),
            (false, _) => PortMode::Active,
        }
    }

    /// Make every port's mode what its item asks for ([`PortMode`]'s
    /// table), and forget the ports that are gone.
    pub fn follow_items<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        old: &AgentConfig,
        new: &AgentConfig,
        resync: bool,
        now: Duration,
    ) {
        let old_segments = &old.segments;
        let (static_macs, segments, new) = (&new.static_macs, &new.segments, &new.ports);
        for p in new {
            let now_mode = self
                .modes
                .get(&p.port.id)
                .cloned()
                .unwrap_or(PortMode::Active);
            let mode = self.wanted(p, &now_mode, resync);
            self.enter(dp, p.port.id, mode, now);
        }
        // Forget what is gone. A gone port's redirect stays a little while
        // — other hosts may still send the VM's frames here until they
        // apply its new location — with its segment if that went too,
        // unless the desired state now places the VM (see `expire`).
        let live: BTreeSet<PortId> = new.iter().map(|p| p.port.id).collect();
        let gone: Vec<PortId> = self
            .modes
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            let Some(PortMode::Stopped {
                redirect: Some((vlan, mac)),
                ..
            }) = self.modes.remove(&id)
            else {
                continue;
            };
            if static_macs.iter().any(|m| m.vlan == vlan && m.mac == mac) {
                continue;
            }
            let kept = (!segments.iter().any(|g| g.vlan == vlan))
                .then(|| old_segments.iter().find(|g| g.vlan == vlan).cloned())
                .flatten();
            if let Some(g) = &kept {
                let _ = dp.switch.set_segment(g.clone());
            }
            self.lingering.push(Linger {
                vlan,
                mac,
                segment: kept.is_some(),
                until: now + REDIRECT_GRACE,
            });
        }
        // A VM that is back on a port here is not redirected any more.
        let here: Vec<MacAddr> = new.iter().filter_map(|p| p.port.mac).collect();
        self.lingering.retain(|l| {
            let back = here.contains(&l.mac);
            if back {
                dp.switch.remove_mac(l.vlan, l.mac);
            }
            !back
        });
        self.taken_flows.retain(|id, _| live.contains(id));
        self.bases.retain(|id, _| live.contains(id));
        let migrations: BTreeSet<u64> = new.iter().filter_map(|p| p.migration).collect();
        self.started.retain(|m| migrations.contains(m));
        self.early.retain(|m, _| migrations.contains(m));
    }

    /// Drop the redirects kept after their port left once their time is up
    /// (with the segment kept for them, unless `cfg` has it now).
    pub fn expire<P: PortIo>(&mut self, dp: &mut Datapath<P>, cfg: &AgentConfig, now: Duration) {
        // Frames that waited for a started port's state and waited enough.
        let due = dp.switch.take_due(now);
        dp.send_released(now, due);
        if self.lingering.is_empty() {
            return;
        }
        let (due, keep): (Vec<Linger>, Vec<Linger>) = std::mem::take(&mut self.lingering)
            .into_iter()
            .partition(|l| l.until <= now);
        self.lingering = keep;
        for l in due {
            if cfg
                .static_macs
                .iter()
                .any(|m| m.vlan == l.vlan && m.mac == l.mac)
            {
                continue;
            }
            dp.switch.remove_mac(l.vlan, l.mac);
            if l.segment && !cfg.segments.iter().any(|g| g.vlan == l.vlan) {
                dp.switch.remove_segment(l.vlan);
            }
        }
    }

    /// Wakeups of standby ports and first frames of started ones.
    /// `nic_read`: ports the agent saw their VMM read (the rest spoke). A
    /// woken port whose migration's pre-copy is here starts from it at
    /// once (`inbox`).
    pub fn events<P: PortIo>(
        &mut self,
        dp: &mut Datapath<P>,
        specs: &[PortSpec],
        inbox: &Inbox,
        nic_read: &[PortNo],
        now: Duration,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for no in dp.switch.take_standby_wakeups() {
            let Some((cfg, _)) = dp.switch.port(no) else {
                continue;
            };
            let id = cfg.id;
            let migration = specs
                .iter()
                .find(|s| s.port.id == id)
                .and_then(|s| s.migration);
            let standby = matches!(self.modes.get(&id), Some(PortMode::Standby { .. }));
            let base = migration
                .filter(|_| standby)
                .and_then(|m| Some((m, inbox.base(m)?.clone())));
            let started = base.and_then(|(m, b)| {
                self.start_early(dp, m, id, b, now)
                    .map_err(|e| tracing::error!(port = %id, migration = m, error = %e, "cannot start the port from its pre-copy"))
                    .ok()
            });
            out.push(Event::Wakeup {
                port: id,
                migration,
                nic_read: nic_read.contains(&no),
                started,
            });
        }
        let sw = &mut dp.switch;
        let epoch = self.epoch;
        self.awaiting.retain_mut(|a| {
            let last = sw.port_last_frames(a.no);
            let fresh = |t: Option<Duration>, seen: bool| {
                t.filter(|t| !seen && *t >= a.since).map(|t| epoch + t)
            };
            let from = fresh(last.from_vm, a.from_vm);
            let to = fresh(last.to_vm, a.to_vm);
            let to_peer = fresh(last.unicast_from_vm, a.to_peer);
            if from.is_some() || to.is_some() || to_peer.is_some() {
                out.push(Event::FirstForwarded {
                    migration: a.migration,
                    from_vm: from,
                    to_vm: to,
                    to_peer,
                });
                a.from_vm |= from.is_some();
                a.to_vm |= to.is_some();
                a.to_peer |= to_peer.is_some();
            }
            // Keep waiting while the port is there and something is unseen.
            !(a.from_vm && a.to_vm && a.to_peer) && sw.port(a.no).is_some()
        });
        out
    }
}
/// The state of a port with a stateful ACL after `conns` TCP connections
/// went out of it (for tests and benchmarks).
#[doc(hidden)]
pub fn tracked_port_state(conns: u32) -> PortState {
    let mut sw = Switch::new(SwitchConfig {
        conntrack_max: 1 << 20,
        ..SwitchConfig::default()
    });
    let acl = PortAcl {
        inbound: vec![AclRule::any(Action::Deny)],
        outbound: vec![AclRule {
            stateful: true,
            ..AclRule::any(Action::Permit)
        }],
    };
    for id in [1, 2] {
        sw.add_port(PortConfig {
            id: PortId::new(id).unwrap_or_else(|| unreachable!()),
            name: format!("p{id}"),
            vlan: VlanMode::Access(VlanId::new(10).unwrap_or_else(|_| unreachable!())),
            acl: if id == 1 {
                acl.clone()
            } else {
                PortAcl::default()
            },
            qos: Default::default(),
            security: Default::default(),
            netflow: None,
            mac: None,
        })
        .unwrap_or_else(|e| unreachable!("{e}"));
    }
    let mut out = Vec::new();
    for i in 0..conns {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14..34].copy_from_slice(&[
            0x45,
            0,
            0,
            40,
            0,
            0,
            0,
            0,
            64,
            6,
            0,
            0,
            10,
            0,
            0,
            1,
            10,
            1,
            (i >> 8) as u8,
            i as u8,
        ]);
        f[34..36].copy_from_slice(&((i % 60_000) as u16 + 1024).to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[34 + 12] = 0x50;
        f[34 + 13] = 0x02;
        sw.process(
            Duration::from_secs(1),
            Ingress::Port(PortNo(0)),
            &mut f,
            &mut out,
        );
    }
    sw.save_port(PortNo(0), Duration::from_secs(2))
        .unwrap_or_else(|| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn key(c: &SavedConn) -> (u16, Duration) {
        (c.first.src_port, c.idle)
    }

    #[test]
    fn a_delta_carries_what_changed_and_makes_the_whole_state_on_its_base() {
        let base = tracked_port_state(100);
        // Ten seconds on: every connection 10 s idler, but one that saw a
        // packet; one gone; one new.
        let mut now = base.clone();
        for c in &mut now.conntrack {
            c.idle += 10 * S;
        }
        now.conntrack[0].idle = Duration::ZERO;
        let gone = now.conntrack.remove(5);
        let mut new = now.conntrack[1].clone();
        new.first.src_port = 9;
        new.idle = Duration::ZERO;
        now.conntrack.push(new);
        let d = delta(now.clone(), &base.conntrack, 10 * S);
        assert_eq!(d.state.conntrack.len(), 2, "the touched and the new one");
        assert_eq!(d.gone, vec![gone.first]);
        let whole = d.merged(Transfer {
            state: base,
            gone: Vec::new(),
            since_base: Duration::ZERO,
        });
        let mut a: Vec<_> = whole.conntrack.iter().map(key).collect();
        let mut b: Vec<_> = now.conntrack.iter().map(key).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(whole.counters, now.counters);
    }

    #[test]
    fn a_delta_needs_its_base_and_snapshots_name_their_port() {
        let port = PortId::new(3).unwrap_or_else(|| unreachable!());
        let state = tracked_port_state(10);
        let h = Handover {
            transfer: delta(state.clone(), &state.conntrack, S),
            delta: true,
            connections: 10,
            last_from_vm: None,
            last_to_vm: None,
        };
        let events = stopped_events(7, port, h).unwrap_or_default();
        let bytes: Vec<u8> = events.iter().flat_map(|e| e.chunk.clone()).collect();
        let e = started_state(&bytes, 7, port, None).unwrap_err();
        assert_eq!(
            e,
            "a delta for migration 7 came without its pre-copy snapshot"
        );
        let other = PortId::new(4).unwrap_or_else(|| unreachable!());
        let e = started_state(&bytes, 7, other, None).unwrap_err();
        assert_eq!(
            e,
            "the snapshot is of port veth3 (migration 7), not veth4 (7)"
        );
        // With its base, through an inbox as a destination takes them.
        let mut inbox = Inbox::default();
        let base: Vec<u8> = synced_events(7, port, state)
            .unwrap_or_default()
            .iter()
            .flat_map(|e| e.chunk.clone())
            .collect();
        let cmd = |op: api::migration_command::Op, chunk: Vec<u8>| api::MigrationCommand {
            migration: 7,
            port: port.to_string(),
            op: op as i32,
            chunk,
            ..Default::default()
        };
        assert!(matches!(
            inbox.take(&cmd(api::migration_command::Op::Presync, base), port),
            Inbound::Based
        ));
        match inbox.take(&cmd(api::migration_command::Op::Start, bytes), port) {
            Inbound::Start(s) => assert_eq!(s.conntrack.len(), 10),
            other => panic!("{other:?}"),
        }
    }
}
