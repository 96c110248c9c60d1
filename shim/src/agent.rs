//! The guest agent, reached over the VMM's hybrid vsock: connect to the VM's unix
//! socket, write `CONNECT <port>\n`, read `OK <n>\n`; the stream is then the guest's.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peapod_agent_protocol::{
    ttrpc, AgentClient, StdioHeader, StdioStream, AGENT_PORT, MAX_STDIO_HEADER, STDIO_PORT,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long a handshake line may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a stream to guest port `port` through the VMM's vsock socket `uds`.
pub async fn vsock_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let line = read_line(&mut s, 32).await?;
    if line.starts_with("OK ") {
        Ok(s)
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("vsock port {port}: the VMM answered {line:?}"),
        ))
    }
}

/// Reads one `\n`-terminated line byte by byte (what follows belongs to the stream).
async fn read_line(s: &mut UnixStream, max: usize) -> io::Result<String> {
    let read = async {
        let mut line = Vec::new();
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' {
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(b);
            if line.len() > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an answer line longer than {max} bytes: {line:?}"),
                ));
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer line"))?
}

/// The agent's ttrpc client, made anew when its connection breaks while the VM
/// lives (long polls find that out: [`Agent::long_poll`]).
pub struct Agent {
    uds: PathBuf,
    /// The current client, and how many connections came before it.
    current: std::sync::Mutex<(u64, AgentClient)>,
    /// Held while a new connection is made, so that one is.
    reconnecting: tokio::sync::Mutex<()>,
}

/// How long one call of a long poll (WaitProcess, GetOomEvent) waits before it is
/// asked again.
pub const LONG_POLL: Duration = Duration::from_secs(60);

/// How long one connection attempt after a broken connection may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a long poll whose connection broke waits for the VM to be found gone
/// before it connects again.
const GONE_GRACE: Duration = Duration::from_secs(1);

