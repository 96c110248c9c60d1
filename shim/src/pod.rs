//! One pod: its VM, and the tasks (containers and their execs) running in it. This is
//! the containerd task service: every Task RPC is implemented here explicitly.
//!
//! ```text
//! containerd --ttrpc--> Pod --VMM API (unix socket)--> peapod-vmm (child process)
//!                          \--ttrpc over vsock------> agent (PID 1 in the guest)
//!                           \-stdio streams (vsock)--> the processes' stdio
//! ```
//!
//! The first container (the sandbox, or a lone `ctr run` container) boots the VM;
//! later containers of the pod are created in it. Events go out in the order
//! containerd needs: TaskCreate, TaskStart, then TaskExit only once the process's
//! output has been delivered.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::Status;
use peapod_agent_protocol as agent_proto;
use peapod_agent_protocol::AgentClient;
use serde_json::Value;
use tokio::sync::{watch, Mutex};

use crate::agent::{self, ctx, ctx_forever};
use crate::cgroup::VmmCgroup;
use crate::config::Config;
use crate::network::PodNetwork;
use crate::rootfs::{self, LayerCache, RootfsMount};
use crate::state::{self, NetworkRecord, TaskRecord, VmmRecord};
use crate::stdio::{ProcessIo, StdioPaths};
use crate::vmm::{self, VmPaths, VmmApi};
use crate::volumes;

/// How long a process's output may take to drain after it exits.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// The exit status of a process whose VM died under it.
const VM_GONE_STATUS: u32 = 255;
/// The tap in the pod's network namespace.
const TAP_NAME: &str = "peapod0";

/// The annotations CRI puts on every container's spec.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

pub(crate) fn err(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

pub(crate) fn agent_err(what: &str, e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => err(
            s.code(),
            format!("{what}: the guest agent answered: {}", s.message()),
        ),
        other => err(
            Code::UNAVAILABLE,
            format!("{what}: the guest agent: {other}"),
        ),
    }
}

pub(crate) fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn timestamp_from_nanos(n: i64) -> Timestamp {
    if n <= 0 {
        return now();
    }
    Timestamp {
        seconds: n / 1_000_000_000,
        nanos: (n % 1_000_000_000) as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exit {
    pub(crate) status: u32,
    pub(crate) at: Timestamp,
}

/// One process: a container's own (exec id "") or an exec.
pub(crate) struct Process {
    pub(crate) stdio: StdioPaths,
    /// For an exec: the OCI process (JSON) to start.
    pub(crate) spec: Option<Vec<u8>>,
    guest_pid: u32,
    pub(crate) started: bool,
    paused: bool,
    pub(crate) exit: watch::Sender<Option<Exit>>,
    pub(crate) io: Arc<Mutex<ProcessIo>>,
}

impl Process {
    pub(crate) fn new(stdio: StdioPaths, spec: Option<Vec<u8>>) -> Process {
        Process {
            stdio,
            spec,
            guest_pid: 0,
            started: false,
            paused: false,
            exit: watch::channel(None).0,
            io: Arc::new(Mutex::new(ProcessIo::default())),
        }
    }

    pub(crate) fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// The exit a Delete reports: the recorded one, or 0 now for a process that
    /// never started; a running process (`what`) cannot be deleted.
    fn exit_for_delete(&self, what: &str) -> ttrpc::Result<Exit> {
        match (self.started, self.exited()) {
            (_, Some(e)) => Ok(e),
            (false, None) => Ok(Exit {
                status: 0,
                at: now(),
            }),
            (true, None) => Err(err(
                Code::FAILED_PRECONDITION,
                format!("{what} is still running (kill it first)"),
            )),
        }
    }

    pub(crate) fn status(&self) -> Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, false, _) => Status::CREATED,
            (None, true, true) => Status::PAUSED,
            (None, true, false) => Status::RUNNING,
        }
    }
}

/// What a container is, apart from its processes.
pub(crate) struct ContainerMeta {
    pub(crate) bundle: String,
    pub(crate) sandbox: bool,
    work_dir: PathBuf,
    /// The images in the VM's slots this container holds (released on delete).
    disks: Vec<PathBuf>,
}

pub(crate) struct Container {
    meta: ContainerMeta,
    pub(crate) main: Process,
    pub(crate) execs: HashMap<String, Process>,
}

/// The VM's disk slots: each image is attached once and shared by reference count
/// (the layers of one image are attached once for all its containers).
#[derive(Default)]
struct Slots {
    free: BTreeSet<u32>,
    attached: HashMap<PathBuf, (u32, String, usize)>,
    next_serial: u64,
}

pub(crate) struct Vm {
    pub(crate) pid: u32,
    paths: VmPaths,
    pub(crate) api: VmmApi,
    pub(crate) agent: AgentClient,
    network: Option<NetworkRecord>,
    /// Set when the VMM process has exited (for whatever reason).
    pub(crate) gone: watch::Receiver<bool>,
}

