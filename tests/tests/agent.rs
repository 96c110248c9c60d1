//! The guest agent end to end: the product initramfs (the agent is its /init) on the
//! real kernel, driven over ttrpc on vsock as the shim will drive it.
//!
//! One VM (boots are ~20 s here and every guest syscall costs ~1000x its native
//! price), then in order:
//!
//! a. `Version` and `Health` answer; the agent reports the guest's kernel release.
//! b. `CreateSandbox` with a hostname.
//! c. Container c1 on three regions of one store (a block slot the VMM grows as files
//!    are appended, which the agent maps with device-mapper): the busybox layer (EROFS
//!    where erofs-utils is installed, else ext4), a one-file layer stacked on it, an
//!    ext4 upper disk. Its stdout and stderr are attached before `StartContainer`;
//!    they carry exactly what the process wrote, and `WaitProcess` its exit code.
//!    The other containers take the busybox layer as a whole disk in a slot.
//! d. Container c2 (tmpfs upper) running `sleep`: an exec fed through stdin, an exec
//!    on a terminal, execs into a missing and into a stopped container (errors naming
//!    them), SIGKILL seen as 137 / signal 9.
//! e. Container c3 under a 16 MiB memory limit grows a shell string until the kernel
//!    kills it: a `GetOomEvent` long poll started before it reports c3.
//! f. Container c4 (with the AppArmor and SELinux labels of containerd's CRI) does
//!    some work and keeps its memory: `StatsContainer` sees memory,
//!    CPU time and pids; `ListPids` has its process. It stays running. It also
//!    plants symlinks in a volume the host copied in (`CopyFile`), to the guest's
//!    /etc and to its rootfs (another container's, to any other): `CopyFile`
//!    through them fails, naming the path and the cause, and writes nothing there;
//!    the kubelet's `..data` swap in that volume still reaches c4. An exec into c4
//!    with CAP_MKNOD makes a node of the store that held c1's disks but cannot open
//!    it (the device rules of containerd's CRI, applied in the guest); /dev/null
//!    still opens; c1's mappings went with it.
//! g. Bad input (a disk that is not attached, a spec that is not JSON) gets errors
//!    naming the cause, and the agent still answers and c4 still runs.
//! h. `DestroySandbox` (c4 still running) powers the VM off: the VMM exits on its
//!    own, 0, and its sockets are gone.
//!
//! Container commands avoid shell pipelines where they can: in this guest a process
//! of a busybox pipeline sometimes segfaults (a platform bug under investigation, see
//! tests/tests/devices.rs).

use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use peapod_agent_protocol::{
    rootfs, CopyFileRequest, CreateContainerRequest, CreateSandboxRequest, Disk,
    ExecProcessRequest, GetOomEventRequest, MessageField, RemoveContainerRequest, Rootfs,
    SignalProcessRequest, Stdio, StdioStream, WaitResponse, PROTOCOL,
};
use peapod_tests::agent::{
    attach, error_text, read_all_in_background, read_all_with_timeout, AgentConn, GuestLog,
    RpcResult,
};
use peapod_tests::layers::{
    app_layer, busybox_layer_any, oci_process, oci_spec, to_bytes, upper_disk, with_lsm_labels,
    with_memory_limit, with_seccomp, without_no_new_privs, DiskImage, APP_LAYER_CONTENT,
};
use peapod_tests::{
    guest_kernel_release, host_kernel_release, require_kvm, require_root, VmmOptions, VmmProcess,
    BOOT_TIMEOUT,
};
use peapod_vmm_api::BlockSet;
use serde_json::json;

const GUEST_CID: u32 = 3;
const DAY_NANOS: i64 = 86_400_000_000_000;

fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}
const MEMORY_MIB: &str = "256";
const SLOTS: &str = "8";
/// The serial of the store in slot 0.
const STORE_SERIAL: &str = "pod-store";
const HOSTNAME: &str = "peapod-test";
/// Reading a process's output to its end, and waiting for slow processes.
const IO_TIMEOUT: Duration = Duration::from_secs(240);
/// The OOM container: every page it touches is a guest page fault, ~30 ms each here
/// (32 MiB took 290 s): a small limit, and a long deadline.
const OOM_TIMEOUT: Duration = Duration::from_secs(600);
const MEMORY_LIMIT: u64 = 16 << 20;
const UPPER_TMPFS: u64 = 64 << 20;
const SIGKILL: u32 = 9;
/// The agent's directory of copied files (`CopyFile` paths are relative to it).
const SHARED_DIR: &str = "/run/peapod/shared";
/// A volume the host copies in and c4 binds read-write.
const VOLUME: &str = "vol";

