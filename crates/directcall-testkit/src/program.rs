//! Outside programs some tests need (servers, clients, a browser), found on
//! this machine, and the one way a test skips when one is missing.

use std::path::PathBuf;

/// An outside program a test needs: where to look for it and how to
/// install it. Find it with [`Program::find`]; a test that cannot run
/// without it asks [`Program::require`] (or [`Program::or_skip`] for a
/// server that a starter looks up itself) and returns on `None`.
///
/// ```no_run
/// use directcall_testkit::program;
///
/// let Some(curl) = program::CURL.require() else {
///     return; // skipped, loudly
/// };
/// # let _ = curl;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    /// What the skip message calls it.
    pub name: &'static str,
    /// The command that installs it (Debian's package names).
    pub install: &'static str,
    /// A variable naming the binary, tried first.
    pub env: Option<&'static str>,
    /// Its file names, looked for on `$PATH` and in the `sbin` and `bin`
    /// folders, or absolute paths, in this order.
    pub candidates: &'static [&'static str],
}

/// The Mosquitto broker (`$MOSQUITTO` first).
pub const MOSQUITTO: Program = Program {
    name: "mosquitto",
    install: "apt-get install -y mosquitto",
    env: Some("MOSQUITTO"),
    candidates: &["mosquitto"],
};

/// Mosquitto's request/response client.
pub const MOSQUITTO_RR: Program = Program {
    name: "mosquitto_rr",
    install: "apt-get install -y mosquitto-clients",
    env: None,
    candidates: &["mosquitto_rr"],
};

/// Mosquitto's publishing client.
pub const MOSQUITTO_PUB: Program = Program {
    name: "mosquitto_pub",
    install: "apt-get install -y mosquitto-clients",
    env: None,
    candidates: &["mosquitto_pub"],
};

/// Mosquitto's subscribing client.
pub const MOSQUITTO_SUB: Program = Program {
    name: "mosquitto_sub",
    install: "apt-get install -y mosquitto-clients",
    env: None,
    candidates: &["mosquitto_sub"],
};

/// The NATS server (`$NATS_SERVER` first).
pub const NATS_SERVER: Program = Program {
    name: "nats-server",
    install: "apt-get install -y nats-server",
    env: Some("NATS_SERVER"),
    candidates: &["nats-server"],
};

/// The Redis server (`$REDIS_SERVER` first).
pub const REDIS_SERVER: Program = Program {
    name: "redis-server",
    install: "apt-get install -y redis-server",
    env: Some("REDIS_SERVER"),
    candidates: &["redis-server"],
};

/// The `openssl` command, which makes the TLS tests' certificates.
pub const OPENSSL: Program = Program {
    name: "openssl",
    install: "apt-get install -y openssl",
    env: None,
    candidates: &["openssl"],
};

/// The `curl` command, an HTTP client that is not ours.
pub const CURL: Program = Program {
    name: "curl",
    install: "apt-get install -y curl",
    env: None,
    candidates: &["curl"],
};

/// Chromium, for the console's browser test.
pub const CHROMIUM: Program = Program {
    name: "chromium",
    install: "apt-get install -y chromium chromium-driver",
    env: None,
    candidates: &["chromium", "chromium-browser"],
};

/// Chromium's WebDriver server.
pub const CHROMEDRIVER: Program = Program {
    name: "chromedriver",
    install: "apt-get install -y chromium chromium-driver",
    env: None,
    candidates: &["chromedriver", "/usr/lib/chromium/chromedriver"],
};

/// Folders searched after `$PATH`: Debian puts servers in `sbin`, often off
/// a user's `$PATH`.
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"];

impl Program {
    /// Where it is installed: the file its variable names, else the first
    /// candidate found on `$PATH` or in `/usr/sbin`, `/usr/local/sbin`,
    /// `/usr/bin`, `/usr/local/bin`.
    pub fn find(&self) -> Option<PathBuf> {
        if let Some(p) = self.env.and_then(std::env::var_os) {
            return Some(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path)
            .chain(EXTRA_DIRS.iter().map(PathBuf::from))
            .collect();
        self.candidates.iter().find_map(|c| {
            let c = std::path::Path::new(c);
            if c.is_absolute() {
                return c.is_file().then(|| c.to_path_buf());
            }
            dirs.iter().map(|d| d.join(c)).find(|p| p.is_file())
        })
    }

    /// Where it is installed, or `None` once the test is skipped for want
    /// of it (see [`Program::or_skip`]).
    ///
    /// # Panics
    /// Under `CI`, when it is missing.
    pub fn require(&self) -> Option<PathBuf> {
        self.or_skip(self.find())
    }

    /// The one way a test skips: `found` (what needed this program: its
    /// path, a server started from it) passes through; `None` prints a
    /// loud message naming the program and how to install it, and the
    /// test returns. Under `CI` (see [`required`]) a missing program fails
    /// the test instead: CI installs everything.
    ///
    /// # Panics
    /// Under `CI`, when `found` is `None`.
    pub fn or_skip<T>(&self, found: Option<T>) -> Option<T> {
        if found.is_none() {
            assert!(
                !required(),
                "{} is required in CI (`{}`)",
                self.name,
                self.install
            );
            eprintln!(
                "\n*** SKIPPED: {} is not installed; `{}` to run this test ***\n",
                self.name, self.install
            );
        }
        found
    }
}

/// Whether a missing program must fail the test (under `CI`) rather than
/// skip it with a loud message.
pub fn required() -> bool {
    std::env::var_os("CI").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: Program = Program {
        name: "sh",
        install: "(always there)",
        env: None,
        candidates: &["no-such-directcall-program", "sh"],
    };

    const NOWHERE: Program = Program {
        name: "nowhere",
        install: "(never there)",
        env: Some("DIRECTCALL_TEST_NO_SUCH_VARIABLE"),
        candidates: &["no-such-directcall-program", "/no/such/directcall/program"],
    };

    #[test]
    fn a_program_is_found_by_its_first_candidate_present() {
        let sh = SH.find().expect("sh is installed");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(SH.require(), Some(sh));
        assert_eq!(NOWHERE.find(), None);
    }

    #[test]
    fn what_was_found_passes_through() {
        assert_eq!(NOWHERE.or_skip(Some(7)), Some(7));
        if !required() {
            assert_eq!(NOWHERE.or_skip(None::<u8>), None);
        }
    }
}
