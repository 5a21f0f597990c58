//! The gateway's own authentication: bearer secrets (API tokens, and named
//! credentials from a TOML file, each with a scope and a rate) and bearer
//! JWTs. [`Access`] implements [`Authenticate`]. SECURITY.md has the model
//! and the file's format.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::auth::{Authenticate, Caller, Unauthorized};
use super::jwt::JwtVerifier;

/// Longest bearer token looked at; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a credentials file cannot be used. Never holds a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or not of the credentials file's shape.
    /// Says where, never the line's text (it may hold a token).
    #[error("{}line {line}: {message}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Syntax {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// The line, from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A credential breaks a rule.
    #[error("{}credential '{name}': {problem}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Credential {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// The credential's name.
        name: String,
        /// What is wrong.
        problem: CredentialProblem,
    },
}

/// What is wrong with one credential of a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialProblem {
    /// Neither or both of `token` and `token_env`.
    #[error("give exactly one of token and token_env")]
    TokenSource,
    /// `token_env` names an unset variable.
    #[error("environment variable {0} is not set")]
    UnsetVariable(String),
    /// The token is empty or too long.
    #[error("the token must be 1 to {MAX_TOKEN_BYTES} bytes")]
    TokenLength,
    /// Two credentials share the name.
    #[error("is named twice")]
    Duplicate,
    /// A zero rate or burst.
    #[error("rate_per_second (and burst) must be above 0")]
    Rate,
}

impl AccessError {
    fn in_file(self, file: &Path) -> Self {
        match self {
            AccessError::Syntax { line, message, .. } => AccessError::Syntax {
                path: Some(file.to_owned()),
                line,
                message,
            },
            AccessError::Credential { name, problem, .. } => AccessError::Credential {
                path: Some(file.to_owned()),
                name,
                problem,
            },
            other => other,
        }
    }
}

/// A TOML or serde message without the values it quotes (a token put
/// where a list or number belongs would be shown): `"…"` for every
/// quoted string, and for a number or a string in backticks after
/// `integer`, `floating point` or `string`.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[i] as char;
        let before = &rest[..i];
        let value = quote == '"'
            || ["integer ", "floating point ", "string "]
                .iter()
                .any(|w| before.ends_with(w));
        out.push_str(before);
        let after = &rest[i + 1..];
        let Some(end) = after.find(quote) else {
            // An unclosed quote: nothing after it is shown.
            out.push(quote);
            out.push('…');
            return out;
        };
        out.push(quote);
        out.push_str(if value { "…" } else { &after[..end] });
        out.push(quote);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
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
    targets: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    /// Named groups it may call (with its methods); default: every group
    /// for a credential without `targets` or `methods`, none otherwise.
    groups: Option<Vec<String>>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

/// A secret and the caller it stands for.
struct Credential {
    secret: Vec<u8>,
    caller: Caller,
}

/// A set of credentials: bearer secrets, each standing for a [`Caller`].
#[derive(Default)]
pub struct Credentials {
    list: Vec<Credential>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a secret.
        f.debug_list()
            .entries(self.list.iter().map(|c| &c.caller))
            .finish()
    }
}

