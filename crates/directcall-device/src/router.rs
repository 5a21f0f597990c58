use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use directcall_core::Method;
use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::call::MethodCall;
use crate::handler::{handler_fn, Handler, IntoAnswer, StateFn};

/// What the device sends back for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Answer {
    /// HTTP-like: 200 done, 404 unknown method, 500 handler failed, ...
    pub status: u16,
    /// The handler's value, or its error's response: its text, or its
    /// JSON body ([`HandlerError::json`](crate::HandlerError::json)).
    pub response: Value,
}

/// Maps method names to handlers, with an optional state `S` its handlers
/// share ([`Router::with_state`]).
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
#[derive(Clone)]
pub struct Router<S = ()> {
    methods: HashMap<Method, Arc<dyn Handler>>,
    fallback: Option<Arc<dyn Handler>>,
    state: S,
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.methods.keys()).finish()
    }
}

impl Default for Router {
    fn default() -> Self {
        Router::with_state(())
    }
}

impl Router {
    /// A router with no methods and no state: every call is answered 404.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Router<S> {
    /// A router with no methods whose handlers share `state`: each call of
    /// a [`Router::method_with_state`] handler gets a clone of it, as each
    /// request of an axum handler gets its `State`. Make it cheap to clone:
    /// an `Arc`, or a struct of handles.
    ///
    /// The state comes first, not last as in axum, so that a handler's
    /// closure knows its type and needs no annotation.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use directcall_device::{MethodCall, Router};
    ///
    /// let router = Router::with_state(Arc::new(AtomicU64::new(0)))
    ///     .method_with_state("honk", |_, honks| async move {
    ///         Ok(honks.fetch_add(1, Ordering::Relaxed) + 1)
    ///     });
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// router.call(MethodCall::new("honk", ())).await;
    /// let answer = router.call(MethodCall::new("honk", ())).await;
    /// assert_eq!(answer.response, 2);
    /// # });
    /// ```
    pub fn with_state(state: S) -> Self {
        Router {
            methods: HashMap::new(),
            fallback: None,
            state,
        }
    }

    /// Adds (or replaces) the async closure that runs `name`. It returns
    /// `Ok(value)` (any `T: Into<serde_json::Value>`) or
    /// `Err(HandlerError)`; `?` converts any other error into a 500, and
    /// [`MethodCall::json`] reads the request as a type (400 when it is
    /// not one).
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