/// The VMM, with its console and log printed if the test fails while it lives.
struct Vm(VmmProcess);

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let console = self.0.console_text();
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!(
                "--- guest console (last 80 lines) ---\n{tail}\n--- VMM log ---\n{}",
                self.0.stderr()
            );
        }
    }
}

fn start_vm(uds: &Path) -> Vm {
    let vsock = format!("cid={GUEST_CID},socket={}", uds.display());
    Vm(VmmProcess::start_with(
        &[
            "--memory",
            MEMORY_MIB,
            "--block-slots",
            SLOTS,
            "--vsock",
            &vsock,
        ],
        VmmOptions::default(),
    ))
}

/// Connects to the agent while the guest boots, failing early if the VMM dies.
fn connect(vm: &mut Vm, uds: &Path) -> AgentConn {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        match AgentConn::connect(uds, Duration::from_secs(10)) {
            Ok(conn) => return conn,
            Err(e) => {
                if let Some(status) = vm.0.try_wait() {
                    panic!("the VMM exited ({status}) before the agent answered: {e}");
                }
                assert!(
                    Instant::now() < deadline,
                    "the agent did not answer in {BOOT_TIMEOUT:?}: {e}"
                );
            }
        }
    }
}

/// Puts `disk` in block slot `slot`.
fn fill_slot(vm: &Vm, slot: u32, disk: &DiskImage, read_only: bool) {
    let set = disk.block_set(slot, read_only);
    vm.0.api()
        .block_set(&set)
        .unwrap_or_else(|e| panic!("block.set {set:?}: {e}"));
}

/// Adds `disk` to the store in block slot `slot` (which an empty slot becomes); the
/// agent's `Disk` for its region.
fn append_to_store(vm: &Vm, slot: u32, disk: &DiskImage, read_only: bool) -> Disk {
    let set = BlockSet {
        id: Some(STORE_SERIAL.into()),
        ..disk.block_set(slot, read_only)
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&disk.path)
        .unwrap();
    let region =
        vm.0.api()
            .block_append_open(&set, &file)
            .unwrap_or_else(|e| panic!("block.append {set:?}: {e}"));
    let mut d = disk.disk();
    d.serial = STORE_SERIAL.into();
    d.start_sector = region.start_sector;
    d.sectors = region.sectors;
    d
}

fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> MessageField<Stdio> {
    let mut s = Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s.terminal = terminal;
    MessageField::some(s)
}

fn rootfs_of(layers: &[&DiskImage], upper: rootfs::Upper) -> MessageField<Rootfs> {
    let mut r = Rootfs::new();
    r.layers = layers.iter().map(|d| d.disk()).collect();
    r.upper = Some(upper);
    MessageField::some(r)
}

fn store_rootfs(layers: &[Disk], upper: rootfs::Upper) -> MessageField<Rootfs> {
    let mut r = Rootfs::new();
    r.layers = layers.to_vec();
    r.upper = Some(upper);
    MessageField::some(r)
}

fn tmpfs_upper() -> rootfs::Upper {
    rootfs::Upper::UpperTmpfsBytes(UPPER_TMPFS)
}

fn create_request(
    id: &str,
    spec: &serde_json::Value,
    rootfs: MessageField<Rootfs>,
    stdio: MessageField<Stdio>,
) -> CreateContainerRequest {
    let mut r = CreateContainerRequest::new();
    r.container_id = id.into();
    r.oci_spec = to_bytes(spec);
    r.rootfs = rootfs;
    r.stdio = stdio;
    r
}

fn exec_request(
    container_id: &str,
    exec_id: &str,
    args: &[&str],
    stdio: MessageField<Stdio>,
) -> ExecProcessRequest {
    let terminal = stdio.terminal;
    let mut r = ExecProcessRequest::new();
    r.container_id = container_id.into();
    r.exec_id = exec_id.into();
    r.oci_process = to_bytes(&oci_process(args, terminal));
    r.stdio = stdio;
    r
}

