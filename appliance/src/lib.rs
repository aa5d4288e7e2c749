//! The LabRack appliance: control plane, API and web UI (`labrack serve`).

pub mod agents;
pub mod attempts;
pub mod audit;
pub mod billing;
pub mod checks;
pub mod cli;
pub mod clock;
pub mod error;
pub mod events;
pub mod http;
pub mod jobs;
pub mod labs;
pub mod llm;
pub mod metrics;
pub mod outbox;
pub mod passwords;
pub mod probe;
pub use labrack_wire::roster;
pub use labrack_wire::rubric;
pub mod scores;
pub mod secrets;
pub mod store;
pub mod sync;