#[derive(Default)]
pub(crate) struct PodState {
    pub(crate) vm: Option<Arc<Vm>>,
    pod_dir: Option<PathBuf>,
    pub(crate) containers: HashMap<String, Container>,
    /// Tasks between Create's start and end (their ids are taken).
    creating: std::collections::HashSet<String>,
    slots: Slots,
    /// Set once the sandbox is being torn down: nothing new may start.
    stopping: bool,
    /// Removals of deleted containers still under way in the guest and on the host;
    /// Shutdown waits for them, so the shim never exits with a container half gone.
    removals: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Pod {
    config: Config,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pub(crate) state: Mutex<PodState>,
    cache: Arc<LayerCache>,
}

#[derive(Clone)]
pub struct Service(pub(crate) Arc<Pod>);

impl Service {
    pub fn new(
        config: Config,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let cache = Arc::new(LayerCache::new(config.layer_cache.clone()));
        Service(Arc::new(Pod {
            config,
            namespace,
            publisher,
            exit,
            state: Mutex::new(PodState::default()),
            cache,
        }))
    }
}

impl Pod {
    /// The context of an ordinary agent call: the configured deadline.
    pub(crate) fn agent_ctx(&self) -> ttrpc::context::Context {
        ctx(self.config.agent_timeout())
    }

    pub(crate) async fn publish<E: Event + MessageDyn + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(e) = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                &topic,
                &self.namespace,
                Box::new(event),
            )
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// The running VM, or an error naming the task.
    pub(crate) async fn vm(&self, id: &str) -> ttrpc::Result<Arc<Vm>> {
        let st = self.state.lock().await;
        match &st.vm {
            Some(vm) if !*vm.gone.borrow() => Ok(vm.clone()),
            _ => Err(err(
                Code::FAILED_PRECONDITION,
                format!("task {id}: the pod's VM is not running"),
            )),
        }
    }

