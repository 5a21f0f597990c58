use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use directcall_core::{MessageId, Method, Prefix, Target};
use futures_util::FutureExt;
use serde_json::{json, Value};

/// One request as a handler sees it.
///
/// Build one in a unit test with [`MethodCall::new`]:
///
/// ```
/// use directcall_device::MethodCall;
/// let call = MethodCall::new("windows_down", serde_json::json!({"percent": 50}))
///     .target("VIN123");
/// assert_eq!(call.request["percent"], 50);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MethodCall {
    /// The call's id.
    pub id: MessageId,
    /// This device.
    pub target: Target,
    /// The method called.
    pub method: Method,
    /// The calling requester's prefix; `None` for a plain MQTT 5 request
    /// (`{target}/{method}` with a Response Topic), which has none.
    pub prefix: Option<Prefix>,
    /// The caller's value (`request` in the payload; the whole payload of a
    /// plain MQTT 5 request).
    pub request: Value,
    /// Requester's clock at send, ms since the Unix epoch, when given.
    pub timestamp: Option<u64>,
    /// The caller's remaining budget at send, when given.
    pub timeout_ms: Option<u64>,
    /// MQTT 5: the Response Topic the answer goes to, when the request
    /// named one.
    pub reply_to: Option<String>,
    /// The caller's W3C trace context (`traceparent`), when it sent one:
    /// from the MQTT 5 user property, else from the payload.
    pub traceparent: Option<String>,
}

impl MethodCall {
    /// A call of `method` with `request`, as a test would make it: a fresh
    /// id, target `test-device`, the default prefix, no timestamp or budget.
    ///
    /// # Panics
    /// When `method` is not a valid topic level (a test's own mistake).
    pub fn new(method: &str, request: impl Into<Value>) -> Self {
        MethodCall {
            id: MessageId::new(),
            target: Target::new("test-device").expect("a valid name"),
            method: Method::new(method)
                .unwrap_or_else(|e| panic!("MethodCall::new({method:?}): {e}")),
            prefix: Some(Prefix::default()),
            request: request.into(),
            timestamp: None,
            timeout_ms: None,
            reply_to: None,
            traceparent: None,
        }
    }

    /// The device the call is for (default `test-device`).
    ///
    /// # Panics
    /// When `target` is not a valid topic level.
    pub fn target(mut self, target: &str) -> Self {
        self.target =
            Target::new(target).unwrap_or_else(|e| panic!("MethodCall::target({target:?}): {e}"));
        self
    }
}

/// A handler's failure: the status and text sent back to the caller.
///
/// Any `std::error::Error` converts into a 500, so `?` works in handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    status: u16,
    message: String,
}

impl HandlerError {
    /// A 500 "handler failed" with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_status(500, message)
    }

    /// A 400 "bad request" with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::with_status(400, message)
    }

    /// A 503 "busy" with `message`.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::with_status(503, message)
    }

    /// Any status with `message`.
    pub fn with_status(status: u16, message: impl Into<String>) -> Self {
        HandlerError {
            status,
            message: message.into(),
        }
    }

    /// The status sent back.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The text sent back as the `response`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new(e.to_string())
    }
}

/// What a closure handler may return: `Result<T, HandlerError>` for any `T`
/// that converts into JSON. There is one implementation, so a closure's
/// `Ok(json!(...))` needs no type annotation.
pub trait IntoAnswer {
    /// The value, or the failure, to send back.
    ///
    /// # Errors
    /// The handler's own failure.
    fn into_answer(self) -> Result<Value, HandlerError>;
}

impl<T: Into<Value>> IntoAnswer for Result<T, HandlerError> {
    fn into_answer(self) -> Result<Value, HandlerError> {
        self.map(Into::into)
    }
}

/// Runs one method. Write it by hand for a stateful handler, or wrap an
/// async closure with [`handler_fn`] (what [`Router::method`] does).
///
/// The device polls a handler first on its connection's own task, so one
/// that answers at once costs no task and no thread hop; one that awaits
/// goes on in a task of its own. Like any async code, a handler must not
/// block: long computation or blocking I/O belongs in
/// `tokio::task::spawn_blocking`, or it holds up the connection.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs the method; `Ok` is answered with status 200.
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError>;
}

/// A [`Handler`] made of an async closure; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F>(F);

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn")
    }
}

/// Turns an async closure into a [`Handler`], for [`Router::fallback`] or
/// [`Router::route`].
pub fn handler_fn<F, Fut, R>(f: F) -> HandlerFn<F>
where
    F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoAnswer,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut, R> Handler for HandlerFn<F>
where
    F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoAnswer,
{
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError> {
        (self.0)(call).await.into_answer()
    }
}

/// What the device sends back for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Answer {
    /// HTTP-like: 200 done, 404 unknown method, 500 handler failed, ...
    pub status: u16,
    /// The handler's value, or its error's text.
    pub response: Value,
}

/// Maps method names to handlers.
///
/// ```
/// use directcall_device::{HandlerError, MethodCall, Router};
/// use serde_json::json;
///
/// let router = Router::new()
///     .method("windows_down", |call| async move {
///         let percent = call.request["percent"].as_u64().unwrap_or(100);
///         if percent > 100 {
///             return Err(HandlerError::bad_request("percent must be 0-100"));
///         }
///         Ok(json!({ "windows": "down", "percent": percent }))
///     })
///     .method("alarm_off", |_| async { Ok("alarm off") });
///
/// // A handler's wiring, tested with no broker:
/// # tokio_test_block_on(async {
/// let answer = router.call(MethodCall::new("windows_down", json!({"percent": 150}))).await;
/// assert_eq!(answer.status, 400);
/// let answer = router.call(MethodCall::new("open_sunroof", json!(null))).await;
/// assert_eq!(answer.status, 404);
/// # });
/// # fn tokio_test_block_on(f: impl std::future::Future) { tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f); }
/// ```
#[derive(Clone, Default)]
pub struct Router {
    methods: HashMap<Method, Arc<dyn Handler>>,
    fallback: Option<Arc<dyn Handler>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.methods.keys()).finish()
    }
}

