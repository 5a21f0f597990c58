//! Redis Sentinel for the shared store: a `redis+sentinel://` URL, the
//! master found through its sentinels, and the connection to it given up
//! when the master seems to have moved (the next operation asks the
//! sentinels again).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, TlsMode, Value};

/// A sentinel's port when its URL names none.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Longest one sentinel is given to name the master (and the master to
/// confirm its role): the crate's sentinel connections have no timeout of
/// their own, and one that never answers must not keep the others unasked.
const SENTINEL_WAIT: Duration = Duration::from_secs(1);

/// `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/NAME[/DB]`
/// (`rediss+sentinel://`: TLS to the sentinels and to the master), taken
/// apart. The user and password are the master's (`AUTH`), not the
/// sentinels'.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct SentinelUrl {
    tls: bool,
    /// Host (an IPv6 address without its brackets) and port of each.
    sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    service: String,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl SentinelUrl {
    /// `url` taken apart; `Ok(None)` when it is not a sentinel URL at all.
    /// The reason of an `Err` never quotes the user or password.
    pub(super) fn parse(url: &str) -> Result<Option<Self>, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else {
            return Ok(None);
        };
        // Hosts and path hold no `@`: the userinfo ends at the last one.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        if rest.contains(['?', '#']) {
            return Err(
                "takes no query: put a password before the sentinels (redis+sentinel://:PASSWORD@HOST:26379/NAME)"
                    .into(),
            );
        }
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (userinfo, None),
                };
                let user = percent_decoded(user).ok_or("a bad %-escape in the user")?;
                let password = password
                    .map(percent_decoded)
                    .map(|p| p.ok_or("a bad %-escape in the password"))
                    .transpose()?;
                (
                    Some(user).filter(|u| !u.is_empty()),
                    password.filter(|p| !p.is_empty()),
                )
            }
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or("names no master: redis+sentinel://HOST:26379/NAME")?;
        let sentinels = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(host_and_port)
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.is_empty() {
            return Err(
                "names no sentinel: redis+sentinel://HOST:26379[,HOST:26379...]/NAME".into(),
            );
        }
        let mut segments = path.split('/');
        let service = segments.next().unwrap_or_default().to_owned();
        if service.is_empty() {
            return Err("names no master: redis+sentinel://HOST:26379/NAME".into());
        }
        let db = match segments.next().filter(|d| !d.is_empty()) {
            None => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number: /NAME/DB"))?,
        };
        if segments.any(|s| !s.is_empty()) {
            return Err("has more in its path than /NAME/DB".into());
        }
        Ok(Some(SentinelUrl {
            tls,
            sentinels,
            service,
            db,
            username,
            password,
        }))
    }

    /// A client that asks sentinel `at` (alone) for the master.
    fn client(&self, at: usize, ca: Option<&[u8]>) -> Result<SentinelClient, RedisError> {
        let (host, port) = self.sentinels[at].clone();
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        let mut builder =
            SentinelClientBuilder::new([addr], self.service.clone(), SentinelServerType::Master)?
                .set_client_to_redis_db(self.db);
        if let Some(user) = &self.username {
            builder = builder.set_client_to_redis_username(user.clone());
        }
        if let Some(password) = &self.password {
            builder = builder.set_client_to_redis_password(password.clone());
        }
        if self.tls {
            builder = builder
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(ca) = ca {
                let certificates = || redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.to_vec()),
                };
                builder = builder
                    .set_client_to_sentinel_certificates(certificates())
                    .set_client_to_redis_certificates(certificates());
            }
        }
        builder.build()
    }
}

/// `host`, `host:port` or `[v6]:port`.
fn host_and_port(h: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("sentinel {h:?}: an IPv6 address without its ']'"))?;
        (host, after.strip_prefix(':'))
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("sentinel {h:?}: port {port:?} is not a port"))?,
    };
    if host.is_empty() {
        return Err(format!("sentinel {h:?} has no host"));
    }
    Ok((host.to_owned(), port))
}

/// `s` with its `%XX` escapes decoded; `None` when one is malformed or
/// the result is not UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The sentinels of one master, asked in turn.
pub(super) struct Sentinels {
    url: SentinelUrl,
    ca: Option<Vec<u8>>,
    /// The sentinel asked first: the last that answered, or the one after
    /// the last that did not (or whose asking was cut short by the
    /// caller's bound).
    first: AtomicUsize,
}

impl Sentinels {
    /// The sentinels `url` names, with TLS verified against `ca` (PEM) or
    /// else the system's roots.
    ///
    /// # Errors
    /// When a sentinel's client cannot be built (a CA that does not parse).
    pub(super) fn new(url: SentinelUrl, ca: Option<&[u8]>) -> Result<Self, RedisError> {
        for at in 0..url.sentinels.len() {
            url.client(at, ca)?;
        }
        Ok(Sentinels {
            url,
            ca: ca.map(<[u8]>::to_vec),
            first: AtomicUsize::new(0),
        })
    }

