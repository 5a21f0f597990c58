//! HTTPS on the gateway's listener, with a real client (curl): the
//! reference call over TLS and HTTP/2, and client certificates required
//! when `--tls-client-ca` is given. Certificates are made with openssl.

use std::process::Command;

use crate::common::pki::Pki;
use crate::common::{Kind, TestBroker};
use crate::e2e;
use directcall_testkit::{program, wait_for};
use serde_json::Value;

/// Runs curl with `args`; its exit code and stdout.
fn run_curl(path: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(path)
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn https_gateway(b: &TestBroker, pki: &Pki, extra: &[&str]) -> (e2e::Proc, String) {
    let port = directcall_testkit::free_port().unwrap();
    let (url, listen) = (b.url(), format!("127.0.0.1:{port}"));
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut args = vec!["serve", "--broker", &url, "--listen", &listen];
    args.extend_from_slice(&["--tls-cert", &cert, "--tls-key", &key]);
    args.extend_from_slice(extra);
    let proc = e2e::Proc::spawn(e2e::DIRECTCALL, &args);
    // Listening once a TCP connection is taken.
    wait_for(20, "the gateway listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
    (proc, format!("https://localhost:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https_and_can_require_client_certificates() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(curl_path) = program::CURL.require() else {
        return;
    };
    let curl = |args: &[&str]| run_curl(&curl_path, args);
    let Some(pki) = Pki::new("https") else { return };
    pki.issue("server");
    pki.issue("client");
    let _sim = e2e::sim(&b.url(), &["--client-id", "Device001"]);
    let (_gw, base) = https_gateway(&b, &pki, &[]).await;
    let ca = pki.path("ca.pem");
    let query = format!("{base}{}", e2e::REFERENCE_QUERY);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let (code, body) = curl(&["--cacert", &ca, &query]);
        if code == 0 && body.contains("\"ok\"") {
            break body;
        }
        assert!(std::time::Instant::now() < until, "curl {code}: {body}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    e2e::assert_reference_answer(200, &v);
    // HTTP/2 through ALPN.
    let (code, version) = curl(&[
        "--cacert",
        &ca,
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &query,
    ]);
    assert_eq!((code, version.as_str()), (0, "2"));
    // Not trusted without the CA: curl refuses the certificate.
    let (code, _) = curl(&[&query]);
    assert_ne!(code, 0);

    // Client certificates required.
    let client_ca = pki.path("ca.pem");
    let (_gw2, base2) = https_gateway(&b, &pki, &["--tls-client-ca", client_ca.as_str()]).await;
    let query2 = format!("{base2}{}", e2e::REFERENCE_QUERY);
    let (code, _) = curl(&["--cacert", &ca, &query2]);
    assert_ne!(code, 0, "a client without a certificate got through");
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let (code, body) = curl(&["--cacert", &ca, "--cert", &cert, "--key", &key, &query2]);
    assert_eq!(code, 0, "{body}");
    e2e::assert_reference_answer(200, &serde_json::from_str(&body).unwrap());
}

#[test]
fn bad_tls_material_is_refused_at_start() {
    let Some(pki) = Pki::new("badtls") else {
        return;
    };
    pki.issue("server");
    let err = e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.path("ca.pem"),
        "--tls-key",
        &pki.path("server.key"),
    ]);
    assert!(err.contains("--tls-cert/--tls-key"), "{err}");
    // --tls-cert without --tls-key
    e2e::refused(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.path("server.pem"),
    ]);
}

/// The load tool drives the gateway over HTTPS too.
#[test]
fn the_bench_drives_the_gateway_over_https() {
    let Some(pki) = Pki::new("benchtls") else {
        return;
    };
    pki.issue("server");
    let out = Command::new(e2e::DIRECTCALL)
        .args([
            "bench",
            "--embedded",
            "--mode",
            "http",
            "--calls",
            "300",
            "--concurrency",
            "4",
            "--warmup",
            "20",
        ])
        .args([
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-ca",
            &pki.path("ca.pem"),
        ])
        .arg("--json")
        // The embedded broker's bench runs on 3.1.1, whatever this run's version.
        .env_remove("DIRECTCALL_MQTT_VERSION")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["ok"].as_u64(), report["errors"].as_u64()),
        (Some(300), Some(0)),
        "{report}"
    );
}
