//! Port security, as admins write it in port profiles, validated.
//!
//! ```yaml
//! security:
//!   allowed_macs: ["02:00:00:00:00:01"]     # default: the port's own MAC
//!   allowed_ips: [10.0.0.0/24]              # with ip_source_guard, beside
//!                                           # each port's own bindings
//!   ip_source_guard: true                   # IP, ARP and ND senders must match
//!                                           # the port's bindings (`--ip`)
//!   mac_limit: 1                            # distinct source MACs (trunks)
//!   storm_control: { broadcast_pps: 100, multicast_pps: 1000 }
//! ```

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::{Error, MacAddr};

/// A validated port-security policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Security {
    /// Source MACs the VM may use (empty: any, subject to `mac_limit`).
    pub allowed_macs: Vec<MacAddr>,
    /// Source addresses the VM may use when `ip_source_guard` is on,
    /// beside the port's own bindings (a profile is shared by many VMs:
    /// a VM's own addresses are bound to its port, `dvs port create
    /// --ip`).
    pub allowed_ips: Vec<IpNetwork>,
    pub ip_source_guard: bool,
    /// The most distinct source MACs the port may use.
    pub mac_limit: Option<u32>,
    /// Broadcast frames per second the VM may send.
    pub broadcast_pps: Option<u32>,
    /// Multicast (non-broadcast) frames per second the VM may send.
    pub multicast_pps: Option<u32>,
    /// The port may serve DHCP and send IPv6 router advertisements (a
    /// profile's `dhcp_snooping: { trusted: true }`); other ports' server
    /// messages are dropped (the rogue-server and router guards).
    pub dhcp_trusted: bool,
}

/// The file form.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    #[serde(default)]
    pub allowed_macs: Vec<String>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub ip_source_guard: bool,
    #[serde(default)]
    pub mac_limit: Option<u64>,
    #[serde(default)]
    pub storm_control: Option<RawStorm>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorm {
    #[serde(default)]
    pub broadcast_pps: Option<u64>,
    #[serde(default)]
    pub multicast_pps: Option<u64>,
}

impl Security {
    /// Validate `raw`; `at` names it in errors (e.g. "security"). With no
    /// `allowed_macs`, a port later allows its VM's own MAC
    /// ([`crate::profile::Policy::security_for`]).
    ///
    /// # Errors
    /// [`Error::Rule`] naming the field and what would be valid.
    pub fn from_raw(raw: &RawSecurity, at: &str) -> Result<Self, Error> {
        let bad = |field: &str, msg: String| Error::Rule {
            at: at.to_string(),
            field: field.to_string(),
            msg,
        };
        let mut allowed_macs = Vec::new();
        for (i, m) in raw.allowed_macs.iter().enumerate() {
            let mac: MacAddr = m
                .parse()
                .map_err(|e: Error| bad(&format!("allowed_macs[{i}]"), e.to_string()))?;
            if mac.is_multicast() || mac.is_zero() {
                return Err(bad(
                    &format!("allowed_macs[{i}]"),
                    format!("{mac} is not a unicast address"),
                ));
            }
            allowed_macs.push(mac);
        }
        let mut allowed_ips = Vec::new();
        for (i, s) in raw.allowed_ips.iter().enumerate() {
            let n: IpNetwork = s.parse().map_err(|_| {
                bad(
                    &format!("allowed_ips[{i}]"),
                    format!("`{s}` is not an IP address or prefix"),
                )
            })?;
            allowed_ips.push(n);
        }
        let mac_limit = match raw.mac_limit {
            None => None,
            Some(n) if (1..=65_536).contains(&n) => Some(n as u32),
            Some(n) => return Err(bad("mac_limit", format!("{n} is out of range 1..=65536"))),
        };
        let pps = |field: &str, v: Option<u64>| -> Result<Option<u32>, Error> {
            match v {
                None => Ok(None),
                Some(n) if (1..=10_000_000).contains(&n) => Ok(Some(n as u32)),
                Some(n) => Err(bad(
                    field,
                    format!("{n} is out of range 1..=10000000 frames/s"),
                )),
            }
        };
        let storm = raw.storm_control.clone().unwrap_or_default();
        Ok(Security {
            allowed_macs,
            allowed_ips,
            ip_source_guard: raw.ip_source_guard,
            mac_limit,
            broadcast_pps: pps("storm_control.broadcast_pps", storm.broadcast_pps)?,
            multicast_pps: pps("storm_control.multicast_pps", storm.multicast_pps)?,
            dhcp_trusted: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(yaml: &str, mac: Option<MacAddr>) -> Result<Security, Error> {
        let raw: RawSecurity = serde_norway::from_str(yaml).unwrap();
        let s = Security::from_raw(&raw, "security")?;
        Ok(crate::profile::Policy {
            security: Some(s),
            ..Default::default()
        }
        .security_for(mac, &[]))
    }

    #[test]
    fn the_port_mac_is_the_default_allowed_mac() {
        let mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let s = sec(
            "{ ip_source_guard: true, allowed_ips: [10.0.0.5] }",
            Some(mac),
        )
        .unwrap();
        assert_eq!(s.allowed_macs, vec![mac]);
        assert_eq!(s.allowed_ips[0].prefix(), 32);
        let s = sec(
            "{ mac_limit: 4, storm_control: { broadcast_pps: 100 } }",
            None,
        )
        .unwrap();
        assert!(s.allowed_macs.is_empty());
        assert_eq!(
            (s.mac_limit, s.broadcast_pps, s.multicast_pps),
            (Some(4), Some(100), None)
        );
    }

    #[test]
    fn ip_source_guard_alone_means_the_ports_bindings() {
        let s = sec("{ mac_limit: 1, ip_source_guard: true }", None).unwrap();
        assert!(s.ip_source_guard && s.allowed_ips.is_empty());
        let raw: RawSecurity = serde_norway::from_str("{ ip_source_guard: true }").unwrap();
        let p = crate::profile::Policy {
            security: Some(Security::from_raw(&raw, "security").unwrap()),
            ..Default::default()
        };
        let bound = p.security_for(None, &["10.0.0.5".parse().unwrap()]);
        assert_eq!(
            bound.allowed_ips,
            ["10.0.0.5/32".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn bad_security_names_the_field() {
        let e = |y: &str| sec(y, None).unwrap_err().to_string();
        assert_eq!(
            e("{ mac_limit: 0 }"),
            "security, mac_limit: 0 is out of range 1..=65536"
        );
        assert!(e("{ allowed_macs: [\"ff:ff:ff:ff:ff:ff\"] }").contains("not a unicast address"));
        assert!(e("{ allowed_ips: [10.0.0.0/40] }").contains("allowed_ips[0]"));
        assert!(
            e("{ storm_control: { broadcast_pps: 0 } }").contains("storm_control.broadcast_pps")
        );
    }
}
