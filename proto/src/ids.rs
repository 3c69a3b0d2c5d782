//! Identities that never change when a VM moves.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A VM port's chassis-wide ID, shown as `vethN` (N ≥ 1).
///
/// Counters, flow records (as ifIndex) and views are keyed by it; it stays the
/// same when the VM migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "PortIdRepr", into = "String")]
pub struct PortId(u32);

impl PortId {
    /// The ID with number `n`; `None` for 0, which no port has.
    pub const fn new(n: u32) -> Option<Self> {
        if n == 0 {
            None
        } else {
            Some(Self(n))
        }
    }

    /// The number inside (what NetFlow exports as the interface index).
    pub const fn number(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "veth{}", self.0)
    }
}

impl FromStr for PortId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let digits = s.strip_prefix("veth").unwrap_or(s);
        digits
            .parse::<u32>()
            .ok()
            .and_then(PortId::new)
            .ok_or_else(|| Error::PortIdSyntax(s.to_string()))
    }
}

impl From<PortId> for String {
    fn from(p: PortId) -> String {
        p.to_string()
    }
}

/// What a file may say for a port ID: `veth7`, `"7"` or `7`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortIdRepr {
    Num(u64),
    Text(String),
}

impl TryFrom<PortIdRepr> for PortId {
    type Error = Error;
    fn try_from(r: PortIdRepr) -> Result<Self, Error> {
        match r {
            PortIdRepr::Num(n) => u32::try_from(n)
                .ok()
                .and_then(PortId::new)
                .ok_or_else(|| Error::PortIdSyntax(n.to_string())),
            PortIdRepr::Text(s) => s.parse(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_id_forms() {
        assert_eq!("veth7".parse::<PortId>().unwrap().number(), 7);
        assert_eq!("7".parse::<PortId>().unwrap().to_string(), "veth7");
        assert!("veth0".parse::<PortId>().is_err());
        assert!("eth1".parse::<PortId>().is_err());
        let p: PortId = serde_norway::from_str("veth12").unwrap();
        assert_eq!(p.number(), 12);
        let p: PortId = serde_norway::from_str("12").unwrap();
        assert_eq!(p.number(), 12);
        let e = serde_norway::from_str::<PortId>("0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vethN"), "{e}");
    }
}
