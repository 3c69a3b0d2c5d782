//! The static agent file (`dvs agent --config FILE`): one host's switch
//! without a controller.
//!
//! ```yaml
//! host: h1
//! tunnel: { local: 10.0.0.1, port: 4789 }      # needed when segments exist
//! segments:                                     # VLANs stretched by VXLAN
//!   - { vlan: 10, vni: 5010, peers: [10.0.0.2, 10.0.0.3] }
//! ports:
//!   - { id: veth1, name: vm1, tap: dvs-vm1, vlan: { mode: access, id: 10 } }
//!   - { id: veth3, name: vm3, tap: dvs-vm3, offloads: false,   # no virtio-net headers
//!       vlan: { mode: access, id: 10 } }
//!   - { id: veth2, name: vm2, netdev: veth-vm2,
//!       vlan: { mode: trunk, allowed: [10, 20-30], native: 10 } }
//! static_macs:                                  # optional
//!   - { vlan: 10, mac: "02:00:00:00:00:09", remote: 10.0.0.2 }
//!   - { vlan: 10, mac: "02:00:00:00:00:01", port: vm1 }
//! private_vlans:                               # optional: primary + secondaries
//!   - { primary: 100, isolated: 101, community: [102, 103] }
//! mac_table: { max_entries: 16384, aging_s: 300, max_per_peer: 4096 }   # optional
//! stats_file: /run/dvs/h1-stats.json                 # optional
//! chassis_id: 1          # NetFlow source ID / IPFIX observation domain
//! monitors:              # NetFlow monitors ports and profiles may name
//!   - { name: default, version: ipfix, collectors: ["10.0.0.100:4739"] }
//! ```
//!
//! Ports (and `profiles:`) take a monitor with
//! `netflow: { monitor: default, direction: both }`, and a private VLAN
//! with `vlan: { mode: pvlan-host, primary: 100, secondary: 101 }` or
//! `vlan: { mode: pvlan-promiscuous, primary: 100 }` ([`dvs_proto::pvlan`]).
//!
//! The underlay is not trusted: VXLAN is taken only from the segments'
//! peers and the addresses in `tunnel: { peers: [...] }` (other tunnel
//! endpoints of the chassis — under a controller, every host's); anything
//! else is dropped and counted (`unknown_peer`). A port's `mac` is its
//! own: while the port forwards, that MAC seen anywhere else is dropped
//! (`mac_owned`) and never learned there.
//!
//! The file is checked whole before anything is opened: a wrong file changes
//! nothing and the error names the field (with its line) or the item at fault
//! and what would be valid.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dvs_proto::desired::Item;
use dvs_proto::net::VlanModeRepr;
use dvs_proto::netflow::{NetflowMonitor, RawMonitor, RawNetflow};
use dvs_proto::profile::{self, Policy, RawAcl, RawPolicy, RawProfile, RawQos};
use dvs_proto::pvlan::{PrivateVlan, PrivateVlans};
use dvs_proto::security::RawSecurity;
use dvs_proto::{known_names, MacAddr, PortId, VlanId, Vni};
use serde::Deserialize;

use crate::pipeline::mactable::MacTableConfig;
use crate::pipeline::{PortAcl, PortConfig, PortNetflow, PortQos, SegmentConfig};
use crate::Error;

/// A validated agent file.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub host: String,
    pub tunnel: Option<TunnelConfig>,
    /// Tunnel endpoints VXLAN is also accepted from (besides the segments'
    /// peers): `tunnel.peers`.
    pub tunnel_peers: Vec<IpAddr>,
    pub segments: Vec<SegmentConfig>,
    pub ports: Vec<PortSpec>,
    pub static_macs: Vec<StaticMac>,
    pub mac_table: MacTableConfig,
    pub stats_file: Option<PathBuf>,
    /// The chassis's number in flow exports (v9 source ID, IPFIX
    /// observation domain, v5 engine ID's low byte).
    pub chassis_id: u32,
    pub monitors: BTreeMap<String, NetflowMonitor>,
    pub private_vlans: PrivateVlans,
}

/// The host's VXLAN tunnel endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The address VXLAN packets are sent from and received on.
    pub local: IpAddr,
    /// The UDP port of every tunnel endpoint (default 4789).
    pub port: u16,
}

/// The file form of `tunnel:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    local: IpAddr,
    #[serde(default = "default_vxlan_port")]
    port: u16,
    #[serde(default)]
    peers: Vec<IpAddr>,
}

