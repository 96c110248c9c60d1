//! A blocking client for the guest agent's ttrpc API over the VMM's hybrid vsock, and
//! the stdio streams (one vsock connection each, to `STDIO_PORT`).
//!
//! The generated client is async only; [`AgentConn`] owns a current-thread tokio
//! runtime and runs each call to completion on it, with a deadline
//! ([`DEFAULT_RPC_TIMEOUT`] unless told otherwise: the guest is slow here). Calls
//! started with [`AgentConn::spawn`] run in the background, but only while the
//! runtime is driven, that is during a later blocking call on the same connection or
//! [`AgentConn::join`].

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use peapod_agent_protocol::ttrpc;
use peapod_agent_protocol::ttrpc::context::Context;
use peapod_agent_protocol::{
    AgentClient, ContainerRequest, CopyFileRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, Empty, ExecProcessRequest, GetOomEventRequest, HealthRequest,
    HealthResponse, OomEvent, PidsResponse, ProcessRequest, RemoveContainerRequest,
    SignalProcessRequest, StartResponse, StatsResponse, StdioHeader, StdioStream, VersionRequest,
    VersionResponse, WaitResponse, AGENT_PORT, STDIO_PORT,
};

use crate::vsock::vsock_connect;

/// The deadline of each call: generous, every guest syscall costs ~1000x here, and a
/// container's creation took 138 s on a loaded 2-core machine.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(240);
/// How often [`AgentConn::connect`] retries while the guest boots.
pub const CONNECT_RETRY: Duration = Duration::from_millis(200);

/// What the agent answered, or why there was no answer.
pub type RpcResult<T> = Result<T, ttrpc::Error>;

/// The text of an RPC error: the agent's message for an error status, else the
/// transport's own description.
pub fn error_text(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// A ttrpc connection to the agent, with the runtime that drives it.
pub struct AgentConn {
    rt: tokio::runtime::Runtime,
    client: AgentClient,
    timeout: Duration,
}

/// A call running in the background on an [`AgentConn`]'s runtime.
pub struct Pending<T>(tokio::task::JoinHandle<RpcResult<T>>);

macro_rules! rpcs {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self, req: &$req) -> RpcResult<$resp> {
                self.block_on(self.client.$name(self.ctx(), req))
            }
        )*
    };
}

