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

/// The group call form's counts by outcome, as the page shows them.
async fn group_counts(b: &Browser) -> Value {
    b.js("return Object.fromEntries([...document.querySelectorAll('#g-counts li')].map(li => [li.dataset.outcome, li.querySelector('.n').textContent]));")
        .await
}

/// The group call form's rows: target, outcome, status, latency, detail.
async fn group_rows(b: &Browser) -> Vec<Vec<String>> {
    let rows = b
        .js("return [...document.querySelectorAll('#g-results tbody tr')].map(tr => [...tr.cells].map(td => td.textContent));")
        .await;
    serde_json::from_value(rows).unwrap()
}

/// The row of `target`, or a panic naming the rows there are.
fn row_of<'a>(rows: &'a [Vec<String>], target: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == target)
        .unwrap_or_else(|| panic!("no row for {target}: {rows:?}"))
}

/// The group call form against `directcall serve` and simulated devices:
/// a list, a pattern and a named group, results as they come (before the
/// call ends), the counts, the latency histogram drawn, a 400 with the
/// gateway's message, and a call to 1,500 devices listing 1,000 rows and
/// counting all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_call_from_the_console() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let Some(mosquitto) =
        program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))
    else {
        return;
    };
    let url = mosquitto.url();
    // Subscribed to everything, answering nothing: on MQTT 5 the broker
    // then never says "no subscribers" for Kiosk009, which waits for the
    // deadline as on 3.1.1.
    let _hole = e2e::black_hole(&url).await;
    let (_gw, base) = gateway(&url, &[]).await;
    // Kiosk001-003 answer and are the group `lobby`; Kiosk004 goes offline;
    // Kiosk005 knows no `ping` (404); Kiosk009 has no presence record and
    // never answers.
    let _kiosks = sim(
        &url,
        &[
            "--devices",
            "3",
            "--id-prefix",
            "Kiosk",
            "--presence",
            "--group",
            "lobby",
            "--echo",
        ],
    );
    let mut gone = sim(&url, &["--client-id", "Kiosk004", "--presence", "--echo"]);
    let _picky = sim(
        &url,
        &[
            "--client-id",
            "Kiosk005",
            "--presence",
            "--methods",
            "other",
        ],
    );
    let b = &browser;
    b.client.goto(&format!("{base}/")).await.unwrap();
    b.wait_text("#conn", |t| t == "live").await;
    for kiosk in ["Kiosk001", "Kiosk002", "Kiosk003", "Kiosk004", "Kiosk005"] {
        b.wait_text(
            &format!(r#"#devices tr[data-target="{kiosk}"] td.state"#),
            |t| t == "online",
        )
        .await;
    }
    gone.kill();
    b.wait_text(r#"#devices tr[data-target="Kiosk004"] td.state"#, |t| {
        t == "offline"
    })
    .await;

    // A list, typed in: the answers are listed while the call still waits
    // for Kiosk009, then every device has its row.
    b.fill(
        "#g-targets",
        "Kiosk001, Kiosk002 Kiosk003\nKiosk004,Kiosk005,Kiosk009",
    )
    .await;
    b.fill("#g-method", "ping").await;
    b.fill("#g-request", r#"{"n": 1}"#).await;
    b.fill("#g-timeout", "3000").await;
    b.click("#g-send").await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = group_counts(b).await;
        if counts["ok"] == "3" {
            let state = b.wait_text("#g-state", |_| true).await;
            assert!(
                !state.starts_with("Done"),
                "the answers came only with the end: {state}"
            );
            assert_eq!(counts["timeout"], "0", "{counts}");
            assert!(
                b.js("return document.getElementById('g-stop').hidden;")
                    .await
                    == json!(false),
                "Stop is offered while the call runs"
            );
            break;
        }
        assert!(Instant::now() < until, "no answers listed: {counts}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = b.wait_text("#g-state", |t| t.starts_with("Done")).await;
    assert!(state.contains("6 result(s) of 6 expected"), "{state}");
    assert_eq!(
        group_counts(b).await,
        json!({"ok": "3", "device_error": "1", "timeout": "1", "offline": "1", "refused": "0", "total": "6 of 6 expected"})
    );
    let rows = group_rows(b).await;
    assert_eq!(rows.len(), 6, "{rows:?}");
    for kiosk in ["Kiosk001", "Kiosk002", "Kiosk003"] {
        let row = row_of(&rows, kiosk);
        assert_eq!((&*row[1], &*row[2], &*row[4]), ("ok", "200", r#"{"n":1}"#));
        assert!(row[3].ends_with(" ms"), "{row:?}");
    }
    let row = row_of(&rows, "Kiosk005");
    assert_eq!((&*row[1], &*row[2]), ("device_error", "404"), "{row:?}");
    let row = row_of(&rows, "Kiosk004");
    assert_eq!((&*row[1], &*row[2], &*row[3]), ("offline", "–", "–"));
    assert!(row[4].contains("offline"), "the reason: {row:?}");
    assert_eq!(row_of(&rows, "Kiosk009")[1], "timeout");
    // The timeout comes last: rows are in the order results came.
    assert_eq!(rows[5][0], "Kiosk009", "{rows:?}");
    assert_eq!(
        b.js("return document.getElementById('g-stop').hidden;")
            .await,
        json!(true)
    );

    // The histogram: the four answers (three ok, the 404), drawn as bars.
    b.frames_drawn().await;
    let hist = b
        .js("const h = document.getElementById('g-hist'); return [h.dataset.answers, h.getAttribute('aria-label'), h.querySelectorAll('canvas').length];")
        .await;
    assert_eq!(hist[0], "4", "{hist}");
    assert!(
        hist[1]
            .as_str()
            .unwrap()
            .starts_with("Latency of 4 answer(s): "),
        "{hist}"
    );
    assert_eq!(hist[2], 1, "one canvas: {hist}");
    let bar_rows = b
        .js("const c = document.querySelector('#g-hist canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const rows = new Set(); for (let i = 0; i < d.length; i += 4) if (d[i] === 9 && d[i + 1] === 105 && d[i + 2] === 218 && d[i + 3] === 255) rows.add(Math.floor(i / 4 / c.width)); return rows.size;")
        .await;
    // The tallest bar spans the plot's height; an empty chart has none.
    assert!(
        bar_rows.as_u64().unwrap() >= 40,
        "the bars are not drawn: their colour is on {bar_rows} rows of pixels"
    );

    // A pattern, online only: Kiosk004 (offline) and Kiosk009 (unknown to
    // presence) are not called.
    b.click("#g-kind-match").await;
    b.fill("#g-match", "Kiosk00*").await;
    b.click("#g-online").await;
    b.click("#g-send").await;
    let state = b.wait_text("#g-state", |t| t.starts_with("Done")).await;
    assert!(state.contains("4 result(s) of 4 expected"), "{state}");
    let counts = group_counts(b).await;
    assert_eq!(
        (&counts["ok"], &counts["device_error"]),
        (&json!("3"), &json!("1"))
    );
    let mut targets: Vec<String> = group_rows(b)
        .await
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    targets.sort();
    assert_eq!(targets, ["Kiosk001", "Kiosk002", "Kiosk003", "Kiosk005"]);

    // A named group: its three members.
    b.click("#g-kind-group").await;
    b.fill("#g-group", "lobby").await;
    b.fill("#g-request", r#""hello lobby""#).await;
    b.click("#g-send").await;
    let state = b.wait_text("#g-state", |t| t.starts_with("Done")).await;
    assert!(state.contains("3 result(s) of 3 expected"), "{state}");
    let rows = group_rows(b).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|r| r[1] == "ok" && r[4] == "hello lobby"),
        "{rows:?}"
    );

    // A refusal shows the gateway's own message, and no result.
    b.click("#g-kind-match").await;
    b.fill("#g-match", "Kiosk/*").await;
    b.click("#g-send").await;
    let error = b.wait_text("#g-error", |t| !t.is_empty()).await;
    assert!(
        error.starts_with("The gateway refused the call (HTTP 400): invalid match:"),
        "{error}"
    );
    assert_eq!(group_rows(b).await.len(), 0);
    // Invalid JSON never leaves the page.
    b.fill("#g-match", "Kiosk*").await;
    b.fill("#g-request", "{nope").await;
    b.click("#g-send").await;
    let error = b
        .wait_text("#g-error", |t| t.contains("not valid JSON"))
        .await;
    assert!(
        error.starts_with("The request is not valid JSON"),
        "{error}"
    );

    // 1,500 devices that never answer: 1,000 rows, all 1,500 counted.
    b.click("#g-kind-targets").await;
    b.js("document.getElementById('g-targets').value = Array.from({length: 1500}, (_, i) => 'Ghost' + String(i).padStart(4, '0')).join(',');")
        .await;
    b.fill("#g-request", "{}").await;
    b.fill("#g-timeout", "500").await;
    b.click("#g-send").await;
    let state = b.wait_text("#g-state", |t| t.starts_with("Done")).await;
    assert!(
        state.contains("1,500 result(s) of 1,500 expected"),
        "{state}"
    );
    let counts = group_counts(b).await;
    assert_eq!(
        (&counts["timeout"], &counts["total"]),
        (&json!("1,500"), &json!("1,500 of 1,500 expected")),
        "{counts}"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#g-results tbody tr').length;")
            .await,
        json!(1000)
    );
    let note = b.wait_text("#g-note", |_| true).await;
    assert_eq!(
        note,
        "The first 1,000 of 1,500 results are listed; all are counted above and in the histogram."
    );

    // Fits a narrow window, with no policy violation.
    b.fits(420, 800).await;
    assert_eq!(
        b.js("return document.body.dataset.cspViolations ?? null;")
            .await,
        Value::Null,
        "no Content-Security-Policy violation"
    );
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

    /// The size of the data of the first event named `name` read so far.
    fn data_bytes(&self, name: &str) -> Option<usize> {
        let lines = self.lines.lock().unwrap();
        let at = lines.iter().position(|l| *l == format!("event: {name}"))?;
        Some(lines.get(at + 1)?.strip_prefix("data: ")?.len())
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

/// How many presence records the fleet test makes: the size the console's
/// cost is measured at (docs/console.md, "What it costs").
const FLEET: usize = 200_000;

/// `Car000000` … `Car199999`; every fourth offline.
fn fleet_car(i: usize) -> (String, bool) {
    (format!("Car{i:06}"), i % 4 != 0)
}

/// Retained presence records for the whole fleet, published at QoS 0 as
/// devices' own would be, on one connection.
async fn publish_fleet(broker: &directcall_core::broker::BrokerOptions) {
    let root = directcall_core::PresenceRoot::default();
    let mut writer =
        directcall_testkit::Raw::connect(broker, &directcall_testkit::unique("fleet")).await;
    let done = directcall_testkit::unique("fleet-done");
    writer.subscribe(&done).await;
    for i in 0..FLEET {
        let (name, online) = fleet_car(i);
        let target = directcall_core::Target::new(name).unwrap();
        let record = format!(
            r#"{{"online":{online},"timestamp":{}}}"#,
            1_700_000_000_000 + i
        );
        writer
            .publish_with(&root.topic(&target), record, 0, true)
            .await;
    }
    // The broker takes a connection's packets in order: once this comes
    // back, it holds every record.
    writer.publish(&done, "{}").await;
    let (topic, _) = writer.next().await;
    assert_eq!(topic, done);
}

/// The page of `/v1/devices?{query}` as `token` sees it, and its size.
async fn devices_page(base: &str, token: &str, query: &str) -> (u16, Value, usize) {
    let auth = [("authorization".to_owned(), format!("Bearer {token}"))];
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        directcall_bins::http_client::get(&format!("{base}/v1/devices?{query}"), &auth),
    )
    .await
    .expect("an answer within 30 s")
    .expect("HTTP");
    let body = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, body, r.body.len())
}

/// A process's resident memory, from `/proc` (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn names(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["target"].as_str().unwrap().to_owned())
        .collect()
}

/// The console at 200,000 presence records, as a fleet makes them (retained
/// on the broker, read by the gateway's subscription): `/v1/devices` is a
/// page, walked by its cursor, filtered to find one device, with the
/// counts of all; the event stream's `hello` stays small; and a scoped
/// credential sees only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paginated_console_at_200000_records() {
    // Mosquitto drops QoS 0 messages for a client past
    // `max_queued_messages` waiting, the retained ones a new subscription
    // gets too: with the test's 100,000, a debug gateway got 171,782 of
    // the 200,000 records (docs/console.md).
    let Some(mosquitto) = program::MOSQUITTO
        .or_skip(Mosquitto::start("max_queued_messages 0").expect("mosquitto starts"))
    else {
        return;
    };
    let Some(curl) = program::CURL.require() else {
        return;
    };
    let started = Instant::now();
    publish_fleet(&mosquitto.options()).await;
    eprintln!("{FLEET} records published in {:?}", started.elapsed());
    let creds = mosquitto.dir().join("credentials.toml");
    std::fs::write(
        &creds,
        "[[credentials]]\nname = \"ops\"\ntoken = \"ops-secret\"\ntargets = [\"*\"]\n\n\
         [[credentials]]\nname = \"few\"\ntoken = \"few-secret\"\ntargets = [\"Car00001*\"]\n",
    )
    .unwrap();
    let (gw, base) = gateway(
        &mosquitto.url(),
        &["--credentials", creds.to_str().unwrap()],
    )
    .await;
    let ops = "ops-secret";

    // Every record in, counted.
    let until = Instant::now() + Duration::from_secs(120);
    let first = loop {
        let (status, page, bytes) = devices_page(&base, ops, "").await;
        assert_eq!(status, 200, "{page}");
        if page["total"] == FLEET {
            eprintln!(
                "all {FLEET} in the gateway after {:?}; the first page is {bytes} bytes",
                started.elapsed()
            );
            assert!(bytes < 16 * 1024, "the first page is {bytes} bytes");
            break page;
        }
        assert!(
            Instant::now() < until,
            "{} of {FLEET} records after 120 s",
            page["total"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        (&first["online"], &first["offline"], &first["presence"]),
        (&json!(FLEET / 4 * 3), &json!(FLEET / 4), &json!(true)),
        "{first}"
    );
    let expected = |from: usize, n: usize| -> Vec<String> {
        (from..from + n).map(|i| fleet_car(i).0).collect()
    };
    assert_eq!(
        names(&first),
        expected(0, 100),
        "the default page: 100, by name"
    );
    assert_eq!(first["next"], "Car000099");
    assert_eq!(first["devices"][0]["online"], false, "{first}");
    assert_eq!(first["devices"][1]["online"], true, "{first}");
    assert_eq!(first["devices"][1]["since_ms"], 1_700_000_000_001_u64);

    // Walking on by the cursor: the next names, no gap, no repeat.
    let mut after = first["next"].as_str().unwrap().to_owned();
    for page_no in 1..4 {
        let (status, page, _) =
            devices_page(&base, ops, &format!("limit=1000&after={after}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(names(&page), expected(100 + (page_no - 1) * 1000, 1000));
        assert_eq!(page["total"], FLEET, "the count is of all, on every page");
        after = page["next"].as_str().unwrap().to_owned();
    }
    assert_eq!(after, "Car003099");
    // The last page says so.
    let (_, last, _) = devices_page(&base, ops, "limit=1000&after=Car199950").await;
    assert_eq!(names(&last), expected(199_951, 49));
    assert_eq!(last["next"], Value::Null);

    // Finding one device, or a few, among 200,000.
    let (_, one, _) = devices_page(&base, ops, "prefix=Car123456").await;
    assert_eq!(names(&one), ["Car123456"]);
    assert_eq!((&one["total"], &one["next"]), (&json!(1), &Value::Null));
    let (_, glob, _) = devices_page(&base, ops, "match=car*99999").await;
    assert_eq!(
        names(&glob),
        ["Car099999", "Car199999"],
        "a glob, either case"
    );
    let (_, off, _) = devices_page(&base, ops, "prefix=Car0000&state=offline&limit=10").await;
    assert_eq!(
        names(&off),
        (0..40)
            .step_by(4)
            .map(|i| fleet_car(i).0)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (&off["total"], &off["online"], &off["offline"]),
        (&json!(25), &json!(0), &json!(25))
    );
    assert_eq!(off["next"], "Car000036");

    // A scoped credential: only the targets its rules name, counted so.
    let (_, few, _) = devices_page(&base, "few-secret", "").await;
    assert_eq!(names(&few), expected(10, 10), "{few}");
    assert_eq!((&few["total"], &few["next"]), (&json!(10), &Value::Null));

    // A bad value is a 400 that names it.
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
        ("state=asleep", "state"),
    ] {
        let (status, body, _) = devices_page(&base, ops, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["result"], "invalid_parameters", "{body}");
        let message = body["response"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("invalid {param}:")),
            "{message}"
        );
    }

    // The event stream's hello: counts and the first page, not the fleet;
    // and eight open consoles cost the gateway next to nothing.
    let pid = gw.child.id();
    let before = rss_kib(pid);
    let consoles: Vec<Events> = (0..8)
        .map(|_| Events::open(&curl, &base, Some(ops)))
        .collect();
    for events in &consoles {
        events.hello().await;
    }
    let after = rss_kib(pid);
    let hello = consoles[0].hello().await;
    let bytes = consoles[0].data_bytes("hello").unwrap();
    for events in consoles {
        events.close();
    }
    eprintln!("the hello at {FLEET} records: {bytes} bytes; the gateway's RSS {before:?} KiB, with 8 consoles open {after:?} KiB");
    assert!(bytes < 64 * 1024, "the hello is {bytes} bytes");
    assert_eq!(
        (&hello["total"], &hello["online"], &hello["offline"]),
        (&json!(FLEET), &json!(FLEET / 4 * 3), &json!(FLEET / 4))
    );
    assert_eq!(names(&hello), expected(0, 100));
    assert_eq!(hello["next"], "Car000099");
    if let (Some(before), Some(after)) = (before, after) {
        // 8 consoles took 279 MB before the list was paged.
        assert!(
            after.saturating_sub(before) < 32 * 1024,
            "8 consoles took the gateway from {before} to {after} KiB"
        );
    }

    // The page itself, in a browser: the first hundred, more on demand, a
    // search, and a presence change as it happens.
    if let Some(b) = Browser::start().await {
        b.client.goto(&format!("{base}/")).await.unwrap();
        b.wait_text("#login-h", |t| t.contains("token")).await;
        b.fill("#token", ops).await;
        b.click("#login-form button[type=submit]").await;
        b.wait_text("#conn", |t| t == "live").await;
        b.wait_text("#devices-count", |t| {
            t == "100 of 200,000 shown (150,000 online, 50,000 offline)."
        })
        .await;
        let rows = "return document.querySelectorAll('#devices tbody tr').length;";
        assert_eq!(b.js(rows).await, json!(100));
        b.click("#devices-more").await;
        b.wait_text("#devices-count", |t| t.starts_with("200 of 200,000"))
            .await;
        assert_eq!(b.js(rows).await, json!(200));
        let last =
            "return [...document.querySelectorAll('#devices tbody tr')].at(-1).dataset.target;";
        assert_eq!(b.js(last).await, json!("Car000199"));

        // A device of the loaded pages goes offline, and one far past
        // them: the row follows, and the counts in a few seconds.
        let root = directcall_core::PresenceRoot::default();
        let device = directcall_testkit::Raw::connect(
            &mosquitto.options(),
            &directcall_testkit::unique("car"),
        )
        .await;
        for name in ["Car000001", "Car150001"] {
            let topic = root.topic(&directcall_core::Target::new(name).unwrap());
            device
                .publish_with(&topic, r#"{"online":false}"#, 1, true)
                .await;
        }
        b.wait_text(r#"#devices tr[data-target="Car000001"] td.state"#, |t| {
            t == "offline"
        })
        .await;
        b.wait_text("#devices-count", |t| {
            t == "200 of 200,000 shown (149,998 online, 50,002 offline)."
        })
        .await;
        assert_eq!(
            b.js(rows).await,
            json!(200),
            "nothing past the pages loaded"
        );

        b.fill("#filter", "123456").await;
        b.wait_text("#devices-count", |t| t.starts_with("1 of 1 matching"))
            .await;
        assert_eq!(b.js(last).await, json!("Car123456"));
        b.fill("#filter", "car0000*").await;
        b.js("const s = document.getElementById('state-filter'); s.value = 'offline'; s.dispatchEvent(new Event('change'));")
            .await;
        b.wait_text("#devices-count", |t| {
            t == "26 of 26 matching shown (0 online, 26 offline)."
        })
        .await;
        assert_eq!(b.js(rows).await, json!(26));
        assert_eq!(
            b.js("return document.body.dataset.cspViolations ?? null;")
                .await,
            Value::Null,
            "no Content-Security-Policy violation"
        );
        b.client.close().await.unwrap();
    }
    eprintln!("the fleet test took {:?}", started.elapsed());
}

/// What an open console costs `directcall serve` at 200,000 presence
/// records: the bytes of `GET /v1/devices` and of the event stream's
/// `hello`, and the gateway's resident memory with 0 and 8 consoles open.
/// A measurement, not a check: run it on the release build
/// (docs/console.md, "What it costs"). It asks only what every version
/// answers, so it measures older ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --release -p directcall-bins --test it console::measure -- --ignored --nocapture"]
async fn measure_the_console_at_200000_records() {
    let Some(mosquitto) = program::MOSQUITTO
        .or_skip(Mosquitto::start("max_queued_messages 0").expect("mosquitto starts"))
    else {
        return;
    };
    let Some(curl) = program::CURL.require() else {
        return;
    };
    publish_fleet(&mosquitto.options()).await;
    let (gw, base) = gateway(&mosquitto.url(), &[]).await;
    let pid = gw.child.id();
    let fresh = rss_kib(pid);
    // The records in, with no request yet (an older gateway's device list
    // costs what is measured here): once its memory holds still (within
    // 256 KiB) for 3 s.
    let mut samples = vec![rss_kib(pid).unwrap_or(0)];
    let until = Instant::now() + Duration::from_secs(120);
    let moving = |s: &[u64]| s.windows(2).any(|w| w[0].abs_diff(w[1]) > 256);
    while samples.len() < 5 || moving(&samples[samples.len() - 4..]) {
        assert!(Instant::now() < until, "the gateway's memory never settled");
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_kib(pid).unwrap_or(0));
    }
    let idle = rss_kib(pid);
    let r = directcall_bins::http_client::get(&format!("{base}/v1/devices"), &[])
        .await
        .expect("HTTP");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    let all = body["devices"].as_array().map(Vec::len) == Some(FLEET);
    assert!(
        body["total"] == FLEET || all,
        "not all records in once settled"
    );
    let bytes = r.body.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = rss_kib(pid);
    let consoles: Vec<Events> = (0..8).map(|_| Events::open(&curl, &base, None)).collect();
    for events in &consoles {
        events.hello().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = rss_kib(pid);
    let hello = consoles[0].data_bytes("hello").unwrap();
    for events in consoles {
        events.close();
    }
    let kib =
        |k: Option<u64>| k.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "{FLEET} records: GET /v1/devices {bytes} bytes, hello {hello} bytes; gateway RSS listening {}, with the records in {}, after one GET /v1/devices {}, with 8 consoles open {}",
        kib(fresh),
        kib(idle),
        kib(listed),
        kib(open)
    );
}
