//! Cloud sync (issue 6): the wire protocol, TLS for the link, the appliance's relay and the
//! cloud's receiver (`labrack cloud`) with its read API.

pub mod cloud;
pub mod protocol;
pub mod read_api;
pub mod relay;
pub mod tls;
