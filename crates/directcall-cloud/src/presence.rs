//! What the requester knows of device presence.

use std::collections::HashMap;
use std::sync::RwLock;

use serde::Serialize;
use tokio::sync::broadcast;

use directcall_core::presence::{
    parse_aws_lifecycle, parse_directcall, PresenceEvent, AWS_PRESENCE_FILTER,
};
use directcall_core::{PresenceRoot, Target};

use crate::options::PresenceSource;
use crate::records::now_ms;

/// A target's presence, as the requester last learned it
/// ([`Requester::devices`](crate::Requester::devices),
/// [`Requester::watch_devices`](crate::Requester::watch_devices)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeviceState {
    /// The device.
    #[serde(serialize_with = "as_text")]
    pub target: Target,
    /// Whether it is connected.
    pub online: bool,
    /// When it went online or offline, in milliseconds since the Unix epoch:
    /// the presence record's own timestamp, else when the requester learned
    /// of the change.
    pub since_ms: u64,
}

fn as_text<S: serde::Serializer>(target: &Target, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(target)
}

/// How many presence changes a slow watcher may fall behind by before it
/// is told it lagged.
const CHANGES_BUFFER: usize = 1024;

/// What is known of one target.
#[derive(Debug, Clone, Copy)]
struct Known {
    online: bool,
    /// The record's own timestamp, if it had one.
    timestamp_ms: Option<u64>,
    /// When it last went online or offline.
    since_ms: u64,
}

/// The last presence record of each target that has one.
#[derive(Debug)]
pub(crate) struct Presence {
    source: PresenceSource,
    /// With AWS lifecycle events: where they are mirrored as retained
    /// records, and read back from (replicas started later learn from them).
    mirror: Option<PresenceRoot>,
    online: RwLock<HashMap<Target, Known>>,
    changes: broadcast::Sender<DeviceState>,
}

/// Where a presence event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A retained directcall record (or a mirrored one).
    Record,
    /// An AWS IoT lifecycle event.
    Lifecycle,
}

impl Presence {
    pub(crate) fn new(source: PresenceSource, mirror: Option<PresenceRoot>) -> Self {
        let mirror = match source {
            PresenceSource::AwsLifecycle => mirror,
            PresenceSource::Directcall(_) => None,
        };
        Presence {
            source,
            mirror,
            online: RwLock::new(HashMap::new()),
            changes: broadcast::channel(CHANGES_BUFFER).0,
        }
    }

    /// The filters to subscribe to.
    pub(crate) fn filters(&self) -> Vec<String> {
        match &self.source {
            PresenceSource::Directcall(root) => vec![root.filter()],
            PresenceSource::AwsLifecycle => {
                let mut filters = vec![AWS_PRESENCE_FILTER.to_owned()];
                filters.extend(self.mirror.as_ref().map(PresenceRoot::filter));
                filters
            }
        }
    }

    /// The root lifecycle events are mirrored to, if any.
    pub(crate) fn mirror(&self) -> Option<&PresenceRoot> {
        self.mirror.as_ref()
    }

    /// `None` when `topic` is not a presence topic; `Some(None)` when it is
    /// one with an unreadable payload.
    pub(crate) fn parse(
        &self,
        topic: &str,
        payload: &[u8],
    ) -> Option<Option<(PresenceEvent, Origin)>> {
        let record = |root: &PresenceRoot| {
            root.parse(topic)?;
            Some(parse_directcall(root, topic, payload).map(|e| (e, Origin::Record)))
        };
        match &self.source {
            PresenceSource::Directcall(root) => record(root),
            PresenceSource::AwsLifecycle if topic.starts_with("$aws/events/presence/") => {
                Some(parse_aws_lifecycle(topic, payload).map(|e| (e, Origin::Lifecycle)))
            }
            PresenceSource::AwsLifecycle => self.mirror.as_ref().and_then(record),
        }
    }

    /// Applies `event` unless an event with a later timestamp is known;
    /// returns whether it was applied.
    pub(crate) fn record(&self, event: PresenceEvent) -> bool {
        let mut online = self.online.write().unwrap_or_else(|e| e.into_inner());
        let older = match (online.get(&event.target), event.timestamp_ms) {
            (
                Some(Known {
                    timestamp_ms: Some(known),
                    ..
                }),
                Some(ts),
            ) => ts < *known,
            _ => false,
        };
        if older {
            return false;
        }
        tracing::debug!(target = %event.target, online = ?event.online, "presence");
        match event.online {
            Some(up) => {
                // A repeated record (a reconnecting subscription gets the
                // retained ones again) is no change.
                let known = online.get(&event.target).copied();
                let changed = known.is_none_or(|k| k.online != up);
                let since_ms = match known {
                    Some(k) if !changed => k.since_ms,
                    _ => event.timestamp_ms.unwrap_or_else(now_ms),
                };
                online.insert(
                    event.target.clone(),
                    Known {
                        online: up,
                        timestamp_ms: event.timestamp_ms,
                        since_ms,
                    },
                );
                if changed {
                    // Nobody watching is fine.
                    let _ = self.changes.send(DeviceState {
                        target: event.target,
                        online: up,
                        since_ms,
                    });
                }
            }
            None => {
                online.remove(&event.target);
            }
        }
        true
    }

    pub(crate) fn is_offline(&self, target: &Target) -> bool {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        online.get(target).is_some_and(|k| !k.online)
    }

    /// Every target with a record, by name.
    pub(crate) fn devices(&self) -> Vec<DeviceState> {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        let mut devices: Vec<DeviceState> = online
            .iter()
            .map(|(target, k)| DeviceState {
                target: target.clone(),
                online: k.online,
                since_ms: k.since_ms,
            })
            .collect();
        devices.sort_unstable_by(|a, b| a.target.as_str().cmp(b.target.as_str()));
        devices
    }

    /// Changes from now on.
    pub(crate) fn watch(&self) -> broadcast::Receiver<DeviceState> {
        self.changes.subscribe()
    }
}
