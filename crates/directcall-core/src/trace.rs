//! W3C trace context: the `traceparent` a caller may send with a call.

use crate::error::{Error, Field};

/// Checks `value` is a W3C `traceparent` (version 00):
/// `00-{32 hex trace id}-{16 hex parent id}-{2 hex flags}`, lowercase, ids
/// not all zero.
///
/// ```
/// use directcall_core::trace::check_traceparent;
/// assert!(check_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_ok());
/// assert!(check_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331").is_err());
/// ```
///
/// # Errors
/// [`Error::Invalid`] naming `traceparent`, with what is wrong.
pub fn check_traceparent(value: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Err(Error::invalid(Field::Traceparent, reason.to_owned()));
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    match parts.as_slice() {
        [version, trace, parent, flags]
            if hex(version, 2) && hex(trace, 32) && hex(parent, 16) && hex(flags, 2) =>
        {
            if *version != "00" {
                return invalid("only version 00 is known");
            }
            if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
                return invalid("trace id and parent id must not be all zeros");
            }
            Ok(())
        }
        _ => invalid("must be 00-<32 hex>-<16 hex>-<2 hex>, lowercase (W3C trace context)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_examples() {
        assert!(
            check_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok()
        );
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            let e = check_traceparent(bad).unwrap_err();
            assert!(e.to_string().contains("traceparent"), "{e}");
        }
    }
}
