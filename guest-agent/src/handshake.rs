//! What the agent's stream ports share: a vsock listener whose every connection
//! starts with one header line from the host, answered `OK\n` or `ERR <reason>\n`.

use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// Listens on vsock `port` and runs `handle` on a task of its own for each
/// connection, for as long as the agent runs. `what` names the port in the log.
pub async fn serve<F, Fut>(port: u32, what: &'static str, handle: F)
where
    F: Fn(VsockStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{what}: cannot listen on vsock port {port}: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(handle(conn));
            }
            Err(e) => log::warn!("{what}: accept: {e}"),
        }
    }
}

/// Reads the header line (without its newline), byte by byte: what follows it is
/// the stream's own data.
pub async fn read_header(conn: &mut VsockStream, max: usize) -> Result<String, String> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte).await {
            Ok(0) => return Err("the host closed the connection before its header".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= max => {
                return Err(format!("header longer than {max} bytes"));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("reading the header: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Logs `reason` under `what` and answers it to the host, which closes.
pub async fn refuse(conn: &mut VsockStream, what: &str, reason: &str) {
    log::warn!("{what}: {reason}");
    let _ = conn.write_all(format!("ERR {reason}\n").as_bytes()).await;
}
