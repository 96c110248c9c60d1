//! The VMM as the wall between a hostile guest and the node: every thread under its
//! seccomp filter, and a thread that leaves it takes the VMM down.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use peapod_tests::threads::{
    assert_all_filtered, make_thread_call, seccomp_mode, thread_named, threads, CallOutcome,
};
use peapod_tests::{require_root, VmmProcess};

/// The VMM's thread names: the event loop keeps the binary's name.
const CLASSES: [&str; 3] = ["peapod-vmm", "api", "vcpu0"];
/// socket(AF_INET, SOCK_STREAM): no VMM thread may open a network socket.
const INET_SOCKET: [u64; 3] = [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0];
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

fn started(args: &[&str]) -> VmmProcess {
    let mut vm = VmmProcess::start(args);
    vm.wait_for_api(Duration::from_secs(30));
    // The API answers once the event loop runs, after every filter is in.
    vm.api().info().unwrap_or_else(|e| panic!("vm.info: {e}"));
    vm
}

#[test]
fn a_vmm_thread_that_leaves_its_filter_kills_the_vmm() {
    require_root();
    for class in CLASSES {
        let mut vm = started(&[]);
        assert_all_filtered(vm.pid());
        let tid = thread_named(vm.pid(), class);
        let outcome = make_thread_call(tid, libc::SYS_socket, INET_SOCKET, KILL_TIMEOUT);
        assert_eq!(outcome, CallOutcome::Killed(libc::SIGSYS), "{class}");
        let status = vm.wait_exit(KILL_TIMEOUT);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{class}: the VMM should die of SIGSYS, not {status}\n{}",
            vm.stderr()
        );
    }
}

#[test]
fn without_filters_the_vmm_says_so() {
    let mut vm = started(&["--no-seccomp"]);
    for (tid, name) in threads(vm.pid()) {
        assert_eq!(seccomp_mode(vm.pid(), tid), 0, "thread {name}");
    }
    // The call that kills a filtered VMM is made, and the VMM runs on.
    let api_thread = thread_named(vm.pid(), "api");
    let outcome = make_thread_call(
        api_thread,
        libc::SYS_socket,
        INET_SOCKET,
        Duration::from_secs(2),
    );
    assert_eq!(outcome, CallOutcome::Survived);
    vm.api()
        .shutdown()
        .unwrap_or_else(|e| panic!("vm.shutdown: {e}"));
    let status = vm.wait_exit(Duration::from_secs(30));
    let log = vm.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("seccomp filters are OFF (--no-seccomp)"),
        "no warning that the filters are off:\n{log}"
    );
}

/// A SIGTERM's handler sends on the VMM's signal pipe, which only the event loop may:
/// the other threads block SIGTERM and SIGINT, so a stop always lands there and ends
/// the VMM cleanly instead of tripping a filter.
#[test]
fn stop_signals_go_to_the_event_loop_only() {
    let mut vm = started(&[]);
    let blocked = |tid: i32| {
        let status = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", vm.pid()))
            .unwrap_or_else(|e| panic!("status of {tid}: {e}"));
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no SigBlk for {tid}:\n{status}"));
        let bit = |sig: i32| mask & (1 << (sig - 1)) != 0;
        bit(libc::SIGTERM) && bit(libc::SIGINT)
    };
    for (tid, name) in threads(vm.pid()) {
        let expected = name != "peapod-vmm";
        assert_eq!(
            blocked(tid),
            expected,
            "thread {name} blocks SIGTERM/SIGINT"
        );
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let status = vm.wait_exit(KILL_TIMEOUT);
    let log = vm.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
}
