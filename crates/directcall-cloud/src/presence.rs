//! What the requester knows of device presence.

use std::collections::HashMap;
use std::sync::RwLock;

use directcall_core::presence::{
    parse_aws_lifecycle, parse_directcall, PresenceEvent, AWS_PRESENCE_FILTER,
};
use directcall_core::Target;

use crate::options::PresenceSource;

/// The last presence record of each target that has one.
#[derive(Debug)]
pub(crate) struct Presence {
    source: PresenceSource,
    online: RwLock<HashMap<Target, (bool, Option<u64>)>>,
}

impl Presence {
    pub(crate) fn new(source: PresenceSource) -> Self {
        Presence {
            source,
            online: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn filter(&self) -> String {
        match &self.source {
            PresenceSource::Directcall(root) => root.filter(),
            PresenceSource::AwsLifecycle => AWS_PRESENCE_FILTER.to_owned(),
        }
    }

    /// `None` when `topic` is not a presence topic; `Some(None)` when it is
    /// one with an unreadable payload.
    pub(crate) fn parse(&self, topic: &str, payload: &[u8]) -> Option<Option<PresenceEvent>> {
        match &self.source {
            PresenceSource::Directcall(root) => {
                root.parse(topic)?;
                Some(parse_directcall(root, topic, payload))
            }
            PresenceSource::AwsLifecycle => topic
                .starts_with("$aws/events/presence/")
                .then(|| parse_aws_lifecycle(topic, payload)),
        }
    }

    pub(crate) fn record(&self, event: PresenceEvent) {
        let mut online = self.online.write().unwrap_or_else(|e| e.into_inner());
        let older = match (online.get(&event.target), event.timestamp_ms) {
            (Some((_, Some(known))), Some(ts)) => ts < *known,
            _ => false,
        };
        if older {
            return;
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
    }

    pub(crate) fn is_offline(&self, target: &Target) -> bool {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        online.get(target).is_some_and(|(up, _)| !up)
    }
}
