//! Where log lines go: a shared buffer that a background thread writes to stderr
//! at most every few milliseconds (sooner once it fills up), and not at all while
//! nothing is logged.
//!
//! A request appends its formatted line under a mutex; only the first line of a batch
//! wakes the writer, so logging costs a request neither a write nor, mostly, a thread
//! wake-up; under load one write carries many lines. Memory is bounded: past `MAX_BUFFERED` bytes waiting, lines are dropped
//! and counted, and the count is logged once the writer catches up.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a line may wait before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Wake the writer early once this much is waiting.
const FLUSH_AT: usize = 256 << 10;
/// Drop lines beyond this much waiting (stderr is not keeping up).
const MAX_BUFFERED: usize = 8 << 20;

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    dropped: AtomicU64,
    stop: AtomicBool,
}

/// The `MakeWriter` for tracing-subscriber.
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

/// Writes out what is buffered and stops the writer thread when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    pub fn start() -> (LogWriter, Guard) {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(64 << 10)),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || run(&s))
            .ok();
        (LogWriter(shared.clone()), Guard { shared, thread })
    }
}

fn run(s: &Shared) {
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let stopping = {
            let mut buf = s.buf.lock().unwrap_or_else(|p| p.into_inner());
            // Idle: sleep until the first line arrives (or the guard stops us).
            while buf.is_empty() && !s.stop.load(Ordering::Acquire) {
                buf = s.wake.wait(buf).unwrap_or_else(|p| p.into_inner());
            }
            // Let more lines gather, unless the buffer fills first or we are stopping.
            if buf.len() < FLUSH_AT && !s.stop.load(Ordering::Acquire) {
                buf = s
                    .wake
                    .wait_timeout(buf, FLUSH_EVERY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut *buf, &mut out);
            s.stop.load(Ordering::Acquire)
        };
        let dropped = s.dropped.swap(0, Ordering::AcqRel);
        if !out.is_empty() || dropped > 0 {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&out);
            if dropped > 0 {
                let _ = writeln!(
                    err,
                    "cairn: {dropped} log lines were dropped: stderr did not keep up"
                );
            }
            let _ = err.flush();
        }
        out.clear();
        if out.capacity() > 1 << 20 {
            out = Vec::with_capacity(64 << 10);
        }
        if stopping && s.buf.lock().map(|b| b.is_empty()).unwrap_or(true) {
            return;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() + data.len() > MAX_BUFFERED {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(data.len());
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(data);
        // One wake-up per batch: for the first line, and once the buffer fills.
        if was_empty || (buf.len() >= FLUSH_AT && buf.len() - data.len() < FLUSH_AT) {
            self.0.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
