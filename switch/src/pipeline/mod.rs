//! The packet pipeline: one host's switch core, sans-IO.
//!
//! [`Switch::process`] takes a frame that arrived on a port (or a VXLAN
//! payload from the uplink), the current time, and a reusable output list; it
//! classifies the frame into a VLAN, learns its source, looks up its
//! destination and fills the list with where copies go and how each is tagged.
//! The driver then sends them. Nothing here touches a socket, an fd or the
//! clock, and nothing allocates per frame once the output list has grown to
//! the largest flood set.
//!
//! Per frame:
//! 1. size check (runt, oversized) and link-layer parse ([`EthView`]);
//! 2. source MAC sanity (not multicast, not zero);
//! 3. ingress VLAN: access ports take untagged frames only (a tagged frame is a
//!    VLAN hopping attempt); trunks take the allowed tags and map untagged
//!    frames to the native VLAN; stacked tags from a VM are dropped;
//!    VXLAN payloads map their VNI to a VLAN and must carry untagged frames;
//!    a private VLAN's port sends in its secondary (or, promiscuous, in the
//!    primary), and forwards nothing when that is not declared;
//! 4. a frame from a port in standby is held (small) or dropped; the tag is
//!    removed in place, so the frame is untagged from here on;
//! 5. from a VM: port security (`PortGuard`), then its port's policy from
//!    the VM (`port_policy`: connection tracking, access list, policer),
//!    then its marking (DSCP);
//! 6. learn the source (port or remote tunnel endpoint); unicast to a known
//!    MAC goes to its port or host; anything else floods to the VLAN's other
//!    local ports and — when it came from a local port — to every remote host
//!    of the segment (head-end replication). A frame from the tunnel never
//!    goes back into it (split horizon). A private VLAN's VLANs share the
//!    primary's MAC table, and their members are only the ports that may
//!    hear the sender (a unicast to another is dropped, `private_vlan`);
//! 7. each receiving port: none in standby, then its policy into the VM
//!    (`port_policy` again, the same chain the other way); what passed is
//!    accounted to the ports' flow records.
//!
//! Every drop has a [`DropReason`] and is counted on the ingress port or the
//! tunnel.

pub mod mactable;
pub mod switchover;

use std::net::IpAddr;
use std::ops::Range;
use std::time::Duration;

use dvs_proto::qos::Marking;
use dvs_proto::{
    AclRule, Action, FlowDirection, MacAddr, NetflowMonitor, PortId, RateLimit, Security, VlanId,
    VlanMode, Vni,
};
use rustc_hash::FxHashMap;

use crate::flow::{Direction, FlowId, Monitors, SavedFlow};
use crate::pipeline::mactable::{Flap, Location, MacEntry, MacTable, MacTableConfig};
use crate::policy::acl::{Acl, RuleHits};
use crate::policy::conntrack::SavedConn;
use crate::policy::conntrack::{self, ConnTrack, Origin};
use crate::policy::qos::{Policer, PolicerCounters, PolicerState};
use crate::policy::security::{snoop_bind, PortGuard, Snooped};
use crate::wire::{self, vxlan, EthView, FlowKey};
use crate::Error;
use dvs_proto::pvlan::PrivateVlans;
use dvs_proto::stats::{
    DhcpCounters, DropReason, MacCounters, PortCounters, SwitchoverCounters, TunnelCounters,
};

/// A port's index on this host's switch (not its chassis-wide [`PortId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortNo(pub u16);

/// Where a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    Port(PortNo),
    /// A VXLAN packet from the tunnel endpoint at `src` (the outer source IP).
    Tunnel {
        src: IpAddr,
    },
}

impl Ingress {
    /// The tunnel endpoint a frame came from (`None`: a local port).
    pub fn tunnel_src(self) -> Option<IpAddr> {
        match self {
            Ingress::Tunnel { src } => Some(src),
            Ingress::Port(_) => None,
        }
    }
}

/// Where one copy of a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Port(PortNo),
    /// Encapsulate with `vni` and send to the tunnel endpoint `dst`.
    Tunnel {
        dst: IpAddr,
        vni: Vni,
    },
}

/// One copy to send: the (untagged) frame goes to `egress`, with an 802.1Q
/// tag carrying `tag` (the TCI) inserted after the MACs when it is `Some`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub egress: Egress,
    pub tag: Option<u16>,
}

/// What the pipeline decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to the one place its destination lives.
    Forward,
    /// Sent to every place of its VLAN (possibly none).
    Flood,
    Drop(DropReason),
}

/// The result of [`Switch::process`]: the verdict and where the normalised
/// (untagged) frame now lies in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub verdict: Verdict,
    pub frame: Range<usize>,
    /// The VLAN the frame was classified into, when it got that far.
    pub vlan: Option<VlanId>,
}

/// A port as the switch knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub id: PortId,
    pub name: String,
    pub vlan: VlanMode,
    pub acl: PortAcl,
    pub qos: PortQos,
    pub security: Security,
    /// The NetFlow monitor that records the port's flows.
    pub netflow: Option<PortNetflow>,
    /// The VM's MAC, when known: while the port forwards, no other port
    /// and no tunnel endpoint may use it as a source.
    pub mac: Option<MacAddr>,
}

/// A port's NetFlow monitor and which of its traffic it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortNetflow {
    pub monitor: NetflowMonitor,
    pub direction: FlowDirection,
}

/// A port's rate limits, seen from the VM like its access lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortQos {
    /// Traffic going into the VM.
    pub inbound: Option<RateLimit>,
    /// Traffic the VM sends.
    pub outbound: Option<RateLimit>,
    /// Priority marks set on what the VM sends.
    pub mark: Option<Marking>,
}

/// A port's access lists, seen from the VM (as vSphere's port filters):
/// `inbound` filters traffic going into the VM, `outbound` what the VM
/// sends. An empty list filters nothing; a non-empty one denies what none
/// of its rules matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortAcl {
    pub inbound: Vec<AclRule>,
    pub outbound: Vec<AclRule>,
}

/// The runtime state behind a port's policy (see [`Switch::save_port`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PortState {
    pub counters: PortCounters,
    pub acl_in_hits: Option<Vec<u64>>,
    pub acl_out_hits: Option<Vec<u64>>,
    pub police_in: Option<PolicerState>,
    pub police_out: Option<PolicerState>,
    pub conntrack: Vec<SavedConn>,
    pub sticky_macs: Vec<MacAddr>,
    /// Open flow records (of the port's monitor).
    #[serde(default)]
    pub flows: Vec<SavedFlow>,
    /// MACs learned on the port (a trunk's VMs behind it): VLAN, MAC, age
    /// in ms.
    #[serde(default)]
    pub learned_macs: Vec<(VlanId, MacAddr, u64)>,
    /// The addresses DHCP gave the VM: address, client MAC, ms of lease
    /// left.
    #[serde(default)]
    pub dhcp_bindings: Vec<(IpAddr, MacAddr, u64)>,
}

/// A VLAN segment stretched across hosts by VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentConfig {
    pub vlan: VlanId,
    pub vni: Vni,
    /// Tunnel endpoints of the other hosts that have this segment: flooded
    /// frames are replicated to each.
    pub peers: Vec<IpAddr>,
}

/// Switch-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The largest frame accepted (Ethernet header and tags included). The
    /// default takes a 64 KB IP packet: a kernel on a virtual underlay hands
    /// VXLAN receivers GSO-aggregated datagrams, and TAP devices take them.
    pub max_frame: usize,
    pub mac_table: MacTableConfig,
    /// The most connections one port tracks for its stateful rules.
    pub conntrack_max: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            max_frame: 65_535 + 14 + 8,
            mac_table: MacTableConfig::default(),
            conntrack_max: conntrack::DEFAULT_MAX,
        }
    }
}

