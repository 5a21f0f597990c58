//! Group calls (PROTOCOL.md, "Groups") against real brokers: the embedded
//! rumqttd and a Mosquitto of the test's own, the device speaking MQTT
//! 3.1.1 and 5 on each, every run. The requesters are bare MQTT peers
//! publishing what a group requester publishes: one request on
//! `directcall/groups/{group}/{method}/{prefix}/{id}` with the version 1
//! payload.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use directcall_core::mqtt::{
    Connection, ConnectionOptions, Message, Properties, QoS, Session, Subscription,
};
use directcall_core::{BrokerOptions, MessageId, MqttVersion, PresenceRoot};
use directcall_device::{serve, Device, DeviceOptions, Group, Router, Target};
use directcall_testkit::{now_ms, program, unique, within, EmbeddedBroker, Mosquitto, Raw};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A broker of the test's own, and the MQTT version the devices speak on
/// it; bare peers speak 3.1.1.
struct Net {
    device: BrokerOptions,
    raw: BrokerOptions,
    _mosquitto: Option<Mosquitto>,
}

impl Net {
    fn embedded(version: MqttVersion) -> Option<Net> {
        let b = EmbeddedBroker::start(None).expect("embedded broker");
        let device = match version {
            MqttVersion::V5 => b.options_v5(),
            _ => b.options(),
        };
        Some(Net {
            device,
            raw: b.options(),
            _mosquitto: None,
        })
    }

    fn mosquitto(version: MqttVersion) -> Option<Net> {
        let m = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))?;
        let mut device = m.options();
        device.mqtt_version = version;
        Some(Net {
            device,
            raw: m.options(),
            _mosquitto: Some(m),
        })
    }

    fn is_v5(&self) -> bool {
        self.device.mqtt_version == MqttVersion::V5
    }
}

