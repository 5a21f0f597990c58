//! AWS IoT Core over MQTT-over-WebSockets, signed with SigV4 (feature
//! `sigv4`): the presigned URL, made anew on every connection attempt
//! through [`UrlSigner`], with the `aws-sigv4` crate (not the whole AWS SDK).
//!
//! ```no_run
//! use std::sync::Arc;
//! use directcall_cloud::sigv4::AwsSigV4;
//! use directcall_cloud::{BrokerOptions, Options};
//!
//! # fn run() -> Result<(), directcall_cloud::Error> {
//! let creds = AwsSigV4::new("eu-west-1", "AKID...", "secret...");
//! let broker = BrokerOptions::from_url("wss://abc123-ats.iot.eu-west-1.amazonaws.com/mqtt")?;
//! let options = Options::new(broker).url_signer(Arc::new(creds));
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SessionTokenMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use directcall_core::mqtt::UrlSigner;

/// AWS credentials for signing the WebSocket URL of AWS IoT Core (SigV4,
/// service `iotdevicegateway`). Plain data: where they come from (the
/// environment, a Lambda role) is the caller's business. Never printed.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AwsSigV4 {
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token of temporary credentials; added after signing, as AWS IoT requires.
    pub session_token: Option<String>,
}

impl AwsSigV4 {
    /// Long-term credentials (no session token).
    pub fn new(
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        AwsSigV4 {
            region: region.into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }

    /// Temporary credentials' session token (default: none).
    pub fn session_token(mut self, token: impl Into<String>) -> Self {
        self.session_token = Some(token.into());
        self
    }
}

impl std::fmt::Debug for AwsSigV4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSigV4")
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl UrlSigner for AwsSigV4 {
    fn sign(&self, url: &str) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let rest = url.strip_prefix("wss://").unwrap_or(url);
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        Ok(presign_iot_url(host, path, self, SystemTime::now())?)
    }
}

/// Why a URL could not be signed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("SigV4 {what}: {reason}")]
pub struct SigningError {
    what: &'static str,
    reason: String,
}

impl SigningError {
    fn new(what: &'static str, e: impl std::fmt::Display) -> Self {
        SigningError {
            what,
            reason: e.to_string(),
        }
    }
}

/// How long a presigned connection URL stays valid; it is made anew for
/// every connection attempt.
pub const PRESIGNED_URL_EXPIRY: Duration = Duration::from_secs(300);

