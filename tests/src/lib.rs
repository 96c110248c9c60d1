//! Helpers for Peapod's integration tests and benchmarks: where the real artefacts
//! are, a VMM process that cleans up after itself, and its API's client
//! ([`VmmProcess::api`], `peapod-vmm-api`'s, the one the shim uses).
//!
//! The artefacts come from the environment (`make test` sets them):
//! `PEAPOD_KERNEL`, `PEAPOD_INITRD`, `PEAPOD_VMM`. Without them, the cached kernel and
//! initramfs are built (or found) with the repo's build scripts and the VMM binary is
//! looked for beside the test binary. The device tests also use the test initramfs
//! (`PEAPOD_TEST_INITRD`, or rootfs/build-test.sh): see [`probe`].

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peapod_vmm_api::VmmClient;

pub mod agent;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod jail;
pub mod kubelet;
pub mod layers;
pub mod leftovers;
pub mod memory;
pub mod netns;
pub mod oci_image;
pub mod probe;
pub mod threads;
pub mod vsock;

/// A boot here takes about 15 s; this leaves room for a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
pub const READY_PREFIX: &str = "peapod-agent: ready kernel=";
/// Asks the agent to power the VM off once it is ready.
pub const POWEROFF_AFTER_READY: &str = "peapod.poweroff=ready";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn build_script_output(script: &str) -> PathBuf {
    let out = Command::new(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().expect("build script prints a path"))
}

pub(crate) fn artefact(var: &str, script: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => build_script_output(script),
    })
    .clone()
}

/// The guest kernel (`vmlinux`) under test.
pub fn kernel() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    artefact("PEAPOD_KERNEL", "kernel-config/build.sh", &K)
}

/// The guest initramfs under test.
pub fn initrd() -> PathBuf {
    static I: OnceLock<PathBuf> = OnceLock::new();
    artefact("PEAPOD_INITRD", "rootfs/build.sh", &I)
}

/// The release the guest kernel reports: kernel-config/build.sh writes it beside vmlinux.
pub fn guest_kernel_release() -> String {
    let path = kernel().with_file_name("release");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build the kernel with kernel-config/build.sh)",
                path.display()
            )
        })
        .trim()
        .to_string()
}

pub fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// The peapod-vmm binary: `PEAPOD_VMM`, or beside the running test binary.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PEAPOD_VMM") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let candidate = profile_dir.join("peapod-vmm");
    assert!(
        candidate.exists(),
        "{} not found: build it first (cargo build -p peapod-vmm, or make test)",
        candidate.display()
    );
    candidate
}

/// The containerd shim under test (`containerd-shim-peapod-v2`): `PEAPOD_SHIM`, or
/// `<repo>/target/release/containerd-shim-peapod-v2`.
pub fn shim_binary() -> PathBuf {
    let candidate = match std::env::var_os("PEAPOD_SHIM") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/release/containerd-shim-peapod-v2"),
    };
    assert!(
        candidate.exists(),
        "{} not found: build it first (cargo build --release -p peapod-shim), or set PEAPOD_SHIM to the binary",
        candidate.display()
    );
    candidate
}

/// Fails the test, loudly, where KVM is missing: CI has it, so a skip would hide a
/// broken machine.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots a real guest and needs read-write /dev/kvm: {e}");
    }
}

/// Fails the test, loudly, where it does not run as root (network namespaces, taps,
/// /proc/<pid>/mem of the VMM): CI runs as root, so a skip would hide a broken machine.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, taps, the VMM's memory); run it as root, as `make test` in CI does"
    );
}

/// How to start a VMM beyond its arguments.
#[derive(Default, Clone, Debug)]
pub struct VmmOptions {
    /// The initramfs; [`initrd()`] if `None`.
    pub initrd: Option<PathBuf>,
    /// A named network namespace (`ip netns`) to start the VMM in; its taps live there.
    pub netns: Option<String>,
}