/// Runs `async fn $name(net: Net)` on both brokers, the devices on MQTT
/// 3.1.1 and on 5: four tests, `$name::embedded_v311` and so on.
macro_rules! every_broker_and_version {
    ($name:ident) => {
        mod $name {
            use super::{MqttVersion, Net};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded_v311() {
                if let Some(net) = Net::embedded(MqttVersion::V311) {
                    super::$name(net).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded_v5() {
                if let Some(net) = Net::embedded(MqttVersion::V5) {
                    super::$name(net).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto_v311() {
                if let Some(net) = Net::mosquitto(MqttVersion::V311) {
                    super::$name(net).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto_v5() {
                if let Some(net) = Net::mosquitto(MqttVersion::V5) {
                    super::$name(net).await;
                }
            }
        }
    };
}

fn group(name: &str) -> Group {
    Group::new(name).unwrap()
}

/// `honk` answers who ran it and for which group; `slow` takes 300 ms;
/// `ping` answers at once. Counts the honks.
fn router(honks: Arc<AtomicUsize>) -> Router<Arc<AtomicUsize>> {
    Router::with_state(honks)
        .method_with_state("honk", |call, honks| async move {
            honks.fetch_add(1, Ordering::SeqCst);
            Ok(json!({
                "target": call.target.as_str(),
                "group": call.group.as_ref().map(Group::as_str),
                "reply_to": call.reply_to,
            }))
        })
        .method("slow", |_| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok("done")
        })
        .method("ping", |_| async { Ok("pong") })
}

async fn device(
    net: &Net,
    target: &str,
    groups: &[&str],
    configure: impl FnOnce(DeviceOptions) -> DeviceOptions,
) -> (Device, Arc<AtomicUsize>) {
    let options = groups.iter().fold(
        DeviceOptions::new(net.device.clone(), Target::new(target).unwrap()),
        |o, g| o.group(group(g)),
    );
    let honks = Arc::new(AtomicUsize::new(0));
    let device = within(15, serve(router(Arc::clone(&honks)), configure(options)))
        .await
        .expect("device connects");
    (device, honks)
}

/// A requester of its own prefix, bare MQTT 3.1.1, subscribed to its
/// reply topics.
struct Caller {
    raw: Raw,
    prefix: String,
}

impl Caller {
    async fn new(net: &Net) -> Caller {
        let prefix = unique("raw");
        let mut raw = Raw::connect(&net.raw, &unique("caller")).await;
        raw.subscribe(&format!("{prefix}/+/+/+/ack")).await;
        Caller { raw, prefix }
    }

    /// The version 1 payload of call `id`, sent now with a 5 s budget.
    fn payload(id: &str, request: Value) -> Value {
        json!({"id": id, "request": request, "timestamp": now_ms().to_string(), "timeout_ms": 5000})
    }

    /// Publishes a request to `group`; its id.
    async fn to_group(&self, group: &str, method: &str) -> String {
        let id = MessageId::new().to_string();
        self.to_group_as(group, method, &id, Self::payload(&id, json!("r")))
            .await;
        id
    }

    async fn to_group_as(&self, group: &str, method: &str, id: &str, payload: Value) {
        self.raw
            .publish(
                &format!("directcall/groups/{group}/{method}/{}/{id}", self.prefix),
                payload.to_string(),
            )
            .await;
    }

    async fn to_target_as(&self, target: &str, method: &str, id: &str, payload: Value) {
        self.raw
            .publish(
                &format!("{target}/{method}/{}/{id}", self.prefix),
                payload.to_string(),
            )
            .await;
    }

    /// The reply topic of call `id` from `member`.
    fn reply_topic(&self, id: &str, member: &str, method: &str) -> String {
        format!("{}/{id}/{member}/{method}/ack", self.prefix)
    }

    /// The next `n` replies, by topic.
    async fn replies(&mut self, n: usize) -> BTreeMap<String, Value> {
        let mut replies = BTreeMap::new();
        for _ in 0..n {
            let (topic, reply) = self.raw.next().await;
            assert!(
                replies.insert(topic.clone(), reply).is_none(),
                "two replies on {topic}"
            );
        }
        replies
    }

    /// Waits until each of `members` has answered a `ping` to `group`:
    /// a device's group subscriptions follow its own, which is all
    /// `serve` waits for. Reads every reply it caused.
    async fn wait_joined(&mut self, group: &str, members: &[&str]) {
        let mut waiting: BTreeSet<&str> = members.iter().copied().collect();
        within(15, async {
            while !waiting.is_empty() {
                self.to_group(group, "ping").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (topic, _) in self.raw.drain() {
                    let member = topic.split('/').nth(2).unwrap_or_default().to_owned();
                    waiting.retain(|m| *m != member);
                }
            }
        })
        .await;
        // Late answers to earlier pings.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.raw.drain();
    }
}

async fn members_answer_a_group_request_each_on_its_own_reply_topic(net: Net) {
    let (a, b, c) = (unique("Kiosk-a"), unique("Kiosk-b"), unique("Kiosk-c"));
    let (dev_a, _) = device(&net, &a, &["g1", "g2"], |o| o).await;
    let (_dev_b, _) = device(&net, &b, &["g1"], |o| o).await;
    let (dev_c, honks_c) = device(&net, &c, &["g3"], |o| o).await;
    assert_eq!(dev_a.groups(), [group("g1"), group("g2")]);
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("g1", &[&a, &b]).await;
    caller.wait_joined("g2", &[&a]).await;
    caller.wait_joined("g3", &[&c]).await;
    let c_before = dev_c.stats();

    // One publish to g1: each member answers on its own reply topic, with
    // the call's id, as a call to itself.
    let id = caller.to_group("g1", "honk").await;
    let replies = caller.replies(2).await;
    let expected: BTreeMap<String, Value> = [&a, &b]
        .into_iter()
        .map(|m| {
            (
                caller.reply_topic(&id, m, "honk"),
                json!({"id": id, "status": 200, "response": {"target": m, "group": "g1", "reply_to": null}}),
            )
        })
        .collect();
    assert_eq!(replies, expected);
    caller.raw.nothing_for(300).await;

    // g2 has one member.
    let id = caller.to_group("g2", "honk").await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &a, "honk"));
    assert_eq!(reply["response"]["group"], "g2");
    caller.raw.nothing_for(300).await;

    // The device in no group of these never saw either.
    assert_eq!(dev_c.stats(), c_before);
    assert_eq!(honks_c.load(Ordering::SeqCst), 0);
}
every_broker_and_version!(members_answer_a_group_request_each_on_its_own_reply_topic);

async fn a_member_dedups_expires_and_limits_group_requests_as_its_own(net: Net) {
    let (member, other) = (unique("Car-m"), unique("Car-o"));
    let (dev, honks) = device(&net, &member, &["fleet"], |o| {
        o.max_concurrent(1)
            .max_queued(0)
            .skew(Duration::from_millis(500))
    })
    .await;
    let (dev_other, honks_other) = device(&net, &other, &[], |o| o).await;
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("fleet", &[&member]).await;
    let before = dev.stats();

    // Delivered twice through the group: run once.
    let id = MessageId::new().to_string();
    let payload = Caller::payload(&id, json!("r"));
    caller
        .to_group_as("fleet", "honk", &id, payload.clone())
        .await;
    caller
        .to_group_as("fleet", "honk", &id, payload.clone())
        .await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(
        (topic, reply["status"].as_u64()),
        (caller.reply_topic(&id, &member, "honk"), Some(200))
    );
    // The same id addressed to the member: the same dedup, dropped.
    caller
        .to_target_as(&member, "honk", &id, payload.clone())
        .await;
    // Addressed to another device: its dedup never saw it, it runs.
    caller.to_target_as(&other, "honk", &id, payload).await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &other, "honk"));
    assert_eq!(reply["response"]["group"], Value::Null);
    caller.raw.nothing_for(300).await;
    assert_eq!(honks.load(Ordering::SeqCst), 1);
    assert_eq!(honks_other.load(Ordering::SeqCst), 1);

    // Past its deadline: neither run nor answered.
    let stale = MessageId::new().to_string();
    let sent = (now_ms() - 10_000).to_string();
    caller
        .to_group_as(
            "fleet",
            "honk",
            &stale,
            json!({"id": stale, "request": 1, "timestamp": sent, "timeout_ms": 3000}),
        )
        .await;
    // No such method: 404 at once, on the member's reply topic.
    let unknown = caller.to_group("fleet", "fly").await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&unknown, &member, "fly"));
    assert_eq!(
        (reply["status"].as_u64(), reply["response"].as_str()),
        (Some(404), Some("unknown method 'fly'"))
    );
    // One handler at once and none waiting: the second is 503.
    let first = caller.to_group("fleet", "slow").await;
    let second = caller.to_group("fleet", "slow").await;
    let replies = caller.replies(2).await;
    let status = |id: &str| replies[&caller.reply_topic(id, &member, "slow")]["status"].clone();
    assert_eq!((status(&first), status(&second)), (json!(200), json!(503)));

    let after = dev.stats();
    assert_eq!(
        after.duplicates - before.duplicates,
        2,
        "group twice, then direct"
    );
    assert_eq!(after.expired - before.expired, 1);
    assert_eq!(after.unknown_method - before.unknown_method, 1);
    assert_eq!(after.busy - before.busy, 1);
    let o = dev_other.stats();
    assert_eq!(
        (o.received, o.executed, o.duplicates, o.expired, o.busy),
        (1, 1, 0, 0, 0),
        "the other device's dedup and limits saw nothing of the group's"
    );
}
every_broker_and_version!(a_member_dedups_expires_and_limits_group_requests_as_its_own);

