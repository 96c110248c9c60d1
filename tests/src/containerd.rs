//! A private containerd for the shim's tests: its own config, root, state, sockets and
//! temporary directory, all in one temporary directory, so that nothing touches the
//! host's containerd (`/var/lib/containerd`, `/run/containerd/containerd.sock`).
//!
//! containerd finds `containerd-shim-peapod-v2` on its `PATH`: a directory holding a
//! link to the shim under test comes first there. The shims containerd starts inherit
//! its environment, so `PEAPOD_CONFIG` in it names the peapod config the tests write.
//!
//! What stays shared with the host, by containerd 1.6's design: shim sockets go to
//! `/run/containerd/s/<hash>` (the hash covers our socket's path, so they never clash
//! with the host's), and `ctr` puts its I/O FIFOs under `/run/containerd/fifo`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cri::CriConfig;
use crate::netns::run_in_netns;
use crate::{initrd, kernel, require_root, shim_binary, vmm_binary};

/// The containerd namespace the task-level tests' `ctr` calls use.
pub const NAMESPACE: &str = "peapod-test";
/// The namespace CRI keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The runtime type that selects the peapod shim.
pub const PEAPOD_RUNTIME: &str = "io.containerd.peapod.v2";
/// The name containerd looks the peapod shim up by, on its `PATH`.
pub const SHIM_NAME: &str = "containerd-shim-peapod-v2";
/// The VMM's process name.
pub const VMM_NAME: &str = "peapod-vmm";
/// How long a `ctr` call may take before the helper gives up: a pod boots a VM (about
/// 15 s here), and CI machines are loaded.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(240);
/// The shim's boot and agent-call deadlines in the tests' config.
const GUEST_DEADLINE_SECS: u32 = 300;
/// The shim's stop bound in the tests' config: a signal answered slowly by a guest
/// this kind of host slows down is not taken for a wedged guest.
pub const STOP_DEADLINE_SECS: u32 = 30;
/// The shim's health probes in the tests' config: one every this many seconds, and a
/// guest that misses [`HEALTH_FAILURES`] in a row is ended. Longer than any answer of
/// a live guest here, busy or not.
pub const HEALTH_INTERVAL_SECS: u32 = 8;
pub const HEALTH_FAILURES: u32 = 3;
/// How long containerd may take to answer on its socket after a start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The CRI plugin, disabled unless [`ContainerdOptions::cri`] configures it.
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// How much of containerd's log a failing helper prints.
const LOG_TAIL_LINES: usize = 60;
/// How often a step may meet the host's busybox fault before the test fails.
const PLATFORM_ATTEMPTS: u32 = 3;

/// The peapod config file (`PEAPOD_CONFIG`) the shim reads. Every key is optional for
/// the shim; `None` leaves a key out of the file. The paths under the containerd's
/// directory are filled in by [`Containerd::start`] unless set here.
#[derive(Clone, Debug, Default)]
pub struct PeapodConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    /// Per-pod state; must be empty once a pod is gone. Default `<dir>/peapod-state`.
    pub state_dir: Option<PathBuf>,
    /// Per-pod data; must be empty once a pod is gone. Default `<dir>/peapod-data`.
    pub data_dir: Option<PathBuf>,
    /// The layer disk cache; may stay. Default `<dir>/layer-cache`.
    pub layer_cache: Option<PathBuf>,
    pub default_vcpus: Option<u32>,
    pub default_memory_mib: Option<u32>,
    pub boot_timeout_secs: Option<u32>,
    pub agent_timeout_secs: Option<u32>,
    /// How long a stop waits for a guest that does not answer before the VM is ended.
    pub stop_timeout_secs: Option<u32>,
    pub health_interval_secs: Option<u32>,
    pub health_failures: Option<u32>,
    pub log_level: Option<String>,
    /// More `key = value` lines, written as given (TOML), for keys added later.
    pub extra: Vec<String>,
}