    /// Boots the pod's VM for its first container.
    async fn boot(self: &Arc<Self>, sandbox_id: &str, spec: &Value) -> ttrpc::Result<Arc<Vm>> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            err(Code::INTERNAL, format!("pod {sandbox_id}: {what}: {e}"))
        };
        let annotations = spec["annotations"].as_object().cloned().unwrap_or_default();
        let netns = network_namespace(spec, sandbox_id)?;
        let size = self.config.vm_size(&annotations);
        let pod_dir = state::pod_dir(&self.config.state_dir, &self.namespace, sandbox_id);
        std::fs::create_dir_all(pod_dir.join(state::CONTAINERS_DIR))
            .map_err(|e| fail(&format!("creating {}", pod_dir.display()), &e))?;
        let undo_dir = |e: ttrpc::Error| {
            let _ = state::kill_vmm(&pod_dir);
            let _ = remove_cgroup(&pod_dir);
            let _ = state::remove_dir(&pod_dir);
            e
        };
        for f in [&self.config.kernel, &self.config.initrd] {
            if !f.is_file() {
                return Err(undo_dir(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "pod {sandbox_id}: {} does not exist (build it with make install, or \
                         set kernel/initrd in the peapod config)",
                        f.display()
                    ),
                )));
            }
        }
        // The network first: the VM boots with its card.
        let network = match &netns {
            Some(ns) => {
                let ns = ns.clone();
                let net = tokio::task::spawn_blocking(move || PodNetwork::attach(&ns, TAP_NAME))
                    .await
                    .map_err(|e| fail("attaching the network", &e))
                    .and_then(|r| r.map_err(|e| fail("attaching the network", &e)))
                    .map_err(undo_dir)?;
                let rec = NetworkRecord {
                    netns: net.netns.clone(),
                    veth: net.veth.clone(),
                    tap: net.tap_name.clone(),
                };
                state::write_json(&pod_dir.join(state::NETWORK_RECORD), &rec)
                    .map_err(|e| fail("recording the network", &e))
                    .map_err(undo_dir)?;
                Some(net)
            }
            None => None,
        };
        let undo = |e: ttrpc::Error| {
            if let Some(n) = &network {
                let _ = crate::network::detach(&n.netns, &n.veth, &n.tap_name);
            }
            undo_dir(e)
        };
        // The VMM's cgroup: the sandbox's, under the pod's.
        let cgroup = match spec["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| !p.is_empty())
        {
            Some(path) => {
                let path = path.to_owned();
                let made = tokio::task::spawn_blocking(move || {
                    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                        .map_err(|e| e.to_string())?;
                    VmmCgroup::create(&path, &mountinfo).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| fail("making the VMM's cgroup", &e))
                .and_then(|r| r.map_err(|e| fail("making the VMM's cgroup", &e)))
                .map_err(undo)?;
                state::write_json(&pod_dir.join(state::CGROUP_RECORD), &made)
                    .map_err(|e| fail("recording the VMM's cgroup", &e))
                    .map_err(|e| {
                        made.remove();
                        undo(e)
                    })?;
                Some(made)
            }
            None => {
                log::warn!(
                    "pod {sandbox_id}: the sandbox's spec has no cgroupsPath: the VMM stays in \
                     the shim's cgroup"
                );
                None
            }
        };
        let paths = VmPaths::in_dir(&pod_dir);
        let tap_fd: Option<std::os::fd::OwnedFd> = network
            .as_ref()
            .map(|n| n.tap.try_clone().expect("duplicating the tap fd").into());
        let mac = network.as_ref().map(|n| n.interface.mac.clone());
        let spec_vm = vmm::VmSpec {
            config: &self.config,
            size,
            paths: &paths,
            tap: tap_fd.as_ref().zip(mac.as_deref()),
            cgroup: cgroup.as_ref(),
        };
        let vmm = vmm::spawn(&spec_vm).map_err(|e| undo(fail("starting the VMM", &e)))?;
        // The VMM holds the tap now: ours would keep it alive after the VMM is gone.
        drop(tap_fd);
        let pid = vmm.pid;
        let rec = VmmRecord {
            pid,
            start_time: state::start_time(pid).unwrap_or(0),
        };
        let _ = state::write_json(&pod_dir.join(state::VMM_RECORD), &rec);
        log::info!(
            "pod {sandbox_id}: VMM {pid} started ({} vCPU, {} MiB)",
            size.vcpus,
            size.memory_mib
        );
        let (gone_tx, gone_rx) = watch::channel(false);
        let (status_tx, status_rx) = watch::channel(None::<String>);
        // Supervise the VMM: if it exits, every task of the pod has exited.
        let pod = self.clone();
        tokio::spawn(async move {
            let status = vmm.exited.await.ok().and_then(Result::ok);
            let _ = status_tx.send(Some(
                status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
            ));
            let _ = gone_tx.send(true);
            pod.vmm_exited(status).await;
        });
        let booted_at = std::time::Instant::now();
        let api = VmmApi::new(paths.api_socket.clone());
        let started = async {
            api.wait_ready(Duration::from_secs(10))
                .await
                .map_err(|e| fail("the VMM API", &e))?;
            agent::connect(&paths.vsock_socket, self.config.boot_timeout())
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
            Err(e) => {
                let tail = vmm::log_tail(&paths, 2000);
                // undo kills the VMM.
                return Err(undo(err(Code::INTERNAL, format!("{e} (VMM log: {tail})"))));
            }
        };
        log::info!(
            "pod {sandbox_id}: the guest agent answered {:?} after the VMM started",
            booted_at.elapsed()
        );
        agent::forward_log(&paths.vsock_socket, sandbox_id);
        let vm = Arc::new(Vm {
            pid,
            paths,
            api,
            agent,
            network: network.as_ref().map(|n| NetworkRecord {
                netns: n.netns.clone(),
                veth: n.veth.clone(),
                tap: n.tap_name.clone(),
            }),
            gone: gone_rx,
        });
        let req = sandbox_request(sandbox_id, spec, network.as_ref());
        if let Err(e) = vm.agent.create_sandbox(self.agent_ctx(), &req).await {
            // undo kills the VMM.
            return Err(undo(agent_err(
                &format!("pod {sandbox_id}: CreateSandbox"),
                e,
            )));
        }
        // Its network's fd went to the VMM; the names stay recorded.
        drop(network);
        self.spawn_oom_watch(vm.clone());
        Ok(vm)
    }

    fn spawn_oom_watch(self: &Arc<Self>, vm: Arc<Vm>) {
        let pod = self.clone();
        tokio::spawn(async move {
            let req = agent_proto::GetOomEventRequest::new();
            loop {
                match vm.agent.get_oom_event(ctx_forever(), &req).await {
                    Ok(ev) => {
                        pod.publish(TaskOOM {
                            container_id: ev.container_id,
                            ..Default::default()
                        })
                        .await
                    }
                    Err(_) => {
                        if *vm.gone.borrow() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// The VMM process ended: every process not yet exited is reported exited with
    /// [`VM_GONE_STATUS`], and the pod's network plumbing is removed.
    async fn vmm_exited(self: &Arc<Self>, status: Option<std::process::ExitStatus>) {
        let mut st = self.state.lock().await;
        let Some(vm) = st.vm.clone() else {
            return;
        };
        if !st.stopping {
            use std::os::unix::process::ExitStatusExt;
            let why = if status.and_then(|s| s.signal()) == Some(libc::SIGSYS) {
                " A VMM thread made a system call outside its seccomp filter: the \
                 kernel's audit log names it (`dmesg | grep type=1326`); \
                 vmm_seccomp = false in the peapod config runs without filters, to debug."
            } else {
                ""
            };
            log::error!(
                "the pod's VMM {} exited ({status:?}) while its tasks ran.{why} {}",
                vm.pid,
                vmm::log_tail(&vm.paths, 2000)
            );
        }
        let at = now();
        let mut exits = Vec::new();
        for (id, c) in st.containers.iter_mut() {
            for (exec_id, p) in std::iter::once((String::new(), &mut c.main))
                .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)))
            {
                if set_exit_once(&p.exit, VM_GONE_STATUS, &at) && p.started {
                    exits.push((id.clone(), exec_id));
                }
            }
        }
        if let Some(n) = &vm.network {
            let n = n.clone();
            let _ = tokio::task::spawn_blocking(move || {
                crate::network::detach(&n.netns, &n.veth, &n.tap)
            })
            .await;
        }
        drop(st);
        for (id, exec_id) in exits {
            self.publish(TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() { id } else { exec_id },
                pid: vm.pid,
                exit_status: VM_GONE_STATUS,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            })
            .await;
        }
    }

    /// Attaches an image to a slot (or takes another reference to it); its serial.
    async fn attach_disk(&self, vm: &Vm, path: &Path, read_only: bool) -> ttrpc::Result<String> {
        let mut st = self.state.lock().await;
        if let Some((_, serial, refs)) = st.slots.attached.get_mut(path) {
            *refs += 1;
            return Ok(serial.clone());
        }
        let Some(slot) = st.slots.free.pop_first() else {
            return Err(err(
                Code::RESOURCE_EXHAUSTED,
                format!(
                    "no free disk slot in the pod's VM for {} (all {} are in use: raise \
                     block_slots in the peapod config)",
                    path.display(),
                    self.config.block_slots
                ),
            ));
        };
        st.slots.next_serial += 1;
        let serial = format!("pp{}", st.slots.next_serial);
        if let Err(e) = vm.api.block_set(slot, path, read_only, &serial).await {
            st.slots.free.insert(slot);
            return Err(err(Code::INTERNAL, e));
        }
        st.slots
            .attached
            .insert(path.to_path_buf(), (slot, serial.clone(), 1));
        Ok(serial)
    }

    /// Drops one reference to an attached image; the last one empties its slot.
    async fn release_disk(&self, st: &mut PodState, vm: Option<&Vm>, path: &Path) {
        let Some((slot, _, refs)) = st.slots.attached.get_mut(path) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let slot = *slot;
        st.slots.attached.remove(path);
        if let Some(vm) = vm.filter(|vm| !*vm.gone.borrow()) {
            if let Err(e) = vm.api.block_clear(slot).await {
                log::warn!("emptying slot {slot} ({}): {e}", path.display());
                return;
            }
        }
        st.slots.free.insert(slot);
    }

    pub(crate) async fn create(
        self: &Arc<Self>,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<u32> {
        let id = req.id.clone();
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                format!("task {id}: peapod cannot restore a checkpoint"),
            ));
        }
        let spec_path = Path::new(&req.bundle).join("config.json");
        let mut spec: Value = std::fs::read(&spec_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("task {id}: OCI spec {}: {e}", spec_path.display()),
                )
            })?;
        let (sandbox_id, is_sandbox) = pod_identity(&id, &spec);

        let (vm, pod_dir) = {
            let mut st = self.state.lock().await;
            if st.containers.contains_key(&id) || st.creating.contains(&id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("task {id} already exists"),
                ));
            }
            if st.stopping {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("task {id}: the pod {sandbox_id} is being removed"),
                ));
            }
            let vm = match &st.vm {
                Some(vm) if *vm.gone.borrow() => {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("task {id}: the VM of pod {sandbox_id} has exited"),
                    ));
                }
                Some(vm) => vm.clone(),
                // The first container boots the VM; nothing else of the pod exists
                // yet, so holding the lock meanwhile holds nobody up.
                None => {
                    let vm = self.boot(&sandbox_id, &spec).await?;
                    st.slots.free = (0..self.config.block_slots).collect();
                    st.pod_dir = Some(state::pod_dir(
                        &self.config.state_dir,
                        &self.namespace,
                        &sandbox_id,
                    ));
                    st.vm = Some(vm.clone());
                    vm
                }
            };
            st.creating.insert(id.clone());
            (
                vm,
                st.pod_dir.clone().expect("a booted pod has a directory"),
            )
        };
        // From here on the pod's lock is taken only briefly: the images and the
        // guest's work take seconds, and containerd asks about other tasks meanwhile.
        let work_dir = state::container_dir(&pod_dir, &id);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut disks = Vec::new();
        let made = self
            .make_container(
                &req, &vm, &mut spec, is_sandbox, &work_dir, &stdio, &mut disks,
            )
            .await;
        let mut st = self.state.lock().await;
        st.creating.remove(&id);
        let io = match made {
            Ok(io) => io,
            Err(e) => {
                for d in &disks {
                    self.release_disk(&mut st, Some(&vm), d).await;
                }
                let _ = state::remove_dir(&work_dir);
                let _ = std::fs::remove_file(Path::new(&req.bundle).join(state::BUNDLE_FILE));
                let last = st.containers.is_empty() && st.creating.is_empty();
                drop(st);
                if last {
                    self.teardown_vm().await;
                }
                return Err(e);
            }
        };
        let mut main = Process::new(stdio, None);
        main.io = Arc::new(Mutex::new(io));
        st.containers.insert(
            id.clone(),
            Container {
                meta: ContainerMeta {
                    bundle: req.bundle.clone(),
                    sandbox: is_sandbox,
                    work_dir,
                    disks,
                },
                main,
                execs: HashMap::new(),
            },
        );
        drop(st);
        self.publish(TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: vm.pid,
            ..Default::default()
        })
        .await;
        Ok(vm.pid)
    }

    /// The container in the guest: its record in the bundle, its rootfs as disks
    /// (each attached one is pushed to `disks`, for the caller to release on
    /// failure), its volumes copied in, CreateContainer, and its stdio attached.
    #[allow(clippy::too_many_arguments)]
    async fn make_container(
        &self,
        req: &api::CreateTaskRequest,
        vm: &Vm,
        spec: &mut Value,
        is_sandbox: bool,
        work_dir: &Path,
        stdio: &StdioPaths,
        disks: &mut Vec<PathBuf>,
    ) -> ttrpc::Result<ProcessIo> {
        let id = &req.id;
        let record = TaskRecord {
            pod_dir: work_dir
                .parent()
                .and_then(Path::parent)
                .expect("a container's directory is in its pod's")
                .to_path_buf(),
            work_dir: work_dir.to_path_buf(),
            sandbox: is_sandbox,
        };
        state::write_json(&Path::new(&req.bundle).join(state::BUNDLE_FILE), &record).map_err(
            |e| {
                err(
                    Code::INTERNAL,
                    format!("task {id}: writing its record: {e}"),
                )
            },
        )?;

        // The rootfs: images of the layers, a fresh upper.
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let cache = self.cache.clone();
        let wd = work_dir.to_path_buf();
        let upper_bytes = self.config.upper_size_mib << 20;
        let prepared = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&wd).map_err(|e| e.to_string())?;
            rootfs::prepare(&cache, &mounts, &wd, upper_bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| err(Code::INVALID_ARGUMENT, format!("task {id}: rootfs: {e}")))?;
        log::info!(
            "task {id}: rootfs ready ({} layers, {} of them private to it)",
            prepared.layers.len(),
            prepared.layers.iter().filter(|l| !l.cached).count()
        );

        let mut layers = Vec::new();
        for l in &prepared.layers {
            let serial = self.attach_disk(vm, &l.path, true).await?;
            disks.push(l.path.clone());
            layers.push(agent_proto::Disk {
                serial,
                fstype: l.fstype.to_string(),
                ..Default::default()
            });
        }
        let serial = self.attach_disk(vm, &prepared.upper, false).await?;
        disks.push(prepared.upper.clone());
        let rootfs = agent_proto::Rootfs {
            layers,
            upper: Some(agent_proto::rootfs::Upper::UpperDisk(agent_proto::Disk {
                serial,
                fstype: "ext4".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        // Host files the spec binds: copied into the guest.
        let copies = volumes::plan(spec, id).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        for c in &copies {
            volumes::copy_in(&vm.agent, id, c)
                .await
                .map_err(|e| err(Code::INTERNAL, e))?;
        }
        let areq = agent_proto::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec: serde_json::to_vec(&spec).unwrap_or_default(),
            rootfs: MessageField::some(rootfs),
            stdio: MessageField::some(stdio.wanted()),
            sandbox: is_sandbox,
            ..Default::default()
        };
        vm.agent
            .create_container(self.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {id}: CreateContainer"), e))?;
        // The output waits in the guest until attached; attach before Start.
        match ProcessIo::attach(&vm.paths.vsock_socket, id, "", stdio).await {
            Ok(io) => Ok(io),
            Err(e) => {
                let rreq = agent_proto::RemoveContainerRequest {
                    container_id: id.clone(),
                    ..Default::default()
                };
                let _ = vm.agent.remove_container(self.agent_ctx(), &rreq).await;
                Err(err(Code::INTERNAL, format!("task {id}: stdio: {e}")))
            }
        }
    }

    pub(crate) async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let vm = self.vm(id).await?;
        let mut st = self.state.lock().await;
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
        let p = if exec_id.is_empty() {
            &mut c.main
        } else {
            c.execs.get_mut(exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of task {id} not found"),
                )
            })?
        };
        if p.started {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("task {id}{}: already started", exec_label(exec_id)),
            ));
        }
        let guest_pid = if exec_id.is_empty() {
            let req = agent_proto::ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            };
            vm.agent
                .start_container(self.agent_ctx(), &req)
                .await
                .map_err(|e| agent_err(&format!("task {id}: StartContainer"), e))?
                .pid
        } else {
            let req = agent_proto::ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                oci_process: p.spec.clone().unwrap_or_default(),
                stdio: MessageField::some(p.stdio.wanted()),
                ..Default::default()
            };
            let pid = vm
                .agent
                .exec_process(self.agent_ctx(), &req)
                .await
                .map_err(|e| agent_err(&format!("exec {exec_id} in task {id}"), e))?
                .pid;
            match ProcessIo::attach(&vm.paths.vsock_socket, id, exec_id, &p.stdio).await {
                Ok(io) => *p.io.lock().await = io,
                Err(e) => {
                    let kill = agent_proto::SignalProcessRequest {
                        container_id: id.into(),
                        exec_id: exec_id.into(),
                        signal: libc::SIGKILL as u32,
                        ..Default::default()
                    };
                    let _ = vm.agent.signal_process(self.agent_ctx(), &kill).await;
                    return Err(err(
                        Code::INTERNAL,
                        format!("exec {exec_id} in task {id}: stdio: {e}"),
                    ));
                }
            }
            pid
        };
        p.started = true;
        p.guest_pid = guest_pid;
        let io = p.io.clone();
        let exit = p.exit.clone();
        drop(st);
        if exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: id.into(),
                pid: vm.pid,
                ..Default::default()
            })
            .await;
        } else {
            self.publish(TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid: vm.pid,
                ..Default::default()
            })
            .await;
        }
        // Wait for the exit in the guest; report it once the output is delivered.
        let pod = self.clone();
        let vm_pid = vm.pid;
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let req = agent_proto::ProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let waited = vm.agent.wait_process(ctx_forever(), &req).await;
            io.lock().await.wait_output(OUTPUT_DRAIN).await;
            let result = match waited {
                Ok(w) => Exit {
                    status: w.exit_status as u32,
                    at: timestamp_from_nanos(w.exited_at_unix_nanos),
                },
                Err(e) => {
                    // The VM died under it (the supervisor reports that), or the
                    // agent lost track of it.
                    let mut gone = vm.gone.clone();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|g| *g)).await;
                    log::warn!("task {id}{}: waiting: {e}", exec_label(&exec_id));
                    Exit {
                        status: VM_GONE_STATUS,
                        at: now(),
                    }
                }
            };
            // Only the first report counts (the supervisor may have been first).
            if set_exit_once(&exit, result.status, &result.at) {
                pod.publish(TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() {
                        id.clone()
                    } else {
                        exec_id
                    },
                    pid: vm.pid,
                    exit_status: result.status,
                    exited_at: MessageField::some(result.at),
                    ..Default::default()
                })
                .await;
            }
        });
        Ok(vm_pid)
    }

    /// Runs `f` on a process (exec id "": the container's own) and its container.
    pub(crate) async fn with_process<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&ContainerMeta, &mut Process) -> T,
    ) -> ttrpc::Result<T> {
        let mut st = self.state.lock().await;
        let Container { meta, main, execs } = st
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
        let p = if exec_id.is_empty() {
            main
        } else {
            execs.get_mut(exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of task {id} not found"),
                )
            })?
        };
        Ok(f(meta, p))
    }

    pub(crate) async fn delete(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let vm = self.state.lock().await.vm.clone();
        let pid = vm.as_ref().map_or(0, |v| v.pid);
        if !exec_id.is_empty() {
            let mut st = self.state.lock().await;
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
            let p = c.execs.get(exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of task {id} not found"),
                )
            })?;
            let exit = p.exit_for_delete(&format!("exec {exec_id} of task {id}"))?;
            c.execs.remove(exec_id);
            return Ok(delete_response(pid, &exit));
        }
        let mut st = self.state.lock().await;
        let c = st
            .containers
            .get(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
        let exit = c.main.exit_for_delete(&format!("task {id}"))?;
        if c.meta.sandbox {
            let others: Vec<_> = st
                .containers
                .keys()
                .filter(|k| *k != id)
                .chain(st.creating.iter())
                .cloned()
                .collect();
            if !others.is_empty() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "task {id} is the pod's sandbox; delete its other containers first: {}",
                        others.join(", ")
                    ),
                ));
            }
        }
        let c = st.containers.remove(id).expect("checked above");
        let last = st.containers.is_empty() && st.creating.is_empty();
        if last {
            // Nothing new may start in a VM that is about to go.
            st.stopping = true;
        }
        // containerd stops waiting for the answer after a while (CRI gives the Delete
        // that follows a task's exit 10 s in all) and then never sends Shutdown, so the
        // answer cannot wait for the guest: the container is out of the records and its
        // exit is known, which is all the answer says. The removal runs on a task of
        // its own and always finishes; the last task's is quick (the VM is ended, not
        // shut down) and is awaited, so the VM is gone when the answer goes.
        let pod = Arc::clone(self);
        let task_id = id.to_string();
        let exited_at = exit.at.clone();
        let exit_status = exit.status;
        let removal = tokio::spawn(async move {
            pod.remove_container(&task_id, c, vm, last).await;
            pod.publish(TaskDelete {
                container_id: task_id,
                pid,
                exit_status,
                exited_at: MessageField::some(exited_at),
                ..Default::default()
            })
            .await;
        });
        if last {
            drop(st);
            removal.await.map_err(|e| {
                err(
                    Code::INTERNAL,
                    format!("task {id}: removing it failed: {e}"),
                )
            })?;
        } else {
            st.removals.retain(|r| !r.is_finished());
            st.removals.push(removal);
        }
        Ok(delete_response(pid, &exit))
    }

    /// The rest of a Delete once `c` is out of the pod's records: the container leaves
    /// the guest and its disks their slots, then its files go; with the `last` task the
    /// VM goes too, and the guest's part is skipped (DestroySandbox ends everything
    /// there, and emptying slots of a VM about to stop is wasted guest time).
    async fn remove_container(
        self: &Arc<Self>,
        id: &str,
        c: Container,
        vm: Option<Arc<Vm>>,
        last: bool,
    ) {
        if !last {
            if let Some(vm) = vm.as_ref().filter(|vm| !*vm.gone.borrow()) {
                let req = agent_proto::RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                };
                if let Err(e) = vm.agent.remove_container(self.agent_ctx(), &req).await {
                    // The sandbox's Delete may end the VM under a removal still going.
                    if !*vm.gone.borrow() {
                        log::warn!("task {id}: RemoveContainer: {e}");
                    }
                }
            }
            let mut st = self.state.lock().await;
            for d in &c.meta.disks {
                self.release_disk(&mut st, vm.as_deref(), d).await;
            }
        }
        if let Err(e) = state::remove_dir(&c.meta.work_dir) {
            log::warn!("task {id}: removing {}: {e}", c.meta.work_dir.display());
        }
        let _ = std::fs::remove_file(Path::new(&c.meta.bundle).join(state::BUNDLE_FILE));
        if last {
            self.teardown_vm().await;
        }
    }

    /// Ends the VM (the last task is gone): the VMM is killed, then the network and
    /// the pod's directory go. Nothing in the guest outlives it (writable layers are
    /// thrown away, volumes are copies), so there is nothing a guest shutdown would
    /// save, and on a slow host one costs seconds of a Delete's budget.
    async fn teardown_vm(self: &Arc<Self>) {
        let mut st = self.state.lock().await;
        st.stopping = true;
        let vm = st.vm.clone();
        let pod_dir = st.pod_dir.clone();
        drop(st);
        if let Some(dir) = pod_dir {
            let ended = tokio::task::spawn_blocking(move || cleanup_pod_dir(&dir)).await;
            if let Err(e) = ended.map_err(std::io::Error::other).and_then(|r| r) {
                log::error!("ending the pod's VM: {e}");
            }
        }
        if let Some(vm) = &vm {
            // The supervisor reaps it and reports the exit.
            let mut gone = vm.gone.clone();
            if tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|g| *g))
                .await
                .is_err()
            {
                log::error!("VMM {} has not been reaped 5 s after SIGKILL", vm.pid);
            }
        }
    }

    /// containerd's Shutdown: the shim exits once no task is left (after ending a VM
    /// that a failed Create may have left running).
    pub(crate) async fn shutdown(self: &Arc<Self>) {
        let mut st = self.state.lock().await;
        if !(st.containers.is_empty() && st.creating.is_empty()) {
            return;
        }
        let removals = std::mem::take(&mut st.removals);
        drop(st);
        for r in removals {
            let _ = r.await;
        }
        self.teardown_vm().await;
        self.exit.signal();
    }
}

