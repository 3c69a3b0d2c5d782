//! What the switch does for a migration's switchover, on both hosts.
//!
//! The source, while the destination has the port in standby, delivers
//! frames for the VM to its port and sends a copy to the destination
//! ([`Switch::set_port_copy`]): the VM reads one of the two NICs, so
//! whichever host it runs on has its frames the moment it forwards.
//!
//! The destination starts the port from the source's pre-copy the moment
//! the VM runs there, before the source's last state arrives
//! ([`Switch::await_state`]). Until it does ([`Switch::merge_port`]), a
//! frame for the VM that the port's inbound policy refuses and that a
//! connection could admit — a reply on a connection opened at the source
//! after the pre-copy, under a stateful rule — waits in a small bounded
//! hold instead of being dropped, and is judged again when the state
//! comes or its wait ([`STATE_WAIT`]) ends.

use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::stats::{DropReason, SwitchoverCounters};
use dvs_proto::{VlanId, Vni};
use rustc_hash::FxHashSet;

use super::{port_policy, Egress, Output, PortNo, PortState, Switch, MAX_HELD_FRAME};
use crate::flow::Direction;
use crate::pipeline::mactable::Location;
use crate::policy::conntrack::ConnKey;
use crate::wire::FlowKey;
use crate::Error;

/// How long a frame waits for its port's state at most.
pub const STATE_WAIT: Duration = Duration::from_secs(1);
/// Frames waiting for their ports' state, at most (the whole switch).
pub const MAX_WAITING: usize = 64;

/// A frame for a VM that waits for its port's state.
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) no: PortNo,
    vlan: VlanId,
    tag: Option<u16>,
    frame: Vec<u8>,
    until: Duration,
}

/// A frame for port `no`'s VM (on `vlan`, to go out with `tag`) that the
/// port's policy refused for `reason`.
pub(super) struct Refused<'a> {
    pub no: PortNo,
    pub vlan: VlanId,
    pub tag: Option<u16>,
    pub frame: &'a [u8],
    pub key: &'a Option<FlowKey>,
    pub reason: DropReason,
}

/// A held frame the port's policy now admits: to be sent as `out` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub frame: Vec<u8>,
    pub out: Output,
}