impl PeapodConfig {
    /// The tests' usual config: the kernel, initramfs and VMM under test, one vCPU,
    /// 256 MiB, eight block slots, debug logs, and deadlines for guests whose kernel
    /// this kind of host emulates (a container's creation takes 30-40 s here alone,
    /// longer beside another VM on two cores).
    pub fn for_tests() -> Self {
        Self {
            kernel: Some(kernel()),
            initrd: Some(initrd()),
            vmm: Some(vmm_binary()),
            state_dir: None,
            data_dir: None,
            layer_cache: None,
            default_vcpus: Some(1),
            default_memory_mib: Some(256),
            boot_timeout_secs: Some(GUEST_DEADLINE_SECS),
            agent_timeout_secs: Some(GUEST_DEADLINE_SECS),
            stop_timeout_secs: Some(STOP_DEADLINE_SECS),
            health_interval_secs: Some(HEALTH_INTERVAL_SECS),
            health_failures: Some(HEALTH_FAILURES),
            log_level: Some("debug".into()),
            extra: Vec::new(),
        }
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let paths = [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("vmm", &self.vmm),
            ("state_dir", &self.state_dir),
            ("data_dir", &self.data_dir),
            ("layer_cache", &self.layer_cache),
        ];
        for (key, value) in paths {
            if let Some(p) = value {
                writeln!(s, "{key} = {}", toml_string(&p.to_string_lossy())).unwrap();
            }
        }
        let numbers = [
            ("default_vcpus", self.default_vcpus),
            ("default_memory_mib", self.default_memory_mib),
            ("boot_timeout_secs", self.boot_timeout_secs),
            ("agent_timeout_secs", self.agent_timeout_secs),
            ("stop_timeout_secs", self.stop_timeout_secs),
            ("health_interval_secs", self.health_interval_secs),
            ("health_failures", self.health_failures),
        ];
        for (key, value) in numbers {
            if let Some(n) = value {
                writeln!(s, "{key} = {n}").unwrap();
            }
        }
        if let Some(level) = &self.log_level {
            writeln!(s, "log_level = {}", toml_string(level)).unwrap();
        }
        for line in &self.extra {
            writeln!(s, "{line}").unwrap();
        }
        s
    }
}

/// A TOML basic string: JSON's escapes are a subset of TOML's.
pub fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// How to start a [`Containerd`].
#[derive(Clone, Debug, Default)]
pub struct ContainerdOptions {
    /// The CRI plugin's settings; `None` disables the plugin (the task-level tests).
    pub cri: Option<CriConfig>,
    /// The namespace `ctr` calls use; [`NAMESPACE`] if `None`.
    pub namespace: Option<&'static str>,
    /// The binary to offer as `containerd-shim-peapod-v2`; `None`: none (runc only).
    pub shim: Option<PathBuf>,
    /// The peapod config to write and name in `PEAPOD_CONFIG`; `None`: neither.
    pub peapod: Option<PeapodConfig>,
    /// containerd's log level; `debug` if `None`.
    pub log_level: Option<String>,
    /// More environment for containerd (and so for the shims it starts).
    pub env: Vec<(OsString, OsString)>,
    /// Which containerd runs; the installed one (Debian 12's 1.6) if `None`.
    pub release: Option<ContainerdRelease>,
}

/// A containerd release: the installed one, or the `containerd` package of another
/// Debian suite, fetched and extracted (not installed) by `tests/containerd-release.sh`
/// into `/var/cache/peapod/containerd/<version>`. Debian 13's (trixie) is 1.7, and
/// unstable's (sid) 2.x; their binaries need only libc, so they run here.
#[derive(Clone, Debug)]
pub struct ContainerdRelease {
    /// Where `containerd`, `ctr` and `containerd-shim-runc-v2` are; `None`: on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// What `containerd --version` says, e.g. "1.7.24~ds1".
    pub version: String,
    /// The major version: 2 and later read configs of version 3.
    pub major: u32,
}

impl ContainerdRelease {
    /// The containerd on `PATH` (Debian 12's package, which `make test` installs).
    pub fn installed() -> Self {
        Self::at(None)
    }

