//! What the requester knows of device presence.
//!
//! Which record wins: a directcall record is the retained state of its
//! topic, so the last one to arrive is the truth, whatever timestamp it
//! carries (a last will is written when the device connects, so a device
//! that puts its connect time into it still goes offline when it dies).
//! AWS IoT lifecycle events, and the records mirrored from them, are
//! ordered by their timestamps, the broker's clock, as AWS documents:
//! they may arrive out of order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::broadcast;

use directcall_core::presence::{
    is_snapshot_marker, parse_aws_lifecycle, parse_directcall, PresenceEvent, AWS_PRESENCE_FILTER,
};
use directcall_core::{Group, PresenceRoot, Target};

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
#[derive(Debug, Clone)]
struct Record {
    online: bool,
    /// The groups its record names, if it names any (`"groups"`).
    groups: Option<Arc<[Group]>>,
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
    online: RwLock<HashMap<Target, Record>>,
    /// [`crate::metrics::PRESENCE_DEVICES`]: the table's size.
    size: metrics::Gauge,
    changes: broadcast::Sender<DeviceState>,
    /// Strict presence: how far the snapshot of the retained records is.
    pub(crate) snapshot: Arc<Snapshot>,
}

/// What a target's presence says about calling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Online,
    Offline,
    /// No record.
    Unknown,
}

/// Strict presence: whether the retained records of the current
/// connection are all in, learnt from a marker the requester publishes to
/// its own presence subscription ([`directcall_core::presence::snapshot_marker`]).
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The connection (by [`Link::connects`](directcall_core::mqtt::Link::connects))
    /// whose records are all in; 0 for none.
    complete: AtomicU64,
    /// The connection a marker was last published on.
    marker_on: AtomicU64,
    /// Connections lost in a row while a marker of theirs was out.
    losses: AtomicU32,
    /// Markers given up for good: the broker closed the connection over
    /// them too often (AWS IoT Core does over a publish its policy denies).
    given_up: AtomicBool,
    /// The last connection whose marker never came back.
    abandoned: AtomicU64,
}

/// Connections in a row that may be lost while a snapshot marker is out
/// before markers are given up for the life of the requester.
pub(crate) const MARKER_GIVE_UP_AFTER: u32 = 3;

impl Snapshot {
    /// The records of `connection` are all in.
    pub(crate) fn completed(&self, connection: u64) {
        self.complete.store(connection, Relaxed);
        self.losses.store(0, Relaxed);
    }

    /// Whether the records of `connection` are all in.
    pub(crate) fn is_complete(&self, connection: u64) -> bool {
        connection > 0 && self.complete.load(Relaxed) == connection
    }

    /// The marker of `connection` never came back: presence is not strict
    /// on it.
    pub(crate) fn abandon(&self, connection: u64) {
        self.abandoned.store(connection, Relaxed);
    }

    /// Whether nothing more is awaited on `connection`: its records are
    /// all in, or its marker (or every marker) was given up.
    pub(crate) fn is_settled(&self, connection: u64) -> bool {
        self.is_complete(connection)
            || self.given_up.load(Relaxed)
            || (connection > 0 && self.abandoned.load(Relaxed) == connection)
    }

    /// A marker goes out on `connection`; false when markers were given up.
    pub(crate) fn marker_sent(&self, connection: u64) -> bool {
        self.marker_on.store(connection, Relaxed);
        !self.given_up.load(Relaxed)
    }

