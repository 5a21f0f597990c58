//! Reloads without signals, as a mounted Kubernetes Secret changes: the
//! files sit behind a `..data` symlink that is swapped to a new folder,
//! and the gateway picks the new content up by itself (no SIGHUP, no
//! restart); a bad new file leaves the old one in force.

use std::path::{Path, PathBuf};

use crate::common::pki::Pki;
use crate::common::*;
use crate::e2e;
use directcall_testkit::{program, wait_for};

/// A folder laid out as the kubelet mounts a Secret: `name -> ..data/name`,
/// `..data -> ..v1`; [`Secret::swap`] writes a new version and swaps
/// `..data` in one rename.
struct Secret {
    dir: PathBuf,
    version: u32,
}

impl Secret {
    fn new(files: &[(&str, &[u8])]) -> Secret {
        let dir = std::env::temp_dir().join(unique("directcall-secret"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut secret = Secret { dir, version: 0 };
        secret.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), secret.dir.join(name)).unwrap();
        }
        secret
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&version)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&version).join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn credentials(name: &str, token: &str) -> Vec<u8> {
    format!("[[credentials]]\nname = \"{name}\"\ntoken = \"{token}\"\n").into_bytes()
}

async fn status_with(url: &str, token: &str) -> u16 {
    e2e::get_with(url, &[("authorization", &format!("Bearer {token}"))])
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_credentials_file_is_loaded_without_a_signal() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let mut secret = Secret::new(&[("credentials.toml", &credentials("ops", "tok-one"))]);
    let file = secret.path("credentials.toml");
    let (_gw, base, logs) = e2e::gateway_logged(
        &b.url(),
        &["--credentials", &file, "--reload-interval", "0.2"],
    )
    .await;
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    e2e::wait_health(&base, 200).await;
    let url = format!("{base}/invoke?request=r&method=windows_down&target={car}&timeout=5");
    assert_eq!(status_with(&url, "tok-one").await, 200);

    // The Secret is updated: the new token works, the old one no longer.
    secret.swap(&[("credentials.toml", &credentials("ops", "tok-two"))]);
    wait_for(20, "the new token accepted", || async {
        (status_with(&url, "tok-two").await == 200).then_some(())
    })
    .await;
    assert_eq!(status_with(&url, "tok-one").await, 401);

    // A broken version: the one in force stays, the error names the line
    // and never the token.
    secret.swap(&[(
        "credentials.toml",
        b"[[credentials]]\nname = \"ops\"\ntoken = \"tok-BROKEN\n",
    )]);
    let logs_now = || logs.lock().unwrap().join("\n");
    wait_for(20, "the failed reload logged", || async {
        logs_now()
            .contains("credentials not reloaded")
            .then_some(())
    })
    .await;
    assert_eq!(status_with(&url, "tok-two").await, 200);
    let text = logs_now();
    assert!(text.contains("line 3"), "{text}");
    assert!(
        !text.contains("tok-BROKEN") && !text.contains("tok-two"),
        "{text}"
    );
}

/// A renewed certificate serves the next connection, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_serves_new_connections() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(curl) = program::CURL.require() else {
        return;
    };
    // Two CAs: the first certificate chains to one, the renewed one to the
    // other, so a client trusting only the second sees the swap.
    let (Some(old), Some(new)) = (Pki::new("reload-old"), Pki::new("reload-new")) else {
        return;
    };
    old.issue("server");
    new.issue("server");
    let mut secret = Secret::new(&[
        ("tls.crt", &old.read("server.pem")),
        ("tls.key", &old.read("server.key")),
    ]);
    let port = directcall_testkit::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let (cert, key) = (secret.path("tls.crt"), secret.path("tls.key"));
    let _gw = e2e::Proc::spawn(
        e2e::DIRECTCALL,
        &[
            "serve",
            "--broker",
            &b.url(),
            "--listen",
            &listen,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--reload-interval",
            "0.2",
        ],
    );
    let livez = format!("https://localhost:{port}/livez");
    let trusting = |ca: &Path| {
        let out = std::process::Command::new(&curl)
            .args([
                "-s",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .arg("--cacert")
            .arg(ca)
            .arg(&livez)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (old_ca, new_ca) = (old.dir.join("ca.pem"), new.dir.join("ca.pem"));
    wait_for(20, "HTTPS with the first certificate", || async {
        (trusting(&old_ca) == "200").then_some(())
    })
    .await;
    assert_ne!(trusting(&new_ca), "200");

    secret.swap(&[
        ("tls.crt", &new.read("server.pem")),
        ("tls.key", &new.read("server.key")),
    ]);
    wait_for(20, "HTTPS with the renewed certificate", || async {
        (trusting(&new_ca) == "200").then_some(())
    })
    .await;
    assert_ne!(trusting(&old_ca), "200");

    // A key that is not the certificate's: refused, the renewed pair stays.
    secret.swap(&[
        ("tls.crt", &old.read("server.pem")),
        ("tls.key", &new.read("server.key")),
    ]);
    let mut metrics = std::process::Command::new(&curl);
    metrics
        .args([
            "-s",
            "--max-time",
            "5",
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
        ])
        .arg("--cacert")
        .arg(&new_ca)
        .arg(format!("https://localhost:{port}/metrics"));
    wait_for(20, "the failed TLS reload counted", || {
        let out = metrics.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        async move {
            text.contains(r#"directcall_reloads_total{what="tls",result="error"} 1"#)
                .then_some(())
        }
    })
    .await;
    assert_eq!(trusting(&new_ca), "200");
}
