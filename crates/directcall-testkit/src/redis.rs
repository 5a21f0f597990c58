//! A private Redis for tests and benchmarks: started from the
//! `redis-server` binary on a free port in a temp dir, never the machine's
//! 6379; killed on drop. Replicas of it, and a Redis Sentinel watching it,
//! the same way.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;

/// A `redis-server` process owned by this one.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    /// Where the kit's own checks go: `port`, or with TLS a second port,
    /// plain TCP.
    plain_port: u16,
    dir: PathBuf,
    password: Option<String>,
    /// TLS only: the certificate, key and CA files.
    tls: Option<[PathBuf; 3]>,
    /// A replica's master: its port.
    replica_of: Option<u16>,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl RedisServer {
    /// Starts one with no persistence. `Ok(None)` when the binary is not
    /// installed.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start() -> std::io::Result<Option<Self>> {
        Self::start_with(None, None, None)
    }

    /// [`RedisServer::start`] serving TLS (its port is a TLS port,
    /// clients need no certificate), with this certificate, key and CA (PEM
    /// files); [`RedisServer::url`] is then `rediss://localhost:PORT`. A
    /// second port, plain TCP, serves the kit's own checks only.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> std::io::Result<Option<Self>> {
        Self::start_with(
            None,
            Some([cert.to_owned(), key.to_owned(), ca.to_owned()]),
            None,
        )
    }

    /// [`RedisServer::start`] requiring `password` (`requirepass`);
    /// [`RedisServer::url`] leaves it out.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start_with_password(password: &str) -> std::io::Result<Option<Self>> {
        Self::start_with(Some(password.to_owned()), None, None)
    }

    /// A replica of `master` (`--replicaof`, with its password, and its
    /// TLS files for its own port and the replication), once it has synced
    /// with it. `Ok(None)` when the binary is not installed.
    ///
    /// # Errors
    /// When it does not listen within 5 s or sync within 10 s.
    pub fn start_replica_of(master: &RedisServer) -> std::io::Result<Option<Self>> {
        let Some(mut replica) = Self::start_with(
            master.password.clone(),
            master.tls.clone(),
            Some(master.port),
        )?
        else {
            return Ok(None);
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !replica
            .info("replication")?
            .contains("master_link_status:up")
        {
            if Instant::now() > until {
                replica.kill();
                return Err(std::io::Error::other(format!(
                    "the replica on {} did not sync with {} within 10 s",
                    replica.port, master.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(replica))
    }

    fn start_with(
        password: Option<String>,
        tls: Option<[PathBuf; 3]>,
        replica_of: Option<u16>,
    ) -> std::io::Result<Option<Self>> {
        let Some(binary) = crate::program::REDIS_SERVER.find() else {
            return Ok(None);
        };
        let port = free_port()?;
        let plain_port = match tls {
            None => port,
            Some(_) => free_port()?,
        };
        let dir = temp_dir("redis")?;
        let mut server = RedisServer {
            child: None,
            binary,
            port,
            plain_port,
            dir,
            password,
            tls,
            replica_of,
        };
        server.spawn()?;
        Ok(Some(server))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let port = self.port.to_string();
        let plain_port = self.plain_port.to_string();
        let ports: Vec<&std::ffi::OsStr> = match &self.tls {
            None => vec!["--port".as_ref(), port.as_ref()],
            Some([cert, key, ca]) => vec![
                "--port".as_ref(),
                plain_port.as_ref(),
                "--tls-port".as_ref(),
                port.as_ref(),
                "--tls-replication".as_ref(),
                "yes".as_ref(),
                "--tls-cert-file".as_ref(),
                cert.as_os_str(),
                "--tls-key-file".as_ref(),
                key.as_os_str(),
                "--tls-ca-cert-file".as_ref(),
                ca.as_os_str(),
                "--tls-auth-clients".as_ref(),
                "no".as_ref(),
            ],
        };
        self.child =
            Some(
                Command::new(&self.binary)
                    .args(ports)
                    .args(["--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                    .args(
                        self.password.iter().flat_map(|p| {
                            ["--requirepass", p.as_str(), "--masterauth", p.as_str()]
                        }),
                    )
                    .args(self.replica_of.iter().flat_map(|p| {
                        ["--replicaof".to_owned(), "127.0.0.1".into(), p.to_string()]
                    }))
                    .arg("--dir")
                    .arg(&self.dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        wait_listening("redis-server", self.port)
    }

    /// Its port (with TLS, its TLS port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `INFO section`, over plain TCP.
    fn info(&self, section: &str) -> std::io::Result<String> {
        match ask(
            self.plain_port,
            self.password.as_deref(),
            &["INFO", section],
        )? {
            Reply::Bulk(Some(info)) => Ok(info),
            other => Err(std::io::Error::other(format!("INFO: {other:?}"))),
        }
    }

    /// Its URL, `redis://127.0.0.1:PORT` (`rediss://localhost:PORT` with
    /// TLS).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    /// Kills it with SIGKILL (what it held is lost: no persistence).
    pub fn kill(&mut self) {
        crate::process::kill(&mut self.child);
    }

    /// Starts it again, empty, on the same port.
    ///
    /// # Errors
    /// When it does not listen again within 5 s.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Freezes it with SIGSTOP: connections stay open, nothing is
    /// answered; [`RedisServer::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes it after [`RedisServer::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        crate::process::signal(self.child.as_ref(), signal);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Sentinel (`redis-server CONF --sentinel`) watching one master
/// under a name, quick to act: it calls the master down after 1 s without
/// an answer, with a quorum of 1 (itself). Killed on drop.
#[derive(Debug)]
pub struct RedisSentinel {
    child: Option<Child>,
    port: u16,
    /// Where the kit's own checks go (see [`RedisServer`]'s).
    plain_port: u16,
    dir: PathBuf,
    name: String,
}

impl RedisSentinel {
    /// How long the master may not answer before this one fails it over.
    pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

    /// Starts one watching `master` as `name` (with its password, if
    /// any), once it knows `master`'s replicas (so that it can fail over
    /// to one). With a TLS `master`, it serves TLS with the same files on
    /// its port and reaches the servers over TLS. `Ok(None)` when the
    /// binary is not installed.
    ///
    /// # Errors
    /// When it does not listen within 5 s or learn the replicas within
    /// 15 s.
    pub fn start(master: &RedisServer, name: &str) -> std::io::Result<Option<Self>> {
        let Some(binary) = crate::program::REDIS_SERVER.find() else {
            return Ok(None);
        };
        let port = free_port()?;
        let plain_port = match master.tls {
            None => port,
            Some(_) => free_port()?,
        };
        let dir = temp_dir("sentinel")?;
        // The sentinel rewrites its configuration file as it learns: it
        // lives in the temp dir.
        let conf = dir.join("sentinel.conf");
        let mut text = format!(
            "port {plain_port}\nbind 127.0.0.1\nprotected-mode no\ndir \"{dir}\"\n\
             sentinel monitor {name} 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.display(),
            master = master.port,
            down = Self::DOWN_AFTER.as_millis(),
        );
        if let Some(password) = &master.password {
            text.push_str(&format!("sentinel auth-pass {name} {password}\n"));
        }
        if let Some([cert, key, ca]) = &master.tls {
            text.push_str(&format!(
                "tls-port {port}\ntls-cert-file \"{}\"\ntls-key-file \"{}\"\n\
                 tls-ca-cert-file \"{}\"\ntls-auth-clients no\ntls-replication yes\n",
                cert.display(),
                key.display(),
                ca.display()
            ));
        }
        fs::write(&conf, text)?;
        let child = Command::new(binary)
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut sentinel = RedisSentinel {
            child: Some(child),
            port,
            plain_port,
            dir,
            name: name.to_owned(),
        };
        wait_listening("redis-server --sentinel", port)?;
        let replicas = master
            .info("replication")?
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let until = Instant::now() + Duration::from_secs(15);
        while sentinel.replicas()? < replicas {
            if Instant::now() > until {
                sentinel.kill();
                return Err(std::io::Error::other(format!(
                    "the sentinel on {port} did not learn {replicas} replica(s) within 15 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(sentinel))
    }

    /// Its port (with TLS, its TLS port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The master's address as this sentinel names it now
    /// (`SENTINEL get-master-addr-by-name`).
    ///
    /// # Errors
    /// When it cannot be asked.
    pub fn master(&self) -> std::io::Result<Option<SocketAddr>> {
        let reply = ask(
            self.plain_port,
            None,
            &["SENTINEL", "get-master-addr-by-name", &self.name],
        )?;
        let Reply::Array(Some(addr)) = reply else {
            return Ok(None);
        };
        match addr.as_slice() {
            [Reply::Bulk(Some(ip)), Reply::Bulk(Some(port))] => {
                Ok(format!("{ip}:{port}").parse().ok())
            }
            _ => Ok(None),
        }
    }

    /// How many replicas of the master it knows.
    fn replicas(&self) -> std::io::Result<usize> {
        match ask(self.plain_port, None, &["SENTINEL", "replicas", &self.name])? {
            Reply::Array(Some(replicas)) => Ok(replicas.len()),
            _ => Ok(0),
        }
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        crate::process::kill(&mut self.child);
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A fresh folder for one server.
fn temp_dir(what: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "directcall-{what}-{}-{}",
        std::process::id(),
        INSTANCE.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits up to 5 s for something to listen on `port`.
fn wait_listening(what: &str, port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if Instant::now() > until {
            return Err(std::io::Error::other(format!(
                "{what} did not listen on {port} within 5 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A RESP reply, as much of it as these checks read.
#[derive(Debug)]
enum Reply {
    Simple,
    Error(String),
    Integer,
    Bulk(Option<String>),
    Array(Option<Vec<Reply>>),
}

/// Sends one command to the server on `port` (after `AUTH`, with a
/// password) and reads its reply, within 2 s. A server's error reply is
/// an `Err`.
fn ask(port: u16, password: Option<&str>, args: &[&str]) -> std::io::Result<Reply> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut send = |args: &[&str]| -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        writer.write_all(out.as_bytes())?;
        match read_reply(&mut reader)? {
            Reply::Error(e) => Err(std::io::Error::other(format!("{}: {e}", args[0]))),
            reply => Ok(reply),
        }
    };
    if let Some(password) = password {
        send(&["AUTH", password])?;
    }
    send(args)
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| bad("an empty reply"))?;
    let number = || rest.parse::<i64>().map_err(|_| bad(line));
    Ok(match kind {
        "+" => Reply::Simple,
        "-" => Reply::Error(rest.to_owned()),
        ":" => {
            number()?;
            Reply::Integer
        }
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut data = vec![0; len + 2];
                r.read_exact(&mut data)?;
                data.truncate(len);
                Reply::Bulk(Some(String::from_utf8(data).map_err(|_| bad("not UTF-8"))?))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(len) => Reply::Array(Some(
                (0..len)
                    .map(|_| read_reply(r))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(bad(line)),
    })
}
