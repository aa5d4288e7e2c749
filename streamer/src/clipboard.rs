//! Text clipboard both ways over the RDP clipboard channel (cliprdr, MS-RDPECLIP).
//!
//! IronRDP's cliprdr processor calls a backend from inside the session; the backend here
//! only queues what happened, and the session loop ([`crate::rdp::DesktopSession`]) turns
//! the queue into channel messages. Only text travels: CF_UNICODETEXT (or CF_TEXT from
//! servers that offer nothing else). Files and images are not offered or fetched.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use ironrdp_cliprdr::backend::CliprdrBackend;
use ironrdp_cliprdr::pdu::{
    ClipboardFormat, ClipboardFormatId, ClipboardGeneralCapabilityFlags, FileContentsRequest,
    FileContentsResponse, FormatDataRequest, FormatDataResponse, LockDataId,
    OwnedFormatDataResponse,
};

/// The most clipboard text that travels either way (characters beyond are cut).
pub const MAX_CLIPBOARD_CHARS: usize = 256 * 1024;

/// What the session loop must do for the clipboard channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClipboardAction {
    /// tell the server which formats our (the browser's) clipboard holds
    Advertise,
    /// the server's clipboard changed: fetch its text in this format
    Fetch(ClipboardFormatId),
    /// the server pastes: send our text in this format
    Provide(ClipboardFormatId),
}

#[derive(Debug, Default)]
pub(crate) struct ClipboardShared {
    /// the text the browser last put on the clipboard
    pub local_text: Option<String>,
    pub actions: VecDeque<ClipboardAction>,
    /// the format of the fetch in flight
    fetching: Option<ClipboardFormatId>,
    /// text copied on the remote desktop, not yet handed to viewers
    pub remote_text: VecDeque<String>,
}

/// The cliprdr backend: records callbacks in [`ClipboardShared`].
#[derive(Debug)]
pub(crate) struct QueueingBackend {
    pub shared: Arc<Mutex<ClipboardShared>>,
}

ironrdp_core::impl_as_any!(QueueingBackend);

impl QueueingBackend {
    fn with(&self, change: impl FnOnce(&mut ClipboardShared)) {
        if let Ok(mut shared) = self.shared.lock() {
            change(&mut shared);
        }
    }
}