fn default_vxlan_port() -> u16 {
    crate::wire::vxlan::PORT
}

/// How a port meets its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A TAP device the agent creates and owns; with `offloads` (the
    /// default) it carries virtio-net headers so that checksum-partial and
    /// 64 KB TSO frames pass through.
    Tap { name: String, offloads: bool },
    /// An existing interface (a VMM's tap, a veth) read with AF_PACKET.
    /// It may not exist yet: the port waits for it with its policy in
    /// place, attaches when it appears and again when it is re-created.
    Netdev(String),
    /// The VMM's interface, not named yet (libvirt names a TAP only when
    /// it creates it): the port has its policy and waits for a name.
    Unnamed,
}

impl Attachment {
    /// The device's name (`None`: not named yet).
    pub fn device(&self) -> Option<&str> {
        match self {
            Attachment::Tap { name, .. } | Attachment::Netdev(name) => Some(name),
            Attachment::Unnamed => None,
        }
    }
}

/// One port of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub port: PortConfig,
    pub attach: Attachment,
    /// Installed with its policy but not forwarding: a migration's
    /// destination before activation, or its source after it stopped.
    pub standby: bool,
    /// The migration this port's standby belongs to.
    pub migration: Option<u64>,
}

/// A MAC address placed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticMac {
    pub vlan: VlanId,
    pub mac: MacAddr,
    pub at: StaticLocation,
    /// A remote VM under way to the host at this address (a migration):
    /// its entry moves there when the VM is heard from there.
    pub moving_to: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticLocation {
    /// On the local port with this name.
    Port(String),
    /// Behind the tunnel endpoint at this address.
    Remote(IpAddr),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    host: String,
    #[serde(default)]
    tunnel: Option<RawTunnel>,
    #[serde(default)]
    segments: Vec<RawSegment>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    static_macs: Vec<RawStaticMac>,
    #[serde(default)]
    mac_table: Option<RawMacTable>,
    #[serde(default)]
    stats_file: Option<PathBuf>,
    /// Port profiles (`kind: PortProfile` documents) that ports may name.
    #[serde(default)]
    profiles: Vec<RawProfile>,
    #[serde(default)]
    chassis_id: Option<u32>,
    /// NetFlow monitors (`kind: NetflowMonitor` documents).
    #[serde(default)]
    monitors: Vec<RawMonitor>,
    /// Private VLANs (`kind: PrivateVlan` documents, without kind and name).
    #[serde(default)]
    private_vlans: Vec<PrivateVlan>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    vlan: VlanId,
    vni: Vni,
    #[serde(default)]
    peers: Vec<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    id: PortId,
    name: String,
    #[serde(default)]
    tap: Option<String>,
    #[serde(default)]
    netdev: Option<String>,
    #[serde(default)]
    offloads: Option<bool>,
    /// The VMM's interface, not named yet.
    #[serde(default)]
    awaiting_netdev: bool,
    /// A port profile whose policy the port takes (its own lines win).
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    vlan: Option<VlanModeRepr>,
    #[serde(default)]
    acl: Option<RawAcl>,
    #[serde(default)]
    qos: Option<RawQos>,
    /// The VM's MAC (the default allowed source of port security).
    #[serde(default)]
    mac: Option<MacAddr>,
    /// The VM's addresses (IP source guard and ARP/ND inspection allow
    /// them, beside the profile's `allowed_ips`).
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    security: Option<RawSecurity>,
    #[serde(default)]
    netflow: Option<RawNetflow>,
    /// `{ trusted: true }`: the port may serve DHCP and send router
    /// advertisements.
    #[serde(default)]
    dhcp_snooping: Option<dvs_proto::profile::RawDhcpSnooping>,
    /// In standby (a migration's end that is not forwarding).
    #[serde(default)]
    standby: bool,
    #[serde(default)]
    migration: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStaticMac {
    vlan: VlanId,
    mac: MacAddr,
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    remote: Option<IpAddr>,
    #[serde(default)]
    moving_to: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMacTable {
    #[serde(default)]
    max_entries: Option<usize>,
    #[serde(default)]
    aging_s: Option<u64>,
    #[serde(default)]
    max_per_peer: Option<usize>,
}

impl AgentConfig {
    /// Read and validate the file at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Config`] naming
    /// the problem otherwise.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config file {}", path.display()), e))?;
        Self::parse(&text).map_err(|msg| Error::Config {
            path: path.display().to_string(),
            msg,
        })
    }

    /// Validate the YAML text of an agent file.
    ///
    /// # Errors
    /// A message naming the field or item at fault and what would be valid.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: Raw = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        validate(raw)
    }
}

