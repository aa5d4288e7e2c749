//! The desktop viewer's binary input messages (keys, pointer, wheel) from the browser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = labrack_wire::input::decode(data);
});
