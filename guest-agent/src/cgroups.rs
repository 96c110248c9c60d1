//! A container's cgroup v2: its statistics, OOM kills, freezing and its processes.
//!
//! Syscalls are dear in the guest, so each file is read with one `openat` relative to
//! the cgroup's directory, one `read` for the flat files (the kernel hands a flat
//! cgroup file over whole) and one `close`; nothing is stat'ed first.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag, AT_FDCWD};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::stat::Mode;

/// How long [`freeze`] waits for the kernel to report the cgroup (un)frozen.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong reading or driving a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup {}: cannot open it: {source} (does the container's cgroup exist? it is \
         made when the container is created and goes when it is removed)",
        dir.display()
    )]
    OpenDir { dir: PathBuf, source: io::Error },
    #[error("cgroup file {}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "cgroup file {}: cannot parse {line:?}: {reason} (is /sys/fs/cgroup a cgroup v2 \
         file system?)",
        path.display()
    )]
    Parse {
        path: PathBuf,
        line: String,
        reason: String,
    },
    #[error("cgroup file {}: cannot write {value:?} to it: {source}{hint}", path.display())]
    Write {
        path: PathBuf,
        value: &'static str,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "cgroup {}: not {} after {}: cgroup.events says {events:?}{hint}",
        dir.display(),
        if *frozen { "frozen" } else { "thawed" },
        show_duration(*waited)
    )]
    FreezeTimeout {
        dir: PathBuf,
        frozen: bool,
        waited: Duration,
        events: String,
        hint: &'static str,
    },
    #[error(
        "cgroup {}: cannot watch {} for OOM kills: {source} (does the cgroup exist, with \
         the memory controller enabled in its parent's cgroup.subtree_control?)",
        dir.display(),
        MEMORY_EVENTS
    )]
    Watch { dir: PathBuf, source: io::Error },
    #[error("inotify: {what}: {source} ({hint})")]
    Inotify {
        what: &'static str,
        source: io::Error,
        hint: &'static str,
    },
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

const MEMORY_EVENTS: &str = "memory.events";
const CGROUP_EVENTS: &str = "cgroup.events";
const CGROUP_FREEZE: &str = "cgroup.freeze";
const CGROUP_PROCS: &str = "cgroup.procs";

fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `cpu.stat`; the throttling figures are 0 without the cpu controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
}

/// The memory controller's files; all 0 without it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// memory.current
    pub usage_bytes: u64,
    /// memory.max; 0 when unlimited ("max").
    pub limit_bytes: u64,
    pub anon_bytes: u64,
    /// Page cache, shmem included.
    pub file_bytes: u64,
    /// `kernel`, or `kernel_stack + slab` on kernels without it (before 5.18).
    pub kernel_bytes: u64,
    pub shmem_bytes: u64,
    /// memory.swap.current; 0 without swap.
    pub swap_usage_bytes: u64,
    pub pgfault: u64,
    pub pgmajfault: u64,
    /// memory.events `oom`: times the limit was hit and reclaim failed.
    pub oom_events: u64,
    /// memory.events `oom_kill`: processes the OOM killer killed.
    pub oom_kill_events: u64,
    pub inactive_file_bytes: u64,
}

/// `pids.current` and `pids.max`; 0 without the pids controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    /// 0 when unlimited ("max").
    pub limit: u64,
}

/// One device's line of `io.stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    pub major: u32,
    pub minor: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    /// One entry per device with I/O; empty without the io controller.
    pub io: Vec<IoStats>,
}

