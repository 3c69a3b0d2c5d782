//! Port profiles: named policies that ports take, with inheritance.
//!
//! ```yaml
//! kind: PortProfile
//! name: web
//! inherit: base                       # optional
//! vlan: { mode: access, id: 10 }
//! acl: { in: [ ... ], out: [ ... ] }  # see `acl`
//! qos: { in: { avg_mbps: 100 }, out: { avg_mbps: 100 }, mark: { dscp: 26 } }
//! security: { mac_limit: 1 }          # see `security`
//! dhcp_snooping: { trusted: true }    # may serve DHCP, send router advertisements
//! netflow: { monitor: default }       # see `netflow`
//! ```
//!
//! A profile sets some fields; the ones it leaves out come from the profile
//! it inherits, recursively. A set of profiles is checked whole: one bad
//! rule, an unknown parent or an inheritance cycle rejects all of them, with
//! a message that names the profile.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::acl::RawRule;
use crate::net::VlanModeRepr;
use crate::netflow::{NetflowBinding, NetflowMonitor, RawNetflow};
use crate::qos::{Marking, RawMarking, RawRateLimit};
use crate::security::RawSecurity;
use crate::{AclRule, Error, MacAddr, RateLimit, Security, VlanMode};

/// What a profile (or a port's own lines) sets; `None`: not set here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub vlan: Option<VlanMode>,
    pub acl_in: Option<Vec<AclRule>>,
    pub acl_out: Option<Vec<AclRule>>,
    pub qos_in: Option<RateLimit>,
    pub qos_out: Option<RateLimit>,
    pub mark: Option<Marking>,
    pub security: Option<Security>,
    pub netflow: Option<NetflowBinding>,
    /// `dhcp_snooping: { trusted }`: the port may serve DHCP and send
    /// router advertisements (a DHCP server's or a router's port).
    pub dhcp_trusted: Option<bool>,
}

impl Policy {
    /// `self` over `base`: what `self` sets wins, the rest comes from `base`.
    pub fn over(self, base: &Policy) -> Policy {
        Policy {
            vlan: self.vlan.or_else(|| base.vlan.clone()),
            acl_in: self.acl_in.or_else(|| base.acl_in.clone()),
            acl_out: self.acl_out.or_else(|| base.acl_out.clone()),
            qos_in: self.qos_in.or(base.qos_in),
            qos_out: self.qos_out.or(base.qos_out),
            mark: self.mark.or(base.mark),
            security: self.security.or_else(|| base.security.clone()),
            netflow: self.netflow.or_else(|| base.netflow.clone()),
            dhcp_trusted: self.dhcp_trusted.or(base.dhcp_trusted),
        }
    }

    /// Validate the policy fields of a profile or port; `at` names it.
    ///
    /// # Errors
    /// The first invalid field, named under `at`.
    pub fn from_raw(raw: &RawPolicy, at: &str) -> Result<Policy, Error> {
        let acl = raw.acl.as_ref();
        let qos = raw.qos.as_ref();
        let rules = |r: Option<&Vec<RawRule>>, dir: &str| {
            r.map(|r| AclRule::list_from_raw(r, &format!("{at}, acl.{dir}")))
                .transpose()
        };
        let limit = |r: Option<&RawRateLimit>, dir: &str| {
            let l = r
                .map(|r| RateLimit::from_raw(r, &format!("{at}, qos.{dir}")))
                .transpose()?;
            Ok::<_, Error>(l)
        };
        let vlan = raw
            .vlan
            .clone()
            .map(|v| {
                VlanMode::try_from(v).map_err(|e| Error::Rule {
                    at: at.to_string(),
                    field: "vlan".into(),
                    msg: e.to_string(),
                })
            })
            .transpose()?;
        Ok(Policy {
            vlan,
            acl_in: rules(acl.and_then(|a| a.inbound.as_ref()), "in")?,
            acl_out: rules(acl.and_then(|a| a.outbound.as_ref()), "out")?,
            qos_in: limit(qos.and_then(|q| q.inbound.as_ref()), "in")?,
            qos_out: limit(qos.and_then(|q| q.outbound.as_ref()), "out")?,
            mark: qos
                .and_then(|q| q.mark.as_ref())
                .map(|m| Marking::from_raw(m, &format!("{at}, qos.mark")))
                .transpose()?,
            security: raw
                .security
                .as_ref()
                .map(|s| Security::from_raw(s, &format!("{at}, security")))
                .transpose()?,
            netflow: raw
                .netflow
                .as_ref()
                .map(|n| NetflowBinding::from_raw(n, at))
                .transpose()?,
            dhcp_trusted: raw.dhcp_snooping.as_ref().map(|d| d.trusted),
        })
    }

