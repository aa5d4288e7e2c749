//! The streamer: what puts a lab into a browser tab.
//!
//! - [`terminal`]: the SSH bridge behind the browser terminal (ssh2), verified against the
//!   host key the lab host reported.
//! - The desktop pipeline: [`rdp`] (IronRDP session, with [`clipboard`] and display control)
//!   → [`convert`] (damage-only RGBA → I420) → [`encode`] (H.264) → [`desktop`] (one encode
//!   per desktop, fanned out) → [`webrtc`] (one peer connection per viewer), with [`input`]
//!   carrying keyboard and mouse back and [`rate`] turning receiver feedback into bitrate.
//! - [`thumbnail`]: small JPEG stills of a desktop for the staff's wall (no encoder needed).

pub mod clipboard;
pub mod convert;
pub mod desktop;
pub mod encode;
/// The viewer's input messages, in `labrack-wire` (parsed with no I/O there, and fuzzed).
pub use labrack_wire::input;
pub mod rate;
pub mod rdp;
pub mod terminal;
pub mod thumbnail;
pub mod webrtc;