    /// The containerd of Debian suite `suite` ("trixie", "sid"), fetched with apt into
    /// the cache on first use.
    pub fn debian(suite: &str) -> Self {
        let script = crate::repo_root().join("tests/containerd-release.sh");
        let out = Command::new(&script)
            .arg(suite)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} {suite} failed ({}): see its message above",
            script.display(),
            out.status
        );
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Self::at(Some(PathBuf::from(dir)))
    }

    fn at(bin_dir: Option<PathBuf>) -> Self {
        let mut release = ContainerdRelease {
            bin_dir,
            version: String::new(),
            major: 0,
        };
        let out = Command::new(release.binary("containerd"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run containerd: {e} (apt-get install containerd)"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "containerd github.com/containerd/containerd/v2 2.1.9+unknown <revision>"
        release.version = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("containerd --version said {text:?}"))
            .to_string();
        release.major = release
            .version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("containerd --version: no major version in {text:?}"));
        release
    }

    /// The path of one of the release's programs.
    pub fn binary(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => name.into(),
        }
    }

    /// The config version this release reads: 3 from containerd 2.0 on.
    pub fn config_version(&self) -> u32 {
        if self.major >= 2 {
            3
        } else {
            2
        }
    }
}

impl ContainerdOptions {
    /// containerd with its default runtime (runc) only: no shim, no peapod config,
    /// nothing built beforehand.
    pub fn runc_only() -> Self {
        Self::default()
    }

    /// containerd with the peapod shim under test ([`shim_binary`]) and
    /// [`PeapodConfig::for_tests`].
    pub fn peapod() -> Self {
        Self {
            shim: Some(shim_binary()),
            peapod: Some(PeapodConfig::for_tests()),
            ..Self::default()
        }
    }
}

/// A private containerd. Dropping it stops containerd (TERM, then KILL) and removes its
/// directory; shims are left alone, so a test sees what leaked.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    /// The directory everything lives in.
    pub root_dir: PathBuf,
    /// The gRPC socket `ctr` talks to.
    pub socket: PathBuf,
    pub config_path: PathBuf,
    /// The peapod config file, if one was written.
    pub peapod_config: Option<PathBuf>,
    /// The peapod state directory named in the peapod config.
    pub state_dir: PathBuf,
    /// The peapod data directory named in the peapod config.
    pub data_dir: PathBuf,
    /// The peapod layer cache named in the peapod config.
    pub layer_cache: PathBuf,
    /// containerd's stdout and stderr, across restarts.
    pub log: PathBuf,
    /// The containerd that runs.
    pub release: ContainerdRelease,
    opts: ContainerdOptions,
    path_env: OsString,
    child: Option<Child>,
}

