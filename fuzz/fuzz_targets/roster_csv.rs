//! A roster upload (staff, or anyone who stole a staff session): CSV, any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Every kind of line break the CSV reader knows (`\n`, `\r\n`, a lone `\r`) counts.
    let bytes = text.as_bytes();
    let breaks = bytes.iter().enumerate().filter(|(i, b)| **b == b'\n' || (**b == b'\r' && bytes.get(i + 1) != Some(&b'\n'))).count();
    let lines = u64::try_from(breaks).unwrap_or(u64::MAX).saturating_add(2);
    match labrack_wire::roster::parse(text) {
        Ok(rows) => {
            assert!(!rows.is_empty() && rows.len() <= labrack_wire::roster::MAX_ROWS);
            for row in rows {
                assert!(row.line >= 2 && row.line <= lines, "line {} of {lines}", row.line);
                assert!(!row.team.is_empty() && !row.name.is_empty());
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in errors {
                assert!(error.line >= 1 && error.line <= lines, "line {} of {lines}", error.line);
            }
        }
    }
});
