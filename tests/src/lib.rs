//! dvs's multi-host tests.
//!
//! (The in-process lab, `dvs lab`, is its own crate: `dvs-lab`.)
//!
//! - `tests/netns.rs`: the end-to-end suite on real kernels (network
//!   namespaces, TAP devices, the Linux vxlan device as a peer); needs root,
//!   and uses [`netns`] to build and clean up its topologies;
//!   `tests/netflow.rs` checks flow exports with real collectors
//!   ([`collector`]: nfcapd/nfdump and tshark); `tests/controller.rs` runs
//!   a whole chassis — controller and agents — through the `dvs` command
//!   line ([`chassis`]); `tests/qemu.rs` runs real QEMU guests as its VMs,
//!   the libvirt hook called in libvirt's order ([`qemu`]); [`dhcp`] runs
//!   real DHCP software for the snooping tests.

#![forbid(unsafe_code)]

pub mod chassis;
pub mod collector;
pub mod dhcp;
pub mod guestmove;
pub mod netns;
pub mod qemu;
