//! Binding the VM's socket, and the device on a real event loop.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};

use super::super::{VsockError, VsockMuxer};
use super::*;

fn new_vsock(path: &Path) -> Result<Vsock, VsockError> {
    Vsock::new(GUEST_CID, path.to_owned(), interrupt())
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let dir = TempDir::new();
    let path = dir.path().join("vm.sock");
    let live = UnixListener::bind(&path).unwrap();
    let err = new_vsock(&path).err().expect("refused");
    assert!(matches!(err, VsockError::Backend(_)));
    let msg = err.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()) && msg.contains("live"),
        "{msg}"
    );
    // The live socket still works.
    let _c = UnixStream::connect(&path).unwrap();
    assert!(live.accept().is_ok());
}

#[test]
fn a_stale_socket_is_replaced_and_ours_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.path().join("vm.sock");
    drop(UnixListener::bind(&path).unwrap()); // a VMM that died: the file stays
    assert!(path.exists());
    let vsock = new_vsock(&path).unwrap();
    assert_eq!(vsock.uds_path(), path);
    assert!(UnixStream::connect(&path).is_ok(), "bound afresh");
    drop(vsock);
    assert!(!path.exists(), "the socket file goes with the device");
}

#[test]
fn a_successors_socket_is_not_removed() {
    let dir = TempDir::new();
    let path = dir.path().join("vm.sock");
    let vsock = new_vsock(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _successor = UnixListener::bind(&path).unwrap();
    drop(vsock);
    assert!(path.exists());
}

#[test]
fn paths_that_cannot_serve_are_refused_with_their_name() {
    let dir = TempDir::new();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let msg = new_vsock(&file).err().expect("refused").to_string();
    assert!(
        msg.contains("not a socket") && msg.contains("not-a-socket"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let missing = dir.path().join("no/such/dir/vm.sock");
    let msg = new_vsock(&missing).err().expect("refused").to_string();
    assert!(
        msg.contains("no/such/dir/vm.sock") && msg.contains("bind"),
        "{msg}"
    );

    let long = dir.path().join("x".repeat(100));
    let msg = new_vsock(&long).err().expect("refused").to_string();
    assert!(msg.contains("107 bytes"), "{msg}");
}

#[test]
fn reserved_cids_bind_nothing() {
    let dir = TempDir::new();
    let path = dir.path().join("vm.sock");
    let err = Vsock::new(2, path.clone(), interrupt())
        .err()
        .expect("refused");
    assert!(matches!(err, VsockError::ReservedCid(2)));
    assert!(!path.exists());
}

#[test]
fn the_event_loop_drives_the_device() {
    let memory = memory();
    let dir = TempDir::new();
    let path = dir.path().join("vm.sock");
    let rxq = TestQueue::new(&memory, 0, 16);
    let txq = TestQueue::new(&memory, 0x1_0000, 16);
    let evq = TestQueue::new(&memory, 0x2_0000, 16);
    let vsock = Arc::new(Mutex::new(new_vsock(&path).unwrap()));
    let mut events: EventManager<Arc<Mutex<Vsock<VsockMuxer>>>> = EventManager::new().unwrap();
    events.add_subscriber(vsock.clone());
    let run = |events: &mut EventManager<_>| {
        for _ in 0..5 {
            events.run_with_timeout(10).unwrap();
        }
    };

    let mut host = connect(&path);
    writeln!(host, "CONNECT 1024").unwrap();
    run(&mut events);
    assert_eq!(
        vsock.lock().unwrap().backend().connection_count(),
        0,
        "inert"
    );

    rxq.add_chain(&[writable(DATA_START, 4096)]);
    let (activation, kicks) = activation(&memory, 0, vec![rxq.queue(), txq.queue(), evq.queue()]);
    vsock.lock().unwrap().activate(activation).unwrap();
    run(&mut events);
    assert_eq!(rxq.used_idx(), 1, "the REQUEST went out");
    let raw = read(&memory, DATA_START, HDR_SIZE);
    let req = PacketHeader::from_bytes(raw[..].try_into().unwrap());
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));

    let g = GuestConn::new(1024, req.src_port);
    fill(
        &memory,
        DATA_START + 0x1_0000,
        &g.hdr(op::RESPONSE).to_bytes(),
    );
    txq.add_chain(&[readable(DATA_START + 0x1_0000, HDR_SIZE as u32)]);
    kicks[1].write(1).unwrap();
    run(&mut events);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));

    host.write_all(b"ping").unwrap();
    rxq.add_chain(&[writable(DATA_START + 0x2000, 4096)]);
    kicks[0].write(1).unwrap();
    run(&mut events);
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(
        read(&memory, DATA_START + 0x2000 + HDR_SIZE as u64, 4),
        b"ping"
    );
}