/// Browser text (LF line ends) as Windows clipboard text (CRLF), cut to the limit.
pub(crate) fn to_remote(text: &str) -> String {
    let cut: String = text.chars().take(MAX_CLIPBOARD_CHARS).collect();
    cut.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// Windows clipboard text as browser text: LF line ends, no trailing NULs, cut to the limit.
pub(crate) fn from_remote(text: &str) -> String {
    text.trim_end_matches('\0')
        .replace("\r\n", "\n")
        .chars()
        .take(MAX_CLIPBOARD_CHARS)
        .collect()
}

/// The text format to fetch from what the server offers.
pub(crate) fn text_format(formats: &[ClipboardFormat]) -> Option<ClipboardFormatId> {
    [
        ClipboardFormatId::CF_UNICODETEXT,
        ClipboardFormatId::CF_TEXT,
    ]
    .into_iter()
    .find(|wanted| formats.iter().any(|f| f.id() == *wanted))
}

/// Our answer when the server asks for the clipboard in `format`.
pub(crate) fn provide(
    local_text: Option<&str>,
    format: ClipboardFormatId,
) -> OwnedFormatDataResponse {
    match local_text {
        Some(text) if format == ClipboardFormatId::CF_UNICODETEXT => {
            OwnedFormatDataResponse::new_unicode_string(&to_remote(text))
        }
        Some(text) if format == ClipboardFormatId::CF_TEXT => {
            OwnedFormatDataResponse::new_string(&to_remote(text))
        }
        _ => OwnedFormatDataResponse::new_error(),
    }
}

impl CliprdrBackend for QueueingBackend {
    fn temporary_directory(&self) -> &str {
        // No file transfer is offered, so nothing is ever written here.
        ".labrack-cliprdr"
    }

    fn client_capabilities(&self) -> ClipboardGeneralCapabilityFlags {
        ClipboardGeneralCapabilityFlags::USE_LONG_FORMAT_NAMES
    }

    fn on_ready(&mut self) {
        self.with(|s| s.actions.push_back(ClipboardAction::Advertise));
    }

    fn on_request_format_list(&mut self) {
        self.with(|s| s.actions.push_back(ClipboardAction::Advertise));
    }

    fn on_process_negotiated_capabilities(&mut self, _: ClipboardGeneralCapabilityFlags) {}

    fn on_remote_copy(&mut self, available_formats: &[ClipboardFormat]) {
        if let Some(format) = text_format(available_formats) {
            self.with(|s| s.actions.push_back(ClipboardAction::Fetch(format)));
        }
    }

    fn on_format_data_request(&mut self, request: FormatDataRequest) {
        self.with(|s| {
            s.actions
                .push_back(ClipboardAction::Provide(request.format))
        });
    }

    fn on_format_data_response(&mut self, response: FormatDataResponse<'_>) {
        self.with(|s| {
            let format = s.fetching.take();
            if response.is_error() {
                return;
            }
            let text = match format {
                Some(ClipboardFormatId::CF_TEXT) => response.to_string(),
                _ => response.to_unicode_string(),
            };
            match text {
                Ok(text) => s.remote_text.push_back(from_remote(&text)),
                Err(error) => tracing::debug!(%error, "the remote clipboard text did not decode"),
            }
        });
    }

    fn on_file_contents_request(&mut self, _: FileContentsRequest) {}

    fn on_file_contents_response(&mut self, _: FileContentsResponse<'_>) {}

    fn on_lock(&mut self, _: LockDataId) {}

    fn on_unlock(&mut self, _: LockDataId) {}
}

impl ClipboardShared {
    pub(crate) fn fetching(&mut self, format: ClipboardFormatId) {
        self.fetching = Some(format);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_and_limits() {
        assert_eq!(to_remote("a\nb\r\nc"), "a\r\nb\r\nc");
        assert_eq!(from_remote("a\r\nb\0\0"), "a\nb");
        assert_eq!(
            to_remote(&"x".repeat(MAX_CLIPBOARD_CHARS + 5)).len(),
            MAX_CLIPBOARD_CHARS
        );
        assert_eq!(from_remote("héllo ✓"), "héllo ✓");
    }

    #[test]
    fn text_is_fetched_in_the_best_format_offered() {
        let unicode = ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT);
        let ansi = ClipboardFormat::new(ClipboardFormatId::CF_TEXT);
        let image = ClipboardFormat::new(ClipboardFormatId::CF_DIB);
        assert_eq!(
            text_format(&[ansi.clone(), unicode]),
            Some(ClipboardFormatId::CF_UNICODETEXT)
        );
        assert_eq!(
            text_format(&[image.clone(), ansi]),
            Some(ClipboardFormatId::CF_TEXT)
        );
        assert_eq!(text_format(&[image]), None);
    }

    #[test]
    fn answers_carry_our_text_or_an_error() {
        let answer = provide(Some("hi\n"), ClipboardFormatId::CF_UNICODETEXT);
        assert!(!answer.is_error());
        assert_eq!(
            answer
                .to_unicode_string()
                .ok()
                .as_deref()
                .map(from_remote)
                .as_deref(),
            Some("hi\n")
        );
        assert!(provide(None, ClipboardFormatId::CF_UNICODETEXT).is_error());
        assert!(provide(Some("x"), ClipboardFormatId::CF_DIB).is_error());
    }

    #[test]
    fn callbacks_queue_actions_and_remote_text() {
        let shared = Arc::new(Mutex::new(ClipboardShared::default()));
        let mut backend = QueueingBackend {
            shared: shared.clone(),
        };
        backend.on_ready();
        backend.on_remote_copy(&[ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT)]);
        backend.on_format_data_request(FormatDataRequest {
            format: ClipboardFormatId::CF_UNICODETEXT,
        });
        shared
            .lock()
            .expect("lock")
            .fetching(ClipboardFormatId::CF_UNICODETEXT);
        backend.on_format_data_response(OwnedFormatDataResponse::new_unicode_string("copied\r\n"));
        backend.on_format_data_response(OwnedFormatDataResponse::new_error());
        let shared = shared.lock().expect("lock");
        assert_eq!(
            shared.actions.iter().copied().collect::<Vec<_>>(),
            [
                ClipboardAction::Advertise,
                ClipboardAction::Fetch(ClipboardFormatId::CF_UNICODETEXT),
                ClipboardAction::Provide(ClipboardFormatId::CF_UNICODETEXT)
            ]
        );
        assert_eq!(
            shared.remote_text.iter().cloned().collect::<Vec<_>>(),
            ["copied\n"]
        );
    }
}
