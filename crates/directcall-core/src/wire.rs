//! Request and reply payloads (PROTOCOL.md, "Payloads").
//!
//! The AWS sample's fields (`id`, `request`, `timestamp` in; `id`, `response` out)
//! are always present; the extensions (`timeout_ms`, `status`) are optional,
//! and unknown fields are ignored, so the AWS sample's devices and directcall devices
//! interoperate in both directions.
//!
//! A reply's `status`, when present, is a JSON integer from 0 to 65535
//! (absent means 200). [`ReplyPayload::decode`] tells a payload that is no
//! reply at all (no string `id`) from a reply whose `status` breaks that
//! rule: the second still names its call, so a requester can end that call
//! at once with an error naming the field instead of letting it time out.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{Error, Field};

/// The status a reply without a `status` field stands for.
pub const STATUS_OK: u16 = 200;

/// What a requester publishes on a request topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RequestPayload {
    /// The call's id (`m_id`).
    pub id: String,
    /// The caller's value, any JSON (a string in the AWS sample).
    #[serde(default)]
    pub request: Value,
    /// Requester's clock at send: milliseconds since the Unix epoch.
    /// Written as a decimal string (the AWS sample's format); a JSON number is accepted too.
    #[serde(
        serialize_with = "ser_decimal",
        deserialize_with = "de_decimal",
        default
    )]
    pub timestamp: Option<u64>,
    /// *Extension*: the caller's remaining budget when sent, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// *Extension*: the caller's W3C trace context, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// *Extension*: the requester asks for a delivery receipt
    /// ([`Receipt`]) before the handler runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub receipt: bool,
}

/// *Extension*: what a device publishes on the reply topic when a request
/// asks for a receipt, before its handler runs: `{"delivered": "<m_id>"}`.
/// It has no `id` field on purpose, so that no requester that does not know
/// it (the AWS sample's, or an older directcall) can take it for an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Receipt {
    /// The request's id.
    pub delivered: String,
}

impl Receipt {
    /// A receipt for call `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Receipt {
            delivered: id.into(),
        }
    }

    /// Encodes as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes JSON bytes.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Payload`] when `bytes` is not a JSON
    /// object with a string `delivered`.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::invalid(Field::Payload, e.to_string()))
    }
}

/// What a device publishes on a reply (ack) topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireReply")]
#[non_exhaustive]
pub struct ReplyPayload {
    /// The request's id.
    pub id: String,
    /// The device's answer, any JSON or `null`; `null` when absent.
    pub response: Value,
    /// *Extension*: the device's verdict, HTTP-like: a JSON integer from 0
    /// to 65535; 200 when absent.
    pub status: u16,
}

/// Why a payload on a reply topic is not a reply ([`ReplyPayload::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// Not a reply at all: not a JSON object with a string `id` (a delivery
    /// receipt, garbage). Names [`Field::Payload`].
    #[error(transparent)]
    Malformed(Error),
    /// A reply to call `id` (its payload's `id`, as written) whose field
    /// breaks the protocol's rules: `status` not an integer from 0 to
    /// 65535. The error names the field.
    #[error("reply {id}: {error}")]
    Invalid {
        /// The payload's `id`.
        id: String,
        /// The field at fault, and why.
        error: Error,
    },
}

impl ReplyError {
    /// The field at fault, and why.
    pub fn error(&self) -> &Error {
        match self {
            ReplyError::Malformed(e) | ReplyError::Invalid { error: e, .. } => e,
        }
    }
}

/// A reply as written on the wire: `status` read as whatever it is, so
/// that a bad one can be named without losing the `id`.
#[derive(Deserialize)]
struct WireReply {
    id: String,
    #[serde(default)]
    response: Value,
    #[serde(default)]
    status: WireStatus,
}

/// A reply's `status` field as found.
#[derive(Default)]
enum WireStatus {
    #[default]
    Absent,
    Valid(u16),
    /// What was there instead, in words.
    Invalid(String),
}

