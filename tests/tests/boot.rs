//! Boots the real guest kernel and initramfs under KVM.

use std::path::Path;
use std::time::{Duration, Instant};

use peapod_vmm_api::{paths, Method, VmState};

use peapod_tests::agent::AgentConn;
use peapod_tests::{
    guest_kernel_release, host_kernel_release, ready_release, VmmProcess, BOOT_TIMEOUT,
    POWEROFF_AFTER_READY, READY_PREFIX,
};

/// Boots to the agent's ready line, then the agent powers off and the VMM exits 0.
/// `cmdline` is appended to the kernel command line, `args` to the VMM's.
fn boot_and_power_off(cmdline: &str, args: &[&str]) -> (String, String) {
    let cmdline = format!("{POWEROFF_AFTER_READY} {cmdline}");
    let mut all = vec!["--cmdline", &cmdline];
    all.extend_from_slice(args);
    let mut vm = VmmProcess::start(&all);
    let console = vm.wait_for_console(READY_PREFIX, BOOT_TIMEOUT);
    let status = vm.wait_exit(Duration::from_secs(30));
    let log = vm.stderr();
    assert!(
        status.success(),
        "VMM exit {status} after the guest powered off\n{log}"
    );
    assert!(
        log.contains("stopped: the guest powered off"),
        "the VMM stops because of the guest's power-off:\n{log}"
    );
    assert!(!vm.api_socket.exists(), "the API socket is removed on exit");
    (console, log)
}

#[test]
fn guest_reports_ready_with_its_own_kernel_release() {
    let (console, _) = boot_and_power_off("", &[]);
    let release = ready_release(&console).expect("ready line");
    assert_eq!(release, guest_kernel_release());
    assert_ne!(
        release,
        host_kernel_release(),
        "the guest runs its own kernel"
    );
}

#[test]
fn ten_boots_in_a_row_all_reach_ready() {
    for i in 0..10 {
        let (console, _) = boot_and_power_off("", &[]);
        assert!(ready_release(&console).is_some(), "boot {i}: no ready line");
    }
}

#[test]
fn two_vcpus_both_come_up() {
    // loglevel=7 after the VMM's `quiet` brings back the SMP bring-up message.
    let (console, _) = boot_and_power_off("loglevel=7", &["--vcpus", "2"]);
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "guest did not bring up both vCPUs:\n{console}"
    );
    assert!(
        console.contains("smpboot: Max logical packages: 1"),
        "the vCPUs are cores of one package, not packages of their own:\n{console}"
    );
}

/// Waits until the guest has booted and gone idle: a booting guest keeps its vCPU
/// thread busy on this host; an idle one (the agent waiting) costs next to nothing.
fn wait_until_idle(vm: &mut VmmProcess) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let before = vm.cpu_time();
        std::thread::sleep(Duration::from_secs(1));
        assert!(vm.try_wait().is_none(), "VMM exited:\n{}", vm.stderr());
        if vm.cpu_time() - before < Duration::from_millis(100) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "guest still busy after {BOOT_TIMEOUT:?}"
        );
    }
}

#[test]
fn guest_without_a_console_boots_and_stays_up() {
    // The default: no console, so PID 1 starts without stdin/stdout/stderr.
    let mut vm = VmmProcess::start(&["--console", "off"]);
    wait_until_idle(&mut vm);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.try_wait().is_none(),
        "the guest died after booting:\n{}",
        vm.stderr()
    );
    vm.api()
        .shutdown()
        .unwrap_or_else(|e| panic!("vm.shutdown: {e}"));
    let status = vm.wait_exit(Duration::from_secs(10));
    let log = vm.stderr();
    assert!(
        status.success() && log.contains("shutdown requested over the API"),
        "{log}"
    );
}

#[test]
fn api_pauses_resumes_and_shuts_down_the_vm() {
    let mut vm = VmmProcess::start(&[]);
    vm.wait_for_api(Duration::from_secs(10));
    let sock = vm.api_socket.clone();
    let api = vm.api();

    let info = api.info().unwrap_or_else(|e| panic!("vm.info: {e}"));
    assert_eq!(info.state, VmState::Running, "{info:?}");

    api.pause().unwrap_or_else(|e| panic!("vm.pause: {e}"));
    assert_eq!(api.info().unwrap().state, VmState::Paused);
    assert_eq!(
        api.pause().unwrap_err().status(),
        Some(409),
        "pausing twice is a conflict"
    );
    // A booting guest on this host keeps its vCPU thread busy; a paused one costs nothing.
    let before = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let paused_cpu = vm.cpu_time() - before;
    assert!(
        paused_cpu < Duration::from_millis(300),
        "paused VM used {paused_cpu:?} of CPU"
    );

    api.resume().unwrap_or_else(|e| panic!("vm.resume: {e}"));
    assert_eq!(api.resume().unwrap_err().status(), Some(409));
    vm.wait_for_console(READY_PREFIX, BOOT_TIMEOUT);

    // What the typed calls cannot say: a path and a method the VMM does not serve.
    let reply = api
        .send(Method::Get, "/api/v1/vm.nothing", b"", None)
        .unwrap();
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("no such endpoint"), "{}", reply.body);
    let wrong_method = api.send(Method::Get, paths::VM_SHUTDOWN, b"", None);
    assert_eq!(wrong_method.unwrap().status, 405);

    api.shutdown()
        .unwrap_or_else(|e| panic!("vm.shutdown: {e}"));
    let status = vm.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", vm.stderr());
    assert!(!sock.exists(), "the API socket is removed on shutdown");
}

