//! The shim's configuration: one TOML file, `/etc/peapod/config.toml` unless
//! `PEAPOD_CONFIG` or the runtime's options (`config_path`) name another. Every key has
//! a default that works on a node where `make install` put the files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is read from when nothing names a file.
pub const DEFAULT_CONFIG: &str = "/etc/peapod/config.toml";
/// The first jailed uid: high above distributions' users (and systemd's dynamic ones),
/// below the 2^31 that some tools treat as negative.
pub const DEFAULT_JAIL_ID_BASE: u32 = 0x6000_0000;
/// The environment variable that names the configuration file.
pub const CONFIG_ENV: &str = "PEAPOD_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("peapod config {path}: cannot read it: {source} (set {CONFIG_ENV} or the runtime's config_path to an existing file)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peapod config {path}: {source}(the keys are listed in docs/shim.md)")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("peapod config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The guest kernel (uncompressed vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs, whose /init is the agent.
    pub initrd: PathBuf,
    /// The `peapod-vmm` binary; relative to the shim's own directory if relative.
    pub vmm: PathBuf,
    /// Per-pod runtime state, small and gone with the pod: records, sockets, the
    /// VMM's log. A tmpfs (`/run`) is right for it.
    pub state_dir: PathBuf,
    /// Per-pod data on the node's disk: the containers' private images, and their
    /// writable disks where the snapshot has no upperdir to hold them. Never a tmpfs:
    /// what a tenant writes would fill the node's RAM.
    pub data_dir: PathBuf,
    /// Read-only layer images, shared by every pod on the node.
    pub layer_cache: PathBuf,
    /// The layer cache's size bound: past it, images no pod uses are removed, least
    /// recently used first (images in use are kept whatever their size). 0: no bound
    /// (images whose layers containerd removed still go).
    pub layer_cache_max_mib: u64,
    /// vCPUs of a pod whose annotations set no CPU limit.
    pub default_vcpus: u32,
    /// Guest memory of a pod whose annotations set no memory limit.
    pub default_memory_mib: u64,
    /// Added to the pod's memory limit for the guest kernel and the agent.
    pub memory_overhead_mib: u64,
    /// Most vCPUs a pod gets, whatever its limit.
    pub max_vcpus: u32,
    /// No longer used: a pod's disks share one growing store (docs/decisions.md).
    /// Accepted, with a warning, so that a node's older config still loads.
    pub block_slots: Option<u32>,
    /// Size of each container's writable layer (a sparse file: only what is written
    /// takes space).
    pub upper_size_mib: u64,
    /// The shim's log level (containerd's shim log): error, warn, info, debug, trace.
    pub log_level: String,
    /// Keep the guest's console in `<state_dir>/<pod>/vm/console.log` (for debugging).
    pub guest_console: bool,
    /// Words appended to the guest kernel's command line.
    pub kernel_cmdline: String,
    /// How long the guest may take from the VMM's start to its agent answering.
    pub boot_timeout_secs: u64,
    /// The deadline of an ordinary call to the guest agent (create, start, exec...).
    /// Raise both on hosts whose KVM emulates guest kernel code, where a container's
    /// creation takes tens of seconds.
    pub agent_timeout_secs: u64,
    /// How long a stop may wait for the guest: a signal the agent does not deliver
    /// within two thirds of it, followed by a health probe it does not answer within
    /// the rest (or at once, for the pod's own sandbox), ends the VM from the host,
    /// and every task of the pod is reported exited. A hung guest kernel, a stuck
    /// agent or a starved vCPU cannot leave a pod Terminating.
    pub stop_timeout_secs: u64,
    /// How often the shim probes a running guest's health (the agent's Health call,
    /// with this as its deadline). 0: no probes.
    pub health_interval_secs: u64,
    /// After this many probes in a row go unanswered, the guest is taken as wedged:
    /// the VM is ended from the host and every task of the pod is reported exited, so
    /// that the kubelet sees the pod's containers end (and restarts them) instead of a
    /// pod that stays Running with nothing working. Must be at least 1.
    pub health_failures: u32,
    /// The VMM's seccomp filters; `false` passes `--no-seccomp`, to debug a VMM that
    /// its filter kills (SIGSYS). Never in production.
    pub vmm_seccomp: bool,
    /// The VMM's jail (crate::jail): own mount namespace and root, own uid, no
    /// capabilities, rlimits. `false` runs it as the shim's user in the host's tree,
    /// to debug. Never in production.
    pub jail: bool,
    /// A jailed VMM's uid and gid are this plus its pid: keep
    /// [`jail_id_base`, `jail_id_base` + pid_max) free of other users on the node.
    pub jail_id_base: u32,
    /// Start pods from templates: snapshots of a guest booted to its agent, one per
    /// kind of guest (crate::templates). The first pod of a kind boots and leaves one.
    pub templates: bool,
    /// Where templates live (on the node's disk: each holds the guest's memory).
    pub template_dir: PathBuf,
    /// How many templates are kept; past it the oldest go.
    pub template_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: "/usr/share/peapod/vmlinux".into(),
            initrd: "/usr/share/peapod/initramfs.cpio".into(),
            vmm: "peapod-vmm".into(),
            state_dir: "/run/peapod/pods".into(),
            data_dir: "/var/lib/peapod/pods".into(),
            layer_cache: "/var/lib/peapod/layers".into(),
            layer_cache_max_mib: 20 * 1024,
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            max_vcpus: 8,
            block_slots: None,
            upper_size_mib: 10 * 1024,
            log_level: "info".into(),
            guest_console: false,
            kernel_cmdline: String::new(),
            boot_timeout_secs: 120,
            agent_timeout_secs: 60,
            stop_timeout_secs: 10,
            health_interval_secs: 10,
            health_failures: 3,
            vmm_seccomp: true,
            jail: true,
            jail_id_base: DEFAULT_JAIL_ID_BASE,
            templates: false,
            template_dir: "/var/lib/peapod/templates".into(),
            template_max: 8,
        }
    }
}

