//! A container's device rules (`linux.resources.devices`), applied in the guest.
//!
//! cgroup v2 has no devices files: its device controller is a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup, which the kernel
//! asks on every open and mknod of a device node by a process in it. libcgroups
//! builds one only with its `cgroupsv2_devices` feature, which links libbpf (C, with
//! libelf and zlib) for three system calls; the program is a few instructions a
//! rule, so the agent assembles it here and makes the calls itself.
//!
//! The rules mean what they mean to runc: the spec's rules in order, then runc's
//! default allowances (mknod of anything, /dev/null and friends, ptys, tun); the
//! last rule that names a device decides each of its accesses, and what no rule
//! names is denied. A privileged container's `a *:* rwm` allows everything.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("container {id}: device rule \"{rule}\": {cause} (fix linux.resources.devices in the pod's spec)")]
    BadRule {
        id: String,
        rule: String,
        cause: &'static str,
    },
    #[error("container {id}: loading its device rules as a BPF program: {cause}{log} (the guest kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; without them the container would reach every device of the pod, so it is not run)")]
    Load {
        id: String,
        cause: io::Error,
        log: String,
    },
    #[error("container {id}: attaching its device rules to cgroup {cgroup}: {cause} (the guest kernel needs CONFIG_CGROUP_BPF; without the rules the container would reach every device of the pod, so it is not run)")]
    Attach {
        id: String,
        cgroup: String,
        cause: io::Error,
    },
}

/// What a rule lets a process do to a device node: the kernel's `BPF_DEVCG_ACC_*`.
const ACCESS_MKNOD: u32 = 1;
const ACCESS_READ: u32 = 2;
const ACCESS_WRITE: u32 = 4;
const ACCESS_ALL: u32 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;
/// `BPF_DEVCG_DEV_*`.
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;

/// One rule, checked: `kind`, `major` and `minor` are `None` for "any".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

impl DeviceRule {
    const fn allow_char(major: u32, minor: Option<u32>) -> Self {
        Self {
            allow: true,
            kind: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access: ACCESS_ALL,
        }
    }

    /// Whether this rule names every device and every access: what came before it
    /// no longer matters.
    fn is_total(&self) -> bool {
        self.kind.is_none()
            && self.major.is_none()
            && self.minor.is_none()
            && self.access == ACCESS_ALL
    }
}

impl fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Some(DEV_BLOCK) => "b",
            Some(_) => "c",
            None => "a",
        };
        let num = |n: Option<u32>| n.map_or("*".to_owned(), |n| n.to_string());
        let access: String = [(ACCESS_READ, 'r'), (ACCESS_WRITE, 'w'), (ACCESS_MKNOD, 'm')]
            .iter()
            .filter(|(bit, _)| self.access & bit != 0)
            .map(|(_, c)| c)
            .collect();
        let verb = if self.allow { "allow" } else { "deny" };
        write!(
            f,
            "{verb} {kind} {}:{} {access}",
            num(self.major),
            num(self.minor)
        )
    }
}

/// What runc allows every container after its spec's rules
/// (libcontainer/specconv's `AllowedDevices`).
pub const DEFAULT_RULES: &[DeviceRule] = &[
    DeviceRule {
        allow: true,
        kind: Some(DEV_CHAR),
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    },
    DeviceRule {
        allow: true,
        kind: Some(DEV_BLOCK),
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    },
    DeviceRule::allow_char(1, Some(3)),    // null
    DeviceRule::allow_char(1, Some(8)),    // random
    DeviceRule::allow_char(1, Some(7)),    // full
    DeviceRule::allow_char(5, Some(0)),    // tty
    DeviceRule::allow_char(1, Some(5)),    // zero
    DeviceRule::allow_char(1, Some(9)),    // urandom
    DeviceRule::allow_char(5, Some(1)),    // console
    DeviceRule::allow_char(136, None),     // pts
    DeviceRule::allow_char(5, Some(2)),    // ptmx
    DeviceRule::allow_char(10, Some(200)), // net/tun
];