impl AgentConn {
    /// Connects to the agent through the VMM's vsock socket `uds`, retrying every
    /// [`CONNECT_RETRY`] while the guest boots (no socket yet, or the guest resets the
    /// connection because nothing listens yet) until `timeout`, and confirms with
    /// `Health`. Fails with the last error.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<AgentConn, String> {
        let deadline = Instant::now() + timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match Self::connect_once(uds, deadline) {
                Ok(conn) => return Ok(conn),
                Err(e) => e,
            };
            if Instant::now() + CONNECT_RETRY > deadline {
                return Err(format!(
                    "no agent on vsock port {AGENT_PORT} through {} after {timeout:?} \
                     ({attempts} attempts); last error: {err}",
                    uds.display()
                ));
            }
            std::thread::sleep(CONNECT_RETRY);
        }
    }

    fn connect_once(uds: &Path, deadline: Instant) -> Result<AgentConn, String> {
        let stream = vsock_connect(uds, AGENT_PORT).map_err(|e| e.to_string())?;
        let conn = Self::from_stream(stream).map_err(|e| format!("ttrpc over vsock: {e}"))?;
        // The first answer may take a while on a guest that is still booting.
        let left = deadline.saturating_duration_since(Instant::now());
        conn.with_timeout(left.max(Duration::from_secs(1)))
            .health()
            .map_err(|e| format!("Health: {}", error_text(&e)))?;
        Ok(conn)
    }

    /// A client on an established connection to the agent's port (after the vsock
    /// handshake). The stream is moved into the runtime, which closes it on drop.
    pub fn from_stream(stream: UnixStream) -> io::Result<AgentConn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = {
            // Socket::try_from registers the stream with the runtime's reactor (it
            // sets it non-blocking) and Client::new spawns the connection's task:
            // both need the runtime entered.
            let _guard = rt.enter();
            let socket = ttrpc::r#async::transport::Socket::try_from(stream)?;
            AgentClient::new(ttrpc::r#async::Client::new(socket))
        };
        Ok(AgentConn {
            rt,
            client,
            timeout: DEFAULT_RPC_TIMEOUT,
        })
    }

    /// The deadline of every later call on this connection.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A view of this connection whose calls have another deadline.
    pub fn with_timeout(&self, timeout: Duration) -> WithTimeout<'_> {
        WithTimeout {
            conn: self,
            timeout,
        }
    }

    /// A context with this connection's deadline.
    pub fn ctx(&self) -> Context {
        ttrpc::context::with_duration(self.timeout)
    }

    /// The generated async client, for what the wrappers below do not cover.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Runs `f` to completion on the connection's runtime (which also drives the
    /// connection and any [`Pending`] call).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Any call, blocking: `conn.call(|c, ctx| async move { c.list_pids(ctx, &req).await })`.
    pub fn call<T, F, Fut>(&self, f: F) -> RpcResult<T>
    where
        F: FnOnce(AgentClient, Context) -> Fut,
        Fut: Future<Output = RpcResult<T>>,
    {
        self.block_on(f(self.client.clone(), self.ctx()))
    }

    /// Starts a call in the background with deadline `timeout` (e.g. a long poll like
    /// `GetOomEvent`). It makes progress only while this connection's runtime runs:
    /// during later blocking calls and [`AgentConn::join`].
    pub fn spawn<T, F, Fut>(&self, timeout: Duration, f: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(AgentClient, Context) -> Fut,
        Fut: Future<Output = RpcResult<T>> + Send + 'static,
    {
        let fut = f(self.client.clone(), ttrpc::context::with_duration(timeout));
        Pending(self.rt.spawn(fut))
    }

    /// Waits for a background call.
    pub fn join<T>(&self, p: Pending<T>) -> RpcResult<T> {
        self.block_on(p.0).unwrap_or_else(|e| {
            Err(ttrpc::Error::Others(format!(
                "the background call failed: {e}"
            )))
        })
    }

    /// `GetOomEvent` in the background, with deadline `timeout`.
    pub fn spawn_oom_event(&self, timeout: Duration) -> Pending<OomEvent> {
        self.spawn(timeout, |c, ctx| async move {
            c.get_oom_event(ctx, &GetOomEventRequest::new()).await
        })
    }

    pub fn version(&self) -> RpcResult<VersionResponse> {
        self.block_on(self.client.version(self.ctx(), &VersionRequest::new()))
    }

    pub fn health(&self) -> RpcResult<HealthResponse> {
        self.block_on(self.client.health(self.ctx(), &HealthRequest::new()))
    }

    pub fn destroy_sandbox(&self) -> RpcResult<Empty> {
        self.block_on(
            self.client
                .destroy_sandbox(self.ctx(), &DestroySandboxRequest::new()),
        )
    }

    rpcs! {
        create_sandbox(CreateSandboxRequest) -> Empty;
        copy_file(CopyFileRequest) -> Empty;
        create_container(CreateContainerRequest) -> Empty;
        start_container(ContainerRequest) -> StartResponse;
        exec_process(ExecProcessRequest) -> StartResponse;
        signal_process(SignalProcessRequest) -> Empty;
        wait_process(ProcessRequest) -> WaitResponse;
        delete_process(ProcessRequest) -> Empty;
        close_stdin(ProcessRequest) -> Empty;
        list_pids(ContainerRequest) -> PidsResponse;
        stats_container(ContainerRequest) -> StatsResponse;
        remove_container(RemoveContainerRequest) -> Empty;
    }

    /// `ContainerRequest` for `id`.
    pub fn container(id: &str) -> ContainerRequest {
        let mut r = ContainerRequest::new();
        r.container_id = id.into();
        r
    }

    /// `ProcessRequest` for a container's own process (`exec_id` empty) or an exec.
    pub fn process(container_id: &str, exec_id: &str) -> ProcessRequest {
        let mut r = ProcessRequest::new();
        r.container_id = container_id.into();
        r.exec_id = exec_id.into();
        r
    }
}

/// An [`AgentConn`] whose calls have another deadline: `conn.with_timeout(t).health()`.
pub struct WithTimeout<'a> {
    conn: &'a AgentConn,
    timeout: Duration,
}

impl WithTimeout<'_> {
    fn ctx(&self) -> Context {
        ttrpc::context::with_duration(self.timeout)
    }

    pub fn health(&self) -> RpcResult<HealthResponse> {
        self.conn
            .block_on(self.conn.client.health(self.ctx(), &HealthRequest::new()))
    }

    pub fn wait_process(&self, req: &ProcessRequest) -> RpcResult<WaitResponse> {
        self.conn
            .block_on(self.conn.client.wait_process(self.ctx(), req))
    }

    /// Any call with this deadline.
    pub fn call<T, F, Fut>(&self, f: F) -> RpcResult<T>
    where
        F: FnOnce(AgentClient, Context) -> Fut,
        Fut: Future<Output = RpcResult<T>>,
    {
        self.conn.block_on(f(self.conn.client.clone(), self.ctx()))
    }
}

