//! Security against a Mosquitto configured like a production broker: TLS,
//! required client certificates whose CN is the username, and an ACL that
//! confines each device to its own topics (like an AWS IoT policy with
//! `${iot:ClientId}`). Certificates are made at test time with openssl.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::pki::Pki;
use crate::common::{eventually, unique, within, Raw};
use directcall_cloud::{Error, Invocation, Options, Requester};
use directcall_core::{BrokerOptions, MessageId, Target};
use directcall_device::{handler_fn, serve, DeviceOptions, Router};
use directcall_testkit::{program, Mosquitto};
use serde_json::{json, Value};

/// The ACL shipped in deploy/, so the test checks what users deploy.
const ACL: &str = include_str!("../../../../deploy/mosquitto/directcall.acl");

struct SecureBroker {
    mosquitto: Mosquitto,
    pki: Pki,
}

fn secure_broker() -> Option<SecureBroker> {
    let pki = Pki::new("directcall")?;
    pki.issue("localhost");
    for cn in ["gateway", "devA", "devB"] {
        pki.issue(cn);
    }
    std::fs::write(pki.dir.join("acl"), ACL).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&pki.dir).status();
    let _ = Command::new("chmod")
        .arg("644")
        .arg(pki.dir.join("acl"))
        .status();
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nacl_file {}\n",
        pki.path("ca.pem"),
        pki.path("localhost.pem"),
        pki.path("localhost.key"),
        pki.path("acl"),
    );
    let mosquitto =
        program::MOSQUITTO.or_skip(Mosquitto::start(&extra).expect("TLS mosquitto starts"))?;
    Some(SecureBroker { mosquitto, pki })
}

impl SecureBroker {
    /// mqtts://localhost with this CA and `cn`'s certificate (or none).
    fn options(&self, cn: Option<&str>) -> BrokerOptions {
        let mut o =
            BrokerOptions::from_url(&format!("mqtts://localhost:{}", self.mosquitto.port()))
                .unwrap();
        o.backoff_max = Some(Duration::from_millis(500));
        let tls = o.tls_mut().unwrap();
        tls.ca_pem = Some(self.pki.read("ca.pem"));
        if let Some(cn) = cn {
            tls.client_auth = Some((
                self.pki.read(&format!("{cn}.pem")),
                self.pki.read(&format!("{cn}.key")),
            ));
        }
        o
    }
}

fn counting(label: &'static str) -> Router {
    Router::new().fallback(handler_fn(move |c| async move {
        Ok(format!("{label} ran {}", c.method))
    }))
}

