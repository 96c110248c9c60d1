//! Registers, MSRs, FPU and local APIC of a vCPU, and the page tables and GDT the boot
//! vCPU enters the kernel's 64-bit entry point with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    #[error("vCPU {vcpu}: KVM refused to set {what}: {source}")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM set {set} of {wanted} boot MSRs")]
    Msrs { vcpu: u8, set: usize, wanted: usize },
    #[error("writing boot page tables or GDT into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

// Control register and EFER bits.
const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

// Page-table entry bits.
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

// GDT: null, 64-bit code, data, TSS. The flags are access byte and granularity nibble.
const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const GDT_TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);
const BOOT_GDT: [u64; 4] = [0, GDT_CODE64, GDT_DATA, GDT_TSS];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of a GDT descriptor at `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Identity-maps the first GiB with 2 MiB pages (the kernel sets up its own tables
/// early) and writes the GDT and an empty IDT. Done once per VM.
pub fn write_boot_page_tables_and_gdt(memory: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    let write = |value: u64, addr| {
        memory
            .write_obj(value, addr)
            .map_err(CpuSetupError::GuestMemory)
    };
    write(PDPTE_START.raw_value() | PTE_PRESENT_WRITABLE, PML4_START)?;
    write(PDE_START.raw_value() | PTE_PRESENT_WRITABLE, PDPTE_START)?;
    for i in 0..512u64 {
        write(
            (i << 21) | PTE_HUGE | PTE_PRESENT_WRITABLE,
            PDE_START.unchecked_add(i * 8),
        )?;
    }
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))?;
    }
    write(0, BOOT_IDT_START)
}

// MSRs a booting Linux expects in a known state.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

// Local APIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Puts vCPU `id` in the state Linux's 64-bit boot protocol expects (boot vCPU) or
/// ready to be started by INIT/SIPI (the others; KVM holds them until then).
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), CpuSetupError> {
    let kvm = |what, source| CpuSetupError::Kvm {
        vcpu: id,
        what,
        source,
    };
    vcpu.set_cpuid2(cpuid).map_err(|e| kvm("CPUID", e))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fit a FAM struct");
    let set = vcpu.set_msrs(&msrs).map_err(|e| kvm("MSRs", e))?;
    if set != entries.len() {
        return Err(CpuSetupError::Msrs {
            vcpu: id,
            set,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| kvm("FPU", e))?;

    let mut lapic = vcpu.get_lapic().map_err(|e| kvm("local APIC", e))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| kvm("local APIC", e))?;

    if id != 0 {
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().map_err(|e| kvm("special registers", e))?;
    let code = segment(GDT_CODE64, 1);
    let data = segment(GDT_DATA, 2);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(GDT_TSS, 3);
    sregs.gdt.base = BOOT_GDT_START.raw_value();
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.raw_value();
    sregs.idt.limit = 7;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.cr3 = PML4_START.raw_value();
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| kvm("special registers", e))?;

    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START.raw_value(),
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| kvm("registers", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_decode_to_flat_long_mode_segments() {
        let cs = segment(GDT_CODE64, 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s),
            (8, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        let ds = segment(GDT_DATA, 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let tss = segment(GDT_TSS, 3);
        assert_eq!((tss.s, tss.type_, tss.g), (0, 0xb, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write_boot_page_tables_and_gdt(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START.raw_value());
        let pde_last: u64 = mem.read_obj(PDE_START.unchecked_add(511 * 8)).unwrap();
        assert_eq!(pde_last & !0xfff, 511 << 21);
        assert_ne!(pde_last & PTE_HUGE, 0);
    }

    #[test]
    fn lapic_delivery_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30; // vector
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(
            (regs[APIC_LVT0], regs[APIC_LVT0 + 1], regs[APIC_LVT0 + 2]),
            (0x30, 7, 1)
        );
    }
}
