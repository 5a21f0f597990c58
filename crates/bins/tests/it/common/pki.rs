//! A throwaway PKI made with the `openssl` CLI: a CA and certificates it
//! signs, for TLS tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use directcall_testkit::{program, unique};

/// Runs `openssl args` in `dir`; its stdout.
///
/// # Panics
/// When openssl is missing or fails (see [`Pki::new`] for the check).
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A CA and certificates signed by it, in a fresh folder.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A fresh CA, or `None` when the test is skipped for want of openssl
    /// ([`directcall_testkit::Program::or_skip`]).
    pub fn new(name: &str) -> Option<Pki> {
        program::OPENSSL.require()?;
        let dir = std::env::temp_dir().join(unique(&format!("directcall-pki-{name}")));
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}-ca"),
            ],
        );
        Some(Pki { dir })
    }

    /// A certificate for `cn`; servers get the SANs rustls insists on.
    pub fn issue(&self, cn: &str) {
        let d = &self.dir;
        std::fs::write(
            d.join(format!("{cn}.ext")),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{cn}.key"),
                "-out",
                &format!("{cn}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{cn}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{cn}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{cn}.ext"),
            ],
        );
        // Mosquitto run as root drops privileges before reading its key.
        for f in [format!("{cn}.key"), format!("{cn}.pem"), "ca.pem".into()] {
            let _ = Command::new("chmod").arg("644").arg(d.join(f)).status();
        }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
