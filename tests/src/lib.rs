//! Helpers for Peapod's integration tests and benchmarks: where the real artefacts
//! are, a VMM process that cleans up after itself, and a client for its API.
//!
//! The artefacts come from the environment (`make test` sets them):
//! `PEAPOD_KERNEL`, `PEAPOD_INITRD`, `PEAPOD_VMM`. Without them, the cached kernel and
//! initramfs are built (or found) with the repo's build scripts and the VMM binary is
//! looked for beside the test binary.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

fn artefact(var: &str, script: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
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

/// A VMM process with its own directory for the API socket and console; killed and
/// cleaned up when dropped.
pub struct VmmProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub api_socket: PathBuf,
    pub console: PathBuf,
    status: Option<ExitStatus>,
}

impl VmmProcess {
    /// Starts the VMM on the test kernel and initramfs with the console in a file
    /// (unless `extra_args` says where the console goes).
    pub fn start(extra_args: &[&str]) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let api_socket = dir.path().join("api.sock");
        let console = dir.path().join("console.log");
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--kernel")
            .arg(kernel())
            .arg("--initrd")
            .arg(initrd())
            .arg("--api-socket")
            .arg(&api_socket);
        if !extra_args.contains(&"--console") {
            cmd.arg("--console").arg(&console);
        }
        let child = cmd
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peapod-vmm");
        Self {
            child,
            dir,
            api_socket,
            console,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console holds `needle`; panics with the console and the VMM's
    /// log if the VMM exits or time runs out first.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            if text.contains(needle) {
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

    /// The VMM's log; complete once it has exited.
    pub fn stderr(&mut self) -> String {
        let mut out = String::new();
        if self.try_wait().is_some() {
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut out);
            }
        }
        out
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

/// One HTTP/1.1 request on the VMM's API socket: (status, body).
pub fn api(socket: &Path, method: &str, path: &str) -> (u16, String) {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// The kernel release in the agent's ready line.
pub fn ready_release(console: &str) -> Option<String> {
    console.lines().find_map(|l| {
        l.split_once(READY_PREFIX)
            .map(|(_, r)| r.trim().to_string())
    })
}
