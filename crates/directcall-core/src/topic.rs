//! The topic grammar of PROTOCOL.md: names, request and reply topics, filters.
//!
//! Every topic string directcall publishes or subscribes to is built here, from
//! values that were validated here, so a caller can never reach a wildcard or
//! another device's topics by choosing a name.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::{Error, Field};

/// Longest topic level, in bytes.
pub const MAX_LEVEL_BYTES: usize = 128;
/// Longest whole topic, in bytes (AWS IoT Core's limit).
pub const MAX_TOPIC_BYTES: usize = 256;
/// The default requester prefix, as in the AWS sample.
pub const DEFAULT_PREFIX: &str = "invocation_client";
/// The default root of presence topics.
pub const DEFAULT_PRESENCE_ROOT: &str = "directcall/presence";
/// *Extension*: the root of group request topics,
/// `directcall/groups/{group}/{method}/{prefix}/{id}`.
pub const GROUP_ROOT: &str = "directcall/groups";

const ACK: &str = "ack";

/// Checks one topic level: 1 to 128 bytes of `A-Z a-z 0-9 _ - . :`.
fn validate_level(field: Field, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_LEVEL_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long, at most {MAX_LEVEL_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(Error::invalid(
            field,
            format!("contains {c:?}; only A-Z a-z 0-9 _ - . : are allowed"),
        ));
    }
    Ok(())
}

