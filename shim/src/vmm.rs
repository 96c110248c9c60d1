//! The pod's VMM: a `peapod-vmm` child process, and its control API through
//! `peapod-vmm-api`'s blocking client, run on tokio's blocking threads.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::process::{Command, ExitStatus};

use peapod_vmm_api::{BlockRegion, BlockSet, ClientError, VmmClient};
use tokio::sync::oneshot;

use crate::cgroup::{self, CgroupError, VmmCgroup};
use crate::config::{Config, VmSize};
use crate::jail::{self, Jail, JailSpec};

/// The fd number the tap has in the VMM (`--net fd=3`).
const TAP_FD: i32 = 3;
/// How often `wait_ready` asks the VMM again.
const READY_POLL: Duration = Duration::from_millis(20);
/// The guest CID every pod's VM gets: the vsock device is the VM's own, so CIDs need
/// not be unique on the host.
pub const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "starting the VMM {path}: {source} (install peapod-vmm or set `vmm` in the peapod config)"
    )]
    Spawn { path: PathBuf, source: io::Error },
    #[error(
        "starting the VMM {path} in its jail: {source} (a step of the jail failed in the \
         child: mount namespace, pivot_root, device nodes, rlimits or uid; `jail = false` in \
         the peapod config tells whether the jail is the cause)"
    )]
    JailedSpawn { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("disk image {path}: {source} (was it removed while the pod used it?)")]
    Disk { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error(
        "VMM API on {}: the shim's blocking task for the call ended: {source} (is the \
         shim shutting down?)",
        socket.display()
    )]
    ApiTask {
        socket: PathBuf,
        source: tokio::task::JoinError,
    },
}

/// The files of one VM, all inside the pod's state directory: the VMM's own in `vm/`
/// (the only host directory a jailed VMM sees), its log beside it (written through
/// the stdio the shim opened), and `jail/`, the mount point of its jail's root.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub run_dir: PathBuf,
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
    pub jail_root: PathBuf,
}

impl VmPaths {
    pub fn in_dir(dir: &Path) -> VmPaths {
        let run_dir = dir.join("vm");
        VmPaths {
            api_socket: run_dir.join("api.sock"),
            vsock_socket: run_dir.join("vsock.sock"),
            console: run_dir.join("console.log"),
            log: dir.join("vmm.log"),
            jail_root: dir.join("jail"),
            run_dir,
        }
    }
}

/// Names the pod's VM directory in a jailed VMM's environment.
pub const VM_DIR_ENV: &str = "PEAPOD_VM_DIR";

/// What the VM is booted with.
pub struct VmSpec<'a> {
    pub config: &'a Config,
    pub size: VmSize,
    pub paths: &'a VmPaths,
    /// The pod's tap and the MAC the guest's card takes (the veth's).
    pub tap: Option<(&'a OwnedFd, &'a str)>,
    /// The VMM's cgroup, if the pod has one.
    pub cgroup: Option<&'a VmmCgroup>,
    pub template: TemplateUse<'a>,
}

