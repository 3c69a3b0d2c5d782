//! dvs's shared language: the validated domain types every crate uses.
//!
//! Organisation: [`ids`] holds identities (port IDs `vethN`), [`net`] the
//! network newtypes ([`VlanId`], [`Vni`], [`MacAddr`], [`VlanSet`]) and the
//! port's VLAN mode ([`VlanMode`]), [`acl`] access-control rules. Each type is built only through a checked
//! constructor (`new`, `TryFrom`, `FromStr`, or serde, which goes through the
//! same checks), so a value that exists is valid: code past the edge never
//! re-checks a VLAN range.
//!
//! [`api`] is the gRPC schema (`proto/dvs/v1/dvs.proto`), generated at build
//! time without `protoc`. This crate does no I/O.

#![deny(unsafe_code)]

pub mod acl;
pub mod api;
pub mod desired;
pub mod ids;
pub mod net;
pub mod netflow;
pub mod profile;
pub mod pvlan;
pub mod qos;
pub mod security;
pub mod stats;

pub use acl::{AclRule, Action};
pub use ids::PortId;
pub use net::{MacAddr, VlanId, VlanMode, VlanSet, Vni};
pub use netflow::{FlowDirection, FlowVersion, NetflowBinding, NetflowMonitor};
pub use qos::RateLimit;
pub use security::Security;

/// The names an error message offers as valid — `a, b, c`, or `none`.
pub fn known_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Why a value offered at the edge (a file, a command line, a peer) is not valid.
///
/// Every message names the offending value and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("VLAN {0} is out of range 1..=4094")]
    VlanRange(u32),
    #[error("VNI {0} is out of range 1..=16777215")]
    VniRange(u64),
    #[error("MAC address `{0}` is not valid: expected six hex octets like 02:00:00:00:00:01")]
    MacSyntax(String),
    #[error("VLAN list item `{0}` is not valid: expected a VLAN ID or a range like 20-30 within 1..=4094")]
    VlanListSyntax(String),
    #[error(
        "a trunk's allowed VLAN list is empty: allow at least one VLAN (e.g. allowed: [10, 20-30])"
    )]
    EmptyTrunk,
    #[error("trunk native VLAN {native} is not in the allowed list {allowed}")]
    NativeNotAllowed { native: u16, allowed: String },
    #[error("a pvlan-host port's secondary VLAN must differ from its primary ({0} is both): name the isolated or community VLAN it is in")]
    PvlanSame(u16),
    #[error("port ID `{0}` is not valid: expected vethN with N in 1..=4294967295")]
    PortIdSyntax(String),
    #[error("{at}, {field}: {msg}")]
    Rule {
        at: String,
        field: String,
        msg: String,
    },
}
