//! seccomp filters, one per thread class: the event loop (main), each vCPU, the API.
//!
//! The rules are in `seccomp/rules.rs`; `build.rs` compiles them to BPF, so the binary
//! carries the programs. Each thread installs its own filter before it does anything
//! on the guest's behalf (vCPU threads before their first KVM_RUN; they are held until
//! the main thread has installed its own), and a system call outside it kills the
//! VMM (SIGSYS, logged by the kernel's audit as `type=1326 ... syscall=N`).

use std::sync::mpsc;
use std::thread::JoinHandle;

use seccompiler::{sock_filter, BpfProgram};

mod compiled {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Which filter a thread runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    /// The event loop: devices, the API's calls, signals, teardown.
    Main,
    /// KVM_RUN and what its exits dispatch (port and MMIO accesses).
    Vcpu,
    /// Reads requests from the API socket and writes the answers.
    Api,
}

impl ThreadClass {
    fn program(self) -> BpfProgram {
        let table = match self {
            Self::Main => compiled::MAIN,
            Self::Vcpu => compiled::VCPU,
            Self::Api => compiled::API,
        };
        table
            .iter()
            .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install the {class:?} thread's seccomp filter: {source} (the host kernel needs CONFIG_SECCOMP_FILTER; --no-seccomp runs without filters, for debugging only)")]
pub struct SeccompError {
    class: ThreadClass,
    source: seccompiler::Error,
}

/// Whether threads get their filters; `--no-seccomp` turns them off.
#[derive(Debug, Clone, Copy)]
pub struct Seccomp {
    enabled: bool,
}

impl Seccomp {
    pub fn new(enabled: bool) -> Self {
        if !enabled {
            log::warn!(
                "seccomp filters are OFF (--no-seccomp): a guest that takes over a VMM \
                 thread has every system call of the VMM's user. Debugging only."
            );
        }
        Self { enabled }
    }

    /// Puts the calling thread under `class`'s filter, for good.
    pub fn install(self, class: ThreadClass) -> Result<(), SeccompError> {
        if !self.enabled {
            return Ok(());
        }
        seccompiler::apply_filter(&class.program()).map_err(|source| SeccompError { class, source })
    }

    /// Starts a thread that installs `class`'s filter before it runs `f`; returns
    /// once the filter is in place (or the error, and the thread never runs `f`).
    pub fn spawn<F>(self, name: String, class: ThreadClass, f: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let (installed, result) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            block_stop_signals();
            let r = self.install(class);
            let ok = r.is_ok();
            let _ = installed.send(r);
            if ok {
                f();
            }
        })?;
        match result.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other(format!(
                "the {class:?} thread ended before installing its seccomp filter"
            ))),
        }
    }
}

/// SIGTERM and SIGINT go to the event loop's thread: their handler sends on the signal
/// pipe, which a vCPU thread's filter does not allow (and need not).
fn block_stop_signals() {
    // SAFETY: sigemptyset/sigaddset on a local set, then pthread_sigmask for the calling
    // thread only; no pointer outlives the calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child under `class`'s filter; the child's wait status.
    fn in_filtered_child(class: ThreadClass, f: fn() -> i32) -> libc::c_int {
        let program = class.program();
        // SAFETY: fork in a test process; the child only installs the filter (prctl
        // and seccomp, no allocation: the program is built before the fork), makes raw
        // system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // The child's stderr is /dev/null: what a filter lets a thread do to
            // stderr (the logger's ftruncate) must not touch the test's output.
            // SAFETY: open and dup2 with a constant path, in the child.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                libc::dup2(null, libc::STDERR_FILENO);
            }
            let code = match seccompiler::apply_filter(&program) {
                Ok(()) => f(),
                Err(_) => 99,
            };
            // SAFETY: _exit ends the forked child without running the parent's atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child, into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn every_class_compiles_to_a_program() {
        for class in [ThreadClass::Main, ThreadClass::Vcpu, ThreadClass::Api] {
            assert!(class.program().len() > 10, "{class:?}");
        }
    }

    #[test]
    fn a_vcpu_thread_that_opens_a_socket_is_killed() {
        let status = in_filtered_child(ThreadClass::Vcpu, || {
            // SAFETY: a raw socket(2) with constant arguments.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(killed_by_sigsys(status), "wait status {status:#x}");
    }

    #[test]
    fn the_api_thread_cannot_exec() {
        let status = in_filtered_child(ThreadClass::Api, || {
            let path = c"/bin/true".as_ptr();
            let argv = [path, std::ptr::null()];
            // SAFETY: execve with NUL-terminated argv and a null envp.
            unsafe { libc::execve(path, argv.as_ptr(), std::ptr::null()) };
            0
        });
        assert!(killed_by_sigsys(status), "wait status {status:#x}");
    }

    #[test]
    fn the_event_loop_may_not_map_executable_memory() {
        let status = in_filtered_child(ThreadClass::Main, || {
            // SAFETY: an anonymous mapping nothing uses; the filter is what is tested.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            0
        });
        assert!(killed_by_sigsys(status), "wait status {status:#x}");
    }

    #[test]
    fn any_thread_may_empty_stderr_and_no_other_file() {
        for class in [ThreadClass::Main, ThreadClass::Vcpu, ThreadClass::Api] {
            // On /dev/null it fails (EINVAL), which is not the filter's doing.
            // SAFETY: ftruncate on the child's own stderr, /dev/null.
            let status = in_filtered_child(class, || unsafe {
                libc::syscall(libc::SYS_ftruncate, libc::STDERR_FILENO, 0);
                7
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
                "{class:?}: ftruncate(2, 0): wait status {status:#x}"
            );
            // SAFETY: as above, with a length the filter refuses.
            let status = in_filtered_child(class, || unsafe {
                libc::syscall(libc::SYS_ftruncate, libc::STDERR_FILENO, 4096);
                0
            });
            assert!(killed_by_sigsys(status), "{class:?}: ftruncate(2, 4096)");
            // SAFETY: ftruncate on fd 0 (the filter kills before the kernel looks).
            let status = in_filtered_child(class, || unsafe {
                libc::syscall(libc::SYS_ftruncate, 0, 0);
                0
            });
            assert!(killed_by_sigsys(status), "{class:?}: ftruncate(0, 0)");
        }
    }

    #[test]
    fn what_a_class_needs_it_may_do() {
        for class in [ThreadClass::Main, ThreadClass::Vcpu, ThreadClass::Api] {
            let status = in_filtered_child(class, || {
                let mut buf = [0u8; 8];
                // SAFETY: raw system calls on constant arguments and a local buffer.
                let ok = unsafe {
                    libc::syscall(libc::SYS_write, 2, b"".as_ptr(), 0) == 0
                        && libc::syscall(libc::SYS_getrandom, buf.as_mut_ptr(), 8, 0) == 8
                };
                if ok {
                    7
                } else {
                    1
                }
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
                "{class:?}: wait status {status:#x}"
            );
        }
    }
}
