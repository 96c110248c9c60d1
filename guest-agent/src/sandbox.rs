//! Preparing the guest for a pod, when the host calls CreateSandbox: the hostname,
//! `/etc/resolv.conf`, the network (see [`crate::network`]) and sysctls.
//!
//! The ttrpc server maps the request onto a [`SandboxConfig`] with the parsing
//! constructors ([`Dns::parse`], [`InterfaceConfig::parse`], [`RouteConfig::parse`]),
//! which refuse a malformed request, then calls [`prepare`], which checks the rest
//! before it changes anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::libc;

pub use crate::network::{
    configure_network, InterfaceConfig, IpCidr, MacAddr, RouteConfig, SandboxNetwork,
};

/// Where [`prepare`] writes the DNS configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where [`prepare`] writes sysctls.
pub const SYSCTL_ROOT: &str = "/proc/sys";

/// What CreateSandbox asks of the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `None` (an empty hostname in the request) keeps the guest's.
    pub hostname: Option<String>,
    /// `None` leaves `/etc/resolv.conf` alone.
    pub dns: Option<Dns>,
    pub network: SandboxNetwork,
    /// `net.ipv4.ip_forward` -> `1`.
    pub sysctls: BTreeMap<String, String>,
    /// Restored from a snapshot: the one card takes the one interface's MAC.
    pub restored: bool,
    /// The host's wall clock, in nanoseconds since 1970, that the guest's is set to.
    pub wall_clock_unix_nanos: Option<i64>,
    /// The host's random bytes for the guest's pool.
    pub entropy: Vec<u8>,
}

/// The contents of `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// A failure to prepare the guest. Each message names the object, the cause and, where
/// one is known, the fix.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request asks for something malformed or impossible; it changed nothing.
    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },
    #[error(
        "{object}: no guest interface has this MAC (the VM's --net mac= must match; \
         the guest has: {present})"
    )]
    NoSuchMac { object: String, present: String },
    /// The kernel or the file system refused a change.
    #[error("{what}: {source}{hint}")]
    Failed {
        what: String,
        source: io::Error,
        hint: String,
    },
}

/// Prepares the guest as asked: network, hostname, `/etc/resolv.conf`, then sysctls
/// (some of which, `net.ipv4.conf.eth0.*`, need the interfaces named first). The
/// hostname, the DNS words, the sysctl names and the interfaces' MACs are all checked
/// before anything changes.
pub fn prepare(sandbox: &SandboxConfig) -> Result<(), SandboxError> {
    prepare_at(sandbox, Path::new(RESOLV_CONF), Path::new(SYSCTL_ROOT))
}

fn prepare_at(
    sandbox: &SandboxConfig,
    resolv_conf: &Path,
    sysctl_root: &Path,
) -> Result<(), SandboxError> {
    if let Some(name) = &sandbox.hostname {
        check_hostname(name)?;
    }
    let resolv_text = sandbox.dns.as_ref().map(render_resolv_conf).transpose()?;
    for name in sandbox.sysctls.keys() {
        sysctl_path(sysctl_root, name)?;
    }
    // The guest's clock and random pool before anything uses them: a restored guest
    // has its snapshot's, the same in every sibling.
    if let Some(nanos) = sandbox.wall_clock_unix_nanos {
        set_wall_clock(nanos)?;
    }
    if !sandbox.entropy.is_empty() {
        add_entropy(&sandbox.entropy)?;
    }
    // First: it finds every interface before it changes any.
    configure_network(&sandbox.network, sandbox.restored)?;
    if let Some(name) = &sandbox.hostname {
        set_hostname(name)?;
    }
    if let Some(text) = resolv_text {
        write_atomically(resolv_conf, &text)?;
    }
    apply_sysctls(sysctl_root, &sandbox.sysctls)
}