impl<'de> Deserialize<'de> for WireStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Visits any JSON value in place: the hot path (an integer) has
        /// nothing to buffer.
        struct Status;

        impl<'de> serde::de::Visitor<'de> for Status {
            type Value = WireStatus;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<WireStatus, E> {
                Ok(u16::try_from(n)
                    .map_or_else(|_| WireStatus::Invalid(n.to_string()), WireStatus::Valid))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<WireStatus, E> {
                Ok(u16::try_from(n)
                    .map_or_else(|_| WireStatus::Invalid(n.to_string()), WireStatus::Valid))
            }

            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<WireStatus, E> {
                Ok(WireStatus::Invalid(format!("{n:?}")))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<WireStatus, E> {
                Ok(WireStatus::Invalid(format!("the string {s:?}")))
            }

            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<WireStatus, E> {
                Ok(WireStatus::Invalid(b.to_string()))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<WireStatus, E> {
                Ok(WireStatus::Invalid("null".to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<WireStatus, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(WireStatus::Invalid("an array".to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<WireStatus, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(WireStatus::Invalid("an object".to_owned()))
            }
        }

        d.deserialize_any(Status)
    }
}

impl WireReply {
    fn check(self) -> Result<ReplyPayload, ReplyError> {
        let status = match self.status {
            WireStatus::Absent => STATUS_OK,
            WireStatus::Valid(status) => status,
            WireStatus::Invalid(got) => {
                return Err(ReplyError::Invalid {
                    id: self.id,
                    error: Error::invalid(
                        Field::Status,
                        format!("must be an integer from 0 to 65535 (absent means 200), got {got}"),
                    ),
                })
            }
        };
        Ok(ReplyPayload {
            id: self.id,
            response: self.response,
            status,
        })
    }
}

impl TryFrom<WireReply> for ReplyPayload {
    type Error = Error;

    fn try_from(wire: WireReply) -> Result<Self, Error> {
        wire.check().map_err(|e| e.error().clone())
    }
}

impl RequestPayload {
    /// A request for call `id` carrying `request`, with no timestamp and no
    /// budget (set the public fields for those).
    pub fn new(id: impl Into<String>, request: Value) -> Self {
        RequestPayload {
            id: id.into(),
            request,
            timestamp: None,
            timeout_ms: None,
            traceparent: None,
            receipt: false,
        }
    }

    /// Encodes as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        // Serialising a struct of strings, numbers and a Value cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes JSON bytes.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Payload`] when `bytes` is not a JSON
    /// object with a string `id`.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::invalid(Field::Payload, e.to_string()))
    }
}

impl ReplyPayload {
    /// A reply to call `id` with the device's `status` and `response`.
    pub fn new(id: impl Into<String>, status: u16, response: Value) -> Self {
        ReplyPayload {
            id: id.into(),
            response,
            status,
        }
    }

    /// Encodes as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes JSON bytes.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Payload`] when `bytes` is not a JSON
    /// object with a string `id`, for [`Field::Status`] when `status` is
    /// there and not an integer from 0 to 65535.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        Self::decode(bytes).map_err(|e| e.error().clone())
    }

    /// Decodes JSON bytes, keeping the `id` of a reply whose other fields
    /// break the rules.
    ///
    /// ```
    /// use directcall_core::wire::{ReplyError, ReplyPayload};
    /// use directcall_core::Field;
    ///
    /// let seed = ReplyPayload::decode(br#"{"id":"x","response":"hi"}"#)?;
    /// assert_eq!(seed.status, 200);
    /// let Err(ReplyError::Invalid { id, error }) = ReplyPayload::decode(br#"{"id":"x","status":"201"}"#) else {
    ///     panic!()
    /// };
    /// assert_eq!((id.as_str(), error.field()), ("x", Field::Status));
    /// # Ok::<(), ReplyError>(())
    /// ```
    ///
    /// # Errors
    /// [`ReplyError::Malformed`] when `bytes` is not a JSON object with a
    /// string `id`; [`ReplyError::Invalid`], with the `id`, when `status`
    /// is there and not an integer from 0 to 65535.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplyError> {
        serde_json::from_slice::<WireReply>(bytes)
            .map_err(|e| ReplyError::Malformed(Error::invalid(Field::Payload, e.to_string())))?
            .check()
    }
}

#[allow(clippy::ref_option)]
fn ser_decimal<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn de_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    /// A string of decimal digits, a whole number, or null; visited in
    /// place (an untagged enum would buffer the value first).
    struct Decimal;

    impl serde::de::Visitor<'_> for Decimal {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("decimal milliseconds, as a string or a whole number")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.trim()
                .parse()
                .map(Some)
                .map_err(|_| E::custom("timestamp must be decimal milliseconds"))
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map(Some)
                .map_err(|_| E::custom("timestamp must be decimal milliseconds"))
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    d.deserialize_any(Decimal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_receipt_is_never_a_reply() {
        let receipt = Receipt::new("7f1c2a3b-0000-4000-8000-00000000abcd").to_vec();
        assert_eq!(
            serde_json::from_slice::<Value>(&receipt).unwrap(),
            json!({"delivered": "7f1c2a3b-0000-4000-8000-00000000abcd"})
        );
        // An older requester parses replies as ReplyPayload: it fails.
        assert!(ReplyPayload::from_slice(&receipt).is_err());
        assert!(Receipt::from_slice(br#"{"id":"x","response":1}"#).is_err());
        // A request asks for one only when it says so.
        let mut r = RequestPayload::new("x", json!(null));
        assert!(!String::from_utf8(r.to_vec()).unwrap().contains("receipt"));
        r.receipt = true;
        let back = RequestPayload::from_slice(&r.to_vec()).unwrap();
        assert!(back.receipt);
    }

    #[test]
    fn request_has_seed_fields_and_a_string_timestamp() {
        let r = RequestPayload {
            id: "abc".into(),
            request: json!("my_request_1"),
            timestamp: Some(1_764_300_000_000),
            timeout_ms: Some(3000),
            traceparent: None,
            receipt: false,
        };
        let v: Value = serde_json::from_slice(&r.to_vec()).unwrap();
        assert_eq!(
            v,
            json!({"id":"abc","request":"my_request_1","timestamp":"1764300000000","timeout_ms":3000})
        );
        assert_eq!(RequestPayload::from_slice(&r.to_vec()).unwrap(), r);
        let traced = RequestPayload {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..r
        };
        let v: Value = serde_json::from_slice(&traced.to_vec()).unwrap();
        assert_eq!(
            v["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    #[test]
    fn the_aws_sample_request_decodes() {
        let r = RequestPayload::from_slice(
            br#"{"id":"x","request":"r","timestamp":"1700000000000","extra":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(r.timestamp, Some(1_700_000_000_000));
        assert_eq!(r.timeout_ms, None);
        let r =
            RequestPayload::from_slice(br#"{"id":"x","request":{"a":1},"timestamp":17}"#).unwrap();
        assert_eq!(r.timestamp, Some(17));
        assert!(RequestPayload::from_slice(br#"{"id":"x","timestamp":"soon"}"#).is_err());
    }

    #[test]
    fn reply_without_status_means_200() {
        let r = ReplyPayload::from_slice(br#"{"id":"x","response":"hi","unknown":true}"#).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.response, json!("hi"));
        let r = ReplyPayload::from_slice(br#"{"id":"x"}"#).unwrap();
        assert_eq!(r.response, Value::Null);
    }

    #[test]
    fn malformed_payloads_are_errors_naming_payload() {
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"id\":5}",
            b"{\"id\":5,\"status\":\"201\"}",
            b"{\"delivered\":\"x\"}",
            b"\xff\xfe",
        ] {
            let e = ReplyPayload::from_slice(bad).unwrap_err();
            assert_eq!(e.field(), Field::Payload);
            assert!(matches!(
                ReplyPayload::decode(bad),
                Err(ReplyError::Malformed(_))
            ));
        }
    }

    #[test]
    fn a_bad_status_names_the_field_and_keeps_the_id() {
        for (bad, got) in [
            (json!("201"), "got the string \"201\""),
            (json!(70000), "got 70000"),
            (json!(-1), "got -1"),
            (json!(200.5), "got 200.5"),
            (json!(200.0), "got 200.0"),
            (json!(null), "got null"),
            (json!(true), "got true"),
            (json!([200]), "got an array"),
            (json!({"code": 200}), "got an object"),
        ] {
            let payload = json!({"id": "x", "response": 1, "status": bad}).to_string();
            let Err(ReplyError::Invalid { id, error }) = ReplyPayload::decode(payload.as_bytes())
            else {
                panic!("{payload} is not refused as an invalid reply")
            };
            assert_eq!(id, "x");
            assert_eq!(error.field(), Field::Status, "{payload}");
            assert!(error.reason().ends_with(got), "{payload}: {error}");
            let e = ReplyPayload::from_slice(payload.as_bytes()).unwrap_err();
            assert_eq!(e.field(), Field::Status);
        }
        for (good, status) in [(json!(0), 0), (json!(201), 201), (json!(65535), 65535)] {
            let payload = json!({"id": "x", "status": good}).to_string();
            assert_eq!(
                ReplyPayload::decode(payload.as_bytes()).unwrap().status,
                status
            );
        }
        // serde_json on its own (another crate decoding replies) agrees.
        assert!(serde_json::from_str::<ReplyPayload>(r#"{"id":"x","status":"201"}"#).is_err());
        let r: ReplyPayload = serde_json::from_str(r#"{"id":"x","status":404}"#).unwrap();
        assert_eq!(r.status, 404);
    }
}
