//! The CPUID a vCPU sees: KVM's supported set, with this vCPU's topology filled in and
//! any features the platform cannot run hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit: CPUID leaf (subleaf 0 where the leaf has subleaves), register, bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidBit {
    pub leaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

impl CpuidBit {
    pub const CX16: Self = Self::new(1, Reg::Ecx, 13);
    pub const POPCNT: Self = Self::new(1, Reg::Ecx, 23);
    pub const XSAVE: Self = Self::new(1, Reg::Ecx, 26);
    pub const OSXSAVE: Self = Self::new(1, Reg::Ecx, 27);
    pub const AVX: Self = Self::new(1, Reg::Ecx, 28);
    pub const ERMS: Self = Self::new(7, Reg::Ebx, 9);
    pub const SMAP: Self = Self::new(7, Reg::Ebx, 20);
    pub const FSRM: Self = Self::new(7, Reg::Edx, 4);

    const fn new(leaf: u32, reg: Reg, bit: u8) -> Self {
        Self { leaf, reg, bit }
    }

    fn clear_in(&self, entry: &mut kvm_cpuid_entry2) {
        let reg = match self.reg {
            Reg::Ebx => &mut entry.ebx,
            Reg::Ecx => &mut entry.ecx,
            Reg::Edx => &mut entry.edx,
        };
        *reg &= !(1 << self.bit);
    }
}

const LEAF_FEATURES: u32 = 1;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb level types.
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Leaf 0xb, whole: an SMT level of one thread, a core level holding every vCPU,
/// and the invalid level that ends the list. KVM may report only subleaf 0 (this
/// host's does); a guest that then finds no core level puts each vCPU in a package
/// of its own.
fn extended_topology(vcpu_id: u8, vcpus: u8) -> [kvm_cpuid_entry2; 3] {
    // One core per vCPU, one thread per core: the shift that covers all APIC IDs.
    let core_shift = u32::from(vcpus).next_power_of_two().trailing_zeros();
    // ECX: the level's type in bits 15:8, its number in bits 7:0.
    let level = |index: u32, level_type: u32, eax: u32, ebx: u32| kvm_cpuid_entry2 {
        function: LEAF_EXT_TOPOLOGY,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: u32::from(vcpu_id),
        ..Default::default()
    };
    [
        level(0, LEVEL_SMT, 0, 1),
        level(1, LEVEL_CORE, core_shift, u32::from(vcpus)),
        level(2, LEVEL_INVALID, 0, 0),
    ]
}

/// Fills in what differs per vCPU and hides `hidden`. `supported` is KVM's set.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, vcpus: u8, hidden: &[CpuidBit]) -> CpuId {
    let mut cpuid = supported.clone();
    let hiding_xsave = hidden.contains(&CpuidBit::XSAVE);
    if cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_EXT_TOPOLOGY)
    {
        cpuid.retain(|e| e.function != LEAF_EXT_TOPOLOGY);
        for entry in extended_topology(vcpu_id, vcpus) {
            cpuid
                .push(entry)
                .expect("KVM's set leaves room for two more entries");
        }
    }
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0xffff) | (u32::from(vcpus) << 16) | (u32::from(vcpu_id) << 24);
                entry.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_AMD_SIZE_IDS => {
                entry.ecx = (entry.ecx & !0xff) | u32::from(vcpus - 1);
            }
            // AMD's own topology leaf (read when TOPOEXT is set): this vCPU's extended
            // APIC ID and core ID, one thread per core, one node. All zeros would make
            // every vCPU core 0, i.e. SMT siblings of one another.
            LEAF_AMD_TOPOLOGY => {
                entry.eax = u32::from(vcpu_id);
                entry.ebx = u32::from(vcpu_id);
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_XSAVE if hiding_xsave => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
        for bit in hidden {
            if entry.function == bit.leaf && entry.index == 0 {
                bit.clear_in(entry);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_is_per_vcpu_and_hidden_bits_are_cleared() {
        // As this host's KVM reports it: leaf 0xb with subleaf 0 only.
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xd, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap();
        let c = vcpu_cpuid(
            &supported,
            3,
            4,
            &[CpuidBit::XSAVE, CpuidBit::POPCNT, CpuidBit::SMAP],
        );
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(leaf1.ecx & (1 << 26), 0, "xsave hidden");
        assert_eq!(leaf1.ecx & (1 << 23), 0, "popcnt hidden");
        assert_ne!(leaf1.ecx & (1 << 13), 0, "cx16 untouched");
        assert_eq!(find(&c, 7, 0).ebx & (1 << 20), 0, "smap hidden");
        assert_eq!(find(&c, 0xd, 0).eax, 0, "xsave leaf emptied");
        let smt = find(&c, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_SMT, 3)
        );
        let core = find(&c, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 4, LEVEL_CORE, 3)
        );
        assert_eq!(
            find(&c, 0xb, 2).ecx >> 8,
            0,
            "an invalid level ends the list"
        );
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        let amd = find(&c, 0x8000_001e, 0);
        assert_eq!((amd.eax, amd.ebx & 0xff, (amd.ebx >> 8) & 0xff), (3, 3, 0));

        let plain = vcpu_cpuid(&supported, 0, 1, &[]);
        assert_ne!(
            find(&plain, 1, 0).ecx & (1 << 26),
            0,
            "nothing hidden by default"
        );
        assert_eq!(find(&plain, 1, 0).edx & EDX_HTT, 0);
    }
}