async fn the_presence_record_lists_the_groups(net: Net) {
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let (a, b) = (unique("Kiosk-a"), unique("Kiosk-b"));
    let mut watcher = Raw::connect(&net.raw, &unique("watcher")).await;
    watcher.subscribe(&root.filter()).await;
    let (dev_a, _) = device(&net, &a, &["lobby", "floor-2"], |o| {
        o.presence(root.clone())
    })
    .await;
    let (dev_b, _) = device(&net, &b, &[], |o| o.presence(root.clone())).await;
    let topic = |t: &str| root.topic(&Target::new(t).unwrap());
    let mut records = BTreeMap::new();
    for _ in 0..2 {
        let (topic, record) = watcher.next().await;
        records.insert(topic, record);
    }
    assert_eq!(
        records,
        BTreeMap::from([
            (
                topic(&a),
                json!({"online": true, "groups": ["lobby", "floor-2"]})
            ),
            (topic(&b), json!({"online": true})),
        ])
    );
    // The last will and the offline record keep them.
    dev_a.abort().await;
    assert_eq!(
        watcher.next().await,
        (
            topic(&a),
            json!({"online": false, "groups": ["lobby", "floor-2"]})
        )
    );
    dev_b.shutdown().await;
    assert_eq!(watcher.next().await, (topic(&b), json!({"online": false})));
}
every_broker_and_version!(the_presence_record_lists_the_groups);

