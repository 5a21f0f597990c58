//! The web console in a real browser: Debian's chromium, headless, driven
//! through chromedriver (WebDriver, fantoccini), against `directcall serve`
//! and `directcall-sim` on a Mosquitto of the test's own.
//!
//! Skipped when chromium or chromedriver is missing, except under `CI`,
//! where that fails (as the Mosquitto tests do).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::e2e;
use crate::e2e::{gateway, sim, Proc};
use directcall_testkit::{eventually, free_port, program, Mosquitto};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver on a free port, and a headless chromium session through it.
struct Browser {
    client: Client,
    _driver: Proc,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);

    impl Dir {
        pub(crate) fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "directcall-{name}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Browser {
    async fn start() -> Option<Browser> {
        let chromium = program::CHROMIUM.require()?;
        let driver = program::CHROMEDRIVER.require()?;
        let port = free_port().unwrap();
        let driver = Proc::spawn(driver.to_str().unwrap(), &[&format!("--port={port}")]);
        let url = format!("http://127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(20);
        while directcall_bins::http_client::get(&format!("{url}/status"), &[])
            .await
            .is_err()
        {
            assert!(Instant::now() < until, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempdir::Dir::new("chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.to_str().unwrap(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.0.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a chromium session");
        Some(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    /// The text of the first element matching `css`, once `ok` holds for
    /// it, within 20 s.
    async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = e.text().await {
                    if ok(&text) {
                        return text;
                    }
                    last = text;
                }
            }
            assert!(
                Instant::now() < until,
                "{css}: never as expected; last text {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.expect(script)
    }

    /// Runs `body` (an async function body that returns a value) in the page.
    async fn js_async(&self, body: &str) -> Value {
        let script =
            format!("const done = arguments[arguments.length - 1]; (async () => {{ {body} }})().then(done, e => done('error: ' + e));");
        self.client
            .execute_async(&script, vec![])
            .await
            .expect(body)
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.expect(css);
        field.send_keys(text).await.expect(css);
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .expect(css)
            .click()
            .await
            .expect(css);
    }

    /// Fills the call form and sends it; returns once a result is shown.
    async fn call(&self, target: &str, method: &str, request: &str, timeout_ms: u32) {
        self.js("document.getElementById('result').hidden = true; document.getElementById('result-status').textContent = '';")
            .await;
        self.fill("#target", target).await;
        self.fill("#method", method).await;
        self.fill("#request", request).await;
        self.fill("#timeout", &timeout_ms.to_string()).await;
        self.click("#send").await;
        self.wait_text("#result-status", |t| !t.is_empty()).await;
    }

    /// Nothing is wider than the window, at `width` × `height`, once the
    /// page has taken the new size and laid itself out (within 20 s).
    async fn fits(&self, width: u32, height: u32) {
        let sizes = "return [document.documentElement.scrollWidth, window.innerWidth];";
        let inner_before = self.js(sizes).await[1].as_u64().unwrap();
        self.client.set_window_size(width, height).await.unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.js(sizes).await;
            let (scroll, inner) = (now[0].as_u64().unwrap(), now[1].as_u64().unwrap());
            let resized = inner != inner_before || inner <= u64::from(width);
            if resized && scroll <= inner {
                return;
            }
            assert!(
                Instant::now() < until,
                "at {width}x{height} the page is {scroll} px wide in a {inner} px window"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the page's next two frames: what it drew after the last
    /// change is on screen.
    async fn frames_drawn(&self) {
        self.js_async(
            "await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))); return true;",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let Some(mosquitto) =
        program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))
    else {
        return;
    };
    let Some(curl_path) = program::CURL.require() else {
        return;
    };
    let url = mosquitto.url();
    let (_open_gw, base) = gateway(&url, &["--delivery-receipts"]).await;
    let (_closed_gw, closed_base) = gateway(&url, &["--api-token", "console-secret"]).await;
    let mut device = sim(
        &url,
        &[
            "--presence",
            "--methods",
            "windows_down,honk,echo",
            "--echo",
        ],
    );
    // Answers after 1.5 s: late for a 0.5 s call.
    let _slow = sim(
        &url,
        &[
            "--client-id",
            "Slow001",
            "--presence",
            "--latency-ms",
            "1500",
            "--echo",
        ],
    );
    let b = &browser;

    // The page, its devices: Device001 online.
    b.client.goto(&format!("{base}/")).await.unwrap();
    b.js("window.sameDocument = 'yes';").await;
    b.wait_text("#conn", |t| t == "live").await;
    b.wait_text(r#"#devices tr[data-target="Device001"] td.state"#, |t| {
        t == "online"
    })
    .await;

    // Every field has a label; the page fits 1280×800.
    let unlabelled = b
        .js("return [...document.querySelectorAll('input, textarea')].filter(e => e.labels.length === 0).map(e => e.id);")
        .await;
    assert_eq!(unlabelled, json!([]), "fields without a label");
    b.fits(1280, 800).await;

    // Keyboard only: the device row's Call button fills the target and
    // moves on to the method; Tab and Enter do the rest.
    b.js("document.querySelector('#devices tr[data-target=\"Device001\"] button').focus();")
        .await;
    let button = b.client.active_element().await.unwrap();
    button.send_keys("\u{e007}").await.unwrap();
    let focused = b.js("return document.activeElement.id;").await;
    assert_eq!(
        focused,
        json!("method"),
        "Enter on Call moves to the method"
    );
    let method = b.client.active_element().await.unwrap();
    method.send_keys("windows_down\u{e004}").await.unwrap();
    assert_eq!(
        b.js("return document.activeElement.id;").await,
        json!("request")
    );
    let request = b.client.active_element().await.unwrap();
    request.send_keys("\u{e004}").await.unwrap();
    let timeout = b.client.active_element().await.unwrap();
    timeout.send_keys("\u{e007}").await.unwrap();
    assert_eq!(
        b.wait_text("#result-status", |t| !t.is_empty()).await,
        "200"
    );
    assert_eq!(
        b.js("return [document.getElementById('target').value, document.getElementById('method').value];").await,
        json!(["Device001", "windows_down"])
    );

    // A call from the form: 200, the response, the record's timeline.
    b.call("Device001", "windows_down", r#"{"percent": 50}"#, 3000)
        .await;
    assert_eq!(b.wait_text("#result-status", |_| true).await, "200");
    assert_eq!(b.wait_text("#result-outcome", |_| true).await, "ok");
    let response = b.wait_text("#response", |t| !t.is_empty()).await;
    assert!(response.contains("\"percent\": 50"), "{response}");
    let timeline = b.wait_text("#timeline", |t| t.contains("answered")).await;
    assert!(
        timeline.contains("sent at") && timeline.contains("delivered +"),
        "{timeline}"
    );
    let curl = b.js("return document.getElementById('curl').value;").await;
    let curl = curl.as_str().unwrap();
    assert!(
        curl.starts_with("curl -sS -X POST")
            && curl.contains("/v1/targets/Device001/methods/windows_down")
            && curl.contains(r#"-d '{"request":{"percent":50},"timeout_ms":3000}'"#),
        "{curl}"
    );

    // The curl command the page shows, run as it is: the same answer.
    let out = Command::new("sh")
        .args(["-c", curl])
        .stderr(Stdio::inherit())
        .output()
        .expect("curl runs");
    let answered: Value = serde_json::from_slice(&out.stdout).expect("curl got JSON");
    assert_eq!(answered["response"], json!({"percent": 50}), "{answered}");

    // A method the device does not know: its own 404.
    b.call("Device001", "fly", "{}", 3000).await;
    assert_eq!(b.wait_text("#result-device-status", |_| true).await, "404");

    // Invalid JSON is caught before anything is sent.
    b.wait_text("#log tbody tr", |t| t.contains("fly")).await;
    let calls_before = b
        .js("return document.querySelectorAll('#log tbody tr').length;")
        .await;
    b.fill("#request", "{not json").await;
    b.click("#send").await;
    let problem = b.wait_text("#request-error", |t| !t.is_empty()).await;
    assert!(problem.contains("not valid JSON"), "{problem}");

    // A call from outside the page, with curl: it appears in the live log,
    // the one row since the invalid request (which called nothing).
    let status = Command::new(&curl_path)
        .args([
            "-sS",
            "-o",
            "/dev/null",
            &format!("{base}/invoke?request=from-curl&method=honk&target=Device001&timeout=3"),
        ])
        .status()
        .expect("curl runs");
    assert!(status.success());
    let row = b
        .wait_text(r#"#log tbody tr[data-target="Device001"]"#, |t| {
            t.contains("honk")
        })
        .await;
    assert!(row.contains("ok"), "{row}");
    assert_eq!(
        b.js("return document.querySelectorAll('#log tbody tr').length;")
            .await,
        json!(calls_before.as_u64().unwrap() + 1),
        "nothing was called for the invalid request"
    );

    // Pausing holds new calls back; resuming shows them.
    b.click("#pause").await;
    let shown = b
        .js("return document.querySelectorAll('#log tbody tr').length;")
        .await;
    let _ = Command::new(&curl_path)
        .args([
            "-sS",
            "-o",
            "/dev/null",
            &format!("{base}/invoke?request=held&method=echo&target=Device001&timeout=3"),
        ])
        .status();
    b.wait_text("#log-note", |t| t.contains("1 new call")).await;
    assert_eq!(
        b.js("return document.querySelectorAll('#log tbody tr').length;")
            .await,
        shown
    );
    b.click("#pause").await;
    b.wait_text(r#"#log tbody tr[data-target="Device001"]"#, |t| {
        t.contains("echo")
    })
    .await;

    // A device's answer is text, never HTML.
    let xss = "<img src=x onerror=alert(1)>";
    b.call(
        "Device001",
        "echo",
        &serde_json::to_string(xss).unwrap(),
        3000,
    )
    .await;
    let shown = b.wait_text("#response", |t| t.contains("img")).await;
    assert_eq!(shown, xss);
    let images = b
        .js("return [document.images.length, document.getElementById('response').children.length, document.getElementById('response').textContent];")
        .await;
    assert_eq!(images, json!([0, 0, xss]), "the answer must stay text");
    assert!(
        b.client.get_alert_text().await.is_err(),
        "no alert may open"
    );

    // A call that times out: 504, then its late answer when it comes.
    b.call("Slow001", "echo", r#""worth the wait""#, 500).await;
    assert_eq!(b.wait_text("#result-status", |_| true).await, "504");
    let late = b.wait_text("#late-response", |t| !t.is_empty()).await;
    assert_eq!(late, "worth the wait");
    let timeline = b.wait_text("#timeline", |_| true).await;
    assert!(
        timeline.contains("delivered +")
            && timeline.contains("no answer by the deadline")
            && timeline.contains("answered late"),
        "{timeline}"
    );

    // The charts got their seconds.
    b.wait_text("#chart-rate", |_| true).await;
    let points = b
        .js("return document.querySelectorAll('#chart-rate canvas, #chart-latency canvas').length;")
        .await;
    assert_eq!(points, json!(2), "two charts drawn");

    // A screenshot for docs/console.md: 1280 wide, tall enough for all,
    // once the page has taken the size and drawn.
    b.client.set_window_size(1280, 1500).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while b.js("return window.innerHeight;").await.as_u64().unwrap() <= 800 {
        assert!(Instant::now() < until, "the window never grew");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.frames_drawn().await;
    let png = b.client.screenshot().await.expect("a screenshot");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("console screenshot: {}", shot.display());

    // Readable on a narrow window too.
    b.fits(420, 800).await;
    b.client.set_window_size(1280, 800).await.unwrap();

    // The simulator stops (its will says offline): the list follows, with
    // no reload.
    device.kill();
    b.wait_text(r#"#devices tr[data-target="Device001"] td.state"#, |t| {
        t == "offline"
    })
    .await;
    assert_eq!(
        b.js("return window.sameDocument;").await,
        json!("yes"),
        "the page was not reloaded"
    );
    assert_eq!(
        b.js("return document.body.dataset.cspViolations ?? null;")
            .await,
        Value::Null,
        "no Content-Security-Policy violation"
    );

    // With tokens on: the page asks for one, and without it the event
    // stream cannot be read.
    b.client.goto(&format!("{closed_base}/")).await.unwrap();
    b.wait_text("#login-h", |t| t.contains("token")).await;
    assert_eq!(
        b.js("return document.getElementById('main').hidden;").await,
        json!(true)
    );
    let unauthorized = b
        .js_async(
            "const r = await fetch('/v1/events'); const w = await fetch('/v1/events', {headers: {Authorization: 'Bearer wrong'}}); const d = await fetch('/v1/devices'); return [r.status, w.status, d.status];",
        )
        .await;
    assert_eq!(unauthorized, json!([401, 401, 401]));
    assert_eq!(
        b.js("return document.querySelectorAll('#log tbody tr').length;")
            .await,
        json!(0),
        "nothing of the log reached the page"
    );
    b.fill("#token", "console-secret").await;
    b.click("#login-form button[type=submit]").await;
    b.wait_text("#conn", |t| t == "live").await;
    let offline = b
        .wait_text(r#"#devices tr[data-target="Device001"] td.state"#, |t| {
            !t.is_empty()
        })
        .await;
    assert_eq!(offline, "offline");
    // Kept for the tab's session: a reload stays signed in.
    b.client.refresh().await.unwrap();
    b.wait_text("#conn", |t| t == "live").await;
    let stored = b
        .js("return [sessionStorage.getItem('directcall-token'), localStorage.length];")
        .await;
    assert_eq!(stored, json!(["console-secret", 0]));

    browser.client.close().await.unwrap();
}

/// `/v1/events` read with curl, line by line, until [`Events::close`].
struct Events {
    curl: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Events {
    /// The stream, as the credential of `token` (or none) sees it.
    fn open(curl: &Path, base: &str, token: Option<&str>) -> Events {
        let mut command = Command::new(curl);
        command.args(["-sN", "--max-time", "60"]);
        if let Some(token) = token {
            command.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let mut curl = command
            .arg(format!("{base}/v1/events"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl runs");
        let out = curl.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = std::thread::spawn({
            let lines = Arc::clone(&lines);
            move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Events {
            curl,
            lines,
            reader,
        }
    }

    /// How many lines read so far are `line`.
    fn count(&self, line: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == line)
            .count()
    }

    /// Waits until `n` lines read are `line`, within 10 s.
    async fn wait_count(&self, line: &str, n: usize) {
        eventually(10, || self.count(line) >= n).await;
    }

    /// The data of the first event named `name` read so far.
    fn data(&self, name: &str) -> Option<Value> {
        let lines = self.lines.lock().unwrap();
        let at = lines.iter().position(|l| *l == format!("event: {name}"))?;
        let data = lines.get(at + 1)?.strip_prefix("data: ")?;
        serde_json::from_str(data).ok()
    }

    /// The data of the `hello` event, once it came (within 10 s).
    async fn hello(&self) -> Value {
        eventually(10, || self.data("hello").is_some()).await;
        self.data("hello").unwrap()
    }

    /// Ends the stream; everything read, as curl printed it.
    fn close(mut self) -> String {
        let _ = self.curl.kill();
        let _ = self.curl.wait();
        self.reader.join().unwrap();
        self.lines.lock().unwrap().join("\n")
    }
}

/// A scoped credential sees only the targets its rules name and the calls
/// it could have made, in the device list and in the event stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_credential_sees_only_its_own_devices_and_calls() {
    let Some(mosquitto) =
        program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))
    else {
        return;
    };
    let Some(curl) = program::CURL.require() else {
        return;
    };
    let url = mosquitto.url();
    let creds = mosquitto.dir().join("credentials.toml");
    std::fs::write(
        &creds,
        "[[credentials]]\nname = \"fleet\"\ntoken = \"fleet-secret\"\ntargets = [\"Device*\"]\n\n\
         [[credentials]]\nname = \"cars\"\ntoken = \"cars-secret\"\ntargets = [\"Car*\"]\n\n\
         [[credentials]]\nname = \"honk-only\"\ntoken = \"honk-secret\"\ntargets = [\"Device*\"]\nmethods = [\"honk\"]\n",
    )
    .unwrap();
    let (_gw, base) = gateway(&url, &["--credentials", creds.to_str().unwrap()]).await;
    let _device = sim(&url, &["--presence"]);
    let fleet = [("authorization", "Bearer fleet-secret")];
    // Wait for the presence record, then make one call.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = e2e::get_with(&format!("{base}/v1/devices"), &fleet).await;
        if body["devices"][0]["target"] == "Device001" {
            assert_eq!(body["devices"][0]["online"], true, "{body}");
            break;
        }
        assert!(Instant::now() < until, "Device001 never listed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = e2e::get_with(
        &format!("{base}/invoke?request=r&method=unlock&target=Device001&timeout=3"),
        &fleet,
    )
    .await;
    assert_eq!(status, 200);

    let (_, mine) = e2e::get_with(&format!("{base}/v1/devices"), &fleet).await;
    assert_eq!(mine["recent"][0]["target"], "Device001", "{mine}");
    assert_eq!(mine["recent"][0]["outcome"], "ok", "{mine}");
    let (_, theirs) = e2e::get_with(
        &format!("{base}/v1/devices"),
        &[("authorization", "Bearer cars-secret")],
    )
    .await;
    assert_eq!(theirs["devices"], json!([]), "{theirs}");
    assert_eq!(theirs["recent"], json!([]), "{theirs}");
    // Sees the device, not the `unlock` call it could not have made.
    let (_, honk) = e2e::get_with(
        &format!("{base}/v1/devices"),
        &[("authorization", "Bearer honk-secret")],
    )
    .await;
    assert_eq!(honk["devices"][0]["target"], "Device001", "{honk}");
    assert_eq!(honk["recent"], json!([]), "{honk}");

    // Live: a call made while both streams are open reaches only the
    // credential that could have made it.
    let fleet_events = Events::open(&curl, &base, Some("fleet-secret"));
    let cars_events = Events::open(&curl, &base, Some("cars-secret"));
    fleet_events.hello().await;
    cars_events.hello().await;
    let (status, _) = e2e::get_with(
        &format!("{base}/invoke?request=r&method=lock&target=Device001&timeout=3"),
        &fleet,
    )
    .await;
    assert_eq!(status, 200);
    fleet_events.wait_count("event: calls", 1).await;
    // A stream sends a call 100 ms after it came, in its turn between the
    // per-second events: two of those later, the cars stream would have
    // sent it too.
    let seconds = cars_events.count("event: seconds");
    cars_events.wait_count("event: seconds", seconds + 2).await;
    let texts = [fleet_events.close(), cars_events.close()];
    let live = texts[0]
        .split("\n\n")
        .find(|e| e.starts_with("event: calls"))
        .unwrap_or_else(|| panic!("no calls event: {}", texts[0]));
    assert!(live.contains(r#""method":"lock""#), "{live}");
    assert!(live.contains(r#""more":0"#), "{live}");
    assert!(!texts[1].contains("event: calls"), "{}", texts[1]);

    let events = Events::open(&curl, &base, Some("fleet-secret"));
    let mine = events.hello().await;
    events.close();
    assert_eq!(mine["calls"][0]["method"], "unlock", "{mine}");
    assert_eq!(mine["calls"][0]["credential"], "fleet", "{mine}");
    assert_eq!(mine["devices"][0]["target"], "Device001", "{mine}");
    let events = Events::open(&curl, &base, Some("cars-secret"));
    let theirs = events.hello().await;
    // The per-second totals come once a second.
    events.wait_count("event: seconds", 1).await;
    let text = events.close();
    assert_eq!(theirs["calls"], json!([]), "{theirs}");
    assert_eq!(theirs["devices"], json!([]), "{theirs}");
    assert!(!text.contains("Device001"), "{text}");
    // Never a secret in the stream.
    assert!(!text.contains("secret"), "{text}");
}

/// `--no-console`: no page, no console routes, none in the OpenAPI document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_serves_none_of_it() {
    let broker = directcall_testkit::EmbeddedBroker::start(None).unwrap();
    let (_gw, base) = gateway(&broker.url(), &["--no-console"]).await;
    for path in ["/", "/console/app.js", "/v1/devices", "/v1/events"] {
        let (status, body) = e2e::get(&format!("{base}{path}")).await;
        assert_eq!(
            (status, &body["result"]),
            (404, &json!("not_found")),
            "{path}"
        );
    }
    let (_, doc) = e2e::get(&format!("{base}/openapi.json")).await;
    assert!(doc["paths"].get("/v1/devices").is_none());
    assert!(doc["paths"].get("/v1/events").is_none());
    // And with the console: the page, with its policy.
    let (_gw, base) = gateway(&broker.url(), &[]).await;
    let page = directcall_bins::http_client::get(&format!("{base}/"), &[])
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-security-policy"),
        Some(directcall_cloud::gateway::CONSOLE_CSP)
    );
    assert!(page.body.contains("<title>directcall console</title>"));
}

/// An open console does not hold up a graceful stop: SIGTERM ends the event
/// streams, and the gateway exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_event_streams() {
    let Some(curl) = program::CURL.require() else {
        return;
    };
    let broker = directcall_testkit::EmbeddedBroker::start(None).unwrap();
    let (mut gw, base) = gateway(&broker.url(), &[]).await;
    let events = Events::open(&curl, &base, None);
    // The stream is open once its first event came.
    events.hello().await;
    gw.terminate();
    let status = gw.wait_exit(15);
    assert!(status.success(), "{status:?}");
    let text = tokio::task::spawn_blocking(move || events.close())
        .await
        .unwrap();
    assert!(text.starts_with("event: hello"), "{text}");
}