/// The rules a container runs under: its spec's, checked, then [`DEFAULT_RULES`].
pub fn container_rules(
    id: &str,
    spec_rules: &[LinuxDeviceCgroup],
) -> Result<Vec<DeviceRule>, DevicesError> {
    let mut rules = Vec::with_capacity(spec_rules.len() + DEFAULT_RULES.len());
    for rule in spec_rules {
        let bad = |cause| DevicesError::BadRule {
            id: id.to_owned(),
            rule: rule.to_string(),
            cause,
        };
        let kind = match rule.typ().unwrap_or_default() {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            // A FIFO is no device: the kernel never asks the device program of one.
            LinuxDeviceType::P => continue,
        };
        let number = |n: Option<i64>| match n {
            None | Some(-1) => Ok(None),
            // The program compares them as 32-bit immediates.
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|&n| n <= i32::MAX as u32)
                .map(Some)
                .ok_or_else(|| bad("a device number must be 0 to 2147483647, or -1 for any")),
        };
        let (major, minor) = (number(rule.major())?, number(rule.minor())?);
        // As runc: a rule without access means all of it.
        let access = match rule.access().as_deref() {
            None | Some("") => ACCESS_ALL,
            Some(s) => s.chars().try_fold(0, |acc, c| match c {
                'r' => Ok(acc | ACCESS_READ),
                'w' => Ok(acc | ACCESS_WRITE),
                'm' => Ok(acc | ACCESS_MKNOD),
                _ => Err(bad("access is made of the letters r, w and m")),
            })?,
        };
        rules.push(DeviceRule {
            allow: rule.allow(),
            kind,
            major,
            minor,
            access,
        });
    }
    rules.extend_from_slice(DEFAULT_RULES);
    Ok(rules)
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61;
const ALU64_AND_K: u8 = 0x57;
const ALU64_RSH_K: u8 = 0x77;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const JMP_JEQ_K: u8 = 0x15;
const JMP_JNE_K: u8 = 0x55;
const JMP_EXIT: u8 = 0x95;

// Registers: r1 holds the context (`struct bpf_cgroup_dev_ctx`) on entry.
const R0: u8 = 0;
const R_CTX: u8 = 1;
/// The accesses asked for and not yet allowed.
const R_ACCESS: u8 = 2;
const R_KIND: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;

// Field offsets in `struct bpf_cgroup_dev_ctx { u32 access_type, major, minor; }`;
// access_type is `access << 16 | type`.
const CTX_ACCESS_TYPE: i16 = 0;
const CTX_MAJOR: i16 = 4;
const CTX_MINOR: i16 = 8;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | src << 4,
        off,
        imm,
    }
}

/// The program for `rules`: it walks them from the last, takes away from the
/// accesses asked for those an allowing rule grants (all granted: allow), and denies
/// as soon as a denying rule names one still asked for; what is left at the end is
/// denied. Rules before the last one that names everything cannot decide anything
/// and are left out.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let live = rules
        .iter()
        .rposition(DeviceRule::is_total)
        .map_or(rules, |i| &rules[i..]);
    let mut prog = vec![
        insn(LDX_MEM_W, R_ACCESS, R_CTX, CTX_ACCESS_TYPE, 0),
        insn(ALU64_MOV_X, R_KIND, R_ACCESS, 0, 0),
        insn(ALU64_AND_K, R_KIND, 0, 0, 0xffff),
        insn(ALU64_RSH_K, R_ACCESS, 0, 0, 16),
        insn(LDX_MEM_W, R_MAJOR, R_CTX, CTX_MAJOR, 0),
        insn(LDX_MEM_W, R_MINOR, R_CTX, CTX_MINOR, 0),
    ];
    for rule in live.iter().rev() {
        prog.extend(rule_block(rule));
    }
    prog.extend([insn(ALU64_MOV_K, R0, 0, 0, 0), insn(JMP_EXIT, 0, 0, 0, 0)]);
    prog
}

/// One rule's instructions; every jump in it goes to the next rule's.
fn rule_block(rule: &DeviceRule) -> Vec<Insn> {
    // Jump offsets are filled in once the block's length is known.
    const NEXT: i16 = i16::MAX;
    let mut block = Vec::new();
    for (reg, value) in [
        (R_KIND, rule.kind),
        (R_MAJOR, rule.major),
        (R_MINOR, rule.minor),
    ] {
        if let Some(v) = value {
            // Checked to fit an i32 by `container_rules`; DEV_* do.
            block.push(insn(JMP_JNE_K, reg, 0, NEXT, v as i32));
        }
    }
    if rule.allow {
        block.extend([
            insn(ALU64_AND_K, R_ACCESS, 0, 0, !(rule.access as i32)),
            insn(JMP_JNE_K, R_ACCESS, 0, NEXT, 0),
            insn(ALU64_MOV_K, R0, 0, 0, 1),
        ]);
    } else {
        block.extend([
            insn(ALU64_MOV_X, R0, R_ACCESS, 0, 0),
            insn(ALU64_AND_K, R0, 0, 0, rule.access as i32),
            insn(JMP_JEQ_K, R0, 0, NEXT, 0),
            insn(ALU64_MOV_K, R0, 0, 0, 0),
        ]);
    }
    block.push(insn(JMP_EXIT, 0, 0, 0, 0));
    let len = block.len();
    for (i, ins) in block.iter_mut().enumerate() {
        if ins.off == NEXT {
            ins.off = (len - i - 1) as i16;
        }
    }
    block
}