/// Opens one stdio stream of a process: connects to [`STDIO_PORT`], sends the
/// header and reads the agent's answer. After `OK` the stream carries the process's
/// bytes only (shut down its write half to close a stdin); on `ERR` the error says
/// the agent's reason.
pub fn attach(
    uds: &Path,
    stream: StdioStream,
    container_id: &str,
    exec_id: &str,
) -> io::Result<UnixStream> {
    let mut s = vsock_connect(uds, STDIO_PORT)?;
    let header = StdioHeader {
        stream,
        container_id: container_id.into(),
        exec_id: exec_id.into(),
    };
    let what = format!(
        "attaching {stream} of {container_id}/{}",
        if exec_id.is_empty() { "-" } else { exec_id }
    );
    s.set_read_timeout(Some(DEFAULT_RPC_TIMEOUT))?;
    s.write_all(header.encode().as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: sending the header: {e}")))?;
    // Byte by byte: what follows the line is the process's.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{what}: the agent closed the stream after {:?} without an answer",
                        String::from_utf8_lossy(&line)
                    ),
                ))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{what}: waiting for the agent's answer: {e}"),
                ))
            }
        }
        if line.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what}: no newline in the agent's first 4 KiB"),
            ));
        }
    }
    let answer = String::from_utf8_lossy(&line);
    if answer == "OK" {
        s.set_read_timeout(None)?;
        return Ok(s);
    }
    let reason = answer.strip_prefix("ERR ").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: the agent answered {answer:?}, not OK or ERR <reason>"),
        )
    })?;
    Err(io::Error::other(format!(
        "{what}: the agent refused: {reason}"
    )))
}

