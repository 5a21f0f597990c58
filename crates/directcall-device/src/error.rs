use std::fmt;
use std::time::Duration;

use directcall_core::mqtt::{ConnectionError, SetupError};
use directcall_core::Field;
use serde_json::Value;

/// Errors of the device side: the same shapes as the requester's
/// (`directcall_cloud::Error`) for the same failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name or setting broke the protocol's rules (a bad broker URL, a
    /// target that is not a topic level, ...).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: Field,
        /// Why it was refused.
        reason: String,
    },
    /// The broker settings cannot be used (TLS material, a transport whose
    /// feature is not compiled in).
    #[error("unusable broker settings: {0}")]
    Setup(#[from] SetupError),
    /// The broker could not be reached and subscribed in time.
    #[error("broker unavailable: {cause}")]
    Unavailable {
        /// What is wrong.
        cause: Unavailable,
        /// Why the connection last failed, when it ever did.
        #[source]
        last_error: Option<ConnectionError>,
    },
}

/// Why the broker is unavailable ([`Error::Unavailable`]); the requester's
/// `directcall_cloud::Unavailable` has the same causes for the same failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// Not connected and subscribed within the ready timeout
    /// ([`DeviceOptions::ready_timeout`](crate::DeviceOptions::ready_timeout)).
    #[error("not connected and subscribed within {} ms", timeout.as_millis())]
    NotReady {
        /// The ready timeout.
        timeout: Duration,
    },
}

impl From<directcall_core::Error> for Error {
    fn from(e: directcall_core::Error) -> Self {
        Error::Invalid {
            field: e.field(),
            reason: e.reason().to_owned(),
        }
    }
}

/// A handler's failure: the status and the `response` sent back.
///
/// What goes on the wire is the reply of PROTOCOL.md ("Reply") with this
/// status, and as its `response` the error's text as a JSON string, or the
/// JSON body of [`HandlerError::json`]:
///
/// ```text
/// {"id": "…", "status": 400, "response": "percent must be 0-100"}
/// {"id": "…", "status": 409, "response": {"code": "door_open", "door": "rear_left"}}
/// ```
///
/// `?` converts any error into a 500 with the error's text (its `Display`):
/// every `std::error::Error + Send + Sync + 'static`, and with the `anyhow`
/// feature `anyhow::Error` too (its outermost context; send the whole chain
/// with `HandlerError::new(format!("{e:#}"))`).
///
/// ```
/// use directcall_device::{HandlerError, MethodCall, Router};
/// use serde_json::json;
///
/// let router = Router::new()
///     .method("parse", |call| async move {
///         let n: u8 = call.request.as_str().unwrap_or_default().parse()?; // a std error: 500
///         Ok(n)
///     })
///     .method("unlock", |_| async {
///         Err::<(), _>(HandlerError::json(409, json!({"code": "door_open"})))
///     });
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let answer = router.call(MethodCall::new("parse", json!("300"))).await;
/// assert_eq!((answer.status, answer.response), (500, json!("number too large to fit in target type")));
/// let answer = router.call(MethodCall::new("unlock", json!(null))).await;
/// assert_eq!((answer.status, answer.response), (409, json!({"code": "door_open"})));
/// # });
/// ```
///
/// With the `anyhow` feature, `?` takes anyhow's errors, `.context(..)`
/// included. `anyhow::bail!` and `ensure!` return an `anyhow::Result`,
/// not a handler's: write `Err(anyhow!(..))?` in a handler instead.
///
/// ```
/// # #[cfg(feature = "anyhow")] {
/// use anyhow::{anyhow, Context};
/// use directcall_device::{MethodCall, Router};
/// use serde_json::json;
///
/// fn calibration() -> anyhow::Result<u8> {
///     Err(anyhow!("no calibration stored"))
/// }
///
/// let router = Router::new()
///     .method("calibrate", |_| async {
///         let offset = calibration().context("reading the calibration")?;
///         Ok(offset)
///     })
///     .method("jam", |_| async {
///         Err(anyhow!("motor jammed"))?;
///         Ok("moved")
///     });
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let answer = router.call(MethodCall::new("calibrate", json!(null))).await;
/// assert_eq!((answer.status, answer.response), (500, json!("reading the calibration")));
/// let answer = router.call(MethodCall::new("jam", json!(null))).await;
/// assert_eq!((answer.status, answer.response), (500, json!("motor jammed")));
/// # });
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    status: u16,
    /// The text: the message, or the body's compact JSON.
    message: String,
    /// The JSON body, when it is not the message itself.
    body: Option<Value>,
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

    /// Any status with `message`, sent as a JSON string.
    pub fn with_status(status: u16, message: impl Into<String>) -> Self {
        HandlerError {
            status,
            message: message.into(),
            body: None,
        }
    }

    /// Any status with a JSON `body` as the `response`: an object a caller
    /// can read fields of, where a text would do only for a person.
    ///
    /// ```
    /// use directcall_device::HandlerError;
    /// use serde_json::json;
    ///
    /// let e = HandlerError::json(409, json!({"code": "door_open", "door": "rear_left"}));
    /// assert_eq!(e.status(), 409);
    /// assert_eq!(e.response(), json!({"code": "door_open", "door": "rear_left"}));
    /// assert_eq!(e.message(), r#"{"code":"door_open","door":"rear_left"}"#);
    /// ```
    pub fn json(status: u16, body: impl Into<Value>) -> Self {
        match body.into() {
            Value::String(message) => Self::with_status(status, message),
            body => HandlerError {
                status,
                message: body.to_string(),
                body: Some(body),
            },
        }
    }

    /// The status sent back.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The error's text: its message, or the compact JSON of a
    /// [`HandlerError::json`] body.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `response` sent back: the message as a JSON string, or the
    /// [`HandlerError::json`] body.
    pub fn response(&self) -> Value {
        self.clone().into_response()
    }

    /// The `response` sent back, without a copy.
    pub(crate) fn into_response(self) -> Value {
        self.body.unwrap_or(Value::String(self.message))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

// One blanket conversion: `anyhow::Error` cannot have an impl of its own
// beside `From<E: std::error::Error>` (E0119: anyhow could implement
// `std::error::Error` for it one day), so with the feature the bound is
// `Into<anyhow::Error>`, which every such `E` and `anyhow::Error` itself
// meet (axum's anyhow example does the same). Both give the `Display` text.
#[cfg(not(feature = "anyhow"))]
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new(e.to_string())
    }
}

