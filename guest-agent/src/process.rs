//! A process the agent started (a container's own, or an exec): its stdio ends
//! waiting for the host to attach, its exit, and the reaper that sees it.
//!
//! Stdio is pipes (or a terminal): the process writes into a pipe and the agent
//! copies the pipe to the host's vsock stream. A pipe, not the socket itself,
//! because programs open /dev/stdout, which fails on a socket; and because output
//! written before the host attaches must wait in the pipe rather than be lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use peapod_agent_protocol::StdioStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};
use tokio_vsock::VsockStream;

use crate::lock;

/// How long WaitProcess waits, after the exit, for the process's output to reach
/// the host. Only a child that outlives its parent and keeps the pipe open makes
/// it wait that long; the output keeps flowing after.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes moved per read: fewer, larger reads, since each is a costly kernel entry.
const PUMP_BUFFER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or 128 + the signal.
    pub status: i32,
    pub signal: i32,
    pub at: SystemTime,
}

impl ExitInfo {
    fn from_wait(status: WaitStatus) -> Option<(Pid, Self)> {
        let at = SystemTime::now();
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid,
                Self {
                    status: code,
                    signal: 0,
                    at,
                },
            )),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid,
                Self {
                    status: 128 + sig as i32,
                    signal: sig as i32,
                    at,
                },
            )),
            _ => None,
        }
    }
}

/// The fds a new process gets as 0-2; `None` leaves it to the terminal.
#[derive(Default)]
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The agent's ends, until the host attaches them.
#[derive(Default)]
struct HostEnds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

pub struct Process {
    /// "container" or "container/exec", for messages.
    pub name: String,
    pid: Mutex<Option<i32>>,
    exit: watch::Sender<Option<ExitInfo>>,
    ends: Mutex<HostEnds>,
    /// The terminal's master side, kept for resizes.
    tty: Mutex<Option<OwnedFd>>,
    /// Output streams attached and not yet at their end.
    pumping: watch::Sender<usize>,
    close_stdin: Notify,
}

impl Process {
    /// Pipes for the streams the host will attach; /dev/null for the others. With a
    /// terminal the process gets no pipes: its terminal arrives later
    /// ([`Process::set_terminal`]).
    pub fn new(
        name: String,
        stdio: &peapod_agent_protocol::Stdio,
    ) -> std::io::Result<(Arc<Self>, ChildStdio)> {
        let mut child = ChildStdio::default();
        let mut ends = HostEnds::default();
        if !stdio.terminal {
            let null = || -> std::io::Result<OwnedFd> {
                Ok(OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")?
                    .into())
            };
            if stdio.stdin {
                let (r, w) = nix::unistd::pipe()?;
                child.stdin = Some(r);
                ends.stdin = Some(w);
            } else {
                child.stdin = Some(null()?);
            }
            for (wanted, child_end, host_end) in [
                (stdio.stdout, &mut child.stdout, &mut ends.stdout),
                (stdio.stderr, &mut child.stderr, &mut ends.stderr),
            ] {
                if wanted {
                    let (r, w) = nix::unistd::pipe()?;
                    *child_end = Some(w);
                    *host_end = Some(r);
                } else {
                    *child_end = Some(null()?);
                }
            }
        }
        let process = Arc::new(Self {
            name,
            pid: Mutex::new(None),
            exit: watch::channel(None).0,
            ends: Mutex::new(ends),
            tty: Mutex::new(None),
            pumping: watch::channel(0).0,
            close_stdin: Notify::new(),
        });
        Ok((process, child))
    }

    /// The terminal's master: stdin and stdout both, and resizes.
    pub fn set_terminal(&self, master: OwnedFd) -> std::io::Result<()> {
        let mut ends = lock(&self.ends);
        ends.stdin = Some(master.try_clone()?);
        ends.stdout = Some(master.try_clone()?);
        *lock(&self.tty) = Some(master);
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        *lock(&self.pid)
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some() && self.exit_info().is_none()
    }