/// Reads `stream` to EOF; panics (with what it read) if that takes over `timeout`
/// or the read fails.
pub fn read_all_with_timeout(stream: &mut UnixStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!(
                "no EOF after {timeout:?}; read so far: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // The loop's deadline check reports it.
            }
            Err(e) => panic!(
                "reading a stdio stream: {e}; read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// [`read_all_with_timeout`] on a thread of its own, so that several streams of one
/// process drain at once.
pub fn read_all_in_background(
    mut stream: UnixStream,
    timeout: Duration,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || read_all_with_timeout(&mut stream, timeout))
}

/// The agent's log (its own records and the guest kernel's, see the agent's
/// `log` module), read from LOG_PORT as it comes.
pub struct GuestLog {
    text: std::sync::Arc<std::sync::Mutex<String>>,
}

/// What the guest kernel logs when it kills a busybox process for the user-mode
/// fault this kind of host produces (docs/platform.md): "exe[38]: segfault at 0 ip
/// 00000000004a4d02 .. in busybox[401000+184000]" or "traps: busybox[60] general
/// protection fault ip:41bf19 .. in busybox[401000+184000]".
pub const PLATFORM_FAULT_MARKS: [&str; 2] = ["segfault at", "general protection fault"];

/// Whether a log line is the guest kernel's report of the host's busybox fault
/// (docs/platform.md), wherever the line was forwarded to.
pub fn is_platform_fault(line: &str) -> bool {
    line.contains("kernel:")
        && line.contains(" in busybox[")
        && PLATFORM_FAULT_MARKS.iter().any(|m| line.contains(m))
}

impl GuestLog {
    /// Connects to the agent's log; the agent must be answering already.
    pub fn attach(uds: &Path) -> io::Result<Self> {
        let mut stream = vsock_connect(uds, peapod_agent_protocol::LOG_PORT)?;
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Self { text })
    }

    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// A position in the log, for [`GuestLog::platform_fault_since`].
    pub fn mark(&self) -> usize {
        self.text.lock().unwrap().len()
    }

    /// The kernel's line about the host's busybox fault, if one was logged after
    /// `mark`. The kernel logs it as the process dies; give it `settle` to arrive.
    pub fn platform_fault_since(&self, mark: usize, settle: Duration) -> Option<String> {
        std::thread::sleep(settle);
        let text = self.text.lock().unwrap();
        text[mark.min(text.len())..]
            .lines()
            .find(|l| is_platform_fault(l))
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the VMM and the agent's stdio port: accepts the vsock
    /// handshake, reads the header line and answers `answer`, then writes `then`.
    fn fake_stdio(dir: &Path, answer: &'static str, then: &'static [u8]) -> std::path::PathBuf {
        let uds = dir.join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            for _ in 0..2 {
                line.clear();
                while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line.starts_with(b"CONNECT") {
                    assert_eq!(line, format!("CONNECT {STDIO_PORT}").as_bytes());
                    c.write_all(b"OK 1234\n").unwrap();
                }
            }
            assert_eq!(line, b"stdout c1 -");
            c.write_all(answer.as_bytes()).unwrap();
            c.write_all(then).unwrap();
        });
        uds
    }

    #[test]
    fn attach_reads_ok_then_the_stream_is_the_processs() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_stdio(dir.path(), "OK\n", b"hello\n");
        let mut s = attach(&uds, StdioStream::Stdout, "c1", "").unwrap();
        let out = read_all_with_timeout(&mut s, Duration::from_secs(10));
        assert_eq!(out, b"hello\n");
    }

    #[test]
    fn attach_reports_the_agents_reason() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_stdio(dir.path(), "ERR no container c1\n", b"");
        let e = attach(&uds, StdioStream::Stdout, "c1", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no container c1"), "{e}");
        assert!(e.contains("stdout of c1/-"), "{e}");
    }

    #[test]
    #[should_panic(expected = "read so far: \"part\"")]
    fn read_all_gives_up_at_the_deadline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"part").unwrap();
        let _ = read_all_with_timeout(&mut a, Duration::from_millis(200));
        drop(b);
    }

    #[test]
    fn connect_gives_up_with_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("none.sock");
        let e = AgentConn::connect(&uds, Duration::from_millis(500))
            .err()
            .unwrap();
        assert!(e.contains("none.sock"), "{e}");
        assert!(e.contains("attempts"), "{e}");
    }

    /// A ttrpc agent on `dir/agent.sock` answering Health, GetOomEvent (after a
    /// moment) and CreateContainer (always an error); the rest are the generated
    /// "not supported".
    struct FakeAgent;

    #[async_trait::async_trait]
    impl peapod_agent_protocol::Agent for FakeAgent {
        async fn health(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            _: HealthRequest,
        ) -> ttrpc::Result<HealthResponse> {
            let mut r = HealthResponse::new();
            r.uptime_seconds = 1.5;
            Ok(r)
        }

        async fn get_oom_event(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            _: GetOomEventRequest,
        ) -> ttrpc::Result<OomEvent> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut r = OomEvent::new();
            r.container_id = "c3".into();
            Ok(r)
        }

        async fn create_container(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            req: CreateContainerRequest,
        ) -> ttrpc::Result<Empty> {
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("container {}: bad oci_spec", req.container_id),
            )))
        }
    }

    fn start_fake_agent(dir: &Path) -> std::path::PathBuf {
        let sock = dir.join("agent.sock");
        let addr = format!("unix://{}", sock.display());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let service = peapod_agent_protocol::create_agent(std::sync::Arc::new(FakeAgent));
                let mut server = ttrpc::r#async::Server::new()
                    .bind(&addr)
                    .unwrap()
                    .register_service(service);
                server.start().await.unwrap();
                tx.send(()).unwrap();
                std::future::pending::<()>().await
            })
        });
        rx.recv().unwrap();
        sock
    }

    /// A stand-in for the VMM's vsock socket: the first `refuse` connections are
    /// closed after `CONNECT` (a guest where nothing listens yet), the later ones are
    /// answered `OK` and joined to `agent`.
    fn fake_vmm_to(dir: &Path, agent: std::path::PathBuf, refuse: usize) -> std::path::PathBuf {
        let uds = dir.join("vsock.sock");
        let l = UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            for (i, c) in l.incoming().enumerate() {
                let mut c = c.unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, format!("CONNECT {AGENT_PORT}").as_bytes());
                if i < refuse {
                    continue;
                }
                c.write_all(b"OK 1073741824\n").unwrap();
                let a = UnixStream::connect(&agent).unwrap();
                let (c2, a2) = (c.try_clone().unwrap(), a.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = io::copy(&mut &c2, &mut &a2);
                    let _ = a2.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = io::copy(&mut &a, &mut &c);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        uds
    }

    #[test]
    fn a_client_that_waits_for_the_agent_and_gets_its_answers_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let agent = start_fake_agent(dir.path());
        let uds = fake_vmm_to(dir.path(), agent, 3);
        let conn = AgentConn::connect(&uds, Duration::from_secs(20)).expect("connect");
        assert_eq!(conn.health().unwrap().uptime_seconds, 1.5);

        // A long poll in the background while other calls go on.
        let oom = conn.spawn_oom_event(Duration::from_secs(10));
        let mut req = CreateContainerRequest::new();
        req.container_id = "c9".into();
        let e = conn.create_container(&req).unwrap_err();
        let text = error_text(&e);
        assert!(text.contains("container c9: bad oci_spec"), "{text}");
        assert!(text.contains("INVALID_ARGUMENT"), "{text}");
        let e = conn.version().unwrap_err();
        assert!(error_text(&e).contains("not supported"), "{e}");
        assert_eq!(conn.join(oom).unwrap().container_id, "c3");

        // A deadline shorter than the agent's answer.
        let e = conn
            .with_timeout(Duration::from_millis(50))
            .call(|c, ctx| async move { c.get_oom_event(ctx, &GetOomEventRequest::new()).await })
            .unwrap_err();
        assert!(error_text(&e).contains("timeout"), "{e}");
        assert!(
            conn.health().is_ok(),
            "the connection outlives a timed-out call"
        );
    }
}