// bpf(2) commands and constants (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Programs of the cgroups below (a nested runtime's) run too, after this one.
const BPF_F_ALLOW_MULTI: u32 = 2;
/// The verifier's account of a program it refuses.
const VERIFIER_LOG_BYTES: usize = 64 << 10;
const LICENSE: &str = "Apache-2.0";
const PROG_NAME: &[u8] = b"peapod_devices";

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads `prog`; on a refusal, the verifier's log is in the error.
fn load(id: &str, prog: &[Insn]) -> Result<OwnedFd, DevicesError> {
    let license = CString::new(LICENSE).expect("no NUL in the license");
    let mut name = [0u8; 16];
    name[..PROG_NAME.len()].copy_from_slice(PROG_NAME);
    let try_load = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        // SAFETY: attr is BPF_PROG_LOAD's; the pointers in it (instructions, license,
        // a log buffer of log_size bytes) outlive the call.
        let fd = unsafe { bpf(BPF_PROG_LOAD, &attr) }?;
        // SAFETY: the kernel just returned this new descriptor to us alone.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    try_load(None).map_err(|cause| {
        // Again with the verifier's log, to say why.
        let mut buf = vec![0u8; VERIFIER_LOG_BYTES];
        let _ = try_load(Some(&mut buf));
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim_end_matches('\0').trim();
        DevicesError::Load {
            id: id.to_owned(),
            cause,
            log: if text.is_empty() {
                String::new()
            } else {
                format!(" (verifier: {text})")
            },
        }
    })
}

/// Loads the program for `rules` and attaches it to the cgroup directory `cgroup`.
/// The program stays as long as the cgroup does.
pub fn apply(id: &str, cgroup: &Path, rules: &[DeviceRule]) -> Result<(), DevicesError> {
    let prog = load(id, &program(rules))?;
    let attach_error = |cause| DevicesError::Attach {
        id: id.to_owned(),
        cgroup: cgroup.display().to_string(),
        cause,
    };
    let dir = File::open(cgroup).map_err(attach_error)?;
    let attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: attr is BPF_PROG_ATTACH's, naming two descriptors open through the call.
    unsafe { bpf(BPF_PROG_ATTACH, &attr) }.map_err(attach_error)?;
    Ok(())
}

