//! A container in the guest: its storage, its bundle, libcontainer's handle, and
//! the processes running in it.
//!
//! Everything here that calls into libcontainer blocks (it forks, waits on pipes,
//! writes state files), so the server runs it on tokio's blocking pool.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use peapod_agent_protocol as proto;

use crate::devices::{self, DevicesError};
use crate::lock;
use crate::process::{ChildStdio, Process, Reaper};
use crate::sandbox;
use crate::seccomp::ExecSeccomp;
use crate::spec::{self, GuestContext, SpecError};
use crate::storage::{self, ContainerRootfs};

/// Where the agent keeps its containers: bundles, mount points, console sockets.
pub const CONTAINERS_DIR: &str = "/run/peapod/containers";
/// libcontainer's own state (state.json, notify sockets).
pub const RUNTIME_DIR: &str = "/run/peapod/runtime";
/// The sockets through which libcontainer hands over new terminals, one a process
/// being created.
const CONSOLE_DIR: &str = "/run/peapod/tty";
/// The cgroup2 root, and the subtree the agent's containers live in.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_PARENT: &str = "peapod";
/// How long a removed container's processes get to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the host's disks get to appear after CreateContainer names them.
const DISK_TIMEOUT: Duration = storage::DEFAULT_DISK_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0}: no such container (create it first, or it was removed)")]
    NotFound(String),
    #[error("container {0}: already exists (remove it first, or use another id)")]
    Exists(String),
    #[error("container {id}: exec {exec_id}: no such process")]
    NoExec { id: String, exec_id: String },
    #[error("container {id}: exec {exec_id}: already exists and has not exited")]
    ExecExists { id: String, exec_id: String },
    #[error("container {id}: exec {exec_id}: still running (kill it and wait for it first)")]
    ExecRunning { id: String, exec_id: String },
    #[error("container {id}: invalid id {id:?}: use letters, digits, '-', '_' and '.', at most 64, not starting with '.'")]
    BadId { id: String },
    #[error("container {0}: is not running (it has exited or was never started)")]
    NotRunning(String),
    #[error("container {0}: already started")]
    AlreadyStarted(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("container {id}: storage: {cause}")]
    Storage { id: String, cause: String },
    #[error("container {id}: {step}: {cause}")]
    Runtime {
        id: String,
        step: &'static str,
        cause: String,
    },
}

impl ContainerError {
    fn runtime(id: &str, step: &'static str, cause: impl ToString) -> Self {
        Self::Runtime {
            id: id.to_owned(),
            step,
            cause: cause.to_string(),
        }
    }
}

pub struct Container {
    pub id: String,
    /// The bundle: config.json, the rootfs mount points, console sockets.
    pub dir: PathBuf,
    pub cgroup_dir: PathBuf,
    pub rootfs: PathBuf,
    pub sandbox: bool,
    pub init: Arc<Process>,
    /// The spec's seccomp profile, which libcontainer does not give execs.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    storage: Mutex<Option<ContainerRootfs>>,
    handle: Mutex<libcontainer::container::Container>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

/// What CreateContainer asks for, decoded.
pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub oci_spec: &'a [u8],
    pub rootfs: &'a proto::Rootfs,
    pub stdio: &'a proto::Stdio,
    pub sandbox: bool,
}