/// Runs an exec whose stdout alone is attached: what it wrote, and its exit.
fn exec_stdout(
    conn: &AgentConn,
    uds: &Path,
    req: &ExecProcessRequest,
) -> Result<(String, WaitResponse), String> {
    let (id, exec_id) = (&req.container_id, &req.exec_id);
    ok(&format!("ExecProcess {exec_id}"), conn.exec_process(req));
    let mut stdout = attach(uds, StdioStream::Stdout, id, exec_id)
        .unwrap_or_else(|e| panic!("attaching {exec_id}'s stdout: {e}"));
    let got = text(&read_all_with_timeout(&mut stdout, IO_TIMEOUT));
    Ok((got, wait(conn, id, exec_id, IO_TIMEOUT)?))
}

fn signal(conn: &AgentConn, container_id: &str, signal: u32, all: bool) {
    let mut r = SignalProcessRequest::new();
    r.container_id = container_id.into();
    r.signal = signal;
    r.all = all;
    conn.signal_process(&r)
        .unwrap_or_else(|e| panic!("SignalProcess {container_id} {signal}: {}", error_text(&e)));
}

/// The process's exit; an error (for [`step`], which prints the agent's log with it)
/// if it does not come within `timeout`.
fn wait(
    conn: &AgentConn,
    container_id: &str,
    exec_id: &str,
    timeout: Duration,
) -> Result<WaitResponse, String> {
    conn.with_timeout(timeout)
        .wait_process(&AgentConn::process(container_id, exec_id))
        .map_err(|e| format!("WaitProcess {container_id}/{exec_id}: {}", error_text(&e)))
}

fn remove(conn: &AgentConn, id: &str) {
    let mut r = RemoveContainerRequest::new();
    r.container_id = id.into();
    conn.remove_container(&r)
        .unwrap_or_else(|e| panic!("RemoveContainer {id}: {}", error_text(&e)));
}

fn ok<T>(what: &str, r: RpcResult<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", error_text(&e)))
}

/// The agent's error for a call that must fail.
fn err_text<T: std::fmt::Debug>(what: &str, r: RpcResult<T>) -> String {
    match r {
        Ok(v) => panic!("{what} succeeded ({v:?}); it must fail"),
        Err(e) => error_text(&e),
    }
}

/// `CopyFile` of `data` (a file), a directory (`None`) or a symlink to `link` at
/// `path` under the shared directory.
fn copy_request(path: &str, data: Option<&[u8]>, link: &str) -> CopyFileRequest {
    let mut r = CopyFileRequest::new();
    r.path = path.into();
    r.dir = data.is_none() && link.is_empty();
    r.data = data.unwrap_or_default().to_vec();
    r.symlink_target = link.into();
    r
}

fn health(conn: &AgentConn, after: &str) {
    ok(&format!("Health after {after}"), conn.health());
}

/// How often a step may meet the host's known busybox fault before the test fails.
const PLATFORM_ATTEMPTS: u32 = 3;