/// A VMM process with its own directory for the API socket and console; killed and
/// cleaned up when dropped. Its log (stderr) is read as it comes, so that a chatty
/// VMM never blocks on a full pipe and a test can look at the log while it runs.
pub struct VmmProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub api_socket: PathBuf,
    pub console: PathBuf,
    status: Option<ExitStatus>,
    log: Arc<Mutex<Vec<u8>>>,
    log_reader: Option<JoinHandle<()>>,
}

impl VmmProcess {
    /// Starts the VMM on the test kernel and initramfs with the console in a file
    /// (unless `extra_args` says where the console goes).
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with(extra_args, VmmOptions::default())
    }

    pub fn start_with(extra_args: &[&str], opts: VmmOptions) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let api_socket = dir.path().join("api.sock");
        let console = dir.path().join("console.log");
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--kernel")
            .arg(kernel())
            .arg("--initrd")
            .arg(opts.initrd.unwrap_or_else(initrd))
            .arg("--api-socket")
            .arg(&api_socket);
        if !extra_args.contains(&"--console") {
            cmd.arg("--console").arg(&console);
        }
        if let Some(ns) = &opts.netns {
            netns::enter_in_child(&mut cmd, ns);
        }
        let mut child = cmd
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peapod-vmm");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            dir,
            api_socket,
            console,
            status: None,
            log,
            log_reader: Some(log_reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The client of this VMM's control API.
    pub fn api(&self) -> VmmClient {
        VmmClient::new(&self.api_socket)
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console holds a whole line with `needle`; panics with the
    /// console and the VMM's log if the VMM exits or time runs out first.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            // The whole line: the serial console brings it a character at a time, and
            // callers read what follows the needle (the ready line's kernel release).
            if text
                .find(needle)
                .is_some_and(|at| text[at..].contains('\n'))
            {
                return text;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "VMM exited ({status}) before the console showed {needle:?}\nconsole:\n{text}\nlog:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!("no {needle:?} on the console after {timeout:?}\nconsole:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_for_api(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while UnixStream::connect(&self.api_socket).is_err() {
            assert!(
                self.try_wait().is_none(),
                "VMM exited before its API came up:\n{}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "API socket did not come up in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits for the VMM to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "VMM still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The VMM's log so far; complete once it has exited.
    pub fn stderr(&mut self) -> String {
        if self.try_wait().is_some() {
            // The pipe ends with the process: the reader has all of it, or soon will.
            if let Some(r) = self.log_reader.take() {
                let _ = r.join();
            }
        }
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// User plus system CPU time of the VMM process so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn cpu_time_of(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    Duration::from_secs_f64(ticks / hz)
}

/// The kernel release in the agent's ready line.
pub fn ready_release(console: &str) -> Option<String> {
    console.lines().find_map(|l| {
        l.split_once(READY_PREFIX)
            .map(|(_, r)| r.trim().to_string())
    })
}

/// Connects to `addr` and returns what the server sends before it closes the
/// connection; retries until `timeout` while nothing comes (the server may still be
/// starting), then panics with the last attempt.
pub fn read_until_closed(addr: std::net::SocketAddr, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(
            |mut s| {
                // A guest here answers slowly once connected.
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            },
        );
        match attempt {
            Ok(text) if !text.is_empty() => return text,
            other if Instant::now() > deadline => {
                panic!("nothing from {addr} within {timeout:?}: last {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The bytes the files under `dir` take on their filesystem (allocated blocks, each
/// inode once, as `du` counts), and the files' paths with theirs, largest first.
pub fn allocated_bytes(dir: &Path) -> (u64, Vec<(u64, PathBuf)>) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // gone meanwhile
        };
        if meta.is_dir() {
            stack.extend(
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        if seen.insert((meta.dev(), meta.ino())) {
            files.push((meta.blocks() * 512, path));
        }
    }
    files.sort_by(|a, b| b.cmp(a));
    (files.iter().map(|f| f.0).sum(), files)
}