/// Reads a cgroup's statistics. A controller that is not enabled for it (its files
/// missing) gives zeros for its part; a missing cgroup is an error naming it.
pub fn read_stats(cgroup_dir: &Path) -> Result<CgroupStats> {
    let dir = CgroupDir::open(cgroup_dir)?;
    let mut buf = Vec::with_capacity(CHUNK);
    let mut stats = CgroupStats::default();

    if dir.read(CPU_STAT, &mut buf, Records::One)? {
        let cpu = &mut stats.cpu;
        for (key, value) in dir.keyed(CPU_STAT, &buf)? {
            let field = match key {
                "usage_usec" => &mut cpu.usage_usec,
                "user_usec" => &mut cpu.user_usec,
                "system_usec" => &mut cpu.system_usec,
                "nr_periods" => &mut cpu.nr_periods,
                "nr_throttled" => &mut cpu.nr_throttled,
                "throttled_usec" => &mut cpu.throttled_usec,
                _ => continue,
            };
            *field = dir.number(CPU_STAT, key, value)?;
        }
    }

    let memory = &mut stats.memory;
    memory.usage_bytes = dir.single(&mut buf, "memory.current")?;
    memory.limit_bytes = dir.single(&mut buf, "memory.max")?;
    memory.swap_usage_bytes = dir.single(&mut buf, "memory.swap.current")?;
    if dir.read(MEMORY_STAT, &mut buf, Records::One)? {
        let (mut kernel, mut kernel_stack, mut slab) = (None, 0, 0);
        for (key, value) in dir.keyed(MEMORY_STAT, &buf)? {
            let field = match key {
                "anon" => &mut memory.anon_bytes,
                "file" => &mut memory.file_bytes,
                "shmem" => &mut memory.shmem_bytes,
                "pgfault" => &mut memory.pgfault,
                "pgmajfault" => &mut memory.pgmajfault,
                "inactive_file" => &mut memory.inactive_file_bytes,
                "kernel_stack" => &mut kernel_stack,
                "slab" => &mut slab,
                "kernel" => kernel.insert(0),
                _ => continue,
            };
            *field = dir.number(MEMORY_STAT, key, value)?;
        }
        memory.kernel_bytes = kernel.unwrap_or(kernel_stack + slab);
    }
    if dir.read(MEMORY_EVENTS, &mut buf, Records::One)? {
        let events = parse_memory_events(&dir, &buf)?;
        memory.oom_events = events.oom.unwrap_or(0);
        memory.oom_kill_events = events.oom_kill.unwrap_or(0);
    }

    stats.pids.current = dir.single(&mut buf, "pids.current")?;
    stats.pids.limit = dir.single(&mut buf, "pids.max")?;

    if dir.read(IO_STAT, &mut buf, Records::One)? {
        stats.io = parse_io_stat(&dir, &buf)?;
    }
    Ok(stats)
}

const CPU_STAT: &str = "cpu.stat";
const MEMORY_STAT: &str = "memory.stat";
const IO_STAT: &str = "io.stat";

/// memory.events' counters; None for a line that is not there.
struct MemoryEvents {
    oom: Option<u64>,
    oom_kill: Option<u64>,
}

fn parse_memory_events(dir: &CgroupDir, buf: &[u8]) -> Result<MemoryEvents> {
    let mut events = MemoryEvents {
        oom: None,
        oom_kill: None,
    };
    for (key, value) in dir.keyed(MEMORY_EVENTS, buf)? {
        match key {
            "oom" => events.oom = Some(dir.number(MEMORY_EVENTS, key, value)?),
            "oom_kill" => events.oom_kill = Some(dir.number(MEMORY_EVENTS, key, value)?),
            _ => {}
        }
    }
    Ok(events)
}

/// `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..`, one line a device.
fn parse_io_stat(dir: &CgroupDir, buf: &[u8]) -> Result<Vec<IoStats>> {
    let text = dir.text(IO_STAT, buf)?;
    let mut devices = Vec::new();
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        let Some(device) = words.next() else {
            continue;
        };
        let bad = |reason: &str| dir.parse_error(IO_STAT, line, reason);
        let (major, minor) = device
            .split_once(':')
            .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
            .ok_or_else(|| bad("the device is not MAJOR:MINOR"))?;
        let mut io = IoStats {
            major,
            minor,
            ..IoStats::default()
        };
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| bad("a field is not key=value"))?;
            let field = match key {
                "rbytes" => &mut io.read_bytes,
                "wbytes" => &mut io.write_bytes,
                "rios" => &mut io.read_ios,
                "wios" => &mut io.write_ios,
                _ => continue,
            };
            *field = value
                .parse()
                .map_err(|_| bad(&format!("{key} is not a number")))?;
        }
        devices.push(io);
    }
    Ok(devices)
}

/// Freezes (`true`) or thaws (`false`) a cgroup and returns once the kernel reports it
/// done (`frozen 1`/`frozen 0` in cgroup.events), waiting up to
/// [`DEFAULT_FREEZE_TIMEOUT`]. Blocks the calling thread meanwhile.
pub fn freeze(cgroup_dir: &Path, frozen: bool) -> Result<()> {
    freeze_with_timeout(cgroup_dir, frozen, DEFAULT_FREEZE_TIMEOUT)
}