macro_rules! topic_level {
    ($(#[$doc:meta])* $name:ident, $field:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as one topic level.
            ///
            /// # Errors
            /// [`Error::Invalid`] naming the field when `value` is empty, longer
            /// than 128 bytes, or has a character outside `A-Z a-z 0-9 _ - . :`.
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                validate_level($field, &value)?;
                Ok(Self(value))
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

topic_level!(
    /// A device: its MQTT client id or AWS IoT thing name.
    Target,
    Field::Target
);
topic_level!(
    /// The name of a method to run on a device.
    Method,
    Field::Method
);
topic_level!(
    /// A requester's client prefix (default [`DEFAULT_PREFIX`]).
    Prefix,
    Field::Prefix
);

topic_level!(
    /// *Extension*: the name of a group of devices: a call to it is one
    /// publish that every member receives.
    Group,
    Field::Group
);

impl Default for Prefix {
    fn default() -> Self {
        Prefix(DEFAULT_PREFIX.to_owned())
    }
}

/// The namespace of ids derived from idempotency keys (a fixed random UUID).
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x5d1f_0c2a_9b7e_4e35_8f4c_2a61_d0e3_b7a9);

/// The id of one call: a fresh UUID v4 (or, for a call with an idempotency
/// key, a UUID v5 derived from it), written lowercase and hyphenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh random id.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        MessageId(Uuid::new_v4())
    }

    /// The id of every call made with idempotency key `key` (already
    /// scoped to its caller): a name-based UUID (version 5), the same on
    /// every requester, so that a device's duplicate suppression also drops
    /// a retry that reached it by another path.
    pub fn from_key(key: &str) -> Self {
        MessageId(Uuid::new_v5(&KEY_NAMESPACE, key.as_bytes()))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses the canonical form (36 lowercase, hyphenated characters).
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Id`] when `s` is not that form.
    pub fn parse(s: &str) -> Result<Self, Error> {
        // One pass that checks the form and decodes: on every request and
        // every reply, twice (topic and payload).
        let mut value: u128 = 0;
        let canonical = s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| {
                let digit = match (i, b) {
                    (8 | 13 | 18 | 23, b'-') => return true,
                    (8 | 13 | 18 | 23, _) => return false,
                    (_, b'0'..=b'9') => b - b'0',
                    (_, b'a'..=b'f') => b - b'a' + 10,
                    _ => return false,
                };
                value = value << 4 | u128::from(digit);
                true
            });
        if !canonical {
            return Err(Error::invalid(
                Field::Id,
                "must be a lowercase hyphenated UUID",
            ));
        }
        Ok(MessageId(Uuid::from_u128(value)))
    }

    fn write(&self, out: &mut String) {
        let mut buf = Uuid::encode_buffer();
        out.push_str(self.0.hyphenated().encode_lower(&mut buf));
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One write of the whole id (uuid's own Display writes it in
        // pieces, which grows a `to_string()` three times per id).
        let mut buf = Uuid::encode_buffer();
        f.pad(self.0.hyphenated().encode_lower(&mut buf))
    }
}

/// The four names that identify one call on the wire.
///
/// The request topic is `{target}/{method}/{prefix}/{id}`, the reply topic
/// `{prefix}/{id}/{target}/{method}/ack`. A `CallTopics` value is only made
/// when both topics fit in [`MAX_TOPIC_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallTopics {
    target: Target,
    method: Method,
    prefix: Prefix,
    id: MessageId,
}

impl CallTopics {
    /// Combines validated names, checking the total topic length.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when the reply topic (the longer
    /// of the two) would exceed 256 bytes.
    pub fn new(
        target: Target,
        method: Method,
        prefix: Prefix,
        id: MessageId,
    ) -> Result<Self, Error> {
        check_call_length(&target, &method, &prefix)?;
        Ok(CallTopics {
            target,
            method,
            prefix,
            id,
        })
    }

    /// The device.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The requester's prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The call's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The target and method, taking them out.
    pub fn into_target_method(self) -> (Target, Method) {
        (self.target, self.method)
    }

    /// `{target}/{method}/{prefix}/{id}`.
    pub fn request_topic(&self) -> String {
        let mut s = String::with_capacity(self.reply_len());
        s.push_str(self.target.as_str());
        s.push('/');
        s.push_str(self.method.as_str());
        s.push('/');
        s.push_str(self.prefix.as_str());
        s.push('/');
        self.id.write(&mut s);
        s
    }

    /// `{prefix}/{id}/{target}/{method}/ack`.
    pub fn reply_topic(&self) -> String {
        let mut s = String::with_capacity(self.reply_len());
        s.push_str(self.prefix.as_str());
        s.push('/');
        self.id.write(&mut s);
        s.push('/');
        s.push_str(self.target.as_str());
        s.push('/');
        s.push_str(self.method.as_str());
        s.push('/');
        s.push_str(ACK);
        s
    }

    fn reply_len(&self) -> usize {
        reply_len(&self.target, &self.method, &self.prefix)
    }

    /// Parses a request topic as a device sees it.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when `topic` does not have four
    /// levels, or for the level that breaks its rule.
    pub fn parse_request(topic: &str) -> Result<Self, Error> {
        let [target, method, prefix, id] = split_levels(topic).ok_or_else(|| {
            Error::invalid(
                Field::Topic,
                "a request topic has four levels: target/method/prefix/id",
            )
        })?;
        Self::from_levels(target, method, prefix, id)
    }

    /// Parses a reply topic as a requester sees it.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when `topic` does not have five
    /// levels ending in `ack`, or for the level that breaks its rule.
    pub fn parse_reply(topic: &str) -> Result<Self, Error> {
        ReplyTopic::parse(topic).map(|reply| reply.to_call_topics())
    }

    fn from_levels(target: &str, method: &str, prefix: &str, id: &str) -> Result<Self, Error> {
        Self::new(
            Target::new(target)?,
            Method::new(method)?,
            Prefix::new(prefix)?,
            MessageId::parse(id)?,
        )
    }
}

/// A reply topic read in place: the four names of [`CallTopics`], checked
/// exactly as [`CallTopics::parse_reply`] checks them, borrowed from the
/// topic instead of copied (a requester reads one for every reply).
///
/// ```
/// use directcall_core::{CallTopics, ReplyTopic};
///
/// let topic = "invocation_client/7f1c2a3b-0000-4000-8000-00000000abcd/car-1/unlock/ack";
/// let reply = ReplyTopic::parse(topic)?;
/// assert_eq!((reply.target(), reply.method()), ("car-1", "unlock"));
/// assert_eq!(reply.to_call_topics(), CallTopics::parse_reply(topic)?);
/// assert!(ReplyTopic::parse("invocation_client/not-an-id/car-1/unlock/ack").is_err());
/// # Ok::<(), directcall_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTopic<'a> {
    target: &'a str,
    method: &'a str,
    prefix: &'a str,
    id: MessageId,
}

impl<'a> ReplyTopic<'a> {
    /// Reads `{prefix}/{id}/{target}/{method}/ack`.
    ///
    /// # Errors
    /// The same as [`CallTopics::parse_reply`], for the same topics.
    pub fn parse(topic: &'a str) -> Result<Self, Error> {
        let Some([prefix, id, target, method, ACK]) = split_levels(topic) else {
            return Err(Error::invalid(
                Field::Topic,
                "a reply topic has five levels: prefix/id/target/method/ack",
            ));
        };
        validate_level(Field::Target, target)?;
        validate_level(Field::Method, method)?;
        validate_level(Field::Prefix, prefix)?;
        let id = MessageId::parse(id)?;
        // The id is 36 bytes, so the topic is as long as
        // `CallTopics::reply_topic` would make it.
        if topic.len() > MAX_TOPIC_BYTES {
            return Err(call_too_long(topic.len()));
        }
        Ok(ReplyTopic {
            target,
            method,
            prefix,
            id,
        })
    }

    /// The device.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The method.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The requester's prefix.
    pub fn prefix(&self) -> &'a str {
        self.prefix
    }

    /// The call's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The same names, owned.
    pub fn to_call_topics(&self) -> CallTopics {
        CallTopics {
            target: Target(self.target.to_owned()),
            method: Method(self.method.to_owned()),
            prefix: Prefix(self.prefix.to_owned()),
            id: self.id,
        }
    }
}