/// Everything of a pod on the host, from its directory alone: the VMM, the tap and
/// filters, the files. Idempotent.
pub fn cleanup_pod_dir(pod_dir: &Path) -> std::io::Result<()> {
    state::kill_vmm(pod_dir)?;
    remove_cgroup(pod_dir)?;
    if let Some(n) = state::read_json::<NetworkRecord>(&pod_dir.join(state::NETWORK_RECORD))? {
        crate::network::detach(&n.netns, &n.veth, &n.tap)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    state::remove_dir(pod_dir)
}

/// Removes the VMM's cgroup (the VMM must be gone), if the pod's directory records one.
fn remove_cgroup(pod_dir: &Path) -> std::io::Result<()> {
    let Some(cg) = state::read_json::<VmmCgroup>(&pod_dir.join(state::CGROUP_RECORD))? else {
        return Ok(());
    };
    match cg.remove().into_iter().next() {
        None => Ok(()),
        Some((dir, e)) => Err(std::io::Error::other(format!(
            "removing the VMM's cgroup {}: {e}",
            dir.display()
        ))),
    }
}

/// Records a process's exit unless one is recorded already; whether this one was.
pub(crate) fn set_exit_once(
    exit: &watch::Sender<Option<Exit>>,
    status: u32,
    at: &Timestamp,
) -> bool {
    exit.send_if_modified(|e| {
        if e.is_some() {
            return false;
        }
        *e = Some(Exit {
            status,
            at: at.clone(),
        });
        true
    })
}

fn delete_response(pid: u32, exit: &Exit) -> api::DeleteResponse {
    api::DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(exit.at.clone()),
        ..Default::default()
    }
}