impl Credentials {
    /// API tokens: each may call everything, named `token-1`, `token-2`, ...
    /// (empty ones are ignored).
    pub fn everything(tokens: &[String]) -> Self {
        let list = tokens
            .iter()
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(i, t)| Credential {
                secret: t.as_bytes().to_vec(),
                caller: Caller::new(format!("token-{}", i + 1)),
            })
            .collect();
        Credentials { list }
    }

    /// Parses a credentials file (TOML; SECURITY.md has the format).
    ///
    /// ```
    /// use directcall_cloud::gateway::Credentials;
    ///
    /// let file = r#"
    /// [[credentials]]
    /// name = "fleet-ops"
    /// token = "ops-secret"
    /// targets = ["car-*"]
    /// methods = ["unlock", "lock"]
    /// rate_per_second = 5
    /// "#;
    /// let credentials = Credentials::from_toml(file)?;
    /// let ops = credentials.find(b"ops-secret").unwrap();
    /// assert!(ops.allows("car-1", "unlock").is_ok());
    /// # Ok::<(), directcall_cloud::gateway::AccessError>(())
    /// ```
    ///
    /// # Errors
    /// [`AccessError`] saying what is wrong and where, naming the
    /// credential (never its secret).
    pub fn from_toml(text: &str) -> Result<Self, AccessError> {
        let file: File = toml::from_str(text).map_err(|e| AccessError::Syntax {
            path: None,
            line: e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            }),
            message: without_values(e.message()),
        })?;
        let mut list: Vec<Credential> = Vec::new();
        for e in file.credentials {
            let problem = |problem| AccessError::Credential {
                path: None,
                name: e.name.clone(),
                problem,
            };
            let secret = match (&e.token, &e.token_env) {
                (Some(t), None) => t.clone(),
                (None, Some(var)) => std::env::var(var)
                    .map_err(|_| problem(CredentialProblem::UnsetVariable(var.clone())))?,
                _ => return Err(problem(CredentialProblem::TokenSource)),
            };
            if secret.is_empty() || secret.len() > MAX_TOKEN_BYTES {
                return Err(problem(CredentialProblem::TokenLength));
            }
            if list.iter().any(|c| c.caller.name() == e.name) {
                return Err(problem(CredentialProblem::Duplicate));
            }
            let unscoped = e.targets.is_none() && e.methods.is_none();
            let targets = e.targets.clone().unwrap_or_else(everything);
            let methods = e.methods.clone().unwrap_or_else(everything);
            let groups = match &e.groups {
                Some(g) => g.clone(),
                None if unscoped => everything(),
                None => Vec::new(),
            };
            let pairs = |names: &[String]| -> Vec<(String, String)> {
                names
                    .iter()
                    .flat_map(|n| methods.iter().map(move |m| (n.clone(), m.clone())))
                    .collect()
            };
            let mut caller = Caller::new(e.name.clone())
                .scope(pairs(&targets))
                .group_scope(pairs(&groups));
            match (e.rate_per_second, e.burst) {
                (None, None) => {}
                (Some(r), b) if r > 0 && b != Some(0) => caller = caller.rate(r, b.unwrap_or(r)),
                _ => return Err(problem(CredentialProblem::Rate)),
            }
            list.push(Credential {
                secret: secret.into_bytes(),
                caller,
            });
        }
        Ok(Credentials { list })
    }

    /// Reads and parses a credentials file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Credentials::from_toml`]'s errors.
    pub fn load(path: &Path) -> Result<Self, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| e.in_file(path))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The callers they stand for.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.list.iter().map(|c| &c.caller)
    }

    /// The caller whose secret is `presented`. Every secret is compared in
    /// constant time, so timing tells nothing about which came close.
    pub fn find(&self, presented: &[u8]) -> Option<Caller> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for c in &self.list {
            if bool::from(c.secret.as_slice().ct_eq(presented)) {
                found = Some(c.caller.clone());
            }
        }
        found
    }
}

/// The gateway's own authentication: `Authorization: Bearer <secret>`
/// against API tokens and a credentials file (swapped whole on reload, so a
/// call in flight keeps the caller it started with), and bearer JWTs.
///
/// ```
/// use directcall_cloud::gateway::{Access, Authenticate};
///
/// let access = Access::new(vec!["s3cret".into()], None)?;
/// assert!(access.is_required());
/// # Ok::<(), directcall_cloud::gateway::AccessError>(())
/// ```
#[derive(Debug)]
pub struct Access {
    current: RwLock<Arc<Credentials>>,
    file: Option<PathBuf>,
    tokens: Vec<String>,
    jwt: Option<Arc<JwtVerifier>>,
}

impl Access {
    /// From API tokens (each may call everything) and an optional
    /// credentials file.
    ///
    /// # Errors
    /// The file's [`AccessError`].
    pub fn new(tokens: Vec<String>, file: Option<PathBuf>) -> Result<Self, AccessError> {
        let access = Access {
            current: RwLock::default(),
            file,
            tokens,
            jwt: None,
        };
        access.reload()?;
        Ok(access)
    }

    /// Reads the file again, and returns how many credentials are now in
    /// force. On an error the credentials in force stay.
    ///
    /// # Errors
    /// The file's [`AccessError`].
    pub fn reload(&self) -> Result<usize, AccessError> {
        let mut all = Credentials::everything(&self.tokens);
        if let Some(path) = &self.file {
            all.list.extend(Credentials::load(path)?.list);
        }
        let n = all.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(all);
        Ok(n)
    }

    /// Accepts bearer JWTs verified by `verifier` as well.
    #[must_use]
    pub fn with_jwt(mut self, verifier: impl Into<Arc<JwtVerifier>>) -> Self {
        self.jwt = Some(verifier.into());
        self
    }

    /// The JWT verifier, if JWTs are accepted: a handle to give it a new
    /// JWKS ([`JwtVerifier::set_jwks`]).
    pub fn jwt(&self) -> Option<&Arc<JwtVerifier>> {
        self.jwt.as_ref()
    }

    /// Whether JWTs are accepted.
    pub fn accepts_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// The credentials in force now.
    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller `presented` (a bearer token) stands for: a configured
    /// secret, or a JWT that verifies.
    ///
    /// # Errors
    /// [`Unauthorized`] saying why (never the token).
    pub fn check(&self, presented: &[u8]) -> Result<Caller, Unauthorized> {
        if presented.is_empty() {
            return Err(Unauthorized::Missing);
        }
        if presented.len() > MAX_TOKEN_BYTES {
            return Err(Unauthorized::because(format!(
                "bearer token over {MAX_TOKEN_BYTES} bytes"
            )));
        }
        if let Some(c) = self.current().find(presented) {
            return Ok(c);
        }
        match (&self.jwt, std::str::from_utf8(presented)) {
            (Some(jwt), Ok(token)) if token.matches('.').count() == 2 => jwt
                .verify(token)
                .map_err(|e| Unauthorized::because(e.to_string())),
            _ => Err(Unauthorized::because("unknown token")),
        }
    }
}

