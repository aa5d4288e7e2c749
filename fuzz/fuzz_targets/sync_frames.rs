//! The cloud link: frames from a peer (the cloud, or a stranger on the path), deflated
//! batches included. A frame that decodes encodes back to the same frame.
#![no_main]

use labrack_wire::sync::{Frame, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, body)) = data.split_first()
        && let Ok(frame) = Frame::decode(kind, body)
        && let Ok(bytes) = frame.encode()
    {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let again = runtime.block_on(read_frame(&mut bytes.as_slice())).expect("an encoded frame reads back");
        assert_eq!(again, frame);
    }
    // As a stream: length prefixes that lie, cut-off frames, several frames in a row.
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        let mut stream = data;
        for _ in 0..8 {
            if read_frame(&mut stream).await.is_err() {
                break;
            }
        }
    });
});
