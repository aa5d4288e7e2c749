//! The provisioner's I/O-free core, shared by the appliance and `labrack-host`:
//!
//! - [`inventory`]: placement of a new lab on the enrolled host with room and GPUs;
//! - [`template`]: lab templates organizers write in TOML, validated with line-precise errors;
//! - [`allocation`]: the allocation state machine and its reconciler step (time is a
//!   parameter, outputs are typed host tasks);
//! - [`protocol`]: the versioned wire types of the appliance↔host task protocol;
//! - [`limits`]: what a lab may use of its host, what a host can enforce, whether it fits;
//! - [`roles`]: staff roles and the named sets the API's rules use;
//! - [`replay`]: which signed host calls to take (replays, one identity on two machines);
//! - [`check`]: what a check run means (verdict, `FAIL:` reasons, output truncation);
//! - [`event`]: an event's states, their legal transitions and what each allows;
//! - [`ranking`]: the leaderboard's order (the appliance's board and the cloud's).
//!
//! Architecture invariant: this crate knows nothing of HTTP, SQLite, clocks or sockets.

pub mod allocation;
pub mod check;
pub mod event;
pub mod inventory;
pub mod limits;
pub mod protocol;
pub mod ranking;
pub mod replay;
pub mod roles;
pub mod template;
