//! What every LabRack server process stands on, the appliance (`labrack`) and the cloud
//! receiver (`labrack-cloud`) alike:
//!
//! - [`data_dir`]: a private data directory (umask 077, 0700, files 0600);
//! - [`certificates`]: the process's own CA and server certificate, and self-signed client
//!   identities, made at first start and kept in `DATA/tls/`;
//! - [`sqlite`]: connections with the pragmas that make an acknowledged write durable, and
//!   the versioned migration runner;
//! - [`sync_link`]: TLS for the QUIC link between an appliance and the cloud;
//! - [`priority`]: threads that step back when the cores are short;
//! - [`tokens`]: high-entropy secret tokens and the hash stored instead of them.
//!
//! Architecture invariant: nothing here knows HTTP, the event's domain or video.

pub mod certificates;
pub mod data_dir;
pub mod priority;
pub mod sqlite;
pub mod sync_link;
pub mod tokens;
