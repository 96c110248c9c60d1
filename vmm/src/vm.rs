//! Building a VM from a `VmConfig` and running it until it stops.
//!
//! Data flow: config -> KVM VM (irqchip, PIT, memory) -> kernel, initrd, zero page,
//! MP table in guest memory -> devices on the port-I/O bus -> vCPU threads. The event
//! loop (this thread) then waits for a reason to stop: the guest's reset, a signal, an
//! API shutdown or a dead vCPU; API requests are answered on the way.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use peapod_devices::legacy::{
    SerialConsole, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN, I8042, I8042_PORT_BASE, I8042_PORT_LEN,
};
use peapod_devices::{lock, Bus, BusDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ApiCall, ApiRequest, ApiResponse, ApiSocket, VmInfo, VmState};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, Console, VmConfig};
use crate::cpu::{self, cpuid::vcpu_cpuid, CpuSetupError};
use crate::devices::{self, VirtioDevices};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::{self, MemoryError};
use crate::mptable::{self, MptableError};
use crate::platform::Platform;
use crate::seccomp::{Seccomp, SeccompError, ThreadClass};
use crate::snapshot::{
    self, kvm_state, state_file, SnapshotError, StateFileError, VmKvmState, VmSnapshot,
    MEMORY_FILE, STATE_FILE,
};
use crate::vcpu::{self, ReadyVcpu, VcpuContext, Vcpus};

/// Kernel command-line words the VMM always passes. `reboot=k`: the guest resets
/// through the i8042, which ends the VMM. `panic=1`: a panicked guest resets too.
const BASE_CMDLINE: &[&str] = &["reboot=k", "panic=1", "quiet"];
const CONSOLE_ON: &str = "console=ttyS0";
/// No UART on the bus: keep the 8250 driver from probing for one.
const CONSOLE_OFF: &str = "8250.nr_uarts=0";

/// KVM capabilities the VMM cannot do without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::UserMemory, "user memory"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("/dev/kvm: {0} (is KVM enabled on this host, and may this user open /dev/kvm?)")]
    KvmOpen(kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which the VMM needs")]
    KvmCapability(&'static str),
    #[error("vcpus = {wanted}: this host's KVM allows at most {max} vCPUs per VM")]
    TooManyVcpus { wanted: u8, max: usize },
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    CpuSetup(#[from] CpuSetupError),
    #[error("console {path}: cannot open it for writing: {source}")]
    ConsoleOpen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error("devices: {0}")]
    Bus(#[from] peapod_devices::BusError),
    #[error(transparent)]
    Devices(#[from] crate::devices::DeviceError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Boots the VM described by `config` and runs it until it stops.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmError> {
    let mut timeline = Timeline::start();
    config.validate()?;
    let platform = Platform::detect(config.platform_quirks);
    let restoring = match &config.restore {
        Some(dir) => Some((
            dir.as_path(),
            VmSnapshot::load(dir, config.vcpus, config.memory_mib)?,
        )),
        None => None,
    };
    if platform.emulating_host {
        log::info!("host KVM emulates guest kernel code: applying the platform workarounds");
    }

    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::KvmCapability(name));
        }
    }
    if restoring.is_some() {
        kvm_state::check_capabilities(&kvm).map_err(SnapshotError::from)?;
    }
    // Only a snapshot needs the list: a boot goes on without it.
    let msr_indices: Arc<[u32]> = kvm_state::msr_indices(&kvm)
        .unwrap_or_else(|e| {
            log::warn!("{e}; this VM cannot be snapshotted");
            Vec::new()
        })
        .into();
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max_vcpus {
        return Err(VmError::TooManyVcpus {
            wanted: config.vcpus,
            max: max_vcpus,
        });
    }

    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(kvm_err("set identity map address"))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    timeline.mark("kvm vm");

    let mem_size = config.memory_bytes();
    let memory = match &restoring {
        None => memory::create_guest_memory(mem_size)?,
        Some((dir, _)) => {
            snapshot::memory::map(&dir.join(MEMORY_FILE), mem_size).map_err(SnapshotError::from)?
        }
    };
    timeline.mark("guest memory mapped");

    // Registering guest memory with KVM costs milliseconds on some hosts, and only
    // KVM_RUN needs it: it runs beside everything else that prepares the guest.
    // A restore sets MSRs that name guest pages (kvmclock, async page faults), which
    // KVM looks up at once: its memory is registered first.
    let (registered, prepared) = match &restoring {
        None => std::thread::scope(|s| {
            let registering = s.spawn(|| memory::register_guest_memory(&vm, &memory));
            let prepared = prepare_guest(&kvm, &vm, &memory, config, platform, &mut timeline);
            (registering.join(), prepared)
        }),
        Some((_, snapshot)) => {
            memory::register_guest_memory(&vm, &memory)?;
            let restored = restore_guest(&kvm, &vm, &memory, config, platform, snapshot);
            (Ok(Ok(())), restored)
        }
    };
    let Prepared {
        vcpus,
        machine:
            Machine {
                pio,
                mmio,
                devices,
                exit,
                reset,
            },
    } = prepared?;
    registered.expect("memory registration does not panic")?;
    timeline.mark("guest memory registered");

    // Handlers first: a SIGTERM that lands once the socket exists must still run the
    // teardown that removes it.
    let (signals, signal_pipe) = UnixStream::pair().map_err(io_err("signal pipe"))?;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let pipe = signal_pipe.try_clone().map_err(io_err("signal pipe"))?;
        signal_hook::low_level::pipe::register(sig, pipe).map_err(io_err("signal handler"))?;
    }
    signals
        .set_nonblocking(true)
        .map_err(io_err("signal pipe"))?;
    vcpu::register_kick_handler().map_err(io_err("vCPU kick handler"))?;
    let seccomp = Seccomp::new(config.seccomp);
    let mut api_socket = ApiSocket::bind(&config.api_socket_path())?;

    let (api_calls, api_queue) = mpsc::channel();
    let api_wake = EventFd::new(EFD_NONBLOCK).map_err(io_err("api eventfd"))?;
    api_socket
        .serve(
            api_calls,
            api_wake.try_clone().map_err(io_err("api eventfd"))?,
            seccomp,
        )
        .map_err(io_err("api thread"))?;
    timeline.mark("api and signals");
    log::info!(
        "api socket {}; {} vCPU(s), {} MiB; set up in {} us",
        api_socket.path().display(),
        config.vcpus,
        config.memory_mib,
        timeline.total_us()
    );
    log::debug!("set-up timeline (us): {}", timeline.report());

    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        memory: memory.clone(),
        exit: exit.clone(),
        msr_indices,
    };
    let vcpus = Vcpus::start(vcpus, ctx, seccomp)?;
    let vm = Arc::new(vm);
    let subscribers = devices.subscribers().to_vec();
    let controller = Arc::new(Mutex::new(Controller {
        devices,
        exit: exit.clone(),
        reset,
        signals,
        api_wake,
        api_queue,
        vcpus,
        vm: vm.clone(),
        memory: memory.clone(),
        info: VmInfo {
            state: VmState::Running,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            platform_quirks: platform.emulating_host,
            devices: Vec::new(),
        },
    }));
    let loop_result = event_loop(controller.clone(), subscribers, &exit, seccomp);

    // Teardown, on every way out: vCPU threads joined, then the devices (the vsock
    // socket file goes with its device), the VM, guest memory and the API socket file
    // (removed by ApiSocket).
    lock(&controller).vcpus.stop();
    drop(controller);
    drop(memory);
    drop(vm);
    drop(api_socket);
    loop_result?;
    Ok(exit.reason().unwrap_or(ExitReason::GuestReset))
}

