//! Network newtypes: VLAN IDs and sets, VXLAN network identifiers, MAC
//! addresses, and a port's VLAN mode.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// An 802.1Q VLAN ID usable for a segment: 1..=4094 (0 means "priority tag
/// only" and 4095 is reserved, so neither names a segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u16")]
pub struct VlanId(u16);

impl VlanId {
    pub const MIN: u16 = 1;
    pub const MAX: u16 = 4094;

    /// # Errors
    /// [`Error::VlanRange`] outside 1..=4094.
    pub fn new(id: u32) -> Result<Self, Error> {
        if (u32::from(Self::MIN)..=u32::from(Self::MAX)).contains(&id) {
            Ok(Self(id as u16))
        } else {
            Err(Error::VlanRange(id))
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for VlanId {
    type Error = Error;
    fn try_from(v: u32) -> Result<Self, Error> {
        Self::new(v)
    }
}

impl From<VlanId> for u16 {
    fn from(v: VlanId) -> u16 {
        v.0
    }
}

impl fmt::Display for VlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A VXLAN network identifier (24 bits, RFC 7348); 0 is not used for a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = (1 << 24) - 1;

    /// # Errors
    /// [`Error::VniRange`] outside 1..=16777215.
    pub fn new(v: u64) -> Result<Self, Error> {
        if (1..=u64::from(Self::MAX)).contains(&v) {
            Ok(Self(v as u32))
        } else {
            Err(Error::VniRange(v))
        }
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u64> for Vni {
    type Error = Error;
    fn try_from(v: u64) -> Result<Self, Error> {
        Self::new(v)
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Group (multicast or broadcast) addresses have the I/G bit set.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    pub fn is_zero(self) -> bool {
        self == Self::ZERO
    }

    /// The address as the low 48 bits of a u64 (for hashing and table keys).
    pub const fn to_u64(self) -> u64 {
        let b = self.0;
        (b[0] as u64) << 40
            | (b[1] as u64) << 32
            | (b[2] as u64) << 24
            | (b[3] as u64) << 16
            | (b[4] as u64) << 8
            | b[5] as u64
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let err = || Error::MacSyntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for o in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// A set of VLAN IDs (a trunk's allowed list), as a 4096-bit map.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<VlanListItem>", into = "Vec<VlanListItem>")]
pub struct VlanSet(Box<[u64; 64]>);

impl VlanSet {
    pub fn empty() -> Self {
        Self(Box::new([0; 64]))
    }

    pub fn insert(&mut self, v: VlanId) {
        let i = usize::from(v.get());
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub fn contains(&self, v: VlanId) -> bool {
        self.contains_raw(v.get())
    }

    /// Membership of a raw 12-bit VID from a frame (0 and 4095 are never members).
    pub fn contains_raw(&self, vid: u16) -> bool {
        let i = usize::from(vid & 0x0fff);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = VlanId> + '_ {
        (VlanId::MIN..=VlanId::MAX)
            .filter(|v| self.contains_raw(*v))
            .map(VlanId)
    }

    /// The set as sorted ranges `(first, last)`.
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        for v in self.iter() {
            match out.last_mut() {
                Some((_, last)) if *last + 1 == v.get() => *last = v.get(),
                _ => out.push((v.get(), v.get())),
            }
        }
        out
    }
}

impl fmt::Display for VlanSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges()
            .into_iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        write!(f, "[{}]", parts.join(","))
    }
}

impl fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromIterator<VlanId> for VlanSet {
    fn from_iter<T: IntoIterator<Item = VlanId>>(iter: T) -> Self {
        let mut s = Self::empty();
        for v in iter {
            s.insert(v);
        }
        s
    }
}

/// One item of a VLAN list in a file: `10` or `"20-30"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VlanListItem {
    One(u32),
    Range(String),
}

impl TryFrom<Vec<VlanListItem>> for VlanSet {
    type Error = Error;
    fn try_from(items: Vec<VlanListItem>) -> Result<Self, Error> {
        let mut set = VlanSet::empty();
        for item in items {
            match item {
                VlanListItem::One(v) => set.insert(VlanId::new(v)?),
                VlanListItem::Range(s) => {
                    let bad = || Error::VlanListSyntax(s.clone());
                    let (a, b) = match s.split_once('-') {
                        Some((a, b)) => (a.trim(), b.trim()),
                        None => (s.trim(), s.trim()),
                    };
                    let a: u32 = a.parse().map_err(|_| bad())?;
                    let b: u32 = b.parse().map_err(|_| bad())?;
                    let (a, b) = (VlanId::new(a)?, VlanId::new(b)?);
                    if a > b {
                        return Err(bad());
                    }
                    for v in a.get()..=b.get() {
                        set.insert(VlanId(v));
                    }
                }
            }
        }
        Ok(set)
    }
}

impl From<VlanSet> for Vec<VlanListItem> {
    fn from(s: VlanSet) -> Self {
        s.ranges()
            .into_iter()
            .map(|(a, b)| {
                if a == b {
                    VlanListItem::One(u32::from(a))
                } else {
                    VlanListItem::Range(format!("{a}-{b}"))
                }
            })
            .collect()
    }
}

/// How a port carries VLANs.
///
/// - `Access`: the VM sends and receives untagged frames, all on one VLAN; a
///   tagged frame from the VM is dropped (no VLAN hopping).
/// - `Trunk`: the VM sends tagged frames for the allowed VLANs; untagged frames
///   belong to the native VLAN, if there is one (and are dropped otherwise).
///   A trunk carrying a private VLAN's VLANs is PVLAN-aware: each frame
///   leaves tagged with the VLAN it was sent in (a secondary's frames with
///   the secondary's tag), as vSphere's distributed switch does toward its
///   upstream.
/// - `PvlanHost`: an access port of a private VLAN's secondary (isolated or
///   community, as the chassis declares it: [`crate::pvlan`]); untagged.
/// - `PvlanPromiscuous`: an access port of a private VLAN's primary, which
///   reaches every port of the private VLAN; untagged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "VlanModeRepr", into = "VlanModeRepr")]
pub enum VlanMode {
    Access(VlanId),
    Trunk {
        allowed: VlanSet,
        native: Option<VlanId>,
    },
    PvlanHost {
        primary: VlanId,
        secondary: VlanId,
    },
    PvlanPromiscuous {
        primary: VlanId,
    },
}

impl VlanMode {
    /// A trunk, checked: the list is not empty and holds the native VLAN.
    ///
    /// # Errors
    /// [`Error::EmptyTrunk`], [`Error::NativeNotAllowed`].
    pub fn trunk(allowed: VlanSet, native: Option<VlanId>) -> Result<Self, Error> {
        if allowed.is_empty() {
            return Err(Error::EmptyTrunk);
        }
        if let Some(n) = native {
            if !allowed.contains(n) {
                return Err(Error::NativeNotAllowed {
                    native: n.get(),
                    allowed: allowed.to_string(),
                });
            }
        }
        Ok(VlanMode::Trunk { allowed, native })
    }

    /// Does the port carry VLAN `v`? A private VLAN's port carries its
    /// primary (whose MAC table it shares) and the VLAN it sends in.
    pub fn carries(&self, v: VlanId) -> bool {
        match self {
            VlanMode::Access(a) => *a == v,
            VlanMode::Trunk { allowed, .. } => allowed.contains(v),
            VlanMode::PvlanHost { primary, secondary } => *primary == v || *secondary == v,
            VlanMode::PvlanPromiscuous { primary } => *primary == v,
        }
    }

    /// The VLAN of the port's untagged frames — where its VM's own MAC
    /// lives — if any: the access VLAN, the trunk's native VLAN, a
    /// pvlan-host's secondary, a promiscuous port's primary.
    pub fn untagged_vlan(&self) -> Option<VlanId> {
        match self {
            VlanMode::Access(a) => Some(*a),
            VlanMode::Trunk { native, .. } => *native,
            VlanMode::PvlanHost { secondary, .. } => Some(*secondary),
            VlanMode::PvlanPromiscuous { primary } => Some(*primary),
        }
    }

    /// How the port is shown: `access 10`, `trunk [10,20-30] native 10`,
    /// `pvlan-host 100/101`, `pvlan-promiscuous 100`.
    pub fn summary(&self) -> String {
        match self {
            VlanMode::Access(v) => format!("access {v}"),
            VlanMode::Trunk { allowed, native } => match native {
                Some(n) => format!("trunk {allowed} native {n}"),
                None => format!("trunk {allowed}"),
            },
            VlanMode::PvlanHost { primary, secondary } => {
                format!("pvlan-host {primary}/{secondary}")
            }
            VlanMode::PvlanPromiscuous { primary } => format!("pvlan-promiscuous {primary}"),
        }
    }
}

/// The file form: `{ mode: access, id: 10 }`,
/// `{ mode: trunk, allowed: [10, 20-30], native: 10 }`,
/// `{ mode: pvlan-host, primary: 100, secondary: 101 }` or
/// `{ mode: pvlan-promiscuous, primary: 100 }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum VlanModeRepr {
    Access {
        id: VlanId,
    },
    Trunk {
        allowed: Vec<VlanListItem>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        native: Option<VlanId>,
    },
    #[serde(rename = "pvlan-host")]
    PvlanHost {
        primary: VlanId,
        secondary: VlanId,
    },
    #[serde(rename = "pvlan-promiscuous")]
    PvlanPromiscuous {
        primary: VlanId,
    },
}

impl TryFrom<VlanModeRepr> for VlanMode {
    type Error = Error;
    fn try_from(r: VlanModeRepr) -> Result<Self, Error> {
        match r {
            VlanModeRepr::Access { id } => Ok(VlanMode::Access(id)),
            VlanModeRepr::Trunk { allowed, native } => {
                VlanMode::trunk(VlanSet::try_from(allowed)?, native)
            }
            VlanModeRepr::PvlanHost { primary, secondary } => {
                if primary == secondary {
                    return Err(Error::PvlanSame(primary.get()));
                }
                Ok(VlanMode::PvlanHost { primary, secondary })
            }
            VlanModeRepr::PvlanPromiscuous { primary } => {
                Ok(VlanMode::PvlanPromiscuous { primary })
            }
        }
    }
}

impl From<VlanMode> for VlanModeRepr {
    fn from(m: VlanMode) -> Self {
        match m {
            VlanMode::Access(id) => VlanModeRepr::Access { id },
            VlanMode::Trunk { allowed, native } => VlanModeRepr::Trunk {
                allowed: allowed.into(),
                native,
            },
            VlanMode::PvlanHost { primary, secondary } => {
                VlanModeRepr::PvlanHost { primary, secondary }
            }
            VlanMode::PvlanPromiscuous { primary } => VlanModeRepr::PvlanPromiscuous { primary },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vlan_range() {
        assert!(VlanId::new(0).is_err());
        assert!(VlanId::new(4095).is_err());
        assert_eq!(
            VlanId::new(5000).unwrap_err().to_string(),
            "VLAN 5000 is out of range 1..=4094"
        );
        assert_eq!(VlanId::new(4094).unwrap().get(), 4094);
    }

    #[test]
    fn vni_range() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(1 << 24).is_err());
        assert_eq!(Vni::new(5000).unwrap().get(), 5000);
    }

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:00:01");
        assert!("02:ab:cd:00:00".parse::<MacAddr>().is_err());
        assert!("02:ab:cd:00:00:01:02".parse::<MacAddr>().is_err());
        assert!("zz:ab:cd:00:00:01".parse::<MacAddr>().is_err());
        assert!(MacAddr::BROADCAST.is_multicast());
    }

    #[test]
    fn vlan_mode_from_yaml() {
        let m: VlanMode = serde_norway::from_str("{ mode: access, id: 10 }").unwrap();
        assert_eq!(m, VlanMode::Access(VlanId::new(10).unwrap()));
        let m: VlanMode =
            serde_norway::from_str("{ mode: trunk, allowed: [10, 20-30], native: 10 }").unwrap();
        match &m {
            VlanMode::Trunk { allowed, native } => {
                assert_eq!(allowed.to_string(), "[10,20-30]");
                assert_eq!(native.unwrap().get(), 10);
            }
            _ => panic!("expected a trunk"),
        }
        assert!(m.carries(VlanId::new(25).unwrap()));
        assert!(!m.carries(VlanId::new(11).unwrap()));
    }

    #[test]
    fn vlan_mode_errors_name_the_problem() {
        let e = serde_norway::from_str::<VlanMode>("{ mode: access, id: 5000 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("VLAN 5000 is out of range 1..=4094"), "{e}");
        let e = serde_norway::from_str::<VlanMode>("{ mode: access, id: 0 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("VLAN 0 is out of range"), "{e}");
        let e = serde_norway::from_str::<VlanMode>("{ mode: trunk, allowed: [] }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed VLAN list is empty"), "{e}");
        let e = serde_norway::from_str::<VlanMode>("{ mode: trunk, allowed: [20], native: 10 }")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("native VLAN 10 is not in the allowed list [20]"),
            "{e}"
        );
        let e = serde_norway::from_str::<VlanMode>("{ mode: trunk, allowed: [30-20] }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`30-20`"), "{e}");
        let e = serde_norway::from_str::<VlanMode>("{ mode: hybrid, id: 1 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("access") && e.contains("trunk"), "{e}");
    }

    proptest! {
        #[test]
        fn vlan_set_round_trips(vs in proptest::collection::vec(1u32..=4094, 1..50)) {
            let set: VlanSet = vs.iter().map(|v| VlanId::new(*v).unwrap()).collect();
            let items: Vec<VlanListItem> = set.clone().into();
            let back = VlanSet::try_from(items).unwrap();
            prop_assert_eq!(&back, &set);
            for v in &vs {
                prop_assert!(back.contains_raw(*v as u16));
            }
        }

        #[test]
        fn mac_round_trips(b in any::<[u8; 6]>()) {
            let m = MacAddr(b);
            prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        }
    }
}