impl Containerd {
    /// How many times the guest kernel has reported the host's busybox fault
    /// (docs/platform.md) in this containerd's log (the shim forwards the guest's log).
    pub fn platform_faults(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| crate::agent::is_platform_fault(l))
            .count()
    }

    /// Starts containerd and waits until it answers on its socket.
    pub fn start(opts: ContainerdOptions) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("peapod-ctd-")
            .tempdir()
            .expect("creating containerd's directory");
        let root_dir = dir.path().to_path_buf();
        let socket = root_dir.join("containerd.sock");
        let config_path = root_dir.join("config.toml");
        let log = root_dir.join("containerd.log");
        let bin = root_dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::create_dir(root_dir.join("tmp")).unwrap();

        let mut peapod = opts.peapod.clone();
        let state_dir = peapod
            .as_ref()
            .and_then(|p| p.state_dir.clone())
            .unwrap_or_else(|| root_dir.join("peapod-state"));
        let data_dir = peapod
            .as_ref()
            .and_then(|p| p.data_dir.clone())
            .unwrap_or_else(|| root_dir.join("peapod-data"));
        let layer_cache = peapod
            .as_ref()
            .and_then(|p| p.layer_cache.clone())
            .unwrap_or_else(|| root_dir.join("layer-cache"));
        let mut peapod_config = None;
        if let Some(p) = &mut peapod {
            p.state_dir = Some(state_dir.clone());
            p.data_dir = Some(data_dir.clone());
            p.layer_cache = Some(layer_cache.clone());
            let path = root_dir.join("peapod.toml");
            std::fs::write(&path, p.to_toml()).unwrap();
            peapod_config = Some(path);
        }
        if let Some(shim) = &opts.shim {
            assert!(
                shim.exists(),
                "the shim {} does not exist: build it (cargo build --release -p peapod-shim) or set PEAPOD_SHIM",
                shim.display()
            );
            std::os::unix::fs::symlink(shim, bin.join(SHIM_NAME)).unwrap();
        }
        let release = opts
            .release
            .clone()
            .unwrap_or_else(ContainerdRelease::installed);
        let config = containerd_config(
            &root_dir,
            &socket,
            peapod_config.as_deref(),
            &opts,
            release.config_version(),
        );
        std::fs::write(&config_path, config).unwrap();

        // Our shim first, then the release's own runc shim; the rest of the inherited
        // PATH, plus the usual system directories in case the test runs with a reduced
        // one (runc is in /usr/sbin).
        let mut dirs = vec![bin];
        dirs.extend(release.bin_dir.clone());
        if let Some(p) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&p));
        }
        for d in [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ] {
            if !dirs.iter().any(|x| x == Path::new(d)) {
                dirs.push(d.into());
            }
        }
        let path_env = std::env::join_paths(dirs).unwrap();

        let mut ctd = Containerd {
            dir: Some(dir),
            root_dir,
            socket,
            config_path,
            peapod_config,
            state_dir,
            data_dir,
            layer_cache,
            log,
            release,
            opts,
            path_env,
            child: None,
        };
        ctd.spawn();
        ctd.wait_ready(READY_TIMEOUT);
        ctd
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(self.release.binary("containerd"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .env("PATH", &self.path_env)
            .env("TMPDIR", self.root_dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match &self.peapod_config {
            Some(p) => cmd.env("PEAPOD_CONFIG", p),
            None => cmd.env_remove("PEAPOD_CONFIG"),
        };
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start containerd: {e} (apt-get install containerd)")
        });
        self.child = Some(child);
    }

    /// Runs `step` again (at most [`PLATFORM_ATTEMPTS`] times in all) only when it
    /// failed and the guest kernel reported the host's busybox fault meanwhile
    /// (docs/platform.md); any other failure is the step's. `undo` cleans up after
    /// a failed attempt. Prints each rerun.
    pub fn retry_platform_faults<T>(
        &self,
        what: &str,
        mut step: impl FnMut() -> Result<T, String>,
        mut undo: impl FnMut(),
    ) -> T {
        for attempt in 1.. {
            let faults = self.platform_faults();
            let e = match step() {
                Ok(v) => return v,
                Err(e) => e,
            };
            // The kernel's line reaches containerd's log a moment after the exit.
            std::thread::sleep(Duration::from_secs(2));
            if self.platform_faults() == faults || attempt == PLATFORM_ATTEMPTS {
                panic!("{what}: {e}\n{}", self.log_tail());
            }
            eprintln!("{what}: attempt {attempt} hit the host's busybox fault ({e}); again");
            undo();
        }
        unreachable!()
    }

    /// containerd's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("containerd runs").id()
    }

    /// Waits until `ctr version` succeeds on the socket; panics with the log's tail if
    /// containerd exits or time runs out first.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "containerd exited ({status}) before it answered on {}\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            if self.socket.exists() {
                let out = self.run_ctr(&["version"], Duration::from_secs(10), false, None);
                if out.as_ref().is_some_and(|o| o.status.success()) {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer `ctr version` on {} within {timeout:?}\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills containerd with SIGKILL, as a crash would, and starts it again on the same
    /// config and directories; returns once it answers. Shims run on.
    pub fn restart(&mut self) {
        let mut child = self.child.take().expect("containerd runs");
        let _ = child.kill();
        let _ = child.wait();
        self.spawn();
        self.wait_ready(READY_TIMEOUT);
    }

    /// Whether containerd's log (the shims' lines included) holds `needle` anywhere.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle))
    }

    /// The last lines of containerd's log, headed by its path.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "--- last {} lines of {} ---\n{}\n--- end of containerd log ---",
            tail.len(),
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Runs `ctr --address <socket> --namespace <namespace> <args>` and returns what it
    /// did, whatever its status; panics if it takes longer than [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// [`Containerd::ctr`] with another time limit.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.run_ctr(args, timeout, true, None).unwrap()
    }

    /// [`Containerd::ctr`] with `input` on its stdin, then EOF.
    pub fn ctr_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        self.run_ctr(args, CTR_TIMEOUT, true, Some(input.to_vec()))
            .unwrap()
    }

    /// [`Containerd::ctr`] that must succeed; returns its stdout. Panics with stdout,
    /// stderr and the log's tail otherwise.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            panic!(
                "ctr {} failed ({})\n{}\n{}",
                args.join(" "),
                out.status,
                describe_output(&out),
                self.log_tail()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs ctr; `None` on a timeout unless `panic_on_timeout`.
    fn run_ctr(
        &self,
        args: &[&str],
        timeout: Duration,
        panic_on_timeout: bool,
        input: Option<Vec<u8>>,
    ) -> Option<Output> {
        let mut child = Command::new(self.release.binary("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(self.opts.namespace.unwrap_or(NAMESPACE))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ctr: {e} (apt-get install containerd)"));
        let read_all = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        };
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
        }
        let stdout = read_all(Box::new(child.stdout.take().unwrap()));
        let stderr = read_all(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = Output {
                    status: child.wait().unwrap(),
                    stdout: stdout.join().unwrap(),
                    stderr: stderr.join().unwrap(),
                };
                if !panic_on_timeout {
                    return None;
                }
                panic!(
                    "ctr {} did not finish within {timeout:?}\n{}\n{}",
                    args.join(" "),
                    describe_output(&out),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Some(Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        })
    }

    /// Imports an image archive (`ctr images import`) and returns the image's name (from
    /// ctr's "unpacking <name> (sha256:...)...done"), checked to be in `ctr images ls`.
    pub fn import(&self, tar: &Path) -> String {
        let out = self.ctr_ok(&["images", "import", &tar.to_string_lossy()]);
        // containerd 1.x's ctr says "unpacking <ref> (sha256:...)...done"; 2.x's
        // says "<ref>   saved".
        let reference = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("unpacking ")
                    .and_then(|r| r.split(" (").next())
                    .or_else(|| {
                        let mut words = l.split_whitespace();
                        let reference = words.next()?;
                        (words.next() == Some("saved")).then_some(reference)
                    })
            })
            .unwrap_or_else(|| {
                panic!(
                    "ctr images import {}: no image named in its output:\n{out}",
                    tar.display()
                )
            })
            .to_string();
        let list = self.ctr_ok(&["images", "ls", "-q"]);
        assert!(
            list.lines().any(|l| l.trim() == reference),
            "ctr images import {} gave {reference}, which ctr images ls -q does not list:\n{list}",
            tar.display()
        );
        reference
    }

    /// The status column of `ctr task ls` for task `id` (RUNNING, PAUSED, STOPPED...),
    /// or `None` if there is no such task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.task_row(id).map(|r| r.1)
    }

    /// The pid column of `ctr task ls` for task `id`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.task_row(id).map(|r| r.0)
    }

    fn task_row(&self, id: &str) -> Option<(u32, String)> {
        let list = self.ctr_ok(&["task", "ls"]);
        // TASK  PID  STATUS
        list.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
        })
    }

    /// Waits until task `id` has `status` in `ctr task ls`; panics with the last one
    /// seen and the log's tail otherwise.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.task_status(id);
            if now.as_deref() == Some(status) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "task {id} is {now:?}, not {status}, after {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The overlayfs snapshotter's `snapshots` directory: `<id>/fs` is a snapshot's
    /// upperdir.
    pub fn overlay_snapshots(&self) -> PathBuf {
        self.root_dir
            .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots")
    }

    /// The ids in `ctr containers ls -q`.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["containers", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// What [`HostState`](crate::leftovers::HostState) should look at for this
    /// containerd's pods: the peapod state and data directories, upper disks in the
    /// overlayfs snapshots, processes carrying this containerd's directory, and the
    /// network namespaces `netns`.
    pub fn host_filter(&self, netns: &[&str]) -> crate::leftovers::HostFilter {
        crate::leftovers::HostFilter {
            state_dirs: vec![self.state_dir.clone(), self.data_dir.clone()],
            snapshot_dirs: vec![self.overlay_snapshots()],
            netns: netns.iter().map(|s| s.to_string()).collect(),
            markers: vec![self.root_dir.to_string_lossy().into_owned()],
            ..Default::default()
        }
    }

    /// Deletes a stopped task and returns its exit status. `ctr task delete` (1.6)
    /// exits 0 whatever the status, and says a non-zero one on stderr only: "task <id>
    /// exit with non-zero exit code <n>".
    pub fn delete_task(&self, id: &str) -> i32 {
        let out = self.ctr(&["task", "delete", id]);
        if !out.status.success() {
            panic!(
                "ctr task delete {id} failed\n{}\n{}",
                describe_output(&out),
                self.log_tail()
            );
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        match stderr.split_once("exit with non-zero exit code ") {
            Some((_, rest)) => {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().unwrap_or_else(|_| {
                    panic!("ctr task delete {id}: no exit status in {stderr:?}")
                })
            }
            None => 0,
        }
    }
}

