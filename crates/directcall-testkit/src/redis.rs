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
    child: Child,
    port: u16,
    dir: PathBuf,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl RedisServer {
    /// Starts one with no persistence. `Ok(None)` when the binary is not
    /// installed.
    ///
    /// # Errors
    /// When it is installed but does not listen within 5 s.
    pub fn start() -> std::io::Result<Option<Self>> {
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
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = RedisServer { child, port, dir };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let until = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if Instant::now() > until {
                return Err(std::io::Error::other(format!(
                    "redis-server did not listen on {port} within 5 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(server))
    }

    /// Its URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
