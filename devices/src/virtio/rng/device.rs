use std::io::Write;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::single_queue::ActiveQueue;
use crate::virtio::{
    check_chain, serve_queue, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_RNG,
};

const QUEUE_SIZE: u16 = 64;
/// The most entropy one request gets: bounds the host work a guest can ask for.
pub(super) const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

pub struct Rng {
    interrupt: Arc<Interrupt>,
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActiveQueue>,
    broken: bool,
}

impl Rng {
    pub fn new(interrupt: Arc<Interrupt>) -> std::io::Result<Self> {
        Ok(Self {
            interrupt,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            broken: false,
        })
    }

    /// Fills every buffer the guest made available with random bytes.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut().filter(|_| !self.broken) else {
            return;
        };
        let memory = &active.memory;
        if let Err(e) = serve_queue(&mut active.queue, memory, &self.interrupt, |chain| {
            fill_random(memory, chain)
        }) {
            log::warn!("virtio-rng: the driver broke the request queue ({e}); device stopped");
            self.broken = true;
            self.interrupt.signal_needs_reset();
        }
    }
}

/// Returns how many bytes were written; 0 for a chain that is not device-writable or
/// points outside guest memory.
fn fill_random(memory: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    if let Err(e) = check_chain(&chain) {
        log::debug!("virtio-rng: request refused: {e}");
        return 0;
    }
    let mut writer = match chain.writer(memory) {
        Ok(w) => w,
        Err(e) => {
            log::debug!("virtio-rng: bad request chain: {e}");
            return 0;
        }
    };
    let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which
        // getrandom only writes to.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), len - filled, 0) };
        if n <= 0 {
            log::error!(
                "virtio-rng: getrandom failed: {}",
                std::io::Error::last_os_error()
            );
            break;
        }
        filled += n as usize;
    }
    match writer.write_all(&buf[..filled]) {
        Ok(()) => filled as u32,
        Err(e) => {
            log::debug!("virtio-rng: cannot write to the guest's buffer: {e}");
            writer.bytes_written() as u32
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueue::activate(activation, &self.activate_evt)?);
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;

    fn active_rng(memory: &GuestMemoryMmap, q: &TestQueue) -> Rng {
        let mut rng = Rng::new(interrupt()).unwrap();
        let (activation, _kicks) = activation(memory, 0, vec![q.queue()]);
        rng.activate(activation).unwrap();
        rng
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let memory = memory();
        let q = TestQueue::new(&memory, 0, 16);
        let mut rng = active_rng(&memory, &q);
        q.add_chain(&[writable(DATA_START, 100), writable(DATA_START + 0x1000, 28)]);
        rng.process_queue();
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used(0), (0, 128));
        assert_ne!(
            read(&memory, DATA_START, 100),
            vec![0; 100],
            "random bytes arrived"
        );
        assert!(interrupted(rng.interrupt()));
    }

    #[test]
    fn hostile_chains_fail_only_their_request() {
        let memory = memory();
        let q = TestQueue::new(&memory, 0, 16);
        let mut rng = active_rng(&memory, &q);
        q.add_chain(&[readable(DATA_START, 64)]); // wrong direction
        q.add_chain(&[writable(MEM_SIZE as u64 - 8, 64)]); // runs past guest memory
        q.add_chain(&[writable(DATA_START, 0)]); // zero length
        q.add_loop(DATA_START, true);
        q.add_chain(&[writable(DATA_START, u32::MAX)]); // oversize
        q.add_chain(&[writable(DATA_START, 16), readable(DATA_START, 16)]); // misordered
        q.add_bad_next(DATA_START);
        q.add_chain(&[writable(DATA_START, 32)]); // and a good one after them
        rng.process_queue();
        assert_eq!(q.used_idx(), 8, "every chain is returned to the driver");
        for i in [0, 1, 2, 3, 5, 6] {
            assert_eq!(q.used(i).1, 0, "hostile chain {i} got no data");
        }
        assert_eq!(q.used(7).1, 32);
        assert!(!rng.interrupt().needs_reset());
    }

    #[test]
    fn oversize_buffer_is_capped() {
        let memory = memory();
        let q = TestQueue::new(&memory, 0, 16);
        let mut rng = active_rng(&memory, &q);
        q.add_chain(&[writable(DATA_START, 1 << 20)]);
        rng.process_queue();
        assert_eq!(q.used(0).1 as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn a_scribbled_ring_stops_the_device_not_the_vmm() {
        let memory = memory();
        let q = TestQueue::new(&memory, 0, 16);
        let mut rng = active_rng(&memory, &q);
        q.set_avail_idx(1000); // 1000 chains in a 16-entry ring
        rng.process_queue();
        assert!(rng.interrupt().needs_reset());
        q.set_avail_idx(1001);
        rng.process_queue(); // ignored, no panic
        assert_eq!(q.used_idx(), 0);
    }
}
