//! vCPU state at boot: CPUID, registers, MSRs, FPU and the local APIC.

pub mod cpuid;
mod setup;

pub use setup::{configure_vcpu, write_boot_page_tables_and_gdt, CpuSetupError};
