//! vCPU threads: one per vCPU, running KVM_RUN and dispatching port I/O, and the
//! controls the VMM uses to pause, resume and stop them.
//!
//! A vCPU thread is taken out of KVM_RUN by a signal (`KICK_SIGNAL`) whose handler
//! sets `immediate_exit` in the thread's `kvm_run`: if the signal lands just before
//! KVM_RUN is entered, KVM returns at once instead of running the guest.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use peapod_devices::Bus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{Seccomp, ThreadClass};
use crate::snapshot::kvm_state::KvmStateError;
use crate::snapshot::VcpuState;

/// SIGRTMIN + 0 kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    // The kvm_run area of the vCPU this thread runs. Const-initialised with no
    // destructor, so reading it in a signal handler is sound.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set while its VcpuFd is
        // alive and cleared before it is dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn register_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    target: Target,
    /// vCPU threads currently parked because of a pause.
    parked: usize,
    /// A snapshot asked of the parked threads: each reads its vCPU's state (only its
    /// thread holds the fd) into its slot.
    saving: Option<Vec<Option<Result<VcpuState, KvmStateError>>>>,
}

/// Shared between the VMM and its vCPU threads.
struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        peapod_devices::lock(&self.state)
    }

    /// Waits while `busy` holds of the state, at most `timeout`.
    fn wait_while<'a>(
        &self,
        state: MutexGuard<'a, ControlState>,
        timeout: Duration,
        busy: impl FnMut(&mut ControlState) -> bool,
    ) -> (MutexGuard<'a, ControlState>, std::sync::WaitTimeoutResult) {
        self.changed
            .wait_timeout_while(state, timeout, busy)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks while paused, reading vCPU `id`'s state with `save` when a snapshot
    /// asks for it. Returns false when the thread should stop.
    fn wait_until_runnable(
        &self,
        id: u8,
        save: impl Fn() -> Result<VcpuState, KvmStateError>,
    ) -> bool {
        let mut state = self.lock();
        if state.target == Target::Pause {
            state.parked += 1;
            self.changed.notify_all();
            while state.target == Target::Pause {
                let slot = state
                    .saving
                    .as_mut()
                    .and_then(|slots| slots.get_mut(usize::from(id)));
                if let Some(slot @ None) = slot {
                    *slot = Some(save());
                    self.changed.notify_all();
                }
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            state.parked -= 1;
        }
        state.target == Target::Run
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU threads did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("cannot start vCPU thread {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("the VM is not paused: a snapshot is taken of a paused VM")]
    NotPaused,
    #[error("vCPU threads did not save their state within {0:?} (a vCPU has stopped?)")]
    SaveTimeout(Duration),
    #[error(transparent)]
    Save(#[from] KvmStateError),
}

/// The running vCPUs of a VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

/// Everything a vCPU thread needs besides its own fd and CPUID.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub memory: GuestMemoryMmap,
    pub exit: Arc<ExitSignal>,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Arc<[u32]>,
}

/// A vCPU ready to run: its fd and the CPUID the VMM gave it.
pub struct ReadyVcpu {
    pub fd: VcpuFd,
    pub cpuid: CpuId,
}

impl Vcpus {
    /// Starts one thread per vCPU, each under its seccomp filter, held before its first
    /// KVM_RUN until [`Vcpus::resume`].
    pub fn start(
        ready: Vec<ReadyVcpu>,
        ctx: VcpuContext,
        seccomp: Seccomp,
    ) -> Result<Self, VcpuError> {
        let control = Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                target: Target::Pause,
                parked: 0,
                saving: None,
            }),
            changed: Condvar::new(),
        });
        let mut vcpus = Self {
            control,
            threads: Vec::new(),
        };
        for (id, vcpu) in ready.into_iter().enumerate() {
            let id = id as u8;
            let control = vcpus.control.clone();
            let ctx = ctx.clone();
            let thread = seccomp
                .spawn(format!("vcpu{id}"), ThreadClass::Vcpu, move || {
                    run_vcpu(id, vcpu, &control, &ctx)
                })
                .map_err(|e| VcpuError::Spawn(id, e))?;
            vcpus.threads.push(thread);
        }
        Ok(vcpus)
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: pthread_kill with a valid pthread_t (the thread is joinable, so its
            // id is live) and a signal whose handler is installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Returns once every vCPU is out of guest mode and parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let mut state = self.control.lock();
        state.target = Target::Pause;
        drop(state);
        self.kick_all();
        let n = self.threads.len();
        let (_state, waited) = self
            .control
            .wait_while(self.control.lock(), TIMEOUT, |s| s.parked < n);
        if waited.timed_out() {
            return Err(VcpuError::PauseTimeout(TIMEOUT));
        }
        Ok(())
    }

    /// Every vCPU's state, for a snapshot of the paused VM; each is read by its own
    /// thread.
    pub fn save(&self) -> Result<Vec<VcpuState>, VcpuError> {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let n = self.threads.len();
        let mut state = self.control.lock();
        if state.target != Target::Pause || state.parked < n {
            return Err(VcpuError::NotPaused);
        }
        state.saving = Some((0..n).map(|_| None).collect());
        self.control.changed.notify_all();
        let (mut state, waited) = self.control.wait_while(state, TIMEOUT, |s| {
            s.saving
                .as_ref()
                .is_some_and(|slots| slots.iter().any(Option::is_none))
        });
        if waited.timed_out() {
            state.saving = None;
            return Err(VcpuError::SaveTimeout(TIMEOUT));
        }
        let slots = state.saving.take().unwrap_or_default();
        Ok(slots.into_iter().flatten().collect::<Result<Vec<_>, _>>()?)
    }

    pub fn resume(&self) {
        self.control.lock().target = Target::Run;
        self.control.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.control.lock().target == Target::Pause
    }

    /// Stops every vCPU thread and waits for it to end.
    pub fn stop(&mut self) {
        self.control.lock().target = Target::Stop;
        self.control.changed.notify_all();
        self.kick_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

fn run_vcpu(id: u8, vcpu: ReadyVcpu, control: &VcpuControl, ctx: &VcpuContext) {
    let ReadyVcpu { mut fd, cpuid } = vcpu;
    KVM_RUN.with(|p| p.set(fd.get_kvm_run()));
    let mut first_run = true;
    while control.wait_until_runnable(id, || VcpuState::save(&fd, id, &cpuid, &ctx.msr_indices)) {
        if first_run && id == 0 {
            log::info!("vcpu0: first KVM_RUN at monotonic_ns={}", monotonic_ns());
        }
        first_run = false;
        if let Some(reason) = run_once(id, &mut fd, ctx) {
            ctx.exit.raise(reason);
            break;
        }
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// One KVM_RUN and its exit. Returns why the VM must stop, if it must.
fn run_once(id: u8, fd: &mut VcpuFd, ctx: &VcpuContext) -> Option<ExitReason> {
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff); // nothing on the bus
            }
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            ctx.pio.write(u64::from(port), data);
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ctx.mmio.write(addr, data);
            None
        }
        Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestReset), // triple fault: reboot=t
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            log::info!("vcpu{id}: system event {kind}");
            Some(ExitReason::GuestReset)
        }
        Ok(VcpuExit::Hlt) => Some(ExitReason::GuestHalted),
        Ok(VcpuExit::InternalError) => {
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
            // active member of the exit union.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            Some(ExitReason::VcpuFailed(format!(
                "vcpu{id}: KVM internal error, suberror {suberror}{} {}",
                if suberror == 1 {
                    " (emulation failure)"
                } else {
                    ""
                },
                guest_state(fd, &ctx.memory)
            )))
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::VcpuFailed(format!(
            "vcpu{id}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        Ok(other) => {
            let what = format!("{other:?}");
            Some(ExitReason::VcpuFailed(format!(
                "vcpu{id}: unexpected exit {what} {}",
                guest_state(fd, &ctx.memory)
            )))
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(ExitReason::VcpuFailed(format!("vcpu{id}: KVM_RUN: {e}"))),
    }
}

/// RIP and the instruction bytes there, to find in the kernel's System.map.
fn guest_state(fd: &VcpuFd, memory: &GuestMemoryMmap) -> String {
    let Ok(regs) = fd.get_regs() else {
        return String::from("(registers unreadable)");
    };
    let mut code = [0u8; 16];
    let code_str = match fd.translate_gva(regs.rip) {
        Ok(t) if t.valid != 0 => {
            match memory.read_slice(&mut code, GuestAddress(t.physical_address)) {
                Ok(()) => code
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(_) => "unreadable".into(),
            }
        }
        _ => "unmapped".into(),
    };
    format!(
        "at RIP={:#x} RSP={:#x} code: {code_str} (look RIP up in the guest kernel's System.map)",
        regs.rip, regs.rsp
    )
}

pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}
