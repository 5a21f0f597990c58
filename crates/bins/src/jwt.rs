//! Bearer JWTs (an OIDC provider's access tokens), verified with
//! `jsonwebtoken` against a JWKS loaded at start-up: signature, issuer,
//! audience and expiry. What the token may call comes from a claim.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::access::Credential;

/// Verifies bearer JWTs.
pub struct JwtVerifier {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    issuer: String,
    audience: String,
    scope_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("scope_claim", &self.scope_claim)
            .finish()
    }
}

impl JwtVerifier {
    /// From a JWKS document (JSON). Every key needs a `kid`; RSA keys are
    /// RS256 and EC keys ES256 unless their `alg` says otherwise.
    ///
    /// # Errors
    /// A JWKS that does not parse, or a key that cannot be used.
    pub fn new(
        jwks_json: &str,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        scope_claim: impl Into<String>,
    ) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| format!("JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().ok_or("JWKS: a key has no kid")?;
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(a), _) => a
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|e| format!("JWKS key {kid}: {e}"))?,
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(_)) => Algorithm::ES256,
                (None, _) => return Err(format!("JWKS key {kid}: give its alg")),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key {kid}: {e}"))?;
            keys.insert(kid, (key, alg));
        }
        if keys.is_empty() {
            return Err("JWKS: no keys".into());
        }
        Ok(JwtVerifier {
            keys,
            issuer: issuer.into(),
            audience: audience.into(),
            scope_claim: scope_claim.into(),
        })
    }

    /// The credential a token stands for: named `jwt:{sub}`, allowed the
    /// `target/method` globs of its scope claim (a space-separated string
    /// or an array; entries without a `/` are not ours and are ignored).
    ///
    /// # Errors
    /// Why it is refused, in words (never the token).
    pub fn verify(&self, token: &str) -> Result<Credential, String> {
        let header = decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let kid = header.kid.ok_or("token has no kid")?;
        let (key, alg) = self.keys.get(&kid).ok_or_else(|| {
            format!("token signed with key id '{kid}', which the JWKS does not hold")
        })?;
        if header.alg != *alg {
            return Err(format!(
                "token algorithm {:?} is not its key's {alg:?}",
                header.alg
            ));
        }
        let mut validation = Validation::new(*alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        let data = decode::<HashMap<String, Value>>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => "token expired".to_owned(),
                K::InvalidAudience => format!("token audience is not '{}'", self.audience),
                K::InvalidIssuer => format!("token issuer is not '{}'", self.issuer),
                K::InvalidSignature => "token signature does not verify".to_owned(),
                K::MissingRequiredClaim(c) => format!("token has no {c} claim"),
                _ => format!("token refused: {e}"),
            }
        })?;
        let sub = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or("token has no sub")?;
        let scopes: Vec<String> = match data.claims.get(&self.scope_claim) {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let rules = scopes
            .iter()
            .filter_map(|s| s.split_once('/'))
            .map(|(t, m)| (t.to_owned(), m.to_owned()))
            .collect();
        Ok(Credential::verified(format!("jwt:{sub}"), rules))
    }
}
