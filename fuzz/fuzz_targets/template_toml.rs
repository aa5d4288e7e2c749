//! Lab templates (organizers' TOML): parse, and every error names a line in the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = labrack_provisioner::template::parse(text) {
        assert!(!errors.is_empty());
    }
});