#[derive(Debug, Clone)]
struct Port {
    cfg: PortConfig,
    counters: PortCounters,
    /// Compiled `cfg.acl.inbound` (checked as frames leave toward the VM).
    acl_in: Option<Acl>,
    /// Compiled `cfg.acl.outbound` (checked as frames come from the VM).
    acl_out: Option<Acl>,
    /// Connections opened through stateful rules (when the lists have any).
    conntrack: Option<ConnTrack>,
    /// Policer of `cfg.qos.inbound`.
    police_in: Option<Policer>,
    /// Policer of `cfg.qos.outbound`.
    police_out: Option<Policer>,
    /// Port security of `cfg.security`, when it checks anything.
    guard: Option<PortGuard>,
    /// The addresses DHCP gave the port's VM (snooped from the server's
    /// acks toward it), for IP source guard.
    snooped: Vec<Snooped>,
    /// The flow table of `cfg.netflow` and what it records.
    flow: Option<(usize, FlowDirection)>,
    /// In standby: installed with its policy, not forwarding.
    standby: bool,
    /// A pvlan port whose private VLAN is not declared as its mode says
    /// (set by `rebuild`): it forwards nothing.
    pvlan_undeclared: bool,
    /// When the port last forwarded a frame from its VM (zero: never).
    last_from_vm: Duration,
    /// When the port last sent a frame to its VM (zero: never).
    last_to_vm: Duration,
    /// When the port last took a unicast frame from its VM — one meant for
    /// a peer, not an announcement (zero: never).
    last_unicast_from_vm: Duration,
    /// A migration's source: frames for the VM go to this tunnel endpoint
    /// (its destination) too ([`Switch::set_port_copy`]).
    copy_to: Option<IpAddr>,
    /// A destination started from the pre-copy (at this time): the
    /// source's last state is to come ([`Switch::await_state`]).
    awaiting: Option<Duration>,
}

impl Port {
    fn new(cfg: PortConfig, conntrack_max: usize) -> Self {
        let compile = |rules: &[AclRule]| (!rules.is_empty()).then(|| Acl::compile(rules));
        let stateful = cfg
            .acl
            .inbound
            .iter()
            .chain(&cfg.acl.outbound)
            .any(|r| r.stateful);
        Port {
            acl_in: compile(&cfg.acl.inbound),
            acl_out: compile(&cfg.acl.outbound),
            conntrack: stateful
                .then(|| ConnTrack::new(conntrack_max, conntrack::Timeouts::default())),
            police_in: cfg.qos.inbound.map(|l| Policer::new(l, Duration::ZERO)),
            police_out: cfg.qos.outbound.map(|l| Policer::new(l, Duration::ZERO)),
            guard: PortGuard::new(&cfg.security),
            snooped: Vec::new(),
            flow: None,
            standby: false,
            pvlan_undeclared: false,
            last_from_vm: Duration::ZERO,
            last_to_vm: Duration::ZERO,
            last_unicast_from_vm: Duration::ZERO,
            copy_to: None,
            awaiting: None,
            cfg,
            counters: PortCounters::default(),
        }
    }

    /// Would the lists still open connection `first` in direction `origin`?
    fn opens(&self, first: &FlowKey, origin: Origin) -> bool {
        let acl = match origin {
            Origin::FromVm => &self.acl_out,
            Origin::ToVm => &self.acl_in,
        };
        acl.as_ref().is_some_and(|a| {
            let d = a.evaluate(first);
            d.action == Action::Permit && d.stateful
        })
    }
}

/// Derived per-VLAN state, rebuilt whenever ports or segments change.
#[derive(Debug, Clone, Default)]
struct VlanState {
    vni: Option<Vni>,
    peers: Vec<IpAddr>,
    /// Local ports that take the VLAN's frames, each with the TCI to send
    /// them with (of a private VLAN's VLAN: the ports that may hear a
    /// sender in it).
    members: Vec<(PortNo, Option<u16>)>,
    /// Part of a private VLAN: its primary, whose MAC table it shares.
    pvlan: Option<VlanId>,
}

/// One host's switch core.
#[derive(Debug)]
pub struct Switch {
    cfg: SwitchConfig,
    ports: Vec<Option<Port>>,
    segments: FxHashMap<VlanId, SegmentConfig>,
    vlans: FxHashMap<VlanId, VlanState>,
    by_vni: FxHashMap<u32, VlanId>,
    macs: MacTable,
    tunnel: TunnelCounters,
    generation: u64,
    next_age: Duration,
    /// Flow tables of the ports' NetFlow monitors.
    monitors: Monitors,
    /// Some port has a monitor.
    flows_on: bool,
    next_flow_expiry: Duration,
    /// Some port is in standby.
    standby_any: bool,
    /// Standby ports that received a frame from their VM since
    /// [`Switch::take_standby_wakeups`] (a VM that resumed there).
    wakeups: Vec<PortNo>,
    /// Frames VMs sent on standby ports (a migrated VM's first ARP or
    /// RARP), held to be sent once the port forwards: [`Switch::take_held`].
    held: Vec<(PortNo, Vec<u8>)>,
    /// MACs of VMs that left: [`Switch::set_redirect`].
    redirects: Vec<(VlanId, MacAddr)>,
    /// Tunnel endpoints VXLAN is taken from besides the segments' peers.
    tunnel_peers: Vec<IpAddr>,
    /// The segments' peers and `tunnel_peers`, sorted: the only sources of
    /// VXLAN.
    known_peers: Vec<IpAddr>,
    /// Each port's own MAC ([`PortConfig::mac`]).
    owned: FxHashMap<u64, PortNo>,
    /// Frames for VMs that wait for their port's state
    /// ([`switchover`]).
    waiting: Vec<switchover::Waiting>,
    switchover: SwitchoverCounters,
    dhcp: DhcpCounters,
    /// Some port copies its VM's frames ([`Switch::set_port_copy`]).
    copy_any: bool,
    /// The chassis's private VLANs.
    pvlans: PrivateVlans,
}

/// How often flow tables run their timeouts.
const FLOW_TICK: Duration = Duration::from_millis(500);
/// When a port last passed frames (the switch's clock; `None`: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastFrames {
    /// A frame from the VM.
    pub from_vm: Option<Duration>,
    /// A frame to the VM.
    pub to_vm: Option<Duration>,
    /// A unicast frame from the VM (to a peer, not an announcement).
    pub unicast_from_vm: Option<Duration>,
}

