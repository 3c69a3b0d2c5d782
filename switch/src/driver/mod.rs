//! The driver: the switch core wired to real ports and the VXLAN socket.
//!
//! - [`port`]: what the driver needs of a port's device and of the VXLAN
//!   uplink;
//! - [`datapath`]: the receive side — reads ports and the uplink into pooled
//!   buffers, runs the pipeline, hands switched frames on;
//! - [`transmit`]: the send side — tagging, offloads, VXLAN encapsulation
//!   and batching, shaping — inline or on a thread of its own;
//! - [`attach`]: each port reconciled with the interface it names, driven
//!   by the kernel's link notifications ([`netlink`] parses them);
//! - [`sys`]: the system calls — the only module of dvs allowed `unsafe`.
//!
//! Policy is not decided here: the driver moves frames where the pipeline
//! says.

pub mod attach;
pub mod datapath;
pub mod netlink;
pub mod port;
pub mod sys;
pub mod transmit;
