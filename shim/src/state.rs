//! What the shim writes to disk so that `delete` can clean up a task from its bundle
//! alone (after a shim crash, with no VM and no agent), and so that a pod's files are
//! all in one directory.
//!
//! ```text
//! <bundle>/peapod.json            which pod the task belongs to, and its work dir
//! <state_dir>/<pod>/vmm.pid       the VMM's pid and start time (to kill only it)
//! <state_dir>/<pod>/network.json  the namespace, veth and tap of the pod's network
//! <state_dir>/<pod>/api.sock, vsock.sock, vmm.log, console.log
//! <state_dir>/<pod>/containers/<id>/   a container's upper disk and private images
//! ```

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const BUNDLE_FILE: &str = "peapod.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRecord {
    /// The pod's state directory.
    pub pod_dir: PathBuf,
    /// The container's directory (upper disk and its private images).
    pub work_dir: PathBuf,
    /// Whether this task is the pod's sandbox (deleting it ends the VM).
    pub sandbox: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    pub veth: String,
    pub tap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmmRecord {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: a recycled pid has another.
    pub start_time: u64,
}

/// Writes `value` as JSON to `path` atomically (a crash leaves the old file or none).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(value)?)?;
    std::fs::rename(&tmp, path)
}

/// Reads a JSON record; a missing file is `None`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Process start time (clock ticks since boot), or None if the process is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the recorded VMM if that very process still runs, and waits for it to go.
pub fn kill_vmm(pod_dir: &Path) -> io::Result<()> {
    let Some(rec) = read_json::<VmmRecord>(&pod_dir.join("vmm.pid"))? else {
        return Ok(());
    };
    if start_time(rec.pid) != Some(rec.start_time) {
        return Ok(());
    }
    // SAFETY: kill(2) on a pid whose start time matches the VMM we started.
    unsafe { libc::kill(rec.pid as i32, libc::SIGKILL) };
    for _ in 0..200 {
        if start_time(rec.pid) != Some(rec.start_time) {
            return Ok(());
        }
        // A zombie keeps its stat until its parent reaps it; that is gone enough.
        if std::fs::read_to_string(format!("/proc/{}/stat", rec.pid)).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        }) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("VMM {} did not exit after SIGKILL", rec.pid),
    ))
}

/// Removes a directory tree; a missing one is fine.
pub fn remove_dir(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn pod_dir(state_dir: &Path, namespace: &str, sandbox_id: &str) -> PathBuf {
    state_dir.join(format!("{namespace}-{sandbox_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(BUNDLE_FILE);
        assert_eq!(read_json::<TaskRecord>(&p).unwrap(), None);
        let r = TaskRecord {
            pod_dir: "/run/peapod/pods/x".into(),
            work_dir: "/run/peapod/pods/x/containers/c".into(),
            sandbox: true,
        };
        write_json(&p, &r).unwrap();
        assert_eq!(read_json::<TaskRecord>(&p).unwrap(), Some(r));
    }

    #[test]
    fn a_process_start_time_is_read_and_a_gone_one_is_none() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX - 1), None);
    }

    #[test]
    fn kill_vmm_leaves_a_recycled_pid_alone() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let rec = VmmRecord {
            pid: me,
            start_time: start_time(me).unwrap() + 1,
        };
        write_json(&dir.path().join("vmm.pid"), &rec).unwrap();
        kill_vmm(dir.path()).unwrap();
        // Still here.
        kill_vmm(&dir.path().join("none")).unwrap();
    }
}
