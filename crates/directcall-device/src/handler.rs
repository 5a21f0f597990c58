use std::fmt;
use std::future::Future;

use async_trait::async_trait;
use serde_json::Value;

use crate::call::MethodCall;
use crate::error::HandlerError;

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
///
/// [`Router::method`]: crate::Router::method
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
///
/// [`Router::fallback`]: crate::Router::fallback
/// [`Router::route`]: crate::Router::route
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

/// An async closure taking the call and a clone of the router's state (see
/// [`Router::method_with_state`](crate::Router::method_with_state)).
pub(crate) struct StateFn<F, S> {
    f: F,
    state: S,
}

impl<F, S> StateFn<F, S> {
    pub(crate) fn new(f: F, state: S) -> Self {
        StateFn { f, state }
    }
}

#[async_trait]
impl<F, Fut, R, S> Handler for StateFn<F, S>
where
    F: Fn(MethodCall, S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoAnswer,
    S: Clone + Send + Sync + 'static,
{
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError> {
        (self.f)(call, self.state.clone()).await.into_answer()
    }
}
