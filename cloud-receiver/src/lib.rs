//! `labrack-cloud`: the central cloud that appliances sync to, a deployable of its own.
//!
//! - [`store`]: the cloud database (appliances, tokens, one stream of rows per appliance
//!   epoch) and the idempotent apply;
//! - [`receiver`]: the QUIC server (enrolment, hello, batches, acknowledgements) and its
//!   limits for strangers;
//! - [`read_api`]: the HTTPS read API (bearer admin token), answering with [`error`]'s
//!   problem documents.
//!
//! Architecture invariant: this crate links no streaming, desktop or SSH code (no IronRDP,
//! webrtc, codecs or ssh2); what it shares with the appliance is the wire protocol
//! (`labrack-wire`), the server plumbing (`labrack-serving`) and the ranking
//! (`labrack-provisioner`).

pub mod clock;
pub mod error;
pub mod read_api;
pub mod receiver;
pub mod store;
