//! Counters: per port, per tunnel, and one per drop reason.

use serde::Serialize;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// Why the pipeline dropped a frame. Every variant has its own counter,
        /// shown by name in the port's (or the tunnel's) stats.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// The snake_case name used in stats, metrics and logs.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    /// Shorter than an Ethernet header (14 bytes).
    Runt => "runt",
    /// A TPID announced a VLAN tag the frame does not hold.
    TruncatedTag => "truncated_tag",
    /// Longer than the switch's largest frame.
    Oversized => "oversized",
    /// Source MAC is multicast, broadcast or zero.
    InvalidSourceMac => "invalid_source_mac",
    /// A tagged frame on an access port (VLAN hopping attempt).
    TaggedOnAccess => "tagged_on_access",
    /// Stacked tags (QinQ) or an 802.1ad S-tag sent by a VM.
    StackedTags => "stacked_tags",
    /// A trunk frame tagged with a VLAN outside the allowed list.
    VlanNotAllowed => "vlan_not_allowed",
    /// An untagged frame on a trunk without a native VLAN.
    UntaggedNoNative => "untagged_no_native",
    /// The destination MAC is on the port the frame came in on.
    Hairpin => "hairpin",
    /// A frame for a port number the switch does not have.
    UnknownPort => "unknown_port",
    /// A VXLAN packet shorter than its header.
    VxlanTruncated => "vxlan_truncated",
    /// A VXLAN header without the I flag.
    VxlanFlags => "vxlan_flags",
    /// A VXLAN packet for a VNI that no local segment uses.
    UnknownVni => "unknown_vni",
    /// A VLAN-tagged frame inside VXLAN (segments carry untagged frames).
    TaggedInTunnel => "tagged_in_tunnel",
    /// A frame from the tunnel whose destination is behind the tunnel again
    /// (split horizon).
    TunnelToTunnel => "tunnel_to_tunnel",
    /// An access list denied the frame (the sender's outbound list, or —
    /// when no copy was left — the receivers' inbound lists).
    AclDeny => "acl_deny",
    /// Over the port's rate limit (its policer).
    Policed => "policed",
    /// A source MAC the port may not use.
    SpoofedMac => "spoofed_mac",
    /// A source IP address the port may not use (IP source guard).
    SpoofedIp => "spoofed_ip",
    /// An ARP or neighbour advertisement whose sender is not the VM's.
    ArpNdSpoof => "arp_nd_spoof",
    /// A source MAC beyond the port's MAC limit.
    MacLimit => "mac_limit",
    /// Broadcast or multicast over the port's storm-control rate.
    Storm => "storm",
    /// The queue of the port's shaper was full.
    ShaperQueueFull => "shaper_queue_full",
    /// The port is in standby (a migration's destination before it is
    /// activated): its policy is in place, it does not forward.
    Standby => "standby",
    /// A VXLAN packet from an address that is no tunnel endpoint of the
    /// chassis (not a segment's peer, nor a listed one).
    UnknownPeer => "unknown_peer",
    /// The source MAC is a local port's own `mac`, and the frame came from
    /// elsewhere (the tunnel or another port) while that port forwards.
    MacOwned => "mac_owned",
}

/// A counter per [`DropReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::COUNT]);

impl DropCounters {
    pub fn add(&mut self, r: DropReason) {
        self.0[r as usize] += 1;
    }

    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The non-zero counters by name.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

impl Serialize for DropCounters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.nonzero())
    }
}

impl<'de> serde::Deserialize<'de> for DropCounters {
    /// From the map of names [`Serialize`] writes; names this version does
    /// not know are ignored (counters of a reason that no longer exists).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: std::collections::BTreeMap<String, u64> = serde::Deserialize::deserialize(d)?;
        let mut c = DropCounters::default();
        for r in DropReason::ALL {
            if let Some(n) = map.get(r.name()) {
                c.0[*r as usize] = *n;
            }
        }
        Ok(c)
    }
}

/// What one port saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PortCounters {
    /// Frames received from the VM (all, including dropped ones).
    pub rx_frames: u64,
    /// Bytes of those frames (Ethernet header on, no FCS).
    pub rx_bytes: u64,
    /// Received frames with a broadcast destination.
    pub rx_broadcast: u64,
    /// Received frames with a multicast (non-broadcast) destination.
    pub rx_multicast: u64,
    /// Frames handed to the port for the VM.
    pub tx_frames: u64,
    /// Bytes of those frames, as sent (tags included).
    pub tx_bytes: u64,
    /// Frames the port's device refused on send (reported by the driver).
    pub tx_errors: u64,
    /// Received frames dropped, by reason.
    pub drops: DropCounters,
    /// Frames for the VM that were not sent to it, by reason (its inbound
    /// access list).
    pub tx_drops: DropCounters,
}

/// What the VXLAN uplink saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TunnelCounters {
    /// VXLAN packets received.
    pub rx_packets: u64,
    /// UDP payload bytes of those packets.
    pub rx_bytes: u64,
    /// Inner frames whose TCP/UDP checksum the sender's offload had left
    /// unfinished (a virtual underlay), completed by the switch.
    pub rx_csum_completed: u64,
    /// VXLAN packets sent (one per destination host).
    pub tx_packets: u64,
    /// UDP payload bytes sent.
    pub tx_bytes: u64,
    /// Sends the socket refused (reported by the driver).
    pub tx_errors: u64,
    /// Received packets dropped, by reason.
    pub drops: DropCounters,
}

/// What the MAC table did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MacCounters {
    /// New entries learned.
    pub learned: u64,
    /// Learned entries that moved to another port or host.
    pub moves: u64,
    /// Entries removed by aging.
    pub aged: u64,
    /// Learning refused because the table was full.
    pub table_full: u64,
    /// Frames whose source MAC is statically placed elsewhere (not learned).
    pub static_conflicts: u64,
    /// Learning refused because the tunnel endpoint had taught its most
    /// entries (`mac_table.max_per_peer`).
    pub peer_full: u64,
    /// Moves refused because the entry was flapping.
    pub move_held: u64,
    /// Entries that began to flap (moved more than 4 times in 2 s).
    pub flaps: u64,
    /// Frames from elsewhere whose source MAC is a local port's own `mac`
    /// (not learned, dropped as `mac_owned`).
    pub owned_refused: u64,
}
