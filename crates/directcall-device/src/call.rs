use directcall_core::{Group, MessageId, Method, Prefix, Target};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::HandlerError;

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
    /// This device (for a group request too: the member answering).
    pub target: Target,
    /// The method called.
    pub method: Method,
    /// The calling requester's prefix; `None` for a plain MQTT 5 request
    /// (`{target}/{method}` with a Response Topic), which has none.
    pub prefix: Option<Prefix>,
    /// *Extension*: the group the request was sent to, when it was sent to
    /// one of the device's groups rather than to the device
    /// ([`DeviceOptions::group`](crate::DeviceOptions::group)); `None`
    /// for a request to the device itself.
    pub group: Option<Group>,
    /// The caller's value (`request` in the payload; the whole payload of a
    /// plain MQTT 5 request). [`MethodCall::json`] reads it as a type.
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
            group: None,
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

    /// The group the call was sent to (default: none, a call to the
    /// device itself).
    ///
    /// # Panics
    /// When `group` is not a valid topic level.
    pub fn group(mut self, group: &str) -> Self {
        self.group =
            Some(Group::new(group).unwrap_or_else(|e| panic!("MethodCall::group({group:?}): {e}")));
        self
    }

    /// The request as a `T`, the way axum's `Json<T>` reads a body: a
    /// request that is not a `T` is the caller's mistake, so with `?` it is
    /// answered 400 with serde's message (`invalid request: missing field
    /// `percent``), and the handler does not run on.
    ///
    /// ```
    /// use directcall_device::{MethodCall, Router};
    /// use serde::Deserialize;
    /// use serde_json::json;
    ///
    /// #[derive(Deserialize)]
    /// struct WindowsDown {
    ///     percent: u8,
    /// }
    ///
    /// let router = Router::new().method("windows_down", |call| async move {
    ///     let WindowsDown { percent } = call.json()?;
    ///     Ok(json!({ "windows": "down", "percent": percent }))
    /// });
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let answer = router.call(MethodCall::new("windows_down", json!({"percent": 50}))).await;
    /// assert_eq!((answer.status, answer.response), (200, json!({"windows": "down", "percent": 50})));
    /// let answer = router.call(MethodCall::new("windows_down", json!({"percent": "half"}))).await;
    /// assert_eq!(answer.status, 400);
    /// assert_eq!(answer.response, json!("invalid request: invalid type: string \"half\", expected u8"));
    /// # });
    /// ```
    ///
    /// # Errors
    /// A 400 [`HandlerError`] with serde's message when the request does
    /// not deserialize as a `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&self.request)
            .map_err(|e| HandlerError::bad_request(format!("invalid request: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct WindowsDown {
        percent: u8,
    }

    #[test]
    fn a_request_that_is_not_the_type_is_a_400_with_serdes_message() {
        let ok = MethodCall::new("windows_down", json!({"percent": 50}));
        assert_eq!(ok.json(), Ok(WindowsDown { percent: 50 }));
        for (request, message) in [
            (json!({}), "invalid request: missing field `percent`"),
            (
                json!({"percent": 300}),
                "invalid request: invalid value: integer `300`, expected u8",
            ),
            (
                json!("50"),
                "invalid request: invalid type: string \"50\", expected struct WindowsDown",
            ),
        ] {
            let e = MethodCall::new("windows_down", request)
                .json::<WindowsDown>()
                .unwrap_err();
            assert_eq!((e.status(), e.message()), (400, message));
        }
    }
}
