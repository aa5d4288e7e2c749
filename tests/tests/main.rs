//! The crate's integration tests, one binary: each module below was its own binary,
//! and linking the crate once for all of them is most of their build time.

mod common;

mod abuse;
mod console;
mod drill;
mod durability;
mod e2e;
mod lab_attacks;
mod lab_host;
mod lab_hosts;
mod sync;
