//! What a lab host (or anyone on the LAN posing as one) sends: the signature header, and
//! every body of the host protocol.
#![no_main]

use labrack_provisioner::protocol::{self, EnrolRequest, PollRequest, Telemetry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(auth) = protocol::parse_host_auth(text)
    {
        assert!(protocol::valid_instance(&auth.instance), "a parsed header has a valid instance");
    }
    let _ = protocol::decode_report(data);
    let _ = serde_json::from_slice::<EnrolRequest>(data);
    let _ = serde_json::from_slice::<PollRequest>(data);
    let _ = serde_json::from_slice::<Telemetry>(data);
});
