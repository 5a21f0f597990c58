//! Hostile input: HTTP requests a caller should never be able to turn into a
//! publish or a 500, and MQTT messages a peer should never be able to turn
//! into a crash, a leak or a completed call.

use std::time::Duration;

use crate::common;
use crate::common::{eventually, requester, unique, within, Raw, TestBroker};
use crate::e2e;
use crate::e2e::{gateway, get, post, wait_health};
use directcall_cloud::Invocation;
use directcall_core::MessageId;
use serde_json::{json, Value};

enum Req {
    Get(String),
    Post {
        path: String,
        content_type: Option<&'static str>,
        body: Vec<u8>,
    },
    Method(&'static str, &'static str),
}

fn get_q(query: &str) -> Req {
    Req::Get(format!("/invoke?{query}"))
}

fn post_b(path: &str, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Req {
    Req::Post {
        path: path.into(),
        content_type,
        body: body.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_gets_a_4xx_naming_the_parameter_and_publishes_nothing() {
    let b = TestBroker::start(common::Kind::Embedded).unwrap();
    let mut spy = Raw::connect(&b.options_v311(), &unique("spy")).await;
    spy.subscribe("#").await;
    let (_gw, base) = gateway(&b.url(), &[]).await;
    wait_health(&base, 200).await;

    let ok = "request=r&method=m&target=car";
    let long = "a".repeat(129);
    let json = Some("application/json");
    let v1 = "/v1/targets/car/methods/m";
    let cases: Vec<(Req, u16, &str)> = vec![
        (get_q(""), 400, "target"),
        (get_q("method=m&request=r"), 400, "target"),
        (get_q("target=car&request=r"), 400, "method"),
        (get_q("target=car&method=m"), 400, "request"),
        (get_q("target=&method=m&request=r"), 400, "target"),
        (get_q("target=car&method=&request=r"), 400, "method"),
        (get_q(&format!("{ok}&target=car2")), 400, "target"),
        (get_q(&format!("{ok}&method=m2")), 400, "method"),
        (get_q(&format!("{ok}&request=r2")), 400, "request"),
        (get_q(&format!("{ok}&timeout=1&timeout=2")), 400, "timeout"),
        (get_q("target=a%2Fb&method=m&request=r"), 400, "target"),
        (get_q("target=a%2Bb&method=m&request=r"), 400, "target"),
        (get_q("target=%23&method=m&request=r"), 400, "target"),
        (get_q("target=%24SYS&method=m&request=r"), 400, "target"),
        (get_q("target=a%00b&method=m&request=r"), 400, "target"),
        (get_q("target=a+b&method=m&request=r"), 400, "target"),
        (get_q("target=caf%C3%A9&method=m&request=r"), 400, "target"),
        (
            get_q(&format!("target={long}&method=m&request=r")),
            400,
            "target",
        ),
        (get_q("target=car&method=a%2Fb&request=r"), 400, "method"),
        (get_q("target=car&method=%2B&request=r"), 400, "method"),
        (get_q("target=car&method=%23&request=r"), 400, "method"),
        (get_q("target=car&method=%24aws&request=r"), 400, "method"),
        (get_q("target=car&method=%00&request=r"), 400, "method"),
        (get_q("target=car&method=a%20b&request=r"), 400, "method"),
        (
            get_q("target=car&method=%E2%9C%93&request=r"),
            400,
            "method",
        ),
        (
            get_q(&format!("target=car&method={long}&request=r")),
            400,
            "method",
        ),
        (
            get_q(&format!(
                "target={}&method={}&request=r",
                "t".repeat(128),
                "m".repeat(128)
            )),
            400,
            "topic",
        ),
        (get_q(&format!("{ok}&timeout=0")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=-1")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=61")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=1e9")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=abc")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=2.5")), 400, "timeout"),
        (get_q(&format!("{ok}&timeout=")), 400, "timeout"),
        (
            get_q(&format!("{ok}&timeout=99999999999999999999999")),
            400,
            "timeout",
        ),
        (
            get_q(&format!(
                "target=car&method=m&request={}",
                "x".repeat(50 * 1024)
            )),
            413,
            "",
        ),
        (post_b(v1, json, vec![b' '; 129 * 1024]), 413, ""),
        (post_b(v1, json, "{\"request\":"), 400, "body"),
        (
            post_b(
                v1,
                json,
                format!("{{\"request\":{}{}}}", "[".repeat(300), "]".repeat(300)),
            ),
            400,
            "body",
        ),
        (post_b(v1, json, "[1,2]"), 400, "body"),
        (post_b(v1, json, "\"just a string\""), 400, "body"),
        (post_b(v1, json, b"\xff\xfe\x00".to_vec()), 400, "body"),
        (post_b(v1, json, "{\"timeout\":3}"), 400, "body"),
        (post_b(v1, json, "{\"timeout_ms\":0}"), 400, "timeout_ms"),
        (
            post_b(v1, json, "{\"timeout_ms\":\"3000\"}"),
            400,
            "timeout_ms",
        ),
        (post_b(v1, json, "{\"timeout_ms\":-5}"), 400, "timeout_ms"),
        (post_b(v1, Some("text/plain"), "{}"), 400, "content-type"),
        (
            post_b(v1, Some("application/x-www-form-urlencoded"), "request=r"),
            400,
            "content-type",
        ),
        (
            post_b("/v1/targets/a%2Fb/methods/m", json, "{}"),
            400,
            "target",
        ),
        (
            post_b("/v1/targets/%23/methods/m", json, "{}"),
            400,
            "target",
        ),
        (
            post_b("/v1/targets/car/methods/%00", json, "{}"),
            400,
            "method",
        ),
        (
            post_b("/v1/targets/car/methods/%2B", json, "{}"),
            400,
            "method",
        ),
        (Req::Get("/nowhere".into()), 404, ""),
        (Req::Get("/v1/targets/car/methods/m".into()), 405, ""),
        (Req::Method("DELETE", "/invoke"), 405, ""),
        (Req::Method("PUT", "/v1/targets/car/methods/m"), 405, ""),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (n, (req, want, field)) in cases.into_iter().enumerate() {
        let (status, body) = match req {
            Req::Get(path) => get(&format!("{base}{path}")).await,
            Req::Post {
                path,
                content_type,
                body,
            } => {
                let headers: Vec<(&str, &str)> = content_type
                    .map(|ct| ("content-type", ct))
                    .into_iter()
                    .collect();
                post(&base, &path, &headers, body).await
            }
            Req::Method(method, path) => {
                let mut c = directcall_bins::http_client::Connection::open(&base)
                    .await
                    .unwrap();
                let r = c.send(method, path, &[], Vec::new()).await.unwrap();
                (
                    r.status,
                    serde_json::from_str(&r.body).unwrap_or(Value::Null),
                )
            }
        };
        assert!((400..500).contains(&status), "case {n}: {status} {body}");
        assert_eq!(status, want, "case {n}: {body}");
        match status {
            400 => {
                assert_eq!(body["result"], "invalid_parameters", "case {n}");
                let msg = body["response"].as_str().unwrap();
                assert!(
                    msg.starts_with(&format!("invalid {field}: ")),
                    "case {n}: {msg}"
                );
            }
            413 => assert_eq!(body["result"], "payload_too_large", "case {n}"),
            _ => assert!(body["result"].is_string(), "case {n}: {body}"),
        }
    }
    spy.nothing_for(500).await;
}

/// Replies no call asked for, in every shape a broken or hostile device
/// could send: each dropped and counted by reason, and the requester keeps
/// answering real calls with bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replies_are_dropped_and_counted() {
    let b = TestBroker::start(common::Kind::Embedded).unwrap();
    let r = requester(&b).await;
    let car = unique("car");
    let _dev = common::device(&b, &car, common::car_router()).await;
    let evil = Raw::connect(&b.options_v311(), &unique("evil")).await;
    let prefix = r.prefix().to_string();
    let id = MessageId::new();
    let garbage: Vec<(String, Vec<u8>)> = vec![
        (format!("{prefix}/{id}/{car}/m/ack"), b"{not json".to_vec()),
        (
            format!("{prefix}/{id}/{car}/m/ack"),
            vec![0xff, 0x00, 0xfe, 0x10],
        ),
        (
            format!("{prefix}/{id}/{car}/m/ack"),
            json!({"id": MessageId::new().to_string(), "response": 1})
                .to_string()
                .into_bytes(),
        ),
        (
            format!("{prefix}/{id}/{car}/m/ack"),
            json!({"id": id.to_string(), "status": "oops"})
                .to_string()
                .into_bytes(),
        ),
        (format!("{prefix}/not-an-id/{car}/m/ack"), b"{}".to_vec()),
        (
            format!("{prefix}/{id}/{car}/m/ack"),
            json!({"id": id.to_string(), "response": "x".repeat(100 * 1024)})
                .to_string()
                .into_bytes(),
        ),
        (
            format!("{prefix}/{id}/{car}/m/ack"),
            json!({"id": id.to_string(), "response": "x".repeat(300 * 1024)})
                .to_string()
                .into_bytes(),
        ),
    ];
    for round in 0..20 {
        for (topic, payload) in &garbage {
            evil.publish(topic, payload.clone()).await;
        }
        // still serving, every round
        let call = Invocation::parse(&car, "alarm_off", Value::Null)
            .unwrap()
            .timeout(Duration::from_secs(5));
        let reply = within(10, r.invoke(call))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(reply.response, json!("alarm off"));
    }
    eventually(10, || {
        let s = r.stats();
        s.dropped_malformed + s.dropped_mismatched + s.dropped_unknown + s.dropped_oversized
            >= 20 * 7
    })
    .await;
    let s = r.stats();
    assert_eq!(s.pending, 0);
    assert_eq!(s.completed, 20);
    assert_eq!(
        s.reconnects, 0,
        "an oversized reply must not cost the connection: {s:?}"
    );
    // A reply with a bad status is a reply to the call its id names:
    // here none (unknown), so it ends nothing.
    assert_eq!(s.dropped_malformed, 20 * 3, "{s:?}");
    assert_eq!(s.dropped_mismatched, 20, "{s:?}");
    assert_eq!(s.dropped_unknown, 20 * 2, "{s:?}");
    assert_eq!(s.dropped_oversized, 20, "{s:?}");
}

/// The same for requests arriving at a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_do_not_stop_a_device() {
    let b = TestBroker::start(common::Kind::Embedded).unwrap();
    let car = unique("car");
    let dev = common::device(&b, &car, common::car_router()).await;
    let mut evil = Raw::connect(&b.options_v311(), &unique("evil")).await;
    let prefix = unique("evilprefix");
    evil.subscribe(&format!("{prefix}/+/+/+/ack")).await;
    let id = || MessageId::new();
    let bad: Vec<(String, Vec<u8>)> = vec![
        (format!("{car}/m/{prefix}/{}", id()), b"{not json".to_vec()),
        (format!("{car}/m/{prefix}/{}", id()), vec![0xff, 0xfe]),
        (format!("{car}/m/{prefix}/not-an-id"), b"{}".to_vec()),
        (format!("{car}/m"), b"{}".to_vec()),
        (format!("{car}/a/b/c/d/e"), b"{}".to_vec()),
        (
            format!("{car}/m/{prefix}/{}", id()),
            json!({"id": "someone-else", "request": 1})
                .to_string()
                .into_bytes(),
        ),
        (
            format!("{car}/m/{prefix}/{}", id()),
            json!({"id": 5}).to_string().into_bytes(),
        ),
        // over the 128 KiB packet limit
        (format!("{car}/m/{prefix}/{}", id()), vec![b'x'; 200 * 1024]),
    ];
    for (topic, payload) in &bad {
        evil.publish(topic, payload.clone()).await;
    }
    // malformed payloads on a well-formed topic get a 400 reply, the oversized
    // one 413; the rest nothing
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (_, reply) = evil.next().await;
        statuses.push(reply["status"].as_u64().unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [400, 400, 400, 400, 413]);
    evil.nothing_for(300).await;
    let r = requester(&b).await;
    let call = Invocation::parse(&car, "alarm_off", Value::Null)
        .unwrap()
        .timeout(Duration::from_secs(5));
    assert_eq!(
        within(10, r.invoke(call)).await.unwrap().response,
        json!("alarm off")
    );
    assert_eq!(dev.stats().malformed, 8);
    assert_eq!(dev.stats().executed, 1);
}

/// The raw status line of one HTTP/1.1 request written byte for byte.
async fn raw_status(base: &str, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within(10, tcp.read(&mut buf)).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

/// Hostile headers of the access rules and the call records: oversized and
/// malformed tokens, header injection (CR, NUL, obs-fold), non-ASCII and
/// oversized idempotency keys, too many headers. Each is a 4xx (never a
/// 500), nothing is published, and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_get_a_4xx_and_publish_nothing() {
    let b = TestBroker::start(common::Kind::Embedded).unwrap();
    let mut spy = Raw::connect(&b.options_v311(), &unique("spy")).await;
    spy.subscribe("#").await;
    let (_gw, base) = gateway(&b.url(), &["--api-token", "tok"]).await;
    wait_health(&base, 200).await;
    let url = format!("{base}/invoke?request=r&method=m&target=car&timeout=1");

    let long = format!("Bearer {}", "t".repeat(10_000));
    for (headers, want, needle) in [
        (
            vec![("authorization", long.as_str())],
            401,
            "over 4096 bytes",
        ),
        (
            vec![("authorization", "Bearer a.b.c")],
            401,
            "unknown token",
        ),
        (vec![("authorization", "Basic dG9rOg==")], 401, ""),
        (
            vec![
                ("authorization", "Bearer tok"),
                ("idempotency-key", "has space"),
            ],
            400,
            "invalid Idempotency-Key",
        ),
    ] {
        let (status, body) = e2e::get_with(&url, &headers).await;
        assert_eq!(status, want, "{headers:?}: {body}");
        if !needle.is_empty() {
            assert!(body.to_string().contains(needle), "{body}");
        }
    }
    let key = "k".repeat(300);
    let (status, body) = e2e::get_with(
        &url,
        &[("authorization", "Bearer tok"), ("idempotency-key", &key)],
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let path = "/invoke?request=r&method=m&target=car&timeout=1";
    let many: String = (0..150).map(|i| format!("X-Pad-{i}: x\r\n")).collect();
    let raw: Vec<Vec<u8>> = vec![
        // A CR inside a value: an injected header.
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nIdempotency-Key: a\rX-Evil: 1\r\n\r\n").into_bytes(),
        // A NUL inside the token.
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\0ok\r\n\r\n").into_bytes(),
        // obs-fold continuing a header on the next line.
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nIdempotency-Key: a\r\n b\r\n\r\n").into_bytes(),
        // A key that is not ASCII.
        [
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nIdempotency-Key: ").as_bytes(),
            "clé".as_bytes(),
            b"\r\nConnection: close\r\n\r\n",
        ]
        .concat(),
        // Too many headers.
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes(),
    ];
    for (n, request) in raw.iter().enumerate() {
        let status = raw_status(&base, request).await;
        assert!((400..500).contains(&status), "raw case {n}: {status}");
    }
    spy.nothing_for(500).await;
    wait_health(&base, 200).await;
}
