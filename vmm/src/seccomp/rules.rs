//! What each VMM thread class may ask of the kernel, and with which arguments.
//!
//! Compiled to BPF by `build.rs` (this file is that script's module, not the
//! library's). The lists come from `strace -f` of the VMM through the boot, devices
//! and shim tests (block, slots, net, vsock, the API, pause, reset, SIGTERM), and are
//! kept to what each class does *after* it installs its filter: everything that only
//! builds the VM (KVM_CREATE_*, the memory regions, binding sockets) happens before.
//! A call missing here kills the VMM with SIGSYS; `--no-seccomp` and the kernel's
//! audit line (`type=1326 ... syscall=N`) tell which.

use seccompiler::{
    BackendError as Error, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompRule,
};

/// The thread classes, as `build.rs` names their programs.
pub const CLASSES: [&str; 3] = ["main", "vcpu", "api"];

type Rules = Vec<(i64, Vec<SeccompRule>)>;

// ioctl request numbers (from the kernel's uapi headers, x86_64).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_TRANSLATE: u64 = 0xc018_ae85;
// A snapshot: each vCPU thread reads its vCPU, the event loop the VM.
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_GET_MSRS: u64 = 0xc008_ae88;
const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
const KVM_GET_TSC_KHZ: u64 = 0xaea3;
const KVM_GET_XSAVE: u64 = 0x9000_aea4;
const KVM_GET_XCRS: u64 = 0x8188_aea6;
const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
const KVM_GET_PIT2: u64 = 0x8070_ae9f;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const FIONBIO: u64 = 0x5421;
/// The socket type's bits in socket(2)'s second argument (the rest are flags).
const SOCK_TYPE_MASK: u64 = 0xf;

/// One condition: argument `arg` compared with `value`.
fn arg(arg: u8, op: Op, value: u64) -> Result<Cond, Error> {
    Cond::new(arg, Len::Qword, op, value)
}

/// A rule per value: the call is allowed when argument `index` equals any of them.
fn any_of(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, Error> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![Cond::new(index, Len::Dword, Op::Eq, v)?]))
        .collect()
}

fn ioctls(requests: &[u64]) -> Result<(i64, Vec<SeccompRule>), Error> {
    Ok((libc::SYS_ioctl, any_of(1, requests)?))
}

/// Mappings that are never executable: no thread loads code after start.
fn no_exec(nr: i64) -> Result<(i64, Vec<SeccompRule>), Error> {
    let prot = libc::PROT_EXEC as u64;
    Ok((
        nr,
        vec![SeccompRule::new(vec![arg(2, Op::MaskedEq(prot), 0)?])?],
    ))
}

/// Unconditionally allowed calls.
fn plain(nrs: &[i64]) -> Rules {
    nrs.iter().map(|&nr| (nr, Vec::new())).collect()
}

/// What every thread of a Rust program on glibc does: allocate, lock, log to stderr,
/// handle a signal, end (tgkill, for abort, is per class: see [`rules`]).
fn common() -> Result<Rules, Error> {
    let mut r = plain(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_sched_getaffinity,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_clock_gettime,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The panic hook shortens source paths against the working directory: without
        // it a panic's message is lost to SIGSYS.
        libc::SYS_getcwd,
    ]);
    r.push(no_exec(libc::SYS_mmap)?);
    r.push(no_exec(libc::SYS_mprotect)?);
    // The logger empties a full log file (stderr, appended to) and nothing else.
    r.push((
        libc::SYS_ftruncate,
        vec![SeccompRule::new(vec![
            arg(0, Op::Eq, libc::STDERR_FILENO as u64)?,
            arg(1, Op::Eq, 0)?,
        ])?],
    ));
    Ok(r)
}

/// The event loop: virtqueues of every device (disk files, the tap, vsock's unix
/// sockets), the API's calls (block.set opens and sizes files; vm.snapshot reads the
/// VM's state and writes files), kicking vCPUs, teardown (joins, unmaps guest
/// memory, removes the socket files).
fn main_thread() -> Result<Rules, Error> {
    let mut r = plain(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_lseek,
        libc::SYS_openat,
        libc::SYS_statx,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_unlink,
        // vsock: the deadline of host connections waiting for the guest.
        libc::SYS_timerfd_settime,
    ]);
    // vsock connects to the host's unix sockets, and nothing else.
    r.push((
        libc::SYS_socket,
        vec![SeccompRule::new(vec![
            Cond::new(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?,
            Cond::new(
                1,
                Len::Dword,
                Op::MaskedEq(SOCK_TYPE_MASK),
                libc::SOCK_STREAM as u64,
            )?,
        ])?],
    ));
    r.push((
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    ));
    r.push(ioctls(&[
        FIONBIO,
        TUNSETOFFLOAD,
        KVM_GET_IRQCHIP,
        KVM_GET_CLOCK,
        KVM_GET_PIT2,
    ])?);
    Ok(r)
}

/// KVM_RUN and the exits it dispatches: MMIO and port accesses, which may activate a
/// device (an eventfd cloned, the tap's offloads set) and log; reading the vCPU's
/// state for a snapshot.
fn vcpu_thread() -> Result<Rules, Error> {
    Ok(vec![
        ioctls(&[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_TRANSLATE,
            TUNSETOFFLOAD,
            KVM_GET_SREGS,
            KVM_GET_MSRS,
            KVM_GET_LAPIC,
            KVM_GET_MP_STATE,
            KVM_GET_VCPU_EVENTS,
            KVM_GET_DEBUGREGS,
            KVM_GET_TSC_KHZ,
            KVM_GET_XSAVE,
            KVM_GET_XCRS,
        ])?,
        (libc::SYS_fcntl, any_of(1, &[libc::F_DUPFD_CLOEXEC as u64])?),
    ])
}

/// One request at a time from the API socket, answered on the same connection.
fn api_thread() -> Result<Rules, Error> {
    // recvmsg: a request may come with the descriptor of a disk (block.set "fd").
    let mut r = plain(&[libc::SYS_accept4, libc::SYS_recvmsg, libc::SYS_sendto]);
    // The read timeout on a connection.
    r.push((
        libc::SYS_setsockopt,
        vec![SeccompRule::new(vec![
            Cond::new(1, Len::Dword, Op::Eq, libc::SOL_SOCKET as u64)?,
            Cond::new(2, Len::Dword, Op::Eq, libc::SO_RCVTIMEO as u64)?,
        ])?],
    ));
    Ok(r)
}

/// Every rule of `class`, the common ones included.
pub fn rules(class: &str) -> Result<Rules, Error> {
    let own = match class {
        "main" => main_thread()?,
        "vcpu" => vcpu_thread()?,
        "api" => api_thread()?,
        other => panic!("no seccomp rules for thread class {other}"),
    };
    // abort() on a panic raises SIGABRT at itself; the main thread also kicks vCPUs
    // with SIGRTMIN (glibc's first free one, 34).
    let own_signals: &[u64] = match class {
        "main" => &[libc::SIGABRT as u64, libc::SIGRTMIN() as u64],
        _ => &[libc::SIGABRT as u64],
    };
    let mut all = common()?;
    all.push((libc::SYS_tgkill, any_of(2, own_signals)?));
    for (nr, rules) in own {
        assert!(
            !all.iter().any(|(n, _)| *n == nr),
            "{class}: syscall {nr} is in the common rules too"
        );
        all.push((nr, rules));
    }
    Ok(all)
}