    /// A client for the master the first sentinel to answer names, once
    /// the master confirms it is one (`ROLE`).
    ///
    /// # Errors
    /// The last sentinel's error when none named a master that confirmed.
    pub(super) async fn master(&self) -> Result<redis::Client, RedisError> {
        let n = self.url.sentinels.len();
        let start = self.first.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            // If this asking is dropped (the caller's bound), the next one
            // starts with the next sentinel.
            self.first.store((at + 1) % n, Ordering::Relaxed);
            let mut client = self.url.client(at, self.ca.as_deref())?;
            match tokio::time::timeout(SENTINEL_WAIT, client.async_get_client()).await {
                Ok(Ok(master)) => {
                    self.first.store(at, Ordering::Relaxed);
                    return Ok(master);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(RedisError::from((
                        ErrorKind::IoError,
                        "no answer from the sentinel",
                        format!(
                            "{}:{} within {} ms",
                            self.url.sentinels[at].0,
                            self.url.sentinels[at].1,
                            SENTINEL_WAIT.as_millis()
                        ),
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "no sentinel to ask"))
        }))
    }
}

/// Whether `e` means the master this connection reaches may no longer be
/// the master: it is unreachable, dropped the connection, or answers as a
/// replica (`READONLY`) or one cut off from its master (`MASTERDOWN`).
pub(super) fn master_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
}

/// The connection in use, if any, numbered so that a stale failure does
/// not drop a newer one.
#[derive(Default)]
pub(super) struct Slot(Mutex<(u64, Option<ConnectionManager>)>);

impl Slot {
    fn lock(&self) -> MutexGuard<'_, (u64, Option<ConnectionManager>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection in use, with its number.
    pub(super) fn get(&self) -> Option<(u64, ConnectionManager)> {
        let slot = self.lock();
        slot.1.clone().map(|c| (slot.0, c))
    }

    /// Puts `conn` in use; its number.
    pub(super) fn set(&self, conn: ConnectionManager) -> u64 {
        let mut slot = self.lock();
        slot.0 += 1;
        slot.1 = Some(conn);
        slot.0
    }

    /// Drops connection `number`, if it is still the one in use.
    fn forget(&self, number: u64) {
        let mut slot = self.lock();
        if slot.0 == number && slot.1.take().is_some() {
            tracing::info!("shared store: asking the sentinels for the master again");
        }
    }
}

/// A connection to the store for one operation. Through Sentinel it drops
/// the cached connection when a command's error says the master may have
/// moved, or when the operation is cut short while a command is out (a
/// master frozen or cut off answers nothing, and the caller's bound comes
/// before the connection's own response timeout).
pub(super) struct Conn {
    manager: ConnectionManager,
    watch: Option<Watch>,
}

struct Watch {
    slot: Arc<Slot>,
    number: u64,
    in_flight: bool,
}

impl Conn {
    /// A connection to a fixed server: the manager reconnects by itself.
    pub(super) fn fixed(manager: ConnectionManager) -> Self {
        Conn {
            manager,
            watch: None,
        }
    }

    /// A connection to a master found through the sentinels: connection
    /// `number` of `slot`.
    pub(super) fn watched(manager: ConnectionManager, slot: Arc<Slot>, number: u64) -> Self {
        Conn {
            manager,
            watch: Some(Watch {
                slot,
                number,
                in_flight: false,
            }),
        }
    }

    fn sent(&mut self) {
        if let Some(w) = &mut self.watch {
            w.in_flight = true;
        }
    }

