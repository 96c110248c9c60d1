//! Where things live in guest physical memory, x86_64.
//!
//! The boot structures sit in the first 640 KiB, below the EBDA; the kernel loads at
//! its ELF physical address (16 MiB for our vmlinux); RAM stops at the MMIO gap below
//! 4 GiB and continues above it.

use vm_memory::GuestAddress;

/// The GDT the vCPUs boot with (four 8-byte entries).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// Linux's `struct boot_params` (the "zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// The boot stack grows down from here into the page below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the first GiB: one PML4, one PDPT, one PD of 2 MiB pages.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// The kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// x86's COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The Extended BIOS Data Area: Linux looks for the MP table in its first KiB.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// The MP floating pointer, where Linux scans for it (the last KiB below 640 KiB).
pub const MP_FLOATING_POINTER_START: GuestAddress = EBDA_START;
/// The BIOS area [0xf0000, 1 MiB): not RAM in the e820 map, so the kernel never
/// reuses it. The MP configuration table (5 KiB at 254 vCPUs) lives here.
pub const BIOS_AREA_START: GuestAddress = GuestAddress(0xf_0000);
pub const BIOS_AREA_SIZE: u64 = 0x1_0000;
pub const MP_CONFIG_TABLE_START: GuestAddress = BIOS_AREA_START;
/// First byte above the legacy ISA hole; RAM in the e820 map starts again here.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Device MMIO, the IO-APIC and the local APICs live in [MMIO_GAP_START, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// KVM needs three pages for the TSS and one for the identity map in 32-bit space,
/// outside RAM: the top of the MMIO gap, below the BIOS ROM area, is unused.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = KVM_IDENTITY_MAP_START + 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Guest memory is sized and placed in units of 2 MiB, the huge-page size.
pub const MEM_ALIGNMENT: u64 = 2 << 20;

/// virtio-mmio devices sit 4 KiB apart at the bottom of the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Their interrupt lines: IO-APIC pins 5 up to the last pin (the PC's own devices keep
/// 0-4; COM1 is 4).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
