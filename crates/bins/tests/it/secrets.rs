//! Secrets planted in every place a secret can enter the gateway, each
//! distinct, then a run that uses and stresses them all: start-up, a
//! credentials reload, a bad credentials file, a store outage, a broker
//! failure and back. Every log line (debug level), every `--help` and
//! every answer that needs no token is then searched for each secret.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::common::*;
use crate::e2e;
use directcall_testkit::{program, wait_for, Mosquitto, RedisServer};

/// Each secret, by where it is planted.
const BROKER_PASSWORD: &str = "plant-broker-pw-7c1a";
const API_TOKEN: &str = "plant-api-token-9d2b";
const CREDENTIAL: &str = "plant-credential-4e3c";
const CREDENTIAL_NEW: &str = "plant-credential-new-5f4d";
const IN_BAD_FILE: &str = "plant-bad-file-6a5e";
const REDIS_PASSWORD: &str = "plant-redis-pw-8b6f";
const JWKS_PASSWORD: &str = "plant-jwks-pw-1c7a";
const JWKS_QUERY: &str = "plant-jwks-query-2d8b";
const ENV_PASSWORD: &str = "plant-env-pw-3e9c";
const ENV_TOKEN: &str = "plant-env-token-4fa1";
const ENV_STORE: &str = "plant-env-store-5ab2";
const ALL: [&str; 11] = [
    BROKER_PASSWORD,
    API_TOKEN,
    CREDENTIAL,
    CREDENTIAL_NEW,
    IN_BAD_FILE,
    REDIS_PASSWORD,
    JWKS_PASSWORD,
    JWKS_QUERY,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_STORE,
];

fn credentials(token: &str) -> String {
    format!("[[credentials]]\nname = \"ops\"\ntoken = \"{token}\"\n")
}