    /// `connection` was lost; true when that gives markers up for good
    /// (it happened with a marker out too many times in a row).
    pub(crate) fn lost(&self, connection: u64) -> bool {
        let out = self.marker_on.load(Relaxed) == connection && !self.is_complete(connection);
        if !out || self.given_up.load(Relaxed) {
            return false;
        }
        let losses = self.losses.fetch_add(1, Relaxed) + 1;
        if losses >= MARKER_GIVE_UP_AFTER {
            self.given_up.store(true, Relaxed);
            return true;
        }
        false
    }
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
            snapshot: Arc::default(),
            size: {
                metrics::describe_gauge!(
                    crate::metrics::PRESENCE_DEVICES,
                    "Targets with a presence record, online or offline."
                );
                metrics::gauge!(crate::metrics::PRESENCE_DEVICES)
            },
        }
    }

    /// Where retained records are read: the directcall root, or the mirror
    /// of AWS lifecycle events. `None` for lifecycle events alone.
    pub(crate) fn record_root(&self) -> Option<&PresenceRoot> {
        match &self.source {
            PresenceSource::Directcall(root) => Some(root),
            PresenceSource::AwsLifecycle => self.mirror.as_ref(),
        }
    }

    /// Whether `payload` on `topic` is a snapshot marker on the record root.
    pub(crate) fn is_marker(&self, topic: &str, payload: &[u8]) -> bool {
        is_snapshot_marker(payload)
            && self
                .record_root()
                .is_some_and(|root| root.parse(topic).is_some())
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

    /// Applies `event`: always, for a directcall record (the last to
    /// arrive is the topic's retained state); for an AWS lifecycle event or
    /// a record mirrored from one, unless one with a later timestamp is
    /// known. Returns whether it was applied.
    pub(crate) fn record(&self, event: PresenceEvent) -> bool {
        let mut online = self.online.write().unwrap_or_else(|e| e.into_inner());
        let by_timestamp = self.source == PresenceSource::AwsLifecycle;
        let older = match (online.get(&event.target), event.timestamp_ms) {
            (
                Some(Record {
                    timestamp_ms: Some(known),
                    ..
                }),
                Some(ts),
            ) => by_timestamp && ts < *known,
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
                let known = online.get(&event.target);
                let changed = known.is_none_or(|k| k.online != up);
                let since_ms = match known {
                    Some(k) if !changed => k.since_ms,
                    _ => event.timestamp_ms.unwrap_or_else(now_ms),
                };
                online.insert(
                    event.target.clone(),
                    Record {
                        online: up,
                        groups: event.groups.map(Arc::from),
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
        self.size.set(online.len() as f64);
        true
    }

    /// What the last record of `target` says.
    pub(crate) fn known(&self, target: &Target) -> Known {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        match online.get(target) {
            Some(r) if r.online => Known::Online,
            Some(_) => Known::Offline,
            None => Known::Unknown,
        }
    }

    /// The targets with a record whose names match `glob` (`*` any run of
    /// characters, `?` one), with whether each is online, by name.
    pub(crate) fn matching(&self, glob: &wildmatch::WildMatch) -> Vec<(Target, bool)> {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<(Target, bool)> = online
            .iter()
            .filter(|(target, _)| glob.matches(target.as_str()))
            .map(|(target, r)| (target.clone(), r.online))
            .collect();
        found.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        found
    }

    /// The members of `group` with whether each is online, by name, when
    /// presence records name them; `None` when no record names the group
    /// (its members are then unknown).
    pub(crate) fn members(&self, group: &Group) -> Option<Vec<(Target, bool)>> {
        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<(Target, bool)> = online
            .iter()
            .filter(|(_, r)| r.groups.as_ref().is_some_and(|g| g.contains(group)))
            .map(|(target, r)| (target.clone(), r.online))
            .collect();
        // No record names this group: its members are unknown (a device
        // may join a group without saying so), not none.
        if found.is_empty() {
            return None;
        }
        found.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Some(found)
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

    /// The first `limit` targets named after `after` (in byte order of
    /// their names) that `keep` keeps, given the name and whether it is
    /// online; and how many it keeps in all, cursor aside.
    ///
    /// One pass over the table under its read lock, holding at most
    /// `limit` names: what a page costs in memory does not grow with the
    /// fleet (its time does, linearly).
    #[cfg(feature = "console")]
    pub(crate) fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&str, bool) -> bool,
    ) -> Page {
        /// A candidate for the page, ordered by name alone.
        struct ByName<'a>(&'a Target, Record);
        impl PartialEq for ByName<'_> {
            fn eq(&self, other: &Self) -> bool {
                self.0 == other.0
            }
        }
        impl Eq for ByName<'_> {}
        impl PartialOrd for ByName<'_> {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for ByName<'_> {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.0.as_str().cmp(other.0.as_str())
            }
        }

        let online = self.online.read().unwrap_or_else(|e| e.into_inner());
        let mut page = Page::default();
        // The smallest names so far, the largest on top.
        let mut heap = std::collections::BinaryHeap::with_capacity(limit.saturating_add(1));
        let mut past_cursor = 0usize;
        for (target, record) in online.iter() {
            let name = target.as_str();
            if !keep(name, record.online) {
                continue;
            }
            page.total += 1;
            page.online += usize::from(record.online);
            if after.is_some_and(|a| name <= a) {
                continue;
            }
            past_cursor += 1;
            if heap.len() < limit {
                heap.push(ByName(target, record.clone()));
            } else if heap.peek().is_some_and(|top| name < top.0.as_str()) {
                heap.pop();
                heap.push(ByName(target, record.clone()));
            }
        }
        page.more = past_cursor > limit;
        page.devices = heap
            .into_sorted_vec()
            .into_iter()
            .map(|ByName(target, record)| DeviceState {
                target: target.clone(),
                online: record.online,
                since_ms: record.since_ms,
            })
            .collect();
        page
    }
}

