//! Who may call what: named credentials with scopes (target globs, method
//! lists) and a rate per credential, and a bound on calls in flight per
//! target. SECURITY.md has the model.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use wildmatch::WildMatch;

/// One caller: a name (logged), a secret (never logged), what it may call,
/// and how often.
pub struct Credential {
    name: String,
    secret: Vec<u8>,
    /// What it may call: (target glob, method glob) pairs.
    rules: Vec<(WildMatch, WildMatch)>,
    limiter: Option<RateLimiter<NotKeyed, InMemoryState, DefaultClock>>,
    rate: Option<(u32, u32)>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

/// Why a call was refused by the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside the credential's scope (403).
    Forbidden(String),
    /// Past a limit (429), with when to try again.
    Limited(String, Duration),
}

impl Credential {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its rate, calls per second and burst, if it has one.
    pub fn rate(&self) -> Option<(u32, u32)> {
        self.rate
    }

    /// Whether it may call `method` on `target`.
    ///
    /// # Errors
    /// [`Refusal::Forbidden`] naming the credential and what was refused.
    pub fn allows(&self, target: &str, method: &str) -> Result<(), Refusal> {
        let mut target_ok = false;
        for (t, m) in &self.rules {
            if t.matches(target) {
                if m.matches(method) {
                    return Ok(());
                }
                target_ok = true;
            }
        }
        Err(Refusal::Forbidden(if target_ok {
            format!(
                "credential '{}' may not call method '{method}' on target '{target}'",
                self.name
            )
        } else {
            format!("credential '{}' may not call target '{target}'", self.name)
        }))
    }

    /// Whether any of its rules names `target` (the console shows it such
    /// targets only).
    pub fn sees_target(&self, target: &str) -> bool {
        self.rules.iter().any(|(t, _)| t.matches(target))
    }

    /// A credential for a verified bearer token (a JWT): its name and what
    /// it may call, as (target glob, method glob) pairs; no secret, no rate.
    pub fn verified(name: String, rules: Vec<(String, String)>) -> Self {
        Credential {
            name,
            secret: Vec::new(),
            rules: rules
                .iter()
                .map(|(t, m)| (WildMatch::new(t), WildMatch::new(m)))
                .collect(),
            limiter: None,
            rate: None,
        }
    }

