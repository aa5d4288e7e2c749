//! What a desktop viewer's browser sends once its stream is up (clipboard text, its window
//! size), checked before anything acts on it.

use serde::Deserialize;

/// What a viewer may send after the hello.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ViewerMessage {
    Clipboard { text: String },
    Resize { width: u32, height: u32 },
}

/// The biggest desktop a viewer may ask for (4K UHD); the encoder's cost grows with it.
pub const MAX_DESKTOP: (u32, u32) = (3840, 2160);
pub const MIN_DESKTOP: u32 = 200;
/// Clipboard text longer than this (bytes of UTF-8) is refused.
pub const MAX_CLIPBOARD_BYTES: usize = 128 * 1024;

/// Checks a viewer's message; the error names what is wrong with it.
pub fn viewer_message(text: &str) -> Result<ViewerMessage, String> {
    let message: ViewerMessage =
        serde_json::from_str(text).map_err(|e| format!("not a desktop message: {e}"))?;
    match &message {
        ViewerMessage::Clipboard { text } if text.len() > MAX_CLIPBOARD_BYTES => Err(format!(
            "clipboard text is {} bytes; at most {MAX_CLIPBOARD_BYTES} are accepted",
            text.len()
        )),
        ViewerMessage::Resize { width, height }
            if !(MIN_DESKTOP..=MAX_DESKTOP.0).contains(width)
                || !(MIN_DESKTOP..=MAX_DESKTOP.1).contains(height) =>
        {
            Err(format!(
                "a desktop of {width}×{height} is out of range ({MIN_DESKTOP}–{} × {MIN_DESKTOP}–{})",
                MAX_DESKTOP.0, MAX_DESKTOP.1
            ))
        }
        _ => Ok(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewer_messages_are_checked() {
        assert!(
            matches!(viewer_message(r#"{"type":"clipboard","text":"hi"}"#), Ok(ViewerMessage::Clipboard { text }) if text == "hi")
        );
        assert!(matches!(
            viewer_message(r#"{"type":"resize","width":1024,"height":768}"#),
            Ok(ViewerMessage::Resize {
                width: 1024,
                height: 768
            })
        ));
        let refused = [
            (
                r#"{"type":"resize","width":100,"height":768}"#,
                "out of range",
            ),
            (
                r#"{"type":"resize","width":1024,"height":9000}"#,
                "out of range",
            ),
            (
                r#"{"type":"resize","width":-5,"height":768}"#,
                "not a desktop message",
            ),
            (r#"{"type":"paste","text":"x"}"#, "unknown variant"),
            (
                r#"{"type":"clipboard","text":"x","extra":1}"#,
                "unknown field",
            ),
            ("not json", "not a desktop message"),
        ];
        for (message, why) in refused {
            let error = viewer_message(message).expect_err(message);
            assert!(error.contains(why), "{message}: {error}");
        }
        let big =
            serde_json::json!({"type": "clipboard", "text": "x".repeat(MAX_CLIPBOARD_BYTES + 1)})
                .to_string();
        assert!(
            viewer_message(&big)
                .expect_err("too big")
                .contains("at most")
        );
    }
}