/// RFC 3986 encoding, as SigV4 wants it (unreserved characters kept).
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The presigned query parameters of `GET url`: only `host` signed, the
/// session token left out of the signature (AWS IoT's rule).
fn presign_params(
    url: &str,
    host: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<Vec<(String, String)>, SigningError> {
    let identity = Credentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        None,
        None,
        "directcall",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(PRESIGNED_URL_EXPIRY);
    settings.session_token_mode = SessionTokenMode::Exclude;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&creds.region)
        .name("iotdevicegateway")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SigningError::new("parameters", e))?
        .into();
    let signable = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", host)),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| SigningError::new("request", e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SigningError::new("signing", e))?
        .into_parts();
    Ok(instructions
        .params()
        .iter()
        .map(|(k, v): &(&str, Cow<'_, str>)| ((*k).to_owned(), v.to_string()))
        .filter(|(k, _)| !k.eq_ignore_ascii_case("x-amz-security-token"))
        .collect())
}

/// The presigned `wss://{host}{path}?X-Amz-…` URL of AWS IoT Core's MQTT
/// endpoint: service `iotdevicegateway`, only `host` signed, the session
/// token (if any) appended after signing. `host` must not carry `:443`.
///
/// # Errors
/// [`SigningError`] when signing fails (an unusable region or time).
pub fn presign_iot_url(
    host: &str,
    path: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<String, SigningError> {
    let path = path.split('?').next().unwrap_or("/mqtt");
    let url = format!("https://{host}{path}");
    let params = presign_params(&url, host, creds, time)?;
    let mut query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
        .collect();
    if let Some(token) = &creds.session_token {
        query.push(format!("X-Amz-Security-Token={}", uri_encode(token)));
    }
    Ok(format!("wss://{host}{path}?{}", query.join("&")))
}

/// Headers that sign `GET url` for `service` in the `Authorization` header
/// (API Gateway's IAM auth: service `execute-api`), the session token
/// included and signed: how a caller reaches `directcall-lambda` behind an
/// API Gateway with `AWS_IAM` auth.
///
/// # Errors
/// [`SigningError`] when the URL has no host or signing fails.
pub fn sign_get_headers(
    url: &str,
    service: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<Vec<(String, String)>, SigningError> {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
        .filter(|host| !host.is_empty())
        .ok_or_else(|| SigningError::new("URL", "no host"))?;
    let identity = Credentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        creds.session_token.clone(),
        None,
        "directcall",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&creds.region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| SigningError::new("parameters", e))?
        .into();
    let signable = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", host)),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| SigningError::new("request", e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SigningError::new("signing", e))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::{digest, hmac};

    // The AWS SigV4 test suite's example credentials and time.
    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const HOST: &str = "example-ats.iot.us-east-1.amazonaws.com";

    fn creds(token: Option<&str>) -> AwsSigV4 {
        AwsSigV4 {
            region: "us-east-1".into(),
            access_key_id: AKID.into(),
            secret_access_key: SECRET.into(),
            session_token: token.map(str::to_owned),
        }
    }

    fn at_20150830t123600z() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// SigV4 computed by hand from the specification, independently of aws-sigv4.
    fn expected_signature(canonical_query: &str) -> String {
        let canonical_request = format!(
            "GET\n/mqtt\n{canonical_query}\nhost:{HOST}\n\nhost\n{}",
            hex(digest::digest(&digest::SHA256, b"").as_ref())
        );
        let scope = "20150830/us-east-1/iotdevicegateway/aws4_request";
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n20150830T123600Z\n{scope}\n{}",
            hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
        );
        let k_date = hmac_sha256(format!("AWS4{SECRET}").as_bytes(), "20150830");
        let k_region = hmac_sha256(&k_date, "us-east-1");
        let k_service = hmac_sha256(&k_region, "iotdevicegateway");
        let k_signing = hmac_sha256(&k_service, "aws4_request");
        hex(&hmac_sha256(&k_signing, &string_to_sign))
    }

    fn query_of(url: &str) -> Vec<(String, String)> {
        let query = url.split_once('?').unwrap().1;
        query
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn the_presigned_iot_url_matches_the_specification() {
        let url = presign_iot_url(HOST, "/mqtt", &creds(None), at_20150830t123600z()).unwrap();
        assert!(url.starts_with(&format!("wss://{HOST}/mqtt?")), "{url}");
        assert!(!url.contains(":443"), "{url}");
        let params = query_of(&url);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("X-Amz-Algorithm"), Some("AWS4-HMAC-SHA256"));
        assert_eq!(
            get("X-Amz-Credential"),
            Some("AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fiotdevicegateway%2Faws4_request")
        );
        assert_eq!(get("X-Amz-Date"), Some("20150830T123600Z"));
        assert_eq!(get("X-Amz-SignedHeaders"), Some("host"));
        assert_eq!(get("X-Amz-Expires"), Some("300"));
        let mut signed: Vec<&(String, String)> = params
            .iter()
            .filter(|(k, _)| k != "X-Amz-Signature")
            .collect();
        signed.sort();
        let canonical_query = signed
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            get("X-Amz-Signature"),
            Some(expected_signature(&canonical_query).as_str())
        );
    }

    #[test]
    fn the_session_token_is_appended_after_signing() {
        let without = presign_iot_url(HOST, "/mqtt", &creds(None), at_20150830t123600z()).unwrap();
        let with = presign_iot_url(
            HOST,
            "/mqtt",
            &creds(Some("tok/en+=")),
            at_20150830t123600z(),
        )
        .unwrap();
        assert_eq!(
            with,
            format!("{without}&X-Amz-Security-Token=tok%2Fen%2B%3D")
        );
    }

    #[test]
    fn api_gateway_requests_are_signed_in_headers() {
        let url = "https://abc123.execute-api.eu-west-1.amazonaws.com/Prod/invoke/?request=r&method=m&target=t&timeout=3";
        let creds = AwsSigV4::new(
            "eu-west-1",
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        )
        .session_token("session");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let headers = sign_get_headers(url, "execute-api", &creds, at).unwrap();
        let get = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let auth = get("authorization").unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/execute-api/aws4_request"), "{auth}");
        assert!(
            auth.contains("x-amz-security-token"),
            "the token is signed: {auth}"
        );
        assert_eq!(get("x-amz-date"), Some("20150830T123600Z"));
        assert_eq!(get("x-amz-security-token"), Some("session"));
        assert!(sign_get_headers("no-host", "execute-api", &creds, at).is_err());
    }
}