/// Frames a standby port holds for its activation, at most.
const MAX_HELD: usize = 32;
/// The largest frame held (a full-size tagged frame).
const MAX_HELD_FRAME: u16 = 1522;

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Self {
        Self {
            cfg,
            ports: Vec::new(),
            segments: FxHashMap::default(),
            vlans: FxHashMap::default(),
            by_vni: FxHashMap::default(),
            macs: MacTable::new(cfg.mac_table),
            tunnel: TunnelCounters::default(),
            generation: 0,
            next_age: Duration::ZERO,
            monitors: Monitors::default(),
            flows_on: false,
            next_flow_expiry: Duration::ZERO,
            standby_any: false,
            wakeups: Vec::new(),
            held: Vec::new(),
            redirects: Vec::new(),
            tunnel_peers: Vec::new(),
            known_peers: Vec::new(),
            owned: FxHashMap::default(),
            waiting: Vec::new(),
            switchover: SwitchoverCounters::default(),
            dhcp: DhcpCounters::default(),
            copy_any: false,
            pvlans: PrivateVlans::default(),
        }
    }

    /// The chassis's private VLANs ([`dvs_proto::pvlan`]). A private
    /// VLAN's VLANs share the primary's MAC table; learned entries are
    /// forgotten when the declarations change, and static entries of the
    /// VLANs that changed must be set again. A pvlan port whose private
    /// VLAN is not declared forwards nothing (`private_vlan`).
    pub fn set_private_vlans(&mut self, pvlans: PrivateVlans) {
        if pvlans == self.pvlans {
            return;
        }
        self.pvlans = pvlans;
        self.macs.forget_learned(|_, _| true);
        self.rebuild();
    }

    /// The VLAN whose MAC table holds `vlan`'s MACs: a private VLAN's
    /// primary, or `vlan` itself.
    fn mac_domain(&self, vlan: VlanId) -> VlanId {
        self.vlans.get(&vlan).and_then(|s| s.pvlan).unwrap_or(vlan)
    }

    /// The tunnel endpoints VXLAN is also taken from, besides the
    /// segments' peers (the chassis's other hosts).
    pub fn set_tunnel_peers(&mut self, peers: Vec<IpAddr>) {
        self.tunnel_peers = peers;
        self.rebuild();
    }

    /// Change the VM's MAC a port owns.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_mac(&mut self, no: PortNo, mac: Option<MacAddr>) -> Result<(), Error> {
        self.port_mut(no)?.cfg.mac = mac;
        self.rebuild();
        Ok(())
    }

    /// MAC table entries that began to flap since the last take.
    pub fn take_flaps(&mut self) -> Vec<Flap> {
        self.macs.take_flaps()
    }

    /// Bumped by every configuration change, and shown in the stats
    /// (`generation`): an operator sees that a switch took a change. No
    /// forwarding cache reads it yet (the exact-match cache of the design
    /// is not built).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Add a port; returns its number on this switch.
    ///
    /// # Errors
    /// [`Error::DuplicatePort`] when the ID or name is already used.
    pub fn add_port(&mut self, cfg: PortConfig) -> Result<PortNo, Error> {
        if let Some(p) = self
            .ports
            .iter()
            .flatten()
            .find(|p| p.cfg.id == cfg.id || p.cfg.name == cfg.name)
        {
            return Err(Error::DuplicatePort {
                port: cfg.name,
                existing: format!("{} ({})", p.cfg.name, p.cfg.id),
            });
        }
        let slot = match self.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.ports.push(None);
                self.ports.len() - 1
            }
        };
        let no = PortNo(u16::try_from(slot).map_err(|_| Error::TooManyPorts)?);
        let netflow = cfg.netflow.clone();
        self.ports[slot] = Some(Port::new(cfg, self.cfg.conntrack_max));
        self.set_port_netflow(no, netflow)?;
        self.rebuild();
        Ok(no)
    }

    /// Remove a port and the MAC entries pointing at it; returns its last
    /// counters. Its open flow records end (exported as forced out).
    pub fn remove_port(&mut self, no: PortNo) -> Option<PortCounters> {
        let _ = self.set_port_netflow(no, None);
        let p = self.ports.get_mut(usize::from(no.0))?.take()?;
        self.macs.flush_port(no);
        self.held.retain(|(h, _)| *h != no);
        self.waiting.retain(|w| w.no != no);
        self.copy_any = self.ports.iter().flatten().any(|p| p.copy_to.is_some());
        self.rebuild();
        Some(p.counters)
    }

    /// Change the NetFlow monitor of a port. Its open records end when the
    /// monitor changes or goes; a monitor of the same name with new settings
    /// (timeouts, sampling, bound) keeps them.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_netflow(
        &mut self,
        no: PortNo,
        netflow: Option<PortNetflow>,
    ) -> Result<(), Error> {
        let p = self.port_mut(no)?;
        let old = p.flow;
        let id = p.cfg.id.number();
        let next = netflow
            .as_ref()
            .map(|n| (self.monitors.bind(&n.monitor), n.direction));
        if let Some((i, _)) = old {
            if next.map(|(j, _)| j) != Some(i) {
                self.monitors.flush_port(i, id);
            }
        }
        let p = self.port_mut(no)?;
        p.flow = next;
        p.cfg.netflow = netflow;
        self.flows_on = self.ports.iter().flatten().any(|p| p.flow.is_some());
        Ok(())
    }

    /// Put port `no` in standby (its policy in place, nothing forwarded to
    /// or from it: what a migration's destination does until activation)
    /// or take it out.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_standby(&mut self, no: PortNo, standby: bool) -> Result<(), Error> {
        self.port_mut(no)?.standby = standby;
        self.standby_any = self.ports.iter().flatten().any(|p| p.standby);
        self.wakeups.retain(|w| *w != no);
        self.generation += 1;
        if !standby {
            self.forget_owned_elsewhere();
        }
        Ok(())
    }

    /// Forget what was learned of a forwarding port's own MAC anywhere
    /// else (while it was in standby, or before it owned the MAC): from
    /// now on only its port may teach it, and learning keeps it so.
    fn forget_owned_elsewhere(&mut self) {
        if self.owned.is_empty() {
            return;
        }
        let (owned, ports) = (&self.owned, &self.ports);
        self.macs.forget_learned(|mac, at| {
            owned.get(&mac.to_u64()).is_some_and(|&o| {
                let active = ports
                    .get(usize::from(o.0))
                    .and_then(Option::as_ref)
                    .is_some_and(|p| !p.standby);
                active && at != Location::Port(o)
            })
        });
    }

    pub fn port_standby(&self, no: PortNo) -> bool {
        self.ports
            .get(usize::from(no.0))
            .and_then(Option::as_ref)
            .is_some_and(|p| p.standby)
    }

    /// When port `no` last forwarded a frame from its VM or sent one to it.
    pub fn port_last_frame(&self, no: PortNo) -> Option<Duration> {
        let l = self.port_last_frames(no);
        l.from_vm.max(l.to_vm)
    }

    /// When port `no` last took a frame from its VM (any, and unicast),
    /// and when it last sent one to it (a migration's blackout, each way).
    pub fn port_last_frames(&self, no: PortNo) -> LastFrames {
        let Some(p) = self.ports.get(usize::from(no.0)).and_then(Option::as_ref) else {
            return LastFrames::default();
        };
        let some = |t: Duration| (!t.is_zero()).then_some(t);
        LastFrames {
            from_vm: some(p.last_from_vm),
            to_vm: some(p.last_to_vm),
            unicast_from_vm: some(p.last_unicast_from_vm),
        }
    }

    /// Report standby port `no` as woken — its VM runs here — as its first
    /// frame would (the agent saw the VMM read the port's interface).
    pub fn wake_port(&mut self, no: PortNo) {
        if self.port_standby(no) && !self.wakeups.contains(&no) {
            self.wakeups.push(no);
        }
    }

    /// The port whose ID is `id`.
    pub fn port_by_id(&self, id: PortId) -> Option<PortNo> {
        self.ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.cfg.id == id))
            .map(|i| PortNo(i as u16))
    }

    /// The frames port `no`'s VM sent while it was in standby (oldest
    /// first), to be switched now that it forwards; taken.
    pub fn take_held(&mut self, no: PortNo) -> Vec<Vec<u8>> {
        let (mine, rest) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(p, _)| *p == no);
        self.held = rest;
        mine.into_iter().map(|(_, f)| f).collect()
    }

    /// Standby ports whose VM sent a frame since the last call — the VM
    /// runs here now (QEMU announces itself with RARP after a migration).
    pub fn take_standby_wakeups(&mut self) -> Vec<PortNo> {
        std::mem::take(&mut self.wakeups)
    }

    /// Take the open flow records of port `no` out of its table without
    /// exporting them: they continue where the port goes (migration).
    pub fn take_port_flows(&mut self, no: PortNo, now: Duration) -> Vec<SavedFlow> {
        let Ok(p) = self.port_mut(no) else {
            return Vec::new();
        };
        let (Some((i, _)), id) = (p.flow, p.cfg.id.number()) else {
            return Vec::new();
        };
        self.monitors.save_port(i, id, now, true)
    }

    /// Put open flow records taken by [`Switch::take_port_flows`] back
    /// (a migration that was aborted after the source stopped).
    pub fn restore_port_flows(&mut self, no: PortNo, flows: &[SavedFlow], now: Duration) {
        if let Some(Some(p)) = self.ports.get(usize::from(no.0)) {
            if let Some((i, _)) = p.flow {
                self.monitors.restore(i, flows, now);
            }
        }
    }

    /// The flow tables and the records they ended, for the exporter.
    pub fn monitors_mut(&mut self) -> &mut Monitors {
        &mut self.monitors
    }

    pub fn monitors(&self) -> &Monitors {
        &self.monitors
    }

    /// Change a port's VLAN mode; entries learned on it are forgotten.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_vlan(&mut self, no: PortNo, vlan: VlanMode) -> Result<(), Error> {
        let p = self.port_mut(no)?;
        p.cfg.vlan = vlan;
        self.macs.flush_port(no);
        self.rebuild();
        Ok(())
    }

    /// Replace a port's access lists. Frames see the old lists or the new
    /// ones, never a mix; the counters of the new lists start at zero.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_acl(&mut self, no: PortNo, acl: PortAcl) -> Result<(), Error> {
        let max = self.cfg.conntrack_max;
        let p = self.port_mut(no)?;
        let old_ct = p.conntrack.take();
        let mut cfg = p.cfg.clone();
        cfg.acl = acl;
        // Only the lists and the connection table change: counters,
        // buckets, sticky MACs and flow records stay.
        let fresh = Port::new(cfg, max);
        p.acl_in = fresh.acl_in;
        p.acl_out = fresh.acl_out;
        p.conntrack = fresh.conntrack;
        p.cfg = fresh.cfg;
        // Tracked connections the new lists would still open live on.
        if let (Some(mut ct), true) = (old_ct, p.conntrack.is_some()) {
            let port = &*p;
            ct.revalidate(|first, origin| port.opens(first, origin));
            p.conntrack = Some(ct);
        }
        self.generation += 1;
        Ok(())
    }

    /// Rule hit counters of a port's lists (inbound, outbound), if it has
    /// them.
    pub fn port_acl_hits(&self, no: PortNo) -> (Option<Vec<RuleHits>>, Option<Vec<RuleHits>>) {
        match self.ports.get(usize::from(no.0)).and_then(Option::as_ref) {
            Some(p) => (
                p.acl_in.as_ref().map(Acl::hits),
                p.acl_out.as_ref().map(Acl::hits),
            ),
            None => (None, None),
        }
    }

    /// Replace a port's rate limits. A limit that did not change keeps its
    /// bucket (and counters); a new one starts full.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_qos(&mut self, no: PortNo, qos: PortQos) -> Result<(), Error> {
        let p = self.port_mut(no)?;
        let keep = |old: &mut Option<Policer>, new: Option<RateLimit>| match new {
            Some(l) if old.as_ref().is_some_and(|p| p.limit() == l) => {}
            Some(l) => *old = Some(Policer::new(l, Duration::ZERO)),
            None => *old = None,
        };
        keep(&mut p.police_in, qos.inbound);
        keep(&mut p.police_out, qos.outbound);
        p.cfg.qos = qos;
        self.generation += 1;
        Ok(())
    }

    /// Replace a port's security policy (a new MAC limit starts counting
    /// afresh).
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_security(&mut self, no: PortNo, security: Security) -> Result<(), Error> {
        let p = self.port_mut(no)?;
        p.guard = PortGuard::new(&security);
        p.cfg.security = security;
        self.generation += 1;
        Ok(())
    }

    /// The runtime state behind a port's policy — counters, rule hits,
    /// policer buckets, tracked connections, sticky MACs — as of `now`, to
    /// carry it to another switch.
    pub fn save_port(&mut self, no: PortNo, now: Duration) -> Option<PortState> {
        let p = self.ports.get_mut(usize::from(no.0))?.as_mut()?;
        let flows = match p.flow {
            Some((i, _)) => self.monitors.save_port(i, p.cfg.id.number(), now, false),
            None => Vec::new(),
        };
        let learned_macs = self
            .macs
            .learned_on(no, now)
            .into_iter()
            .map(|(v, m, age)| (v, m, age.as_millis() as u64))
            .collect();
        let dhcp_bindings = p
            .snooped
            .iter()
            .filter(|b| b.until > now)
            .map(|b| (b.ip, b.mac, b.until.saturating_sub(now).as_millis() as u64))
            .collect();
        Some(PortState {
            flows,
            learned_macs,
            dhcp_bindings,
            counters: p.counters.clone(),
            acl_in_hits: p.acl_in.as_ref().map(Acl::save_hits),
            acl_out_hits: p.acl_out.as_ref().map(Acl::save_hits),
            police_in: p.police_in.as_mut().map(|x| x.save(now)),
            police_out: p.police_out.as_mut().map(|x| x.save(now)),
            conntrack: p
                .conntrack
                .as_ref()
                .map(|c| c.save(now))
                .unwrap_or_default(),
            sticky_macs: p
                .guard
                .as_ref()
                .map(PortGuard::sticky_macs)
                .unwrap_or_default(),
        })
    }

    /// Continue a port from `state` (saved by [`Switch::save_port`] for the
    /// same policy) at `now` on this switch's clock. Pieces the port's policy
    /// does not have are ignored; rule counters of other lists too.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn restore_port(
        &mut self,
        no: PortNo,
        state: &PortState,
        now: Duration,
    ) -> Result<(), Error> {
        let p = self.port_mut(no)?;
        p.counters = state.counters.clone();
        if let (Some(a), Some(h)) = (p.acl_in.as_mut(), &state.acl_in_hits) {
            a.restore_hits(h);
        }
        if let (Some(a), Some(h)) = (p.acl_out.as_mut(), &state.acl_out_hits) {
            a.restore_hits(h);
        }
        if let (Some(x), Some(s)) = (p.police_in.as_mut(), &state.police_in) {
            x.restore(s, now);
        }
        if let (Some(x), Some(s)) = (p.police_out.as_mut(), &state.police_out) {
            x.restore(s, now);
        }
        if let Some(ct) = p.conntrack.as_mut() {
            ct.restore(&state.conntrack, now);
        }
        if let Some(g) = p.guard.as_mut() {
            g.restore_sticky_macs(&state.sticky_macs);
        }
        restore_bindings(&mut p.snooped, &state.dhcp_bindings, now);
        let (flow, vlans) = (p.flow, p.cfg.vlan.clone());
        if let Some((i, _)) = flow {
            self.monitors.restore(i, &state.flows, now);
        }
        for (v, m, age) in &state.learned_macs {
            // Only VLANs the port still carries; the age carries over.
            if vlans.carries(*v) {
                let seen = now.saturating_sub(Duration::from_millis(*age));
                self.macs.learn(seen, *v, *m, Location::Port(no));
            }
        }
        Ok(())
    }

    /// The limit of traffic into port `no` when it is to be shaped (by the
    /// transmit side, which holds the frames) rather than policed here.
    pub fn port_inbound_shaper(&self, no: PortNo) -> Option<RateLimit> {
        let p = self.ports.get(usize::from(no.0))?.as_ref()?;
        p.cfg.qos.inbound.filter(|l| l.shape)
    }

    /// The driver dropped a frame for port `no` (e.g. its shaper's queue was
    /// full); counted among the port's `tx_drops`.
    pub fn note_tx_drop(&mut self, no: PortNo, reason: DropReason) {
        if let Ok(p) = self.port_mut(no) {
            p.counters.tx_drops.add(reason);
        }
    }

    /// How long the driver should leave port `no`'s frames waiting in its
    /// device (`None`: read now) — the outbound shaper's verdict.
    pub fn port_wait(&mut self, no: PortNo, now: Duration) -> Option<Duration> {
        let p = self.ports.get_mut(usize::from(no.0))?.as_mut()?;
        let s = p.police_out.as_mut().filter(|s| s.limit().shape)?;
        s.wait(now)
    }

    /// A port's policer counters (inbound, outbound), where it has limits.
    /// What DHCP snooping saw.
    pub fn dhcp_counters(&self) -> &DhcpCounters {
        &self.dhcp
    }

    /// The addresses DHCP snooping bound on port `no` that have not
    /// expired at `now`: address, client MAC, time left.
    pub fn port_dhcp_bindings(
        &self,
        no: PortNo,
        now: Duration,
    ) -> Vec<(IpAddr, MacAddr, Duration)> {
        self.ports
            .get(usize::from(no.0))
            .and_then(Option::as_ref)
            .map(|p| {
                p.snooped
                    .iter()
                    .filter(|b| b.until > now)
                    .map(|b| (b.ip, b.mac, b.until - now))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn port_policers(&self, no: PortNo) -> (Option<PolicerCounters>, Option<PolicerCounters>) {
        match self.ports.get(usize::from(no.0)).and_then(Option::as_ref) {
            Some(p) => (
                p.police_in.as_ref().map(|x| *x.counters()),
                p.police_out.as_ref().map(|x| *x.counters()),
            ),
            None => (None, None),
        }
    }

    /// A port's connection table, if its lists have stateful rules.
    pub fn port_conntrack(&self, no: PortNo) -> Option<&ConnTrack> {
        self.ports
            .get(usize::from(no.0))?
            .as_ref()?
            .conntrack
            .as_ref()
    }

    /// Stretch `seg.vlan` across hosts with `seg.vni` (replacing any earlier
    /// setting of that VLAN).
    ///
    /// # Errors
    /// [`Error::VniInUse`] when another VLAN already uses the VNI.
    pub fn set_segment(&mut self, seg: SegmentConfig) -> Result<(), Error> {
        if let Some(other) = self.by_vni.get(&seg.vni.get()) {
            if *other != seg.vlan {
                return Err(Error::VniInUse {
                    vni: seg.vni.get(),
                    vlan: other.get(),
                });
            }
        }
        self.segments.insert(seg.vlan, seg);
        self.rebuild();
        Ok(())
    }

    pub fn remove_segment(&mut self, vlan: VlanId) -> Option<SegmentConfig> {
        let s = self.segments.remove(&vlan)?;
        self.rebuild();
        Some(s)
    }

    /// Place `mac` on `vlan` for good (a VM known to be on a port or host).
    pub fn set_static_mac(&mut self, vlan: VlanId, mac: MacAddr, location: Location) {
        self.set_static_mac_moving(vlan, mac, location, None);
    }

    /// [`Switch::set_static_mac`] for a VM under way to the host at
    /// `moving_to`: the entry moves there when the VM is heard from there.
    pub fn set_static_mac_moving(
        &mut self,
        vlan: VlanId,
        mac: MacAddr,
        location: Location,
        moving_to: Option<IpAddr>,
    ) {
        let alternate = moving_to.map(Location::Remote);
        let vlan = self.mac_domain(vlan);
        self.macs.set_static_moving(vlan, mac, location, alternate);
        self.generation += 1;
    }

    pub fn remove_mac(&mut self, vlan: VlanId, mac: MacAddr) -> bool {
        self.generation += 1;
        let vlan = self.mac_domain(vlan);
        self.redirects.retain(|r| *r != (vlan, mac));
        self.macs.remove(vlan, mac)
    }

    /// A VM that left for the host at `to` (a migration's source, once
    /// stopped): frames for it go there, those that came from other hosts
    /// too (the one case a frame goes from a tunnel to a tunnel), until
    /// every host knows the new location.
    pub fn set_redirect(&mut self, vlan: VlanId, mac: MacAddr, to: IpAddr) {
        self.set_static_mac(vlan, mac, Location::Remote(to));
        let vlan = self.mac_domain(vlan);
        if !self.redirects.contains(&(vlan, mac)) {
            self.redirects.push((vlan, mac));
        }
    }

    /// The ports, with their numbers.
    pub fn ports(&self) -> impl Iterator<Item = (PortNo, &PortConfig, &PortCounters)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (PortNo(i as u16), &p.cfg, &p.counters)))
    }

    pub fn port(&self, no: PortNo) -> Option<(&PortConfig, &PortCounters)> {
        let p = self.ports.get(usize::from(no.0))?.as_ref()?;
        Some((&p.cfg, &p.counters))
    }

    pub fn port_by_name(&self, name: &str) -> Option<PortNo> {
        self.ports()
            .find(|(_, c, _)| c.name == name)
            .map(|(n, _, _)| n)
    }

    pub fn segments(&self) -> impl Iterator<Item = &SegmentConfig> {
        self.segments.values()
    }

    pub fn tunnel_counters(&self) -> &TunnelCounters {
        &self.tunnel
    }

    pub fn mac_counters(&self) -> &MacCounters {
        self.macs.counters()
    }

    pub fn mac_entries(&self, now: Duration) -> Vec<MacEntry> {
        self.macs.entries(now)
    }

    /// The driver reports that sending to `egress` failed.
    pub fn note_tx_error(&mut self, egress: Egress) {
        match egress {
            Egress::Port(no) => {
                if let Ok(p) = self.port_mut(no) {
                    p.counters.tx_errors += 1;
                }
            }
            Egress::Tunnel { .. } => self.tunnel.tx_errors += 1,
        }
    }

    /// The driver reports that sending on the uplink failed.
    pub fn note_tunnel_tx_error(&mut self) {
        self.tunnel.tx_errors += 1;
    }

    /// The driver completed an inner checksum a tunnel peer had left
    /// unfinished.
    pub fn note_tunnel_csum_completed(&mut self) {
        self.tunnel.rx_csum_completed += 1;
    }

    /// When [`Switch::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Duration {
        if self.flows_on {
            self.next_age.min(self.next_flow_expiry)
        } else {
            self.next_age
        }
    }

    /// Run timers due at `now` (MAC aging, connection and flow timeouts).
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.flows_on && now >= self.next_flow_expiry {
            // A backlog of due checks is worked off a slice at a time,
            // between batches of frames.
            let more = self.monitors.expire(now);
            self.next_flow_expiry = if more { now } else { now + FLOW_TICK };
        }
        if now >= self.next_age {
            self.macs.age(now);
            for p in self.ports.iter_mut().flatten() {
                if let Some(ct) = p.conntrack.as_mut() {
                    ct.expire(now);
                }
            }
            self.next_age = now + (self.cfg.mac_table.aging / 10).max(Duration::from_millis(100));
        }
    }

    /// Switch one frame.
    ///
    /// `buf` holds the frame as received (for [`Ingress::Tunnel`], the whole
    /// UDP payload: VXLAN header and inner frame). The frame is normalised in
    /// place (tags removed); [`Processed::frame`] says where it now lies.
    /// `out` is cleared, then filled with the copies to send.
    pub fn process(
        &mut self,
        now: Duration,
        ingress: Ingress,
        buf: &mut [u8],
        out: &mut Vec<Output>,
    ) -> Processed {
        self.process_gso(now, ingress, buf, 0, out)
    }

    /// [`Switch::process`] for a frame that the wire will see as segments
    /// of `gso_size` bytes of TCP payload (a VM's TSO frame): flow records
    /// count those segments. 0: the frame is one packet.
    pub fn process_gso(
        &mut self,
        now: Duration,
        ingress: Ingress,
        buf: &mut [u8],
        gso_size: u16,
        out: &mut Vec<Output>,
    ) -> Processed {
        out.clear();
        let mut frame = 0..buf.len();
        let classified = match ingress {
            Ingress::Port(no) => self.classify_port(no, buf),
            Ingress::Tunnel { src } => self.classify_tunnel(src, buf, &mut frame),
        };
        let (vlan, view) = match classified {
            Ok(c) => c,
            Err(reason) => {
                self.count_drop(ingress, reason);
                return Processed {
                    verdict: Verdict::Drop(reason),
                    frame,
                    vlan: None,
                };
            }
        };
        if self.standby_any {
            if let Ingress::Port(no) = ingress {
                if let Some(reason) =
                    self.standby_ingress(no, view.src, &buf[frame.clone()], gso_size)
                {
                    return Processed {
                        verdict: Verdict::Drop(reason),
                        frame,
                        vlan: Some(vlan),
                    };
                }
            }
        }
        if view.outer.is_some() {
            frame.start = wire::pop_tag(buf, frame.start);
        }
        let len = frame.len() as u64;
        if let Ingress::Port(no) = ingress {
            if let Some(Some(port)) = self.ports.get_mut(usize::from(no.0)) {
                port.last_from_vm = now;
                if !view.dst.is_multicast() {
                    port.last_unicast_from_vm = now;
                }
                let bytes = &buf[frame.clone()];
                if let Err(reason) = dhcp_guard(port, bytes) {
                    self.count_drop(ingress, reason);
                    return Processed {
                        verdict: Verdict::Drop(reason),
                        frame,
                        vlan: Some(vlan),
                    };
                }
                if let Some(g) = port.guard.as_mut() {
                    if let Err(reason) = g.check(now, &view, bytes, vlan.get(), &port.snooped) {
                        self.count_drop(ingress, reason);
                        return Processed {
                            verdict: Verdict::Drop(reason),
                            frame,
                            vlan: Some(vlan),
                        };
                    }
                }
                dhcp_from_vm(port, &mut self.dhcp, now, bytes);
            }
        }
        let mut key = None;
        let verdict = match self.check_outbound(now, ingress, &buf[frame.clone()], vlan, &mut key) {
            Some(reason) => Verdict::Drop(reason),
            None => {
                let mark = self.mark_of(ingress);
                if let Some(dscp) = mark.and_then(|m| m.dscp) {
                    if wire::set_dscp(&mut buf[frame.clone()], dscp) {
                        key = None;
                    }
                }
                let v = self.forward(now, ingress, vlan, &view, out);
                if let Some(pcp) = mark.and_then(|m| m.pcp) {
                    for o in out.iter_mut() {
                        o.tag = o.tag.map(|t| (t & 0x1fff) | u16::from(pcp) << 13);
                    }
                }
                if self.standby_any {
                    self.drop_to_standby(out);
                }
                self.check_inbound(now, &buf[frame.clone()], vlan, &mut key, out);
                if self.flows_on {
                    let f = &buf[frame.clone()];
                    if let (Some(from), Some(m)) =
                        (self.flow_targets(ingress, out), wire::l3_meter(f, gso_size))
                    {
                        // The policy checks may have read the key already.
                        let k = *key.get_or_insert_with(|| FlowKey::parse(f, vlan.get()));
                        self.account_flows(now, from, &k, m, out);
                    }
                }
                match v {
                    Verdict::Forward if out.is_empty() => Verdict::Drop(DropReason::AclDeny),
                    v => v,
                }
            }
        };
        if let Verdict::Drop(r) = verdict {
            self.count_drop(ingress, r);
        }
        self.count_tx(now, out, len);
        Processed {
            verdict,
            frame,
            vlan: Some(vlan),
        }
    }

    fn classify_port(&mut self, no: PortNo, buf: &[u8]) -> Result<(VlanId, EthView), DropReason> {
        let max = self.cfg.max_frame;
        let Some(Some(port)) = self.ports.get_mut(usize::from(no.0)) else {
            return Err(DropReason::UnknownPort);
        };
        let c = &mut port.counters;
        c.rx_frames += 1;
        c.rx_bytes += buf.len() as u64;
        let view = parse_checked(buf, max)?;
        if view.dst.is_broadcast() {
            c.rx_broadcast += 1;
        } else if view.dst.is_multicast() {
            c.rx_multicast += 1;
        }
        let vlan = ingress_vlan(&port.cfg.vlan, &view)?;
        if port.pvlan_undeclared {
            return Err(DropReason::PrivateVlan);
        }
        Ok((vlan, view))
    }

    fn classify_tunnel(
        &mut self,
        src: IpAddr,
        buf: &[u8],
        frame: &mut Range<usize>,
    ) -> Result<(VlanId, EthView), DropReason> {
        self.tunnel.rx_packets += 1;
        self.tunnel.rx_bytes += buf.len() as u64;
        // A short list is scanned (cheaper than searching it).
        let known = if self.known_peers.len() <= 16 {
            self.known_peers.contains(&src)
        } else {
            self.known_peers.binary_search(&src).is_ok()
        };
        if !known {
            return Err(DropReason::UnknownPeer);
        }
        let (vni, inner) = vxlan::decode(buf).map_err(|e| match e {
            wire::WireError::VxlanFlags(_) => DropReason::VxlanFlags,
            _ => DropReason::VxlanTruncated,
        })?;
        *frame = inner;
        let vlan = *self.by_vni.get(&vni).ok_or(DropReason::UnknownVni)?;
        let view = parse_checked(&buf[frame.clone()], self.cfg.max_frame)?;
        if view.outer.is_some() {
            return Err(DropReason::TaggedInTunnel);
        }
        Ok((vlan, view))
    }

    fn forward(
        &mut self,
        now: Duration,
        ingress: Ingress,
        vlan: VlanId,
        view: &EthView,
        out: &mut Vec<Output>,
    ) -> Verdict {
        let here = match ingress {
            Ingress::Port(no) => Location::Port(no),
            Ingress::Tunnel { src } => Location::Remote(src),
        };
        let state = self.vlans.get(&vlan);
        // A private VLAN's VLANs learn into its primary's table.
        let domain = state.and_then(|s| s.pvlan).unwrap_or(vlan);
        // Most frames refresh the entry of a sender already known there;
        // only a new or moving source meets the ownership check.
        if !self.macs.refresh(now, domain, view.src, here) {
            if let Some(&owner) = self.owned.get(&view.src.to_u64()) {
                if here != Location::Port(owner) && !self.port_standby(owner) {
                    self.macs.refuse_owned();
                    return Verdict::Drop(DropReason::MacOwned);
                }
            }
            self.macs.learn(now, domain, view.src, here);
        }
        let pcp = view.outer.map_or(0, |t| t.pcp);
        let Some(state) = state else {
            return Verdict::Flood;
        };
        if !view.dst.is_multicast() {
            match self.macs.lookup(now, domain, view.dst) {
                Some(Location::Port(p)) if here == Location::Port(p) => {
                    return Verdict::Drop(DropReason::Hairpin)
                }
                Some(Location::Port(p)) => {
                    if let Some((_, tag)) = state.members.iter().find(|(m, _)| *m == p) {
                        out.push(Output {
                            egress: Egress::Port(p),
                            tag: tag.map(|t| t | u16::from(pcp) << 13),
                        });
                        if self.copy_any {
                            let (from, vni) = (ingress.tunnel_src(), state.vni);
                            if let Some(copy) = self.copy_for(p, from, vni) {
                                out.push(copy);
                            }
                        }
                        return Verdict::Forward;
                    }
                    // A private VLAN's port the sender may not reach.
                    if state.pvlan.is_some() {
                        return Verdict::Drop(DropReason::PrivateVlan);
                    }
                    // The port no longer carries the VLAN: flood instead.
                }
                Some(Location::Remote(dst)) => {
                    if let Ingress::Tunnel { src } = ingress {
                        if src == dst || !self.redirects.contains(&(domain, view.dst)) {
                            return Verdict::Drop(DropReason::TunnelToTunnel);
                        }
                    }
                    if let Some(vni) = state.vni {
                        out.push(Output {
                            egress: Egress::Tunnel { dst, vni },
                            tag: None,
                        });
                        return Verdict::Forward;
                    }
                }
                None => {}
            }
        }
        for (p, tag) in &state.members {
            if here != Location::Port(*p) {
                out.push(Output {
                    egress: Egress::Port(*p),
                    tag: tag.map(|t| t | u16::from(pcp) << 13),
                });
            }
        }
        if let (Ingress::Port(_), Some(vni)) = (ingress, state.vni) {
            for dst in &state.peers {
                out.push(Output {
                    egress: Egress::Tunnel { dst: *dst, vni },
                    tag: None,
                });
            }
        }
        Verdict::Flood
    }

    /// The marks of the port a frame came from.
    fn mark_of(&self, ingress: Ingress) -> Option<Marking> {
        let Ingress::Port(no) = ingress else {
            return None;
        };
        self.ports.get(usize::from(no.0))?.as_ref()?.cfg.qos.mark
    }

    /// A frame `f` from port `no`'s VM while the port is in standby:
    /// the reason it goes no further (`None`: the port forwards). Only the
    /// VM's own MAC says the VM runs here (a wakeup; another source is
    /// `foreign_wakeup`); its small frames wait for the port's activation
    /// (the VM's ARP after resuming must not wait a second for its retry),
    /// the rest are dropped.
    fn standby_ingress(
        &mut self,
        no: PortNo,
        src: MacAddr,
        f: &[u8],
        gso_size: u16,
    ) -> Option<DropReason> {
        if !self.port_standby(no) {
            return None;
        }
        let ingress = Ingress::Port(no);
        let own = self.port(no).and_then(|(c, _)| c.mac);
        if own.is_some_and(|m| m != src) {
            self.count_drop(ingress, DropReason::ForeignWakeup);
            return Some(DropReason::ForeignWakeup);
        }
        if !self.wakeups.contains(&no) {
            self.wakeups.push(no);
        }
        if gso_size == 0
            && f.len() <= usize::from(MAX_HELD_FRAME)
            && self.held.iter().filter(|(p, _)| *p == no).count() < MAX_HELD
        {
            // Held, not dropped: it is switched when the port forwards.
            self.held.push((no, f.to_vec()));
        } else {
            self.count_drop(ingress, DropReason::Standby);
        }
        Some(DropReason::Standby)
    }

    /// The policy of the sending port on a frame from its VM
    /// ([`port_policy`]; port security ran before it).
    fn check_outbound(
        &mut self,
        now: Duration,
        ingress: Ingress,
        frame: &[u8],
        vlan: VlanId,
        key: &mut Option<FlowKey>,
    ) -> Option<DropReason> {
        let Ingress::Port(no) = ingress else {
            return None;
        };
        let port = self.ports.get_mut(usize::from(no.0))?.as_mut()?;
        port_policy(port, Direction::FromVm, now, frame, vlan, key).err()
    }

    /// Remove the outputs whose port's policy refuses the frame into its
    /// VM ([`port_policy`]), counting each on that port.
    fn check_inbound(
        &mut self,
        now: Duration,
        frame: &[u8],
        vlan: VlanId,
        key: &mut Option<FlowKey>,
        out: &mut Vec<Output>,
    ) {
        let (ports, waiting, counters) = (&mut self.ports, &mut self.waiting, &mut self.switchover);
        let dhcp = &mut self.dhcp;
        let message = dhcp_delivered(dhcp, frame);
        out.retain(|o| {
            let Egress::Port(p) = o.egress else {
                return true;
            };
            let Some(Some(port)) = ports.get_mut(usize::from(p.0)) else {
                return true;
            };
            match port_policy(port, Direction::ToVm, now, frame, vlan, key) {
                Ok(()) => {
                    if let Some(d) = &message {
                        dhcp_to_vm(port, dhcp, now, d);
                    }
                    true
                }
                Err(reason) => {
                    let r = switchover::Refused {
                        no: p,
                        vlan,
                        tag: o.tag,
                        frame,
                        key,
                        reason,
                    };
                    if !Switch::wait_for_state(waiting, counters, port, r, now) {
                        port.counters.tx_drops.add(reason);
                    }
                    false
                }
            }
        });
    }

    /// Remove the copies for standby ports, counting each on its port.
    fn drop_to_standby(&mut self, out: &mut Vec<Output>) {
        let ports = &mut self.ports;
        out.retain(|o| {
            let Egress::Port(p) = o.egress else {
                return true;
            };
            match ports.get_mut(usize::from(p.0)).and_then(Option::as_mut) {
                Some(port) if port.standby => {
                    port.counters.tx_drops.add(DropReason::Standby);
                    false
                }
                _ => true,
            }
        });
    }

    /// The flow table and port ID of a port that records what it carries
    /// in `dir`.
    fn port_flow(&self, no: PortNo, dir: Direction) -> Option<(usize, u32)> {
        let p = self.ports.get(usize::from(no.0))?.as_ref()?;
        let (i, d) = p.flow?;
        let records = match dir {
            Direction::FromVm => d.records_out(),
            Direction::ToVm => d.records_in(),
        };
        records.then(|| (i, p.cfg.id.number()))
    }

    /// Whether a frame from `ingress` going to `out` is recorded anywhere:
    /// `Some` with the sender's table (when it records what its VM sends).
    fn flow_targets(&self, ingress: Ingress, out: &[Output]) -> Option<Option<(usize, u32)>> {
        let from = match ingress {
            Ingress::Port(no) => self.port_flow(no, Direction::FromVm),
            Ingress::Tunnel { .. } => None,
        };
        let to_any = out.iter().any(|o| match o.egress {
            Egress::Port(p) => self.port_flow(p, Direction::ToVm).is_some(),
            Egress::Tunnel { .. } => false,
        });
        (from.is_some() || to_any).then_some(from)
    }

    /// Add a frame that passed its port's policy (key `k`, measured `m`)
    /// to the flow records of the ports that record it: the sender's (`from`,
    /// from the VM) and each receiving port's (into the VM).
    fn account_flows(
        &mut self,
        now: Duration,
        from: Option<(usize, u32)>,
        k: &FlowKey,
        m: wire::L3Meter,
        out: &[Output],
    ) {
        let (Some(src), Some(dst), Some(proto)) = (k.src_ip, k.dst_ip, k.proto) else {
            return;
        };
        // NetFlow's convention: ICMP type·256 + code in the destination port.
        let (src_port, dst_port) = match proto {
            1 | 58 => (0, k.src_port << 8 | k.dst_port),
            _ => (k.src_port, k.dst_port),
        };
        let mut id = FlowId {
            port: 0,
            dir: Direction::FromVm,
            vlan: k.vlan,
            src,
            dst,
            proto,
            src_port,
            dst_port,
            tos: m.tos,
        };
        if let Some((i, port)) = from {
            id.port = port;
            self.monitors
                .account(i, now, id, m.packets, m.octets, k.tcp_flags);
        }
        id.dir = Direction::ToVm;
        for o in out {
            let Egress::Port(p) = o.egress else { continue };
            if let Some((i, port)) = self.port_flow(p, Direction::ToVm) {
                id.port = port;
                self.monitors
                    .account(i, now, id, m.packets, m.octets, k.tcp_flags);
            }
        }
    }

    fn count_tx(&mut self, now: Duration, out: &[Output], len: u64) {
        for o in out {
            match o.egress {
                Egress::Port(p) => {
                    if let Some(Some(port)) = self.ports.get_mut(usize::from(p.0)) {
                        port.last_to_vm = now;
                        port.counters.tx_frames += 1;
                        port.counters.tx_bytes += len + if o.tag.is_some() { 4 } else { 0 };
                    }
                }
                Egress::Tunnel { .. } => {
                    self.tunnel.tx_packets += 1;
                    self.tunnel.tx_bytes += len + vxlan::HEADER_LEN as u64;
                }
            }
        }
    }

    fn count_drop(&mut self, ingress: Ingress, reason: DropReason) {
        match ingress {
            Ingress::Port(no) => {
                if let Some(Some(p)) = self.ports.get_mut(usize::from(no.0)) {
                    p.counters.drops.add(reason);
                }
            }
            Ingress::Tunnel { .. } => self.tunnel.drops.add(reason),
        }
    }

    fn port_mut(&mut self, no: PortNo) -> Result<&mut Port, Error> {
        self.ports
            .get_mut(usize::from(no.0))
            .and_then(Option::as_mut)
            .ok_or(Error::UnknownPortNo(no.0))
    }

    fn rebuild(&mut self) {
        self.generation += 1;
        self.vlans.clear();
        self.by_vni.clear();
        self.known_peers.clear();
        self.known_peers.extend(self.tunnel_peers.iter().copied());
        for seg in self.segments.values() {
            self.by_vni.insert(seg.vni.get(), seg.vlan);
            let st = self.vlans.entry(seg.vlan).or_default();
            st.vni = Some(seg.vni);
            st.peers = seg.peers.clone();
            self.known_peers.extend(seg.peers.iter().copied());
        }
        self.known_peers.sort_unstable();
        self.known_peers.dedup();
        for d in self.pvlans.decls() {
            for v in d.vlans() {
                self.vlans.entry(v).or_default().pvlan = Some(d.primary);
            }
        }
        self.owned.clear();
        for p in self.ports.iter_mut().flatten() {
            p.pvlan_undeclared = !self.pvlans.allows(&p.cfg.vlan);
        }
        for (i, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            let no = PortNo(i as u16);
            if let Some(m) = p.cfg.mac {
                self.owned.insert(m.to_u64(), no);
            }
            match &p.cfg.vlan {
                VlanMode::Access(v) => self.vlans.entry(*v).or_default().members.push((no, None)),
                VlanMode::Trunk { allowed, native } => {
                    for v in allowed.iter() {
                        let tag = if Some(v) == *native {
                            None
                        } else {
                            Some(v.get())
                        };
                        self.vlans.entry(v).or_default().members.push((no, tag));
                    }
                }
                mode @ (VlanMode::PvlanHost { primary, .. }
                | VlanMode::PvlanPromiscuous { primary }) => {
                    // Not declared as it says: the port takes nothing.
                    let (false, Some(d)) = (p.pvlan_undeclared, self.pvlans.get(*primary)) else {
                        continue;
                    };
                    // Who may hear whom: everyone hears a promiscuous
                    // sender (the primary); a promiscuous port hears
                    // everyone; a community port its community too.
                    let hears: Vec<VlanId> = match mode {
                        VlanMode::PvlanHost { secondary, .. }
                            if d.community.contains(secondary) =>
                        {
                            vec![*primary, *secondary]
                        }
                        VlanMode::PvlanHost { .. } => vec![*primary],
                        _ => d.vlans().collect(),
                    };
                    for v in hears {
                        self.vlans.entry(v).or_default().members.push((no, None));
                    }
                }
            }
        }
        self.forget_owned_elsewhere();
    }
}

