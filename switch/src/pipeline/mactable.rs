//! The MAC table: where each (VLAN, MAC) lives — a local port or a remote host.
//!
//! Learned entries age out; static entries (set by configuration or, later, the
//! controller) never age and are never overwritten by learning. The table has a
//! size bound: when full, new addresses are not learned (their frames are
//! flooded) and the refusal is counted.
//!
//! The underlay is not trusted to be polite: what one tunnel endpoint may
//! teach the table is bounded ([`MacTableConfig::max_per_peer`]), so that a
//! flood of random source MACs from one host cannot evict every other's
//! entries; and an entry that moves more than [`MOVE_LIMIT`] times within
//! [`MOVE_WINDOW`] (a loop, or two senders fighting over one MAC) stays
//! where it is for [`MOVE_HOLD`] — further moves are refused and counted —
//! and is reported once as a [`Flap`], as NX-OS reports MAC moves.

use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::{MacAddr, VlanId};
use rustc_hash::FxHashMap;

use crate::pipeline::PortNo;
use dvs_proto::stats::MacCounters;

/// Where a MAC address lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Port(PortNo),
    /// Behind the VXLAN tunnel endpoint at this address.
    Remote(IpAddr),
}

/// One entry as shown in views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacEntry {
    pub vlan: VlanId,
    pub mac: MacAddr,
    pub location: Location,
    pub is_static: bool,
    /// Time since the entry was last refreshed (zero for static entries).
    pub age: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    vlan: VlanId,
    mac: MacAddr,
    location: Location,
    last_seen: Duration,
    is_static: bool,
    /// A static entry's one other place: the destination of its VM's
    /// migration. The entry goes there when the VM is heard from there
    /// (its announcement, flooded once its port forwards), ahead of the
    /// controller's update.
    alternate: Option<Location>,
    /// Moves since `window` began.
    moves: u8,
    window: Duration,
    /// Moves are refused until then (the entry flapped).
    held_until: Duration,
}

/// Moves of one entry within [`MOVE_WINDOW`] beyond which it is held.
pub const MOVE_LIMIT: u8 = 4;
/// The window [`MOVE_LIMIT`] counts moves in.
pub const MOVE_WINDOW: Duration = Duration::from_secs(2);
/// How long a flapping entry stays where it is.
pub const MOVE_HOLD: Duration = Duration::from_secs(10);
/// Flaps kept for [`MacTable::take_flaps`] between two takes.
const MAX_PENDING_FLAPS: usize = 64;

/// An entry that began to flap: it moved more than [`MOVE_LIMIT`] times
/// within [`MOVE_WINDOW`]; it stays at `at` for [`MOVE_HOLD`] and `refused`
/// is where it was seen next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flap {
    pub vlan: VlanId,
    pub mac: MacAddr,
    pub at: Location,
    pub refused: Location,
}

/// Size and aging of a MAC table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacTableConfig {
    pub max_entries: usize,
    pub aging: Duration,
    /// The most entries one tunnel endpoint may have learned.
    pub max_per_peer: usize,
}

impl Default for MacTableConfig {
    fn default() -> Self {
        Self {
            max_entries: 16_384,
            aging: Duration::from_secs(300),
            max_per_peer: 4_096,
        }
    }
}

/// The per-VLAN MAC table.
#[derive(Debug, Clone)]
pub struct MacTable {
    cfg: MacTableConfig,
    slots: FxHashMap<u64, Slot>,
    /// Learned entries behind each tunnel endpoint.
    per_peer: FxHashMap<IpAddr, usize>,
    flaps: Vec<Flap>,
    counters: MacCounters,
}

/// Whether `location` is a tunnel endpoint that has taught `max` entries.
fn at_bound(per_peer: &FxHashMap<IpAddr, usize>, max: usize, location: Location) -> bool {
    match location {
        Location::Remote(ip) => per_peer.get(&ip).copied().unwrap_or(0) >= max,
        Location::Port(_) => false,
    }
}

fn key(vlan: VlanId, mac: MacAddr) -> u64 {
    (u64::from(vlan.get()) << 48) | mac.to_u64()
}

impl MacTable {
    pub fn new(cfg: MacTableConfig) -> Self {
        Self {
            cfg,
            slots: FxHashMap::default(),
            per_peer: FxHashMap::default(),
            flaps: Vec::new(),
            counters: MacCounters::default(),
        }
    }

    /// Entries that began to flap since the last take.
    pub fn take_flaps(&mut self) -> Vec<Flap> {
        std::mem::take(&mut self.flaps)
    }

    /// Learning refused because `mac` belongs to a local port (counted).
    pub fn refuse_owned(&mut self) {
        self.counters.owned_refused += 1;
    }

