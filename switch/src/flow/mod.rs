//! Flow accounting: the datapath's flow table, sans-IO.
//!
//! A flow is keyed by port, direction, VLAN, IP addresses, protocol, L4
//! ports (ICMP: type·256+code in the destination port, as NetFlow does) and
//! ToS. Each record counts packets and L3 octets (IP total length), first
//! and last time, TCP flags. A record ends on its active timeout (exported
//! and counting on afresh), its inactive timeout, a FIN or RST, eviction
//! from a full table (the oldest goes, counted) or a flush of its port.
//! With 1-in-N sampling, only every Nth packet of a port is counted.

pub mod export;

pub use dvs_proto::stats::FlowCounters;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::NetflowMonitor;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Which way a packet crossed its port, seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Sent by the VM (the port's ingress into the switch).
    FromVm,
    /// Delivered to the VM.
    ToVm,
}

/// A flow's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowId {
    /// The port's chassis-wide number (NetFlow's interface index).
    pub port: u32,
    pub dir: Direction,
    pub vlan: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tos: u8,
}

/// Why a record was exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// No packet for the inactive timeout (IPFIX flowEndReason 1).
    Idle,
    /// Open for the active timeout; the flow goes on (2).
    Active,
    /// FIN or RST seen (3).
    EndOfFlow,
    /// Forced out: a full table or a flushed port (4/5).
    Forced,
}

impl EndReason {
    /// The IPFIX flowEndReason code (RFC 5102).
    pub fn code(self) -> u8 {
        match self {
            EndReason::Idle => 1,
            EndReason::Active => 2,
            EndReason::EndOfFlow => 3,
            EndReason::Forced => 4,
        }
    }
}

/// An exported record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub id: FlowId,
    pub packets: u64,
    pub octets: u64,
    pub first: Duration,
    pub last: Duration,
    pub tcp_flags: u8,
    pub end: EndReason,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    packets: u64,
    octets: u64,
    /// Times in ms of the table's clock (smaller than `Duration`s: a
    /// table may hold millions of records).
    first: u64,
    last: u64,
    tcp_flags: u8,
    /// Start of the current active-timeout interval.
    since: u64,
    /// Which timeout check belongs to this record.
    token: u32,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// An open record carried to another table (a port's migration); times are
/// ages at the moment of saving, so clocks need not agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFlow {
    pub id: FlowId,
    pub packets: u64,
    pub octets: u64,
    pub first_ago_ms: u64,
    pub last_ago_ms: u64,
    pub since_ago_ms: u64,
    pub tcp_flags: u8,
}

/// Timeouts, bound and sampling of a flow table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowConfig {
    pub active: Duration,
    pub inactive: Duration,
    pub max_flows: usize,
    /// Count 1 packet in `sampling` (1: all).
    pub sampling: u32,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            active: Duration::from_secs(60),
            inactive: Duration::from_secs(15),
            max_flows: 65_536,
            sampling: 1,
        }
    }
}

/// The flow table.
///
/// Timeouts are kept by a heap of checks: each open record has one entry,
/// due when the record could next time out (`min(last + inactive, since +
/// active)`); a due check ends the record or schedules the next one. A
/// timer pass handles at most [`EXPIRE_BUDGET`] checks, so that a table of
/// millions of records never stalls the switching thread for long. A full
/// table evicts the record whose check is due first — the one nearest its
/// timeout, which among equally busy flows is the oldest.
#[derive(Debug, Clone)]
pub struct FlowTable {
    cfg: FlowConfig,
    open: FxHashMap<FlowId, Open>,
    /// (due ms, record token, flow): the next timeout check of each record;
    /// entries whose token no longer matches are stale and skipped.
    checks: BinaryHeap<Reverse<(u64, u32, FlowId)>>,
    next_token: u32,
    seen: u64,
    counters: FlowCounters,
}

/// The most timeout checks one [`FlowTable::expire`] call runs.
pub const EXPIRE_BUDGET: usize = 1024;

