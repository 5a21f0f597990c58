//! Request and reply payload decoding: never panics, and what decodes
//! encodes back to something that decodes to the same value.
#![no_main]

use directcall_core::{ReplyPayload, RequestPayload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = ReplyPayload::from_slice(data) {
        assert_eq!(ReplyPayload::from_slice(&reply.to_vec()).ok(), Some(reply));
    }
    if let Ok(request) = RequestPayload::from_slice(data) {
        let again = RequestPayload::from_slice(&request.to_vec()).expect("re-decodes");
        assert_eq!(again.id, request.id);
        assert_eq!(again.timestamp, request.timestamp);
        assert_eq!(again.timeout_ms, request.timeout_ms);
    }
});
