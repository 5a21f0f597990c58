//! A private Mosquitto for tests and benchmarks: started from the `mosquitto`
//! binary on a free port with its own config, never the machine's 1883.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use directcall_core::broker::BrokerOptions;

use crate::free_port;

/// A Mosquitto process owned by this one; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    binary: PathBuf,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl Mosquitto {
    /// Starts Mosquitto on a free port with `extra` appended to its config
    /// (the listener, `allow_anonymous true` and `set_tcp_nodelay true` are
    /// always there). `Ok(None)` when the binary is not installed
    /// ([`crate::program::MOSQUITTO`]: `$MOSQUITTO`, `$PATH`, `/usr/sbin`).
    ///
    /// # Errors
    /// When it is installed but does not start listening within 5 s.
    pub fn start(extra: &str) -> std::io::Result<Option<Self>> {
        Self::start_with(true, extra)
    }

    /// Like [`Mosquitto::start`], choosing `set_tcp_nodelay`: `false` is how
    /// Mosquitto ships, and costs tens of milliseconds a call (for
    /// measurements of exactly that).
    ///
    /// # Errors
    /// When it is installed but does not start listening within 5 s.
    pub fn start_with(tcp_nodelay: bool, extra: &str) -> std::io::Result<Option<Self>> {
        let Some(binary) = crate::program::MOSQUITTO.find() else {
            return Ok(None);
        };
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "directcall-mosquitto-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay {tcp_nodelay}\n\
             persistence false\nmax_queued_messages 100000\nmax_inflight_messages 1000\n\
             log_dest stderr\nlog_type error\nlog_type warning\n{extra}\n"
        );
        fs::write(dir.join("mosquitto.conf"), config)?;
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
            binary,
        };
        m.spawn()?;
        Ok(Some(m))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(std::io::Error::other(format!(
                    "mosquitto exited with {status}: {}",
                    self.log()
                )));
            }
            if Instant::now() > until {
                return Err(std::io::Error::other(format!(
                    "mosquitto did not listen on {addr} within 5 s: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Connection settings for it.
    pub fn options(&self) -> BrokerOptions {
        BrokerOptions::new("127.0.0.1", self.port)
    }

    /// The folder holding its config and log; tests put certificates here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Freezes it with SIGSTOP: its sockets stay open and nothing is
    /// answered, as a hung broker does. [`Mosquitto::thaw`] resumes it
    /// (dropping a frozen Mosquitto kills it all the same).
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes it after [`Mosquitto::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        crate::process::signal(self.child.as_ref(), signal);
    }

    /// Kills it with SIGKILL, as a crash would: no client is told.
    pub fn kill(&mut self) {
        crate::process::kill(&mut self.child);
    }

    /// Starts it again on the same port with the same config.
    ///
    /// # Errors
    /// When it does not listen again within 5 s.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
