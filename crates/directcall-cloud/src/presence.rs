//! What the requester knows of device presence.

use std::collections::HashMap;
use std::sync::RwLock;

use directcall_core::presence::{
    parse_aws_lifecycle, parse_directcall, PresenceEvent, AWS_PRESENCE_FILTER,
};
use directcall_core::{PresenceRoot, Target};

use crate::options::PresenceSource;

/// The last presence record of each target that has one.
#[derive(Debug)]
pub(crate) struct Presence {
    source: PresenceSource,
    /// With AWS lifecycle events: where they are mirrored as retained
    /// records, and read back from (replicas started later learn from them).
    mirror: Option<PresenceRoot>,
    online: RwLock<HashMap<Target, (bool, Option<u64>)>>,
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
            (Some((_, Some(known))), Some(ts)) => ts < *known,
            _ => false,
        };
        if older {
            return false;
        }
        tracing::debug!(target = %event.target, online = ?event.online, "presence");
        match event.online {
            Some(up) => {
                online.insert(event.target, (up, event.timestamp_ms));
            }
            None => {
                online.remove(&event.target);
            }
        }
        true
    }

    pub(crate) fn is_offline(&self, target: &Target) -> bool {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        online.get(target).is_some_and(|(up, _)| !up)
    }
}