/// [`freeze`] with its own timeout. Checks cgroup.events once right after writing
/// cgroup.freeze (an idle or empty cgroup is done by then); otherwise it sleeps on an
/// inotify watch of cgroup.events, which the kernel signals when the state changes.
pub fn freeze_with_timeout(cgroup_dir: &Path, frozen: bool, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let dir = CgroupDir::open(cgroup_dir)?;
    let value = if frozen { "1" } else { "0" };
    dir.write(CGROUP_FREEZE, value)?;

    let mut buf = Vec::with_capacity(256);
    if dir.frozen(&mut buf)? == frozen {
        return Ok(());
    }
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(|e| {
        CgroupError::Inotify {
            what: "cannot create an instance to wait for cgroup.events",
            source: e.into(),
            hint: "is the agent out of file descriptors or inotify instances?",
        }
    })?;
    inotify
        .add_watch(&cgroup_dir.join(CGROUP_EVENTS), AddWatchFlags::IN_MODIFY)
        .map_err(|e| CgroupError::Read {
            path: cgroup_dir.join(CGROUP_EVENTS),
            source: e.into(),
        })?;
    loop {
        // Read after the watch is in place: a change from then on wakes the poll.
        if dir.frozen(&mut buf)? == frozen {
            return Ok(());
        }
        let Some(left) = timeout
            .checked_sub(started.elapsed())
            .filter(|l| !l.is_zero())
        else {
            let events = String::from_utf8_lossy(&buf).trim_end().replace('\n', ", ");
            return Err(CgroupError::FreezeTimeout {
                dir: cgroup_dir.to_owned(),
                frozen,
                waited: timeout,
                events,
                hint: if frozen {
                    " (a process may be stuck in the kernel, e.g. on I/O; try again, or kill \
                     the container)"
                } else {
                    " (is a parent cgroup frozen? a cgroup stays frozen while its parent is)"
                },
            });
        };
        // Round up, so that the poll never wakes just short of the deadline.
        let ms = left.as_micros().div_ceil(1000);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => {}
            Ok(_) => match inotify.read_events() {
                Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(CgroupError::Inotify {
                        what: "cannot read the cgroup.events watch",
                        source: e.into(),
                        hint: "this is a bug in the agent",
                    })
                }
            },
            Err(e) => {
                return Err(CgroupError::Inotify {
                    what: "cannot wait on the cgroup.events watch",
                    source: e.into(),
                    hint: "this is a bug in the agent",
                })
            }
        }
    }
}

/// The processes in a cgroup (its cgroup.procs), sorted, each once.
pub fn pids(cgroup_dir: &Path) -> Result<Vec<u32>> {
    let dir = CgroupDir::open(cgroup_dir)?;
    let mut buf = Vec::with_capacity(CHUNK);
    if !dir.read(CGROUP_PROCS, &mut buf, Records::Many)? {
        return Err(CgroupError::Read {
            path: cgroup_dir.join(CGROUP_PROCS),
            source: io::Error::from(Errno::ENOENT),
        });
    }
    let text = dir.text(CGROUP_PROCS, &buf)?;
    let mut pids = text
        .lines()
        .map(|line| {
            line.trim()
                .parse::<u32>()
                .map_err(|_| dir.parse_error(CGROUP_PROCS, line, "not a pid"))
        })
        .collect::<Result<Vec<u32>>>()?;
    // A process moved out and back in may be listed twice.
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Watches containers' memory.events and tells which had a process OOM-killed.
///
/// It owns one non-blocking inotify instance and spawns nothing: the server awaits its
/// fd (`tokio::io::unix::AsyncFd`) and calls [`read_events`](Self::read_events) when
/// it is readable.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Inotify,
    containers: HashMap<String, Watched>,
    /// The containers each watch is for: two containers may share a cgroup.
    by_watch: HashMap<WatchDescriptor, Vec<String>>,
    /// OOM kills found by a call that then failed, reported by the next one.
    pending: Vec<String>,
}

#[derive(Debug)]
struct Watched {
    /// None once the kernel dropped the watch (the cgroup was removed).
    wd: Option<WatchDescriptor>,
    memory_events: PathBuf,
    oom_kills: u64,
}

/// What one read of nix's 4096-byte buffer holds at most: a watch on a file has no
/// name, so each event is a bare 16-byte `struct inotify_event`.
const EVENTS_PER_READ: usize = 4096 / std::mem::size_of::<nix::libc::inotify_event>();