/// A guest ready to run, but for its vCPU threads.
struct Prepared {
    vcpus: Vec<ReadyVcpu>,
    machine: Machine,
}

/// What a VM has besides its vCPUs and memory: the buses with their devices, and the
/// events that end it.
struct Machine {
    pio: Bus,
    mmio: Bus,
    devices: VirtioDevices,
    exit: Arc<ExitSignal>,
    reset: EventFd,
}

impl Machine {
    fn build(vm: &VmFd, memory: &GuestMemoryMmap, config: &VmConfig) -> Result<Self, VmError> {
        let exit = Arc::new(ExitSignal::new().map_err(io_err("exit eventfd"))?);
        let reset = EventFd::new(EFD_NONBLOCK).map_err(io_err("reset eventfd"))?;
        let pio = build_pio_bus(vm, config, &reset)?;
        let mut mmio = Bus::new();
        let devices = VirtioDevices::build(vm, memory, config, &mut mmio)?;
        Ok(Machine {
            pio,
            mmio,
            devices,
            exit,
            reset,
        })
    }
}

/// Puts kernel, initrd and boot data in guest memory, builds the devices and
/// configures the vCPUs.
fn prepare_guest(
    kvm: &Kvm,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    platform: Platform,
    timeline: &mut Timeline,
) -> Result<Prepared, VmError> {
    let mem_size = config.memory_bytes();
    let kernel = boot::load_kernel(memory, mem_size, &config.kernel)?;
    let initrd = boot::load_initrd(memory, mem_size, kernel.end, &config.initrd)?;
    timeline.mark("images loaded");

    let machine = Machine::build(vm, memory, config)?;
    timeline.mark("devices");

    let mut words: Vec<&str> = BASE_CMDLINE.to_vec();
    words.push(match config.console {
        Console::Off => CONSOLE_OFF,
        _ => CONSOLE_ON,
    });
    words.extend(platform.cmdline_words());
    words.extend(machine.devices.cmdline_words());
    let cmdline = boot::build_cmdline(&words, &config.cmdline)?;
    if let Ok(c) = cmdline.as_cstring() {
        log::info!("kernel command line: {}", c.to_string_lossy());
    }
    boot::write_boot_params(memory, mem_size, &cmdline, &initrd)?;
    mptable::setup_mptable(memory, config.vcpus)?;
    cpu::write_boot_page_tables_and_gdt(memory)?;
    timeline.mark("boot data");

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        let cpuid = vcpu_cpuid(&supported, id, config.vcpus, platform.hidden_features());
        cpu::configure_vcpu(&fd, id, &cpuid, kernel.entry.0)?;
        vcpus.push(ReadyVcpu { fd, cpuid });
    }
    timeline.mark("vcpus configured");
    Ok(Prepared { vcpus, machine })
}

