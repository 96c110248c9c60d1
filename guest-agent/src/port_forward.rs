//! `kubectl port-forward` in the guest: the host opens a connection on
//! [`PORT_FORWARD_PORT`] for each connection containerd made to the pod's loopback
//! on the node (the shim redirects those to itself); the agent dials the same port
//! on the guest's loopback, where the pod's servers are, and relays both ways.

use std::net::{Ipv4Addr, Ipv6Addr};

use peapod_agent_protocol::{ForwardHeader, MAX_FORWARD_HEADER, PORT_FORWARD_PORT};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_vsock::VsockStream;

use crate::handshake;

const WHAT: &str = "port-forward";

/// Serves [`PORT_FORWARD_PORT`] for as long as the agent runs.
pub async fn serve() {
    handshake::serve(PORT_FORWARD_PORT, WHAT, forward).await
}

async fn forward(mut conn: VsockStream) {
    let header = match handshake::read_header(&mut conn, MAX_FORWARD_HEADER)
        .await
        .and_then(|line| ForwardHeader::parse(&line))
    {
        Ok(h) => h,
        Err(e) => return handshake::refuse(&mut conn, WHAT, &e).await,
    };
    let mut target = match dial_loopback(header.port).await {
        Ok(t) => t,
        Err(e) => {
            // A closed port is the pod's business, not a fault of the agent's.
            log::debug!("{WHAT}: port {}: {e}", header.port);
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut target).await {
        log::debug!("{WHAT}: port {}: {e}", header.port);
    }
}

/// `localhost:port` as containerd dials it in a runc pod's namespace: IPv4 first,
/// then IPv6; the IPv4 error if both fail.
async fn dial_loopback(port: u16) -> std::io::Result<TcpStream> {
    match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(s) => Ok(s),
        Err(v4) => TcpStream::connect((Ipv6Addr::LOCALHOST, port))
            .await
            .map_err(|_| v4),
    }
}