fn assert_clean(what: &str, text: &str) {
    for secret in ALL {
        assert!(!text.contains(secret), "{secret} in {what}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_never_show_in_logs_help_or_public_answers() {
    let (Some(_), Some(_)) = (
        program::MOSQUITTO.require(),
        program::REDIS_SERVER.require(),
    ) else {
        return;
    };
    let Some(passwd) = which("mosquitto_passwd") else {
        eprintln!("skipped: mosquitto_passwd is not installed");
        return;
    };
    let dir = std::env::temp_dir().join(unique("directcall-planted"));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&dir).status();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let _ = Command::new("chmod").arg("644").arg(&path).status();
        path.display().to_string()
    };

    // A Mosquitto that wants the gateway's password.
    let passwords = file("passwords", "");
    let made = Command::new(&passwd)
        .args(["-b", &passwords, "gateway", BROKER_PASSWORD])
        .status()
        .unwrap();
    assert!(made.success());
    let _ = Command::new("chmod").arg("644").arg(&passwords).status();
    let mut mosquitto = Mosquitto::start(&format!(
        "allow_anonymous false\npassword_file {passwords}\n"
    ))
    .expect("mosquitto starts")
    .unwrap();
    // A Redis that wants its own.
    let mut redis = RedisServer::start_with_password(REDIS_PASSWORD)
        .expect("redis-server starts")
        .unwrap();
    let redis_port = redis.url().rsplit(':').next().unwrap().to_owned();

    let password_file = file("mqtt-password", &format!("{BROKER_PASSWORD}\n"));
    let token_file = file("api-tokens", &format!("{API_TOKEN}\n"));
    let creds = file("credentials.toml", &credentials(CREDENTIAL));
    let store_file = file(
        "store",
        &format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0\n"),
    );
    let idp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let idp_port = idp.local_addr().unwrap().port();
    drop(idp);
    let jwks =
        format!("http://idp:{JWKS_PASSWORD}@127.0.0.1:{idp_port}/jwks.json?token={JWKS_QUERY}");

    let port = directcall_testkit::free_port().unwrap();
    let metrics_port = directcall_testkit::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut gw = Command::new(e2e::DIRECTCALL)
        .args(["serve", "--broker", &mosquitto.url(), "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--username", "gateway", "--password-file", &password_file])
        .args(["--api-token-file", &token_file, "--credentials", &creds])
        .args(["--store-file", &store_file, "--reload-interval", "0.2"])
        .args(["--jwks", &jwks, "--jwt-issuer", "https://issuer.test"])
        .args(["--jwt-audience", "directcall", "--jwks-refresh", "1"])
        .env("RUST_LOG", "debug")
        .env("DIRECTCALL_SHUTDOWN_DELAY", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers = [
        e2e::collect(gw.stdout.take().unwrap(), &lines),
        e2e::collect(gw.stderr.take().unwrap(), &lines),
    ];
    let logged = |needle: &'static str| {
        let lines = Arc::clone(&lines);
        move || {
            let found = lines.lock().unwrap().iter().any(|l| l.contains(needle));
            async move { found.then_some(()) }
        }
    };

    // Start-up: connected with the password, the store and the tokens in
    // use.
    let ready = format!("{base}/readyz");
    wait_for(30, "ready with the broker's password", || async {
        http_status(&ready).await.filter(|s| *s == 200)
    })
    .await;
    let invoke = format!("{base}/invoke?request=r&method=m&target=NoSuchCar&timeout=1");
    for token in [API_TOKEN, CREDENTIAL] {
        let (status, body) =
            e2e::get_with(&invoke, &[("authorization", &format!("Bearer {token}"))]).await;
        assert!(matches!(status, 404 | 504), "{token}: {status} {body}");
    }
    let mut public = Vec::new();
    let (status, body) = e2e::get_with(&invoke, &[("authorization", "Bearer not-a-secret")]).await;
    assert_eq!(status, 401);
    public.push(body.to_string());

    // A reload (the file changed), then a bad file (the old one stays).
    std::fs::write(dir.join("credentials.toml"), credentials(CREDENTIAL_NEW)).unwrap();
    wait_for(20, "the new credential", || async {
        let (status, _) = e2e::get_with(
            &invoke,
            &[("authorization", &format!("Bearer {CREDENTIAL_NEW}"))],
        )
        .await;
        (status != 401).then_some(())
    })
    .await;
    std::fs::write(
        dir.join("credentials.toml"),
        format!("[[credentials]]\nname = \"ops\"\ntoken = \"{CREDENTIAL_NEW}\"\ntargets = \"{IN_BAD_FILE}\"\n"),
    )
    .unwrap();
    wait_for(
        20,
        "the bad file refused",
        logged("credentials not reloaded"),
    )
    .await;

    // The store fails: a call's record cannot be written, then comes back.
    redis.kill();
    let (status, _) = e2e::get_with(
        &invoke,
        &[("authorization", &format!("Bearer {API_TOKEN}"))],
    )
    .await;
    assert!(matches!(status, 404 | 504), "{status}");
    wait_for(20, "the store's failure logged", logged("shared store")).await;
    redis.restart().unwrap();

    // The broker fails and comes back.
    mosquitto.kill();
    wait_for(20, "not ready without the broker", || async {
        http_status(&ready).await.filter(|s| *s == 503)
    })
    .await;
    mosquitto.restart().unwrap();
    wait_for(30, "ready again", || async {
        http_status(&ready).await.filter(|s| *s == 200)
    })
    .await;

    // Every answer that needs no token.
    for path in [
        "/healthz",
        "/livez",
        "/readyz",
        "/openapi.json",
        "/metrics",
        "/v1/devices",
        "/nowhere",
    ] {
        let r = directcall_bins::http_client::get(&format!("{base}{path}"), &[])
            .await
            .unwrap();
        public.push(format!("{path} {} {}", r.status, r.body));
    }
    let r =
        directcall_bins::http_client::get(&format!("http://127.0.0.1:{metrics_port}/metrics"), &[])
            .await
            .unwrap();
    assert_eq!(r.status, 200);
    public.push(r.body);
    for answer in &public {
        assert_clean("an unauthenticated answer", answer);
    }

    let _ = gw.kill();
    let _ = gw.wait();
    for reader in readers {
        reader.join().unwrap();
    }
    let logs = lines.lock().unwrap().join("\n");
    // The run did what it says: each stage left its trace.
    for stage in [
        "JWKS not loaded",
        "credentials reloaded",
        "credentials not reloaded",
        "shared store",
        "broker connection",
    ] {
        assert!(logs.contains(stage), "no {stage:?} in the logs:\n{logs}");
    }
    assert_clean("the logs", &logs);

    // Every --help, with secrets in every variable that takes one.
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["invoke", "--help"],
        vec!["call", "--help"],
        vec!["demo", "--help"],
        vec!["bench", "--help"],
    ] {
        let out = Command::new(e2e::DIRECTCALL)
            .args(&args)
            .env("DIRECTCALL_PASSWORD", ENV_PASSWORD)
            .env("DIRECTCALL_API_TOKENS", ENV_TOKEN)
            .env("DIRECTCALL_API_TOKEN", ENV_TOKEN)
            .env(
                "DIRECTCALL_STORE",
                format!("redis://:{ENV_STORE}@127.0.0.1:1/0"),
            )
            .env(
                "DIRECTCALL_JWKS",
                format!("http://u:{JWKS_PASSWORD}@idp/jwks?token={JWKS_QUERY}"),
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert_clean(
            &format!("directcall {}", args.join(" ")),
            &String::from_utf8_lossy(&out.stdout),
        );
    }
    let out = Command::new(e2e::SIM)
        .arg("--help")
        .env("DIRECTCALL_PASSWORD", ENV_PASSWORD)
        .output()
        .unwrap();
    assert_clean(
        "directcall-sim --help",
        &String::from_utf8_lossy(&out.stdout),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn http_status(url: &str) -> Option<u16> {
    directcall_bins::http_client::get(url, &[])
        .await
        .ok()
        .map(|r| r.status)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}
