//! Private VLANs: a primary VLAN with isolated and community secondaries,
//! declared once for the chassis (`kind: PrivateVlan` documents; an agent
//! file's `private_vlans:`).
//!
//! ```yaml
//! kind: PrivateVlan
//! name: tenants
//! primary: 100
//! isolated: 101          # at most one isolated secondary per primary
//! community: [102, 103]
//! ```
//!
//! The primary and its secondaries are one layer-2 domain (one MAC table):
//! - a promiscuous port (`{ mode: pvlan-promiscuous, primary: 100 }`, a
//!   router or a DHCP server) reaches every port of the domain;
//! - an isolated port (`{ mode: pvlan-host, primary: 100, secondary: 101 }`)
//!   reaches promiscuous ports only;
//! - a community port reaches its community and the promiscuous ports.
//!
//! Each frame keeps the VLAN it was sent in — the sender's secondary, or the
//! primary for a promiscuous sender — on trunks (as its tag), over VXLAN
//! (as that VLAN's VNI) and in flow records; receivers decide by it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{VlanId, VlanMode};

/// What a VLAN is in a private VLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Isolated,
    Community,
}

/// One private VLAN as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateVlan {
    pub primary: VlanId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolated: Option<VlanId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub community: Vec<VlanId>,
}

impl PrivateVlan {
    /// The primary, then the secondaries.
    pub fn vlans(&self) -> impl Iterator<Item = VlanId> + '_ {
        std::iter::once(self.primary)
            .chain(self.isolated)
            .chain(self.community.iter().copied())
    }
}

/// The chassis's private VLANs, checked as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivateVlans {
    decls: Vec<PrivateVlan>,
    /// Each VLAN of a private VLAN: its primary and role.
    roles: BTreeMap<VlanId, (VlanId, Role)>,
}

impl PrivateVlans {
    /// Check declarations, each with where it came from (`at`, for errors):
    /// every private VLAN has a secondary, no VLAN is in two of them (one
    /// secondary under two primaries) or twice in one.
    ///
    /// # Errors
    /// A message naming the declaration and the VLAN at fault.
    pub fn new(list: Vec<(String, PrivateVlan)>) -> Result<Self, String> {
        let mut roles: BTreeMap<VlanId, (VlanId, Role)> = BTreeMap::new();
        let mut whose: BTreeMap<VlanId, String> = BTreeMap::new();
        let mut decls = Vec::new();
        for (at, d) in list {
            if d.isolated.is_none() && d.community.is_empty() {
                return Err(format!(
                    "{at}: private VLAN {} has no secondary VLAN: give `isolated: VLAN` and/or `community: [VLAN, ...]`",
                    d.primary
                ));
            }
            let mine = std::iter::once((d.primary, Role::Primary))
                .chain(d.isolated.map(|v| (v, Role::Isolated)))
                .chain(d.community.iter().map(|v| (*v, Role::Community)));
            for (v, role) in mine {
                if let Some((p, r)) = roles.get(&v) {
                    let other = &whose[&v];
                    return Err(if *p == d.primary {
                        format!(
                            "{at}: VLAN {v} appears twice in private VLAN {} (as {} and as {})",
                            d.primary,
                            role_name(*r),
                            role_name(role)
                        )
                    } else {
                        format!(
                            "{at}: VLAN {v} is already the {} VLAN of private VLAN {p} ({other}): \
                             a VLAN belongs to one private VLAN only",
                            role_name(*r)
                        )
                    });
                }
                roles.insert(v, (d.primary, role));
                whose.insert(v, at.clone());
            }
            decls.push(d);
        }
        decls.sort_by_key(|d| d.primary);
        Ok(PrivateVlans { decls, roles })
    }

    pub fn is_empty(&self) -> bool {
        self.decls.is_empty()
    }

    /// The declarations, by primary.
    pub fn decls(&self) -> &[PrivateVlan] {
        &self.decls
    }

    /// VLAN `v`'s primary and role, when it is part of a private VLAN.
    pub fn role(&self, v: VlanId) -> Option<(VlanId, Role)> {
        self.roles.get(&v).copied()
    }

    /// The private VLAN whose primary is `primary`.
    pub fn get(&self, primary: VlanId) -> Option<&PrivateVlan> {
        self.decls.iter().find(|d| d.primary == primary)
    }

    /// [`PrivateVlans::check_mode`] without the message (a frame's check).
    pub fn allows(&self, mode: &VlanMode) -> bool {
        match mode {
            VlanMode::Trunk { .. } => true,
            VlanMode::Access(v) => self.role(*v).is_none(),
            VlanMode::PvlanPromiscuous { primary } => {
                self.role(*primary) == Some((*primary, Role::Primary))
            }
            VlanMode::PvlanHost { primary, secondary } => matches!(
                self.role(*secondary),
                Some((p, Role::Isolated | Role::Community)) if p == *primary
            ),
        }
    }