    /// Takes one call from its token bucket.
    ///
    /// # Errors
    /// [`Refusal::Limited`] when the bucket is empty.
    pub fn take(&self) -> Result<(), Refusal> {
        let (Some(limiter), Some((rate, burst))) = (&self.limiter, self.rate) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Refusal::Limited(
                format!(
                    "credential '{}' is over its rate of {rate} calls/s (burst {burst})",
                    self.name
                ),
                wait,
            )
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    credentials: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    token: Option<String>,
    token_env: Option<String>,
    #[serde(default = "everything")]
    targets: Vec<String>,
    #[serde(default = "everything")]
    methods: Vec<String>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Longest bearer token looked at; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A set of credentials.
#[derive(Debug, Default)]
pub struct Credentials {
    list: Vec<Arc<Credential>>,
}

impl Credentials {
    /// `--api-token`: each token may call everything, named `token-1`, ...
    pub fn everything(tokens: &[String]) -> Self {
        let list = tokens
            .iter()
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(i, t)| {
                Arc::new(Credential {
                    name: format!("token-{}", i + 1),
                    secret: t.as_bytes().to_vec(),
                    rules: vec![(WildMatch::new("*"), WildMatch::new("*"))],
                    limiter: None,
                    rate: None,
                })
            })
            .collect();
        Credentials { list }
    }

    /// Parses a credentials file (TOML; SECURITY.md has the format).
    ///
    /// # Errors
    /// What is wrong, naming the credential (never its secret).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut list = Vec::new();
        for e in file.credentials {
            let secret = match (&e.token, &e.token_env) {
                (Some(t), None) => t.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    format!(
                        "credential '{}': environment variable {var} is not set",
                        e.name
                    )
                })?,
                _ => {
                    return Err(format!(
                        "credential '{}': give exactly one of token and token_env",
                        e.name
                    ))
                }
            };
            if secret.is_empty() || secret.len() > MAX_TOKEN_BYTES {
                return Err(format!(
                    "credential '{}': the token must be 1 to {MAX_TOKEN_BYTES} bytes",
                    e.name
                ));
            }
            if list.iter().any(|c: &Arc<Credential>| c.name == e.name) {
                return Err(format!("credential '{}' is named twice", e.name));
            }
            let rate = match (e.rate_per_second, e.burst) {
                (None, None) => None,
                (Some(r), b) if r > 0 && b != Some(0) => Some((r, b.unwrap_or(r))),
                _ => {
                    return Err(format!(
                        "credential '{}': rate_per_second (and burst) must be above 0",
                        e.name
                    ))
                }
            };
            let limiter = rate.and_then(|(r, b)| {
                let quota = Quota::per_second(NonZeroU32::new(r)?).allow_burst(NonZeroU32::new(b)?);
                Some(RateLimiter::direct(quota))
            });
            list.push(Arc::new(Credential {
                name: e.name,
                secret: secret.into_bytes(),
                rules: e
                    .targets
                    .iter()
                    .flat_map(|t| {
                        e.methods
                            .iter()
                            .map(move |m| (WildMatch::new(t), WildMatch::new(m)))
                    })
                    .collect(),
                limiter,
                rate,
            }));
        }
        Ok(Credentials { list })
    }

    /// Reads and parses a credentials file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Credentials::from_toml`]'s errors.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether there are none (no authentication).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The credentials.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Credential>> {
        self.list.iter()
    }

    /// The credential whose secret is `presented`. Every secret is compared
    /// in constant time, so timing tells nothing about which came close.
    pub fn find(&self, presented: &[u8]) -> Option<Arc<Credential>> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for c in &self.list {
            if bool::from(c.secret.as_slice().ct_eq(presented)) {
                found = Some(Arc::clone(c));
            }
        }
        found
    }
}

/// The credentials in force, and where they come from: swapped whole on
/// reload, so a call in flight keeps the credential it started with; and
/// the JWT verifier, if bearer JWTs are accepted.
#[derive(Debug)]
pub struct Access {
    current: RwLock<Arc<Credentials>>,
    file: Option<PathBuf>,
    tokens: Vec<String>,
    jwt: Option<crate::jwt::JwtVerifier>,
}

impl Access {
    /// From `--api-token` values and an optional credentials file.
    ///
    /// # Errors
    /// The file's errors.
    pub fn new(tokens: Vec<String>, file: Option<PathBuf>) -> Result<Self, String> {
        let access = Access {
            current: RwLock::default(),
            file,
            tokens,
            jwt: None,
        };
        access.reload()?;
        Ok(access)
    }

    /// Reads the file again (on SIGHUP). On an error the credentials in
    /// force stay.
    ///
    /// # Errors
    /// The file's errors.
    pub fn reload(&self) -> Result<usize, String> {
        let mut all = Credentials::everything(&self.tokens);
        if let Some(path) = &self.file {
            all.list.extend(Credentials::load(path)?.list);
        }
        let n = all.list.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(all);
        Ok(n)
    }

