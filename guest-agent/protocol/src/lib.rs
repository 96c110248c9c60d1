//! The Peapod agent's API, generated from `proto/agent.proto`, and the few facts
//! about it that are not messages: its vsock ports and the stdio stream handshake.

#[allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_results
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_results
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent::*;
pub use agent_ttrpc::{create_agent, Agent, AgentClient};
pub use protobuf::MessageField;
pub use ttrpc;

mod stdio;
pub use stdio::{StdioHeader, StdioStream, MAX_HEADER as MAX_STDIO_HEADER};

mod port_forward;
pub use port_forward::{ForwardHeader, MAX_HEADER as MAX_FORWARD_HEADER};

/// The protocol package this crate speaks; `Version` lists what an agent serves.
pub const PROTOCOL: &str = "peapod.agent.v1";

/// vsock port of the agent's ttrpc service.
pub const AGENT_PORT: u32 = 1024;
/// vsock port on which the host attaches a process's stdin, stdout or stderr.
pub const STDIO_PORT: u32 = 1025;
/// vsock port from which the host reads the agent's log.
pub const LOG_PORT: u32 = 1026;
/// vsock port on which the host opens a TCP connection to the pod's loopback.
pub const PORT_FORWARD_PORT: u32 = 1027;
