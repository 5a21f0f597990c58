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
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl RedisServer {
    /// Starts one with no persistence. `Ok(None)` when the binary is not
    /// installed.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start() -> std::io::Result<Option<Self>> {
        Self::start_with(None)
    }

    /// [`RedisServer::start`] requiring `password` (`requirepass`);
    /// [`RedisServer::url`] leaves it out.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start_with_password(password: &str) -> std::io::Result<Option<Self>> {
        Self::start_with(Some(password.to_owned()))
    }

    fn start_with(password: Option<String>) -> std::io::Result<Option<Self>> {
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
        };
        server.spawn()?;
        Ok(Some(server))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        self.child = Some(
            Command::new(&self.binary)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
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

    /// Its URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