    fn answered<T>(&mut self, result: &Result<T, RedisError>) {
        if let Some(w) = &mut self.watch {
            w.in_flight = false;
            if result.as_ref().is_err_and(master_moved) {
                w.slot.forget(w.number);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(w) = &self.watch {
            if w.in_flight {
                w.slot.forget(w.number);
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.sent();
            let result = self.manager.req_packed_command(cmd).await;
            self.answered(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.sent();
            let result = self.manager.req_packed_commands(cmd, offset, count).await;
            self.answered(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> SentinelUrl {
        SentinelUrl::parse(url)
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .unwrap_or_else(|| panic!("{url}: not a sentinel URL"))
    }

    #[test]
    fn a_sentinel_url_names_its_sentinels_master_and_database() {
        let url =
            parsed("redis+sentinel://:s3cr%40t@10.0.0.1:26379,sentinel-b,[::1]:26380/mymaster/2");
        assert_eq!(
            url,
            SentinelUrl {
                tls: false,
                sentinels: vec![
                    ("10.0.0.1".into(), 26379),
                    ("sentinel-b".into(), 26379),
                    ("::1".into(), 26380),
                ],
                service: "mymaster".into(),
                db: 2,
                username: None,
                password: Some("s3cr@t".into()),
            }
        );
        let url = parsed("rediss+sentinel://app:pw@s1:5000/cache");
        assert!(url.tls);
        assert_eq!(url.db, 0);
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!(parsed("redis+sentinel://s1/m/").db, 0);
        assert!(!format!("{url:?}").contains("pw@"), "{url:?}");
        assert!(!format!("{url:?}").contains("\"pw\""), "{url:?}");
    }

    #[test]
    fn other_urls_are_not_sentinel_urls() {
        for url in ["redis://h:6379/0", "rediss://h", "memory", "sentinel://h/m"] {
            assert_eq!(SentinelUrl::parse(url), Ok(None), "{url}");
        }
    }

    #[test]
    fn a_bad_sentinel_url_says_why_without_its_password() {
        for (url, why) in [
            ("redis+sentinel://:pw@h:26379", "names no master"),
            ("redis+sentinel://:pw@h:26379/", "names no master"),
            ("redis+sentinel://:pw@/m", "names no sentinel"),
            ("redis+sentinel://:pw@h:0/m", "is not a port"),
            ("redis+sentinel://:pw@h:x/m", "is not a port"),
            ("redis+sentinel://:pw@[::1/m", "without its ']'"),
            ("redis+sentinel://:pw@h/m/x", "is not a number"),
            ("redis+sentinel://:pw@h/m/0/1", "more in its path"),
            ("redis+sentinel://h/m?password=pw", "takes no query"),
            ("redis+sentinel://:p%zw@h/m", "%-escape in the password"),
        ] {
            let e = SentinelUrl::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("pw"), "{url}: {e}");
        }
    }

    #[test]
    fn errors_that_mean_the_master_moved() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let readonly = RedisError::from((
            ErrorKind::ReadOnly,
            "READONLY",
            "You can't write against a read only replica.".to_owned(),
        ));
        let masterdown = RedisError::from((ErrorKind::MasterDown, "MASTERDOWN"));
        let wrongtype = RedisError::from((ErrorKind::TypeError, "WRONGTYPE"));
        assert!(master_moved(&io));
        assert!(master_moved(&readonly));
        assert!(master_moved(&masterdown));
        assert!(!master_moved(&wrongtype));
    }

    /// A master frozen (SIGSTOP), then failed over by its sentinel:
    /// operations cut short by their caller at 300 ms, before the
    /// connection's own 2 s response timeout, never see an error, yet each
    /// drops the connection, and the store follows the promoted replica.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operation_cut_short_drops_the_connection_to_a_frozen_master() {
        use crate::store::{RedisStore, Store};
        use directcall_testkit::{program, wait_for, RedisSentinel, RedisServer};
        use uuid::Uuid;

        let Some(master) =
            program::REDIS_SERVER.or_skip(RedisServer::start().expect("redis-server starts"))
        else {
            return;
        };
        let replica = RedisServer::start_replica_of(&master)
            .expect("a replica starts and syncs")
            .expect("redis-server is installed");
        let sentinel = RedisSentinel::start(&master, "mymaster")
            .expect("a sentinel starts and learns the replica")
            .expect("redis-server is installed");
        let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port());
        let store = RedisStore::new(&url, None).unwrap();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            store.claim("before", Uuid::new_v4(), ttl).await.unwrap(),
            None
        );

        master.freeze();
        let promoted = std::net::SocketAddr::from(([127, 0, 0, 1], replica.port()));
        wait_for(30, "the sentinel promoting the replica", || async {
            (sentinel.master().ok().flatten() == Some(promoted)).then_some(())
        })
        .await;
        let first = Uuid::new_v4();
        let claimed = wait_for(15, "a key claimed on the promoted replica", || async {
            tokio::time::timeout(Duration::from_millis(300), store.claim("after", first, ttl))
                .await
                .ok()?
                .ok()
        })
        .await;
        assert_eq!(claimed, None);
        // Claimed there: another claim of the key finds the first.
        let again = store.claim("after", Uuid::new_v4(), ttl).await.unwrap();
        assert_eq!(again, Some(first));
        master.thaw();
    }

    /// The password of a sentinel URL is the master's (the sentinel asks
    /// for none); a wrong one fails without being shown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_password_of_a_sentinel_url_is_the_masters() {
        use crate::store::{RedisStore, Store};
        use directcall_testkit::{program, RedisSentinel, RedisServer};
        use uuid::Uuid;

        let Some(master) = program::REDIS_SERVER
            .or_skip(RedisServer::start_with_password("m4ster-pw").expect("redis-server starts"))
        else {
            return;
        };
        let sentinel = RedisSentinel::start(&master, "mymaster")
            .expect("a sentinel starts")
            .expect("redis-server is installed");
        let url = |password: &str| {
            format!(
                "redis+sentinel://:{password}@127.0.0.1:{}/mymaster/3",
                sentinel.port()
            )
        };
        let ttl = Duration::from_secs(60);
        let store = RedisStore::new(&url("m4ster-pw"), None).unwrap();
        assert_eq!(store.claim("k", Uuid::new_v4(), ttl).await.unwrap(), None);
        let wrong = RedisStore::new(&url("wr0ng-pw"), None).unwrap();
        let e = wrong.claim("k", Uuid::new_v4(), ttl).await.unwrap_err();
        assert!(!e.to_string().contains("wr0ng-pw"), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "redis at redis+sentinel://127.0.0.1:{}/mymaster/3: ",
                sentinel.port()
            )),
            "{e}"
        );
    }
}
