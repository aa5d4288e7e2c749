//! Parsing a participant roster (CSV: `team,name,email`). Pure: no I/O, every bad row is
//! reported with its line number, and a roster with any bad row yields no rows at all.

use std::collections::HashMap;

use crate::RowError;
use crate::fields;

/// Most rows one import accepts.
pub const MAX_ROWS: usize = 5_000;

/// One valid row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterRow {
    pub line: u64,
    pub team: String,
    pub name: String,
    pub email: Option<String>,
}

/// Line breaks as the CSV reader sees them: `\n`, `\r\n` and a lone `\r` (old Mac files)
/// each end a line. (Found by fuzzing: counting `\n` alone put every row of a `\r` file on
/// line 1.)
fn line_breaks(bytes: &[u8]) -> u64 {
    let breaks = bytes
        .iter()
        .enumerate()
        .filter(|(i, b)| **b == b'\n' || (**b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count();
    u64::try_from(breaks).unwrap_or(u64::MAX)
}

/// Parses and validates a whole roster.
pub fn parse(text: &str) -> Result<Vec<RosterRow>, Vec<RowError>> {
    let mut errors = Vec::new();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let header = match records.next() {
        Some(Ok(header)) => header,
        Some(Err(e)) => {
            return Err(vec![RowError {
                line: 1,
                reason: format!("unreadable header: {e}"),
            }]);
        }
        None => {
            return Err(vec![RowError {
                line: 1,
                reason: "the file is empty; expected a header line `team,name,email`".into(),
            }]);
        }
    };
    let columns: Vec<String> = header
        .iter()
        .map(|c| c.trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    let expected_with_email = ["team", "name", "email"];
    if columns != expected_with_email[..2] && columns != expected_with_email {
        return Err(vec![RowError {
            line: 1,
            reason: format!(
                "header must be `team,name,email` (or `team,name`), found `{}`",
                columns.join(",")
            ),
        }]);
    }
    let width = columns.len();
    // Physical line of a byte offset (the csv crate's own count skips blank lines). Records
    // come in order, so newlines are counted on from the last record's offset: linear in
    // the file, however many blank lines it holds.
    let counted = std::cell::Cell::new((0_usize, 0_u64));
    let line_of = |position: Option<&csv::Position>| -> u64 {
        let mut byte = position
            .map_or(0, |p| usize::try_from(p.byte()).unwrap_or(usize::MAX))
            .min(text.len());
        // A record's position can point at blank lines before it; the record starts after them.
        while text
            .as_bytes()
            .get(byte)
            .is_some_and(|b| matches!(b, b'\r' | b'\n'))
        {
            byte += 1;
        }
        let (mut from, mut newlines) = counted.get();
        if byte < from {
            (from, newlines) = (0, 0);
        }
        newlines += line_breaks(&text.as_bytes()[from..byte]);
        counted.set((byte, newlines));
        newlines.saturating_add(1)
    };
    let mut rows = Vec::new();
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for record in records {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                let line = line_of(e.position());
                errors.push(RowError {
                    line,
                    reason: format!("unreadable row: {e}"),
                });
                continue;
            }
        };
        let line = line_of(record.position());
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != width {
            errors.push(RowError {
                line,
                reason: format!("expected {width} fields, found {}", record.len()),
            });
            continue;
        }
        if rows.len() + errors.len() >= MAX_ROWS {
            errors.push(RowError {
                line,
                reason: format!("too many rows: at most {MAX_ROWS} per import"),
            });
            break;
        }
        let team = record.get(0).unwrap_or_default();
        let name = record.get(1).unwrap_or_default();
        let email = record.get(2).filter(|e| !e.is_empty());
        let mut reasons = Vec::new();
        let team = fields::name("team", team, 100)
            .map_err(|e| reasons.push(e.to_string()))
            .ok();
        let name = fields::name("name", name, 200)
            .map_err(|e| reasons.push(e.to_string()))
            .ok();
        let email = fields::email("email", email)
            .map_err(|e| reasons.push(e.to_string()))
            .ok()
            .flatten();
        if let (Some(team), Some(name)) = (&team, &name) {
            let key = (team.to_lowercase(), name.to_lowercase());
            if let Some(first) = seen.insert(key, line) {
                reasons.push(format!(
                    "duplicate of line {first}: {name} is already in team {team}"
                ));
            }
        }
        match (team, name, reasons.is_empty()) {
            (Some(team), Some(name), true) => rows.push(RosterRow {
                line,
                team,
                name,
                email,
            }),
            _ => errors.push(RowError {
                line,
                reason: reasons.join("; "),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if rows.is_empty() {
        return Err(vec![RowError {
            line: 2,
            reason: "no participants: the file has a header but no rows".into(),
        }]);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(result: Result<Vec<RosterRow>, Vec<RowError>>) -> Vec<u64> {
        result
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.line)
            .collect()
    }

    #[test]
    fn rows_of_a_file_with_lone_carriage_returns_get_their_real_lines() {
        // A fuzz find: `\r` ends lines too, so no row is ever reported on the header's line.
        let crash = b"\xef\xbb\xbfTeam,NaMe\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r'*\xef\xbb\xbf,Nateao\nB,a\n";
        let text = std::str::from_utf8(crash).expect("utf-8");
        match parse(text) {
            Ok(rows) => assert!(rows.iter().all(|r| r.line >= 2), "{rows:?}"),
            Err(errors) => assert!(errors.iter().all(|e| e.line >= 2), "{errors:?}"),
        }
        let rows = parse("team,name\rRed,Ada\r\rBlue,Bob\r").expect("valid");
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4]);
        let rows = parse("team,name\r\nRed,Ada\r\n\r\nBlue,Bob\r\n").expect("valid");
        assert_eq!(
            rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 4],
            "\\r\\n is one break"
        );
    }

    #[test]
    fn good_roster() {
        let rows =
            parse("team,name,email\nRed, Ada ,ada@x.io\nRed,Bob,\n\nBlue,Cy,\n").expect("valid");
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            RosterRow {
                line: 2,
                team: "Red".into(),
                name: "Ada".into(),
                email: Some("ada@x.io".into())
            }
        );
        assert_eq!(rows[2].line, 5);
        assert!(parse("\u{feff}Team,Name\nRed,Ada\n").is_ok());
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let text =
            "team,name,email\nRed,,\nRed,Ada,not-an-email\nRed,Bob,,extra\nRed,Cy,\nred,cy,\n";
        assert_eq!(lines(parse(text)), vec![2, 3, 4, 6]);
        let errors = parse(text).err().unwrap_or_default();
        assert!(
            errors[0].reason.contains("name must not be empty"),
            "{}",
            errors[0].reason
        );
        assert!(errors[2].reason.contains("expected 3 fields, found 4"));
        assert!(errors[3].reason.contains("duplicate of line 5"));
    }

    #[test]
    fn header_and_empty_files() {
        assert_eq!(lines(parse("")), vec![1]);
        assert_eq!(lines(parse("who,what\nRed,Ada\n")), vec![1]);
        assert_eq!(lines(parse("team,name\n")), vec![2]);
    }

    #[test]
    fn quoted_fields_and_multiline_positions() {
        let rows =
            parse("team,name\n\"Red, the team\",\"Ada \"\"A\"\" L\"\nBlue,Bo\n").expect("valid");
        assert_eq!(rows[0].team, "Red, the team");
        assert_eq!(rows[0].name, "Ada \"A\" L");
        assert_eq!(rows[1].line, 3);
    }

    #[test]
    fn too_many_rows() {
        let mut text = String::from("team,name\n");
        for i in 0..=MAX_ROWS {
            text.push_str(&format!("T{},P{i}\n", i % 50));
        }
        let errors = parse(&text).err().unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].reason.contains("too many rows"));
    }

    #[test]
    fn half_a_million_blank_lines_keep_lines_right() {
        let mut text = String::from("team,name\nRed,Ada\n");
        text.push_str(&"\n".repeat(500_000));
        text.push_str("Red,\n");
        assert_eq!(
            lines(parse(&text)),
            vec![500_003],
            "the bad row's physical line"
        );
        let blank_rows = format!("team,name\n{}Red,Ada\n", " , \n".repeat(200_000));
        assert_eq!(
            parse(&blank_rows).map(|rows| rows[0].line),
            Ok(200_002),
            "rows of blank fields are skipped"
        );
    }

    /// A cheap fuzz oracle run as an ordinary test: arbitrary bytes never panic, and every
    /// reported line exists in the input.
    #[test]
    fn arbitrary_input_never_panics_and_lines_are_real() {
        let alphabet: &[u8] = b"team,name,email\n\r\"a@b.c ,\xc3\xa9x";
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = usize::try_from(state % 200).unwrap_or(0);
            let mut bytes = b"team,name,email\n".to_vec();
            let mut s = state;
            for _ in 0..len {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                bytes.push(alphabet[usize::try_from(s >> 59).unwrap_or(0) % alphabet.len()]);
            }
            let text = String::from_utf8_lossy(&bytes);
            // Lines as the CSV reader ends them (a lone `\r` too).
            let line_count = line_breaks(text.as_bytes()).saturating_add(1);
            match parse(&text) {
                Ok(rows) => assert!(rows.iter().all(|r| r.line >= 2 && r.line <= line_count)),
                Err(errors) => assert!(
                    errors
                        .iter()
                        .all(|e| e.line >= 1 && e.line <= line_count + 1),
                    "{errors:?} in {text:?}"
                ),
            }
        }
    }
}