async fn a_broken_group_request_is_dropped_and_counted_as_malformed(net: Net) {
    let member = unique("Car-m");
    let (dev, honks) = device(&net, &member, &["g1"], |o| o).await;
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("g1", &[&member]).await;
    let before = dev.stats();
    let id = MessageId::new().to_string();
    let prefix = caller.prefix.clone();
    // Topics no reply topic can be made from: dropped.
    for topic in [
        "directcall/groups/g1/honk".to_owned(),
        format!("directcall/groups/g1/honk/{prefix}/not-an-id"),
        format!("directcall/groups/g1/honk/{prefix}/{id}/extra"),
        format!("directcall/groups/g1//{prefix}/{id}"),
    ] {
        caller
            .raw
            .publish(&topic, Caller::payload(&id, Value::Null).to_string())
            .await;
    }
    // A broken payload on a good topic: 400 on the member's reply topic,
    // and the id is not marked as seen.
    caller
        .to_group_as("g1", "honk", &id, json!({"id": id, "timestamp": "soon"}))
        .await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &member, "honk"));
    assert_eq!(reply["status"], 400);
    caller
        .to_group_as("g1", "honk", &id, Caller::payload(&id, Value::Null))
        .await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(
        (topic, reply["status"].as_u64()),
        (caller.reply_topic(&id, &member, "honk"), Some(200))
    );
    caller.raw.nothing_for(300).await;
    let after = dev.stats();
    assert_eq!(after.malformed - before.malformed, 5, "4 topics, 1 payload");
    assert_eq!(after.received - before.received, 6);
    assert_eq!(honks.load(Ordering::SeqCst), 1);
}
every_broker_and_version!(a_broken_group_request_is_dropped_and_counted_as_malformed);

/// `directcall` is a reserved target: its `directcall/#` sees every
/// group's requests. A device so named leaves them alone (it runs the
/// requests to its own groups only) and answers calls to itself.
async fn a_device_named_directcall_leaves_other_groups_requests_alone(net: Net) {
    let member = unique("Car-m");
    let (dev_dc, honks_dc) = device(&net, "directcall", &[], |o| o).await;
    let (_dev, _) = device(&net, &member, &["g1"], |o| o).await;
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("g1", &[&member]).await;
    let id = caller.to_group("g1", "honk").await;
    let (topic, _) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &member, "honk"));
    caller.raw.nothing_for(300).await;
    let s = dev_dc.stats();
    assert_eq!(
        (s.received, s.malformed, s.executed),
        (0, 0, 0),
        "group requests are not requests to `directcall`"
    );
    let id = MessageId::new().to_string();
    caller
        .to_target_as("directcall", "honk", &id, Caller::payload(&id, Value::Null))
        .await;
    let (topic, _) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, "directcall", "honk"));
    assert_eq!(honks_dc.load(Ordering::SeqCst), 1);
}
every_broker_and_version!(a_device_named_directcall_leaves_other_groups_requests_alone);

