//! Request and reply payloads (PROTOCOL.md, "Payloads").
//!
//! The AWS sample's fields (`id`, `request`, `timestamp` in; `id`, `response` out)
//! are always present; the extensions (`timeout_ms`, `status`) are optional,
//! and unknown fields are ignored, so the AWS sample's devices and directcall devices
//! interoperate in both directions.

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
#[non_exhaustive]
pub struct ReplyPayload {
    /// The request's id.
    pub id: String,
    /// The device's answer, any JSON or `null`.
    #[serde(default)]
    pub response: Value,
    /// *Extension*: the device's verdict, HTTP-like; 200 when absent.
    #[serde(default = "default_status")]
    pub status: u16,
}

fn default_status() -> u16 {
    STATUS_OK
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
    /// object with a string `id`, or `status` is not an integer 0–65535.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::invalid(Field::Payload, e.to_string()))
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
            b"{\"id\":\"x\",\"status\":-1}",
            b"\xff\xfe",
        ] {
            let e = ReplyPayload::from_slice(bad).unwrap_err();
            assert_eq!(e.field(), Field::Payload);
        }
    }
}