impl Config {
    /// [`Config::layer_cache_max_mib`] in bytes; `None` for no bound.
    pub fn layer_cache_bound(&self) -> Option<u64> {
        (self.layer_cache_max_mib > 0).then_some(self.layer_cache_max_mib << 20)
    }

    /// [`Config::boot_timeout_secs`] as a duration.
    pub fn boot_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.boot_timeout_secs)
    }

    /// [`Config::stop_timeout_secs`] as a duration.
    pub fn stop_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stop_timeout_secs)
    }

    /// [`Config::health_interval_secs`] as a duration; `None` for no probes.
    pub fn health_interval(&self) -> Option<std::time::Duration> {
        (self.health_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(self.health_interval_secs))
    }

    /// [`Config::agent_timeout_secs`] as a duration.
    pub fn agent_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.agent_timeout_secs)
    }

    /// Reads the configuration: `explicit` (the runtime options' `config_path`), else
    /// `$PEAPOD_CONFIG`, else [`DEFAULT_CONFIG`] if it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let path = match explicit.map(Path::to_path_buf).or(env) {
            Some(p) => p,
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if config.default_vcpus == 0 || config.max_vcpus == 0 {
            return Err(invalid(
                "default_vcpus and max_vcpus must be at least 1".into(),
            ));
        }
        if let Some(n) = config.block_slots {
            log::warn!(
                "{}: block_slots = {n} is no longer used (a pod's disks share one device \
                 whose capacity grows); remove the line",
                path.display()
            );
        }
        // Linux's largest pid_max: every jailed id must stay below (uid_t)-1.
        const PID_MAX_LIMIT: u32 = 1 << 22;
        if config.jail_id_base < 1000 || config.jail_id_base >= u32::MAX - PID_MAX_LIMIT {
            return Err(invalid(format!(
                "jail_id_base = {}: the jailed ids (it plus a pid, up to {PID_MAX_LIMIT}) must \
                 be unprivileged and fit below {}; the default is {DEFAULT_JAIL_ID_BASE}",
                config.jail_id_base,
                u32::MAX - PID_MAX_LIMIT
            )));
        }
        if config.default_memory_mib < 64 {
            return Err(invalid(format!(
                "default_memory_mib = {}: the guest needs at least 64",
                config.default_memory_mib
            )));
        }
        if config.boot_timeout_secs == 0
            || config.agent_timeout_secs == 0
            || config.stop_timeout_secs < 2
            || config.health_failures == 0
        {
            return Err(invalid(
                "boot_timeout_secs, agent_timeout_secs and health_failures must be at least \
                 1, stop_timeout_secs at least 2"
                    .into(),
            ));
        }
        if config.vmm.is_relative() {
            config.vmm = resolve_beside_self(&config.vmm);
        }
        Ok(config)
    }

    /// Memory and vCPUs of a pod from its sandbox annotations (the pod's limits as CRI
    /// passes them), with the defaults where a pod sets none.
    pub fn vm_size(&self, annotations: &HashMap<String, String>) -> VmSize {
        let num = |key: &str| -> Option<u64> {
            annotations
                .get(key)?
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&v| v > 0)
        };
        let quota = num("io.kubernetes.cri.sandbox-cpu-quota");
        let period = num("io.kubernetes.cri.sandbox-cpu-period");
        let vcpus = match (quota, period) {
            (Some(q), Some(p)) => q.div_ceil(p).min(self.max_vcpus as u64) as u32,
            _ => self.default_vcpus,
        };
        let memory_mib = match num("io.kubernetes.cri.sandbox-memory") {
            Some(bytes) => bytes.div_ceil(1 << 20) + self.memory_overhead_mib,
            None => self.default_memory_mib,
        };
        // The VMM wants a multiple of 2 MiB.
        VmSize {
            vcpus: vcpus.max(1),
            memory_mib: memory_mib.div_ceil(2) * 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// `name` in the directory of the running executable if it exists there, else `name`
/// as given (looked up on PATH when run).
fn resolve_beside_self(name: &Path) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| name.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/peapod/test.toml"), text)
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = parse("vmm = \"/usr/bin/peapod-vmm\"").unwrap();
        assert_eq!(c.vmm, PathBuf::from("/usr/bin/peapod-vmm"));
        assert_eq!(c.upper_size_mib, Config::default().upper_size_mib);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file() {
        let e = parse("kernal = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("test.toml") && e.contains("kernal"), "{e}");
        // A setting no longer used still loads.
        assert_eq!(parse("block_slots = 12").unwrap().block_slots, Some(12));
        for bad in ["0", "4294000000"] {
            let e = parse(&format!("jail_id_base = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("jail_id_base") && e.contains("default"), "{e}");
        }
    }

    #[test]
    fn a_missing_named_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/peapod.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/peapod.toml"), "{e}");
    }

    #[test]
    fn the_pod_size_comes_from_its_annotations() {
        let c = parse("").unwrap();
        let none = HashMap::new();
        assert_eq!(
            c.vm_size(&none),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let a: HashMap<String, String> = [
            ("io.kubernetes.cri.sandbox-cpu-quota", "150000"),
            ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
            ("io.kubernetes.cri.sandbox-memory", "134217729"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let size = c.vm_size(&a);
        assert_eq!(size.vcpus, 2);
        // 128 MiB and one byte rounds up to 129, plus 64 of overhead, to even.
        assert_eq!(size.memory_mib, 194);
    }
}
