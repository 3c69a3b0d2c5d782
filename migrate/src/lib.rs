//! dvs's live-migration protocol (a sans-IO state machine), the port-state
//! snapshot format and the VMM hook adapters.
//!
//! Built so far: [`protocol`], the coordinator's state machine for one
//! port's migration (its sequence diagram is in the module), and
//! [`snapshot`], the versioned, CRC-checked, size-bounded envelope in which
//! a port's runtime state travels from the source host to the destination.
//! Wiring them to the controller, the agents and the VMM hooks is the rest
//! of the migration issue.

#![forbid(unsafe_code)]

pub mod protocol;
pub mod snapshot;