impl Container {
    /// Mounts the container's storage, writes its bundle and creates it; its
    /// process waits for [`Container::start`]. On failure nothing is left behind.
    pub fn create(
        req: &CreateRequest,
        reaper: &Reaper,
        sandbox_pid: Option<i32>,
    ) -> Result<Arc<Self>, ContainerError> {
        let id = req.id;
        check_id(id)?;
        let dir = Path::new(CONTAINERS_DIR).join(id);
        if dir.exists() {
            return Err(ContainerError::Exists(id.into()));
        }
        fs::create_dir_all(&dir)
            .map_err(|e| ContainerError::runtime(id, "creating its directory", e))?;
        let storage = match mount_rootfs(id, &dir, req.rootfs) {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let rootfs = storage.rootfs_path().to_path_buf();
        let cgroup_path = format!("/{CGROUP_PARENT}/{id}");
        let built = (|| {
            let spec = spec::guest_spec(
                req.oci_spec,
                &GuestContext {
                    container_id: id,
                    rootfs: &rootfs,
                    cgroup_path: &cgroup_path,
                    terminal: req.stdio.terminal,
                    sandbox_pid,
                },
            )?;
            // The pod's network is the guest's: its sysctls are set there, before the
            // container runs, as runc sets them in the pod's namespace.
            sandbox::apply_sysctls(Path::new(sandbox::SYSCTL_ROOT), &spec.network_sysctls)
                .map_err(|e| ContainerError::runtime(id, "setting its network sysctls", e))?;
            let device_rules = devices::container_rules(id, &spec.device_rules)?;
            write_json(&dir.join("config.json"), &spec.json)
                .map_err(|e| ContainerError::runtime(id, "writing config.json", e))?;
            let (init, child) = Process::new(id.to_owned(), req.stdio)
                .map_err(|e| ContainerError::runtime(id, "making its stdio pipes", e))?;
            let builder = builder(id, child)?;
            let (builder, console) = with_console(builder, req.stdio.terminal, id)?;
            let spawning = reaper.spawning.blocking_lock();
            let built = builder
                .as_init(&dir)
                .with_systemd(false)
                .with_detach(true)
                .build();
            // The process waits in its cgroup for StartContainer: the device rules are
            // in place before anything of the image runs.
            let cgroup_dir = Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(id);
            let handle = built
                .map_err(|e| ContainerError::runtime(id, "creating the container", e))
                .and_then(|mut handle| {
                    match devices::apply(id, &cgroup_dir, &device_rules) {
                        Ok(()) => Ok(handle),
                        Err(e) => {
                            // Killed and reaped as a process the reaper does not know.
                            let _ = handle.delete(true);
                            Err(e.into())
                        }
                    }
                });
            let forget = |console: Option<ConsoleSocket>| {
                if let Some(c) = console {
                    c.abandon();
                }
                let _ = fs::remove_dir_all(Path::new(RUNTIME_DIR).join(id));
                let _ = fs::remove_dir(&cgroup_dir);
            };
            let mut handle = match handle {
                Ok(h) => h,
                Err(e) => {
                    drop(spawning);
                    forget(console);
                    return Err(e);
                }
            };
            let pid = handle.pid();
            if let Some(pid) = pid {
                reaper.register(pid.as_raw(), &init);
            }
            drop(spawning);
            let finished = match (pid, console) {
                (None, console) => {
                    forget(console);
                    Err(ContainerError::runtime(
                        id,
                        "creating the container",
                        "libcontainer reported no pid",
                    ))
                }
                (Some(_), Some(c)) => c.receive(id).and_then(|terminal| {
                    init.set_terminal(terminal)
                        .map_err(|e| ContainerError::runtime(id, "keeping its terminal", e))
                }),
                (Some(_), None) => Ok(()),
            };
            if let Err(e) = finished {
                // The process waits for a start that will not come: killed (the reaper
                // reaps it), with its state and cgroup.
                let _ = handle.delete(true);
                forget(None);
                return Err(e);
            }
            Ok((init, handle, spec.seccomp))
        })();
        let (init, handle, seccomp) = match built {
            Ok(v) => v,
            Err(e) => {
                let mut storage = storage;
                if let Err(e) = storage.teardown() {
                    log::warn!("container {id}: {e}");
                }
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Arc::new(Self {
            id: id.to_owned(),
            dir,
            cgroup_dir: Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(id),
            rootfs,
            sandbox: req.sandbox,
            init,
            seccomp,
            storage: Mutex::new(Some(storage)),
            handle: Mutex::new(handle),
            execs: Mutex::new(HashMap::new()),
        }))
    }

    /// Runs the container's process (it was waiting since create).
    pub fn start(&self) -> Result<i32, ContainerError> {
        let mut handle = lock(&self.handle);
        if !handle.can_start() {
            return Err(ContainerError::AlreadyStarted(self.id.clone()));
        }
        handle
            .start()
            .map_err(|e| ContainerError::runtime(&self.id, "starting its process", e))?;
        Ok(self.init.pid().unwrap_or(0))
    }

    /// Starts another process in the running container.
    pub fn exec(
        &self,
        exec_id: &str,
        oci_process: &[u8],
        stdio: &proto::Stdio,
        reaper: &Reaper,
    ) -> Result<i32, ContainerError> {
        let id = &self.id;
        check_id(exec_id).map_err(|_| ContainerError::BadId {
            id: format!("{id}/{exec_id}"),
        })?;
        if !self.init.is_running() {
            return Err(ContainerError::NotRunning(id.clone()));
        }
        // containerd frees an exec's id when it deletes the exec, which the agent does
        // not hear of: an id whose process has exited may be used again.
        if lock(&self.execs)
            .get(exec_id)
            .is_some_and(|p| p.exit_info().is_none())
        {
            return Err(ContainerError::ExecExists {
                id: id.clone(),
                exec_id: exec_id.into(),
            });
        }
        let process = spec::guest_process(oci_process, id, &self.rootfs, stdio.terminal)?;
        let process_file = self.dir.join(format!("exec-{exec_id}.json"));
        write_json(&process_file, &process)
            .map_err(|e| ContainerError::runtime(id, "writing the exec's process.json", e))?;
        let result = (|| {
            let (proc, child) = Process::new(format!("{id}/{exec_id}"), stdio)
                .map_err(|e| ContainerError::runtime(id, "making the exec's stdio pipes", e))?;
            let builder = builder(id, child)?.with_executor(ExecSeccomp {
                profile: self.seccomp.clone(),
            });
            let (builder, console) = with_console(builder, stdio.terminal, id)?;
            let spawning = reaper.spawning.blocking_lock();
            let built = builder
                .as_tenant()
                .with_process(Some(&process_file))
                .with_detach(true)
                .build();
            let pid = match built {
                Ok(pid) => pid,
                Err(e) => {
                    drop(spawning);
                    if let Some(c) = console {
                        c.abandon();
                    }
                    return Err(ContainerError::runtime(id, "starting the exec", e));
                }
            };
            reaper.register(pid.as_raw(), &proc);
            drop(spawning);
            if let Some(c) = console {
                proc.set_terminal(c.receive(id)?)
                    .map_err(|e| ContainerError::runtime(id, "keeping the exec's terminal", e))?;
            }
            lock(&self.execs).insert(exec_id.to_owned(), proc);
            Ok(pid.as_raw())
        })();
        let _ = fs::remove_file(&process_file);
        result
    }

    /// Forgets exec `exec_id`, which must have exited.
    pub fn forget_exec(&self, exec_id: &str) -> Result<(), ContainerError> {
        let mut execs = lock(&self.execs);
        match execs.get(exec_id) {
            None => Err(ContainerError::NoExec {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            }),
            Some(p) if p.exit_info().is_none() => Err(ContainerError::ExecRunning {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            }),
            Some(_) => {
                execs.remove(exec_id);
                Ok(())
            }
        }
    }

    /// How many processes the container keeps records of: its own and its execs.
    pub fn process_count(&self) -> usize {
        1 + lock(&self.execs).len()
    }

    /// The container's own process (`exec_id` empty) or one of its execs.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::NoExec {
                id: self.id.clone(),
                exec_id: exec_id.into(),
            })
    }

    pub fn signal(&self, exec_id: &str, signal: i32, all: bool) -> Result<(), ContainerError> {
        let sig = Signal::try_from(signal).map_err(|e| {
            ContainerError::runtime(&self.id, "signalling", format!("signal {signal}: {e}"))
        })?;
        if all && exec_id.is_empty() {
            for pid in crate::cgroups::pids(&self.cgroup_dir).unwrap_or_default() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        let process = self.process(exec_id)?;
        let pid = match (process.pid(), process.is_running()) {
            (Some(pid), true) => pid,
            _ => {
                return Err(ContainerError::NotRunning(process.name.clone()));
            }
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| {
            ContainerError::runtime(
                &self.id,
                "signalling",
                format!("{} (pid {pid}): {e}", process.name),
            )
        })
    }

    /// Kills what is left of the container and takes its storage and state away.
    pub async fn remove(self: Arc<Self>) -> Result<(), ContainerError> {
        if self.init.is_running() {
            let _ = self.signal("", libc::SIGKILL, true);
            let _ = self.signal("", libc::SIGKILL, false);
            if tokio::time::timeout(KILL_TIMEOUT, self.init.wait())
                .await
                .is_err()
            {
                log::warn!(
                    "container {}: still running {KILL_TIMEOUT:?} after SIGKILL",
                    self.id
                );
            }
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.tear_down())
            .await
            .map_err(|e| ContainerError::runtime(&self.id, "removing", e))?
    }

    fn tear_down(&self) -> Result<(), ContainerError> {
        let mut first_error = None;
        if let Err(e) = lock(&self.handle).delete(true) {
            log::warn!("container {}: libcontainer delete: {e}", self.id);
            first_error.get_or_insert(ContainerError::runtime(&self.id, "deleting its state", e));
            let _ = fs::remove_dir_all(Path::new(RUNTIME_DIR).join(&self.id));
            let _ = fs::remove_dir(&self.cgroup_dir);
        }
        if let Some(mut storage) = lock(&self.storage).take() {
            if let Err(e) = storage.teardown() {
                first_error.get_or_insert(ContainerError::Storage {
                    id: self.id.clone(),
                    cause: e.to_string(),
                });
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            first_error.get_or_insert(ContainerError::runtime(
                &self.id,
                "removing its directory",
                e,
            ));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Applies new cgroup limits (UpdateContainerResources).
    pub fn update(
        &self,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), ContainerError> {
        use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: Path::new("/").join(CGROUP_PARENT).join(&self.id),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| ContainerError::runtime(&self.id, "opening its cgroup", e))?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| ContainerError::runtime(&self.id, "updating its resources", e))
    }

    /// Pauses (freezes) or resumes every process of the container.
    pub fn freeze(&self, frozen: bool) -> Result<(), ContainerError> {
        let step = if frozen { "pausing" } else { "resuming" };
        crate::cgroups::freeze(&self.cgroup_dir, frozen)
            .map_err(|e| ContainerError::runtime(&self.id, step, e))
    }

    pub fn stats(&self) -> Result<crate::cgroups::CgroupStats, ContainerError> {
        crate::cgroups::read_stats(&self.cgroup_dir)
            .map_err(|e| ContainerError::runtime(&self.id, "reading its cgroup's statistics", e))
    }

    pub fn pids(&self) -> Vec<u32> {
        crate::cgroups::pids(&self.cgroup_dir).unwrap_or_default()
    }
}

fn mount_rootfs(
    id: &str,
    dir: &Path,
    rootfs: &proto::Rootfs,
) -> Result<ContainerRootfs, ContainerError> {
    let err = |e: storage::StorageError| ContainerError::Storage {
        id: id.to_owned(),
        cause: e.to_string(),
    };
    let disk = |d: &proto::Disk| storage::DiskSpec {
        serial: d.serial.clone(),
        fstype: d.fstype.clone(),
        region: (d.sectors > 0).then_some(storage::Region {
            start_sector: d.start_sector,
            sectors: d.sectors,
        }),
    };
    let layers: Vec<_> = rootfs.layers.iter().map(disk).collect();
    let upper = match &rootfs.upper {
        Some(proto::rootfs::Upper::UpperDisk(d)) => storage::UpperSpec::Disk(disk(d)),
        Some(proto::rootfs::Upper::UpperTmpfsBytes(bytes)) => {
            storage::UpperSpec::Tmpfs { size_bytes: *bytes }
        }
        _ => {
            return Err(ContainerError::Storage {
                id: id.to_owned(),
                cause: "no upper layer: name a writable disk or a tmpfs size".into(),
            })
        }
    };
    let (mut sources, mut upper_source) = storage::resolve_rootfs(
        Path::new(storage::SYSFS_BLOCK),
        &layers,
        &upper,
        DISK_TIMEOUT,
    )
    .map_err(err)?;
    let mut mapped =
        storage::map_regions(&mut sources, &layers, &mut upper_source, &upper).map_err(err)?;
    match ContainerRootfs::mount(dir, &sources, &upper_source) {
        Ok(mut rootfs) => {
            rootfs.hold(mapped);
            Ok(rootfs)
        }
        Err(e) => {
            for failure in storage::release_mappings(&mut mapped) {
                log::warn!("container {id}: {failure}");
            }
            Err(err(e))
        }
    }
}

fn builder(id: &str, child: ChildStdio) -> Result<ContainerBuilder, ContainerError> {
    let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
        .with_root_path(RUNTIME_DIR)
        .map_err(|e| ContainerError::runtime(id, "preparing libcontainer's state directory", e))?;
    if let Some(fd) = child.stdin {
        b = b.with_stdin(fd);
    }
    if let Some(fd) = child.stdout {
        b = b.with_stdout(fd);
    }
    if let Some(fd) = child.stderr {
        b = b.with_stderr(fd);
    }
    Ok(b)
}

/// The unix socket through which libcontainer hands over a new terminal's master.
struct ConsoleSocket {
    path: PathBuf,
    receiver: JoinHandle<std::io::Result<OwnedFd>>,
}

fn with_console(
    builder: ContainerBuilder,
    terminal: bool,
    id: &str,
) -> Result<(ContainerBuilder, Option<ConsoleSocket>), ContainerError> {
    if !terminal {
        return Ok((builder, None));
    }
    // A socket's path must fit sockaddr_un (107 bytes): one named after CRI's ids
    // (64 characters each for the container and the exec) does not, so a number.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(CONSOLE_DIR)
        .map_err(|e| ContainerError::runtime(id, "making the console sockets' directory", e))?;
    let path =
        Path::new(CONSOLE_DIR).join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| ContainerError::runtime(id, "making its console socket", e))?;
    let receiver = std::thread::spawn(move || receive_fd(&listener));
    Ok((
        builder.with_console_socket(Some(&path)),
        Some(ConsoleSocket { path, receiver }),
    ))
}

impl ConsoleSocket {
    fn receive(self, id: &str) -> Result<OwnedFd, ContainerError> {
        let fd = self
            .receiver
            .join()
            .map_err(|_| {
                ContainerError::runtime(id, "receiving its terminal", "receiver panicked")
            })?
            .map_err(|e| ContainerError::runtime(id, "receiving its terminal", e));
        let _ = fs::remove_file(&self.path);
        fd
    }

    /// Creation failed: unblock the receiver if nothing connected.
    fn abandon(self) {
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = self.receiver.join();
        let _ = fs::remove_file(&self.path);
    }
}

fn receive_fd(listener: &UnixListener) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (conn, _) = listener.accept()?;
    let mut name = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed this fd in our table; nothing
                // else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the console socket's peer sent no terminal",
    ))
}

fn check_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadId { id: id.to_owned() })
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    fs::write(path, serde_json::to_vec(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "abc-DEF_1.2", &"x".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
    }
}