    /// Resolves when the process has exited and the output attached so far has
    /// reached the host (or [`OUTPUT_DRAIN_TIMEOUT`] has passed).
    pub async fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.subscribe();
        let info = loop {
            if let Some(info) = *exit.borrow_and_update() {
                break info;
            }
            // The sender lives as long as `self`.
            let _ = exit.changed().await;
        };
        let mut pumping = self.pumping.subscribe();
        let _ = tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, pumping.wait_for(|n| *n == 0)).await;
        info
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let tty = lock(&self.tty);
        let Some(master) = tty.as_ref() else {
            return Err(format!("process {}: has no terminal to resize", self.name));
        };
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one Winsize from the pointer, which outlives the
        // call; the fd is the terminal's master, owned by `tty`.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(master),
                libc::TIOCSWINSZ,
                &size,
            )
        };
        Errno::result(rc)
            .map(drop)
            .map_err(|e| format!("process {}: resizing its terminal: {e}", self.name))
    }

    /// Closes the process's stdin: now if the host never attached it, else once
    /// what the host sent so far is written.
    pub fn close_stdin(&self) {
        let unattached = lock(&self.ends).stdin.take();
        if unattached.is_none() {
            self.close_stdin.notify_one();
        }
    }

    /// Takes one of the process's streams for a host connection.
    pub fn take_end(&self, stream: StdioStream) -> Result<OwnedFd, String> {
        let mut ends = lock(&self.ends);
        let end = match stream {
            StdioStream::Stdin => ends.stdin.take(),
            StdioStream::Stdout => ends.stdout.take(),
            StdioStream::Stderr => ends.stderr.take(),
        };
        end.ok_or_else(|| {
            format!(
                "process {}: {stream} is already attached, was not asked for at creation, or is the terminal's (stderr)",
                self.name
            )
        })
    }

    /// Copies between a stream's end and the host's connection until one side ends.
    pub fn pump(
        self: &Arc<Self>,
        stream: StdioStream,
        end: OwnedFd,
        conn: VsockStream,
    ) -> Result<(), String> {
        let file = File::from(end);
        set_nonblocking(&file)
            .map_err(|e| format!("process {}: preparing {stream}: {e}", self.name))?;
        let this = self.clone();
        match stream {
            StdioStream::Stdin => {
                // A terminal is not a pipe; tokio's pipe type only needs a
                // non-blocking fd, and both are that.
                let writer = pipe::Sender::from_file_unchecked(file)
                    .map_err(|e| format!("process {}: stdin: {e}", self.name))?;
                tokio::spawn(async move { this.pump_stdin(conn, writer).await });
            }
            StdioStream::Stdout | StdioStream::Stderr => {
                let reader = pipe::Receiver::from_file_unchecked(file)
                    .map_err(|e| format!("process {}: {stream}: {e}", self.name))?;
                self.pumping.send_modify(|n| *n += 1);
                tokio::spawn(async move {
                    this.pump_output(reader, conn).await;
                    this.pumping.send_modify(|n| *n -= 1);
                });
            }
        }
        Ok(())
    }

    async fn pump_stdin(&self, conn: VsockStream, mut writer: pipe::Sender) {
        let mut conn = BufReader::with_capacity(PUMP_BUFFER, conn);
        let copy = tokio::io::copy_buf(&mut conn, &mut writer);
        tokio::select! {
            r = copy => if let Err(e) = r {
                log::debug!("process {}: stdin ended: {e}", self.name);
            },
            _ = self.close_stdin.notified() => {}
        }
        // Dropping the writer is the process's EOF.
    }

    async fn pump_output(&self, mut reader: pipe::Receiver, mut conn: VsockStream) {
        let mut buf = vec![0u8; PUMP_BUFFER];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = conn.write_all(&buf[..n]).await {
                        log::debug!("process {}: host stopped reading: {e}", self.name);
                        return;
                    }
                }
                // EIO: a terminal whose every slave has closed, its end of file.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => {
                    log::warn!("process {}: reading its output: {e}", self.name);
                    break;
                }
            }
        }
        let _ = conn.shutdown(std::net::Shutdown::Write);
    }
}

