//! A rubric (organizers' TOML, with team names in it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let teams = ["red", "blue"];
    match labrack_wire::rubric::parse(text, |name| teams.contains(&name.to_lowercase().as_str())) {
        Ok(rubric) => {
            let json = serde_json::to_string(&rubric).expect("a parsed rubric serialises");
            assert!(!json.is_empty());
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
});