    /// Accepts bearer JWTs verified by `verifier` as well.
    pub fn with_jwt(mut self, verifier: crate::jwt::JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    /// Whether any caller needs a credential.
    pub fn is_required(&self) -> bool {
        self.jwt.is_some() || !self.current().is_empty()
    }

    /// The credential `presented` stands for: a configured secret, or a JWT
    /// that verifies.
    ///
    /// # Errors
    /// Why it was refused, for the 401's message (never the token).
    pub fn authenticate(&self, presented: &[u8]) -> Result<Arc<Credential>, String> {
        if presented.is_empty() {
            return Err("no bearer token".into());
        }
        if let Some(c) = self.current().find(presented) {
            return Ok(c);
        }
        match (&self.jwt, std::str::from_utf8(presented)) {
            (Some(jwt), Ok(token)) if token.matches('.').count() == 2 => {
                jwt.verify(token).map(Arc::new)
            }
            _ => Err("unknown token".into()),
        }
    }

    /// The credentials in force now.
    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// At most `max` calls in flight per target.
#[derive(Debug)]
pub struct TargetLimit {
    max: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

/// A call's place under its target's limit, given back on drop.
#[derive(Debug)]
pub struct TargetSlot {
    limit: Arc<TargetLimit>,
    target: String,
}

impl TargetLimit {
    /// At most `max` calls in flight per target.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(TargetLimit {
            max,
            in_flight: Mutex::default(),
        })
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for a call to `target`.
    ///
    /// # Errors
    /// [`Refusal::Limited`] when `max` calls to it are in flight.
    pub fn enter(self: &Arc<Self>, target: &str) -> Result<TargetSlot, Refusal> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(target.to_owned()).or_insert(0);
        if *n >= self.max {
            return Err(Refusal::Limited(
                format!(
                    "target '{target}' has {} calls in flight, its limit (--max-in-flight-per-target)",
                    self.max
                ),
                Duration::from_secs(1),
            ));
        }
        *n += 1;
        Ok(TargetSlot {
            limit: Arc::clone(self),
            target: target.to_owned(),
        })
    }
}

impl Drop for TargetSlot {
    fn drop(&mut self) {
        let mut map = self
            .limit
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.target) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.target);
            }
        }
    }
}

/// Who may call what, as flags: `directcall serve` and `directcall-lambda`
/// take the same ones.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct AccessArgs {
    /// API tokens (comma-separated); when set, calls need `Authorization: Bearer <token>`.
    #[arg(
        long = "api-token",
        env = "DIRECTCALL_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_tokens: Vec<String>,
    /// A credentials file (TOML: names, secrets, the targets and methods each
    /// may call, rates; docs/SECURITY.md), reloaded on SIGHUP by `serve`.
    #[arg(long, env = "DIRECTCALL_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Accept bearer JWTs signed by a key of this JWKS (a file, or an
    /// http(s):// URL read once at start); needs --jwt-issuer and
    /// --jwt-audience.
    #[arg(long, env = "DIRECTCALL_JWKS", requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwks: Option<String>,
    /// The `iss` a JWT must carry.
    #[arg(long, env = "DIRECTCALL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The `aud` a JWT must carry.
    #[arg(long, env = "DIRECTCALL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim listing what a JWT may call, as `target/method` globs
    /// (space-separated, or an array).
    #[arg(long, env = "DIRECTCALL_JWT_SCOPE_CLAIM", default_value = "scope")]
    pub jwt_scope_claim: String,
    /// At most this many calls in flight per target; more get 429 (0: no bound).
    #[arg(long, env = "DIRECTCALL_MAX_IN_FLIGHT_PER_TARGET", default_value_t = 8)]
    pub max_in_flight_per_target: usize,
    /// Put request and response bodies in the audit lines (never by default).
    #[arg(long, env = "DIRECTCALL_AUDIT_BODIES")]
    pub audit_bodies: bool,
}

impl AccessArgs {
    /// The access rules these flags describe (the JWKS read now).
    ///
    /// # Errors
    /// A credentials file or JWKS that cannot be read or used, naming the flag.
    pub async fn access(&self) -> Result<Access, String> {
        let mut access = Access::new(self.api_tokens.clone(), self.credentials.clone())
            .map_err(|e| format!("--credentials {e}"))?;
        if let (Some(jwks), Some(iss), Some(aud)) =
            (&self.jwks, &self.jwt_issuer, &self.jwt_audience)
        {
            let text = if jwks.starts_with("http://") || jwks.starts_with("https://") {
                let r = crate::http_client::get(jwks, &[])
                    .await
                    .map_err(|e| format!("--jwks {jwks}: {e}"))?;
                if r.status != 200 {
                    return Err(format!("--jwks {jwks}: HTTP {}", r.status));
                }
                r.body
            } else {
                std::fs::read_to_string(jwks).map_err(|e| format!("--jwks {jwks}: {e}"))?
            };
            let verifier = crate::jwt::JwtVerifier::new(&text, iss, aud, &self.jwt_scope_claim)
                .map_err(|e| format!("--jwks {jwks}: {e}"))?;
            access = access.with_jwt(verifier);
        }
        Ok(access)
    }

