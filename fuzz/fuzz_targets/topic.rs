//! Topic parsing: never panics, and whatever parses builds back to itself.
#![no_main]

use directcall_core::{CallTopics, MessageId, Method, Prefix, PresenceRoot, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(call) = CallTopics::parse_reply(s) {
        assert_eq!(call.reply_topic(), s);
        assert!(s.len() <= 256);
    }
    if let Ok(call) = CallTopics::parse_request(s) {
        assert_eq!(call.request_topic(), s);
        assert!(!call.reply_topic().contains(['+', '#']));
    }
    for level in s.split('/') {
        if let Ok(t) = Target::new(level) {
            assert_eq!(t.as_str(), level);
            assert!(!level.contains(['/', '+', '#', '\0']) && !level.starts_with('$'));
        }
        let _ = Method::new(level);
        let _ = Prefix::new(level);
        let _ = MessageId::parse(level);
    }
    let _ = PresenceRoot::default().parse(s);
});
