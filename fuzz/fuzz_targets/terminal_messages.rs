//! What a browser terminal sends as text: its hello, then control messages.
#![no_main]

use labrack_wire::terminal::{Control, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Hello>(data);
    let _ = serde_json::from_slice::<Control>(data);
});
