//! Cloud sync, the appliance's side: the relay that sends the outbox to the cloud
//! (`labrack-cloud`, its own crate and binary). The link's TLS is `labrack_serving::sync_link`.

/// The frames, in `labrack-wire` (parsed with no I/O there, and fuzzed).
pub use labrack_wire::sync as protocol;
pub mod relay;
pub mod session;
