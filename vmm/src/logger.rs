//! Log lines on stderr: `peapod-vmm[<pid>] <level> <message>`. The shim
//! collects the VMM's stderr, so one line per event with the pid is what it needs.
//!
//! A guest decides how often some lines are written (a device it drives wrong, a flood
//! of vsock connections), and the shim keeps the log on the host's tmpfs, so neither
//! the rate nor the size is the guest's to choose:
//! - each call site may write [`Limits::burst`] lines at once and
//!   [`Limits::per_second`] after that; its next line after a pause says how many of
//!   its lines were dropped. One noisy site does not silence the others.
//! - a log file opened for appending (the shim's `vmm.log`) is emptied when it reaches
//!   [`Limits::max_bytes`], and says so in its first line; a file that is not appended
//!   to takes no more lines from there. Pipes and terminals are left alone: their
//!   readers pace the VMM.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

/// How much a guest can make the VMM log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Lines one call site may write at once.
    pub burst: u32,
    /// Lines per second one call site may write once its burst is spent.
    pub per_second: u32,
    /// Size at which a log file is emptied (appended) or closed to new lines.
    pub max_bytes: u64,
}

/// The VMM's limits: a boot at debug level stays well inside them (about a hundred
/// lines from as many sites), and a flood costs the host at most 4 MiB of log.
pub const LIMITS: Limits = Limits {
    burst: 50,
    per_second: 5,
    max_bytes: 4 << 20,
};

/// Where a call site's lines stand against the rate limit.
struct SiteBudget {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

/// Per-call-site token buckets.
struct RateLimiter {
    limits: Limits,
    sites: HashMap<(&'static str, u32), SiteBudget>,
}

impl RateLimiter {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            sites: HashMap::new(),
        }
    }

    /// Whether a line from `site` may be written at `now`: `Some(n)` if it may, `n`
    /// being how many of the site's lines were dropped before it.
    fn admit(&mut self, site: (&'static str, u32), now: Instant) -> Option<u64> {
        let limits = self.limits;
        let budget = self.sites.entry(site).or_insert(SiteBudget {
            tokens: f64::from(limits.burst),
            refilled: now,
            dropped: 0,
        });
        let elapsed = now.saturating_duration_since(budget.refilled).as_secs_f64();
        budget.tokens =
            (budget.tokens + elapsed * f64::from(limits.per_second)).min(f64::from(limits.burst));
        budget.refilled = now;
        if budget.tokens < 1.0 {
            budget.dropped += 1;
            return None;
        }
        budget.tokens -= 1.0;
        Some(std::mem::take(&mut budget.dropped))
    }
}

/// What the log is written to, and what its size limit does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SinkKind {
    /// A pipe, a terminal, /dev/null: no size limit.
    Stream,
    /// A regular file opened with O_APPEND: emptied at the limit.
    AppendedFile,
    /// A regular file written at an offset: no lines past the limit.
    File,
}

/// The log's file descriptor and how much has gone into it.
struct Sink {
    file: ManuallyDrop<File>,
    kind: SinkKind,
    written: u64,
    max_bytes: u64,
}

impl Sink {
    /// Over fd 2, which it never closes.
    fn stderr(max_bytes: u64) -> Self {
        // SAFETY: fd 2 is open for the process's life (or the calls on it fail with
        // EBADF, which logging ignores); ManuallyDrop keeps the File from closing it.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(libc::STDERR_FILENO) });
        Self::over(file, max_bytes)
    }

    fn over(file: ManuallyDrop<File>, max_bytes: u64) -> Self {
        let (kind, written) = match file.metadata() {
            Ok(m) if m.is_file() => {
                let appended = Self::flags_of(&file).is_some_and(|f| f & libc::O_APPEND != 0);
                let kind = if appended {
                    SinkKind::AppendedFile
                } else {
                    SinkKind::File
                };
                (kind, m.len())
            }
            _ => (SinkKind::Stream, 0),
        };
        Self {
            file,
            kind,
            written,
            max_bytes,
        }
    }

    fn flags_of(file: &File) -> Option<i32> {
        // SAFETY: F_GETFL on an open fd only reads its flags.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        (flags >= 0).then_some(flags)
    }

    /// Writes `line` in one write, unless the limit says otherwise. Errors are
    /// ignored: a lost log line must not take the VM down.
    fn write_line(&mut self, line: &str) {
        let len = line.len() as u64;
        if self.written + len > self.max_bytes {
            match self.kind {
                SinkKind::Stream => {}
                SinkKind::File => return,
                SinkKind::AppendedFile => {
                    // ftruncate on fd 2 only, and only to 0: the seccomp filters allow
                    // nothing else. O_APPEND puts the next write at the new end.
                    if self.file.set_len(0).is_err() {
                        return;
                    }
                    let note = format!(
                        "peapod-vmm[{}] WARN logger: the log reached {} bytes; \
                         earlier lines were dropped\n",
                        std::process::id(),
                        self.max_bytes
                    );
                    let _ = self.file.write_all(note.as_bytes());
                    self.written = note.len() as u64;
                }
            }
        }
        if self.file.write_all(line.as_bytes()).is_ok() {
            self.written += len;
        }
    }
}

struct State {
    limiter: RateLimiter,
    sink: Sink,
}