    /// Adds (or replaces) the async closure that runs `name` with the call
    /// and a clone of the router's state ([`Router::with_state`]); what it
    /// returns is as for [`Router::method`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use directcall_device::{HandlerError, MethodCall, Router};
    /// use serde::Deserialize;
    /// use serde_json::json;
    ///
    /// /// The device's own state.
    /// struct Car {
    ///     vin: String,
    /// }
    ///
    /// #[derive(Deserialize)]
    /// struct WindowsDown {
    ///     percent: u8,
    /// }
    ///
    /// let car = Arc::new(Car { vin: "VIN123".into() });
    /// let router = Router::with_state(car)
    ///     .method_with_state("windows_down", |call, car| async move {
    ///         let WindowsDown { percent } = call.json()?;
    ///         if percent > 100 {
    ///             return Err(HandlerError::bad_request("percent must be 0-100"));
    ///         }
    ///         Ok(json!({ "car": car.vin, "windows": "down", "percent": percent }))
    ///     })
    ///     .method("alarm_off", |_| async { Ok("alarm off") });
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let answer = router.call(MethodCall::new("windows_down", json!({"percent": 50}))).await;
    /// assert_eq!(answer.response, json!({"car": "VIN123", "windows": "down", "percent": 50}));
    /// # });
    /// ```
    ///
    /// # Panics
    /// When `name` is not a valid topic level.
    pub fn method_with_state<F, Fut, R>(self, name: &str, f: F) -> Self
    where
        F: Fn(MethodCall, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoAnswer,
        S: Clone + Send + Sync + 'static,
    {
        let handler = StateFn::new(f, self.state.clone());
        self.handler(name, handler)
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
    /// (500 by default) with its response, 500 for a panic.
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
                response: e.into_response(),
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

    /// The same routes without the state: each stateful handler holds its
    /// own clone of it already.
    pub(crate) fn into_stateless(self) -> Router {
        Router {
            methods: self.methods,
            fallback: self.fallback,
            state: (),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::handler_fn;
    use crate::HandlerError;
    use serde::Deserialize;
    use std::sync::atomic::{AtomicU64, Ordering};

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
    async fn a_json_error_body_is_the_answers_response() {
        let r = Router::new().method("unlock", |_| async {
            Err::<Value, _>(HandlerError::json(
                409,
                json!({"code": "door_open", "door": "rear_left"}),
            ))
        });
        let a = r.call(MethodCall::new("unlock", Value::Null)).await;
        assert_eq!(
            (a.status, a.response),
            (409, json!({"code": "door_open", "door": "rear_left"}))
        );
    }

    #[derive(Deserialize)]
    struct WindowsDown {
        percent: u8,
    }

    #[tokio::test]
    async fn a_typed_request_that_does_not_fit_is_a_400_and_the_handler_stops() {
        let ran = Arc::new(AtomicU64::new(0));
        let r = Router::with_state(Arc::clone(&ran)).method_with_state(
            "windows_down",
            |call, ran| async move {
                let WindowsDown { percent } = call.json()?;
                ran.fetch_add(1, Ordering::Relaxed);
                Ok(json!({ "percent": percent }))
            },
        );
        let a = r
            .call(MethodCall::new("windows_down", json!({"percent": 50})))
            .await;
        assert_eq!((a.status, a.response), (200, json!({"percent": 50})));
        let a = r
            .call(MethodCall::new("windows_down", json!({"percent": "half"})))
            .await;
        assert_eq!(
            (a.status, a.response),
            (
                400,
                json!("invalid request: invalid type: string \"half\", expected u8")
            )
        );
        let a = r.call(MethodCall::new("windows_down", json!({}))).await;
        assert_eq!(
            (a.status, a.response),
            (400, json!("invalid request: missing field `percent`"))
        );
        assert_eq!(ran.load(Ordering::Relaxed), 1, "it stopped at the `?`");
    }

    #[tokio::test]
    async fn a_std_error_is_a_500_with_its_text() {
        let r = Router::new().method("read", |_| async {
            std::fs::read("/nonexistent/directcall/calibration")?;
            Ok(Value::Null)
        });
        let a = r.call(MethodCall::new("read", Value::Null)).await;
        assert_eq!(a.status, 500);
        let text = std::fs::read("/nonexistent/directcall/calibration")
            .unwrap_err()
            .to_string();
        assert_eq!(a.response, json!(text));
    }

    #[cfg(feature = "anyhow")]
    #[tokio::test]
    async fn an_anyhow_error_is_a_500_with_its_text() {
        use anyhow::Context;
        let r = Router::new()
            .method("jam", |_| async {
                // Not `bail!`: it returns an `anyhow::Result`, which is
                // not a handler's.
                Err(anyhow::anyhow!("motor jammed"))?;
                Ok(Value::Null)
            })
            .method("read", |_| async {
                std::fs::read("/nonexistent/directcall/calibration")
                    .context("reading the calibration")?;
                Ok(Value::Null)
            });
        let a = r.call(MethodCall::new("jam", Value::Null)).await;
        assert_eq!((a.status, a.response), (500, json!("motor jammed")));
        let a = r.call(MethodCall::new("read", Value::Null)).await;
        assert_eq!(
            (a.status, a.response),
            (500, json!("reading the calibration"))
        );
    }

    #[tokio::test]
    async fn the_state_is_shared_by_every_call_and_handler() {
        #[derive(Clone, Default)]
        struct Car {
            honks: Arc<AtomicU64>,
        }
        let car = Car::default();
        let r = Router::with_state(car.clone())
            .method_with_state("honk", |_, car| async move {
                Ok(car.honks.fetch_add(1, Ordering::Relaxed) + 1)
            })
            .method_with_state("honks", |_, car| async move {
                Ok(car.honks.load(Ordering::Relaxed))
            })
            .method("alarm_off", |_| async { Ok("alarm off") });
        for n in 1..=3 {
            let a = r.call(MethodCall::new("honk", Value::Null)).await;
            assert_eq!((a.status, a.response), (200, json!(n)));
        }
        let a = r.call(MethodCall::new("honks", Value::Null)).await;
        assert_eq!(a.response, json!(3));
        assert_eq!(car.honks.load(Ordering::Relaxed), 3, "the caller's handle");
        // Its routes, as the device holds them, share the same state.
        let stateless = r.into_stateless();
        let a = stateless.call(MethodCall::new("honk", Value::Null)).await;
        assert_eq!(a.response, json!(4));
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
