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
    #[error("{what} {value:?}: {problem} (expected {expected})")]
    Device {
        what: &'static str,
        value: String,
        problem: String,
        expected: &'static str,
    },
    #[error("{wanted} virtio devices: the VM has interrupt lines for at most {MAX_VIRTIO_DEVICES} (block devices, slots, net, vsock and rng together)")]
    TooManyDevices { wanted: usize },
}

/// IO-APIC pins 5-23 carry virtio interrupts, one per device (0-4 are the PC's own).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// The guest's AF_VSOCK context ID: 0-2 are reserved (2 is the host).
pub const MIN_GUEST_CID: u64 = 3;

/// A disk the VM boots with: `path=/x.img[,ro][,id=name]` on the command line,
/// a `[[block]]` table in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads from /sys/block/vdX/serial (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

/// The VM's network card on a tap: `tap=<ifname>[,mac=..]` or `fd=<n>[,mac=..]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A tap interface the VMM opens (or creates) in its network namespace.
    #[serde(default)]
    pub tap: Option<String>,
    /// An open tap file descriptor inherited from the parent (the shim).
    #[serde(default)]
    pub fd: Option<i32>,
    /// `02:xx:xx:xx:xx:xx`; a random locally administered one if unset.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The hybrid vsock device: `cid=<n>,socket=<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

fn device_error(
    what: &'static str,
    value: &str,
    problem: impl Into<String>,
    expected: &'static str,
) -> ConfigError {
    ConfigError::Device {
        what,
        value: value.into(),
        problem: problem.into(),
        expected,
    }
}

/// Splits `a=1,b,c=2` into keys and optional values.
fn key_values(s: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
}

const BLOCK_SYNTAX: &str = "path=<file>[,ro][,id=<serial>]";
const NET_SYNTAX: &str = "tap=<ifname>[,mac=<02:..>] or fd=<n>[,mac=<02:..>]";
const VSOCK_SYNTAX: &str = "cid=<3 or more>,socket=<path>";

impl FromStr for BlockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |p: String| device_error("--block", s, p, BLOCK_SYNTAX);
        let (mut path, mut read_only, mut id) = (None, false, None);
        for (k, v) in key_values(s) {
            match (k, v) {
                ("path", Some(v)) => path = Some(PathBuf::from(v)),
                ("ro", None) => read_only = true,
                ("id", Some(v)) => id = Some(v.to_string()),
                _ => return Err(err(format!("unknown or incomplete key {k:?}"))),
            }
        }
        let path = path.ok_or_else(|| err("no path".into()))?;
        Ok(Self {
            path,
            read_only,
            id,
        })
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |p: String| device_error("--net", s, p, NET_SYNTAX);
        let mut net = NetConfig {
            tap: None,
            fd: None,
            mac: None,
        };
        for (k, v) in key_values(s) {
            match (k, v) {
                ("tap", Some(v)) => net.tap = Some(v.to_string()),
                ("fd", Some(v)) => {
                    net.fd = Some(
                        v.parse()
                            .map_err(|_| err(format!("fd {v:?} is not a number")))?,
                    )
                }
                ("mac", Some(v)) => net.mac = Some(v.to_string()),
                _ => return Err(err(format!("unknown or incomplete key {k:?}"))),
            }
        }
        Ok(net)
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |p: String| device_error("--vsock", s, p, VSOCK_SYNTAX);
        let (mut cid, mut socket) = (None, None);
        for (k, v) in key_values(s) {
            match (k, v) {
                ("cid", Some(v)) => {
                    cid = Some(
                        v.parse()
                            .map_err(|_| err(format!("cid {v:?} is not a number")))?,
                    )
                }
                ("socket", Some(v)) => socket = Some(PathBuf::from(v)),
                _ => return Err(err(format!("unknown or incomplete key {k:?}"))),
            }
        }
        match (cid, socket) {
            (Some(cid), Some(socket)) => Ok(Self { cid, socket }),
            _ => Err(err("both cid and socket are needed".into())),
        }
    }
}

