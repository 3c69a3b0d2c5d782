//! Connection tracking for stateful access rules, one table per port.
//!
//! A packet permitted by a `stateful: true` rule commits its connection;
//! afterwards packets of that connection — in either direction — pass
//! without meeting the lists again, until the connection ends or times out.
//! A new connection the other way still meets the rules: a reply must match
//! a tracked connection's tuple reversed.
//!
//! TCP entries follow the handshake and teardown loosely (as Linux does by
//! default): SYN sent → established on a reply → closing on FIN → closed on
//! RST or FINs both ways, each state with its own timeout. UDP and other
//! protocols are new until the first reply, then replied. ICMP echo replies
//! match their request by addresses.
//!
//! The table is bounded: when full, expired entries are swept; if none, the
//! new connection is not tracked and `table_full` counts it — its packets
//! still obey the rules, so exhaustion never lets traffic past a deny.
//!
//! Sans-IO: time comes in as `now`; nothing here reads a clock.

pub use dvs_proto::stats::ConnCounters;
use std::net::IpAddr;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::wire::FlowKey;

/// A connection's identity, oriented from the packet that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl ConnKey {
    /// The key of an IP packet; ICMP echoes are keyed by their identifier
    /// (so that a reply meets its request). `None` for non-IP frames and
    /// ICMP messages other than echoes.
    pub fn of(k: &FlowKey) -> Option<Self> {
        let (proto, src, dst) = (k.proto?, k.src_ip?, k.dst_ip?);
        let (src_port, dst_port) = match proto {
            1 | 58 => {
                icmp_echo(k)?;
                (k.icmp_id, 0)
            }
            _ => (k.src_port, k.dst_port),
        };
        Some(ConnKey {
            proto,
            src,
            dst,
            src_port,
            dst_port,
        })
    }

    /// The tuple as the other side sends it (ICMP echoes keep their
    /// identifier).
    pub fn reversed(&self) -> Self {
        if matches!(self.proto, 1 | 58) {
            return ConnKey {
                src: self.dst,
                dst: self.src,
                ..*self
            };
        }
        ConnKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// `Some(true)` for an echo request, `Some(false)` for an echo reply, `None`
/// for any other ICMP message.
fn icmp_echo(k: &FlowKey) -> Option<bool> {
    match (k.proto, k.src_port) {
        (Some(1), 8) | (Some(58), 128) => Some(true),
        (Some(1), 0) | (Some(58), 129) => Some(false),
        _ => None,
    }
}

/// Which way a connection was opened, seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The VM opened it (permitted by a stateful outbound rule).
    FromVm,
    /// It was opened toward the VM (a stateful inbound rule).
    ToVm,
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// TCP: only the opener has spoken (SYN).
    SynSent,
    /// TCP: both sides have spoken.
    Established,
    /// TCP: a FIN was seen.
    Closing,
    /// TCP: RST, or FINs both ways.
    Closed,
    /// Not TCP, no reply yet.
    New,
    /// Not TCP, replied.
    Replied,
}

/// Timeouts per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub tcp_closed: Duration,
    pub other_new: Duration,
    pub other_replied: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: Duration::from_secs(30),
            tcp_established: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(10),
            other_new: Duration::from_secs(30),
            other_replied: Duration::from_secs(180),
        }
    }
}

impl Timeouts {
    fn of(&self, s: ConnState) -> Duration {
        match s {
            ConnState::SynSent => self.tcp_syn_sent,
            ConnState::Established => self.tcp_established,
            ConnState::Closing => self.tcp_closing,
            ConnState::Closed => self.tcp_closed,
            ConnState::New => self.other_new,
            ConnState::Replied => self.other_replied,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    origin: Origin,
    state: ConnState,
    last_seen: Duration,
    /// FIN seen from the opener / from the replier.
    fin: (bool, bool),
    /// The first packet, for re-checking the rules after a policy change.
    first: FlowKey,
}

/// One port's connection table.
#[derive(Debug, Clone)]
pub struct ConnTrack {
    map: FxHashMap<ConnKey, Entry>,
    max: usize,
    timeouts: Timeouts,
    counters: ConnCounters,
}

/// A connection as saved: enough to carry it to another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedConn {
    pub origin: Origin,
    pub state: ConnState,
    /// Time since its last packet (clocks differ between hosts).
    pub idle: Duration,
    pub fin: (bool, bool),
    pub first: FlowKey,
}

/// A tracked connection, as views and snapshots show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnRecord {
    pub key: String,
    pub origin: Origin,
    pub state: ConnState,
    /// Seconds since the last packet.
    pub idle_s: u64,
}