/// The inbound policer of `port`: does a frame of `len` bytes go to the VM?
/// A refusal is counted on the port.
/// A port's policy on a frame crossing it `dir` — the one chain both
/// directions run, in this order:
///
/// 1. connection tracking: a frame of a connection the port's stateful
///    rules opened (either way) passes without the list;
/// 2. that direction's access list (a stateful permit opens the
///    connection);
/// 3. that direction's policer. A shaped port's limit is the driver's: from
///    the VM, the frame is only charged (the driver read it because the
///    shaper let it); to the VM, the transmit side's queue keeps it.
///
/// Take the saved DHCP `bindings` (their leases' time left) into a port's
/// list at `now`; a binding the port has already stays.
fn restore_bindings(list: &mut Vec<Snooped>, bindings: &[(IpAddr, MacAddr, u64)], now: Duration) {
    for &(ip, mac, left) in bindings {
        if !list.iter().any(|b| b.ip == ip) {
            snoop_bind(list, ip, mac, now + Duration::from_millis(left));
        }
    }
}

/// DHCP snooping of a frame a VM sends: a server's message or a router
/// advertisement from a port not trusted to send one is refused.
fn dhcp_guard(port: &Port, frame: &[u8]) -> Result<(), DropReason> {
    use wire::dhcp::ServerMessage;
    if port.cfg.security.dhcp_trusted {
        return Ok(());
    }
    match wire::dhcp::server_message(frame) {
        Some(ServerMessage::Dhcp4 | ServerMessage::Dhcp6) => Err(DropReason::DhcpServer),
        Some(ServerMessage::RouterAdvertisement) => Err(DropReason::RouterAdvertisement),
        None => Ok(()),
    }
}

