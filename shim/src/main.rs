//! `containerd-shim-peapod-v2`: see the crate's documentation and docs/shim.md.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<peapod_shim::shim::PeapodShim>(
        peapod_shim::shim::RUNTIME_TYPE,
        Some(peapod_shim::shim::shim_config()),
    )
    .await;
}