impl Authenticate for Access {
    fn authenticate(&self, request: &http::request::Parts) -> Result<Caller, Unauthorized> {
        let presented = request
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        self.check(presented)
    }

    fn is_required(&self) -> bool {
        self.jwt.is_some() || !self.current().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_names_the_line_never_the_value() {
        for (text, line) in [
            ("[[credentials]]\nname = \"a\"\ntoken = \"tok-1\"\ntargets = \"S3CRET-IN-TARGETS\"\n", 4),
            ("[[credentials]]\nname = \"a\"\ntoken = \"tok-1\"\nrate_per_second = \"S3CRET-IN-RATE\"\n", 4),
            ("[[credentials]]\nname = \"a\"\ntoken = 7356128849\n", 3),
            ("[[credentials]]\nname = \"a\"\ntoken = \"S3CRET-UNCLOSED\n", 3),
            ("[[credentials]]\nname = \"a\"\nS3CRET-AS-KEY\n", 3),
        ] {
            let e = Credentials::from_toml(text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("line {line}: ")), "{e}");
            assert!(!e.contains("S3CRET") && !e.contains("7356128849"), "{e}");
        }
        assert_eq!(
            without_values("unknown field `tokn`, expected one of `name`, `token`"),
            "unknown field `tokn`, expected one of `name`, `token`"
        );
        assert_eq!(
            without_values("invalid type: string \"x\", expected a sequence"),
            "invalid type: string \"…\", expected a sequence"
        );
    }

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

[[credentials]]
name = "stations"
token = "stations-secret"
targets = ["kiosk-*"]
methods = ["reboot"]
groups = ["station-*"]

[[credentials]]
name = "admin"
token = "admin-secret"
"#;

    #[test]
    fn secrets_find_their_callers_and_scopes() {
        let c = Credentials::from_toml(FILE).unwrap();
        let ops = c.find(b"ops-secret").unwrap();
        assert_eq!(ops.name(), "fleet-ops");
        assert!(ops.allows("car-1", "unlock").is_ok());
        assert!(ops.allows("truck-7", "lock").is_ok());
        assert!(ops.allows("truck-8", "unlock").is_err());
        let dash = c.find(b"dash-secret").unwrap();
        assert!(dash.allows("anything", "status").is_ok());
        assert_eq!(dash.get_rate(), Some((2, 2)));
        assert!(c.find(b"ops-secre").is_none() && c.find(b"").is_none());
        // Groups: named, with the credential's methods; none by default
        // for a scoped credential, all for an unscoped one.
        assert!(ops.allows_group("station-1", "unlock").is_err());
        assert!(dash.allows_group("station-1", "status").is_err());
        let stations = c.find(b"stations-secret").unwrap();
        assert!(stations.allows_group("station-7", "reboot").is_ok());
        assert!(stations.allows_group("station-7", "wipe").is_err());
        assert!(stations.allows_group("lobby", "reboot").is_err());
        let admin = c.find(b"admin-secret").unwrap();
        assert!(admin.allows_group("anything", "anything").is_ok());
        assert!(admin.allows("any", "thing").is_ok());
        assert!(!format!("{c:?}").contains("ops-secret"));
    }

    #[test]
    fn bad_files_are_refused_naming_the_credential_or_line_never_the_token() {
        for (text, needle) in [
            ("[[credentials]]\nname = \"a\"\n", "exactly one of token"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\nrate_per_second = 0\n", "above 0"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\n[[credentials]]\nname = \"a\"\ntoken = \"y\"\n", "named twice"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x\"\nscopes = 1\n", "unknown field"),
            ("[[credentials]]\nname = \"a\"\ntoken = \"x-very-secret\n", "line 3"),
        ] {
            let e = Credentials::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("\"x") && !e.contains("very-secret"), "{e}");
        }
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let access = Access::new(vec!["t1".into(), String::new()], None).unwrap();
        assert_eq!(access.check(b"t1").unwrap().name(), "token-1");
        assert_eq!(access.check(b"").unwrap_err(), Unauthorized::Missing);
        assert_eq!(
            access.check(b"nope").unwrap_err(),
            Unauthorized::because("unknown token")
        );
        let long = vec![b'a'; MAX_TOKEN_BYTES + 1];
        assert!(matches!(access.check(&long), Err(Unauthorized::Refused(m)) if m.contains("over")));
        assert!(access.is_required());
        assert!(!Access::new(Vec::new(), None).unwrap().is_required());
    }
}