/// What the VMM does with a template (crate::templates).
#[derive(Debug, Clone, Copy)]
pub enum TemplateUse<'a> {
    None,
    /// Start from the template in this directory.
    Restore(&'a Path),
    /// Boot; a template will be written into this directory (`vm.snapshot`).
    Build(&'a Path),
}

/// The directory `vm.snapshot` names, as a VMM started with `spec` sees `staging`.
pub fn template_out_seen(config: &Config, staging: &Path) -> PathBuf {
    if config.jail {
        jail::TEMPLATE_OUT_DIR.into()
    } else {
        staging.into()
    }
}

/// A started VMM: its pid, and its exit status once it has exited.
pub struct VmmProcess {
    pub pid: u32,
    pub exited: oneshot::Receiver<io::Result<ExitStatus>>,
}

/// Starts the VMM. It dies with the shim (PR_SET_PDEATHSIG), so a crashed shim does
/// not leave a VM behind; `delete` also kills it by its pid file.
///
/// The kernel sends the death signal when the *thread* that forked the VMM ends, not
/// the process: so a thread of its own forks it and then waits for it, and lives
/// exactly as long as the VMM (a tokio thread may end whenever its pool says so).
pub fn spawn(spec: &VmSpec) -> Result<VmmProcess, VmmError> {
    let mut cmd = command(spec)?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (exited_tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name("vmm-waiter".into())
        .spawn(move || {
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok(child.id()));
            // The command holds the log files and the tap: close them in the shim.
            drop(cmd);
            let _ = exited_tx.send(child.wait());
        })
        .map_err(|source| VmmError::Spawn {
            path: spec.config.vmm.clone(),
            source,
        })?;
    let path = spec.config.vmm.clone();
    let pid = started_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the VMM's waiter thread ended")))
        .map_err(|source| match spec.config.jail {
            true => VmmError::JailedSpawn { path, source },
            false => VmmError::Spawn { path, source },
        })?;
    Ok(VmmProcess { pid, exited })
}

/// The VMM's command line, stdio and pre-exec set-up.
fn command(spec: &VmSpec) -> Result<Command, VmmError> {
    let c = spec.config;
    let p = spec.paths;
    let jail = if c.jail {
        Some(Jail::new(&JailSpec {
            root: &p.jail_root,
            run_dir: &p.run_dir,
            vmm: &c.vmm,
            kernel: &c.kernel,
            initrd: &c.initrd,
            uid_base: c.jail_id_base,
            memory_mib: spec.size.memory_mib,
            vcpus: spec.size.vcpus,
            template: match spec.template {
                TemplateUse::Restore(dir) => Some(dir),
                _ => None,
            },
            template_out: match spec.template {
                TemplateUse::Build(dir) => Some(dir),
                _ => None,
            },
        })?)
    } else {
        std::fs::create_dir_all(&p.run_dir).map_err(|source| VmmError::Spawn {
            path: p.run_dir.clone(),
            source,
        })?;
        None
    };
    // A path as the VMM sees it: in the jail, its files have fixed names.
    let seen = |host: &Path, inside: &str| -> PathBuf {
        match jail {
            Some(_) => inside.into(),
            None => host.into(),
        }
    };
    let in_run = |host: &Path| {
        let name = host.file_name().expect("VM files have names");
        seen(host, &Path::new(jail::RUN_DIR).join(name).to_string_lossy())
    };
    // Appended to, so that the VMM can empty it when it is full (its logger's limit).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .and_then(|f| f.set_len(0).map(|()| f))
        .map_err(|source| VmmError::Spawn {
            path: p.log.clone(),
            source,
        })?;
    let mut cmd = Command::new(seen(&c.vmm, jail::VMM));
    if jail.is_some() {
        // The host's environment stays out of the jail too; what is left says (to
        // `ps e` and to the tests' leak checks) which pod the VMM serves.
        cmd.env_clear().env(VM_DIR_ENV, &p.run_dir);
        cmd.args(["--platform-quirks", jail::platform_quirks()]);
    }
    cmd.arg("--kernel")
        .arg(seen(&c.kernel, jail::KERNEL))
        .arg("--initrd")
        .arg(seen(&c.initrd, jail::INITRD))
        .args(["--vcpus", &spec.size.vcpus.to_string()])
        .args(["--memory", &spec.size.memory_mib.to_string()])
        .args(["--block-slots", "1"])
        .arg("--vsock")
        .arg(format!(
            "cid={GUEST_CID},socket={}",
            in_run(&p.vsock_socket).display()
        ))
        .arg("--api-socket")
        .arg(in_run(&p.api_socket))
        .arg("--console")
        .arg(if c.guest_console {
            in_run(&p.console).into_os_string()
        } else {
            "off".into()
        });
    let mut cmdline = c.kernel_cmdline.clone();
    if c.guest_console {
        cmdline.push_str(" peapod.log=console");
    }
    if !cmdline.trim().is_empty() {
        cmd.args(["--cmdline", cmdline.trim()]);
    }
    if !c.vmm_seccomp {
        cmd.arg("--no-seccomp");
    }
    if let TemplateUse::Restore(dir) = spec.template {
        cmd.arg("--restore").arg(seen(dir, jail::TEMPLATE_DIR));
    }
    let tap_fd = spec.tap.map(|(fd, mac)| {
        cmd.arg("--net").arg(format!("fd={TAP_FD},mac={mac}"));
        fd.as_raw_fd()
    });
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|source| VmmError::Spawn {
            path: p.log.clone(),
            source,
        })?)
        .stderr(log);
    let cgroup_procs = match spec.cgroup {
        Some(cg) => cg.procs_files()?,
        None => Vec::new(),
    };
    // The tap is only borrowed from the caller: the command owns a duplicate, so
    // that the fd stays valid until the waiter thread has forked.
    let tap_fd = match tap_fd {
        Some(fd) => Some(
            // SAFETY: `fd` is an open descriptor the caller owns for this call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|source| VmmError::Spawn {
                    path: c.vmm.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (the jail's system calls, prctl, dup2, fcntl) on
    // memory prepared before the fork and an fd the closure owns.
    unsafe {
        cmd.pre_exec(move || {
            // Into the cgroup first: the jail hides /sys/fs/cgroup.
            cgroup::join(&cgroup_procs)?;
            if let Some(jail) = &jail {
                jail.enter()?;
            }
            // After the jail: a change of uid clears the death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = tap_fd.as_ref().map(AsRawFd::as_raw_fd) {
                if fd == TAP_FD {
                    // Already in place: only let it survive exec.
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, TAP_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The VMM's control API: `peapod-vmm-api`'s client, each call on a blocking thread.
#[derive(Debug, Clone)]
pub struct VmmApi {
    client: VmmClient,
}

impl VmmApi {
    pub fn new(socket: PathBuf) -> VmmApi {
        VmmApi {
            client: VmmClient::new(socket),
        }
    }

    /// Waits until the API socket answers `vm.info` (the VMM creates it before the
    /// first guest instruction), or `timeout`. Each try is one call, so that a caller
    /// that stops waiting (the VMM died) leaves no thread polling.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.call(VmmClient::info).await {
                Ok(_) => return Ok(()),
                Err(VmmError::Api(last)) if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::Api(ClientError::NotReady {
                        socket: self.client.socket().into(),
                        waited: timeout,
                        last: Box::new(last),
                    }))
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(READY_POLL).await,
            }
        }
    }

    /// Adds a disk image to the store in `slot` (whose serial is `serial`); where the
    /// guest finds it. The shim opens the image and passes it open (a jailed VMM
    /// cannot open host paths); the path only names it in the VMM's log.
    pub async fn block_append(
        &self,
        slot: u32,
        path: &Path,
        read_only: bool,
        serial: &str,
    ) -> Result<BlockRegion, VmmError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| VmmError::Disk {
                path: path.into(),
                source,
            })?;
        let set = BlockSet {
            slot,
            path: path.into(),
            read_only,
            id: Some(serial.into()),
            fd: true,
        };
        self.call(move |c| c.block_append_open(&set, &file)).await
    }

    /// Drops the image at `start_sector` from the store in `slot`.
    pub async fn block_remove(&self, slot: u32, start_sector: u64) -> Result<(), VmmError> {
        self.call(move |c| c.block_remove(slot, start_sector)).await
    }

    pub async fn pause(&self) -> Result<(), VmmError> {
        self.call(VmmClient::pause).await
    }

    pub async fn resume(&self) -> Result<(), VmmError> {
        self.call(VmmClient::resume).await
    }

    /// Writes the paused VM into `dir`, as the VMM sees it.
    pub async fn snapshot(&self, dir: PathBuf) -> Result<(), VmmError> {
        self.call(move |c| c.snapshot(&dir)).await
    }

    /// One call of the blocking client, off the async threads.
    async fn call<T, F>(&self, f: F) -> Result<T, VmmError>
    where
        T: Send + 'static,
        F: FnOnce(&VmmClient) -> Result<T, ClientError> + Send + 'static,
    {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .map_err(|source| VmmError::ApiTask {
                socket: self.client.socket().into(),
                source,
            })?
            .map_err(VmmError::Api)
    }
}

/// The last `max` bytes of the VMM's log, for error messages.
pub fn log_tail(paths: &VmPaths, max: usize) -> String {
    let text = std::fs::read(&paths.log).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}
