//! dvs's logical chassis: port profiles, hosts, ports, bindings, the embedded
//! store, the admin and agent gRPC services, and live migrations.
//!
//! - [`chassis`]: the state and its rules, sans-IO — every change checked
//!   whole first, versioned, and cut into what each host must run;
//! - [`store`]: the embedded transactional database (redb) under the
//!   controller's `--data-dir`: what [`chassis`] marks dirty is written in
//!   one transaction, and the chassis is rebuilt from it at start with the
//!   same IDs and module numbers;
//! - [`server`]: the admin and agent gRPC services over both;
//! - [`client`]: the admin commands of the `dvs` binary and their views;
//! - [`hook`]: `dvs hook libvirt`, libvirt's qemu hook against the
//!   controller.

#![forbid(unsafe_code)]

pub mod chassis;
pub mod client;
pub mod hook;
pub mod server;
pub mod store;

/// Why a controller operation was refused; each message names the thing
/// at fault and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (a document, a field, a name).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The change contradicts the chassis (something in use, taken).
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error("store {path}: {msg}")]
    Store { path: String, msg: String },
}
