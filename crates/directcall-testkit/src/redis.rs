//! A private Redis for tests and benchmarks: started from the
//! `redis-server` binary on a free port in a temp dir, never the machine's
//! 6379; killed on drop.

use std::fs;
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
    dir: PathBuf,
    password: Option<String>,
    /// TLS only: the certificate, key and CA files.
    tls: Option<[PathBuf; 3]>,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl RedisServer {
    /// Starts one with no persistence. `Ok(None)` when the binary is not
    /// installed.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start() -> std::io::Result<Option<Self>> {
        Self::start_with(None, None)
    }

    /// [`RedisServer::start`] serving TLS only (its port is a TLS port,
    /// clients need no certificate), with this certificate, key and CA (PEM
    /// files); [`RedisServer::url`] is then `rediss://localhost:PORT`.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> std::io::Result<Option<Self>> {
        Self::start_with(None, Some([cert.to_owned(), key.to_owned(), ca.to_owned()]))
    }

    /// [`RedisServer::start`] requiring `password` (`requirepass`);
    /// [`RedisServer::url`] leaves it out.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start_with_password(password: &str) -> std::io::Result<Option<Self>> {
        Self::start_with(Some(password.to_owned()), None)
    }

    fn start_with(
        password: Option<String>,
        tls: Option<[PathBuf; 3]>,
    ) -> std::io::Result<Option<Self>> {
        let Some(binary) = crate::program::REDIS_SERVER.find() else {
            return Ok(None);
        };
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "directcall-redis-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let mut server = RedisServer {
            child: None,
            binary,
            port,
            dir,
            password,
            tls,
        };
        server.spawn()?;
        Ok(Some(server))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let port = self.port.to_string();
        let ports: Vec<&std::ffi::OsStr> = match &self.tls {
            None => vec!["--port".as_ref(), port.as_ref()],
            Some([cert, key, ca]) => vec![
                "--port".as_ref(),
                "0".as_ref(),
                "--tls-port".as_ref(),
                port.as_ref(),
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
        self.child = Some(
            Command::new(&self.binary)
                .args(ports)
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(
                    self.password
                        .iter()
                        .flat_map(|p| ["--requirepass", p.as_str()]),
                )
                .arg("--dir")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if Instant::now() > until {
                return Err(std::io::Error::other(format!(
                    "redis-server did not listen on {} within 5 s",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
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
