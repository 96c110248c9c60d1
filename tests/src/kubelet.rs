//! A node as the kubelet drives it: a private containerd with the CRI plugin, a CNI
//! bridge network, runc as the default runtime and peapod as handler `peapod`, the
//! test image and the pause image imported (no registry); and the pod and container
//! configs the kubelet sends, with the waits and log reading a kubelet does.
//!
//! ```ignore
//! let node = Node::start();
//! let pod = node.run_pod("web", PEAPOD_HANDLER);
//! let c = node.run_container(&pod, &ContainerSpec::new("main", &["sleep", "600"]));
//! let release = node.exec_ok(&c, "uname -r");
//! node.remove_pod(&pod);
//! node.finish(); // nothing of the pods is left on the host
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;

use crate::cni::CniNetwork;
use crate::containerd::{Containerd, ContainerdOptions, CRI_NAMESPACE};
use crate::cri::{port_forward_stream, CriClient, CriConfig, Forwarded};
use crate::leftovers::{assert_no_leftovers_within, HostFilter, HostState};
use crate::oci_image::{busybox_image_tar, pause_image_tar};

/// How long a container may take to reach a state, or its log a line: a container
/// start in a guest takes tens of seconds here.
pub const CONTAINER_TIMEOUT: Duration = Duration::from_secs(240);
/// How long CRI may take to see imported images and a CNI network after its start.
const CRI_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write may take to show in ContainerStats: a few of containerd's 10 s
/// snapshot syncs.
const WRITABLE_LAYER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a pod's teardown may go on after RemovePodSandbox returns: the shim ends
/// the VM in the background (DestroySandbox, then the VMM's exit, each at most 10 s).
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// The Kubernetes namespace of the test pods.
const POD_NAMESPACE: &str = "default";

/// A pod the node runs.
#[derive(Clone, Debug)]
pub struct Pod {
    pub id: String,
    pub name: String,
    /// The runtime handler it runs with ("" is containerd's default, runc).
    pub handler: String,
    pub config: PodSandboxConfig,
}

/// A container to create in a pod: what the kubelet makes of a pod spec's container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    pub command: Vec<String>,
    /// `resources.limits.memory`, in bytes.
    pub memory_limit: Option<i64>,
    /// `securityContext.seccompProfile`; `None` is the kubelet's default, Unconfined.
    pub seccomp: Option<SecurityProfile>,
    /// `securityContext.capabilities.add`, without the `CAP_` prefix.
    pub add_capabilities: Vec<String>,
    /// `stdin: true` and `tty: true`, as `kubectl run -it` makes a container.
    pub interactive: bool,
    /// The image; the node's test image ([`Node::image`]) if `None`.
    pub image: Option<String>,
    /// `securityContext.privileged` (its pod must be privileged too).
    pub privileged: bool,
}

impl ContainerSpec {
    pub fn new(name: &str, command: &[&str]) -> Self {
        Self {
            name: name.into(),
            attempt: 0,
            command: command.iter().map(|s| s.to_string()).collect(),
            memory_limit: None,
            seccomp: None,
            add_capabilities: Vec::new(),
            interactive: false,
            image: None,
            privileged: false,
        }
    }

    /// Runs image `reference` (imported with [`Node::import_image`]).
    pub fn image(mut self, reference: &str) -> Self {
        self.image = Some(reference.into());
        self
    }