/// DHCP snooping of a frame a VM sent that port security admitted: a
/// release or decline ends the binding it names (after the frame itself
/// passed, from that address), and ended leases go.
fn dhcp_from_vm(port: &mut Port, counters: &mut DhcpCounters, now: Duration, frame: &[u8]) {
    use wire::dhcp::{Dhcp4Type, Dhcp6Type};
    if !port.snooped.is_empty() && frame.get(12..14) == Some(&[0x86, 0xdd]) {
        if let Some(d) = wire::dhcp::dhcp6(frame) {
            if matches!(d.kind, Dhcp6Type::Release | Dhcp6Type::Decline) {
                let before = port.snooped.len();
                port.snooped
                    .retain(|b| !d.addrs.iter().any(|(a, _)| b.ip == IpAddr::V6(*a)));
                counters.ended += (before - port.snooped.len()) as u64;
            }
        }
        return;
    }
    if !wire::dhcp::is_dhcp4(frame, true) {
        return;
    }
    let Some(d) = wire::dhcp::dhcp4(frame) else {
        counters.malformed += 1;
        return;
    };
    port.snooped.retain(|b| b.until > now);
    let gone = match d.kind {
        Dhcp4Type::Release => Some(d.ciaddr),
        Dhcp4Type::Decline => d.requested,
        _ => None,
    };
    if let Some(ip) = gone {
        let before = port.snooped.len();
        port.snooped
            .retain(|b| !(b.ip == IpAddr::V4(ip) && b.mac == d.chaddr));
        counters.ended += (before - port.snooped.len()) as u64;
    }
}