impl FlowTable {
    pub fn new(cfg: FlowConfig) -> Self {
        FlowTable {
            cfg,
            open: FxHashMap::default(),
            checks: BinaryHeap::new(),
            next_token: 0,
            seen: 0,
            counters: FlowCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn counters(&self) -> &FlowCounters {
        &self.counters
    }

    /// When record `f` could next time out.
    fn due(&self, f: &Open) -> u64 {
        (f.last + ms(self.cfg.inactive)).min(f.since + ms(self.cfg.active))
    }

    /// Open a record for `id`, evicting when full.
    fn insert(&mut self, id: FlowId, f: Open, out: &mut Vec<FlowRecord>) -> &mut Open {
        if self.open.len() >= self.cfg.max_flows {
            self.evict(out);
        }
        self.counters.created += 1;
        self.next_token = self.next_token.wrapping_add(1);
        let f = Open {
            token: self.next_token,
            ..f
        };
        self.checks.push(Reverse((self.due(&f), f.token, id)));
        self.open.entry(id).or_insert(f)
    }

    /// Count `packets` packets of `octets` L3 bytes (a GSO frame counts as
    /// its segments) of flow `id` at `now`; records that end go to `out`.
    pub fn account(
        &mut self,
        now: Duration,
        id: FlowId,
        packets: u64,
        octets: u64,
        tcp_flags: u8,
        out: &mut Vec<FlowRecord>,
    ) {
        if self.cfg.sampling > 1 {
            self.seen += 1;
            if !self.seen.is_multiple_of(u64::from(self.cfg.sampling)) {
                self.counters.unsampled += packets;
                return;
            }
        }
        let t = ms(now);
        let f = match self.open.get_mut(&id) {
            Some(f) => f,
            None => self.insert(
                id,
                Open {
                    packets: 0,
                    octets: 0,
                    first: t,
                    last: t,
                    tcp_flags: 0,
                    since: t,
                    token: 0,
                },
                out,
            ),
        };
        f.packets += packets;
        f.octets += octets;
        f.last = t;
        f.tcp_flags |= tcp_flags;
        if id.proto == 6 && tcp_flags & 0x05 != 0 {
            // FIN or RST: the flow is over.
            let f = *f;
            self.open.remove(&id);
            self.emit(id, f, EndReason::EndOfFlow, out);
        }
    }

    /// Export what the timeouts end at `now`, running at most
    /// [`EXPIRE_BUDGET`] checks; returns whether due checks remain (call
    /// again soon).
    pub fn expire(&mut self, now: Duration, out: &mut Vec<FlowRecord>) -> bool {
        let t = ms(now);
        let (active, inactive) = (ms(self.cfg.active), ms(self.cfg.inactive));
        let mut budget = EXPIRE_BUDGET;
        while let Some(Reverse((due, token, id))) = self.checks.peek().copied() {
            if due > t {
                break;
            }
            if budget == 0 {
                return true;
            }
            budget -= 1;
            self.checks.pop();
            let Some(f) = self.open.get_mut(&id) else {
                continue;
            };
            if f.token != token {
                continue;
            }
            if t.saturating_sub(f.last) >= inactive {
                let f = *f;
                self.open.remove(&id);
                if f.packets > 0 {
                    self.emit(id, f, EndReason::Idle, out);
                }
                continue;
            }
            if t.saturating_sub(f.since) >= active {
                let part = *f;
                // The flow goes on: counting restarts.
                f.packets = 0;
                f.octets = 0;
                f.tcp_flags = 0;
                f.since = t;
                f.first = t;
                if part.packets > 0 {
                    self.emit(id, part, EndReason::Active, out);
                }
            }
            let Some(f) = self.open.get(&id) else {
                continue;
            };
            let next = self.due(f).max(t + 1);
            self.checks.push(Reverse((next, token, id)));
        }
        // Checks of records gone since (FIN, flush, eviction) leave with
        // their due time; when they pile up, all at once.
        if self.checks.len() > 2 * self.open.len() + 1024 {
            let open = &self.open;
            self.checks
                .retain(|Reverse((_, token, id))| open.get(id).is_some_and(|f| f.token == *token));
        }
        false
    }

    /// Change timeouts, bound and sampling; open records stay (a smaller
    /// bound evicts on the next new flow).
    pub fn set_config(&mut self, cfg: FlowConfig) {
        self.cfg = cfg;
    }

    /// Export and forget every open record (the datapath stops).
    pub fn flush_all(&mut self, out: &mut Vec<FlowRecord>) {
        let open = std::mem::take(&mut self.open);
        self.checks.clear();
        for (id, f) in open {
            self.emit(id, f, EndReason::Forced, out);
        }
    }

    /// The open records of `port` as of `now`, to continue them elsewhere
    /// ([`FlowTable::restore`]). With `take` they leave this table without
    /// being exported: the flow is counted once, where it continues.
    pub fn save_port(&mut self, port: u32, now: Duration, take: bool) -> Vec<SavedFlow> {
        let ids = self.ids_of(port);
        let mut saved = Vec::with_capacity(ids.len());
        for id in ids {
            let f = if take {
                self.open.remove(&id)
            } else {
                self.open.get(&id).copied()
            };
            if let Some(f) = f {
                let ago = |t: u64| ms(now).saturating_sub(t);
                saved.push(SavedFlow {
                    id,
                    packets: f.packets,
                    octets: f.octets,
                    first_ago_ms: ago(f.first),
                    last_ago_ms: ago(f.last),
                    since_ago_ms: ago(f.since),
                    tcp_flags: f.tcp_flags,
                });
            }
        }
        saved
    }

    /// Continue records saved by [`FlowTable::save_port`] at `now` on this
    /// table's clock; `port` replaces the saved port number (the same
    /// port ID everywhere, so normally equal). A record of an open flow
    /// adds to it.
    pub fn restore(&mut self, saved: &[SavedFlow], now: Duration, out: &mut Vec<FlowRecord>) {
        for s in saved {
            let at = |ago: u64| ms(now).saturating_sub(ago);
            let f = match self.open.get_mut(&s.id) {
                Some(f) => f,
                None => self.insert(
                    s.id,
                    Open {
                        packets: 0,
                        octets: 0,
                        first: at(s.first_ago_ms),
                        last: at(s.last_ago_ms),
                        tcp_flags: 0,
                        since: at(s.since_ago_ms),
                        token: 0,
                    },
                    out,
                ),
            };
            f.packets += s.packets;
            f.octets += s.octets;
            f.tcp_flags |= s.tcp_flags;
            f.first = f.first.min(at(s.first_ago_ms));
            f.last = f.last.max(at(s.last_ago_ms));
            f.since = f.since.min(at(s.since_ago_ms));
        }
    }

    /// Export and forget every record of `port` (it leaves the host).
    pub fn flush_port(&mut self, port: u32, out: &mut Vec<FlowRecord>) {
        for id in self.ids_of(port) {
            if let Some(f) = self.open.remove(&id) {
                self.emit(id, f, EndReason::Forced, out);
            }
        }
    }

    /// The flows of `port` open now.
    fn ids_of(&self, port: u32) -> Vec<FlowId> {
        self.open
            .keys()
            .filter(|k| k.port == port)
            .copied()
            .collect()
    }

    /// Force out the record whose timeout check is due first.
    fn evict(&mut self, out: &mut Vec<FlowRecord>) {
        while let Some(Reverse((_, token, id))) = self.checks.pop() {
            if self.open.get(&id).is_some_and(|f| f.token == token) {
                if let Some(f) = self.open.remove(&id) {
                    self.counters.evicted += 1;
                    self.emit(id, f, EndReason::Forced, out);
                }
                return;
            }
        }
    }

    fn emit(&mut self, id: FlowId, f: Open, end: EndReason, out: &mut Vec<FlowRecord>) {
        self.counters.exported += 1;
        out.push(FlowRecord {
            id,
            packets: f.packets,
            octets: f.octets,
            first: Duration::from_millis(f.first),
            last: Duration::from_millis(f.last),
            tcp_flags: f.tcp_flags,
            end,
        });
    }
}

/// A monitor's table and the records it ended, waiting for the exporter.
#[derive(Debug, Clone)]
pub struct MonitorTable {
    pub monitor: NetflowMonitor,
    pub table: FlowTable,
    pub pending: Vec<FlowRecord>,
}

/// The flow tables of a switch: one per monitor its ports take.
#[derive(Debug, Clone, Default)]
pub struct Monitors {
    tables: Vec<MonitorTable>,
}

impl Monitors {
    /// The table of `monitor` (found by name; its settings updated), made
    /// when new.
    pub fn bind(&mut self, monitor: &NetflowMonitor) -> usize {
        let cfg = FlowConfig {
            active: monitor.active_timeout,
            inactive: monitor.inactive_timeout,
            max_flows: monitor.max_flows,
            sampling: monitor.sampling,
        };
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| t.monitor.name == monitor.name)
        {
            let t = &mut self.tables[i];
            t.table.set_config(cfg);
            t.monitor = monitor.clone();
            return i;
        }
        self.tables.push(MonitorTable {
            monitor: monitor.clone(),
            table: FlowTable::new(cfg),
            pending: Vec::new(),
        });
        self.tables.len() - 1
    }

    /// Count packets of flow `id` in table `i`.
    #[inline]
    pub fn account(
        &mut self,
        i: usize,
        now: Duration,
        id: FlowId,
        packets: u64,
        octets: u64,
        tcp_flags: u8,
    ) {
        if let Some(t) = self.tables.get_mut(i) {
            t.table
                .account(now, id, packets, octets, tcp_flags, &mut t.pending);
        }
    }

    /// Run every table's timeouts; returns whether due checks remain.
    pub fn expire(&mut self, now: Duration) -> bool {
        let mut more = false;
        for t in &mut self.tables {
            more |= t.table.expire(now, &mut t.pending);
        }
        more
    }

    /// End the records of `port` in table `i`.
    pub fn flush_port(&mut self, i: usize, port: u32) {
        if let Some(t) = self.tables.get_mut(i) {
            t.table.flush_port(port, &mut t.pending);
        }
    }

    /// End every record of every table.
    pub fn flush_all(&mut self) {
        for t in &mut self.tables {
            t.table.flush_all(&mut t.pending);
        }
    }

    /// The open records of `port` in table `i` (see [`FlowTable::save_port`]).
    pub fn save_port(&mut self, i: usize, port: u32, now: Duration, take: bool) -> Vec<SavedFlow> {
        self.tables
            .get_mut(i)
            .map(|t| t.table.save_port(port, now, take))
            .unwrap_or_default()
    }

    /// Continue saved records in table `i`.
    pub fn restore(&mut self, i: usize, saved: &[SavedFlow], now: Duration) {
        if let Some(t) = self.tables.get_mut(i) {
            t.table.restore(saved, now, &mut t.pending);
        }
    }

    pub fn tables(&self) -> &[MonitorTable] {
        &self.tables
    }

    /// The tables, to take their pending records.
    pub fn tables_mut(&mut self) -> &mut [MonitorTable] {
        &mut self.tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn id(port: u32, src_port: u16, proto: u8) -> FlowId {
        FlowId {
            port,
            dir: Direction::FromVm,
            vlan: 10,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto,
            src_port,
            dst_port: 80,
            tos: 0,
        }
    }

    #[test]
    fn flows_end_on_fin_idle_and_active_timeouts() {
        let mut t = FlowTable::new(FlowConfig {
            active: 10 * S,
            inactive: 3 * S,
            ..FlowConfig::default()
        });
        let mut out = Vec::new();
        t.account(S, id(1, 1000, 6), 1, 60, 0x02, &mut out);
        t.account(2 * S, id(1, 1000, 6), 10, 15_000, 0x10, &mut out);
        t.account(2 * S, id(1, 1000, 6), 1, 52, 0x11, &mut out);
        assert_eq!(out.len(), 1);
        let r = out[0];
        assert_eq!(
            (r.packets, r.octets, r.end, r.tcp_flags),
            (12, 15_112, EndReason::EndOfFlow, 0x13)
        );
        assert_eq!((r.first, r.last), (S, 2 * S));
        out.clear();
        // UDP: idle after 3 s.
        t.account(S, id(1, 53, 17), 1, 100, 0, &mut out);
        t.expire(3 * S, &mut out);
        assert!(out.is_empty());
        t.expire(4 * S, &mut out);
        assert_eq!((out.len(), out[0].end), (1, EndReason::Idle));
        out.clear();
        // A long flow: exported every active timeout, the parts add up.
        let mut sent = 0;
        for s in 0..35u64 {
            t.account(S * s as u32, id(2, 7, 17), 1, 1000, 0, &mut out);
            sent += 1000;
            t.expire(S * s as u32, &mut out);
        }
        t.expire(100 * S, &mut out);
        assert!(out.len() >= 4, "{out:?}");
        assert_eq!(out.iter().map(|r| r.octets).sum::<u64>(), sent);
        assert!(out.iter().any(|r| r.end == EndReason::Active));
    }

    #[test]
    fn a_full_table_evicts_the_oldest_and_counts_it() {
        let mut t = FlowTable::new(FlowConfig {
            max_flows: 2,
            ..FlowConfig::default()
        });
        let mut out = Vec::new();
        for p in 0..3 {
            t.account(S * p, id(1, p as u16, 17), 1, 100, 0, &mut out);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(
            (out.len(), out[0].id.src_port, out[0].end),
            (1, 0, EndReason::Forced)
        );
        assert_eq!(t.counters().evicted, 1);
    }

    #[test]
    fn sampling_counts_one_in_n_and_flush_exports_a_port() {
        let mut t = FlowTable::new(FlowConfig {
            sampling: 10,
            ..FlowConfig::default()
        });
        let mut out = Vec::new();
        for _ in 0..100 {
            t.account(S, id(3, 1, 17), 1, 100, 0, &mut out);
        }
        t.flush_port(3, &mut out);
        assert_eq!((out.len(), out[0].packets), (1, 10));
        assert_eq!(t.counters().unsampled, 90);
        assert!(t.is_empty());
    }

    #[test]
    fn a_taken_port_continues_elsewhere_and_is_counted_once() {
        let mut a = FlowTable::new(FlowConfig::default());
        let mut b = FlowTable::new(FlowConfig::default());
        let mut out = Vec::new();
        a.account(10 * S, id(4, 1, 17), 5, 500, 0, &mut out);
        a.account(10 * S, id(5, 1, 17), 1, 100, 0, &mut out);
        let saved = a.save_port(4, 12 * S, true);
        assert_eq!((saved.len(), a.len()), (1, 1));
        // b's clock reads 100 s when a's reads 12 s.
        b.restore(&saved, 100 * S, &mut out);
        b.account(101 * S, id(4, 1, 17), 2, 200, 0, &mut out);
        a.flush_all(&mut out);
        b.flush_all(&mut out);
        let port4: Vec<_> = out.iter().filter(|r| r.id.port == 4).collect();
        assert_eq!(port4.len(), 1);
        assert_eq!((port4[0].packets, port4[0].octets), (7, 700));
        assert_eq!((port4[0].first, port4[0].last), (98 * S, 101 * S));
    }

    #[test]
    fn a_big_expiry_is_worked_off_in_slices() {
        let mut t = FlowTable::new(FlowConfig {
            max_flows: 1 << 20,
            ..FlowConfig::default()
        });
        let mut out = Vec::new();
        let n = 3 * EXPIRE_BUDGET as u32 + 5;
        for i in 0..n {
            let mut f = id(1, i as u16, 17);
            f.port = i;
            t.account(S, f, 1, 100, 0, &mut out);
        }
        let mut calls = 0;
        while t.expire(100 * S, &mut out) {
            calls += 1;
            assert!(out.len() <= calls * EXPIRE_BUDGET);
        }
        assert_eq!(calls, 3);
        assert_eq!(out.len(), n as usize);
        assert!(t.is_empty());
    }

    #[test]
    fn checks_of_ended_flows_do_not_pile_up() {
        let mut t = FlowTable::new(FlowConfig {
            inactive: S,
            active: 1000 * S,
            ..FlowConfig::default()
        });
        let mut out = Vec::new();
        for i in 0..20_000u32 {
            let now = Duration::from_millis(u64::from(i) * 10);
            t.account(now, id(1, 1, 17), 1, 100, 0, &mut out);
            t.account(now, id(2, (i % 60_000) as u16, 17), 1, 100, 0, &mut out);
            t.expire(now, &mut out);
        }
        assert!(t.checks.len() <= 2 * t.len() + 1024, "{}", t.checks.len());
    }
}
