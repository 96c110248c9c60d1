//! What a VM is made of: a TOML file, overridden flag by flag from the command line.
//! Every field has a default that boots a guest on a machine where Peapod is installed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::layout::{CMDLINE_MAX_SIZE, MEM_ALIGNMENT};

/// Where `make install` puts the guest kernel and initramfs.
pub const DEFAULT_KERNEL: &str = "/usr/share/peapod/vmlinux";
pub const DEFAULT_INITRD: &str = "/usr/share/peapod/initramfs.cpio";
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// The MP table numbers CPUs and the IO-APIC with one-byte APIC IDs.
pub const MAX_VCPUS: u8 = 254;
/// A floor for obvious mistakes; whether the kernel and initrd fit is checked when
/// they are loaded, with a message that says how much they need.
pub const MIN_MEMORY_MIB: u32 = 8;
/// A sanity bound well above any pod, so a typo (`--memory 1280000`) fails early.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}(the keys are listed in docs/vmm.md)")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("vcpus = {0}: a VM needs between 1 and {MAX_VCPUS} vCPUs")]
    Vcpus(u8),
    #[error("memory = {0} MiB: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB")]
    MemorySize(u32),
    #[error("memory = {0} MiB: must be a multiple of 2 MiB (guest memory is mapped in 2 MiB pages); use {1} or {2}")]
    MemoryAlignment(u32, u32, u32),
    #[error("console = {0:?}: expected \"off\", \"stdout\" or the path of a file")]
    Console(String),
    #[error("platform_quirks = {0:?}: expected \"auto\", \"on\" or \"off\"")]
    Quirks(String),
    #[error("cmdline: {len} bytes with what the VMM adds, the kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
}

/// Where the guest's console (COM1) goes. Off by default: each byte is a VM exit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for Console {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Console::Off),
            "stdout" => Ok(Console::Stdout),
            "" => Err(ConfigError::Console(s.into())),
            path => Ok(Console::File(path.into())),
        }
    }
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Console::Off => f.write_str("off"),
            Console::Stdout => f.write_str("stdout"),
            Console::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Whether to apply the workarounds for a KVM that emulates guest kernel code
/// (see `platform.rs`). `Auto` detects such a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuirksMode {
    #[default]
    Auto,
    On,
    Off,
}

impl FromStr for QuirksMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(QuirksMode::Auto),
            "on" => Ok(QuirksMode::On),
            "off" => Ok(QuirksMode::Off),
            _ => Err(ConfigError::Quirks(s.into())),
        }
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(Console);
serde_via_str!(QuirksMode);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio; its `/init` is the guest agent.
    pub initrd: PathBuf,
    /// Words appended to the kernel command line the VMM builds.
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub console: Console,
    /// The control API's unix socket; `None` picks `/run/peapod/vmm-<pid>.sock`.
    pub api_socket: Option<PathBuf>,
    pub platform_quirks: QuirksMode,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: DEFAULT_KERNEL.into(),
            initrd: DEFAULT_INITRD.into(),
            cmdline: String::new(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: Console::Off,
            api_socket: None,
            platform_quirks: QuirksMode::Auto,
        }
    }
}

impl VmConfig {
    /// Reads a config file; keys it does not name keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemorySize(self.memory_mib));
        }
        let align_mib = (MEM_ALIGNMENT >> 20) as u32;
        if !self.memory_mib.is_multiple_of(align_mib) {
            let down = self.memory_mib - self.memory_mib % align_mib;
            return Err(ConfigError::MemoryAlignment(
                self.memory_mib,
                down,
                down + align_mib,
            ));
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: CMDLINE_MAX_SIZE - 1,
            });
        }
        Ok(())
    }

    /// The API socket path, with the per-process default filled in.
    pub fn api_socket_path(&self) -> PathBuf {
        self.api_socket.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/run/peapod/vmm-{}.sock", std::process::id()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn file_keys_override_defaults_and_unknown_keys_are_refused() {
        let cfg: VmConfig =
            toml::from_str("vcpus = 2\nconsole = \"/tmp/c.log\"\nplatform_quirks = \"off\"")
                .unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.console, Console::File("/tmp/c.log".into()));
        assert_eq!(cfg.platform_quirks, QuirksMode::Off);
        assert_eq!(cfg.memory_mib, DEFAULT_MEMORY_MIB);

        let err = toml::from_str::<VmConfig>("vcpu = 2").unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
        let err = toml::from_str::<VmConfig>("platform_quirks = \"maybe\"").unwrap_err();
        assert!(
            err.to_string().contains("\"auto\", \"on\" or \"off\""),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        let bad = |f: fn(&mut VmConfig)| {
            let mut c = VmConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.vcpus = 0).starts_with("vcpus = 0"));
        assert!(bad(|c| c.vcpus = 255).contains("between 1 and 254"));
        assert!(bad(|c| c.memory_mib = 4).contains("between 8 and"));
        assert!(bad(|c| c.memory_mib = 129).contains("use 128 or 130"));
        assert!(bad(|c| c.cmdline = "x".repeat(4096)).starts_with("cmdline:"));
    }

    #[test]
    fn console_parses_off_stdout_or_a_path() {
        assert_eq!("off".parse::<Console>().unwrap(), Console::Off);
        assert_eq!("stdout".parse::<Console>().unwrap(), Console::Stdout);
        assert_eq!(
            "/x/y".parse::<Console>().unwrap(),
            Console::File("/x/y".into())
        );
        assert!("".parse::<Console>().is_err());
    }
}
