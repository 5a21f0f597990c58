use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use directcall_core::{MessageId, Method, Prefix, Target};
use serde_json::Value;

/// One request as a handler sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MethodCall {
    /// The call's id.
    pub id: MessageId,
    /// This device.
    pub target: Target,
    /// The method called.
    pub method: Method,
    /// The calling requester's prefix.
    pub prefix: Prefix,
    /// The caller's value (`request` in the payload).
    pub request: Value,
    /// Requester's clock at send, ms since the Unix epoch, when given.
    pub timestamp: Option<u64>,
    /// The caller's remaining budget at send, when given.
    pub timeout_ms: Option<u64>,
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

/// Runs one method. Implemented for async closures
/// `Fn(MethodCall) -> impl Future<Output = Result<T, E>>` where `T: Into<Value>`
/// and `E: Into<HandlerError>`, and by hand for stateful handlers.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs the method; `Ok` is answered with status 200.
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError>;
}

#[async_trait]
impl<F, Fut, T, E> Handler for F
where
    F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Into<Value>,
    E: Into<HandlerError>,
{
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError> {
        (self)(call).await.map(Into::into).map_err(Into::into)
    }
}

/// Maps method names to handlers.
///
/// ```
/// use directcall_device::{HandlerError, MethodCall, Router};
/// use serde_json::json;
///
/// let router = Router::new()
///     .method("windows_down", |_call: MethodCall| async { Ok::<_, HandlerError>(json!("windows down")) })
///     .method("alarm_off", |_call: MethodCall| async { Ok::<_, HandlerError>("alarm off") });
/// assert_eq!(router.len(), 2);
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

    /// Adds (or replaces) the handler of `name`.
    ///
    /// # Panics
    /// When `name` is not a valid topic level (see `Method::new`): a method
    /// that no call could ever reach is a programming error.
    pub fn method(self, name: &str, handler: impl Handler) -> Self {
        match Method::new(name) {
            Ok(method) => self.route(method, handler),
            Err(e) => panic!("Router::method({name:?}): {e}"),
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

    /// The handler of `method`: its own, else the fallback.
    pub fn get(&self, method: &Method) -> Option<Arc<dyn Handler>> {
        self.methods.get(method).or(self.fallback.as_ref()).cloned()
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
