//! Group calls against real brokers (the embedded rumqttd and a Mosquitto
//! started for each test), with bare MQTT peers as devices: seed devices
//! that know nothing of groups, members of a named group, silent ones.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use directcall_cloud::{
    DeviceOutcome, DeviceResult, Error, GroupInvocation, GroupOutcome, Options, Prefix, Requester,
};
use directcall_core::{PresenceRoot, Target};
use directcall_testkit::{both_brokers, unique, within, Raw, TestBroker};
use serde_json::{json, Value};

async fn requester_with(b: &TestBroker, configure: impl FnOnce(Options) -> Options) -> Requester {
    let options = configure(Options::new(b.options()).prefix(Prefix::new(unique("test")).unwrap()));
    within(15, Requester::connect(options))
        .await
        .expect("requester connects")
}

/// A seed device (the AWS sample's fields only) answering on `filter`'s
/// requests with `status` (none: the seed's 200) and the request echoed,
/// as `name` (its own reply topic). Counts the requests it got.
async fn device(
    b: &TestBroker,
    name: &str,
    filter: &str,
    status: Option<u16>,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    slow_device(b, name, filter, status, 0).await
}

/// [`device`], answering `delay_ms` after each request.
async fn slow_device(
    b: &TestBroker,
    name: &str,
    filter: &str,
    status: Option<u16>,
    delay_ms: u64,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut raw = Raw::connect(&b.options_v311(), &unique(name)).await;
    raw.subscribe(filter).await;
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (name, count) = (name.to_owned(), got.clone());
    let task = tokio::spawn(async move {
        loop {
            let (topic, req) = raw.next().await;
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let l: Vec<&str> = topic.split('/').collect();
            let (method, prefix, id) = (l[l.len() - 3], l[l.len() - 2], l[l.len() - 1]);
            let mut answer = json!({"id": id, "response": req["request"]});
            if let Some(s) = status {
                answer["status"] = json!(s);
            }
            raw.publish(
                &format!("{prefix}/{id}/{name}/{method}/ack"),
                answer.to_string(),
            )
            .await;
        }
    });
    (task, got)
}

async fn presence_record(b: &TestBroker, root: &PresenceRoot, target: &str, body: Value) {
    let record = Raw::connect(&b.options_v311(), &unique("record")).await;
    record
        .publish_with(
            &root.topic(&Target::new(target).unwrap()),
            body.to_string(),
            1,
            true,
        )
        .await;
}

fn by_target(outcome: &GroupOutcome) -> HashMap<String, DeviceResult> {
    outcome
        .results
        .iter()
        .map(|r| (r.target.to_string(), r.clone()))
        .collect()
}

async fn a_list_call_returns_each_device_s_result_and_a_summary(b: TestBroker) {
    let (a, c, failing, silent) = (unique("a"), unique("c"), unique("f"), unique("silent"));
    let _a = device(&b, &a, &format!("{a}/#"), None).await;
    let _c = device(&b, &c, &format!("{c}/#"), Some(201)).await;
    let _f = device(&b, &failing, &format!("{failing}/#"), Some(500)).await;
    let r = requester_with(&b, |o| o).await;
    let call = GroupInvocation::targets([&a, &c, &failing, &silent, &a], "unlock", json!("now"))
        .unwrap()
        .timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let outcome = within(10, r.invoke_group(call))
        .await
        .unwrap()
        .collect()
        .await;
    let took = started.elapsed();
    let results = by_target(&outcome);
    assert_eq!(outcome.results.len(), 4, "{outcome:?}");
    assert_eq!(results[&a].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&a].status, Some(200));
    assert_eq!(results[&a].response, Some(json!("now")));
    assert!(results[&a].latency.is_some());
    assert_eq!(results[&c].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&failing].outcome, DeviceOutcome::DeviceError);
    assert_eq!(results[&failing].status, Some(500));
    // Nobody subscribed to the silent one: MQTT 5 says so at once, 3.1.1
    // waits for the deadline.
    let s = &outcome.summary;
    if b.answers_no_subscriber() {
        assert_eq!(
            results[&silent].outcome,
            DeviceOutcome::Offline,
            "{outcome:?}"
        );
        assert_eq!((s.ok, s.device_error, s.offline, s.timeout), (2, 1, 1, 0));
        assert!(took < Duration::from_millis(1400), "{took:?}");
    } else {
        assert_eq!(
            results[&silent].outcome,
            DeviceOutcome::Timeout,
            "{outcome:?}"
        );
        assert_eq!((s.ok, s.device_error, s.offline, s.timeout), (2, 1, 0, 1));
        assert!(took >= Duration::from_millis(1500), "{took:?}");
    }
    assert!(took < Duration::from_millis(3000), "{took:?}");
    assert_eq!((s.total, s.expected), (4, Some(4)));
    // Nothing is left behind: a late reply to the finished call is
    // dropped, and the requester has no call waiting.
    assert_eq!(r.stats().pending, 0);
}
both_brokers!(a_list_call_returns_each_device_s_result_and_a_summary);

