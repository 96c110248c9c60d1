//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs, its
//! IO-APIC and how ISA interrupts are wired (MP spec 1.4, chapter 4).
//!
//! Built as little-endian bytes rather than packed structs: no unsafe, and each
//! entry reads as the spec's table does.

use vm_memory::{Bytes, GuestMemoryMmap};

use crate::layout::{
    APIC_START, BIOS_AREA_SIZE, IOAPIC_START, MP_CONFIG_TABLE_START, MP_FLOATING_POINTER_START,
};

/// Interrupt pins the IO-APIC routes (ISA IRQs 0-15 and the rest for devices).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const MP_SPEC_REV: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// "Conforms to the bus" polarity and trigger mode.
const INT_FLAGS_DEFAULT: u16 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table for {0} vCPUs does not fit in the BIOS area; use fewer vCPUs")]
    TooLarge(u8),
    #[error("writing the MP table into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

/// Sum of all bytes is zero modulo 256 for every MP structure.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The bytes of the configuration table (header and entries), to be placed at `addr`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        // CPU signature (family 6), feature flags (FPU, APIC): informational only.
        entries.extend(0x600u32.to_le_bytes());
        entries.extend(0x201u32.to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([ENTRY_BUS, ISA_BUS_ID]);
    entries.extend(*b"ISA   ");
    let ioapic_id = vcpus;
    entries.extend([ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.extend([ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend(INT_FLAGS_DEFAULT.to_le_bytes());
        entries.extend([ISA_BUS_ID, pin, ioapic_id, pin]);
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend([ENTRY_LOCAL_INTERRUPT, int_type]);
        entries.extend(INT_FLAGS_DEFAULT.to_le_bytes());
        entries.extend([ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
    }
    let entry_count = u16::from(vcpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    const HEADER_LEN: usize = 44;
    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend(*b"PCMP");
    table.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.extend([MP_SPEC_REV, 0]); // checksum patched below
    table.extend(*b"PEAPOD  ");
    table.extend(*b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(entry_count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend(0u32.to_le_bytes()); // no extended entries, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend(entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure the guest scans for.
fn floating_pointer(config_table_addr: u32) -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&config_table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MP_SPEC_REV;
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the floating pointer where the guest scans for it and the configuration
/// table in the BIOS area.
pub fn setup_mptable(memory: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = config_table(vcpus);
    if table.len() as u64 > BIOS_AREA_SIZE {
        return Err(MptableError::TooLarge(vcpus));
    }
    let table_addr = MP_CONFIG_TABLE_START.0 as u32;
    memory
        .write_slice(&floating_pointer(table_addr), MP_FLOATING_POINTER_START)
        .map_err(MptableError::GuestMemory)?;
    memory
        .write_slice(&table, MP_CONFIG_TABLE_START)
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn every_structure_sums_to_zero_and_counts_its_entries() {
        for vcpus in [1u8, 2, 16] {
            let table = config_table(vcpus);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(checksum(&table), 0);
            assert_eq!(
                u16::from_le_bytes([table[4], table[5]]) as usize,
                table.len()
            );
            let count = u16::from_le_bytes([table[34], table[35]]);
            // processors, bus, IO-APIC, 24 IO interrupts, 2 local interrupts
            assert_eq!(count, u16::from(vcpus) + 28);
            // processors are 20 bytes, every other entry 8
            assert_eq!(table.len(), 44 + 20 * vcpus as usize + 8 * 28);
            let cpu_flags: Vec<u8> = (0..vcpus as usize)
                .map(|i| table[44 + 20 * i + 3])
                .collect();
            assert_eq!(cpu_flags[0], CPU_ENABLED | CPU_BOOTSTRAP);
            assert!(cpu_flags[1..].iter().all(|f| *f == CPU_ENABLED));
        }
        let mpf = floating_pointer(0x9fc10);
        assert_eq!(checksum(&mpf), 0);
    }

    #[test]
    fn the_largest_vm_fits_and_the_pointer_finds_the_table() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        setup_mptable(&mem, crate::config::MAX_VCPUS).unwrap();
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, MP_FLOATING_POINTER_START).unwrap();
        assert_eq!(&mpf[..4], b"_MP_");
        let table_addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(table_addr.into()))
            .unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
