//! What a test does to a server process it started: freeze it, resume it,
//! kill it.

use std::process::{Child, Command};

/// Sends `signal` (`-STOP`, `-CONT`) to `child`, if it runs.
///
/// # Panics
/// When `kill` cannot be run or fails.
pub(crate) fn signal(child: Option<&Child>, signal: &str) {
    if let Some(child) = child {
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }
}

/// SIGKILLs `child`, if it runs, and reaps it.
pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
