//! Who is calling, and what they may call: the [`Caller`] a request stands
//! for, the [`Authenticate`] trait that finds it, and why a call is refused
//! ([`Refusal`]).
//!
//! A host application plugs in its own authentication in one of two ways:
//! an [`Authenticate`] implementation given to
//! [`Gateway::authenticate`](super::Gateway::authenticate), or a middleware
//! of its own that inserts a [`Caller`] into the request's extensions (the
//! gateway then takes that caller as it is). The gateway's own API tokens,
//! credentials file and JWTs ([`Access`](super::Access)) are one
//! implementation of the trait.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use wildmatch::WildMatch;

/// Who is calling: a name (logged, and the owner of its idempotency keys
/// and call records), what it may call (target and method globs, and group
/// and method globs for calls to named groups), and how often (a token
/// bucket shared by every clone).
///
/// Cheap to clone. Keep one per caller and hand out clones, so that clones
/// share the rate.
///
/// ```
/// use directcall_cloud::gateway::Caller;
///
/// let ops = Caller::new("fleet-ops").scope([("car-*", "unlock"), ("car-*", "lock")]);
/// assert!(ops.allows("car-7", "unlock").is_ok());
/// assert!(ops.allows("truck-1", "unlock").is_err());
/// let dashboard = Caller::new("dashboard").rate(10, 20); // 10 calls/s, bursts of 20
/// assert!(dashboard.allows("anything", "anything").is_ok());
/// ```
#[derive(Clone)]
pub struct Caller {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// (target glob, method glob) pairs; `None`: everything.
    rules: Option<Vec<(WildMatch, WildMatch)>>,
    /// (group glob, method glob) pairs; `None`: every group when `rules`
    /// is `None`, none otherwise.
    groups: Option<Vec<(WildMatch, WildMatch)>>,
    limiter: Option<RateLimiter<NotKeyed, InMemoryState, DefaultClock>>,
    rate: Option<(u32, u32)>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.inner.name)
            .field("rate", &self.inner.rate)
            .finish_non_exhaustive()
    }
}

fn limiter(
    (per_second, burst): (u32, u32),
) -> Option<RateLimiter<NotKeyed, InMemoryState, DefaultClock>> {
    let quota = Quota::per_second(std::num::NonZeroU32::new(per_second)?)
        .allow_burst(std::num::NonZeroU32::new(burst)?);
    Some(RateLimiter::direct(quota))
}

/// Why a call was refused by a caller's scope or a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Outside the caller's scope (403).
    #[error("{0}")]
    Forbidden(String),
    /// Past a limit (429): a caller's rate or a target's calls in flight.
    #[error("{message}")]
    Limited {
        /// Which limit, in words.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
}

impl Caller {
    /// A caller named `name` that may call every method on every target,
    /// without a rate.
    pub fn new(name: impl Into<String>) -> Self {
        Caller {
            inner: Arc::new(Inner {
                name: name.into(),
                rules: None,
                groups: None,
                limiter: None,
                rate: None,
            }),
        }
    }

    /// The same caller, allowed only these (target glob, method glob) pairs
    /// (`*` and `?` as in a shell). Default: everything.
    #[must_use]
    pub fn scope<T: AsRef<str>, M: AsRef<str>>(
        self,
        rules: impl IntoIterator<Item = (T, M)>,
    ) -> Self {
        let rules = rules
            .into_iter()
            .map(|(t, m)| (WildMatch::new(t.as_ref()), WildMatch::new(m.as_ref())))
            .collect();
        self.rebuilt(|inner| inner.rules = Some(rules))
    }

    /// The same caller, allowed calls to named groups (PROTOCOL.md,
    /// "Groups") only for these (group glob, method glob) pairs. A group's
    /// members are whoever joined it, so a call to a group is allowed by
    /// the group's name, not by its members' target names. Default: every
    /// group for a caller without a [`scope`](Self::scope), none for one
    /// with a scope.
    ///
    /// ```
    /// use directcall_cloud::gateway::Caller;
    ///
    /// let ops = Caller::new("ops").scope([("car-*", "reboot")]);
    /// assert!(ops.allows_group("lobby", "reboot").is_err());
    /// let ops = ops.group_scope([("lobby", "reboot")]);
    /// assert!(ops.allows_group("lobby", "reboot").is_ok());
    /// assert!(ops.allows_group("lobby", "wipe").is_err());
    /// ```
    #[must_use]
    pub fn group_scope<G: AsRef<str>, M: AsRef<str>>(
        self,
        rules: impl IntoIterator<Item = (G, M)>,
    ) -> Self {
        let rules = rules
            .into_iter()
            .map(|(g, m)| (WildMatch::new(g.as_ref()), WildMatch::new(m.as_ref())))
            .collect();
        self.rebuilt(|inner| inner.groups = Some(rules))
    }

