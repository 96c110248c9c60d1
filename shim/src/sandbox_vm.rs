//! The pod's VM: booted for the pod's first container, supervised while it runs, and
//! ended with the pod. It reports what happens to it (the VMM's exit, the guest's OOM
//! kills) as [`VmEvent`]s on the channel [`SandboxVm::boot`] returns; it never calls
//! into the pod that owns it.
//!
//! On the host a VM is its pod's directory (`state.rs`): the VMM, its network
//! plumbing, its cgroup and the pod's data directory are recorded there as they are
//! made, so that
//! [`cleanup_pod_dir`] ends a VM from the directory alone (`delete` after a crash).
//! A boot that fails part-way undoes what it made with a drop guard.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use peapod_agent_protocol as agent_proto;
use tokio::sync::{mpsc, watch, Mutex};

use crate::agent::{self, ctx, Agent, LONG_POLL};
use crate::cgroup::VmmCgroup;
use crate::config::Config;
use crate::disk_store::DiskStore;
use crate::error::{self, Result, ShimError};
use crate::network::{self, PodNetwork};
use crate::port_forward::PortForward;
use crate::spec::{NetworkNamespace, OciSpec};
use crate::state::{self, NetworkRecord, VmmRecord};
use crate::templates::{self, Builder, Plan};
use crate::vmm::{self, TemplateUse, VmPaths, VmmApi};

/// The tap in the pod's network namespace.
const TAP_NAME: &str = "peapod0";
/// How long the VMM's API may take to answer after the VMM starts.
const API_READY: Duration = Duration::from_secs(10);
/// How long a killed VMM may take to be reaped.
const REAP: Duration = Duration::from_secs(5);
/// How much of the VMM's log an error carries.
const LOG_TAIL: usize = 2000;
/// Events the pod has not taken yet (a VM sends few: OOM kills and one exit).
const EVENT_BACKLOG: usize = 64;

/// What happens to a VM, for its pod.
#[derive(Debug)]
pub enum VmEvent {
    /// The VMM process ended (with this status, if known).
    Exited(Option<ExitStatus>),
    /// The guest's OOM killer killed a process of this container.
    Oom { container_id: String },
}

pub struct SandboxVm {
    pub pid: u32,
    /// The pod's state directory: the VM's records, sockets and logs.
    pub pod_dir: PathBuf,
    /// The pod's data directory (on the node's disk): its containers' work dirs.
    pub data_dir: PathBuf,
    pub paths: VmPaths,
    pub api: VmmApi,
    pub agent: Agent,
    network: Option<NetworkRecord>,
    /// `kubectl port-forward`'s listeners in the pod's network namespace, until the
    /// network is detached.
    port_forward: std::sync::Mutex<Option<PortForward>>,
    /// Set when the VMM process has exited (for whatever reason).
    gone: watch::Receiver<bool>,
    disks: Mutex<DiskStore>,
}

impl SandboxVm {
    /// Boots the pod's VM in `pod_dir` for its first container, whose `spec` gives
    /// its size, network and cgroup; CreateSandbox has run in the guest when it
    /// returns. `data_dir` is the pod's data directory, recorded in `pod_dir` (its
    /// containers make it). Whatever a failed boot made is gone when it returns.
    ///
    /// With `templates` on, a VM starts from its kind's template if there is one (a
    /// template the VMM refuses is removed and the pod boots), and the first VM of a
    /// kind leaves one (crate::templates).
    pub async fn boot(
        config: &Config,
        pod_dir: PathBuf,
        data_dir: PathBuf,
        sandbox_id: &str,
        spec: &OciSpec,
    ) -> Result<(Arc<SandboxVm>, mpsc::Receiver<VmEvent>)> {
        let plan = match config.templates {
            false => Plan::Boot,
            true => {
                let size = config.vm_size(&spec.annotations());
                let with_card = network_namespace(spec, sandbox_id)?.is_some();
                match templates::key(config, size, with_card) {
                    Ok(key) => templates::plan(&config.template_dir, &key),
                    Err(e) => {
                        log::warn!("pod {sandbox_id}: no template: {e}");
                        Plan::Boot
                    }
                }
            }
        };
        let start = |plan| Self::start(config, pod_dir.clone(), &data_dir, sandbox_id, spec, plan);
        match plan {
            Plan::Restore(dir) => match start(Plan::Restore(dir.clone())).await {
                Ok(started) => Ok(started),
                Err(e) => {
                    log::warn!(
                        "pod {sandbox_id}: restoring template {}: {e}; it is removed, and the \
                         pod boots",
                        dir.display()
                    );
                    templates::discard(&dir);
                    start(Plan::Boot).await
                }
            },
            plan => start(plan).await,
        }
    }

