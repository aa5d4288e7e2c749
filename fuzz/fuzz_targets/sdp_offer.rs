//! The SDP offer a participant's browser sends in its desktop hello, as the appliance's
//! WebRTC stack parses it (`RTCSessionDescription::offer` → `rtc_sdp`) before any answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The hello is JSON text, so the offer is a string; its size is bounded there.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut reader = std::io::Cursor::new(text.as_bytes());
    if let Ok(parsed) = rtc_sdp::description::session::SessionDescription::unmarshal(&mut reader) {
        // What the answer is built from must be printable again.
        let _ = parsed.marshal();
    }
});