    /// The security of a port whose VM has MAC `mac` and the IP bindings
    /// `ips`: with no allowed MACs listed, the VM's own is the one allowed;
    /// IP source guard allows the bindings and the profile's `allowed_ips`.
    pub fn security_for(&self, mac: Option<MacAddr>, ips: &[std::net::IpAddr]) -> Security {
        let mut s = self.security.clone().unwrap_or_default();
        if s.allowed_macs.is_empty() && self.security.is_some() {
            s.allowed_macs.extend(mac);
        }
        s.allowed_ips
            .extend(ips.iter().map(|&ip| ipnetwork::IpNetwork::from(ip)));
        s.dhcp_trusted = self.dhcp_trusted.unwrap_or(false);
        s
    }
}

/// The policy fields as written (in a profile or on a port).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default)]
    pub vlan: Option<VlanModeRepr>,
    #[serde(default)]
    pub acl: Option<RawAcl>,
    #[serde(default)]
    pub qos: Option<RawQos>,
    #[serde(default)]
    pub security: Option<RawSecurity>,
    #[serde(default)]
    pub netflow: Option<RawNetflow>,
    #[serde(default)]
    pub dhcp_snooping: Option<RawDhcpSnooping>,
}

/// Access lists as written: `acl: { in: [rules], out: [rules] }` (`in`:
/// traffic into the VM, `out`: traffic the VM sends).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcl {
    #[serde(default, rename = "in")]
    pub inbound: Option<Vec<RawRule>>,
    #[serde(default, rename = "out")]
    pub outbound: Option<Vec<RawRule>>,
}

/// Rate limits and marks as written: `qos: { in: …, out: …, mark: … }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQos {
    #[serde(default, rename = "in")]
    pub inbound: Option<RawRateLimit>,
    #[serde(default, rename = "out")]
    pub outbound: Option<RawRateLimit>,
    #[serde(default)]
    pub mark: Option<RawMarking>,
}

/// `dhcp_snooping: { trusted: true }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDhcpSnooping {
    #[serde(default)]
    pub trusted: bool,
}

/// A profile document as written. (Its policy fields repeat [`RawPolicy`]'s:
/// serde cannot flatten a struct and still refuse unknown fields, and a
/// misspelt field must not pass unnoticed.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub inherit: Option<String>,
    #[serde(default)]
    pub vlan: Option<VlanModeRepr>,
    #[serde(default)]
    pub acl: Option<RawAcl>,
    #[serde(default)]
    pub qos: Option<RawQos>,
    #[serde(default)]
    pub security: Option<RawSecurity>,
    #[serde(default)]
    pub netflow: Option<RawNetflow>,
    #[serde(default)]
    pub dhcp_snooping: Option<RawDhcpSnooping>,
}

/// Check a set of profiles whole and resolve their inheritance: each name
/// maps to its full policy.
///
/// # Errors
/// The first problem, naming the profile: a bad field, a kind other than
/// PortProfile, a duplicate name, an unknown parent, a cycle.
pub fn resolve(raws: &[RawProfile]) -> Result<BTreeMap<String, Policy>, Error> {
    let bad = |name: &str, field: &str, msg: String| Error::Rule {
        at: format!("profile `{name}`"),
        field: field.to_string(),
        msg,
    };
    let mut own: BTreeMap<String, (Policy, Option<String>)> = BTreeMap::new();
    for r in raws {
        if r.kind != "PortProfile" {
            return Err(bad(
                &r.name,
                "kind",
                format!(
                    "`{}` is not a kind this file may hold: expected PortProfile",
                    r.kind
                ),
            ));
        }
        if r.name.is_empty() {
            return Err(bad(&r.name, "name", "the profile name is empty".into()));
        }
        let raw = RawPolicy {
            vlan: r.vlan.clone(),
            acl: r.acl.clone(),
            qos: r.qos.clone(),
            security: r.security.clone(),
            netflow: r.netflow.clone(),
            dhcp_snooping: r.dhcp_snooping.clone(),
        };
        let policy = Policy::from_raw(&raw, &format!("profile `{}`", r.name))?;
        if own
            .insert(r.name.clone(), (policy, r.inherit.clone()))
            .is_some()
        {
            return Err(bad(&r.name, "name", "another profile has this name".into()));
        }
    }
    let mut done: BTreeMap<String, Policy> = BTreeMap::new();
    for name in own.keys() {
        let mut chain = vec![name.clone()];
        let mut cur = name.clone();
        while let Some(parent) = own.get(&cur).and_then(|(_, p)| p.clone()) {
            if !own.contains_key(&parent) {
                let known: Vec<&str> = own.keys().map(String::as_str).collect();
                return Err(bad(
                    &cur,
                    "inherit",
                    format!(
                        "unknown profile `{parent}`; profiles here: {}",
                        known.join(", ")
                    ),
                ));
            }
            if chain.contains(&parent) {
                chain.push(parent);
                return Err(bad(
                    name,
                    "inherit",
                    format!("profiles inherit in a cycle: {}", chain.join(" → ")),
                ));
            }
            chain.push(parent.clone());
            cur = parent;
        }
        // Apply from the root down.
        let mut policy = Policy::default();
        for n in chain.iter().rev() {
            policy = own[n].0.clone().over(&policy);
        }
        done.insert(name.clone(), policy);
    }
    Ok(done)
}

