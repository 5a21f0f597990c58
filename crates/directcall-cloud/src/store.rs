//! Where call records and idempotency keys are shared between requesters
//! (gateway replicas, Lambda instances): Redis, behind the `redis` feature.
//! Each requester keeps its own records in memory as well; the store is
//! written behind them (in order, by one task) and read when a record or a
//! key is not this requester's own.

use std::time::Duration;

use async_trait::async_trait;
use directcall_core::MessageId;
use uuid::Uuid;

use crate::records::CallRecord;

#[cfg(feature = "redis")]
mod sentinel;

/// Why a shared store's operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StoreError {
    /// The store cannot be reached, or refused the command.
    #[cfg(feature = "redis")]
    #[error("redis at {url}: {source}")]
    Redis {
        /// Where, without its password.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
    /// A store URL that does not parse.
    #[cfg(feature = "redis")]
    #[error("{url}: {reason}")]
    Url {
        /// Which, without its password.
        url: String,
        /// Why.
        reason: String,
    },
    /// A record did not encode, or a stored one did not decode.
    #[error("a call record: {0}")]
    Record(#[from] serde_json::Error),
    /// Not asked: it failed less than `STORE_PAUSE` ago.
    #[error("not asked: it failed {} ms ago", ago.as_millis())]
    Paused {
        /// How long ago it last failed.
        ago: Duration,
    },
    /// The store did not answer in time (a frozen or unreachable store).
    #[error("no answer to {op} within {} ms", after.as_millis())]
    TimedOut {
        /// Which operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// An idempotency key holds something else than a call's fingerprint.
    #[cfg(feature = "redis")]
    #[error("{key} holds no fingerprint: {source}")]
    Fingerprint {
        /// The key's name in the store.
        key: String,
        /// Why.
        #[source]
        source: uuid::Error,
    },
}

/// `url` with its password (and user) and query left out: for logs and
/// errors. Everything up to the last `@` goes, so a password with an
/// unescaped `/`, `?` or `#` in it goes too.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    format!("{scheme}://{}", rest.trim_end_matches('/'))
}

/// What a shared store does.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Writes `records` in order (one round trip), each to be forgotten
    /// after `ttl`.
    async fn save(&self, records: &[CallRecord], ttl: Duration) -> Result<(), StoreError>;
    /// The record of `id`, if the store holds one.
    async fn load(&self, id: &MessageId) -> Result<Option<CallRecord>, StoreError>;
    /// Claims idempotency key `key` for a call with `fingerprint` for
    /// `ttl`: `None` when this caller has it now, else the fingerprint of
    /// the call that claimed it first.
    async fn claim(
        &self,
        key: &str,
        fingerprint: Uuid,
        ttl: Duration,
    ) -> Result<Option<Uuid>, StoreError>;
    /// Notes that the requester whose replies come under `prefix` left:
    /// the others take the late answers to its calls until `until_ms`
    /// (milliseconds since the Unix epoch).
    async fn left(&self, prefix: &str, until_ms: u64) -> Result<(), StoreError>;
    /// The prefixes of requesters that left whose late answers are still
    /// to be taken at `now_ms`, each with until when.
    async fn departed(&self, now_ms: u64) -> Result<Vec<(String, u64)>, StoreError>;
}

/// Longest a call waits on the store, however long it has left: a frozen
/// or unreachable store costs a call at most this (or half its remaining
/// time, when that is less), then the call goes on without the store.
pub(crate) const STORE_WAIT: Duration = Duration::from_millis(500);
/// Longest the background writer waits for one batch.
pub(crate) const STORE_WRITE_WAIT: Duration = Duration::from_secs(2);
/// After a failure, calls go on without the store for this long before one
/// asks it again: an outage costs a call at most one `STORE_WAIT` a second,
/// not one per call.
pub(crate) const STORE_PAUSE: Duration = Duration::from_secs(1);

/// The store's operations, as metrics name them.
const OPS: [&str; 5] = ["save", "load", "claim", "left", "departed"];

