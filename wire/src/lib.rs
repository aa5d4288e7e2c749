//! The bytes that reach the appliance from outside — a roster a staff member uploads, a
//! rubric, the cloud link's frames, a browser's desktop and terminal messages — parsed and
//! checked here, with no I/O and no state, so each parser can be fuzzed on its own
//! (`cargo xtask fuzz`). The appliance uses these and nothing else to read them.

pub mod desktop;
pub mod fields;
#[cfg(feature = "desktop-input")]
pub mod input;
pub mod roster;
pub mod rubric;
pub mod sync;
pub mod terminal;

use serde::Serialize;
use utoipa::ToSchema;

/// One bad line of an uploaded file.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line number in the uploaded file
    pub line: u64,
    /// what is wrong with it
    pub reason: String,
}
