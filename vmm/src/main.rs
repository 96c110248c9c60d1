//! `peapod-vmm --kernel vmlinux --initrd initramfs.cpio [--console stdout]
//!   [--block path=disk.img,id=data] [--block-slots 4] [--net tap=tap0] [--vsock cid=3,socket=v.sock]
//!   [--restore snapshot-dir] [--no-seccomp]`
//!
//! Exit codes: 0 the guest or an operator stopped the VM; 1 the VM could not be
//! built (the message says why and what to do); 2 a command-line mistake; 3 the guest
//! died (emulation failure, KVM error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::LevelFilter;
use peapod_vmm::config::{BlockConfig, Console, NetConfig, QuirksMode, VsockConfig};
use peapod_vmm::VmConfig;

#[derive(Parser, Debug)]
#[command(name = "peapod-vmm", version, about = "Peapod's microVM monitor")]
struct Cli {
    /// TOML file with any of the keys below (docs/vmm.md); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Uncompressed ELF vmlinux [default: /usr/share/peapod/vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Uncompressed initramfs whose /init is the guest agent
    /// [default: /usr/share/peapod/initramfs.cpio]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line words, appended to the VMM's own
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1]
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB, a multiple of 2 [default: 128]
    #[arg(long = "memory")]
    memory_mib: Option<u32>,
    /// Guest console: off, stdout, or a file path [default: off]
    #[arg(long)]
    console: Option<Console>,
    /// Control API socket [default: /run/peapod/vmm-<pid>.sock]
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Workarounds for a KVM that emulates guest kernel code: auto, on, off [default: auto]
    #[arg(long)]
    platform_quirks: Option<QuirksMode>,
    /// A disk, `path=<file>[,ro][,id=<serial>]`; repeat for more (vda, vdb, ...).
    /// Replaces the config file's [[block]] list.
    #[arg(long = "block")]
    block: Vec<BlockConfig>,
    /// Empty block devices after the --block ones, filled through the API [default: 0]
    #[arg(long)]
    block_slots: Option<u8>,
    /// Network card on a tap: `tap=<ifname>[,mac=<02:..>]` or `fd=<n>[,mac=<02:..>]`
    #[arg(long)]
    net: Option<NetConfig>,
    /// Hybrid vsock: `cid=<n>,socket=<path>` (host side is a unix socket)
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// Start from the snapshot in this directory (written by the API's vm.snapshot)
    /// instead of booting; give the snapshot VM's size and devices
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Run without the seccomp filters, to debug a VMM that a filter kills (SIGSYS):
    /// never in production, a guest that took over a VMM thread would then have every
    /// system call of the VMM's user
    #[arg(long)]
    no_seccomp: bool,
    /// error, warn, info, debug or trace
    #[arg(long, default_value = "info")]
    log_level: LevelFilter,
}

impl Cli {
    fn into_config(self) -> Result<VmConfig, peapod_vmm::config::ConfigError> {
        let mut c = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            console,
            platform_quirks
        );
        if self.api_socket.is_some() {
            c.api_socket = self.api_socket;
        }
        if !self.block.is_empty() {
            c.block = self.block;
        }
        if let Some(n) = self.block_slots {
            c.block_slots = n;
        }
        if self.net.is_some() {
            c.net = self.net;
        }
        if self.vsock.is_some() {
            c.vsock = self.vsock;
        }
        if self.restore.is_some() {
            c.restore = self.restore;
        }
        if self.no_seccomp {
            c.seccomp = false;
        }
        Ok(c)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    peapod_vmm::logger::init(cli.log_level);
    let result = cli
        .into_config()
        .map_err(peapod_vmm::VmError::from)
        .and_then(|config| peapod_vmm::run(&config));
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == 0 {
                log::info!("stopped: {reason}");
            } else {
                log::error!("stopped: {reason}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