/// Builds the devices as for a boot, then sets the snapshot's state into the VM, its
/// vCPUs and its devices (in that order: a device's interrupt raised on restore must
/// land in the restored interrupt controllers).
fn restore_guest(
    kvm: &Kvm,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    platform: Platform,
    snapshot: &VmSnapshot,
) -> Result<Prepared, VmError> {
    let mut machine = Machine::build(vm, memory, config)?;
    snapshot.vm.restore(vm).map_err(SnapshotError::from)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let mut vcpus = Vec::new();
    for (id, state) in (0..config.vcpus).zip(&snapshot.vcpus) {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        let cpuid = vcpu_cpuid(&supported, id, config.vcpus, platform.hidden_features());
        state
            .restore(kvm, &fd, &cpuid)
            .map_err(SnapshotError::from)?;
        vcpus.push(ReadyVcpu { fd, cpuid });
    }
    machine
        .devices
        .restore(&snapshot.devices)
        .map_err(SnapshotError::from)?;
    Ok(Prepared { vcpus, machine })
}

/// How long each set-up phase took, for `--log-level debug` and the boot benchmark.
struct Timeline {
    start: Instant,
    last: Instant,
    phases: Vec<(&'static str, u128)>,
}

impl Timeline {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, (now - self.last).as_micros()));
        self.last = now;
    }

    fn total_us(&self) -> u128 {
        self.start.elapsed().as_micros()
    }

    fn report(&self) -> String {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(p, us)| format!("{p} {us}"))
            .collect();
        parts.join(", ")
    }
}

/// What the guest may write into a console file: the console is the guest's to fill,
/// the host's disk (or tmpfs) is not.
const CONSOLE_FILE_MAX_BYTES: u64 = 16 << 20;

/// A console file that takes `max` bytes and then one line saying the rest was
/// dropped: a boot's first messages are the ones worth keeping.
struct CappedFile<W> {
    out: W,
    left: u64,
    told: bool,
}

impl<W: Write> CappedFile<W> {
    fn new(out: W, max: u64) -> Self {
        Self {
            out,
            left: max,
            told: false,
        }
    }
}

impl<W: Write> Write for CappedFile<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n == 0 {
            if !self.told {
                self.told = true;
                let _ = self
                    .out
                    .write_all(b"\n[peapod-vmm: the console file is full; the rest is dropped]\n");
            }
            // Taken and dropped: the guest's UART does not stall.
            return Ok(buf.len());
        }
        let n = self.out.write(&buf[..n])?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn build_pio_bus(vm: &VmFd, config: &VmConfig, reset: &EventFd) -> Result<Bus, VmError> {
    let mut bus = Bus::new();
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(
        reset.try_clone().map_err(io_err("reset eventfd"))?,
    )));
    bus.insert(I8042_PORT_BASE.into(), I8042_PORT_LEN.into(), i8042)?;

    let out: Box<dyn Write + Send> = match &config.console {
        Console::Off => return Ok(bus),
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(path) => Box::new(CappedFile::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::ConsoleOpen {
                    path: path.clone(),
                    source,
                })?,
            CONSOLE_FILE_MAX_BYTES,
        )),
    };
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("serial irqfd"))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("register serial irqfd"))?;
    let serial: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(SerialConsole::new(irq, out)));
    bus.insert(COM1_PORT_BASE.into(), COM1_PORT_LEN.into(), serial)?;
    Ok(bus)
}

fn event_loop(
    controller: Arc<Mutex<Controller>>,
    devices: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    exit: &ExitSignal,
    seccomp: Seccomp,
) -> Result<(), VmError> {
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(controller.clone());
    for device in devices {
        events.add_subscriber(device);
    }
    // Every thread is under its filter before the guest's first instruction.
    seccomp.install(ThreadClass::Main)?;
    lock(&controller).vcpus.resume();
    while exit.reason().is_none() {
        events
            .run()
            .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    }
    Ok(())
}