/// bpf(2) with command `cmd`.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member that `cmd` reads, and every pointer in
/// it valid for what the kernel does with it.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for attr; its size is passed with it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// containerd's CRI rules for a container that is not privileged (its default
    /// spec's deny-all, then `WithDefaultUnixDevices`).
    fn cri_rules() -> Vec<LinuxDeviceCgroup> {
        serde_json::from_value(serde_json::json!([
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm" },
            { "allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm" },
            { "allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm" },
            { "allow": true, "type": "c", "major": 136, "access": "rwm" },
            { "allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm" },
            { "allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm" },
        ]))
        .unwrap()
    }

    /// containerd's CRI rule for a privileged container.
    fn privileged_rules() -> Vec<LinuxDeviceCgroup> {
        serde_json::from_value(serde_json::json!([{ "allow": true, "access": "rwm" }])).unwrap()
    }

    fn rules_of(json: serde_json::Value) -> Result<Vec<DeviceRule>, DevicesError> {
        container_rules("c1", &serde_json::from_value::<Vec<_>>(json).unwrap())
    }

    /// Runs `prog` on one request, as the kernel would (only the opcodes `program`
    /// emits).
    fn run(prog: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> bool {
        let ctx = [access << 16 | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as i64 as u64;
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, R_CTX as usize);
                    r[dst] = ctx[i.off as usize / 4] as u64;
                }
                ALU64_AND_K => r[dst] &= imm,
                ALU64_RSH_K => r[dst] >>= imm,
                ALU64_MOV_K => r[dst] = imm,
                ALU64_MOV_X => r[dst] = r[src],
                JMP_JEQ_K if r[dst] == imm => pc += i.off as usize,
                JMP_JNE_K if r[dst] != imm => pc += i.off as usize,
                JMP_JEQ_K | JMP_JNE_K => {}
                JMP_EXIT => return r[0] == 1,
                op => panic!("opcode {op:#x} at {}", pc - 1),
            }
        }
    }

    #[test]
    fn cri_rules_allow_the_default_devices_and_mknod_only_of_the_rest() {
        let rules = container_rules("c1", &cri_rules()).unwrap();
        let prog = program(&rules);
        for (major, minor) in [(1, 3), (1, 5), (1, 9), (5, 0), (5, 2), (136, 7), (10, 200)] {
            assert!(run(
                &prog,
                DEV_CHAR,
                major,
                minor,
                ACCESS_READ | ACCESS_WRITE
            ));
        }
        // A disk of the pod (virtio-blk is major 254 here) and /dev/kmsg.
        assert!(!run(&prog, DEV_BLOCK, 254, 16, ACCESS_READ));
        assert!(!run(&prog, DEV_BLOCK, 254, 16, ACCESS_WRITE));
        assert!(!run(&prog, DEV_CHAR, 1, 11, ACCESS_READ));
        // As runc: mknod of anything, opening only what a rule allows.
        assert!(run(&prog, DEV_BLOCK, 254, 16, ACCESS_MKNOD));
        assert!(!run(&prog, DEV_BLOCK, 254, 16, ACCESS_MKNOD | ACCESS_READ));
        // The block device 1:3 is not /dev/null.
        assert!(!run(&prog, DEV_BLOCK, 1, 3, ACCESS_READ));
    }

    #[test]
    fn a_privileged_container_reaches_every_device() {
        let rules = container_rules("c1", &privileged_rules()).unwrap();
        let prog = program(&rules);
        assert!(run(&prog, DEV_BLOCK, 254, 16, ACCESS_ALL));
        assert!(run(&prog, DEV_CHAR, 1, 11, ACCESS_READ | ACCESS_WRITE));
        // Nothing before an allow-all is left in the program: the prologue, the
        // allow-all, the defaults, the final deny.
        let rules = container_rules("c1", &[cri_rules(), privileged_rules()].concat()).unwrap();
        assert_eq!(program(&rules), prog);
    }

    #[test]
    fn the_last_rule_naming_an_access_decides_it() {
        let rules = rules_of(serde_json::json!([
            { "allow": true, "type": "b", "major": 8, "access": "rw" },
            { "allow": false, "type": "b", "major": 8, "minor": 1, "access": "w" },
        ]))
        .unwrap();
        let prog = program(&rules);
        assert!(run(&prog, DEV_BLOCK, 8, 1, ACCESS_READ));
        assert!(!run(&prog, DEV_BLOCK, 8, 1, ACCESS_READ | ACCESS_WRITE));
        assert!(run(&prog, DEV_BLOCK, 8, 2, ACCESS_READ | ACCESS_WRITE));
        // No spec rules at all: only the defaults.
        let prog = program(&rules_of(serde_json::json!([])).unwrap());
        assert!(run(&prog, DEV_CHAR, 1, 3, ACCESS_READ));
        assert!(!run(&prog, DEV_BLOCK, 8, 1, ACCESS_READ));
    }

    #[test]
    fn a_rule_that_cannot_be_applied_is_refused_by_name() {
        let e = rules_of(serde_json::json!([
            { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwx" },
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("container c1") && e.contains("rwx"), "{e}");
        assert!(e.contains("r, w and m"), "{e}");
        let e = rules_of(serde_json::json!([
            { "allow": true, "type": "b", "major": 1i64 << 40, "access": "r" },
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("device number"), "{e}");
        // FIFOs are not devices; "u" is a character device.
        let rules = rules_of(serde_json::json!([
            { "allow": true, "type": "p", "access": "rwm" },
            { "allow": true, "type": "u", "major": 4, "access": "r" },
        ]))
        .unwrap();
        assert_eq!(rules.len(), 1 + DEFAULT_RULES.len());
        assert_eq!(rules[0].to_string(), "allow c 4:* r");
    }

    /// Where the host has cgroup v2 mounted, if it does.
    fn cgroup2_root() -> Option<std::path::PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].into())
        })
    }

    /// Runs `script` in a shell moved into `cgroup` first; its output and error.
    fn run_in(cgroup: &Path, script: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && {{ {script}; }} 2>&1",
                cgroup.display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_kernel_applies_the_program_to_the_processes_of_the_cgroup() {
        let Some(root) = cgroup2_root() else {
            eprintln!("skipped: the host has no cgroup2 mount");
            return;
        };
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A block device node of a disk (loop0: 7:0) made where nodes can be opened.
        let nodes = tempfile::tempdir_in("/dev").unwrap();
        let disk = nodes.path().join("disk");
        nix::sys::stat::mknod(
            &disk,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(7, 0),
        )
        .unwrap();
        let read_both = format!(
            "dd if=/dev/null of=/dev/null count=1 && echo null-ok; \
             dd if={} of=/dev/null count=1",
            disk.display()
        );
        for (name, rules, disk_opens) in [
            ("cri", cri_rules(), false),
            ("privileged", privileged_rules(), true),
        ] {
            let cgroup = root.join(format!("peapod-devices-test-{}-{name}", std::process::id()));
            std::fs::create_dir(&cgroup).unwrap();
            let rules = container_rules("c1", &rules).unwrap();
            let applied = apply("c1", &cgroup, &rules);
            let out = applied.as_ref().map(|_| run_in(&cgroup, &read_both));
            std::fs::remove_dir(&cgroup).unwrap();
            let out = out.unwrap();
            assert!(out.contains("null-ok"), "{name}: {out}");
            assert_eq!(
                !out.contains("Operation not permitted"),
                disk_opens,
                "{name}: {out}"
            );
        }
    }
}