/// An agent file (JSON) from the items a controller sends
/// ([`dvs_proto::desired::Item`]), for `host` with its own settings
/// (`tunnel`, `stats_file`, …) in `local`: port items are its ports,
/// remote MACs its static MACs, documents its profiles and monitors.
pub fn assemble(
    host: &str,
    items: &BTreeMap<String, Item>,
    local: &serde_json::Value,
) -> serde_json::Value {
    use serde_json::{json, Value};
    let mut doc = match local {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({}),
    };
    doc["host"] = json!(host);
    let mut profiles = Vec::new();
    let mut monitors = Vec::new();
    let mut ports = Vec::new();
    let mut macs = Vec::new();
    for item in items.values() {
        let v = item.to_json();
        match item {
            Item::Chassis(_) => doc["chassis_id"] = v,
            Item::Segments(_) => doc["segments"] = v,
            Item::PrivateVlans(_) => doc["private_vlans"] = v,
            Item::TunnelPeers(_) if doc["tunnel"].is_object() => doc["tunnel"]["peers"] = v,
            Item::TunnelPeers(_) => {}
            Item::Profile { .. } => profiles.push(v),
            Item::Monitor { .. } => monitors.push(v),
            Item::Port(_) => ports.push(v),
            Item::RemoteMac(_) => macs.push(v),
        }
    }
    doc["profiles"] = Value::Array(profiles);
    doc["monitors"] = Value::Array(monitors);
    doc["ports"] = Value::Array(ports);
    doc["static_macs"] = Value::Array(macs);
    doc
}

fn validate(raw: Raw) -> Result<AgentConfig, String> {
    if raw.host.trim().is_empty() {
        return Err("host: the host name is empty".into());
    }
    let mac_table = validate_mac_table(raw.mac_table)?;
    let (tunnel, tunnel_peers) = validate_tunnel(raw.tunnel)?;
    let monitors = NetflowMonitor::set_from_raw(&raw.monitors).map_err(|e| e.to_string())?;
    let profiles = profile::resolve(&raw.profiles).map_err(|e| e.to_string())?;
    profile::check_monitors(&profiles, &monitors).map_err(|e| e.to_string())?;
    let private_vlans = PrivateVlans::new(
        raw.private_vlans
            .into_iter()
            .enumerate()
            .map(|(i, d)| (format!("private_vlans[{i}]"), d))
            .collect(),
    )?;
    let ports = validate_ports(raw.ports, &profiles, &monitors, &private_vlans)?;
    let segments = validate_segments(raw.segments, tunnel)?;
    let static_macs = validate_static_macs(raw.static_macs, &ports, &segments)?;
    Ok(AgentConfig {
        host: raw.host,
        tunnel,
        tunnel_peers,
        segments,
        ports,
        static_macs,
        mac_table,
        stats_file: raw.stats_file,
        chassis_id: raw.chassis_id.unwrap_or(1),
        monitors,
        private_vlans,
    })
}

fn validate_mac_table(raw: Option<RawMacTable>) -> Result<MacTableConfig, String> {
    let mut mac_table = MacTableConfig::default();
    if let Some(m) = raw {
        if let Some(n) = m.max_entries {
            if n == 0 {
                return Err("mac_table.max_entries: 0 is not valid, use at least 1".into());
            }
            mac_table.max_entries = n;
        }
        if let Some(s) = m.aging_s {
            if s == 0 {
                return Err("mac_table.aging_s: 0 is not valid, use at least 1 second".into());
            }
            mac_table.aging = Duration::from_secs(s);
        }
        if let Some(n) = m.max_per_peer {
            if n == 0 {
                return Err(
                    "mac_table.max_per_peer: 0 is not valid, use at least 1 (entries one tunnel endpoint may teach)"
                        .into(),
                );
            }
            mac_table.max_per_peer = n;
        }
    }
    Ok(mac_table)
}

