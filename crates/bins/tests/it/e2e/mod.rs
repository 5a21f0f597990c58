//! Running the real binaries: spawn, read their output, stop them.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use directcall_bins::http_client::{self, HttpResponse};
use directcall_testkit::{free_port, wait_for};
use serde_json::Value;

pub const DIRECTCALL: &str = env!("CARGO_BIN_EXE_directcall");
pub const SIM: &str = env!("CARGO_BIN_EXE_directcall-sim");

/// A child process, SIGKILLed on drop.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            // No wait before the drain, unless a test asks (--shutdown-delay).
            .env("DIRECTCALL_SHUTDOWN_DELAY", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// The first stdout line containing `needle`, within 20 s.
    pub fn wait_line(&self, needle: &str) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle:?} within 20 s"),
            }
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "did not exit within {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `directcall serve` on a free port; returns it and its base URL once it listens.
pub async fn gateway(broker_url: &str, extra: &[&str]) -> (Proc, String) {
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--broker", broker_url, "--listen", &listen];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(DIRECTCALL, &args);
    let base = format!("http://{listen}");
    wait_listening(&base).await;
    (proc, base)
}

/// [`gateway`], its stderr (the logs) collected line by line.
pub async fn gateway_logged(
    broker_url: &str,
    extra: &[&str],
) -> (Proc, String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--broker", broker_url, "--listen", &listen];
    args.extend_from_slice(extra);
    let mut child = Command::new(DIRECTCALL)
        .args(&args)
        .env("RUST_LOG", "info")
        .env("DIRECTCALL_SHUTDOWN_DELAY", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn directcall");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = std::sync::Arc::clone(&logs);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let proc = Proc { child, lines };
    let base = format!("http://{listen}");
    wait_listening(&base).await;
    (proc, base, logs)
}

/// Waits until the gateway at `base` answers HTTP at all, within 20 s.
async fn wait_listening(base: &str) {
    let url = format!("{base}/openapi.json");
    wait_for(20, "the gateway listening", || async {
        http_client::get(&url, &[]).await.ok().map(drop)
    })
    .await;
}

/// Waits until `/healthz` answers `status`, within 20 s.
pub async fn wait_health(base: &str, status: u16) {
    let url = format!("{base}/healthz");
    wait_for(20, &format!("/healthz answering {status}"), || async {
        let r = http_client::get(&url, &[]).await.ok()?;
        (r.status == status).then_some(())
    })
    .await;
}

/// Waits until the gateway at `base` has at least `n` calls published and
/// waiting for their answers (its `directcall_pending_calls` gauge), within
/// 20 s.
pub async fn wait_pending(base: &str, n: u64) {
    let url = format!("{base}/metrics");
    wait_for(20, &format!("{n} calls pending"), || async {
        let text = http_client::get(&url, &[]).await.ok()?.body;
        let pending: f64 = text.lines().find_map(|l| {
            l.strip_prefix(directcall_cloud::metrics::PENDING_CALLS)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })?;
        (pending >= n as f64).then_some(())
    })
    .await;
}

/// `directcall-sim` with `args`, once it says it is waiting for commands.
pub fn sim(broker_url: &str, args: &[&str]) -> Proc {
    let mut all = vec!["--broker", broker_url];
    all.extend_from_slice(args);
    let proc = Proc::spawn(SIM, &all);
    proc.wait_line("Waiting for command ...");
    proc
}

pub async fn get(url: &str) -> (u16, Value) {
    get_with(url, &[]).await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    let r = tokio::time::timeout(Duration::from_secs(70), http_client::get(url, &headers))
        .await
        .expect("HTTP answer within 70 s")
        .expect("HTTP request");
    parse(r)
}

pub async fn post(base: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let mut conn = http_client::Connection::open(base).await.expect("connect");
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    let r = tokio::time::timeout(
        Duration::from_secs(70),
        conn.send("POST", path, &headers, body),
    )
    .await
    .expect("HTTP answer within 70 s")
    .expect("HTTP request");
    parse(r)
}

/// A POST on a connection of its own: the whole response, headers too.
pub async fn post_full(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> HttpResponse {
    let mut conn = http_client::Connection::open(base).await.expect("connect");
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    tokio::time::timeout(
        Duration::from_secs(70),
        conn.send("POST", path, &headers, body),
    )
    .await
    .expect("HTTP answer within 70 s")
    .expect("HTTP request")
}

/// The JSON body of a response.
pub fn json(r: &HttpResponse) -> Value {
    serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone()))
}

fn parse(r: HttpResponse) -> (u16, Value) {
    let body = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body));
    (r.status, body)
}

pub fn elapsed_ms(body: &Value) -> u64 {
    body["elapsed"]
        .as_str()
        .expect("elapsed is a string")
        .parse()
        .expect("elapsed is decimal")
}

pub const REFERENCE_QUERY: &str =
    "/invoke?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3";

pub fn assert_reference_answer(status: u16, body: &Value) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "ok", "{body}");
    assert_eq!(body["status"], 200, "{body}");
    let text = body["response"].as_str().unwrap();
    assert!(
        text.starts_with("Your request was 'my_request_1'. Some random response: '"),
        "{text}"
    );
    assert_eq!(body["id"].as_str().unwrap().len(), 36, "{body}");
    elapsed_ms(body);
}

/// A bare client on the Mosquitto at `url` subscribed to every topic that
/// never answers, so that calls to an absent target wait for their deadline
/// on MQTT 5 too (where the broker would otherwise say "no matching
/// subscribers" at once). Keep it alive while the calls run.
pub async fn black_hole(url: &str) -> directcall_testkit::Raw {
    let broker = directcall_core::BrokerOptions::from_url(url).expect("broker URL");
    let mut hole =
        directcall_testkit::Raw::connect(&broker, &directcall_testkit::unique("hole")).await;
    hole.subscribe("#").await;
    hole
}

/// Whether the binaries speak MQTT 5 in this run (they read
/// `DIRECTCALL_MQTT_VERSION` like the tests).
pub fn v5() -> bool {
    directcall_testkit::mqtt_version() == directcall_core::MqttVersion::V5
}

/// The status and headers of `GET path` on a response that may never end
/// (an event stream); the body is left unread.
pub async fn stream_status(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>) {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    let mut conn = http_client::Connection::open(base).await.expect("connect");
    let response =
        tokio::time::timeout(Duration::from_secs(10), conn.get_streaming(path, &headers))
            .await
            .expect("headers within 10 s")
            .expect("HTTP response");
    let head = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    (response.status().as_u16(), head)
}

/// `directcall` with `args`, which must refuse to start: its stderr.
pub fn refused(args: &[&str]) -> String {
    let out = Command::new(DIRECTCALL)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn directcall: {e}"));
    assert!(!out.status.success(), "directcall {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A thread that adds each line `out` prints to `lines`, until it closes.
pub fn collect(
    out: impl std::io::Read + Send + 'static,
    lines: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    let lines = std::sync::Arc::clone(lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    })
}