/// A DHCP server's message the switch delivers to VMs.
enum Delivered {
    V4(wire::dhcp::Dhcp4),
    /// A DHCPv6 message, and the MAC it is sent to (DHCPv6 names its
    /// client by DUID, not MAC).
    V6(wire::dhcp::Dhcp6, MacAddr),
}

/// The DHCP server message in a frame the switch delivers to VMs, read
/// once for all its copies; a malformed DHCPv4 one is counted.
fn dhcp_delivered(counters: &mut DhcpCounters, frame: &[u8]) -> Option<Delivered> {
    if wire::dhcp::is_dhcp4(frame, false) {
        let d = wire::dhcp::dhcp4(frame);
        if d.is_none() {
            counters.malformed += 1;
        }
        return d.map(Delivered::V4);
    }
    if wire::dhcp::server_message(frame) != Some(wire::dhcp::ServerMessage::Dhcp6) {
        return None;
    }
    let Some(d) = wire::dhcp::dhcp6(frame) else {
        counters.malformed += 1;
        return None;
    };
    let mut dst = [0u8; 6];
    dst.copy_from_slice(frame.get(..6)?);
    Some(Delivered::V6(d, MacAddr(dst)))
}

/// DHCP snooping of a message the switch delivers to a VM: a server's ack
/// for the port's VM (its `mac`: a port without one binds nothing) binds
/// the address it gives for the lease (a nak ends the client's bindings).
/// Only trusted ports and other hosts (which guard their own ports) can
/// have sent it.
fn dhcp_to_vm(port: &mut Port, counters: &mut DhcpCounters, now: Duration, m: &Delivered) {
    use wire::dhcp::{Dhcp4Type, Dhcp6Type};
    let d = match m {
        Delivered::V4(d) => d,
        Delivered::V6(d, to) => {
            if port.cfg.mac != Some(*to) || d.kind != Dhcp6Type::Reply {
                return;
            }
            for &(ip, valid) in &d.addrs {
                let ip = IpAddr::V6(ip);
                if valid == 0 {
                    let before = port.snooped.len();
                    port.snooped.retain(|b| b.ip != ip);
                    counters.ended += (before - port.snooped.len()) as u64;
                } else {
                    let until = now + Duration::from_secs(u64::from(valid));
                    snoop_bind(&mut port.snooped, ip, *to, until);
                    counters.bound += 1;
                }
            }
            return;
        }
    };
    if port.cfg.mac != Some(d.chaddr) {
        return;
    }
    match d.kind {
        Dhcp4Type::Ack if !d.yiaddr.is_unspecified() => {
            // No lease option: the RFC's default is the server's; a day.
            let lease = match d.lease_s {
                Some(u32::MAX) => Duration::from_secs(u64::from(u32::MAX)),
                Some(s) => Duration::from_secs(u64::from(s)),
                None => Duration::from_secs(86_400),
            };
            snoop_bind(
                &mut port.snooped,
                IpAddr::V4(d.yiaddr),
                d.chaddr,
                now + lease,
            );
            counters.bound += 1;
        }
        Dhcp4Type::Nak => {
            let before = port.snooped.len();
            port.snooped.retain(|b| b.mac != d.chaddr);
            counters.ended += (before - port.snooped.len()) as u64;
        }
        _ => {}
    }
}