impl OomWatcher {
    pub fn new() -> Result<OomWatcher> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
                CgroupError::Inotify {
                    what: "cannot create the OOM watcher's instance",
                    source: e.into(),
                    hint: "is the agent out of file descriptors or inotify instances?",
                }
            })?;
        Ok(OomWatcher {
            inotify,
            containers: HashMap::new(),
            by_watch: HashMap::new(),
            pending: Vec::new(),
        })
    }

    /// Watches a container's cgroup. Call it before the container's first process
    /// starts: OOM kills before the call are counted as already seen. Watching an id
    /// again replaces its earlier cgroup.
    pub fn watch(&mut self, container_id: &str, cgroup_dir: &Path) -> Result<()> {
        self.unwatch(container_id);
        let memory_events = cgroup_dir.join(MEMORY_EVENTS);
        let wd = self
            .inotify
            .add_watch(&memory_events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| CgroupError::Watch {
                dir: cgroup_dir.to_owned(),
                source: e.into(),
            })?;
        // Read once the watch is in place, so that no kill falls between the two.
        let mut buf = Vec::with_capacity(256);
        let oom_kills = match read_oom_kills(&memory_events, &mut buf) {
            Ok(Some(kills)) => kills,
            Ok(None) => 0,
            Err(e) => {
                self.drop_watch_if_unused(wd);
                return Err(e);
            }
        };
        self.by_watch
            .entry(wd)
            .or_default()
            .push(container_id.to_string());
        self.containers.insert(
            container_id.to_string(),
            Watched {
                wd: Some(wd),
                memory_events,
                oom_kills,
            },
        );
        Ok(())
    }

    /// Stops watching a container; false if it was not watched.
    pub fn unwatch(&mut self, container_id: &str) -> bool {
        let Some(watched) = self.containers.remove(container_id) else {
            return false;
        };
        self.pending.retain(|id| id != container_id);
        if let Some(wd) = watched.wd {
            if let Some(ids) = self.by_watch.get_mut(&wd) {
                ids.retain(|id| id != container_id);
            }
            self.drop_watch_if_unused(wd);
        }
        true
    }

    fn drop_watch_if_unused(&mut self, wd: WatchDescriptor) {
        if self.by_watch.get(&wd).is_some_and(|ids| !ids.is_empty()) {
            return;
        }
        self.by_watch.remove(&wd);
        // EINVAL: the kernel dropped it already (the cgroup is gone). Nothing else
        // can fail for a watch this instance made.
        let _ = self.inotify.rm_watch(wd);
    }

    /// The containers watched.
    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// Call when the fd is readable: reads the pending inotify events, re-reads the
    /// memory.events files they point at, and returns the containers whose `oom_kill`
    /// count grew since last seen, each once per call however much it grew.
    ///
    /// When it returns, the inotify queue was empty at its last read: the caller can
    /// clear its readiness (`AsyncFdReadyGuard::clear_ready`) without another read.
    /// If it fails, the kills it found are not lost: the next call returns them.
    pub fn read_events(&mut self) -> Result<Vec<String>> {
        let mut touched = BTreeSet::new();
        let mut dropped = Vec::new();
        let mut overflowed = false;
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(CgroupError::Inotify {
                        what: "cannot read the OOM watcher's events",
                        source: e.into(),
                        hint: "this is a bug in the agent",
                    })
                }
            };
            let read = events.len();
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    overflowed = true;
                } else if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    dropped.push(event.wd);
                } else {
                    touched.insert(event.wd);
                }
            }
            // A read that did not fill the buffer emptied the queue.
            if read < EVENTS_PER_READ {
                break;
            }
        }

        let mut check: Vec<String> = if overflowed {
            // Events were lost: look at every cgroup.
            self.containers.keys().cloned().collect()
        } else {
            touched
                .iter()
                .filter_map(|wd| self.by_watch.get(wd))
                .flatten()
                .cloned()
                .collect()
        };
        check.sort_unstable();

        let mut killed = std::mem::take(&mut self.pending);
        let mut first_error = None;
        let mut buf = Vec::with_capacity(256);
        for id in check {
            let Some(watched) = self.containers.get_mut(&id) else {
                continue;
            };
            match read_oom_kills(&watched.memory_events, &mut buf) {
                Ok(Some(kills)) => {
                    if kills > watched.oom_kills && !killed.contains(&id) {
                        killed.push(id);
                    }
                    watched.oom_kills = kills;
                }
                // The cgroup is gone (its removal drops the watch), or the file says
                // nothing of OOM kills: keep the count last seen.
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }

        // The kernel dropped these watches: their cgroups were removed. The events
        // before it were handled above.
        for wd in dropped {
            for id in self.by_watch.remove(&wd).unwrap_or_default() {
                if let Some(watched) = self.containers.get_mut(&id) {
                    watched.wd = None;
                }
            }
        }

        match first_error {
            None => Ok(killed),
            Some(e) => {
                self.pending = killed;
                Err(e)
            }
        }
    }
}

impl AsFd for OomWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

impl AsRawFd for OomWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

