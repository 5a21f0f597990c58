//! `directcall call --sigv4`: SigV4 headers for API Gateway's IAM auth
//! (service `execute-api`), with the `aws-sigv4` crate.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use directcall_cloud::sigv4::AwsSigV4;

/// Why a request could not be signed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("SigV4 {what}: {reason}")]
pub struct SigningError {
    what: &'static str,
    reason: String,
}

fn fail(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> SigningError {
    move |e| SigningError {
        what,
        reason: e.to_string(),
    }
}

/// Headers that sign `GET url` for `service` (API Gateway: `execute-api`),
/// the session token included and signed.
///
/// # Errors
/// [`SigningError`] when the URL has no host or signing fails.
pub fn sign_get_headers(
    url: &str,
    service: &str,
    creds: &AwsSigV4,
    time: SystemTime,
) -> Result<Vec<(String, String)>, SigningError> {
    let uri: http::Uri = url.parse().map_err(|e| fail("URL")(&e))?;
    let host = uri
        .authority()
        .ok_or_else(|| fail("URL")(&"no host"))?
        .to_string();
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
        .map_err(|e| fail("parameters")(&e))?
        .into();
    let signable = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", host.as_str())),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| fail("request")(&e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| fail("signing")(&e))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    }
}