impl Agent {
    /// Connects through the VMM's vsock socket `uds`, retrying while the guest boots
    /// (the VMM resets the connection while nothing listens on the port yet) until
    /// `timeout`.
    pub async fn connect(uds: &Path, timeout: Duration) -> io::Result<Agent> {
        let client = connect(uds, timeout).await?;
        Ok(Agent {
            uds: uds.to_path_buf(),
            current: std::sync::Mutex::new((0, client)),
            reconnecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The current client.
    pub fn client(&self) -> AgentClient {
        self.current().1
    }

    fn current(&self) -> (u64, AgentClient) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces connection number `broken` with a new one, unless another caller
    /// did already.
    async fn reconnect(&self, broken: u64) -> io::Result<()> {
        let _one = self.reconnecting.lock().await;
        if self.current().0 != broken {
            return Ok(());
        }
        let client = connect(&self.uds, RECONNECT_TIMEOUT).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (broken + 1, client);
        Ok(())
    }

    /// Calls `call` (a call that waits: WaitProcess, GetOomEvent) with deadline `poll`
    /// until it answers: asked again when the deadline passes (a connection that died
    /// silently is noticed within it), and on a new connection when the connection
    /// broke. The agent's own error is returned as it is; a broken connection's once
    /// `gone(grace)` says the VM is gone (it waits at most `grace` for that).
    pub async fn long_poll<T, F, Fut, G, GFut>(
        &self,
        poll: Duration,
        gone: G,
        mut call: F,
    ) -> ttrpc::Result<T>
    where
        F: FnMut(AgentClient, ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
        G: Fn(Duration) -> GFut,
        GFut: std::future::Future<Output = bool>,
    {
        loop {
            let (number, client) = self.current();
            let e = match call(client, ctx(poll)).await {
                Ok(answer) => return Ok(answer),
                Err(e) if past_deadline(&e) => continue,
                Err(e @ ttrpc::Error::RpcStatus(_)) => return Err(e),
                Err(e) => e,
            };
            if gone(GONE_GRACE).await {
                return Err(e);
            }
            log::info!(
                "the agent's connection through {} broke ({e}): connecting again",
                self.uds.display()
            );
            if let Err(again) = self.reconnect(number).await {
                log::warn!("connecting to the agent again: {again}");
            }
        }
    }
}

/// Whether `e` says a call's deadline passed (on either side).
fn past_deadline(e: &ttrpc::Error) -> bool {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code() == ttrpc::Code::DEADLINE_EXCEEDED,
        // What the client's own timer reports.
        ttrpc::Error::Others(text) => text.starts_with("Receive packet timeout"),
        _ => false,
    }
}

/// A ttrpc client of the agent. Retries while the guest boots (the VMM resets the
/// connection while nothing listens on the port yet) until `timeout`.
async fn connect(uds: &Path, timeout: Duration) -> io::Result<AgentClient> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match connect_once(uds).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                err.kind(),
                format!(
                    "no agent on vsock port {AGENT_PORT} through {} after {timeout:?} \
                     ({attempts} attempts): {err}",
                    uds.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect_once(uds: &Path) -> io::Result<AgentClient> {
    let stream = vsock_connect(uds, AGENT_PORT).await?.into_std()?;
    let socket = ttrpc::r#async::transport::Socket::try_from(stream)?;
    let client = AgentClient::new(ttrpc::r#async::Client::new(socket));
    let req = peapod_agent_protocol::HealthRequest::new();
    client
        .health(ctx(Duration::from_secs(5)), &req)
        .await
        .map_err(|e| io::Error::other(format!("Health: {e}")))?;
    Ok(client)
}

/// A request context with a deadline.
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

/// Opens one stdio stream of a process (`exec_id` empty for the container's own).
pub async fn attach(
    uds: &Path,
    stream: StdioStream,
    container_id: &str,
    exec_id: &str,
) -> io::Result<UnixStream> {
    let what = format!(
        "attaching {stream} of {container_id}/{}",
        if exec_id.is_empty() { "-" } else { exec_id }
    );
    let header = StdioHeader {
        stream,
        container_id: container_id.into(),
        exec_id: exec_id.into(),
    };
    open_stream(uds, STDIO_PORT, &header.encode(), MAX_STDIO_HEADER)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Opens a stream on one of the agent's stream ports: connects, writes `header`
/// (newline included) and reads the agent's answer line, at most `max` bytes; the
/// stream after `OK`. An `ERR` answer is a `ConnectionRefused` error carrying the
/// agent's reason.
pub async fn open_stream(
    uds: &Path,
    port: u32,
    header: &str,
    max: usize,
) -> io::Result<UnixStream> {
    let mut s = vsock_connect(uds, port).await?;
    s.write_all(header.as_bytes()).await?;
    let answer = read_line(&mut s, max).await?;
    match answer.strip_prefix("ERR ") {
        None if answer == "OK" => Ok(s),
        Some(reason) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the agent answered: {reason}"),
        )),
        None => Err(io::Error::other(format!("the agent answered {answer:?}"))),
    }
}

/// Forwards the agent's log (vsock port LOG_PORT: the agent's own lines and the
/// guest kernel's) into the shim's log, so that containerd's log shows what happened
/// in the guest. `pod` prefixes each line. Ends when the VM does.
pub fn forward_log(uds: &Path, pod: &str) {
    let uds = uds.to_path_buf();
    let pod = pod.to_string();
    tokio::spawn(async move {
        let stream = match vsock_connect(&uds, peapod_agent_protocol::LOG_PORT).await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("pod {pod}: the guest's log: {e}");
                return;
            }
        };
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.strip_prefix("peapod-agent: ").unwrap_or(&line);
            match line.split_once(' ') {
                Some(("ERROR", rest)) => log::error!("pod {pod}: guest: {rest}"),
                Some(("WARN", rest)) => log::warn!("pod {pod}: guest: {rest}"),
                Some(("INFO", rest)) => log::info!("pod {pod}: guest: {rest}"),
                _ => log::debug!("pod {pod}: guest: {line}"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use peapod_agent_protocol::{ttrpc::r#async::TtrpcContext, ProcessRequest, WaitResponse};
    use tokio::net::UnixListener;
    use tokio::sync::Notify;

    use super::*;

    /// Answers WaitProcess: never to its first call (its deadline passes), by
    /// breaking the connection to its second, with status 7 to the next; and
    /// NOT_FOUND for a process named "gone".
    struct FakeAgent {
        calls: AtomicUsize,
        breaker: Arc<Notify>,
    }

    #[async_trait::async_trait]
    impl peapod_agent_protocol::Agent for FakeAgent {
        async fn wait_process(
            &self,
            _: &TtrpcContext,
            req: ProcessRequest,
        ) -> ttrpc::Result<WaitResponse> {
            if req.container_id == "gone" {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::NOT_FOUND,
                    "no container gone",
                )));
            }
            match self.calls.fetch_add(1, Ordering::SeqCst) {
                0 => std::future::pending().await,
                1 => {
                    self.breaker.notify_one();
                    std::future::pending().await
                }
                _ => Ok(WaitResponse {
                    exit_status: 7,
                    ..Default::default()
                }),
            }
        }

        async fn health(
            &self,
            _: &TtrpcContext,
            _: peapod_agent_protocol::HealthRequest,
        ) -> ttrpc::Result<peapod_agent_protocol::HealthResponse> {
            Ok(Default::default())
        }
    }

    /// The agent on a unix socket, and a stand-in for the VMM's vsock socket in
    /// front of it that counts connections and drops them all when `breaker` is
    /// notified.
    async fn fake_vm(dir: &Path, breaker: Arc<Notify>) -> (PathBuf, Arc<AtomicUsize>) {
        let agent_sock = dir.join("agent.sock");
        let service = peapod_agent_protocol::create_agent(Arc::new(FakeAgent {
            calls: AtomicUsize::new(0),
            breaker: breaker.clone(),
        }));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", agent_sock.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        std::mem::forget(server);

        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut host, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut guest = UnixStream::connect(&agent_sock).await.unwrap();
                let breaker = breaker.clone();
                tokio::spawn(async move {
                    read_line(&mut host, 32).await.unwrap();
                    host.write_all(b"OK 1\n").await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut host, &mut guest) => {}
                        _ = breaker.notified() => {}
                    }
                });
            }
        });
        (uds, connections)
    }

    /// WaitProcess for `container_id` as a long poll of `poll`, the VM gone or not
    /// as `gone` says.
    async fn wait<G, GFut>(
        agent: &Agent,
        container_id: &str,
        poll: Duration,
        gone: G,
    ) -> ttrpc::Result<WaitResponse>
    where
        G: Fn(Duration) -> GFut,
        GFut: std::future::Future<Output = bool>,
    {
        let req = ProcessRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        agent
            .long_poll(poll, gone, |c, ctx| {
                let req = req.clone();
                async move { c.wait_process(ctx, &req).await }
            })
            .await
    }

    #[tokio::test]
    async fn a_long_poll_outlasts_its_deadline_and_a_broken_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (uds, connections) = fake_vm(dir.path(), Arc::new(Notify::new())).await;
        let agent = Agent::connect(&uds, Duration::from_secs(5)).await.unwrap();
        let asked_gone = AtomicUsize::new(0);
        let gone = |_| {
            asked_gone.fetch_add(1, Ordering::SeqCst);
            async { false }
        };
        let answer = wait(&agent, "c1", Duration::from_millis(300), gone)
            .await
            .expect("the third call answers");
        assert_eq!(answer.exit_status, 7);
        assert_eq!(connections.load(Ordering::SeqCst), 2, "one reconnection");
        assert_eq!(
            asked_gone.load(Ordering::SeqCst),
            1,
            "asked once, on the break"
        );

        // The agent's own error comes back at once.
        let e = wait(&agent, "gone", Duration::from_secs(5), |_| async { false })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no container gone"), "{e}");
    }

    #[tokio::test]
    async fn a_broken_connection_of_a_gone_vm_is_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let breaker = Arc::new(Notify::new());
        let (uds, connections) = fake_vm(dir.path(), breaker.clone()).await;
        let agent = Agent::connect(&uds, Duration::from_secs(5)).await.unwrap();
        breaker.notify_one();
        let e = wait(&agent, "c1", Duration::from_secs(5), |_| async { true })
            .await
            .unwrap_err();
        assert!(!matches!(e, ttrpc::Error::RpcStatus(_)), "{e}");
        assert_eq!(connections.load(Ordering::SeqCst), 1, "no reconnection");
    }
}