pub(crate) fn exec_label(exec_id: &str) -> String {
    if exec_id.is_empty() {
        String::new()
    } else {
        format!(" exec {exec_id}")
    }
}

/// The pod a container belongs to, and whether it is that pod's sandbox: CRI's
/// annotations, or (for a container without them, e.g. `ctr run`) a pod of its own.
pub fn pod_identity(id: &str, spec: &Value) -> (String, bool) {
    let a = &spec["annotations"];
    let sandbox_id = a[SANDBOX_ID].as_str().filter(|s| !s.is_empty());
    match (sandbox_id, a[CONTAINER_TYPE].as_str()) {
        (Some(sb), Some("sandbox")) => (sb.to_string(), true),
        (Some(sb), _) if sb == id => (sb.to_string(), true),
        (Some(sb), _) => (sb.to_string(), false),
        (None, _) => (id.to_string(), true),
    }
}

/// The network namespace the pod's network lives in: `Some(path)` when CNI made one,
/// `None` for a new empty one (no network). A spec without a network namespace
/// shares the host's, which a VM cannot.
fn network_namespace(spec: &Value, sandbox_id: &str) -> ttrpc::Result<Option<PathBuf>> {
    let namespaces = spec["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let net = namespaces
        .iter()
        .find(|n| n["type"].as_str() == Some("network"))
        .ok_or_else(|| {
            err(
                Code::INVALID_ARGUMENT,
                format!(
                    "pod {sandbox_id}: it uses the host's network (hostNetwork: true, or no \
                     network namespace in its spec); a VM pod has its own network stack: \
                     run it with another RuntimeClass or without host networking"
                ),
            )
        })?;
    Ok(net["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from))
}

/// The agent's CreateSandbox: hostname, DNS (from the resolv.conf CRI binds, if any)
/// and the pod's network as CNI set it up on the veth.
fn sandbox_request(
    sandbox_id: &str,
    spec: &Value,
    network: Option<&PodNetwork>,
) -> agent_proto::CreateSandboxRequest {
    let mut req = agent_proto::CreateSandboxRequest {
        sandbox_id: sandbox_id.into(),
        hostname: spec["hostname"].as_str().unwrap_or("").into(),
        ..Default::default()
    };
    if let Some(sysctls) = spec["linux"]["sysctl"].as_object() {
        for (k, v) in sysctls {
            if let Some(v) = v.as_str() {
                req.sysctls.insert(k.clone(), v.into());
            }
        }
    }
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

impl Pod {
    /// Pauses or resumes a container (its cgroup freezes in the guest); for the
    /// sandbox, the whole VM (its vCPUs stop).
    pub(crate) async fn pause_resume(&self, id: &str, pause: bool) -> ttrpc::Result<()> {
        let vm = self.vm(id).await?;
        let sandbox = self.with_process(id, "", |c, _| c.sandbox).await?;
        let what = if pause { "Pause" } else { "Resume" };
        if sandbox {
            let r = if pause {
                vm.api.pause().await
            } else {
                vm.api.resume().await
            };
            r.map_err(|e| err(Code::INTERNAL, format!("task {id}: {what}: {e}")))?;
        } else {
            let req = agent_proto::ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            };
            let r = if pause {
                vm.agent.pause_container(self.agent_ctx(), &req).await
            } else {
                vm.agent.resume_container(self.agent_ctx(), &req).await
            };
            r.map_err(|e| agent_err(&format!("task {id}: {what}"), e))?;
        }
        self.with_process(id, "", |_, p| p.paused = pause).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cri_annotations_group_containers_into_pods() {
        let sb = json!({"annotations": {SANDBOX_ID: "sb1", CONTAINER_TYPE: "sandbox"}});
        assert_eq!(pod_identity("sb1", &sb), ("sb1".into(), true));
        let c = json!({"annotations": {SANDBOX_ID: "sb1", CONTAINER_TYPE: "container"}});
        assert_eq!(pod_identity("c1", &c), ("sb1".into(), false));
        assert_eq!(pod_identity("solo", &json!({})), ("solo".into(), true));
    }

    #[test]
    fn host_networking_is_refused_and_a_cni_namespace_is_found() {
        let host = json!({"linux": {"namespaces": [{"type": "pid"}]}});
        let e = network_namespace(&host, "p1").unwrap_err().to_string();
        assert!(e.contains("p1") && e.contains("host's network"), "{e}");
        let fresh = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace(&fresh, "p1").unwrap(), None);
        let cni =
            json!({"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(
            network_namespace(&cni, "p1").unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
    }
}
