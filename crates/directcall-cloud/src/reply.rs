//! A device's answer to one call.

use std::sync::Arc;
use std::time::Duration;

use directcall_core::MessageId;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;

/// A device's answer to one call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Reply {
    /// The call's id.
    pub id: MessageId,
    /// The device's verdict, HTTP-like (200 when the device sent none).
    pub status: u16,
    /// The device's answer.
    pub response: Value,
    /// Time from the call's start to the reply.
    pub elapsed: Duration,
    /// Whether this is the stored answer of another call with the same
    /// idempotency key ([`Invocation::idempotency_key`](crate::Invocation::idempotency_key)):
    /// this call published nothing. Always false for a call without a key.
    pub replayed: bool,
}

impl Reply {
    /// Whether the device's status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The response when the status is 2xx.
    ///
    /// # Errors
    /// [`Error::Rejected`] with the status and response otherwise.
    pub fn into_result(self) -> Result<Value, Error> {
        if self.is_success() {
            Ok(self.response)
        } else {
            Err(Error::Rejected {
                id: self.id,
                status: self.status,
                response: self.response,
            })
        }
    }

    /// The response, decoded as `T`, when the status is 2xx.
    ///
    /// ```
    /// # use directcall_cloud::Reply;
    /// # fn demo(reply: Reply) -> Result<(), directcall_cloud::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Windows { percent: u8 }
    /// let windows: Windows = reply.json()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Rejected`] for a status outside 2xx, [`Error::Decode`] when
    /// the response is not a `T`.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let id = self.id;
        serde_json::from_value(self.into_result()?).map_err(|e| Error::Decode {
            id,
            source: Arc::new(e),
        })
    }
}
