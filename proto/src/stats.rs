//! What a host reports: its counters and tables as [`Stats`] — the stats
//! document an agent writes (`stats_file`), sends to its controller and
//! serves as Prometheus metrics, and the port lines the controller's views
//! show. One set of types for every side: a renamed field fails to compile
//! wherever it is read.
//!
//! Every container takes missing fields as zero or empty (`serde(default)`),
//! and a map of drop counters names reasons this version does not know
//! without failing: an agent and a controller of neighbouring versions
//! still read each other.

use serde::{Deserialize, Serialize};

use crate::Action;

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
    /// A frame on a port in standby whose source is not the port's own
    /// `mac`: it is no sign that the VM runs here, and does not switch the
    /// port over.
    ForeignWakeup => "foreign_wakeup",
    /// A DHCP server's message (DHCPv4 offer/ack/nak, DHCPv6 advertise/
    /// reply) from a port not trusted to serve DHCP (the rogue-server
    /// guard: `dhcp_snooping: { trusted: true }` trusts one).
    DhcpServer => "dhcp_server",
    /// An IPv6 router advertisement from a port not trusted to send them
    /// (the router guard).
    RouterAdvertisement => "router_advertisement",
    /// Private VLAN isolation: the destination may not hear the sender (an
    /// isolated port's frame for anything but a promiscuous port, a
    /// community's for another community's port), or the port's private
    /// VLAN is not declared.
    PrivateVlan => "private_vlan",
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

    /// Add what grew from `then` to `now` (two readings of another
    /// counter set).
    pub fn add_growth(&mut self, then: &Self, now: &Self) {
        for (i, c) in self.0.iter_mut().enumerate() {
            *c += now.0[i].saturating_sub(then.0[i]);
        }
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

impl<'de> Deserialize<'de> for DropCounters {
    /// From the map of names [`Serialize`] writes; names this version does
    /// not know are ignored (counters of a reason that no longer exists).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: std::collections::BTreeMap<String, u64> = Deserialize::deserialize(d)?;
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

impl PortCounters {
    /// Add what grew from `then` to `now`, two readings of the same port
    /// elsewhere (a migration's source: its pre-copy and its last state).
    pub fn add_growth(&mut self, then: &Self, now: &Self) {
        let grow = |mine: &mut u64, a: u64, b: u64| *mine += b.saturating_sub(a);
        grow(&mut self.rx_frames, then.rx_frames, now.rx_frames);
        grow(&mut self.rx_bytes, then.rx_bytes, now.rx_bytes);
        grow(&mut self.rx_broadcast, then.rx_broadcast, now.rx_broadcast);
        grow(&mut self.rx_multicast, then.rx_multicast, now.rx_multicast);
        grow(&mut self.tx_frames, then.tx_frames, now.tx_frames);
        grow(&mut self.tx_bytes, then.tx_bytes, now.tx_bytes);
        grow(&mut self.tx_errors, then.tx_errors, now.tx_errors);
        self.drops.add_growth(&then.drops, &now.drops);
        self.tx_drops.add_growth(&then.tx_drops, &now.tx_drops);
    }
}

/// What the VXLAN uplink saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Static entries of a migrating VM that moved to its destination
    /// when the VM was heard from there, ahead of the controller.
    pub announced_moves: u64,
}

/// What a policer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicerCounters {
    pub passed_frames: u64,
    pub passed_bytes: u64,
    pub dropped_frames: u64,
    pub dropped_bytes: u64,
}

/// What the table counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnCounters {
    /// Connections committed.
    pub created: u64,
    /// Entries removed by timeout.
    pub expired: u64,
    /// Connections not tracked because the table was full.
    pub table_full: u64,
    /// Entries removed because a policy change no longer permits them.
    pub revoked: u64,
}

/// What the table counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowCounters {
    pub created: u64,
    pub exported: u64,
    /// Records forced out because the table was full.
    pub evicted: u64,
    /// Packets passed over by sampling.
    pub unsampled: u64,
}

/// What an exporter counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportCounters {
    /// Export messages built (each goes to every collector).
    pub messages: u64,
    /// Data records built.
    pub records: u64,
    /// Messages that carried templates.
    pub template_messages: u64,
    /// Records the version cannot carry (IPv6 flows under v5).
    pub skipped: u64,
    /// Sends that failed, all collectors together.
    pub send_errors: u64,
    /// Sends that went out, all collectors together.
    pub sent: u64,
}

/// A collector as the stats show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectorStatus {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A rule's counter, for stats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    /// The rule's position (`None`: the implicit deny at the end).
    pub index: Option<usize>,
    pub action: Action,
    pub hits: u64,
}

/// Where a port's device stands (the agent attaches a port to its device
/// when the device exists, and again when it is re-created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Attachment {
    /// Frames flow through `device` (interface index `ifindex`; 0: a TAP
    /// the agent owns).
    Attached { device: String, ifindex: u32 },
    /// The policy is in place; `device` does not exist yet (`None`: the
    /// VMM has not named it).
    Waiting { device: Option<String> },
    /// `device` was attached and went away; the port waits for it again.
    Gone { device: String },
    /// `device` exists but cannot be attached (the reason).
    Failed { device: String, error: String },
}
impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attachment::Attached { .. } => write!(f, "attached"),
            Attachment::Waiting { device: Some(d) } => write!(f, "waiting for interface {d}"),
            Attachment::Waiting { device: None } => {
                write!(f, "waiting for the VMM to name its interface")
            }
            Attachment::Gone { device } => write!(f, "interface {device} gone"),
            Attachment::Failed { device, error } => write!(f, "cannot attach to {device}: {error}"),
        }
    }
}

