//! dvs's per-host datapath and host agent.
//!
//! Organisation, from the bytes up (each layer uses only those above it):
//! - [`wire`]: the only module that reads or writes packet bytes;
//! - [`pipeline`]: the sans-IO switch core ([`Switch`]): VLAN handling, MAC
//!   learning ([`pipeline::mactable`]), forwarding and flooding, VXLAN
//!   segments, counters (their types are `dvs_proto::stats`, the stats
//!   every side reads);
//! - [`policy`]: port policy the pipeline runs — access lists, connection
//!   tracking, rate limits, port security;
//! - [`flow`]: the flow tables the pipeline feeds for NetFlow/IPFIX, and
//!   [`flow::export`], which turns their records into v5/v9/IPFIX messages
//!   (`wire::netflow`) for the collectors;
//! - [`driver`]: the core wired to ports and the VXLAN socket (receive and
//!   switch on one thread, send on another), interfaces reconciled with
//!   ports, and the system calls — the only `unsafe` code;
//! - [`agent`]: the host agent built on them — the static file
//!   ([`agent::config`]), a host's part in a live migration
//!   ([`agent::migration`]), the session with the controller
//!   ([`agent::remote`]);
//!
//! Prometheus metrics are `dvs-metrics`'s, from the stats types of
//! `dvs_proto::stats` that every side shares.
//!
//! What this crate must not do: talk to the controller's store, or read the
//! clock or touch I/O inside `wire`, `pipeline`, `policy` or `flow`.

#![deny(unsafe_code)]

pub mod agent;
pub mod driver;
pub mod flow;
pub mod pipeline;
pub mod policy;
pub mod wire;

pub use agent::migration::tracked_port_state;
pub use dvs_proto::stats::{DropReason, PortCounters, TunnelCounters};
pub use pipeline::mactable::Location;
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