    /// The same caller, held to `per_second` calls a second with bursts of
    /// `burst` (429 past it); zero for either means no rate. Default: none.
    #[must_use]
    pub fn rate(self, per_second: u32, burst: u32) -> Self {
        let rate = (per_second > 0 && burst > 0).then_some((per_second, burst));
        self.rebuilt(|inner| {
            inner.limiter = rate.and_then(limiter);
            inner.rate = rate;
        })
    }

    fn rebuilt(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            // Shared already: a copy with a bucket of its own.
            Err(shared) => Inner {
                name: shared.name.clone(),
                rules: shared.rules.clone(),
                groups: shared.groups.clone(),
                limiter: shared.rate.and_then(limiter),
                rate: shared.rate,
            },
        };
        change(&mut inner);
        Caller {
            inner: Arc::new(inner),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its rate, calls per second and burst, if it has one.
    pub fn get_rate(&self) -> Option<(u32, u32)> {
        self.inner.rate
    }

    /// Whether it may call `method` on `target`.
    ///
    /// # Errors
    /// [`Refusal::Forbidden`] naming the caller and what was refused.
    pub fn allows(&self, target: &str, method: &str) -> Result<(), Refusal> {
        let Some(rules) = &self.inner.rules else {
            return Ok(());
        };
        let mut target_ok = false;
        for (t, m) in rules {
            if t.matches(target) {
                if m.matches(method) {
                    return Ok(());
                }
                target_ok = true;
            }
        }
        let name = &self.inner.name;
        Err(Refusal::Forbidden(if target_ok {
            format!("credential '{name}' may not call method '{method}' on target '{target}'")
        } else {
            format!("credential '{name}' may not call target '{target}'")
        }))
    }

    /// Whether it may call `method` on some target: a group call of a
    /// method it may call nowhere is refused whole.
    ///
    /// # Errors
    /// [`Refusal::Forbidden`] naming the caller and the method.
    pub fn allows_method(&self, method: &str) -> Result<(), Refusal> {
        match &self.inner.rules {
            Some(rules) if !rules.iter().any(|(_, m)| m.matches(method)) => {
                Err(Refusal::Forbidden(format!(
                    "credential '{}' may not call method '{method}'",
                    self.inner.name
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether it may call `method` on the named group `group`
    /// ([`group_scope`](Self::group_scope)).
    ///
    /// # Errors
    /// [`Refusal::Forbidden`] naming the caller and what was refused.
    pub fn allows_group(&self, group: &str, method: &str) -> Result<(), Refusal> {
        let name = &self.inner.name;
        let rules = match (&self.inner.groups, &self.inner.rules) {
            (Some(groups), _) if !groups.is_empty() => groups,
            (None, None) => return Ok(()),
            _ => {
                return Err(Refusal::Forbidden(format!(
                    "credential '{name}' may not call group '{group}': its scope names no groups"
                )))
            }
        };
        let mut group_ok = false;
        for (g, m) in rules {
            if g.matches(group) {
                if m.matches(method) {
                    return Ok(());
                }
                group_ok = true;
            }
        }
        Err(Refusal::Forbidden(if group_ok {
            format!("credential '{name}' may not call method '{method}' on group '{group}'")
        } else {
            format!("credential '{name}' may not call group '{group}'")
        }))
    }

    /// Whether it has a target scope at all ([`scope`](Self::scope)).
    pub fn is_scoped(&self) -> bool {
        self.inner.rules.is_some()
    }

    /// Whether any of its rules names `target` (the console shows it only
    /// such targets).
    pub fn sees_target(&self, target: &str) -> bool {
        self.inner
            .rules
            .as_ref()
            .is_none_or(|rules| rules.iter().any(|(t, _)| t.matches(target)))
    }

    /// Takes one call from its token bucket.
    ///
    /// # Errors
    /// [`Refusal::Limited`] when the bucket is empty.
    pub fn take(&self) -> Result<(), Refusal> {
        let (Some(limiter), Some((rate, burst))) = (&self.inner.limiter, self.inner.rate) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| Refusal::Limited {
            message: format!(
                "credential '{}' is over its rate of {rate} calls/s (burst {burst})",
                self.inner.name
            ),
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }
}

/// Why a request was not authenticated: a 401, whose message says why
/// (never the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unauthorized {
    /// No credential was presented: the 401 says nothing more.
    #[error("no credential")]
    Missing,
    /// A credential was presented and refused, for this reason.
    #[error("{0}")]
    Refused(String),
}

impl Unauthorized {
    /// Refused for `why` (said in the 401's body: never the secret).
    pub fn because(why: impl Into<String>) -> Self {
        Unauthorized::Refused(why.into())
    }
}

/// Finds the [`Caller`] a request stands for.
///
/// ```
/// use directcall_cloud::gateway::{Authenticate, Caller, Unauthorized};
/// use http::request::Parts;
///
/// /// Tenants by `x-api-key`.
/// struct ApiKeys(Vec<(String, Caller)>);
///
/// impl Authenticate for ApiKeys {
///     fn authenticate(&self, request: &Parts) -> Result<Caller, Unauthorized> {
///         let key = request.headers.get("x-api-key").ok_or(Unauthorized::Missing)?;
///         self.0
///             .iter()
///             .find(|(k, _)| k.as_bytes() == key.as_bytes())
///             .map(|(_, caller)| caller.clone())
///             .ok_or_else(|| Unauthorized::because("unknown API key"))
///     }
/// }
/// ```
pub trait Authenticate: Send + Sync + 'static {
    /// The caller `request` stands for.
    ///
    /// # Errors
    /// [`Unauthorized`], answered 401.
    fn authenticate(&self, request: &http::request::Parts) -> Result<Caller, Unauthorized>;

    /// Whether requests need a caller at all: `false` makes the gateway
    /// open (every request is let in without a caller), as with no
    /// authentication. Default: `true`.
    fn is_required(&self) -> bool {
        true
    }
}

impl<A: Authenticate + ?Sized> Authenticate for Arc<A> {
    fn authenticate(&self, request: &http::request::Parts) -> Result<Caller, Unauthorized> {
        (**self).authenticate(request)
    }

    fn is_required(&self) -> bool {
        (**self).is_required()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_match_globs_and_say_what_was_refused() {
        let ops = Caller::new("fleet-ops").scope([
            ("car-*", "unlock"),
            ("car-*", "lock"),
            ("truck-7", "unlock"),
        ]);
        assert!(ops.allows("car-1", "unlock").is_ok());
        assert!(ops.allows("truck-7", "unlock").is_ok());
        assert_eq!(
            ops.allows("truck-8", "unlock"),
            Err(Refusal::Forbidden(
                "credential 'fleet-ops' may not call target 'truck-8'".into()
            ))
        );
        assert_eq!(
            ops.allows("car-1", "open_trunk"),
            Err(Refusal::Forbidden(
                "credential 'fleet-ops' may not call method 'open_trunk' on target 'car-1'".into()
            ))
        );
        assert!(ops.sees_target("car-9") && !ops.sees_target("bus"));
        let all = Caller::new("all");
        assert!(all.allows("x", "y").is_ok() && all.sees_target("x"));
        assert!(all.allows_group("lobby", "y").is_ok() && all.allows_method("y").is_ok());
    }

    #[test]
    fn a_scoped_caller_calls_only_the_groups_it_is_given() {
        let ops = Caller::new("ops").scope([("car-*", "unlock")]);
        assert!(ops.allows_method("unlock").is_ok());
        assert_eq!(
            ops.allows_method("wipe"),
            Err(Refusal::Forbidden(
                "credential 'ops' may not call method 'wipe'".into()
            ))
        );
        assert_eq!(
            ops.allows_group("lobby", "unlock"),
            Err(Refusal::Forbidden(
                "credential 'ops' may not call group 'lobby': its scope names no groups".into()
            ))
        );
        let ops = ops.group_scope([("floor-*", "unlock")]).rate(5, 5);
        assert!(ops.allows_group("floor-2", "unlock").is_ok());
        assert_eq!(
            ops.allows_group("floor-2", "wipe"),
            Err(Refusal::Forbidden(
                "credential 'ops' may not call method 'wipe' on group 'floor-2'".into()
            ))
        );
        assert_eq!(
            ops.allows_group("lobby", "unlock"),
            Err(Refusal::Forbidden(
                "credential 'ops' may not call group 'lobby'".into()
            ))
        );
    }

    #[test]
    fn a_rate_empties_its_bucket_for_every_clone() {
        let dash = Caller::new("dashboard").rate(2, 2);
        let clone = dash.clone();
        assert!(dash.take().is_ok() && clone.take().is_ok());
        let Err(Refusal::Limited {
            message,
            retry_after,
        }) = dash.take()
        else {
            panic!("a third call in the same instant must be limited")
        };
        assert!(message.contains("rate of 2 calls/s"), "{message}");
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        assert_eq!(Caller::new("x").rate(0, 5).get_rate(), None);
    }
}