impl Router {
    /// A router with no methods: every call is answered 404.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the async closure that runs `name`. It returns
    /// `Ok(value)` (any `T: Into<serde_json::Value>`) or
    /// `Err(HandlerError)`; `?` converts any other error into a 500.
    ///
    /// # Panics
    /// When `name` is not a valid topic level (see `Method::new`): a method
    /// that no call could ever reach is a programming error.
    pub fn method<F, Fut, R>(self, name: &str, f: F) -> Self
    where
        F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoAnswer,
    {
        self.handler(name, handler_fn(f))
    }

    /// Adds (or replaces) the [`Handler`] of `name`: for stateful handlers.
    ///
    /// # Panics
    /// When `name` is not a valid topic level.
    pub fn handler(self, name: &str, handler: impl Handler) -> Self {
        match Method::new(name) {
            Ok(method) => self.route(method, handler),
            Err(e) => panic!("Router::handler({name:?}): {e}"),
        }
    }

    /// Adds (or replaces) the handler of an already validated method.
    pub fn route(mut self, method: Method, handler: impl Handler) -> Self {
        self.methods.insert(method, Arc::new(handler));
        self
    }

    /// A handler for every method that has none of its own (default: none,
    /// so such calls are answered 404).
    pub fn fallback(mut self, handler: impl Handler) -> Self {
        self.fallback = Some(Arc::new(handler));
        self
    }

    /// Whether a call of `method` has a handler (its own or the fallback).
    pub fn knows(&self, method: &Method) -> bool {
        self.methods.contains_key(method) || self.fallback.is_some()
    }

    fn get(&self, method: &Method) -> Option<&Arc<dyn Handler>> {
        self.methods.get(method).or(self.fallback.as_ref())
    }

    /// Runs `call` as the device would, with no broker: 404 for a method
    /// with no handler, 200 with the handler's value, the error's status
    /// (500 by default) with its text, 500 for a panic.
    pub async fn call(&self, call: MethodCall) -> Answer {
        let Some(handler) = self.get(&call.method) else {
            return Answer {
                status: 404,
                response: json!(format!("unknown method '{}'", call.method)),
            };
        };
        // A panicking handler still gets its caller a 500.
        match AssertUnwindSafe(handler.call(call)).catch_unwind().await {
            Ok(Ok(value)) => Answer {
                status: 200,
                response: value,
            },
            Ok(Err(e)) => Answer {
                status: e.status(),
                response: Value::String(e.message().to_owned()),
            },
            Err(_) => Answer {
                status: 500,
                response: json!("handler panicked"),
            },
        }
    }

    /// Number of named methods.
    pub fn len(&self) -> usize {
        self.methods.len()
    }

    /// Whether no method is routed and there is no fallback.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.fallback.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn car() -> Router {
        Router::new()
            .method("windows_down", |call| async move {
                let percent = call.request["percent"].as_u64().unwrap_or(100);
                if percent > 100 {
                    return Err(HandlerError::bad_request("percent must be 0-100"));
                }
                Ok(json!({ "windows": "down", "percent": percent, "car": call.target.as_str() }))
            })
            .method("parse", |call| async move {
                let n: u8 = call.request.as_str().unwrap_or_default().parse()?;
                Ok(n)
            })
            .method("alarm_off", |_| async { Ok("alarm off") })
            .method("panic", |_| async {
                if true {
                    panic!("handler bug");
                }
                Ok(Value::Null)
            })
    }

    #[tokio::test]
    async fn a_handler_is_wired_and_testable_without_a_broker() {
        let r = car();
        let a = r
            .call(MethodCall::new("windows_down", json!({"percent": 50})).target("VIN123"))
            .await;
        assert_eq!(
            a,
            Answer {
                status: 200,
                response: json!({"windows": "down", "percent": 50, "car": "VIN123"})
            }
        );
        let a = r.call(MethodCall::new("alarm_off", Value::Null)).await;
        assert_eq!((a.status, a.response), (200, json!("alarm off")));
    }

    #[tokio::test]
    async fn errors_carry_their_status_and_text() {
        let r = car();
        let a = r
            .call(MethodCall::new("windows_down", json!({"percent": 150})))
            .await;
        assert_eq!(
            (a.status, a.response),
            (400, json!("percent must be 0-100"))
        );
        let a = r.call(MethodCall::new("parse", json!("300"))).await;
        assert_eq!(
            (a.status, a.response),
            (500, json!("number too large to fit in target type"))
        );
        let a = r.call(MethodCall::new("panic", Value::Null)).await;
        assert_eq!((a.status, a.response), (500, json!("handler panicked")));
    }

    #[tokio::test]
    async fn unknown_methods_are_404_unless_a_fallback_takes_them() {
        let r = car();
        let a = r.call(MethodCall::new("fly", Value::Null)).await;
        assert_eq!((a.status, a.response), (404, json!("unknown method 'fly'")));
        let r = r.fallback(handler_fn(
            |call| async move { Ok(call.method.to_string()) },
        ));
        let a = r.call(MethodCall::new("fly", Value::Null)).await;
        assert_eq!((a.status, a.response), (200, json!("fly")));
    }

    #[test]
    #[should_panic(expected = "Router::handler(\"a/b\")")]
    fn an_unreachable_method_name_is_a_programming_error() {
        let _ = Router::new().method("a/b", |_| async { Ok(Value::Null) });
    }
}
