//! What a check run means, shared by the host that runs it and the appliance that scores
//! it: the verdict rules (exit status, time-out, the `FAIL: reason` line) and safe
//! truncation of captured output. No I/O.

use serde::{Deserialize, Serialize};

/// Captured output kept per stream (stdout, stderr); the rest is counted, not kept.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;
/// The longest participant-facing message (characters).
pub const MAX_MESSAGE_CHARS: usize = 300;

/// How a check run ended on the host, as reported to the appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub passed: bool,
    /// the participant-facing reason when it did not pass
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// the script's exit status; none when it was killed
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// stdout, then stderr, each cut to [`MAX_OUTPUT_BYTES`] (staff only)
    pub output: String,
}

/// A stream's captured bytes: the first [`MAX_OUTPUT_BYTES`] and how many more there were.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    pub head: Vec<u8>,
    pub dropped: u64,
}

impl Captured {
    /// Keeps what fits, counts the rest.
    pub fn push(&mut self, bytes: &[u8]) {
        let room = MAX_OUTPUT_BYTES.saturating_sub(self.head.len());
        let kept = bytes.len().min(room);
        self.head.extend_from_slice(&bytes[..kept]);
        self.dropped = self
            .dropped
            .saturating_add(u64::try_from(bytes.len() - kept).unwrap_or(u64::MAX));
    }

    /// The text, valid UTF-8 with control characters other than newline and tab removed,
    /// and a note of what was cut.
    pub fn text(&self) -> String {
        // A cut can split a multi-byte character: lossy decoding turns it into U+FFFD.
        let mut text: String = String::from_utf8_lossy(&self.head)
            .chars()
            .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
            .collect();
        if self.dropped > 0 {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[… {} more bytes not kept]\n", self.dropped));
        }
        text
    }
}

/// The last `FAIL: reason` line of the output, cleaned and capped.
pub fn fail_reason(stdout: &str, stderr: &str) -> Option<String> {
    stdout
        .lines()
        .chain(stderr.lines())
        .filter_map(|line| line.trim_start().strip_prefix("FAIL:"))
        .next_back()
        .map(|reason| {
            let clean: String = reason
                .trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_MESSAGE_CHARS)
                .collect();
            if clean.is_empty() {
                "the check failed".to_owned()
            } else {
                clean
            }
        })
}

/// The verdict: a check passes when its script exits 0 within its time and prints no
/// `FAIL:` line. A failure's message is its `FAIL:` reason, or says what happened.
pub fn verdict(
    exit_code: Option<i32>,
    timed_out: bool,
    timeout_secs: u32,
    stdout: &str,
    stderr: &str,
) -> (bool, Option<String>) {
    let reason = fail_reason(stdout, stderr);
    if timed_out {
        return (
            false,
            Some(
                reason
                    .unwrap_or_else(|| format!("the check did not finish within {timeout_secs} s")),
            ),
        );
    }
    match (exit_code, reason) {
        (Some(0), None) => (true, None),
        (_, Some(reason)) => (false, Some(reason)),
        (Some(code), None) => (false, Some(format!("the check exited with status {code}"))),
        (None, None) => (
            false,
            Some("the check was killed (it may have run out of memory)".to_owned()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(Some(0), false, 10, "all good\n", ""), (true, None));
        assert_eq!(
            verdict(Some(1), false, 10, "FAIL: port 8080 is closed\n", ""),
            (false, Some("port 8080 is closed".into()))
        );
        assert_eq!(
            verdict(Some(0), false, 10, "FAIL: first\nFAIL: last\n", ""),
            (false, Some("last".into())),
            "the last FAIL line wins, even on exit 0"
        );
        assert_eq!(
            verdict(Some(0), false, 10, "", "  FAIL: from stderr"),
            (false, Some("from stderr".into()))
        );
        assert_eq!(
            verdict(Some(3), false, 10, "", ""),
            (false, Some("the check exited with status 3".into()))
        );
        assert_eq!(
            verdict(None, true, 7, "", ""),
            (false, Some("the check did not finish within 7 s".into()))
        );
        assert_eq!(
            verdict(None, false, 7, "", ""),
            (
                false,
                Some("the check was killed (it may have run out of memory)".into())
            )
        );
        assert_eq!(
            verdict(Some(1), false, 7, "FAIL:\n", ""),
            (false, Some("the check failed".into()))
        );
        let long = format!("FAIL: {}\u{7}x", "é".repeat(500));
        let message = verdict(Some(1), false, 7, &long, "").1.expect("message");
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS);
        assert!(!message.contains('\u{7}'));
    }

    #[test]
    fn output_is_cut_on_a_budget_and_stays_valid_text() {
        let mut captured = Captured::default();
        captured.push(&vec![b'a'; MAX_OUTPUT_BYTES - 1]);
        captured.push("é and more".as_bytes()); // 'é' is two bytes: the cut splits it
        captured.push(b"\x1b[31mred\n");
        let text = captured.text();
        assert_eq!(captured.head.len(), MAX_OUTPUT_BYTES);
        assert_eq!(captured.dropped, "é and more".len() as u64 - 1 + 9);
        assert!(
            text.ends_with("[… 19 more bytes not kept]\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert!(
            text.contains('\u{FFFD}'),
            "the split character is replaced, not an error"
        );
        let mut small = Captured::default();
        small.push(b"ok\x00\tdone\n");
        assert_eq!(small.text(), "ok\tdone\n");
    }
}
