//! Container start benchmark: in one guest, the time from CreateContainer to the
//! container's first byte of output, split into create and start-to-output, for a
//! busybox container (`echo`) on an EROFS (or ext4) layer and a tmpfs upper.
//!
//! `cargo bench -p peapod-tests --bench agent` (or `make bench`); PEAPOD_BENCH_RUNS
//! sets the number of containers (default 5). Every guest system call costs about a
//! thousand times its native price on this kind of host, so these figures measure the
//! number of kernel entries the agent and libcontainer make more than anything else.

use std::io::Read;
use std::time::{Duration, Instant};

use peapod_agent_protocol::{
    rootfs, CreateContainerRequest, MessageField, Rootfs, Stdio, StdioStream,
};
use peapod_tests::agent::{attach, AgentConn};
use peapod_tests::layers::{busybox_layer_any, oci_spec, to_bytes};
use peapod_tests::{api_with_body, require_kvm, VmmOptions, VmmProcess, BOOT_TIMEOUT};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    require_kvm();
    let runs: usize = std::env::var("PEAPOD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let files = tempfile::tempdir().unwrap();
    let layer = busybox_layer_any(files.path());
    let uds = files.path().join("vsock.sock");
    let vsock = format!("cid=3,socket={}", uds.display());
    let mut vm = VmmProcess::start_with(
        &["--memory", "256", "--block-slots", "1", "--vsock", &vsock],
        VmmOptions::default(),
    );
    let conn = AgentConn::connect(&uds, BOOT_TIMEOUT).expect("the agent answers");
    let (status, reply) = api_with_body(
        &vm.api_socket,
        "PUT",
        "/api/v1/block.set",
        &layer.block_set_body(0, true),
    );
    assert_eq!(status, 204, "block.set: {reply}");

    let (mut create, mut to_output, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let id = format!("bench{n}");
        let mut req = CreateContainerRequest::new();
        req.container_id = id.clone();
        req.oci_spec = to_bytes(&oci_spec(&["echo", "ready"], false));
        let mut r = Rootfs::new();
        r.layers = vec![layer.disk()];
        r.upper = Some(rootfs::Upper::UpperTmpfsBytes(16 << 20));
        req.rootfs = MessageField::some(r);
        let mut s = Stdio::new();
        s.stdout = true;
        req.stdio = MessageField::some(s);

        let t0 = Instant::now();
        conn.create_container(&req).expect("CreateContainer");
        let created = t0.elapsed();
        let mut out = attach(&uds, StdioStream::Stdout, &id, "").expect("attach stdout");
        let t1 = Instant::now();
        conn.start_container(&AgentConn::container(&id))
            .expect("StartContainer");
        let mut first = [0u8; 1];
        out.read_exact(&mut first)
            .expect("the container's first byte");
        let (output, all) = (t1.elapsed(), t0.elapsed());
        let mut r = peapod_agent_protocol::RemoveContainerRequest::new();
        r.container_id = id;
        conn.remove_container(&r).expect("RemoveContainer");
        println!(
            "container {n}: create {:.0} ms, start to first output {:.0} ms, total {:.0} ms",
            created.as_secs_f64() * 1e3,
            output.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        );
        create.push(created);
        to_output.push(output);
        total.push(all);
    }
    println!(
        "median of {runs}: CreateContainer {:.0} ms + StartContainer to first output {:.0} ms = CreateContainer to first output {:.0} ms",
        median(create).as_secs_f64() * 1e3,
        median(to_output).as_secs_f64() * 1e3,
        median(total).as_secs_f64() * 1e3
    );
    let _ = conn.destroy_sandbox();
    drop(conn);
    vm.wait_exit(Duration::from_secs(60));
}
