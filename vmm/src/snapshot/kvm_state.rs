//! What KVM holds of a VM (its interrupt controllers, PIT and clock) and of each vCPU
//! (registers, FPU and extended state, MSRs, local APIC, pending events), saved from
//! a paused VM and set into a new one.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// What a restore that cannot be done asks of the user.
const FIX: &str = "boot the VM instead, and make the snapshot again on this host";

#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("{what}: KVM: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("snapshots need KVM's {0}, which this host's KVM lacks")]
    Capability(&'static str),
    #[error(
        "vCPU {vcpu}: the snapshot's CPUID is not what this host gives a new vCPU \
         ({difference}): it was made on another CPU or host kernel; {FIX}"
    )]
    OtherCpu { vcpu: u8, difference: String },
    #[error(
        "vCPU {vcpu}: KVM took {set} of the snapshot's {wanted} MSRs and refused MSR \
         {refused:#x}: the snapshot was made on another host kernel; {FIX}"
    )]
    Msrs {
        vcpu: u8,
        set: usize,
        wanted: usize,
        refused: u32,
    },
    #[error(
        "vCPU {vcpu}: the snapshot's TSC runs at {saved} kHz, this host's at {here} kHz, \
         and KVM cannot scale it; {FIX}"
    )]
    Tsc { vcpu: u8, saved: u32, here: u32 },
    #[error("the snapshot has {saved} vCPUs, the VM {here}; {FIX}")]
    VcpuCount { saved: usize, here: usize },
}

type Result<T> = std::result::Result<T, KvmStateError>;

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    let what = what.into();
    move |source| KvmStateError::Kvm { what, source }
}

/// The capabilities a snapshot's state needs besides those every VM needs.
pub fn check_capabilities(kvm: &Kvm) -> Result<()> {
    for (cap, name) in [
        (Cap::Xsave, "XSAVE state (KVM_CAP_XSAVE)"),
        (Cap::Xcrs, "extended control registers (KVM_CAP_XCRS)"),
        (Cap::VcpuEvents, "vCPU events (KVM_CAP_VCPU_EVENTS)"),
        (Cap::Debugregs, "debug registers (KVM_CAP_DEBUGREGS)"),
        (Cap::AdjustClock, "the VM clock (KVM_CAP_ADJUST_CLOCK)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmStateError::Capability(name));
        }
    }
    Ok(())
}

/// The VM-wide state KVM keeps: the two PICs, the IO-APIC, the PIT and the clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm(format!("reading irqchip {chip_id}")))?;
    Ok(chip)
}

impl VmKvmState {
    /// Reads it from `vm`, whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self> {
        Ok(VmKvmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("reading the PIT"))?,
            clock: vm.get_clock().map_err(kvm("reading the VM clock"))?,
        })
    }

    /// Sets it into `vm`, made with an irqchip and a PIT, before its vCPUs run. The
    /// guest's clock goes on from where it stopped.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(kvm(format!("setting irqchip {}", chip.chip_id)))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("setting the PIT"))?;
        // The flags say how the clock was read (stable TSC, host time); setting takes
        // none of them but KVM_CLOCK_REALTIME, which would count the time in between.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("setting the VM clock"))
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    /// The TSC's rate, where KVM says it.
    tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads vCPU `id`'s state from `fd`; its VM is paused. `cpuid` is what the VMM
    /// gave the vCPU (KVM_GET_CPUID2 is no echo of it: some hosts' KVM answers with
    /// other feature bits than it was set); `msr_indices` the MSRs to save
    /// ([`msr_indices`]).
    pub fn save(fd: &VcpuFd, id: u8, cpuid: &CpuId, msr_indices: &[u32]) -> Result<Self> {
        let what = |w: &str| format!("vCPU {id}: reading {w}");
        if msr_indices.is_empty() {
            return Err(KvmStateError::Capability("the list of MSRs to save"));
        }
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm(what("its MP state")))?,
            regs: fd.get_regs().map_err(kvm(what("its registers")))?,
            sregs: fd.get_sregs().map_err(kvm(what("its special registers")))?,
            xsave: fd.get_xsave().map_err(kvm(what("its XSAVE state")))?,
            xcrs: fd.get_xcrs().map_err(kvm(what("its XCRs")))?,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm(what("its debug registers")))?,
            lapic: fd.get_lapic().map_err(kvm(what("its local APIC")))?,
            msrs: read_msrs(fd, msr_indices).map_err(kvm(what("its MSRs")))?,
            events: fd.get_vcpu_events().map_err(kvm(what("its events")))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Sets the state into `fd`, a new vCPU of a restored VM, which would have been
    /// given `cpuid` to boot on this host: a snapshot of another CPU is refused.
    pub fn restore(&self, kvm_fd: &Kvm, fd: &VcpuFd, cpuid: &CpuId) -> Result<()> {
        let id = self.id;
        if let Some(difference) = cpuid_difference(&self.cpuid, cpuid.as_slice()) {
            return Err(KvmStateError::OtherCpu {
                vcpu: id,
                difference,
            });
        }
        let what = |w: &str| format!("vCPU {id}: setting {w}");
        fd.set_cpuid2(cpuid).map_err(kvm(what("its CPUID")))?;
        if let (Some(saved), Ok(here)) = (self.tsc_khz, fd.get_tsc_khz()) {
            if saved != here {
                if !kvm_fd.check_extension(Cap::TscControl) {
                    return Err(KvmStateError::Tsc {
                        vcpu: id,
                        saved,
                        here,
                    });
                }
                fd.set_tsc_khz(saved).map_err(kvm(what("its TSC rate")))?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm(what("its MP state")))?;
        fd.set_regs(&self.regs)
            .map_err(kvm(what("its registers")))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm(what("its special registers")))?;
        // SAFETY: `xsave` is a whole kvm_xsave that KVM_GET_XSAVE filled on a host with
        // this CPUID (checked above), so its layout is the one KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm(what("its XSAVE state")))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm(what("its XCRs")))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm(what("its debug registers")))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm(what("its local APIC")))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).expect("a chunk fits a FAM struct");
            let set = fd.set_msrs(&msrs).map_err(kvm(what("its MSRs")))?;
            if set < chunk.len() {
                return Err(KvmStateError::Msrs {
                    vcpu: id,
                    set,
                    wanted: chunk.len(),
                    refused: chunk[set].index,
                });
            }
        }
        // Last: pending exceptions and interrupts apply to the state set above.
        fd.set_vcpu_events(&self.events)
            .map_err(kvm(what("its events")))
    }
}

