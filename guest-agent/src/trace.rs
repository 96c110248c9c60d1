//! `peapod.strace=<path>` on the kernel command line: the agent runs strace on
//! itself (`-f -c`, following every process it starts) from boot until
//! DestroySandbox, and logs strace's table of system calls. On this kind of host a
//! guest system call costs about a thousand times its native price, so the count is
//! what the container-start benchmark reports. The guest must carry strace
//! (`rootfs/build-test.sh --with-strace`); the product initramfs does not.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const SUMMARY: &str = "/run/peapod/strace.txt";
/// strace writes its table when it detaches, which takes a while per traced thread.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the agent waits for strace to attach before it serves.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

fn traced() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(false)
}

pub struct SyscallTrace {
    pid: Pid,
    summary: PathBuf,
}

impl SyscallTrace {
    /// Starts strace on PID 1 if the command line asks for it.
    pub fn from_cmdline(cmdline: &str) -> Option<Self> {
        let strace = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peapod.strace="))?;
        let _ = std::fs::create_dir_all("/run/peapod");
        match Command::new(strace)
            .args(["-f", "-c", "-q", "-p", "1", "-o", SUMMARY])
            .spawn()
        {
            Ok(child) => {
                // strace takes seconds to start here; count from its first moment.
                let deadline = Instant::now() + ATTACH_TIMEOUT;
                while !traced() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                log::info!("strace {strace} counts the agent's system calls");
                Some(Self {
                    pid: Pid::from_raw(child.id() as i32),
                    summary: PathBuf::from(SUMMARY),
                })
            }
            Err(e) => {
                log::warn!("peapod.strace={strace}: {e}");
                None
            }
        }
    }

    /// Stops strace and logs its table, one record per line (target `strace`).
    pub async fn finish(&self) {
        if let Err(e) = kill(self.pid, Signal::SIGINT) {
            log::warn!("strace: {e}");
            return;
        }
        // The reaper reaps strace; it is gone once signal 0 finds nothing.
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while kill(self.pid, None).is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match std::fs::read_to_string(&self.summary) {
            Ok(table) => {
                for line in table.lines() {
                    log::info!(target: "strace", "{line}");
                }
            }
            Err(e) => log::warn!("strace: {}: {e}", self.summary.display()),
        }
    }
}