    /// Is a port's VLAN mode one these declarations allow? A private VLAN's
    /// VLANs take pvlan ports (and trunks, toward a PVLAN-aware upstream),
    /// not plain access ports; a pvlan port names a declared primary and
    /// one of its secondaries.
    ///
    /// # Errors
    /// A message saying what is wrong and what would be valid.
    pub fn check_mode(&self, mode: &VlanMode) -> Result<(), String> {
        if self.allows(mode) {
            return Ok(());
        }
        match mode {
            VlanMode::Trunk { .. } => Ok(()),
            VlanMode::Access(v) => match self.role(*v) {
                None => Ok(()),
                Some((p, Role::Primary)) => Err(format!(
                    "VLAN {v} is the primary VLAN of a private VLAN: its ports take \
                     `{{ mode: pvlan-promiscuous, primary: {p} }}` or `{{ mode: pvlan-host, primary: {p}, secondary: ... }}`"
                )),
                Some((p, _)) => Err(format!(
                    "VLAN {v} is a secondary VLAN of private VLAN {p}: its ports take \
                     `{{ mode: pvlan-host, primary: {p}, secondary: {v} }}`"
                )),
            },
            VlanMode::PvlanPromiscuous { primary } => match self.role(*primary) {
                Some((p, Role::Primary)) if p == *primary => Ok(()),
                Some((p, r)) => Err(format!(
                    "VLAN {primary} is the {} VLAN of private VLAN {p}, not a primary: \
                     use `{{ mode: pvlan-promiscuous, primary: {p} }}`",
                    role_name(r)
                )),
                None => Err(self.undeclared(*primary, "a private VLAN's primary")),
            },
            VlanMode::PvlanHost { primary, secondary } => match self.role(*secondary) {
                Some((p, Role::Isolated | Role::Community)) if p == *primary => Ok(()),
                Some((p, Role::Isolated | Role::Community)) => Err(format!(
                    "VLAN {secondary} is a secondary VLAN of private VLAN {p}, not of {primary}: \
                     use `{{ mode: pvlan-host, primary: {p}, secondary: {secondary} }}`"
                )),
                Some((_, Role::Primary)) => Err(format!(
                    "VLAN {secondary} is a primary VLAN, not a secondary: name one of private VLAN \
                     {secondary}'s isolated or community VLANs ({})",
                    self.get(*secondary)
                        .map(secondaries)
                        .unwrap_or_default()
                )),
                None => Err(self.undeclared(*secondary, "a private VLAN's secondary")),
            },
        }
    }

    fn undeclared(&self, v: VlanId, what: &str) -> String {
        let declared = if self.decls.is_empty() {
            "none is declared (a `kind: PrivateVlan` document declares one)".to_string()
        } else {
            let all: Vec<String> = self
                .decls
                .iter()
                .map(|d| format!("{} ({})", d.primary, secondaries(d)))
                .collect();
            format!("declared: {}", all.join("; "))
        };
        format!("VLAN {v} is not {what}: {declared}")
    }

