//! Port security in the datapath: which source MACs and IP addresses a VM
//! may use, ARP/ND inspection, a MAC limit, and storm control.
//!
//! Checked on every frame a VM sends, before its access lists: a spoofed
//! source, a forged ARP reply or neighbour advertisement, a MAC beyond the
//! limit, or a broadcast/multicast over its rate is dropped with its own
//! reason. The MAC limit is sticky: the first `mac_limit` source MACs a port
//! uses are the ones it may keep using (until its policy changes).

use std::net::IpAddr;
use std::time::Duration;

use dvs_proto::Security;
use rustc_hash::FxHashSet;

use crate::wire::{EthView, FlowKey, ETH_HLEN};
use dvs_proto::stats::DropReason;

/// The most addresses DHCP snooping keeps for one port (beyond it, the
/// binding that ends first makes room).
pub const MAX_SNOOPED: usize = 16;

/// An address a DHCP server gave a port's VM, snooped from its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snooped {
    pub ip: IpAddr,
    /// The client the server gave it to (`chaddr`).
    pub mac: dvs_proto::MacAddr,
    /// When the lease ends, on the switch's clock.
    pub until: Duration,
}

/// Bind `ip` to `mac` on a port until `until` (a renewal moves the end).
pub fn snoop_bind(list: &mut Vec<Snooped>, ip: IpAddr, mac: dvs_proto::MacAddr, until: Duration) {
    list.retain(|b| b.ip != ip);
    if list.len() >= MAX_SNOOPED {
        if let Some(i) = (0..list.len()).min_by_key(|&i| list[i].until) {
            list.swap_remove(i);
        }
    }
    list.push(Snooped { ip, mac, until });
}

/// One port's security state.
#[derive(Debug, Clone)]
pub struct PortGuard {
    policy: Security,
    macs: FxHashSet<u64>,
    broadcast: Option<PacketBucket>,
    multicast: Option<PacketBucket>,
}

/// A token bucket counted in frames.
#[derive(Debug, Clone, Copy)]
struct PacketBucket {
    rate: f64,
    size: f64,
    tokens: f64,
    last: Duration,
}

impl PacketBucket {
    fn new(pps: u32) -> Self {
        // A tenth of a second of burst, at least a few frames.
        let size = (f64::from(pps) / 10.0).max(5.0);
        PacketBucket {
            rate: f64::from(pps),
            size,
            tokens: size,
            last: Duration::ZERO,
        }
    }

