//! The audit line: one `tracing` event per call (target
//! `directcall::audit`), saying who, from where, what, and how it ended.
//! Bodies only when asked for; never a secret.

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
}

impl AuditLine<'_> {
    /// Writes it.
    pub(crate) fn write(&self) {
        let credential = self.caller.map_or("-", Caller::name);
        let source = self.source.map(|a| a.to_string());
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
            request,
            response,
            "call"
        );
    }
}