/// Runs one step of the test, under a fresh id per attempt ("c1", "c1-2", ...). A
/// step that fails is run again only when the guest kernel logged, meanwhile, that
/// it killed a busybox process for the user-mode fault this kind of host produces
/// (docs/platform.md): that failure is the host's, not the agent's. Any other
/// failure, or the fault on every attempt, fails the test.
fn step<T>(
    conn: &AgentConn,
    log: &GuestLog,
    name: &str,
    mut attempt: impl FnMut(&str) -> Result<T, String>,
) -> T {
    for n in 1..=PLATFORM_ATTEMPTS {
        let id = if n == 1 {
            name.to_owned()
        } else {
            format!("{name}-{n}")
        };
        let mark = log.mark();
        let started = Instant::now();
        let failure = match attempt(&id) {
            Ok(v) => {
                eprintln!("{id}: done in {:.1?}", started.elapsed());
                return v;
            }
            Err(e) => e,
        };
        match log.platform_fault_since(mark, Duration::from_secs(2)) {
            Some(fault) if n < PLATFORM_ATTEMPTS => {
                eprintln!("{name}: attempt {n} met the host's busybox fault ({fault}); again");
                // Best effort: a failed exec's container stays; a container goes.
                let mut r = RemoveContainerRequest::new();
                r.container_id = id.clone();
                let _ = conn.remove_container(&r);
            }
            fault => panic!(
                "{name}: {failure}\nguest fault: {fault:?}\n--- agent log ---\n{}",
                log.text()
            ),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Prints the agent's log if the test fails while it is in scope.
struct DumpOnPanic<'a>(&'a GuestLog);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.0.text());
        }
    }
}

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_agent_runs_containers_on_one_vm() {
    require_kvm();
    require_root();
    let files = tempfile::tempdir().unwrap();
    // Build the disks before booting: the guest does not wait on them.
    let base = busybox_layer_any(files.path());
    let app = app_layer(files.path());
    let upper = upper_disk(files.path(), 64 << 20);
    let uds = files.path().join("vsock.sock");
    let mut vm = start_vm(&uds);
    let conn = connect(&mut vm, &uds);
    let log = GuestLog::attach(&uds).expect("attaching to the agent's log");
    let _dump = DumpOnPanic(&log);
    let release = guest_kernel_release();

    // (a) Version and Health.
    let version = ok("Version", conn.version());
    assert!(!version.agent_version.is_empty(), "{version:?}");
    assert!(
        version.protocols.iter().any(|p| p == PROTOCOL),
        "the agent does not list {PROTOCOL}: {version:?}"
    );
    assert_eq!(
        version.kernel_release, release,
        "the agent reports another kernel than the guest's"
    );
    assert_ne!(
        version.kernel_release,
        host_kernel_release(),
        "the agent reports the host's kernel"
    );
    let h = ok("Health", conn.health());
    assert!(
        h.uptime_seconds > 0.0 && h.uptime_seconds < 3600.0,
        "uptime {}",
        h.uptime_seconds
    );

    // (b) The sandbox.
    // The guest's wall clock is set to the request's (a day ahead of the host's here,
    // so that it shows), and the host's random bytes go into its pool.
    let mut sandbox = CreateSandboxRequest::new();
    sandbox.sandbox_id = "sandbox-1".into();
    sandbox.hostname = HOSTNAME.into();
    sandbox.wall_clock_unix_nanos = unix_nanos_now() + DAY_NANOS;
    sandbox.entropy = vec![0x5a; 64];
    ok("CreateSandbox", conn.create_sandbox(&sandbox));

    // (c) c1 on stacked layers and an upper disk, all three regions of one store (as
    // the shim attaches a pod's disks); output attached before it starts. The later
    // containers take the base layer as a whole disk (slot 1).
    let store_disks = [
        append_to_store(&vm, 0, &app, true),
        append_to_store(&vm, 0, &base, true),
    ];
    let store_upper = append_to_store(&vm, 0, &upper, false);
    fill_slot(&vm, 1, &base, true);
    step(&conn, &log, "c1", |id| {
        let spec = oci_spec(
            &[
                "sh",
                "-c",
                "echo hello; uname -r; cat /etc/peapod-layer; echo err >&2; exit 3",
            ],
            false,
        );
        let req = create_request(
            id,
            &spec,
            // Topmost first.
            store_rootfs(&store_disks, rootfs::Upper::UpperDisk(store_upper.clone())),
            stdio(false, true, true, false),
        );
        ok("CreateContainer c1", conn.create_container(&req));
        let out = attach(&uds, StdioStream::Stdout, id, "").expect("attaching c1's stdout");
        let err = attach(&uds, StdioStream::Stderr, id, "").expect("attaching c1's stderr");
        let out = read_all_in_background(out, IO_TIMEOUT);
        let err = read_all_in_background(err, IO_TIMEOUT);
        let started = ok(
            "StartContainer c1",
            conn.start_container(&AgentConn::container(id)),
        );
        assert!(started.pid > 1, "c1's pid {}", started.pid);
        let exit = wait(&conn, id, "", IO_TIMEOUT)?;
        let (out, err) = (text(&out.join().unwrap()), text(&err.join().unwrap()));
        check(
            out == format!("hello\n{release}\n{APP_LAYER_CONTENT}"),
            format!("c1's stdout {out:?} (stderr {err:?}, exit {exit:?})"),
        )?;
        check(err == "err\n", format!("c1's stderr {err:?}"))?;
        check(
            (exit.exit_status, exit.signal) == (3, 0),
            format!("c1 exits 3, no signal: {exit:?}"),
        )?;
        assert!(exit.exited_at_unix_nanos > 0, "{exit:?}");
        remove(&conn, id);
        Ok(())
    });

    // (d) c2 and its execs.
    let c2 = step(&conn, &log, "c2", |id| {
        let req = create_request(
            id,
            &without_no_new_privs(with_seccomp(
                oci_spec(&["sleep", "1000"], false),
                json!({
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{
                        "names": ["chmod", "fchmod", "fchmodat", "fchmodat2"],
                        "action": "SCMP_ACT_ERRNO",
                        "errnoRet": 1,
                    }],
                }),
            )),
            rootfs_of(&[&base], tmpfs_upper()),
            stdio(false, false, false, false),
        );
        ok("CreateContainer c2", conn.create_container(&req));
        ok(
            "StartContainer c2",
            conn.start_container(&AgentConn::container(id)),
        );
        // Past its exec: a platform fault would have killed it by now.
        let pids = ok("ListPids c2", conn.list_pids(&AgentConn::container(id)));
        check(!pids.pids.is_empty(), format!("c2 runs: {pids:?}"))?;
        Ok(id.to_owned())
    });
    let c2 = c2.as_str();

    // e1: stdin in, stdout out; closing stdin ends `cat`. c2's seccomp profile
    // (chmod refused) holds for the exec and for c2's own process, though neither
    // has no_new_privs nor CAP_SYS_ADMIN.
    step(&conn, &log, "e1", |exec_id| {
        let mut process = oci_process(
            &[
                "sh",
                "-c",
                "cat; awk '/^Seccomp:/ { print $2 }' /proc/self/status /proc/1/status; \
                 chmod 700 /tmp 2>&1; echo done",
            ],
            false,
        );
        process
            .as_object_mut()
            .expect("a process object")
            .remove("noNewPrivileges");
        let mut req = exec_request(c2, exec_id, &[], stdio(true, true, false, false));
        req.oci_process = to_bytes(&process);
        ok("ExecProcess e1", conn.exec_process(&req));
        let mut stdin =
            attach(&uds, StdioStream::Stdin, c2, exec_id).expect("attaching e1's stdin");
        let mut stdout =
            attach(&uds, StdioStream::Stdout, c2, exec_id).expect("attaching e1's stdout");
        std::io::Write::write_all(&mut stdin, b"ping\n").unwrap();
        stdin.shutdown(Shutdown::Write).unwrap();
        let got = text(&read_all_with_timeout(&mut stdout, IO_TIMEOUT));
        let exit = wait(&conn, c2, exec_id, IO_TIMEOUT)?;
        check(
            got == "ping\n2\n2\nchmod: /tmp: Operation not permitted\ndone\n",
            format!("e1's stdout {got:?} (exit {exit:?})"),
        )?;
        check(
            (exit.exit_status, exit.signal) == (0, 0),
            format!("e1's exit: {exit:?}"),
        )
    });

    // e2: on a terminal (its output has \r\n line ends). Then deleted, as containerd
    // deletes an exec: the agent forgets it, and its records and descriptors are back
    // where they were (a probe execs every few seconds for a pod's whole life).
    let before = ok("Health before e2", conn.health());
    step(&conn, &log, "e2", |exec_id| {
        let req = exec_request(
            c2,
            exec_id,
            &["sh", "-c", "tty; echo $((6*7))"],
            stdio(true, true, false, true),
        );
        ok("ExecProcess e2", conn.exec_process(&req));
        let stdin = attach(&uds, StdioStream::Stdin, c2, exec_id).expect("attaching e2's stdin");
        let mut stdout =
            attach(&uds, StdioStream::Stdout, c2, exec_id).expect("attaching e2's tty");
        let got = text(&read_all_with_timeout(&mut stdout, IO_TIMEOUT));
        let exit = wait(&conn, c2, exec_id, IO_TIMEOUT)?;
        check(
            got.contains("/dev/pts/"),
            format!("e2 has a terminal: {got:?} (exit {exit:?})"),
        )?;
        check(got.contains("42"), format!("e2's output: {got:?}"))?;
        check(exit.exit_status == 0, format!("e2's exit: {exit:?}"))?;
        let during = ok("Health after e2", conn.health());
        check(
            during.processes == before.processes + 1,
            format!("e2 is kept until deleted: {during:?}, before {before:?}"),
        )?;
        ok(
            "DeleteProcess e2",
            conn.delete_process(&AgentConn::process(c2, exec_id)),
        );
        drop(stdin);
        // The agent closes its ends of e2's streams as it sees them close.
        let deadline = Instant::now() + IO_TIMEOUT;
        let after = loop {
            let after = ok("Health after deleting e2", conn.health());
            let back = (after.processes, after.open_fds) == (before.processes, before.open_fds);
            if back || Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        check(
            (after.processes, after.open_fds) == (before.processes, before.open_fds),
            format!("after deleting e2: {after:?}, before e2: {before:?}"),
        )?;
        let again = err_text(
            "DeleteProcess e2 again",
            conn.delete_process(&AgentConn::process(c2, exec_id)),
        );
        check(again.contains("no such process"), format!("again: {again}"))
    });

    // An exec into a container that does not exist.
    let req = exec_request("nope", "e3", &["true"], stdio(false, false, false, false));
    let e = err_text(
        "ExecProcess into a missing container",
        conn.exec_process(&req),
    );
    assert!(e.contains("nope"), "the error names the container: {e}");
    health(&conn, "an exec into a missing container");

    // SIGKILL: 128 + 9, and the signal.
    signal(&conn, c2, SIGKILL, false);
    let exit = wait(&conn, c2, "", IO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (exit.exit_status, exit.signal),
        (137, 9),
        "c2 after SIGKILL: {exit:?}"
    );
    // An exec into a container whose process has exited.
    let req = exec_request(c2, "e4", &["true"], stdio(false, false, false, false));
    let e = err_text(
        "ExecProcess into a stopped container",
        conn.exec_process(&req),
    );
    assert!(e.contains(c2), "the error names the container: {e}");
    remove(&conn, c2);

    // (e) c3 runs out of its memory; the OOM long poll is out before it starts.
    let oom = conn.spawn_oom_event(PLATFORM_ATTEMPTS * (OOM_TIMEOUT + IO_TIMEOUT));
    // A round trip on the same connection, which also sends the pending request.
    health(&conn, "starting the OOM long poll");
    let c3 = step(&conn, &log, "c3", |id| {
        let spec = with_memory_limit(
            oci_spec(&["sh", "-c", "x=a; while true; do x=$x$x; done"], false),
            MEMORY_LIMIT,
        );
        let req = create_request(
            id,
            &spec,
            rootfs_of(&[&base], tmpfs_upper()),
            stdio(false, false, false, false),
        );
        ok("CreateContainer c3", conn.create_container(&req));
        ok(
            "StartContainer c3",
            conn.start_container(&AgentConn::container(id)),
        );
        let exit = wait(&conn, id, "", OOM_TIMEOUT)?;
        check(
            (exit.exit_status, exit.signal) == (137, 9),
            format!("c3 is killed for memory: {exit:?}"),
        )?;
        Ok(id.to_owned())
    });
    let event = ok("GetOomEvent", conn.join(oom));
    assert_eq!(event.container_id, c3, "the OOM event: {event:?}");
    // Asked again after the same number (a reply the host lost), it answers the same.
    let after = event.seq - 1;
    let again = ok(
        "GetOomEvent again",
        conn.call(|c, ctx| async move {
            let req = GetOomEventRequest {
                after,
                ..Default::default()
            };
            c.get_oom_event(ctx, &req).await
        }),
    );
    assert_eq!(
        (&again.container_id, again.seq),
        (&event.container_id, event.seq),
        "the OOM event asked for again"
    );
    remove(&conn, &c3);

    // (f) c4 works, fills 8 MiB of its /dev/shm (tmpfs memory is charged to its
    // cgroup), and sleeps (the shell stays: `sleep` is not its last command). Its
    // spec carries the labels containerd's CRI adds on AppArmor and SELinux nodes,
    // which the guest (with neither) does not apply.
    ok(
        "CopyFile vol",
        conn.copy_file(&copy_request(VOLUME, None, "")),
    );
    let (c4, c4_pid) = step(&conn, &log, "c4", |id| {
        let plant = format!(
            "ln -sfn /etc /vol/etc; ln -sfn /run/peapod/containers/{id}/rootfs/etc /vol/rootfs; "
        );
        let mut spec = with_lsm_labels(oci_spec(
            &[
                "sh",
                "-c",
                &format!(
                    "{plant}i=0; while [ $i -lt 5000 ]; do i=$((i+1)); done; \
                     dd if=/dev/zero of=/dev/shm/fill bs=1048576 count=8 2>/dev/null; \
                     sleep 1000; echo $i"
                ),
            ],
            false,
        ));
        spec["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/vol", "type": "bind", "source": format!("{SHARED_DIR}/{VOLUME}"),
            "options": ["rbind", "rw"],
        }));
        let req = create_request(
            id,
            &spec,
            rootfs_of(&[&base], tmpfs_upper()),
            stdio(false, false, false, false),
        );
        ok("CreateContainer c4", conn.create_container(&req));
        let started = ok(
            "StartContainer c4",
            conn.start_container(&AgentConn::container(id)),
        );
        let deadline = Instant::now() + IO_TIMEOUT;
        let stats = loop {
            let stats = ok(
                "StatsContainer c4",
                conn.stats_container(&AgentConn::container(id)),
            );
            if stats.pids.current >= 2 && stats.memory.usage_bytes > 4 << 20
                || Instant::now() > deadline
            {
                break stats;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        check(
            stats.memory.usage_bytes > 4 << 20,
            format!("c4 holds 8 MiB in /dev/shm: {stats:?}"),
        )?;
        check(
            stats.pids.current >= 2,
            format!("c4 runs sh and sleep: {stats:?}"),
        )?;
        assert_eq!(stats.memory.limit_bytes, 0, "c4 has no limit: {stats:?}");
        assert!(stats.cpu.usage_usec > 0, "c4 used CPU: {stats:?}");
        let ahead = stats.timestamp_unix_nanos - unix_nanos_now();
        assert!(
            (DAY_NANOS - 600_000_000_000..DAY_NANOS + 600_000_000_000).contains(&ahead),
            "the guest's clock is a day ahead, as CreateSandbox set it: {ahead} ns"
        );
        Ok((id.to_owned(), started.pid))
    });
    let pids = ok("ListPids c4", conn.list_pids(&AgentConn::container(&c4)));
    assert!(
        pids.pids.contains(&c4_pid),
        "ListPids c4 {:?} lacks its process {c4_pid}",
        pids.pids,
    );

    // c4 planted its symlinks before it filled /dev/shm: CopyFile refuses to follow
    // them out of the volume, and the kubelet's atomic update still works.
    for path in ["vol/etc/passwd", "vol/rootfs/peapod-planted"] {
        let e = err_text(
            &format!("CopyFile {path} through a symlink c4 planted"),
            conn.copy_file(&copy_request(path, Some(b"planted\n"), "")),
        );
        assert!(
            e.contains(path) && e.contains("planted there") && e.contains("nothing was written"),
            "the error names the path and the cause: {e}"
        );
    }
    for (path, data, link) in [
        ("vol/..2026_01", None, ""),
        ("vol/..2026_01/key", Some(&b"v1"[..]), ""),
        ("vol/..data", None, "..2026_01"),
        ("vol/key", None, "..data/key"),
    ] {
        ok(
            &format!("CopyFile {path}"),
            conn.copy_file(&copy_request(path, data, link)),
        );
    }
    health(&conn, "CopyFile through planted symlinks");
    step(&conn, &log, "e5", |exec_id| {
        let req = exec_request(
            &c4,
            exec_id,
            &[
                "sh",
                "-c",
                "cat /vol/key; echo; ls /etc/peapod-planted 2>&1",
            ],
            stdio(false, true, false, false),
        );
        let (got, exit) = exec_stdout(&conn, &uds, &req)?;
        check(
            got == "v1\nls: /etc/peapod-planted: No such file or directory\n",
            format!("e5 sees the volume's key, and nothing written in its rootfs: {got:?} (exit {exit:?})"),
        )
    });

    // e6: an exec into c4 (execs join its cgroup) with CAP_MKNOD makes a node of the
    // store in slot 0, which held c1's writable layer: making it is allowed (as runc
    // allows), opening it is not; /dev/null still opens. c4's spec carries the device
    // rules containerd's CRI sends. No mapping of c1's regions is left.
    step(&conn, &log, "e6", |exec_id| {
        let script = format!(
            "ls -d /sys/block/dm-* 2>/dev/null || echo no-dm; \
             for d in /sys/block/vd*; do read s < $d/serial; \
             if [ \"$s\" = {serial} ]; then read mm < $d/dev; fi; done; \
             mknod /dev/other-disk b ${{mm%:*}} ${{mm#*:}} && echo made $mm; \
             dd if=/dev/other-disk of=/dev/null count=1 2>&1; \
             echo x > /dev/null && echo null-ok",
            serial = STORE_SERIAL
        );
        let mut process = oci_process(&["sh", "-c", &script], false);
        for set in ["bounding", "effective", "permitted"] {
            process["capabilities"][set]
                .as_array_mut()
                .expect("capability sets")
                .push(json!("CAP_MKNOD"));
        }
        let mut req = exec_request(&c4, exec_id, &[], stdio(false, true, false, false));
        req.oci_process = to_bytes(&process);
        let (got, exit) = exec_stdout(&conn, &uds, &req)?;
        check(
            got.starts_with("no-dm\nmade ")
                && got.contains("can't open '/dev/other-disk': Operation not permitted")
                && got.ends_with("null-ok\n"),
            format!("e6 makes the node of c1's disk, cannot open it, opens /dev/null: {got:?} (exit {exit:?})"),
        )
    });

    // (g) Bad input: errors that name the cause; the agent carries on.
    let missing = "ppnotattached000";
    let mut ghost = base.clone();
    ghost.serial = missing.into();
    let req = create_request(
        "bad1",
        &oci_spec(&["true"], false),
        rootfs_of(&[&ghost], tmpfs_upper()),
        stdio(false, false, false, false),
    );
    // The agent may give a disk a while to show up before it gives up.
    let e = err_text(
        "CreateContainer on a disk that is not attached",
        conn.with_timeout(IO_TIMEOUT)
            .call(|c, ctx| async move { c.create_container(ctx, &req).await }),
    );
    assert!(e.contains(missing), "the error names the serial: {e}");
    health(&conn, "a missing disk");

    let mut req = create_request(
        "bad2",
        &oci_spec(&["true"], false),
        rootfs_of(&[&base], tmpfs_upper()),
        stdio(false, false, false, false),
    );
    req.oci_spec = b"{\"ociVersion\": \"1.0.2\", \"process\": ".to_vec();
    let e = err_text(
        "CreateContainer with a malformed spec",
        conn.create_container(&req),
    );
    assert!(
        e.to_lowercase().contains("spec"),
        "the error says the spec is wrong: {e}"
    );
    health(&conn, "a malformed spec");
    let pids = ok(
        "ListPids c4 after the bad input",
        conn.list_pids(&AgentConn::container(&c4)),
    );
    assert!(
        pids.pids.contains(&c4_pid),
        "c4 survives the bad input: {:?}",
        pids.pids
    );

    // (h) DestroySandbox with c4 still running: the VM powers off.
    let reply = conn.destroy_sandbox();
    if let Err(e) = &reply {
        // The power-off may beat the answer out of the guest; an error status may not.
        assert!(
            !matches!(e, peapod_agent_protocol::ttrpc::Error::RpcStatus(_)),
            "DestroySandbox: {}",
            error_text(e)
        );
    }
    drop(conn);
    let status = vm.0.wait_exit(Duration::from_secs(60));
    let log = vm.0.stderr();
    assert!(
        status.success(),
        "VMM exit {status} after DestroySandbox\n{log}"
    );
    assert!(
        log.contains("the guest powered off"),
        "the VMM stops because the guest powered off:\n{log}"
    );
    assert!(!log.contains("panicked"), "the VMM panicked:\n{log}");
    assert!(!uds.exists(), "the vsock socket is removed on exit");
    assert!(
        !vm.0.api_socket.exists(),
        "the API socket is removed on exit"
    );
}