/// The shared store with every operation bounded in time and every failure
/// counted (`directcall_store_errors_total`, by `op`).
#[derive(Debug, Clone)]
pub(crate) struct Bounded {
    inner: std::sync::Arc<dyn Store>,
    errors: [metrics::Counter; 5],
    /// How long each operation took, by op, failed ones included.
    seconds: [metrics::Histogram; 5],
    /// When a call's operation last failed.
    failed_at: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl Bounded {
    pub(crate) fn new(inner: std::sync::Arc<dyn Store>) -> Self {
        metrics::describe_counter!(
            crate::metrics::STORE_ERRORS,
            "Shared store operations that failed or timed out, by op."
        );
        metrics::describe_histogram!(
            crate::metrics::STORE_OPERATION_SECONDS,
            metrics::Unit::Seconds,
            "Shared store operations (a pipeline of record writes is one save), by op, and how long each took."
        );
        Bounded {
            inner,
            errors: OPS.map(|op| metrics::counter!(crate::metrics::STORE_ERRORS, "op" => op)),
            seconds: OPS
                .map(|op| metrics::histogram!(crate::metrics::STORE_OPERATION_SECONDS, "op" => op)),
            failed_at: std::sync::Arc::default(),
        }
    }

    fn failed_at(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        self.failed_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call's operation, unless the store failed within `STORE_PAUSE`.
    async fn for_a_call<T>(
        &self,
        op: &'static str,
        counter: usize,
        after: Duration,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let last = *self.failed_at();
        if let Some(ago) = last.map(|at| at.elapsed()).filter(|ago| *ago < STORE_PAUSE) {
            return Err(StoreError::Paused { ago });
        }
        let result = self.bounded(op, counter, after, work).await;
        *self.failed_at() = result.is_err().then(tokio::time::Instant::now);
        result
    }

    /// How long a call with `left` of its deadline may wait on the store.
    pub(crate) fn wait_for(left: Duration) -> Duration {
        (left / 2).min(STORE_WAIT)
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        counter: usize,
        after: Duration,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(after, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::TimedOut { op, after }),
        };
        self.seconds[counter].record(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.errors[counter].increment(1);
        }
        result
    }

    pub(crate) async fn save(
        &self,
        records: &[CallRecord],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.bounded("save", 0, STORE_WRITE_WAIT, self.inner.save(records, ttl))
            .await
    }

    pub(crate) async fn load(
        &self,
        id: &MessageId,
        within: Duration,
    ) -> Result<Option<CallRecord>, StoreError> {
        self.for_a_call("load", 1, within, self.inner.load(id))
            .await
    }

    pub(crate) async fn claim(
        &self,
        key: &str,
        fingerprint: Uuid,
        ttl: Duration,
        within: Duration,
    ) -> Result<Option<Uuid>, StoreError> {
        self.for_a_call("claim", 2, within, self.inner.claim(key, fingerprint, ttl))
            .await
    }

    pub(crate) async fn left(&self, prefix: &str, until_ms: u64) -> Result<(), StoreError> {
        self.bounded(
            "left",
            3,
            STORE_WRITE_WAIT,
            self.inner.left(prefix, until_ms),
        )
        .await
    }

    pub(crate) async fn departed(&self, now_ms: u64) -> Result<Vec<(String, u64)>, StoreError> {
        self.bounded("departed", 4, STORE_WRITE_WAIT, self.inner.departed(now_ms))
            .await
    }
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn whole_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Every key's prefix: the project, then the version of the keys' schema
/// (what they hold and how), so that a later, incompatible layout lives
/// beside this one during a rolling upgrade instead of being misread.
pub const STORE_KEY_PREFIX: &str = "directcall:v1:";

/// Redis: a record is `directcall:v1:call:{id}` (its JSON, `EX` the
/// retention); a key is `directcall:v1:key:{name-based UUID of the key}`
/// (the fingerprint, `SET NX EX`); the requesters that left are the sorted
/// set `directcall:v1:departed` (each reply prefix scored by until when its
/// late answers are taken, in ms since the Unix epoch).
#[cfg(feature = "redis")]
pub(crate) struct RedisStore {
    server: Server,
    url: String,
    /// The connection in use, made on first use; through Sentinel, dropped
    /// when the master seems to have moved.
    conn: std::sync::Arc<sentinel::Slot>,
    /// One operation at a time makes the connection.
    connecting: tokio::sync::Mutex<()>,
}

/// Which server a [`RedisStore`] talks to.
#[cfg(feature = "redis")]
enum Server {
    /// One at a fixed address.
    Fixed(redis::Client),
    /// The master its sentinels name, asked again after it fails.
    Sentinel(sentinel::Sentinels),
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `url` is already without its password.
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

#[cfg(feature = "redis")]
impl RedisStore {
    /// A store at `url` (`redis://host:port/db`, `rediss://` for TLS,
    /// verified against `ca` (PEM) or else the system's roots), or the
    /// master its sentinels name (`redis+sentinel://`, `rediss+sentinel://`);
    /// connects on first use.
    pub(crate) fn new(url: &str, ca: Option<&[u8]>) -> Result<Self, StoreError> {
        let url_redacted = redacted(url);
        let failed = |source| StoreError::Redis {
            url: url_redacted.clone(),
            source,
        };
        let server = match sentinel::SentinelUrl::parse(url) {
            Err(reason) => {
                return Err(StoreError::Url {
                    url: url_redacted,
                    reason,
                })
            }
            Ok(Some(sentinels)) => {
                Server::Sentinel(sentinel::Sentinels::new(sentinels, ca).map_err(failed)?)
            }
            Ok(None) => Server::Fixed(Self::client(url, ca).map_err(failed)?),
        };
        Ok(RedisStore {
            server,
            url: url_redacted,
            conn: std::sync::Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    fn client(url: &str, ca: Option<&[u8]>) -> Result<redis::Client, redis::RedisError> {
        match ca {
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.to_vec()),
                },
            ),
            None => redis::Client::open(url),
        }
    }

    fn failed(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    async fn conn(&self) -> Result<sentinel::Conn, StoreError> {
        let conn = |(number, manager)| match self.server {
            Server::Fixed(_) => sentinel::Conn::fixed(manager),
            Server::Sentinel(_) => {
                sentinel::Conn::watched(manager, std::sync::Arc::clone(&self.conn), number)
            }
        };
        if let Some(made) = self.conn.get() {
            return Ok(conn(made));
        }
        let _one = self.connecting.lock().await;
        if let Some(made) = self.conn.get() {
            return Ok(conn(made));
        }
        let client = match &self.server {
            Server::Fixed(client) => client.clone(),
            Server::Sentinel(sentinels) => sentinels.master().await.map_err(|e| self.failed(e))?,
        };
        // One quick retry, not the client's default six with delays
        // doubling to 6.4 s: a store that is down is skipped by the
        // callers (Bounded), and asked again on the next operation.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1)
            .set_max_delay(200);
        let manager = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| self.failed(e))?;
        let number = self.conn.set(manager.clone());
        Ok(conn((number, manager)))
    }
}

#[cfg(feature = "redis")]
#[async_trait]
impl Store for RedisStore {
    async fn save(&self, records: &[CallRecord], ttl: Duration) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for record in records {
            let json = serde_json::to_string(record)?;
            pipe.cmd("SET")
                .arg(format!("{STORE_KEY_PREFIX}call:{}", record.id))
                .arg(json)
                .arg("EX")
                .arg(whole_secs(ttl))
                .ignore();
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn load(&self, id: &MessageId) -> Result<Option<CallRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("GET")
            .arg(format!("{STORE_KEY_PREFIX}call:{id}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    async fn claim(
        &self,
        key: &str,
        fingerprint: Uuid,
        ttl: Duration,
    ) -> Result<Option<Uuid>, StoreError> {
        let name = format!(
            "{STORE_KEY_PREFIX}key:{}",
            Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes()).simple()
        );
        let mut conn = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&name)
            .arg(fingerprint.simple().to_string())
            .arg("NX")
            .arg("EX")
            .arg(whole_secs(ttl))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        if set.is_some() {
            return Ok(None);
        }
        let first: Option<String> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        match first.map(|f| Uuid::parse_str(&f)) {
            Some(Ok(f)) => Ok(Some(f)),
            // Expired between the two commands: ours to take after all.
            None => Ok(None),
            Some(Err(source)) => Err(StoreError::Fingerprint { key: name, source }),
        }
    }

    async fn left(&self, prefix: &str, until_ms: u64) -> Result<(), StoreError> {
        let key = format!("{STORE_KEY_PREFIX}departed");
        let mut conn = self.conn().await?;
        redis::pipe()
            .cmd("ZADD")
            .arg(&key)
            .arg(until_ms)
            .arg(prefix)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({}", crate::records::now_ms()))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn departed(&self, now_ms: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let mut conn = self.conn().await?;
        // Scores are doubles on the wire; milliseconds fit one exactly.
        let departed: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(format!("{STORE_KEY_PREFIX}departed"))
            .arg(now_ms)
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(departed
            .into_iter()
            .map(|(prefix, until)| (prefix, until as u64))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_url_is_shown_without_its_password() {
        for (url, shown) in [
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://127.0.0.1:6379/0",
            ),
            ("rediss://user:s3cret@cache:6380", "rediss://cache:6380"),
            (
                "redis://127.0.0.1:6379/2?password=s3cret",
                "redis://127.0.0.1:6379/2",
            ),
            ("not a url", "not a url"),
            (
                "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
                "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
            ),
            (
                "rediss+sentinel://app:s3cret@s1,s2/cache",
                "rediss+sentinel://s1,s2/cache",
            ),
            // Unescaped, as people paste them.
            ("redis://:s3/cr?et@cache:6379/0", "redis://cache:6379/0"),
            (
                "redis+sentinel://:s3c@r/et@s1:26379/mymaster",
                "redis+sentinel://s1:26379/mymaster",
            ),
        ] {
            assert_eq!(redacted(url), shown);
            assert!(!redacted(url).contains("s3"), "{url}");
        }
    }
}
