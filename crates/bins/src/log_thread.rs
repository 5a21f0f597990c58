//! The log thread of `directcall` and `directcall-sim`: logging threads
//! append each formatted line to one shared buffer, and a thread of its
//! own writes what has piled up to stderr in one write.
//!
//! It replaces tracing-appender's `non_blocking` writer, which sends each
//! line as a `Vec` of its own through a channel to its thread: under load
//! that is an allocation freed on another thread, a channel whose two ends
//! back off against each other (`sched_yield`), and a wake of the writing
//! thread every few lines. Appending to a buffer under a mutex costs one
//! copy; the thread is woken once per batch and then lets lines gather for
//! [`GATHER`] before it writes them (docs/PERFORMANCE.md, "On a faster
//! machine, and the audit line's thread").

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the thread lets lines gather after the first of a batch: a
/// line reaches stderr at most this late (plus the write itself).
pub const GATHER: Duration = Duration::from_millis(10);

/// The most bytes that wait for the thread before a logging thread waits
/// too: about a second of audit lines at 16,000 calls a second. Nothing is
/// ever dropped.
pub const MAX_WAITING_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
struct State {
    lines: Vec<u8>,
    stopping: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// The thread waits here for a first line.
    wake: Condvar,
    /// Logging threads wait here while [`MAX_WAITING_BYTES`] wait.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        while state.lines.len() >= MAX_WAITING_BYTES && !state.stopping {
            state = self.room.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.stopping {
            // The thread is gone or going: write it here, lose nothing.
            drop(state);
            let _ = io::stderr().write_all(line);
            return;
        }
        let first = state.lines.is_empty();
        state.lines.extend_from_slice(line);
        drop(state);
        if first {
            self.wake.notify_one();
        }
    }
}

/// Where `tracing_subscriber::fmt` writes: the shared buffer.
#[derive(Debug, Clone)]
pub struct ThreadWriter(Arc<Shared>);

impl Write for ThreadWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ThreadWriter {
    type Writer = ThreadWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Stops the thread when dropped, once it has written every line it was
/// given: keep it until the process ends.
#[derive(Debug)]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the thread, writing to `out`; lines given to the writer reach
/// `out` in the order they were given. Lines given once the guard is being
/// dropped go straight to stderr (the binaries' `out`), so none is lost.
///
/// # Errors
/// When the thread cannot be started.
pub fn start(out: impl Write + Send + 'static) -> io::Result<(ThreadWriter, LogGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let shared = Arc::clone(&shared);
            move || run(&shared, out)
        })?;
    Ok((
        ThreadWriter(Arc::clone(&shared)),
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.lines.is_empty() && !state.stopping {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.lines.is_empty() {
            return; // stopping, and nothing left
        }
        if !state.stopping {
            // Let the lines of the next moment join this one's write.
            drop(state);
            std::thread::sleep(GATHER);
            state = shared.lock();
        }
        std::mem::swap(&mut state.lines, &mut batch);
        drop(state);
        shared.room.notify_all();
        // An error (a closed stderr) loses these lines, not the process.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // A burst's buffer is not kept for good.
        batch.shrink_to(256 << 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        w.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0; 4];
        for line in text.lines() {
            let (t, i) = line.split_once(' ').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_logger_waits_while_the_buffer_is_full_and_nothing_is_dropped() {
        /// A sink that blocks until told to go on.
        struct Stalled(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let (go, cv) = &*self.0;
                let mut g = go.lock().unwrap();
                while !*g {
                    g = cv.wait(g).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (writer, guard) = start(Stalled(Arc::clone(&gate), sink.clone())).unwrap();
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<_>>();
        // Three times the bound, from another thread: with the thread's
        // write stalled on its first batch, it must stop at the bound.
        let lines = 3 * MAX_WAITING_BYTES / line.len();
        let logger = std::thread::spawn({
            let (mut w, line) = (writer.clone(), line.clone());
            move || {
                for _ in 0..lines {
                    w.write_all(&line).unwrap();
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let waited = !logger.is_finished();
        let waiting = writer.0.lock().lines.len();
        // Let the sink go on before asserting: a failed assertion would
        // otherwise wait for the stalled thread forever.
        {
            let (go, cv) = &*gate;
            *go.lock().unwrap() = true;
            cv.notify_all();
        }
        logger.join().unwrap();
        drop(guard);
        assert!(waited, "the logger never waited");
        assert!(
            waiting <= MAX_WAITING_BYTES + line.len(),
            "{waiting} bytes waiting"
        );
        assert_eq!(sink.0.lock().unwrap().len(), lines * line.len());
    }
}