async fn a_glob_call_reaches_the_targets_presence_knows(b: TestBroker) {
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let base = unique("Kiosk");
    let (k1, k2, k3, other) = (
        format!("{base}-1"),
        format!("{base}-2"),
        format!("{base}-3"),
        unique("Car"),
    );
    for (t, online) in [(&k1, true), (&k2, true), (&k3, false), (&other, true)] {
        presence_record(&b, &root, t, json!({ "online": online })).await;
    }
    let _d1 = device(&b, &k1, &format!("{k1}/#"), None).await;
    let _d2 = device(&b, &k2, &format!("{k2}/#"), None).await;
    let (_o, other_got) = device(&b, &other, &format!("{other}/#"), None).await;
    let r = requester_with(&b, |o| o.presence(root.clone())).await;
    within(10, async {
        while r.devices().len() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let glob = format!("{base}-*");
    let started = Instant::now();
    let call = GroupInvocation::matching(&glob, "reboot", json!(1))
        .unwrap()
        .timeout(Duration::from_secs(20));
    let outcome = r.invoke_group(call).await.unwrap().collect().await;
    // Every expected device had its result: no wait for the deadline.
    assert!(started.elapsed() < Duration::from_secs(10), "{outcome:?}");
    let results = by_target(&outcome);
    assert_eq!(results.len(), 3, "{outcome:?}");
    assert_eq!(results[&k1].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&k2].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&k3].outcome, DeviceOutcome::Offline);
    assert_eq!(outcome.summary.expected, Some(3));

    let call = GroupInvocation::matching(&glob, "reboot", json!(2))
        .unwrap()
        .online_only(true);
    let outcome = r.invoke_group(call).await.unwrap().collect().await;
    let mut names: Vec<_> = outcome
        .results
        .iter()
        .map(|r| r.target.to_string())
        .collect();
    names.sort();
    assert_eq!(names, [k1.clone(), k2.clone()]);
    assert_eq!(outcome.summary.ok, 2);
    assert_eq!(other_got.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Without presence a pattern is refused, naming the target field.
    let plain = requester_with(&b, |o| o).await;
    let e = plain
        .invoke_group(GroupInvocation::matching(&glob, "m", Value::Null).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    assert!(e.to_string().contains("presence"), "{e}");
}
both_brokers!(a_glob_call_reaches_the_targets_presence_knows);

async fn a_named_group_call_is_one_publish_and_each_member_answers(b: TestBroker) {
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let group = unique("station");
    let filter = format!("directcall/groups/{group}/#");
    let (m1, m2, m3) = (unique("m1"), unique("m2"), unique("m3"));
    for (t, online) in [(&m1, true), (&m2, true), (&m3, false)] {
        presence_record(&b, &root, t, json!({ "online": online, "groups": [group] })).await;
    }
    let (_d1, got1) = device(&b, &m1, &filter, None).await;
    // The last member answers after a stranger (subscribed to the group,
    // unknown to presence) has: the stranger's answer must not end the
    // call before it.
    let (_d2, _) = slow_device(&b, &m2, &filter, Some(503), 400).await;
    let stranger = unique("stranger");
    let _s = device(&b, &stranger, &filter, None).await;
    let mut watcher = Raw::connect(&b.options_v311(), &unique("watcher")).await;
    watcher.subscribe(&filter).await;

    let r = requester_with(&b, |o| o.presence(root.clone())).await;
    within(10, async {
        while r.devices().len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let started = Instant::now();
    let call = GroupInvocation::group(&group, "firmware", json!("v?"))
        .unwrap()
        .timeout(Duration::from_secs(20));
    let mut running = r.invoke_group(call).await.unwrap();
    let id = running.id();
    let mut results = Vec::new();
    while let Some(result) = running.next().await {
        results.push(result);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{results:?}");
    let s = running.summary();
    // The stranger's answer is given too; the members' are all there.
    assert_eq!(
        (s.ok, s.device_error, s.offline, s.total, s.expected),
        (2, 1, 1, 4, Some(3)),
        "{results:?}"
    );
    assert!(results.iter().any(|r| r.target.as_str() == stranger));
    // One publish, on the group's topic, with the call's id.
    let (topic, request) = watcher.next().await;
    assert_eq!(
        topic,
        format!("directcall/groups/{group}/firmware/{}/{id}", r.prefix())
    );
    assert_eq!(request["id"], json!(id.to_string()));
    watcher.nothing_for(300).await;
    assert_eq!(got1.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Without presence the members are unknown: the answers that came,
    // counted at the deadline.
    let blind = requester_with(&b, |o| o).await;
    let call = GroupInvocation::group(&group, "firmware", json!("v?"))
        .unwrap()
        .timeout(Duration::from_millis(800));
    let started = Instant::now();
    let outcome = blind.invoke_group(call).await.unwrap().collect().await;
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(outcome.summary.expected, None);
    assert_eq!(
        (
            outcome.summary.ok,
            outcome.summary.device_error,
            outcome.summary.total
        ),
        (2, 1, 3)
    );
}
both_brokers!(a_named_group_call_is_one_publish_and_each_member_answers);

async fn the_window_bounds_the_requests_out_and_the_deadline_ends_the_rest(b: TestBroker) {
    let base = unique("slow");
    let names: Vec<String> = (1..=5).map(|i| format!("{base}-{i}")).collect();
    // Subscribed, never answering.
    let mut hole = Raw::connect(&b.options_v311(), &unique("hole")).await;
    for n in &names {
        hole.subscribe(&format!("{n}/#")).await;
    }
    let r = requester_with(&b, |o| o).await;
    let call = GroupInvocation::targets(&names, "m", Value::Null)
        .unwrap()
        .max_in_flight(2)
        .timeout(Duration::from_millis(600));
    let started = Instant::now();
    let outcome = r.invoke_group(call).await.unwrap().collect().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(outcome.summary.timeout, 5, "{outcome:?}");
    let not_sent = outcome
        .results
        .iter()
        .filter(|r| {
            r.reason
                .as_deref()
                .is_some_and(|w| w.starts_with("not sent"))
        })
        .count();
    assert_eq!(not_sent, 3, "{outcome:?}");
    assert_eq!(hole.drain().len(), 2, "two requests out at most");
}
both_brokers!(the_window_bounds_the_requests_out_and_the_deadline_ends_the_rest);

async fn a_keyed_retry_reruns_no_device_that_answered(b: TestBroker) {
    let (a, late) = (unique("a"), unique("late"));
    let (_a, a_got) = device(&b, &a, &format!("{a}/#"), None).await;
    let mut hole = Raw::connect(&b.options_v311(), &unique("hole")).await;
    hole.subscribe(&format!("{late}/#")).await;
    let r = requester_with(&b, |o| o).await;
    let call = || {
        GroupInvocation::targets([&a, &late], "unlock", json!("go"))
            .unwrap()
            .idempotency_key("unlock-all-1")
            .timeout(Duration::from_millis(700))
    };
    let first = r.invoke_group(call()).await.unwrap().collect().await;
    let results = by_target(&first);
    assert_eq!(results[&a].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&late].outcome, DeviceOutcome::Timeout);
    drop(hole);
    // The late device is there now.
    let (_late, late_got) = device(&b, &late, &format!("{late}/#"), None).await;
    let second = r.invoke_group(call()).await.unwrap().collect().await;
    assert_eq!(second.id, first.id, "a retry carries the same call id");
    let results = by_target(&second);
    assert_eq!(results[&a].outcome, DeviceOutcome::Ok);
    assert!(results[&a].replayed, "{second:?}");
    assert_eq!(results[&late].outcome, DeviceOutcome::Ok, "{second:?}");
    assert!(!results[&late].replayed);
    assert_eq!(
        a_got.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a ran once"
    );
    assert_eq!(late_got.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The same key for another call is a conflict.
    let other = GroupInvocation::targets([&a], "unlock", json!("go"))
        .unwrap()
        .idempotency_key("unlock-all-1");
    assert!(matches!(
        r.invoke_group(other).await,
        Err(Error::KeyConflict)
    ));
}
both_brokers!(a_keyed_retry_reruns_no_device_that_answered);

async fn targets_the_caller_may_not_call_are_refused_not_dropped(b: TestBroker) {
    let (mine, theirs) = (unique("mine"), unique("theirs"));
    let _m = device(&b, &mine, &format!("{mine}/#"), None).await;
    let (_t, theirs_got) = device(&b, &theirs, &format!("{theirs}/#"), None).await;
    let r = requester_with(&b, |o| o).await;
    let allowed = mine.clone();
    let call = GroupInvocation::targets([&mine, &theirs], "m", Value::Null)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .admit(move |t| {
            if t.as_str() == allowed {
                Ok(())
            } else {
                Err("outside the caller's scope".into())
            }
        });
    let outcome = r.invoke_group(call).await.unwrap().collect().await;
    let results = by_target(&outcome);
    assert_eq!(results[&mine].outcome, DeviceOutcome::Ok);
    assert_eq!(results[&theirs].outcome, DeviceOutcome::Refused);
    assert_eq!(
        results[&theirs].reason.as_deref(),
        Some("outside the caller's scope")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        theirs_got.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "never published"
    );
}
both_brokers!(targets_the_caller_may_not_call_are_refused_not_dropped);

async fn shutdown_ends_a_group_call_at_once(b: TestBroker) {
    let silent = unique("silent");
    let mut hole = Raw::connect(&b.options_v311(), &unique("hole")).await;
    hole.subscribe(&format!("{silent}/#")).await;
    let r = requester_with(&b, |o| o).await;
    let call = GroupInvocation::targets([&silent], "m", Value::Null)
        .unwrap()
        // "Unbounded" is a natural thing to ask for: clamped, no panic.
        .max_in_flight(usize::MAX)
        .timeout(Duration::from_secs(30));
    let running = r.invoke_group(call).await.unwrap();
    let collected = tokio::spawn(running.collect());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    r.shutdown().await;
    let outcome = within(5, collected).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "{outcome:?}");
    assert_eq!(outcome.results.len(), 1, "{outcome:?}");
    assert_eq!(outcome.results[0].outcome, DeviceOutcome::Timeout);
    assert_eq!(
        outcome.results[0].reason.as_deref(),
        Some("no answer before the requester shut down")
    );
    // And a new one is refused.
    let e = r
        .invoke_group(GroupInvocation::targets([&silent], "m", Value::Null).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed), "{e:?}");
}
both_brokers!(shutdown_ends_a_group_call_at_once);