/// A device answering any target (test tooling) answers a group request,
/// which names no target, once, as the target it was made for.
async fn an_any_target_device_answers_a_group_request_as_itself(net: Net) {
    let sim = unique("Sim");
    let (_dev, _) = device(&net, &sim, &["g1"], DeviceOptions::any_target).await;
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("g1", &[&sim]).await;
    let id = caller.to_group("g1", "honk").await;
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &sim, "honk"));
    assert_eq!(reply["response"]["target"], json!(sim));
    // And a made-up target as that target.
    let id = MessageId::new().to_string();
    caller
        .to_target_as("Invented", "honk", &id, Caller::payload(&id, Value::Null))
        .await;
    let (topic, _) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, "Invented", "honk"));
    caller.raw.nothing_for(300).await;
}
every_broker_and_version!(an_any_target_device_answers_a_group_request_as_itself);

/// A bare MQTT 5 client built on the connection layer: it subscribes to
/// `filter` and hands over what arrives there.
struct Listener {
    filter: String,
    tx: mpsc::UnboundedSender<String>,
}

impl Session for Listener {
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(self.filter.clone(), QoS::AtMostOnce)]
    }

    fn on_message(self: &Arc<Self>, message: Message<'_>) {
        let _ = self.tx.send(message.topic.to_owned());
    }
}

/// MQTT 5: a group request that names a Response Topic (a requester
/// must not: it would be every member's) is still answered on each
/// member's own reply topic, never there, with no Correlation Data.
async fn an_mqtt5_group_request_is_answered_on_the_members_topic_not_its_response_topic(net: Net) {
    assert!(net.is_v5());
    let member = unique("Car-m");
    let (_dev, _) = device(&net, &member, &["g1"], |o| o).await;
    let mut caller = Caller::new(&net).await;
    caller.wait_joined("g1", &[&member]).await;
    let decoy = unique("decoy");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let connection = Connection::new(ConnectionOptions::new(
        net.device.clone(),
        unique("v5-caller"),
    ))
    .unwrap();
    let link = connection.link();
    let driver = connection.run(Arc::new(Listener {
        filter: format!("{decoy}/#"),
        tx,
    }));
    assert!(link.wait_ready(Duration::from_secs(10)).await);
    let id = MessageId::new().to_string();
    let mut properties = Properties::default();
    properties.response_topic = Some(format!("{decoy}/replies"));
    properties.correlation_data = Some(id.clone().into_bytes());
    link.publish_with(
        format!("directcall/groups/g1/honk/{}/{id}", caller.prefix),
        Caller::payload(&id, Value::Null).to_string(),
        QoS::AtLeastOnce,
        false,
        Some(&properties),
    )
    .unwrap();
    let (topic, reply) = caller.raw.next().await;
    assert_eq!(topic, caller.reply_topic(&id, &member, "honk"));
    assert_eq!(
        reply,
        json!({"id": id, "status": 200, "response": {"target": member, "group": "g1", "reply_to": null}})
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing on the Response Topic"
    );
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_group_request_ignores_its_response_topic_embedded() {
    if let Some(net) = Net::embedded(MqttVersion::V5) {
        an_mqtt5_group_request_is_answered_on_the_members_topic_not_its_response_topic(net).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_group_request_ignores_its_response_topic_mosquitto() {
    if let Some(net) = Net::mosquitto(MqttVersion::V5) {
        an_mqtt5_group_request_is_answered_on_the_members_topic_not_its_response_topic(net).await;
    }
}

#[test]
fn a_group_name_that_is_not_a_topic_level_is_a_clear_error() {
    fn options(name: &str) -> Result<DeviceOptions, directcall_device::Error> {
        let broker = BrokerOptions::new("127.0.0.1", 1883);
        Ok(DeviceOptions::new(broker, Target::new("car")?).group(Group::new(name)?))
    }
    assert!(options("lobby").is_ok());
    for (name, reason) in [
        ("floor/2", "contains '/'"),
        ("#", "contains '#'"),
        ("", "must not be empty"),
    ] {
        let e = options(name).unwrap_err();
        assert!(
            matches!(
                &e,
                directcall_device::Error::Invalid {
                    field: directcall_device::Field::Group,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("invalid group: "), "{e}");
        assert!(e.to_string().contains(reason), "{e}");
    }
}
