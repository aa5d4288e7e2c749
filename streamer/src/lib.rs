//! The streamer: what puts a lab into a browser tab.
//!
//! - [`terminal`]: the SSH bridge behind the browser terminal (ssh2), verified against the
//!   host key the lab host reported.
//!
//! The RDP → WebRTC desktop pipeline (issue 4) will live here too.

pub mod convert;
pub mod desktop;
pub mod encode;
pub mod input;
pub mod rdp;
pub mod terminal;
pub mod webrtc;
