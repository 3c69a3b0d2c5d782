//! Port policy in the pipeline: what a port lets through and how fast.
//!
//! - [`acl`]: access lists compiled to integer masks, first match wins;
//! - [`conntrack`]: the connections `stateful` rules committed;
//! - [`qos`]: average / peak / burst policers and DSCP marking;
//! - [`security`]: source MAC/IP checks, ARP/ND inspection, MAC limit,
//!   storm control.
//!
//! Sans-IO like the pipeline that runs them: time comes in as `now`.

pub mod acl;
pub mod conntrack;
pub mod qos;
pub mod security;
