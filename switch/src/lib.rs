//! dvs's per-host datapath and host agent.
//!
//! Organisation, from the bytes up:
//! - [`wire`]: the only module that reads or writes packet bytes;
//! - [`pipeline`]: the sans-IO switch core ([`Switch`]): VLAN handling, MAC
//!   learning, forwarding and flooding, VXLAN segments, counters;
//! - [`mactable`], [`counters`]: its tables and counters;
//! - [`acl`], [`conntrack`], [`qos`], [`security`]: port policy in the
//!   pipeline;
//! - [`flow`]: the flow tables the pipeline feeds for NetFlow/IPFIX, and
//!   [`export`], which turns their records into v5/v9/IPFIX messages
//!   (`wire::netflow`) for the collectors;
//! - [`config`]: the static agent file (`dvs agent --config`), validated whole;
//! - [`sys`]: the system calls (TAP devices, AF_PACKET sockets, UDP batching)
//!   — the only module allowed `unsafe`;
//! - [`datapath`] and [`transmit`]: the driver that wires the core to ports
//!   and the VXLAN socket — receive and switch on one thread, send on
//!   another;
//! - [`metrics`]: the Prometheus text endpoint of agents and controller;
//! - [`migration`]: a host's part in a live migration (standby, stop and
//!   hand over, start from the handed-over state, announce);
//! - [`agent`]: the agent's datapath loop built on them (a static file, or
//!   configurations from a controller), and [`remote`]: the agent's session
//!   with the controller (full state, deltas, acks, reports, the saved
//!   state for headless restarts).
//!
//! What this crate must not do: talk to the controller's store, or read the
//! clock or touch I/O inside `pipeline`.

#![deny(unsafe_code)]

pub mod acl;
pub mod agent;
pub mod attach;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod datapath;
pub mod export;
pub mod flow;
pub mod mactable;
pub mod metrics;
pub mod migration;
pub mod netlink;
pub mod pipeline;
pub mod qos;
pub mod remote;
pub mod security;
pub mod sys;
pub mod transmit;
pub mod wire;

pub use counters::{DropReason, PortCounters, TunnelCounters};
pub use mactable::Location;
pub use migration::tracked_port_state;
pub use pipeline::{
    Egress, Ingress, LastFrames, Output, PortAcl, PortConfig, PortNetflow, PortNo, PortQos,
    PortState, Processed, SegmentConfig, Switch, SwitchConfig, Verdict,
};

/// Errors of the datapath and the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("port `{port}` duplicates the name or ID of port {existing}")]
    DuplicatePort { port: String, existing: String },
    #[error("no port number {0} on this switch")]
    UnknownPortNo(u16),
    #[error("too many ports: a switch holds at most 65535")]
    TooManyPorts,
    #[error("VNI {vni} is already used by VLAN {vlan}: each segment needs its own VNI")]
    VniInUse { vni: u32, vlan: u16 },
    #[error("config file {path}: {msg}")]
    Config { path: String, msg: String },
    /// What was being done and the OS's reason, in one message ("attaching
    /// to interface `vnet3`: No such device (os error 19)").
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
}

impl Error {
    /// An I/O error with what was being done (`what` names the device or file).
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause: source,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn io_errors_name_the_object_and_keep_the_os_reason() {
        let e = super::Error::io(
            "attaching to interface `vnet3`",
            std::io::Error::from_raw_os_error(libc::ENODEV),
        );
        assert_eq!(
            e.to_string(),
            "attaching to interface `vnet3`: No such device (os error 19)"
        );
    }
}