/// Owns the running VM's vCPUs and answers everything that arrives on the event loop.
struct Controller {
    devices: VirtioDevices,
    exit: Arc<ExitSignal>,
    reset: EventFd,
    signals: UnixStream,
    api_wake: EventFd,
    api_queue: mpsc::Receiver<ApiCall>,
    vcpus: Vcpus,
    /// For snapshots: the VM's own state and its memory.
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// What `vm.info` reports besides the state, which the vCPU controls hold.
    info: VmInfo,
}

impl Controller {
    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::Info => ApiResponse::Info(VmInfo {
                state: if self.vcpus.is_paused() {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                devices: self.devices.info(),
                ..self.info.clone()
            }),
            ApiRequest::Pause if self.vcpus.is_paused() => {
                ApiResponse::conflict("the VM is already paused")
            }
            ApiRequest::Pause => match self.vcpus.pause() {
                Ok(()) => ApiResponse::Done,
                Err(e) => ApiResponse::failed(e.to_string()),
            },
            ApiRequest::Resume if !self.vcpus.is_paused() => {
                ApiResponse::conflict("the VM is not paused")
            }
            ApiRequest::Resume => {
                self.vcpus.resume();
                ApiResponse::Done
            }
            ApiRequest::Shutdown => {
                self.exit.raise(ExitReason::ApiShutdown);
                ApiResponse::Done
            }
            ApiRequest::Snapshot(_) if !self.vcpus.is_paused() => {
                ApiResponse::conflict("the VM is running: pause it (vm.pause) first")
            }
            ApiRequest::Snapshot(create) => match self.snapshot(&create.dir) {
                Ok(()) => ApiResponse::Done,
                Err(e) => ApiResponse::failed(e.to_string()),
            },
            ApiRequest::BlockSet { set, file } => {
                let backing = devices::backing(set.path, set.read_only, set.id, file);
                self.devices
                    .set_block_slot(set.slot as usize, backing)
                    .into()
            }
            ApiRequest::BlockClear(clear) => {
                self.devices.clear_block_slot(clear.slot as usize).into()
            }
            ApiRequest::BlockAppend { set, file } => {
                let backing = devices::backing(set.path, set.read_only, set.id, file);
                match self.devices.append_to_store(set.slot as usize, backing) {
                    Ok(region) => ApiResponse::Region(region),
                    Err(e) => Err(e).into(),
                }
            }
            ApiRequest::BlockRemove(remove) => self
                .devices
                .remove_from_store(remove.slot as usize, remove.start_sector)
                .into(),
        }
    }
}

impl Controller {
    /// Writes the paused VM into `dir`: memory first, the state file last (a
    /// directory without one is no snapshot).
    fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StateFileError::Io {
                    path: state_path,
                    what: "removing the previous one",
                    source: e,
                }
                .into())
            }
            _ => {}
        }
        let vcpus = self.vcpus.save()?;
        let devices = self.devices.save()?;
        let vm = VmKvmState::save(&self.vm)?;
        let written = snapshot::memory::write(&self.memory, &dir.join(MEMORY_FILE))?;
        let state = VmSnapshot {
            vcpu_count: self.info.vcpus,
            memory_mib: self.info.memory_mib,
            vm,
            vcpus,
            devices,
        };
        state_file::write(&state_path, &state)?;
        log::info!(
            "snapshot in {}: {} MiB of memory written, in {} ms",
            dir.display(),
            written >> 20,
            started.elapsed().as_millis()
        );
        Ok(())
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.exit.event.as_raw_fd(),
            self.reset.as_raw_fd(),
            self.signals.as_raw_fd(),
            self.api_wake.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.event.as_raw_fd() {
            let _ = self.exit.event.read();
        } else if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.exit.raise(ExitReason::GuestReset);
        } else if fd == self.signals.as_raw_fd() {
            let mut drain = [0u8; 16];
            while matches!(self.signals.read(&mut drain), Ok(n) if n > 0) {}
            self.exit.raise(ExitReason::Signal);
        } else if fd == self.api_wake.as_raw_fd() {
            let _ = self.api_wake.read();
            while let Ok(call) = self.api_queue.try_recv() {
                let response = self.handle(call.request);
                let _ = call.reply.send(response);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::CappedFile;

    #[test]
    fn a_console_file_keeps_its_first_bytes_and_says_the_rest_went() {
        let mut file = CappedFile::new(Vec::new(), 10);
        for byte in b"0123456789abcdef" {
            // The UART writes a byte at a time, and every byte is taken.
            assert_eq!(file.write(&[*byte]).unwrap(), 1);
        }
        file.write_all(b"more").unwrap();
        let text = String::from_utf8(file.out).unwrap();
        assert_eq!(
            text,
            "0123456789\n[peapod-vmm: the console file is full; the rest is dropped]\n"
        );
    }
}