/// From the VM, port security (`PortGuard`) runs before it; to the VM, a
/// port in standby takes nothing before it.
fn port_policy(
    port: &mut Port,
    dir: Direction,
    now: Duration,
    frame: &[u8],
    vlan: VlanId,
    key: &mut Option<FlowKey>,
) -> Result<(), DropReason> {
    let (acl, policer, origin) = match dir {
        Direction::FromVm => (&mut port.acl_out, &mut port.police_out, Origin::FromVm),
        Direction::ToVm => (&mut port.acl_in, &mut port.police_in, Origin::ToVm),
    };
    if acl.is_some() || port.conntrack.is_some() {
        let k = key.get_or_insert_with(|| FlowKey::parse(frame, vlan.get()));
        let tracked = port.conntrack.as_mut().is_some_and(|ct| ct.track(now, k));
        if let (false, Some(acl)) = (tracked, acl.as_mut()) {
            let d = acl.check(k);
            if d.action == Action::Deny {
                return Err(DropReason::AclDeny);
            }
            if d.stateful {
                if let Some(ct) = port.conntrack.as_mut() {
                    ct.commit(now, k, origin);
                }
            }
        }
    }
    let Some(p) = policer.as_mut() else {
        return Ok(());
    };
    if p.limit().shape {
        if dir == Direction::FromVm {
            p.charge(now, frame.len());
        }
        return Ok(());
    }
    if p.admit(now, frame.len()) {
        Ok(())
    } else {
        Err(DropReason::Policed)
    }
}