impl State {
    fn log(&mut self, record: &Record, now: Instant) {
        let site = (
            record.module_path_static().unwrap_or(""),
            record.line().unwrap_or(0),
        );
        let Some(dropped) = self.limiter.admit(site, now) else {
            return;
        };
        let pid = std::process::id();
        let mut line = String::new();
        // Writing into a String cannot fail.
        if dropped > 0 {
            let _ = writeln!(
                line,
                "peapod-vmm[{pid}] WARN logger: {dropped} lines like the next were dropped \
                 (more than {} a second)",
                self.limiter.limits.per_second
            );
        }
        let _ = writeln!(
            line,
            "peapod-vmm[{pid}] {} {}",
            record.level(),
            record.args()
        );
        self.sink.write_line(&line);
    }
}

struct StderrLogger {
    state: Mutex<State>,
}

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        // Not eprintln!, which panics when stderr is gone (a reader that went away).
        peapod_devices::lock(&self.state).log(record, Instant::now());
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    static LOGGER: OnceLock<StderrLogger> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| StderrLogger {
        state: Mutex::new(State {
            limiter: RateLimiter::new(LIMITS),
            sink: Sink::stderr(LIMITS.max_bytes),
        }),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const SMALL: Limits = Limits {
        burst: 3,
        per_second: 2,
        max_bytes: 100,
    };
    const SITE: (&str, u32) = ("peapod_devices::virtio::vsock", 42);

    #[test]
    fn a_site_gets_its_burst_then_its_rate_and_learns_what_it_lost() {
        let mut limiter = RateLimiter::new(SMALL);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.admit(SITE, t0), Some(0));
        }
        for _ in 0..10 {
            assert_eq!(limiter.admit(SITE, t0), None, "past the burst");
        }
        // Half a second at 2 a second is one line, which tells of the ten dropped.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.admit(SITE, t1), Some(10));
        assert_eq!(limiter.admit(SITE, t1), None);
        // A long pause refills the burst, not more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.admit(SITE, t2).is_some());
        }
        assert_eq!(limiter.admit(SITE, t2), None);
    }

    #[test]
    fn one_noisy_site_does_not_silence_another() {
        let mut limiter = RateLimiter::new(SMALL);
        let now = Instant::now();
        while limiter.admit(SITE, now).is_some() {}
        assert_eq!(limiter.admit(("peapod_vmm::vm", 7), now), Some(0));
    }

    fn file_sink(append: bool) -> (TempFile, Sink) {
        let tmp = TempFile::new().expect("temp file");
        let file = std::fs::OpenOptions::new()
            .append(append)
            .write(!append)
            .open(tmp.as_path())
            .expect("open the temp file");
        (tmp, Sink::over(ManuallyDrop::new(file), SMALL.max_bytes))
    }

    fn contents(tmp: &TempFile) -> String {
        std::fs::read_to_string(tmp.as_path()).expect("read the temp file")
    }

    #[test]
    fn an_appended_log_file_starts_again_at_its_limit() {
        let (tmp, mut sink) = file_sink(true);
        assert_eq!(sink.kind, SinkKind::AppendedFile);
        let line = "x".repeat(39) + "\n";
        for _ in 0..2 {
            sink.write_line(&line);
        }
        assert_eq!(contents(&tmp).len(), 80);
        // The third would pass 100 bytes: the file is emptied, says why, then has it.
        sink.write_line(&line);
        let text = contents(&tmp);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("the log reached 100 bytes"), "{text}");
        assert_eq!(lines[1], line.trim_end());
        assert_eq!(
            sink.written,
            text.len() as u64,
            "what the sink counts is in the file"
        );
        drop(ManuallyDrop::into_inner(sink.file));
    }

    #[test]
    fn a_log_file_written_in_place_takes_no_lines_past_its_limit() {
        let (tmp, mut sink) = file_sink(false);
        assert_eq!(sink.kind, SinkKind::File);
        let line = "y".repeat(29) + "\n";
        for _ in 0..5 {
            sink.write_line(&line);
        }
        assert_eq!(contents(&tmp), line.repeat(3));
        drop(ManuallyDrop::into_inner(sink.file));
    }

    #[test]
    fn a_dropped_run_is_counted_in_the_next_line_written() {
        let (tmp, sink) = file_sink(true);
        let mut state = State {
            limiter: RateLimiter::new(Limits {
                max_bytes: 1 << 20,
                ..SMALL
            }),
            sink: Sink {
                max_bytes: 1 << 20,
                ..sink
            },
        };
        let now = Instant::now();
        for i in 0..8 {
            let args = format_args!("line {i}");
            let record = Record::builder()
                .args(args)
                .level(log::Level::Warn)
                .module_path_static(Some(SITE.0))
                .line(Some(SITE.1))
                .build();
            let at = if i < 7 {
                now
            } else {
                now + Duration::from_secs(1)
            };
            state.log(&record, at);
        }
        let text = contents(&tmp);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].ends_with("WARN line 0"), "{text}");
        assert!(
            lines[3].contains("4 lines like the next were dropped"),
            "{text}"
        );
        assert!(lines[4].ends_with("WARN line 7"), "{text}");
        drop(ManuallyDrop::into_inner(state.sink.file));
    }
}