/// With the `anyhow` feature: any error a `?` meets, `anyhow::Error`
/// included, becomes a 500 with its `Display` text.
#[cfg(feature = "anyhow")]
#[cfg_attr(docsrs, doc(cfg(feature = "anyhow")))]
impl<E: Into<anyhow::Error>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new(e.into().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_json_body_is_the_response_and_its_text_the_message() {
        let e = HandlerError::json(409, json!({"code": "door_open"}));
        assert_eq!(e.status(), 409);
        assert_eq!(e.response(), json!({"code": "door_open"}));
        assert_eq!(e.to_string(), r#"{"code":"door_open"} (409)"#);
        // A JSON string is a message like any other.
        assert_eq!(
            HandlerError::json(400, "no"),
            HandlerError::bad_request("no")
        );
        assert_eq!(HandlerError::bad_request("no").response(), json!("no"));
    }

    #[test]
    fn errors_convert_into_a_500_with_their_text() {
        let e = HandlerError::from(std::io::Error::other("bus error"));
        assert_eq!((e.status(), e.response()), (500, json!("bus error")));
    }

    #[cfg(feature = "anyhow")]
    #[test]
    fn anyhow_errors_convert_into_a_500_with_their_outermost_text() {
        use anyhow::Context;
        let e = HandlerError::from(anyhow::anyhow!("motor jammed"));
        assert_eq!((e.status(), e.response()), (500, json!("motor jammed")));
        let cause: Result<(), _> = Err(std::io::Error::other("bus error"));
        let e = HandlerError::from(cause.context("lowering the windows").unwrap_err());
        assert_eq!(e.message(), "lowering the windows");
    }

    #[test]
    fn an_unavailable_broker_reads_as_the_requesters_does() {
        let e = Error::Unavailable {
            cause: Unavailable::NotReady {
                timeout: Duration::from_millis(300),
            },
            last_error: None,
        };
        assert_eq!(
            e.to_string(),
            "broker unavailable: not connected and subscribed within 300 ms"
        );
    }
}