/// The MSRs a snapshot saves: every one KVM says it saves and restores.
pub fn msr_indices(kvm_fd: &Kvm) -> Result<Vec<u32>> {
    Ok(kvm_fd
        .get_msr_index_list()
        .map_err(kvm("listing the MSRs KVM saves"))?
        .as_slice()
        .to_vec())
}

/// Every MSR of `indices` that KVM reads for this vCPU (it stops at the first it
/// will not read: that one is left out and the rest read on).
fn read_msrs(
    fd: &VcpuFd,
    indices: &[u32],
) -> std::result::Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut read = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("a chunk fits a FAM struct");
        let n = fd.get_msrs(&mut msrs)?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = usize::from(n < chunk.len());
        if skip == 1 {
            log::debug!("MSR {:#x} is not saved: KVM does not read it", chunk[n]);
        }
        rest = &rest[n + skip..];
    }
    Ok(read)
}

/// Where two CPUIDs differ, said for a person; `None` if they do not.
fn cpuid_difference(saved: &[kvm_cpuid_entry2], here: &[kvm_cpuid_entry2]) -> Option<String> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
    for s in saved {
        match here.iter().find(|h| key(h) == key(s)) {
            None => {
                return Some(format!(
                    "leaf {:#x}.{} is not on this host",
                    s.function, s.index
                ))
            }
            Some(h) if regs(h) != regs(s) => {
                return Some(format!(
                    "leaf {:#x}.{}: {:08x?} there, {:08x?} here",
                    s.function,
                    s.index,
                    regs(s),
                    regs(h)
                ))
            }
            Some(_) => {}
        }
    }
    here.iter()
        .find(|h| !saved.iter().any(|s| key(s) == key(h)))
        .map(|h| format!("leaf {:#x}.{} is new on this host", h.function, h.index))
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::cpu::{self, cpuid::vcpu_cpuid};
    use crate::layout::{HIMEM_START, KVM_IDENTITY_MAP_START, KVM_TSS_START};
    use crate::memory;
    use crate::snapshot::state_file;

    /// `inc rax; out 0x10, al; jmp` back: the guest counts, one port write a number.
    const COUNTER: [u8; 7] = [0x48, 0xff, 0xc0, 0xe6, 0x10, 0xeb, 0xf9];
    const PORT: u16 = 0x10;
    const SYSENTER_CS: u32 = 0x174;
    const APIC_TPR: usize = 0x80;

    fn open_kvm() -> Kvm {
        Kvm::new().unwrap_or_else(|e| panic!("this test runs a guest and needs /dev/kvm: {e}"))
    }

    /// A VM as the VMM makes one (irqchip, PIT, 16 MiB), with one vCPU.
    fn new_vm(kvm: &Kvm) -> (VmFd, VcpuFd, GuestMemoryMmap) {
        let vm = kvm.create_vm().unwrap();
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START).unwrap();
        vm.set_tss_address(KVM_TSS_START as usize).unwrap();
        vm.create_irq_chip().unwrap();
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).unwrap();
        let memory = memory::create_guest_memory(16 << 20).unwrap();
        memory::register_guest_memory(&vm, &memory).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        (vm, vcpu, memory)
    }

    fn boot_cpuid(kvm: &Kvm) -> CpuId {
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu_cpuid(&supported, 0, 1, &[])
    }

    /// Runs the guest to its next exit, a port write; the number written.
    fn next_number(vcpu: &mut VcpuFd) -> u8 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(PORT, data) => data[0],
            other => panic!("the counting guest exited with {other:?}"),
        }
    }

    fn msr(vcpu: &VcpuFd, index: u32) -> u64 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    }

    fn tpr(vcpu: &VcpuFd) -> u8 {
        vcpu.get_lapic().unwrap().regs[APIC_TPR] as u8
    }

    #[test]
    fn a_restored_vm_goes_on_where_it_stopped_and_another_cpu_is_refused() {
        let kvm = open_kvm();
        check_capabilities(&kvm).unwrap();
        let cpuid = boot_cpuid(&kvm);

        // A counting guest, stopped at 3, with marks in an MSR, the local APIC and the
        // PIT that a restore must carry.
        let (vm, mut vcpu, mem) = new_vm(&kvm);
        cpu::write_boot_page_tables_and_gdt(&mem).unwrap();
        mem.write_slice(&COUNTER, HIMEM_START).unwrap();
        cpu::configure_vcpu(&vcpu, 0, &cpuid, HIMEM_START.0).unwrap();
        for want in 1..=3 {
            assert_eq!(next_number(&mut vcpu), want);
        }
        let mark = Msrs::from_entries(&[kvm_msr_entry {
            index: SYSENTER_CS,
            data: 0x1234,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.set_msrs(&mark).unwrap(), 1);
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[APIC_TPR] = 0x20;
        vcpu.set_lapic(&lapic).unwrap();
        let mut pit = vm.get_pit2().unwrap();
        pit.channels[2].count = 0x4321;
        vm.set_pit2(&pit).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (vm_file, vcpu_file) = (dir.path().join("vm.state"), dir.path().join("vcpu0.state"));
        // A new VM's clock starts at zero; a restored one's goes on from here.
        let clock_before = vm.get_clock().unwrap().clock;
        state_file::write(&vm_file, &VmKvmState::save(&vm).unwrap()).unwrap();
        state_file::write(
            &vcpu_file,
            &VcpuState::save(&vcpu, 0, &cpuid, &msr_indices(&kvm).unwrap()).unwrap(),
        )
        .unwrap();

        // A new VM with a copy of the memory and nothing set up but the saved state.
        let (vm2, mut vcpu2, mem2) = new_vm(&kvm);
        let mut page = vec![0u8; 2 << 20];
        mem.read_slice(&mut page, GuestAddress(0)).unwrap();
        mem2.write_slice(&page, GuestAddress(0)).unwrap();
        let vm_state: VmKvmState = state_file::read(&vm_file).unwrap();
        let vcpu_state: VcpuState = state_file::read(&vcpu_file).unwrap();
        vm_state.restore(&vm2).unwrap();
        vcpu_state.restore(&kvm, &vcpu2, &cpuid).unwrap();
        assert_eq!(next_number(&mut vcpu2), 4, "the count goes on");
        assert_eq!(next_number(&mut vcpu2), 5);
        assert_eq!(msr(&vcpu2, SYSENTER_CS), 0x1234);
        assert_eq!(tpr(&vcpu2), 0x20);
        assert_eq!(vm2.get_pit2().unwrap().channels[2].count, 0x4321);
        let clock = vm2.get_clock().unwrap().clock;
        assert!(
            clock >= clock_before,
            "the clock went back: {clock} < {clock_before}"
        );
        drop((vm, vcpu, mem));

        // A host whose CPU differs in one feature bit.
        let mut other = cpuid.clone();
        let leaf1 = other
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == 1)
            .unwrap();
        leaf1.ecx ^= 1 << 0; // SSE3
        let (_vm3, vcpu3, _mem3) = new_vm(&kvm);
        let e = vcpu_state.restore(&kvm, &vcpu3, &other).unwrap_err();
        assert!(matches!(e, KvmStateError::OtherCpu { vcpu: 0, .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("leaf 0x1.0"), "{text}");
        assert!(text.contains("boot the VM instead"), "{text}");
    }
}