/// *Extension*: the topics of a call to a named group: one request on
/// `directcall/groups/{group}/{method}/{prefix}/{id}` that every member
/// receives, and one reply from each member on its own reply topic,
/// `{prefix}/{id}/{member}/{method}/ack`, naming itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupTopics {
    group: Group,
    method: Method,
    prefix: Prefix,
    id: MessageId,
}

impl GroupTopics {
    /// Combines validated names, checking the request topic's length.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when the request topic would
    /// exceed 256 bytes.
    pub fn new(group: Group, method: Method, prefix: Prefix, id: MessageId) -> Result<Self, Error> {
        let len = GROUP_ROOT.len() + group.0.len() + method.0.len() + prefix.0.len() + 36 + 4;
        if len > MAX_TOPIC_BYTES {
            return Err(Error::invalid(
                Field::Topic,
                format!(
                    "group, method and prefix make a {len}-byte topic; at most {MAX_TOPIC_BYTES} bytes are allowed"
                ),
            ));
        }
        Ok(GroupTopics {
            group,
            method,
            prefix,
            id,
        })
    }

    /// The group.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The requester's prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The call's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// `directcall/groups/{group}/{method}/{prefix}/{id}`.
    pub fn request_topic(&self) -> String {
        let mut s = String::with_capacity(MAX_TOPIC_BYTES);
        s.push_str(GROUP_ROOT);
        for level in [&self.group.0, &self.method.0, &self.prefix.0] {
            s.push('/');
            s.push_str(level);
        }
        s.push('/');
        self.id.write(&mut s);
        s
    }

    /// The topics of member `target`'s part of this call: its reply goes
    /// to [`CallTopics::reply_topic`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when the member's reply topic
    /// would exceed 256 bytes.
    pub fn member(&self, target: Target) -> Result<CallTopics, Error> {
        CallTopics::new(target, self.method.clone(), self.prefix.clone(), self.id)
    }

    /// Parses a group request topic as a member sees it; `None` when
    /// `topic` is not under [`GROUP_ROOT`].
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when a topic under the root
    /// does not have four more levels, or for the level that breaks its
    /// rule.
    pub fn parse_request(topic: &str) -> Option<Result<Self, Error>> {
        let rest = topic.strip_prefix(GROUP_ROOT)?.strip_prefix('/')?;
        let Some([group, method, prefix, id]) = split_levels(rest) else {
            return Some(Err(Error::invalid(
                Field::Topic,
                "a group request topic is directcall/groups/group/method/prefix/id",
            )));
        };
        Some((|| {
            Self::new(
                Group::new(group)?,
                Method::new(method)?,
                Prefix::new(prefix)?,
                MessageId::parse(id)?,
            )
        })())
    }
}

/// *Extension*: the filter a member of `group` subscribes to, besides its
/// own: `directcall/groups/{group}/#`.
pub fn group_filter(group: &Group) -> String {
    format!("{GROUP_ROOT}/{group}/#")
}

/// Exactly `N` `/`-separated levels, or `None`.
fn split_levels<const N: usize>(topic: &str) -> Option<[&str; N]> {
    let mut levels = topic.split('/');
    let mut out = [""; N];
    for slot in &mut out {
        *slot = levels.next()?;
    }
    levels.next().is_none().then_some(out)
}

fn reply_len(target: &Target, method: &Method, prefix: &Prefix) -> usize {
    // four separators, the 36-byte id and "ack"
    prefix.0.len() + target.0.len() + method.0.len() + 36 + 4 + ACK.len()
}