impl Containerd {
    /// Best effort, for a test that has already failed, so that it does not litter the
    /// machine: kills and deletes every task and container of the namespace, SIGKILLs
    /// the shims and VMMs that carry this containerd's directory, and lazily unmounts
    /// what is still mounted under it. Never panics.
    pub fn clean_up_after_failure(&self) {
        let t = Duration::from_secs(30);
        let ids: Vec<String> = self
            .run_ctr(&["containers", "ls", "-q"], t, false, None)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            let _ = self.run_ctr(&["task", "kill", "-s", "SIGKILL", id], t, false, None);
        }
        for id in &ids {
            let _ = self.run_ctr(&["task", "delete", "-f", id], t, false, None);
            let _ = self.run_ctr(&["containers", "delete", id], t, false, None);
        }
        let strays = crate::leftovers::HostState::take(&self.host_filter(&[])).process_pids();
        crate::leftovers::kill_stray(&strays);
        for m in mounts_under(&self.root_dir).iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test's containerd log (with the shim's and the guest's lines) is
        // what tells why: keep a copy outside the directory about to go.
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!(
                "peapod-failed-containerd-{}.log",
                self.root_dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
            if std::fs::copy(&self.log, &kept).is_ok() {
                eprintln!("containerd's log is kept in {}", kept.display());
            }
        }
        // Something still mounted under the directory (a leaked container's rootfs) would
        // make its removal reach into the mount: keep the directory then, and say so.
        let mounted = mounts_under(&self.root_dir);
        if let Some(dir) = self.dir.take() {
            if mounted.is_empty() {
                drop(dir);
            } else {
                let kept = dir.keep();
                eprintln!(
                    "containerd's directory {} is kept: mounts remain under it:\n{}",
                    kept.display(),
                    mounted.join("\n")
                );
            }
        }
    }
}

