//! dvs's live-migration protocol (a sans-IO state machine), the port-state
//! snapshot format and the VMM hook adapters.
//!
//! Nothing is built here yet: migration is its own issue. The crate exists so
//! that the workspace has the layout `DESIGN.md` describes.

#![forbid(unsafe_code)]