/// Checks that every topic of a call to `target`/`method` from `prefix` fits
/// in [`MAX_TOPIC_BYTES`], before any id is made.
///
/// # Errors
/// [`Error::Invalid`] for [`Field::Topic`] when the reply topic would be too long.
pub fn check_call_length(target: &Target, method: &Method, prefix: &Prefix) -> Result<(), Error> {
    let len = reply_len(target, method, prefix);
    if len > MAX_TOPIC_BYTES {
        return Err(call_too_long(len));
    }
    Ok(())
}

/// A call whose reply topic would be `len` bytes, over [`MAX_TOPIC_BYTES`].
fn call_too_long(len: usize) -> Error {
    Error::invalid(
        Field::Topic,
        format!(
            "target, method and prefix make a {len}-byte topic; at most {MAX_TOPIC_BYTES} bytes are allowed"
        ),
    )
}

/// The one filter a device subscribes to: `{target}/#`.
pub fn device_filter(target: &Target) -> String {
    format!("{target}/#")
}

/// The one filter a requester subscribes to: `{prefix}/+/+/+/ack`.
pub fn reply_filter(prefix: &Prefix) -> String {
    format!("{prefix}/+/+/+/{ACK}")
}

/// A presence root such as `directcall/presence`: one or more topic levels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PresenceRoot(String);

impl PresenceRoot {
    /// Validates a root of one or more `/`-separated levels.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Field::Topic`] when a level breaks the level rule
    /// or the root is longer than 100 bytes.
    pub fn new(value: impl Into<String>) -> Result<Self, Error> {
        let value = value.into();
        if value.len() > 100 {
            return Err(Error::invalid(
                Field::Topic,
                "a presence root is at most 100 bytes",
            ));
        }
        for level in value.split('/') {
            validate_level(Field::Topic, level)?;
        }
        Ok(PresenceRoot(value))
    }

    /// `{root}/{target}`: where `target`'s presence record lives.
    pub fn topic(&self, target: &Target) -> String {
        format!("{}/{target}", self.0)
    }

    /// `{root}/+`: every target's presence record.
    pub fn filter(&self) -> String {
        format!("{}/+", self.0)
    }

    /// The target named by a presence topic under this root, if it is one.
    pub fn parse(&self, topic: &str) -> Option<Target> {
        let rest = topic.strip_prefix(self.0.as_str())?.strip_prefix('/')?;
        Target::new(rest).ok()
    }
}

impl Default for PresenceRoot {
    fn default() -> Self {
        PresenceRoot(DEFAULT_PRESENCE_ROOT.to_owned())
    }
}

