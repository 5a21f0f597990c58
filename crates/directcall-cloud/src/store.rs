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

/// What a shared store does.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Writes `records` in order (one round trip), each to be forgotten
    /// after `ttl`.
    async fn save(&self, records: &[CallRecord], ttl: Duration) -> Result<(), String>;
    /// The record of `id`, if the store holds one.
    async fn load(&self, id: &MessageId) -> Result<Option<CallRecord>, String>;
    /// Claims idempotency key `key` for a call with `fingerprint` for
    /// `ttl`: `None` when this caller has it now, else the fingerprint of
    /// the call that claimed it first.
    async fn claim(
        &self,
        key: &str,
        fingerprint: Uuid,
        ttl: Duration,
    ) -> Result<Option<Uuid>, String>;
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn whole_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Redis: a record is `directcall:call:{id}` (its JSON, `EX` the
/// retention); a key is `directcall:key:{name-based UUID of the key}` (the
/// fingerprint, `SET NX EX`).
#[cfg(feature = "redis")]
pub(crate) struct RedisStore {
    client: redis::Client,
    url: String,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

#[cfg(feature = "redis")]
impl RedisStore {
    /// A store at `url` (`redis://host:port/db`); connects on first use.
    pub(crate) fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(RedisStore {
            client,
            url: url.to_owned(),
            conn: tokio::sync::OnceCell::new(),
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, String> {
        self.conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(2));
                redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await
            .cloned()
            .map_err(|e| format!("redis at {}: {e}", self.url))
    }
}

#[cfg(feature = "redis")]
#[async_trait]
impl Store for RedisStore {
    async fn save(&self, records: &[CallRecord], ttl: Duration) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for record in records {
            let json = serde_json::to_string(record).map_err(|e| e.to_string())?;
            pipe.cmd("SET")
                .arg(format!("directcall:call:{}", record.id))
                .arg(json)
                .arg("EX")
                .arg(whole_secs(ttl))
                .ignore();
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }

    async fn load(&self, id: &MessageId) -> Result<Option<CallRecord>, String> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("GET")
            .arg(format!("directcall:call:{id}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| e.to_string()))
            .transpose()
    }

    async fn claim(
        &self,
        key: &str,
        fingerprint: Uuid,
        ttl: Duration,
    ) -> Result<Option<Uuid>, String> {
        let name = format!(
            "directcall:key:{}",
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
            .map_err(|e| e.to_string())?;
        if set.is_some() {
            return Ok(None);
        }
        let first: Option<String> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        match first.map(|f| Uuid::parse_str(&f)) {
            Some(Ok(f)) => Ok(Some(f)),
            // Expired between the two commands: ours to take after all.
            None => Ok(None),
            Some(Err(e)) => Err(format!("{name} holds no fingerprint: {e}")),
        }
    }
}