/// An error and every cause below it, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_confined_to_their_own_topics() {
    let Some(b) = secure_broker() else { return };
    let _a = within(
        15,
        serve(
            counting("devA"),
            DeviceOptions::new(b.options(Some("devA")), Target::new("devA").unwrap()),
        ),
    )
    .await
    .expect("devA connects with its certificate");
    let dev_b = within(
        15,
        serve(
            counting("devB"),
            DeviceOptions::new(b.options(Some("devB")), Target::new("devB").unwrap()),
        ),
    )
    .await
    .expect("devB connects");
    let r = within(
        15,
        Requester::connect(Options::new(b.options(Some("gateway")))),
    )
    .await
    .expect("the requester connects with its certificate");
    let call = |t: &str| {
        Invocation::parse(t, "unlock", Value::Null)
            .unwrap()
            .timeout(Duration::from_secs(3))
    };
    assert_eq!(
        within(10, r.invoke(call("devB"))).await.unwrap().response,
        json!("devB ran unlock")
    );

    // devA's identity, a hostile client: tries to read devB's requests...
    let mut evil = Raw::connect(&b.options(Some("devA")), "devA-evil").await;
    evil.subscribe("devB/#").await; // granted, but the ACL delivers nothing
    assert_eq!(
        within(10, r.invoke(call("devB"))).await.unwrap().response,
        json!("devB ran unlock")
    );
    evil.nothing_for(300).await;
    // ...and to answer as devB: the broker drops it, the requester never sees it.
    let before = r.stats();
    let spoof = MessageId::new();
    let prefix = r.prefix().to_string();
    evil.publish(
        &format!("{prefix}/{spoof}/devB/unlock/ack"),
        json!({"id": spoof.to_string(), "response": "spoofed"}).to_string(),
    )
    .await;
    // control: answering as itself is allowed, and reaches the requester (as unknown)
    let own = MessageId::new();
    evil.publish(
        &format!("{prefix}/{own}/devA/unlock/ack"),
        json!({"id": own.to_string()}).to_string(),
    )
    .await;
    // Last, a malformed answer as itself: the broker passes one client's
    // messages on in order, so once it is counted the two before it have
    // arrived, if they were let through.
    let last = MessageId::new();
    evil.publish(&format!("{prefix}/{last}/devA/unlock/ack"), "not JSON")
        .await;
    eventually(10, || {
        r.stats().dropped_malformed == before.dropped_malformed + 1
    })
    .await;
    let after = r.stats();
    assert_eq!(
        after.dropped_unknown,
        before.dropped_unknown + 1,
        "only the allowed message arrived: {after:?}"
    );
    assert_eq!(after.dropped_mismatched, before.dropped_mismatched);
    assert_eq!(dev_b.stats().executed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_clear_errors_not_hangs() {
    let Some(b) = secure_broker() else { return };
    let Some(other) = Pki::new("stranger") else {
        return;
    };
    // a CA that did not sign the broker's certificate
    let mut wrong_ca = b.options(Some("gateway"));
    wrong_ca.tls_mut().unwrap().ca_pem = Some(other.read("ca.pem"));
    let e = within(
        10,
        Requester::connect(Options::new(wrong_ca).ready_timeout(Duration::from_secs(3))),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let reason = chain(&e);
    assert!(
        reason.contains("certificate"),
        "the reason says what failed: {reason}"
    );

    // no client certificate where one is required
    let e = within(
        10,
        Requester::connect(Options::new(b.options(None)).ready_timeout(Duration::from_secs(3))),
    )
    .await
    .unwrap_err();
    let Error::Unavailable { last_error, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(last_error.is_some(), "the cause is kept: {}", chain(&e));

    // mutual TLS with ALPN offered, as for AWS IoT on port 443 (Mosquitto
    // selects no protocol, which rustls accepts)
    let mut alpn = b.options(Some("gateway"));
    alpn.tls_mut().unwrap().alpn = vec!["x-amzn-mqtt-ca".into()];
    let r = within(10, Requester::connect(Options::new(alpn)))
        .await
        .expect("mTLS with ALPN connects");
    r.shutdown().await;

    // a CA file with no certificate in it is refused before connecting
    let mut empty = b.options(Some("gateway"));
    empty.tls_mut().unwrap().ca_pem = Some(b"not a certificate".to_vec());
    let e = Requester::start(Options::new(empty)).unwrap_err();
    assert!(matches!(e, Error::Setup(_)), "{e:?}");
    assert!(chain(&e).contains("CA certificate"), "{}", chain(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let port = directcall_testkit::free_port().unwrap();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_directcall"))
        .args([
            "serve",
            "--broker",
            "mqtt://127.0.0.1:9",
            "--username",
            "u",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DIRECTCALL_PASSWORD", "hunter2-password")
        .env("DIRECTCALL_API_TOKENS", "tok-secret-1,tok-secret-2")
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Everything it writes, until it has listened and tried the broker
    // (refused on port 9) twice: the credentials have been used by then.
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers = [
        crate::e2e::collect(gw.stdout.take().unwrap(), &lines),
        crate::e2e::collect(gw.stderr.take().unwrap(), &lines),
    ];
    eventually(20, || {
        let lines = lines.lock().unwrap();
        lines.iter().any(|l| l.contains("gateway listening"))
            && lines
                .iter()
                .filter(|l| l.contains("broker connection"))
                .count()
                >= 2
    })
    .await;
    let _ = gw.kill();
    let _ = gw.wait();
    for reader in readers {
        reader.join().unwrap();
    }
    let logs = lines.lock().unwrap().join("\n");
    for secret in ["hunter2-password", "tok-secret-1", "tok-secret-2"] {
        assert!(!logs.contains(secret), "{secret} was logged");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_directcall"))
        .args(["serve", "--help"])
        .env("DIRECTCALL_PASSWORD", "hunter2-password")
        .env("DIRECTCALL_API_TOKENS", "tok-secret-1")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        !help.contains("hunter2-password") && !help.contains("tok-secret-1"),
        "--help shows secrets"
    );
}

/// Secure WebSockets (the transport of AWS IoT's SigV4 auth) with server
/// verification against this test's CA, and refused with a stranger CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_websockets_verify_the_server() {
    let Some(pki) = Pki::new("wss") else { return };
    pki.issue("localhost");
    let _ = Command::new("chmod").arg("755").arg(&pki.dir).status();
    let port = directcall_testkit::free_port().unwrap();
    let extra = format!(
        "listener {port} 127.0.0.1\nprotocol websockets\ncafile {}\ncertfile {}\nkeyfile {}\n",
        pki.path("ca.pem"),
        pki.path("localhost.pem"),
        pki.path("localhost.key"),
    );
    let Some(_m) = program::MOSQUITTO
        .or_skip(Mosquitto::start(&extra).expect("mosquitto with a wss listener"))
    else {
        return;
    };
    let wss = |ca: Vec<u8>| {
        let mut o = BrokerOptions::from_url(&format!("wss://localhost:{port}/mqtt")).unwrap();
        o.tls_mut().unwrap().ca_pem = Some(ca);
        o
    };
    let car = unique("car");
    let _dev = within(
        15,
        serve(
            counting("car"),
            DeviceOptions::new(wss(pki.read("ca.pem")), Target::new(&car).unwrap()),
        ),
    )
    .await
    .expect("device over wss");
    let r = within(
        15,
        Requester::connect(Options::new(wss(pki.read("ca.pem")))),
    )
    .await
    .expect("requester over wss");
    let call = Invocation::parse(&car, "unlock", Value::Null)
        .unwrap()
        .timeout(Duration::from_secs(5));
    assert_eq!(
        within(10, r.invoke(call)).await.unwrap().response,
        json!("car ran unlock")
    );

    let Some(stranger) = Pki::new("stranger-wss") else {
        return;
    };
    let e = within(
        10,
        Requester::connect(
            Options::new(wss(stranger.read("ca.pem"))).ready_timeout(Duration::from_secs(3)),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let reason = chain(&e);
    assert!(
        reason.contains("certificate") || reason.contains("Tls") || reason.contains("TLS"),
        "{reason}"
    );
}

/// `--help` shows where a secret comes from, never its value: the store's
/// URL (with its Redis password), the API tokens and the MQTT password set
/// in the environment do not appear, and a bad store URL's error leaves
/// its password out too.
#[test]
fn help_and_flag_errors_never_show_a_secret() {
    let help = Command::new(crate::e2e::DIRECTCALL)
        .args(["serve", "--help"])
        .env("DIRECTCALL_STORE", "redis://:st0re-secret@127.0.0.1:6390/0")
        .env("DIRECTCALL_API_TOKENS", "t0ken-secret")
        .env("DIRECTCALL_USERNAME", "user")
        .env("DIRECTCALL_PASSWORD", "mqtt-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("DIRECTCALL_STORE"), "{text}");
    for secret in ["st0re-secret", "t0ken-secret", "mqtt-secret"] {
        assert!(!text.contains(secret), "{secret} in --help");
    }
    let err = crate::e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        "memcached://:st0re-secret@127.0.0.1:11211",
    ]);
    assert!(err.contains("--store memcached://127.0.0.1:11211"), "{err}");
    assert!(!err.contains("st0re-secret"), "{err}");
    // A password in --broker is refused, not taken for a host name (and
    // shown in logs and /healthz).
    let err = crate::e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--broker",
        "mqtt://user:br0ker-secret@127.0.0.1:1883",
    ]);
    assert!(err.contains("--password"), "{err}");
    assert!(!err.contains("br0ker-secret"), "{err}");
}

/// Secrets from files, as a mounted Kubernetes or Docker secret gives them:
/// API tokens from `--api-token-file` guard calls; a secret file that
/// cannot be read is refused naming the flag and the path; a `--store-file`
/// URL is shown only without its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_files_and_are_never_shown() {
    let Some(b) = crate::common::TestBroker::start(crate::common::Kind::Mosquitto) else {
        return;
    };
    let dir = std::env::temp_dir().join(unique("secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "t0ken-one\nt0ken-two\n").unwrap();
    let tokens_path = tokens.to_str().unwrap();
    let (_gw, base) = crate::e2e::gateway(&b.url(), &["--api-token-file", tokens_path]).await;
    crate::e2e::wait_health(&base, 200).await;
    let url = format!("{base}/invoke?request=x&method=m&target=NoSuchCar&timeout=1");
    let (status, body) = crate::e2e::get(&url).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = crate::e2e::get_with(&url, &[("Authorization", "Bearer t0ken-two")]).await;
    // Past authentication: no device answers (504; on MQTT 5, 404 from the
    // broker's "no matching subscribers").
    assert!(
        matches!(status, 404 | 504),
        "the second token of the file is taken: {status} {body}"
    );

    let store = dir.join("store");
    std::fs::write(&store, "memcached://:st0re-secret@127.0.0.1:11211\n").unwrap();
    let err = crate::e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store-file",
        store.to_str().unwrap(),
    ]);
    assert!(err.contains("--store memcached://127.0.0.1:11211"), "{err}");
    assert!(!err.contains("st0re-secret"), "{err}");

    let missing = dir.join("no-such-password");
    let err = crate::e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--username",
        "gateway",
        "--password-file",
        missing.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--password-file") && err.contains("no-such-password"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
