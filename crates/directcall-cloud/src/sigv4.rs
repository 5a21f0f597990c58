//! SigV4 signing with the `aws-sigv4` crate (not the whole AWS SDK): the
//! presigned WebSocket URL of AWS IoT Core, and signed HTTP requests for API
//! Gateway's IAM auth.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SessionTokenMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use directcall_core::AwsSigV4;

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

fn sign_parts(
    method: &str,
    url: &str,
    host: &str,
    service: &str,
    creds: &AwsSigV4,
    time: SystemTime,
    location: SignatureLocation,
) -> Result<Vec<(String, String)>, String> {
    // For the IoT URL the session token is left out of the signature and
    // appended afterwards (AWS IoT's rule); for API Gateway it is signed.
    let token_signed = matches!(location, SignatureLocation::Headers);
    let token = if token_signed {
        creds.session_token.clone()
    } else {
        None
    };
    let identity = Credentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        token,
        None,
        "directcall",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.signature_location = location;
    if !token_signed {
        settings.expires_in = Some(PRESIGNED_URL_EXPIRY);
        settings.session_token_mode = SessionTokenMode::Exclude;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&creds.region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        std::iter::once(("host", host)),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| format!("SigV4 request: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("SigV4 signing: {e}"))?
        .into_parts();
    let mut out: Vec<(String, String)> = match location {
        SignatureLocation::QueryParams => instructions
            .params()
            .iter()
            .map(|(k, v): &(&str, Cow<'_, str>)| ((*k).to_owned(), v.to_string()))
            .collect(),
        _ => instructions
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    out.retain(|(k, _)| !k.eq_ignore_ascii_case("x-amz-security-token") || token_signed);
    Ok(out)
}

/// The presigned `wss://{host}{path}?X-Amz-…` URL of AWS IoT Core's MQTT
/// endpoint: service `iotdevicegateway`, only `host` signed, the session
/// token (if any) appended after signing. `host` must not carry `:443`.
///
/// # Errors
/// A message when signing fails (an unusable region or time).
pub fn presign_iot_url(
    host: &str,
    path: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<String, String> {
    let path = path.split('?').next().unwrap_or("/mqtt");
    let url = format!("https://{host}{path}");
    let params = sign_parts(
        "GET",
        &url,
        host,
        "iotdevicegateway",
        creds,
        time,
        SignatureLocation::QueryParams,
    )?;
    let mut query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
        .collect();
    if let Some(token) = &creds.session_token {
        query.push(format!("X-Amz-Security-Token={}", uri_encode(token)));
    }
    Ok(format!("wss://{host}{path}?{}", query.join("&")))
}

/// Headers that sign `GET url` for `service` (API Gateway: `execute-api`),
/// session token included and signed.
///
/// # Errors
/// A message when the URL has no host or signing fails.
pub fn sign_get_headers(
    url: &str,
    service: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    let host = uri
        .authority()
        .ok_or_else(|| format!("no host in {url:?}"))?
        .to_string();
    sign_parts(
        "GET",
        url,
        &host,
        service,
        creds,
        time,
        SignatureLocation::Headers,
    )
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
        let mut c = creds(Some("session"));
        c.region = "eu-west-1".into();
        let headers = sign_get_headers(url, "execute-api", &c, at_20150830t123600z()).unwrap();
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
    }
}
