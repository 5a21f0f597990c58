//! A private Mosquitto for tests and benchmarks: started from the `mosquitto`
//! binary on a free port with its own config, never the machine's 1883.

use std::fs::{self, File};
use std::net::SocketAddr;
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
        // The port is picked free and then bound by mosquitto, so a test
        // running beside it may take it first (an embedded broker's
        // listener, an HTTP server): mosquitto then exits, and it is
        // started again on a fresh port, up to three times.
        let mut attempt = 0;
        loop {
            let port = free_port()?;
            let mut m = Self::prepare(binary.clone(), port, tcp_nodelay, extra)?;
            attempt += 1;
            match m.spawn() {
                Ok(()) => return Ok(Some(m)),
                Err(e) if attempt < 3 && m.exited() => {
                    eprintln!("mosquitto on port {port} did not start, trying another port: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Its folder and config for `port`, not yet started.
    fn prepare(
        binary: PathBuf,
        port: u16,
        tcp_nodelay: bool,
        extra: &str,
    ) -> std::io::Result<Self> {
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
        Ok(Mosquitto {
            child: None,
            port,
            dir,
            binary,
        })
    }

    /// Whether its process has ended.
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
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
        let pid = child.id();
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(5);
        while !listens(pid, addr) {
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

/// Whether process `pid` listens on `addr`. On Linux, read from `/proc`:
/// the listening socket on that port must be one of the process's own
/// files, so another listener that took the port first (mosquitto then
/// fails to bind and exits) is not mistaken for it. Elsewhere, whether
/// anything accepts a connection there.
#[cfg(target_os = "linux")]
fn listens(pid: u32, addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!(":{:04X}", addr.port());
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 9 && fields[1].ends_with(&local) && fields[3] == LISTEN)
                .then(|| format!("socket:[{}]", fields[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

#[cfg(not(target_os = "linux"))]
fn listens(_pid: u32, addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port another listener took first is not taken for mosquitto's:
    /// the start fails (mosquitto cannot bind and exits) instead of
    /// handing tests a broker that is not there.
    #[test]
    fn a_port_taken_by_another_listener_is_not_taken_for_mosquitto() {
        let Some(binary) = crate::program::MOSQUITTO.find() else {
            eprintln!("mosquitto not installed: skipped");
            return;
        };
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        let mut m = Mosquitto::prepare(binary, port, true, "").unwrap();
        let e = m.spawn().unwrap_err();
        assert!(m.exited(), "mosquitto should have exited: {e}");
        drop(other);
        // On a free port it starts, and its own listener is seen.
        let m = Mosquitto::start("").unwrap().unwrap();
        assert!(listens(
            m.child.as_ref().unwrap().id(),
            SocketAddr::from(([127, 0, 0, 1], m.port()))
        ));
    }
}