impl NetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let shown = format!("{self:?}");
        let err = |p: &str| device_error("net", &shown, p, NET_SYNTAX);
        match (&self.tap, self.fd) {
            (Some(_), Some(_)) => return Err(err("give a tap name or an fd, not both")),
            (None, None) => return Err(err("give a tap name or an fd")),
            (Some(name), None) if name.is_empty() || name.len() > 15 => {
                return Err(err("an interface name has 1 to 15 bytes"))
            }
            _ => {}
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac).ok_or_else(|| err("mac is not six hex bytes like 02:00:00:00:00:01"))?;
        }
        Ok(())
    }
}

/// `02:00:00:00:00:01` -> bytes; a multicast address (low bit of the first byte) is refused.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
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
    /// Disks the VM boots with, in the order the guest names them (vda, vdb, ...).
    pub block: Vec<BlockConfig>,
    /// Empty block devices after `block`, filled at run time through the API.
    pub block_slots: u8,
    pub net: Option<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// Each thread's seccomp filter (`crate::seccomp`); off only to debug the VMM.
    pub seccomp: bool,
    /// A snapshot's directory (`vm.snapshot`) to start from instead of booting
    /// `kernel` and `initrd`; the devices and VM size must be the snapshot VM's.
    pub restore: Option<PathBuf>,
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
            block: Vec::new(),
            block_slots: 0,
            net: None,
            vsock: None,
            seccomp: true,
            restore: None,
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
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < MIN_GUEST_CID || vsock.cid >= u64::from(u32::MAX) {
                return Err(device_error(
                    "vsock cid",
                    &vsock.cid.to_string(),
                    "0-2 are reserved, CIDs are 32-bit and 4294967295 means any",
                    "a number from 3 to 4294967294",
                ));
            }
        }
        let wanted = self.virtio_device_count();
        if wanted > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices { wanted });
        }
        Ok(())
    }

    /// Block devices and slots, net, vsock, and the always-present rng.
    pub fn virtio_device_count(&self) -> usize {
        self.block.len()
            + usize::from(self.block_slots)
            + usize::from(self.net.is_some())
            + usize::from(self.vsock.is_some())
            + 1
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
    fn device_flags_parse_and_name_the_fix() {
        let b: BlockConfig = "path=/x.img,ro,id=layer0".parse().unwrap();
        assert_eq!(
            b,
            BlockConfig {
                path: "/x.img".into(),
                read_only: true,
                id: Some("layer0".into())
            }
        );
        let e = "ro".parse::<BlockConfig>().unwrap_err().to_string();
        assert!(e.contains("no path") && e.contains("path=<file>"), "{e}");
        let e = "path=/x,rw".parse::<BlockConfig>().unwrap_err().to_string();
        assert!(e.contains("\"rw\""), "{e}");

        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:02".parse().unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        let mut c = VmConfig {
            net: Some("fd=x".parse().unwrap_or(n.clone())),
            ..Default::default()
        };
        c.validate().unwrap();
        c.net = Some("tap=tap0,fd=3".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("not both"));
        c.net = Some("tap=tap0,mac=01:00:00:00:00:02".parse().unwrap());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("six hex bytes"));
        assert!("fd=x".parse::<NetConfig>().is_err());

        let v: VsockConfig = "cid=3,socket=/run/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        c.net = None;
        c.vsock = Some("cid=2,socket=/v".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("reserved"));
        assert!("cid=3".parse::<VsockConfig>().is_err());

        c.vsock = None;
        c.block_slots = 19;
        assert!(c.validate().unwrap_err().to_string().contains("at most 19"));
        c.block_slots = 18;
        c.validate().unwrap();
    }

    #[test]
    fn devices_come_from_the_file_too() {
        let c: VmConfig = toml::from_str(
            "block_slots = 2\n[[block]]\npath = \"/a.img\"\nread_only = true\n[vsock]\ncid = 7\nsocket = \"/v.sock\"\n[net]\ntap = \"tap1\"\n",
        )
        .unwrap();
        assert_eq!(c.block.len(), 1);
        assert!(c.block[0].read_only);
        assert_eq!(c.block_slots, 2);
        assert_eq!(c.vsock.unwrap().cid, 7);
        assert_eq!(c.net.unwrap().tap.as_deref(), Some("tap1"));
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
