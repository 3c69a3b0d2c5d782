//! dvs's logical chassis: port profiles, hosts, ports, bindings, the embedded
//! store and the admin and agent gRPC services.
//!
//! Nothing is built here yet: the controller is its own issue. The crate
//! exists so that the workspace has the layout `DESIGN.md` describes.

#![forbid(unsafe_code)]
