//! Bearer JWTs (an OIDC provider's access tokens), verified with
//! `jsonwebtoken` against a JWKS: signature, issuer, audience and expiry.
//! What the token may call comes from a claim.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::auth::Caller;

/// Why a JWKS cannot be used, or a token is refused. A token's refusal is
/// said in its 401 (never the token itself).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The JWKS is not a JWK set.
    #[error("JWKS: {0}")]
    Jwks(#[source] serde_json::Error),
    /// A key of the JWKS has no `kid`.
    #[error("JWKS: a key has no kid")]
    KeyWithoutId,
    /// A key of the JWKS names no `alg` and is neither RSA nor EC.
    #[error("JWKS key {0}: give its alg")]
    KeyWithoutAlgorithm(String),
    /// A key of the JWKS cannot be used.
    #[error("JWKS key {kid}: {source}")]
    Key {
        /// The key's id.
        kid: String,
        /// Why.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// The JWKS holds no keys.
    #[error("JWKS: no keys")]
    NoKeys,
    /// No JWKS has been loaded yet (it could not be fetched so far).
    #[error("no JWKS loaded yet: JWTs cannot be verified for now")]
    NoKeysYet,
    /// The token is not a JWT.
    #[error("malformed token: {0}")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    /// The token's header names no key.
    #[error("token has no kid")]
    NoKeyId,
    /// The token names a key the JWKS does not hold.
    #[error("token signed with key id '{0}', which the JWKS does not hold")]
    UnknownKey(String),
    /// The token's algorithm is not its key's.
    #[error("token algorithm {token:?} is not its key's {key:?}")]
    Algorithm {
        /// The token's.
        token: Algorithm,
        /// The key's.
        key: Algorithm,
    },
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// For another audience.
    #[error("token audience is not '{0}'")]
    Audience(String),
    /// From another issuer.
    #[error("token issuer is not '{0}'")]
    Issuer(String),
    /// The signature does not verify.
    #[error("token signature does not verify")]
    Signature,
    /// A claim this gateway needs is missing.
    #[error("token has no {0} claim")]
    MissingClaim(String),
    /// Refused for another reason.
    #[error("token refused: {0}")]
    Refused(#[source] jsonwebtoken::errors::Error),
}

type Keys = HashMap<String, (DecodingKey, Algorithm)>;

/// Verifies bearer JWTs, with the keys of a JWKS that can be replaced
/// while it is in use ([`set_jwks`](Self::set_jwks)).
pub struct JwtVerifier {
    keys: std::sync::RwLock<std::sync::Arc<Keys>>,
    issuer: String,
    audience: String,
    scope_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("kids", &self.keys().keys().cloned().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("scope_claim", &self.scope_claim)
            .finish()
    }
}

impl JwtVerifier {
    /// From a JWKS document (JSON). Every key needs a `kid`; RSA keys are
    /// RS256 and EC keys ES256 unless their `alg` says otherwise. Tokens
    /// must carry `iss` = `issuer`, `aud` = `audience`, `exp` and `sub`;
    /// `scope_claim` lists what a token may call, as `target/method` globs
    /// (a space-separated string or an array).
    ///
    /// # Errors
    /// [`JwtError`] for a JWKS that does not parse, or a key that cannot be
    /// used.
    pub fn new(
        jwks_json: &str,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        scope_claim: impl Into<String>,
    ) -> Result<Self, JwtError> {
        let verifier = Self::without_keys(issuer, audience, scope_claim);
        verifier.set_jwks(jwks_json)?;
        Ok(verifier)
    }

    /// A verifier with no key yet: every token is refused
    /// ([`JwtError::NoKeysYet`]) until [`set_jwks`](Self::set_jwks) gives
    /// it some. For a gateway that starts while its JWKS cannot be had.
    pub fn without_keys(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        scope_claim: impl Into<String>,
    ) -> Self {
        JwtVerifier {
            keys: std::sync::RwLock::default(),
            issuer: issuer.into(),
            audience: audience.into(),
            scope_claim: scope_claim.into(),
        }
    }

    /// Takes the keys of `jwks_json` in place of the ones in use, and
    /// returns how many there are; on an error the keys in use stay.
    ///
    /// # Errors
    /// [`JwtError`] for a JWKS that does not parse, or a key that cannot
    /// be used.
    pub fn set_jwks(&self, jwks_json: &str) -> Result<usize, JwtError> {
        let keys = parse_jwks(jwks_json)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(keys);
        Ok(n)
    }

    /// Whether it has keys (a JWKS was loaded).
    pub fn has_keys(&self) -> bool {
        !self.keys().is_empty()
    }

    fn keys(&self) -> std::sync::Arc<Keys> {
        std::sync::Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller a token stands for: named `jwt:{sub}`, allowed the
    /// `target/method` globs of its scope claim (entries without a `/` are
    /// not ours and are ignored).
    ///
    /// # Errors
    /// [`JwtError`] saying why it is refused (never the token).
    pub fn verify(&self, token: &str) -> Result<Caller, JwtError> {
        let header = decode_header(token).map_err(JwtError::Malformed)?;
        let kid = header.kid.ok_or(JwtError::NoKeyId)?;
        let keys = self.keys();
        if keys.is_empty() {
            return Err(JwtError::NoKeysYet);
        }
        let (key, alg) = keys
            .get(&kid)
            .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
        if header.alg != *alg {
            return Err(JwtError::Algorithm {
                token: header.alg,
                key: *alg,
            });
        }
        let mut validation = Validation::new(*alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        let data = decode::<HashMap<String, Value>>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => JwtError::Expired,
                K::InvalidAudience => JwtError::Audience(self.audience.clone()),
                K::InvalidIssuer => JwtError::Issuer(self.issuer.clone()),
                K::InvalidSignature => JwtError::Signature,
                K::MissingRequiredClaim(c) => JwtError::MissingClaim(c.clone()),
                _ => JwtError::Refused(e),
            }
        })?;
        let sub = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::MissingClaim("sub".into()))?;
        let scopes: Vec<String> = match data.claims.get(&self.scope_claim) {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let rules: Vec<(&str, &str)> = scopes.iter().filter_map(|s| s.split_once('/')).collect();
        Ok(Caller::new(format!("jwt:{sub}")).scope(rules))
    }
}

/// The usable keys of a JWKS document, by `kid`.
fn parse_jwks(jwks_json: &str) -> Result<Keys, JwtError> {
    let set: JwkSet = serde_json::from_str(jwks_json).map_err(JwtError::Jwks)?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone().ok_or(JwtError::KeyWithoutId)?;
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(a), _) => a
                .to_string()
                .parse::<Algorithm>()
                .map_err(|source| JwtError::Key {
                    kid: kid.clone(),
                    source,
                })?,
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(_)) => Algorithm::ES256,
            (None, _) => return Err(JwtError::KeyWithoutAlgorithm(kid)),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|source| JwtError::Key {
            kid: kid.clone(),
            source,
        })?;
        keys.insert(kid, (key, alg));
    }
    if keys.is_empty() {
        return Err(JwtError::NoKeys);
    }
    Ok(keys)
}
