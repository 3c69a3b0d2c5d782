//! The lab's world outside the switches: a virtual clock every part reads
//! (agents, controller, VMs) and an in-memory underlay that carries the
//! hosts' VXLAN datagrams, losing a seeded share of them.
//!
//! Nothing here reads the system's clock or a socket: a lab run is a
//! function of its options and its seed.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dvs_switch::driver::port::Underlay;

/// Time as the lab tells it: it moves only when the lab advances it.
#[derive(Debug, Clone, Default)]
pub struct VirtualClock(Arc<AtomicU64>);

impl VirtualClock {
    /// Time since the lab began.
    pub fn now(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// A small, seeded generator (SplitMix64): the fabric's losses.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `ppm` per million.
    pub fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.next_u64() % 1_000_000 < u64::from(ppm)
    }
}

/// Datagrams an endpoint may have waiting before more are dropped (a
/// socket's receive buffer).
const QUEUE: usize = 8192;

/// What the fabric did with the datagrams sent on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FabricCounters {
    pub sent: u64,
    /// Dropped by the seeded loss.
    pub lost: u64,
    /// Dropped because the receiver's queue was full.
    pub overflowed: u64,
    /// Sent to an address no endpoint has.
    pub unreachable: u64,
}

#[derive(Debug)]
struct Inner {
    queues: BTreeMap<SocketAddr, VecDeque<(SocketAddr, Vec<u8>)>>,
    rng: Rng,
    loss_ppm: u32,
    counters: FabricCounters,
}

/// The underlay: one queue of datagrams per tunnel endpoint.
#[derive(Debug, Clone)]
pub struct Fabric(Arc<Mutex<Inner>>);

impl Fabric {
    /// A fabric that loses `loss_ppm` per million datagrams, chosen by a
    /// generator seeded with `seed`.
    pub fn new(seed: u64, loss_ppm: u32) -> Self {
        Self(Arc::new(Mutex::new(Inner {
            queues: BTreeMap::new(),
            rng: Rng::new(seed),
            loss_ppm,
            counters: FabricCounters::default(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An endpoint at `addr`.
    pub fn endpoint(&self, addr: SocketAddr) -> Endpoint {
        self.lock().queues.entry(addr).or_default();
        Endpoint {
            fabric: self.clone(),
            addr,
        }
    }

    pub fn counters(&self) -> FabricCounters {
        self.lock().counters
    }

    fn deliver(&self, from: SocketAddr, dst: SocketAddr, datagram: &[u8]) {
        let mut f = self.lock();
        let f = &mut *f;
        f.counters.sent += 1;
        if f.rng.chance(f.loss_ppm) {
            f.counters.lost += 1;
            return;
        }
        match f.queues.get_mut(&dst) {
            None => f.counters.unreachable += 1,
            Some(q) if q.len() >= QUEUE => f.counters.overflowed += 1,
            Some(q) => q.push_back((from, datagram.to_vec())),
        }
    }
}

/// A host's tunnel endpoint on the [`Fabric`].
#[derive(Debug, Clone)]
pub struct Endpoint {
    fabric: Fabric,
    addr: SocketAddr,
}

impl Underlay for Endpoint {
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)> {
        let Some((from, d)) = self
            .fabric
            .lock()
            .queues
            .get_mut(&self.addr)
            .and_then(VecDeque::pop_front)
        else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from, None))
    }

    fn send(&self, datagram: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.fabric.deliver(self.addr, dst, datagram);
        Ok(())
    }

    fn send_segmented(&self, buf: &[u8], segment: usize, dst: SocketAddr) -> io::Result<()> {
        for d in buf.chunks(segment.max(1)) {
            self.fabric.deliver(self.addr, dst, d);
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn try_clone(&self) -> io::Result<Box<dyn Underlay>> {
        Ok(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_loses_the_same_datagrams() {
        let run = |seed| {
            let f = Fabric::new(seed, 100_000);
            let a = f.endpoint("127.0.0.10:4789".parse().unwrap());
            let b = f.endpoint("127.0.0.11:4789".parse().unwrap());
            let mut got = Vec::new();
            for i in 0u8..200 {
                a.send(&[i], "127.0.0.11:4789".parse().unwrap()).unwrap();
            }
            let mut buf = [0u8; 4];
            while let Ok((n, from, _)) = b.recv(&mut buf) {
                assert_eq!((n, from), (1, "127.0.0.10:4789".parse().unwrap()));
                got.push(buf[0]);
            }
            (got, f.counters())
        };
        let (one, c) = run(7);
        assert_eq!(run(7).0, one);
        assert_ne!(run(8).0, one);
        // About a tenth lost, all accounted for.
        assert!((5..=40).contains(&c.lost), "{c:?}");
        assert_eq!(c.sent, 200);
        assert_eq!(one.len() as u64, 200 - c.lost);
    }

    #[test]
    fn segmented_sends_arrive_as_datagrams_and_strangers_are_unreachable() {
        let f = Fabric::new(1, 0);
        let a = f.endpoint("127.0.0.10:1".parse().unwrap());
        a.send_segmented(&[1, 2, 3, 4, 5], 2, "127.0.0.10:1".parse().unwrap())
            .unwrap();
        a.send(&[9], "127.0.0.99:1".parse().unwrap()).unwrap();
        let mut buf = [0u8; 8];
        let lens: Vec<usize> = std::iter::from_fn(|| a.recv(&mut buf).ok().map(|r| r.0)).collect();
        assert_eq!(lens, [2, 2, 1]);
        assert_eq!(f.counters().unreachable, 1);
    }
}