impl Switch {
    /// Send a copy of every frame delivered to port `no` to the tunnel
    /// endpoint `to` as well (`None`: stop) — a migration's source while
    /// the destination may start.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn set_port_copy(&mut self, no: PortNo, to: Option<IpAddr>) -> Result<(), Error> {
        self.port_mut(no)?.copy_to = to;
        self.copy_any = self.ports.iter().flatten().any(|p| p.copy_to.is_some());
        Ok(())
    }

    /// Port `no` forwards from a pre-copy since `since`: the source's last
    /// state is to come ([`Switch::merge_port`]); frames only it could
    /// admit wait for it.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn await_state(&mut self, no: PortNo, since: Duration) -> Result<(), Error> {
        self.port_mut(no)?.awaiting = Some(since);
        Ok(())
    }

    /// Is port `no` waiting for its source's last state?
    pub fn port_awaiting(&self, no: PortNo) -> bool {
        self.ports
            .get(usize::from(no.0))
            .and_then(Option::as_ref)
            .is_some_and(|p| p.awaiting.is_some())
    }

    pub fn switchover_counters(&self) -> &SwitchoverCounters {
        &self.switchover
    }

    /// Take a migration source's last state into port `no`, which has
    /// forwarded since [`Switch::await_state`] from `base` (the pre-copy
    /// it started from): counters and rule hits add what the source
    /// counted after the pre-copy; connections, flow records, sticky and
    /// learned MACs join what is here (the fresher entry wins; a
    /// connection the source closed goes unless it lived on here); the
    /// policers keep their buckets. The frames that waited are judged:
    /// those admitted now are returned, to be sent.
    ///
    /// # Errors
    /// [`Error::UnknownPortNo`].
    pub fn merge_port(
        &mut self,
        no: PortNo,
        source: &PortState,
        base: &PortState,
        now: Duration,
    ) -> Result<Vec<Release>, Error> {
        let p = self.port_mut(no)?;
        let since = p.awaiting.take().unwrap_or(now);
        p.counters.add_growth(&base.counters, &source.counters);
        let lists = [
            (p.acl_in.as_mut(), &base.acl_in_hits, &source.acl_in_hits),
            (p.acl_out.as_mut(), &base.acl_out_hits, &source.acl_out_hits),
        ];
        for (acl, then, last) in lists {
            if let (Some(a), Some(then), Some(last)) = (acl, then, last) {
                a.add_hits_growth(then, last);
            }
        }
        if let Some(ct) = p.conntrack.as_mut() {
            let kept: FxHashSet<ConnKey> = source
                .conntrack
                .iter()
                .filter_map(|c| ConnKey::of(&c.first))
                .collect();
            let gone: Vec<ConnKey> = base
                .conntrack
                .iter()
                .filter_map(|c| ConnKey::of(&c.first))
                .filter(|k| !kept.contains(k))
                .collect();
            ct.merge(&source.conntrack, &gone, since, now);
        }
        if let Some(g) = p.guard.as_mut() {
            g.restore_sticky_macs(&source.sticky_macs);
        }
        super::restore_bindings(&mut p.snooped, &source.dhcp_bindings, now);
        if let Some((i, _)) = p.flow {
            self.monitors.restore(i, &source.flows, now);
        }
        for (v, m, age) in &source.learned_macs {
            if self.macs.lookup(now, *v, *m).is_none() {
                let seen = now.saturating_sub(Duration::from_millis(*age));
                self.macs.learn(seen, *v, *m, Location::Port(no));
            }
        }
        Ok(self.judge_waiting(now, |w| w.no == no))
    }

    /// The frames whose wait ended by `now`, judged on what their port
    /// knows: those admitted, to be sent.
    pub fn take_due(&mut self, now: Duration) -> Vec<Release> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        self.judge_waiting(now, |w| w.until <= now)
    }

    fn judge_waiting(&mut self, now: Duration, due: impl Fn(&Waiting) -> bool) -> Vec<Release> {
        let (ready, rest): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut self.waiting).into_iter().partition(due);
        self.waiting = rest;
        let mut out = Vec::new();
        for w in ready {
            let Some(Some(port)) = self.ports.get_mut(usize::from(w.no.0)) else {
                continue;
            };
            let mut key = None;
            match port_policy(port, Direction::ToVm, now, &w.frame, w.vlan, &mut key) {
                Ok(()) => {
                    self.switchover.admitted += 1;
                    let o = Output {
                        egress: Egress::Port(w.no),
                        tag: w.tag,
                    };
                    self.count_tx(now, std::slice::from_ref(&o), w.frame.len() as u64);
                    out.push(Release {
                        frame: w.frame,
                        out: o,
                    });
                }
                Err(reason) => {
                    self.switchover.refused += 1;
                    port.counters.tx_drops.add(reason);
                }
            }
        }
        out
    }

    /// Port `port` refused a frame (`r`): does it wait for the port's
    /// state instead? Only a frame of a connection, refused by the lists
    /// of a port that tracks connections and awaits its source's state,
    /// while the hold has room.
    pub(super) fn wait_for_state(
        waiting: &mut Vec<Waiting>,
        counters: &mut SwitchoverCounters,
        port: &super::Port,
        r: Refused,
        now: Duration,
    ) -> bool {
        let waits = r.reason == DropReason::AclDeny
            && port.awaiting.is_some()
            && port.conntrack.is_some()
            && r.frame.len() <= usize::from(MAX_HELD_FRAME)
            && r.key.as_ref().and_then(ConnKey::of).is_some();
        if !waits {
            return false;
        }
        if waiting.len() >= MAX_WAITING {
            counters.overflow += 1;
            return false;
        }
        counters.held += 1;
        waiting.push(Waiting {
            no: r.no,
            vlan: r.vlan,
            tag: r.tag,
            frame: r.frame.to_vec(),
            until: now + STATE_WAIT,
        });
        true
    }

    /// The copy of a frame for port `p` that goes to its migration's
    /// destination (`vni`: the VLAN's segment), unless it came from there.
    pub(super) fn copy_for(
        &mut self,
        p: PortNo,
        from: Option<IpAddr>,
        vni: Option<Vni>,
    ) -> Option<Output> {
        let to = self.ports.get(usize::from(p.0))?.as_ref()?.copy_to?;
        let vni = vni?;
        if from == Some(to) {
            return None;
        }
        self.switchover.relayed += 1;
        Some(Output {
            egress: Egress::Tunnel { dst: to, vni },
            tag: None,
        })
    }
}