    fn peer_count(&mut self, location: Location, up: bool) {
        if let Location::Remote(ip) = location {
            let n = self.per_peer.entry(ip).or_default();
            if up {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_peer.remove(&ip);
                }
            }
        }
    }

    pub fn config(&self) -> MacTableConfig {
        self.cfg
    }

    pub fn counters(&self) -> &MacCounters {
        &self.counters
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The common case of learning, alone: `mac` on `vlan` is already at
    /// `location` and is refreshed (returns false when it is not there).
    #[inline]
    pub fn refresh(
        &mut self,
        now: Duration,
        vlan: VlanId,
        mac: MacAddr,
        location: Location,
    ) -> bool {
        match self.slots.get_mut(&key(vlan, mac)) {
            Some(s) if !s.is_static && s.location == location => {
                s.last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// Learn that `mac` on `vlan` was seen at `location` at `now`.
    pub fn learn(&mut self, now: Duration, vlan: VlanId, mac: MacAddr, location: Location) {
        let full = self.slots.len() >= self.cfg.max_entries;
        let Some(s) = self.slots.get_mut(&key(vlan, mac)) else {
            if full {
                self.counters.table_full += 1;
            } else if at_bound(&self.per_peer, self.cfg.max_per_peer, location) {
                self.counters.peer_full += 1;
            } else {
                self.slots.insert(
                    key(vlan, mac),
                    Slot {
                        vlan,
                        mac,
                        location,
                        last_seen: now,
                        is_static: false,
                        alternate: None,
                        moves: 0,
                        window: now,
                        held_until: Duration::ZERO,
                    },
                );
                self.peer_count(location, true);
                self.counters.learned += 1;
            }
            return;
        };
        if s.is_static {
            if s.alternate == Some(location) {
                s.location = location;
                s.alternate = None;
                self.counters.announced_moves += 1;
            } else if s.location != location {
                self.counters.static_conflicts += 1;
            }
            return;
        }
        if s.location == location {
            s.last_seen = now;
            return;
        }
        // An aged entry is a new one: it may go anywhere.
        let aged = now.saturating_sub(s.last_seen) >= self.cfg.aging;
        if !aged && now < s.held_until {
            self.counters.move_held += 1;
            return;
        }
        if at_bound(&self.per_peer, self.cfg.max_per_peer, location) {
            self.counters.peer_full += 1;
            return;
        }
        if aged || now.saturating_sub(s.window) >= MOVE_WINDOW {
            s.moves = 0;
            s.window = now;
        }
        if s.moves >= MOVE_LIMIT {
            s.held_until = now + MOVE_HOLD;
            s.moves = 0;
            self.counters.flaps += 1;
            self.counters.move_held += 1;
            if self.flaps.len() < MAX_PENDING_FLAPS {
                self.flaps.push(Flap {
                    vlan,
                    mac,
                    at: s.location,
                    refused: location,
                });
            }
            return;
        }
        s.moves += 1;
        let from = s.location;
        s.location = location;
        s.last_seen = now;
        self.counters.moves += 1;
        self.peer_count(from, false);
        self.peer_count(location, true);
    }

    /// Where `mac` on `vlan` is, if known and not aged out at `now`.
    #[inline]
    pub fn lookup(&self, now: Duration, vlan: VlanId, mac: MacAddr) -> Option<Location> {
        let s = self.slots.get(&key(vlan, mac))?;
        if s.is_static || now.saturating_sub(s.last_seen) < self.cfg.aging {
            Some(s.location)
        } else {
            None
        }
    }

    /// Place `mac` on `vlan` at `location` for good (replaces any entry; static
    /// entries do not count against the learning bound).
    pub fn set_static(&mut self, vlan: VlanId, mac: MacAddr, location: Location) {
        self.set_static_moving(vlan, mac, location, None);
    }

    /// [`MacTable::set_static`], with the one other place the entry may go
    /// when `mac` is heard from there (`alternate`: its VM's migration's
    /// destination; nowhere else).
    pub fn set_static_moving(
        &mut self,
        vlan: VlanId,
        mac: MacAddr,
        location: Location,
        alternate: Option<Location>,
    ) {
        let old = self.slots.insert(
            key(vlan, mac),
            Slot {
                vlan,
                mac,
                location,
                last_seen: Duration::ZERO,
                is_static: true,
                alternate,
                moves: 0,
                window: Duration::ZERO,
                held_until: Duration::ZERO,
            },
        );
        if let Some(o) = old.filter(|o| !o.is_static) {
            self.peer_count(o.location, false);
        }
    }

    /// Remove the entry of `mac` on `vlan`, static or learned.
    pub fn remove(&mut self, vlan: VlanId, mac: MacAddr) -> bool {
        match self.slots.remove(&key(vlan, mac)) {
            Some(o) => {
                if !o.is_static {
                    self.peer_count(o.location, false);
                }
                true
            }
            None => false,
        }
    }

    /// Forget every learned entry pointing at `port` (when a port goes away or
    /// changes VLANs). Static entries are removed too: they name a port that no
    /// longer means the same thing.
    pub fn flush_port(&mut self, port: PortNo) {
        self.slots.retain(|_, s| s.location != Location::Port(port));
    }

    /// Forget the learned entries `drop` picks (by MAC and location).
    pub fn forget_learned(&mut self, drop: impl Fn(MacAddr, Location) -> bool) {
        self.forget(|s| !s.is_static && drop(s.mac, s.location));
    }

    /// Remove the entries `gone` picks; what tunnel endpoints taught is
    /// counted down with them. Returns how many went.
    fn forget(&mut self, gone: impl Fn(&Slot) -> bool) -> usize {
        let before = self.slots.len();
        let per_peer = &mut self.per_peer;
        self.slots.retain(|_, s| {
            let g = gone(s);
            if let (true, false, Location::Remote(ip)) = (g, s.is_static, s.location) {
                if let Some(n) = per_peer.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                }
            }
            !g
        });
        self.per_peer.retain(|_, n| *n > 0);
        before - self.slots.len()
    }

    /// Remove learned entries not refreshed within the aging time.
    pub fn age(&mut self, now: Duration) {
        let aging = self.cfg.aging;
        let aged = self.forget(|s| !s.is_static && now.saturating_sub(s.last_seen) >= aging);
        self.counters.aged += aged as u64;
    }

    /// The MACs learned on `port` (not static, not aged out), with their
    /// age: what a port carries when it moves (a trunk's VMs behind it).
    pub fn learned_on(&self, port: PortNo, now: Duration) -> Vec<(VlanId, MacAddr, Duration)> {
        let mut v: Vec<_> = self
            .slots
            .values()
            .filter(|s| !s.is_static && s.location == Location::Port(port))
            .map(|s| (s.vlan, s.mac, now.saturating_sub(s.last_seen)))
            .filter(|(_, _, age)| *age < self.cfg.aging)
            .collect();
        v.sort_by_key(|(vl, m, _)| (*vl, *m));
        v
    }

    /// Every entry, for views (sorted by VLAN then MAC).
    pub fn entries(&self, now: Duration) -> Vec<MacEntry> {
        let mut v: Vec<MacEntry> = self
            .slots
            .values()
            .map(|s| MacEntry {
                vlan: s.vlan,
                mac: s.mac,
                location: s.location,
                is_static: s.is_static,
                age: if s.is_static {
                    Duration::ZERO
                } else {
                    now.saturating_sub(s.last_seen)
                },
            })
            .collect();
        v.sort_by_key(|e| (e.vlan, e.mac));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> VlanId {
        VlanId::new(n).unwrap()
    }
    fn m(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn learns_moves_and_ages() {
        let mut t = MacTable::new(MacTableConfig {
            max_entries: 10,
            aging: 10 * S,
            ..MacTableConfig::default()
        });
        t.learn(S, v(10), m(1), Location::Port(PortNo(1)));
        assert_eq!(t.lookup(S, v(10), m(1)), Some(Location::Port(PortNo(1))));
        assert_eq!(t.lookup(S, v(20), m(1)), None, "tables are per VLAN");
        t.learn(2 * S, v(10), m(1), Location::Port(PortNo(2)));
        assert_eq!(
            t.lookup(2 * S, v(10), m(1)),
            Some(Location::Port(PortNo(2)))
        );
        assert_eq!(t.counters().moves, 1);
        assert_eq!(
            t.lookup(12 * S, v(10), m(1)),
            None,
            "aged entries are not used"
        );
        t.age(12 * S);
        assert!(t.is_empty());
        assert_eq!(t.counters().aged, 1);
    }

    #[test]
    fn bound_is_kept_and_counted() {
        let mut t = MacTable::new(MacTableConfig {
            max_entries: 2,
            aging: 10 * S,
            ..MacTableConfig::default()
        });
        for i in 0..5 {
            t.learn(S, v(1), m(i), Location::Port(PortNo(1)));
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.counters().table_full, 3);
    }

    #[test]
    fn static_entries_win_over_learning() {
        let mut t = MacTable::new(MacTableConfig::default());
        let remote = Location::Remote("10.0.0.2".parse().unwrap());
        t.set_static(v(1), m(1), remote);
        t.learn(S, v(1), m(1), Location::Port(PortNo(3)));
        assert_eq!(t.lookup(S, v(1), m(1)), Some(remote));
        assert_eq!(t.counters().static_conflicts, 1);
        t.age(Duration::from_secs(100_000));
        assert_eq!(
            t.lookup(Duration::from_secs(100_000), v(1), m(1)),
            Some(remote)
        );
        let e = t.entries(S);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].vlan, e[0].mac, e[0].is_static), (v(1), m(1), true));
    }

    #[test]
    fn a_migrating_vms_entry_moves_only_to_its_destination() {
        let mut t = MacTable::new(MacTableConfig::default());
        let (src, dst) = (
            Location::Remote("10.0.0.2".parse().unwrap()),
            Location::Remote("10.0.0.3".parse().unwrap()),
        );
        t.set_static_moving(v(1), m(1), src, Some(dst));
        // Heard from anywhere else: it stays.
        t.learn(S, v(1), m(1), Location::Remote("10.0.0.9".parse().unwrap()));
        t.learn(S, v(1), m(1), Location::Port(PortNo(3)));
        assert_eq!(t.lookup(S, v(1), m(1)), Some(src));
        assert_eq!(t.counters().static_conflicts, 2);
        // Heard from its destination: there, once; still static.
        t.learn(S, v(1), m(1), dst);
        assert_eq!(t.lookup(S, v(1), m(1)), Some(dst));
        assert_eq!(t.counters().announced_moves, 1);
        t.learn(S, v(1), m(1), src);
        assert_eq!(
            t.lookup(S, v(1), m(1)),
            Some(dst),
            "no way back but the controller's"
        );
        assert!(t.entries(S)[0].is_static);
    }

    #[test]
    fn one_peer_cannot_fill_the_table() {
        let mut t = MacTable::new(MacTableConfig {
            max_entries: 100,
            max_per_peer: 3,
            ..MacTableConfig::default()
        });
        let (a, b) = (
            Location::Remote("10.0.0.2".parse().unwrap()),
            Location::Remote("10.0.0.3".parse().unwrap()),
        );
        for i in 0..10 {
            t.learn(S, v(1), m(i), a);
        }
        assert_eq!((t.len(), t.counters().peer_full), (3, 7));
        // Another peer and local ports still learn.
        t.learn(S, v(1), m(50), b);
        t.learn(S, v(1), m(51), Location::Port(PortNo(1)));
        assert_eq!(t.len(), 5);
        // A move to the full peer is refused; a move away frees a place.
        t.learn(2 * S, v(1), m(50), a);
        assert_eq!(t.lookup(2 * S, v(1), m(50)), Some(b));
        t.learn(3 * S, v(1), m(0), b);
        t.learn(3 * S, v(1), m(60), a);
        assert_eq!(t.lookup(3 * S, v(1), m(60)), Some(a));
        // Aging and removal give places back.
        t.remove(v(1), m(60));
        t.learn(4 * S, v(1), m(61), a);
        assert_eq!(t.lookup(4 * S, v(1), m(61)), Some(a));
        t.age(Duration::from_secs(1000));
        assert!(t.is_empty());
        for i in 0..3 {
            t.learn(Duration::from_secs(1000), v(1), m(100 + i), a);
        }
        assert_eq!(t.len(), 3, "aged entries no longer count against the peer");
    }

    #[test]
    fn a_flapping_entry_is_held_and_reported_once() {
        let mut t = MacTable::new(MacTableConfig::default());
        let (a, b) = (Location::Port(PortNo(1)), Location::Port(PortNo(2)));
        let ms = Duration::from_millis(1);
        t.learn(S, v(1), m(1), a);
        // A migration's move, and its abort, are moves like any other.
        for k in 0..u32::from(MOVE_LIMIT) {
            let to = if k % 2 == 0 { b } else { a };
            t.learn(S + 10 * k * ms, v(1), m(1), to);
            assert_eq!(t.lookup(S + 10 * k * ms, v(1), m(1)), Some(to));
        }
        assert!(t.take_flaps().is_empty());
        // The next move within the window is refused and reported.
        t.learn(S + 100 * ms, v(1), m(1), b);
        assert_eq!(t.lookup(S + 100 * ms, v(1), m(1)), Some(a));
        assert_eq!(
            t.take_flaps(),
            vec![Flap {
                vlan: v(1),
                mac: m(1),
                at: a,
                refused: b
            }]
        );
        t.learn(S + 200 * ms, v(1), m(1), b);
        assert!(t.take_flaps().is_empty(), "reported once");
        assert_eq!(
            (
                t.counters().flaps,
                t.counters().move_held,
                t.counters().moves
            ),
            (1, 2, u64::from(MOVE_LIMIT))
        );
        // The hold ends; moves spaced out are never held.
        let later = S + 100 * ms + MOVE_HOLD;
        t.learn(later, v(1), m(1), b);
        assert_eq!(t.lookup(later, v(1), m(1)), Some(b));
        for k in 1..20 {
            let to = if k % 2 == 0 { b } else { a };
            t.learn(later + MOVE_WINDOW * k, v(1), m(1), to);
            assert_eq!(t.lookup(later + MOVE_WINDOW * k, v(1), m(1)), Some(to));
        }
    }
}
