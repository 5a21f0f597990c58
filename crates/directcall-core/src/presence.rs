//! Presence records: directcall's retained `{"online": bool}` messages and
//! AWS IoT Core's lifecycle events, both read into one shape.

use serde::Deserialize;

use crate::topic::{Group, Prefix, PresenceRoot, Target};

/// The filter of AWS IoT Core's lifecycle events:
/// `$aws/events/presence/{connected|disconnected}/{clientId}`.
pub const AWS_PRESENCE_FILTER: &str = "$aws/events/presence/+/+";

/// One presence observation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PresenceEvent {
    /// The device.
    pub target: Target,
    /// `Some(online)`, or `None` when the record was cleared (an empty
    /// retained message).
    pub online: Option<bool>,
    /// When the source says it happened (ms since the Unix epoch), if it says;
    /// lets a reader ignore events that arrive out of order.
    pub timestamp_ms: Option<u64>,
    /// *Extension*: the groups the device is a member of, when its record
    /// says (`"groups": [..]`); `None` when it does not.
    pub groups: Option<Vec<Group>>,
}

/// *Extension*: the marker a requester with strict presence publishes, not
/// retained, on `{root}/{its reply prefix}` after each connection:
/// `{"snapshot":"<prefix>"}`. A broker sends a new subscription's retained
/// records before any message published after it, so when a marker comes
/// back, every record the broker held has arrived. Not a presence record:
/// [`parse_directcall`] and every reader ignore it.
pub fn snapshot_marker(prefix: &Prefix) -> Vec<u8> {
    serde_json::json!({ "snapshot": prefix.as_str() })
        .to_string()
        .into_bytes()
}

/// Whether `payload` is a [`snapshot_marker`] (anyone's: any message that
/// was published after the subscription proves the same).
pub fn is_snapshot_marker(payload: &[u8]) -> bool {
    payload.starts_with(br#"{"snapshot":"#)
}

/// Reads a directcall presence message on `topic` under `root`
/// (`{"online": bool}`, with an optional `"timestamp"` in ms since the Unix
/// epoch); `None` when the topic is not a presence topic of `root`, or the
/// payload is a [`snapshot_marker`].
pub fn parse_directcall(root: &PresenceRoot, topic: &str, payload: &[u8]) -> Option<PresenceEvent> {
    let target = root.parse(topic)?;
    if is_snapshot_marker(payload) {
        return None;
    }
    let record = serde_json::from_slice::<serde_json::Value>(payload).ok();
    let online = record.as_ref().and_then(|v| v.get("online")?.as_bool());
    // Records mirrored from AWS IoT lifecycle events carry the event's time.
    let timestamp_ms = record.as_ref().and_then(|v| v.get("timestamp")?.as_u64());
    // Names that break the level rule are left out, not the record.
    let groups = record.as_ref().and_then(|v| {
        Some(
            v.get("groups")?
                .as_array()?
                .iter()
                .filter_map(|g| Group::new(g.as_str()?).ok())
                .collect(),
        )
    });
    Some(PresenceEvent {
        target,
        online,
        timestamp_ms,
        groups,
    })
}

#[derive(Deserialize)]
struct Lifecycle {
    #[serde(rename = "clientId")]
    client_id: String,
    #[serde(rename = "eventType")]
    event_type: String,
    #[serde(default)]
    timestamp: Option<u64>,
}

/// Reads an AWS IoT Core lifecycle event; `None` for any other topic or a
/// payload that does not match its topic.
pub fn parse_aws_lifecycle(topic: &str, payload: &[u8]) -> Option<PresenceEvent> {
    let rest = topic.strip_prefix("$aws/events/presence/")?;
    let (kind, client_id) = rest.split_once('/')?;
    let online = match kind {
        "connected" => true,
        "disconnected" => false,
        _ => return None,
    };
    let event: Lifecycle = serde_json::from_slice(payload).ok()?;
    if event.client_id != client_id || event.event_type != kind {
        return None;
    }
    Some(PresenceEvent {
        target: Target::new(client_id).ok()?,
        online: Some(online),
        timestamp_ms: event.timestamp,
        groups: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_may_name_the_device_s_groups() {
        let root = PresenceRoot::default();
        let topic = "directcall/presence/Kiosk-1";
        let e = parse_directcall(
            &root,
            topic,
            br#"{"online":true,"groups":["lobby","bad/name","floor-2"]}"#,
        )
        .unwrap();
        let names: Vec<_> = e
            .groups
            .unwrap()
            .iter()
            .map(|g| g.as_str().to_owned())
            .collect();
        assert_eq!(names, ["lobby", "floor-2"]);
        let e = parse_directcall(&root, topic, br#"{"online":true}"#).unwrap();
        assert_eq!(e.groups, None);
    }

    #[test]
    fn directcall_records() {
        let root = PresenceRoot::default();
        let e = parse_directcall(&root, "directcall/presence/car", br#"{"online":false}"#).unwrap();
        assert_eq!((e.target.as_str(), e.online), ("car", Some(false)));
        let e = parse_directcall(
            &root,
            "directcall/presence/car",
            br#"{"online":true,"timestamp":17}"#,
        )
        .unwrap();
        assert_eq!((e.online, e.timestamp_ms), (Some(true), Some(17)));
        let e = parse_directcall(&root, "directcall/presence/car", b"").unwrap();
        assert_eq!(e.online, None);
        assert!(parse_directcall(&root, "other/car", br#"{"online":true}"#).is_none());
        // A snapshot marker is no record (it would otherwise clear one).
        let marker = snapshot_marker(&Prefix::new("invocation_client-0a1b2c3d4e5f").unwrap());
        assert_eq!(
            marker,
            br#"{"snapshot":"invocation_client-0a1b2c3d4e5f"}"#.to_vec()
        );
        assert!(is_snapshot_marker(&marker));
        assert!(!is_snapshot_marker(br#"{"online":true}"#));
        assert!(parse_directcall(
            &root,
            "directcall/presence/invocation_client-0a1b2c3d4e5f",
            &marker
        )
        .is_none());
    }

    #[test]
    fn aws_lifecycle_events() {
        // The shape AWS IoT Core documents for lifecycle events.
        let connected = br#"{"clientId":"Device001","timestamp":1764300000000,"eventType":"connected","sessionIdentifier":"00000000-0000-0000-0000-000000000000","principalIdentifier":"12345678901234567890123456789012","ipAddress":"192.0.2.0","versionNumber":0}"#;
        let e = parse_aws_lifecycle("$aws/events/presence/connected/Device001", connected).unwrap();
        assert_eq!(
            (e.target.as_str(), e.online, e.timestamp_ms),
            ("Device001", Some(true), Some(1_764_300_000_000))
        );
        let gone = br#"{"clientId":"Device001","timestamp":1764300005000,"eventType":"disconnected","clientInitiatedDisconnect":false,"disconnectReason":"CONNECTION_LOST","versionNumber":0}"#;
        let e = parse_aws_lifecycle("$aws/events/presence/disconnected/Device001", gone).unwrap();
        assert_eq!(e.online, Some(false));
        // the payload must agree with its topic
        assert!(parse_aws_lifecycle("$aws/events/presence/connected/Other", connected).is_none());
        assert!(
            parse_aws_lifecycle("$aws/events/presence/disconnected/Device001", connected).is_none()
        );
        assert!(
            parse_aws_lifecycle("$aws/events/subscriptions/subscribed/Device001", connected)
                .is_none()
        );
        assert!(
            parse_aws_lifecycle("$aws/events/presence/connected/Device001", b"garbage").is_none()
        );
    }
}
