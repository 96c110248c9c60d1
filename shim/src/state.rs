//! What the shim writes to disk so that `delete` can clean up a task from its bundle
//! alone (after a shim crash, with no VM and no agent), and so that a pod's files are
//! in two directories: its small runtime state under `state_dir` (a tmpfs on most
//! nodes), and its data under `data_dir` (the node's disk).
//!
//! ```text
//! <bundle>/peapod.json            which pod the task belongs to, its work dir and upper disk
//! <state_dir>/<pod>/vmm.pid       the VMM's pid and start time (to kill only it)
//! <state_dir>/<pod>/network.json  the namespace, veth and tap of the pod's network
//! <state_dir>/<pod>/cgroup.json   the VMM's cgroup directories, one per hierarchy
//! <state_dir>/<pod>/vmm.log        the VMM's log (its stdout and stderr)
//! <state_dir>/<pod>/vm/           the VMM's own: api.sock, vsock.sock, console.log
//!                                 (the only host directory a jailed VMM sees)
//! <state_dir>/<pod>/jail/         an empty mount point: the jail's root, a tmpfs in
//!                                 the VMM's mount namespace
//! <state_dir>/<pod>/data.json     the pod's directory under data_dir
//! <data_dir>/<pod>/<id>/          a container's private images, and its upper disk
//!                                 when its snapshot has no upperdir (`rootfs.rs`)
//! ```
//!
//! The names the shim writes are the constants below ([`BUNDLE_FILE`],
//! [`VMM_RECORD`], [`NETWORK_RECORD`], [`CGROUP_RECORD`], [`DATA_RECORD`]); the
//! VMM's own (`vmm.log`, `vm/`, `jail/`) are in `VmPaths::in_dir` (`vmm.rs`).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// In the bundle: the task's [`TaskRecord`].
pub const BUNDLE_FILE: &str = "peapod.json";
/// In the pod's directory: the VMM's [`VmmRecord`].
pub const VMM_RECORD: &str = "vmm.pid";
/// In the pod's directory: the pod's [`NetworkRecord`] (absent without a network).
pub const NETWORK_RECORD: &str = "network.json";
/// In the pod's directory: the VMM's cgroup directories (`cgroup::VmmCgroup`; absent
/// when the sandbox's spec names no cgroupsPath).
pub const CGROUP_RECORD: &str = "cgroup.json";
/// In the pod's directory: its directory under `data_dir` ([`DataRecord`]).
pub const DATA_RECORD: &str = "data.json";

/// A container's directory in its pod's data directory: its private images (and its
/// upper disk when the snapshot has no upperdir).
pub fn container_dir(pod_data_dir: &Path, id: &str) -> PathBuf {
    pod_data_dir.join(id)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRecord {
    /// The pod's state directory.
    pub pod_dir: PathBuf,
    #[serde(flatten)]
    pub files: ContainerFiles,
    /// Whether this task is the pod's sandbox (deleting it ends the VM).
    pub sandbox: bool,
}

/// A container's files on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerFiles {
    /// The container's directory under the pod's data directory.
    pub work_dir: PathBuf,
    /// The container's upper disk, which may be outside `work_dir` (in its
    /// snapshot's upperdir). Absent in records of shims before it was recorded.
    #[serde(default)]
    pub upper: Option<PathBuf>,
}

impl ContainerFiles {
    /// Removes them; missing ones are fine.
    pub fn remove(&self) -> io::Result<()> {
        if let Some(upper) = &self.upper {
            remove_file(upper)?;
        }
        remove_dir(&self.work_dir)
    }
}

/// Where the pod's data is (`<data_dir>/<pod>`), so that the pod's state directory
/// alone finds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataRecord {
    pub dir: PathBuf,
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
    match read_json::<VmmRecord>(&pod_dir.join(VMM_RECORD))? {
        Some(rec) => kill_recorded(&rec),
        None => Ok(()),
    }
}

