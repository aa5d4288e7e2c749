//! Cloud sync (issue 6): the wire protocol, TLS for the link, the appliance's relay and the
//! cloud's receiver (`labrack cloud`) with its read API.

pub mod cloud;
/// The frames, in `labrack-wire` (parsed with no I/O there, and fuzzed).
pub use labrack_wire::sync as protocol;
pub mod read_api;
pub mod relay;
pub mod tls;