    /// `sh -c script`.
    pub fn shell(name: &str, script: &str) -> Self {
        Self::new(name, &["sh", "-c", script])
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    pub fn memory_limit(mut self, bytes: i64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// `seccompProfile: {type: RuntimeDefault}`.
    pub fn runtime_default_seccomp(mut self) -> Self {
        self.seccomp = Some(SecurityProfile {
            profile_type: security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        });
        self
    }

    /// `seccompProfile: {type: Localhost}` of the profile file at `path` on the node
    /// (the kubelet resolves the pod's relative path under its seccomp directory and
    /// sends it as `localhost/<absolute path>`).
    pub fn localhost_seccomp(mut self, path: &Path) -> Self {
        self.seccomp = Some(SecurityProfile {
            profile_type: security_profile::ProfileType::Localhost as i32,
            localhost_ref: path.to_string_lossy().into_owned(),
        });
        self
    }

    /// A container with stdin and a terminal, to attach to.
    pub fn interactive(mut self) -> Self {
        self.interactive = true;
        self
    }

    pub fn add_capability(mut self, cap: &str) -> Self {
        self.add_capabilities.push(cap.into());
        self
    }

    /// `securityContext.privileged: true`: every capability, no seccomp profile, no
    /// masked or read-only paths (the kubelet sends none for a privileged container).
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }

    /// The security context the kubelet sends for this container: its namespaces,
    /// the default masked and read-only /proc and /sys paths (none if privileged),
    /// and the seccomp profile, Unconfined unless the pod asks for one (the kubelet's
    /// default without `--seccomp-default`).
    fn security_context(&self) -> LinuxContainerSecurityContext {
        let paths = |list: &[&str]| match self.privileged {
            true => Vec::new(),
            false => list.iter().map(|p| p.to_string()).collect(),
        };
        LinuxContainerSecurityContext {
            privileged: self.privileged,
            capabilities: (!self.add_capabilities.is_empty()).then(|| Capability {
                add_capabilities: self.add_capabilities.clone(),
                ..Default::default()
            }),
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Pod as i32,
                pid: NamespaceMode::Container as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            masked_paths: paths(KUBELET_MASKED_PATHS),
            readonly_paths: paths(KUBELET_READONLY_PATHS),
            seccomp: Some(self.seccomp.clone().unwrap_or(SecurityProfile {
                profile_type: security_profile::ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            })),
            ..Default::default()
        }
    }
}

/// The paths the kubelet masks in every non-privileged container (its
/// `securitycontext.ConvertToRuntimeMaskedPaths` for the default procMount).
const KUBELET_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// The paths the kubelet makes read-only in every non-privileged container.
const KUBELET_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A container the node created.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    pub pod_id: String,
    /// Its CRI log file (the pod's log directory + the container's log path).
    pub log_path: PathBuf,
}

/// A node: containerd with CRI, CNI and peapod, and the host as it was before its pods.
pub struct Node {
    pub ctd: Containerd,
    pub cri: CriClient,
    pub net: CniNetwork,
    /// The test image's name.
    pub image: String,
    before: HostState,
    /// CNI config and IPAM state, pods' logs, image tarballs.
    dir: tempfile::TempDir,
}

impl Node {
    /// A node with the peapod shim under test and its test config.
    pub fn start() -> Self {
        crate::require_root();
        crate::require_kvm();
        Self::start_with(ContainerdOptions::peapod())
    }

