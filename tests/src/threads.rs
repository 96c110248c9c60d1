//! A process's threads as the kernel sees them: their names, their seccomp mode, and
//! a way to make one of them issue a system call of our choosing (through ptrace),
//! which is what a guest that took over a VMM thread would do, without the exploit.

use std::time::Duration;

use nix::sys::ptrace;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// `(tid, name)` of every thread of `pid`.
pub fn threads(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("threads of {pid}: {e}"))
        .filter_map(|e| {
            let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The thread's `Seccomp:` line in /proc: 0 none, 1 strict, 2 filter.
pub fn seccomp_mode(pid: i32, tid: i32) -> u8 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap_or_else(|e| panic!("status of thread {tid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Seccomp line for thread {tid}:\n{status}"))
}

/// The tid of `pid`'s thread called `name`.
pub fn thread_named(pid: i32, name: &str) -> i32 {
    let all = threads(pid);
    all.iter()
        .find(|(_, n)| n == name)
        .map(|(t, _)| *t)
        .unwrap_or_else(|| panic!("no thread {name} in {pid}: {all:?}"))
}

/// The process (thread group) thread `tid` belongs to.
fn tgid_of(tid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `x86_64`'s `syscall` instruction.
const SYSCALL_INSN: u64 = 0x050f;

/// What became of a thread made to issue a system call.
#[derive(Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The thread died of this signal (a seccomp kill is SIGSYS).
    Killed(i32),
    /// It made the call and ran on (it is detached again).
    Survived,
}

/// Makes thread `tid` issue system call `nr` with `args`: stops it, points it at the
/// `syscall` instruction it last ran (it sleeps in one: epoll_wait, accept, KVM_RUN)
/// with our number and arguments, and lets it go; then waits up to `timeout` to see
/// whether the call killed it.
pub fn make_thread_call(tid: i32, nr: i64, args: [u64; 3], timeout: Duration) -> CallOutcome {
    let t = Pid::from_raw(tid);
    ptrace::seize(t, ptrace::Options::empty()).unwrap_or_else(|e| panic!("seize {tid}: {e}"));
    let stop = || {
        ptrace::interrupt(t).unwrap_or_else(|e| panic!("interrupt {tid}: {e}"));
        match waitpid(t, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..)) => {}
            other => panic!("thread {tid} did not stop: {other:?}"),
        }
    };
    for _ in 0..100 {
        stop();
        let mut regs = ptrace::getregs(t).unwrap_or_else(|e| panic!("getregs {tid}: {e}"));
        let before = (regs.rip - 2) as ptrace::AddressType;
        let code = ptrace::read(t, before).map_or(0, |w| w as u64 & 0xffff);
        if code != SYSCALL_INSN {
            // Caught between system calls: let it run into the next one.
            ptrace::cont(t, None).unwrap_or_else(|e| panic!("cont {tid}: {e}"));
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        regs.rip -= 2;
        regs.rax = nr as u64;
        // Not a syscall to restart: the kernel leaves rip and rax as set.
        regs.orig_rax = u64::MAX;
        (regs.rdi, regs.rsi, regs.rdx) = (args[0], args[1], args[2]);
        ptrace::setregs(t, regs).unwrap_or_else(|e| panic!("setregs {tid}: {e}"));
        ptrace::cont(t, None).unwrap_or_else(|e| panic!("cont {tid}: {e}"));
        // A traced thread that dies is ours to reap: until then its process cannot be.
        // Only peeked at (WNOWAIT) first: a process's first thread is its parent's to
        // reap, and the parent may be us.
        let leader = tgid_of(tid) == Some(tid);
        let reap = |outcome: CallOutcome| {
            if !leader {
                let _ = waitpid(t, Some(WaitPidFlag::__WALL));
            }
            outcome
        };
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let flags = WaitPidFlag::__WALL
                | WaitPidFlag::WNOHANG
                | WaitPidFlag::WNOWAIT
                | WaitPidFlag::WEXITED
                | WaitPidFlag::WSTOPPED;
            match waitid(Id::Pid(t), flags) {
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return reap(CallOutcome::Killed(sig as i32))
                }
                Ok(WaitStatus::Exited(..)) => return reap(CallOutcome::Killed(0)),
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
                // A stop on the way (a signal's delivery): take it, let the signal through.
                Ok(WaitStatus::Stopped(_, sig)) => {
                    let _ = waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
                    let _ = ptrace::cont(t, Some(sig));
                }
                Ok(_) => {
                    let _ = waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
                    let _ = ptrace::cont(t, None);
                }
                Err(e) => panic!("waiting for thread {tid}: {e}"),
            }
        }
        stop();
        ptrace::detach(t, None).unwrap_or_else(|e| panic!("detach {tid}: {e}"));
        return CallOutcome::Survived;
    }
    panic!("thread {tid} was never caught in a system call");
}

/// Panics unless every thread of `pid` runs under a seccomp filter: for tests that
/// show a workload ran with the VMM's filters on.
pub fn assert_all_filtered(pid: i32) {
    let all = threads(pid);
    for (tid, name) in &all {
        assert_eq!(
            seccomp_mode(pid, *tid),
            2,
            "thread {name} ({tid}) of {pid} runs without a seccomp filter: {all:?}"
        );
    }
}