/// Kills the VMM `rec` names if that very process still runs, and waits for it to go.
pub fn kill_recorded(rec: &VmmRecord) -> io::Result<()> {
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

/// Removes a file; a missing one is fine.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `path` is on a tmpfs (whose files take the node's RAM); false if it cannot
/// be told.
pub fn is_on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string and fs a statfs the call may write.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut fs) };
    rc == 0 && fs.f_type == libc::TMPFS_MAGIC
}

/// How much of the sandbox id a pod directory's name shows (as `crictl pods` does).
const POD_DIR_ID_CHARS: usize = 12;

/// The pod's directory: `<state_dir>/<first 12 characters of the sandbox id>-<hash>`,
/// the hash (16 hex digits of SHA-256) over the namespace and the whole id. The name is
/// short on purpose: the VMM's vsock socket lives in it, and a unix socket path holds
/// at most 107 bytes, including the `_<port>` suffix of guest-to-host connections. CRI's
/// 64-character sandbox ids in `<namespace>-<id>` did not fit.
pub fn pod_dir(state_dir: &Path, namespace: &str, sandbox_id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{namespace}/{sandbox_id}"));
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let shown: String = sandbox_id.chars().take(POD_DIR_ID_CHARS).collect();
    state_dir.join(format!("{shown}-{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_are_short_and_distinct() {
        let state = Path::new("/run/peapod/pods");
        let id = "db5da90ded3dead3366bfb8fc51f7b61f738a801388f813f1022dc1cd9f0ec1b";
        let dir = pod_dir(state, "k8s.io", id);
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("db5da90ded3d-"), "{name}");
        assert_eq!(name.len(), POD_DIR_ID_CHARS + 1 + 16);
        // The vsock socket and a guest-to-host port's socket fit in sockaddr_un.
        let longest = dir.join("vm/vsock.sock_4294967295");
        assert!(longest.as_os_str().len() <= 107, "{}", longest.display());
        assert_eq!(
            dir,
            pod_dir(state, "k8s.io", id),
            "the same pod, the same dir"
        );
        assert_ne!(
            dir,
            pod_dir(state, "other", id),
            "namespaces keep pods apart"
        );
        let same_prefix = format!("{}0", &id[..63]);
        assert_ne!(dir, pod_dir(state, "k8s.io", &same_prefix));
        assert_eq!(
            pod_dir(state, "ns", "p1").file_name().unwrap().len(),
            2 + 1 + 16,
            "a short id is shown whole"
        );
    }

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(BUNDLE_FILE);
        assert_eq!(read_json::<TaskRecord>(&p).unwrap(), None);
        let r = TaskRecord {
            pod_dir: "/run/peapod/pods/x".into(),
            files: ContainerFiles {
                work_dir: "/var/lib/peapod/pods/x/c".into(),
                upper: Some("/var/lib/containerd/snapshots/4/fs/.peapod-upper.ext4".into()),
            },
            sandbox: true,
        };
        write_json(&p, &r).unwrap();
        assert_eq!(read_json::<TaskRecord>(&p).unwrap(), Some(r));
        // A record written before `upper` was recorded still reads.
        std::fs::write(&p, r#"{"pod_dir":"/p","work_dir":"/w","sandbox":false}"#).unwrap();
        let old = read_json::<TaskRecord>(&p).unwrap().unwrap();
        assert_eq!(old.files.work_dir, PathBuf::from("/w"));
        assert_eq!(old.files.upper, None);
    }

    #[test]
    fn tmpfs_is_told_apart() {
        assert!(is_on_tmpfs(Path::new("/dev/shm")));
        assert!(!is_on_tmpfs(Path::new("/proc")));
        assert!(!is_on_tmpfs(Path::new("/nonexistent/peapod")));
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
        write_json(&dir.path().join(VMM_RECORD), &rec).unwrap();
        kill_vmm(dir.path()).unwrap();
        // Still here.
        kill_vmm(&dir.path().join("none")).unwrap();
    }
}