#[test]
fn sigterm_stops_the_vmm_cleanly() {
    let mut vm = VmmProcess::start(&[]);
    vm.wait_for_api(Duration::from_secs(10));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let status = vm.wait_exit(Duration::from_secs(10));
    let log = vm.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    assert!(!vm.api_socket.exists());
}

#[test]
fn shutdown_and_sigterm_while_paused_stop_the_vmm() {
    // Parked vCPU threads must wake and end on either kind of stop.
    for stop in ["api", "sigterm"] {
        let mut vm = VmmProcess::start(&[]);
        vm.wait_for_api(Duration::from_secs(10));
        vm.api()
            .pause()
            .unwrap_or_else(|e| panic!("{stop}: vm.pause: {e}"));
        if stop == "api" {
            vm.api()
                .shutdown()
                .unwrap_or_else(|e| panic!("vm.shutdown: {e}"));
        } else {
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
        }
        let status = vm.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{stop}: {status}\n{}", vm.stderr());
        assert!(!vm.api_socket.exists(), "{stop}: socket left behind");
    }
}

/// Connects to the agent of `vm` through `uds`, failing early if the VMM dies.
fn agent_of(vm: &mut VmmProcess, uds: &Path) -> AgentConn {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        match AgentConn::connect(uds, Duration::from_secs(5)) {
            Ok(conn) => return conn,
            Err(e) => {
                if let Some(status) = vm.try_wait() {
                    panic!(
                        "the VMM exited ({status}) before the agent answered: {e}\n{}",
                        vm.stderr()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "the agent did not answer in {BOOT_TIMEOUT:?}: {e}"
                );
            }
        }
    }
}

fn vsock_args(uds: &Path) -> String {
    format!("cid=3,socket={}", uds.display())
}

#[test]
fn a_snapshot_of_a_ready_guest_restores_and_its_agent_answers() {
    const MEMORY: &str = "256";
    let files = tempfile::tempdir().unwrap();
    let (uds, uds2) = (files.path().join("a.sock"), files.path().join("b.sock"));
    let snapshot = files.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();

    // A guest booted to its agent, with a connection open (as the shim has one).
    let booted_at = Instant::now();
    let vsock = vsock_args(&uds);
    let mut vm = VmmProcess::start(&["--memory", MEMORY, "--block-slots", "1", "--vsock", &vsock]);
    let conn = agent_of(&mut vm, &uds);
    let boot_time = booted_at.elapsed();
    let uptime = conn.health().expect("Health").uptime_seconds;
    let api = vm.api();
    assert_eq!(
        api.snapshot(&snapshot).unwrap_err().status(),
        Some(409),
        "a running VM is not snapshotted"
    );
    api.pause().unwrap();
    let started = Instant::now();
    api.snapshot(&snapshot)
        .unwrap_or_else(|e| panic!("vm.snapshot: {e}\n{}", vm.stderr()));
    let snapshot_time = started.elapsed();
    api.shutdown().unwrap();
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
    drop(conn);

    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    assert_eq!(memory.len(), 256 << 20);
    let (allocated, _) = peapod_tests::allocated_bytes(&snapshot);
    assert!(
        allocated < memory.len(),
        "pages of zeros are holes: {allocated} bytes allocated"
    );

    // A new VMM from the snapshot: the agent answers on a new connection, the guest's
    // clock goes on from the snapshot, and the restored VMM can be paused and stopped.
    let started = Instant::now();
    let vsock = vsock_args(&uds2);
    let snapshot_arg = snapshot.display().to_string();
    let mut restored = VmmProcess::start(&[
        "--memory",
        MEMORY,
        "--block-slots",
        "1",
        "--vsock",
        &vsock,
        "--restore",
        &snapshot_arg,
    ]);
    let conn = agent_of(&mut restored, &uds2);
    let restore_time = started.elapsed();
    let health = conn.health().expect("Health after the restore");
    assert!(
        health.uptime_seconds >= uptime,
        "the guest's clock went back: {} < {uptime}",
        health.uptime_seconds
    );
    assert!(conn.version().is_ok());
    let api = restored.api();
    assert_eq!(api.info().unwrap().state, VmState::Running);
    eprintln!(
        "figures: boot to agent {:.1} s; snapshot {} ms ({} MiB of 256 written); \
         restore to agent {:.2} s ({:.0}x faster)",
        boot_time.as_secs_f64(),
        snapshot_time.as_millis(),
        allocated >> 20,
        restore_time.as_secs_f64(),
        boot_time.as_secs_f64() / restore_time.as_secs_f64()
    );
    api.shutdown().unwrap();
    assert!(restored.wait_exit(Duration::from_secs(10)).success());

    // A damaged snapshot is refused by name, before anything runs.
    let state = snapshot.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&state, bytes).unwrap();
    let mut refused = VmmProcess::start(&[
        "--memory",
        MEMORY,
        "--vsock",
        &vsock,
        "--restore",
        &snapshot_arg,
    ]);
    let status = refused.wait_exit(Duration::from_secs(10));
    let log = refused.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("vm.state") && log.contains("checksum"),
        "the error names the file and the cause: {log}"
    );
}