/// The default bound of a port's table.
pub const DEFAULT_MAX: usize = 65_536;

impl ConnTrack {
    pub fn new(max: usize, timeouts: Timeouts) -> Self {
        ConnTrack {
            map: FxHashMap::default(),
            max,
            timeouts,
            counters: ConnCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn counters(&self) -> &ConnCounters {
        &self.counters
    }

    /// If `k` belongs to a live tracked connection, account the packet
    /// (state, last seen) and return true: it passes.
    pub fn track(&mut self, now: Duration, k: &FlowKey) -> bool {
        let Some(key) = ConnKey::of(k) else {
            return false;
        };
        let timeouts = self.timeouts;
        let (entry, reply) = match self.map.get_mut(&key) {
            Some(e) => (e, false),
            None => match self.map.get_mut(&key.reversed()) {
                Some(e) => (e, true),
                None => return false,
            },
        };
        if now.saturating_sub(entry.last_seen) >= timeouts.of(entry.state) {
            return false;
        }
        // An echo request only from the opener, a reply only from the other side.
        if matches!(key.proto, 1 | 58) && icmp_echo(k) != Some(!reply) {
            return false;
        }
        entry.last_seen = now;
        entry.state = next_state(entry, reply, key.proto, k.tcp_flags);
        true
    }

    /// Commit the connection of `k`, opened in direction `origin`.
    pub fn commit(&mut self, now: Duration, k: &FlowKey, origin: Origin) {
        let Some(key) = ConnKey::of(k) else { return };
        if matches!(key.proto, 1 | 58) && icmp_echo(k) != Some(true) {
            return;
        }
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            self.expire(now);
            if self.map.len() >= self.max {
                self.counters.table_full += 1;
                return;
            }
        }
        let state = if key.proto == 6 {
            if k.tcp_flags & 0x04 != 0 {
                ConnState::Closed
            } else {
                ConnState::SynSent
            }
        } else {
            ConnState::New
        };
        self.map.insert(
            key,
            Entry {
                origin,
                state,
                last_seen: now,
                fin: (k.tcp_flags & 0x01 != 0, false),
                first: *k,
            },
        );
        self.counters.created += 1;
    }

    /// Every live connection, to carry the table elsewhere.
    pub fn save(&self, now: Duration) -> Vec<SavedConn> {
        self.map
            .values()
            .map(|e| SavedConn {
                origin: e.origin,
                state: e.state,
                idle: now.saturating_sub(e.last_seen),
                fin: e.fin,
                first: e.first,
            })
            .collect()
    }

    /// Add saved connections (up to the table's bound, counted when not)
    /// as of `now` on this host's clock.
    pub fn restore(&mut self, saved: &[SavedConn], now: Duration) {
        for c in saved {
            let Some(key) = ConnKey::of(&c.first) else {
                continue;
            };
            if self.map.len() >= self.max && !self.map.contains_key(&key) {
                self.counters.table_full += 1;
                continue;
            }
            self.map.insert(
                key,
                Entry {
                    origin: c.origin,
                    state: c.state,
                    last_seen: now.saturating_sub(c.idle),
                    fin: c.fin,
                    first: c.first,
                },
            );
        }
    }

    /// Take a migration source's last connections (`saved`) into a table
    /// that has run on an earlier copy of them since `since` (this host's
    /// clock): a connection the source has comes in unless the entry here
    /// saw a packet later; one the source no longer has (`gone`) goes,
    /// unless it saw a packet here since `since` (it lives on here).
    pub fn merge(&mut self, saved: &[SavedConn], gone: &[ConnKey], since: Duration, now: Duration) {
        for k in gone {
            if self.map.get(k).is_some_and(|e| e.last_seen < since) {
                self.map.remove(k);
            }
        }
        let fresher: Vec<SavedConn> = saved
            .iter()
            .filter(|c| {
                ConnKey::of(&c.first).is_some_and(|k| {
                    self.map
                        .get(&k)
                        .is_none_or(|e| e.last_seen < now.saturating_sub(c.idle))
                })
            })
            .cloned()
            .collect();
        self.restore(&fresher, now);
    }

    /// Remove entries idle past their state's timeout.
    pub fn expire(&mut self, now: Duration) {
        let t = self.timeouts;
        let before = self.map.len();
        self.map
            .retain(|_, e| now.saturating_sub(e.last_seen) < t.of(e.state));
        self.counters.expired += (before - self.map.len()) as u64;
    }

    /// Keep only the connections that `permits(first packet, origin)` still
    /// allows (after a policy change).
    pub fn revalidate(&mut self, mut permits: impl FnMut(&FlowKey, Origin) -> bool) {
        let before = self.map.len();
        self.map.retain(|_, e| permits(&e.first, e.origin));
        self.counters.revoked += (before - self.map.len()) as u64;
    }

    /// The entries, for views (sorted by key).
    pub fn records(&self, now: Duration) -> Vec<ConnRecord> {
        let mut v: Vec<ConnRecord> = self
            .map
            .iter()
            .map(|(k, e)| ConnRecord {
                key: format!(
                    "{} {}:{} > {}:{}",
                    k.proto, k.src, k.src_port, k.dst, k.dst_port
                ),
                origin: e.origin,
                state: e.state,
                idle_s: now.saturating_sub(e.last_seen).as_secs(),
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

fn next_state(e: &mut Entry, reply: bool, proto: u8, flags: u8) -> ConnState {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    if proto != 6 {
        return if reply { ConnState::Replied } else { e.state };
    }
    if flags & RST != 0 {
        return ConnState::Closed;
    }
    if flags & FIN != 0 {
        if reply {
            e.fin.1 = true;
        } else {
            e.fin.0 = true;
        }
    }
    match e.state {
        _ if e.fin.0 && e.fin.1 => ConnState::Closed,
        _ if e.fin.0 || e.fin.1 => ConnState::Closing,
        ConnState::SynSent if reply => ConnState::Established,
        // A SYN again after the close opens the tuple anew.
        ConnState::Closed if !reply && flags & SYN != 0 => {
            e.fin = (false, false);
            ConnState::SynSent
        }
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> FlowKey {
        crate::wire::ipv4_key(6, (src, sport), (dst, dport), flags)
    }

    const VM: [u8; 4] = [10, 0, 0, 1];
    const PEER: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn replies_pass_new_connections_the_other_way_do_not() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        let syn = tcp(VM, 40000, PEER, 80, 0x02);
        assert!(!ct.track(S, &syn), "nothing tracked yet");
        ct.commit(S, &syn, Origin::FromVm);
        assert!(
            ct.track(S, &tcp(PEER, 80, VM, 40000, 0x12)),
            "SYN-ACK is a reply"
        );
        assert_eq!(ct.records(S)[0].state, ConnState::Established);
        assert!(
            !ct.track(S, &tcp(PEER, 5555, VM, 22, 0x02)),
            "a new connection to the VM"
        );
        assert!(
            !ct.track(S, &tcp(PEER, 80, VM, 40001, 0x12)),
            "another port is another tuple"
        );
        // Teardown: FIN both ways closes; the closed entry times out fast.
        assert!(ct.track(S, &tcp(VM, 40000, PEER, 80, 0x11)));
        assert_eq!(ct.records(S)[0].state, ConnState::Closing);
        assert!(ct.track(S, &tcp(PEER, 80, VM, 40000, 0x11)));
        assert_eq!(ct.records(S)[0].state, ConnState::Closed);
        ct.expire(S * 12);
        assert!(ct.is_empty());
        assert_eq!(ct.counters().expired, 1);
    }

    fn echo(src: [u8; 4], dst: [u8; 4], ty: u16, id: u16) -> FlowKey {
        FlowKey {
            proto: Some(1),
            src_port: ty,
            dst_port: 0,
            tcp_flags: 0,
            icmp_id: id,
            ..tcp(src, 0, dst, 0, 0)
        }
    }

    #[test]
    fn an_echo_request_lets_its_reply_back_but_not_a_ping_the_other_way() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        ct.commit(S, &echo(VM, PEER, 8, 77), Origin::FromVm);
        assert!(ct.track(S, &echo(PEER, VM, 0, 77)), "the reply");
        assert!(
            !ct.track(S, &echo(PEER, VM, 8, 77)),
            "a request the other way"
        );
        assert!(
            !ct.track(S, &echo(PEER, VM, 0, 78)),
            "a reply to another ping"
        );
        ct.commit(S, &echo(PEER, VM, 0, 5), Origin::ToVm);
        assert_eq!(ct.len(), 1, "a reply opens nothing");
    }

    #[test]
    fn entries_time_out_by_state() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        ct.commit(S, &tcp(VM, 1, PEER, 2, 0x02), Origin::FromVm);
        assert!(
            !ct.track(S * 40, &tcp(PEER, 2, VM, 1, 0x12)),
            "an unanswered SYN expires in 30 s"
        );
        let mut udp = tcp(VM, 5000, PEER, 53, 0);
        udp.proto = Some(17);
        ct.commit(S, &udp, Origin::FromVm);
        let mut reply = tcp(PEER, 53, VM, 5000, 0);
        reply.proto = Some(17);
        assert!(ct.track(S * 2, &reply));
        assert!(ct.track(S * 100, &reply), "a replied UDP flow lives 180 s");
    }

    #[test]
    fn a_full_table_tracks_nothing_new_and_counts_it() {
        let mut ct = ConnTrack::new(2, Timeouts::default());
        for p in 0..3 {
            ct.commit(S, &tcp(VM, 1000 + p, PEER, 80, 0x02), Origin::FromVm);
        }
        assert_eq!(ct.len(), 2);
        assert_eq!(ct.counters().table_full, 1);
        assert!(
            !ct.track(S, &tcp(PEER, 80, VM, 1002, 0x12)),
            "untracked: its reply is not let in"
        );
        // Expired entries make room.
        ct.commit(S * 100, &tcp(VM, 2000, PEER, 80, 0x02), Origin::FromVm);
        assert_eq!((ct.len(), ct.counters().expired), (1, 2));
    }

    #[test]
    fn a_saved_table_works_on_another_clock() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        ct.commit(S, &tcp(VM, 1, PEER, 80, 0x02), Origin::FromVm);
        ct.track(S * 2, &tcp(PEER, 80, VM, 1, 0x12));
        let saved = ct.save(S * 3);
        assert_eq!(saved[0].idle, S);
        let mut other = ConnTrack::new(16, Timeouts::default());
        other.restore(&saved, S * 1000);
        assert!(
            other.track(S * 1000, &tcp(PEER, 80, VM, 1, 0x10)),
            "the reply passes there"
        );
        assert_eq!(other.records(S * 1000)[0].state, ConnState::Established);
    }

    #[test]
    fn revalidation_drops_what_the_new_policy_refuses() {
        let mut ct = ConnTrack::new(16, Timeouts::default());
        ct.commit(S, &tcp(VM, 1, PEER, 80, 0x02), Origin::FromVm);
        ct.commit(S, &tcp(VM, 2, PEER, 22, 0x02), Origin::FromVm);
        ct.revalidate(|k, _| k.dst_port == 80);
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.counters().revoked, 1);
    }
}
