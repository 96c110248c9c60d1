//! Hosts whose KVM emulates guest kernel code (a nested "PVM" hypervisor) cannot run
//! a few instructions at CPL0; see ../shared/PLATFORM.md and kernel-config/patches/.
//! On such a host the VMM hides those CPU features and switches on the guest kernel's
//! guarded workarounds. On real KVM none of this applies and nothing is changed.

use std::path::Path;

use crate::config::QuirksMode;
use crate::cpu::cpuid::CpuidBit;

/// Present when the host's KVM is the PVM module.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Features the emulator cannot execute at CPL0, hidden from the guest's CPUID.
pub const HIDDEN_FEATURES: &[CpuidBit] = &[
    CpuidBit::XSAVE,
    CpuidBit::OSXSAVE,
    CpuidBit::AVX,
    CpuidBit::POPCNT,
    CpuidBit::CX16,
    CpuidBit::SMAP,
    CpuidBit::ERMS,
    CpuidBit::FSRM,
];

/// Kernel command-line words for such a host. `peapod_pvm_quirks` arms the patches
/// in kernel-config/patches; the rest make the kernel avoid the same instructions
/// even where CPUID filtering does not reach the guest.
pub const QUIRK_CMDLINE: &[&str] = &[
    "peapod_pvm_quirks",
    "noxsave",
    "clearcpuid=popcnt,cx16,smap,erms,fsrm",
    "noreplace-smp",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    pub emulating_host: bool,
}

impl Platform {
    pub fn detect(mode: QuirksMode) -> Self {
        Self::resolve(mode, Path::new(PVM_MODULE).exists())
    }

    fn resolve(mode: QuirksMode, pvm_present: bool) -> Self {
        let emulating_host = match mode {
            QuirksMode::Auto => pvm_present,
            QuirksMode::On => true,
            QuirksMode::Off => false,
        };
        Self { emulating_host }
    }

    pub fn cmdline_words(&self) -> &'static [&'static str] {
        if self.emulating_host {
            QUIRK_CMDLINE
        } else {
            &[]
        }
    }

    pub fn hidden_features(&self) -> &'static [CpuidBit] {
        if self.emulating_host {
            HIDDEN_FEATURES
        } else {
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_host_and_flags_override_it() {
        assert!(Platform::resolve(QuirksMode::Auto, true).emulating_host);
        assert!(!Platform::resolve(QuirksMode::Auto, false).emulating_host);
        assert!(Platform::resolve(QuirksMode::On, false).emulating_host);
        assert!(!Platform::resolve(QuirksMode::Off, true).emulating_host);
        let real_kvm = Platform::resolve(QuirksMode::Auto, false);
        assert!(real_kvm.cmdline_words().is_empty() && real_kvm.hidden_features().is_empty());
    }
}