/// A snapshot of a host's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub host: String,
    pub uptime_s: f64,
    /// The switch's configuration generation.
    pub generation: u64,
    pub ports: Vec<PortStats>,
    pub tunnel: TunnelCounters,
    pub mac: MacCounters,
    /// Entries in the MAC table now.
    pub mac_entries: usize,
    /// Each NetFlow monitor's table and exporter.
    pub netflow: Vec<MonitorStats>,
    /// What the switch did for migrations' switchovers.
    pub switchover: SwitchoverCounters,
    /// What DHCP snooping saw.
    pub dhcp: DhcpCounters,
}

/// What a switch's DHCP snooping saw (the drops of server messages from
/// untrusted ports are the ports' `dhcp_server` drops).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DhcpCounters {
    /// Acks toward a VM that bound (or renewed) an address.
    pub bound: u64,
    /// Bindings a VM's release or decline, or a server's nak, ended.
    pub ended: u64,
    /// DHCPv4 datagrams (UDP between ports 67 and 68) that are no DHCP
    /// message the switch can read: passed on as they are, binding
    /// nothing.
    pub malformed: u64,
}

/// What a switch did for migrations' switchovers (see `docs/migration.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SwitchoverCounters {
    /// Frames for a migrating VM a source delivered to its port and also
    /// sent to the migration's destination (the VM reads one of the two).
    pub relayed: u64,
    /// Frames for a VM whose port started at its destination before the
    /// source's last state came, that the port's inbound policy refused
    /// and only that state could admit (a connection it does not know
    /// yet): held for it.
    pub held: u64,
    /// Held frames the state admitted (a connection it brought).
    pub admitted: u64,
    /// Held frames still refused when the state came or their wait ended.
    pub refused: u64,
    /// Frames refused at once because the hold was full.
    pub overflow: u64,
}

/// A NetFlow monitor's line of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MonitorStats {
    pub name: String,
    pub version: String,
    pub collectors: Vec<CollectorStatus>,
    /// Records open now.
    pub open_flows: usize,
    /// Records created, ended, evicted; packets passed over by sampling.
    pub flows: FlowCounters,
    pub export: ExportCounters,
}

/// One port's line of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortStats {
    pub no: u16,
    pub id: String,
    pub name: String,
    pub vlan: String,
    pub counters: PortCounters,
    /// Hits per rule of the inbound list (into the VM), implicit deny last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_in: Option<Vec<RuleHits>>,
    /// Hits per rule of the outbound list (from the VM), implicit deny last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_out: Option<Vec<RuleHits>>,
    /// The inbound policer (into the VM), when the port has a limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub police_in: Option<PolicerCounters>,
    /// The outbound policer (from the VM), when the port has a limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub police_out: Option<PolicerCounters>,
    /// The port's connection table, when its lists have stateful rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConnStats>,
    /// Where the port's device stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentStats>,
    /// The addresses DHCP snooping bound to the port's VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhcp_bindings: Vec<DhcpBindingStats>,
}

/// An address a DHCP server leased a port's VM, as snooping saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpBindingStats {
    pub ip: std::net::IpAddr,
    /// The client it was leased to.
    pub mac: crate::MacAddr,
    /// Seconds of the lease left.
    pub expires_in_s: u64,
}

/// A port's [`Attachment`] in the stats, with the line views show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentStats {
    /// "attached", "waiting for interface vnet3", "interface vnet3 gone", …
    pub detail: String,
    #[serde(flatten)]
    pub state: Attachment,
}

/// A connection table's size and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnStats {
    pub entries: usize,
    pub counters: ConnCounters,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_stats_document_round_trips_and_tolerates_another_version() {
        let mut c = PortCounters {
            rx_frames: 3,
            ..PortCounters::default()
        };
        c.drops.add(DropReason::UnknownPeer);
        let s = Stats {
            host: "h1".into(),
            ports: vec![PortStats {
                id: "veth1".into(),
                counters: c,
                attachment: Some(AttachmentStats {
                    detail: "waiting for interface vnet3".into(),
                    state: Attachment::Waiting {
                        device: Some("vnet3".into()),
                    },
                }),
                ..PortStats::default()
            }],
            ..Stats::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stats>(&text).unwrap(), s);
        // A neighbouring version: a field gone, one added, a drop reason
        // this one does not know.
        let other = r#"{"host":"h2","ports":[{"id":"veth2","counters":
            {"rx_frames":1,"drops":{"reason_of_the_future":4,"runt":2}},"new_field":1}]}"#;
        let s: Stats = serde_json::from_str(other).unwrap();
        let c = &s.ports[0].counters;
        assert_eq!((c.rx_frames, c.tx_frames), (1, 0));
        assert_eq!(c.drops.get(DropReason::Runt), 2);
        assert_eq!(c.drops.total(), 2);
    }
}
