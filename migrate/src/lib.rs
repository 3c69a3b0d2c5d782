//! dvs's live-migration protocol (a sans-IO state machine), the port-state
//! snapshot format, the control stream's lanes and the VMM hook adapters.
//!
//! - [`protocol`]: the coordinator's state machine for one port's
//!   migration (its sequence diagram is in the module); the controller runs
//!   it (`dvs_controller::server`), the hosts do their part
//!   (`dvs_switch::agent::migration`);
//! - [`snapshot`]: the versioned, CRC-checked, size-bounded envelope in
//!   which a port's runtime state travels from the source host to the
//!   destination;
//! - [`lanes`]: the control stream's two lanes, so that pre-copies never
//!   hold up a switchover;
//! - [`libvirt`]: libvirt's qemu hook protocol (`dvs hook libvirt`).

#![forbid(unsafe_code)]

pub mod lanes;
pub mod libvirt;
pub mod protocol;
pub mod snapshot;
