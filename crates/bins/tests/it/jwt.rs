//! Bearer JWTs on the real gateway: tokens the test signs itself with RSA
//! keys it makes with openssl, verified against a JWKS file. A good token
//! calls what its scope claim allows (and 403 otherwise); expired, wrong
//! audience, wrong signature, `alg: none` and an unknown key id are each a
//! 401 with a clear message.

use std::path::Path;

use crate::common::pki::openssl;
use crate::common::*;
use crate::e2e;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "directcall";

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An RSA key: its signing key and its JWK (with `kid`).
fn rsa_key(dir: &Path, name: &str, kid: &str) -> (EncodingKey, Value) {
    let pem = format!("{name}.pem");
    openssl(dir, &["genrsa", "-out", &pem, "2048"]);
    let der = openssl(
        dir,
        &["rsa", "-in", &pem, "-outform", "DER", "-traditional"],
    );
    let modulus =
        String::from_utf8(openssl(dir, &["rsa", "-in", &pem, "-noout", "-modulus"])).unwrap();
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwk = json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64url(&n), "e": "AQAB"});
    (EncodingKey::from_rsa_der(&der), jwk)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    encode(&header, claims, key).unwrap()
}

/// The flags of a gateway taking JWTs signed by a key of `jwks`.
fn jwt_flags(jwks: &str) -> [&str; 6] {
    [
        "--jwks",
        jwks,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ]
}

fn claims(aud: &str, exp: u64, scope: &str) -> Value {
    json!({"iss": ISSUER, "aud": aud, "sub": "app-42", "exp": exp, "iat": now(), "scope": scope})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_and_scoped() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let dir = std::env::temp_dir().join(unique("directcall-jwt"));
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, jwk1) = rsa_key(&dir, "k1", "k1");
    let (stranger, _) = rsa_key(&dir, "k2", "k2");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk1]}).to_string()).unwrap();

    let car = format!("car-{}", unique("j"));
    let _device = device(&b, &car, car_router()).await;
    let jwks = jwks.to_str().unwrap().to_owned();
    let (_gw, base) = e2e::gateway(
        &b.url(),
        &[
            "--jwks",
            &jwks,
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
        ],
    )
    .await;
    e2e::wait_health(&base, 200).await;
    let call = |token: String, method: &'static str| {
        let (base, car) = (base.clone(), car.clone());
        async move {
            e2e::get_with(
                &format!("{base}/invoke?request=r&method={method}&target={car}&timeout=5"),
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await
        }
    };
    let good = token(
        &k1,
        "k1",
        &claims(AUDIENCE, now() + 600, "car-*/windows_down openid"),
    );
    let (status, body) = call(good.clone(), "windows_down").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(good, "alarm_off").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("credential 'jwt:app-42' may not call method 'alarm_off'"),
        "{body}"
    );

    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        b64url(
            claims(AUDIENCE, now() + 600, "car-*/windows_down")
                .to_string()
                .as_bytes()
        )
    );
    for (token, needle) in [
        (
            token(
                &k1,
                "k1",
                &claims(AUDIENCE, now() - 3600, "car-*/windows_down"),
            ),
            "token expired",
        ),
        (
            token(
                &k1,
                "k1",
                &claims("someone-else", now() + 600, "car-*/windows_down"),
            ),
            "token audience is not 'directcall'",
        ),
        (
            token(
                &stranger,
                "k1",
                &claims(AUDIENCE, now() + 600, "car-*/windows_down"),
            ),
            "token signature does not verify",
        ),
        (alg_none, "malformed token"),
        (
            token(
                &stranger,
                "k9",
                &claims(AUDIENCE, now() + 600, "car-*/windows_down"),
            ),
            "key id 'k9', which the JWKS does not hold",
        ),
        ("not-a-jwt".to_owned(), "unknown token"),
        (
            format!("{}.{}.{}", "x".repeat(5000), "y".repeat(1000), "z"),
            "over 4096 bytes",
        ),
    ] {
        let (status, body) = call(token, "windows_down").await;
        assert_eq!(status, 401, "{needle}: {body}");
        assert_eq!(body["result"], "unauthorized");
        assert!(
            body["response"].as_str().unwrap().contains(needle),
            "{needle}: {body}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JWKS URL whose server accepts the connection and never answers (a
/// stalled identity provider): the gateway starts all the same once the
/// first fetch's 10 s are up, refuses JWTs with a clear 401, keeps trying,
/// and never shows a credential of the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_that_never_answers_leaves_jwts_refused_and_the_gateway_up() {
    // Connections land in the listener's backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://idp:s3cret@{}/jwks.json?token=t0ken",
        silent.local_addr().unwrap()
    );
    let (mut gw, base, logs) = e2e::gateway_logged("mqtt://127.0.0.1:9", &jwt_flags(&url)).await;
    let (status, body) = e2e::get_with(
        &format!("{base}/invoke?request=r&method=m&target=car-1&timeout=1"),
        &[("authorization", "Bearer a.b.c")],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(gw.child.try_wait().unwrap().is_none(), "exited");
    // The log line comes through a pipe: wait for it.
    let logs = wait_for(10, "the JWKS failure logged", || async {
        let logs = logs.lock().unwrap().join("\n");
        (logs.contains("JWKS not loaded") && logs.contains("no answer within 10 s")).then_some(logs)
    })
    .await;
    assert!(
        !logs.contains("s3cret") && !logs.contains("t0ken"),
        "{logs}"
    );
    gw.kill();
}

/// The JWKS is down when the gateway starts and comes up later: JWTs get
/// 401 ("no JWKS loaded yet") until a retry fetches it, then they verify,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_down_at_start_is_fetched_when_it_comes_up() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let dir = std::env::temp_dir().join(unique("directcall-jwks-late"));
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, jwk1) = rsa_key(&dir, "k1", "k1");
    let car = format!("car-{}", unique("j"));
    let _device = device(&b, &car, car_router()).await;
    // Nothing listens there yet: every fetch is refused at once.
    let port = directcall_testkit::free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let (gw, base) = e2e::gateway(&b.url(), &jwt_flags(&url)).await;
    e2e::wait_health(&base, 200).await;
    let good = token(
        &k1,
        "k1",
        &claims(AUDIENCE, now() + 600, "car-*/windows_down"),
    );
    let invoke = format!("{base}/invoke?request=r&method=windows_down&target={car}&timeout=5");
    let bearer = format!("Bearer {good}");
    let (status, body) = e2e::get_with(&invoke, &[("authorization", &bearer)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["response"]
            .as_str()
            .unwrap_or_default()
            .contains("no JWKS loaded yet"),
        "{body}"
    );

    // The identity provider comes up.
    let jwks = json!({"keys": [jwk1]}).to_string();
    let idp = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { ([("content-type", "application/json")], jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, idp).await });
    // Retries come 1, 2, 4, 8 s apart: a generous bound.
    let body = wait_for(40, "the JWT accepted once the JWKS is up", || async {
        let (status, body) = e2e::get_with(&invoke, &[("authorization", &bearer)]).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["result"], "ok", "{body}");
    drop(gw);
}
