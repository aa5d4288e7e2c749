//! What a desktop viewer's browser sends after its hello (clipboard, window size).
#![no_main]

use labrack_wire::desktop::{MAX_CLIPBOARD_BYTES, MAX_DESKTOP, MIN_DESKTOP, ViewerMessage, viewer_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match viewer_message(text) {
        Ok(ViewerMessage::Clipboard { text }) => assert!(text.len() <= MAX_CLIPBOARD_BYTES),
        Ok(ViewerMessage::Resize { width, height }) => {
            assert!((MIN_DESKTOP..=MAX_DESKTOP.0).contains(&width) && (MIN_DESKTOP..=MAX_DESKTOP.1).contains(&height));
        }
        Err(detail) => assert!(!detail.is_empty()),
    }
});