/// Check that every monitor the profiles name exists among `monitors`.
///
/// # Errors
/// The first profile naming an unknown monitor, with the known ones.
pub fn check_monitors(
    profiles: &BTreeMap<String, Policy>,
    monitors: &BTreeMap<String, NetflowMonitor>,
) -> Result<(), Error> {
    for (name, p) in profiles {
        if let Some(n) = &p.netflow {
            if !monitors.contains_key(&n.monitor) {
                return Err(Error::Rule {
                    at: format!("profile `{name}`"),
                    field: "netflow.monitor".into(),
                    msg: unknown_monitor(&n.monitor, monitors),
                });
            }
        }
    }
    Ok(())
}

/// "unknown monitor `x`; monitors here: a, b".
pub fn unknown_monitor(name: &str, monitors: &BTreeMap<String, NetflowMonitor>) -> String {
    let known: Vec<&str> = monitors.keys().map(String::as_str).collect();
    format!(
        "unknown monitor `{name}`; monitors here: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles(yaml: &str) -> Result<BTreeMap<String, Policy>, Error> {
        let raws: Vec<RawProfile> = serde_norway::from_str(yaml).unwrap();
        resolve(&raws)
    }

    #[test]
    fn children_take_what_they_leave_out_from_their_parents() {
        let p = profiles(
            "- { kind: PortProfile, name: base, vlan: { mode: access, id: 10 }, qos: { in: { avg_mbps: 100 } } }\n\
             - { kind: PortProfile, name: web, inherit: base, acl: { in: [ { action: permit, proto: tcp, dst_port: 80 } ] } }\n\
             - { kind: PortProfile, name: web20, inherit: web, vlan: { mode: access, id: 20 } }\n",
        )
        .unwrap();
        let web20 = &p["web20"];
        assert_eq!(
            web20.vlan,
            Some(VlanMode::Access(crate::VlanId::new(20).unwrap()))
        );
        assert_eq!(web20.acl_in.as_ref().unwrap().len(), 1);
        assert_eq!(web20.qos_in.unwrap().avg_bps, 100_000_000);
        assert!(p["base"].acl_in.is_none());
    }

    #[test]
    fn bad_sets_are_rejected_naming_the_profile() {
        let e = |y: &str| profiles(y).unwrap_err().to_string();
        assert_eq!(
            e("- { kind: PortProfile, name: web, acl: { in: [ { action: permit }, { action: permit, proto: tcp, dst_port: 70000 } ] } }\n"),
            "profile `web`, acl.in[1], dst_port: port 70000 is out of range 0..=65535"
        );
        assert_eq!(
            e("- { kind: PortProfile, name: web, inherit: base2 }\n- { kind: PortProfile, name: base }\n"),
            "profile `web`, inherit: unknown profile `base2`; profiles here: base, web"
        );
        assert!(e("- { kind: PortProfile, name: a, inherit: b }\n- { kind: PortProfile, name: b, inherit: a }\n")
            .contains("inherit in a cycle: a → b → a"));
        assert!(e("- { kind: Profile, name: a }\n").contains("expected PortProfile"));
        assert!(
            e("- { kind: PortProfile, name: a }\n- { kind: PortProfile, name: a }\n")
                .contains("another profile has this name")
        );
        assert!(e(
            "- { kind: PortProfile, name: a, qos: { in: { avg_mbps: 100, peak_mbps: 50 } } }\n"
        )
        .starts_with("profile `a`, qos.in, peak_mbps"));
        assert_eq!(
            e("- { kind: PortProfile, name: a, vlan: { mode: trunk, allowed: [] } }\n"),
            "profile `a`, vlan: a trunk's allowed VLAN list is empty: allow at least one VLAN (e.g. allowed: [10, 20-30])"
        );
    }
}