    /// `config` with `access` and these flags' limits and audit setting.
    pub fn apply(
        &self,
        config: crate::gateway::GatewayConfig,
        access: Arc<Access>,
    ) -> crate::gateway::GatewayConfig {
        let config = config.access(access).audit_bodies(self.audit_bodies);
        if self.max_in_flight_per_target > 0 {
            config.target_limit(self.max_in_flight_per_target)
        } else {
            config
        }
    }

    /// How callers are checked, in words, for the start-up log line.
    pub fn describe(&self, access: &Access) -> String {
        match (access.current().iter().count(), self.jwks.is_some()) {
            (0, false) => "off".to_owned(),
            (n, false) => format!("{n} credentials"),
            (n, true) => format!("{n} credentials and JWTs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[credentials]]
name = "fleet-ops"
token = "ops-secret"
targets = ["car-*", "truck-7"]
methods = ["unlock", "lock"]

[[credentials]]
name = "dashboard"
token = "dash-secret"
methods = ["status"]
rate_per_second = 2
burst = 2
"#;

    #[test]
    fn scopes_match_globs_and_lists() {
        let c = Credentials::from_toml(FILE).unwrap();
        let ops = c.find(b"ops-secret").unwrap();
        assert_eq!(ops.name(), "fleet-ops");
        assert!(ops.allows("car-1", "unlock").is_ok());
        assert!(ops.allows("truck-7", "lock").is_ok());
        let Err(Refusal::Forbidden(m)) = ops.allows("truck-8", "unlock") else {
            panic!()
        };
        assert_eq!(m, "credential 'fleet-ops' may not call target 'truck-8'");
        assert!(ops.allows("car-1", "open_trunk").is_err());
        let dash = c.find(b"dash-secret").unwrap();
        assert!(dash.allows("anything", "status").is_ok());
        assert!(c.find(b"ops-secre").is_none() && c.find(b"").is_none());
        assert!(!format!("{ops:?}").contains("ops-secret"));
    }

    #[test]
    fn a_rate_empties_its_bucket() {
        let c = Credentials::from_toml(FILE).unwrap();
        let dash = c.find(b"dash-secret").unwrap();
        assert!(dash.take().is_ok() && dash.take().is_ok());
        let Err(Refusal::Limited(m, wait)) = dash.take() else {
            panic!()
        };
        assert!(m.contains("rate of 2 calls/s"), "{m}");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    }

    #[test]
    fn bad_files_are_refused_naming_the_credential() {
        for (text, needle) in [
            ("[[credentials]]\nname = \"a\"\n", "exactly one of token"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\nrate_per_second = 0\n", "above 0"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\n[[credentials]]\nname = \"a\"\ntoken = \"y\"\n", "named twice"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\nscopes = 1\n", "unknown field"),
        ] {
            let e = Credentials::from_toml(text).unwrap_err();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("\"x\""), "{e}");
        }
    }

    #[test]
    fn a_target_takes_at_most_its_limit() {
        let limit = TargetLimit::new(2);
        let a = limit.enter("car").unwrap();
        let _b = limit.enter("car").unwrap();
        assert!(matches!(limit.enter("car"), Err(Refusal::Limited(..))));
        assert!(limit.enter("other").is_ok());
        drop(a);
        assert!(limit.enter("car").is_ok());
    }
}