impl fmt::Display for PresenceRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn call(target: &str, method: &str, prefix: &str) -> Result<CallTopics, Error> {
        CallTopics::new(
            Target::new(target)?,
            Method::new(method)?,
            Prefix::new(prefix)?,
            MessageId::new(),
        )
    }

    #[test]
    fn a_reply_topic_read_in_place_is_checked_as_parse_reply_checks_it() {
        let id = "7f1c2a3b-0000-4000-8000-00000000abcd";
        let long = "m".repeat(128);
        let longer = "p".repeat(90);
        let topics = [
            format!("invocation_client/{id}/car-1/unlock/ack"),
            format!("invocation_client/{id}/car 1/unlock/ack"),
            format!("invocation_client/{id}/car-1//ack"),
            format!("invocation_client/{id}/car-1/unlock/nak"),
            format!("invocation_client/{id}/car-1/unlock/ack/x"),
            format!("invocation_client/{}/car-1/unlock/ack", id.to_uppercase()),
            "invocation_client/not-an-id/car-1/unlock/ack".to_owned(),
            format!("/{id}/car-1/unlock/ack"),
            format!("{longer}/{id}/{}/{long}/ack", "t".repeat(90)),
            format!("{longer}/{id}/{}/{long}/ack", "t".repeat(50)),
        ];
        for topic in &topics {
            match (CallTopics::parse_reply(topic), ReplyTopic::parse(topic)) {
                (Ok(owned), Ok(borrowed)) => {
                    assert_eq!(borrowed.to_call_topics(), owned, "{topic}");
                    assert_eq!(borrowed.target(), owned.target().as_str());
                    assert_eq!(borrowed.method(), owned.method().as_str());
                    assert_eq!(borrowed.prefix(), owned.prefix().as_str());
                    assert_eq!(borrowed.id(), owned.id());
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{topic}"),
                (a, b) => panic!("{topic}: parse_reply {a:?}, ReplyTopic {b:?}"),
            }
        }
        assert!(ReplyTopic::parse(&topics[0]).is_ok());
        assert!(ReplyTopic::parse(&topics[8]).is_err());
    }

    #[test]
    fn an_id_is_written_as_its_canonical_form_and_honours_width() {
        let id = MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abcd").unwrap();
        assert_eq!(id.to_string(), "7f1c2a3b-0000-4000-8000-00000000abcd");
        assert_eq!(id.to_string(), id.as_uuid().hyphenated().to_string());
        assert_eq!(
            format!("[{id:>38}]"),
            "[  7f1c2a3b-0000-4000-8000-00000000abcd]"
        );
    }

    #[test]
    fn a_group_call_is_one_request_topic_and_a_reply_topic_per_member() {
        let id = MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abcd").unwrap();
        let g = GroupTopics::new(
            Group::new("station-7").unwrap(),
            Method::new("unlock").unwrap(),
            Prefix::default(),
            id,
        )
        .unwrap();
        let topic = g.request_topic();
        assert_eq!(
            topic,
            "directcall/groups/station-7/unlock/invocation_client/7f1c2a3b-0000-4000-8000-00000000abcd"
        );
        assert_eq!(GroupTopics::parse_request(&topic).unwrap().unwrap(), g);
        assert_eq!(
            g.member(Target::new("Car7").unwrap())
                .unwrap()
                .reply_topic(),
            "invocation_client/7f1c2a3b-0000-4000-8000-00000000abcd/Car7/unlock/ack"
        );
        assert_eq!(group_filter(g.group()), "directcall/groups/station-7/#");
        // Not a group topic at all, and a broken one.
        assert!(GroupTopics::parse_request("Car7/unlock/p/x").is_none());
        assert!(GroupTopics::parse_request("directcall/groups/g/unlock")
            .unwrap()
            .is_err());
        assert!(
            GroupTopics::parse_request("directcall/groups/g/m/p/not-an-id")
                .unwrap()
                .is_err()
        );
        assert_eq!(Group::new("a/b").unwrap_err().field(), Field::Group);
        let long = "g".repeat(128);
        assert!(GroupTopics::new(
            Group::new(long.clone()).unwrap(),
            Method::new(long).unwrap(),
            Prefix::default(),
            id
        )
        .is_err());
    }

    #[test]
    fn builds_the_seed_topics() {
        let id = MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abcd").unwrap();
        let c = CallTopics::new(
            Target::new("Device001").unwrap(),
            Method::new("reqid-ABCD").unwrap(),
            Prefix::default(),
            id,
        )
        .unwrap();
        assert_eq!(
            c.request_topic(),
            "Device001/reqid-ABCD/invocation_client/7f1c2a3b-0000-4000-8000-00000000abcd"
        );
        assert_eq!(
            c.reply_topic(),
            "invocation_client/7f1c2a3b-0000-4000-8000-00000000abcd/Device001/reqid-ABCD/ack"
        );
        assert_eq!(device_filter(c.target()), "Device001/#");
        assert_eq!(reply_filter(c.prefix()), "invocation_client/+/+/+/ack");
    }

    #[test]
    fn errors_name_the_field() {
        let e = Target::new("a/b").unwrap_err();
        assert_eq!(e.field(), Field::Target);
        assert!(
            e.to_string().starts_with("invalid target: contains '/'"),
            "{e}"
        );
        let e = Method::new("").unwrap_err();
        assert_eq!(e.to_string(), "invalid method: must not be empty");
        let e = Prefix::new("x".repeat(129)).unwrap_err();
        assert_eq!(e.field(), Field::Prefix);
        assert!(e.to_string().contains("129 bytes"), "{e}");
    }

    #[test]
    fn refuses_wildcards_and_system_topics() {
        for bad in ["+", "#", "$SYS", "a b", "a\0b", "é", "a\nb", "/", "a/"] {
            assert!(Target::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn message_id_is_canonical() {
        let id = MessageId::new();
        assert_eq!(MessageId::parse(&id.to_string()).unwrap(), id);
        let known = MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abcd").unwrap();
        assert_eq!(
            known.as_uuid(),
            Uuid::parse_str("7f1c2a3b-0000-4000-8000-00000000abcd").unwrap()
        );
        assert!(MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abc-").is_err());
        assert!(MessageId::parse("7f1c2a3b-0000-4000-8000-00000000abcg").is_err());
        assert!(MessageId::parse("7F1C2A3B-0000-4000-8000-00000000ABCD").is_err());
        assert!(MessageId::parse("7f1c2a3b000040008000000000000abcd").is_err());
        assert!(MessageId::parse("{7f1c2a3b-0000-4000-8000-00000000abcd}").is_err());
        assert!(MessageId::parse("").is_err());
    }

    #[test]
    fn total_length_is_capped() {
        let long = "a".repeat(128);
        let e = call(&long, &long, "p").unwrap_err();
        assert_eq!(e.field(), Field::Topic);
        // the longest call that fits: 256 = prefix + target + method + 36 + 4 + 3
        let t = "t".repeat(128);
        let m = "m".repeat(256 - 128 - 1 - 43);
        let c = call(&t, &m, "p").unwrap();
        assert_eq!(c.reply_topic().len(), 256);
        assert!(call(&t, &format!("{m}m"), "p").is_err());
    }

    #[test]
    fn parse_refuses_wrong_shapes() {
        let id = MessageId::new();
        for bad in [
            format!("p/{id}/t/m"),
            format!("p/{id}/t/m/ack/x"),
            format!("p/{id}/t/m/nack"),
            format!("p/{id}/t/+/ack"),
            "p/not-an-id/t/m/ack".to_owned(),
            String::new(),
        ] {
            assert!(CallTopics::parse_reply(&bad).is_err(), "{bad:?} parsed");
        }
        assert!(CallTopics::parse_request(&format!("t/m/p/{id}/x")).is_err());
        assert!(CallTopics::parse_request(&format!("t/m/{id}")).is_err());
    }

    #[test]
    fn presence_topics() {
        let root = PresenceRoot::default();
        let t = Target::new("car-1").unwrap();
        assert_eq!(root.topic(&t), "directcall/presence/car-1");
        assert_eq!(root.parse("directcall/presence/car-1"), Some(t));
        assert_eq!(root.parse("directcall/presence/a/b"), None);
        assert_eq!(root.parse("directcall/presences/x"), None);
        assert!(PresenceRoot::new("a/+").is_err());
        assert!(PresenceRoot::new("a//b").is_err());
    }

    const LEVEL: &str = "[A-Za-z0-9_.:-]{1,128}";

    proptest! {
        #[test]
        fn valid_levels_round_trip(t in LEVEL, m in LEVEL, p in LEVEL) {
            let target = Target::new(t.clone()).unwrap();
            let method = Method::new(m.clone()).unwrap();
            let prefix = Prefix::new(p.clone()).unwrap();
            match CallTopics::new(target, method, prefix, MessageId::new()) {
                Ok(c) => {
                    let req = c.request_topic();
                    let rep = c.reply_topic();
                    prop_assert!(req.len() <= MAX_TOPIC_BYTES && rep.len() <= MAX_TOPIC_BYTES);
                    prop_assert_eq!(&CallTopics::parse_request(&req).unwrap(), &c);
                    prop_assert_eq!(&CallTopics::parse_reply(&rep).unwrap(), &c);
                }
                Err(e) => {
                    prop_assert_eq!(e.field(), Field::Topic);
                    prop_assert!(t.len() + m.len() + p.len() + 43 > MAX_TOPIC_BYTES);
                }
            }
        }

        #[test]
        fn any_forbidden_char_is_refused(
            head in "[A-Za-z0-9_.:-]{0,20}",
            bad in any::<char>().prop_filter("forbidden", |c| !(c.is_ascii_alphanumeric() || "_-.:".contains(*c))),
            tail in "[A-Za-z0-9_.:-]{0,20}",
        ) {
            let value = format!("{head}{bad}{tail}");
            prop_assert_eq!(Target::new(value.clone()).unwrap_err().field(), Field::Target);
            prop_assert_eq!(Method::new(value.clone()).unwrap_err().field(), Field::Method);
            prop_assert_eq!(Prefix::new(value).unwrap_err().field(), Field::Prefix);
        }

        #[test]
        fn over_long_levels_are_refused(len in 129usize..600) {
            let value = "a".repeat(len);
            prop_assert!(Target::new(value.clone()).is_err());
            prop_assert!(Method::new(value.clone()).is_err());
            prop_assert!(Prefix::new(value).is_err());
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in ".{0,300}") {
            match (CallTopics::parse_reply(&s), ReplyTopic::parse(&s)) {
                (Ok(c), Ok(r)) => {
                    prop_assert_eq!(c.reply_topic(), s.clone());
                    prop_assert_eq!(r.to_call_topics(), c);
                }
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                (a, b) => prop_assert!(false, "parse_reply {:?}, ReplyTopic {:?}", a, b),
            }
            if let Ok(c) = CallTopics::parse_request(&s) {
                prop_assert_eq!(c.request_topic(), s);
            }
        }
    }
}