    /// The VLANs a host with a port in `mode` must have: a pvlan port's
    /// whole private VLAN (it may hear from any of them); otherwise the
    /// VLANs the port carries.
    pub fn vlans_of(&self, mode: &VlanMode) -> Vec<VlanId> {
        match mode {
            VlanMode::Access(v) => vec![*v],
            VlanMode::Trunk { allowed, .. } => allowed.iter().collect(),
            VlanMode::PvlanHost { primary, .. } | VlanMode::PvlanPromiscuous { primary } => self
                .get(*primary)
                .map(|d| d.vlans().collect())
                .unwrap_or_default(),
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Isolated => "isolated",
        Role::Community => "community",
    }
}

fn secondaries(d: &PrivateVlan) -> String {
    let mut s: Vec<String> = Vec::new();
    if let Some(i) = d.isolated {
        s.push(format!("isolated {i}"));
    }
    if !d.community.is_empty() {
        let c: Vec<String> = d.community.iter().map(ToString::to_string).collect();
        s.push(format!("community {}", c.join(", ")));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> VlanId {
        VlanId::new(n).unwrap()
    }

    fn decl(p: u32, i: Option<u32>, c: &[u32]) -> PrivateVlan {
        PrivateVlan {
            primary: v(p),
            isolated: i.map(v),
            community: c.iter().map(|x| v(*x)).collect(),
        }
    }

    fn set(list: &[PrivateVlan]) -> Result<PrivateVlans, String> {
        PrivateVlans::new(
            list.iter()
                .enumerate()
                .map(|(i, d)| (format!("private VLAN {}", i + 1), d.clone()))
                .collect(),
        )
    }

    #[test]
    fn roles_and_domains() {
        let s = set(&[decl(100, Some(101), &[102, 103]), decl(200, None, &[201])]).unwrap();
        assert_eq!(s.role(v(101)), Some((v(100), Role::Isolated)));
        assert_eq!(s.role(v(103)), Some((v(100), Role::Community)));
        assert_eq!(s.role(v(200)), Some((v(200), Role::Primary)));
        assert_eq!(s.role(v(10)), None);
        let host = VlanMode::PvlanHost {
            primary: v(100),
            secondary: v(102),
        };
        assert_eq!(s.vlans_of(&host), vec![v(100), v(101), v(102), v(103)]);
        assert!(s.check_mode(&host).is_ok());
        assert!(s
            .check_mode(&VlanMode::PvlanPromiscuous { primary: v(200) })
            .is_ok());
        assert!(s.check_mode(&VlanMode::Access(v(10))).is_ok());
    }

    #[test]
    fn bad_declarations_are_named() {
        let e = set(&[decl(100, None, &[])]).unwrap_err();
        assert!(e.contains("private VLAN 100 has no secondary VLAN"), "{e}");
        let e = set(&[decl(100, Some(101), &[]), decl(200, Some(101), &[])]).unwrap_err();
        assert_eq!(
            e,
            "private VLAN 2: VLAN 101 is already the isolated VLAN of private VLAN 100 \
             (private VLAN 1): a VLAN belongs to one private VLAN only"
        );
        let e = set(&[decl(100, Some(101), &[101])]).unwrap_err();
        assert!(
            e.contains("VLAN 101 appears twice in private VLAN 100"),
            "{e}"
        );
        let e = set(&[decl(100, Some(100), &[])]).unwrap_err();
        assert!(e.contains("VLAN 100 appears twice"), "{e}");
    }

    #[test]
    fn bad_modes_are_named() {
        let s = set(&[decl(100, Some(101), &[102]), decl(200, Some(201), &[])]).unwrap();
        let e = s
            .check_mode(&VlanMode::PvlanHost {
                primary: v(200),
                secondary: v(101),
            })
            .unwrap_err();
        assert_eq!(
            e,
            "VLAN 101 is a secondary VLAN of private VLAN 100, not of 200: \
             use `{ mode: pvlan-host, primary: 100, secondary: 101 }`"
        );
        let e = s
            .check_mode(&VlanMode::PvlanHost {
                primary: v(100),
                secondary: v(105),
            })
            .unwrap_err();
        assert_eq!(
            e,
            "VLAN 105 is not a private VLAN's secondary: declared: 100 (isolated 101, \
             community 102); 200 (isolated 201)"
        );
        let e = s.check_mode(&VlanMode::Access(v(102))).unwrap_err();
        assert!(
            e.contains("pvlan-host, primary: 100, secondary: 102"),
            "{e}"
        );
        let e = s.check_mode(&VlanMode::Access(v(100))).unwrap_err();
        assert!(e.contains("primary VLAN of a private VLAN"), "{e}");
        let e = s
            .check_mode(&VlanMode::PvlanPromiscuous { primary: v(101) })
            .unwrap_err();
        assert!(e.contains("not a primary"), "{e}");
        let e = PrivateVlans::default()
            .check_mode(&VlanMode::PvlanPromiscuous { primary: v(7) })
            .unwrap_err();
        assert!(e.contains("none is declared"), "{e}");
    }

    #[test]
    fn modes_read_from_yaml() {
        let m: VlanMode =
            serde_norway::from_str("{ mode: pvlan-host, primary: 100, secondary: 101 }").unwrap();
        assert_eq!(
            m,
            VlanMode::PvlanHost {
                primary: v(100),
                secondary: v(101)
            }
        );
        assert_eq!(m.untagged_vlan(), Some(v(101)));
        let m: VlanMode =
            serde_norway::from_str("{ mode: pvlan-promiscuous, primary: 100 }").unwrap();
        assert_eq!(m.summary(), "pvlan-promiscuous 100");
        let e = serde_norway::from_str::<VlanMode>("{ mode: pvlan-host, primary: 100 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("secondary"), "{e}");
        let e = serde_norway::from_str::<VlanMode>(
            "{ mode: pvlan-host, primary: 100, secondary: 100 }",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must differ from its primary"), "{e}");
        let d: PrivateVlan =
            serde_norway::from_str("{ primary: 100, isolated: 101, community: [102] }").unwrap();
        assert_eq!(d, decl(100, Some(101), &[102]));
        assert!(serde_norway::from_str::<PrivateVlan>("{ isolated: 101 }")
            .unwrap_err()
            .to_string()
            .contains("primary"));
    }
}
