//! A container's seccomp profile, applied to every process that runs in it.
//!
//! libcontainer 0.7 installs `linux.seccomp` in a container's init process, but its
//! exec path (the tenant builder) rebuilds the spec's `linux` section from the
//! namespaces, cgroup path, personality and time offsets only, so an exec (`kubectl
//! exec`, CRI's ExecSync, a liveness probe) ran with no filter at all: `Seccomp: 0`
//! and every call allowed. runc and crun give an exec the container's profile. The
//! agent does the same through the one hook libcontainer offers there, the workload
//! executor: [`ExecSeccomp`] installs the profile as the last step before `execve`.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, Spec};

/// capability(7)'s number of CAP_SYS_ADMIN (the libc crate has no capability
/// constants).
const CAP_SYS_ADMIN: u32 = 21;

/// The executor of a container's execs: the container's profile, then `execve`.
///
/// By the time an executor runs, libcontainer has already switched to the exec's
/// user and capabilities. Without `noNewPrivileges` the kernel lets only a process
/// with CAP_SYS_ADMIN install a filter; runc installs it before dropping
/// capabilities for that reason, which libcontainer gives us no hook for. So an exec
/// that lacks CAP_SYS_ADMIN gets no_new_privs first: filtered with no_new_privs
/// rather than unfiltered (the only other choice). For a root exec, the usual case,
/// no_new_privs changes nothing, since execve cannot raise root's capabilities above
/// its bounding set anyway; a non-root exec can no longer gain privileges through
/// setuid binaries (docs/decisions.md).
#[derive(Clone)]
pub struct ExecSeccomp {
    pub profile: Option<LinuxSeccomp>,
}

impl Executor for ExecSeccomp {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(profile) = &self.profile {
            if let Err(e) = install(profile) {
                // The exec's stderr is the only place its user will look.
                eprintln!("peapod-agent: the container's seccomp profile: {e}; the exec does not run unfiltered");
                return Err(ExecutorError::Other(e));
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Installs `profile` on the calling process, with no_new_privs only if the kernel
/// refuses it without.
fn install(profile: &LinuxSeccomp) -> Result<(), String> {
    match libcontainer::seccomp::initialize_seccomp(profile) {
        Ok(_) => return Ok(()),
        Err(libcontainer::seccomp::SeccompError::LoadContext { .. }) if !has_cap_sys_admin() => {}
        Err(e) => return Err(describe(&e)),
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers; it only sets
    // a flag on the calling process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "setting no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    libcontainer::seccomp::initialize_seccomp(profile)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// libcontainer's error with its cause, which its Display leaves out.
fn describe(e: &libcontainer::seccomp::SeccompError) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether CAP_SYS_ADMIN is in the calling process's effective set.
fn has_cap_sys_admin() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << CAP_SYS_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A profile that refuses changing a file's mode with EPERM.
    fn no_chmod() -> LinuxSeccomp {
        serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{
                "names": ["chmod", "fchmod", "fchmodat", "fchmodat2"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
            }]
        }))
        .expect("a profile")
    }

    /// Drops CAP_SYS_ADMIN from the calling thread's effective set.
    fn drop_effective_sys_admin() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let mut header = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget writes two Data records (version 3) and reads the header;
        // both outlive the call.
        let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_SYS_ADMIN);
        // SAFETY: as above; capset only reads both.
        let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
    }

    /// In a thread of its own (filters, no_new_privs and capabilities are the
    /// thread's, and go with it): installs [`no_chmod`] the way an exec does, then
    /// reports the thread's NoNewPrivs, its seccomp mode and what chmod did.
    fn filtered_thread(with_sys_admin: bool) -> (String, String, Option<i32>) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = std::ffi::CString::new(file.path().as_os_str().as_encoded_bytes()).unwrap();
        std::thread::spawn(move || {
            if !with_sys_admin {
                drop_effective_sys_admin();
            }
            install(&no_chmod()).expect("installing the profile");
            // SAFETY: a NUL-terminated path that outlives the call.
            let chmod = unsafe { libc::chmod(path.as_ptr(), 0o600) };
            let errno = (chmod != 0).then(|| std::io::Error::last_os_error().raw_os_error());
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            (field("NoNewPrivs:"), field("Seccomp:"), errno.flatten())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn an_exec_with_cap_sys_admin_is_filtered_without_no_new_privs() {
        crate::network::tests::require_root();
        assert_eq!(
            filtered_thread(true),
            ("0".into(), "2".into(), Some(libc::EPERM))
        );
    }

    #[test]
    fn an_exec_without_cap_sys_admin_is_filtered_with_no_new_privs() {
        crate::network::tests::require_root();
        assert_eq!(
            filtered_thread(false),
            ("1".into(), "2".into(), Some(libc::EPERM))
        );
    }
}
