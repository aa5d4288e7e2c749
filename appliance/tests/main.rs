//! The crate's integration tests, one binary: each module below was its own binary,
//! and linking the crate once for all of them is most of their build time.

mod common;

mod api;
mod assist;
mod billing;
mod host_protocol;
mod jobs;
mod labs;
mod scores;
