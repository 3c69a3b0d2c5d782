//! Network-namespace topologies for the end-to-end suite.
