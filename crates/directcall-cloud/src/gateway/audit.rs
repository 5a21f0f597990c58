//! The audit line: one `tracing` event per call (target
//! `directcall::audit`), saying who, from where, what, and how it ended,
//! with the call's trace id when the caller sent a `traceparent`; and one
//! per request refused before it became a call (401, 400, 413), saying
//! from where, which path and why. Bodies only when asked for; never a
//! secret (a refused token is never shown).

use std::net::SocketAddr;
use std::time::Instant;

use directcall_core::{Method, Target};

use super::auth::Caller;
use super::body::HttpReply;

/// One call's audit line.
pub(crate) struct AuditLine<'a> {
    pub(crate) caller: Option<&'a Caller>,
    pub(crate) source: Option<SocketAddr>,
    pub(crate) target: &'a Target,
    pub(crate) method: &'a Method,
    pub(crate) reply: &'a HttpReply,
    pub(crate) started: Instant,
    /// The request, when bodies are audited.
    pub(crate) request: Option<&'a serde_json::Value>,
    /// Put the response in the line too.
    pub(crate) with_response: bool,
    /// The caller's W3C `traceparent`, passed on to the device.
    pub(crate) traceparent: Option<&'a str>,
}

/// The trace id of a W3C `traceparent` (`00-{trace id}-{span id}-{flags}`).
fn trace_id(traceparent: Option<&str>) -> &str {
    traceparent.and_then(|t| t.split('-').nth(1)).unwrap_or("-")
}

/// A request refused before it became a call.
pub(crate) fn refused(
    caller: Option<&Caller>,
    source: Option<SocketAddr>,
    path: &str,
    reply: &HttpReply,
) {
    let source = source.map(|a| a.to_string());
    tracing::info!(
        target: "directcall::audit",
        credential = caller.map_or("-", Caller::name),
        source = source.as_deref().unwrap_or("-"),
        path,
        outcome = reply.body["result"].as_str().unwrap_or("-"),
        http_status = reply.status,
        reason = reply.body["response"].as_str().unwrap_or("-"),
        "refused"
    );
}

impl AuditLine<'_> {
    /// Writes it.
    pub(crate) fn write(&self) {
        let credential = self.caller.map_or("-", Caller::name);
        let mut buf = [0u8; 64];
        let source = self.source.map(|a| address(a, &mut buf));
        let reply = self.reply;
        let id = reply.body["id"].as_str().unwrap_or("-");
        let outcome = reply.body["result"].as_str().unwrap_or("-");
        let status = reply.body["status"].as_u64();
        let latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let request = self.request.map(ToString::to_string);
        let response = self
            .with_response
            .then(|| reply.body["response"].to_string());
        tracing::info!(
            target: "directcall::audit",
            credential,
            source = source.as_deref().unwrap_or("-"),
            target_device = self.target.as_str(),
            method = self.method.as_str(),
            outcome,
            http_status = reply.status,
            device_status = status,
            latency_ms,
            id,
            trace_id = trace_id(self.traceparent),
            request,
            response,
            "call"
        );
    }
}

/// `address` as text, written into `buf` (an allocation per line saved);
/// an address too long for it (none is: at most 47 bytes) is allocated.
fn address(address: SocketAddr, buf: &mut [u8; 64]) -> std::borrow::Cow<'_, str> {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{address}").is_ok() {
        let len = usize::try_from(cursor.position()).unwrap_or(0);
        if let Ok(text) = std::str::from_utf8(&buf[..len]) {
            return text.into();
        }
    }
    address.to_string().into()
}

/// One group call's audit line, written when its answer ends (or its
/// client went away): who, what, which devices, and the counts.
pub(crate) struct GroupAuditLine {
    pub(crate) caller: Option<String>,
    pub(crate) source: Option<SocketAddr>,
    pub(crate) method: Method,
    /// `targets`, `match` or `group`.
    pub(crate) kind: &'static str,
    /// `N names`, the glob, or the group's name.
    pub(crate) set: String,
    /// `json`, `ndjson` or `async`.
    pub(crate) mode: &'static str,
    pub(crate) started: Instant,
    pub(crate) traceparent: Option<String>,
    pub(crate) id: directcall_core::MessageId,
}

impl GroupAuditLine {
    /// Writes it, with the counts of `summary`; `complete`: every result
    /// was given (false when the client went away first).
    pub(crate) fn write(&self, summary: &crate::GroupSummary, complete: bool) {
        let source = self.source.map(|a| a.to_string());
        tracing::info!(
            target: "directcall::audit",
            credential = self.caller.as_deref().unwrap_or("-"),
            source = source.as_deref().unwrap_or("-"),
            method = self.method.as_str(),
            kind = self.kind,
            set = self.set.as_str(),
            mode = self.mode,
            ok = summary.ok,
            device_error = summary.device_error,
            timeout = summary.timeout,
            offline = summary.offline,
            refused = summary.refused,
            total = summary.total,
            expected = summary.expected,
            complete,
            elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            id = %self.id,
            trace_id = trace_id(self.traceparent.as_deref()),
            "group call"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_written_as_its_text() {
        for a in [
            "127.0.0.1:8080",
            "[::1]:443",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let address_: SocketAddr = a.parse().unwrap();
            let mut buf = [0u8; 64];
            let text = address(address_, &mut buf);
            assert_eq!(text, address_.to_string());
            assert!(matches!(text, std::borrow::Cow::Borrowed(_)), "{a}");
        }
    }
}
