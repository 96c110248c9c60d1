//! The guest agent's library: PID 1 duties that the test guest's probe
//! (tests/guest-probe) shares, so that both start a guest the same way.

pub mod init;