/// memory.events' `oom_kill`, or None if the file is gone or has no such line.
fn read_oom_kills(memory_events: &Path, buf: &mut Vec<u8>) -> Result<Option<u64>> {
    // Not opened: one file is read, by its full path.
    let dir = CgroupDir {
        fd: None,
        path: memory_events.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    if !dir.read(MEMORY_EVENTS, buf, Records::One)? {
        return Ok(None);
    }
    Ok(parse_memory_events(&dir, buf)?.oom_kill)
}

/// How much a file may hand over per read.
#[derive(Clone, Copy)]
enum Records {
    /// A flat file (stat, events, a single value): the kernel prints it as one
    /// record and a read with room to spare returns it whole, so a short read is the
    /// end and needs no second read to find out.
    One,
    /// A list (cgroup.procs): the kernel hands it over a page at a time; read to EOF.
    Many,
}

/// The first read's size, and the room added whenever a read fills the buffer.
const CHUNK: usize = 4096;

/// Reads `path` (relative to `dir`) into `buf`; false if it does not exist.
fn read_file(
    dir: BorrowedFd<'_>,
    path: &Path,
    buf: &mut Vec<u8>,
    records: Records,
) -> io::Result<bool> {
    buf.clear();
    let fd = match openat(dir, path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    loop {
        let start = buf.len();
        let room = (buf.capacity() - start).max(CHUNK);
        buf.resize(start + room, 0);
        let n = match nix::unistd::read(&fd, &mut buf[start..]) {
            Ok(n) => n,
            Err(Errno::EINTR) => {
                buf.truncate(start);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        buf.truncate(start + n);
        if n == 0 || (matches!(records, Records::One) && n < room) {
            return Ok(true);
        }
    }
}

/// An open cgroup directory: files are opened relative to it.
struct CgroupDir {
    /// None: `path` itself is not open (its files are opened by their full path).
    fd: Option<OwnedFd>,
    path: PathBuf,
}

impl CgroupDir {
    fn open(path: &Path) -> Result<CgroupDir> {
        let fd = open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupError::OpenDir {
            dir: path.to_owned(),
            source: e.into(),
        })?;
        Ok(CgroupDir {
            fd: Some(fd),
            path: path.to_owned(),
        })
    }

    fn dirfd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().map_or(AT_FDCWD, |fd| fd.as_fd())
    }

    /// Reads one of the cgroup's files into `buf`; false if it does not exist.
    fn read(&self, name: &str, buf: &mut Vec<u8>, records: Records) -> Result<bool> {
        let path = if self.fd.is_some() {
            PathBuf::from(name)
        } else {
            self.path.join(name)
        };
        read_file(self.dirfd(), &path, buf, records).map_err(|source| CgroupError::Read {
            path: self.path.join(name),
            source,
        })
    }

    /// A file holding one number or "max" (0); 0 if the file does not exist.
    fn single(&self, buf: &mut Vec<u8>, name: &str) -> Result<u64> {
        if !self.read(name, buf, Records::One)? {
            return Ok(0);
        }
        let text = self.text(name, buf)?.trim();
        if text == "max" {
            return Ok(0);
        }
        self.number(name, text, text)
    }

    fn write(&self, name: &'static str, value: &'static str) -> Result<()> {
        let error = |e: Errno| CgroupError::Write {
            path: self.path.join(name),
            value,
            source: e.into(),
            hint: match (name, e) {
                (CGROUP_FREEZE, Errno::ENOENT) => {
                    " (the root cgroup cannot be frozen, and kernels before 5.2 have no \
                     cgroup v2 freezer)"
                }
                _ => "",
            },
        };
        let fd = openat(
            self.dirfd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(error)?;
        loop {
            match nix::unistd::write(&fd, value.as_bytes()) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(error(e)),
            }
        }
    }

    /// cgroup.events' `frozen` (left in `buf`).
    fn frozen(&self, buf: &mut Vec<u8>) -> Result<bool> {
        if !self.read(CGROUP_EVENTS, buf, Records::One)? {
            return Err(CgroupError::Read {
                path: self.path.join(CGROUP_EVENTS),
                source: io::Error::from(Errno::ENOENT),
            });
        }
        let mut frozen = None;
        for (key, value) in self.keyed(CGROUP_EVENTS, buf)? {
            if key == "frozen" {
                frozen = Some(self.number(CGROUP_EVENTS, key, value)? != 0);
            }
        }
        frozen.ok_or_else(|| {
            self.parse_error(
                CGROUP_EVENTS,
                &String::from_utf8_lossy(buf),
                "no \"frozen\" line (kernels before 5.2 have no cgroup v2 freezer)",
            )
        })
    }

    fn text<'b>(&self, name: &str, buf: &'b [u8]) -> Result<&'b str> {
        std::str::from_utf8(buf)
            .map_err(|_| self.parse_error(name, &String::from_utf8_lossy(buf), "not UTF-8"))
    }

    /// The `key value` lines of a flat keyed file.
    fn keyed<'b>(&self, name: &str, buf: &'b [u8]) -> Result<Vec<(&'b str, &'b str)>> {
        self.text(name, buf)?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(key, value)| (key, value.trim()))
                    .ok_or_else(|| self.parse_error(name, line, "not a \"key value\" line"))
            })
            .collect()
    }

    fn number(&self, name: &str, key: &str, value: &str) -> Result<u64> {
        value.parse().map_err(|_| {
            let line = if key == value {
                value.to_string()
            } else {
                format!("{key} {value}")
            };
            self.parse_error(name, &line, "not a number")
        })
    }

    fn parse_error(&self, name: &str, line: &str, reason: &str) -> CgroupError {
        CgroupError::Parse {
            path: self.path.join(name),
            line: line.to_string(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    // File contents as a 6.1 kernel writes them (Documentation/admin-guide/cgroup-v2.rst
    // and a real container cgroup).
    const CPU_STAT_TEXT: &str = "usage_usec 73815\nuser_usec 47301\nsystem_usec 26514\n\
        core_sched.force_idle_usec 0\nnr_periods 120\nnr_throttled 7\nthrottled_usec 52000\n\
        nr_bursts 0\nburst_usec 0\n";
    const MEMORY_STAT_TEXT: &str = "anon 1060864\nfile 3878912\nkernel 1187840\n\
        kernel_stack 65536\npagetables 229376\nsec_pagetables 0\npercpu 0\nsock 0\n\
        vmalloc 0\nshmem 8192\nzswap 0\nzswapped 0\nfile_mapped 2433024\nfile_dirty 0\n\
        file_writeback 0\nswapcached 0\nanon_thp 0\nfile_thp 0\nshmem_thp 0\n\
        inactive_anon 1028096\nactive_anon 32768\ninactive_file 2433024\n\
        active_file 1445888\nunevictable 0\nslab_reclaimable 544232\n\
        slab_unreclaimable 281760\nslab 825992\nworkingset_refault_anon 0\n\
        workingset_refault_file 0\nworkingset_activate_anon 0\nworkingset_activate_file 0\n\
        workingset_restore_anon 0\nworkingset_restore_file 0\nworkingset_nodereclaim 0\n\
        pgscan 0\npgsteal 0\npgscan_kswapd 0\npgscan_direct 0\npgsteal_kswapd 0\n\
        pgsteal_direct 0\npgfault 3641\npgmajfault 40\npgrefill 0\npgactivate 0\n\
        pgdeactivate 0\npglazyfree 0\npglazyfreed 0\nthp_fault_alloc 0\n\
        thp_collapse_alloc 0\n";
    const MEMORY_EVENTS_TEXT: &str = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
    const IO_STAT_TEXT: &str = "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 \
        dbytes=0 dios=0\n8:0 rbytes=90430464 wbytes=299008000 rios=8950 wios=1252 \
        dbytes=50331648 dios=3021\n";

    fn cgroup(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            fs::write(dir.path().join(name), contents).unwrap();
        }
        dir
    }

    fn full_cgroup() -> tempfile::TempDir {
        cgroup(&[
            ("cpu.stat", CPU_STAT_TEXT),
            ("memory.current", "5025792\n"),
            ("memory.max", "268435456\n"),
            ("memory.stat", MEMORY_STAT_TEXT),
            ("memory.swap.current", "4096\n"),
            ("memory.events", MEMORY_EVENTS_TEXT),
            ("pids.current", "3\n"),
            ("pids.max", "1024\n"),
            ("io.stat", IO_STAT_TEXT),
        ])
    }

    #[test]
    fn reads_every_controller() {
        let dir = full_cgroup();
        let stats = read_stats(dir.path()).unwrap();
        assert_eq!(
            stats,
            CgroupStats {
                cpu: CpuStats {
                    usage_usec: 73815,
                    user_usec: 47301,
                    system_usec: 26514,
                    nr_periods: 120,
                    nr_throttled: 7,
                    throttled_usec: 52000,
                },
                memory: MemoryStats {
                    usage_bytes: 5025792,
                    limit_bytes: 268435456,
                    anon_bytes: 1060864,
                    file_bytes: 3878912,
                    kernel_bytes: 1187840,
                    shmem_bytes: 8192,
                    swap_usage_bytes: 4096,
                    pgfault: 3641,
                    pgmajfault: 40,
                    oom_events: 2,
                    oom_kill_events: 1,
                    inactive_file_bytes: 2433024,
                },
                pids: PidsStats {
                    current: 3,
                    limit: 1024,
                },
                io: vec![
                    IoStats {
                        major: 8,
                        minor: 16,
                        read_bytes: 1459200,
                        write_bytes: 314773504,
                        read_ios: 192,
                        write_ios: 353,
                    },
                    IoStats {
                        major: 8,
                        minor: 0,
                        read_bytes: 90430464,
                        write_bytes: 299008000,
                        read_ios: 8950,
                        write_ios: 1252,
                    },
                ],
            }
        );
    }

    #[test]
    fn max_means_unlimited() {
        let dir = full_cgroup();
        fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        fs::write(dir.path().join("pids.max"), "max\n").unwrap();
        let stats = read_stats(dir.path()).unwrap();
        assert_eq!(stats.memory.limit_bytes, 0);
        assert_eq!(stats.pids.limit, 0);
    }

    #[test]
    fn kernel_memory_on_kernels_without_the_kernel_line() {
        let dir = full_cgroup();
        let old: String = MEMORY_STAT_TEXT
            .lines()
            .filter(|l| !l.starts_with("kernel "))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(dir.path().join("memory.stat"), old).unwrap();
        let stats = read_stats(dir.path()).unwrap();
        assert_eq!(stats.memory.kernel_bytes, 65536 + 825992);
    }

    #[test]
    fn missing_controllers_give_zeros() {
        // A cgroup with only the core files and cpu.stat's core part: no cpu, memory,
        // pids or io controller enabled, no swap.
        let dir = cgroup(&[
            ("cgroup.procs", "12\n"),
            ("cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n"),
        ]);
        let stats = read_stats(dir.path()).unwrap();
        assert_eq!(
            stats,
            CgroupStats {
                cpu: CpuStats {
                    usage_usec: 10,
                    user_usec: 6,
                    system_usec: 4,
                    ..CpuStats::default()
                },
                ..CgroupStats::default()
            }
        );
        let empty = cgroup(&[]);
        assert_eq!(read_stats(empty.path()).unwrap(), CgroupStats::default());
    }

    #[test]
    fn a_missing_cgroup_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("kubepods/pod1/c1");
        let err = read_stats(&gone).unwrap_err();
        assert!(matches!(err, CgroupError::OpenDir { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("cgroup {}: cannot open it:", gone.display())),
            "{err}"
        );
        assert!(pids(&gone).is_err());
    }

    #[test]
    fn garbage_is_an_error_naming_the_file_and_line() {
        let dir = full_cgroup();
        fs::write(dir.path().join("memory.stat"), "anon lots\n").unwrap();
        let err = read_stats(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cgroup file {}: cannot parse \"anon lots\": not a number (is \
                 /sys/fs/cgroup a cgroup v2 file system?)",
                dir.path().join("memory.stat").display()
            )
        );
        let dir = full_cgroup();
        fs::write(dir.path().join("io.stat"), "8-0 rbytes=1\n").unwrap();
        let err = read_stats(dir.path()).unwrap_err();
        assert!(err.to_string().contains("MAJOR:MINOR"), "{err}");
    }

    #[test]
    fn a_file_longer_than_one_read_is_read_whole() {
        let dir = full_cgroup();
        let mut stat = "x 0\n".repeat(3000);
        stat.push_str("anon 77\n");
        fs::write(dir.path().join("memory.stat"), stat).unwrap();
        assert_eq!(read_stats(dir.path()).unwrap().memory.anon_bytes, 77);
    }

    #[test]
    fn lists_the_processes_sorted_once_each() {
        let procs: String = (0..2000).rev().map(|p| format!("{}\n", p + 100)).collect();
        let dir = cgroup(&[("cgroup.procs", &format!("{procs}150\n"))]);
        let pids = pids(dir.path()).unwrap();
        assert_eq!(pids, (100..2100).collect::<Vec<u32>>());
        let empty = cgroup(&[("cgroup.procs", "")]);
        assert_eq!(super::pids(empty.path()).unwrap(), Vec::<u32>::new());
    }

    /// Replaces a file's contents in one write, as the kernel's files change: never
    /// truncated first (which a watcher could see as an empty file). Pads with blank
    /// lines to a fixed length so that no old bytes are left behind.
    fn kernel_write(path: &Path, contents: &str) {
        use std::io::Write;
        const LEN: usize = 128;
        assert!(contents.len() <= LEN);
        let mut padded = contents.to_string();
        padded.extend(std::iter::repeat_n('\n', LEN - contents.len()));
        let mut file = fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all(padded.as_bytes()).unwrap();
    }

    fn set_oom_kills(dir: &Path, kills: u64) {
        kernel_write(
            &dir.join("memory.events"),
            &format!("low 0\nhigh 0\nmax 3\noom {kills}\noom_kill {kills}\noom_group_kill 0\n"),
        );
    }

    /// Waits for the watcher's fd to be readable, as the server's AsyncFd would.
    fn readable(watcher: &OomWatcher, within: Duration) -> bool {
        let mut fds = [PollFd::new(watcher.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(within.as_millis()).unwrap();
        poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0
    }

    #[test]
    fn oom_kills_are_reported_once_per_increase() {
        let a = cgroup(&[("memory.events", MEMORY_EVENTS_TEXT)]);
        let b = cgroup(&[("memory.events", MEMORY_EVENTS_TEXT)]);
        let mut watcher = OomWatcher::new().unwrap();
        watcher.watch("a", a.path()).unwrap();
        watcher.watch("b", b.path()).unwrap();
        assert_eq!(watcher.len(), 2);
        assert!(!readable(&watcher, Duration::from_millis(20)));
        // Nothing pending: an empty answer, not an error.
        assert_eq!(watcher.read_events().unwrap(), Vec::<String>::new());

        // The count already there when watching is not news.
        set_oom_kills(a.path(), 2);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), ["a"]);
        assert!(
            !readable(&watcher, Duration::from_millis(20)),
            "not drained"
        );

        // A change that is not a kill (oom without oom_kill), then the same count
        // written again: nothing to report.
        kernel_write(
            &a.path().join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 3\noom_kill 2\noom_group_kill 0\n",
        );
        set_oom_kills(a.path(), 2);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), Vec::<String>::new());

        // Both grow before the server gets round to reading: each reported once.
        set_oom_kills(b.path(), 5);
        set_oom_kills(a.path(), 3);
        set_oom_kills(a.path(), 4);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), ["a", "b"]);
        assert_eq!(watcher.read_events().unwrap(), Vec::<String>::new());

        // Unwatched: its kills are nobody's business any more.
        assert!(watcher.unwatch("b"));
        assert!(!watcher.unwatch("b"));
        set_oom_kills(b.path(), 6);
        set_oom_kills(a.path(), 5);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), ["a"]);
    }

    #[test]
    fn two_containers_on_one_cgroup_and_a_removed_cgroup() {
        let shared = cgroup(&[("memory.events", MEMORY_EVENTS_TEXT)]);
        let mut watcher = OomWatcher::new().unwrap();
        watcher.watch("x", shared.path()).unwrap();
        watcher.watch("y", shared.path()).unwrap();
        set_oom_kills(shared.path(), 2);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), ["x", "y"]);
        // Dropping one keeps the other's watch.
        watcher.unwatch("x");
        set_oom_kills(shared.path(), 3);
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), ["y"]);

        // The cgroup goes: the kernel drops the watch; nothing is reported, and
        // unwatching afterwards is harmless.
        let path = shared.path().to_owned();
        drop(shared);
        assert!(!path.exists());
        assert!(readable(&watcher, Duration::from_secs(5)));
        assert_eq!(watcher.read_events().unwrap(), Vec::<String>::new());
        assert!(watcher.unwatch("y"));
        assert!(watcher.is_empty());
    }

    #[test]
    fn watching_a_cgroup_without_memory_events_fails_clearly() {
        let dir = cgroup(&[]);
        let mut watcher = OomWatcher::new().unwrap();
        let err = watcher.watch("c", dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("memory controller enabled"),
            "{err}"
        );
        assert!(watcher.is_empty());
    }

    #[test]
    fn freezing_returns_once_the_kernel_says_frozen() {
        let dir = cgroup(&[
            ("cgroup.freeze", "0\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
        ]);
        let started = Instant::now();
        let events = dir.path().join("cgroup.events");
        let kernel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            kernel_write(&events, "populated 1\nfrozen 1\n");
        });
        freeze(dir.path(), true).unwrap();
        kernel.join().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "1\n",
            "the kernel ignores what follows the value; a tmpfs keeps it"
        );

        // Already in the state asked for: done at once.
        freeze(dir.path(), true).unwrap();
    }

    #[test]
    fn thawing_that_never_happens_times_out_with_the_state() {
        let dir = cgroup(&[
            ("cgroup.freeze", "1"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ]);
        let started = Instant::now();
        let err = freeze_with_timeout(dir.path(), false, Duration::from_millis(80)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(80));
        assert_eq!(
            err.to_string(),
            format!(
                "cgroup {}: not thawed after 80ms: cgroup.events says \"populated 1, frozen \
                 1\" (is a parent cgroup frozen? a cgroup stays frozen while its parent is)",
                dir.path().display()
            )
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "0"
        );
    }

    #[test]
    fn freezing_without_a_freezer_says_why() {
        let dir = cgroup(&[]);
        let err = freeze(dir.path(), true).unwrap_err();
        assert!(err.to_string().contains("cannot write \"1\""), "{err}");
        assert!(err.to_string().contains("root cgroup"), "{err}");
    }
}