/// The mount points under `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(String::from)
        .collect()
}

/// A command's status, stdout and stderr, for a failure message.
pub fn describe_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// containerd 1.6's config (version 2) with everything it writes under `dir`: root,
/// state, temp, both sockets (gRPC and ttrpc), the `opt` plugin's directory; the
/// debug and metrics listeners off; the CRI plugin's section, or the plugin disabled.
fn containerd_config(
    dir: &Path,
    socket: &Path,
    peapod_config: Option<&Path>,
    opts: &ContainerdOptions,
    version: u32,
) -> String {
    let q = |p: &Path| toml_string(&p.to_string_lossy());
    let (disabled, cri) = match &opts.cri {
        Some(c) => (String::new(), c.to_toml(dir, peapod_config, version)),
        None => (toml_string(CRI_PLUGIN), String::new()),
    };
    let level = opts.log_level.as_deref().unwrap_or("debug");
    let ttrpc = socket.with_extension("sock.ttrpc");
    // containerd 2.x has no "opt" plugin.
    let opt = if version < 3 {
        format!(
            "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n",
            q(&dir.join("opt"))
        )
    } else {
        String::new()
    };
    format!(
        r#"version = {version}
root = {root}
state = {state}
temp = {temp}
disabled_plugins = [{disabled}]

[grpc]
  address = {grpc}

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""
  level = {level}

[metrics]
  address = ""

{opt}{cri}"#,
        root = q(&dir.join("root")),
        state = q(&dir.join("state")),
        temp = q(&dir.join("tmp")),
        grpc = q(socket),
        ttrpc = q(&ttrpc),
        level = toml_string(level),
    )
}

