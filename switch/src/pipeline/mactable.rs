//! The MAC table: where each (VLAN, MAC) lives — a local port or a remote host.
//!
//! Learned entries age out; static entries (set by configuration or, later, the
//! controller) never age and are never overwritten by learning. The table has a
//! size bound: when full, new addresses are not learned (their frames are
//! flooded) and the refusal is counted.

use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::{MacAddr, VlanId};
use rustc_hash::FxHashMap;

use crate::pipeline::counters::MacCounters;
use crate::pipeline::PortNo;

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
}

/// Size and aging of a MAC table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacTableConfig {
    pub max_entries: usize,
    pub aging: Duration,
}

impl Default for MacTableConfig {
    fn default() -> Self {
        Self {
            max_entries: 16_384,
            aging: Duration::from_secs(300),
        }
    }
}

/// The per-VLAN MAC table.
#[derive(Debug, Clone)]
pub struct MacTable {
    cfg: MacTableConfig,
    slots: FxHashMap<u64, Slot>,
    counters: MacCounters,
}

fn key(vlan: VlanId, mac: MacAddr) -> u64 {
    (u64::from(vlan.get()) << 48) | mac.to_u64()
}

impl MacTable {
    pub fn new(cfg: MacTableConfig) -> Self {
        Self {
            cfg,
            slots: FxHashMap::default(),
            counters: MacCounters::default(),
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

    /// Learn that `mac` on `vlan` was seen at `location` at `now`.
    pub fn learn(&mut self, now: Duration, vlan: VlanId, mac: MacAddr, location: Location) {
        let full = self.slots.len() >= self.cfg.max_entries;
        match self.slots.get_mut(&key(vlan, mac)) {
            Some(s) if s.is_static => {
                if s.location != location {
                    self.counters.static_conflicts += 1;
                }
            }
            Some(s) => {
                if s.location != location {
                    s.location = location;
                    self.counters.moves += 1;
                }
                s.last_seen = now;
            }
            None if full => self.counters.table_full += 1,
            None => {
                self.slots.insert(
                    key(vlan, mac),
                    Slot {
                        vlan,
                        mac,
                        location,
                        last_seen: now,
                        is_static: false,
                    },
                );
                self.counters.learned += 1;
            }
        }
    }

    /// Where `mac` on `vlan` is, if known and not aged out at `now`.
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
        self.slots.insert(
            key(vlan, mac),
            Slot {
                vlan,
                mac,
                location,
                last_seen: Duration::ZERO,
                is_static: true,
            },
        );
    }

    /// Remove the entry of `mac` on `vlan`, static or learned.
    pub fn remove(&mut self, vlan: VlanId, mac: MacAddr) -> bool {
        self.slots.remove(&key(vlan, mac)).is_some()
    }

    /// Forget every learned entry pointing at `port` (when a port goes away or
    /// changes VLANs). Static entries are removed too: they name a port that no
    /// longer means the same thing.
    pub fn flush_port(&mut self, port: PortNo) {
        self.slots.retain(|_, s| s.location != Location::Port(port));
    }

    /// Remove learned entries not refreshed within the aging time.
    pub fn age(&mut self, now: Duration) {
        let aging = self.cfg.aging;
        let before = self.slots.len();
        self.slots
            .retain(|_, s| s.is_static || now.saturating_sub(s.last_seen) < aging);
        self.counters.aged += (before - self.slots.len()) as u64;
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
}