fn parse_checked(frame: &[u8], max: usize) -> Result<EthView, DropReason> {
    if frame.len() > max {
        return Err(DropReason::Oversized);
    }
    let view = EthView::parse(frame).map_err(|e| match e {
        wire::WireError::TruncatedTag => DropReason::TruncatedTag,
        _ => DropReason::Runt,
    })?;
    if view.src.is_multicast() || view.src.is_zero() {
        return Err(DropReason::InvalidSourceMac);
    }
    Ok(view)
}

/// The VLAN a frame from a VM belongs to, by the port's mode.
fn ingress_vlan(mode: &VlanMode, view: &EthView) -> Result<VlanId, DropReason> {
    const CTAG: u16 = 0x8100;
    match (mode, view.outer, view.inner) {
        (_, _, Some(_)) => Err(DropReason::StackedTags),
        (
            VlanMode::Access(v)
            | VlanMode::PvlanHost { secondary: v, .. }
            | VlanMode::PvlanPromiscuous { primary: v },
            t,
            None,
        ) => match t {
            None => Ok(*v),
            // A priority-only tag (VID 0) on an access port carries no VLAN.
            Some(t) if t.tpid == CTAG && t.vid == 0 => Ok(*v),
            Some(_) => Err(DropReason::TaggedOnAccess),
        },
        (VlanMode::Trunk { .. }, Some(t), None) if t.tpid != CTAG => Err(DropReason::StackedTags),
        (VlanMode::Trunk { native, .. }, Some(t), None) if t.vid == 0 => {
            native.ok_or(DropReason::UntaggedNoNative)
        }
        (VlanMode::Trunk { allowed, .. }, Some(t), None) => {
            if allowed.contains_raw(t.vid) {
                VlanId::new(u32::from(t.vid)).map_err(|_| DropReason::VlanNotAllowed)
            } else {
                Err(DropReason::VlanNotAllowed)
            }
        }
        (VlanMode::Trunk { native, .. }, None, None) => native.ok_or(DropReason::UntaggedNoNative),
    }
}

#[cfg(test)]
mod tests;
