//! dvs's live-migration protocol (a sans-IO state machine), the port-state
//! snapshot format and the VMM hook adapters.
//!
//! Built so far: [`snapshot`], the versioned, CRC-checked, size-bounded
//! envelope in which a port's runtime state travels from the source host to
//! the destination. The protocol and the hooks are the rest of the
//! migration issue.

#![forbid(unsafe_code)]

pub mod snapshot;