/// One page of the presence table ([`Presence::page`]).
#[cfg(feature = "console")]
#[derive(Debug, Default)]
pub(crate) struct Page {
    /// The page, by name.
    pub(crate) devices: Vec<DeviceState>,
    /// Whether more targets follow it.
    pub(crate) more: bool,
    /// The targets kept, before and after the cursor.
    pub(crate) total: usize,
    /// Of those, the ones online.
    pub(crate) online: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(target: &str, online: bool, timestamp_ms: u64) -> PresenceEvent {
        let root = PresenceRoot::default();
        let target = Target::new(target).unwrap();
        let record = serde_json::json!({"online": online, "timestamp": timestamp_ms});
        parse_directcall(&root, &root.topic(&target), record.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_will_written_at_connect_time_still_marks_the_device_offline() {
        // The device's will carries its connect time; its online record,
        // published a moment later, a later one. The will comes last.
        let p = Presence::new(PresenceSource::Directcall(PresenceRoot::default()), None);
        let car = Target::new("car").unwrap();
        assert!(p.record(event("car", true, 1_005)));
        assert_eq!(p.known(&car), Known::Online);
        assert!(p.record(event("car", false, 1_000)));
        assert_eq!(p.known(&car), Known::Offline);
        // Back online, with whatever clock: the last record wins.
        assert!(p.record(event("car", true, 900)));
        assert_eq!(p.known(&car), Known::Online);
        assert_eq!(p.known(&Target::new("other").unwrap()), Known::Unknown);
    }

    #[test]
    fn aws_lifecycle_events_are_ordered_by_their_timestamps() {
        let p = Presence::new(PresenceSource::AwsLifecycle, Some(PresenceRoot::default()));
        let car = Target::new("car").unwrap();
        assert!(p.record(event("car", false, 2_000)));
        // An older "connected" arriving late does not undo it.
        assert!(!p.record(event("car", true, 1_000)));
        assert_eq!(p.known(&car), Known::Offline);
        assert!(p.record(event("car", true, 3_000)));
        assert_eq!(p.known(&car), Known::Online);
    }

    #[cfg(feature = "console")]
    #[test]
    fn pages_walk_the_table_by_name_and_count_what_they_keep() {
        let p = Presence::new(PresenceSource::Directcall(PresenceRoot::default()), None);
        // Inserted out of order; every third offline.
        for i in (0..25).rev() {
            assert!(p.record(event(&format!("car{i:02}"), i % 3 != 0, 1_000 + i)));
        }
        let all = |_: &str, _: bool| true;
        let first = p.page(None, 10, all);
        let names = |page: &Page| -> Vec<String> {
            page.devices.iter().map(|d| d.target.to_string()).collect()
        };
        assert_eq!(
            names(&first),
            (0..10).map(|i| format!("car{i:02}")).collect::<Vec<_>>()
        );
        assert_eq!((first.more, first.total, first.online), (true, 25, 16));
        assert_eq!(
            (first.devices[0].online, first.devices[0].since_ms),
            (false, 1_000)
        );
        // Walking on from the last name: every target once, in order.
        let mut walked = names(&first);
        let mut after = walked.last().cloned();
        loop {
            let page = p.page(after.as_deref(), 10, all);
            assert_eq!(page.total, 25, "the count ignores the cursor");
            walked.extend(names(&page));
            if !page.more {
                break;
            }
            after = walked.last().cloned();
        }
        assert_eq!(
            walked,
            (0..25).map(|i| format!("car{i:02}")).collect::<Vec<_>>()
        );
        // A cursor that is no target, a filter, and an empty page.
        let page = p.page(Some("car1"), 3, |name, online| {
            name.starts_with("car1") && !online
        });
        assert_eq!(names(&page), ["car12", "car15", "car18"]);
        assert_eq!((page.more, page.total, page.online), (false, 3, 0));
        let page = p.page(Some("car24"), 10, all);
        assert!(page.devices.is_empty() && !page.more && page.total == 25);
        let page = p.page(None, 0, all);
        assert!(page.devices.is_empty() && page.more);
    }

    #[test]
    fn markers_are_given_up_after_connections_lost_while_one_was_out() {
        let s = Snapshot::default();
        assert!(!s.is_complete(0) && !s.is_complete(1));
        // Lost with no marker out: not counted.
        assert!(!s.lost(1));
        for connection in 2..2 + u64::from(MARKER_GIVE_UP_AFTER) - 1 {
            assert!(s.marker_sent(connection));
            assert!(!s.lost(connection));
        }
        // Completed: the count starts over.
        assert!(s.marker_sent(10));
        s.completed(10);
        assert!(s.is_complete(10) && !s.is_complete(11));
        assert!(!s.lost(10));
        for connection in 11..11 + u64::from(MARKER_GIVE_UP_AFTER) {
            assert!(s.marker_sent(connection));
            let gave_up = s.lost(connection);
            assert_eq!(gave_up, connection == 10 + u64::from(MARKER_GIVE_UP_AFTER));
        }
        assert!(!s.marker_sent(20), "given up for good");
    }
}
