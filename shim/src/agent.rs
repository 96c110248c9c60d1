//! The guest agent, reached over the VMM's hybrid vsock: connect to the VM's unix
//! socket, write `CONNECT <port>\n`, read `OK <n>\n`; the stream is then the guest's.

use std::io;
use std::path::Path;
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

/// A ttrpc client of the agent. Retries while the guest boots (the VMM resets the
/// connection while nothing listens on the port yet) until `timeout`.
pub async fn connect(uds: &Path, timeout: Duration) -> io::Result<AgentClient> {
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

/// A request context without a deadline (for calls that wait for a process).
pub fn ctx_forever() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
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