/// The tunnel endpoint and the other endpoints VXLAN is taken from.
fn validate_tunnel(raw: Option<RawTunnel>) -> Result<(Option<TunnelConfig>, Vec<IpAddr>), String> {
    Ok(match raw {
        Some(t) => {
            if let Some(i) = t.peers.iter().position(|p| *p == t.local) {
                return Err(format!(
                    "tunnel.peers[{i}]: {} is this host's own tunnel address",
                    t.local
                ));
            }
            (
                Some(TunnelConfig {
                    local: t.local,
                    port: t.port,
                }),
                t.peers,
            )
        }
        None => (None, Vec::new()),
    })
}

fn validate_ports(
    raw: Vec<RawPort>,
    profiles: &BTreeMap<String, Policy>,
    monitors: &BTreeMap<String, NetflowMonitor>,
    pvlans: &PrivateVlans,
) -> Result<Vec<PortSpec>, String> {
    let mut ports = Vec::new();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    let mut devs = HashSet::new();
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("ports[{i}] (`{}`)", p.name);
        if p.name.is_empty() {
            return Err(format!("ports[{i}]: the port name is empty"));
        }
        if !names.insert(p.name.clone()) {
            return Err(format!("{at}: the name is used by another port"));
        }
        if !ids.insert(p.id) {
            return Err(format!("{at}: ID {} is used by another port", p.id));
        }
        let spec = validate_port(p, &at, profiles, monitors)?;
        pvlans
            .check_mode(&spec.port.vlan)
            .map_err(|e| format!("{at}, vlan: {e}"))?;
        if let Some(dev) = spec.attach.device() {
            if !devs.insert(dev.to_string()) {
                return Err(format!("{at}: interface `{dev}` is used by another port"));
            }
        }
        ports.push(spec);
    }
    Ok(ports)
}

/// One port (`at` names it in errors), its policy resolved.
fn validate_port(
    p: RawPort,
    at: &str,
    profiles: &BTreeMap<String, Policy>,
    monitors: &BTreeMap<String, NetflowMonitor>,
) -> Result<PortSpec, String> {
    let attach = match (p.tap, p.netdev) {
        (None, None) if p.awaiting_netdev => Attachment::Unnamed,
        (_, _) if p.awaiting_netdev => {
            return Err(format!(
                "{at}: `awaiting_netdev` is for a port whose interface has no name yet: drop `tap`/`netdev` or it"
            ))
        }
        (Some(name), None) => Attachment::Tap {
            name,
            offloads: p.offloads.unwrap_or(true),
        },
        (None, Some(_)) if p.offloads.is_some() => {
            return Err(format!(
                "{at}: `offloads` applies to `tap:` ports only (an attached netdev keeps the offloads its owner set)"
            ))
        }
        (None, Some(n)) => Attachment::Netdev(n),
        _ => {
            return Err(format!(
                "{at}: give exactly one of `tap: NAME` (the agent creates the TAP), \
                 `netdev: IFACE` (the agent attaches to the interface, now or when it appears) \
                 or `awaiting_netdev: true` (the VMM names it later)"
            ))
        }
    };
    if let Some(dev) = attach.device() {
        if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']) {
            return Err(format!(
                "{at}: interface name `{dev}` is not valid: 1 to 15 characters, no '/' or spaces"
            ));
        }
    }
    let own = Policy::from_raw(
        &RawPolicy {
            vlan: p.vlan.clone(),
            acl: p.acl.clone(),
            qos: p.qos.clone(),
            security: p.security.clone(),
            netflow: p.netflow.clone(),
            dhcp_snooping: p.dhcp_snooping.clone(),
        },
        at,
    )
    .map_err(|e| e.to_string())?;
    let policy = match &p.profile {
        None => own,
        Some(name) => match profiles.get(name) {
            Some(base) => own.over(base),
            None => {
                return Err(format!(
                    "{at}: unknown profile `{name}`; profiles in this file: {}",
                    known_names(profiles.keys().map(String::as_str))
                ));
            }
        },
    };
    let Some(vlan) = policy.vlan.clone() else {
        return Err(format!(
            "{at}: no VLAN: give the port `vlan:` or a `profile:` that sets one"
        ));
    };
    let acl = PortAcl {
        inbound: policy.acl_in.clone().unwrap_or_default(),
        outbound: policy.acl_out.clone().unwrap_or_default(),
    };
    let qos = PortQos {
        inbound: policy.qos_in,
        outbound: policy.qos_out,
        mark: policy.mark,
    };
    let security = policy.security_for(p.mac, &p.ips);
    let netflow = match &policy.netflow {
        None => None,
        Some(b) => match monitors.get(&b.monitor) {
            Some(m) => Some(PortNetflow {
                monitor: m.clone(),
                direction: b.direction,
            }),
            None => {
                return Err(format!(
                    "{at}, netflow.monitor: {}",
                    profile::unknown_monitor(&b.monitor, monitors)
                ))
            }
        },
    };
    Ok(PortSpec {
        port: PortConfig {
            id: p.id,
            name: p.name,
            vlan,
            acl,
            qos,
            security,
            netflow,
            mac: p.mac,
        },
        attach,
        standby: p.standby,
        migration: p.migration,
    })
}