/// A pod's network as a CNI plugin leaves it, for `ctr run --with-ns network:<path>`:
///
/// ```text
///  netns "pod"                                  netns "peer"
///   eth0 10.a.b.2/24, default via 10.a.b.1 <==>  veth 10.a.b.1/24
/// ```
///
/// The shim is to bring the pod's network into the VM (a tap and tc filters in the pod
/// namespace) and take it out again. Both namespaces are deleted on drop.
pub struct PodNetns {
    pub pod: String,
    pub peer: String,
    /// The pod's (eth0's) address, and the peer's, which is the pod's gateway.
    pub pod_ip: Ipv4Addr,
    pub peer_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub veth_peer: String,
}

/// The pod end of [`PodNetns`]'s veth pair.
pub const POD_IFACE: &str = "eth0";

impl PodNetns {
    pub fn new() -> Self {
        require_root();
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // "peapod-test-<kind>-<pid>-<n>", as netns.rs names its namespaces, so that its
        // clean-up of dead tests' namespaces covers these too.
        let (a, b) = (200 + (pid % 50) as u8, (n % 250) as u8);
        let net = PodNetns {
            pod: format!("peapod-test-cpod-{pid}-{n}"),
            peer: format!("peapod-test-cpeer-{pid}-{n}"),
            pod_ip: Ipv4Addr::new(10, a, b, 2),
            peer_ip: Ipv4Addr::new(10, a, b, 1),
            prefix_len: 24,
            veth_peer: format!("ce{pid}x{n}"),
        };
        if let Err(e) = net.build() {
            panic!("building the pod network: {e}");
        }
        net
    }

    fn build(&self) -> Result<(), String> {
        let (pod, peer) = (&self.pod, &self.peer);
        let pod_cidr = format!("{}/{}", self.pod_ip, self.prefix_len);
        let peer_cidr = format!("{}/{}", self.peer_ip, self.prefix_len);
        let gateway = self.peer_ip.to_string();
        let steps: [&[&str]; 10] = [
            &["ip", "netns", "add", pod],
            &["ip", "netns", "add", peer],
            &[
                "ip",
                "-n",
                pod,
                "link",
                "add",
                POD_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                &self.veth_peer,
                "netns",
                peer,
            ],
            &["ip", "-n", pod, "addr", "add", &pod_cidr, "dev", POD_IFACE],
            &["ip", "-n", pod, "link", "set", POD_IFACE, "up"],
            &["ip", "-n", pod, "link", "set", "lo", "up"],
            &["ip", "-n", pod, "route", "add", "default", "via", &gateway],
            &[
                "ip",
                "-n",
                peer,
                "addr",
                "add",
                &peer_cidr,
                "dev",
                &self.veth_peer,
            ],
            &["ip", "-n", peer, "link", "set", &self.veth_peer, "up"],
            &["ip", "-n", peer, "link", "set", "lo", "up"],
        ];
        for args in steps {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("cannot run {args:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// The pod namespace's path, for `ctr run --with-ns network:<path>`.
    pub fn pod_path(&self) -> String {
        format!("/var/run/netns/{}", self.pod)
    }

    /// Connects from the peer namespace to `port` on the pod's address and returns what
    /// the pod sends before it closes the connection; retries until `timeout` (the
    /// server may still be starting).
    pub fn read_from_pod(&self, port: u16, timeout: Duration) -> String {
        let addr = SocketAddr::from((self.pod_ip, port));
        run_in_netns(&self.peer, move || crate::read_until_closed(addr, timeout))
    }
}

impl Default for PodNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