    fn take(&mut self, now: Duration) -> bool {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.size);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl PortGuard {
    /// A guard for `policy`, or `None` when it checks nothing.
    pub fn new(policy: &Security) -> Option<Self> {
        if *policy == Security::default() {
            return None;
        }
        Some(PortGuard {
            broadcast: policy.broadcast_pps.map(PacketBucket::new),
            multicast: policy.multicast_pps.map(PacketBucket::new),
            policy: policy.clone(),
            macs: FxHashSet::default(),
        })
    }

    pub fn policy(&self) -> &Security {
        &self.policy
    }

    /// The source MACs the MAC limit has admitted (to carry them along).
    pub fn sticky_macs(&self) -> Vec<dvs_proto::MacAddr> {
        let mut v: Vec<dvs_proto::MacAddr> = self
            .macs
            .iter()
            .map(|m| {
                let b = m.to_be_bytes();
                dvs_proto::MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
            })
            .collect();
        v.sort();
        v
    }

    /// Admit `macs` again (up to the limit).
    pub fn restore_sticky_macs(&mut self, macs: &[dvs_proto::MacAddr]) {
        let limit = self.policy.mac_limit.map_or(usize::MAX, |l| l as usize);
        for m in macs {
            if self.macs.len() < limit {
                self.macs.insert(m.to_u64());
            }
        }
    }

    /// Check an (untagged) frame the VM sends on `vlan`.
    ///
    /// # Errors
    /// The drop reason when the frame breaks the policy.
    /// `snooped`: the addresses DHCP gave the port's VM, which IP source
    /// guard allows while their leases last.
    pub fn check(
        &mut self,
        now: Duration,
        view: &EthView,
        frame: &[u8],
        vlan: u16,
        snooped: &[Snooped],
    ) -> Result<(), DropReason> {
        let p = &self.policy;
        if !p.allowed_macs.is_empty() && !p.allowed_macs.contains(&view.src) {
            return Err(DropReason::SpoofedMac);
        }
        if let Some(limit) = p.mac_limit {
            let m = view.src.to_u64();
            if !self.macs.contains(&m) {
                if self.macs.len() >= limit as usize {
                    return Err(DropReason::MacLimit);
                }
                self.macs.insert(m);
            }
        }
        let bucket = if view.dst.is_broadcast() {
            self.broadcast.as_mut()
        } else if view.dst.is_multicast() {
            self.multicast.as_mut()
        } else {
            None
        };
        if let Some(b) = bucket {
            if !b.take(now) {
                return Err(DropReason::Storm);
            }
        }
        if self.policy.ip_source_guard {
            let allowed = |ip: IpAddr| {
                self.policy.allowed_ips.iter().any(|n| n.contains(ip))
                    || snooped.iter().any(|b| b.ip == ip && b.until > now)
            };
            guard_ip(&allowed, view, frame, vlan)?;
        }
        Ok(())
    }
}

/// IP source guard and ARP/ND inspection of a frame a VM sends, against
/// the addresses `allowed` says it may use.
fn guard_ip(
    allowed: &dyn Fn(IpAddr) -> bool,
    view: &EthView,
    frame: &[u8],
    vlan: u16,
) -> Result<(), DropReason> {
    match view.ethertype {
        0x0806 => {
            // ARP: the sender must be the frame's source and an allowed
            // address (0.0.0.0: a probe).
            let arp = frame
                .get(ETH_HLEN..ETH_HLEN + 28)
                .ok_or(DropReason::ArpNdSpoof)?;
            let sha = &arp[8..14];
            let spa = IpAddr::from([arp[14], arp[15], arp[16], arp[17]]);
            let probe = spa == IpAddr::from([0, 0, 0, 0]);
            if sha != view.src.0 || !(probe || allowed(spa)) {
                return Err(DropReason::ArpNdSpoof);
            }
            Ok(())
        }
        0x0800 | 0x86dd => {
            let k = FlowKey::parse(frame, vlan);
            let Some(src) = k.src_ip else {
                return Err(DropReason::SpoofedIp);
            };
            let ok = match src {
                // DHCP before the VM has an address.
                IpAddr::V4(a) => {
                    allowed(src) || a.is_unspecified() && k.proto == Some(17) && k.dst_port == 67
                }
                // Link-local and DAD sources are the VM's own business.
                IpAddr::V6(a) => {
                    allowed(src) || a.is_unspecified() || a.segments()[0] & 0xffc0 == 0xfe80
                }
            };
            if !ok {
                return Err(DropReason::SpoofedIp);
            }
            // A neighbour advertisement must announce an allowed target.
            if k.proto == Some(58) && k.src_port == 136 {
                let target = frame
                    .get(ETH_HLEN + 40 + 8..ETH_HLEN + 40 + 24)
                    .ok_or(DropReason::ArpNdSpoof)?;
                let mut t = [0u8; 16];
                t.copy_from_slice(target);
                let t = std::net::Ipv6Addr::from(t);
                if !(allowed(IpAddr::V6(t)) || t.segments()[0] & 0xffc0 == 0xfe80) {
                    return Err(DropReason::ArpNdSpoof);
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_proto::MacAddr;

    const VM: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn policy() -> Security {
        Security {
            allowed_macs: vec![VM],
            allowed_ips: vec!["10.0.0.1".parse().unwrap()],
            ip_source_guard: true,
            ..Security::default()
        }
    }

    fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn arp(sha: MacAddr, spa: [u8; 4]) -> Vec<u8> {
        let mut b = vec![0, 1, 8, 0, 6, 4, 0, 2];
        b.extend_from_slice(&sha.0);
        b.extend_from_slice(&spa);
        b.extend_from_slice(&[0; 10]);
        b
    }

    fn ipv4(src: [u8; 4]) -> Vec<u8> {
        let mut b = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        b.extend_from_slice(&src);
        b.extend_from_slice(&[10, 0, 0, 2, 0, 68, 0, 67, 0, 8, 0, 0]);
        b
    }

    fn check(g: &mut PortGuard, f: &[u8]) -> Result<(), DropReason> {
        g.check(
            Duration::from_secs(1),
            &EthView::parse(f).unwrap(),
            f,
            10,
            &[],
        )
    }

    #[test]
    fn spoofed_macs_ips_and_forged_arp_are_refused() {
        let mut g = PortGuard::new(&policy()).unwrap();
        let bc = MacAddr::BROADCAST;
        assert_eq!(
            check(&mut g, &eth(OTHER, VM, 0x0800, &ipv4([10, 0, 0, 1]))),
            Ok(())
        );
        assert_eq!(
            check(&mut g, &eth(OTHER, OTHER, 0x0800, &ipv4([10, 0, 0, 1]))),
            Err(DropReason::SpoofedMac)
        );
        assert_eq!(
            check(&mut g, &eth(OTHER, VM, 0x0800, &ipv4([10, 0, 0, 9]))),
            Err(DropReason::SpoofedIp)
        );
        assert_eq!(
            check(&mut g, &eth(bc, VM, 0x0800, &ipv4([0, 0, 0, 0]))),
            Ok(()),
            "DHCP"
        );
        assert_eq!(
            check(&mut g, &eth(bc, VM, 0x0806, &arp(VM, [10, 0, 0, 1]))),
            Ok(())
        );
        assert_eq!(
            check(&mut g, &eth(bc, VM, 0x0806, &arp(VM, [10, 0, 0, 7]))),
            Err(DropReason::ArpNdSpoof),
            "an ARP reply claiming another address"
        );
        assert_eq!(
            check(&mut g, &eth(bc, VM, 0x0806, &arp(OTHER, [10, 0, 0, 1]))),
            Err(DropReason::ArpNdSpoof),
            "an ARP sender that is not the frame's source"
        );
        assert_eq!(
            check(&mut g, &eth(bc, VM, 0x0806, &arp(VM, [0, 0, 0, 0]))),
            Ok(()),
            "probe"
        );
    }

    #[test]
    fn the_mac_limit_is_sticky() {
        let mut g = PortGuard::new(&Security {
            mac_limit: Some(2),
            ..Security::default()
        })
        .unwrap();
        for n in 1..=2u8 {
            let m = MacAddr([2, 0, 0, 0, 1, n]);
            assert_eq!(
                check(&mut g, &eth(OTHER, m, 0x0800, &ipv4([1, 1, 1, 1]))),
                Ok(())
            );
        }
        let third = MacAddr([2, 0, 0, 0, 1, 3]);
        assert_eq!(
            check(&mut g, &eth(OTHER, third, 0x0800, &ipv4([1, 1, 1, 1]))),
            Err(DropReason::MacLimit)
        );
        let first = MacAddr([2, 0, 0, 0, 1, 1]);
        assert_eq!(
            check(&mut g, &eth(OTHER, first, 0x0800, &ipv4([1, 1, 1, 1]))),
            Ok(())
        );
    }

    #[test]
    fn storms_are_clipped_to_their_rate() {
        let mut g = PortGuard::new(&Security {
            broadcast_pps: Some(100),
            ..Security::default()
        })
        .unwrap();
        let f = eth(MacAddr::BROADCAST, VM, 0x0806, &arp(VM, [10, 0, 0, 1]));
        let v = EthView::parse(&f).unwrap();
        // 10,000 broadcasts over one second: 100/s plus the 10-frame burst.
        let passed = (0..10_000u64)
            .filter(|i| {
                g.check(Duration::from_micros(i * 100), &v, &f, 10, &[])
                    .is_ok()
            })
            .count();
        assert!((100..=115).contains(&passed), "{passed} broadcasts passed");
        let unicast = eth(OTHER, VM, 0x0800, &ipv4([1, 1, 1, 1]));
        assert_eq!(check(&mut g, &unicast), Ok(()), "unicast is not clipped");
    }
}