fn validate_segments(
    raw: Vec<RawSegment>,
    tunnel: Option<TunnelConfig>,
) -> Result<Vec<SegmentConfig>, String> {
    if !raw.is_empty() && tunnel.is_none() {
        return Err(
            "segments need a tunnel endpoint: add `tunnel: { local: ADDRESS }` (this host's VXLAN address)"
                .into(),
        );
    }
    let mut segments = Vec::new();
    let mut vlans = HashSet::new();
    let mut vnis = HashSet::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = format!("segments[{i}] (VLAN {})", s.vlan);
        if !vlans.insert(s.vlan) {
            return Err(format!("{at}: VLAN {} has another segment", s.vlan));
        }
        if !vnis.insert(s.vni) {
            return Err(format!("{at}: VNI {} is used by another segment", s.vni));
        }
        if let Some(t) = tunnel {
            if s.peers.contains(&t.local) {
                return Err(format!(
                    "{at}: peer {} is this host's own tunnel address",
                    t.local
                ));
            }
        }
        segments.push(SegmentConfig {
            vlan: s.vlan,
            vni: s.vni,
            peers: s.peers,
        });
    }
    Ok(segments)
}

fn validate_static_macs(
    raw: Vec<RawStaticMac>,
    ports: &[PortSpec],
    segments: &[SegmentConfig],
) -> Result<Vec<StaticMac>, String> {
    let mut static_macs = Vec::new();
    for (i, m) in raw.into_iter().enumerate() {
        let at = format!("static_macs[{i}] ({} on VLAN {})", m.mac, m.vlan);
        if m.mac.is_multicast() || m.mac.is_zero() {
            return Err(format!("{at}: a static MAC must be a unicast address"));
        }
        let loc = match (m.port, m.remote) {
            (Some(name), None) => {
                let Some(p) = ports.iter().find(|p| p.port.name == name) else {
                    return Err(format!(
                        "{at}: unknown port `{name}`; ports in this file: {}",
                        known_names(ports.iter().map(|p| p.port.name.as_str()))
                    ));
                };
                if !p.port.vlan.carries(m.vlan) {
                    return Err(format!(
                        "{at}: port `{name}` does not carry VLAN {}",
                        m.vlan
                    ));
                }
                StaticLocation::Port(name)
            }
            (None, Some(ip)) => {
                if !segments.iter().any(|s| s.vlan == m.vlan) {
                    return Err(format!(
                        "{at}: VLAN {} has no segment, so nothing can be behind a remote host",
                        m.vlan
                    ));
                }
                StaticLocation::Remote(ip)
            }
            _ => {
                return Err(format!(
                    "{at}: give exactly one of `port: NAME` or `remote: TUNNEL_ADDRESS`"
                ))
            }
        };
        if let (Some(to), StaticLocation::Port(_)) = (m.moving_to, &loc) {
            return Err(format!(
                "{at}: `moving_to: {to}` is for a remote VM (`remote:`), not a local port"
            ));
        }
        static_macs.push(StaticMac {
            vlan: m.vlan,
            mac: m.mac,
            at: loc,
            moving_to: m.moving_to,
        });
    }
    Ok(static_macs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvs_proto::VlanMode;

    const GOOD: &str = r#"
host: h1
tunnel: { local: 10.0.0.1 }
segments:
  - { vlan: 10, vni: 5010, peers: [10.0.0.2, 10.0.0.3] }
ports:
  - { id: veth1, name: vm1, tap: dvs-vm1, vlan: { mode: access, id: 10 } }
  - { id: 2, name: vm2, netdev: veth-vm2, vlan: { mode: trunk, allowed: [10, 20-30], native: 10 } }
static_macs:
  - { vlan: 10, mac: "02:00:00:00:00:09", remote: 10.0.0.2 }
  - { vlan: 20, mac: "02:00:00:00:00:01", port: vm2 }
mac_table: { max_entries: 100, aging_s: 60 }
"#;

    #[test]
    fn a_good_file() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.host, "h1");
        assert_eq!(c.tunnel.unwrap().port, 4789);
        assert_eq!(c.ports.len(), 2);
        assert_eq!(
            c.ports[0].attach,
            Attachment::Tap {
                name: "dvs-vm1".into(),
                offloads: true
            }
        );
        assert_eq!(c.ports[1].port.id.to_string(), "veth2");
        assert_eq!(c.segments[0].peers.len(), 2);
        assert_eq!(c.static_macs.len(), 2);
        assert_eq!(c.mac_table.max_entries, 100);
    }

    fn err(text: &str) -> String {
        AgentConfig::parse(text).unwrap_err()
    }

    #[test]
    fn private_vlans_are_declared_once_and_ports_must_match_them() {
        let base =
            "host: h\nprivate_vlans:\n  - { primary: 100, isolated: 101, community: [102] }\n";
        let c = AgentConfig::parse(&format!(
            "{base}ports:\n  - {{ id: 1, name: a, tap: t1, vlan: {{ mode: pvlan-host, primary: 100, secondary: 101 }} }}\n  - {{ id: 2, name: r, tap: t2, vlan: {{ mode: pvlan-promiscuous, primary: 100 }} }}\n"
        ))
        .unwrap();
        assert_eq!(c.private_vlans.decls().len(), 1);
        assert_eq!(
            err(&format!(
                "{base}ports:\n  - {{ id: 1, name: a, tap: t1, vlan: {{ mode: pvlan-host, primary: 200, secondary: 102 }} }}\n"
            )),
            "ports[0] (`a`), vlan: VLAN 102 is a secondary VLAN of private VLAN 100, not of 200: \
             use `{ mode: pvlan-host, primary: 100, secondary: 102 }`"
        );
        assert!(err(&format!(
            "{base}ports:\n  - {{ id: 1, name: a, tap: t1, vlan: {{ mode: access, id: 101 }} }}\n"
        ))
        .contains("ports[0] (`a`), vlan: VLAN 101 is a secondary VLAN of private VLAN 100"));
        assert_eq!(
            err(&format!("{base}  - {{ primary: 200, community: [102] }}\n")),
            "private_vlans[1]: VLAN 102 is already the community VLAN of private VLAN 100 \
             (private_vlans[0]): a VLAN belongs to one private VLAN only"
        );
        assert!(err("host: h\nprivate_vlans:\n  - { isolated: 101 }\n").contains("primary"));
    }

    #[test]
    fn bad_vlans_are_named() {
        for (bad, want) in [
            ("0", "VLAN 0 is out of range 1..=4094"),
            ("4095", "VLAN 4095 is out of range 1..=4094"),
            ("5000", "VLAN 5000 is out of range 1..=4094"),
        ] {
            let e = err(&format!(
                "host: h\nports:\n  - {{ id: 1, name: a, tap: t1, vlan: {{ mode: access, id: {bad} }} }}\n"
            ));
            assert!(e.contains(want), "{e}");
            assert!(e.contains("line 3"), "the error says where: {e}");
        }
    }

    #[test]
    fn unknown_port_and_fields_are_named() {
        let e = err(
            "host: h\nports:\n  - { id: 1, name: vm1, tap: t1, vlan: { mode: access, id: 10 } }\n\
             static_macs:\n  - { vlan: 10, mac: \"02:00:00:00:00:01\", port: vm9 }\n",
        );
        assert_eq!(
            e,
            "static_macs[0] (02:00:00:00:00:01 on VLAN 10): unknown port `vm9`; ports in this file: vm1"
        );
        let e = err("host: h\nportz: []\n");
        assert!(e.contains("unknown field `portz`"), "{e}");
        let e = err("host: h\nports:\n  - { id: 1, name: a, vlan: { mode: access, id: 1 } }\n");
        assert!(e.contains("exactly one of `tap: NAME`"), "{e}");
        let e = err(
            "host: h\nports:\n  - { id: 1, name: a, tap: t1, vlan: { mode: access, id: 1 } }\n  - { id: 1, name: b, tap: t2, vlan: { mode: access, id: 1 } }\n",
        );
        assert_eq!(e, "ports[1] (`b`): ID veth1 is used by another port");
        let e = err("host: h\nports:\n  - { id: 1, name: a, tap: a-very-long-tap-name, vlan: { mode: access, id: 1 } }\n");
        assert!(e.contains("1 to 15 characters"), "{e}");
    }

    #[test]
    fn port_acls_parse_and_bad_rules_are_named() {
        let c = AgentConfig::parse(
            "host: h\nports:\n  - { id: 1, name: web, tap: t1, vlan: { mode: access, id: 10 },\n      \
             acl: { in: [ { action: permit, proto: tcp, dst_port: 80 }, { action: deny } ] } }\n",
        )
        .unwrap();
        assert_eq!(c.ports[0].port.acl.inbound.len(), 2);
        assert!(c.ports[0].port.acl.outbound.is_empty());
        let e = err(
            "host: h\nports:\n  - { id: 1, name: web, tap: t1, vlan: { mode: access, id: 10 },\n      \
             acl: { in: [ { action: permit }, { action: permit, proto: tcp, dst_port: 70000 } ] } }\n",
        );
        assert_eq!(
            e,
            "ports[0] (`web`), acl.in[1], dst_port: port 70000 is out of range 0..=65535"
        );
        let c = AgentConfig::parse(
            "host: h\nports:\n  - { id: 1, name: web, tap: t1, vlan: { mode: access, id: 10 },\n      \
             acl: { out: [ { action: permit, stateful: true } ] } }\n",
        )
        .unwrap();
        assert!(c.ports[0].port.acl.outbound[0].stateful);
        let e = err(
            "host: h\nports:\n  - { id: 1, name: web, tap: t1, vlan: { mode: access, id: 10 }, acl: { inn: [] } }\n",
        );
        assert!(e.contains("unknown field `inn`"), "{e}");
    }

    #[test]
    fn ports_take_profiles_and_override_them() {
        let c = AgentConfig::parse(
            r#"
host: h
profiles:
  - kind: PortProfile
    name: base
    vlan: { mode: access, id: 10 }
    security: { mac_limit: 1, storm_control: { broadcast_pps: 100 } }
  - kind: PortProfile
    name: web
    inherit: base
    acl:
      in:
        - { action: permit, proto: tcp, dst_port: 80, stateful: true }
        - { action: permit, proto: icmp }
        - { action: deny }
    qos:
      in:  { avg_mbps: 100, peak_mbps: 200, burst_kb: 512 }
      out: { avg_mbps: 100 }
      mark: { dscp: 26, pcp: 3 }
ports:
  - { id: 1, name: a, tap: t1, profile: web, mac: "02:00:00:00:00:0a" }
  - { id: 2, name: b, tap: t2, profile: web, vlan: { mode: access, id: 20 } }
"#,
        )
        .unwrap();
        let (a, b) = (&c.ports[0].port, &c.ports[1].port);
        assert_eq!(a.vlan, VlanMode::Access(VlanId::new(10).unwrap()));
        assert_eq!(
            b.vlan,
            VlanMode::Access(VlanId::new(20).unwrap()),
            "the port's line wins"
        );
        assert_eq!(a.acl.inbound.len(), 3);
        assert_eq!(a.qos.mark.unwrap().dscp, Some(26));
        assert_eq!(
            a.security.allowed_macs,
            vec!["02:00:00:00:00:0a".parse().unwrap()]
        );
        assert!(
            b.security.allowed_macs.is_empty(),
            "no MAC known: any, within the limit"
        );
        assert_eq!(b.security.mac_limit, Some(1));

        let e = err("host: h\nports:\n  - { id: 1, name: a, tap: t1, profile: nope }\n");
        assert_eq!(
            e,
            "ports[0] (`a`): unknown profile `nope`; profiles in this file: none"
        );
        let e = err("host: h\nports:\n  - { id: 1, name: a, tap: t1 }\n");
        assert!(e.contains("no VLAN"), "{e}");
        let e = err(
            "host: h\nprofiles:\n  - { kind: PortProfile, name: web, acl: { in: [ { action: permit, proto: tcp, dst_port: 70000 } ] } }\n",
        );
        assert_eq!(
            e,
            "profile `web`, acl.in[0], dst_port: port 70000 is out of range 0..=65535"
        );
    }

    #[test]
    fn ports_take_netflow_monitors_from_profiles_or_their_own_line() {
        let c = AgentConfig::parse(
            r#"
host: h
chassis_id: 7
monitors:
  - { kind: NetflowMonitor, name: m, version: v9, collectors: ["127.0.0.1:2055", "[::1]:2055"], inactive_timeout_s: 5 }
  - { name: n, version: 5, collectors: ["127.0.0.1:9995"] }
profiles:
  - { kind: PortProfile, name: web, vlan: { mode: access, id: 10 }, netflow: { monitor: m } }
ports:
  - { id: 1, name: a, tap: t1, profile: web }
  - { id: 2, name: b, tap: t2, profile: web, netflow: { monitor: n, direction: out } }
  - { id: 3, name: c, tap: t3, vlan: { mode: access, id: 10 } }
"#,
        )
        .unwrap();
        assert_eq!(c.chassis_id, 7);
        let nf = |i: usize| c.ports[i].port.netflow.clone();
        let a = nf(0).unwrap();
        assert_eq!(
            (a.monitor.name.as_str(), a.monitor.collectors.len()),
            ("m", 2)
        );
        assert_eq!(a.monitor.inactive_timeout, Duration::from_secs(5));
        let b = nf(1).unwrap();
        assert_eq!(b.monitor.version, dvs_proto::FlowVersion::V5);
        assert_eq!(b.direction, dvs_proto::FlowDirection::Out);
        assert!(nf(2).is_none());

        assert_eq!(
            err("host: h
profiles:
  - { kind: PortProfile, name: web, netflow: { monitor: x } }
"),
            "profile `web`, netflow.monitor: unknown monitor `x`; monitors here: none"
        );
        assert_eq!(
            err("host: h
monitors:
  - { name: m, version: v9, collectors: [\"127.0.0.1:2055\"] }
ports:
  - { id: 1, name: a, tap: t1, vlan: { mode: access, id: 10 }, netflow: { monitor: y } }
"),
            "ports[0] (`a`), netflow.monitor: unknown monitor `y`; monitors here: m"
        );
        assert_eq!(
            err("host: h
monitors:
  - { name: m, version: 7, collectors: [\"127.0.0.1:2055\"] }
"),
            "monitor `m`, version: `7` is not an export format dvs speaks: expected v5, v9 or ipfix"
        );
    }

    #[test]
    fn segments_need_a_tunnel_and_distinct_vnis() {
        let e = err("host: h\nsegments:\n  - { vlan: 10, vni: 1 }\n");
        assert!(e.contains("tunnel: { local: ADDRESS }"), "{e}");
        let e = err(
            "host: h\ntunnel: { local: 10.0.0.1 }\nsegments:\n  - { vlan: 10, vni: 1 }\n  - { vlan: 20, vni: 1 }\n",
        );
        assert_eq!(e, "segments[1] (VLAN 20): VNI 1 is used by another segment");
        let e = err(
            "host: h\ntunnel: { local: 10.0.0.1 }\nsegments:\n  - { vlan: 10, vni: 16777216 }\n",
        );
        assert!(
            e.contains("VNI 16777216 is out of range 1..=16777215"),
            "{e}"
        );
        let e = err(
            "host: h\ntunnel: { local: 10.0.0.1 }\nsegments:\n  - { vlan: 10, vni: 1, peers: [10.0.0.1] }\n",
        );
        assert!(e.contains("this host's own tunnel address"), "{e}");
    }

    #[test]
    fn tunnel_peers_and_the_per_peer_bound() {
        let c = AgentConfig::parse(
            "host: h\ntunnel: { local: 10.0.0.1, peers: [10.0.0.5] }\nmac_table: { max_per_peer: 10 }\n",
        )
        .unwrap();
        assert_eq!(c.tunnel_peers, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.tunnel.unwrap().port, 4789);
        assert_eq!(c.mac_table.max_per_peer, 10);
        let e = err("host: h\ntunnel: { local: 10.0.0.1, peers: [10.0.0.1] }\n");
        assert_eq!(
            e,
            "tunnel.peers[0]: 10.0.0.1 is this host's own tunnel address"
        );
        let e = err("host: h\nmac_table: { max_per_peer: 0 }\n");
        assert!(e.contains("mac_table.max_per_peer: 0 is not valid"), "{e}");
    }
}