    async fn start(
        config: &Config,
        pod_dir: PathBuf,
        data_dir: &Path,
        sandbox_id: &str,
        spec: &OciSpec,
        plan: Plan,
    ) -> Result<(Arc<SandboxVm>, mpsc::Receiver<VmEvent>)> {
        let data_dir = data_dir.to_path_buf();
        let fail = |step: &str, e: &dyn std::fmt::Display| ShimError::Boot {
            pod: sandbox_id.into(),
            step: step.into(),
            cause: e.to_string(),
            vmm_log: None,
        };
        let netns = network_namespace(spec, sandbox_id)?;
        let size = config.vm_size(&spec.annotations());
        std::fs::create_dir_all(&pod_dir)
            .map_err(|e| fail(&format!("creating {}", pod_dir.display()), &e))?;
        let mut made = BootUndo::new(&pod_dir);
        let data = state::DataRecord {
            dir: data_dir.clone(),
        };
        state::write_json(&pod_dir.join(state::DATA_RECORD), &data)
            .map_err(|e| fail("recording the pod's data directory", &e))?;
        for f in [&config.kernel, &config.initrd] {
            if !f.is_file() {
                return Err(ShimError::MissingBootFile {
                    pod: sandbox_id.into(),
                    path: f.clone(),
                });
            }
        }
        // The network first: the VM boots with its card.
        let network = match netns {
            Some(ns) => {
                let net = tokio::task::spawn_blocking(move || PodNetwork::attach(&ns, TAP_NAME))
                    .await
                    .map_err(|e| fail("attaching the network", &e))?
                    .map_err(|e| fail("attaching the network", &e))?;
                let rec = NetworkRecord {
                    netns: net.netns.clone(),
                    veth: net.veth.clone(),
                    tap: net.tap_name.clone(),
                };
                made.network = Some(rec.clone());
                state::write_json(&pod_dir.join(state::NETWORK_RECORD), &rec)
                    .map_err(|e| fail("recording the network", &e))?;
                Some(net)
            }
            None => None,
        };
        // The VMM's cgroup: the sandbox's, under the pod's.
        match spec.cgroups_path() {
            Some(path) => {
                let cgroup = tokio::task::spawn_blocking(move || {
                    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                        .map_err(|e| e.to_string())?;
                    VmmCgroup::create(&path, &mountinfo).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| fail("making the VMM's cgroup", &e))?
                .map_err(|e| fail("making the VMM's cgroup", &e))?;
                let recorded = state::write_json(&pod_dir.join(state::CGROUP_RECORD), &cgroup);
                made.cgroup = Some(cgroup);
                recorded.map_err(|e| fail("recording the VMM's cgroup", &e))?;
            }
            None => log::warn!(
                "pod {sandbox_id}: the sandbox's spec has no cgroupsPath: the VMM stays in the \
                 shim's cgroup"
            ),
        }
        let paths = VmPaths::in_dir(&pod_dir);
        let tap_fd: Option<OwnedFd> = network
            .as_ref()
            .map(|n| n.tap.try_clone().expect("duplicating the tap fd").into());
        let mac = network.as_ref().map(|n| n.interface.mac.clone());
        let spec_vm = vmm::VmSpec {
            config,
            size,
            paths: &paths,
            tap: tap_fd.as_ref().zip(mac.as_deref()),
            cgroup: made.cgroup.as_ref(),
            template: match &plan {
                Plan::Boot => TemplateUse::None,
                Plan::Restore(dir) => TemplateUse::Restore(dir),
                Plan::Build(builder) => TemplateUse::Build(builder.staging()),
            },
        };
        let vmm = vmm::spawn(&spec_vm).map_err(|e| fail("starting the VMM", &e))?;
        // The VMM holds the tap now: ours would keep it alive after the VMM is gone.
        drop(tap_fd);
        let pid = vmm.pid;
        let rec = VmmRecord {
            pid,
            start_time: state::start_time(pid).unwrap_or(0),
        };
        let _ = state::write_json(&pod_dir.join(state::VMM_RECORD), &rec);
        made.vmm = Some(rec);
        log::info!(
            "pod {sandbox_id}: VMM {pid} started ({} vCPU, {} MiB)",
            size.vcpus,
            size.memory_mib
        );
        let (events_tx, events) = mpsc::channel(EVENT_BACKLOG);
        let (gone_tx, gone_rx) = watch::channel(false);
        let (status_tx, status_rx) = watch::channel(None::<String>);
        // Supervise the VMM: its exit is the pod's (every task of it has exited).
        let supervisor_events = events_tx.clone();
        tokio::spawn(async move {
            let status = vmm.exited.await.ok().and_then(std::result::Result::ok);
            let _ = status_tx.send(Some(
                status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
            ));
            let _ = gone_tx.send(true);
            // No receiver: the boot failed, or the pod is gone.
            let _ = supervisor_events.send(VmEvent::Exited(status)).await;
        });
        let booted_at = std::time::Instant::now();
        // A restored agent answers at once; one that does not is given up on soon,
        // and the pod boots instead.
        let agent_wait = match &plan {
            Plan::Restore(_) => config.boot_timeout().min(RESTORE_TIMEOUT),
            _ => config.boot_timeout(),
        };
        let api = VmmApi::new(paths.api_socket.clone());
        let started = async {
            api.wait_ready(API_READY)
                .await
                .map_err(|e| fail("the VMM API", &e))?;
            Agent::connect(&paths.vsock_socket, agent_wait)
                .await
                .map_err(|e| fail("the guest agent", &e))
        };
        // A VMM that exits during boot ends the wait at once.
        let mut status = status_rx.clone();
        let died = async move {
            let s = status
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|s| s.clone());
            Err(fail(
                "the VMM exited while the guest booted",
                &s.unwrap_or_default(),
            ))
        };
        let started = async {
            tokio::select! {
                r = started => r,
                r = died => r,
            }
        };
        let agent = match started.await {
            Ok(a) => a,
            Err(ShimError::Boot {
                pod, step, cause, ..
            }) => {
                return Err(ShimError::Boot {
                    pod,
                    step,
                    cause,
                    vmm_log: Some(vmm::log_tail(&paths, LOG_TAIL)),
                });
            }
            Err(e) => return Err(e),
        };
        log::info!(
            "pod {sandbox_id}: the guest agent answered {:?} after the VMM started{}",
            booted_at.elapsed(),
            match &plan {
                Plan::Restore(dir) => format!(" from template {}", dir.display()),
                _ => String::new(),
            }
        );
        let restored = matches!(plan, Plan::Restore(_));
        if let Plan::Build(builder) = plan {
            make_template(config, &api, builder, sandbox_id).await;
        }
        agent::forward_log(&paths.vsock_socket, sandbox_id);
        let mut req = sandbox_request(sandbox_id, spec, network.as_ref());
        req.restored = restored;
        agent
            .client()
            .create_sandbox(ctx(config.agent_timeout()), &req)
            .await
            .map_err(error::agent(format!("pod {sandbox_id}: CreateSandbox")))?;
        // Its network's fd went to the VMM; the names stay recorded.
        let port_forward = match &network {
            Some(net) => {
                match PortForward::start(&net.netns, &paths.vsock_socket, sandbox_id).await {
                    Ok(pf) => Some(pf),
                    // The pod runs without it: port-forward is a tool, not the pod's work.
                    Err(e) => {
                        log::error!("pod {sandbox_id}: kubectl port-forward will not work: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        drop(network);
        let vm = Arc::new(SandboxVm {
            pid,
            pod_dir,
            data_dir,
            paths,
            api,
            agent,
            network: made.network.clone(),
            port_forward: std::sync::Mutex::new(port_forward),
            gone: gone_rx,
            disks: Mutex::new(DiskStore::default()),
        });
        made.disarm();
        vm.spawn_oom_watch(events_tx);
        if let Some(interval) = config.health_interval() {
            vm.spawn_health_watch(sandbox_id, interval, config.health_failures);
        }
        Ok((vm, events))
    }

    /// The guest's OOM kills, as events, until the VM is gone.
    fn spawn_oom_watch(self: &Arc<Self>, events: mpsc::Sender<VmEvent>) {
        let vm = self.clone();
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let req = agent_proto::GetOomEventRequest {
                    after,
                    ..Default::default()
                };
                let polled = vm
                    .long_poll(|c, ctx| {
                        let req = req.clone();
                        async move { c.get_oom_event(ctx, &req).await }
                    })
                    .await;
                match polled {
                    Ok(ev) => {
                        after = ev.seq;
                        let oom = VmEvent::Oom {
                            container_id: ev.container_id,
                        };
                        if events.send(oom).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if vm.is_gone() {
                            return;
                        }
                        log::warn!("the guest's OOM kills: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// [`Agent::long_poll`] with this VM's end: `call` is asked again every
    /// [`LONG_POLL`] and on a new connection if its own broke, until the VM is gone.
    pub async fn long_poll<T, F, Fut>(&self, call: F) -> peapod_agent_protocol::ttrpc::Result<T>
    where
        F: FnMut(
            peapod_agent_protocol::AgentClient,
            peapod_agent_protocol::ttrpc::context::Context,
        ) -> Fut,
        Fut: std::future::Future<Output = peapod_agent_protocol::ttrpc::Result<T>>,
    {
        self.agent
            .long_poll(LONG_POLL, |grace| self.wait_gone(grace), call)
            .await
    }

    /// Probes the guest every `interval` (Health, with `interval` as its deadline);
    /// after `failures` unanswered probes in a row, ends the VM from the host, which
    /// reports every task of the pod exited (the VMM's exit does). Ends with the VM.
    fn spawn_health_watch(self: &Arc<Self>, pod: &str, interval: Duration, failures: u32) {
        let vm = self.clone();
        let pod = pod.to_string();
        tokio::spawn(async move {
            let req = agent_proto::HealthRequest::new();
            let mut missed = 0u32;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if vm.is_gone() {
                    return;
                }
                let cause = match vm.agent.client().health(ctx(interval), &req).await {
                    Ok(_) => {
                        if missed > 0 {
                            log::info!("pod {pod}: the guest answers again after {missed} missed health probes");
                        }
                        missed = 0;
                        continue;
                    }
                    Err(e) => e,
                };
                if vm.is_gone() {
                    return;
                }
                missed += 1;
                if missed < failures {
                    log::warn!(
                        "pod {pod}: the guest did not answer health probe {missed} of \
                         {failures} within {interval:?}: {cause}"
                    );
                    continue;
                }
                log::error!(
                    "pod {pod}: the guest answered none of {failures} health probes in a row \
                     (one every {interval:?}; the last: {cause}): it is wedged (a hung kernel, \
                     a stuck agent or a starved vCPU); ending its VM {} from the host, and \
                     every container of the pod is reported exited. {}",
                    vm.pid,
                    vm.log_tail()
                );
                vm.kill().await;
                return;
            }
        });
    }

    /// Whether the VMM process has exited.
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Waits until the VMM process has exited, at most `timeout`; whether it has.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let mut gone = self.gone.clone();
        let reaped = tokio::time::timeout(timeout, gone.wait_for(|g| *g)).await;
        reaped.is_ok()
    }

    /// Adds an image to the pod's disk store (or shares it); the disk the agent is
    /// told to mount, as `fstype`.
    pub async fn attach_disk(
        &self,
        path: &Path,
        read_only: bool,
        fstype: &str,
    ) -> Result<agent_proto::Disk> {
        self.disks
            .lock()
            .await
            .attach(&self.api, path, read_only, fstype)
            .await
    }

    /// Drops one reference to an attached image; the last one removes it from the
    /// store.
    pub async fn release_disk(&self, path: &Path) {
        let api = (!self.is_gone()).then_some(&self.api);
        self.disks.lock().await.release(api, path).await;
    }

    /// The VMM is gone: its network plumbing goes too.
    pub async fn detach_network(&self) {
        let port_forward = self
            .port_forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(pf) = port_forward {
            pf.stop().await;
        }
        if let Some(n) = self.network.clone() {
            let _ = tokio::task::spawn_blocking(move || network::detach(&n.netns, &n.veth, &n.tap))
                .await;
        }
    }

    /// The end of the VMM's log, for messages.
    pub fn log_tail(&self) -> String {
        vmm::log_tail(&self.paths, LOG_TAIL)
    }

    /// Kills the VMM and waits until it is reaped, leaving the pod's directory and
    /// network for the tasks' removal (the supervisor reports the exit, and the pod
    /// reports every task exited).
    pub async fn kill(&self) {
        let dir = self.pod_dir.clone();
        let killed = tokio::task::spawn_blocking(move || state::kill_vmm(&dir)).await;
        if let Err(e) = killed.map_err(std::io::Error::other).and_then(|r| r) {
            log::error!("killing the pod's VMM {}: {e}", self.pid);
        }
        if !self.wait_gone(REAP).await {
            log::error!(
                "VMM {} has not been reaped {} s after SIGKILL",
                self.pid,
                REAP.as_secs()
            );
        }
    }

    /// Ends the VM: the VMM is killed, then its network and the pod's directory go,
    /// and the VMM is waited for. Nothing in the guest outlives it (writable layers
    /// are thrown away, volumes are copies), so a guest shutdown would save nothing,
    /// and on a slow host one costs seconds of a Delete's budget.
    pub async fn end(&self) {
        let dir = self.pod_dir.clone();
        let ended = tokio::task::spawn_blocking(move || cleanup_pod_dir(&dir)).await;
        if let Err(e) = ended.map_err(std::io::Error::other).and_then(|r| r) {
            log::error!("ending the pod's VM: {e}");
        }
        // The supervisor reaps it and reports the exit.
        if !self.wait_gone(REAP).await {
            log::error!(
                "VMM {} has not been reaped {} s after SIGKILL",
                self.pid,
                REAP.as_secs()
            );
        }
    }
}

/// Everything of a pod's VM on the host, from its directory alone: the VMM, its
/// cgroup, the tap and filters, the pod's data directory, the files. Idempotent.
pub fn cleanup_pod_dir(pod_dir: &Path) -> std::io::Result<()> {
    state::kill_vmm(pod_dir)?;
    remove_cgroup(pod_dir)?;
    if let Some(n) = state::read_json::<NetworkRecord>(&pod_dir.join(state::NETWORK_RECORD))? {
        network::detach(&n.netns, &n.veth, &n.tap)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    if let Some(d) = state::read_json::<state::DataRecord>(&pod_dir.join(state::DATA_RECORD))? {
        state::remove_dir(&d.dir).map_err(|e| {
            std::io::Error::other(format!(
                "removing the pod's data directory {}: {e}",
                d.dir.display()
            ))
        })?;
    }
    state::remove_dir(pod_dir)
}

/// Removes the VMM's cgroup (the VMM must be gone), if the pod's directory records one.
fn remove_cgroup(pod_dir: &Path) -> std::io::Result<()> {
    let Some(cg) = state::read_json::<VmmCgroup>(&pod_dir.join(state::CGROUP_RECORD))? else {
        return Ok(());
    };
    remove_cgroup_dirs(&cg)
}

fn remove_cgroup_dirs(cg: &VmmCgroup) -> std::io::Result<()> {
    match cg.remove().into_iter().next() {
        None => Ok(()),
        Some((dir, e)) => Err(std::io::Error::other(format!(
            "removing the VMM's cgroup {}: {e}",
            dir.display()
        ))),
    }
}

/// What a boot has made so far, held as it is made (a record on disk may not be
/// written yet); dropped before [`BootUndo::disarm`], it removes all of it: the VMM,
/// its cgroup, the network plumbing, then the pod's directory.
struct BootUndo {
    pod_dir: Option<PathBuf>,
    vmm: Option<VmmRecord>,
    cgroup: Option<VmmCgroup>,
    network: Option<NetworkRecord>,
}

impl BootUndo {
    fn new(pod_dir: &Path) -> BootUndo {
        BootUndo {
            pod_dir: Some(pod_dir.to_path_buf()),
            vmm: None,
            cgroup: None,
            network: None,
        }
    }

    /// The boot succeeded: what it made is the VM's.
    fn disarm(mut self) {
        self.pod_dir = None;
    }
}

impl Drop for BootUndo {
    fn drop(&mut self) {
        let Some(pod_dir) = self.pod_dir.take() else {
            return;
        };
        if let Some(rec) = &self.vmm {
            if let Err(e) = state::kill_recorded(rec) {
                log::warn!("undoing a failed boot: {e}");
            }
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = remove_cgroup_dirs(cg) {
                log::warn!("undoing a failed boot: {e}");
            }
        }
        if let Some(n) = &self.network {
            if let Err(e) = network::detach(&n.netns, &n.veth, &n.tap) {
                log::warn!("undoing a failed boot: {e}");
            }
        }
        if let Err(e) = state::remove_dir(&pod_dir) {
            log::warn!("undoing a failed boot: removing {}: {e}", pod_dir.display());
        }
    }
}

/// The network namespace the pod's network lives in: `Some(path)` when CNI made one,
/// `None` for a new empty one (no network). A spec without a network namespace
/// shares the host's, which a VM cannot.
fn network_namespace(spec: &OciSpec, sandbox_id: &str) -> Result<Option<PathBuf>> {
    match spec.network_namespace() {
        NetworkNamespace::Host => Err(ShimError::HostNetwork {
            pod: sandbox_id.into(),
        }),
        NetworkNamespace::New => Ok(None),
        NetworkNamespace::Path(p) => Ok(Some(p)),
    }
}

/// The agent's CreateSandbox: hostname, sysctls and the pod's network as CNI set it
/// up on the veth.
/// Snapshots the VM, whose agent has just answered and which is nobody's pod yet,
/// into `builder`'s directory and publishes it as its kind's template. A failure
/// costs only the template: the pod goes on.
async fn make_template(config: &Config, api: &VmmApi, builder: Builder, pod: &str) {
    let started = std::time::Instant::now();
    let dir = vmm::template_out_seen(config, builder.staging());
    let snapshot = async {
        api.pause().await?;
        let written = api.snapshot(dir).await;
        api.resume().await?;
        written
    };
    match snapshot.await {
        Ok(()) => match builder.publish(config.template_max) {
            Ok(dir) => log::info!(
                "pod {pod}: template {} made in {:?}",
                dir.display(),
                started.elapsed()
            ),
            Err(e) => log::warn!("pod {pod}: publishing its template: {e}"),
        },
        Err(e) => log::warn!("pod {pod}: no template made: {e}"),
    }
}

/// How long a VM restored from a template may take to have its agent answer.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many random bytes the host gives a guest's pool.
const ENTROPY_BYTES: usize = 64;

/// Random bytes from the host's kernel; none if it cannot give them (the guest's
/// pool then goes on from its own seed).
fn host_entropy() -> Vec<u8> {
    let mut bytes = vec![0u8; ENTROPY_BYTES];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given,
    // which lives across the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        log::warn!("getrandom: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    bytes
}

fn sandbox_request(
    sandbox_id: &str,
    spec: &OciSpec,
    network: Option<&PodNetwork>,
) -> agent_proto::CreateSandboxRequest {
    let mut req = agent_proto::CreateSandboxRequest {
        sandbox_id: sandbox_id.into(),
        hostname: spec.hostname().into(),
        // The guest's clock and random pool are the host's from here on (a guest
        // restored from a snapshot has its snapshot's).
        wall_clock_unix_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        entropy: host_entropy(),
        ..Default::default()
    };
    req.sysctls.extend(spec.sysctls());
    if let Some(n) = network {
        req.interfaces.push(agent_proto::Interface {
            mac: n.interface.mac.clone(),
            name: n.interface.name.clone(),
            addresses: n.interface.addresses.clone(),
            mtu: n.interface.mtu,
            ..Default::default()
        });
        for r in &n.routes {
            req.routes.push(agent_proto::Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                source: r.source.clone(),
                ..Default::default()
            });
        }
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> OciSpec {
        OciSpec::from_json(v).unwrap()
    }

    #[test]
    fn host_networking_is_refused_and_a_cni_namespace_is_found() {
        let host = spec(json!({"linux": {"namespaces": [{"type": "pid"}]}}));
        let e = network_namespace(&host, "p1").unwrap_err().to_string();
        assert!(e.contains("p1") && e.contains("host's network"), "{e}");
        let fresh = spec(json!({"linux": {"namespaces": [{"type": "network"}]}}));
        assert_eq!(network_namespace(&fresh, "p1").unwrap(), None);
        let cni = spec(
            json!({"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]}}),
        );
        assert_eq!(
            network_namespace(&cni, "p1").unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
    }

    #[test]
    fn a_failed_boot_leaves_no_pod_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pod_dir = dir.path().join("p1-0123");
        std::fs::create_dir_all(&pod_dir).unwrap();
        drop(BootUndo::new(&pod_dir));
        assert!(!pod_dir.exists());
        std::fs::create_dir_all(&pod_dir).unwrap();
        BootUndo::new(&pod_dir).disarm();
        assert!(pod_dir.exists(), "a booted VM keeps its directory");
    }
}
