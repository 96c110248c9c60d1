//! A CNI network for a private containerd's CRI plugin, from Debian's
//! containernetworking-plugins: the `bridge` plugin on a bridge of the test's own, with
//! `host-local` addresses from an IPv4 /24 and an IPv6 /64 of its own (a dual-stack
//! network, as dual-stack clusters give pods) and IPAM state in the test's directory.
//!
//! ```text
//!  host: bridge ppbr<pid><n> 10.a.b.1/24, fd00:a:b::1/64 (the pods' gateway; the host
//!    |                       reaches pods here)
//!    |-- veth ---- netns cni-...: eth0 10.a.b.2, fd00:a:b::2   (pod 1: CNI's veth;
//!    |                                                          peapod adds a tap)
//!    '-- veth ---- netns cni-...: eth0 10.a.b.3, fd00:a:b::3   (pod 2)
//! ```
//!
//! The bridge is made before the first pod (the plugin uses one that exists), so that it
//! is part of the host as a test finds it before its pods, and deleted on drop.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// Where Debian's containernetworking-plugins puts the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A bridge network with its conflist in `conf_dir`.
pub struct CniNetwork {
    /// The network's name in the conflist.
    pub name: String,
    /// The host's bridge, the pods' gateway.
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// The IPv6 range's gateway, on the bridge too; the range is its /64.
    pub gateway6: Ipv6Addr,
    /// The directory CRI reads conflists from (`[plugins.cri.cni] conf_dir`).
    pub conf_dir: PathBuf,
}

impl CniNetwork {
    /// Makes the bridge and writes the conflist into `dir/net.d`; IPAM state goes to
    /// `dir/ipam`. Panics, naming the step, if a step fails.
    pub fn create(dir: &Path) -> Self {
        crate::require_root();
        for plugin in ["bridge", "host-local", "loopback"] {
            assert!(
                Path::new(CNI_BIN_DIR).join(plugin).exists(),
                "the CNI plugin {CNI_BIN_DIR}/{plugin} is missing: apt-get install \
                 containernetworking-plugins (.ci/install-deps.sh does)"
            );
        }
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // 10.150-199.x: clear of the task-level tests' 10.200-249.x pod networks.
        let (a, b) = (150 + (pid % 50) as u8, (n % 250) as u8);
        let net = CniNetwork {
            name: format!("peapod-test-{pid}-{n}"),
            bridge: format!("ppbr{}x{n}", pid % 100_000),
            gateway: Ipv4Addr::new(10, a, b, 1),
            prefix_len: 24,
            gateway6: Ipv6Addr::new(0xfd00, a.into(), b.into(), 0, 0, 0, 0, 1),
            conf_dir: dir.join("net.d"),
        };
        let _ = Command::new("ip")
            .args(["link", "del", &net.bridge])
            .output();
        for args in [
            vec!["ip", "link", "add", &net.bridge, "type", "bridge"],
            vec!["ip", "link", "set", &net.bridge, "up"],
        ] {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (apt-get install iproute2)"));
            assert!(
                out.status.success(),
                "{} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::create_dir_all(&net.conf_dir).unwrap();
        let conflist = json!({
            "cniVersion": "0.4.0",
            "name": net.name,
            "plugins": [{
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [{
                            "subnet": format!("10.{a}.{b}.0/24"),
                            "gateway": net.gateway.to_string(),
                        }],
                        [{
                            "subnet": format!("{}/64", Ipv6Addr::from(
                                u128::from(net.gateway6) & !u128::from(u64::MAX)
                            )),
                            "gateway": net.gateway6.to_string(),
                        }],
                    ],
                    "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
                    "dataDir": dir.join("ipam"),
                },
            }],
        });
        std::fs::write(
            net.conf_dir.join("10-peapod-test.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        net
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
