//! The wire contract in another language: a Python device (paho-mqtt),
//! written from docs/PROTOCOL.md alone (tests/python/device.py), answers the
//! real gateway on MQTT 3.1.1 and on MQTT 5, so the contract and the code
//! cannot drift apart unnoticed.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;
use crate::e2e::{self, Proc};
use directcall_testkit::program::{self, Program};
use serde_json::{json, Value};

const DEVICE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/device.py");

const PYTHON3: Program = Program {
    name: "python3",
    install: "apt-get install -y python3",
    env: None,
    candidates: &["python3"],
};

const PAHO: Program = Program {
    name: "paho-mqtt (Python)",
    install: "python3 -m pip install paho-mqtt",
    env: None,
    candidates: &[],
};

/// A Python 3 that can import paho-mqtt, or `None` once skipped.
fn python_with_paho() -> Option<PathBuf> {
    let python = PYTHON3.require()?;
    let imports = Command::new(&python)
        .args(["-c", "import paho.mqtt.client"])
        .status()
        .is_ok_and(|s| s.success());
    PAHO.or_skip(imports.then_some(python))
}

fn port_of(url: &str) -> String {
    url.rsplit(':').next().unwrap().to_owned()
}

fn post_json(body: Value) -> Vec<u8> {
    serde_json::to_vec(&body).unwrap()
}

async fn the_python_device_answers_the_gateway(version: &str) {
    let Some(python) = python_with_paho() else {
        return;
    };
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("pycar");
    let (_gw, base) = e2e::gateway(&b.url(), &["--mqtt-version", version]).await;
    e2e::wait_health(&base, 200).await;
    let python = python.to_str().unwrap().to_owned();
    let port = port_of(&b.url());
    let mut device = Proc::spawn(
        &python,
        &[
            DEVICE_PY,
            "--port",
            &port,
            "--target",
            &car,
            "--mqtt-version",
            version,
        ],
    );
    tokio::task::block_in_place(|| device.wait_line("ready"));
    let path = |method: &str| format!("/v1/targets/{car}/methods/{method}");

    // The seed's GET form: the request is a string.
    let (status, body) = e2e::get(&format!(
        "{base}/invoke?request=hello&method=echo&target={car}&timeout=5"
    ))
    .await;
    assert_eq!(
        (status, &body["response"]),
        (200, &json!("hello")),
        "{body}"
    );
    assert_eq!(body["status"], 200, "{body}");

    // The JSON form: any JSON value, a result, an error with a JSON body.
    let (status, body) = e2e::post(
        &base,
        &path("add"),
        &[],
        post_json(json!({"request": {"a": 2, "b": 3}})),
    )
    .await;
    assert_eq!((status, &body["response"]), (200, &json!(5)), "{body}");
    let (status, body) = e2e::post(
        &base,
        &path("add"),
        &[],
        post_json(json!({"request": "two and three"})),
    )
    .await;
    assert_eq!((status, &body["status"]), (200, &json!(400)), "{body}");
    assert_eq!(body["response"]["code"], "bad_operands", "{body}");

    // An unknown method: the device's 404, at once.
    let (status, body) = e2e::post(&base, &path("fly"), &[], post_json(json!({}))).await;
    assert_eq!((status, &body["status"]), (200, &json!(404)), "{body}");

    // A keyed call's id is a UUID v5, which the device takes as any UUID.
    let (status, body) = e2e::post(
        &base,
        &path("echo"),
        &[("Idempotency-Key", "py-key-1")],
        post_json(json!({"request": "once"})),
    )
    .await;
    assert_eq!((status, &body["response"]), (200, &json!("once")), "{body}");
    let id = body["id"].as_str().unwrap();
    assert_eq!(&id[14..15], "5", "a keyed call's id is a v5 UUID: {id}");

    // A reply whose status is the string "201" ends the call at once as a
    // bad reply naming the field, not as a 504 after 10 s.
    let (status, body) = e2e::post(
        &base,
        &path("bad_status"),
        &[],
        post_json(json!({"timeout_ms": 10_000})),
    )
    .await;
    assert_eq!(
        (status, &body["result"]),
        (502, &json!("bad_reply")),
        "{body}"
    );
    assert_eq!(body["field"], "status", "{body}");
    // Bounded generously: far below the deadline is what matters.
    assert!(e2e::elapsed_ms(&body) < 5_000, "{body}");

    // A receipt asked for one call: the 504 says it was delivered.
    let (status, body) = e2e::post(
        &base,
        &path("slow"),
        &[],
        post_json(json!({"request": 1500, "timeout_ms": 300, "receipt": true})),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    let delivery = body["delivery"].as_str().unwrap_or_default();
    assert!(delivery.starts_with("delivered at +"), "{body}");

    // MQTT 5: a plain request from mosquitto_rr is answered on its Response
    // Topic with its Correlation Data.
    if version == "5" {
        if let Some(rr) = program::MOSQUITTO_RR.require() {
            let out = Command::new(rr)
                .args(["-V", "5", "-p", &port, "-t", &format!("{car}/echo")])
                .args(["-e", &format!("replies/{car}"), "-m", r#"{"x":1}"#])
                .args(["-W", "5"])
                .output()
                .expect("mosquitto_rr runs");
            let answer: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
            assert_eq!(answer, json!({"status": 200, "response": {"x": 1}}));
        }
    }

    // Its last will: killed, it is offline at once.
    device.kill();
    wait_for(10, "the device's will to reach the gateway", || {
        let url = format!("{base}/invoke?request=x&method=echo&target={car}&timeout=1");
        async move {
            let (status, body) = e2e::get(&url).await;
            (status == 404 && body["result"] == "offline").then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_answers_the_gateway_on_mqtt_3_1_1() {
    the_python_device_answers_the_gateway("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_answers_the_gateway_on_mqtt_5() {
    the_python_device_answers_the_gateway("5").await;
}