/// Sets the guest's hostname, which must be DNS labels (RFC 1123: letters, digits and
/// inner hyphens, 63 bytes at most each) joined by dots, 64 bytes at most.
/// Sets CLOCK_REALTIME to `unix_nanos`.
fn set_wall_clock(unix_nanos: i64) -> Result<(), SandboxError> {
    let time = nix::sys::time::TimeSpec::new(
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time).map_err(|e| {
        SandboxError::Failed {
            what: format!("setting the wall clock to {unix_nanos} ns after 1970"),
            source: e.into(),
            hint: String::new(),
        }
    })
}

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` for `bytes`, all of them credited as entropy.
fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let words = bytes.len().div_ceil(4);
    let mut info = Vec::with_capacity(2 + words);
    info.push((bytes.len() * 8) as u32); // entropy_count, in bits
    info.push(bytes.len() as u32); // buf_size, in bytes
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info.push(u32::from_ne_bytes(word));
    }
    info
}

/// Mixes the host's random `bytes` into the kernel's pool, credited, and reseeds the
/// kernel's generator from it, so that what the guest draws from now on differs from
/// what any other guest restored from the same snapshot draws.
fn add_entropy(bytes: &[u8]) -> Result<(), SandboxError> {
    let failed = |what: &str, source: io::Error| SandboxError::Failed {
        what: format!("the guest's random pool: {what}"),
        source,
        hint: String::new(),
    };
    let random = fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| failed("opening /dev/random", e))?;
    let info = rand_pool_info(bytes);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&random);
    // SAFETY: `info` is a rand_pool_info (two ints, then buf_size bytes in u32 words)
    // that outlives the call; the kernel reads no more than buf_size bytes of it.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(failed("RNDADDENTROPY", io::Error::last_os_error()));
    }
    // SAFETY: an ioctl without an argument on an open /dev/random.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG) } != 0 {
        return Err(failed("RNDRESEEDCRNG", io::Error::last_os_error()));
    }
    Ok(())
}

pub fn set_hostname(name: &str) -> Result<(), SandboxError> {
    check_hostname(name)?;
    nix::unistd::sethostname(name).map_err(|e| SandboxError::Failed {
        what: format!("hostname {name:?}: sethostname"),
        source: e.into(),
        hint: String::new(),
    })
}

fn check_hostname(name: &str) -> Result<(), SandboxError> {
    let reason = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > 64 {
        Some(format!(
            "is {} bytes long, more than the kernel's 64",
            name.len()
        ))
    } else {
        name.split('.').find_map(|label| {
            if label.is_empty() {
                Some("has an empty label (two dots, or a dot at an end)".to_string())
            } else if label.len() > 63 {
                Some(format!("has a label of more than 63 bytes: {label:?}"))
            } else if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                Some(format!(
                    "has a label with characters other than letters, digits and '-': \
                     {label:?}"
                ))
            } else if label.starts_with('-') || label.ends_with('-') {
                Some(format!(
                    "has a label that starts or ends with '-': {label:?}"
                ))
            } else {
                None
            }
        })
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(SandboxError::Invalid {
            object: format!("hostname {name:?}"),
            reason: format!("{reason} (RFC 1123 host names only)"),
        }),
    }
}

impl Dns {
    /// Parses the protocol's strings: `servers` must be IP addresses; `searches` and
    /// `options` are words without spaces (`ndots:5`).
    pub fn parse(
        servers: &[impl AsRef<str>],
        searches: &[impl AsRef<str>],
        options: &[impl AsRef<str>],
    ) -> Result<Dns, SandboxError> {
        let servers = servers
            .iter()
            .map(|s| {
                let s = s.as_ref();
                s.parse().map_err(|_| SandboxError::Invalid {
                    object: "resolv.conf".to_string(),
                    reason: format!(
                        "nameserver {s:?} is not an IP address (resolv.conf takes no \
                         host names)"
                    ),
                })
            })
            .collect::<Result<_, _>>()?;
        let dns = Dns {
            servers,
            searches: searches.iter().map(|s| s.as_ref().to_string()).collect(),
            options: options.iter().map(|s| s.as_ref().to_string()).collect(),
        };
        render_resolv_conf(&dns)?;
        Ok(dns)
    }
}

/// Writes `path` as a resolv.conf of `dns`: written beside it, then renamed over it, so
/// a reader sees the old file or the new one.
pub fn write_resolv_conf(path: &Path, dns: &Dns) -> Result<(), SandboxError> {
    write_atomically(path, &render_resolv_conf(dns)?)
}

fn render_resolv_conf(dns: &Dns) -> Result<String, SandboxError> {
    let mut text = String::new();
    for server in &dns.servers {
        let _ = writeln!(text, "nameserver {server}");
    }
    for (keyword, words) in [("search", &dns.searches), ("options", &dns.options)] {
        if words.is_empty() {
            continue;
        }
        if let Some(bad) = words
            .iter()
            .find(|w| w.is_empty() || w.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(SandboxError::Invalid {
                object: "resolv.conf".to_string(),
                reason: format!(
                    "{keyword} {bad:?} is not one word (resolv.conf separates them with \
                     spaces)"
                ),
            });
        }
        let _ = writeln!(text, "{keyword} {}", words.join(" "));
    }
    Ok(text)
}

fn write_atomically(path: &Path, text: &str) -> Result<(), SandboxError> {
    let failed = |what: String, source| SandboxError::Failed {
        what,
        source,
        hint: String::new(),
    };
    let name = path.file_name().ok_or_else(|| SandboxError::Invalid {
        object: path.display().to_string(),
        reason: "is not a file path".to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".peapod-tmp");
    let temp = dir.join(temp_name);
    if !dir.as_os_str().is_empty() {
        fs::create_dir_all(dir)
            .map_err(|e| failed(format!("{}: creating {}", path.display(), dir.display()), e))?;
    }
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temp)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written.and_then(|()| fs::rename(&temp, path)) {
        let _ = fs::remove_file(&temp);
        return Err(failed(
            format!("{}: writing it through {}", path.display(), temp.display()),
            e,
        ));
    }
    Ok(())
}

/// Writes each sysctl under `root` (normally `/proc/sys`): `net.ipv4.ip_forward` is
/// `root/net/ipv4/ip_forward`. Names are dotted; a name with a `/` (as `sysctl -w`
/// allows, for interface names with dots) or an empty part is refused.
pub fn apply_sysctls(root: &Path, sysctls: &BTreeMap<String, String>) -> Result<(), SandboxError> {
    for (name, value) in sysctls {
        let path = sysctl_path(root, name)?;
        fs::write(&path, value).map_err(|e| SandboxError::Failed {
            what: format!("sysctl {name}: writing {value:?} to {}", path.display()),
            hint: sysctl_hint(&e).to_string(),
            source: e,
        })?;
    }
    Ok(())
}

fn sysctl_path(root: &Path, name: &str) -> Result<PathBuf, SandboxError> {
    let invalid = |reason: &str| SandboxError::Invalid {
        object: format!("sysctl {name:?}"),
        reason: reason.to_string(),
    };
    if name.contains('/') {
        return Err(invalid(
            "has a '/': write sysctl names with dots only, as in net.ipv4.ip_forward",
        ));
    }
    let mut path = root.to_path_buf();
    for part in name.split('.') {
        if part.is_empty() {
            return Err(invalid(
                "has an empty part (two dots, or a dot at an end): write it as in \
                 net.ipv4.ip_forward",
            ));
        }
        if part.chars().any(|c| c.is_control()) {
            return Err(invalid("has a control character"));
        }
        path.push(part);
    }
    Ok(path)
}

fn sysctl_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "; the guest kernel has no such sysctl: check the name, or drop it from the \
             pod's sysctls"
        }
        Some(libc::EINVAL) => "; the kernel refuses this value: check its format and range",
        Some(libc::EACCES | libc::EPERM) => "; this sysctl is read-only in the guest",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_reason(e: SandboxError) -> String {
        match e {
            SandboxError::Invalid { .. } => e.to_string(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        for good in ["pod", "my-pod-1", "POD7", "a.b.c", "x".repeat(63).as_str()] {
            check_hostname(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        let long_ok = format!("{}.{}", "a".repeat(32), "b".repeat(31));
        assert_eq!(long_ok.len(), 64);
        check_hostname(&long_ok).unwrap();
        let cases = [
            ("", "is empty"),
            ("-pod", "starts or ends with '-'"),
            ("pod-", "starts or ends with '-'"),
            ("my_pod", "characters other than"),
            ("pod 1", "characters other than"),
            ("a..b", "empty label"),
            (".pod", "empty label"),
        ];
        for (bad, why) in cases {
            let message = invalid_reason(check_hostname(bad).unwrap_err());
            assert!(message.contains(why), "{bad:?}: {message}");
            assert!(
                message.starts_with(&format!("hostname {bad:?}: ")),
                "{message}"
            );
        }
        let message = invalid_reason(check_hostname(&"x".repeat(64)).unwrap_err());
        assert!(message.contains("more than 63 bytes"), "{message}");
        let too_long = format!("{}.{}", "a".repeat(32), "b".repeat(32));
        let message = invalid_reason(check_hostname(&too_long).unwrap_err());
        assert!(message.contains("65 bytes long"), "{message}");
    }

    #[test]
    fn resolv_conf_text() {
        let dns = Dns::parse(
            &["10.96.0.10", "1.1.1.1"],
            &["default.svc.cluster.local", "cluster.local"],
            &["ndots:5", "edns0"],
        )
        .unwrap();
        assert_eq!(
            render_resolv_conf(&dns).unwrap(),
            "nameserver 10.96.0.10\nnameserver 1.1.1.1\n\
             search default.svc.cluster.local cluster.local\n\
             options ndots:5 edns0\n"
        );
        let only_server = Dns::parse(&["8.8.8.8"], &[] as &[&str], &[] as &[&str]).unwrap();
        assert_eq!(
            render_resolv_conf(&only_server).unwrap(),
            "nameserver 8.8.8.8\n"
        );
        assert_eq!(render_resolv_conf(&Dns::default()).unwrap(), "");
    }

    #[test]
    fn resolv_conf_refuses_bad_words() {
        let none: &[&str] = &[];
        let e = invalid_reason(Dns::parse(&["dns.example"], none, none).unwrap_err());
        assert!(
            e.contains("nameserver \"dns.example\" is not an IP address"),
            "{e}"
        );
        let e = invalid_reason(Dns::parse(&["1.1.1.1"], &["a b"], none).unwrap_err());
        assert!(e.contains("search \"a b\" is not one word"), "{e}");
        let e = invalid_reason(Dns::parse(&["1.1.1.1"], none, &["ndots:5\n"]).unwrap_err());
        assert!(e.contains("options \"ndots:5\\n\" is not one word"), "{e}");
        let e = invalid_reason(Dns::parse(none, &[""], none).unwrap_err());
        assert!(e.contains("search \"\""), "{e}");
    }

    #[test]
    fn resolv_conf_is_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/resolv.conf");
        let dns = Dns::parse(&["10.0.0.2"], &["svc.local"], &["ndots:2"]).unwrap();
        write_resolv_conf(&path, &dns).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "nameserver 10.0.0.2\nsearch svc.local\noptions ndots:2\n"
        );
        let again = Dns::parse(&["10.0.0.3"], &[] as &[&str], &[] as &[&str]).unwrap();
        write_resolv_conf(&path, &again).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 10.0.0.3\n");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["resolv.conf"], "the temporary file is gone");
    }

    #[test]
    fn sysctl_names_map_to_paths() {
        let root = Path::new("/proc/sys");
        assert_eq!(
            sysctl_path(root, "net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path(root, "kernel.shm_rmid_forced").unwrap(),
            Path::new("/proc/sys/kernel/shm_rmid_forced")
        );
        for (bad, why) in [
            ("", "empty part"),
            ("net..ipv4", "empty part"),
            (".net", "empty part"),
            ("net.", "empty part"),
            ("net/ipv4/ip_forward", "has a '/'"),
            ("net.ipv4.conf.eth0/1.rp_filter", "has a '/'"),
            ("../../etc/passwd", "has a '/'"),
            ("net\n.x", "control character"),
        ] {
            let message = invalid_reason(sysctl_path(root, bad).unwrap_err());
            assert!(message.contains(why), "{bad:?}: {message}");
            assert!(
                message.starts_with(&format!("sysctl {bad:?}: ")),
                "{message}"
            );
        }
    }

    #[test]
    fn sysctls_are_written_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("net/ipv4")).unwrap();
        fs::create_dir_all(root.join("kernel")).unwrap();
        fs::write(root.join("net/ipv4/ip_forward"), "0\n").unwrap();
        fs::write(root.join("kernel/msgmax"), "8192\n").unwrap();
        let sysctls = BTreeMap::from([
            ("net.ipv4.ip_forward".to_string(), "1".to_string()),
            ("kernel.msgmax".to_string(), "65536".to_string()),
        ]);
        apply_sysctls(root, &sysctls).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        assert_eq!(
            fs::read_to_string(root.join("kernel/msgmax")).unwrap(),
            "65536"
        );

        let missing = BTreeMap::from([("net.core.nosuch".to_string(), "1".to_string())]);
        let message = apply_sysctls(root, &missing).unwrap_err().to_string();
        assert!(
            message.starts_with("sysctl net.core.nosuch: writing \"1\" to "),
            "{message}"
        );
        assert!(
            message.contains("the guest kernel has no such sysctl"),
            "{message}"
        );

        let bad = BTreeMap::from([("net..x".to_string(), "1".to_string())]);
        let message = apply_sysctls(root, &bad).unwrap_err().to_string();
        assert!(
            message.contains("sysctl \"net..x\": has an empty part"),
            "{message}"
        );
    }

    #[test]
    fn host_entropy_is_a_rand_pool_info() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info[..2], [40, 5], "bits credited, bytes given");
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(info.len(), 4);
    }

    #[test]
    fn prepare_checks_everything_before_changing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let sandbox = SandboxConfig {
            hostname: Some("pod".to_string()),
            dns: Some(Dns::parse(&["10.0.0.2"], &["x"], &["ndots:1"]).unwrap()),
            sysctls: BTreeMap::from([("net/ipv4/ip_forward".to_string(), "1".to_string())]),
            ..SandboxConfig::default()
        };
        let message = prepare_at(&sandbox, &resolv, dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("has a '/'"), "{message}");
        assert!(!resolv.exists(), "nothing was written");
    }

    #[test]
    fn prepares_a_guest_in_fresh_namespaces() {
        use crate::network::tests::{in_new_netns, ip, veth};
        in_new_netns(|| {
            veth("pp-guest", "02:00:00:aa:bb:01", "pp-host");
            let dir = tempfile::tempdir().unwrap();
            let resolv = dir.path().join("resolv.conf");
            let sandbox = SandboxConfig {
                hostname: Some("pod-1".to_string()),
                dns: Some(Dns::parse(&["10.96.0.10"], &["svc.local"], &["ndots:5"]).unwrap()),
                network: SandboxNetwork {
                    interfaces: vec![InterfaceConfig::parse(
                        "02:00:00:aa:bb:01",
                        "eth0",
                        &["10.88.0.5/16"],
                        0,
                    )
                    .unwrap()],
                    routes: vec![RouteConfig::parse("", "10.88.0.1", "", "").unwrap()],
                },
                // Both are per network namespace; the second needs eth0 named first.
                sysctls: BTreeMap::from([
                    ("net.ipv4.ip_forward".to_string(), "1".to_string()),
                    ("net.ipv4.conf.eth0.rp_filter".to_string(), "2".to_string()),
                ]),
                ..SandboxConfig::default()
            };
            prepare_at(&sandbox, &resolv, Path::new(SYSCTL_ROOT)).unwrap();
            assert_eq!(nix::unistd::gethostname().unwrap(), "pod-1");
            assert_eq!(
                fs::read_to_string(&resolv).unwrap(),
                "nameserver 10.96.0.10\nsearch svc.local\noptions ndots:5\n"
            );
            let sysctl = |p: &str| fs::read_to_string(Path::new(SYSCTL_ROOT).join(p)).unwrap();
            assert_eq!(sysctl("net/ipv4/ip_forward"), "1\n");
            assert_eq!(sysctl("net/ipv4/conf/eth0/rp_filter"), "2\n");
            assert!(ip(&["-4", "route", "show"]).contains("default via 10.88.0.1 dev eth0"));
            prepare_at(&sandbox, &resolv, Path::new(SYSCTL_ROOT)).expect("again");

            // A MAC the guest lacks fails before the hostname or anything else changes.
            let mut wrong = sandbox.clone();
            wrong.hostname = Some("other".to_string());
            wrong.network.interfaces[0].mac = "02:00:00:aa:bb:99".parse().unwrap();
            let e = prepare_at(&wrong, &resolv, Path::new(SYSCTL_ROOT)).unwrap_err();
            assert!(matches!(e, SandboxError::NoSuchMac { .. }), "{e}");
            assert_eq!(nix::unistd::gethostname().unwrap(), "pod-1");
        });
    }
}