/// Exit statuses, delivered to the processes they belong to. Children that are not
/// the agent's (orphans the kernel reparents to PID 1) are reaped and forgotten.
///
/// libcontainer waits for its own helper process while it creates a container; the
/// reaper must not take that child's status, so it reaps only while holding
/// `spawning`, which creation holds too.
#[derive(Default)]
pub struct Reaper {
    pub spawning: tokio::sync::Mutex<()>,
    table: Mutex<HashMap<i32, Arc<Process>>>,
}

impl Reaper {
    /// Records a new process's pid; call with `spawning` held, so that its exit
    /// cannot have been reaped yet.
    pub fn register(&self, pid: i32, process: &Arc<Process>) {
        *lock(&process.pid) = Some(pid);
        lock(&self.table).insert(pid, process.clone());
    }

    /// Reaps every child that has exited. Runs on SIGCHLD.
    pub async fn reap(&self) {
        let _guard = self.spawning.lock().await;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => self.deliver(status),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log::warn!("reaping children: {e}");
                    break;
                }
            }
        }
    }

    fn deliver(&self, status: WaitStatus) {
        let Some((pid, info)) = ExitInfo::from_wait(status) else {
            return;
        };
        if let Some(process) = lock(&self.table).remove(&pid.as_raw()) {
            log::debug!(
                "process {} (pid {pid}) exited: {}",
                process.name,
                info.status
            );
            process.exit.send_replace(Some(info));
        }
    }

    /// Serves SIGCHLD forever.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot watch SIGCHLD, exits will go unnoticed: {e}");
                return;
            }
        };
        loop {
            self.reap().await;
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}

fn set_nonblocking(f: &impl AsFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL)?);
    fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdio(stdin: bool, stdout: bool, stderr: bool) -> peapod_agent_protocol::Stdio {
        peapod_agent_protocol::Stdio {
            stdin,
            stdout,
            stderr,
            ..Default::default()
        }
    }

    #[test]
    fn streams_not_asked_for_are_dev_null() {
        let (p, child) = Process::new("c".into(), &stdio(false, true, false)).unwrap();
        assert!(child.stdin.is_some() && child.stdout.is_some() && child.stderr.is_some());
        let ends = lock(&p.ends);
        assert!(ends.stdin.is_none() && ends.stdout.is_some() && ends.stderr.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_reports_the_exit_once_output_is_done() {
        let (p, _child) = Process::new("c".into(), &stdio(false, false, false)).unwrap();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let info = ExitInfo::from_wait(WaitStatus::Signaled(
            Pid::from_raw(5),
            nix::sys::signal::Signal::SIGKILL,
            false,
        ))
        .unwrap()
        .1;
        p.exit.send_replace(Some(info));
        let got = waiter.await.unwrap();
        assert_eq!((got.status, got.signal), (137, 9));
    }

    // The waitpid loop itself is exercised by the VM tests: waitpid(-1) here would
    // steal the exits of other tests' children.
    #[tokio::test(flavor = "current_thread")]
    async fn exits_reach_their_process_and_strangers_are_ignored() {
        let reaper = Reaper::default();
        let (p, _child) = Process::new("c".into(), &stdio(false, false, false)).unwrap();
        reaper.register(4242, &p);
        assert!(p.is_running());
        reaper.deliver(WaitStatus::Exited(Pid::from_raw(777), 1));
        assert!(p.is_running());
        reaper.deliver(WaitStatus::Exited(Pid::from_raw(4242), 7));
        let info = p.wait().await;
        assert_eq!((info.status, info.signal), (7, 0));
        assert!(!p.is_running());
        assert!(lock(&reaper.table).is_empty());
    }
}