    /// A node with containerd started from `opts` plus the CRI plugin and CNI.
    pub fn start_with(mut opts: ContainerdOptions) -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("peapod-node-")
            .tempdir()
            .expect("creating the node's directory");
        let net = CniNetwork::create(&dir.path().join("cni"));
        let (pause_tar, pause) = pause_image_tar(dir.path());
        let (image_tar, image) = busybox_image_tar(dir.path());
        opts.cri = Some(CriConfig {
            sandbox_image: pause.into(),
            cni_conf_dir: net.conf_dir.clone(),
        });
        opts.namespace = Some(CRI_NAMESPACE);
        let ctd = Containerd::start(opts);
        for (tar, reference) in [(&pause_tar, pause), (&image_tar, image)] {
            let imported = ctd.import(tar);
            assert_eq!(imported, reference, "the image's name after the import");
        }
        let cri = CriClient::connect(&ctd.socket)
            .unwrap_or_else(|e| panic!("CRI: {e}\n{}", ctd.log_tail()));
        let mut node = Node {
            before: HostState::take(&HostFilter::default()),
            ctd,
            cri,
            net,
            image: image.into(),
            dir,
        };
        node.wait_cri_ready(&[pause, image]);
        node.before = HostState::take(&node.host_filter());
        node
    }

    /// Kills containerd (SIGKILL, as a crash) and starts it again on the same state,
    /// with its pods' shims still running; reconnects CRI once it is ready again.
    pub fn restart_containerd(&mut self) {
        self.ctd.restart();
        self.cri = CriClient::connect(&self.ctd.socket)
            .unwrap_or_else(|e| panic!("CRI after a restart: {e}\n{}", self.ctd.log_tail()));
        let image = self.image.clone();
        self.wait_cri_ready(&[&image]);
    }

    /// Imports the OCI-layout tarball `tar` of image `reference` and waits until CRI
    /// lists it.
    pub fn import_image(&self, tar: &Path, reference: &str) {
        let imported = self.ctd.import(tar);
        assert_eq!(imported, reference, "the image's name after the import");
        self.wait_cri_ready(&[reference]);
    }

    /// The node's own directory, for image tarballs and such; removed with the node.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until CRI reports its network ready and lists `images` (it learns of
    /// imported images from containerd's events).
    fn wait_cri_ready(&self, images: &[&str]) {
        let deadline = Instant::now() + CRI_READY_TIMEOUT;
        loop {
            let status = self.cri.status(StatusRequest::default());
            let not_ready: Vec<String> = match &status {
                Ok(s) => s
                    .status
                    .iter()
                    .flat_map(|s| &s.conditions)
                    .filter(|c| !c.status)
                    .map(|c| format!("{}: {} {}", c.r#type, c.reason, c.message))
                    .collect(),
                Err(e) => vec![e.clone()],
            };
            let missing: Vec<&str> = images
                .iter()
                .copied()
                .filter(|i| {
                    let req = ImageStatusRequest {
                        image: Some(image_spec(i)),
                        verbose: false,
                    };
                    !self.cri.image_status(req).is_ok_and(|r| r.image.is_some())
                })
                .collect();
            if not_ready.is_empty() && missing.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "CRI not ready after {CRI_READY_TIMEOUT:?}: conditions {not_ready:?}, \
                     images not listed {missing:?}\n{}",
                    self.ctd.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// What this node's pods may leave on the host: the peapod state directory, CRI's
    /// per-pod and per-container directories and the task bundles, shims and VMMs of
    /// this containerd, the bridge's ports and CRI's network namespaces.
    pub fn host_filter(&self) -> HostFilter {
        let mut filter = self.ctd.host_filter(&[]);
        let (root, state) = (
            self.ctd.root_dir.join("root"),
            self.ctd.root_dir.join("state"),
        );
        filter.state_dirs.extend([
            root.join("io.containerd.grpc.v1.cri/sandboxes"),
            root.join("io.containerd.grpc.v1.cri/containers"),
            state.join("io.containerd.grpc.v1.cri/sandboxes"),
            state.join("io.containerd.grpc.v1.cri/containers"),
            state
                .join("io.containerd.runtime.v2.task")
                .join(CRI_NAMESPACE),
        ]);
        filter.bridge_ports = Some(self.net.bridge.clone());
        filter.cri_netns = true;
        filter
    }

    /// The pods' log directories' parent.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// The config the kubelet sends for a pod named `name`.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let uid = format!("{:032x}", random_u128());
        let log_directory = self
            .logs_dir()
            .join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        std::fs::create_dir_all(&log_directory).unwrap();
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: POD_NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox of a pod named `name` with runtime handler `handler`; returns
    /// once it is SANDBOX_READY. Reruns only after the host's busybox fault.
    pub fn run_pod(&self, name: &str, handler: &str) -> Pod {
        self.run_pod_of(self.pod_config(name), handler)
    }

    /// [`Node::run_pod`] of a pod with `securityContext.sysctls` (the kubelet sends
    /// them in the sandbox config; containerd puts them in every container's spec).
    pub fn run_pod_with_sysctls(&self, name: &str, handler: &str, sysctls: &[(&str, &str)]) -> Pod {
        let mut config = self.pod_config(name);
        config
            .linux
            .as_mut()
            .expect("the pod config has linux")
            .sysctls = sysctls
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.run_pod_of(config, handler)
    }

    /// [`Node::run_pod`] of a pod with `securityContext.privileged` (what a pod with a
    /// privileged container has: CRI refuses such a container in any other pod).
    pub fn run_privileged_pod(&self, name: &str, handler: &str) -> Pod {
        let mut config = self.pod_config(name);
        config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .expect("the pod config has a security context")
            .privileged = true;
        self.run_pod_of(config, handler)
    }

    fn run_pod_of(&self, config: PodSandboxConfig, handler: &str) -> Pod {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self.ctd.retry_platform_faults(
            &format!("RunPodSandbox {name} (handler {handler:?})"),
            || {
                self.cri
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(config.clone()),
                        runtime_handler: handler.into(),
                    })
                    .map(|r| r.pod_sandbox_id)
            },
            || {},
        );
        let pod = Pod {
            id,
            name: name.clone(),
            handler: handler.into(),
            config,
        };
        let status = self.pod_status(&pod);
        assert_eq!(
            status.state,
            PodSandboxState::SandboxReady as i32,
            "pod {name} after RunPodSandbox: {status:?}"
        );
        pod
    }

    /// The pid containerd has for `pod`'s sandbox task (PodSandboxStatus's verbose
    /// info): for a peapod pod, its VMM's.
    pub fn sandbox_pid(&self, pod: &Pod) -> i32 {
        let r = self
            .cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: true,
            })
            .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name));
        let info = r.info.get("info").map(String::as_str).unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(info)
            .unwrap_or_else(|e| panic!("pod {}: verbose info is not JSON ({e}): {info}", pod.name));
        v["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("pod {}: no pid in its verbose info: {info}", pod.name))
            as i32
    }

    /// PodSandboxStatus of `pod`.
    pub fn pod_status(&self, pod: &Pod) -> PodSandboxStatus {
        self.cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: false,
            })
            .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name))
            .status
            .unwrap_or_else(|| panic!("pod {}: PodSandboxStatus without a status", pod.name))
    }

    /// The URL of a port-forward to `port` of `pod` (the kubelet's CRI call for
    /// `kubectl port-forward`); each URL serves one connection.
    pub fn port_forward_url(&self, pod: &Pod, port: u16) -> String {
        self.cri
            .port_forward(PortForwardRequest {
                pod_sandbox_id: pod.id.clone(),
                port: vec![port.into()],
            })
            .unwrap_or_else(|e| panic!("pod {}: PortForward to {port}: {e}", pod.name))
            .url
    }

    /// One connection of `kubectl port-forward` to `port` of `pod`: sends `request`
    /// and returns what came back until the server closed.
    pub fn port_forward(&self, pod: &Pod, port: u16, request: &[u8]) -> Forwarded {
        let url = self.port_forward_url(pod, port);
        port_forward_stream(&url, port, request, CONTAINER_TIMEOUT)
            .unwrap_or_else(|e| panic!("pod {}: {e}", pod.name))
    }

    /// The pod's IP from PodSandboxStatus, checked to be in the CNI network.
    pub fn pod_ip(&self, pod: &Pod) -> Ipv4Addr {
        let status = self.pod_status(pod);
        let ip = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let ip: Ipv4Addr = ip
            .parse()
            .unwrap_or_else(|_| panic!("pod {}: no IPv4 address in {status:?}", pod.name));
        let net = u32::from(self.net.gateway) >> (32 - self.net.prefix_len);
        assert_eq!(
            u32::from(ip) >> (32 - self.net.prefix_len),
            net,
            "pod {}'s IP {ip} is not in the CNI network of {}",
            pod.name,
            self.net.gateway
        );
        ip
    }

    /// The pod's IPv6 address, as CRI reports it (among its additional IPs: the
    /// network's IPv4 range comes first), checked to be in the CNI network's /64.
    pub fn pod_ip6(&self, pod: &Pod) -> Ipv6Addr {
        let status = self.pod_status(pod);
        let ips = status
            .network
            .as_ref()
            .map(|n| n.additional_ips.clone())
            .unwrap_or_default();
        let ip: Ipv6Addr = ips
            .iter()
            .find_map(|i| i.ip.parse().ok())
            .unwrap_or_else(|| panic!("pod {}: no IPv6 address in {status:?}", pod.name));
        assert_eq!(
            u128::from(ip) >> 64,
            u128::from(self.net.gateway6) >> 64,
            "pod {}'s IPv6 address {ip} is not in the CNI network of {}",
            pod.name,
            self.net.gateway6
        );
        ip
    }

    /// CreateContainer of `spec` in `pod`.
    pub fn create_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<Container, String> {
        let log_path = format!("{}/{}.log", spec.name, spec.attempt);
        let log_dir = Path::new(&pod.config.log_directory);
        std::fs::create_dir_all(log_dir.join(&spec.name)).unwrap();
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.name.clone(),
                attempt: spec.attempt,
            }),
            image: Some(image_spec(spec.image.as_deref().unwrap_or(&self.image))),
            command: spec.command.clone(),
            log_path: log_path.clone(),
            stdin: spec.interactive,
            tty: spec.interactive,
            labels: [("name".to_string(), spec.name.clone())].into(),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: spec.memory_limit.unwrap_or(0),
                    ..Default::default()
                }),
                security_context: Some(spec.security_context()),
            }),
            ..Default::default()
        };
        let id = self
            .cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })?
            .container_id;
        Ok(Container {
            id,
            pod_id: pod.id.clone(),
            log_path: log_dir.join(log_path),
        })
    }

    /// CreateContainer and StartContainer of `spec` in `pod`, rerun only after the
    /// host's busybox fault.
    pub fn run_container(&self, pod: &Pod, spec: &ContainerSpec) -> Container {
        // The attempt's container, for the undo of a failed attempt.
        let created = std::cell::RefCell::new(None::<Container>);
        self.ctd.retry_platform_faults(
            &format!("container {} in pod {}", spec.name, pod.name),
            || {
                let c = self.create_container(pod, spec)?;
                created.replace(Some(c.clone()));
                self.cri.start_container(StartContainerRequest {
                    container_id: c.id.clone(),
                })?;
                Ok(c)
            },
            || {
                if let Some(c) = created.take() {
                    let _ = self
                        .cri
                        .remove_container(RemoveContainerRequest { container_id: c.id });
                }
            },
        )
    }

    /// ContainerStatus of `c`.
    pub fn container_status(&self, c: &Container) -> ContainerStatus {
        self.cri
            .container_status(ContainerStatusRequest {
                container_id: c.id.clone(),
                verbose: false,
            })
            .unwrap_or_else(|e| panic!("container {}: {e}", c.id))
            .status
            .unwrap_or_else(|| panic!("container {}: ContainerStatus without a status", c.id))
    }

    /// Waits until `c` is in `state`; its status then.
    pub fn wait_container_state(&self, c: &Container, state: ContainerState) -> ContainerStatus {
        let deadline = Instant::now() + CONTAINER_TIMEOUT;
        loop {
            let status = self.container_status(c);
            if status.state == state as i32 {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "container {} is not {state:?} after {CONTAINER_TIMEOUT:?}: {status:?}\n{}",
                    c.id,
                    self.ctd.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// ContainerStats' writable layer of `c`: what the kubelet's ephemeral-storage
    /// eviction reads.
    pub fn writable_layer(&self, c: &Container) -> FilesystemUsage {
        self.cri
            .container_stats(ContainerStatsRequest {
                container_id: c.id.clone(),
            })
            .unwrap_or_else(|e| panic!("container {}: {e}", c.id))
            .stats
            .and_then(|s| s.writable_layer)
            .unwrap_or_else(|| {
                panic!(
                    "container {}: ContainerStats without a writable layer",
                    c.id
                )
            })
    }

    /// Waits until `c`'s writable layer uses at least `bytes` (containerd's CRI
    /// refreshes it every `stats_collect_period`, 10 s by default); its usage then.
    pub fn wait_writable_layer(&self, c: &Container, bytes: u64) -> FilesystemUsage {
        let deadline = Instant::now() + WRITABLE_LAYER_TIMEOUT;
        loop {
            let usage = self.writable_layer(c);
            if usage.used_bytes.as_ref().is_some_and(|u| u.value >= bytes) {
                return usage;
            }
            if Instant::now() > deadline {
                panic!(
                    "container {}'s writable layer is not {bytes} bytes after \
                     {WRITABLE_LAYER_TIMEOUT:?}: {usage:?}",
                    c.id
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// ExecSync of `sh -c script` in `c`, rerun only after the host's busybox fault;
    /// it must exit 0. Its stdout, trimmed.
    pub fn exec_ok(&self, c: &Container, script: &str) -> String {
        self.ctd.retry_platform_faults(
            &format!("ExecSync {script:?} in {}", c.id),
            || {
                let r = self.cri.exec_sync(ExecSyncRequest {
                    container_id: c.id.clone(),
                    cmd: vec!["sh".into(), "-c".into(), script.into()],
                    timeout: CONTAINER_TIMEOUT.as_secs() as i64,
                })?;
                if r.exit_code != 0 {
                    return Err(format!(
                        "exit code {}; stdout {:?}; stderr {:?}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stdout),
                        String::from_utf8_lossy(&r.stderr)
                    ));
                }
                Ok(String::from_utf8_lossy(&r.stdout).trim().to_string())
            },
            || {},
        )
    }

    /// Waits until `c`'s CRI log holds a line (on either stream) containing `needle`;
    /// returns the log's lines as (stream, text).
    pub fn wait_log(&self, c: &Container, needle: &str) -> Vec<(String, String)> {
        let deadline = Instant::now() + CONTAINER_TIMEOUT;
        loop {
            let lines = cri_log_lines(&c.log_path);
            if lines.iter().any(|(_, text)| text.contains(needle)) {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "{needle:?} not in {}'s log {} after {CONTAINER_TIMEOUT:?}: {lines:?}\n{}",
                    c.id,
                    c.log_path.display(),
                    self.ctd.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// StopPodSandbox and RemovePodSandbox of `pod`, as the kubelet does when a pod is
    /// deleted (its containers go with it).
    pub fn remove_pod(&self, pod: &Pod) {
        let id = pod.id.clone();
        self.cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .unwrap_or_else(|e| panic!("pod {}: {e}\n{}", pod.name, self.ctd.log_tail()));
        self.cri
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
            .unwrap_or_else(|e| panic!("pod {}: {e}\n{}", pod.name, self.ctd.log_tail()));
    }

    /// The ids of the pods CRI lists.
    pub fn pod_ids(&self) -> Vec<String> {
        self.cri
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .map(|r| r.items.into_iter().map(|p| p.id).collect())
            .unwrap_or_default()
    }

    /// The end of a test: CRI lists no pod and no container, and nothing of the pods
    /// is left on the host.
    pub fn finish(self) {
        assert_eq!(self.pod_ids(), Vec::<String>::new(), "pods left in CRI");
        let containers = self
            .cri
            .list_containers(ListContainersRequest::default())
            .expect("ListContainers")
            .containers;
        assert!(
            containers.is_empty(),
            "containers left in CRI: {containers:?}"
        );
        assert_no_leftovers_within(&self.before, TEARDOWN_TIMEOUT);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failed test has been seen failing; do not let it litter the machine.
        if std::thread::panicking() {
            for id in self.pod_ids() {
                let _ = self.cri.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                });
                let _ = self
                    .cri
                    .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id });
            }
            self.ctd.clean_up_after_failure();
        }
    }
}

/// An ImageSpec naming `image`.
fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// The lines of a CRI log file, as (stream, text): each line reads
/// `<RFC 3339 time> <stdout|stderr> <F|P> <text>`; partial (P) lines are joined to
/// the next on the same stream.
pub fn cri_log_lines(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut partial: std::collections::HashMap<String, String> = Default::default();
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), rest) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let buf = partial.entry(stream.to_string()).or_default();
        buf.push_str(rest.unwrap_or(""));
        if tag == "F" {
            out.push((stream.to_string(), std::mem::take(buf)));
        }
    }
    out
}

/// A random number, for pod uids.
fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("reading /dev/urandom");
    u128::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_join_partials_per_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(
            &p,
            "2026-12-01T10:00:00.1Z stdout P hel\n\
             2026-12-01T10:00:00.2Z stderr F oops\n\
             2026-12-01T10:00:00.3Z stdout F lo world\n\
             2026-12-01T10:00:00.4Z stdout F \n",
        )
        .unwrap();
        assert_eq!(
            cri_log_lines(&p),
            vec![
                ("stderr".to_string(), "oops".to_string()),
                ("stdout".to_string(), "hello world".to_string()),
                ("stdout".to_string(), String::new()),
            ]
        );
        assert!(cri_log_lines(&dir.path().join("missing.log")).is_empty());
    }
}
